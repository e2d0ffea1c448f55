/*
 * vqmoe_plugin_helpers.h -- optional, header-only helpers for C plugin authors.
 *
 * Nothing here is part of the ABI (vqmoe_plugin.h is): a plugin may use any subset, or none.
 * They take the glue off a plugin so that what is left is its method, in the spirit of CLAP's
 * helpers. Every function is `static inline`; include this header after vqmoe_plugin.h.
 *
 *   instance   struct vqmoe_instance { vqmoe_base base; ...your fields... };   (base FIRST)
 *   create     static int32_t setup(vqmoe_instance *inst, const vqmoe_create_info *info,
 *                                   const vqmoe_hparams *hp) { ...read hp, declare buffers... }
 *              VQMOE_DEFINE_CREATE(create, setup)       (a failing setup frees the instance)
 *   buffers    vqmoe_declare_param(&inst->base, "weight", 0, 2, (int64_t[]){e, d});   declared in
 *              setup, served by the base calls; after bind: inst->base.data[i], inst->base.grad[i]
 *   descriptor static const vqmoe_plugin_desc desc = {
 *                  VQMOE_DESC(VQMOE_KIND_ROUTER, 0, "example_router", "1.0.0", "what it does", hparams),
 *                  .create = my_create, VQMOE_BASE_CALLS, .init_buffers = my_init, .kind_api = &api};
 *              VQMOE_DEFINE_ENTRY(desc)
 *   schema     VQMOE_HPARAM_INT("k", 1, 1, 64, "experts per token"), VQMOE_HPARAM_FLOAT_MIN(...), ...
 *              (the host validates type, range and choices before create: check only what the
 *              schema cannot say)
 *   errors     return vqmoe_fail(host, VQMOE_ERR_SHAPE, "x has %lld rows", (long long)n);
 *              VQMOE_TRY(call());   returns the status of a failing call
 *   arguments  vqmoe_quantizer_begin / vqmoe_router_begin / vqmoe_head_begin / vqmoe_batch_begin check a
 *              forward's structs and tensors and hand back plain pointers; the *_grads functions do the
 *              same for a backward. VQMOE_CHECK_F32(host, &t, "x", n, d) checks one tensor (-1: any size).
 *
 * Messages name the instance ("layers.0.quantizer: x must ...") so a model's many instances can
 * be told apart.
 */
#ifndef VQMOE_PLUGIN_HELPERS_H
#define VQMOE_PLUGIN_HELPERS_H

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "vqmoe_plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ errors */

/** Describe an error through host->set_error (printf-style) and return `status`. */
#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static inline int32_t
vqmoe_fail(const vqmoe_host_api *host, int32_t status, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (host != NULL && host->set_error != NULL) host->set_error(buf);
    return status;
}

/** Return the status of `expr` when it is not VQMOE_OK. */
#define VQMOE_TRY(expr)                                                                                                \
    do {                                                                                                               \
        int32_t vqmoe_try_status_ = (expr);                                                                            \
        if (vqmoe_try_status_ != VQMOE_OK) return vqmoe_try_status_;                                                   \
    } while (0)

/* ------------------------------------------------------------------ hyperparameter schema */
/* Initialisers of vqmoe_hparam_spec: name, default, range, one-line doc. */
#define VQMOE_HPARAM_INT(name, def, lo, hi, doc)                                                                       \
    { (name), VQMOE_HP_INT, VQMOE_HP_HAS_MIN | VQMOE_HP_HAS_MAX, (doc), (def), NULL, (lo), (hi), NULL }
#define VQMOE_HPARAM_INT_MIN(name, def, lo, doc)                                                                       \
    { (name), VQMOE_HP_INT, VQMOE_HP_HAS_MIN, (doc), (def), NULL, (lo), 0.0, NULL }
#define VQMOE_HPARAM_FLOAT(name, def, lo, hi, doc)                                                                     \
    { (name), VQMOE_HP_FLOAT, VQMOE_HP_HAS_MIN | VQMOE_HP_HAS_MAX, (doc), (def), NULL, (lo), (hi), NULL }
#define VQMOE_HPARAM_FLOAT_MIN(name, def, lo, doc)                                                                     \
    { (name), VQMOE_HP_FLOAT, VQMOE_HP_HAS_MIN, (doc), (def), NULL, (lo), 0.0, NULL }
#define VQMOE_HPARAM_BOOL(name, def, doc)                                                                              \
    { (name), VQMOE_HP_BOOL, 0, (doc), (def), NULL, 0.0, 0.0, NULL }
/* `choices`: comma-separated allowed values, or NULL for any string. */
#define VQMOE_HPARAM_STRING(name, def, choices, doc)                                                                   \
    { (name), VQMOE_HP_STRING, 0, (doc), 0.0, (def), 0.0, 0.0, (choices) }
/* A file path: the host expands $DATA and $ROOT. */
#define VQMOE_HPARAM_PATH(name, def, doc)                                                                              \
    { (name), VQMOE_HP_STRING, VQMOE_HP_PATH, (doc), 0.0, (def), 0.0, 0.0, NULL }

/** Elements of a static array. */
#define VQMOE_COUNT(a) ((int32_t)(sizeof(a) / sizeof((a)[0])))

/* ------------------------------------------------------------------ the instance base */

#ifndef VQMOE_BASE_MAX_BUFFERS
#define VQMOE_BASE_MAX_BUFFERS 16
#endif

/**
 * The first member of a helper-based instance: the host table, the instance name, the model
 * facts of create_info, and the buffers the instance declared with the memory the host bound.
 */
typedef struct vqmoe_base {
    const vqmoe_host_api *host;
    char name[96]; /* e.g. "layers.0.quantizer", for messages */
    uint64_t seed;
    int64_t d_model, n_experts, n_codes, vocab_size, n_classes, seq_len, total_steps;
    uint32_t binding_size; /* create_info.binding_size (0: an ABI 1.0/1.1 host) */
    int32_t n_buffers;
    vqmoe_buffer_spec buffers[VQMOE_BASE_MAX_BUFFERS];
    void *data[VQMOE_BASE_MAX_BUFFERS];  /* bound by bind_buffers */
    float *grad[VQMOE_BASE_MAX_BUFFERS]; /* NULL for state, or when the host gives no gradient */
    /* optional: frees what the instance allocated itself, before destroy frees the instance */
    void (*release)(vqmoe_instance *inst);
} vqmoe_base;

/** The base of an instance (its first member). */
static inline vqmoe_base *vqmoe_base_of(vqmoe_instance *inst) {
    return (vqmoe_base *)(void *)inst;
}

/** What a plugin does in create once the base is filled: read hyperparameters, check what the
 *  schema cannot say, declare buffers. A failure frees the instance (*out stays NULL). */
typedef int32_t (*vqmoe_setup_fn)(vqmoe_instance *inst, const vqmoe_create_info *info, const vqmoe_hparams *hp);

/**
 * The body of create: allocate a zeroed instance of `size` bytes (its first member a
 * vqmoe_base) with host->alloc, fill the base from `info`, run `setup`; on success *out owns
 * the instance (the host's until destroy), on failure it is released and *out is NULL.
 */
static inline int32_t vqmoe_base_create(const vqmoe_create_info *info, const vqmoe_hparams *hp, size_t size,
                                        vqmoe_setup_fn setup, vqmoe_instance **out) {
    if (out == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (info == NULL || info->host == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    const vqmoe_host_api *host = info->host;
    if (info->struct_size < offsetof(vqmoe_create_info, binding_size))
        return vqmoe_fail(host, VQMOE_ERR_INVALID_ARGUMENT, "create_info: struct_size %u is smaller than ABI 1.0's",
                          (unsigned)info->struct_size);
    if (size < sizeof(vqmoe_base)) size = sizeof(vqmoe_base);
    vqmoe_base *b = (vqmoe_base *)host->alloc(size);
    if (b == NULL) return vqmoe_fail(host, VQMOE_ERR_OUT_OF_MEMORY, "out of memory for an instance");
    memset(b, 0, size);
    b->host = host;
    snprintf(b->name, sizeof b->name, "%s", info->instance_name ? info->instance_name : "?");
    b->seed = info->seed;
    b->d_model = info->d_model;
    b->n_experts = info->n_experts;
    b->n_codes = info->n_codes;
    b->vocab_size = info->vocab_size;
    b->n_classes = info->n_classes;
    b->seq_len = info->seq_len;
    b->total_steps = info->total_steps;
    b->binding_size = vqmoe_binding_size(info);
    int32_t status = setup != NULL ? setup((vqmoe_instance *)(void *)b, info, hp) : VQMOE_OK;
    if (status != VQMOE_OK) {
        if (b->release != NULL) b->release((vqmoe_instance *)(void *)b);
        host->free(b);
        return status;
    }
    *out = (vqmoe_instance *)(void *)b;
    return VQMOE_OK;
}

/** A descriptor's create for a `struct vqmoe_instance` set up by `setup`. */
#define VQMOE_DEFINE_CREATE(name, setup)                                                                               \
    static int32_t name(const vqmoe_create_info *info, const vqmoe_hparams *hp, vqmoe_instance **out) {                \
        return vqmoe_base_create(info, hp, sizeof(struct vqmoe_instance), (setup), out);                               \
    }

/**
 * Declare a buffer (in create): the host allocates it with this name, role (VQMOE_BUF_PARAM /
 * VQMOE_BUF_STATE), flags (VQMOE_BUF_*), dtype and shape. `name` must be static storage. The
 * declaration order is the buffer index.
 */
static inline int32_t vqmoe_declare(vqmoe_base *b, const char *name, int32_t role, uint32_t flags, vqmoe_dtype dtype,
                                    int32_t ndim, const int64_t *shape) {
    if (b->n_buffers >= VQMOE_BASE_MAX_BUFFERS || ndim < 0 || ndim > VQMOE_MAX_DIMS)
        return vqmoe_fail(b->host, VQMOE_ERR_INVALID_ARGUMENT, "%s: cannot declare buffer '%s' (%d declared, ndim %d)",
                          b->name, name, (int)b->n_buffers, (int)ndim);
    vqmoe_buffer_spec *s = &b->buffers[b->n_buffers++];
    memset(s, 0, sizeof *s);
    s->struct_size = sizeof(vqmoe_buffer_spec);
    s->name = name;
    s->role = role;
    s->flags = flags;
    s->dtype = dtype;
    s->ndim = ndim;
    for (int32_t i = 0; i < ndim; i++) s->shape[i] = shape[i];
    return VQMOE_OK;
}

/** A trainable float32 parameter. */
static inline int32_t vqmoe_declare_param(vqmoe_base *b, const char *name, uint32_t flags, int32_t ndim,
                                          const int64_t *shape) {
    return vqmoe_declare(b, name, VQMOE_BUF_PARAM, flags, vqmoe_f32(), ndim, shape);
}

/** A state buffer saved in checkpoints (float32, int32, int64, ...). */
static inline int32_t vqmoe_declare_state(vqmoe_base *b, const char *name, vqmoe_dtype dtype, int32_t ndim,
                                          const int64_t *shape) {
    return vqmoe_declare(b, name, VQMOE_BUF_STATE, 0, dtype, ndim, shape);
}

/** The float32 data of buffer i (after bind_buffers). */
static inline float *vqmoe_f32_buffer(const vqmoe_base *b, int32_t i) {
    return (float *)b->data[i];
}

/* Descriptor calls served by the base: destroy, num_buffers, buffer_spec, bind_buffers, free_ctx. */

static inline void vqmoe_base_destroy(vqmoe_instance *inst) {
    if (inst == NULL) return;
    if (vqmoe_base_of(inst)->release != NULL) vqmoe_base_of(inst)->release(inst);
    vqmoe_base_of(inst)->host->free(inst);
}

static inline int32_t vqmoe_base_num_buffers(vqmoe_instance *inst) {
    return inst != NULL ? vqmoe_base_of(inst)->n_buffers : 0;
}

static inline int32_t vqmoe_base_buffer_spec(vqmoe_instance *inst, int32_t i, vqmoe_buffer_spec *out) {
    if (inst == NULL || out == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    const vqmoe_base *b = vqmoe_base_of(inst);
    if (i < 0 || i >= b->n_buffers)
        return vqmoe_fail(b->host, VQMOE_ERR_INVALID_ARGUMENT, "%s: buffer index %d outside [0, %d)", b->name, (int)i,
                          (int)b->n_buffers);
    *out = b->buffers[i];
    return VQMOE_OK;
}

static inline int32_t vqmoe_base_bind_buffers(vqmoe_instance *inst, const vqmoe_buffer_binding *bindings, int32_t n) {
    if (inst == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    vqmoe_base *b = vqmoe_base_of(inst);
    if (n != b->n_buffers || (n > 0 && bindings == NULL))
        return vqmoe_fail(b->host, VQMOE_ERR_INVALID_ARGUMENT, "%s: bind_buffers got %d bindings, %d declared", b->name,
                          (int)n, (int)b->n_buffers);
    for (int32_t i = 0; i < n; i++) {
        const vqmoe_buffer_binding *bi = vqmoe_binding_at(bindings, i, b->binding_size);
        if (bi->data == NULL)
            return vqmoe_fail(b->host, VQMOE_ERR_INVALID_ARGUMENT, "%s: bind_buffers: '%s' has no data", b->name,
                              b->buffers[i].name);
        b->data[i] = bi->data;
        b->grad[i] = bi->grad;
    }
    return VQMOE_OK;
}

/** init_buffers of an instance without buffers (datasets). */
static inline int32_t vqmoe_base_init_none(vqmoe_instance *inst, uint64_t seed) {
    (void)seed;
    return inst != NULL ? VQMOE_OK : VQMOE_ERR_INVALID_ARGUMENT;
}

/** free_ctx for contexts allocated with vqmoe_ctx_alloc (host->alloc). */
static inline void vqmoe_base_free_ctx(vqmoe_instance *inst, void *ctx) {
    if (inst != NULL && ctx != NULL) vqmoe_base_of(inst)->host->free(ctx);
}

/** Designated initialisers of the calls the base serves. */
#define VQMOE_BASE_CALLS                                                                                               \
    .destroy = vqmoe_base_destroy, .num_buffers = vqmoe_base_num_buffers, .buffer_spec = vqmoe_base_buffer_spec,       \
    .bind_buffers = vqmoe_base_bind_buffers

/** Designated initialisers of a descriptor's identity and schema (`hparams` is a static array). */
#define VQMOE_DESC(kind_, flags_, name_, version_, description_, hparams_)                                             \
    .abi_version = VQMOE_ABI_VERSION, .struct_size = sizeof(vqmoe_plugin_desc), .kind = (kind_), .flags = (flags_),    \
    .name = (name_), .version = (version_), .description = (description_), .hparams = (hparams_),                      \
    .n_hparams = VQMOE_COUNT(hparams_), .hparam_spec_size = sizeof(vqmoe_hparam_spec)

/** The descriptor, or NULL (with a log line) for a host of another ABI major. */
static inline const vqmoe_plugin_desc *vqmoe_entry_check(const vqmoe_host_api *host, const vqmoe_plugin_desc *d) {
    if (host != NULL && VQMOE_ABI_MAJOR(host->abi_version) != VQMOE_ABI_VERSION_MAJOR) {
        char msg[160];
        snprintf(msg, sizeof msg, "built for plugin ABI %u.%u, the host speaks %u.%u",
                 (unsigned)VQMOE_ABI_VERSION_MAJOR, (unsigned)VQMOE_ABI_VERSION_MINOR,
                 (unsigned)VQMOE_ABI_MAJOR(host->abi_version), (unsigned)(host->abi_version & 0xffffu));
        if (host->log != NULL) host->log(VQMOE_LOG_ERROR, d->name, msg);
        return NULL;
    }
    return d;
}

/** The one exported symbol, returning `desc`. */
#define VQMOE_DEFINE_ENTRY(desc)                                                                                       \
    VQMOE_EXPORT const vqmoe_plugin_desc *vqmoe_plugin_entry(const vqmoe_host_api *host) {                             \
        return vqmoe_entry_check(host, &(desc));                                                                       \
    }

/* ------------------------------------------------------------------ memory and random numbers */

/** `bytes` zeroed bytes from host->alloc (a context: vqmoe_base_free_ctx releases it). */
static inline void *vqmoe_ctx_alloc(const vqmoe_base *b, size_t bytes) {
    void *p = b->host->alloc(bytes > 0 ? bytes : 1);
    if (p != NULL)
        memset(p, 0, bytes);
    else
        vqmoe_fail(b->host, VQMOE_ERR_OUT_OF_MEMORY, "%s: out of memory (%zu bytes)", b->name, bytes);
    return p;
}

/** p[i] = scale * N(0, 1) from the host stream (seed, stream): same seed, same values. */
static inline void vqmoe_fill_normal(const vqmoe_host_api *host, uint64_t seed, uint64_t stream, float *p,
                                     int64_t count, float scale) {
    vqmoe_rng r;
    host->rng_init(&r, seed, stream);
    for (int64_t i = 0; i < count; i++) p[i] = scale * host->rng_normal(&r);
}

/** A training forward that a backward will follow: the only kind that saves a context. */
static inline int vqmoe_step_saves(const vqmoe_step_info *step) {
    return (step->flags & VQMOE_STEP_TRAIN) && !(step->flags & VQMOE_STEP_NO_GRAD);
}

/** Hand `ctx` to the host when a backward follows (vqmoe_step_saves), else free it. */
static inline void vqmoe_ctx_finish(const vqmoe_base *b, const vqmoe_step_info *step, void *ctx, void **saved) {
    if (vqmoe_step_saves(step))
        *saved = ctx;
    else
        b->host->free(ctx);
}

/* ------------------------------------------------------------------ tensor checks */

#define VQMOE_ANY (-1)

/**
 * VQMOE_OK when `t` is a contiguous view of `dtype` with `ndim` dims equal to `shape`
 * (VQMOE_ANY matches any size), else VQMOE_ERR_SHAPE with a message naming `what`.
 */
static inline int32_t vqmoe_check_tensor(const vqmoe_base *b, const vqmoe_tensor *t, vqmoe_dtype dtype,
                                         const char *what, int32_t ndim, const int64_t *shape) {
    char want[128] = "(", got[128] = "(";
    for (int32_t i = 0; i < ndim; i++) {
        size_t l = strlen(want);
        if (shape[i] < 0)
            snprintf(want + l, sizeof want - l, "%s*", i ? ", " : "");
        else
            snprintf(want + l, sizeof want - l, "%s%lld", i ? ", " : "", (long long)shape[i]);
    }
    strcat(want, ")");
    if (t->data == NULL) return vqmoe_fail(b->host, VQMOE_ERR_SHAPE, "%s: %s is absent (data NULL)", b->name, what);
    int ok = t->dtype.code == dtype.code && t->dtype.bits == dtype.bits && t->dtype.lanes == dtype.lanes &&
             t->strides == NULL && t->byte_offset == 0 && t->ndim == ndim && t->shape != NULL;
    for (int32_t i = 0; ok && i < ndim; i++) ok = shape[i] < 0 || t->shape[i] == shape[i];
    if (ok) return VQMOE_OK;
    for (int32_t i = 0; t->shape != NULL && i < t->ndim && i < VQMOE_MAX_DIMS; i++) {
        size_t l = strlen(got);
        snprintf(got + l, sizeof got - l, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    }
    strcat(got, ")");
    return vqmoe_fail(b->host, VQMOE_ERR_SHAPE,
                      "%s: %s must be a contiguous %s%u tensor of shape %s, got dtype {%u, %u, %u} shape %s", b->name,
                      what, dtype.code == VQMOE_DTYPE_FLOAT ? "float" : "int", (unsigned)dtype.bits, want,
                      (unsigned)t->dtype.code, (unsigned)t->dtype.bits, (unsigned)t->dtype.lanes, got);
}

#define VQMOE_DIMS_(...) ((int32_t)(sizeof((const int64_t[]){__VA_ARGS__}) / sizeof(int64_t)))
/** Check a float32 / int32 tensor of the given sizes: VQMOE_CHECK_F32(&inst->base, &in->x, "x", VQMOE_ANY, d). */
#define VQMOE_CHECK_F32(base, t, what, ...)                                                                            \
    vqmoe_check_tensor((base), (t), vqmoe_f32(), (what), VQMOE_DIMS_(__VA_ARGS__), (const int64_t[]){__VA_ARGS__})
#define VQMOE_CHECK_I32(base, t, what, ...)                                                                            \
    vqmoe_check_tensor((base), (t), vqmoe_i32(), (what), VQMOE_DIMS_(__VA_ARGS__), (const int64_t[]){__VA_ARGS__})

/** The NULL and struct_size checks every call repeats. */
static inline int32_t vqmoe_check_struct(const vqmoe_base *b, const void *p, uint32_t size, uint32_t need,
                                         const char *what) {
    if (p == NULL) return vqmoe_fail(b->host, VQMOE_ERR_INVALID_ARGUMENT, "%s: %s is NULL", b->name, what);
    if (size < need)
        return vqmoe_fail(b->host, VQMOE_ERR_INVALID_ARGUMENT, "%s: %s struct_size %u is smaller than %u", b->name,
                          what, (unsigned)size, (unsigned)need);
    return VQMOE_OK;
}
#define VQMOE_CHECK_STRUCT_(base, p, type, what)                                                                       \
    vqmoe_check_struct((base), (p), (p) != NULL ? (p)->struct_size : 0, (uint32_t)sizeof(type), (what))

/* ------------------------------------------------------------------ quantizer arguments */

/** A quantizer forward's checked arguments. */
typedef struct vqmoe_quantizer_io {
    const float *x;   /* (N,d) */
    float *quantized; /* (N,d) out */
    int32_t *codes;   /* (N,L) out */
    float *counts;    /* (K) out, code usage */
    int64_t n, d;
    uint32_t flags; /* VQMOE_STEP_* of the step */
} vqmoe_quantizer_io;

/**
 * Check a quantizer forward's arguments for width d, K codes and L codes per token; set
 * *ctx = NULL; fill `io`.
 */
static inline int32_t vqmoe_quantizer_begin(vqmoe_instance *inst, int64_t k, int64_t levels,
                                            const vqmoe_step_info *step, const vqmoe_quantizer_input *in,
                                            vqmoe_quantizer_output *out, void **ctx, vqmoe_quantizer_io *io) {
    if (ctx != NULL) *ctx = NULL;
    if (io != NULL) memset(io, 0, sizeof *io);
    if (inst == NULL || io == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    const vqmoe_base *b = vqmoe_base_of(inst);
    const int64_t d = b->d_model;
    VQMOE_TRY(vqmoe_check_struct(b, step, step ? step->struct_size : 0, VQMOE_STEP_INFO_1_0_SIZE, "step info"));
    VQMOE_TRY(VQMOE_CHECK_STRUCT_(b, in, vqmoe_quantizer_input, "quantizer input"));
    VQMOE_TRY(VQMOE_CHECK_STRUCT_(b, out, vqmoe_quantizer_output, "quantizer output"));
    VQMOE_TRY(VQMOE_CHECK_F32(b, &in->x, "x", VQMOE_ANY, d));
    const int64_t n = in->x.shape[0];
    VQMOE_TRY(VQMOE_CHECK_F32(b, &out->quantized, "quantized", n, d));
    if (levels == 1 && out->codes.ndim == 1)
        VQMOE_TRY(VQMOE_CHECK_I32(b, &out->codes, "codes", n));
    else
        VQMOE_TRY(VQMOE_CHECK_I32(b, &out->codes, "codes", n, levels));
    VQMOE_TRY(VQMOE_CHECK_F32(b, &out->code_counts, "code_counts", k));
    io->x = (const float *)in->x.data;
    io->quantized = (float *)out->quantized.data;
    io->codes = (int32_t *)out->codes.data;
    io->counts = (float *)out->code_counts.data;
    io->n = n;
    io->d = d;
    io->flags = step->flags;
    return VQMOE_OK;
}

/** Check a quantizer backward's arguments for N rows: grad_quantized (or NULL when absent), grad_x. */
static inline int32_t vqmoe_quantizer_grads(vqmoe_instance *inst, const void *ctx, int64_t n,
                                            const vqmoe_quantizer_grad_in *gin, vqmoe_quantizer_grad_out *gout,
                                            const float **grad_quantized, float **grad_x) {
    if (inst == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    const vqmoe_base *b = vqmoe_base_of(inst);
    const int64_t d = b->d_model;
    if (ctx == NULL)
        return vqmoe_fail(b->host, VQMOE_ERR_STATE,
                          "%s: backward got a NULL context (a forward saves one only in "
                          "train mode without NO_GRAD)",
                          b->name);
    VQMOE_TRY(VQMOE_CHECK_STRUCT_(b, gin, vqmoe_quantizer_grad_in, "quantizer grad_in"));
    VQMOE_TRY(VQMOE_CHECK_STRUCT_(b, gout, vqmoe_quantizer_grad_out, "quantizer grad_out"));
    *grad_quantized = NULL;
    if (gin->grad_quantized.data != NULL) {
        VQMOE_TRY(VQMOE_CHECK_F32(b, &gin->grad_quantized, "grad_quantized", n, d));
        *grad_quantized = (const float *)gin->grad_quantized.data;
    }
    VQMOE_TRY(VQMOE_CHECK_F32(b, &gout->grad_x, "grad_x", n, d));
    *grad_x = (float *)gout->grad_x.data;
    return VQMOE_OK;
}

/* ------------------------------------------------------------------ router arguments */

/** A top-k router forward's checked arguments. */
typedef struct vqmoe_router_io {
    const float *x;           /* (N,d) */
    const int32_t *token_ids; /* (N), or NULL when the model has none */
    int32_t *index;           /* (N,k) out: experts */
    float *weights;           /* (N,k) out */
    float *load;              /* (E) out: tokens per expert */
    int64_t n, d, k, n_groups, group_size;
    uint32_t flags;
} vqmoe_router_io;

/** Check a top-k router forward's arguments for k experts per token out of the model's E; set *ctx = NULL. */
static inline int32_t vqmoe_router_begin(vqmoe_instance *inst, int64_t k, const vqmoe_step_info *step,
                                         const vqmoe_router_input *in, vqmoe_router_output *out, void **ctx,
                                         vqmoe_router_io *io) {
    if (ctx != NULL) *ctx = NULL;
    if (io != NULL) memset(io, 0, sizeof *io);
    if (inst == NULL || io == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    const vqmoe_base *b = vqmoe_base_of(inst);
    const int64_t d = b->d_model;
    VQMOE_TRY(vqmoe_check_struct(b, step, step ? step->struct_size : 0, VQMOE_STEP_INFO_1_0_SIZE, "step info"));
    VQMOE_TRY(VQMOE_CHECK_STRUCT_(b, in, vqmoe_router_input, "router input"));
    VQMOE_TRY(VQMOE_CHECK_STRUCT_(b, out, vqmoe_router_output, "router output"));
    VQMOE_TRY(VQMOE_CHECK_F32(b, &in->x, "x", VQMOE_ANY, d));
    const int64_t n = in->x.shape[0];
    io->token_ids = NULL;
    if (in->token_ids.data != NULL) {
        VQMOE_TRY(VQMOE_CHECK_I32(b, &in->token_ids, "token_ids", n));
        io->token_ids = (const int32_t *)in->token_ids.data;
    }
    VQMOE_TRY(VQMOE_CHECK_I32(b, &out->expert_index, "expert_index", n, k));
    VQMOE_TRY(VQMOE_CHECK_F32(b, &out->weights, "weights", n, k));
    VQMOE_TRY(VQMOE_CHECK_F32(b, &out->expert_load, "expert_load", b->n_experts));
    io->x = (const float *)in->x.data;
    io->index = (int32_t *)out->expert_index.data;
    io->weights = (float *)out->weights.data;
    io->load = (float *)out->expert_load.data;
    io->n = n;
    io->d = d;
    io->k = k;
    io->n_groups = in->n_groups;
    io->group_size = in->group_size;
    io->flags = step->flags;
    return VQMOE_OK;
}

/** Check a top-k router backward's arguments for N rows: grad_weights (N,k) (NULL when absent), grad_x. */
static inline int32_t vqmoe_router_grads(vqmoe_instance *inst, const void *ctx, int64_t n, int64_t k,
                                         const vqmoe_router_grad_in *gin, vqmoe_router_grad_out *gout,
                                         const float **grad_weights, float **grad_x) {
    if (inst == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    const vqmoe_base *b = vqmoe_base_of(inst);
    if (ctx == NULL)
        return vqmoe_fail(b->host, VQMOE_ERR_STATE,
                          "%s: backward got a NULL context (a forward saves one only in "
                          "train mode without NO_GRAD)",
                          b->name);
    VQMOE_TRY(VQMOE_CHECK_STRUCT_(b, gin, vqmoe_router_grad_in, "router grad_in"));
    VQMOE_TRY(VQMOE_CHECK_STRUCT_(b, gout, vqmoe_router_grad_out, "router grad_out"));
    *grad_weights = NULL;
    if (gin->grad_weights.data != NULL) {
        VQMOE_TRY(VQMOE_CHECK_F32(b, &gin->grad_weights, "grad_weights", n, k));
        *grad_weights = (const float *)gin->grad_weights.data;
    }
    VQMOE_TRY(VQMOE_CHECK_F32(b, &gout->grad_x, "grad_x", n, b->d_model));
    *grad_x = (float *)gout->grad_x.data;
    return VQMOE_OK;
}

/* ------------------------------------------------------------------ head arguments */

/** A head forward's checked arguments. */
typedef struct vqmoe_head_io {
    const float *h;         /* (B,T,d) */
    const int32_t *targets; /* (rows), or NULL: logits only */
    const int32_t *lengths; /* (B), or NULL: every position is real */
    float *logits;          /* (rows, n_out) out */
    int64_t batch, seq, d, rows, n_out;
    uint32_t flags;
} vqmoe_head_io;

/** Check a head forward's arguments (per_token: rows = B*T, else B); set *ctx = NULL. */
static inline int32_t vqmoe_head_begin(vqmoe_instance *inst, int64_t n_out, int per_token, const vqmoe_step_info *step,
                                       const vqmoe_head_input *in, vqmoe_head_output *out, void **ctx,
                                       vqmoe_head_io *io) {
    if (ctx != NULL) *ctx = NULL;
    if (io != NULL) memset(io, 0, sizeof *io);
    if (inst == NULL || io == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    const vqmoe_base *b = vqmoe_base_of(inst);
    const int64_t d = b->d_model;
    VQMOE_TRY(vqmoe_check_struct(b, step, step ? step->struct_size : 0, VQMOE_STEP_INFO_1_0_SIZE, "step info"));
    VQMOE_TRY(VQMOE_CHECK_STRUCT_(b, in, vqmoe_head_input, "head input"));
    VQMOE_TRY(VQMOE_CHECK_STRUCT_(b, out, vqmoe_head_output, "head output"));
    VQMOE_TRY(VQMOE_CHECK_F32(b, &in->h, "h", VQMOE_ANY, VQMOE_ANY, d));
    const int64_t bsz = in->h.shape[0], seq = in->h.shape[1], rows = per_token ? bsz * seq : bsz;
    io->targets = NULL;
    if (in->targets.data != NULL) {
        if (per_token)
            VQMOE_TRY(VQMOE_CHECK_I32(b, &in->targets, "targets", bsz, seq));
        else
            VQMOE_TRY(VQMOE_CHECK_I32(b, &in->targets, "targets", bsz));
        io->targets = (const int32_t *)in->targets.data;
    }
    io->lengths = NULL;
    if (in->struct_size >= offsetof(vqmoe_head_input, lengths) + sizeof(vqmoe_tensor) && in->lengths.data != NULL) {
        VQMOE_TRY(VQMOE_CHECK_I32(b, &in->lengths, "lengths", bsz));
        io->lengths = (const int32_t *)in->lengths.data;
    }
    VQMOE_TRY(VQMOE_CHECK_F32(b, &out->logits, "logits", rows, n_out));
    io->h = (const float *)in->h.data;
    io->logits = (float *)out->logits.data;
    io->batch = bsz;
    io->seq = seq;
    io->d = d;
    io->rows = rows;
    io->n_out = n_out;
    io->flags = step->flags;
    return VQMOE_OK;
}

/** Check a head backward's arguments: grad_loss, and grad_h (B,T,d). */
static inline int32_t vqmoe_head_grads(vqmoe_instance *inst, const void *ctx, int64_t batch, int64_t seq,
                                       const vqmoe_head_grad_in *gin, vqmoe_head_grad_out *gout, float *grad_loss,
                                       float **grad_h) {
    if (inst == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    const vqmoe_base *b = vqmoe_base_of(inst);
    if (ctx == NULL)
        return vqmoe_fail(b->host, VQMOE_ERR_STATE,
                          "%s: backward got a NULL context (a forward saves one only in "
                          "train mode without NO_GRAD)",
                          b->name);
    VQMOE_TRY(VQMOE_CHECK_STRUCT_(b, gin, vqmoe_head_grad_in, "head grad_in"));
    VQMOE_TRY(VQMOE_CHECK_STRUCT_(b, gout, vqmoe_head_grad_out, "head grad_out"));
    VQMOE_TRY(VQMOE_CHECK_F32(b, &gout->grad_h, "grad_h", batch, seq, b->d_model));
    *grad_loss = gin->grad_loss;
    *grad_h = (float *)gout->grad_h.data;
    return VQMOE_OK;
}

/* ------------------------------------------------------------------ dataset arguments */

/** A batch request's checked arguments, for a token task with samples of `seq` tokens. */
typedef struct vqmoe_batch_io {
    int32_t split; /* VQMOE_SPLIT_* */
    int64_t index, batch;
    int32_t *inputs;  /* (B,T) out */
    int32_t *targets; /* (B,T) or (B) out */
} vqmoe_batch_io;

/** Check a token-task read_batch: a valid split, batch_size >= 1, inputs (B,T) int32 and targets (B,T) or (B). */
static inline int32_t vqmoe_batch_begin(vqmoe_instance *inst, int64_t seq, int per_token_targets,
                                        const vqmoe_batch_request *req, vqmoe_batch *out, vqmoe_batch_io *io) {
    if (io != NULL) memset(io, 0, sizeof *io);
    if (inst == NULL || io == NULL) return VQMOE_ERR_INVALID_ARGUMENT;
    const vqmoe_base *b = vqmoe_base_of(inst);
    VQMOE_TRY(VQMOE_CHECK_STRUCT_(b, req, vqmoe_batch_request, "batch request"));
    VQMOE_TRY(VQMOE_CHECK_STRUCT_(b, out, vqmoe_batch, "batch"));
    if (req->split < VQMOE_SPLIT_TRAIN || req->split > VQMOE_SPLIT_TEST || req->batch_size < 1 || req->index < 0)
        return vqmoe_fail(b->host, VQMOE_ERR_INVALID_ARGUMENT,
                          "%s: bad batch request (split %d, index %lld, size %lld)", b->name, (int)req->split,
                          (long long)req->index, (long long)req->batch_size);
    const int64_t bs = req->batch_size;
    VQMOE_TRY(VQMOE_CHECK_I32(b, &out->inputs, "inputs", bs, seq));
    if (per_token_targets)
        VQMOE_TRY(VQMOE_CHECK_I32(b, &out->targets, "targets", bs, seq));
    else
        VQMOE_TRY(VQMOE_CHECK_I32(b, &out->targets, "targets", bs));
    io->split = req->split;
    io->index = req->index;
    io->batch = bs;
    io->inputs = (int32_t *)out->inputs.data;
    io->targets = (int32_t *)out->targets.data;
    return VQMOE_OK;
}

#ifdef __cplusplus
}
#endif

#endif /* VQMOE_PLUGIN_HELPERS_H */
