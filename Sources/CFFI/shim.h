// libffi (Debian: libffi-dev), used by the host to call plain C functions named in the
// registry (docs/design.md, "The plugin ABI", rule 10). Swift cannot take the address of libffi's global type objects
// directly, so these accessors return them.
#include <ffi.h>

static inline ffi_type *vqmoe_ffi_type_void(void) {
    return &ffi_type_void;
}
static inline ffi_type *vqmoe_ffi_type_float(void) {
    return &ffi_type_float;
}
static inline ffi_type *vqmoe_ffi_type_double(void) {
    return &ffi_type_double;
}
static inline ffi_type *vqmoe_ffi_type_sint32(void) {
    return &ffi_type_sint32;
}
static inline ffi_type *vqmoe_ffi_type_uint32(void) {
    return &ffi_type_uint32;
}
static inline ffi_type *vqmoe_ffi_type_sint64(void) {
    return &ffi_type_sint64;
}
static inline ffi_type *vqmoe_ffi_type_uint64(void) {
    return &ffi_type_uint64;
}
static inline ffi_type *vqmoe_ffi_type_pointer(void) {
    return &ffi_type_pointer;
}
