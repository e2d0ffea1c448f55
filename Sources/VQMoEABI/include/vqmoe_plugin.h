/*
 * vqmoe_plugin.h -- the vqmoe plugin ABI, version 1.
 *
 * This header is the ONLY thing a plugin includes. A plugin is a shared library that
 * exports one symbol, `vqmoe_plugin_entry` (see the end of this file), and implements one
 * of four kinds of component:
 *
 *   router     x (N,d) -> which experts see each token, with what weight
 *              (sparse top-k, or dense dispatch/combine as in SoftMoE)
 *   quantizer  x (N,d) -> discrete codes (N,L) and the quantized vectors (N,d)
 *   dataset    (split, batch index) -> a batch of inputs and targets
 *   head       hidden states (N,d) + targets -> logits, loss and counts
 *
 * Rules that keep the ABI stable (the CLAP / DLPack / ONNX Runtime custom-op recipe):
 *   - Every struct that crosses the boundary starts with `abi_version` and/or
 *     `struct_size`. Structs only ever grow at the END; a reader checks `struct_size`
 *     before touching a field that was added later. Same major version = compatible.
 *   - Constants are #defines, never C enums (enum sizes differ across compilers and
 *     languages).
 *   - No exceptions, Swift errors, longjmp or C++ across the boundary: every fallible call
 *     returns an int32_t status (VQMOE_OK = 0) and, before returning an error, the plugin
 *     describes it with host->set_error().
 *   - Optional features are looked up by string id through get_feature(); NULL means
 *     "not supported".
 *   - Tensors cross as non-owning views with DLPack's field meanings (vqmoe_tensor).
 *   - Parameters and state buffers are DECLARED by the plugin and OWNED by the host, so
 *     the optimizer, gradient clipping, checkpoints and resume treat every component
 *     alike. A plugin keeps no result-changing state anywhere else: everything that
 *     changes results lives in declared buffers or follows from vqmoe_step_info, so a
 *     checkpoint captures it and a resumed run is bit-identical.
 *
 * Ownership, in one place (each call below repeats what concerns it):
 *   - Descriptor (vqmoe_plugin_desc) and everything it points to: owned by the plugin,
 *     static, valid while the library is loaded (the host never unloads a plugin).
 *   - Instance (vqmoe_instance): created by create(), owned by the host, released with
 *     destroy(). The plugin allocates it (preferably with host->alloc).
 *   - Parameter / gradient / state buffers: allocated, zeroed, saved and restored by the
 *     host; the plugin receives pointers in bind_buffers() that stay valid until destroy().
 *   - Forward outputs: allocated by the host from shapes the plugin states (query calls),
 *     written by the plugin.
 *   - Saved context (void *ctx from a forward): allocated and owned by the plugin; the
 *     host passes it to backward() at most once and ALWAYS releases it with free_ctx()
 *     exactly once (also when no backward comes, e.g. on an error). Eval-mode forwards
 *     (VQMOE_STEP_TRAIN not set) or forwards with VQMOE_STEP_NO_GRAD set must leave
 *     *ctx = NULL.
 *   - Gradients are ACCUMULATED (+=) into host-provided buffers, both parameter
 *     gradients and input gradients. The host zeroes them.
 *   - Strings passed into a call are valid for the duration of that call only.
 *   - Input tensors of a TRAINING forward (x, token_ids, h, targets, lengths) stay valid and
 *     unchanged until the backward that receives its ctx has returned, or the ctx is freed:
 *     a plugin may keep pointers to them in its ctx instead of copying them.
 *   - PARAM buffers change only in the optimizer step, after every backward of the step has
 *     returned: a backward may read the parameters its forward used from the buffers.
 *   - Arrays whose elements are structs carry their element size (ABI 1.2): the descriptor's
 *     hparams (hparam_spec_size), vqmoe_hparams.values (value_size) and the bindings of
 *     bind_buffers (create_info.binding_size). Step through them with these sizes (the inline
 *     helpers at the end do); a size of 0, or a struct_size that does not cover the field,
 *     means the ABI 1.0 size. The host lays out the arrays it passes in the element size of
 *     the plugin's own ABI version.
 *
 * Batch statistics in a distributed run (ABI 1.3): under data parallelism every rank holds a
 * replica of the model and computes on its own rows of each global batch; all ranks run the
 * same forwards, backwards and begin_steps in the same order. A plugin that computes a statistic
 * over the batch -- a loss mean, a balance term's f_e and P_e, EMA code counts and sums, rows
 * for a k-means init or a dead-code restart, code counts, an entropy of the mean distribution --
 * sums it over the ranks with host->allreduce_sum_* (or gathers rows with host->allgather) and
 * declares VQMOE_PLUGIN_GLOBAL_BATCH: its loss is then the single-process loss of the global
 * batch, the same on every rank, and its backward returns that loss's derivative for this
 * rank's tokens (the host sums parameter gradients over the ranks). The collectives are
 * collective: every rank calls them in the same order with the same counts (allgather: any
 * byte counts). In one process they are no-ops, so one code path serves both. A plugin without
 * the flag keeps working: the host treats its loss as a mean over this rank's tokens (averaged
 * over the ranks, weighted by tokens) and keeps rank 0's state buffers after each step.
 *
 * Threading:
 *   - One instance is called from one thread at a time; different instances may be
 *     called concurrently. Descriptor functions (create, get_feature) are thread-safe.
 *   - A plugin never starts threads: it uses host->parallel_for, which runs on the host's
 *     pool (sized by --threads). parallel_for called from inside a parallel_for body runs
 *     serially in the calling thread; host->sgemm may use all threads and must not be
 *     called from inside a parallel_for body.
 *   - Every function of vqmoe_host_api is thread-safe.
 *
 * Versioning: VQMOE_ABI_VERSION = (major << 16) | minor. The host loads a plugin whose
 * descriptor has the same major; a plugin may refuse a host whose major differs by
 * returning NULL from vqmoe_plugin_entry.
 */
#ifndef VQMOE_PLUGIN_H
#define VQMOE_PLUGIN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ version */
#define VQMOE_ABI_VERSION_MAJOR 1
#define VQMOE_ABI_VERSION_MINOR 3
/* (major << 16) | minor, spelled out so that Swift imports it as a constant.
 * 1.1: vqmoe_dataset_info.streams (appended; 1.0 plugins leave it 0).
 * 1.2: element sizes for the arrays that cross the boundary, so their elements can grow too:
 *      vqmoe_plugin_desc.hparam_spec_size, vqmoe_hparams.value_size,
 *      vqmoe_create_info.binding_size (all appended; 0 or absent = the 1.0 size).
 * 1.3: distributed runs: the host's ranks and collectives (vqmoe_host_api.num_ranks ... allgather),
 *      vqmoe_step_info.token_offset / global_tokens, VQMOE_PLUGIN_GLOBAL_BATCH (all appended). */
#define VQMOE_ABI_VERSION       0x00010003u
#define VQMOE_ABI_MAJOR(v)      ((uint32_t)(v) >> 16)
#define VQMOE_ABI_MINOR(v)      ((uint32_t)(v)&0xffffu)

/** Name of the one symbol every plugin library exports. */
#define VQMOE_ENTRY_SYMBOL "vqmoe_plugin_entry"

/* ------------------------------------------------------------------ status codes */
#define VQMOE_OK                   0
#define VQMOE_ERR_INVALID_ARGUMENT 1 /* bad hyperparameter or argument value */
#define VQMOE_ERR_SHAPE            2 /* tensor shape / dtype not what the call expects */
#define VQMOE_ERR_UNSUPPORTED      3 /* the plugin does not do this (e.g. dense routing) */
#define VQMOE_ERR_OUT_OF_MEMORY    4
#define VQMOE_ERR_NUMERIC          5 /* non-finite value produced or received */
#define VQMOE_ERR_IO               6 /* file missing, unreadable or malformed */
#define VQMOE_ERR_STATE            7 /* called in the wrong order (e.g. before bind_buffers) */
#define VQMOE_ERR_INTERNAL         8
#define VQMOE_ERR_END_OF_DATA      9 /* dataset: batch index past the end of a finite split */

/* ------------------------------------------------------------------ component kinds */
#define VQMOE_KIND_ROUTER    1
#define VQMOE_KIND_QUANTIZER 2
#define VQMOE_KIND_DATASET   3
#define VQMOE_KIND_HEAD      4

/* ------------------------------------------------------------------ log levels */
#define VQMOE_LOG_DEBUG 0
#define VQMOE_LOG_INFO  1
#define VQMOE_LOG_WARN  2
#define VQMOE_LOG_ERROR 3

/* ------------------------------------------------------------------ tensors (DLPack) */
/* Field meanings follow DLPack's DLTensor / DLDataType / DLDevice. */
#define VQMOE_DTYPE_INT   0 /* kDLInt */
#define VQMOE_DTYPE_UINT  1 /* kDLUInt */
#define VQMOE_DTYPE_FLOAT 2 /* kDLFloat */
#define VQMOE_DEVICE_CPU  1 /* kDLCPU */

/** Element type: {code, bits, lanes}, as DLDataType. float32 = {2, 32, 1}. */
typedef struct vqmoe_dtype {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} vqmoe_dtype;

/** Device, as DLDevice. Version 1 hosts only pass {VQMOE_DEVICE_CPU, 0}. */
typedef struct vqmoe_device {
    int32_t device_type;
    int32_t device_id;
} vqmoe_device;

/**
 * A non-owning tensor view, laid out exactly like DLPack's DLTensor.
 * `strides` counts ELEMENTS (not bytes); NULL means compact row-major. The element at
 * index (i0..i_{n-1}) lives at (char*)data + byte_offset + sizeof(elem)*sum(i_k*stride_k).
 * Version 1 hosts pass contiguous tensors (strides == NULL, byte_offset == 0).
 * A tensor whose `data` is NULL is "absent" (e.g. no token ids available).
 */
typedef struct vqmoe_tensor {
    void *data;
    vqmoe_device device;
    int32_t ndim;
    vqmoe_dtype dtype;
    const int64_t *shape;
    const int64_t *strides;
    uint64_t byte_offset;
} vqmoe_tensor;

/* ------------------------------------------------------------------ hyperparameters */
#define VQMOE_HP_INT    1
#define VQMOE_HP_FLOAT  2
#define VQMOE_HP_BOOL   3
#define VQMOE_HP_STRING 4 /* free string, or one of `choices` when choices != NULL */

#define VQMOE_HP_HAS_MIN      0x1u  /* value >= min_value */
#define VQMOE_HP_HAS_MAX      0x2u  /* value <= max_value */
#define VQMOE_HP_POWER_OF_TWO 0x4u  /* INT only: value is 2^n */
#define VQMOE_HP_PATH         0x8u  /* STRING is a file path (the host expands $ROOT/$DATA) */
#define VQMOE_HP_OPTIONAL     0x10u /* STRING may be empty */

/**
 * One entry of a plugin's hyperparameter schema. The host validates every config value
 * against it (type, range, choices) before create(), fills in defaults, and prints it in
 * `vqmoe plugins inspect`.
 */
typedef struct vqmoe_hparam_spec {
    const char *name;           /* lower_snake_case, unique within the plugin */
    int32_t type;               /* VQMOE_HP_* */
    uint32_t flags;             /* VQMOE_HP_HAS_MIN | ... */
    const char *description;    /* one line */
    double default_number;      /* INT / FLOAT / BOOL (0 or 1) default */
    const char *default_string; /* STRING default ("" allowed with VQMOE_HP_OPTIONAL) */
    double min_value;           /* with VQMOE_HP_HAS_MIN */
    double max_value;           /* with VQMOE_HP_HAS_MAX */
    const char *choices;        /* STRING: comma-separated allowed values, or NULL */
} vqmoe_hparam_spec;

/** A resolved, validated hyperparameter value (the host fills one per schema entry). */
typedef struct vqmoe_hparam_value {
    const char *name;
    int32_t type;
    int64_t int_value;        /* INT, BOOL */
    double float_value;       /* FLOAT (and INT/BOOL converted) */
    const char *string_value; /* STRING */
} vqmoe_hparam_value;

/** All hyperparameters of one instance, in schema order. Valid during create() only. */
typedef struct vqmoe_hparams {
    uint32_t struct_size;
    int32_t count;
    const vqmoe_hparam_value *values;
    /** ABI 1.2: bytes from one element of `values` to the next (see vqmoe_hp_at). */
    uint32_t value_size;
} vqmoe_hparams;

/* ------------------------------------------------------------------ host API */

/** Counter-based random stream (SplitMix64 over key+counter); plain data, copyable. */
typedef struct vqmoe_rng {
    uint64_t key;
    uint64_t counter;
} vqmoe_rng;

/** Body of a host->parallel_for: processes items [begin, end). */
typedef void (*vqmoe_parallel_fn)(void *user, int64_t begin, int64_t end);

#define VQMOE_NO_TRANS 0
#define VQMOE_TRANS    1

/**
 * Services the host offers every plugin. Passed to vqmoe_plugin_entry and in
 * vqmoe_create_info; valid while the process runs. All functions are thread-safe.
 */
typedef struct vqmoe_host_api {
    uint32_t abi_version; /* VQMOE_ABI_VERSION of the host */
    uint32_t struct_size;

    /** Log a line. `msg` is copied; valid for the call only. */
    void (*log)(int32_t level, const char *plugin_name, const char *msg);
    /** Describe the error the current call is about to return (thread-local, copied). */
    void (*set_error)(const char *msg);

    /** 64-byte aligned allocation; NULL on failure. Free with host->free. */
    void *(*alloc)(size_t bytes);
    void (*free)(void *ptr);

    /** Seed a random stream: (seed, stream id) -> independent streams. */
    void (*rng_init)(vqmoe_rng *rng, uint64_t seed, uint64_t stream);
    uint64_t (*rng_next_u64)(vqmoe_rng *rng);
    /** Uniform in [0, 1). */
    float (*rng_uniform)(vqmoe_rng *rng);
    /** Standard normal N(0, 1). */
    float (*rng_normal)(vqmoe_rng *rng);

    /**
     * Row-major single-precision GEMM: C = alpha * op(A) @ op(B) + beta * C, with
     * op(A) (M,K), op(B) (K,N), C (M,N); trans_* is VQMOE_NO_TRANS / VQMOE_TRANS;
     * lda/ldb/ldc are row strides in elements. Uses the host's threads: never call it from
     * inside a parallel_for body.
     */
    void (*sgemm)(int32_t trans_a, int32_t trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                  int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

    /**
     * Scratch memory, 64-byte aligned, valid until the plugin call that requested it
     * returns (the host frees it then). NULL on failure. Not for memory kept in ctx.
     * Request it from the thread that entered the plugin, not inside a parallel_for body.
     */
    void *(*scratch)(size_t bytes);

    /**
     * Run fn(user, begin, end) over [0, n) on the host's pool, in chunks of at least
     * `grain` items; returns when all are done. Nested calls run serially.
     */
    void (*parallel_for)(int64_t n, int64_t grain, void *user, vqmoe_parallel_fn fn);

    /** Threads in the host's pool (>= 1). */
    int32_t num_threads;

    /* ABI 1.3 (check struct_size before use; absent = one process). */
    /** Ranks of the run (1 in one process) and this process's rank in [0, num_ranks). */
    int32_t num_ranks;
    int32_t rank;
    /** buf[i] = the sum over every rank of buf[i], in place (collective; see "Batch statistics"). */
    int32_t (*allreduce_sum_f64)(double *buf, int64_t n);
    int32_t (*allreduce_sum_f32)(float *buf, int64_t n);
    /**
     * The `bytes` bytes of `send` of every rank, concatenated in rank order into `recv`, which has
     * room for `recv_capacity` bytes (collective; ranks may send different counts). `rank_bytes`
     * (num_ranks) receives each rank's count, or is NULL. When the total exceeds any rank's
     * capacity, every rank gets VQMOE_ERR_INVALID_ARGUMENT and nothing is copied: size `recv`
     * from an allreduce of the counts first.
     */
    int32_t (*allgather)(const void *send, int64_t bytes, void *recv, int64_t recv_capacity, int64_t *rank_bytes);
} vqmoe_host_api;

/* ------------------------------------------------------------------ create info */

/**
 * What the host tells a component about the model it sits in. Fields a kind does not
 * use are 0. Valid during create() only (copy what you keep; `host` stays valid).
 */
typedef struct vqmoe_create_info {
    uint32_t abi_version;
    uint32_t struct_size;
    const vqmoe_host_api *host;
    const char *instance_name; /* e.g. "layers.2.router", for messages */
    uint64_t seed;             /* this instance's seed (distinct per instance) */
    int64_t d_model;           /* router / quantizer / head input width */
    int64_t n_experts;         /* router: E */
    int64_t n_codes;           /* quantizer: the model's K (model.ffn.n_codes, default E); the host
                                  refuses a quantizer whose shape() reports another K */
    int64_t vocab_size;        /* head: LM vocabulary; router: token-id range (0 = none) */
    int64_t n_classes;         /* head: classes */
    int64_t seq_len;           /* dataset / head: tokens per sequence */
    int64_t total_steps;       /* planned training steps (schedules, SMoE-Dropout) */
    const char *data_root;     /* dataset: directory holding the shared data ("" if none) */
    /** ABI 1.2: bytes from one vqmoe_buffer_binding to the next in bind_buffers() (keep it for
     *  that call; see vqmoe_binding_at). */
    uint32_t binding_size;
} vqmoe_create_info;

/* ------------------------------------------------------------------ buffers */
#define VQMOE_BUF_PARAM 1 /* trainable: gets a gradient buffer, updated by the optimizer */
#define VQMOE_BUF_STATE 2 /* not trainable, saved in checkpoints (EMA counts, flags, ...) */

#define VQMOE_BUF_NO_DECAY  0x1u /* PARAM: exclude from weight decay */
/* PARAM: frozen by `vqmoe finetune` when the config has no finetune.freeze list (the default
 * freezes the router and the quantizer, plus every buffer with this flag); an explicit
 * finetune.freeze list decides alone */
#define VQMOE_BUF_FREEZE_FT 0x2u

#define VQMOE_MAX_DIMS 6

/** A buffer the plugin needs, stated by buffer_spec(); the host allocates it. */
typedef struct vqmoe_buffer_spec {
    uint32_t struct_size;
    const char *name;  /* e.g. "weight", "codebook", "ema_count" (static storage) */
    int32_t role;      /* VQMOE_BUF_PARAM / VQMOE_BUF_STATE */
    uint32_t flags;    /* VQMOE_BUF_* flags */
    vqmoe_dtype dtype; /* float32 for PARAM; STATE may be float32, int64, ... */
    int32_t ndim;
    int64_t shape[VQMOE_MAX_DIMS];
} vqmoe_buffer_spec;

/** Host memory for buffer i: `data` always, `grad` for PARAM (NULL for STATE or frozen). */
typedef struct vqmoe_buffer_binding {
    void *data;
    float *grad;
} vqmoe_buffer_binding;

/* ------------------------------------------------------------------ per-step info */
#define VQMOE_STEP_TRAIN     0x1u /* training mode (dropout, EMA updates, saved context) */
#define VQMOE_STEP_NO_GRAD   0x2u /* no backward will follow: do not save a context */
/* fine-tuning with this component frozen: no state updates, no parameter gradients */
#define VQMOE_STEP_FROZEN    0x4u
/* quantizer: output the straight-through SURROGATE as `quantized` -- the same computation with
 * the code lookup replaced by the identity -- so the host can check the backward of `quantized`
 * by finite differences (gradcheck only; codes and loss stay as usual) */
#define VQMOE_STEP_SURROGATE 0x8u

/**
 * Passed to every forward and to begin_step. Everything step-dependent (k schedules,
 * stage switches, random numbers) must follow from these fields so resume is exact.
 */
typedef struct vqmoe_step_info {
    uint32_t struct_size;
    uint32_t flags;      /* VQMOE_STEP_* */
    int64_t step;        /* 0-based optimizer step being computed */
    int64_t total_steps; /* planned steps of this run */
    uint64_t seed;       /* per (instance, step, call) seed: host->rng_init(&r, seed, stream) */
    /** ABI 1.3 (check struct_size): this rank's first token in the global batch, and the global
     *  batch's tokens (0 and N in one process; both 0 in begin_step). Per-token randomness drawn
     *  from the global token index (token_offset + t) does not depend on how many ranks share
     *  the batch. */
    int64_t token_offset;
    int64_t global_tokens;
} vqmoe_step_info;

/** The size of an ABI 1.0-1.2 step info (before token_offset): the least a plugin accepts. */
#define VQMOE_STEP_INFO_1_0_SIZE ((uint32_t)offsetof(vqmoe_step_info, token_offset))

/* ------------------------------------------------------------------ the instance */
typedef struct vqmoe_instance vqmoe_instance; /* opaque; defined by each plugin */

/* ================================================================== ROUTER */
#define VQMOE_ROUTE_TOPK  1 /* sparse: expert index + weight per (token, slot) */
#define VQMOE_ROUTE_DENSE 2 /* SoftMoE: dispatch/combine over E*S slots per group */

/**
 * Router forward input. x: (N,d) float32. token_ids: (N) int32, or absent (data NULL)
 * when the model has no token ids at this layer. Tokens are grouped: N = n_groups *
 * group_size (a group is one sequence / image; dense routers normalise within it).
 */
typedef struct vqmoe_router_input {
    uint32_t struct_size;
    vqmoe_tensor x;
    vqmoe_tensor token_ids;
    int64_t n_groups;
    int64_t group_size;
} vqmoe_router_input;

/**
 * Router forward output, allocated by the host.
 * TOPK:  expert_index (N,k) int32, weights (N,k) float32 (k from router_shape()).
 * DENSE: dispatch (N, E*S) float32 (softmax over the tokens of a group, per slot),
 *        combine (N, E*S) float32 (softmax over the slots, per token).
 * aux_loss: the router's weighted auxiliary loss (e.g. 0.01 * balance), added by the
 * host to the total loss as is. expert_load: (E) float32, tokens (or dispatch mass)
 * per expert in this batch, for reports.
 */
typedef struct vqmoe_router_output {
    uint32_t struct_size;
    vqmoe_tensor expert_index;
    vqmoe_tensor weights;
    vqmoe_tensor dispatch;
    vqmoe_tensor combine;
    vqmoe_tensor expert_load;
    float aux_loss;
} vqmoe_router_output;

/** Router backward input: dL/d(outputs). Absent tensors (data NULL) are zero. */
typedef struct vqmoe_router_grad_in {
    uint32_t struct_size;
    vqmoe_tensor grad_weights;  /* TOPK (N,k) */
    vqmoe_tensor grad_dispatch; /* DENSE (N,E*S) */
    vqmoe_tensor grad_combine;  /* DENSE (N,E*S) */
    float grad_aux_loss;        /* dL/d(aux_loss), normally 1 */
} vqmoe_router_grad_in;

/** Router backward output: grad_x (N,d), accumulated (+=). */
typedef struct vqmoe_router_grad_out {
    uint32_t struct_size;
    vqmoe_tensor grad_x;
} vqmoe_router_grad_out;

/** Shape of the router's output for this step (k may change per step). */
typedef struct vqmoe_router_shape {
    uint32_t struct_size;
    int32_t mode;             /* VQMOE_ROUTE_TOPK / VQMOE_ROUTE_DENSE */
    int32_t k;                /* TOPK: experts per token this step */
    int32_t slots_per_expert; /* DENSE: S */
} vqmoe_router_shape;

typedef struct vqmoe_router_api {
    uint32_t struct_size;
    /** Output shape for this step. Called before each forward. */
    int32_t (*shape)(vqmoe_instance *inst, const vqmoe_step_info *step, vqmoe_router_shape *out);
    /** Fill `out` (host-allocated per shape()). May save a context in *ctx (see top). */
    int32_t (*forward)(vqmoe_instance *inst, const vqmoe_step_info *step, const vqmoe_router_input *in,
                       vqmoe_router_output *out, void **ctx);
    /** Accumulate grad_x and parameter gradients. Does not free ctx. */
    int32_t (*backward)(vqmoe_instance *inst, void *ctx, const vqmoe_router_grad_in *gin, vqmoe_router_grad_out *gout);
    /** Release a context saved by forward (called exactly once per non-NULL ctx). */
    void (*free_ctx)(vqmoe_instance *inst, void *ctx);
} vqmoe_router_api;

/* ================================================================== QUANTIZER */

/** Static facts about a quantizer instance. */
typedef struct vqmoe_quantizer_shape {
    uint32_t struct_size;
    int64_t codebook_size;   /* K: codes are in [0, K) */
    int32_t codes_per_token; /* L: 1, or the number of levels of a residual quantizer */
} vqmoe_quantizer_shape;

/** Quantizer forward input: x (N,d) float32. */
typedef struct vqmoe_quantizer_input {
    uint32_t struct_size;
    vqmoe_tensor x;
} vqmoe_quantizer_input;

/**
 * Quantizer forward output, allocated by the host.
 * quantized: (N,d) float32, the quantized vector in x's space (after any projection back).
 *   Its backward is the straight-through estimator: the exact gradient of the SURROGATE
 *   in which the code lookup is replaced by the identity (plain VQ: grad_x += grad_q;
 *   projected quantizers: through both projections). VQMOE_STEP_SURROGATE asks forward
 *   for that surrogate's value, which is how gradcheck verifies this backward.
 * codes: (N,L) int32 in [0, K). code_counts: (K) float32, how often each code was used.
 * loss: the UNWEIGHTED quantizer loss (codebook + commitment, entropy terms, ...);
 * the host multiplies it by beta.
 */
typedef struct vqmoe_quantizer_output {
    uint32_t struct_size;
    vqmoe_tensor quantized;
    vqmoe_tensor codes;
    vqmoe_tensor code_counts;
    float loss;
} vqmoe_quantizer_output;

typedef struct vqmoe_quantizer_grad_in {
    uint32_t struct_size;
    vqmoe_tensor grad_quantized; /* (N,d), absent = zero */
    float grad_loss;             /* dL/d(loss), i.e. beta */
} vqmoe_quantizer_grad_in;

typedef struct vqmoe_quantizer_grad_out {
    uint32_t struct_size;
    vqmoe_tensor grad_x; /* (N,d), accumulated (+=) */
} vqmoe_quantizer_grad_out;

typedef struct vqmoe_quantizer_api {
    uint32_t struct_size;
    int32_t (*shape)(vqmoe_instance *inst, vqmoe_quantizer_shape *out);
    /** In train mode may update state buffers (EMA, k-means init) unless STEP_FROZEN. */
    int32_t (*forward)(vqmoe_instance *inst, const vqmoe_step_info *step, const vqmoe_quantizer_input *in,
                       vqmoe_quantizer_output *out, void **ctx);
    int32_t (*backward)(vqmoe_instance *inst, void *ctx, const vqmoe_quantizer_grad_in *gin,
                        vqmoe_quantizer_grad_out *gout);
    void (*free_ctx)(vqmoe_instance *inst, void *ctx);
} vqmoe_quantizer_api;

/* ================================================================== DATASET */
#define VQMOE_TASK_LM              1 /* inputs (B,T) int32 tokens, targets (B,T) next tokens */
#define VQMOE_TASK_CLASSIFY_TOKENS 2 /* inputs (B,T) int32, targets (B) class */
#define VQMOE_TASK_CLASSIFY_IMAGE  3 /* inputs (B,C,H,W) float32, targets (B) class */

#define VQMOE_SPLIT_TRAIN 0
#define VQMOE_SPLIT_VALID 1
#define VQMOE_SPLIT_TEST  2

#define VQMOE_PAD_TARGET (-1) /* a target the loss ignores */

typedef struct vqmoe_dataset_info {
    uint32_t struct_size;
    int32_t task;        /* VQMOE_TASK_* */
    int64_t vocab_size;  /* token tasks */
    int64_t n_classes;   /* classification tasks */
    int32_t sample_ndim; /* dims of one input sample: 1 (T) or 3 (C,H,W) */
    int64_t sample_shape[4];
    int64_t split_size[3]; /* tokens (LM) or examples, per split */
    /** ABI 1.1. Nonzero: every split is served as `batch_size` parallel streams in order —
     *  row b of batch i+1 continues row b of batch i (segment recurrence, Transformer-XL
     *  memory). The host zero-fills the struct; write this only when struct_size covers it
     *  (offsetof(vqmoe_dataset_info, streams) + 4 <= struct_size). */
    int32_t streams;
} vqmoe_dataset_info;

/**
 * Batch request. The cursor is the host's: a batch is a pure function of
 * (instance seed, split, index, batch_size), so seeking is just asking for another index
 * and resuming needs no dataset state. Train batches are sampled (any index is valid);
 * valid/test batches walk the split in order and return VQMOE_ERR_END_OF_DATA past the
 * end (see num_batches).
 */
typedef struct vqmoe_batch_request {
    uint32_t struct_size;
    int32_t split;
    int64_t index;
    int64_t batch_size;
} vqmoe_batch_request;

/**
 * Batch output, allocated by the host from dataset_info: inputs (B, sample_shape...),
 * targets (B,T) or (B) int32. A final partial eval batch pads with VQMOE_PAD_TARGET
 * targets; `rows` says how many samples are real.
 */
typedef struct vqmoe_batch {
    uint32_t struct_size;
    vqmoe_tensor inputs;
    vqmoe_tensor targets;
    int64_t rows;
    /** (B) int32: real (unpadded) tokens of each sample for VQMOE_TASK_CLASSIFY_TOKENS (the
     *  rest of the row is padding); absent (data NULL) for other tasks. */
    vqmoe_tensor lengths;
} vqmoe_batch;

typedef struct vqmoe_dataset_api {
    uint32_t struct_size;
    int32_t (*info)(vqmoe_instance *inst, vqmoe_dataset_info *out);
    /** Batches in an ordered pass over a split (valid/test); train: INT64_MAX. */
    int32_t (*num_batches)(vqmoe_instance *inst, int32_t split, int64_t batch_size, int64_t *out);
    int32_t (*read_batch)(vqmoe_instance *inst, const vqmoe_batch_request *req, vqmoe_batch *out);
} vqmoe_dataset_api;

/* ================================================================== HEAD */

/** Head input: h (B,T,d) float32 hidden states; targets (B,T) or (B) int32. */
typedef struct vqmoe_head_input {
    uint32_t struct_size;
    vqmoe_tensor h;
    vqmoe_tensor targets; /* absent: logits only, no loss */
    /** (B) int32: real tokens of each sequence (pooled heads ignore the padding after them);
     *  absent when every position is real (LM batches, images). */
    vqmoe_tensor lengths;
} vqmoe_head_input;

/**
 * Head output (host-allocated): logits (rows, n_out) float32, where rows = B*T for a
 * per-token head and B for a pooled head (see vqmoe_head_shape). loss: mean cross-entropy
 * in nats over non-pad targets; loss_sum / count / correct let the host aggregate an
 * evaluation over many batches exactly.
 */
typedef struct vqmoe_head_output {
    uint32_t struct_size;
    vqmoe_tensor logits;
    float loss;
    double loss_sum;
    int64_t count;
    int64_t correct;
} vqmoe_head_output;

typedef struct vqmoe_head_grad_in {
    uint32_t struct_size;
    float grad_loss; /* dL/d(loss), normally 1 */
} vqmoe_head_grad_in;

typedef struct vqmoe_head_grad_out {
    uint32_t struct_size;
    vqmoe_tensor grad_h; /* (B,T,d), accumulated (+=) */
} vqmoe_head_grad_out;

typedef struct vqmoe_head_shape {
    uint32_t struct_size;
    int32_t per_token; /* 1: one prediction per token (LM); 0: one per sequence */
    int64_t n_out;     /* vocabulary or classes */
    int32_t is_lm;     /* 1: report bits-per-token and perplexity from the loss */
} vqmoe_head_shape;

typedef struct vqmoe_head_api {
    uint32_t struct_size;
    int32_t (*shape)(vqmoe_instance *inst, vqmoe_head_shape *out);
    int32_t (*forward)(vqmoe_instance *inst, const vqmoe_step_info *step, const vqmoe_head_input *in,
                       vqmoe_head_output *out, void **ctx);
    int32_t (*backward)(vqmoe_instance *inst, void *ctx, const vqmoe_head_grad_in *gin, vqmoe_head_grad_out *gout);
    void (*free_ctx)(vqmoe_instance *inst, void *ctx);
} vqmoe_head_api;

/* ================================================================== optional features */

/**
 * "vqmoe.metrics/1": named scalars and vectors for logs and reports (code usage, the
 * current temperature, the stage of a two-stage router...). The plugin calls the sink
 * during metrics(); names and arrays are copied by the host.
 */
#define VQMOE_FEATURE_METRICS "vqmoe.metrics/1"
typedef struct vqmoe_metric_sink {
    void *user;
    void (*scalar)(void *user, const char *name, double value);
    void (*vector)(void *user, const char *name, const float *values, int64_t n);
} vqmoe_metric_sink;
typedef struct vqmoe_metrics_feature {
    uint32_t struct_size;
    int32_t (*metrics)(vqmoe_instance *inst, const vqmoe_metric_sink *sink);
} vqmoe_metrics_feature;

/**
 * "vqmoe.tokenizer/1" (language-model datasets): text to the dataset's tokens and back, so a
 * trained model can be prompted and sampled (`vqmoe sample`) and can score any text file
 * (`vqmoe eval --text`) with the vocabulary it was trained on. Calls may come at any time
 * after create (no buffers needed) and are not concurrent with other calls on the instance.
 *
 * encode: the tokens of the UTF-8 bytes text[0, n_bytes), tokenised exactly as the dataset
 *   tokenises its files (words outside the vocabulary become its unknown token). Writes
 *   min(count, capacity) ids to out (out may be NULL when capacity is 0) and sets *n_tokens to
 *   the count, so a call with capacity 0 sizes the buffer. Text the vocabulary cannot express
 *   (a byte outside text8's a-z and space) is VQMOE_ERR_INVALID_ARGUMENT with set_error
 *   naming the byte and its offset. The host owns text and out.
 * decode: the UTF-8 bytes of `token` as it continues a text whose last token is `previous`
 *   (-1 at the start of a text), so that concatenating the pieces of a token sequence gives
 *   readable text: a byte-level vocabulary gives the byte; a word-level one gives " word",
 *   "word" at the start or after an end of line, and "\n" for its end-of-line token. Writes
 *   min(length, capacity) bytes to out (no NUL) and sets *n_bytes to the length.
 * unit: what a token is, for reports: VQMOE_TEXT_UNIT_CHAR (bits per character) or
 *   VQMOE_TEXT_UNIT_WORD (perplexity per word).
 */
#define VQMOE_FEATURE_TOKENIZER "vqmoe.tokenizer/1"
#define VQMOE_TEXT_UNIT_CHAR    1
#define VQMOE_TEXT_UNIT_WORD    2
typedef struct vqmoe_tokenizer_feature {
    uint32_t struct_size;
    int32_t (*unit)(vqmoe_instance *inst);
    int32_t (*encode)(vqmoe_instance *inst, const char *text, int64_t n_bytes, int32_t *out, int64_t capacity,
                      int64_t *n_tokens);
    int32_t (*decode)(vqmoe_instance *inst, int32_t token, int32_t previous, char *out, int64_t capacity,
                      int64_t *n_bytes);
} vqmoe_tokenizer_feature;

/* ================================================================== descriptor */
/* router: may read vqmoe_router_input.token_ids (the host passes them whenever the model has
 * tokens; a plugin whose configuration needs them refuses absent ones itself) */
#define VQMOE_PLUGIN_NEEDS_TOKEN_IDS 0x1u
/* has no backward (non-trainable, no input grad) */
#define VQMOE_PLUGIN_NO_GRAD         0x2u
/* quantizer: the loss has stop-gradient terms (VQ-VAE's ||sg(x) - q||^2 + g*||x - sg(q)||^2), so
 * its backward is not the derivative of its value; gradcheck then compares the DIRECTION of each
 * loss gradient with finite differences (cosine similarity) instead of its values */
#define VQMOE_PLUGIN_STOPGRAD_LOSS   0x4u
/* computes its batch statistics over the global batch with the host's collectives (ABI 1.3; see
 * "Batch statistics" at the top): its loss is the same on every rank */
#define VQMOE_PLUGIN_GLOBAL_BATCH    0x8u

/**
 * What vqmoe_plugin_entry returns: static, owned by the plugin, valid while loaded.
 * `kind_api` points at the vqmoe_<kind>_api struct of `kind`.
 */
typedef struct vqmoe_plugin_desc {
    uint32_t abi_version; /* VQMOE_ABI_VERSION the plugin was built against */
    uint32_t struct_size; /* sizeof(vqmoe_plugin_desc) */
    int32_t kind;         /* VQMOE_KIND_* */
    uint32_t flags;       /* VQMOE_PLUGIN_* */
    const char *name;     /* registry name, lower_snake_case */
    const char *version;  /* semver of the plugin itself, e.g. "1.0.0" */
    const char *description;
    const vqmoe_hparam_spec *hparams;
    int32_t n_hparams;

    /**
     * Create an instance. `info` and `hp` are valid during the call only; on success
     * *out is owned by the host until destroy(). On error return a status, set
     * host->set_error, leave *out NULL.
     */
    int32_t (*create)(const vqmoe_create_info *info, const vqmoe_hparams *hp, vqmoe_instance **out);
    /** Free an instance and any contexts it still owns. NULL-safe. */
    void (*destroy)(vqmoe_instance *inst);

    /** Declared buffers: the count, then the spec of each (0 <= i < count). */
    int32_t (*num_buffers)(vqmoe_instance *inst);
    int32_t (*buffer_spec)(vqmoe_instance *inst, int32_t i, vqmoe_buffer_spec *out);
    /** Bind host memory for all buffers (n == num_buffers), before any other call. */
    int32_t (*bind_buffers)(vqmoe_instance *inst, const vqmoe_buffer_binding *bindings, int32_t n);
    /** Write initial values into the bound buffers (fresh runs; skipped on resume). */
    int32_t (*init_buffers)(vqmoe_instance *inst, uint64_t seed);
    /** Optional (may be NULL): called once at the start of each training step. */
    int32_t (*begin_step)(vqmoe_instance *inst, const vqmoe_step_info *step);
    /** Optional (may be NULL): a feature struct by string id, or NULL. */
    const void *(*get_feature)(const char *id);

    /** vqmoe_router_api / vqmoe_quantizer_api / vqmoe_dataset_api / vqmoe_head_api. */
    const void *kind_api;

    /** ABI 1.2: sizeof(vqmoe_hparam_spec) as the plugin was built (0 = the 1.0 size). */
    uint32_t hparam_spec_size;
} vqmoe_plugin_desc;

/**
 * The entry symbol (VQMOE_ENTRY_SYMBOL). Called once after dlopen. Return NULL to refuse
 * the host (e.g. other ABI major; say why with host->log). `host` stays valid.
 */
typedef const vqmoe_plugin_desc *(*vqmoe_plugin_entry_fn)(const vqmoe_host_api *host);

/* ================================================================== helpers (inline) */

/** float32 dtype. */
static inline vqmoe_dtype vqmoe_f32(void) {
    vqmoe_dtype d = {VQMOE_DTYPE_FLOAT, 32, 1};
    return d;
}
/** int32 dtype. */
static inline vqmoe_dtype vqmoe_i32(void) {
    vqmoe_dtype d = {VQMOE_DTYPE_INT, 32, 1};
    return d;
}
/** int64 dtype. */
static inline vqmoe_dtype vqmoe_i64(void) {
    vqmoe_dtype d = {VQMOE_DTYPE_INT, 64, 1};
    return d;
}

/** Number of elements of a tensor view. */
static inline int64_t vqmoe_numel(const vqmoe_tensor *t) {
    int64_t n = 1;
    for (int32_t i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

/** 1 when the tensor is contiguous float32 (what version-1 plugins may assume). */
static inline int vqmoe_is_f32(const vqmoe_tensor *t) {
    return t->data != NULL && t->dtype.code == VQMOE_DTYPE_FLOAT && t->dtype.bits == 32 && t->dtype.lanes == 1 &&
           t->strides == NULL;
}

/** 1 when the tensor is contiguous int32. */
static inline int vqmoe_is_i32(const vqmoe_tensor *t) {
    return t->data != NULL && t->dtype.code == VQMOE_DTYPE_INT && t->dtype.bits == 32 && t->dtype.lanes == 1 &&
           t->strides == NULL;
}

/** Element i of hp->values, stepping by hp->value_size (ABI 1.2; the 1.0 size before). */
static inline const vqmoe_hparam_value *vqmoe_hp_at(const vqmoe_hparams *hp, int32_t i) {
    size_t size = sizeof(vqmoe_hparam_value);
    if (hp->struct_size >= offsetof(vqmoe_hparams, value_size) + sizeof(uint32_t) && hp->value_size != 0)
        size = hp->value_size;
    return (const vqmoe_hparam_value *)((const char *)hp->values + (size_t)i * size);
}

/** Binding i of bind_buffers(), stepping by the create info's binding_size (0 = the 1.0 size). */
static inline const vqmoe_buffer_binding *vqmoe_binding_at(const vqmoe_buffer_binding *bindings, int32_t i,
                                                           uint32_t binding_size) {
    size_t size = binding_size != 0 ? binding_size : sizeof(vqmoe_buffer_binding);
    return (const vqmoe_buffer_binding *)((const char *)bindings + (size_t)i * size);
}

/** The create info's binding_size, or 0 when the host predates ABI 1.2. */
static inline uint32_t vqmoe_binding_size(const vqmoe_create_info *info) {
    return info->struct_size >= offsetof(vqmoe_create_info, binding_size) + sizeof(uint32_t) ? info->binding_size : 0;
}

/** Find a hyperparameter by name; NULL when absent. */
static inline const vqmoe_hparam_value *vqmoe_hp_find(const vqmoe_hparams *hp, const char *name) {
    if (hp == NULL) return NULL;
    for (int32_t i = 0; i < hp->count; i++) {
        const vqmoe_hparam_value *v = vqmoe_hp_at(hp, i);
        if (strcmp(v->name, name) == 0) return v;
    }
    return NULL;
}
static inline int64_t vqmoe_hp_int(const vqmoe_hparams *hp, const char *name, int64_t fallback) {
    const vqmoe_hparam_value *v = vqmoe_hp_find(hp, name);
    return v ? v->int_value : fallback;
}
static inline double vqmoe_hp_float(const vqmoe_hparams *hp, const char *name, double fallback) {
    const vqmoe_hparam_value *v = vqmoe_hp_find(hp, name);
    return v ? v->float_value : fallback;
}
static inline int vqmoe_hp_bool(const vqmoe_hparams *hp, const char *name, int fallback) {
    const vqmoe_hparam_value *v = vqmoe_hp_find(hp, name);
    return v ? (v->int_value != 0) : fallback;
}
static inline const char *vqmoe_hp_string(const vqmoe_hparams *hp, const char *name, const char *fallback) {
    const vqmoe_hparam_value *v = vqmoe_hp_find(hp, name);
    return v && v->string_value ? v->string_value : fallback;
}

/** Export the entry point with C linkage and default visibility. */
#if defined(_WIN32)
#define VQMOE_EXPORT __declspec(dllexport)
#else
#define VQMOE_EXPORT __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
}
#endif

#endif /* VQMOE_PLUGIN_H */
