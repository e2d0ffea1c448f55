/*
 * my_router -- a vqmoe router plugin in C: a linear top-1 router. `vqmoe plugin new router NAME`
 * copies this folder with your NAME; it builds (./build.sh) and passes `vqmoe plugins check` as
 * it is. Put your own method where it says ">>> YOUR METHOD".
 *
 *   logits = x W^T   (W (E,d), parameter "weight" ~ N(0, init_std^2)),   p = softmax(logits)
 *   expert = argmax_e p_e (ties -> the lowest e),  weight = p_expert (the router learns through
 *   the expert output it scales),  aux_loss = 0,  expert_load = tokens per expert
 *   backward: dp_c/dlogit_j = p_c (delta_cj - p_j), then grad_x += G W, grad_W += G^T x
 *
 * Rules (vqmoe_plugin.h): gradients ACCUMULATE (+=); a context only when vqmoe_step_saves(step);
 * no parameter gradients under VQMOE_STEP_FROZEN; no global mutable state. The helpers
 * (vqmoe_plugin_helpers.h) check arguments and serve the buffer calls.
 */
#include <math.h>

#include "vqmoe_plugin.h"
#include "vqmoe_plugin_helpers.h"

struct vqmoe_instance {
    vqmoe_base base; /* first: host, name, model facts (d_model, n_experts), buffers */
    float init_std;
};

/* Saved by a training forward: x (valid until the backward, by the ABI), p and the choices. */
typedef struct ctx {
    int64_t n;
    uint32_t flags;
    const float *x;  /* (N,d) */
    int32_t *expert; /* (N) */
    float probs[];   /* (N,E) */
} ctx;

static const vqmoe_hparam_spec hparams[] = {
    VQMOE_HPARAM_FLOAT_MIN("init_std", 0.02, 0, "standard deviation of the initial router weights"),
    /* >>> YOUR METHOD: your hyperparameters (the host validates type and range before create) */
};

static int32_t setup(vqmoe_instance *r, const vqmoe_create_info *info, const vqmoe_hparams *hp) {
    r->init_std = (float)vqmoe_hp_float(hp, "init_std", 0.02);
    if (info->n_experts < 1 || info->d_model < 1)
        return vqmoe_fail(info->host, VQMOE_ERR_INVALID_ARGUMENT, "%s: needs n_experts >= 1 and d_model >= 1",
                          r->base.name);
    /* >>> YOUR METHOD: more buffers (expert embeddings, a temperature, state...) */
    return vqmoe_declare_param(&r->base, "weight", 0, 2, (int64_t[]){info->n_experts, info->d_model});
}
VQMOE_DEFINE_CREATE(create, setup)

/* W ~ N(0, init_std^2) from the host stream (seed, 0) */
static int32_t init_buffers(vqmoe_instance *r, uint64_t seed) {
    vqmoe_fill_normal(r->base.host, seed, 0, vqmoe_f32_buffer(&r->base, 0), r->base.n_experts * r->base.d_model,
                      r->init_std);
    return VQMOE_OK;
}

/* >>> YOUR METHOD: top-k, a k schedule from step->step, or VQMOE_ROUTE_DENSE */
static int32_t shape(vqmoe_instance *r, const vqmoe_step_info *step, vqmoe_router_shape *out) {
    (void)r, (void)step;
    out->mode = VQMOE_ROUTE_TOPK;
    out->k = 1;
    return VQMOE_OK;
}

static int32_t forward(vqmoe_instance *r, const vqmoe_step_info *step, const vqmoe_router_input *in,
                       vqmoe_router_output *out, void **saved) {
    vqmoe_router_io io;
    VQMOE_TRY(vqmoe_router_begin(r, 1, step, in, out, saved, &io));
    const int64_t n = io.n, d = io.d, e = r->base.n_experts;
    ctx *c = vqmoe_ctx_alloc(&r->base, sizeof(ctx) + sizeof(float) * (size_t)(n * e) + sizeof(int32_t) * (size_t)n);
    if (c == NULL) return VQMOE_ERR_OUT_OF_MEMORY;
    c->n = n, c->flags = io.flags, c->x = io.x, c->expert = (int32_t *)(c->probs + n * e);
    /* >>> YOUR METHOD: your scores (cosine, hashing, token ids...) and selection */
    if (n > 0)
        r->base.host->sgemm(VQMOE_NO_TRANS, VQMOE_TRANS, n, e, d, 1.0f, io.x, d, vqmoe_f32_buffer(&r->base, 0), d, 0.0f,
                            c->probs, e);
    memset(io.load, 0, sizeof(float) * (size_t)e);
    for (int64_t i = 0; i < n; i++) {
        float *p = c->probs + i * e, sum = 0;
        int64_t best = 0;
        for (int64_t j = 1; j < e; j++) best = p[j] > p[best] ? j : best;
        const float top = p[best];
        for (int64_t j = 0; j < e; j++) sum += (p[j] = expf(p[j] - top));
        for (int64_t j = 0; j < e; j++) p[j] /= sum;
        io.index[i] = c->expert[i] = (int32_t)best;
        io.weights[i] = p[best];
        io.load[best] += 1;
    }
    out->aux_loss = 0; /* >>> YOUR METHOD: a balance loss, already weighted */
    vqmoe_ctx_finish(&r->base, step, c, saved);
    return VQMOE_OK;
}

static int32_t backward(vqmoe_instance *r, void *saved, const vqmoe_router_grad_in *gin, vqmoe_router_grad_out *gout) {
    const ctx *c = saved;
    const float *gw = NULL;
    float *gx = NULL;
    VQMOE_TRY(vqmoe_router_grads(r, saved, c ? c->n : 0, 1, gin, gout, &gw, &gx));
    const int64_t n = c->n, d = r->base.d_model, e = r->base.n_experts;
    if (gw == NULL || n == 0) return VQMOE_OK;                         /* absent = zero, and aux_loss is 0 */
    float *g = r->base.host->scratch(sizeof(float) * (size_t)(n * e)); /* dL/dlogits (N,E) */
    if (g == NULL) return vqmoe_fail(r->base.host, VQMOE_ERR_OUT_OF_MEMORY, "%s: out of memory", r->base.name);
    for (int64_t i = 0; i < n; i++) {
        const float *p = c->probs + i * e, pc = p[c->expert[i]];
        for (int64_t j = 0; j < e; j++) g[i * e + j] = gw[i] * pc * ((j == c->expert[i]) - p[j]);
    }
    const vqmoe_host_api *h = r->base.host;
    h->sgemm(VQMOE_NO_TRANS, VQMOE_NO_TRANS, n, d, e, 1.0f, g, e, vqmoe_f32_buffer(&r->base, 0), d, 1.0f, gx, d);
    if (r->base.grad[0] != NULL && !(c->flags & VQMOE_STEP_FROZEN))
        h->sgemm(VQMOE_TRANS, VQMOE_NO_TRANS, e, d, n, 1.0f, g, e, c->x, d, 1.0f, r->base.grad[0], d);
    return VQMOE_OK;
}

static const vqmoe_router_api api = {sizeof api, shape, forward, backward, vqmoe_base_free_ctx};

static const vqmoe_plugin_desc desc = {
    VQMOE_DESC(VQMOE_KIND_ROUTER, 0, "my_router", "1.0.0", "linear top-1 router, weight = softmax probability",
               hparams),
    .create = create,
    VQMOE_BASE_CALLS,
    .init_buffers = init_buffers,
    .kind_api = &api,
};

VQMOE_DEFINE_ENTRY(desc)
