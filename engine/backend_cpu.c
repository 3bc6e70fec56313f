/*
 * backend_cpu.c — the CPU backend: kernels/ref.c (la_ref_attn_fwd) on a pool of worker threads.
 *
 * Scheduling: `threads` workers take work from one fair queue (fairq.h: per user, then per
 * session, by cost in multiply-adds). A call does not run in one piece: it runs in slices of
 * about `slice_macs` multiply-adds (a group of heads of one batch row, or for a large head a
 * range of its q-tiles), each through the same la_ref_attn_fwd with offset pointers, so the
 * outputs and the mask are bit-identical to one whole call (every (b, h, q-tile) item is
 * computed independently of the others). Between slices the worker goes back to the queue,
 * which charges each slice to its user and session, so a small call of another user waits for
 * at most one slice, however large the calls queued before it; and a call can be cancelled
 * (its connection closed, the daemon stops): between slices, and within the slice running,
 * which la_ref_attn_fwd_cancel stops before its next k-tile (be_cancel is its flag), so that
 * a departed client's or a stopping daemon's CPU is free within a tile, not after a q-tile
 * against all keys. A call cancelled half-way has updated the mask of some of its heads (or
 * q-tiles) only: its layer's mask is set back to all ones (the next call of that layer
 * computes densely), which is always correct.
 *
 * A worker that takes a slice gives it threads / (slices running + jobs queued) reference
 * threads (at least 1), so a job alone gets the whole machine and under load the pool
 * degrades to about one thread per job. The slice's unit is a q-tile against all keys, which
 * one call with very many keys can make long: `threads` spare workers take slices only of
 * users that have none running when all regular workers are busy (the OS then time-slices),
 * so every user makes progress at once.
 *
 * Calls on the same mask (session, layer, kv shard) are serialised in submission order (the
 * fair queue never lets one overtake an earlier call of its session on the same mask, and a
 * running slice blocks the other calls on its mask); the GPU backend gets the same order from
 * the session's own stream.
 *
 * Fast-path calls (a doorbell slot, backend.h) speak the GPU's protocol without a stream: the
 * client rings the slot from the host before it sends the call, so a slot found unrung when
 * the call starts is the client's mistake, and the call fails (LA_EINVAL) instead of waiting
 * for a write that nothing orders; the engine writes the slot's status and done words when the
 * call completes, whatever its outcome.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "fairq.h"
#include "guard.h"

#define DEFAULT_SLICE_MACS (1ull << 28) /* ~0.03-0.1 s of one reference thread */

typedef struct cpu_backend {
    be_backend base;
    int n_workers; /* threads that compute at once in the normal case */
    int n_threads; /* n_workers regular + n_workers spare (see slice_blocked) */
    uint64_t slice_macs;
    pthread_t *workers;
    be_job **busy; /* the jobs whose slice runs now, [running] */
    int started;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    fq q;
    be_job *cancelled; /* taken from the queue half-done: a worker resets their mask */
    int running;
    int stopping;
} cpu_backend;

uint64_t be_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* A job may not start a slice while another job's slice on the same mask runs, or while a
 * cancelled job still has to reset that mask. Once every regular worker is busy, a spare
 * worker takes a slice only of a user that has none running: a single q-tile with very many
 * keys cannot be cut, and another user must not wait for it. Under c->lock. */
static int slice_blocked(void *ctx, const be_job *j)
{
    cpu_backend *c = ctx;
    const void *m = j->p.mask;
    if (c->running >= c->n_workers)
        for (int i = 0; i < c->running; i++)
            if (c->busy[i]->uid == j->uid)
                return 1;
    if (!m)
        return 0;
    for (int i = 0; i < c->running; i++)
        if (c->busy[i]->p.mask == m)
            return 1;
    for (const be_job *k = c->cancelled; k; k = k->be_next)
        if (k->p.mask == m)
            return 1;
    return 0;
}

/* How a call is cut: heads per slice (hp > 0) or, when one head alone is larger than a slice,
 * q-tiles per slice (tp > 0). Returns the number of slices. */
static int64_t plan(const cpu_backend *c, const la_attn_params *p, int64_t *ret_hp, int64_t *ret_tp)
{
    double per_head = 2.0 * p->Sq * (double)p->Sk * p->D, slice = (double)c->slice_macs;
    int64_t nq = la_tiles(p->Sq, p->BM);
    if (per_head <= slice) {
        int64_t hp = (int64_t)(slice / per_head);
        hp = hp < 1 ? 1 : hp > p->H ? p->H : hp;
        *ret_hp = hp, *ret_tp = 0;
        return (int64_t)p->B * ((p->H + hp - 1) / hp);
    }
    double per_tile = 2.0 * p->BM * (double)p->Sk * p->D;
    int64_t tp = (int64_t)(slice / per_tile);
    tp = tp < 1 ? 1 : tp > nq ? nq : tp;
    *ret_hp = 0, *ret_tp = tp;
    return (int64_t)p->B * p->H * ((nq + tp - 1) / tp);
}

/* The parameters of slice i of p (same strides, offset pointers, fewer heads or rows); its
 * cost in multiply-adds. */
static uint64_t slice_params(const cpu_backend *c, const la_attn_params *p, int64_t i,
                             la_attn_params *sp)
{
    int64_t hp, tp;
    plan(c, p, &hp, &tp);
    int64_t b, h0, hn, r0 = 0, m0 = 0;
    int32_t sq = p->Sq;
    if (hp) {
        int64_t per_b = (p->H + hp - 1) / hp;
        b = i / per_b;
        h0 = i % per_b * hp;
        hn = p->H - h0 < hp ? p->H - h0 : hp;
    } else {
        int64_t nq = la_tiles(p->Sq, p->BM), per_h = (nq + tp - 1) / tp;
        b = i / (per_h * p->H);
        h0 = i / per_h % p->H;
        hn = 1;
        m0 = i % per_h * tp;
        r0 = m0 * p->BM;
        int64_t rows = tp * p->BM;
        sq = (int32_t)(p->Sq - r0 < rows ? p->Sq - r0 : rows);
    }
    size_t es = la_dtype_size(p->dtype);
    *sp = *p;
    sp->B = 1;
    sp->H = (int32_t)hn;
    sp->Sq = sq;
    sp->q = (const char *)p->q +
            es * (size_t)(b * p->q_stride[0] + r0 * p->q_stride[1] + h0 * p->q_stride[2]);
    sp->o = (char *)p->o +
            es * (size_t)(b * p->o_stride[0] + r0 * p->o_stride[1] + h0 * p->o_stride[2]);
    sp->k = (const char *)p->k + es * (size_t)(b * p->k_stride[0] + h0 * p->k_stride[2]);
    sp->v = (const char *)p->v + es * (size_t)(b * p->v_stride[0] + h0 * p->v_stride[2]);
    if (p->lse)
        sp->lse = p->lse + b * p->lse_stride[0] + h0 * p->lse_stride[1] + r0 * p->lse_stride[2];
    if (p->row_max)
        sp->row_max = p->row_max + b * p->row_max_stride[0] + h0 * p->row_max_stride[1] +
                      r0 * p->row_max_stride[2];
    int64_t mo = b * p->mask_stride[0] + h0 * p->mask_stride[1] + m0 * p->mask_stride[2];
    if (p->mask)
        sp->mask = p->mask + mo;
    if (p->decisions)
        sp->decisions = p->decisions + mo;
    sp->ret_tiles_computed = NULL;
    return (uint64_t)(2.0 * hn * (double)sq * p->Sk * p->D);
}

/* The region's first call sets it to all ones (and forgets restored rows) before it runs. */
static void init_mask(be_job *j)
{
    if (j->mask_ready && !atomic_load(j->mask_ready)) {
        memset((char *)j->mask->host + j->mask_off, 0xff, (size_t)j->mask_len);
        if (j->held)
            memset(j->held, 0, (size_t)j->held_len);
        atomic_store(j->mask_ready, 1);
    }
}

/* The job goes back to the engine; what the backend allocated for it goes first. */
static void cpu_complete(cpu_backend *c, be_job *j)
{
    free(j->be_lse);
    j->be_lse = NULL;
    c->base.complete(c->base.complete_data, j);
}

/* After the last slice: the guardrail's check, the fill of restored rows, the live count and
 * the warm capture, in the order of backend.h. */
static void finish_mask(be_job *j, int threads)
{
    la_attn_params *p = &j->p;
    int changes = p->mask && !p->decisions;
    if (j->guard_n && be_guard_cpu(j, threads) < 0)
        j->guard_n = 0; /* out of memory: this call is not checked */
    if (changes && j->held && p->mode != LA_MODE_DENSE)
        la_mask_fill_held(p->mask, p->mask_stride, j->rows_b, j->rows_h, j->rows_nq,
                          (int32_t)j->mask_words, (int32_t)j->mask_k_tiles, j->held);
    if (changes && (p->mode != LA_MODE_DENSE || j->mask_restart || j->has_seed)) {
        j->has_live = 1;
        j->live_bits = be_mask_live(p->mask, j->mask_len, j->mask_words, j->mask_k_tiles);
    }
    if (j->has_capture && p->mask)
        memcpy((char *)j->mask->host + j->capture_off, p->mask, (size_t)j->mask_len);
}

/* A call stopped after some of its slices wrote the mask (touched; a slice stopped within
 * has written some rows): all ones again (dense). */
static void undo_mask(be_job *j, int touched)
{
    if (touched && j->p.mask && !j->p.decisions && j->p.mode != LA_MODE_DENSE) {
        memset(j->p.mask, 0xff, (size_t)j->mask_len);
        j->has_live = 1;
        j->live_bits = be_mask_live(j->p.mask, j->mask_len, j->mask_words, j->mask_k_tiles);
    }
}

static void set_cancelled(be_job *j, int code)
{
    j->status = code;
    snprintf(j->msg, sizeof j->msg, "%s",
             code == LA_ECLOSED ? "cancelled: the connection closed"
                                : "cancelled: the daemon is shutting down");
    if (!j->t_start_ns)
        j->t_start_ns = be_now_ns();
    j->t_end_ns = be_now_ns();
}

/* j's slice, or its finish or undo, is over: its mask is free for the next call. Under
 * c->lock. */
static void unbusy(cpu_backend *c, be_job *j)
{
    for (int i = 0; i < c->running; i++)
        if (c->busy[i] == j) {
            c->busy[i] = c->busy[--c->running];
            break;
        }
}

/* A job stays in busy (its mask blocked, slice_blocked) and its flow unreleased (fq_done)
 * until its mask is finished or undone: the next call on the mask must start from the result,
 * not race with the live count, the guardrail's restored rows or the undo. Each worker holds
 * at most one busy entry, so busy (n_threads) never overflows. */
static void *worker_main(void *arg)
{
    cpu_backend *c = arg;
    pthread_mutex_lock(&c->lock);
    for (;;) {
        if (c->cancelled) {
            be_job *j = c->cancelled;
            c->cancelled = j->be_next;
            j->be_next = NULL;
            c->busy[c->running++] = j;
            pthread_mutex_unlock(&c->lock);
            undo_mask(j, j->be_cursor > 0);
            pthread_mutex_lock(&c->lock);
            unbusy(c, j);
            pthread_cond_broadcast(&c->cond);
            pthread_mutex_unlock(&c->lock);
            cpu_complete(c, j);
            pthread_mutex_lock(&c->lock);
            continue;
        }
        be_job *j = c->running < c->n_threads ? fq_pick(&c->q, slice_blocked, c, 0) : NULL;
        if (!j) {
            if (c->stopping && c->q.queued == 0)
                break;
            pthread_cond_wait(&c->cond, &c->lock);
            continue;
        }
        c->busy[c->running++] = j;
        int share = c->n_workers / (c->running + c->q.queued);
        la_attn_params sp;
        uint64_t cost = slice_params(c, &j->p, j->be_cursor, &sp);
        fq_charge(&c->q, j, cost);
        if (j->be_cursor == 0) {
            j->t_start_ns = be_now_ns();
            j->tiles_computed = 0;
        }
        pthread_mutex_unlock(&c->lock);

        /* The fast path: there is no stream here, so a call's doorbell must have been rung
         * (from the host) before the call was sent; one that was not would wait for nothing
         * that could be ordered with it. */
        int unrung = j->be_cursor == 0 && !be_doorbell_rung(j);
        if (j->be_cursor == 0 && !unrung) {
            /* A new generation of this layer (a step went backwards) starts from all ones. */
            if (j->mask_restart && j->mask) {
                memset((char *)j->mask->host + j->mask_off, 0xff, (size_t)j->mask_len);
                if (j->held)
                    memset(j->held, 0, (size_t)j->held_len);
            }
            init_mask(j);
            if (j->has_seed && j->p.mask) /* a warm start: mask &= seed */
                la_mask_and(j->p.mask,
                            (const uint32_t *)(const void *)((const char *)j->mask->host +
                                                             j->seed_off),
                            (size_t)(j->mask_len / 4));
        }
        int64_t tiles = 0;
        sp.threads = share > 0 ? share : 1;
        sp.ret_tiles_computed = &tiles;
        int rc = unrung ? LA_EINVAL : la_ref_attn_fwd_cancel(&sp, &j->be_cancel);

        pthread_mutex_lock(&c->lock);
        /* Stopped within the slice (cpu_cancel set be_cancel): cancelled, its mask undone. */
        int stopped = rc < 0 && j->be_cancel && rc == j->be_cancel;
        if (stopped)
            rc = 0;
        j->tiles_computed += tiles;
        int64_t hp, tp, n = plan(c, &j->p, &hp, &tp);
        if (rc == 0 && !stopped)
            j->be_cursor++;
        if (rc == 0 && j->be_cursor < n && !j->be_cancel) {
            unbusy(c, j);
            fq_requeue(&c->q, j);
            pthread_cond_broadcast(&c->cond);
            continue;
        }
        int cancel = j->be_cancel;
        pthread_mutex_unlock(&c->lock);
        if (unrung) {
            j->status = LA_EINVAL;
            snprintf(j->msg, sizeof j->msg,
                     "doorbell slot %u was not rung (ready word %u, the call's value %u): on "
                     "the CPU backend the client writes it before it sends the call",
                     j->db_slot, (unsigned)atomic_load(&j->db->slots[j->db_slot].ready),
                     j->db_value);
        } else if (rc < 0) {
            j->status = rc;
            snprintf(j->msg, sizeof j->msg, "cpu reference refused the call: %s",
                     codes_strerror(rc));
            undo_mask(j, j->be_cursor > 0);
        } else if (j->be_cursor < n) {
            set_cancelled(j, cancel);
            undo_mask(j, j->be_cursor > 0 || stopped);
        } else {
            j->status = 0;
            finish_mask(j, sp.threads);
        }
        j->t_end_ns = be_now_ns();
        pthread_mutex_lock(&c->lock);
        unbusy(c, j);
        fq_done(&c->q, j);
        pthread_cond_broadcast(&c->cond);
        pthread_mutex_unlock(&c->lock);
        cpu_complete(c, j); /* j belongs to the engine now */
        pthread_mutex_lock(&c->lock);
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

static size_t cpu_devices(be_backend *b, eng_device_info *out, size_t max)
{
    cpu_backend *c = (cpu_backend *)b;
    if (max < 1)
        return 1;
    memset(out, 0, sizeof *out);
    snprintf(out->uuid, sizeof out->uuid, "cpu");
    snprintf(out->backend, sizeof out->backend, "cpu");
    snprintf(out->name, sizeof out->name, "CPU reference (%d threads)", c->n_workers);
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    out->memory_bytes = pages > 0 && psz > 0 ? (uint64_t)pages * (uint64_t)psz : 0;
    out->mps = -1; /* not a GPU */
    return 1;
}

static int cpu_find_device(be_backend *b, const char *uuid, int *ret_dev)
{
    if (!uuid || !uuid[0] || !strcmp(uuid, "cpu")) {
        *ret_dev = 0;
        return 0;
    }
    return LA_ENODEV;
}

static int cpu_tile_sizes(be_backend *b, int dev, uint32_t head_dim, la_dtype dtype,
                          uint32_t *ret_bm, uint32_t *ret_bn)
{
    if (!LA_REF_HEAD_DIM_OK(head_dim))
        return LA_ENOTSUP;
    if (dtype != LA_DTYPE_F32 && dtype != LA_DTYPE_F16 && dtype != LA_DTYPE_BF16)
        return LA_ENOTSUP;
    /* 128 x 64. Measured with kernels/ref.c (CPU time, 2 threads, B1 H8 S1024, bf16 and f32,
     * D 64 and 128): 128 x 64 costs 20-40% less than 64 x 64 (K/V tiles are reused by twice
     * as many query rows), 32-wide tiles cost 1.5-2x more, and 128 x 128 is at most ~10%
     * cheaper still but halves the resolution of the skip decisions along the keys. 128 x 64
     * is also the CUDA kernels' tile for head dim 64. */
    *ret_bm = 128;
    *ret_bn = 64;
    return 0;
}

static int cpu_supports(be_backend *b, int dev, const la_attn_params *p)
{
    return la_attn_validate(p);
}

static int cpu_mask_alloc(be_backend *b, int dev, uint64_t bytes, const void *init,
                          uint64_t init_off, uint64_t init_len, be_mask **ret_mask)
{
    if (bytes == 0 || bytes > SIZE_MAX - 64 || init_off > bytes || init_len > bytes - init_off ||
        (init_len && !init))
        return LA_EINVAL;
    be_mask *m = calloc(1, sizeof *m);
    if (!m)
        return LA_ENOMEM;
    size_t alloc = (size_t)((bytes + 63) & ~(uint64_t)63);
    m->host = aligned_alloc(64, alloc);
    if (!m->host) {
        free(m);
        return LA_ENOMEM;
    }
    m->dev_ptr = m->host; /* untouched: large allocations are mapped lazily */
    if (init_len)
        memcpy((char *)m->host + init_off, init, (size_t)init_len);
    m->bytes = bytes;
    m->dev = dev;
    *ret_mask = m;
    return 0;
}

static void cpu_mask_free(be_backend *b, be_mask *m)
{
    if (!m)
        return;
    free(m->host);
    free(m);
}

static int cpu_submit(be_backend *b, be_job *job)
{
    cpu_backend *c = (cpu_backend *)b;
    pthread_mutex_lock(&c->lock);
    if (c->stopping) {
        pthread_mutex_unlock(&c->lock);
        return LA_ESHUTDOWN;
    }
    job->be_cursor = 0;
    job->be_cancel = 0;
    job->t_start_ns = 0;
    if (job->guard_n && !job->p.lse) {
        /* The check compares with the call's LSE: one of our own for a call without. */
        const la_attn_params *p = &job->p;
        job->be_lse = malloc((size_t)p->B * p->H * p->Sq * sizeof(float));
        if (job->be_lse) {
            job->p.lse = job->be_lse;
            job->p.lse_stride[2] = 1;
            job->p.lse_stride[1] = p->Sq;
            job->p.lse_stride[0] = (int64_t)p->H * p->Sq;
        } else {
            job->guard_n = 0;
        }
    }
    int rc = fq_push(&c->q, job);
    if (rc == 0)
        pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
    if (rc < 0) {
        free(job->be_lse);
        job->be_lse = NULL;
    }
    return rc;
}

static void cpu_cancel(be_backend *b, uint64_t conn_id, int all, int code)
{
    cpu_backend *c = (cpu_backend *)b;
    pthread_mutex_lock(&c->lock);
    be_job *list = fq_take(&c->q, conn_id, all), *fresh = NULL;
    while (list) {
        be_job *j = list;
        list = j->be_next;
        set_cancelled(j, code);
        if (j->be_cursor > 0) { /* half done: a worker puts its mask back first */
            j->be_next = c->cancelled;
            c->cancelled = j;
        } else {
            j->be_next = fresh;
            fresh = j;
        }
    }
    /* The running slices read be_cancel without the lock (la_ref_attn_fwd_cancel). */
    for (int i = 0; i < c->running; i++)
        if ((all || c->busy[i]->conn_id == conn_id) && !c->busy[i]->be_cancel)
            __atomic_store_n(&c->busy[i]->be_cancel, code, __ATOMIC_RELAXED);
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->lock);
    while (fresh) {
        be_job *j = fresh;
        fresh = j->be_next;
        j->be_next = NULL;
        cpu_complete(c, j);
    }
}

static void cpu_stop(be_backend *b)
{
    cpu_backend *c = (cpu_backend *)b;
    cpu_cancel(b, 0, 1, LA_ESHUTDOWN);
    pthread_mutex_lock(&c->lock);
    c->stopping = 1;
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->lock);
    if (c->started) {
        for (int i = 0; i < c->n_threads; i++)
            pthread_join(c->workers[i], NULL);
        c->started = 0;
    }
}

static void cpu_free(be_backend *b)
{
    cpu_backend *c = (cpu_backend *)b;
    if (!c)
        return;
    cpu_stop(b);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c->workers);
    free(c->busy);
    free(c);
}

static int cpu_fatal(const be_backend *b) { return 0; }

static int cpu_fastpath(be_backend *b, int dev, char *why, size_t why_len) { return 0; }

static const be_ops cpu_ops = {
    .name = "cpu",
    .devices = cpu_devices,
    .find_device = cpu_find_device,
    .tile_sizes = cpu_tile_sizes,
    .supports = cpu_supports,
    .mask_alloc = cpu_mask_alloc,
    .mask_free = cpu_mask_free,
    /* GPU memory (CUDA IPC, VMM) is refused: this backend computes on host memory, and
     * copying device memory for every call would turn a GPU session into a slow CPU one. */
    .buffer_import = NULL,
    .vmm_import = NULL,
    .vmm_append = NULL,
    .buffer_release = NULL,
    .submit = cpu_submit,
    .cancel = cpu_cancel,
    .stop = cpu_stop,
    .free = cpu_free,
    .fatal = cpu_fatal,
    .fastpath = cpu_fastpath,
};

int be_cpu_new(int threads, uint64_t slice_macs, be_complete_fn complete, void *complete_data,
               be_backend **ret, char *msg, size_t msg_len)
{
    if (threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        threads = n > 0 ? (int)n : 1;
    }
    if (threads > 1024)
        threads = 1024;
    cpu_backend *c = calloc(1, sizeof *c);
    if (!c)
        return LA_ENOMEM;
    c->base.ops = &cpu_ops;
    c->base.complete = complete;
    c->base.complete_data = complete_data;
    c->n_workers = threads;
    c->n_threads = 2 * threads;
    c->slice_macs = slice_macs ? slice_macs : DEFAULT_SLICE_MACS;
    fq_init(&c->q);
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);
    c->workers = calloc((size_t)c->n_threads, sizeof *c->workers);
    c->busy = calloc((size_t)c->n_threads, sizeof *c->busy);
    if (!c->workers || !c->busy) {
        cpu_free(&c->base);
        return LA_ENOMEM;
    }
    for (int i = 0; i < c->n_threads; i++) {
        int rc = pthread_create(&c->workers[i], NULL, worker_main, c);
        if (rc) {
            /* Join the ones that started. */
            pthread_mutex_lock(&c->lock);
            c->stopping = 1;
            pthread_cond_broadcast(&c->cond);
            pthread_mutex_unlock(&c->lock);
            for (int k = 0; k < i; k++)
                pthread_join(c->workers[k], NULL);
            if (msg)
                snprintf(msg, msg_len, "cpu backend: cannot start worker thread %d: %s", i,
                         strerror(rc));
            pthread_mutex_destroy(&c->lock);
            pthread_cond_destroy(&c->cond);
            free(c->workers);
            free(c->busy);
            free(c);
            return LA_ENOMEM;
        }
    }
    c->started = 1;
    *ret = &c->base;
    return 0;
}
