/*
 * comm_mpi.c -- the Open MPI communication backend of vqmoe (libvqmoe_comm_mpi.so), the
 * vqmoe_comm_api of vqmoe_comm.h over MPI_COMM_WORLD. Built outside SwiftPM, so the framework
 * builds and runs in one process without MPI: scripts/build-comm-mpi.sh (called by
 * scripts/setup.sh when Open MPI is installed).
 *
 * The host calls every function from its one communication thread, which also called start:
 * MPI_THREAD_FUNNELED is enough. MPI counts are ints: larger messages are refused with a message.
 * Reductions use MPI_Allreduce, whose result is the same on every rank and, for a fixed number
 * of ranks and message size, the same from run to run.
 */
#include <dlfcn.h>
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vqmoe_comm.h"

static char last_error[512];
static char host_name[MPI_MAX_PROCESSOR_NAME + 1];
static int world_size = 1;

static int32_t fail(const char *what, int code) {
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (code == MPI_SUCCESS || MPI_Error_string(code, text, &len) != MPI_SUCCESS) snprintf(text, sizeof text, "?");
    snprintf(last_error, sizeof last_error, "%s failed: %s", what, code == MPI_SUCCESS ? what : text);
    return 1;
}

static int32_t too_large(const char *what, int64_t n) {
    snprintf(last_error, sizeof last_error, "%s: %lld elements/bytes do not fit an MPI count (int)", what,
             (long long)n);
    return 1;
}

static int32_t comm_start(int32_t *rank, int32_t *size) {
    /* Open MPI's components (shared objects it dlopens) resolve symbols of libmpi: make them global. */
    dlopen("libmpi.so.40", RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
    int provided = 0, r = 0, s = 1, len = 0;
    int code = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
    if (code != MPI_SUCCESS) return fail("MPI_Init_thread", code);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    MPI_Comm_size(MPI_COMM_WORLD, &s);
    MPI_Get_processor_name(host_name, &len);
    world_size = s;
    *rank = r;
    *size = s;
    return 0;
}

static int32_t comm_finish(void) {
    int code = MPI_Finalize();
    return code == MPI_SUCCESS ? 0 : fail("MPI_Finalize", code);
}

static int32_t comm_allreduce_sum(void *buf, int64_t count, int32_t dtype) {
    if (count > INT_MAX) return too_large("allreduce", count);
    if (count == 0) return 0;
    MPI_Datatype t = dtype == VQMOE_COMM_F64 ? MPI_DOUBLE : MPI_FLOAT;
    int code = MPI_Allreduce(MPI_IN_PLACE, buf, (int)count, t, MPI_SUM, MPI_COMM_WORLD);
    return code == MPI_SUCCESS ? 0 : fail("MPI_Allreduce", code);
}

/* int counts and displacements of `n` ranks from int64 ones; 0 on overflow. */
static int to_int(const int64_t *in, int *out, int n) {
    for (int i = 0; i < n; i++) {
        if (in[i] < 0 || in[i] > INT_MAX) return 0;
        out[i] = (int)in[i];
    }
    return 1;
}

static int32_t comm_allgatherv(const void *send, int64_t bytes, void *recv, const int64_t *rank_bytes,
                               const int64_t *displs) {
    int n = world_size, *counts = malloc(sizeof(int) * (size_t)n), *offs = malloc(sizeof(int) * (size_t)n);
    int32_t status = 0;
    if (counts == NULL || offs == NULL)
        status = fail("allgatherv (out of memory)", MPI_SUCCESS);
    else if (bytes > INT_MAX || !to_int(rank_bytes, counts, n) || !to_int(displs, offs, n))
        status = too_large("allgatherv", bytes);
    else {
        int code = MPI_Allgatherv(send, (int)bytes, MPI_BYTE, recv, counts, offs, MPI_BYTE, MPI_COMM_WORLD);
        if (code != MPI_SUCCESS) status = fail("MPI_Allgatherv", code);
    }
    free(counts);
    free(offs);
    return status;
}

static int32_t comm_alltoallv(const void *send, const int64_t *send_bytes, const int64_t *send_displs, void *recv,
                              const int64_t *recv_bytes, const int64_t *recv_displs) {
    int n = world_size;
    int *sc = malloc(sizeof(int) * (size_t)n * 4), *sd = sc + n, *rc = sc + 2 * n, *rd = sc + 3 * n;
    int32_t status = 0;
    if (sc == NULL)
        status = fail("alltoallv (out of memory)", MPI_SUCCESS);
    else if (!to_int(send_bytes, sc, n) || !to_int(send_displs, sd, n) || !to_int(recv_bytes, rc, n) ||
             !to_int(recv_displs, rd, n))
        status = too_large("alltoallv", 0);
    else {
        int code = MPI_Alltoallv(send, sc, sd, MPI_BYTE, recv, rc, rd, MPI_BYTE, MPI_COMM_WORLD);
        if (code != MPI_SUCCESS) status = fail("MPI_Alltoallv", code);
    }
    free(sc);
    return status;
}

static int32_t comm_broadcast(void *buf, int64_t bytes, int32_t root) {
    if (bytes > INT_MAX) return too_large("broadcast", bytes);
    int code = MPI_Bcast(buf, (int)bytes, MPI_BYTE, root, MPI_COMM_WORLD);
    return code == MPI_SUCCESS ? 0 : fail("MPI_Bcast", code);
}

static int32_t comm_barrier(void) {
    int code = MPI_Barrier(MPI_COMM_WORLD);
    return code == MPI_SUCCESS ? 0 : fail("MPI_Barrier", code);
}

static void comm_abort(int32_t code) {
    MPI_Abort(MPI_COMM_WORLD, code);
    exit(code);
}

static const char *comm_error_text(void) {
    return last_error;
}

static const char *comm_rank_name(void) {
    return host_name;
}

static const vqmoe_comm_api api = {
    VQMOE_COMM_ABI_VERSION, sizeof(vqmoe_comm_api), "openmpi",      comm_start,   comm_finish, comm_allreduce_sum,
    comm_allgatherv,        comm_alltoallv,         comm_broadcast, comm_barrier, comm_abort,  comm_error_text,
    comm_rank_name,
};

__attribute__((visibility("default"))) const vqmoe_comm_api *vqmoe_comm_entry(void) {
    return &api;
}
