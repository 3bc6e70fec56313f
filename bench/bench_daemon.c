/*
 * bench_daemon.c — what the daemon adds to an attention call: the same call (same shape, same
 * mode, same threads or stream) made through liteattnd and made directly in this process.
 *
 *   bench_daemon --socket PATH [--device cpu|cuda] [--batch 1 --heads 8 --seq 1024 --head-dim 64]
 *                [--iters 50] [--threads 2] [--mode dense|skip] [--fast] [--lead N] [--depth N]
 *                [--alloc cudamalloc|vmm|vmm-chunks]
 *
 * cpu:  host buffers (memfd) through the daemon's CPU backend against la_ref_attn_fwd with
 *       --threads threads (start the daemon with the same --threads).
 * cuda: one cudaMalloc block passed by CUDA IPC, synchronous la_attn_run (the reply comes when
 *       the kernel has finished) against la_attn_fwd_cuda + cudaStreamSynchronize.
 *       --alloc vmm: the tensors in one cuMemCreate allocation (POSIX fd handle type) instead,
 *       registered by la_buffer_register_cuda_range (the daemon imports it by fd);
 *       --alloc vmm-chunks: in 20 MiB cuMemCreate allocations mapped side by side, as PyTorch's
 *       expandable_segments allocator lays out a large segment.
 * Mode dense keeps every call identical (the mask is left alone). Prints the median and p90 of
 * each path and their difference.
 *
 * --fast (cuda): the fast path too (la_attn_enqueue), measured on this process's GPU timeline
 * as docs/FASTPATH.md defines it: an event recorded on the stream right before the call's ring
 * ("inputs ready") to an event right after the stream passed its done wait, minus the bare
 * kernel time (the same kernel on this stream, timed by events). Before each call the stream
 * gets --lead direct kernels (default 4): the work that produces Q/K/V in a real model, during
 * which the request reaches the daemon; --lead 0 measures a call made on an idle GPU (the host
 * path then lies on the GPU timeline). Also --depth calls back to back (default 8) between the
 * two events: the added time per call of a pipeline.
 */
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench_util.h"
#include "la_attn.h"
#include "liteattn.h"
#ifdef LA_HAVE_CUDA
#include <cuda.h>
#include <cuda_runtime_api.h>

#include "la_cuda.h"
#endif

#ifdef LA_HAVE_CUDA
static int ipc_pipe[2] = {-1, -1}, res_pipe[2] = {-1, -1};
static pid_t ipc_child = -1;
#endif

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double *v, int n, double p)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    int i = (int)ceil(p * n) - 1;
    return v[i < 0 ? 0 : i];
}

static void die(const char *what, int rc)
{
    fprintf(stderr, "bench_daemon: %s: %s (%s)\n", what, la_strerror(rc), la_last_error_message());
    exit(1);
}

#ifdef LA_HAVE_CUDA
static float ev_ms(cudaEvent_t a, cudaEvent_t b)
{
    float ms = 0;
    if (cudaEventElapsedTime(&ms, a, b) != cudaSuccess)
        ms = NAN;
    return ms;
}

/* The fast path on the GPU timeline (see the header). */
/* After lead direct kernels on st, ncalls fast-path calls enqueued back to back (positions from
 * *step on): the microseconds on st from the first call's enqueue to the last one's end; dies on
 * an error, the calls' own included. */
static double enqueue_us(la_session *s, la_attn *a, const la_attn_params *p, cudaStream_t st,
                         cudaEvent_t e0, cudaEvent_t e1, int lead, int ncalls, uint32_t *step)
{
    int rc;
    for (int l = 0; l < lead; l++)
        if (la_attn_fwd_cuda(p, st) != cudaSuccess)
            die("direct kernel", LA_EDEVICE);
    cudaEventRecord(e0, st);
    for (int k = 0; k < ncalls; k++) {
        la_attn_set_position(a, 0, (*step)++, 0);
        if ((rc = la_attn_enqueue(s, a, st, NULL)))
            die("la_attn_enqueue", rc);
    }
    cudaEventRecord(e1, st);
    cudaEventSynchronize(e1);
    if ((rc = la_session_sync(s, -1)))
        die("fast-path call", rc);
    return 1e3 * ev_ms(e0, e1);
}

static void fast_path(la_session *s, la_attn *a, const la_attn_params *p, cudaStream_t st,
                      int iters, int lead, int depth)
{
    int rc = la_session_fastpath(s);
    if (rc) {
        printf("fast path: not available: %s\n", la_last_error_message());
        return;
    }
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    double *tk = malloc(sizeof(double) * (size_t)iters),
           *t1 = malloc(sizeof(double) * (size_t)iters);
    double *t0 = malloc(sizeof(double) * (size_t)iters),
           *tp = malloc(sizeof(double) * (size_t)iters);
    uint32_t step = 0;
    for (int i = -3; i < iters; i++) { /* the bare kernel on this stream */
        cudaEventRecord(e0, st);
        if (la_attn_fwd_cuda(p, st) != cudaSuccess)
            die("direct kernel", LA_EDEVICE);
        cudaEventRecord(e1, st);
        cudaEventSynchronize(e1);
        if (i >= 0)
            tk[i] = 1e3 * ev_ms(e0, e1);
    }
    /* One call at a time: after `lead` kernels (t1), and on an idle stream (t0). */
    for (int pass = 0; pass < 2; pass++) {
        int nlead = pass == 0 ? lead : 0;
        double *t = pass == 0 ? t1 : t0;
        for (int i = -3; i < iters; i++) {
            double us = enqueue_us(s, a, p, st, e0, e1, nlead, 1, &step);
            if (i >= 0)
                t[i] = us;
        }
    }
    /* depth calls back to back. */
    for (int i = -3; i < iters; i++) {
        double us = enqueue_us(s, a, p, st, e0, e1, lead, depth, &step);
        if (i >= 0)
            tp[i] = us / depth;
    }
    double k50 = pct(tk, iters, 0.5);
    double a50 = pct(t1, iters, 0.5), a90 = pct(t1, iters, 0.9);
    double z50 = pct(t0, iters, 0.5), z90 = pct(t0, iters, 0.9);
    double p50 = pct(tp, iters, 0.5), p90 = pct(tp, iters, 0.9);
    printf("fast path (la_attn_enqueue), on this process's GPU timeline:\n");
    printf("%-28s %12s %12s %12s\n", "", "median us", "p90 us", "added us");
    printf("%-28s %12.1f\n", "bare kernel on this stream", k50);
    printf("%-28s %12.1f %12.1f %12.1f\n", "one call, after lead work", a50, a90, a50 - k50);
    printf("%-28s %12.1f %12.1f %12.1f\n", "one call, idle GPU", z50, z90, z50 - k50);
    printf("%-28s %12.1f %12.1f %12.1f\n", "per call, pipelined", p50, p90, p50 - k50);
    printf("fast path added per call: %.1f us (%.2f%% of the kernel), lead %d, depth %d\n",
           a50 - k50, 100.0 * (a50 - k50) / k50, lead, depth);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    free(tk), free(t1), free(t0), free(tp);
}
#endif

#ifdef LA_HAVE_CUDA
/* Device memory of --alloc vmm / vmm-chunks: bytes (rounded up to the granularity) of
 * cuMemCreate allocations of chunk bytes each (0: one allocation), exportable as POSIX fds,
 * mapped read/write side by side. The driver's VMM calls come through the runtime's entry
 * point query (no link against libcuda). */
static void *vmm_alloc(size_t bytes, size_t chunk)
{
    CUresult (*gran)(size_t *, const CUmemAllocationProp *, CUmemAllocationGranularity_flags);
    CUresult (*create)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,
                       unsigned long long);
    CUresult (*reserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
    CUresult (*access)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    struct {
        const char *name;
        void **fn;
    } t[] = {{"cuMemGetAllocationGranularity", (void **)&gran},
             {"cuMemCreate", (void **)&create},
             {"cuMemAddressReserve", (void **)&reserve},
             {"cuMemMap", (void **)&map},
             {"cuMemSetAccess", (void **)&access}};
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        enum cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion(t[i].name, t[i].fn, 12000, cudaEnableDefault, &q) !=
                cudaSuccess ||
            q != cudaDriverEntryPointSuccess) {
            fprintf(stderr, "bench_daemon: the CUDA driver lacks %s\n", t[i].name);
            return NULL;
        }
    }
    int dev = 0;
    cudaGetDevice(&dev);
    CUmemAllocationProp prop = bench_vmm_prop(dev);
    size_t g = 0;
    if (gran(&g, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED) != CUDA_SUCCESS || !g)
        return NULL;
    size_t total = (bytes + g - 1) / g * g;
    size_t each = chunk ? (chunk + g - 1) / g * g : total;
    total = (total + each - 1) / each * each;
    CUdeviceptr va = 0;
    if (reserve(&va, total, g, 0, 0) != CUDA_SUCCESS)
        return NULL;
    for (size_t off = 0; off < total; off += each) {
        CUmemGenericAllocationHandle h;
        if (create(&h, each, &prop, 0) != CUDA_SUCCESS ||
            map(va + off, each, 0, h, 0) != CUDA_SUCCESS) {
            fprintf(stderr, "bench_daemon: cuMemCreate/cuMemMap of %zu bytes failed\n", each);
            return NULL;
        }
    }
    CUmemAccessDesc d;
    memset(&d, 0, sizeof d);
    d.location = prop.location;
    d.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    if (access(va, total, &d, 1) != CUDA_SUCCESS)
        return NULL;
    return (void *)(uintptr_t)va; /* lives until the process exits */
}
#endif

static void fill_bf16(uint16_t *x, size_t n, uint64_t seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        float f = (float)((int)(seed >> 40 & 0xffff) - 32768) / 32768.0f;
        uint32_t u;
        memcpy(&u, &f, 4);
        x[i] = (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
    }
}

/* n rounded up to whole 2 MiB (what PyTorch's caching allocator asks of cudaMalloc). */
static size_t round_up_2mib(size_t n)
{
    const size_t page = (size_t)2 << 20;
    return (n + page - 1) / page * page;
}

int main(int argc, char **argv)
{
    const char *sock = NULL, *device = "cpu";
    int B = 1, H = 8, S = 1024, D = 64, iters = 50, threads = 2;
    la_mode mode = LA_MODE_DENSE;
    int fast = 0, lead = 4, depth = 8;
    const char *alloc = "cudamalloc";
    static const struct option opts[] = {
        {"fast", no_argument, 0, 'F'},           {"lead", required_argument, 0, 'L'},
        {"depth", required_argument, 0, 'P'},    {"socket", required_argument, 0, 's'},
        {"device", required_argument, 0, 'd'},   {"batch", required_argument, 0, 'b'},
        {"heads", required_argument, 0, 'H'},    {"seq", required_argument, 0, 'S'},
        {"head-dim", required_argument, 0, 'D'}, {"iters", required_argument, 0, 'n'},
        {"threads", required_argument, 0, 't'},  {"mode", required_argument, 0, 'm'},
        {"alloc", required_argument, 0, 'A'},    {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "s:d:b:H:S:D:n:t:m:h", opts, NULL)) != -1) {
        switch (o) {
        case 'F': fast = 1; break;
        case 'A': alloc = optarg; break;
        case 'L': lead = atoi(optarg); break;
        case 'P': depth = atoi(optarg); break;
        case 's': sock = optarg; break;
        case 'd': device = optarg; break;
        case 'b': B = atoi(optarg); break;
        case 'H': H = atoi(optarg); break;
        case 'S': S = atoi(optarg); break;
        case 'D': D = atoi(optarg); break;
        case 'n': iters = atoi(optarg); break;
        case 't': threads = atoi(optarg); break;
        case 'm': mode = strcmp(optarg, "skip") == 0 ? LA_MODE_SKIP : LA_MODE_DENSE; break;
        default:
            fprintf(stderr, "usage: bench_daemon --socket PATH [--device cpu|cuda] [--batch B] "
                            "[--heads H] [--seq S] [--head-dim D] [--iters N] [--threads T] "
                            "[--mode dense|skip] [--fast] [--lead N] [--depth N] "
                            "[--alloc cudamalloc|cudamalloc-exact|vmm|vmm-chunks]\n");
            return o == 'h' ? 0 : 2;
        }
    }
    int cuda = strcmp(device, "cuda") == 0;
#ifndef LA_HAVE_CUDA
    if (cuda) {
        fprintf(stderr, "bench_daemon: built without CUDA\n");
        return 2;
    }
#endif
    int vmm = strcmp(alloc, "vmm") == 0 ? 1 : strcmp(alloc, "vmm-chunks") == 0 ? 2 : 0;
    /* cudamalloc rounds the block up to whole 2 MiB (as PyTorch's caching allocator does);
     * cudamalloc-exact keeps its size, whose IPC import ran the kernel 1.8x slower on the H200
     * (bench/RESULTS.md, 2026-12-03). */
    int exact = strcmp(alloc, "cudamalloc-exact") == 0;
    if (!vmm && !exact && strcmp(alloc, "cudamalloc") != 0) {
        fprintf(stderr,
                "bench_daemon: --alloc takes cudamalloc, cudamalloc-exact, vmm or vmm-chunks\n");
        return 2;
    }
    if (vmm && !cuda) {
        fprintf(stderr, "bench_daemon: --alloc %s needs --device cuda\n", alloc);
        return 2;
    }
    if (fast && !cuda) {
        fprintf(stderr, "bench_daemon: --fast needs --device cuda\n");
        return 2;
    }
    if (iters < 3 || B < 1 || H < 1 || S < 1 || lead < 0 || depth < 1) {
        fprintf(stderr, "bench_daemon: bad sizes\n");
        return 2;
    }

#ifdef LA_HAVE_CUDA
    /* Before this process touches CUDA: a second process that times the direct call on the
     * block imported by CUDA IPC (what the daemon's kernel reads), to tell the cost of the
     * daemon path from the cost of IPC-mapped memory. */
    if (cuda && !vmm && pipe(ipc_pipe) == 0 && pipe(res_pipe) == 0) {
        ipc_child = fork();
        if (ipc_child == 0) {
            cudaIpcMemHandle_t h;
            la_attn_params cp;
            double med = -1;
            if (read(ipc_pipe[0], &h, sizeof h) == (ssize_t)sizeof h &&
                read(ipc_pipe[0], &cp, sizeof cp) == (ssize_t)sizeof cp) {
                uint8_t *theirs = NULL, *mine;
                if (cudaIpcOpenMemHandle((void **)&theirs, h, cudaIpcMemLazyEnablePeerAccess) ==
                    cudaSuccess) {
                    mine = (uint8_t *)cp.q; /* rebase every pointer onto the import */
                    cp.q = theirs;
                    cp.k = theirs + ((const uint8_t *)cp.k - mine);
                    cp.v = theirs + ((const uint8_t *)cp.v - mine);
                    cp.o = theirs + ((uint8_t *)cp.o - mine);
                    cp.mask = (uint32_t *)(theirs + ((uint8_t *)cp.mask - mine));
                    cudaStream_t cs;
                    cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking);
                    double t[20];
                    int ok = 1;
                    for (int i = -2; i < 20 && ok; i++) {
                        double t0 = now_us();
                        ok = la_attn_fwd_cuda(&cp, cs) == cudaSuccess &&
                             cudaStreamSynchronize(cs) == cudaSuccess;
                        if (i >= 0)
                            t[i] = now_us() - t0;
                    }
                    if (ok)
                        med = pct(t, 20, 0.5);
                    else
                        fprintf(stderr, "bench_daemon: kernel on IPC-imported memory: %s\n",
                                cudaGetErrorString(cudaGetLastError()));
                }
            }
            if (write(res_pipe[1], &med, sizeof med) < 0)
                _exit(1);
            _exit(0);
        }
    }
#endif
    la_client *c;
    int rc = la_connect(sock, "bench_daemon", &c);
    if (rc)
        die("connect", rc);
    la_session_config *cfg;
    la_session_config_new(&cfg);
    la_session_config_set_geometry(cfg, 1, (uint32_t)H, (uint32_t)D, LA_DTYPE_BF16, (uint32_t)S,
                                   (uint32_t)S, (uint32_t)B, 1);
    la_session_config_set_threshold(cfg, -INFINITY);
    la_session_config_set_mode(cfg, mode);
    la_session_config_set_device(cfg, device);
    char key[64];
    snprintf(key, sizeof key, "bench-daemon-%d", (int)getpid());
    la_session *s;
    if ((rc = la_session_open(c, key, cfg, &s)))
        die("session open", rc);
    la_session_config_free(cfg);
    int64_t bm, bn, mask_bytes;
    la_session_get(s, "bm", &bm);
    la_session_get(s, "bn", &bn);
    la_session_get(s, "layer_mask_bytes", &mask_bytes);

    size_t n = (size_t)B * S * H * D, bytes = n * 2;
    uint16_t *hq = malloc(bytes), *hk = malloc(bytes), *hv = malloc(bytes);
    fill_bf16(hq, n, 1);
    fill_bf16(hk, n, 2);
    fill_bf16(hv, n, 3);
    uint32_t *mask = malloc((size_t)mask_bytes);
    memset(mask, 0xff, (size_t)mask_bytes);

    la_buffer *buf;
    uint8_t *base; /* host mapping, or device block */
    uint64_t off0 = 0;
    if (!cuda) {
        if ((rc = la_buffer_new_host(c, 4 * bytes, &buf)))
            die("buffer", rc);
        base = la_buffer_host_ptr(buf);
        memcpy(base, hq, bytes);
        memcpy(base + bytes, hk, bytes);
        memcpy(base + 2 * bytes, hv, bytes);
    } else {
#ifdef LA_HAVE_CUDA
        size_t region = 5 * bytes + (size_t)mask_bytes;
        if (vmm) {
            if (!(base = vmm_alloc(region, vmm == 2 ? (size_t)20 << 20 : 0)))
                die("VMM allocation", LA_ENOMEM);
        } else if (cudaMalloc((void **)&base, exact ? region : round_up_2mib(region)) !=
                   cudaSuccess)
            die("cudaMalloc", LA_ENOMEM);
        cudaMemcpy(base, hq, bytes, cudaMemcpyHostToDevice);
        cudaMemcpy(base + bytes, hk, bytes, cudaMemcpyHostToDevice);
        cudaMemcpy(base + 2 * bytes, hv, bytes, cudaMemcpyHostToDevice);
        cudaMemcpy(base + 5 * bytes, mask, (size_t)mask_bytes, cudaMemcpyHostToDevice);
        if ((rc = la_buffer_register_cuda_range(c, base, region, LA_ACCESS_RW, &buf, &off0)))
            die("register cuda", rc);
#endif
    }

    la_attn *a;
    la_attn_new(&a);
    int64_t sh[4] = {B, S, H, D};
    la_attn_set_tensor(a, LA_TENSOR_Q, buf, off0, LA_DTYPE_BF16, 4, sh, NULL);
    la_attn_set_tensor(a, LA_TENSOR_K, buf, off0 + bytes, LA_DTYPE_BF16, 4, sh, NULL);
    la_attn_set_tensor(a, LA_TENSOR_V, buf, off0 + 2 * bytes, LA_DTYPE_BF16, 4, sh, NULL);
    la_attn_set_tensor(a, LA_TENSOR_O, buf, off0 + 3 * bytes, LA_DTYPE_BF16, 4, sh, NULL);

    /* The direct call: same tensors (in this process's memory), same tiles. */
    la_attn_params p;
    memset(&p, 0, sizeof p);
    /* O at 4 * bytes: not the daemon's O, so both paths write their own. */
    bench_bf16_params(&p, base, base + bytes, base + 2 * bytes, base + 4 * bytes, B, S, H, D,
                      mode);
    int32_t nq = la_tiles(S, (int32_t)bm), words = la_mask_words(la_tiles(S, (int32_t)bn));
    p.mask_stride[2] = words;
    p.mask_stride[1] = (int64_t)nq * words;
    p.mask_stride[0] = (int64_t)H * nq * words;
    p.BM = (int32_t)bm, p.BN = (int32_t)bn;
    p.threads = threads;
    uint8_t *host_o = NULL;
    if (!cuda) {
        host_o = malloc(bytes);
        p.o = host_o;
        p.mask = mask;
    }
#ifdef LA_HAVE_CUDA
    cudaStream_t stream = NULL;
    if (cuda) {
        p.mask = (uint32_t *)(base + 5 * bytes);
        cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    }
#endif

    double *td = malloc(sizeof(double) * (size_t)iters),
           *tc = malloc(sizeof(double) * (size_t)iters);
    double *tk = malloc(sizeof(double) * (size_t)iters);
    for (int i = -3; i < iters; i++) { /* 3 warm-up rounds; the two paths alternate */
        la_attn_set_position(a, 0, (uint32_t)(i < 0 ? 0 : i), 0);
        double t0 = now_us();
        la_call *call;
        if ((rc = la_attn_run(s, a, &call)))
            die("attention", rc);
        double t1 = now_us();
        int64_t cns = 0;
        la_call_stat(call, "compute_ns", &cns);
        la_call_free(call);
        if (i >= 0)
            tk[i] = cns / 1e3;
        p.step = i < 0 ? 0 : i;
        if (!cuda) {
            if ((rc = la_ref_attn_fwd(&p)))
                die("direct reference", rc);
        } else {
#ifdef LA_HAVE_CUDA
            if (la_attn_fwd_cuda(&p, stream) != cudaSuccess || cudaStreamSynchronize(stream))
                die("direct kernel", LA_EDEVICE);
#endif
        }
        double t2 = now_us();
        if (i >= 0) {
            td[i] = t1 - t0;
            tc[i] = t2 - t1;
        }
    }
    double d50 = pct(td, iters, 0.5), d90 = pct(td, iters, 0.9);
    double c50 = pct(tc, iters, 0.5), c90 = pct(tc, iters, 0.9);
    double k50 = pct(tk, iters, 0.5), k90 = pct(tk, iters, 0.9);
    printf("bench_daemon: %s%s%s, B%d H%d S%d D%d bf16, mode %s, tiles %lldx%lld, %d iterations\n",
           device, cuda ? ", memory by " : "", cuda ? alloc : "", B, H, S, D, mode == LA_MODE_DENSE ? "dense" : "skip", (long long)bm,
           (long long)bn, iters);
    printf("%-28s %12s %12s\n", "path", "median us", "p90 us");
    printf("%-28s %12.1f %12.1f\n", "through liteattnd", d50, d90);
    printf("%-28s %12.1f %12.1f\n", cuda ? "direct la_attn_fwd_cuda" : "direct la_ref_attn_fwd",
           c50, c90);
    printf("%-28s %12.1f %12.1f\n", "  of which daemon compute", k50, k90);
#ifdef LA_HAVE_CUDA
    if (cuda && ipc_child >= 0) {
        /* The same direct call on the block imported by CUDA IPC in another process. */
        cudaIpcMemHandle_t h;
        if (cudaIpcGetMemHandle(&h, base) == cudaSuccess &&
            write(ipc_pipe[1], &h, sizeof h) == (ssize_t)sizeof h &&
            write(ipc_pipe[1], &p, sizeof p) == (ssize_t)sizeof p) {
            double t;
            if (read(res_pipe[0], &t, sizeof t) == (ssize_t)sizeof t && t > 0)
                printf("%-28s %12.1f\n", "direct, on IPC-imported mem", t);
        }
        close(ipc_pipe[1]);
        waitpid(ipc_child, NULL, 0);
    }
#endif
    printf("%-28s %12.1f\n", "added by the daemon", d50 - c50);
#ifdef LA_HAVE_CUDA
    if (fast)
        fast_path(s, a, &p, stream, iters, lead, depth);
#endif

    la_attn_free(a);
    la_session_close(s);
    la_buffer_unregister(buf);
    la_disconnect(c);
    return 0;
}
