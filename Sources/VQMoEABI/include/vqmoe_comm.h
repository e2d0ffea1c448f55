/*
 * vqmoe_comm.h -- the interface of a communication backend: the library the host loads at run
 * time when a run spans several processes (`mpirun -np N vqmoe train ...`, or `srun` under
 * Slurm). The first backend is Open MPI (Plugins/CommMPI, libvqmoe_comm_mpi.so); another (Gloo,
 * NCCL, ...) is another library exporting `vqmoe_comm_entry`, not a change to the host.
 *
 * Rules:
 *   - The host makes every call from one thread (its communication thread), start included; a
 *     backend needs no more than MPI_THREAD_FUNNELED.
 *   - Every call but start, rank_name and abort is collective: all ranks make it, in the same
 *     order. Buffers are the caller's; nothing is kept after a call returns.
 *   - Counts are in bytes (or elements for the reductions) and may be 0. A failure returns a
 *     nonzero status and describes itself in error_text(); the host then aborts the job.
 *   - Sums are deterministic: the same inputs on the same ranks give the same bits on every
 *     rank, run after run.
 */
#ifndef VQMOE_COMM_H
#define VQMOE_COMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define VQMOE_COMM_ABI_VERSION 1u

/** Element types of the reductions. */
#define VQMOE_COMM_F32 1
#define VQMOE_COMM_F64 2

/** Name of the one symbol a backend library exports. */
#define VQMOE_COMM_ENTRY_SYMBOL "vqmoe_comm_entry"

typedef struct vqmoe_comm_api {
    uint32_t abi_version; /* VQMOE_COMM_ABI_VERSION */
    uint32_t struct_size; /* sizeof(vqmoe_comm_api) */
    const char *name;     /* e.g. "openmpi" */

    /** Join the job: *rank in [0, *size). Called once, before anything else. */
    int32_t (*start)(int32_t *rank, int32_t *size);
    /** Leave the job (after the last collective). */
    int32_t (*finish)(void);

    /** buf[i] = sum over the ranks of buf[i], `count` elements of `dtype`, in place. */
    int32_t (*allreduce_sum)(void *buf, int64_t count, int32_t dtype);
    /** recv = every rank's send (rank_bytes[r] bytes from rank r) at displs[r], in rank order. */
    int32_t (*allgatherv)(const void *send, int64_t bytes, void *recv, const int64_t *rank_bytes,
                          const int64_t *displs);
    /** Rank r sends send_bytes[q] bytes from send + send_displs[q] to every rank q and receives
     *  recv_bytes[q] bytes from rank q at recv + recv_displs[q]. */
    int32_t (*alltoallv)(const void *send, const int64_t *send_bytes, const int64_t *send_displs, void *recv,
                         const int64_t *recv_bytes, const int64_t *recv_displs);
    /** `bytes` bytes of root's buf to every rank's buf. */
    int32_t (*broadcast)(void *buf, int64_t bytes, int32_t root);
    int32_t (*barrier)(void);
    /** End every process of the job with `code` (not collective; does not return). */
    void (*abort)(int32_t code);
    /** The description of the last failure (static storage of the backend). */
    const char *(*error_text)(void);
    /** This process's host name (for messages). */
    const char *(*rank_name)(void);
} vqmoe_comm_api;

typedef const vqmoe_comm_api *(*vqmoe_comm_entry_fn)(void);

#ifdef __cplusplus
}
#endif

#endif /* VQMOE_COMM_H */
