/*
 * backend_cuda.c — the CUDA backend: one worker thread per GPU, each with its own non-blocking
 * stream; the kernels of kernels/la_cuda.h; client memory by CUDA IPC and by VMM fds.
 *
 * Over 900 lines on purpose: the worker, the stream callbacks, the IPC import cache and the
 * graveyard all work on one per-device state under one lock, which splitting the file would
 * have to export to every part.
 *
 * The loop thread never waits for the GPU. It only enqueues stream-ordered work that returns at
 * once (cudaMallocAsync + cudaMemsetAsync of new masks) and hands jobs to the device's worker.
 * The worker, per job: makes the stream wait on the client's IPC event, zeroes the job's
 * tile counter, sets the layer's mask to all ones when the layer starts over (a step lower
 * than its last one), launches the kernel, copies the counter and (when the mask changed) the
 * layer's mask back into pinned host memory (the host view the loop thread reads for live
 * fractions and mask reads), records an interprocess completion event (whose handle goes back
 * to the client) and enqueues a host function that completes the job once the stream got
 * there. The host function makes no CUDA call; it queues the completion for the loop thread.
 *
 * Frees that may synchronise (cudaFreeHost, cudaIpcCloseMemHandle) are not made on the loop
 * thread: the engine calls mask_free / buffer_release once the last job using the object has
 * completed, and they go to a per-device graveyard that the worker empties when its stream is
 * idle (device masks are freed stream-ordered at once).
 *
 * A sticky error (illegal address, launch failure, ...) poisons the context: the worker fails
 * every job in flight with LA_EDEVICE and sets the backend's fatal flag; the server then fails
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

#include "fairq.h"
#include "la_cuda.h"

#define N_SLOTS 1024 /* jobs in flight per device (tile counters) */
#define N_EVENTS 256 /* completion IPC events per device, used round robin */
#define MAX_DEVICES 64
#define N_WAIT_CACHE 64 /* client IPC events kept open per device, replaced round robin */
/* Jobs launched on a stream and not finished yet. Few, so that the fair queue (fairq.h), not
 * the stream's FIFO, decides what runs next; enough to hide the launch gap between calls. */
#define STREAM_DEPTH 3

typedef CUresult (*get_range_fn)(CUdeviceptr *pbase, size_t *psize, CUdeviceptr dptr);

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

/* A device object whose release may synchronise: done by the worker when the stream is idle. */
typedef struct grave {
    struct grave *next;
    void *dev_ptr;  /* cudaFreeAsync (mask) */
    void *host;     /* cudaFreeHost (mask shadow) */
    void *ipc_ptr;  /* cudaIpcCloseMemHandle */
    be_import *vmm; /* unmapped and released (vmm_free) */
    int dev_freed;
} grave;

typedef struct gpu gpu;
typedef struct cuda_backend cuda_backend;

/* What a stream host function gets: stable for the backend's life, unlike the job. */
typedef struct slot_ctx {
    gpu *g;
    int slot;
} slot_ctx;

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
    cudaStream_t stream;
    pthread_t thread;
    int started;

    pthread_mutex_t lock;
    pthread_cond_t cond;
    fq q;                      /* queued */
    be_job *slot_job[N_SLOTS]; /* launched, host function not run yet, by counter slot */
    slot_ctx slot_ctx[N_SLOTS];
    int n_inflight;
    grave *graves;
    int stopping;

    unsigned long long *d_tiles; /* [N_SLOTS] device counters */
    unsigned long long *h_tiles; /* [N_SLOTS] pinned copies */
    int free_slots[N_SLOTS];
    int n_free_slots;

    cudaEvent_t events[N_EVENTS];
    cudaIpcEventHandle_t event_handles[N_EVENTS];
    unsigned next_event;

    /* Clients reuse a few events, so opened IPC event handles are kept (worker thread only). */
    struct {
        uint8_t handle[64];
        cudaEvent_t ev;
    } wait_cache[N_WAIT_CACHE];
    unsigned wait_next;
};

struct cuda_backend {
    be_backend base;
    gpu *gpus;
    int n;
    be_import *imports;
    get_range_fn get_range;
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

/* Stream host function: the job's GPU work is done. No CUDA calls allowed here. */
static void CUDART_CB host_done(void *arg)
{
    slot_ctx *ctx = arg;
    gpu *g = ctx->g;
    pthread_mutex_lock(&g->lock);
    be_job *j = g->slot_job[ctx->slot];
    if (!j) { /* already failed by the sticky-error path (and maybe freed) */
        pthread_mutex_unlock(&g->lock);
        return;
    }
    g->slot_job[ctx->slot] = NULL;
    g->n_inflight--;
    j->tiles_computed = (int64_t)g->h_tiles[ctx->slot];
    slot_put(g, ctx->slot);
    j->be_slot = -1;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
    /* Not under g->lock: the loop thread submits under it. */
    if (j->mask && (j->p.mode != LA_MODE_DENSE || j->mask_restart) && !j->p.decisions) {
        /* The host view of the region was refreshed before this host function ran. */
        j->has_live = 1;
        j->live_bits = be_mask_live((const uint32_t *)((char *)j->mask->host + j->mask_off),
                                    j->mask_len, j->mask_words, j->mask_k_tiles);
    }
    finish(g, j, 0, NULL, NULL);
}

/* Fails every job in flight or queued on g (sticky error). */
static void fail_all(gpu *g, const char *why)
{
    pthread_mutex_lock(&g->lock);
    be_job *list = NULL, *q = fq_take(&g->q, 0, 1);
    /* Their slots stay out of use: the dead context may still hold work on them. */
    for (int k = 0; k < N_SLOTS && g->n_inflight > 0; k++)
        if (g->slot_job[k]) {
            g->slot_job[k]->be_next = list;
            list = g->slot_job[k];
            g->slot_job[k] = NULL;
            g->n_inflight--;
        }
    g->n_inflight = 0;
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

/* ---- the worker ------------------------------------------------------------------------ */

static void launch(gpu *g, be_job *j)
{
    cudaError_t e;
    j->be_priv = g;
    j->be_slot = -1;
    j->t_start_ns = be_now_ns();
    if (j->has_wait_event) {
        cudaEvent_t ev = NULL;
        for (int k = 0; k < N_WAIT_CACHE && !ev; k++)
            if (g->wait_cache[k].ev && !memcmp(g->wait_cache[k].handle, j->wait_event, 64))
                ev = g->wait_cache[k].ev;
        if (!ev) {
            cudaIpcEventHandle_t h;
            memcpy(&h, j->wait_event, sizeof h);
            e = cudaIpcOpenEventHandle(&ev, h);
            if (e != cudaSuccess) {
                check_sticky(g->cb, g, e, "cudaIpcOpenEventHandle");
                finish(g, j, is_sticky(e) ? LA_EDEVICE : LA_EINVAL,
                       "GPU %s: cannot open the wait event: %s", cudaGetErrorString(e));
                return;
            }
            unsigned k = g->wait_next++ % N_WAIT_CACHE;
            /* Destroying an event a wait was enqueued on is fine: the wait keeps what it
             * needs until the device is done with it. */
            if (g->wait_cache[k].ev)
                cudaEventDestroy(g->wait_cache[k].ev);
            g->wait_cache[k].ev = ev;
            memcpy(g->wait_cache[k].handle, j->wait_event, 64);
        }
        if ((e = cudaStreamWaitEvent(g->stream, ev, 0)) != cudaSuccess) {
            check_sticky(g->cb, g, e, "cudaStreamWaitEvent");
            finish(g, j, map_err(e), "GPU %s: %s", cudaGetErrorString(e));
            return;
        }
    }
    int slot = -1;
    pthread_mutex_lock(&g->lock);
    if (g->n_free_slots > 0)
        slot = g->free_slots[--g->n_free_slots];
    pthread_mutex_unlock(&g->lock);
    if (slot < 0) {
        finish(g, j, LA_EBUSY, "GPU %s: too many calls in flight%s", "");
        return;
    }
    j->be_slot = slot;
    if (j->mask_ready && !atomic_load(j->mask_ready)) {
        /* The region's first call: all ones, on the device in stream order and in the host
         * view here (the worker's time, not the loop's). */
        if ((e = cudaMemsetAsync((char *)j->mask->dev_ptr + j->mask_off, 0xff, (size_t)j->mask_len,
                                 g->stream)) != cudaSuccess)
            goto fail;
        memset((char *)j->mask->host + j->mask_off, 0xff, (size_t)j->mask_len);
        atomic_store(j->mask_ready, 1);
    }
    unsigned long long *counter = g->d_tiles + slot;
    if ((e = cudaMemsetAsync(counter, 0, sizeof *counter, g->stream)) != cudaSuccess)
        goto fail;
    if (j->mask_restart && j->mask &&
        (e = cudaMemsetAsync((char *)j->mask->dev_ptr + j->mask_off, 0xff, (size_t)j->mask_len,
                             g->stream)) != cudaSuccess)
        goto fail;
    j->p.ret_tiles_computed = (int64_t *)counter;
    e = la_attn_fwd_cuda(&j->p, g->stream);
    j->p.ret_tiles_computed = NULL;
    if (e != cudaSuccess)
        goto fail;
    /* The client's completion event right after the kernel, before our own copies. */
    unsigned k = g->next_event++ % N_EVENTS;
    if ((e = cudaEventRecord(g->events[k], g->stream)) != cudaSuccess)
        goto fail;
    memcpy(j->done_event, &g->event_handles[k], sizeof j->done_event);
    j->has_done_event = 1;
    if ((e = cudaMemcpyAsync(g->h_tiles + slot, counter, sizeof *counter, cudaMemcpyDeviceToHost,
                             g->stream)) != cudaSuccess)
        goto fail;
    if (j->mask && (j->p.mode != LA_MODE_DENSE || j->mask_restart) && !j->p.decisions) {
        /* Refresh the host view of this (layer, shard) mask. */
        e = cudaMemcpyAsync((char *)j->mask->host + j->mask_off,
                            (char *)j->mask->dev_ptr + j->mask_off, (size_t)j->mask_len,
                            cudaMemcpyDeviceToHost, g->stream);
        if (e != cudaSuccess)
            goto fail;
    }
    /* In flight before the host function can run. */
    pthread_mutex_lock(&g->lock);
    g->slot_job[slot] = j;
    g->n_inflight++;
    pthread_mutex_unlock(&g->lock);
    e = cudaLaunchHostFunc(g->stream, host_done, &g->slot_ctx[slot]);
    if (e != cudaSuccess) {
        pthread_mutex_lock(&g->lock);
        int mine = g->slot_job[slot] == j;
        if (mine) {
            g->slot_job[slot] = NULL;
            g->n_inflight--;
        }
        pthread_mutex_unlock(&g->lock);
        if (!mine)
            return; /* the sticky path failed it already */
        goto fail;
    }
    return;
fail:
    check_sticky(g->cb, g, e, "a launch");
    /* The counter slot may still be written by work already enqueued: it stays out of use
     * (errors after a slot was taken are launch failures: rare, and sticky ones end the
     * process anyway). */
    logf_(g->cb, 1, "GPU %s: launch failed (%s); counter slot %d retired", g->uuid,
          cudaGetErrorString(e), slot);
    j->has_done_event = 0;
    j->be_slot = -1;
    finish(g, j, map_err(e), "GPU %s: %s", cudaGetErrorString(e));
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

/* Frees what the graveyard holds; the host parts only once the stream is idle. Worker (or
 * teardown) only; g->lock not held. */
static void bury(gpu *g, int stream_idle)
{
    pthread_mutex_lock(&g->lock);
    grave *list = g->graves;
    g->graves = NULL;
    pthread_mutex_unlock(&g->lock);
    grave *keep = NULL;
    while (list) {
        grave *gr = list;
        list = gr->next;
        if (gr->dev_ptr && !gr->dev_freed) {
            cudaError_t e = cudaFreeAsync(gr->dev_ptr, g->stream);
            check_sticky(g->cb, g, e, "cudaFreeAsync");
            gr->dev_freed = 1;
        }
        if (gr->vmm) {
            /* Every job that used the mapping has completed (the engine releases an import
             * only then), and cuMemUnmap does not wait for other work: at once. */
            vmm_free(g->cb, gr->vmm);
            gr->vmm = NULL;
            if (!gr->host && !gr->ipc_ptr && (!gr->dev_ptr || gr->dev_freed)) {
                free(gr);
                continue;
            }
        }
        if (!stream_idle) {
            gr->next = keep;
            keep = gr;
            continue;
        }
        if (gr->host)
            cudaFreeHost(gr->host);
        if (gr->ipc_ptr)
            cudaIpcCloseMemHandle(gr->ipc_ptr);
        free(gr);
    }
    if (keep) {
        pthread_mutex_lock(&g->lock);
        grave **tail = &keep;
        while (*tail)
            tail = &(*tail)->next;
        *tail = g->graves;
        g->graves = keep;
        pthread_mutex_unlock(&g->lock);
    }
}

static void *gpu_main(void *arg)
{
    gpu *g = arg;
    cuda_backend *cb = g->cb;
    cudaError_t e = cudaSetDevice(g->ordinal);
    if (e != cudaSuccess)
        set_fatal(cb, g, e, "cudaSetDevice on the worker");
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
        be_job *j = g->n_inflight < STREAM_DEPTH ? fq_pick(&g->q, NULL, NULL, 1) : NULL;
        if (j) {
            /* A kernel is not preemptible: the whole call is charged as it starts. */
            fq_charge(&g->q, j, j->cost);
            fq_done(&g->q, j);
            pthread_mutex_unlock(&g->lock);
            launch(g, j);
            pthread_mutex_lock(&g->lock);
            continue;
        }
        int busy = g->n_inflight > 0 || g->graves != NULL;
        if (g->stopping && !busy)
            break;
        if (!busy) {
            pthread_cond_wait(&g->cond, &g->lock);
            continue;
        }
        /* Work in flight: watch the stream for sticky errors, empty the graveyard when idle. */
        pthread_mutex_unlock(&g->lock);
        e = cudaStreamQuery(g->stream);
        if (e != cudaSuccess && e != cudaErrorNotReady)
            check_sticky(cb, g, e, "the stream");
        if (g->graves)
            bury(g, e == cudaSuccess);
        pthread_mutex_lock(&g->lock);
        if (g->stopping && g->n_inflight > 0 && e == cudaErrorNotReady) {
            /* Shutting down: waiting here is what stop() asked for. */
            pthread_mutex_unlock(&g->lock);
            e = cudaStreamSynchronize(g->stream);
            check_sticky(cb, g, e, "cudaStreamSynchronize");
            pthread_mutex_lock(&g->lock);
            continue;
        }
        if (!g->stopping) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 2 * 1000 * 1000; /* 2 ms */
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&g->cond, &g->lock, &ts);
        }
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

/* Queues device objects for g's worker to release (bury) when the stream is idle. Returns 0,
 * or -1 when out of memory (nothing is handed over). */
static int grave_add_vmm(gpu *g, void *dev_ptr, void *host, void *ipc_ptr, be_import *vmm)
{
    grave *gr = calloc(1, sizeof *gr);
    if (!gr)
        return -1;
    gr->dev_ptr = dev_ptr;
    gr->host = host;
    gr->ipc_ptr = ipc_ptr;
    gr->vmm = vmm;
    pthread_mutex_lock(&g->lock);
    gr->next = g->graves;
    g->graves = gr;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
    return 0;
}

static int grave_add(gpu *g, void *dev_ptr, void *host, void *ipc_ptr)
{
    return grave_add_vmm(g, dev_ptr, host, ipc_ptr, NULL);
}

static int cu_mask_alloc(be_backend *b, int dev, uint64_t bytes, be_mask **ret_mask)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (dev < 0 || dev >= cb->n || bytes == 0 || bytes > SIZE_MAX)
        return LA_EINVAL;
    if (atomic_load(&cb->fatal))
        return LA_EDEVICE;
    gpu *g = &cb->gpus[dev];
    be_mask *m = calloc(1, sizeof *m);
    if (!m)
        return LA_ENOMEM;
    cudaError_t e = cudaSetDevice(g->ordinal);
    void *d = NULL, *h = NULL;
    if (e == cudaSuccess)
        e = cudaHostAlloc(&h, (size_t)bytes, cudaHostAllocPortable);
    if (e == cudaSuccess)
        e = cudaMallocAsync(&d, (size_t)bytes, g->stream);
    if (e != cudaSuccess) {
        check_sticky(cb, g, e, "mask allocation");
        if (d || h)
            grave_add(g, d, h, NULL);
        free(m);
        return map_err(e);
    }
    m->dev_ptr = d; /* regions are set to all ones by the worker (launch) */
    m->host = h;
    m->bytes = bytes;
    m->dev = dev;
    *ret_mask = m;
    return 0;
}

static void cu_mask_free(be_backend *b, be_mask *m)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (!m)
        return;
    gpu *g = &cb->gpus[m->dev];
    if (grave_add(g, m->dev_ptr, m->host, NULL) < 0)
        logf_(cb, LOG_WARN, "GPU %s: out of memory; %llu bytes of mask leaked", g->uuid,
              (unsigned long long)m->bytes);
    free(m);
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
        /* The worker unmaps it (it may be busy in the driver; the loop thread stays free). */
        if (grave_add_vmm(imp->g, NULL, NULL, NULL, imp) < 0)
            vmm_free(cb, imp);
        return;
    }
    be_import **pp = &cb->imports;
    while (*pp && *pp != imp)
        pp = &(*pp)->next;
    if (*pp)
        *pp = imp->next;
    gpu *g = imp->g;
    grave_add(g, NULL, NULL, imp->ptr);
    free(imp);
}

static int cu_submit(be_backend *b, be_job *job)
{
    cuda_backend *cb = (cuda_backend *)b;
    if (job->dev < 0 || job->dev >= cb->n)
        return LA_ENODEV;
    if (atomic_load(&cb->fatal))
        return LA_EDEVICE;
    gpu *g = &cb->gpus[job->dev];
    pthread_mutex_lock(&g->lock);
    if (g->stopping) {
        pthread_mutex_unlock(&g->lock);
        return LA_ESHUTDOWN;
    }
    int rc = fq_push(&g->q, job);
    if (rc == 0)
        pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
    return rc;
}

/* Launched work cannot be taken back; what is still queued is. */
static void cu_cancel(be_backend *b, uint64_t conn_id, int all, int code)
{
    cuda_backend *cb = (cuda_backend *)b;
    for (int i = 0; i < cb->n; i++) {
        gpu *g = &cb->gpus[i];
        if (!g->cb)
            continue;
        pthread_mutex_lock(&g->lock);
        be_job *list = fq_take(&g->q, conn_id, all);
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
        pthread_cond_broadcast(&g->cond);
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
        /* Host functions of a lost context never run: fail what is left. */
        fail_all(g, "the CUDA context was lost (sticky error); the daemon restarts");
    }
}

static void gpu_teardown(gpu *g)
{
    if (!g->cb)
        return;
    if (cudaSetDevice(g->ordinal) == cudaSuccess && g->stream)
        cudaStreamSynchronize(g->stream);
    bury(g, 1);
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
};

static int gpu_init(cuda_backend *cb, gpu *g, int ordinal, char *msg, size_t msg_len)
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
    fq_init(&g->q);
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
                           cudaHostAllocPortable)) != cudaSuccess)
        goto fail;
    for (int k = 0; k < N_EVENTS; k++) {
        if ((e = cudaEventCreateWithFlags(
                 &g->events[k], cudaEventDisableTiming | cudaEventInterprocess)) != cudaSuccess ||
            (e = cudaIpcGetEventHandle(&g->event_handles[k], g->events[k])) != cudaSuccess)
            goto fail;
    }
    for (int k = 0; k < N_SLOTS; k++) {
        g->free_slots[k] = N_SLOTS - 1 - k;
        g->slot_ctx[k].g = g;
        g->slot_ctx[k].slot = k;
    }
    g->n_free_slots = N_SLOTS;
    if (pthread_create(&g->thread, NULL, gpu_main, g) != 0) {
        snprintf(msg, msg_len, "GPU %d: cannot start its worker thread", ordinal);
        return LA_ENOMEM;
    }
    g->started = 1;
    return 0;
fail:
    snprintf(msg, msg_len, "GPU %d (%s): %s", ordinal, g->uuid[0] ? g->uuid : "?",
             cudaGetErrorString(e));
    return map_err(e);
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
    atomic_init(&cb->fatal, 0);
    cb->gpus = calloc((size_t)count, sizeof *cb->gpus);
    if (!cb->gpus) {
        free(cb);
        return LA_ENOMEM;
    }
    enum cudaDriverEntryPointQueryResult q;
    void *fn = NULL;
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault,
                                         &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
        cb->get_range = (get_range_fn)fn;
    if (!cb->get_range) {
        snprintf(msg, msg_len, "the CUDA driver lacks cuMemGetAddressRange");
        free(cb->gpus);
        free(cb);
        return LA_ENODEV;
    }
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
    for (size_t i = 0; i < sizeof vmm_syms / sizeof vmm_syms[0]; i++) {
        fn = NULL;
        if (cudaGetDriverEntryPointByVersion(vmm_syms[i].name, &fn, 12000, cudaEnableDefault,
                                             &q) != cudaSuccess ||
            q != cudaDriverEntryPointSuccess || !fn)
            vmm_ok = 0;
        *vmm_syms[i].slot = fn;
    }
    if (!vmm_ok)
        cb->vmm.Import = NULL;
    fn = NULL;
    if (cudaGetDriverEntryPointByVersion("cuCtxGetExecAffinity", &fn, 12000, cudaEnableDefault,
                                         &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
        *(void **)&cb->exec_affinity = fn;
    for (int i = 0; i < count; i++) {
        int rc = gpu_init(cb, &cb->gpus[i], i, msg, msg_len);
        cb->n = i + 1;
        if (rc < 0) {
            cu_free(&cb->base);
            return rc == LA_ENOMEM ? rc : LA_ENODEV;
        }
    }
    *ret = &cb->base;
    return 0;
}

#endif /* LA_HAVE_CUDA */
