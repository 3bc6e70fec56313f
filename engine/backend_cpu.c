/*
 * backend_cpu.c — the CPU backend: kernels/ref.c (la_ref_attn_fwd) on a pool of worker threads.
 *
 * Threading model: `threads` workers take jobs from one FIFO queue. A worker that takes a job
 * gives it threads / (jobs running + jobs still queued) reference threads (at least 1), so a
 * job alone gets the whole machine (lowest latency for one client), and under load the pool
 * degrades to about one thread per job with several jobs running side by side. Jobs start in
 * arrival order and a large job never holds more than the workers' share it got when it
 * started, so a small job of another client waits at most for a free worker, never for the
 * large job to end (the kernel threads of both are then time-sliced by the OS).
 *
 * Calls on the same mask (session, layer, kv shard) are serialised in submission order (see
 * pick()); the GPU backend gets the same order from its single stream per device.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"

typedef struct cpu_backend {
    be_backend base;
    int n_workers;
    pthread_t *workers;
    const void **busy; /* masks of the running jobs, [running] */
    int started;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    be_job *head, *tail;
    int queued, running;
    int stopping;
} cpu_backend;

uint64_t be_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The first queued job whose mask no running job and no earlier queued job uses: calls on one
 * (session, layer, kv shard) run one after the other in submission order, since each reads
 * the mask the previous one wrote; calls on other masks overtake them. Under c->lock. */
static be_job *pick(cpu_backend *c, be_job **ret_prev)
{
    be_job *prev = NULL;
    for (be_job *j = c->head; j; prev = j, j = j->be_next) {
        const void *m = j->p.mask;
        int blocked = 0;
        for (int i = 0; i < c->running && !blocked; i++)
            blocked = m && c->busy[i] == m;
        for (be_job *k = c->head; k != j && !blocked; k = k->be_next)
            blocked = m && k->p.mask == m;
        if (!blocked) {
            *ret_prev = prev;
            return j;
        }
    }
    return NULL;
}

static void *worker_main(void *arg)
{
    cpu_backend *c = arg;
    pthread_mutex_lock(&c->lock);
    for (;;) {
        be_job *j, *prev;
        while (!(j = pick(c, &prev)) && !c->stopping)
            pthread_cond_wait(&c->cond, &c->lock);
        if (!j)
            break; /* stopping and nothing left (stop() cancels the queue first) */
        if (prev)
            prev->be_next = j->be_next;
        else
            c->head = j->be_next;
        if (c->tail == j)
            c->tail = prev;
        c->queued--;
        c->busy[c->running++] = j->p.mask;
        int share = c->n_workers / (c->running + c->queued);
        pthread_mutex_unlock(&c->lock);

        j->be_next = NULL;
        j->p.threads = share > 0 ? share : 1;
        j->tiles_computed = 0;
        j->p.ret_tiles_computed = &j->tiles_computed;
        j->t_start_ns = be_now_ns();
        if (j->mask_restart && j->mask)
            memset((char *)j->mask->host + j->mask_off, 0xff, (size_t)j->mask_len);
        int rc = la_ref_attn_fwd(&j->p);
        j->t_end_ns = be_now_ns();
        j->p.ret_tiles_computed = NULL;
        j->status = rc;
        if (rc < 0)
            snprintf(j->msg, sizeof j->msg, "cpu reference refused the call: %s",
                     codes_strerror(rc));
        const void *mask = j->p.mask; /* j belongs to the engine after complete() */
        c->base.complete(c->base.complete_data, j);

        pthread_mutex_lock(&c->lock);
        for (int i = 0; i < c->running; i++)
            if (c->busy[i] == mask) {
                c->busy[i] = c->busy[--c->running];
                break;
            }
        pthread_cond_broadcast(&c->cond);
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

static int cpu_mask_alloc(be_backend *b, int dev, uint64_t bytes, be_mask **ret_mask)
{
    if (bytes == 0 || bytes > SIZE_MAX - 64)
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
    memset(m->host, 0xff, alloc);
    m->dev_ptr = m->host;
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

static int cpu_mask_reset(be_backend *b, be_mask *m)
{
    memset(m->host, 0xff, (size_t)m->bytes);
    return 0;
}

static int cpu_submit(be_backend *b, be_job *job)
{
    cpu_backend *c = (cpu_backend *)b;
    pthread_mutex_lock(&c->lock);
    if (c->stopping) {
        pthread_mutex_unlock(&c->lock);
        return LA_ESHUTDOWN;
    }
    job->be_next = NULL;
    if (c->tail)
        c->tail->be_next = job;
    else
        c->head = job;
    c->tail = job;
    c->queued++;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
    return 0;
}

static void cpu_stop(be_backend *b)
{
    cpu_backend *c = (cpu_backend *)b;
    pthread_mutex_lock(&c->lock);
    c->stopping = 1;
    be_job *list = c->head;
    c->head = c->tail = NULL;
    c->queued = 0;
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->lock);
    while (list) {
        be_job *next = list->be_next;
        list->be_next = NULL;
        list->status = LA_ESHUTDOWN;
        snprintf(list->msg, sizeof list->msg, "the daemon is shutting down");
        list->t_start_ns = list->t_end_ns = be_now_ns();
        c->base.complete(c->base.complete_data, list);
        list = next;
    }
    if (c->started) {
        for (int i = 0; i < c->n_workers; i++)
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

static const be_ops cpu_ops = {
    .name = "cpu",
    .devices = cpu_devices,
    .find_device = cpu_find_device,
    .tile_sizes = cpu_tile_sizes,
    .supports = cpu_supports,
    .mask_alloc = cpu_mask_alloc,
    .mask_free = cpu_mask_free,
    .mask_reset = cpu_mask_reset,
    .buffer_import = NULL,
    .buffer_release = NULL,
    .submit = cpu_submit,
    .stop = cpu_stop,
    .free = cpu_free,
    .fatal = cpu_fatal,
};

int be_cpu_new(int threads, be_complete_fn complete, void *complete_data, be_backend **ret,
               char *msg, size_t msg_len)
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
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);
    c->workers = calloc((size_t)threads, sizeof *c->workers);
    c->busy = calloc((size_t)threads, sizeof *c->busy);
    if (!c->workers || !c->busy) {
        cpu_free(&c->base);
        return LA_ENOMEM;
    }
    for (int i = 0; i < threads; i++) {
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
