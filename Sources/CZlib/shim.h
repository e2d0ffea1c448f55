// zlib (Debian: zlib1g-dev), for dataset plugins that read gzip files (IDX / Fashion-MNIST).
#include <zlib.h>
