// Host compute kernels in C, for loops the Swift compiler cannot emit with this machine's vector
// instructions: Swift code is compiled for baseline x86-64 (SSE2, no FMA), while these functions
// are compiled for AVX2 + FMA and chosen at run time (`vk_has_avx2_fma`); callers keep a portable
// path for CPUs without them. Internal to the host (not part of the plugin ABI).
#ifndef VQMOE_CKERNELS_H
#define VQMOE_CKERNELS_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/// 1 when the CPU runs AVX2 and FMA (the kernels below may be called), else 0.
int vk_has_avx2_fma(void);

/// Query rows per block of `vk_flash_forward` (8 tiles of 6 rows): callers split the rows of a
/// pair into ranges of this many.
#define VK_FLASH_QUERY_BLOCK 48

/// Floats of Kᵀ packed by `vk_flash_pack` for `t` keys of head size `dh`.
size_t vk_flash_panels(int t, int dh);

/// Packs Kᵀ (t keys, row i at k + i·ld) in panels of 16 keys, dh × 16 floats each, zero past
/// key t − 1, into kt (`vk_flash_panels(t, dh)` floats, caller-owned).
void vk_flash_pack(const float *k, ptrdiff_t ld, int t, int dh, float *kt);

/// Floats of workspace one `vk_flash_forward` call needs for head size `dh`.
size_t vk_flash_forward_workspace(int dh);

/// Floats of workspace `vk_flash_backward` needs for `t` keys of head size `dh`.
size_t vk_flash_backward_workspace(int t, int dh);

/// Blockwise attention forward of query rows row0 ..< row1 of one (batch, head) pair, head size
/// `dh` a multiple of 8. q, v: row i of Q, V at q + i·ld, v + i·ld, t rows each; kt: Kᵀ as packed
/// by `vk_flash_pack`. Writes rows row0 ..< row1 of y (row i at y + i·ldy, dh floats) =
/// softmax(Q Kᵀ·scale) V, causal (key ≤ query) or full, and lse[i], the log-sum-exp of score row
/// i. Rows are independent: any split of 0 ..< t into ranges gives the same bits. `work`:
/// vk_flash_forward_workspace(dh) floats, caller-owned.
void vk_flash_forward(const float *q, const float *kt, const float *v, ptrdiff_t ld, int t, int dh, float scale,
                      int causal, int row0, int row1, float *y, ptrdiff_t ldy, float *lse, float *work);

/// Blockwise attention backward for one pair: from dy and the forward's y (row stride ldy) and
/// lse, ADDS dQ, dK, dV into dq, dk, dv (row stride ld, like q, k, v), recomputing each block's
/// probabilities. `work`: vk_flash_backward_workspace(t, dh) floats, caller-owned.
void vk_flash_backward(const float *q, const float *k, const float *v, ptrdiff_t ld, const float *dy, const float *y,
                       ptrdiff_t ldy, const float *lse, float *dq, float *dk, float *dv, int t, int dh, float scale,
                       int causal, float *work);

#ifdef __cplusplus
}
#endif

#endif
