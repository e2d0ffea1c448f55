/*
 * my_dataset -- a vqmoe dataset plugin in C: byte-level language modelling over one file.
 * `vqmoe plugin new dataset NAME` copies this folder with your NAME; it builds (./build.sh) and
 * passes `vqmoe plugins check` as it is. Put your own method where it says ">>> YOUR METHOD".
 *
 * The file is hyperparameter `path` (default $DATA/enwik8-mini/enwik8-mini; the host expands $DATA
 * and $ROOT); vocabulary = the 256 byte values; splits 90/5/5 of the file.
 *   train:      batch `index` = batch_size random windows of seq_len + 1 bytes, their starts drawn
 *               from the host stream (instance seed, stream = index)
 *   valid/test: consecutive windows in order; the last batch may be partial (targets padded with
 *               VQMOE_PAD_TARGET, `rows` = real windows); an index past the end is END_OF_DATA
 * A batch is a pure function of (seed, split, index, batch_size): no cursor, no state.
 */
#include <errno.h>

#include "vqmoe_plugin.h"
#include "vqmoe_plugin_helpers.h"

struct vqmoe_instance {
    vqmoe_base base;          /* first: host, name, seed, seq_len */
    unsigned char *bytes;     /* the whole file (host->alloc; freed by release) */
    int64_t start[3], len[3]; /* split offsets and lengths in bytes */
};

static const vqmoe_hparam_spec hparams[] = {
    VQMOE_HPARAM_PATH("path", "$DATA/enwik8-mini/enwik8-mini", "text file to model byte by byte"),
};

static void release(vqmoe_instance *ds) {
    ds->base.host->free(ds->bytes);
}

static int32_t setup(vqmoe_instance *ds, const vqmoe_create_info *info, const vqmoe_hparams *hp) {
    /* >>> YOUR METHOD: read and tokenize your own format */
    const char *path = vqmoe_hp_string(hp, "path", "");
    const vqmoe_host_api *host = ds->base.host;
    ds->base.release = release;
    FILE *f = fopen(path, "rb");
    if (f == NULL) return vqmoe_fail(host, VQMOE_ERR_IO, "cannot open %s: %s (set `path`)", path, strerror(errno));
    const long size = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
    ds->bytes = size >= 0 && fseek(f, 0, SEEK_SET) == 0 ? host->alloc((size_t)size + 1) : NULL;
    const int ok = ds->bytes != NULL && fread(ds->bytes, 1, (size_t)size, f) == (size_t)size;
    fclose(f);
    if (!ok) return vqmoe_fail(host, VQMOE_ERR_IO, "cannot read %s (not a regular file, or out of memory)", path);
    const int64_t n = size, train_end = n * 90 / 100, valid_end = n * 95 / 100; /* 90/5/5 */
    ds->start[0] = 0, ds->len[0] = train_end;
    ds->start[1] = train_end, ds->len[1] = valid_end - train_end;
    ds->start[2] = valid_end, ds->len[2] = n - valid_end;
    if (info->seq_len < 1 || train_end < info->seq_len + 1)
        return vqmoe_fail(host, VQMOE_ERR_IO, "%s: %s has %lld bytes; the train split needs seq_len + 1 = %lld",
                          ds->base.name, path, (long long)n, (long long)(info->seq_len + 1));
    return VQMOE_OK;
}
VQMOE_DEFINE_CREATE(create, setup)

static int32_t info(vqmoe_instance *ds, vqmoe_dataset_info *out) {
    out->task = VQMOE_TASK_LM; /* >>> YOUR METHOD: VQMOE_TASK_CLASSIFY_TOKENS / _IMAGE */
    out->vocab_size = 256;
    out->sample_ndim = 1;
    out->sample_shape[0] = ds->base.seq_len;
    for (int s = 0; s < 3; s++) out->split_size[s] = ds->len[s];
    return VQMOE_OK;
}

/* Ordered windows of an eval split: each needs seq_len inputs plus one more byte for the last target. */
static int64_t eval_windows(const vqmoe_instance *ds, int32_t split) {
    return ds->len[split] > ds->base.seq_len ? (ds->len[split] - 1) / ds->base.seq_len : 0;
}

static int32_t num_batches(vqmoe_instance *ds, int32_t split, int64_t batch_size, int64_t *out) {
    if (split < 0 || split > 2 || batch_size < 1)
        return vqmoe_fail(ds->base.host, VQMOE_ERR_INVALID_ARGUMENT, "%s: bad split %d or batch size %lld",
                          ds->base.name, (int)split, (long long)batch_size);
    *out = split == VQMOE_SPLIT_TRAIN ? INT64_MAX : (eval_windows(ds, split) + batch_size - 1) / batch_size;
    return VQMOE_OK;
}

static int32_t read_batch(vqmoe_instance *ds, const vqmoe_batch_request *req, vqmoe_batch *out) {
    vqmoe_batch_io io;
    const int64_t t = ds->base.seq_len;
    VQMOE_TRY(vqmoe_batch_begin(ds, t, 1, req, out, &io));
    const unsigned char *bytes = ds->bytes + ds->start[io.split];
    const int64_t windows = eval_windows(ds, io.split), first = io.index * io.batch;
    if (io.split != VQMOE_SPLIT_TRAIN && first >= windows)
        return vqmoe_fail(ds->base.host, VQMOE_ERR_END_OF_DATA, "%s: batch %lld is past the end of split %d",
                          ds->base.name, (long long)io.index, (int)io.split);
    vqmoe_rng rng;
    ds->base.host->rng_init(&rng, ds->base.seed, (uint64_t)io.index); /* stream = batch index */
    out->rows = io.split == VQMOE_SPLIT_TRAIN ? io.batch : (windows - first < io.batch ? windows - first : io.batch);
    for (int64_t r = 0; r < io.batch; r++) {
        /* train: a start in [0, len - t - 1]; eval: the next window in order */
        const int64_t at = io.split == VQMOE_SPLIT_TRAIN
                               ? (int64_t)(ds->base.host->rng_next_u64(&rng) % (uint64_t)(ds->len[0] - t))
                               : (first + r) * t;
        for (int64_t i = 0; i < t; i++) {
            io.inputs[r * t + i] = r < out->rows ? bytes[at + i] : 0;
            io.targets[r * t + i] = r < out->rows ? bytes[at + i + 1] : VQMOE_PAD_TARGET;
        }
    }
    return VQMOE_OK;
}

static const vqmoe_dataset_api api = {sizeof api, info, num_batches, read_batch};

static const vqmoe_plugin_desc desc = {
    VQMOE_DESC(VQMOE_KIND_DATASET, 0, "my_dataset", "1.0.0", "byte-level LM over one file, 90/5/5 split", hparams),
    .create = create,
    VQMOE_BASE_CALLS,
    .init_buffers = vqmoe_base_init_none,
    .kind_api = &api,
};

VQMOE_DEFINE_ENTRY(desc)
