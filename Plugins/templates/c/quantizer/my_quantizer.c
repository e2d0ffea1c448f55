/*
 * my_quantizer -- a vqmoe quantizer plugin in C: cosine-similarity vector quantization, as in
 * VQGAN / ViT-VQGAN (without the low-dimensional projection). `vqmoe plugin new quantizer NAME`
 * copies this folder with your NAME; it builds (./build.sh) and passes `vqmoe plugins check`
 * as it is. Put your own method where it says ">>> YOUR METHOD".
 *
 *   z_i = x_i / ||x_i||,   ê_j = e_j / ||e_j||                 (l2-normalised)
 *   c_i = argmax_j z_i . ê_j                                   (ties -> the lowest j)
 *   quantized_i = ||x_i|| ê_{c_i}      (the token keeps its norm, takes the code's direction)
 *   loss = mse(sg(z), ê_c) + commitment mse(z, sg(ê_c)),  mse = mean over N d
 *
 * Backward (the ABI's straight-through rule): the surrogate of `quantized` with the code lookup
 * replaced by the identity is ||x|| z = x, so grad_x += grad_quantized. The commitment term
 * reaches x through z = x/||x||, the codebook term reaches the codebook through ê = e/||e||;
 * both exactly: d/dv of f(v/||v||) = (g - (g.u) u) / ||v|| with g = df/du, u = v/||v||.
 *
 * Rules (vqmoe_plugin.h): gradients ACCUMULATE (+=); a context only when vqmoe_step_saves(step);
 * no parameter gradients under VQMOE_STEP_FROZEN; no global mutable state. The helpers
 * (vqmoe_plugin_helpers.h) check arguments and serve the buffer calls.
 */
#include <math.h>

#include "vqmoe_plugin.h"
#include "vqmoe_plugin_helpers.h"

#define EPS 1e-12f /* norms below this count as this (a zero vector has no direction) */

struct vqmoe_instance {
    vqmoe_base base; /* first: host, name, model facts, buffers */
    int64_t k;       /* codebook size K */
    float commitment;
};

/* What backward needs: the codes, normalised inputs and codebook rows, and their norms. */
typedef struct ctx {
    int64_t n;
    uint32_t flags;
    float *z, *xnorm, *ehat, *enorm; /* (N,d) (N) (K,d) (K) */
    int32_t *codes;                  /* (N) */
} ctx;

static const vqmoe_hparam_spec hparams[] = {
    VQMOE_HPARAM_INT_MIN("codebook_size", 0, 0, "number of codes K; 0 = the model's n_codes"),
    VQMOE_HPARAM_FLOAT_MIN("commitment", 0.25, 0, "weight of the commitment term mse(z, sg(e_c))"),
};

static int32_t setup(vqmoe_instance *q, const vqmoe_create_info *info, const vqmoe_hparams *hp) {
    q->k = vqmoe_hp_int(hp, "codebook_size", 0) ? vqmoe_hp_int(hp, "codebook_size", 0) : info->n_codes;
    q->commitment = (float)vqmoe_hp_float(hp, "commitment", 0.25);
    if (q->k < 1 || info->d_model < 1)
        return vqmoe_fail(info->host, VQMOE_ERR_INVALID_ARGUMENT, "%s: needs K >= 1 and d_model >= 1", q->base.name);
    /* the codebook (K,d); decay would only shrink norms the method ignores */
    return vqmoe_declare_param(&q->base, "codebook", VQMOE_BUF_NO_DECAY, 2, (int64_t[]){q->k, info->d_model});
}
VQMOE_DEFINE_CREATE(create, setup)

/* codebook ~ N(0, 1) from the host stream (seed, 0) */
static int32_t init_buffers(vqmoe_instance *q, uint64_t seed) {
    vqmoe_fill_normal(q->base.host, seed, 0, vqmoe_f32_buffer(&q->base, 0), q->k * q->base.d_model, 1.0f);
    return VQMOE_OK;
}

static int32_t shape(vqmoe_instance *q, vqmoe_quantizer_shape *out) {
    out->codebook_size = q->k;
    out->codes_per_token = 1;
    return VQMOE_OK;
}

/* out = in / max(||in||, EPS) row by row; norms get ||in|| */
static void normalise(const float *in, int64_t rows, int64_t d, float *out, float *norms) {
    for (int64_t i = 0; i < rows; i++) {
        double s = 0;
        for (int64_t c = 0; c < d; c++) s += (double)in[i * d + c] * in[i * d + c];
        norms[i] = (float)sqrt(s);
        for (int64_t c = 0; c < d; c++) out[i * d + c] = in[i * d + c] / (norms[i] > EPS ? norms[i] : EPS);
    }
}

/* out += scale * d/dv of f(u), u = v/||v||, given g = df/du: (g - (g.u) u) / ||v||  (I/EPS below EPS) */
static void through_norm(const float *g, const float *u, float norm, int64_t d, float scale, float *out) {
    double gu = 0;
    for (int64_t c = 0; c < d && norm > EPS; c++) gu += (double)g[c] * u[c];
    for (int64_t c = 0; c < d; c++) out[c] += scale / (norm > EPS ? norm : EPS) * (g[c] - (float)gu * u[c]);
}

static int32_t forward(vqmoe_instance *q, const vqmoe_step_info *step, const vqmoe_quantizer_input *in,
                       vqmoe_quantizer_output *out, void **saved) {
    vqmoe_quantizer_io io;
    VQMOE_TRY(vqmoe_quantizer_begin(q, q->k, 1, step, in, out, saved, &io));
    const int64_t n = io.n, d = io.d, k = q->k;
    /* the context doubles as working memory; kept only when a backward follows */
    ctx *c = vqmoe_ctx_alloc(&q->base, sizeof(ctx) + sizeof(float) * (size_t)(n * d + n + k * d + k + n * k + n));
    if (c == NULL) return VQMOE_ERR_OUT_OF_MEMORY;
    c->n = n;
    c->flags = io.flags;
    c->z = (float *)(c + 1), c->xnorm = c->z + n * d, c->ehat = c->xnorm + n, c->enorm = c->ehat + k * d;
    float *sim = c->enorm + k; /* (N,K) cosine similarities */
    c->codes = (int32_t *)(sim + n * k);
    normalise(io.x, n, d, c->z, c->xnorm);
    normalise(vqmoe_f32_buffer(&q->base, 0), k, d, c->ehat, c->enorm);
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(c->xnorm[i])) {
            q->base.host->free(c);
            return vqmoe_fail(q->base.host, VQMOE_ERR_NUMERIC, "%s: input row %lld is not finite", q->base.name,
                              (long long)i);
        }
    /* >>> YOUR METHOD: your distance and code choice. sim (N,K) = Z Ê^T */
    if (n > 0) q->base.host->sgemm(VQMOE_NO_TRANS, VQMOE_TRANS, n, k, d, 1.0f, c->z, d, c->ehat, d, 0.0f, sim, k);
    memset(io.counts, 0, sizeof(float) * (size_t)k);
    double sq = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t best = 0;
        for (int64_t j = 1; j < k; j++) best = sim[i * k + j] > sim[i * k + best] ? j : best;
        io.codes[i] = c->codes[i] = (int32_t)best;
        io.counts[best] += 1;
        for (int64_t t = 0; t < d; t++) {
            const float e = c->ehat[best * d + t], diff = c->z[i * d + t] - e;
            sq += (double)diff * diff;
            /* the surrogate (code lookup -> identity) is ||x|| z = x */
            io.quantized[i * d + t] = io.flags & VQMOE_STEP_SURROGATE ? io.x[i * d + t] : c->xnorm[i] * e;
        }
    }
    /* the codebook and commitment terms have the same value: (1 + commitment) mse */
    out->loss = n > 0 ? (float)((1.0 + q->commitment) * sq / (double)(n * d)) : 0.0f;
    vqmoe_ctx_finish(&q->base, step, c, saved);
    return VQMOE_OK;
}

static int32_t backward(vqmoe_instance *q, void *saved, const vqmoe_quantizer_grad_in *gin,
                        vqmoe_quantizer_grad_out *gout) {
    const ctx *c = saved;
    const float *gq = NULL;
    float *gx = NULL;
    VQMOE_TRY(vqmoe_quantizer_grads(q, saved, c ? c->n : 0, gin, gout, &gq, &gx));
    const int64_t n = c->n, d = q->base.d_model, k = q->k;
    const float unit = n > 0 ? 2.0f * gin->grad_loss / (float)(n * d) : 0; /* d mse / d diff, times g */
    for (int64_t i = 0; gq != NULL && i < n * d; i++) gx[i] += gq[i];      /* straight-through */
    float *gc = q->base.grad[0], *g = q->base.host->scratch(sizeof(float) * (size_t)((k + 1) * d));
    if (g == NULL) return vqmoe_fail(q->base.host, VQMOE_ERR_OUT_OF_MEMORY, "%s: out of memory", q->base.name);
    float *acc = g + d; /* (K,d) dL/dê */
    memset(acc, 0, sizeof(float) * (size_t)(k * d));
    for (int64_t i = 0; i < n && unit != 0; i++) {
        const float *z = c->z + i * d, *e = c->ehat + (int64_t)c->codes[i] * d;
        for (int64_t t = 0; t < d; t++) g[t] = unit * (z[t] - e[t]);
        /* commitment mse(z, sg(ê_c)): through z = x/||x|| into grad_x */
        through_norm(g, z, c->xnorm[i], d, q->commitment, gx + i * d);
        for (int64_t t = 0; t < d; t++) acc[(int64_t)c->codes[i] * d + t] -= g[t];
    }
    /* codebook mse(sg(z), ê_c): through ê = e/||e|| (not when frozen, or without a gradient buffer) */
    for (int64_t j = 0; gc != NULL && !(c->flags & VQMOE_STEP_FROZEN) && j < k; j++)
        through_norm(acc + j * d, c->ehat + j * d, c->enorm[j], d, 1.0f, gc + j * d);
    return VQMOE_OK;
}

static const vqmoe_quantizer_api api = {sizeof api, shape, forward, backward, vqmoe_base_free_ctx};

static const vqmoe_plugin_desc desc = {
    /* STOPGRAD_LOSS: the codebook and commitment terms use stop-gradients */
    VQMOE_DESC(VQMOE_KIND_QUANTIZER, VQMOE_PLUGIN_STOPGRAD_LOSS, "my_quantizer", "1.0.0",
               "cosine-similarity VQ (VQGAN-style, no projection): l2-normalised inputs and codes, nearest by "
               "cosine, keeps the token norm",
               hparams),
    .create = create,
    VQMOE_BASE_CALLS,
    .init_buffers = init_buffers,
    .kind_api = &api,
};

VQMOE_DEFINE_ENTRY(desc)
