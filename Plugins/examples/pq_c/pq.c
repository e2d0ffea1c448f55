/*
 * pq_c -- product quantization (Jégou, Douze, Schmid 2011, "Product quantization for nearest
 * neighbor search") as a vqmoe quantizer plugin in C, written from the C quantizer template
 * (Plugins/templates/c/quantizer) and the helpers of vqmoe_plugin_helpers.h.
 *
 * x (d) is split into M sub-vectors of s = d/M; sub-vector m has its own codebook C_m of k codes:
 *   c_m = argmin_j ||x^(m) - C_m[j]||^2       (ties -> the lowest j)
 *   q = [C_1[c_1], ..., C_M[c_M]]             code = sum_m c_m k^(m-1)  (mixed radix, K = k^M)
 *   quantized = x + sg(q - x)                 (straight-through)
 *   loss = mse(sg(x), q) + commitment mse(x, sg(q)),   mse = mean over N d
 * backward, g = grad_loss:  grad_x += grad_quantized + g commitment 2/(N d) (x - q)
 *                           grad_C_m[c_m] += g 2/(N d) (q^(m) - x^(m))   (not when frozen)
 */
#include <math.h>

#include "vqmoe_plugin.h"
#include "vqmoe_plugin_helpers.h"

struct vqmoe_instance {
    vqmoe_base base;
    int64_t m, k, s; /* sub-vectors M, codes per sub-codebook k, sub-vector width s = d/M */
    int64_t codes;   /* K = k^M */
    float commitment;
};

/* Saved for backward: x (valid until then, by the ABI) and q (N,d). */
typedef struct ctx {
    int64_t n;
    uint32_t flags;
    const float *x;
    int32_t *sub; /* (N,M) c_m */
    float q[];    /* (N,d) */
} ctx;

static const vqmoe_hparam_spec hparams[] = {
    VQMOE_HPARAM_INT("subvectors", 2, 1, 16, "M: sub-vectors per token (must divide d_model)"),
    VQMOE_HPARAM_INT("sub_codebook_size", 0, 0, 65536,
                     "k: codes per sub-codebook; K = k^M codes; 0 = the integer M-th root of the model's n_codes"),
    VQMOE_HPARAM_FLOAT_MIN("commitment", 0.25, 0, "gamma: loss = mse(sg(x), q) + gamma * mse(x, sg(q))"),
};

static int32_t setup(vqmoe_instance *p, const vqmoe_create_info *info, const vqmoe_hparams *hp) {
    p->m = vqmoe_hp_int(hp, "subvectors", 2);
    p->k = vqmoe_hp_int(hp, "sub_codebook_size", 0);
    p->commitment = (float)vqmoe_hp_float(hp, "commitment", 0.25);
    const int64_t requested = p->k;
    if (p->k == 0) p->k = (int64_t)llround(pow((double)info->n_codes, 1.0 / (double)p->m));
    p->codes = 1;
    for (int64_t i = 0; i < p->m && p->codes <= INT32_MAX; i++) p->codes *= p->k;
    if (info->d_model % p->m != 0 || p->codes > INT32_MAX || (requested == 0 && p->codes != info->n_codes))
        return vqmoe_fail(info->host, VQMOE_ERR_INVALID_ARGUMENT,
                          "%s: needs M = %lld dividing d_model = %lld and K = k^M < 2^31; sub_codebook_size = 0 takes "
                          "k = the M-th root of n_codes = %lld, which must be exact",
                          p->base.name, (long long)p->m, (long long)info->d_model, (long long)info->n_codes);
    p->s = info->d_model / p->m;
    return vqmoe_declare_param(&p->base, "codebook", VQMOE_BUF_NO_DECAY | VQMOE_BUF_FREEZE_FT, 3,
                               (int64_t[]){p->m, p->k, p->s});
}
VQMOE_DEFINE_CREATE(create, setup)

/* C_m[j] ~ N(0, 1) from the host stream (seed, 0) */
static int32_t init_buffers(vqmoe_instance *p, uint64_t seed) {
    vqmoe_fill_normal(p->base.host, seed, 0, vqmoe_f32_buffer(&p->base, 0), p->m * p->k * p->s, 1.0f);
    return VQMOE_OK;
}

static int32_t shape(vqmoe_instance *p, vqmoe_quantizer_shape *out) {
    out->codebook_size = p->codes;
    out->codes_per_token = 1;
    return VQMOE_OK;
}

static int32_t forward(vqmoe_instance *p, const vqmoe_step_info *step, const vqmoe_quantizer_input *in,
                       vqmoe_quantizer_output *out, void **saved) {
    vqmoe_quantizer_io io;
    VQMOE_TRY(vqmoe_quantizer_begin(p, p->codes, 1, step, in, out, saved, &io));
    const int64_t n = io.n, d = io.d, s = p->s, k = p->k;
    const float *C = vqmoe_f32_buffer(&p->base, 0); /* (M,k,s) */
    ctx *c =
        vqmoe_ctx_alloc(&p->base, sizeof(ctx) + sizeof(float) * (size_t)(n * d) + sizeof(int32_t) * (size_t)(n * p->m));
    if (c == NULL) return VQMOE_ERR_OUT_OF_MEMORY;
    c->n = n, c->flags = io.flags, c->x = io.x, c->sub = (int32_t *)(c->q + n * d);
    memset(io.counts, 0, sizeof(float) * (size_t)p->codes);
    double sq = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t code = 0, radix = 1;
        for (int64_t m = 0; m < p->m; m++, radix *= k) {
            const float *xm = io.x + i * d + m * s, *Cm = C + m * k * s;
            int64_t best = 0;
            double best_dist = INFINITY;
            for (int64_t j = 0; j < k; j++) {
                double dist = 0;
                for (int64_t t = 0; t < s; t++)
                    dist += ((double)xm[t] - Cm[j * s + t]) * ((double)xm[t] - Cm[j * s + t]);
                if (dist < best_dist) best_dist = dist, best = j; /* strict: ties keep the lowest j */
            }
            if (!isfinite(best_dist)) {
                p->base.host->free(c);
                return vqmoe_fail(p->base.host, VQMOE_ERR_NUMERIC, "%s: non-finite distance at token %lld",
                                  p->base.name, (long long)i);
            }
            sq += best_dist;
            code += best * radix;
            c->sub[i * p->m + m] = (int32_t)best;
            memcpy(c->q + i * d + m * s, Cm + best * s, sizeof(float) * (size_t)s);
        }
        io.codes[i] = (int32_t)code;
        io.counts[code] += 1;
    }
    /* value q; the surrogate (lookup -> identity) is x */
    memcpy(io.quantized, io.flags & VQMOE_STEP_SURROGATE ? io.x : c->q, sizeof(float) * (size_t)(n * d));
    out->loss = n > 0 ? (float)((1.0 + p->commitment) * sq / (double)(n * d)) : 0.0f;
    vqmoe_ctx_finish(&p->base, step, c, saved);
    return VQMOE_OK;
}

static int32_t backward(vqmoe_instance *p, void *saved, const vqmoe_quantizer_grad_in *gin,
                        vqmoe_quantizer_grad_out *gout) {
    const ctx *c = saved;
    const float *gq = NULL;
    float *gx = NULL;
    VQMOE_TRY(vqmoe_quantizer_grads(p, saved, c ? c->n : 0, gin, gout, &gq, &gx));
    const int64_t n = c->n, d = p->base.d_model, s = p->s;
    const float unit = n > 0 ? 2.0f * gin->grad_loss / (float)(n * d) : 0, commit = unit * p->commitment;
    float *gC = c->flags & VQMOE_STEP_FROZEN ? NULL : p->base.grad[0];
    for (int64_t i = 0; i < n * d; i++) gx[i] += (gq ? gq[i] : 0) + commit * (c->x[i] - c->q[i]);
    for (int64_t i = 0; gC != NULL && unit != 0 && i < n; i++)
        for (int64_t m = 0; m < p->m; m++) {
            float *g = gC + (m * p->k + c->sub[i * p->m + m]) * s;
            for (int64_t t = 0; t < s; t++) g[t] += unit * (c->q[i * d + m * s + t] - c->x[i * d + m * s + t]);
        }
    return VQMOE_OK;
}

static const vqmoe_quantizer_api api = {sizeof api, shape, forward, backward, vqmoe_base_free_ctx};

static const vqmoe_plugin_desc desc = {
    VQMOE_DESC(VQMOE_KIND_QUANTIZER, VQMOE_PLUGIN_STOPGRAD_LOSS, "pq_c", "1.0.0",
               "product quantizer (Jegou et al. 2011): M sub-vectors, each nearest in its own codebook of k codes, "
               "code = mixed-radix index of the M choices (K = k^M), straight-through, VQ-VAE loss",
               hparams),
    .create = create,
    VQMOE_BASE_CALLS,
    .init_buffers = init_buffers,
    .kind_api = &api,
};

VQMOE_DEFINE_ENTRY(desc)
