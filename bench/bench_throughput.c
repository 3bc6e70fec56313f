/*
 * bench_throughput.c — GPU throughput of several client processes sharing liteattnd, each with
 * its own session, against the same work from one process (through the daemon, and as direct
 * kernel calls in one process).
 *
 *   bench_throughput --socket PATH [--procs 2,4] [--calls 200] [--batch 1 --heads 24
 *                    --seq 4096 --head-dim 64] [--mode dense|skip] [--sync]
 *
 * For each N of --procs: N processes each make --calls fast-path calls (la_attn_enqueue on its
 * own stream, its own session and buffers, all enqueued, at most the in-flight limit ahead),
 * started together; the time is from the common start to the last process's stream done.
 * The same N * calls calls are then made by one process with one session ("one process"),
 * and by one process calling the kernel directly ("direct"). Printed: each time, calls per
 * second, and N processes against one process (issue 10's target: within 5%). --sync makes
 * every call synchronous (la_attn_run) instead.
 *
 * The parent never touches CUDA (it forks the workers); each worker sets up, reports ready on
 * a pipe, waits for the start byte, works, and writes its end time.
 */
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "la_attn.h"
#include "liteattn.h"
#ifdef LA_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "la_cuda.h"
#endif

typedef struct opts {
    const char *sock;
    int B, H, S, D, calls, sync;
    la_mode mode;
} opts;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

#ifdef LA_HAVE_CUDA
static void fail(const char *what, int rc)
{
    fprintf(stderr, "bench_throughput: worker %d: %s: %s (%s)\n", (int)getpid(), what,
            la_strerror(rc), la_last_error_message());
    _exit(1);
}

#define CU(call)                                                                          \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "bench_throughput: %s: %s\n", #call, cudaGetErrorString(e_)); \
            _exit(1);                                                                     \
        }                                                                                 \
    } while (0)

/* One call at position `pos`: through the daemon (kind 0; `what` names a failure), or a direct
 * kernel call on st. */
static void call_once(const opts *o, int kind, la_session *s, la_attn *a,
                      const la_attn_params *p, cudaStream_t st, uint32_t pos, const char *what)
{
    if (kind == 0) {
        la_attn_set_position(a, 0, pos, 0);
        int rc = o->sync ? la_attn_run(s, a, NULL) : la_attn_enqueue(s, a, st, NULL);
        if (rc)
            fail(what, rc);
    } else {
        CU(la_attn_fwd_cuda(p, st));
    }
}

/* A worker: kind 0 through the daemon (ncalls calls on one session), 1 direct kernel calls.
 * Writes its end time (seconds, CLOCK_MONOTONIC) to out_fd after reading the start byte. */
static void worker(const opts *o, int id, int kind, int ncalls, int ready_fd, int start_fd,
                   int out_fd)
{
    size_t n = (size_t)o->B * o->S * o->H * o->D, bytes = n * 2;
    CU(cudaSetDevice(0));
    uint8_t *base;
    CU(cudaMalloc((void **)&base, 4 * bytes + (64u << 20)));
    CU(cudaMemset(base, 0, 4 * bytes + (64u << 20)));
    cudaStream_t st;
    CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    la_client *c = NULL;
    la_session *s = NULL;
    la_attn *a = NULL;
    la_buffer *buf = NULL;
    la_attn_params p;
    memset(&p, 0, sizeof p);
    int rc;
    int64_t bm = 0, bn = 0;
    if (kind == 0) {
        if ((rc = la_connect(o->sock, "bench_throughput", &c)))
            fail("connect", rc);
        la_session_config *cfg;
        la_session_config_new(&cfg);
        la_session_config_set_geometry(cfg, 1, (uint32_t)o->H, (uint32_t)o->D, LA_DTYPE_BF16,
                                       (uint32_t)o->S, (uint32_t)o->S, (uint32_t)o->B, 1);
        la_session_config_set_threshold(cfg, -INFINITY);
        la_session_config_set_mode(cfg, o->mode);
        la_session_config_set_device(cfg, "cuda");
        char key[64];
        snprintf(key, sizeof key, "bench-throughput-%d-%d", (int)getpid(), id);
        if ((rc = la_session_open(c, key, cfg, &s)))
            fail("session open", rc);
        la_session_config_free(cfg);
        if (!o->sync && (rc = la_session_fastpath(s)))
            fail("fast path", rc);
        uint64_t off;
        if ((rc = la_buffer_register_cuda(c, base, &buf, &off)))
            fail("register", rc);
        la_attn_new(&a);
        int64_t sh[4] = {o->B, o->S, o->H, o->D};
        for (int t = 0; t < 4; t++)
            la_attn_set_tensor(a, (la_tensor_role)t, buf, off + (uint64_t)t * bytes, LA_DTYPE_BF16,
                               4, sh, NULL);
    } else {
        int32_t tbm, tbn;
        struct cudaDeviceProp prop;
        CU(cudaGetDeviceProperties(&prop, 0));
        if (la_cuda_tile_sizes(o->D, LA_DTYPE_BF16, prop.major * 10 + prop.minor, &tbm, &tbn))
            fail("tile sizes", LA_ENOTSUP);
        bm = tbm, bn = tbn;
        bench_bf16_params(&p, base, base + bytes, base + 2 * bytes, base + 3 * bytes, o->B, o->S,
                          o->H, o->D, o->mode);
        int32_t nq = la_tiles(o->S, (int32_t)bm), w = la_mask_words(la_tiles(o->S, (int32_t)bn));
        p.mask = (uint32_t *)(base + 4 * bytes);
        p.mask_stride[2] = w;
        p.mask_stride[1] = (int64_t)nq * w;
        p.mask_stride[0] = (int64_t)o->H * nq * w;
        p.BM = (int32_t)bm, p.BN = (int32_t)bn;
        if ((size_t)o->B * o->H * nq * w * 4 > (64u << 20))
            fail("mask larger than its 64 MiB", LA_ENOTSUP);
        CU(cudaMemset(p.mask, 0xff, (size_t)o->B * o->H * nq * w * 4));
    }
    /* Warm-up: a few calls, finished. */
    for (int i = 0; i < 3; i++)
        call_once(o, kind, s, a, &p, st, (uint32_t)i, "warm-up call");
    CU(cudaStreamSynchronize(st));
    if (kind == 0 && !o->sync && (rc = la_session_sync(s, -1)))
        fail("warm-up sync", rc);
    char b = 1;
    if (write(ready_fd, &b, 1) != 1 || read(start_fd, &b, 1) != 1)
        _exit(1);
    for (int i = 0; i < ncalls; i++)
        call_once(o, kind, s, a, &p, st, (uint32_t)(3 + i), "call");
    CU(cudaStreamSynchronize(st));
    double end = now_s();
    if (kind == 0 && !o->sync && (rc = la_session_sync(s, -1)))
        fail("sync", rc);
    if (write(out_fd, &end, sizeof end) != (ssize_t)sizeof end)
        _exit(1);
    if (kind == 0) {
        la_attn_free(a);
        la_session_close(s);
        la_buffer_unregister(buf);
        la_disconnect(c);
    }
    _exit(0);
}

/* n workers of kind, ncalls each, started together: seconds from the start to the last end. */
static double run(const opts *o, int n, int kind, int ncalls)
{
    int ready[2], start[2], out[2];
    if (pipe(ready) || pipe(start) || pipe(out)) {
        perror("pipe");
        exit(1);
    }
    pid_t pids[64];
    for (int i = 0; i < n; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            close(ready[0]), close(start[1]), close(out[0]);
            worker(o, i, kind, ncalls, ready[1], start[0], out[1]);
        }
    }
    close(ready[1]), close(start[0]), close(out[1]);
    char b;
    for (int i = 0; i < n; i++)
        if (read(ready[0], &b, 1) != 1) {
            fprintf(stderr, "bench_throughput: a worker failed to start\n");
            exit(1);
        }
    double t0 = now_s(), last = t0;
    for (int i = 0; i < n; i++)
        if (write(start[1], &b, 1) != 1)
            exit(1);
    for (int i = 0; i < n; i++) {
        double end;
        if (read(out[0], &end, sizeof end) != (ssize_t)sizeof end) {
            fprintf(stderr, "bench_throughput: a worker failed\n");
            exit(1);
        }
        if (end > last)
            last = end;
    }
    for (int i = 0; i < n; i++)
        waitpid(pids[i], NULL, 0);
    close(ready[0]), close(start[1]), close(out[0]);
    return last - t0;
}
#endif

int main(int argc, char **argv)
{
    opts o = {.B = 1, .H = 24, .S = 4096, .D = 64, .calls = 200, .mode = LA_MODE_DENSE};
    const char *procs = "2,4";
    static const struct option lo[] = {{"socket", required_argument, 0, 's'},
                                       {"procs", required_argument, 0, 'p'},
                                       {"calls", required_argument, 0, 'n'},
                                       {"batch", required_argument, 0, 'b'},
                                       {"heads", required_argument, 0, 'H'},
                                       {"seq", required_argument, 0, 'S'},
                                       {"head-dim", required_argument, 0, 'D'},
                                       {"mode", required_argument, 0, 'm'},
                                       {"sync", no_argument, 0, 'y'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "s:p:n:b:H:S:D:m:yh", lo, NULL)) != -1) {
        switch (c) {
        case 's': o.sock = optarg; break;
        case 'p': procs = optarg; break;
        case 'n': o.calls = atoi(optarg); break;
        case 'b': o.B = atoi(optarg); break;
        case 'H': o.H = atoi(optarg); break;
        case 'S': o.S = atoi(optarg); break;
        case 'D': o.D = atoi(optarg); break;
        case 'm': o.mode = strcmp(optarg, "skip") == 0 ? LA_MODE_SKIP : LA_MODE_DENSE; break;
        case 'y': o.sync = 1; break;
        default:
            fprintf(stderr, "usage: bench_throughput --socket PATH [--procs 2,4] [--calls N] "
                            "[--batch B] [--heads H] [--seq S] [--head-dim D] "
                            "[--mode dense|skip] [--sync]\n");
            return c == 'h' ? 0 : 2;
        }
    }
#ifndef LA_HAVE_CUDA
    fprintf(stderr, "bench_throughput: built without CUDA\n");
    return 2;
#else
    if (!o.sock || o.calls < 1 || o.B < 1 || o.H < 1 || o.S < 1) {
        fprintf(stderr, "bench_throughput: --socket and positive sizes are needed\n");
        return 2;
    }
    printf("bench_throughput: B%d H%d S%d D%d bf16, mode %s, %s calls, %d calls per process\n", o.B,
           o.H, o.S, o.D, o.mode == LA_MODE_DENSE ? "dense" : "skip",
           o.sync ? "synchronous" : "fast-path", o.calls);
    printf("%-34s %10s %12s %10s\n", "", "seconds", "calls/s", "vs 1 proc");
    for (const char *p = procs; *p;) {
        int n = atoi(p);
        if (n < 1 || n > 64) {
            fprintf(stderr, "bench_throughput: --procs takes 1..64\n");
            return 2;
        }
        double tn = run(&o, n, 0, o.calls);
        double t1 = run(&o, 1, 0, n * o.calls);
        double td = run(&o, 1, 1, n * o.calls);
        char label[64];
        snprintf(label, sizeof label, "%d processes, a session each", n);
        printf("%-34s %10.3f %12.1f %+9.1f%%\n", label, tn, n * o.calls / tn,
               100.0 * (tn / t1 - 1.0));
        printf("%-34s %10.3f %12.1f\n", "1 process, one session", t1, n * o.calls / t1);
        printf("%-34s %10.3f %12.1f %+9.1f%%\n", "1 process, direct kernel", td, n * o.calls / td,
               100.0 * (td / t1 - 1.0));
        const char *comma = strchr(p, ',');
        p = comma ? comma + 1 : p + strlen(p);
    }
    return 0;
#endif
}
