/*
 * cosine_vq.c -- a third-party vqmoe quantizer plugin in plain C: `cosine_vq_c`.
 *
 * Cosine-similarity vector quantization, as in VQGAN / ViT-VQGAN (here without the
 * low-dimensional projection):
 *
 *   z_i = x_i / ||x_i||             ê_j = e_j / ||e_j||          (l2-normalised)
 *   c_i = argmax_j  z_i . ê_j       (ties -> the lowest j)
 *   quantized_i = ||x_i|| * ê_{c_i} (the token keeps its norm, takes the code's direction)
 *   loss = mse(sg(z), ê_c) + commitment * mse(z, sg(ê_c)),  mse = mean over N*d
 *
 * Backward (the ABI's straight-through rule): the surrogate of `quantized` with the code
 * lookup replaced by the identity is ||x|| * z = x, so grad_x += grad_quantized. The
 * commitment term reaches x through the normalisation z = x/||x||, the codebook term
 * reaches the codebook through ê = e/||e||; both derivatives are exact:
 *   d/dx of f(z) = (g - (g.z) z) / ||x||   with g = df/dz   (the same for ê and e).
 *
 * It depends only on vqmoe_plugin.h and libm, and keeps no global state: everything lives
 * in the instance, the host-owned codebook buffer and the saved context.
 *
 * Build: ./build.sh    Check: vqmoe plugins check ./libcosine_vq.so
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "vqmoe_plugin.h"

#define CVQ_NAME "cosine_vq_c"
/* Norms below this are treated as this (a zero vector has no direction). */
#define CVQ_EPS  1e-12f

/* ------------------------------------------------------------------ the instance */

struct vqmoe_instance {
    const vqmoe_host_api *host;
    char instance_name[96];
    int64_t d;            /* d_model */
    int64_t k;            /* codebook size */
    float commitment;     /* weight of the commitment term */
    float *codebook;      /* (K,d), host-owned, bound in bind_buffers */
    float *codebook_grad; /* (K,d) or NULL (frozen) */
};

/*
 * What a training forward saves for backward: the normalised inputs, their norms, the
 * codes, and the normalised codebook rows with their norms (so backward does not depend on
 * the codebook staying untouched between the calls). One host allocation; the arrays
 * follow the header.
 */
typedef struct cvq_ctx {
    int64_t n, d, k;
    uint32_t flags; /* the forward's VQMOE_STEP_* flags */
    float *z;       /* (N,d) */
    float *xnorm;   /* (N)   ||x_i|| */
    int32_t *codes; /* (N) */
    float *ehat;    /* (K,d) */
    float *enorm;   /* (K)   ||e_j|| */
} cvq_ctx;

/* Describe an error through host->set_error (printf-style) and return `status`. */
#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static int32_t
cvq_fail(const vqmoe_host_api *host, int32_t status, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (host != NULL && host->set_error != NULL) host->set_error(buf);
    return status;
}

/* 1 when t is a contiguous float32 (rows, cols) tensor. */
static int cvq_f32_2d(const vqmoe_tensor *t, int64_t rows, int64_t cols) {
    return vqmoe_is_f32(t) && t->byte_offset == 0 && t->ndim == 2 && t->shape[0] == rows && t->shape[1] == cols;
}

/* l2-normalise `rows` rows of width d: out = in / max(||in||, eps); norms get ||in||. */
static void cvq_normalise(const float *in, int64_t rows, int64_t d, float *out, float *norms) {
    for (int64_t i = 0; i < rows; i++) {
        const float *r = in + i * d;
        double s = 0.0;
        for (int64_t c = 0; c < d; c++) s += (double)r[c] * (double)r[c];
        float nrm = (float)sqrt(s);
        float inv = 1.0f / (nrm > CVQ_EPS ? nrm : CVQ_EPS);
        for (int64_t c = 0; c < d; c++) out[i * d + c] = r[c] * inv;
        norms[i] = nrm;
    }
}

/*
 * g (width d) is df/dz for z = v/||v||; accumulate scale * df/dv into out:
 * (g - (g.z) z) / ||v||. Below CVQ_EPS the normalisation is v/eps, whose derivative is I/eps.
 */
static void cvq_through_norm(const float *g, const float *z, float nrm, int64_t d, float scale, float *out) {
    if (nrm > CVQ_EPS) {
        double gz = 0.0;
        for (int64_t c = 0; c < d; c++) gz += (double)g[c] * (double)z[c];
        float s = scale / nrm;
        for (int64_t c = 0; c < d; c++) out[c] += s * (g[c] - (float)gz * z[c]);
    } else {
        float s = scale / CVQ_EPS;
        for (int64_t c = 0; c < d; c++) out[c] += s * g[c];
    }
}

/* ------------------------------------------------------------------ descriptor functions */

static int32_t cvq_create(const vqmoe_create_info *info, const vqmoe_hparams *hp, vqmoe_instance **out) {
    if (out == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (info == NULL || info->host == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    const vqmoe_host_api *host = info->host;
    if (info->struct_size < sizeof(vqmoe_create_info))
        return cvq_fail(host, VQMOE_ERR_INVALID_ARGUMENT, "%s: create_info struct_size %lld is too small (need %lld)",
                        CVQ_NAME, (long long)info->struct_size, (long long)sizeof(vqmoe_create_info));
    const char *iname = info->instance_name ? info->instance_name : "?";

    int64_t k = vqmoe_hp_int(hp, "codebook_size", 0);
    if (k == 0) k = info->n_codes;
    if (k < 1)
        return cvq_fail(host, VQMOE_ERR_INVALID_ARGUMENT,
                        CVQ_NAME " (%s): codebook size is %lld (codebook_size = 0 takes the model's n_codes, which is "
                                 "%lld); it must be >= 1",
                        iname, (long long)k, (long long)info->n_codes);
    if (info->d_model < 1)
        return cvq_fail(host, VQMOE_ERR_INVALID_ARGUMENT, CVQ_NAME " (%s): d_model is %lld, must be >= 1", iname,
                        (long long)info->d_model);
    double commitment = vqmoe_hp_float(hp, "commitment", 0.25);
    if (!(commitment >= 0.0) || !isfinite(commitment))
        return cvq_fail(host, VQMOE_ERR_INVALID_ARGUMENT, CVQ_NAME " (%s): commitment must be a finite number >= 0",
                        iname);

    vqmoe_instance *inst = (vqmoe_instance *)host->alloc(sizeof(vqmoe_instance));
    if (inst == NULL) return cvq_fail(host, VQMOE_ERR_OUT_OF_MEMORY, CVQ_NAME " (%s): out of memory", iname);
    memset(inst, 0, sizeof *inst);
    inst->host = host;
    snprintf(inst->instance_name, sizeof inst->instance_name, "%s", iname);
    inst->d = info->d_model;
    inst->k = k;
    inst->commitment = (float)commitment;
    *out = inst;
    return VQMOE_OK;
}

static void cvq_destroy(vqmoe_instance *inst) {
    if (inst == NULL) return;
    inst->host->free(inst);
}

static int32_t cvq_num_buffers(vqmoe_instance *inst) {
    (void)inst;
    return 1;
}

static int32_t cvq_buffer_spec(vqmoe_instance *inst, int32_t i, vqmoe_buffer_spec *out) {
    if (inst == NULL || out == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    if (i != 0)
        return cvq_fail(inst->host, VQMOE_ERR_INVALID_ARGUMENT,
                        CVQ_NAME " (%s): declares 1 buffer, asked for buffer %lld", inst->instance_name, (long long)i);
    if (out->struct_size < sizeof(vqmoe_buffer_spec))
        return cvq_fail(inst->host, VQMOE_ERR_INVALID_ARGUMENT,
                        CVQ_NAME " (%s): buffer_spec struct_size %lld is too small (need %lld)", inst->instance_name,
                        (long long)out->struct_size, (long long)sizeof(vqmoe_buffer_spec));
    out->name = "codebook";
    out->role = VQMOE_BUF_PARAM;
    out->flags = VQMOE_BUF_NO_DECAY; /* decay would only shrink norms the method ignores */
    out->dtype = vqmoe_f32();
    out->ndim = 2;
    memset(out->shape, 0, sizeof out->shape);
    out->shape[0] = inst->k;
    out->shape[1] = inst->d;
    return VQMOE_OK;
}

static int32_t cvq_bind_buffers(vqmoe_instance *inst, const vqmoe_buffer_binding *b, int32_t n) {
    if (inst == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    if (n != 1 || b == NULL || b[0].data == NULL)
        return cvq_fail(inst->host, VQMOE_ERR_INVALID_ARGUMENT,
                        CVQ_NAME " (%s): expects 1 buffer binding with data, got %lld", inst->instance_name,
                        (long long)n);
    inst->codebook = (float *)b[0].data;
    inst->codebook_grad = b[0].grad;
    return VQMOE_OK;
}

/* Codebook ~ N(0, 1) from the host's stream (seed, 0): same seed, same codebook. */
static int32_t cvq_init_buffers(vqmoe_instance *inst, uint64_t seed) {
    if (inst == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    if (inst->codebook == NULL)
        return cvq_fail(inst->host, VQMOE_ERR_STATE, CVQ_NAME " (%s): init_buffers before bind_buffers",
                        inst->instance_name);
    vqmoe_rng rng;
    inst->host->rng_init(&rng, seed, 0);
    for (int64_t i = 0; i < inst->k * inst->d; i++) inst->codebook[i] = inst->host->rng_normal(&rng);
    return VQMOE_OK;
}

/* ------------------------------------------------------------------ quantizer calls */

static int32_t cvq_shape(vqmoe_instance *inst, vqmoe_quantizer_shape *out) {
    if (inst == NULL || out == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    out->codebook_size = inst->k;
    out->codes_per_token = 1;
    return VQMOE_OK;
}

/* One allocation holding the header and its arrays (each 64-byte aligned). */
static size_t cvq_align(size_t b) {
    return (b + 63u) & ~(size_t)63u;
}

static cvq_ctx *cvq_ctx_alloc(const vqmoe_host_api *host, int64_t n, int64_t d, int64_t k) {
    size_t oz = cvq_align(sizeof(cvq_ctx));
    size_t on = oz + cvq_align((size_t)(n * d) * sizeof(float));
    size_t oc = on + cvq_align((size_t)n * sizeof(float));
    size_t oe = oc + cvq_align((size_t)n * sizeof(int32_t));
    size_t oen = oe + cvq_align((size_t)(k * d) * sizeof(float));
    size_t total = oen + cvq_align((size_t)k * sizeof(float));
    char *p = (char *)host->alloc(total);
    if (p == NULL) return NULL;
    cvq_ctx *c = (cvq_ctx *)p;
    c->n = n;
    c->d = d;
    c->k = k;
    c->flags = 0;
    c->z = (float *)(p + oz);
    c->xnorm = (float *)(p + on);
    c->codes = (int32_t *)(p + oc);
    c->ehat = (float *)(p + oe);
    c->enorm = (float *)(p + oen);
    return c;
}

static int32_t cvq_forward(vqmoe_instance *inst, const vqmoe_step_info *step, const vqmoe_quantizer_input *in,
                           vqmoe_quantizer_output *out, void **ctx_out) {
    if (ctx_out != NULL) *ctx_out = NULL;
    if (inst == NULL || step == NULL || in == NULL || out == NULL || ctx_out == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    const vqmoe_host_api *host = inst->host;
    if (inst->codebook == NULL)
        return cvq_fail(host, VQMOE_ERR_STATE, CVQ_NAME " (%s): forward before bind_buffers", inst->instance_name);
    const int64_t d = inst->d, k = inst->k;
    const vqmoe_tensor *xt = &in->x;
    if (!vqmoe_is_f32(xt) || xt->byte_offset != 0 || xt->ndim != 2 || xt->shape[1] != d)
        return cvq_fail(host, VQMOE_ERR_SHAPE, CVQ_NAME " (%s): x must be contiguous float32 (N, %lld)",
                        inst->instance_name, (long long)d);
    const int64_t n = xt->shape[0];
    if (!cvq_f32_2d(&out->quantized, n, d) || !vqmoe_is_i32(&out->codes) || out->codes.ndim != 2 ||
        out->codes.shape[0] != n || out->codes.shape[1] != 1 || !vqmoe_is_f32(&out->code_counts) ||
        out->code_counts.ndim != 1 || out->code_counts.shape[0] != k)
        return cvq_fail(
            host, VQMOE_ERR_SHAPE,
            CVQ_NAME
            " (%s): outputs must be quantized float32 (%lld, d), codes int32 (N, 1), code_counts float32 (%lld)",
            inst->instance_name, (long long)n, (long long)k);

    const float *x = (const float *)xt->data;
    float *q = (float *)out->quantized.data;
    int32_t *codes = (int32_t *)out->codes.data;
    float *counts = (float *)out->code_counts.data;
    const int save = (step->flags & VQMOE_STEP_TRAIN) && !(step->flags & VQMOE_STEP_NO_GRAD);

    /* Working arrays: in the context when one is saved, else host allocations. */
    cvq_ctx *c = cvq_ctx_alloc(host, n, d, k);
    float *sim = n > 0 ? (float *)host->alloc((size_t)(n * k) * sizeof(float)) : NULL;
    if (c == NULL || (n > 0 && sim == NULL)) {
        if (c) host->free(c);
        if (sim) host->free(sim);
        return cvq_fail(host, VQMOE_ERR_OUT_OF_MEMORY, CVQ_NAME " (%s): out of memory for N = %lld, K = %lld",
                        inst->instance_name, (long long)n, (long long)k);
    }
    c->flags = step->flags;

    cvq_normalise(x, n, d, c->z, c->xnorm);
    cvq_normalise(inst->codebook, k, d, c->ehat, c->enorm);
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(c->xnorm[i])) {
            host->free(c);
            host->free(sim);
            return cvq_fail(host, VQMOE_ERR_NUMERIC, CVQ_NAME " (%s): input row %lld is not finite",
                            inst->instance_name, (long long)i);
        }
    }

    /* Cosine similarities (N,K) = Z @ Êᵀ, with the host's GEMM. */
    if (n > 0) host->sgemm(VQMOE_NO_TRANS, VQMOE_TRANS, n, k, d, 1.0f, c->z, d, c->ehat, d, 0.0f, sim, k);

    memset(counts, 0, (size_t)k * sizeof(float));
    double sq = 0.0;
    const int surrogate = (step->flags & VQMOE_STEP_SURROGATE) != 0;
    for (int64_t i = 0; i < n; i++) {
        const float *s = sim + i * k;
        int64_t best = 0;
        for (int64_t j = 1; j < k; j++)
            if (s[j] > s[best]) best = j; /* strict: ties keep the lowest index */
        codes[i] = (int32_t)best;
        c->codes[i] = (int32_t)best;
        counts[best] += 1.0f;
        const float *z = c->z + i * d, *e = c->ehat + best * d;
        float nrm = c->xnorm[i];
        for (int64_t t = 0; t < d; t++) {
            double diff = (double)z[t] - (double)e[t];
            sq += diff * diff;
            /* surrogate (code lookup -> identity): ||x|| z = x */
            q[i * d + t] = surrogate ? x[i * d + t] : nrm * e[t];
        }
    }
    host->free(sim);
    /* codebook term + commitment term have the same value: (1 + commitment) * mse */
    out->loss = n > 0 ? (float)((1.0 + (double)inst->commitment) * sq / (double)(n * d)) : 0.0f;

    if (save) {
        *ctx_out = c;
    } else {
        host->free(c);
    }
    return VQMOE_OK;
}

static int32_t cvq_backward(vqmoe_instance *inst, void *ctxp, const vqmoe_quantizer_grad_in *gin,
                            vqmoe_quantizer_grad_out *gout) {
    if (inst == NULL || ctxp == NULL || gin == NULL || gout == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    const vqmoe_host_api *host = inst->host;
    const cvq_ctx *c = (const cvq_ctx *)ctxp;
    const int64_t n = c->n, d = c->d, k = c->k;
    if (!cvq_f32_2d(&gout->grad_x, n, d))
        return cvq_fail(host, VQMOE_ERR_SHAPE, CVQ_NAME " (%s): grad_x must be contiguous float32 (%lld, %lld)",
                        inst->instance_name, (long long)n, (long long)d);
    const float *gq = NULL;
    if (gin->grad_quantized.data != NULL) {
        if (!cvq_f32_2d(&gin->grad_quantized, n, d))
            return cvq_fail(host, VQMOE_ERR_SHAPE,
                            CVQ_NAME " (%s): grad_quantized must be contiguous float32 (%lld, %lld)",
                            inst->instance_name, (long long)n, (long long)d);
        gq = (const float *)gin->grad_quantized.data;
    }
    float *gx = (float *)gout->grad_x.data;
    if (n == 0) return VQMOE_OK;

    /* Straight-through: d quantized / dx = identity on the surrogate. */
    if (gq != NULL)
        for (int64_t i = 0; i < n * d; i++) gx[i] += gq[i];

    const float gl = gin->grad_loss;
    if (gl == 0.0f) return VQMOE_OK;
    const float unit = 2.0f / (float)(n * d); /* d mse / d diff per element */

    float *g = (float *)host->alloc((size_t)d * sizeof(float));
    if (g == NULL) return cvq_fail(host, VQMOE_ERR_OUT_OF_MEMORY, CVQ_NAME " (%s): out of memory", inst->instance_name);

    /* Commitment term, commitment * mse(z, sg(ê_c)): through z = x/||x|| into grad_x. */
    if (inst->commitment != 0.0f) {
        for (int64_t i = 0; i < n; i++) {
            const float *z = c->z + i * d, *e = c->ehat + (int64_t)c->codes[i] * d;
            for (int64_t t = 0; t < d; t++) g[t] = unit * (z[t] - e[t]);
            cvq_through_norm(g, z, c->xnorm[i], d, gl * inst->commitment, gx + i * d);
        }
    }

    /* Codebook term, mse(sg(z), ê_c): through ê = e/||e|| into the codebook gradient
     * (not when the step was frozen or the host gave no gradient buffer). */
    float *gc = inst->codebook_grad;
    if (gc != NULL && !(c->flags & VQMOE_STEP_FROZEN)) {
        float *acc = (float *)host->alloc((size_t)(k * d) * sizeof(float));
        if (acc == NULL) {
            host->free(g);
            return cvq_fail(host, VQMOE_ERR_OUT_OF_MEMORY, CVQ_NAME " (%s): out of memory", inst->instance_name);
        }
        memset(acc, 0, (size_t)(k * d) * sizeof(float));
        for (int64_t i = 0; i < n; i++) {
            const int64_t j = c->codes[i];
            const float *z = c->z + i * d, *e = c->ehat + j * d;
            for (int64_t t = 0; t < d; t++) acc[j * d + t] += unit * (e[t] - z[t]); /* dL/dê_j */
        }
        for (int64_t j = 0; j < k; j++) cvq_through_norm(acc + j * d, c->ehat + j * d, c->enorm[j], d, gl, gc + j * d);
        host->free(acc);
    }
    host->free(g);
    return VQMOE_OK;
}

static void cvq_free_ctx(vqmoe_instance *inst, void *ctx) {
    if (inst == NULL || ctx == NULL) return;
    inst->host->free(ctx);
}

/* ------------------------------------------------------------------ descriptor tables */

static const vqmoe_hparam_spec cvq_hparams[] = {
    {"codebook_size", VQMOE_HP_INT, VQMOE_HP_HAS_MIN, "number of codes K; 0 = the model's n_codes", 0.0, NULL, 0.0, 0.0,
     NULL},
    {"commitment", VQMOE_HP_FLOAT, VQMOE_HP_HAS_MIN, "weight of the commitment term mse(z, sg(e_c))", 0.25, NULL, 0.0,
     0.0, NULL},
};

static const vqmoe_quantizer_api cvq_api = {
    sizeof(vqmoe_quantizer_api), cvq_shape, cvq_forward, cvq_backward, cvq_free_ctx,
};

static const vqmoe_plugin_desc cvq_desc = {
    VQMOE_ABI_VERSION,
    sizeof(vqmoe_plugin_desc),
    VQMOE_KIND_QUANTIZER,
    VQMOE_PLUGIN_STOPGRAD_LOSS, /* codebook + commitment terms use stop-gradients */
    CVQ_NAME,
    "1.0.0",
    "cosine-similarity VQ (VQGAN-style, no projection): l2-normalised inputs and codes, nearest by cosine, keeps the "
    "token norm",
    cvq_hparams,
    (int32_t)(sizeof cvq_hparams / sizeof cvq_hparams[0]),
    cvq_create,
    cvq_destroy,
    cvq_num_buffers,
    cvq_buffer_spec,
    cvq_bind_buffers,
    cvq_init_buffers,
    NULL, /* begin_step */
    NULL, /* get_feature */
    &cvq_api,
    sizeof(vqmoe_hparam_spec),
};

/* The one exported symbol. Refuses a host of another ABI major. */
VQMOE_EXPORT const vqmoe_plugin_desc *vqmoe_plugin_entry(const vqmoe_host_api *host) {
    if (host != NULL && VQMOE_ABI_MAJOR(host->abi_version) != VQMOE_ABI_VERSION_MAJOR) {
        char msg[160];
        snprintf(msg, sizeof msg, "built for plugin ABI major %u, the host has major %u",
                 (unsigned)VQMOE_ABI_VERSION_MAJOR, (unsigned)VQMOE_ABI_MAJOR(host->abi_version));
        if (host->log != NULL) host->log(VQMOE_LOG_ERROR, CVQ_NAME, msg);
        return NULL;
    }
    return &cvq_desc;
}
