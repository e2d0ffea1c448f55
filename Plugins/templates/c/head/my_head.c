/*
 * my_head -- a vqmoe head plugin in C: a linear language-model head. `vqmoe plugin new head NAME`
 * copies this folder with your NAME; it builds (./build.sh) and passes `vqmoe plugins check` as
 * it is. Put your own method where it says ">>> YOUR METHOD".
 *
 *   logits = h W^T + b   (W (V,d) "weight" ~ N(0, 0.02^2), b (V) "bias" = 0, V = vocab_size),
 *   one prediction per token; loss = mean cross-entropy over the targets that are not
 *   VQMOE_PAD_TARGET, with loss_sum, count and correct (argmax == target) for exact aggregation
 *   backward: dlogits = (softmax - onehot) grad_loss / count, then into h, W and b
 *
 * Rules (vqmoe_plugin.h): gradients ACCUMULATE (+=); a context only when vqmoe_step_saves(step);
 * no parameter gradients under VQMOE_STEP_FROZEN; no global mutable state. The helpers
 * (vqmoe_plugin_helpers.h) check arguments and serve the buffer calls.
 */
#include <math.h>

#include "vqmoe_plugin.h"
#include "vqmoe_plugin_helpers.h"

enum { WEIGHT, BIAS }; /* buffer indices, in declaration order */

struct vqmoe_instance {
    vqmoe_base base; /* first: host, name, model facts (d_model, vocab_size), buffers */
    float init_std;
};

/* Saved by a training forward: h (valid until the backward, by the ABI) and dL/dlogits / grad_loss. */
typedef struct ctx {
    int64_t batch, seq;
    uint32_t flags;
    const float *h;  /* (B,T,d) */
    float dlogits[]; /* (B*T,V) */
} ctx;

static const vqmoe_hparam_spec hparams[] = {
    VQMOE_HPARAM_FLOAT_MIN("init_std", 0.02, 0, "standard deviation of the initial output weights"),
};

static int32_t setup(vqmoe_instance *m, const vqmoe_create_info *info, const vqmoe_hparams *hp) {
    m->init_std = (float)vqmoe_hp_float(hp, "init_std", 0.02);
    if (info->vocab_size < 1 || info->d_model < 1)
        return vqmoe_fail(info->host, VQMOE_ERR_INVALID_ARGUMENT, "%s: needs vocab_size >= 1 and d_model >= 1",
                          m->base.name);
    VQMOE_TRY(vqmoe_declare_param(&m->base, "weight", 0, 2, (int64_t[]){info->vocab_size, info->d_model}));
    return vqmoe_declare_param(&m->base, "bias", VQMOE_BUF_NO_DECAY, 1, (int64_t[]){info->vocab_size});
}
VQMOE_DEFINE_CREATE(create, setup)

/* W ~ N(0, init_std^2) from the host stream (seed, 0); b = 0 */
static int32_t init_buffers(vqmoe_instance *m, uint64_t seed) {
    vqmoe_fill_normal(m->base.host, seed, 0, vqmoe_f32_buffer(&m->base, WEIGHT), m->base.vocab_size * m->base.d_model,
                      m->init_std);
    memset(m->base.data[BIAS], 0, sizeof(float) * (size_t)m->base.vocab_size);
    return VQMOE_OK;
}

static int32_t shape(vqmoe_instance *m, vqmoe_head_shape *out) {
    out->per_token = 1; /* >>> YOUR METHOD: 0 for one prediction per sequence (a pooled classifier) */
    out->n_out = m->base.vocab_size;
    out->is_lm = 1;
    return VQMOE_OK;
}

static int32_t forward(vqmoe_instance *m, const vqmoe_step_info *step, const vqmoe_head_input *in,
                       vqmoe_head_output *out, void **saved) {
    vqmoe_head_io io;
    VQMOE_TRY(vqmoe_head_begin(m, m->base.vocab_size, 1, step, in, out, saved, &io));
    const int64_t rows = io.rows, d = io.d, v = io.n_out;
    const float *b = vqmoe_f32_buffer(&m->base, BIAS);
    /* >>> YOUR METHOD: your output layer (two layers, tied embeddings...) */
    for (int64_t r = 0; r < rows; r++) memcpy(io.logits + r * v, b, sizeof(float) * (size_t)v);
    if (rows > 0)
        m->base.host->sgemm(VQMOE_NO_TRANS, VQMOE_TRANS, rows, v, d, 1.0f, io.h, d, vqmoe_f32_buffer(&m->base, WEIGHT),
                            d, 1.0f, io.logits, v);
    ctx *c =
        vqmoe_step_saves(step) ? vqmoe_ctx_alloc(&m->base, sizeof(ctx) + sizeof(float) * (size_t)(rows * v)) : NULL;
    if (vqmoe_step_saves(step) && c == NULL) return VQMOE_ERR_OUT_OF_MEMORY;
    double loss_sum = 0;
    int64_t count = 0, correct = 0;
    for (int64_t r = 0; io.targets != NULL && r < rows; r++) {
        const int32_t y = io.targets[r];
        const float *l = io.logits + r * v;
        if (y == VQMOE_PAD_TARGET) continue;
        if (y < 0 || y >= v) {
            m->base.host->free(c);
            return vqmoe_fail(m->base.host, VQMOE_ERR_INVALID_ARGUMENT, "%s: target %d outside [0, %lld)", m->base.name,
                              (int)y, (long long)v);
        }
        int64_t best = 0;
        for (int64_t j = 1; j < v; j++) best = l[j] > l[best] ? j : best;
        double sum = 0;
        for (int64_t j = 0; j < v; j++) sum += exp((double)l[j] - l[best]);
        loss_sum += log(sum) + l[best] - l[y]; /* -log softmax(l)_y */
        count += 1, correct += best == y;
        for (int64_t j = 0; c != NULL && j < v; j++) c->dlogits[r * v + j] = (float)(exp((double)l[j] - l[best]) / sum);
        if (c != NULL) c->dlogits[r * v + y] -= 1;
    }
    for (int64_t i = 0; c != NULL && count > 0 && i < rows * v; i++) c->dlogits[i] /= (float)count;
    out->loss = count > 0 ? (float)(loss_sum / (double)count) : 0.0f;
    out->loss_sum = loss_sum, out->count = count, out->correct = correct;
    if (c != NULL) c->batch = io.batch, c->seq = io.seq, c->flags = io.flags, c->h = io.h, *saved = c;
    return VQMOE_OK;
}

static int32_t backward(vqmoe_instance *m, void *saved, const vqmoe_head_grad_in *gin, vqmoe_head_grad_out *gout) {
    const ctx *c = saved;
    float gl = 0, *gh = NULL;
    VQMOE_TRY(vqmoe_head_grads(m, saved, c ? c->batch : 0, c ? c->seq : 0, gin, gout, &gl, &gh));
    const int64_t rows = c->batch * c->seq, d = m->base.d_model, v = m->base.vocab_size;
    const vqmoe_host_api *h = m->base.host;
    if (rows == 0 || gl == 0) return VQMOE_OK;
    /* grad_h += gl dlogits W;  grad_W += gl dlogits^T h;  grad_b += gl sum_r dlogits_r */
    h->sgemm(VQMOE_NO_TRANS, VQMOE_NO_TRANS, rows, d, v, gl, c->dlogits, v, vqmoe_f32_buffer(&m->base, WEIGHT), d, 1.0f,
             gh, d);
    if (c->flags & VQMOE_STEP_FROZEN) return VQMOE_OK;
    if (m->base.grad[WEIGHT] != NULL)
        h->sgemm(VQMOE_TRANS, VQMOE_NO_TRANS, v, d, rows, gl, c->dlogits, v, c->h, d, 1.0f, m->base.grad[WEIGHT], d);
    for (int64_t r = 0; m->base.grad[BIAS] != NULL && r < rows; r++)
        for (int64_t j = 0; j < v; j++) m->base.grad[BIAS][j] += gl * c->dlogits[r * v + j];
    return VQMOE_OK;
}

static const vqmoe_head_api api = {sizeof api, shape, forward, backward, vqmoe_base_free_ctx};

static const vqmoe_plugin_desc desc = {
    VQMOE_DESC(VQMOE_KIND_HEAD, 0, "my_head", "1.0.0", "linear LM head, per-token cross-entropy", hparams),
    .create = create,
    VQMOE_BASE_CALLS,
    .init_buffers = init_buffers,
    .kind_api = &api,
};

VQMOE_DEFINE_ENTRY(desc)
