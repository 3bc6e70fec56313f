/*
 * backend_cuda.c — the CUDA backend: per GPU a launcher thread and a service thread, the
 * sessions' streams ("lanes"), the kernels of kernels/la_cuda.h, client memory by CUDA IPC and
 * by VMM fds, and the fast path's doorbells (stream memory operations on host memory both
 * processes map).
 *
 * Over 1000 lines on purpose: the launcher, the stream callbacks, the service thread, the IPC
 * import cache and the lanes all work on one per-device state under one lock, which splitting
 * the file would have to export to every part.
 *
 * Lanes. Every session that has calls launched owns a lane: a work stream and a completion
 * stream. A session's calls run in its lane in submission order (they read the mask the
 * previous call wrote); sessions do not wait for each other's streams, which matters for the
 * fast path, where a launched call may wait on its client's doorbell for as long as the
 * client's GPU needs to produce Q/K/V. A lane holds at most LANE_DEPTH calls launched and not
 * finished (enough to hide the launch gap between calls; few, so that the fair queue, not the
 * GPU, decides whose call goes next), and goes back to a free stack when its last call
 * finished, so that the busy lanes are the first ones created (streams beyond the device's
 * CUDA_DEVICE_MAX_CONNECTIONS share hardware queues: liteattnd raises it to 32). A doorbell
 * call of one session thus never holds up another session's stream; within one session the
 * calls are ordered anyway.
 *
 * The launcher takes jobs from the fair queue (fairq.h) and, per job, in its lane's work
 * stream: makes the stream wait on the client's IPC event and/or on the doorbell's ready word
 * (cuStreamWaitValue32, cyclic >=), zeroes the job's tile counter, sets the layer's mask to
 * all ones when the layer starts over, launches the kernel, writes the doorbell's status and
 * done words (cuStreamWriteValue32: the client's stream goes on from here, without the host),
 * records an interprocess completion event (for clients that wait on events), copies the
 * counter and (when the mask changed) the layer's mask into pinned host memory, records the
 * slot's event; the completion stream waits for that event and then runs a stream callback
 * (cudaStreamAddCallback, which also runs, with the error, after a device fault). The work
 * stream never waits for the host.
 *
 * The callback only queues the job for the service thread and wakes it. The service thread
 * (never the loop, never a stream callback) counts the live bits of the changed mask region,
 * completes the job (the engine queues it for the loop thread), and does what may block:
 * the pinned host views of new masks (cudaHostAlloc), registering doorbells with CUDA
 * (cudaHostRegister), and the graveyard (cudaFreeHost, cudaIpcCloseMemHandle,
 * cudaHostUnregister; device masks are freed stream-ordered). A third thread, the watchdog,
 * makes no CUDA call: it wakes at a doorbell deadline only while a launched call waits on an
 * unrung doorbell (several of the service thread's calls may wait for the device, and so for
 * that very doorbell). Nothing polls: the threads sleep on condition variables.
 *
 * Doorbell waits are bounded. A launched call whose ready word is not written within the
 * doorbell timeout, or whose connection closed, or that the daemon stops, is released by the
 * daemon: it writes the ready word itself from the host, the kernel runs on whatever the
 * inputs hold (into the client's own buffers, which the import keeps mapped), and the call
 * fails (LA_ETIMEDOUT, LA_ECLOSED, LA_ESHUTDOWN) with its layer's mask marked for a dense
 * restart (mask_tainted), so no session keeps skip decisions made from such inputs.
 *
 * A sticky error (illegal address, launch failure, ...) poisons the context: every job in
 * flight fails with LA_EDEVICE and the backend's fatal flag is set; the server then fails
 * everyone and exits non-zero (systemd restarts the daemon).
 *
 * Built only with LA_HAVE_CUDA (nvcc found); otherwise be_cuda_new() reports LA_ENODEV.
 */
#include <stdarg.h>
#include <stdio.h>

#include "backend.h"

#ifndef LA_HAVE_CUDA

int be_cuda_new(be_complete_fn complete, void *complete_data, logsink_fn log, void *log_data,
                be_backend **ret, char *msg, size_t msg_len)
{
    if (msg && msg_len)
        snprintf(msg, msg_len, "built without CUDA");
    return LA_ENODEV;
}

#else /* LA_HAVE_CUDA */

#include <ctype.h>
#include <cuda.h> /* driver types only: the driver is reached through cudaGetDriverEntryPoint */
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fairq.h"
#include "guard_cuda.h"
#include "la_cuda.h"
#include "list.h"

#define N_SLOTS 1024 /* jobs in flight per device (tile counters, completion events) */
#define N_EVENTS 256 /* completion IPC events per device, used round robin */
#define MAX_DEVICES 64
#define N_WAIT_CACHE 64 /* client IPC events kept open per device, replaced round robin */
#define LANE_DEPTH 3    /* calls launched and not finished per lane */
#define MAX_LANES 256   /* lanes per device; a session without one waits for one to free */

typedef CUresult (*get_range_fn)(CUdeviceptr *pbase, size_t *psize, CUdeviceptr dptr);
typedef CUresult (*value32_fn)(CUstream stream, CUdeviceptr addr, cuuint32_t value,
                               unsigned int flags);
typedef CUresult (*dev_get_fn)(CUdevice *dev, int ordinal);
typedef CUresult (*dev_attr_fn)(int *value, CUdevice_attribute attr, CUdevice dev);

/* The driver's VMM entry points (cudaGetDriverEntryPoint; all present or VMM is refused). */
typedef struct vmm_api {
    CUresult (*Import)(CUmemGenericAllocationHandle *, void *, CUmemAllocationHandleType);
    CUresult (*Props)(CUmemAllocationProp *, CUmemGenericAllocationHandle);
    CUresult (*Granularity)(size_t *, const CUmemAllocationProp *,
                            CUmemAllocationGranularity_flags);
    CUresult (*Reserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*Free)(CUdeviceptr, size_t);
    CUresult (*Map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
    CUresult (*Unmap)(CUdeviceptr, size_t);
    CUresult (*SetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    CUresult (*Release)(CUmemGenericAllocationHandle);
    CUresult (*ErrorName)(CUresult, const char **);
} vmm_api;

typedef struct be_import be_import;

typedef struct gpu gpu;
typedef struct cuda_backend cuda_backend;

/* What a stream callback gets: stable for the backend's life, unlike the job. */
typedef struct slot_ctx {
    gpu *g;
    int slot;
} slot_ctx;

/* A session's mask set and the state of its pinned host view (made by the service thread). */
typedef struct cu_mask {
    be_mask m;
    atomic_int host_state; /* 0 being made, 1 ready, -1 failed */
    /* What mask_alloc was asked to place in the host view (the warm seed), kept until the
     * service thread made the view: the caller's copy may be gone by then. */
    void *init;
    uint64_t init_off, init_len;
} cu_mask;

/* Work for the service thread, in order. */
enum { T_SHADOW = 1, T_DOORBELL, T_GRAVE_MASK, T_GRAVE_IPC, T_GRAVE_VMM, T_GRAVE_DOORBELL };
typedef struct task {
    struct task *next;
    int kind;
    cu_mask *mask;                  /* T_SHADOW, T_GRAVE_MASK */
    be_doorbell *db;                /* T_DOORBELL, T_GRAVE_DOORBELL */
    void (*unmap)(be_doorbell *db); /* T_GRAVE_DOORBELL */
    void *ipc_ptr;                  /* T_GRAVE_IPC */
    struct be_import *vmm;          /* T_GRAVE_VMM */
} task;

typedef struct lane {
    cudaStream_t s;  /* the session's work */
    cudaStream_t cs; /* waits for each job's event, then runs its callback */
    uint64_t flow;   /* the session bound to it; 0: free */
    int launched;    /* its jobs launched whose callback has not been reaped */
    struct lane *next_free;
} lane;

struct be_import {
    struct be_import *next;
    uint8_t handle[64];
    gpu *g;
    void *ptr;
    uint64_t size; /* real allocation size */
    int refs;
    /* VMM (vmm set): allocations mapped side by side into [va, va + va_size), each imported
     * once and never shared with another buffer (no cache: each registration maps its own). */
    int vmm;
    CUdeviceptr va;
    size_t va_size;
    size_t n_allocs, n_mapped;
    uint64_t *sizes;                       /* [n_allocs], as listed */
    CUmemGenericAllocationHandle *handles; /* [n_allocs], the first n_mapped valid */
    CUmemAccess_flags flags;
};

struct gpu {
    cuda_backend *cb;
    int ordinal;
    int cc;
    char uuid[64];
    char name[96];
    uint64_t memory;
    int mps;           /* CU_DEVICE_ATTRIBUTE_MPS_ENABLED once the context exists; -1 unknown */
    uint32_t sm_count; /* SMs the context may use */
    int fastpath;          /* doorbell calls possible (stream memory ops, mapped host memory) */
    char fastpath_why[96]; /* why not */
    cudaStream_t stream;   /* stream-ordered mask allocations and frees */
    pthread_t thread, service, watch;
    int started, service_started, watch_started;

    pthread_mutex_t lock;
    pthread_cond_t cond;       /* the launcher's */
    pthread_cond_t scond;      /* the service thread's */
    pthread_cond_t wcond;      /* the watchdog's (doorbell deadlines) */
    fq q;                      /* queued */
    be_job *slot_job[N_SLOTS]; /* launched, callback not run yet, by counter slot */
    slot_ctx slot_ctx[N_SLOTS];
    cudaEvent_t slot_ev[N_SLOTS];
    int n_inflight;                /* launched and not reaped */
    be_job *done_head, *done_tail; /* callbacks ran, not reaped yet (chained by be_next) */
    task *tasks, *tasks_tail;
    int stopping, launcher_done;

    lane lanes[MAX_LANES];
    int n_lanes; /* lanes[0..n_lanes) were handed out once */
    lane *free_lanes;

    unsigned long long *d_tiles; /* [N_SLOTS] device counters */
    unsigned long long *h_tiles; /* [N_SLOTS] pinned copies */
    int free_slots[N_SLOTS];
    int n_free_slots;

    cudaEvent_t events[N_EVENTS];
    cudaIpcEventHandle_t event_handles[N_EVENTS];
    unsigned next_event;

    /* Clients reuse a few events, so opened IPC event handles are kept (launcher only). */
    struct {
        uint8_t handle[64];
        cudaEvent_t ev;
    } wait_cache[N_WAIT_CACHE];
    unsigned wait_next;

    gguard guard; /* the guardrail's per-slot counters and scratch (guard_cuda.c) */
};

struct cuda_backend {
    be_backend base;
    gpu *gpus;
    int n;
    be_import *imports;
    get_range_fn get_range;
    value32_fn wait32, write32; /* NULL: no fast path */
    vmm_api vmm; /* Import NULL: the driver lacks the VMM API */
    CUresult (*exec_affinity)(CUexecAffinityParam *, CUexecAffinityType); /* may be NULL */
    atomic_int fatal;
};

#define logf_(cb, level, ...) \
    logsink_printf((cb)->base.log, (cb)->base.log_data, level, __VA_ARGS__)

/* Errors after which the context is unusable (every later call returns them). */
static int is_sticky(cudaError_t e)
{
    switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorContextIsDestroyed:
    case cudaErrorDeviceUninitialized:
    case cudaErrorUnknown: return 1;
    default: return 0;
    }
}

static int map_err(cudaError_t e)
{
    if (e == cudaErrorMemoryAllocation)
        return LA_ENOMEM;
    if (e == cudaErrorInvalidValue)
        return LA_EINVAL;
    return LA_EDEVICE;
}

static void set_fatal(cuda_backend *cb, gpu *g, cudaError_t e, const char *where)
{
    if (!atomic_exchange(&cb->fatal, 1))
        logf_(cb, LOG_ERROR, "GPU %s (%s): sticky CUDA error in %s: %s; the context is lost",
              g ? g->uuid : "?", g ? g->name : "?", where, cudaGetErrorString(e));
}

static void check_sticky(cuda_backend *cb, gpu *g, cudaError_t e, const char *where)
{
    if (e != cudaSuccess && is_sticky(e))
        set_fatal(cb, g, e, where);
}

static void format_uuid(const cudaUUID_t *u, char *out, size_t len)
{
    const unsigned char *b = (const unsigned char *)u->bytes;
    snprintf(out, len, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
             b[14], b[15]);
}

/* 32 lower-case hex digits of a "GPU-xxxxxxxx-..." or bare hex UUID; 0 on success. */
static int uuid_digits(const char *s, char out[33])
{
    if (!strncmp(s, "GPU-", 4))
        s += 4;
    int n = 0;
    for (; *s; s++) {
        if (*s == '-')
            continue;
        if (!isxdigit((unsigned char)*s) || n >= 32)
            return -1;
        out[n++] = (char)tolower((unsigned char)*s);
    }
    out[n] = 0;
    return n == 32 ? 0 : -1;
}

/* Device address of word w (0 ready, 1 done, 2 status) of slot of db. */
static CUdeviceptr db_word(const be_doorbell *db, uint32_t slot, int w)
{
    return (CUdeviceptr)(db->dev_addr + (uint64_t)slot * sizeof(be_doorbell_slot) +
                         (uint64_t)w * sizeof(uint32_t));
}

/* ---- completion ------------------------------------------------------------------------ */

static void finish(gpu *g, be_job *j, int status, const char *fmt, const char *detail)
{
    j->status = status;
    if (status < 0 && fmt)
        snprintf(j->msg, sizeof j->msg, fmt, g->uuid, detail ? detail : "");
    if (!j->t_start_ns)
        j->t_start_ns = be_now_ns();
    j->t_end_ns = be_now_ns();
    g->cb->base.complete(g->cb->base.complete_data, j);
}

static void slot_put(gpu *g, int slot)
{
    if (slot >= 0)
        g->free_slots[g->n_free_slots++] = slot;
}

/* The flow's lane, or NULL. Under g->lock. */
static lane *lane_find(gpu *g, uint64_t flow)
{
    for (int i = 0; i < g->n_lanes; i++)
        if (g->lanes[i].flow == flow)
            return &g->lanes[i];
    return NULL;
}

/* One job of l is over: the lane is free again once it has none. Under g->lock. */
static void lane_drop(gpu *g, lane *l)
{
    if (!l || --l->launched > 0)
        return;
    l->launched = 0;
    l->flow = 0;
    l->next_free = g->free_lanes;
    g->free_lanes = l;
}

/* Queues t for the service thread. Under g->lock. */
static void task_push(gpu *g, task *t)
{
    slist_append(g->tasks, g->tasks_tail, t, next);
    pthread_cond_signal(&g->scond);
}

/* Stream callback (the completion stream passed the job's event): queue it for the service
 * thread. No CUDA calls allowed here. */
static void CUDART_CB on_done(cudaStream_t stream, cudaError_t status, void *arg)
{
    (void)stream;
    slot_ctx *ctx = arg;
    gpu *g = ctx->g;
    pthread_mutex_lock(&g->lock);
    be_job *j = g->slot_job[ctx->slot];
    if (j) { /* else failed already by the sticky-error path (and maybe freed) */
        g->slot_job[ctx->slot] = NULL;
        j->be_cuda_err = (int)status;
        slist_append(g->done_head, g->done_tail, j, be_next);
        pthread_cond_signal(&g->scond);
    }
    pthread_mutex_unlock(&g->lock);
}

/* Fails every job launched (callback not run) or queued on g (sticky error). */
static void fail_all(gpu *g, const char *why)
{
    pthread_mutex_lock(&g->lock);
    be_job *list = NULL, *q = fq_take(&g->q, 0, 1);
    /* Their slots stay out of use: the dead context may still hold work on them. */
    for (int k = 0; k < N_SLOTS; k++)
        if (g->slot_job[k]) {
            be_job *j = g->slot_job[k];
            g->slot_job[k] = NULL;
            lane_drop(g, j->be_lane);
            g->n_inflight--;
            j->be_next = list;
            list = j;
        }
    pthread_cond_broadcast(&g->scond);
    pthread_mutex_unlock(&g->lock);
    for (int pass = 0; pass < 2; pass++) {
        be_job *j = pass ? q : list;
        while (j) {
            be_job *next = j->be_next;
            j->be_next = NULL;
            finish(g, j, LA_EDEVICE, "GPU %s: %s", why);
            j = next;
        }
    }
}

/* Releases the doorbell wait of launched job j (its client will not ring, or is gone): the
 * host writes the ready word the lane waits for; the call then fails with code. Under
 * g->lock. */
static void release_wait(gpu *g, be_job *j, int code)
{
    if (!j->db || j->be_cancel || be_doorbell_rung(j))
        return;
    j->be_cancel = code;
    j->be_deadline_ns = 0;
    atomic_store_explicit(&j->db->slots[j->db_slot].ready, j->db_value, memory_order_release);
}

/* The launched doorbell calls of conn_id (all: every one) that still wait are released. Under
 * g->lock. */
static void release_waits(gpu *g, uint64_t conn_id, int all, int code)
{
    for (int k = 0; k < N_SLOTS; k++) {
        be_job *j = g->slot_job[k];
        if (j && (all || j->conn_id == conn_id))
            release_wait(g, j, code);
    }
}

/* Doorbell deadlines: releases the waits past theirs; returns the earliest one still ahead
 * (0: none). Under g->lock. */
static uint64_t check_deadlines(gpu *g, uint64_t now)
{
    uint64_t next = 0;
    for (int k = 0; k < N_SLOTS; k++) {
        be_job *j = g->slot_job[k];
        if (!j || !j->be_deadline_ns)
            continue;
        if (be_doorbell_rung(j)) {
            j->be_deadline_ns = 0;
            continue;
        }
        if (j->be_deadline_ns <= now) {
            logf_(g->cb, LOG_WARN,
                  "GPU %s: conn %llu: doorbell slot %u not rung within %llu ms; the call is "
                  "released and fails",
                  g->uuid, (unsigned long long)j->conn_id, j->db_slot,
                  (unsigned long long)(g->cb->base.doorbell_timeout_ns / 1000000u));
            release_wait(g, j, LA_ETIMEDOUT);
            continue;
        }
        if (!next || j->be_deadline_ns < next)
            next = j->be_deadline_ns;
    }
    return next;
}

/* The job's GPU work is over (its callback ran): figures, then complete. Service thread. */
static void reap(gpu *g, be_job *j)
{
    pthread_mutex_lock(&g->lock);
    j->tiles_computed = (int64_t)g->h_tiles[j->be_slot];
    gguard_done(&g->guard, j, j->be_slot); /* before the slot can go to another lane's call */
    slot_put(g, j->be_slot);
    j->be_slot = -1;
    lane_drop(g, j->be_lane);
    j->be_lane = NULL;
    g->n_inflight--;
    int cancelled = j->be_cancel;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
    cudaError_t e = (cudaError_t)j->be_cuda_err;
    if (e != cudaSuccess) {
        check_sticky(g->cb, g, e, "the stream");
        j->has_done_event = 0;
        finish(g, j, is_sticky(e) ? LA_EDEVICE : map_err(e), "GPU %s: %s", cudaGetErrorString(e));
        return;
    }
    int changes_mask = j->mask &&
                       (j->p.mode != LA_MODE_DENSE || j->mask_restart || j->has_seed) &&
                       !j->p.decisions;
    if (cancelled) {
        /* The kernel ran on inputs the client may never have written: no skip decision of
         * this call may survive. */
        j->mask_tainted = changes_mask;
        j->has_live = 0;
        j->has_done_event = 0;
        finish(g, j, cancelled,
               cancelled == LA_ETIMEDOUT
                   ? "GPU %s: the call's doorbell was not rung in time (the client's stream "
                     "never wrote it); the daemon released the wait%s"
               : cancelled == LA_ECLOSED ? "GPU %s: the connection closed while the call "
                                           "waited for its doorbell%s"
                                         : "GPU %s: the daemon is shutting down%s",
               "");
        return;
    }
    if (changes_mask) {
        /* The host view of the region was refreshed before the callback ran. The count is
         * the service thread's work, never the stream's. */
        j->has_live = 1;
        j->live_bits = be_mask_live((const uint32_t *)((char *)j->mask->host + j->mask_off),
                                    j->mask_len, j->mask_words, j->mask_k_tiles);
    }
    finish(g, j, 0, NULL, NULL);
}

/* ---- the launcher ---------------------------------------------------------------------- */

/* A job may not launch while its lane is full (or no lane is left for it), while its mask's
 * host view or its doorbell's registration is still being made, or when no counter slot is
 * free. Under g->lock. */
static int launch_blocked(void *ctx, const be_job *j)
{
    gpu *g = ctx;
    if (g->n_free_slots == 0)
        return 1;
    lane *l = lane_find(g, j->flow_id);
    if (l ? l->launched >= LANE_DEPTH : !g->free_lanes && g->n_lanes >= MAX_LANES)
        return 1;
    if (j->mask && atomic_load(&((cu_mask *)j->mask)->host_state) == 0)
        return 1;
    if (j->db) {
        int st = atomic_load(&j->db->cuda_state);
        if (st == 0 || st == 1)
            return 1;
    }
    return 0;
}

/* The lane of j's flow, bound now if it had none (launch_blocked said one is there). */
static lane *lane_take(gpu *g, uint64_t flow)
{
    lane *l = lane_find(g, flow);
    if (l)
        return l;
    if (g->free_lanes) {
        l = g->free_lanes;
        g->free_lanes = l->next_free;
    } else {
        l = &g->lanes[g->n_lanes++];
    }
    l->next_free = NULL;
    l->flow = flow;
    l->launched = 0;
    return l;
}

/* A launch failed after j took its slot and lane: j leaves them (the slot retired when work
 * already enqueued may still write its counter) and fails. */
static void launch_failed(gpu *g, be_job *j, int retire, int status, const char *fmt,
                          const char *detail)
{
    pthread_mutex_lock(&g->lock);
    int mine = g->slot_job[j->be_slot] == j;
    if (mine) {
        g->slot_job[j->be_slot] = NULL;
        if (!retire)
            slot_put(g, j->be_slot);
        lane_drop(g, j->be_lane);
        g->n_inflight--;
    }
    pthread_cond_broadcast(&g->scond);
    pthread_mutex_unlock(&g->lock);
    if (!mine)
        return; /* the sticky path failed it already */
    if (retire)
        logf_(g->cb, 1, "GPU %s: launch failed (%s); counter slot %d retired", g->uuid,
              detail ? detail : "?", j->be_slot);
    j->be_slot = -1;
    j->be_lane = NULL;
    j->has_done_event = 0;
    finish(g, j, status, fmt, detail);
}

static cudaEvent_t wait_event(gpu *g, const uint8_t handle[64], cudaError_t *ret_e)
{
    for (int k = 0; k < N_WAIT_CACHE; k++)
        if (g->wait_cache[k].ev && !memcmp(g->wait_cache[k].handle, handle, 64))
            return g->wait_cache[k].ev;
    cudaIpcEventHandle_t h;
    memcpy(&h, handle, sizeof h);
    cudaEvent_t ev = NULL;
    cudaError_t e = cudaIpcOpenEventHandle(&ev, h);
    if (e != cudaSuccess) {
        *ret_e = e;
        return NULL;
    }
    unsigned k = g->wait_next++ % N_WAIT_CACHE;
    /* Destroying an event a wait was enqueued on is fine: the wait keeps what it needs until
     * the device is done with it. */
    if (g->wait_cache[k].ev)
        cudaEventDestroy(g->wait_cache[k].ev);
    g->wait_cache[k].ev = ev;
    memcpy(g->wait_cache[k].handle, handle, 64);
    return ev;
}

/* Enqueues j on its lane (slot and lane taken). Launcher thread, g->lock not held. */
static void launch(gpu *g, be_job *j)
{
    cuda_backend *cb = g->cb;
    lane *l = j->be_lane;
    int slot = j->be_slot;
    cudaError_t e;
    j->be_priv = g;
    j->t_start_ns = be_now_ns();
    if (!l->s) {
        if ((e = cudaStreamCreateWithFlags(&l->s, cudaStreamNonBlocking)) != cudaSuccess ||
            (e = cudaStreamCreateWithFlags(&l->cs, cudaStreamNonBlocking)) != cudaSuccess) {
            if (l->s)
                cudaStreamDestroy(l->s);
            l->s = l->cs = NULL;
            check_sticky(cb, g, e, "cudaStreamCreate");
            launch_failed(g, j, 0, map_err(e), "GPU %s: cannot create a stream: %s",
                          cudaGetErrorString(e));
            return;
        }
    }
    if (j->mask && atomic_load(&((cu_mask *)j->mask)->host_state) < 0) {
        launch_failed(g, j, 0, LA_ENOMEM,
                      "GPU %s: no pinned host memory for the session's mask view%s", "");
        return;
    }
    if (j->db && atomic_load(&j->db->cuda_state) < 0) {
        launch_failed(g, j, 0, LA_EDEVICE, "GPU %s: the doorbell cannot be used: %s", j->db->err);
        return;
    }
    if (j->has_wait_event) {
        cudaEvent_t ev = wait_event(g, j->wait_event, &e);
        if (!ev) {
            check_sticky(cb, g, e, "cudaIpcOpenEventHandle");
            launch_failed(g, j, 0, is_sticky(e) ? LA_EDEVICE : LA_EINVAL,
                          "GPU %s: cannot open the wait event: %s", cudaGetErrorString(e));
            return;
        }
        if ((e = cudaStreamWaitEvent(l->s, ev, 0)) != cudaSuccess) {
            check_sticky(cb, g, e, "cudaStreamWaitEvent");
            launch_failed(g, j, 0, map_err(e), "GPU %s: %s", cudaGetErrorString(e));
            return;
        }
    }
    if (j->db) {
        CUresult r = cb->wait32((CUstream)l->s, db_word(j->db, j->db_slot, 0), j->db_value,
                                CU_STREAM_WAIT_VALUE_GEQ);
        if (r != CUDA_SUCCESS) {
            char d[32];
            snprintf(d, sizeof d, "CUresult %d", (int)r);
            launch_failed(g, j, 0, LA_EDEVICE,
                          "GPU %s: cannot wait on the doorbell (cuStreamWaitValue32: %s)", d);
            return;
        }
    }
    int filled = j->mask_restart; /* the region is set to all ones before this call */
    if (j->mask_ready && !atomic_load(j->mask_ready)) {
        filled = 1;
        /* The region's first call: all ones, on the device in stream order and in the host
         * view here (the launcher's time, not the loop's). */
        if ((e = cudaMemsetAsync((char *)j->mask->dev_ptr + j->mask_off, 0xff, (size_t)j->mask_len,
                                 l->s)) != cudaSuccess)
            goto fail;
        memset((char *)j->mask->host + j->mask_off, 0xff, (size_t)j->mask_len);
        atomic_store(j->mask_ready, 1);
    }
    unsigned long long *counter = g->d_tiles + slot;
    /* Zeroed by two stream writes where the driver has them (a front-end operation, cheaper
     * on the call's critical path than a memset), else by a memset. */
    CUdeviceptr cw = (CUdeviceptr)(uintptr_t)counter;
    if (!cb->write32 ||
        cb->write32((CUstream)l->s, cw, 0, CU_STREAM_WRITE_VALUE_DEFAULT) != CUDA_SUCCESS ||
        cb->write32((CUstream)l->s, cw + 4, 0, CU_STREAM_WRITE_VALUE_DEFAULT) != CUDA_SUCCESS)
        if ((e = cudaMemsetAsync(counter, 0, sizeof *counter, l->s)) != cudaSuccess)
            goto fail;
    if (j->mask_restart && j->mask &&
        (e = cudaMemsetAsync((char *)j->mask->dev_ptr + j->mask_off, 0xff, (size_t)j->mask_len,
                             l->s)) != cudaSuccess)
        goto fail;
    if ((e = gguard_before(&g->guard, j, slot, filled, l->s)) != cudaSuccess)
        goto fail;
    j->p.ret_tiles_computed = (int64_t *)counter;
    e = la_attn_fwd_cuda(&j->p, l->s);
    j->p.ret_tiles_computed = NULL;
    if (e != cudaSuccess)
        goto fail;
    if ((e = gguard_after(&g->guard, j, slot, l->s)) != cudaSuccess)
        goto fail;
    if (j->db) {
        /* The client's stream goes on from here: status first, then done (each write is
         * ordered after the kernel's writes and the previous one). */
        if (cb->write32((CUstream)l->s, db_word(j->db, j->db_slot, 2), 0,
                        CU_STREAM_WRITE_VALUE_DEFAULT) != CUDA_SUCCESS ||
            cb->write32((CUstream)l->s, db_word(j->db, j->db_slot, 1), j->db_value,
                        CU_STREAM_WRITE_VALUE_DEFAULT) != CUDA_SUCCESS) {
            launch_failed(g, j, 1, LA_EDEVICE,
                          "GPU %s: cannot write the doorbell (cuStreamWriteValue32)%s", "");
            return;
        }
    }
    /* The client's completion event right after the kernel, before our own copies. */
    unsigned k = g->next_event++ % N_EVENTS;
    if ((e = cudaEventRecord(g->events[k], l->s)) != cudaSuccess)
        goto fail;
    memcpy(j->done_event, &g->event_handles[k], sizeof j->done_event);
    j->has_done_event = 1;
    if ((e = cudaMemcpyAsync(g->h_tiles + slot, counter, sizeof *counter, cudaMemcpyDeviceToHost,
                             l->s)) != cudaSuccess)
        goto fail;
    if (j->mask && (j->p.mode != LA_MODE_DENSE || j->mask_restart || j->has_seed) &&
        !j->p.decisions) {
        /* Refresh the host view of this (layer, shard) mask. */
        e = cudaMemcpyAsync((char *)j->mask->host + j->mask_off,
                            (char *)j->mask->dev_ptr + j->mask_off, (size_t)j->mask_len,
                            cudaMemcpyDeviceToHost, l->s);
        if (e != cudaSuccess)
            goto fail;
    }
    /* The warm capture: its own copy in the pinned host view (the region's next call may
     * refresh the view while the service thread reads; this area only this call writes). */
    if (j->has_capture && j->mask &&
        (e = cudaMemcpyAsync((char *)j->mask->host + j->capture_off,
                             (char *)j->mask->dev_ptr + j->mask_off,
                             (size_t)j->mask_len, cudaMemcpyDeviceToHost, l->s)) != cudaSuccess)
        goto fail;
    /* The completion: on the lane's second stream, so that a callback never stalls the
     * lane's next call. */
    if ((e = cudaEventRecord(g->slot_ev[slot], l->s)) != cudaSuccess ||
        (e = cudaStreamWaitEvent(l->cs, g->slot_ev[slot], 0)) != cudaSuccess ||
        (e = cudaStreamAddCallback(l->cs, on_done, &g->slot_ctx[slot], 0)) != cudaSuccess)
        goto fail;
    return;
fail:
    gguard_abort(&g->guard, slot, l->s);
    check_sticky(cb, g, e, "a launch");
    /* The counter slot may still be written by work already enqueued: it stays out of use
     * (errors after a slot was taken are launch failures: rare, and sticky ones end the
     * process anyway). */
    launch_failed(g, j, 1, map_err(e), "GPU %s: %s", cudaGetErrorString(e));
}

static const char *cu_err(const cuda_backend *cb, CUresult r)
{
    const char *n = NULL;
    if (cb->vmm.ErrorName)
        cb->vmm.ErrorName(r, &n);
    return n ? n : "unknown CUDA error";
}

/* Unmaps and releases what a VMM import mapped, frees its range and the import. No job may
 * use it any more. Any thread. */
static void vmm_free(cuda_backend *cb, be_import *imp)
{
    if (!imp)
        return;
    size_t off = 0;
    for (size_t i = 0; i < imp->n_mapped; i++) {
        CUresult r = cb->vmm.Unmap(imp->va + off, (size_t)imp->sizes[i]);
        if (r != CUDA_SUCCESS)
            logf_(cb, LOG_WARN, "GPU %s: cuMemUnmap of a VMM allocation failed: %s",
                  imp->g->uuid, cu_err(cb, r));
        cb->vmm.Release(imp->handles[i]);
        off += (size_t)imp->sizes[i];
    }
    if (imp->va)
        cb->vmm.Free(imp->va, imp->va_size);
    free(imp->sizes);
    free(imp->handles);
    free(imp);
}

/* The first step of g's launcher and service threads: make g's device current; a failure
 * loses the context for the whole backend. */
static void bind_device(gpu *g, const char *where)
{
    cudaError_t e = cudaSetDevice(g->ordinal);
    if (e != cudaSuccess)
        set_fatal(g->cb, g, e, where);
}

static void *gpu_main(void *arg)
{
    gpu *g = arg;
    cuda_backend *cb = g->cb;
    bind_device(g, "cudaSetDevice on the launcher");
    pthread_mutex_lock(&g->lock);
    for (;;) {
        if (atomic_load(&cb->fatal)) {
            pthread_mutex_unlock(&g->lock);
            fail_all(g, "the CUDA context was lost (sticky error); the daemon restarts");
            pthread_mutex_lock(&g->lock);
            if (g->stopping)
                break;
            pthread_cond_wait(&g->cond, &g->lock);
            continue;
        }
        be_job *j = fq_pick(&g->q, launch_blocked, g, 1);
        if (j) {
            /* A kernel is not preemptible: the whole call is charged as it starts. */
            fq_charge(&g->q, j, j->cost);
            fq_done(&g->q, j);
            lane *l = lane_take(g, j->flow_id);
            l->launched++;
            int slot = g->free_slots[--g->n_free_slots];
            g->slot_job[slot] = j;
            g->n_inflight++;
            j->be_slot = slot;
            j->be_lane = l;
            j->be_cancel = 0;
            j->be_deadline_ns = j->db && cb->base.doorbell_timeout_ns
                                    ? be_now_ns() + cb->base.doorbell_timeout_ns
                                    : 0;
            /* A new deadline to watch, before the launch: a launch can block in the driver
             * until the device gets past this very wait. */
            if (j->db)
                pthread_cond_signal(&g->wcond);
            pthread_mutex_unlock(&g->lock);
            launch(g, j); /* j may be complete, even freed, when this returns */
            pthread_mutex_lock(&g->lock);
            continue;
        }
        if (g->stopping && g->q.queued == 0)
            break;
        pthread_cond_wait(&g->cond, &g->lock);
    }
    g->launcher_done = 1;
    pthread_cond_signal(&g->scond);
    pthread_mutex_unlock(&g->lock);
    return NULL;
}

/* ---- the service thread ------------------------------------------------------------------ */

static void wake_launchers(cuda_backend *cb)
{
    for (int i = 0; i < cb->n; i++) {
        gpu *o = &cb->gpus[i];
        if (!o->cb)
            continue;
        pthread_mutex_lock(&o->lock);
        pthread_cond_broadcast(&o->cond);
        pthread_mutex_unlock(&o->lock);
    }
}

/* Runs t (service thread; at teardown the caller's). May block on the device. */
static void run_task(gpu *g, task *t)
{
    cuda_backend *cb = g->cb;
    cudaError_t e = cudaSuccess;
    switch (t->kind) {
    case T_SHADOW: {
        /* The mask's pinned host view; the device part came from cudaMallocAsync on
         * g->stream: once that stream got here, every lane may use it. */
        void *h = NULL;
        be_mask *m = &t->mask->m;
        e = cudaHostAlloc(&h, (size_t)m->bytes, cudaHostAllocPortable);
        if (e == cudaSuccess)
            e = cudaStreamSynchronize(g->stream);
        if (e != cudaSuccess) {
            check_sticky(cb, g, e, "a mask's host view");
            logf_(cb, LOG_WARN, "GPU %s: a mask of %llu bytes gets no host view: %s", g->uuid,
                  (unsigned long long)m->bytes, cudaGetErrorString(e));
            if (h)
                cudaFreeHost(h);
            atomic_store(&t->mask->host_state, -1);
        } else {
            if (t->mask->init_len) /* before it is published: no job reads it earlier */
                memcpy((char *)h + t->mask->init_off, t->mask->init, (size_t)t->mask->init_len);
            m->host = h;
            atomic_store(&t->mask->host_state, 1); /* publishes m->host */
        }
        free(t->mask->init);
        t->mask->init = NULL;
        pthread_mutex_lock(&g->lock);
        pthread_cond_broadcast(&g->cond);
        pthread_mutex_unlock(&g->lock);
        break;
    }
    case T_DOORBELL: {
        be_doorbell *db = t->db;
        long page = sysconf(_SC_PAGESIZE);
        size_t len =
            page > 0 ? (db->map_len + (size_t)page - 1) / (size_t)page * (size_t)page : db->map_len;
        void *dev = NULL;
        e = cudaHostRegister(db->slots, len, cudaHostRegisterPortable | cudaHostRegisterMapped);
        if (e == cudaSuccess && (e = cudaHostGetDevicePointer(&dev, db->slots, 0)) != cudaSuccess)
            cudaHostUnregister(db->slots);
        if (e == cudaSuccess && dev != (void *)db->slots) {
            /* Every GPU uses one address (portable mapped memory at the host's address, which
             * fastpath() required of each device). */
            cudaHostUnregister(db->slots);
            snprintf(db->err, sizeof db->err, "the mapped doorbell has another device address");
            atomic_store(&db->cuda_state, -1);
        } else if (e != cudaSuccess) {
            check_sticky(cb, g, e, "cudaHostRegister");
            snprintf(db->err, sizeof db->err, "cudaHostRegister: %s", cudaGetErrorString(e));
            atomic_store(&db->cuda_state, -1);
        } else {
            db->dev_addr = (uint64_t)(uintptr_t)dev;
            atomic_store(&db->cuda_state, 2);
        }
        wake_launchers(cb); /* jobs on any GPU may wait for it */
        break;
    }
    case T_GRAVE_MASK: {
        be_mask *m = &t->mask->m;
        if (m->dev_ptr) {
            /* Every job on it has completed: a stream-ordered free needs no more order. */
            e = cudaFreeAsync(m->dev_ptr, g->stream);
            check_sticky(cb, g, e, "cudaFreeAsync");
        }
        if (m->host)
            cudaFreeHost(m->host);
        free(t->mask->init); /* NULL: its T_SHADOW, queued before, ran */
        free(t->mask);
        break;
    }
    case T_GRAVE_IPC: cudaIpcCloseMemHandle(t->ipc_ptr); break;
    case T_GRAVE_VMM:
        /* Every job that used the mapping has completed (the engine releases an import only
         * then), and cuMemUnmap does not wait for other work. */
        vmm_free(cb, t->vmm);
        break;
    case T_GRAVE_DOORBELL:
        if (atomic_load(&t->db->cuda_state) == 2)
            cudaHostUnregister(t->db->slots);
        t->unmap(t->db);
        break;
    }
    free(t);
}

static void *gpu_service(void *arg)
{
    gpu *g = arg;
    bind_device(g, "cudaSetDevice on the service thread");
    pthread_mutex_lock(&g->lock);
    for (;;) {
        if (g->done_head) {
            be_job *list = g->done_head;
            g->done_head = g->done_tail = NULL;
            pthread_mutex_unlock(&g->lock);
            while (list) {
                be_job *next = list->be_next;
                list->be_next = NULL;
                reap(g, list);
                list = next;
            }
            pthread_mutex_lock(&g->lock);
            continue;
        }
        if (g->tasks) {
            task *t = g->tasks;
            g->tasks = t->next;
            if (!g->tasks)
                g->tasks_tail = NULL;
            pthread_mutex_unlock(&g->lock);
            run_task(g, t);
            pthread_mutex_lock(&g->lock);
            continue;
        }
        if (g->stopping && g->launcher_done && g->n_inflight == 0)
            break;
        pthread_cond_wait(&g->scond, &g->lock);
    }
    pthread_mutex_unlock(&g->lock);
    return NULL;
}

/* The watchdog: releases launched calls whose doorbell was not rung by their deadline. It
 * makes no CUDA call, so it runs even while the service thread sits in one that waits for the
 * device (cudaFreeHost, cudaHostRegister, ... may wait for work that itself waits on the
 * unrung doorbell). It wakes only at a deadline (seconds away; nothing polls) or when a call
 * with a doorbell launched. The clock of wcond is CLOCK_MONOTONIC. */
static void *gpu_watch(void *arg)
{
    gpu *g = arg;
    pthread_mutex_lock(&g->lock);
    while (!g->stopping) {
        uint64_t next = check_deadlines(g, be_now_ns());
        if (!next) {
            pthread_cond_wait(&g->wcond, &g->lock);
            continue;
        }
        struct timespec ts = {.tv_sec = (time_t)(next / 1000000000u),
                              .tv_nsec = (long)(next % 1000000000u)};
        pthread_cond_timedwait(&g->wcond, &g->lock, &ts);
    }
    pthread_mutex_unlock(&g->lock);
    return NULL;
}

/* ---- ops ------------------------------------------------------------------------------- */

static size_t cu_devices(be_backend *b, eng_device_info *out, size_t max)
{
    cuda_backend *cb = (cuda_backend *)b;
    size_t n = 0;
    for (int i = 0; i < cb->n && n < max; i++, n++) {
        gpu *g = &cb->gpus[i];
        memset(&out[n], 0, sizeof out[n]);
        snprintf(out[n].uuid, sizeof out[n].uuid, "%s", g->uuid);
        snprintf(out[n].backend, sizeof out[n].backend, "cuda");
        snprintf(out[n].name, sizeof out[n].name, "%s", g->name);
        out[n].memory_bytes = g->memory;
        out[n].compute_capability = (uint32_t)g->cc;
        out[n].mps = g->mps;
        out[n].sm_count = g->sm_count;
    }
    return n;
}

static int cu_find_device(be_backend *b, const char *uuid, int *ret_dev)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (!uuid || !uuid[0]) {
        if (cb->n < 1)
            return LA_ENODEV;
        *ret_dev = 0;
        return 0;
    }
    char want[33], have[33];
    if (uuid_digits(uuid, want) != 0)
        return LA_ENODEV;
    for (int i = 0; i < cb->n; i++)
        if (uuid_digits(cb->gpus[i].uuid, have) == 0 && !strcmp(want, have)) {
            *ret_dev = i;
            return 0;
        }
    return LA_ENODEV;
}

static int cu_tile_sizes(be_backend *b, int dev, uint32_t head_dim, la_dtype dtype,
                         uint32_t *ret_bm, uint32_t *ret_bn)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (dev < 0 || dev >= cb->n || head_dim > 1024)
        return LA_ENOTSUP;
    int32_t bm, bn;
    int rc = la_cuda_tile_sizes((int)head_dim, dtype, cb->gpus[dev].cc, &bm, &bn);
    if (rc < 0)
        return LA_ENOTSUP;
    *ret_bm = (uint32_t)bm;
    *ret_bn = (uint32_t)bn;
    return 0;
}

static int cu_supports(be_backend *b, int dev, const la_attn_params *p)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (dev < 0 || dev >= cb->n)
        return LA_ENODEV;
    return la_cuda_supported(p, cb->gpus[dev].cc);
}

static int cu_fastpath(be_backend *b, int dev, char *why, size_t why_len)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (dev < 0 || dev >= cb->n)
        return LA_ENODEV;
    if (cb->gpus[dev].fastpath)
        return 0;
    if (why && why_len)
        snprintf(why, why_len, "%s", cb->gpus[dev].fastpath_why);
    return LA_ENOTSUP;
}

/* Queues a copy of what (its kind and the fields that kind uses) for g's service thread; -1
 * when out of memory (nothing queued). */
static int service(gpu *g, task what)
{
    task *t = malloc(sizeof *t);
    if (!t)
        return -1;
    *t = what;
    pthread_mutex_lock(&g->lock);
    task_push(g, t);
    pthread_mutex_unlock(&g->lock);
    return 0;
}

static int cu_mask_alloc(be_backend *b, int dev, uint64_t bytes, const void *init,
                         uint64_t init_off, uint64_t init_len, be_mask **ret_mask)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (dev < 0 || dev >= cb->n || bytes == 0 || bytes > SIZE_MAX || init_off > bytes ||
        init_len > bytes - init_off || (init_len && !init))
        return LA_EINVAL;
    if (atomic_load(&cb->fatal))
        return LA_EDEVICE;
    gpu *g = &cb->gpus[dev];
    cu_mask *cm = calloc(1, sizeof *cm);
    if (!cm)
        return LA_ENOMEM;
    atomic_init(&cm->host_state, 0);
    if (init_len) {
        /* The view is pinned later by the service thread (m->host stays NULL until then), so
         * the bytes wait here; the engine once wrote them through the NULL view at open. */
        if (!(cm->init = malloc((size_t)init_len))) {
            free(cm);
            return LA_ENOMEM;
        }
        memcpy(cm->init, init, (size_t)init_len);
        cm->init_off = init_off;
        cm->init_len = init_len;
    }
    cudaError_t e = cudaSetDevice(g->ordinal);
    void *d = NULL;
    if (e == cudaSuccess)
        e = cudaMallocAsync(&d, (size_t)bytes, g->stream);
    if (e != cudaSuccess) {
        check_sticky(cb, g, e, "mask allocation");
        free(cm->init);
        free(cm);
        return map_err(e);
    }
    be_mask *m = &cm->m;
    m->dev_ptr = d; /* regions are set to all ones by the launcher */
    m->host = NULL; /* pinned by the service thread (cudaHostAlloc may block) */
    m->bytes = bytes;
    m->dev = dev;
    m->priv = cm;
    if (service(g, (task){.kind = T_SHADOW, .mask = cm}) < 0) {
        cudaFreeAsync(d, g->stream);
        free(cm->init);
        free(cm);
        return LA_ENOMEM;
    }
    *ret_mask = m;
    return 0;
}

static void cu_mask_free(be_backend *b, be_mask *m)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (!m)
        return;
    gpu *g = &cb->gpus[m->dev];
    if (service(g, (task){.kind = T_GRAVE_MASK, .mask = (cu_mask *)m}) < 0)
        logf_(cb, LOG_WARN, "GPU %s: out of memory; %llu bytes of mask leaked", g->uuid,
              (unsigned long long)m->bytes);
}

static int cu_buffer_import(be_backend *b, const void *handle, size_t len, const char *uuid,
                            uint64_t size, be_import **ret_imp, void **ret_ptr, uint64_t *ret_size,
                            int *ret_dev, char *msg, size_t msg_len)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (len != sizeof(cudaIpcMemHandle_t) || len > 64) {
        snprintf(msg, msg_len, "IPC handle of %zu bytes (must be %zu)", len,
                 sizeof(cudaIpcMemHandle_t));
        return LA_EINVAL;
    }
    if (atomic_load(&cb->fatal))
        return LA_EDEVICE;
    int dev;
    if (!uuid || !uuid[0] || cu_find_device(b, uuid, &dev) != 0) {
        snprintf(msg, msg_len, "no GPU '%s' on this host", uuid ? uuid : "");
        return LA_ENODEV;
    }
    gpu *g = &cb->gpus[dev];
    be_import *imp;
    for (imp = cb->imports; imp; imp = imp->next)
        if (imp->g == g && !memcmp(imp->handle, handle, len))
            break;
    if (!imp) {
        cudaError_t e = cudaSetDevice(g->ordinal);
        void *ptr = NULL;
        cudaIpcMemHandle_t h;
        memcpy(&h, handle, sizeof h);
        if (e == cudaSuccess)
            e = cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess);
        if (e != cudaSuccess) {
            check_sticky(cb, g, e, "cudaIpcOpenMemHandle");
            snprintf(msg, msg_len, "cannot open the IPC handle on %s: %s", g->uuid,
                     cudaGetErrorString(e));
            return e == cudaErrorMemoryAllocation ? LA_ENOMEM : LA_EINVAL;
        }
        CUdeviceptr base = 0;
        size_t real = 0;
        if (!cb->get_range ||
            cb->get_range(&base, &real, (CUdeviceptr)(uintptr_t)ptr) != CUDA_SUCCESS) {
            cudaIpcCloseMemHandle(ptr);
            snprintf(msg, msg_len, "cannot find the size of the imported allocation");
            return LA_EDEVICE;
        }
        if ((uintptr_t)base != (uintptr_t)ptr) {
            cudaIpcCloseMemHandle(ptr);
            snprintf(msg, msg_len, "the IPC handle does not name an allocation's base");
            return LA_EINVAL;
        }
        imp = calloc(1, sizeof *imp);
        if (!imp) {
            cudaIpcCloseMemHandle(ptr);
            return LA_ENOMEM;
        }
        memcpy(imp->handle, handle, len);
        imp->g = g;
        imp->ptr = ptr;
        imp->size = real;
        imp->next = cb->imports;
        cb->imports = imp;
    }
    if (size > imp->size) {
        snprintf(msg, msg_len, "%llu bytes claimed, but the allocation holds %llu",
                 (unsigned long long)size, (unsigned long long)imp->size);
        if (imp->refs == 0) {
            be_import **pp = &cb->imports;
            while (*pp != imp)
                pp = &(*pp)->next;
            *pp = imp->next;
            cudaIpcCloseMemHandle(imp->ptr); /* nothing used it yet: nothing to wait for */
            free(imp);
        }
        return LA_ERANGE;
    }
    imp->refs++;
    *ret_imp = imp;
    *ret_ptr = imp->ptr;
    *ret_size = imp->size;
    *ret_dev = dev;
    return 0;
}

/* ---- VMM imports ---------------------------------------------------------------------- */

/* An LA_E* code for a failed import of a client's fd. */
static int vmm_import_code(CUresult r)
{
    switch (r) {
    case CUDA_ERROR_OUT_OF_MEMORY: return LA_ENOMEM;
    case CUDA_ERROR_NOT_PERMITTED: return LA_EPERM;
    case CUDA_ERROR_NOT_SUPPORTED: return LA_ENOTSUP;
    default: return LA_EINVAL;
    }
}

/* Imports fd as allocation imp->n_mapped of imp, checks it and maps it at its place. On error
 * nothing of this allocation is left (the ones before stay mapped). Loop thread. */
static int vmm_map_next(cuda_backend *cb, be_import *imp, int fd, uint64_t *ret_granularity,
                        char *msg, size_t msg_len)
{
    gpu *g = imp->g;
    size_t i = imp->n_mapped;
    if (i >= imp->n_allocs) {
        snprintf(msg, msg_len, "all %zu allocations are mapped already", imp->n_allocs);
        return LA_EINVAL;
    }
    cudaError_t ce = cudaSetDevice(g->ordinal);
    if (ce != cudaSuccess) {
        check_sticky(cb, g, ce, "cudaSetDevice");
        snprintf(msg, msg_len, "cudaSetDevice: %s", cudaGetErrorString(ce));
        return LA_EDEVICE;
    }
    CUmemGenericAllocationHandle h = 0;
    CUresult r = cb->vmm.Import(&h, (void *)(uintptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
    if (r != CUDA_SUCCESS) {
        snprintf(msg, msg_len,
                 "allocation %zu: the fd is not a CUDA allocation this GPU can import "
                 "(cuMemImportFromShareableHandle: %s)",
                 i, cu_err(cb, r));
        return vmm_import_code(r);
    }
    int rc = 0;
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    size_t gran = 0, rec = 0;
    if ((r = cb->vmm.Props(&prop, h)) != CUDA_SUCCESS) {
        snprintf(msg, msg_len, "allocation %zu: cuMemGetAllocationPropertiesFromHandle: %s", i,
                 cu_err(cb, r));
        rc = LA_EINVAL;
        goto fail;
    }
    if (prop.type != CU_MEM_ALLOCATION_TYPE_PINNED ||
        prop.location.type != CU_MEM_LOCATION_TYPE_DEVICE) {
        snprintf(msg, msg_len, "allocation %zu is not device memory (type %d, location type %d)",
                 i, (int)prop.type, (int)prop.location.type);
        rc = LA_EINVAL;
        goto fail;
    }
    /* The properties of an imported handle name the device in this process's numbering. */
    if (prop.location.id != g->ordinal) {
        const char *where = prop.location.id >= 0 && prop.location.id < cb->n
                                ? cb->gpus[prop.location.id].uuid
                                : "a GPU this daemon does not use";
        snprintf(msg, msg_len, "allocation %zu lives on %s, not on %s as the request says", i,
                 where, g->uuid);
        rc = LA_ENODEV;
        goto fail;
    }
    if ((r = cb->vmm.Granularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM)) != CUDA_SUCCESS ||
        gran == 0) {
        snprintf(msg, msg_len, "cuMemGetAllocationGranularity: %s", cu_err(cb, r));
        rc = LA_EDEVICE;
        goto fail;
    }
    if (i == 0) {
        /* Every listed size must be a whole number of granules (cuMemMap maps nothing else). */
        for (size_t k = 0; k < imp->n_allocs; k++)
            if (imp->sizes[k] % gran) {
                snprintf(msg, msg_len,
                         "allocation %zu: %llu bytes is not a multiple of the GPU's VMM "
                         "granularity (%zu bytes)",
                         k, (unsigned long long)imp->sizes[k], gran);
                rc = LA_EINVAL;
                goto fail;
            }
        if (cb->vmm.Granularity(&rec, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED) != CUDA_SUCCESS ||
            rec == 0 || rec % gran)
            rec = gran;
        if ((r = cb->vmm.Reserve(&imp->va, imp->va_size, rec, 0, 0)) != CUDA_SUCCESS) {
            imp->va = 0;
            snprintf(msg, msg_len, "cannot reserve %zu bytes of device address space: %s",
                     imp->va_size, cu_err(cb, r));
            rc = LA_ENOMEM;
            goto fail;
        }
        if (ret_granularity)
            *ret_granularity = gran;
    }
    size_t off = 0;
    for (size_t k = 0; k < i; k++)
        off += (size_t)imp->sizes[k];
    size_t len = (size_t)imp->sizes[i];
    /* cuMemMap refuses a size past the allocation's end: the claimed size is checked here. */
    if ((r = cb->vmm.Map(imp->va + off, len, 0, h, 0)) != CUDA_SUCCESS) {
        snprintf(msg, msg_len,
                 "allocation %zu: cannot map %zu bytes of it (cuMemMap: %s): it is smaller than "
                 "listed",
                 i, len, cu_err(cb, r));
        rc = r == CUDA_ERROR_OUT_OF_MEMORY ? LA_ENOMEM : LA_ERANGE;
        goto fail;
    }
    CUmemAccessDesc d;
    memset(&d, 0, sizeof d);
    d.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    d.location.id = g->ordinal;
    d.flags = imp->flags;
    r = cb->vmm.SetAccess(imp->va + off, len, &d, 1);
    if (r != CUDA_SUCCESS && imp->flags == CU_MEM_ACCESS_FLAGS_PROT_READ) {
        /* A driver without read-only device mappings: the engine still refuses writes. */
        logf_(cb, LOG_INFO,
              "GPU %s: read-only VMM mapping refused (%s); mapping read-write, the daemon's "
              "checks keep it read-only",
              g->uuid, cu_err(cb, r));
        imp->flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        d.flags = imp->flags;
        r = cb->vmm.SetAccess(imp->va + off, len, &d, 1);
    }
    if (r != CUDA_SUCCESS) {
        cb->vmm.Unmap(imp->va + off, len);
        snprintf(msg, msg_len, "allocation %zu: cuMemSetAccess: %s", i, cu_err(cb, r));
        rc = LA_EDEVICE;
        goto fail;
    }
    imp->handles[i] = h;
    imp->n_mapped++;
    return 0;
fail:
    cb->vmm.Release(h);
    return rc;
}

static int cu_vmm_import(be_backend *b, const be_vmm_req *req, int fd, be_import **ret_imp,
                         void **ret_ptr, int *ret_dev, uint64_t *ret_granularity, char *msg,
                         size_t msg_len)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (!cb->vmm.Import) {
        snprintf(msg, msg_len, "the CUDA driver lacks the VMM API (cuMemImportFromShareableHandle)");
        return LA_ENOTSUP;
    }
    if (atomic_load(&cb->fatal))
        return LA_EDEVICE;
    int dev;
    if (!req->uuid || !req->uuid[0] || cu_find_device(b, req->uuid, &dev) != 0) {
        snprintf(msg, msg_len, "no GPU '%s' on this host", req->uuid ? req->uuid : "");
        return LA_ENODEV;
    }
    be_import *imp = calloc(1, sizeof *imp);
    if (imp) {
        imp->sizes = malloc(req->n_allocs * sizeof *imp->sizes);
        imp->handles = calloc(req->n_allocs, sizeof *imp->handles);
    }
    if (!imp || !imp->sizes || !imp->handles) {
        if (imp) {
            free(imp->sizes);
            free(imp->handles);
        }
        free(imp);
        return LA_ENOMEM;
    }
    imp->vmm = 1;
    imp->g = &cb->gpus[dev];
    imp->refs = 1;
    imp->n_allocs = req->n_allocs;
    for (size_t i = 0; i < req->n_allocs; i++) {
        imp->sizes[i] = req->alloc_sizes[i];
        imp->va_size += (size_t)req->alloc_sizes[i];
    }
    imp->flags = (req->access & LA_ACCESS_WRITE) ? CU_MEM_ACCESS_FLAGS_PROT_READWRITE
                                                 : CU_MEM_ACCESS_FLAGS_PROT_READ;
    int rc = vmm_map_next(cb, imp, fd, ret_granularity, msg, msg_len);
    if (rc < 0) {
        vmm_free(cb, imp); /* nothing ran on it */
        return rc;
    }
    imp->ptr = (void *)(uintptr_t)(imp->va + req->offset);
    imp->size = req->size;
    *ret_imp = imp;
    *ret_ptr = imp->ptr;
    *ret_dev = dev;
    return 0;
}

static int cu_vmm_append(be_backend *b, be_import *imp, int fd, uint64_t alloc_size, char *msg,
                         size_t msg_len)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (!imp || !imp->vmm)
        return LA_EINVAL;
    if (atomic_load(&cb->fatal))
        return LA_EDEVICE;
    if (imp->n_mapped >= imp->n_allocs || alloc_size != imp->sizes[imp->n_mapped]) {
        snprintf(msg, msg_len, "allocation of %llu bytes does not fit the list",
                 (unsigned long long)alloc_size);
        return LA_EINVAL;
    }
    return vmm_map_next(cb, imp, fd, NULL, msg, msg_len);
}

static void cu_buffer_release(be_backend *b, be_import *imp)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (!imp || --imp->refs > 0)
        return;
    if (imp->vmm) {
        /* The service thread unmaps it (it may be busy in the driver; the loop stays free). */
        if (service(imp->g, (task){.kind = T_GRAVE_VMM, .vmm = imp}) < 0)
            vmm_free(cb, imp);
        return;
    }
    be_import **pp = &cb->imports;
    while (*pp && *pp != imp)
        pp = &(*pp)->next;
    if (*pp)
        *pp = imp->next;
    gpu *g = imp->g;
    if (service(g, (task){.kind = T_GRAVE_IPC, .ipc_ptr = imp->ptr}) < 0)
        logf_(cb, LOG_WARN, "GPU %s: out of memory; an IPC import stays open", g->uuid);
    free(imp);
}

static void cu_doorbell_release(be_backend *b, be_doorbell *db, void (*unmap)(be_doorbell *db))
{
    cuda_backend *cb = (cuda_backend *)b;
    int st = atomic_load(&db->cuda_state);
    if (st == 0 || st == -1 || cb->n < 1) {
        unmap(db); /* never registered with CUDA */
        return;
    }
    /* Registered, or being registered by that GPU's service thread (cuda_gpu, set by the
     * first call's submit): it unregisters it after, in order. */
    gpu *g = &cb->gpus[db->cuda_gpu >= 0 && db->cuda_gpu < cb->n ? db->cuda_gpu : 0];
    if (service(g, (task){.kind = T_GRAVE_DOORBELL, .db = db, .unmap = unmap}) < 0)
        logf_(cb, LOG_WARN, "GPU %s: out of memory; a doorbell stays mapped", g->uuid);
}

static int cu_submit(be_backend *b, be_job *job)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (job->dev < 0 || job->dev >= cb->n)
        return LA_ENODEV;
    if (atomic_load(&cb->fatal))
        return LA_EDEVICE;
    gpu *g = &cb->gpus[job->dev];
    task *t = NULL;
    int expect = 0;
    if (job->db && atomic_load(&job->db->cuda_state) == 0 && !(t = calloc(1, sizeof *t)))
        return LA_ENOMEM;
    pthread_mutex_lock(&g->lock);
    if (g->stopping) {
        pthread_mutex_unlock(&g->lock);
        free(t);
        return LA_ESHUTDOWN;
    }
    int rc = fq_push(&g->q, job);
    if (rc == 0 && t && atomic_compare_exchange_strong(&job->db->cuda_state, &expect, 1)) {
        /* The doorbell's first call: this GPU's service thread registers it. */
        job->db->cuda_gpu = job->dev;
        t->kind = T_DOORBELL;
        t->db = job->db;
        task_push(g, t);
        t = NULL;
    }
    if (rc == 0)
        pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
    free(t);
    return rc;
}

/* Launched work cannot be taken back; what is still queued is, and a launched call still
 * waiting for its doorbell is released. */
static void cu_cancel(be_backend *b, uint64_t conn_id, int all, int code)
{
    cuda_backend *cb = (cuda_backend *)b;
    for (int i = 0; i < cb->n; i++) {
        gpu *g = &cb->gpus[i];
        if (!g->cb)
            continue;
        pthread_mutex_lock(&g->lock);
        be_job *list = fq_take(&g->q, conn_id, all);
        release_waits(g, conn_id, all, code);
        pthread_mutex_unlock(&g->lock);
        while (list) {
            be_job *next = list->be_next;
            list->be_next = NULL;
            finish(g, list, code,
                   code == LA_ECLOSED ? "GPU %s: cancelled: the connection closed%s"
                                      : "GPU %s: cancelled: the daemon is shutting down%s",
                   "");
            list = next;
        }
    }
}

static void cu_stop(be_backend *b)
{
    cuda_backend *cb = (cuda_backend *)b;
    for (int i = 0; i < cb->n; i++) {
        gpu *g = &cb->gpus[i];
        if (!g->cb)
            continue; /* never initialised */
        pthread_mutex_lock(&g->lock);
        g->stopping = 1;
        be_job *list = fq_take(&g->q, 0, 1);
        release_waits(g, 0, 1, LA_ESHUTDOWN);
        pthread_cond_broadcast(&g->cond);
        pthread_cond_broadcast(&g->scond);
        pthread_cond_broadcast(&g->wcond);
        pthread_mutex_unlock(&g->lock);
        while (list) {
            be_job *next = list->be_next;
            list->be_next = NULL;
            finish(g, list, LA_ESHUTDOWN, "GPU %s: the daemon is shutting down%s", "");
            list = next;
        }
    }
    for (int i = 0; i < cb->n; i++) {
        gpu *g = &cb->gpus[i];
        if (!g->cb)
            continue;
        if (g->started) {
            pthread_join(g->thread, NULL);
            g->started = 0;
        }
        if (g->service_started) {
            pthread_join(g->service, NULL);
            g->service_started = 0;
        }
        if (g->watch_started) {
            pthread_join(g->watch, NULL);
            g->watch_started = 0;
        }
        /* Callbacks of a lost context may never run: fail what is left. */
        fail_all(g, "the CUDA context was lost (sticky error); the daemon restarts");
    }
}

static void gpu_teardown(gpu *g)
{
    if (!g->cb)
        return;
    int dev_ok = cudaSetDevice(g->ordinal) == cudaSuccess;
    if (dev_ok)
        cudaDeviceSynchronize();
    /* What the service thread had no time for (the threads have stopped). */
    while (g->tasks) {
        task *t = g->tasks;
        g->tasks = t->next;
        run_task(g, t);
    }
    g->tasks_tail = NULL;
    for (int k = 0; k < g->n_lanes; k++) {
        if (g->lanes[k].s)
            cudaStreamDestroy(g->lanes[k].s);
        if (g->lanes[k].cs)
            cudaStreamDestroy(g->lanes[k].cs);
        g->lanes[k].s = g->lanes[k].cs = NULL;
    }
    for (int k = 0; k < N_SLOTS; k++)
        if (g->slot_ev[k])
            cudaEventDestroy(g->slot_ev[k]);
    gguard_teardown(&g->guard);
    for (int k = 0; k < N_EVENTS; k++)
        if (g->events[k])
            cudaEventDestroy(g->events[k]);
    for (int k = 0; k < N_WAIT_CACHE; k++)
        if (g->wait_cache[k].ev)
            cudaEventDestroy(g->wait_cache[k].ev);
    if (g->d_tiles)
        cudaFree(g->d_tiles);
    if (g->h_tiles)
        cudaFreeHost(g->h_tiles);
    if (g->stream)
        cudaStreamDestroy(g->stream);
    g->d_tiles = NULL;
    g->h_tiles = NULL;
    g->stream = NULL;
    pthread_mutex_destroy(&g->lock);
    pthread_cond_destroy(&g->cond);
    pthread_cond_destroy(&g->scond);
    pthread_cond_destroy(&g->wcond);
}

static void cu_free(be_backend *b)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (!cb)
        return;
    cu_stop(b);
    while (cb->imports) { /* the engine released every buffer before; defensive */
        be_import *imp = cb->imports;
        cb->imports = imp->next;
        cudaIpcCloseMemHandle(imp->ptr);
        free(imp);
    }
    for (int i = 0; i < cb->n; i++)
        gpu_teardown(&cb->gpus[i]);
    free(cb->gpus);
    free(cb);
}

static int cu_fatal(const be_backend *b)
{
    cuda_backend *cb = (cuda_backend *)b;
    return atomic_load(&cb->fatal);
}

static const be_ops cuda_ops = {
    .name = "cuda",
    .devices = cu_devices,
    .find_device = cu_find_device,
    .tile_sizes = cu_tile_sizes,
    .supports = cu_supports,
    .mask_alloc = cu_mask_alloc,
    .mask_free = cu_mask_free,
    .buffer_import = cu_buffer_import,
    .vmm_import = cu_vmm_import,
    .vmm_append = cu_vmm_append,
    .buffer_release = cu_buffer_release,
    .submit = cu_submit,
    .cancel = cu_cancel,
    .stop = cu_stop,
    .free = cu_free,
    .fatal = cu_fatal,
    .fastpath = cu_fastpath,
    .doorbell_release = cu_doorbell_release,
};

/* Whether g can take doorbell calls: the driver's stream memory operations (the _v2 entry
 * points CUDA 12 made default; the deprecated v1 attribute only says whether the old API is
 * on) and host memory mapped at the host's address. Only 32-bit operations are used (values
 * compare cyclically), so the 64-bit attribute is reported, not required. */
static void probe_fastpath(cuda_backend *cb, gpu *g, dev_get_fn dev_get, dev_attr_fn attr)
{
    CUdevice d;
    int host_ptr = 0, v1 = -1, b64 = -1;
    if (!cb->wait32 || !cb->write32) {
        snprintf(g->fastpath_why, sizeof g->fastpath_why,
                 "the CUDA driver lacks stream memory operations (cuStreamWaitValue32)");
        return;
    }
    if (!dev_get || !attr || dev_get(&d, g->ordinal) != CUDA_SUCCESS ||
        attr(&host_ptr, CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM, d) !=
            CUDA_SUCCESS) {
        snprintf(g->fastpath_why, sizeof g->fastpath_why,
                 "the CUDA driver cannot tell the device's attributes");
        return;
    }
    attr(&v1, CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1, d);
    attr(&b64, CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS, d);
    if (!host_ptr) {
        snprintf(g->fastpath_why, sizeof g->fastpath_why,
                 "the GPU cannot use registered host memory at the host's address");
        return;
    }
    g->fastpath = 1;
    logf_(cb, LOG_INFO,
          "GPU %s: fast path on (32-bit stream memory operations; 64-bit: %s; v1 API: %s)", g->uuid,
          b64 > 0    ? "yes"
          : b64 == 0 ? "no"
                     : "?",
          v1 > 0    ? "on"
          : v1 == 0 ? "off"
                    : "?");
}

static int gpu_init(cuda_backend *cb, gpu *g, int ordinal, dev_get_fn dev_get, dev_attr_fn attr,
                    char *msg, size_t msg_len)
{
    struct cudaDeviceProp prop;
    cudaError_t e = cudaGetDeviceProperties(&prop, ordinal);
    if (e != cudaSuccess)
        goto fail;
    g->cb = cb;
    g->ordinal = ordinal;
    g->cc = prop.major * 10 + prop.minor;
    format_uuid(&prop.uuid, g->uuid, sizeof g->uuid);
    snprintf(g->name, sizeof g->name, "%.95s", prop.name);
    g->memory = prop.totalGlobalMem;
    pthread_mutex_init(&g->lock, NULL);
    pthread_cond_init(&g->cond, NULL);
    /* The service thread waits for doorbell deadlines on the monotonic clock. */
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g->scond, &ca);
    pthread_cond_init(&g->wcond, &ca);
    pthread_condattr_destroy(&ca);
    fq_init(&g->q);
    gguard_init(&g->guard, N_SLOTS);
    if ((e = cudaSetDevice(ordinal)) != cudaSuccess || (e = cudaFree(NULL)) != cudaSuccess)
        goto fail;
    /* Whether this context is an MPS client: CUDA's own answer, read once the (primary) context
     * exists, since the driver connects to the MPS control daemon when it creates it. A pipe
     * directory with a control socket only says that a control daemon runs; the attribute says
     * that this context went through it (it does not if the control daemon started later, or
     * if an MPS server of another user holds the GPU: then context creation waits instead). */
    int mps = -1;
    if (cudaDeviceGetAttribute(&mps, cudaDevAttrMpsEnabled, ordinal) != cudaSuccess) {
        cudaGetLastError(); /* a driver older than the attribute: unknown */
        mps = -1;
    }
    g->mps = mps < 0 ? -1 : mps != 0;
    g->sm_count = (uint32_t)prop.multiProcessorCount;
    if (cb->exec_affinity) {
        /* Under MPS with an active thread percentage, fewer SMs than the GPU has. */
        CUexecAffinityParam aff;
        memset(&aff, 0, sizeof aff);
        if (cb->exec_affinity(&aff, CU_EXEC_AFFINITY_TYPE_SM_COUNT) == CUDA_SUCCESS &&
            aff.param.smCount.val > 0)
            g->sm_count = aff.param.smCount.val;
    }
    if ((e = cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking)) != cudaSuccess ||
        (e = cudaMalloc((void **)&g->d_tiles, N_SLOTS * sizeof *g->d_tiles)) != cudaSuccess ||
        (e = cudaHostAlloc((void **)&g->h_tiles, N_SLOTS * sizeof *g->h_tiles,
                           cudaHostAllocPortable)) != cudaSuccess ||
        (e = gguard_alloc(&g->guard)) != cudaSuccess)
        goto fail;
    for (int k = 0; k < N_EVENTS; k++) {
        if ((e = cudaEventCreateWithFlags(
                 &g->events[k], cudaEventDisableTiming | cudaEventInterprocess)) != cudaSuccess ||
            (e = cudaIpcGetEventHandle(&g->event_handles[k], g->events[k])) != cudaSuccess)
            goto fail;
    }
    for (int k = 0; k < N_SLOTS; k++) {
        if ((e = cudaEventCreateWithFlags(&g->slot_ev[k], cudaEventDisableTiming)) != cudaSuccess)
            goto fail;
        g->free_slots[k] = N_SLOTS - 1 - k;
        g->slot_ctx[k].g = g;
        g->slot_ctx[k].slot = k;
    }
    g->n_free_slots = N_SLOTS;
    probe_fastpath(cb, g, dev_get, attr);
    if (pthread_create(&g->thread, NULL, gpu_main, g) != 0) {
        snprintf(msg, msg_len, "GPU %d: cannot start its launcher thread", ordinal);
        return LA_ENOMEM;
    }
    g->started = 1;
    pthread_setname_np(g->thread, "la-gpu-launch");
    if (pthread_create(&g->service, NULL, gpu_service, g) != 0) {
        snprintf(msg, msg_len, "GPU %d: cannot start its service thread", ordinal);
        return LA_ENOMEM;
    }
    g->service_started = 1;
    pthread_setname_np(g->service, "la-gpu-service");
    if (pthread_create(&g->watch, NULL, gpu_watch, g) != 0) {
        snprintf(msg, msg_len, "GPU %d: cannot start its doorbell watchdog", ordinal);
        return LA_ENOMEM;
    }
    g->watch_started = 1;
    pthread_setname_np(g->watch, "la-gpu-watch");
    return 0;
fail:
    snprintf(msg, msg_len, "GPU %d (%s): %s", ordinal, g->uuid[0] ? g->uuid : "?",
             cudaGetErrorString(e));
    return map_err(e);
}

/* A driver entry point of the CUDA 12 ABI, or NULL. */
static void *driver_fn(const char *name)
{
    enum cudaDriverEntryPointQueryResult q;
    void *fn = NULL;
    if (cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
        return NULL;
    return fn;
}

int be_cuda_new(be_complete_fn complete, void *complete_data, logsink_fn log, void *log_data,
                be_backend **ret, char *msg, size_t msg_len)
{
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count <= 0) {
        /* Without libcuda the runtime says "CUDA driver version is insufficient for CUDA
         * runtime version", which reads as an old driver; a driver version of 0 means none. */
        int drv = 0;
        if (cudaDriverGetVersion(&drv) != cudaSuccess)
            drv = 0;
        if (drv == 0 || e == cudaErrorNoDevice || (e == cudaSuccess && count <= 0))
            snprintf(msg, msg_len, "no NVIDIA driver/GPU found%s",
                     drv == 0 ? " (no NVIDIA driver is loaded)" : " (the driver sees no GPU)");
        else if (e == cudaErrorInsufficientDriver)
            snprintf(msg, msg_len,
                     "the NVIDIA driver (CUDA %d.%d) is older than this build's "
                     "CUDA runtime (%d.%d): update the driver",
                     drv / 1000, drv % 1000 / 10, CUDART_VERSION / 1000,
                     CUDART_VERSION % 1000 / 10);
        else
            snprintf(msg, msg_len, "no usable GPU (%s)", cudaGetErrorString(e));
        return LA_ENODEV;
    }
    if (count > MAX_DEVICES)
        count = MAX_DEVICES;
    cuda_backend *cb = calloc(1, sizeof *cb);
    if (!cb)
        return LA_ENOMEM;
    cb->base.ops = &cuda_ops;
    cb->base.complete = complete;
    cb->base.complete_data = complete_data;
    cb->base.log = log;
    cb->base.log_data = log_data;
    cb->base.doorbell_timeout_ns = 60ull * 1000000000u;
    atomic_init(&cb->fatal, 0);
    cb->gpus = calloc((size_t)count, sizeof *cb->gpus);
    if (!cb->gpus) {
        free(cb);
        return LA_ENOMEM;
    }
    cb->get_range = (get_range_fn)driver_fn("cuMemGetAddressRange");
    if (!cb->get_range) {
        snprintf(msg, msg_len, "the CUDA driver lacks cuMemGetAddressRange");
        free(cb->gpus);
        free(cb);
        return LA_ENODEV;
    }
    /* Stream memory operations: without them the fast path is off (calls that name a
     * doorbell get LA_ENOTSUP with the reason); everything else works. */
    cb->wait32 = (value32_fn)driver_fn("cuStreamWaitValue32");
    cb->write32 = (value32_fn)driver_fn("cuStreamWriteValue32");
    dev_get_fn dev_get = (dev_get_fn)driver_fn("cuDeviceGet");
    dev_attr_fn attr = (dev_attr_fn)driver_fn("cuDeviceGetAttribute");
    /* VMM imports need all of these; without them VMM buffers are refused (LA_ENOTSUP). */
    struct {
        const char *name;
        void **slot;
    } vmm_syms[] = {
        {"cuMemImportFromShareableHandle", (void **)&cb->vmm.Import},
        {"cuMemGetAllocationPropertiesFromHandle", (void **)&cb->vmm.Props},
        {"cuMemGetAllocationGranularity", (void **)&cb->vmm.Granularity},
        {"cuMemAddressReserve", (void **)&cb->vmm.Reserve},
        {"cuMemAddressFree", (void **)&cb->vmm.Free},
        {"cuMemMap", (void **)&cb->vmm.Map},
        {"cuMemUnmap", (void **)&cb->vmm.Unmap},
        {"cuMemSetAccess", (void **)&cb->vmm.SetAccess},
        {"cuMemRelease", (void **)&cb->vmm.Release},
        {"cuGetErrorName", (void **)&cb->vmm.ErrorName},
    };
    int vmm_ok = 1;
    for (size_t i = 0; i < sizeof vmm_syms / sizeof vmm_syms[0]; i++)
        if (!(*vmm_syms[i].slot = driver_fn(vmm_syms[i].name)))
            vmm_ok = 0;
    if (!vmm_ok)
        cb->vmm.Import = NULL;
    *(void **)&cb->exec_affinity = driver_fn("cuCtxGetExecAffinity");
    for (int i = 0; i < count; i++) {
        int rc = gpu_init(cb, &cb->gpus[i], i, dev_get, attr, msg, msg_len);
        cb->n = i + 1;
        if (rc < 0) {
            cu_free(&cb->base);
            return rc == LA_ENOMEM ? rc : LA_ENODEV;
        }
        if (!cb->gpus[i].fastpath)
            logf_(cb, LOG_INFO, "GPU %s: fast path off: %s", cb->gpus[i].uuid,
                  cb->gpus[i].fastpath_why);
    }
    *ret = &cb->base;
    return 0;
}

#endif /* LA_HAVE_CUDA */
