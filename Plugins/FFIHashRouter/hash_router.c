#include "hash_router.h"

// SplitMix64 finaliser: a good 64-bit mix, so consecutive ids land on unrelated experts.
static uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void vqmoe_hash_route(const int32_t *token_ids, int64_t n, int64_t n_experts, int32_t *expert) {
    for (int64_t i = 0; i < n; i++)
        expert[i] = (int32_t)(mix64((uint64_t)(uint32_t)token_ids[i]) % (uint64_t)n_experts);
}

// Hyperplane j has entries +-1 chosen by bit (i*bits + j) of the mixed dimension index.
void vqmoe_lsh_route(const float *x, int64_t n, int64_t d, int64_t n_experts, int32_t *expert) {
    int bits = 0;
    while ((1ll << bits) < n_experts) bits++;
    for (int64_t t = 0; t < n; t++) {
        const float *row = x + t * d;
        uint64_t bucket = 0;
        for (int b = 0; b < bits; b++) {
            float dot = 0.0f;
            for (int64_t i = 0; i < d; i++) {
                uint64_t h = mix64((uint64_t)i * 64u + (uint64_t)b);
                dot += (h & 1u) ? row[i] : -row[i];
            }
            if (dot > 0.0f) bucket |= (1ull << b);
        }
        expert[t] = (int32_t)(bucket % (uint64_t)n_experts);
    }
}

// The same hyperplanes as vqmoe_lsh_route: a code of ceil(log2 K) sign bits, reduced mod K.
void vqmoe_lsh_code(const float *x, int64_t n, int64_t d, int64_t n_codes, int32_t *code) {
    vqmoe_lsh_route(x, n, d, n_codes, code);
}
