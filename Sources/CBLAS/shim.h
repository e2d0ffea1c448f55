// OpenBLAS's CBLAS interface (Debian: libopenblas-dev). All host GEMMs go through it.
#include <cblas.h>
