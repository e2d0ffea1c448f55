// Plain C routing and quantizing functions with no vqmoe ABI glue: the registry names them with a
// signature string and the host calls them through libffi (docs/design.md, "The plugin ABI", rule 10).
#ifndef VQMOE_FFI_HASH_ROUTER_H
#define VQMOE_FFI_HASH_ROUTER_H
#include <stdint.h>

/// Hash routing (Roller et al. 2021, "Hash Layers for Large Sparse Models"): each token id
/// goes to a fixed expert, expert[i] = hash(ids[i]) mod n_experts.
void vqmoe_hash_route(const int32_t *token_ids, int64_t n, int64_t n_experts, int32_t *expert);

/// Locality-sensitive hashing of the representation: the signs of x against
/// ceil(log2(n_experts)) fixed pseudo-random hyperplanes form the bucket, taken mod
/// n_experts. Nearby vectors share an expert; x: (n,d) row-major.
void vqmoe_lsh_route(const float *x, int64_t n, int64_t d, int64_t n_experts, int32_t *expert);

/// The same LSH as a non-trainable quantizer: code[i] in [0, n_codes) from the signs of x
/// against ceil(log2(n_codes)) fixed hyperplanes (the `lsh_code` registry entry).
void vqmoe_lsh_code(const float *x, int64_t n, int64_t d, int64_t n_codes, int32_t *code);

#endif
