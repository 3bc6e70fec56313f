/*
 * backend.h — private: the interface between the engine and its compute backends (cpu, cuda).
 *
 * A backend is a vtable (be_ops) plus its own state behind be_backend. The engine never calls
 * a compute function itself: it fills a be_job (kernel parameters with pointers already in the
 * backend's address space, host or device) and hands it to ops->submit(), which queues it on
 * the backend's worker thread(s) and returns at once. When the job has finished (or was
 * cancelled by ops->stop()), the backend calls b->complete(b->complete_data, job) from one of
 * its threads, exactly once per submitted job; the engine queues it for the loop thread.
 *
 * Masks: session skip masks live where the backend computes (host memory for cpu, device
 * memory for cuda), so they are allocated and freed through the backend. Allocation does not
 * touch the memory: each (layer, shard) region is set to all ones by the worker that runs its
 * first call (be_job.mask_ready), and the worker counts the live bits of the region after
 * each call that changed it (be_job.live_bits), so the loop thread never does work in
 * proportion to a session's masks. Every mask
 * also has a host view (be_mask.host) that the loop thread may read for live fractions and
 * mask reads without touching the device: for cpu it is the mask itself, for cuda a pinned
 * shadow the worker refreshes after each job that changed the mask. The cuda view is made
 * after mask_alloc returns (be_mask.host NULL until then): the loop thread may read a region
 * of it only once the region's first call has run (mask_ready), and never writes it.
 *
 * Threading: every op except the completion callback is called from the loop thread. No op
 * may wait for device work (no stream/device synchronisation on the loop thread).
 */
#ifndef LA_BACKEND_H
#define LA_BACKEND_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "engine.h"
#include "la_attn.h"
#include "la_guard.h"
#include "logsink.h"

typedef struct be_backend be_backend;
typedef struct be_import be_import; /* an imported CUDA IPC or VMM allocation, opaque */

/* A VMM import: allocations mapped side by side; the buffer is [offset, offset + size). */
typedef struct be_vmm_req {
    const char *uuid;
    const uint64_t *alloc_sizes;
    size_t n_allocs;
    uint64_t offset, size;
    unsigned access; /* LA_ACCESS_* */
} be_vmm_req;

/* The fast path's doorbell (DoorbellRegister in proto/liteattn.proto): host memory that the
 * client and the daemon both map (a sealed memfd). Slot i holds the call's ready word (the
 * client writes it once Q/K/V are there: from its CUDA stream, or from the host for the CPU
 * backend), and the done and status words the daemon writes when the call is over (the
 * status first; done = the call's value). Values compare cyclically (int32_t)(a - b) >= 0,
 * as CU_STREAM_WAIT_VALUE_GEQ does, so they may wrap. The engine owns the mapping and writes
 * done and status from the host whenever a call fails or completes (job_complete); the cuda
 * backend also writes them from the GPU, right after the kernel, so that the client's stream
 * goes on without waiting for the host. */
typedef struct be_doorbell_slot {
    _Atomic uint32_t ready;
    _Atomic uint32_t done;
    _Atomic int32_t status;
    uint32_t reserved;
} be_doorbell_slot;
_Static_assert(sizeof(be_doorbell_slot) == 16, "a doorbell slot is 16 bytes on the wire");

typedef struct be_doorbell {
    be_doorbell_slot *slots; /* the shared mapping, n_slots of them */
    uint32_t n_slots;
    size_t map_len;
    /* cuda backend: registered with CUDA (cudaHostRegister, mapped) on first use by one of
     * its service threads: 0 not yet, 1 under way, 2 done (dev_addr valid), -1 failed (err). */
    atomic_int cuda_state;
    int cuda_gpu; /* the device whose service thread registers it */
    uint64_t dev_addr;
    char err[96];
} be_doorbell;

/* (int32_t)(a - b) >= 0: a is b or later, cyclically. */
static inline int be_seq_geq(uint32_t a, uint32_t b) { return (int32_t)(a - b) >= 0; }

typedef struct be_mask {
    void *dev_ptr;  /* what the kernel gets (cpu: == host) */
    uint32_t *host; /* host view (cpu: the mask; cuda: pinned shadow) */
    uint64_t bytes;
    int dev;
    void *priv; /* backend's own */
} be_mask;

#define BE_MSG_MAX 160

typedef struct be_job {
    /* In. Pointers of p are in the backend's address space; p.must_do/must_skip point into
     * must_do/must_skip below. */
    la_attn_params p;
    la_range must_do[LA_MAX_RANGES];
    la_range must_skip[LA_MAX_RANGES];
    int dev;
    be_mask *mask;               /* the session's mask set (p.mask points inside it), or NULL */
    uint64_t mask_off, mask_len; /* the bytes of this (layer, shard) inside it */
    /* 0 until the region was set to all ones (by the worker, before the first call on it
     * runs; the loop thread reads it for mask reads and clears it to reset). */
    atomic_uchar *mask_ready;
    uint32_t mask_words, mask_k_tiles; /* words per mask row, valid bits per row */
    int mask_restart; /* set those bytes to all ones before computing (a new generation) */
    int has_wait_event;
    uint8_t wait_event[64];
    /* Fast path: wait for db's slot db_slot to be rung (ready >= db_value) before reading
     * Q/K/V; db NULL otherwise. The backend never writes done or status from the host (the
     * engine does, in complete()); cuda writes them from the GPU after the kernel. */
    be_doorbell *db;
    uint32_t db_slot, db_value;
    uint64_t t_submit_ns; /* CLOCK_MONOTONIC */
    /* Fair queuing (fairq.h): whose call it is and what it costs. */
    uint32_t uid;
    uint64_t conn_id;
    uint64_t flow_id; /* the session */
    uint64_t cost;    /* multiply-adds of the whole call, from its shapes */
    /* Warm start and guardrail (docs/SKIP-SEMANTICS.md, kernels/la_guard.h). In order, after
     * the restart/first-call fill: seed (mask &= seed), the call, the guard's check of the
     * sampled q-tiles (sets held bits), the fill of held rows, then the copy into capture. */
    /* The seed and the capture are offsets into the mask allocation, not host pointers: the
     * loop thread plans a call before the cuda host view may exist (m->host is NULL until the
     * service thread pinned it), so only the backend, once the job may launch, forms
     * (char *)mask->host + offset. */
    int has_seed;      /* AND the region's seed in, 0: none */
    uint64_t seed_off; /* the region's seed, in the host view and in the backend's memory */
    uint32_t *held;            /* the region's held-row bitmap (backend memory), NULL: no guard */
    uint64_t held_len;         /* its bytes, zeroed with the region's all-ones fills */
    int32_t rows_b, rows_h, rows_nq; /* the region's rows: the session's batch, heads, nQ */
    int guard_n;                     /* q-tiles sampled by this call, 0: not checked */
    int32_t guard_tile[LA_GUARD_MAX_SAMPLE];
    float guard_budget;
    int has_capture;      /* the region's bytes after the call go to capture_off, 0: none */
    uint64_t capture_off; /* in the mask's host view (cuda: pinned, copied in stream order) */

    /* Out, written by the backend before complete() is called. */
    int status; /* 0 or LA_E* */
    char msg[BE_MSG_MAX];
    int64_t tiles_computed;
    uint64_t t_start_ns, t_end_ns;
    int has_done_event;
    uint8_t done_event[64];
    int has_live; /* the call changed the region: live_bits is its new count */
    uint64_t live_bits;
    uint64_t guard_rows, guard_restored, guard_tiles; /* of the check, when guard_n > 0 */
    /* The call ran on inputs its client may not have written (a doorbell wait the daemon
     * released): the region's next call must start from all ones. */
    int mask_tainted;

    /* Backend-private. */
    struct be_job *be_next;
    void *be_priv;
    int be_slot;
    void *fq_flow;           /* fairq.c */
    int64_t be_cursor;       /* cpu: next slice */
    int be_cancel;           /* cpu: cancel (LA_E* to report): the running slice stops before
                              * its next k-tile, no further slice runs; cuda: the doorbell wait
                              * was released by the daemon (LA_E* to report) */
    void *be_lane;           /* cuda: the stream pair it was launched on */
    uint64_t be_deadline_ns; /* cuda: when an unrung doorbell wait is given up (0: none) */
    int be_cuda_err;         /* cuda: the status its stream callback got */
    float *be_lse;           /* cpu: the guard's LSE of a call that asked for none */
} be_job;

typedef void (*be_complete_fn)(void *data, be_job *job);

typedef struct be_ops {
    const char *name; /* "cpu", "cuda" */
    size_t (*devices)(be_backend *b, eng_device_info *out, size_t max);
    /* Device index for a UUID, or for "" (the first device). LA_ENODEV if none. */
    int (*find_device)(be_backend *b, const char *uuid, int *ret_dev);
    /* Tile sizes of the kernel for (head_dim, dtype) on dev; LA_ENOTSUP if none. */
    int (*tile_sizes)(be_backend *b, int dev, uint32_t head_dim, la_dtype dtype, uint32_t *ret_bm,
                      uint32_t *ret_bn);
    /* 0 if p (pointers filled) can run on dev; LA_EINVAL / LA_ENOTSUP otherwise. */
    int (*supports)(be_backend *b, int dev, const la_attn_params *p);
    /* Mask storage of bytes bytes; its contents are set per region by the workers. init_len
     * bytes of init (none when 0; the caller may free init on return) are placed in the host
     * view at init_off before any job can use the mask: the loop thread never writes the host
     * view itself, which may not exist yet (cuda: the service thread pins it later). */
    int (*mask_alloc)(be_backend *b, int dev, uint64_t bytes, const void *init, uint64_t init_off,
                      uint64_t init_len, be_mask **ret_mask);
    /* Called only when no job uses m any more (the engine refcounts). NULL allowed. */
    void (*mask_free)(be_backend *b, be_mask *m);
    /* CUDA IPC import (NULL for cpu). ret_ptr: device pointer of the allocation base. */
    int (*buffer_import)(be_backend *b, const void *handle, size_t len, const char *uuid,
                         uint64_t size, be_import **ret_imp, void **ret_ptr, uint64_t *ret_size,
                         int *ret_dev, char *msg, size_t msg_len);
    /* VMM import (NULL for cpu): reserves the range of every allocation of r, imports the
     * first one from fd (the caller keeps and closes fd), checks it (pinned device memory on
     * r->uuid's GPU, sizes multiples of the granularity) and maps it with r->access. ret_ptr:
     * the device address of byte r->offset (usable once every allocation is mapped). */
    int (*vmm_import)(be_backend *b, const be_vmm_req *r, int fd, be_import **ret_imp,
                      void **ret_ptr, int *ret_dev, uint64_t *ret_granularity, char *msg,
                      size_t msg_len);
    /* Imports and maps the next allocation of imp (alloc_size bytes, as listed) from fd. */
    int (*vmm_append)(be_backend *b, be_import *imp, int fd, uint64_t alloc_size, char *msg,
                      size_t msg_len);
    /* Drops one reference of an import (IPC or VMM); called once no job uses it any more. */
    void (*buffer_release)(be_backend *b, be_import *imp);
    /* Queues job; returns 0 (complete() will be called) or an error (it will not). */
    int (*submit)(be_backend *b, be_job *job);
    /* Cancels the queued jobs of conn_id (every job when all is set) at once, their status
     * code (LA_ECLOSED or LA_ESHUTDOWN); running jobs that can stop early (cpu: within the
     * running slice, before its next k-tile) stop with the same status. Does not wait. */
    void (*cancel)(be_backend *b, uint64_t conn_id, int all, int code);
    /* Cancels queued jobs (their status LA_ESHUTDOWN) and waits for running ones; every
     * job's complete() has been called when it returns. Called from the loop thread. */
    void (*stop)(be_backend *b);
    void (*free)(be_backend *b);
    /* A sticky device error happened (the process must exit). */
    int (*fatal)(const be_backend *b);
    /* 0 when calls on dev may name a doorbell (the fast path); else LA_ENOTSUP with the
     * reason in why. NULL: never. */
    int (*fastpath)(be_backend *b, int dev, char *why, size_t why_len);
    /* The engine is done with db (no job uses it): the backend releases what it made of it
     * (cuda: cudaHostUnregister, on a thread of its own) and then calls unmap(db), which
     * unmaps and frees it, from any thread. NULL: unmap(db) at once. */
    void (*doorbell_release)(be_backend *b, be_doorbell *db, void (*unmap)(be_doorbell *db));
} be_ops;

struct be_backend {
    const be_ops *ops;
    be_complete_fn complete;
    void *complete_data;
    logsink_fn log;
    void *log_data;
    /* A launched call whose doorbell has not been rung after this long is released by the
     * daemon and fails with LA_ETIMEDOUT (cuda); set by the engine after creation. */
    uint64_t doorbell_timeout_ns;
};

/* CPU backend: a pool of threads (threads <= 0: number of cores) running calls in slices of
 * about slice_macs multiply-adds (0: the default). */
int be_cpu_new(int threads, uint64_t slice_macs, be_complete_fn complete, void *complete_data,
               be_backend **ret, char *msg, size_t msg_len);
/* CUDA backend: one worker per usable GPU. LA_ENODEV when built without CUDA or no GPU. */
int be_cuda_new(be_complete_fn complete, void *complete_data, logsink_fn log, void *log_data,
                be_backend **ret, char *msg, size_t msg_len);

/* CLOCK_MONOTONIC in nanoseconds. */
uint64_t be_now_ns(void);

/* The job's doorbell slot has been rung (ready >= db_value); 1 when it has none. */
static inline int be_doorbell_rung(const be_job *j)
{
    if (!j->db)
        return 1;
    uint32_t r = atomic_load_explicit(&j->db->slots[j->db_slot].ready, memory_order_acquire);
    return be_seq_geq(r, j->db_value);
}

/* Live bits of a mask region of host memory: rows of `words` words, the first k_tiles bits of
 * each counted. */
static inline uint64_t be_mask_live(const uint32_t *w, uint64_t bytes, uint32_t words,
                                    uint32_t k_tiles)
{
    uint64_t rows = words ? bytes / 4 / words : 0, live = 0;
    uint32_t full = k_tiles / 32, rem = k_tiles % 32;
    uint32_t last = rem ? (uint32_t)((1ull << rem) - 1) : 0;
    for (uint64_t r = 0; r < rows; r++, w += words) {
        for (uint32_t i = 0; i < full; i++)
            live += (uint64_t)__builtin_popcount(w[i]);
        if (rem)
            live += (uint64_t)__builtin_popcount(w[full] & last);
    }
    return live;
}

#endif /* LA_BACKEND_H */
