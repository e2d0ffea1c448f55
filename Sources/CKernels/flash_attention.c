// Blockwise ("flash") attention for one (batch, head) pair with AVX2 + FMA register tiles: the
// score block of a few query rows never leaves L1, and no BLAS call (with its packing and its
// zeroing of C) is made per block. Same equations and loop order as FlashAttention.swift:
//
//   forward, per block of BQ query rows, over chunks of FKC keys, per tile of MR query rows:
//       S = Q Kᵀ,  m' = max(m, scale·rowmax S),  P = exp(scale·S − m'),
//       ℓ = ℓ·e^(m−m') + rowsum P,  A = A·e^(m−m') + P V,  m = m'    →  y = A/ℓ,  lse = m + log ℓ
//   backward, per block of BQ query rows, over chunks of KC keys (D = rowsum(dY ⊙ Y)):
//       P = exp(scale·Q Kᵀ − lse),  dP = dY Vᵀ,  dS = P ⊙ (dP − D)·scale    (per MR-row tile)
//       dV_j += Pᵀ dY_i,  dK_j += dSᵀ Q_i,  dQ_i += dS K_j                    (per block × chunk)
//
// Every product is one register tile: C (MR × 16) = or += Σ_p A(i, p) B(p, 0..16) with A read
// through two strides (so Pᵀ and dSᵀ need no transposed copy) and B's rows contiguous. Kᵀ and Vᵀ
// are packed once per pair in panels of 16 keys (dh × 16 floats each, zero past the last key), so
// the score tiles read B sequentially; K, V, Q and dY are read in place.
#include "CKernels.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>

int vk_has_avx2_fma(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)

enum {
    MR = 6,                    // query (or key) rows of a register tile
    BQ = VK_FLASH_QUERY_BLOCK, // query rows per block of the forward (8 tiles)
    FKC = 256,                 // keys per chunk in the forward (16 panels)
    // The backward's blocks × chunks (chunks a multiple of MR and 16): larger from LONG keys on,
    // where they save loop and store traffic; smaller below, where the causal diagonal's share of
    // masked work grows with the block (measured on the bench model: 96 × 192 is 4% faster than
    // 48 × 96 at 4,096 tokens, 2-3% slower at 256).
    BQ_SHORT = 48,
    KC_SHORT = 96,
    BQ_LONG = 96,
    KC_LONG = 192,
    LONG = 1024,
};

static inline int min_int(int a, int b) {
    return a < b ? a : b;
}
static inline int round16(int n) {
    return (n + 15) & ~15;
}

/// C (mr × 16) = (add: +=) Σ_{p < kc} A(i, p)·B(p, ·), A(i, p) = a[i·sa + p·sk], B(p, j) = b[p·ldb + j].
/// Rows mr..<MR repeat row mr − 1 (read, never stored).
static inline void tile16(int kc, const float *a, ptrdiff_t sa, ptrdiff_t sk, int mr, const float *b, ptrdiff_t ldb,
                          float *c, ptrdiff_t ldc, int add) {
    const float *ar[MR];
    for (int i = 0; i < MR; i++) ar[i] = a + (i < mr ? i : mr - 1) * sa;
    __m256 acc0[MR], acc1[MR];
    for (int i = 0; i < MR; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
    ptrdiff_t off = 0;
    for (int p = 0; p < kc; p++, off += sk, b += ldb) {
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        for (int i = 0; i < MR; i++) {
            const __m256 x = _mm256_broadcast_ss(ar[i] + off);
            acc0[i] = _mm256_fmadd_ps(x, b0, acc0[i]);
            acc1[i] = _mm256_fmadd_ps(x, b1, acc1[i]);
        }
    }
    for (int i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        if (add) {
            acc0[i] = _mm256_add_ps(acc0[i], _mm256_loadu_ps(ci));
            acc1[i] = _mm256_add_ps(acc1[i], _mm256_loadu_ps(ci + 8));
        }
        _mm256_storeu_ps(ci, acc0[i]);
        _mm256_storeu_ps(ci + 8, acc1[i]);
    }
}

/// `tile16` for 8 columns (a head size that is an odd multiple of 8).
static inline void tile8(int kc, const float *a, ptrdiff_t sa, ptrdiff_t sk, int mr, const float *b, ptrdiff_t ldb,
                         float *c, ptrdiff_t ldc, int add) {
    const float *ar[MR];
    for (int i = 0; i < MR; i++) ar[i] = a + (i < mr ? i : mr - 1) * sa;
    __m256 acc[MR];
    for (int i = 0; i < MR; i++) acc[i] = _mm256_setzero_ps();
    ptrdiff_t off = 0;
    for (int p = 0; p < kc; p++, off += sk, b += ldb) {
        const __m256 b0 = _mm256_loadu_ps(b);
        for (int i = 0; i < MR; i++) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(ar[i] + off), b0, acc[i]);
    }
    for (int i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        if (add) acc[i] = _mm256_add_ps(acc[i], _mm256_loadu_ps(ci));
        _mm256_storeu_ps(ci, acc[i]);
    }
}

/// C (m × n) = (add: +=) A B over kc, A and B as in `tile16`; n a multiple of 8.
static void gemm(int kc, const float *a, ptrdiff_t sa, ptrdiff_t sk, int m, const float *b, ptrdiff_t ldb, int n,
                 float *c, ptrdiff_t ldc, int add) {
    for (int i0 = 0; i0 < m; i0 += MR) {
        const int mr = min_int(MR, m - i0);
        const float *ai = a + i0 * sa;
        float *ci = c + i0 * ldc;
        int j = 0;
        for (; j + 16 <= n; j += 16) tile16(kc, ai, sa, sk, mr, b + j, ldb, ci + j, ldc, add);
        if (j < n) tile8(kc, ai, sa, sk, mr, b + j, ldb, ci + j, ldc, add);
    }
}

/// e^x per lane: x = n·ln2 + r (Cody–Waite), e^r by a degree-6 polynomial, 2^n by exponent bits
/// (the algorithm of VecMath.exp; relative error ≤ 2.4e-7 over [−87, 88]).
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 magic = _mm256_set1_ps(12582912.0f);
    const __m256 shifted = _mm256_fmadd_ps(x, _mm256_set1_ps(1.442695040888963f), magic);
    const __m256 n = _mm256_sub_ps(shifted, magic);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i ni = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(0x4B400000));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/// Lanes 0..<rem set (rem in 1...7).
static inline __m256i tail_mask(int rem) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/// max of row[0..<n], n ≥ 1.
static float row_max(const float *row, int n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(row + j));
    float r = hmax(m);
    for (; j < n; j++) r = row[j] > r ? row[j] : r;
    return r;
}

/// row[j] = e^(row[j]·scale − shift) for j < n; returns their sum.
static float exp_row(float *row, int n, float scale, float shift) {
    const __m256 vs = _mm256_set1_ps(scale), vm = _mm256_set1_ps(-shift);
    __m256 sum = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp8(_mm256_fmadd_ps(_mm256_loadu_ps(row + j), vs, vm));
        _mm256_storeu_ps(row + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    if (j < n) {
        const __m256i mask = tail_mask(n - j);
        const __m256 e = exp8(_mm256_fmadd_ps(_mm256_maskload_ps(row + j, mask), vs, vm));
        _mm256_maskstore_ps(row + j, mask, e);
        sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));
    }
    return hsum(sum);
}

/// p[j] = e^(p[j]·scale − lse) and d[j] = p[j]·(d[j] − dot)·scale for j < n (d holds dP on entry).
static void grad_row(float *p, float *d, int n, float scale, float lse, float dot) {
    const __m256 vs = _mm256_set1_ps(scale), vl = _mm256_set1_ps(-lse), vd = _mm256_set1_ps(dot);
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp8(_mm256_fmadd_ps(_mm256_loadu_ps(p + j), vs, vl));
        _mm256_storeu_ps(p + j, e);
        _mm256_storeu_ps(d + j, _mm256_mul_ps(_mm256_mul_ps(e, _mm256_sub_ps(_mm256_loadu_ps(d + j), vd)), vs));
    }
    if (j < n) {
        const __m256i mask = tail_mask(n - j);
        const __m256 e = exp8(_mm256_fmadd_ps(_mm256_maskload_ps(p + j, mask), vs, vl));
        _mm256_maskstore_ps(p + j, mask, e);
        const __m256 g = _mm256_mul_ps(_mm256_mul_ps(e, _mm256_sub_ps(_mm256_maskload_ps(d + j, mask), vd)), vs);
        _mm256_maskstore_ps(d + j, mask, g);
    }
}

static float dot(const float *a, const float *b, int n) {
    __m256 s = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s);
    return hsum(s);
}

/// Kᵀ in panels of 16 keys: panel p holds dh rows of 16 floats, keys 16p ..< 16p + 16 (0 past t).
static void pack_panels(const float *k, ptrdiff_t ld, int t, int dh, float *kt) {
    for (int p = 0; p < (t + 15) / 16; p++) {
        float *dst = kt + (ptrdiff_t)p * 16 * dh;
        for (int j = 0; j < 16; j++) {
            const int key = p * 16 + j;
            if (key < t) {
                const float *src = k + key * ld;
                for (int d = 0; d < dh; d++) dst[d * 16 + j] = src[d];
            } else {
                for (int d = 0; d < dh; d++) dst[d * 16 + j] = 0;
            }
        }
    }
}

static size_t panel_floats(int t, int dh) {
    return (size_t)round16(t) * (size_t)dh;
}

size_t vk_flash_panels(int t, int dh) {
    return panel_floats(t, dh);
}

void vk_flash_pack(const float *k, ptrdiff_t ld, int t, int dh, float *kt) {
    pack_panels(k, ld, t, dh, kt);
}

size_t vk_flash_forward_workspace(int dh) {
    return MR * FKC + (size_t)BQ * dh + 2 * BQ;
}

size_t vk_flash_backward_workspace(int t, int dh) {
    return 2 * panel_floats(t, dh) + 2 * BQ_LONG * KC_LONG + (size_t)BQ_LONG * dh + (size_t)t;
}

void vk_flash_forward(const float *q, const float *kt, const float *v, ptrdiff_t ld, int t, int dh, float scale,
                      int causal, int row0, int row1, float *y, ptrdiff_t ldy, float *lse, float *work) {
    float *s = work, *acc = s + MR * FKC, *m = acc + BQ * dh, *l = m + BQ;
    for (int ib = row0; ib < row1; ib += BQ) {
        const int rowsB = min_int(BQ, row1 - ib), keysB = causal ? ib + rowsB : t;
        memset(acc, 0, sizeof(float) * rowsB * dh);
        for (int r = 0; r < rowsB; r++) m[r] = -INFINITY, l[r] = 0;
        for (int j0 = 0; j0 < keysB; j0 += FKC) {
            for (int i0 = ib; i0 < ib + rowsB; i0 += MR) {
                const int mr = min_int(MR, ib + rowsB - i0);
                const int cols = min_int(FKC, (causal ? i0 + mr : t) - j0);
                if (cols <= 0) continue;
                // S (mr, cols) = Q_tile Kᵀ_chunk, row stride FKC
                for (int pn = 0; pn < round16(cols) / 16; pn++)
                    tile16(dh, q + i0 * ld, ld, 1, mr, kt + (ptrdiff_t)(j0 / 16 + pn) * 16 * dh, 16, s + pn * 16, FKC,
                           0);
                for (int r = 0; r < mr; r++) {
                    const int i = i0 + r, ri = i - ib, n = causal ? min_int(cols, i + 1 - j0) : cols;
                    float *row = s + r * FKC;
                    if (n <= 0) {
                        memset(row, 0, sizeof(float) * cols);
                        continue;
                    }
                    const float mOld = m[ri], mx = row_max(row, n) * scale, mNew = mx > mOld ? mx : mOld;
                    const float sum = exp_row(row, n, scale, mNew);
                    memset(row + n, 0, sizeof(float) * (cols - n));
                    if (mOld == -INFINITY) {
                        l[ri] = sum;
                    } else {
                        const float corr = expf(mOld - mNew);
                        l[ri] = l[ri] * corr + sum;
                        if (corr != 1) {
                            float *a = acc + ri * dh;
                            for (int d = 0; d < dh; d++) a[d] *= corr;
                        }
                    }
                    m[ri] = mNew;
                }
                // A_tile (mr, dh) += P (mr, cols) V_chunk
                gemm(cols, s, FKC, 1, mr, v + j0 * ld, ld, dh, acc + (i0 - ib) * dh, dh, 1);
            }
        }
        for (int ri = 0; ri < rowsB; ri++) {
            const float inv = 1 / l[ri];
            float *out = y + (ib + ri) * ldy;
            for (int d = 0; d < dh; d++) out[d] = acc[ri * dh + d] * inv;
            lse[ib + ri] = m[ri] + logf(l[ri]);
        }
    }
}

void vk_flash_backward(const float *q, const float *k, const float *v, ptrdiff_t ld, const float *dy, const float *y,
                       ptrdiff_t ldy, const float *lse, float *dq, float *dk, float *dv, int t, int dh, float scale,
                       int causal, float *work) {
    const int BQ = t >= LONG ? BQ_LONG : BQ_SHORT, KC = t >= LONG ? KC_LONG : KC_SHORT;
    float *kt = work, *vt = kt + panel_floats(t, dh), *p = vt + panel_floats(t, dh), *ds = p + BQ * KC;
    float *dqb = ds + BQ * KC, *dd = dqb + BQ * dh;
    pack_panels(k, ld, t, dh, kt);
    pack_panels(v, ld, t, dh, vt);
    for (int i = 0; i < t; i++) dd[i] = dot(dy + i * ldy, y + i * ldy, dh);
    for (int ib = 0; ib < t; ib += BQ) {
        const int rowsB = min_int(BQ, t - ib), keysB = causal ? ib + rowsB : t;
        memset(dqb, 0, sizeof(float) * rowsB * dh);
        for (int j0 = 0; j0 < keysB; j0 += KC) {
            const int colsB = min_int(KC, keysB - j0);
            for (int i0 = ib; i0 < ib + rowsB; i0 += MR) {
                const int mr = min_int(MR, ib + rowsB - i0);
                const int cols = causal ? min_int(colsB, i0 + mr - j0) : colsB;
                float *pt = p + (i0 - ib) * KC, *dt = ds + (i0 - ib) * KC;
                for (int pn = 0; pn < (cols > 0 ? round16(cols) / 16 : 0); pn++) {
                    const ptrdiff_t panel = (ptrdiff_t)(j0 / 16 + pn) * 16 * dh;
                    tile16(dh, q + i0 * ld, ld, 1, mr, kt + panel, 16, pt + pn * 16, KC, 0);    // S
                    tile16(dh, dy + i0 * ldy, ldy, 1, mr, vt + panel, 16, dt + pn * 16, KC, 0); // dP
                }
                for (int r = 0; r < mr; r++) {
                    const int i = i0 + r;
                    int n = causal ? min_int(cols, i + 1 - j0) : cols;
                    if (n < 0) n = 0;
                    grad_row(pt + r * KC, dt + r * KC, n, scale, lse[i], dd[i]);
                    memset(pt + r * KC + n, 0, sizeof(float) * (colsB - n));
                    memset(dt + r * KC + n, 0, sizeof(float) * (colsB - n));
                }
            }
            // dV_chunk += Pᵀ dY_block,  dK_chunk += dSᵀ Q_block,  dQ_block += dS K_chunk
            gemm(rowsB, p, 1, KC, colsB, dy + ib * ldy, ldy, dh, dv + j0 * ld, ld, 1);
            gemm(rowsB, ds, 1, KC, colsB, q + ib * ld, ld, dh, dk + j0 * ld, ld, 1);
            gemm(colsB, ds, KC, 1, rowsB, k + j0 * ld, ld, dh, dqb, dh, 1);
        }
        for (int ri = 0; ri < rowsB; ri++) {
            float *out = dq + (ib + ri) * ld;
            for (int d = 0; d < dh; d++) out[d] += dqb[ri * dh + d];
        }
    }
}

#pragma clang attribute pop

#else // not x86-64: the portable Swift paths run

int vk_has_avx2_fma(void) {
    return 0;
}
size_t vk_flash_panels(int t, int dh) {
    return 0;
}
void vk_flash_pack(const float *k, ptrdiff_t ld, int t, int dh, float *kt) {}
size_t vk_flash_forward_workspace(int dh) {
    return 0;
}
size_t vk_flash_backward_workspace(int t, int dh) {
    return 0;
}
void vk_flash_forward(const float *q, const float *kt, const float *v, ptrdiff_t ld, int t, int dh, float scale,
                      int causal, int row0, int row1, float *y, ptrdiff_t ldy, float *lse, float *work) {}
void vk_flash_backward(const float *q, const float *k, const float *v, ptrdiff_t ld, const float *dy, const float *y,
                       ptrdiff_t ldy, const float *lse, float *dq, float *dk, float *dv, int t, int dh, float scale,
                       int causal, float *work) {}

#endif
