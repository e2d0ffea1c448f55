// The ABI target is header-only (include/vqmoe_plugin.h); SwiftPM needs one source file.
#include "vqmoe_plugin.h"
