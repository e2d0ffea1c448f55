/* A deliberately small router used by the host tests to provoke each failure the host must
 * report clearly. Compiled by the tests with cc; flags select the defect:
 *   -DFIXTURE_ABI=0x00020000   claim another ABI major
 *   -DFIXTURE_NO_ENTRY         export no entry symbol
 *   -DFIXTURE_NAME='"other"'   descriptor name
 *   -DFIXTURE_WIDE_SPECS       (ABI >= 1.2) schema entries in a larger struct, as a later 1.x
 *                              might declare them: the host must step by hparam_spec_size
 *   -DFIXTURE_BACKWARD         trainable: saves a context and has a backward (zero gradient)
 * The `fail` hyperparameter picks a runtime failure: none, create_error, forward_error, nan,
 * nan_backward (NaN in grad_x), wrapped_buffer (a parameter of shape [2^40, 2^40], whose byte
 * count wraps to 0 in 64 bits), huge_buffer (a parameter of 2^62 floats), segfault (a NULL write in
 * forward).
 * Built against Fixtures/abi_1_1/vqmoe_plugin.h it is an ABI 1.1 plugin. */
#include "vqmoe_plugin.h"
#include <math.h>
#include <stdlib.h>

#ifndef FIXTURE_ABI
#define FIXTURE_ABI VQMOE_ABI_VERSION
#endif
#ifndef FIXTURE_NAME
#define FIXTURE_NAME "fixture_router"
#endif

typedef struct {
    const vqmoe_host_api *host;
    volatile int *nowhere;
    int fail; /* 0 none, 2 forward_error, 3 nan, 4 nan_backward, 5 wrapped_buffer, 6 huge_buffer, 7 segfault */
} fixture;

#ifdef FIXTURE_WIDE_SPECS
typedef struct {
    vqmoe_hparam_spec spec;
    double future[3]; /* fields a later 1.x might append */
} wide_spec;
static const wide_spec hparams[] = {
    {{"fail", VQMOE_HP_STRING, 0, "which failure to produce", 0, "none", 0, 0,
      "none,create_error,forward_error,nan,nan_backward,wrapped_buffer,huge_buffer,segfault"},
     {1, 2, 3}},
    {{"level", VQMOE_HP_INT, VQMOE_HP_HAS_MIN, "an integer that create checks", 7, NULL, 0, 0, NULL}, {4, 5, 6}},
};
#define N_HPARAMS 2
#else
static const vqmoe_hparam_spec hparams[] = {
    {"fail", VQMOE_HP_STRING, 0, "which failure to produce", 0, "none", 0, 0,
     "none,create_error,forward_error,nan,nan_backward,wrapped_buffer,huge_buffer,segfault"},
};
#define N_HPARAMS 1
#endif

static int32_t create(const vqmoe_create_info *info, const vqmoe_hparams *hp, vqmoe_instance **out) {
    const char *f = vqmoe_hp_string(hp, "fail", "none");
#ifdef FIXTURE_WIDE_SPECS
    if (vqmoe_hp_int(hp, "level", -1) < 0) {
        info->host->set_error("fixture: hyperparameter level missing");
        return VQMOE_ERR_INVALID_ARGUMENT;
    }
#endif
    if (strcmp(f, "create_error") == 0) {
        info->host->set_error("fixture asked to fail in create");
        return VQMOE_ERR_INVALID_ARGUMENT;
    }
    fixture *s = (fixture *)calloc(1, sizeof(fixture));
    s->host = info->host;
    s->fail = strcmp(f, "forward_error") == 0    ? 2
              : strcmp(f, "nan") == 0            ? 3
              : strcmp(f, "nan_backward") == 0   ? 4
              : strcmp(f, "wrapped_buffer") == 0 ? 5
              : strcmp(f, "huge_buffer") == 0    ? 6
              : strcmp(f, "segfault") == 0       ? 7
                                                 : 0;
    *out = (vqmoe_instance *)s;
    return VQMOE_OK;
}
static void destroy(vqmoe_instance *inst) {
    free(inst);
}
static int32_t num_buffers(vqmoe_instance *inst) {
    fixture *s = (fixture *)inst;
    return s->fail == 5 || s->fail == 6 ? 1 : 0;
}
static int32_t buffer_spec(vqmoe_instance *inst, int32_t i, vqmoe_buffer_spec *out) {
    fixture *s = (fixture *)inst;
    if (i != 0 || (s->fail != 5 && s->fail != 6)) return VQMOE_ERR_INVALID_ARGUMENT;
    out->name = "w";
    out->role = VQMOE_BUF_PARAM;
    out->dtype.code = VQMOE_DTYPE_FLOAT;
    out->dtype.bits = 32;
    out->dtype.lanes = 1;
    if (s->fail == 5) {
        out->ndim = 2;
        out->shape[0] = (int64_t)1 << 40;
        out->shape[1] = (int64_t)1 << 40;
    } else {
        out->ndim = 1;
        out->shape[0] = (int64_t)1 << 62;
    }
    return VQMOE_OK;
}
static int32_t bind_buffers(vqmoe_instance *inst, const vqmoe_buffer_binding *b, int32_t n) {
    (void)inst;
    (void)b;
    (void)n;
    return VQMOE_OK;
}
static int32_t init_buffers(vqmoe_instance *inst, uint64_t seed) {
    (void)inst;
    (void)seed;
    return VQMOE_OK;
}

static int32_t shape(vqmoe_instance *inst, const vqmoe_step_info *step, vqmoe_router_shape *out) {
    (void)inst;
    (void)step;
    out->mode = VQMOE_ROUTE_TOPK;
    out->k = 1;
    return VQMOE_OK;
}
static int32_t forward(vqmoe_instance *inst, const vqmoe_step_info *step, const vqmoe_router_input *in,
                       vqmoe_router_output *out, void **ctx) {
    (void)step;
    fixture *s = (fixture *)inst;
    *ctx = NULL;
#ifdef FIXTURE_BACKWARD
    if (step->flags & VQMOE_STEP_TRAIN) *ctx = malloc(1);
#endif
    if (s->fail == 7) *s->nowhere = 1; /* NULL (calloc), unknown to the compiler here: a real SIGSEGV */
    if (s->fail == 2) {
        s->host->set_error("fixture asked to fail in forward");
        return VQMOE_ERR_INVALID_ARGUMENT;
    }
    int64_t n = in->x.shape[0];
    int32_t *idx = (int32_t *)out->expert_index.data;
    float *w = (float *)out->weights.data;
    float *load = (float *)out->expert_load.data;
    for (int64_t i = 0; i < out->expert_load.shape[0]; i++) load[i] = 0;
    for (int64_t i = 0; i < n; i++) {
        idx[i] = 0;
        w[i] = s->fail == 3 ? (float)NAN : 1.0f;
        load[0] += 1;
    }
    out->aux_loss = 0;
#ifdef FIXTURE_BATCH_AUX
    /* a batch statistic: the square of the batch mean of x (not a mean over tokens) */
    const float *x = (const float *)in->x.data;
    double m = 0;
    for (int64_t i = 0; i < n * in->x.shape[1]; i++) m += x[i];
    m /= (double)(n * in->x.shape[1]);
    out->aux_loss = (float)(m * m);
#endif
    return VQMOE_OK;
}
static void free_ctx(vqmoe_instance *inst, void *ctx) {
    (void)inst;
    free(ctx);
}

#ifdef FIXTURE_BACKWARD
/* The weights are constant 1 (no dependence on x): grad_x is 0, or NaN on request. */
static int32_t backward(vqmoe_instance *inst, void *ctx, const vqmoe_router_grad_in *in, vqmoe_router_grad_out *out) {
    (void)ctx;
    (void)in;
    fixture *s = (fixture *)inst;
    float *g = (float *)out->grad_x.data;
    int64_t n = out->grad_x.shape[0] * out->grad_x.shape[1];
    if (s->fail == 4) g[n / 2] += (float)NAN;
    return VQMOE_OK;
}
#define FIXTURE_FLAGS       0
#define FIXTURE_BACKWARD_FN backward
#else
#define FIXTURE_FLAGS       VQMOE_PLUGIN_NO_GRAD
#define FIXTURE_BACKWARD_FN NULL
#endif

static const vqmoe_router_api router_api = {sizeof(vqmoe_router_api), shape, forward, FIXTURE_BACKWARD_FN, free_ctx};

static const vqmoe_plugin_desc desc = {
    FIXTURE_ABI,
    sizeof(vqmoe_plugin_desc),
    VQMOE_KIND_ROUTER,
    FIXTURE_FLAGS,
    FIXTURE_NAME,
    "0.1.0",
    "test fixture: a router that fails on request",
    (const vqmoe_hparam_spec *)hparams,
    N_HPARAMS,
    create,
    destroy,
    num_buffers,
    buffer_spec,
    bind_buffers,
    init_buffers,
    NULL,
    NULL,
    &router_api,
#ifdef FIXTURE_WIDE_SPECS
    sizeof(wide_spec),
#endif
};

#ifndef FIXTURE_NO_ENTRY
VQMOE_EXPORT const vqmoe_plugin_desc *vqmoe_plugin_entry(const vqmoe_host_api *host) {
    (void)host;
    return &desc;
}
#else
VQMOE_EXPORT int not_a_plugin(void) {
    return 42;
}
#endif
