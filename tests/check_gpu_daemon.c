/*
 * check_gpu_daemon.c — end to end on a GPU: liteattnd with the CUDA backend, client processes
 * that pass their device buffers by CUDA IPC (la_buffer_register_cuda) and order their work with
 * interprocess events, against direct calls of the same kernel (la_attn_fwd_cuda) in the
 * client's own process.
 *
 * Two client processes run at once, each with its own session, for several denoising steps of
 * drifting inputs at tau = -3: every step's O, LSE and mask from the daemon must equal the
 * direct call bit for bit (same kernel, same inputs, same mask), and the daemon's live-tile
 * count must match. Bad GPU input (an extent past the registered block) must be refused
 * without touching the GPU, and the daemon must go on serving.
 *
 * The same runs on VMM memory (cuMemCreate allocations of the minimum granularity mapped side
 * by side, tensors straddling them, registered with la_buffer_register_cuda_range: the daemon
 * imports the allocations' POSIX fds), and the VMM error paths on a real driver: a read-only
 * buffer refuses O, sizes past an allocation or off the granularity, a /dev/null fd, a stale
 * registration after the memory was replaced; a client killed with VMM buffers registered leaves
 * the daemon serving.
 *
 * The fast path (la_attn_enqueue: calls ordered on the client's stream by the doorbell):
 * LAYERS calls pipelined from each of two client processes equal direct calls bit for bit,
 * masks included; a call the daemon refuses in the middle of a pipeline is reported and the
 * stream still completes; a client killed with calls launched on doorbells it will never ring
 * leaves the daemon serving, its calls released, its imports closed (its GPU memory back);
 * calls whose doorbell is not rung within --doorbell-timeout fail with LA_ETIMEDOUT and their
 * layers restart dense.
 *
 * The warm start and the quality guardrail on the CUDA backend (docs/SKIP-SEMANTICS.md): a
 * generation seeded (margin 0, one generation) from an earlier one's last masks must equal,
 * bit for bit, direct calls whose mask starts as those masks; a guardrail at tau = 0 must
 * restore the rows whose float64 lost mass passes its budget.
 *
 * Runs only where a GPU is present (tests/run.sh skips check_gpu_* programs otherwise). The
 * Check case process never touches CUDA: the client processes it forks do.
 */
#include <check.h>
#include <stdio.h>

#ifndef LA_HAVE_CUDA
/* Built without CUDA: no cases at all; the CUDA-less builds (sanitizers) leave this program
 * out. */
int main(void) { return 0; }
#else

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cuda.h> /* driver types; the driver is reached through cudaGetDriverEntryPoint */
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <signal.h>

#include "la_attn.h"
#include "la_cuda.h"
#include "liteattn.h"
#include "testutil.h"
#include "testutil_daemon.h"

#define STEPS 6

/* A client process reports failure by message and exit status 1. */
#define CHILD_FAIL(...)                      \
    do {                                     \
        fprintf(stderr, "client %d: ", who); \
        fprintf(stderr, __VA_ARGS__);        \
        fprintf(stderr, "\n");               \
        _exit(1);                            \
    } while (0)
#define CUDA_CHECK(call)                                         \
    do {                                                         \
        cudaError_t e_ = (call);                                 \
        if (e_ != cudaSuccess)                                   \
            CHILD_FAIL("%s: %s", #call, cudaGetErrorString(e_)); \
    } while (0)
#define LA_CHECK(call)                                                                  \
    do {                                                                                \
        int r_ = (call);                                                                \
        if (r_ != 0)                                                                    \
            CHILD_FAIL("%s: %s (%s)", #call, la_err_name(r_), la_last_error_message()); \
    } while (0)

static size_t align_up(size_t n) { return (n + 255) & ~(size_t)255; }

/* ---- VMM memory of the client (driver API through the runtime's entry points) ------------- */

static struct {
    CUresult (*Create)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,
                       unsigned long long);
    CUresult (*Release)(CUmemGenericAllocationHandle);
    CUresult (*Reserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*Free)(CUdeviceptr, size_t);
    CUresult (*Map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
    CUresult (*Unmap)(CUdeviceptr, size_t);
    CUresult (*SetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    CUresult (*Export)(void *, CUmemGenericAllocationHandle, CUmemAllocationHandleType,
                       unsigned long long);
    CUresult (*Granularity)(size_t *, const CUmemAllocationProp *,
                            CUmemAllocationGranularity_flags);
} vd;

#define MAX_CHUNKS 16

typedef struct vmm_mem {
    CUdeviceptr va;
    size_t chunk, reserved;
    int n;
    CUmemGenericAllocationHandle h[MAX_CHUNKS];
} vmm_mem;

static CUmemAllocationProp vmm_prop(void)
{
    CUmemAllocationProp p;
    memset(&p, 0, sizeof p);
    p.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    p.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    p.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = 0;
    return p;
}

/* 0, or -1 when the driver lacks the VMM API (vd then all NULL). */
static int vmm_load(void)
{
    struct {
        const char *name;
        void **slot;
    } t[] = {{"cuMemCreate", (void **)&vd.Create},
             {"cuMemRelease", (void **)&vd.Release},
             {"cuMemAddressReserve", (void **)&vd.Reserve},
             {"cuMemAddressFree", (void **)&vd.Free},
             {"cuMemMap", (void **)&vd.Map},
             {"cuMemUnmap", (void **)&vd.Unmap},
             {"cuMemSetAccess", (void **)&vd.SetAccess},
             {"cuMemExportToShareableHandle", (void **)&vd.Export},
             {"cuMemGetAllocationGranularity", (void **)&vd.Granularity}};
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        enum cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion(t[i].name, t[i].slot, 12000, cudaEnableDefault,
                                             &q) != cudaSuccess ||
            q != cudaDriverEntryPointSuccess || !*t[i].slot) {
            memset(&vd, 0, sizeof vd); /* all or nothing: vmm_granularity tests one slot */
            return -1;
        }
    }
    return 0;
}

/* The minimum granularity of vmm_prop's allocations, or 0. The entry points are loaded here
 * first: the clients once asked vd.Granularity before vmm_load had filled it, a call through a
 * NULL pointer that killed every VMM client process with SIGSEGV (H200, driver 580). */
static size_t vmm_granularity(void)
{
    if (!vd.Granularity && vmm_load() < 0)
        return 0;
    CUmemAllocationProp p = vmm_prop();
    size_t g = 0;
    if (vd.Granularity(&g, &p, CU_MEM_ALLOC_GRANULARITY_MINIMUM) != CUDA_SUCCESS)
        return 0;
    return g;
}

/* n allocations of chunk bytes, mapped side by side, read-write for device 0. */
static int vmm_alloc(vmm_mem *m, size_t chunk, int n)
{
    memset(m, 0, sizeof *m);
    if (n > MAX_CHUNKS)
        return -1;
    m->chunk = chunk;
    CUmemAllocationProp p = vmm_prop();
    if (vd.Reserve(&m->va, chunk * (size_t)n, chunk, 0, 0) != CUDA_SUCCESS)
        return -1;
    m->reserved = chunk * (size_t)n;
    for (int i = 0; i < n; i++) {
        if (vd.Create(&m->h[i], chunk, &p, 0) != CUDA_SUCCESS ||
            vd.Map(m->va + (size_t)i * chunk, chunk, 0, m->h[i], 0) != CUDA_SUCCESS)
            return -1;
        m->n++;
    }
    CUmemAccessDesc d;
    memset(&d, 0, sizeof d);
    d.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    d.location.id = 0;
    d.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    return vd.SetAccess(m->va, chunk * (size_t)n, &d, 1) == CUDA_SUCCESS ? 0 : -1;
}

static void vmm_release(vmm_mem *m)
{
    for (int i = 0; i < m->n; i++) {
        vd.Unmap(m->va + (size_t)i * m->chunk, m->chunk);
        vd.Release(m->h[i]);
    }
    if (m->va)
        vd.Free(m->va, m->reserved);
    memset(m, 0, sizeof *m);
}

static int vmm_export(CUmemGenericAllocationHandle h)
{
    int fd = -1;
    if (vd.Export(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0) != CUDA_SUCCESS)
        return -1;
    return fd;
}

/* One client: its own session of geometry (B, S, H, D), STEPS steps through the daemon and the
 * same steps through the kernel directly; exits 0 when everything matched. */
static void run_client(const char *sock, int who, int32_t B, int32_t Sq, int32_t Sk, int32_t H,
                       int32_t D, la_dtype dt, int vmm)
{
    tu_rng rng;
    tu_rng_init(&rng, (uint64_t)who * 7919 + 17);

    la_client *c;
    LA_CHECK(la_connect(sock, "check_gpu_daemon", &c));
    la_session_config *cfg;
    LA_CHECK(la_session_config_new(&cfg));
    LA_CHECK(la_session_config_set_geometry(cfg, 2, (uint32_t)H, (uint32_t)D, dt, (uint32_t)Sq,
                                            (uint32_t)Sk, (uint32_t)B, 1));
    LA_CHECK(la_session_config_set_threshold(cfg, -3.0f));
    LA_CHECK(la_session_config_set_device(cfg, "cuda"));
    char key[64];
    snprintf(key, sizeof key, "gpu-e2e-%d-%d", who, (int)getpid());
    la_session *s;
    LA_CHECK(la_session_open(c, key, cfg, &s));
    la_session_config_free(cfg);
    int64_t bm, bn, layer_bytes;
    LA_CHECK(la_session_get(s, "bm", &bm));
    LA_CHECK(la_session_get(s, "bn", &bn));
    LA_CHECK(la_session_get(s, "layer_mask_bytes", &layer_bytes));

    /* Host problem with the session's tiles; its mask is the direct path's mask (host copy). */
    tu_problem *t = tu_problem_new(&rng, B, Sq, Sk, H, D, dt, (int32_t)bm, (int32_t)bn, 2.0);
    if ((int64_t)(t->mask_words * 4) != layer_bytes)
        CHILD_FAIL("session layer mask %lld bytes, expected %zu", (long long)layer_bytes,
                   t->mask_words * 4);
    size_t es = la_dtype_size(dt);
    size_t nq = (size_t)B * Sq * H * D * es, nk = (size_t)B * Sk * H * D * es;
    size_t nlse = (size_t)B * H * Sq * sizeof(float);
    size_t off_q = 0, off_k = align_up(nq), off_v = off_k + align_up(nk),
           off_o = off_v + align_up(nk), off_lse = off_o + align_up(nq),
           total = off_lse + align_up(nlse);

    CUDA_CHECK(cudaSetDevice(0));
    uint8_t *blk, *direct; /* daemon's block (q, k, v, o, lse); direct o, lse, mask */
    vmm_mem vm;
    memset(&vm, 0, sizeof vm);
    if (vmm) {
        /* Allocations of the minimum granularity: every tensor straddles one of their seams. */
        CUDA_CHECK(cudaFree(NULL));
        size_t g = vmm_granularity(); /* loads the entry points */
        if (g == 0)
            CHILD_FAIL("the driver lacks the VMM API");
        int n = (int)((total + g - 1) / g);
        if (vmm_alloc(&vm, g, n) < 0)
            CHILD_FAIL("cuMemCreate/cuMemMap of %d x %zu bytes failed", n, g);
        blk = (uint8_t *)(uintptr_t)vm.va;
    } else {
        CUDA_CHECK(cudaMalloc((void **)&blk, total));
    }
    CUDA_CHECK(cudaMalloc((void **)&direct, align_up(nq) + align_up(nlse) + t->mask_words * 4));
    uint8_t *d_o = direct, *d_lse = direct + align_up(nq), *d_mask = d_lse + align_up(nlse);
    CUDA_CHECK(cudaMemcpy(d_mask, t->mask, t->mask_words * 4, cudaMemcpyHostToDevice));
    la_buffer *buf;
    uint64_t base_off = 1;
    if (vmm) {
        /* The whole range: every allocation by its fd. A read-only sub-range inside it is
         * the same registration (the cache), at its offset. */
        LA_CHECK(la_buffer_register_cuda_range(c, blk, total, LA_ACCESS_RW, &buf, &base_off));
        if (base_off != 0)
            CHILD_FAIL("register_cuda_range: offset %llu, expected 0", (unsigned long long)base_off);
        if (la_buffer_size(buf) != (uint64_t)vm.n * vm.chunk)
            CHILD_FAIL("VMM buffer of %llu bytes, expected its %d allocations' %zu",
                       (unsigned long long)la_buffer_size(buf), vm.n, (size_t)vm.n * vm.chunk);
        la_buffer *again;
        uint64_t off2 = 0;
        LA_CHECK(la_buffer_register_cuda_range(c, blk + off_v, nk, LA_ACCESS_READ, &again, &off2));
        if (again != buf || off2 != off_v)
            CHILD_FAIL("a sub-range registered anew (%p vs %p, offset %llu vs %zu)",
                       (void *)again, (void *)buf, (unsigned long long)off2, off_v);
        LA_CHECK(la_buffer_unregister(again));
        if (la_buffer_cuda_valid(buf) != 1)
            CHILD_FAIL("la_buffer_cuda_valid: %d on fresh memory", la_buffer_cuda_valid(buf));
    } else {
        /* Register a pointer inside the block: the library must find the block's base. */
        LA_CHECK(la_buffer_register_cuda(c, blk + off_k, &buf, &base_off));
        if (base_off != off_k)
            CHILD_FAIL("register_cuda: offset %llu, expected %zu", (unsigned long long)base_off,
                       off_k);
    }

    cudaStream_t st;
    cudaEvent_t ready;
    CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming | cudaEventInterprocess));
    cudaIpcEventHandle_t ready_h;
    CUDA_CHECK(cudaIpcGetEventHandle(&ready_h, ready));

    la_attn *a;
    LA_CHECK(la_attn_new(&a));
    int64_t shq[4] = {B, Sq, H, D}, shk[4] = {B, Sk, H, D}, shl[3] = {B, H, Sq};
    LA_CHECK(la_attn_set_tensor(a, LA_TENSOR_Q, buf, off_q, dt, 4, shq, NULL));
    LA_CHECK(la_attn_set_tensor(a, LA_TENSOR_K, buf, off_k, dt, 4, shk, NULL));
    LA_CHECK(la_attn_set_tensor(a, LA_TENSOR_V, buf, off_v, dt, 4, shk, NULL));
    LA_CHECK(la_attn_set_tensor(a, LA_TENSOR_O, buf, off_o, dt, 4, shq, NULL));
    LA_CHECK(la_attn_set_tensor(a, LA_TENSOR_LSE, buf, off_lse, LA_DTYPE_F32, 3, shl, NULL));
    LA_CHECK(la_attn_set_wait_event(a, &ready_h, sizeof ready_h));

    void *h_o1 = malloc(nq), *h_o2 = malloc(nq);
    float *h_l1 = malloc(nlse), *h_l2 = malloc(nlse);
    uint32_t *m1 = malloc(t->mask_words * 4), *m2 = malloc(t->mask_words * 4);
    unsigned long long *d_tiles;
    CUDA_CHECK(cudaMalloc((void **)&d_tiles, sizeof *d_tiles));

    /* STEPS steps, then step 0 again: a new generation, which the daemon starts dense (the
     * layer's device mask set to all ones first), as the direct call on a fresh mask. */
    uint32_t *ones = malloc(t->mask_words * 4);
    memcpy(ones, t->mask, t->mask_words * 4);
    for (int idx = 0; idx <= STEPS; idx++) {
        const int step = idx < STEPS ? idx : 0;
        if (idx == STEPS)
            CUDA_CHECK(cudaMemcpy(d_mask, ones, t->mask_words * 4, cudaMemcpyHostToDevice));
        tu_problem_drift(t, step, 0.02);
        /* The inputs reach the GPU asynchronously; the daemon waits on `ready`. */
        CUDA_CHECK(cudaMemcpyAsync(blk + off_q, t->q, nq, cudaMemcpyHostToDevice, st));
        CUDA_CHECK(cudaMemcpyAsync(blk + off_k, t->k, nk, cudaMemcpyHostToDevice, st));
        CUDA_CHECK(cudaMemcpyAsync(blk + off_v, t->v, nk, cudaMemcpyHostToDevice, st));
        CUDA_CHECK(cudaMemsetAsync(blk + off_o, 0xff, nq, st)); /* poison: NaN */
        CUDA_CHECK(cudaEventRecord(ready, st));

        LA_CHECK(la_attn_set_position(a, 1, (uint32_t)step, 0));
        la_call *call;
        LA_CHECK(la_attn_run(s, a, &call));
        int64_t computed = -1;
        LA_CHECK(la_call_stat(call, "tiles_computed", &computed));
        uint8_t done_h[64];
        LA_CHECK(la_call_done_event(call, done_h, sizeof done_h));
        la_call_free(call);
        cudaIpcEventHandle_t dh;
        memcpy(&dh, done_h, sizeof dh);
        cudaEvent_t done;
        CUDA_CHECK(cudaIpcOpenEventHandle(&done, dh));
        CUDA_CHECK(cudaStreamWaitEvent(st, done, 0));
        CUDA_CHECK(cudaMemcpyAsync(h_o1, blk + off_o, nq, cudaMemcpyDeviceToHost, st));
        CUDA_CHECK(cudaMemcpyAsync(h_l1, blk + off_lse, nlse, cudaMemcpyDeviceToHost, st));
        CUDA_CHECK(cudaStreamSynchronize(st));
        CUDA_CHECK(cudaEventDestroy(done));
        LA_CHECK(la_session_read_mask(s, 1, 0, m1, t->mask_words * 4));

        /* The same call, directly. */
        la_attn_params p = t->p;
        p.q = blk + off_q;
        p.k = blk + off_k;
        p.v = blk + off_v;
        p.o = d_o;
        p.lse = (float *)d_lse;
        p.mask = (uint32_t *)d_mask;
        p.mode = LA_MODE_SKIP;
        p.tau = -3.0f;
        p.step = step;
        p.ret_tiles_computed = (int64_t *)d_tiles;
        CUDA_CHECK(cudaMemsetAsync(d_tiles, 0, sizeof *d_tiles, st));
        CUDA_CHECK(la_attn_fwd_cuda(&p, st));
        unsigned long long tiles = 0;
        CUDA_CHECK(cudaMemcpyAsync(h_o2, d_o, nq, cudaMemcpyDeviceToHost, st));
        CUDA_CHECK(cudaMemcpyAsync(h_l2, d_lse, nlse, cudaMemcpyDeviceToHost, st));
        CUDA_CHECK(cudaMemcpyAsync(m2, d_mask, t->mask_words * 4, cudaMemcpyDeviceToHost, st));
        CUDA_CHECK(cudaMemcpyAsync(&tiles, d_tiles, sizeof tiles, cudaMemcpyDeviceToHost, st));
        CUDA_CHECK(cudaStreamSynchronize(st));

        if (memcmp(h_o1, h_o2, nq) != 0)
            CHILD_FAIL("step %d: O through the daemon differs from the direct call", step);
        if (memcmp(h_l1, h_l2, nlse) != 0)
            CHILD_FAIL("step %d: LSE through the daemon differs from the direct call", step);
        if (memcmp(m1, m2, t->mask_words * 4) != 0)
            CHILD_FAIL("step %d: mask through the daemon differs from the direct call", step);
        if ((unsigned long long)computed != tiles)
            CHILD_FAIL("step %d: daemon computed %lld tiles, direct %llu", step,
                       (long long)computed, tiles);
        /* Against an independent model: the daemon's output is attention. */
        if (step == 0) {
            size_t n = (size_t)B * Sq * H * D;
            double *ref = malloc(n * sizeof(double)), *got = malloc(n * sizeof(double));
            la_attn_params hp = t->p;
            hp.o = h_o1;
            naive_attn_f64(&hp, NULL, ref, NULL);
            tu_o_f64(&hp, got);
            double err = tu_rel_l2(ref, got, (int64_t)n);
            if (!(err <= 1e-2))
                CHILD_FAIL("step 0 (dense): rel L2 %.3g against float64 attention", err);
            free(ref);
            free(got);
        }
        const long long all =
            (long long)B * H * la_tiles(Sq, (int32_t)bm) * la_tiles(Sk, (int32_t)bn);
        fprintf(stderr, "client %d step %d: %lld of %lld tiles computed\n", who, step,
                (long long)computed, all);
        if (idx == STEPS && computed != all)
            CHILD_FAIL("step 0 after step %d: %lld of %lld tiles computed, want all", STEPS - 1,
                       (long long)computed, all);
    }
    free(ones);
    int64_t restarts = -1;
    LA_CHECK(la_session_stat(s, "restarts", &restarts));
    if (restarts != 1)
        CHILD_FAIL("session restarts %lld, want 1", (long long)restarts);

    /* Bad input: V's extent 256 bytes past the buffer. Refused, nothing launched. */
    LA_CHECK(la_attn_set_tensor(a, LA_TENSOR_V, buf, la_buffer_size(buf) - nk + 256, dt, 4, shk,
                                NULL));
    int rc = la_attn_run(s, a, NULL);
    if (rc != LA_ERANGE)
        CHILD_FAIL("extent past the block: %s, expected LA_ERANGE", la_err_name(rc));
    uint64_t rtt;
    LA_CHECK(la_ping(c, &rtt));

    la_attn_free(a);
    LA_CHECK(la_session_close(s));
    LA_CHECK(la_buffer_unregister(buf));
    la_disconnect(c);
    if (vmm)
        vmm_release(&vm);
    tu_problem_free(t);
    _exit(0);
}

/* Q and K with positional structure (peaked attention as with RoPE, so that tiles are skipped),
 * a per-generation noise and slow drift, V random; host arrays of t in its dtype. */
static void fill_structured(tu_problem *t, uint64_t gen, int step)
{
    const la_attn_params *p = &t->p;
    tu_rng g;
    tu_rng_init(&g, 5000 + gen * 7919 + (uint64_t)step);
    for (int32_t b = 0; b < p->B; b++)
        for (int32_t s = 0; s < p->Sq; s++)
            for (int32_t h = 0; h < p->H; h++)
                for (int32_t f = 0; f < p->D / 2; f++) {
                    double w = 6.283185307179586 / (8.0 * pow(1.28, f % 32));
                    double ph = 0.37 * h + 1.3 * f;
                    double c = 1.6 * cos(w * s + ph), sn = 1.6 * sin(w * s + ph);
                    int64_t i = (((int64_t)b * p->Sq + s) * p->H + h) * p->D + 2 * f;
                    for (int k = 0; k < 2; k++) {
                        double base = k ? sn : c;
                        tu_set(t->q, p->dtype, i + k, base + 0.3 * tu_rng_normal(&g));
                        tu_set(t->k, p->dtype, i + k, base + 0.3 * tu_rng_normal(&g));
                        tu_set(t->v, p->dtype, i + k, tu_rng_normal(&g));
                    }
                }
}

/* What the warm/guard client shares between its calls. */
typedef struct wg {
    tu_problem *t;
    la_attn *a;
    uint8_t *blk;
    size_t nx, nl, off_k, off_v, off_o, off_l;
    cudaStream_t st;
    cudaEvent_t ready;
} wg;

/* Inputs of (gen, step) to the GPU, one call of s at step through the daemon (ordered by the
 * interprocess events); returns its tiles computed; its O and LSE in o, l (host). */
static int64_t wg_call(wg *w, la_session *s, uint64_t gen, int step, void *o, float *l)
{
    const int who = 9;
    fill_structured(w->t, gen, step);
    CUDA_CHECK(cudaMemcpyAsync(w->blk, w->t->q, w->nx, cudaMemcpyHostToDevice, w->st));
    CUDA_CHECK(cudaMemcpyAsync(w->blk + w->off_k, w->t->k, w->nx, cudaMemcpyHostToDevice, w->st));
    CUDA_CHECK(cudaMemcpyAsync(w->blk + w->off_v, w->t->v, w->nx, cudaMemcpyHostToDevice, w->st));
    CUDA_CHECK(cudaEventRecord(w->ready, w->st));
    LA_CHECK(la_attn_set_position(w->a, 0, (uint32_t)step, 0));
    la_call *call;
    LA_CHECK(la_attn_run(s, w->a, &call));
    int64_t computed = -1;
    LA_CHECK(la_call_stat(call, "tiles_computed", &computed));
    uint8_t done_h[64];
    LA_CHECK(la_call_done_event(call, done_h, sizeof done_h));
    la_call_free(call);
    cudaIpcEventHandle_t dh;
    memcpy(&dh, done_h, sizeof dh);
    cudaEvent_t done;
    CUDA_CHECK(cudaIpcOpenEventHandle(&done, dh));
    CUDA_CHECK(cudaStreamWaitEvent(w->st, done, 0));
    if (o)
        CUDA_CHECK(cudaMemcpyAsync(o, w->blk + w->off_o, w->nx, cudaMemcpyDeviceToHost, w->st));
    if (l)
        CUDA_CHECK(cudaMemcpyAsync(l, w->blk + w->off_l, w->nl, cudaMemcpyDeviceToHost, w->st));
    CUDA_CHECK(cudaStreamSynchronize(w->st));
    CUDA_CHECK(cudaEventDestroy(done));
    return computed;
}

static la_session *wg_open(la_client *c, const char *key, float tau, const char *warm_key,
                           int guard)
{
    const int who = 9;
    la_session_config *cfg;
    LA_CHECK(la_session_config_new(&cfg));
    LA_CHECK(la_session_config_set_geometry(cfg, 1, 2, 128, LA_DTYPE_BF16, 2048, 2048, 1, 1));
    LA_CHECK(la_session_config_set_device(cfg, "cuda"));
    LA_CHECK(la_session_config_set_threshold(cfg, tau));
    /* Seeded from one generation, margin 0, no dense step: the seed is the stored masks. */
    if (warm_key)
        LA_CHECK(la_session_config_set_warm_start(cfg, warm_key, LA_WARM_DEFAULT, 1, 0, 0));
    if (guard) /* every step, every q-tile, 2% of a row's mass */
        LA_CHECK(la_session_config_set_guard(cfg, 1, 64, 0.02f));
    char name[96];
    snprintf(name, sizeof name, "%s-%d", key, (int)getpid());
    la_session *s;
    LA_CHECK(la_session_open(c, name, cfg, &s));
    la_session_config_free(cfg);
    return s;
}

/* The warm start and the guardrail through the daemon on the GPU (one client). */
static void run_warm_guard_client(const char *sock)
{
    const int who = 9;
    const int32_t B = 1, S = 2048, H = 2, D = 128;
    const la_dtype dt = LA_DTYPE_BF16;
    la_client *c;
    LA_CHECK(la_connect(sock, "check_gpu_daemon", &c));
    char wkey[64];
    snprintf(wkey, sizeof wkey, "gpu-warm-%d", (int)getpid());
    la_session *s0 = wg_open(c, "gpu-cold", -3.0f, wkey, 0);
    int64_t bm, bn, lb;
    LA_CHECK(la_session_get(s0, "bm", &bm));
    LA_CHECK(la_session_get(s0, "bn", &bn));
    LA_CHECK(la_session_get(s0, "layer_mask_bytes", &lb));
    tu_rng rng;
    tu_rng_init(&rng, 99);
    wg w;
    memset(&w, 0, sizeof w);
    w.t = tu_problem_new(&rng, B, S, S, H, D, dt, (int32_t)bm, (int32_t)bn, 1.0);
    const int32_t nq = la_tiles(S, (int32_t)bm), nk = la_tiles(S, (int32_t)bn);
    const size_t mb = (size_t)lb;
    w.nx = (size_t)B * S * H * D * la_dtype_size(dt);
    w.nl = (size_t)B * H * S * 4;
    w.off_k = align_up(w.nx), w.off_v = w.off_k + align_up(w.nx);
    w.off_o = w.off_v + align_up(w.nx), w.off_l = w.off_o + align_up(w.nx);
    const size_t total = w.off_l + align_up(w.nl);
    CUDA_CHECK(cudaSetDevice(0));
    uint8_t *d_o, *d_l, *d_m;
    CUDA_CHECK(cudaMalloc((void **)&w.blk, total));
    CUDA_CHECK(cudaMalloc((void **)&d_o, w.nx));
    CUDA_CHECK(cudaMalloc((void **)&d_l, w.nl));
    CUDA_CHECK(cudaMalloc((void **)&d_m, mb));
    CUDA_CHECK(cudaStreamCreateWithFlags(&w.st, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&w.ready, cudaEventDisableTiming | cudaEventInterprocess));
    cudaIpcEventHandle_t ready_h;
    CUDA_CHECK(cudaIpcGetEventHandle(&ready_h, w.ready));
    la_buffer *buf;
    uint64_t off0;
    LA_CHECK(la_buffer_register_cuda(c, w.blk, &buf, &off0));
    LA_CHECK(la_attn_new(&w.a));
    int64_t shx[4] = {B, S, H, D}, shl[3] = {B, H, S};
    LA_CHECK(la_attn_set_tensor(w.a, LA_TENSOR_Q, buf, off0, dt, 4, shx, NULL));
    LA_CHECK(la_attn_set_tensor(w.a, LA_TENSOR_K, buf, off0 + w.off_k, dt, 4, shx, NULL));
    LA_CHECK(la_attn_set_tensor(w.a, LA_TENSOR_V, buf, off0 + w.off_v, dt, 4, shx, NULL));
    LA_CHECK(la_attn_set_tensor(w.a, LA_TENSOR_O, buf, off0 + w.off_o, dt, 4, shx, NULL));
    LA_CHECK(la_attn_set_tensor(w.a, LA_TENSOR_LSE, buf, off0 + w.off_l, LA_DTYPE_F32, 3, shl,
                                NULL));
    LA_CHECK(la_attn_set_wait_event(w.a, &ready_h, sizeof ready_h));
    void *o1 = malloc(w.nx), *o2 = malloc(w.nx);
    float *l1 = malloc(w.nl), *l2 = malloc(w.nl);
    uint32_t *m1 = malloc(mb), *m2 = malloc(mb), *seed = malloc(mb);
    const long long all = (long long)B * H * nq * nk;

    /* Generation 0, cold: its last masks are deposited when it closes. */
    for (int step = 0; step < 4; step++)
        wg_call(&w, s0, 0, step, NULL, NULL);
    LA_CHECK(la_session_read_mask(s0, 0, 0, seed, mb));
    LA_CHECK(la_session_close(s0));
    la_session *s1 = wg_open(c, "gpu-warm", -3.0f, wkey, 0);
    int64_t gens = -1;
    LA_CHECK(la_session_get(s1, "warm_generations", &gens));
    if (gens != 1)
        CHILD_FAIL("warm session: %lld generations, want 1 (%s)", (long long)gens,
                   la_session_text(s1, "warm_status"));
    /* Generation 1 (other noise) through the daemon and directly, the direct mask starting as
     * the seed. */
    CUDA_CHECK(cudaMemcpy(d_m, seed, mb, cudaMemcpyHostToDevice));
    for (int step = 0; step < 4; step++) {
        int64_t computed = wg_call(&w, s1, 1, step, o1, l1);
        LA_CHECK(la_session_read_mask(s1, 0, 0, m1, mb));
        la_attn_params p = w.t->p;
        p.q = w.blk;
        p.k = w.blk + w.off_k;
        p.v = w.blk + w.off_v;
        p.o = d_o;
        p.lse = (float *)d_l;
        p.mask = (uint32_t *)d_m;
        p.mode = LA_MODE_SKIP;
        p.tau = -3.0f;
        p.step = step;
        p.ret_tiles_computed = NULL;
        CUDA_CHECK(la_attn_fwd_cuda(&p, w.st));
        CUDA_CHECK(cudaMemcpyAsync(o2, d_o, w.nx, cudaMemcpyDeviceToHost, w.st));
        CUDA_CHECK(cudaMemcpyAsync(l2, d_l, w.nl, cudaMemcpyDeviceToHost, w.st));
        CUDA_CHECK(cudaMemcpyAsync(m2, d_m, mb, cudaMemcpyDeviceToHost, w.st));
        CUDA_CHECK(cudaStreamSynchronize(w.st));
        if (memcmp(o1, o2, w.nx) || memcmp(l1, l2, w.nl) || memcmp(m1, m2, mb))
            CHILD_FAIL("warm step %d: O, LSE or mask differ from the direct call on the seed",
                       step);
        fprintf(stderr, "client %d warm step %d: %lld of %lld tiles computed\n", who, step,
                (long long)computed, all);
        if (step == 0 && computed >= all)
            CHILD_FAIL("warm step 0 computed every tile (%lld)", (long long)computed);
    }
    LA_CHECK(la_session_close(s1));

    /* The guardrail at tau = 0: steps 0 (not checked: all ones), 1 and 2, against the float64
     * lost mass of every row over the mask the call read. */
    la_session *s2 = wg_open(c, "gpu-guard", 0.0f, NULL, 1);
    const int64_t rows = (int64_t)B * H * nq, words = lb / 4 / rows;
    uint8_t *comp = malloc((size_t)rows * nk);
    double *lse_d = malloc((size_t)B * H * S * sizeof(double));
    double *lse_s = malloc((size_t)B * H * S * sizeof(double));
    double *o_ref = malloc((size_t)B * S * H * D * sizeof(double));
    int64_t must_total = 0, may_total = 0, restored = 0;
    for (int step = 0; step < 3; step++) {
        LA_CHECK(la_session_read_mask(s2, 0, 0, m2, mb)); /* before the call */
        wg_call(&w, s2, 2, step, NULL, NULL);
        LA_CHECK(la_session_read_mask(s2, 0, 0, m1, mb)); /* after */
        int64_t now = 0;
        LA_CHECK(la_session_stat(s2, "guard_restored", &now));
        if (step == 0) {
            if (now != 0)
                CHILD_FAIL("the guardrail checked the first call (all ones)");
            continue;
        }
        for (int64_t r = 0; r < rows; r++)
            for (int32_t n = 0; n < nk; n++)
                comp[r * nk + n] = (m2[r * words + n / 32] >> (n % 32)) & 1u;
        naive_attn_f64(&w.t->p, NULL, o_ref, lse_d);
        naive_attn_f64(&w.t->p, comp, o_ref, lse_s);
        int64_t must = 0, may = 0;
        for (int64_t r = 0; r < rows; r++) {
            int32_t m = (int32_t)(r % nq), bh = (int32_t)(r / nq);
            int was = 1, ones = 1;
            for (int32_t n = 0; n < nk; n++) {
                was &= comp[r * nk + n];
                ones &= (m1[r * words + n / 32] >> (n % 32)) & 1u;
            }
            if (was)
                continue; /* restored earlier, or all live: nothing skipped */
            double worst = 0;
            for (int32_t i = m * (int32_t)bm; i < (m + 1) * (int32_t)bm && i < S; i++) {
                double ls = lse_s[(int64_t)bh * S + i], ld = lse_d[(int64_t)bh * S + i];
                worst = fmax(worst, isinf(ls) ? 1.0 : 1.0 - exp(ls - ld));
            }
            /* bf16 inputs, fp32 LSE on the GPU: a margin around the 0.02 budget */
            if (worst > 0.025) {
                must++;
                if (!ones)
                    CHILD_FAIL("step %d: row %lld lost %.4f (budget 0.02) and was not restored",
                               step, (long long)r, worst);
            }
            may += worst > 0.015;
        }
        must_total += must;
        may_total += may;
        if (now - restored < must || now - restored > may)
            CHILD_FAIL("step %d: %lld rows restored, float64 says %lld (%lld within rounding)",
                       step, (long long)(now - restored), (long long)must, (long long)may);
        restored = now;
    }
    int64_t checks = -1;
    LA_CHECK(la_session_stat(s2, "guard_checks", &checks));
    if (checks != 2 || must_total == 0)
        CHILD_FAIL("guardrail: %lld checks (want 2), %lld rows over the budget (want > 0)",
                   (long long)checks, (long long)must_total);
    fprintf(stderr, "client %d guardrail: %lld rows restored (float64: %lld .. %lld)\n", who,
            (long long)restored, (long long)must_total, (long long)may_total);
    LA_CHECK(la_session_close(s2));
    la_attn_free(w.a);
    LA_CHECK(la_buffer_unregister(buf));
    la_disconnect(c);
    tu_problem_free(w.t);
    _exit(0);
}

/* A client process: the VMM error paths on a real driver, and a read-only VMM buffer. */
static void run_vmm_errors(const char *sock)
{
    const int who = 0;
    CUDA_CHECK(cudaSetDevice(0));
    CUDA_CHECK(cudaFree(NULL));
    size_t g = vmm_granularity(); /* loads the entry points */
    if (g == 0)
        CHILD_FAIL("the driver lacks the VMM API");
    struct cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    char uuid[48];
    const unsigned char *u = (const unsigned char *)prop.uuid.bytes;
    snprintf(uuid, sizeof uuid,
             "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0],
             u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13],
             u[14], u[15]);
    la_client *c;
    LA_CHECK(la_connect(sock, "check_gpu_daemon", &c));
    vmm_mem m;
    if (vmm_alloc(&m, g, 2) < 0)
        CHILD_FAIL("cuMemCreate/cuMemMap failed");
    int fd = vmm_export(m.h[0]);
    if (fd < 0)
        CHILD_FAIL("cuMemExportToShareableHandle failed");
    la_buffer *b = NULL;
    struct {
        const char *what;
        uint64_t alloc_size;
        int want;
    } sizes[] = {{"twice its size", 2 * g, LA_ERANGE}, {"off the granularity", g + 4096, LA_EINVAL}};
    for (int i = 0; i < 2; i++) {
        uint64_t sz = sizes[i].alloc_size;
        int rc = la_buffer_register_vmm_fd(c, &fd, &sz, 1, 0, sz, uuid, LA_ACCESS_RW, &b);
        if (rc != sizes[i].want)
            CHILD_FAIL("an allocation listed at %s: %s (%s), want %s", sizes[i].what,
                       la_err_name(rc), la_last_error_message(), la_err_name(sizes[i].want));
        fprintf(stderr, "listed at %s: %s\n", sizes[i].what, la_last_error_message());
    }
    /* /dev/null: not a CUDA allocation; the driver refuses it, the daemon says so. */
    int dn = open("/dev/null", O_RDWR | O_CLOEXEC);
    uint64_t gs = g;
    int rc = la_buffer_register_vmm_fd(c, &dn, &gs, 1, 0, g, uuid, LA_ACCESS_RW, &b);
    /* EINVAL or ENOTSUP, as the driver words its refusal of a foreign fd. */
    if (rc != LA_EINVAL && rc != LA_ENOTSUP)
        CHILD_FAIL("/dev/null as a VMM allocation: %s (%s)", la_err_name(rc),
                   la_last_error_message());
    close(dn);
    /* The second allocation's fd where the first frame listed one allocation more: the append
     * of a /dev/null fails and takes the buffer with it. */
    int fds[2] = {fd, open("/dev/null", O_RDWR | O_CLOEXEC)};
    uint64_t two[2] = {g, g};
    rc = la_buffer_register_vmm_fd(c, fds, two, 2, 0, 2 * g, uuid, LA_ACCESS_RW, &b);
    if ((rc != LA_EINVAL && rc != LA_ENOTSUP) || !strstr(la_last_error_message(), "was removed"))
        CHILD_FAIL("a bad second allocation: %s (%s)", la_err_name(rc), la_last_error_message());
    close(fds[1]);

    /* A read-only buffer holds Q, K, V; O in it is refused, O elsewhere works. */
    int32_t S = 256, H = 2, D = 64;
    la_session_config *cfg;
    LA_CHECK(la_session_config_new(&cfg));
    LA_CHECK(la_session_config_set_geometry(cfg, 1, (uint32_t)H, (uint32_t)D, LA_DTYPE_BF16,
                                            (uint32_t)S, 0, 1, 1));
    LA_CHECK(la_session_config_set_device(cfg, "cuda"));
    LA_CHECK(la_session_config_set_mode(cfg, LA_MODE_DENSE));
    la_session *s;
    LA_CHECK(la_session_open(c, "gpu-vmm-ro", cfg, &s));
    la_session_config_free(cfg);
    int fd1 = vmm_export(m.h[1]);
    int both[2] = {fd, fd1};
    la_buffer *ro, *rw;
    LA_CHECK(la_buffer_register_vmm_fd(c, both, two, 2, 0, 2 * g, uuid, LA_ACCESS_READ, &ro));
    LA_CHECK(la_buffer_register_cuda_range(c, (void *)(uintptr_t)m.va, 2 * g, LA_ACCESS_RW, &rw,
                                           NULL));
    size_t tb = (size_t)S * H * D * 2;
    CUDA_CHECK(cudaMemset((void *)(uintptr_t)m.va, 0x3c, 3 * tb));
    la_attn *a;
    LA_CHECK(la_attn_new(&a));
    int64_t sh[4] = {1, S, H, D};
    LA_CHECK(la_attn_set_tensor(a, LA_TENSOR_Q, ro, 0, LA_DTYPE_BF16, 4, sh, NULL));
    LA_CHECK(la_attn_set_tensor(a, LA_TENSOR_K, ro, tb, LA_DTYPE_BF16, 4, sh, NULL));
    LA_CHECK(la_attn_set_tensor(a, LA_TENSOR_V, ro, 2 * tb, LA_DTYPE_BF16, 4, sh, NULL));
    LA_CHECK(la_attn_set_tensor(a, LA_TENSOR_O, ro, 3 * tb, LA_DTYPE_BF16, 4, sh, NULL));
    LA_CHECK(la_attn_set_position(a, 0, 0, 0));
    rc = la_attn_run(s, a, NULL);
    if (rc != LA_EPERM)
        CHILD_FAIL("O in a read-only VMM buffer: %s (%s)", la_err_name(rc),
                   la_last_error_message());
    LA_CHECK(la_attn_set_tensor(a, LA_TENSOR_O, rw, 3 * tb, LA_DTYPE_BF16, 4, sh, NULL));
    LA_CHECK(la_attn_run(s, a, NULL));
    /* Q = K = V = a constant: O is that constant (softmax of equal scores averages equal V). */
    uint16_t *h_o = malloc(tb);
    CUDA_CHECK(cudaMemcpy(h_o, (uint8_t *)(uintptr_t)m.va + 3 * tb, tb, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < tb / 2; i++)
        if (h_o[i] != 0x3c3c)
            CHILD_FAIL("O[%zu] = 0x%04x through read-only inputs, want 0x3c3c", i, h_o[i]);
    free(h_o);
    la_attn_free(a);
    LA_CHECK(la_buffer_unregister(ro));
    close(fd);
    close(fd1);

    /* Stale: the second allocation replaced under the registration. */
    if (la_buffer_cuda_valid(rw) != 1)
        CHILD_FAIL("la_buffer_cuda_valid before the swap: %d", la_buffer_cuda_valid(rw));
    CUmemAllocationProp p = vmm_prop();
    CUmemGenericAllocationHandle nh;
    if (vd.Unmap(m.va + g, g) != CUDA_SUCCESS || vd.Release(m.h[1]) != CUDA_SUCCESS ||
        vd.Create(&nh, g, &p, 0) != CUDA_SUCCESS || vd.Map(m.va + g, g, 0, nh, 0) != CUDA_SUCCESS)
        CHILD_FAIL("replacing the second allocation failed");
    /* Accessible, as memory an application would replace it with (a new mapping has none). */
    CUmemAccessDesc ad;
    memset(&ad, 0, sizeof ad);
    ad.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    ad.location.id = 0;
    ad.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    if (vd.SetAccess(m.va + g, g, &ad, 1) != CUDA_SUCCESS)
        CHILD_FAIL("cuMemSetAccess of the replacement failed");
    m.h[1] = nh;
    if (la_buffer_cuda_valid(rw) != 0)
        CHILD_FAIL("la_buffer_cuda_valid after the swap: %d, want 0", la_buffer_cuda_valid(rw));
    /* A new registration of the range maps the new allocation. */
    la_buffer *rw2;
    LA_CHECK(la_buffer_register_cuda_range(c, (void *)(uintptr_t)m.va, 2 * g, LA_ACCESS_RW, &rw2,
                                           NULL));
    if (rw2 == rw)
        CHILD_FAIL("a stale registration was handed out again");
    LA_CHECK(la_buffer_unregister(rw));
    LA_CHECK(la_buffer_unregister(rw2));
    LA_CHECK(la_session_close(s));
    uint64_t rtt;
    LA_CHECK(la_ping(c, &rtt));
    la_disconnect(c);
    vmm_release(&m);
    _exit(0);
}

/* A client process that registers VMM memory, starts a call and is killed (SIGKILL from the
 * parent once it says it is ready). */
static void run_vmm_victim(const char *sock, int ready_fd)
{
    const int who = 1;
    CUDA_CHECK(cudaSetDevice(0));
    CUDA_CHECK(cudaFree(NULL));
    size_t g = vmm_granularity(); /* loads the entry points */
    if (g == 0)
        CHILD_FAIL("the driver lacks the VMM API");
    int32_t S = 4096, H = 8, D = 128;
    size_t tb = (size_t)S * H * D * 2;
    vmm_mem m;
    if (vmm_alloc(&m, g, (int)((4 * tb + g - 1) / g)) < 0)
        CHILD_FAIL("cuMemCreate/cuMemMap failed");
    CUDA_CHECK(cudaMemset((void *)(uintptr_t)m.va, 0x3c, 4 * tb));
    la_client *c;
    LA_CHECK(la_connect(sock, "check_gpu_daemon-victim", &c));
    la_session_config *cfg;
    LA_CHECK(la_session_config_new(&cfg));
    LA_CHECK(la_session_config_set_geometry(cfg, 1, (uint32_t)H, (uint32_t)D, LA_DTYPE_BF16,
                                            (uint32_t)S, 0, 1, 1));
    LA_CHECK(la_session_config_set_device(cfg, "cuda"));
    LA_CHECK(la_session_config_set_mode(cfg, LA_MODE_DENSE));
    la_session *s;
    LA_CHECK(la_session_open(c, "gpu-vmm-victim", cfg, &s));
    la_buffer *b;
    LA_CHECK(la_buffer_register_cuda_range(c, (void *)(uintptr_t)m.va, 4 * tb, LA_ACCESS_RW, &b,
                                           NULL));
    la_attn *a;
    LA_CHECK(la_attn_new(&a));
    int64_t sh[4] = {1, S, H, D};
    for (int r = 0; r < 4; r++)
        LA_CHECK(la_attn_set_tensor(a, (la_tensor_role)r, b, (uint64_t)r * tb, LA_DTYPE_BF16, 4,
                                    sh, NULL));
    la_call *calls[8];
    for (int i = 0; i < 8; i++) {
        LA_CHECK(la_attn_set_position(a, 0, (uint32_t)i, 0));
        LA_CHECK(la_attn_submit(s, a, NULL, NULL, &calls[i]));
    }
    char x = 1;
    if (write(ready_fd, &x, 1) != 1)
        CHILD_FAIL("write");
    pause(); /* killed here, with calls in flight and the buffer registered */
    _exit(1);
}

static void run_clients(int n, const int32_t (*geo)[5], la_dtype dt, int vmm)
{
    td_daemon d;
    const char *args[] = {"--backend", "cuda", NULL};
    ck_assert_int_eq(td_start(&d, args), 0);
    pid_t pids[4];
    for (int i = 0; i < n; i++) {
        pids[i] = fork();
        ck_assert_int_ge(pids[i], 0);
        if (pids[i] == 0)
            run_client(d.socket, i, geo[i][0], geo[i][1], geo[i][2], geo[i][3], geo[i][4], dt,
                       vmm);
    }
    int failed = 0;
    for (int i = 0; i < n; i++) {
        int st = 0;
        ck_assert_int_eq(waitpid(pids[i], &st, 0), pids[i]);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "client %d failed (status 0x%x)\n", i, st);
            failed++;
        }
    }
    ck_assert_int_eq(td_stop(&d), 0);
    ck_assert_int_eq(failed, 0);
}

START_TEST(test_two_clients_bf16)
{
    /* B, Sq, Sk, H, D: partial tiles, Sq != Sk, B > 1. */
    const int32_t geo[2][5] = {{2, 1000, 1100, 4, 128}, {1, 2000, 1500, 6, 64}};
    run_clients(2, geo, LA_DTYPE_BF16, 0);
}
END_TEST

/* The same two clients on VMM memory (PyTorch expandable_segments' kind), one on cudaMalloc. */
START_TEST(test_two_clients_vmm)
{
    const int32_t geo[2][5] = {{2, 1000, 1100, 4, 128}, {1, 2000, 1500, 6, 64}};
    run_clients(2, geo, LA_DTYPE_BF16, 1);
}
END_TEST

/* VMM error paths against the real driver; then a client killed with VMM buffers and calls
 * in flight leaves the daemon serving a VMM client. */
START_TEST(test_vmm_errors_and_killed_client)
{
    td_daemon d;
    const char *args[] = {"--backend", "cuda", NULL};
    ck_assert_int_eq(td_start(&d, args), 0);
    pid_t p = fork();
    ck_assert_int_ge(p, 0);
    if (p == 0)
        run_vmm_errors(d.socket);
    int st = 0;
    ck_assert_int_eq(waitpid(p, &st, 0), p);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "VMM error client failed (0x%x)", st);

    int pp[2];
    ck_assert_int_eq(pipe(pp), 0);
    p = fork();
    ck_assert_int_ge(p, 0);
    if (p == 0) {
        close(pp[0]);
        run_vmm_victim(d.socket, pp[1]);
    }
    close(pp[1]);
    char x;
    ck_assert_int_eq(read(pp[0], &x, 1), 1);
    close(pp[0]);
    kill(p, SIGKILL);
    ck_assert_int_eq(waitpid(p, &st, 0), p);
    /* The daemon goes on: a VMM client still gets exact answers. */
    const int32_t geo[1][5] = {{1, 1000, 1000, 4, 128}};
    p = fork();
    ck_assert_int_ge(p, 0);
    if (p == 0)
        run_client(d.socket, 2, geo[0][0], geo[0][1], geo[0][2], geo[0][3], geo[0][4],
                   LA_DTYPE_BF16, 1);
    ck_assert_int_eq(waitpid(p, &st, 0), p);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "VMM client after the kill failed (0x%x)",
                  st);
    ck_assert_int_eq(td_stop(&d), 0);
}
END_TEST

START_TEST(test_one_client_f16)
{
    const int32_t geo[1][5] = {{1, 777, 777, 2, 128}};
    run_clients(1, geo, LA_DTYPE_F16, 0);
}
END_TEST

/* ---- the fast path: calls ordered on the client's stream by the doorbell ------------------- */

#define LAYERS 8 /* calls in flight at once: one per layer, all enqueued before any finished */

/* Per layer: the daemon's tensors in one block (q, k, v, o, lse) and the direct call's own
 * o, lse and mask. */
typedef struct fp_layer {
    tu_problem *t;
    size_t off[5];
    uint8_t *d_o, *d_lse, *d_mask;
    la_attn *a;
} fp_layer;

typedef struct fp {
    int who;
    int32_t B, S, H, D;
    la_dtype dt;
    size_t nq, nlse;
    la_client *c;
    la_session *s;
    la_buffer *buf;
    uint8_t *blk, *direct;
    int64_t bm, bn, layer_bytes;
    cudaStream_t st;
    fp_layer l[LAYERS];
    unsigned long long *d_tiles;
} fp;

static void fp_open(fp *f, const char *sock, int who, int32_t B, int32_t S, int32_t H, int32_t D,
                    la_dtype dt, float tau)
{
    memset(f, 0, sizeof *f);
    f->who = who;
    f->B = B, f->S = S, f->H = H, f->D = D, f->dt = dt;
    LA_CHECK(la_connect(sock, "check_gpu_daemon fast", &f->c));
    la_session_config *cfg;
    LA_CHECK(la_session_config_new(&cfg));
    LA_CHECK(la_session_config_set_geometry(cfg, LAYERS, (uint32_t)H, (uint32_t)D, dt, (uint32_t)S,
                                            (uint32_t)S, (uint32_t)B, 1));
    LA_CHECK(la_session_config_set_threshold(cfg, tau));
    LA_CHECK(la_session_config_set_device(cfg, "cuda"));
    char key[64];
    snprintf(key, sizeof key, "gpu-fast-%d-%d", who, (int)getpid());
    LA_CHECK(la_session_open(f->c, key, cfg, &f->s));
    la_session_config_free(cfg);
    LA_CHECK(la_session_fastpath(f->s));
    LA_CHECK(la_session_get(f->s, "bm", &f->bm));
    LA_CHECK(la_session_get(f->s, "bn", &f->bn));
    LA_CHECK(la_session_get(f->s, "layer_mask_bytes", &f->layer_bytes));
    size_t es = la_dtype_size(dt);
    f->nq = (size_t)B * S * H * D * es;
    f->nlse = (size_t)B * H * S * sizeof(float);
    size_t per = 4 * align_up(f->nq) + align_up(f->nlse);
    size_t dper = align_up(f->nq) + align_up(f->nlse) + align_up((size_t)f->layer_bytes);
    CUDA_CHECK(cudaSetDevice(0));
    CUDA_CHECK(cudaMalloc((void **)&f->blk, per * LAYERS));
    CUDA_CHECK(cudaMalloc((void **)&f->direct, dper * LAYERS));
    CUDA_CHECK(cudaMalloc((void **)&f->d_tiles, sizeof *f->d_tiles));
    CUDA_CHECK(cudaStreamCreateWithFlags(&f->st, cudaStreamNonBlocking));
    uint64_t off0;
    LA_CHECK(la_buffer_register_cuda(f->c, f->blk, &f->buf, &off0));
    int64_t shq[4] = {B, S, H, D}, shl[3] = {B, H, S};
    tu_rng rng;
    tu_rng_init(&rng, (uint64_t)who * 131 + 7);
    for (int i = 0; i < LAYERS; i++) {
        fp_layer *L = &f->l[i];
        L->t = tu_problem_new(&rng, B, S, S, H, D, dt, (int32_t)f->bm, (int32_t)f->bn, 2.0);
        if ((int64_t)(L->t->mask_words * 4) != f->layer_bytes)
            CHILD_FAIL("layer mask %zu bytes, the session says %lld", L->t->mask_words * 4,
                       (long long)f->layer_bytes);
        for (int k = 0; k < 4; k++)
            L->off[k] = per * (size_t)i + (size_t)k * align_up(f->nq);
        L->off[4] = per * (size_t)i + 4 * align_up(f->nq);
        L->d_o = f->direct + dper * (size_t)i;
        L->d_lse = L->d_o + align_up(f->nq);
        L->d_mask = L->d_lse + align_up(f->nlse);
        CUDA_CHECK(cudaMemcpy(L->d_mask, L->t->mask, L->t->mask_words * 4, cudaMemcpyHostToDevice));
        LA_CHECK(la_attn_new(&L->a));
        for (int k = 0; k < 4; k++)
            LA_CHECK(
                la_attn_set_tensor(L->a, (la_tensor_role)k, f->buf, L->off[k], dt, 4, shq, NULL));
        LA_CHECK(
            la_attn_set_tensor(L->a, LA_TENSOR_LSE, f->buf, L->off[4], LA_DTYPE_F32, 3, shl, NULL));
    }
}

static void fp_close(fp *f)
{
    int who = f->who;
    for (int i = 0; i < LAYERS; i++) {
        la_attn_free(f->l[i].a);
        tu_problem_free(f->l[i].t);
    }
    LA_CHECK(la_session_close(f->s));
    LA_CHECK(la_buffer_unregister(f->buf));
    la_disconnect(f->c);
}

/* Enqueues layer i's inputs of step on the stream (H2D copies, O poisoned to NaN). */
static void fp_inputs(fp *f, int i, int step)
{
    fp_layer *L = &f->l[i];
    int who = f->who;
    tu_problem_drift(L->t, step, 0.02);
    size_t nk = f->nq;
    CUDA_CHECK(cudaMemcpyAsync(f->blk + L->off[0], L->t->q, f->nq, cudaMemcpyHostToDevice, f->st));
    CUDA_CHECK(cudaMemcpyAsync(f->blk + L->off[1], L->t->k, nk, cudaMemcpyHostToDevice, f->st));
    CUDA_CHECK(cudaMemcpyAsync(f->blk + L->off[2], L->t->v, nk, cudaMemcpyHostToDevice, f->st));
    CUDA_CHECK(cudaMemsetAsync(f->blk + L->off[3], 0xff, f->nq, f->st));
}

/* Layer i's step through the kernel directly (on its own mask), then both outputs compared
 * bit for bit; the masks too when mask_too. */
static void fp_check(fp *f, int i, int step, float tau, int mask_too)
{
    fp_layer *L = &f->l[i];
    int who = f->who;
    la_attn_params p = L->t->p;
    p.q = f->blk + L->off[0];
    p.k = f->blk + L->off[1];
    p.v = f->blk + L->off[2];
    p.o = L->d_o;
    p.lse = (float *)L->d_lse;
    p.mask = (uint32_t *)L->d_mask;
    p.mode = LA_MODE_SKIP;
    p.tau = tau;
    p.step = step;
    p.ret_tiles_computed = (int64_t *)f->d_tiles;
    CUDA_CHECK(cudaMemsetAsync(f->d_tiles, 0, sizeof *f->d_tiles, f->st));
    CUDA_CHECK(la_attn_fwd_cuda(&p, f->st));
    void *h1 = malloc(f->nq), *h2 = malloc(f->nq);
    float *l1 = malloc(f->nlse), *l2 = malloc(f->nlse);
    uint32_t *m1 = malloc((size_t)f->layer_bytes), *m2 = malloc((size_t)f->layer_bytes);
    CUDA_CHECK(cudaMemcpyAsync(h1, f->blk + L->off[3], f->nq, cudaMemcpyDeviceToHost, f->st));
    CUDA_CHECK(cudaMemcpyAsync(l1, f->blk + L->off[4], f->nlse, cudaMemcpyDeviceToHost, f->st));
    CUDA_CHECK(cudaMemcpyAsync(h2, L->d_o, f->nq, cudaMemcpyDeviceToHost, f->st));
    CUDA_CHECK(cudaMemcpyAsync(l2, L->d_lse, f->nlse, cudaMemcpyDeviceToHost, f->st));
    CUDA_CHECK(
        cudaMemcpyAsync(m2, L->d_mask, (size_t)f->layer_bytes, cudaMemcpyDeviceToHost, f->st));
    CUDA_CHECK(cudaStreamSynchronize(f->st));
    if (memcmp(h1, h2, f->nq) != 0)
        CHILD_FAIL("layer %d step %d: O of the enqueued call differs from the direct call", i,
                   step);
    if (memcmp(l1, l2, f->nlse) != 0)
        CHILD_FAIL("layer %d step %d: LSE of the enqueued call differs from the direct call", i,
                   step);
    if (mask_too) {
        LA_CHECK(la_session_read_mask(f->s, (uint32_t)i, 0, m1, (size_t)f->layer_bytes));
        if (memcmp(m1, m2, (size_t)f->layer_bytes) != 0)
            CHILD_FAIL("layer %d step %d: the session's mask differs from the direct call's", i,
                       step);
    }
    free(h1), free(h2), free(l1), free(l2), free(m1), free(m2);
}

/* One client process: LAYERS calls enqueued back to back on one stream per step (inputs copied
 * in on the same stream just before, outputs copied out just after, no host wait between),
 * for several steps at tau = -3; every output and mask equal to direct calls. */
static void run_fast_client(const char *sock, int who, int32_t B, int32_t S, int32_t H, int32_t D)
{
    fp f;
    fp_open(&f, sock, who, B, S, H, D, LA_DTYPE_BF16, -3.0f);
    for (int step = 0; step < 4; step++) {
        for (int i = 0; i < LAYERS; i++)
            fp_inputs(&f, i, step);
        for (int i = 0; i < LAYERS; i++) {
            LA_CHECK(la_attn_set_position(f.l[i].a, (uint32_t)i, (uint32_t)step, 0));
            LA_CHECK(la_attn_enqueue(f.s, f.l[i].a, f.st, NULL));
        }
        LA_CHECK(la_session_sync(f.s, 60000));
        for (int i = 0; i < LAYERS; i++)
            fp_check(&f, i, step, -3.0f, 1);
    }
    int64_t computed = 0, total = 0;
    LA_CHECK(la_session_counter(f.s, "tiles_computed", &computed));
    LA_CHECK(la_session_counter(f.s, "tiles_total", &total));
    fprintf(stderr, "fast client %d: %lld of %lld tiles computed\n", who, (long long)computed,
            (long long)total);
    fp_close(&f);
    _exit(0);
}

/* A call the daemon refuses (a must-do range past the keys) in the middle of a pipeline: the
 * stream completes (its done slot was written with the error), the error is reported, the
 * other calls are right. */
static void run_fast_error_client(const char *sock, int who)
{
    fp f;
    fp_open(&f, sock, who, 1, 1024, 4, 128, LA_DTYPE_BF16, -INFINITY);
    enum { BAD = 4 };
    int64_t bad[2] = {0, 1024 + 64};
    LA_CHECK(la_attn_set_must_do(f.l[BAD].a, bad, 1));
    for (int i = 0; i < LAYERS; i++)
        fp_inputs(&f, i, 0);
    for (int i = 0; i < LAYERS; i++) {
        LA_CHECK(la_attn_set_position(f.l[i].a, (uint32_t)i, 0, 0));
        LA_CHECK(la_attn_enqueue(f.s, f.l[i].a, f.st, NULL));
    }
    alarm(60); /* a stream that hangs fails the case instead of blocking it */
    CUDA_CHECK(cudaStreamSynchronize(f.st));
    alarm(0);
    int rc = la_session_sync(f.s, 60000);
    if (rc != LA_EINVAL || !strstr(la_last_error_message(), "layer 4"))
        CHILD_FAIL("sync after the bad call: %s (%s), expected LA_EINVAL naming layer 4",
                   la_err_name(rc), la_last_error_message());
    LA_CHECK(la_session_sync(f.s, 1000));
    for (int i = 0; i < LAYERS; i++)
        if (i != BAD)
            fp_check(&f, i, 0, -INFINITY, 0);
    fp_close(&f);
    _exit(0);
}

static void wait_clients(int n, const pid_t *pids)
{
    int failed = 0;
    for (int i = 0; i < n; i++) {
        int st = 0;
        ck_assert_int_eq(waitpid(pids[i], &st, 0), pids[i]);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "client %d failed (status 0x%x)\n", i, st);
            failed++;
        }
    }
    ck_assert_int_eq(failed, 0);
}

START_TEST(test_fast_two_clients_pipelined)
{
    td_daemon d;
    const char *args[] = {"--backend", "cuda", NULL};
    ck_assert_int_eq(td_start(&d, args), 0);
    const int32_t geo[2][4] = {{1, 2000, 4, 128}, {2, 1100, 6, 64}}; /* B, S, H, D */
    pid_t pids[2];
    for (int i = 0; i < 2; i++) {
        pids[i] = fork();
        ck_assert_int_ge(pids[i], 0);
        if (pids[i] == 0)
            run_fast_client(d.socket, i, geo[i][0], geo[i][1], geo[i][2], geo[i][3]);
    }
    wait_clients(2, pids);
    ck_assert_int_eq(td_stop(&d), 0);
}
END_TEST

START_TEST(test_fast_error_mid_pipeline)
{
    td_daemon d;
    const char *args[] = {"--backend", "cuda", NULL};
    ck_assert_int_eq(td_start(&d, args), 0);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0)
        run_fast_error_client(d.socket, 0);
    wait_clients(1, &pid);
    ck_assert_int_eq(td_stop(&d), 0);
}
END_TEST

/* A stream host function that blocks until its pipe has a byte (or forever): the client's
 * stream stops before it rings the doorbells enqueued after it. */
static void CUDART_CB block_on_pipe(void *arg)
{
    char ch;
    if (read(*(int *)arg, &ch, 1) < 0)
        pause();
}

/* Free GPU memory as a fresh process sees it (MiB), or -1. */
static long probe_free_mib(void)
{
    int fds[2];
    if (pipe(fds) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        size_t fr = 0, tot = 0;
        long mib = cudaMemGetInfo(&fr, &tot) == cudaSuccess ? (long)(fr >> 20) : -1;
        if (write(fds[1], &mib, sizeof mib) < 0)
            _exit(1);
        _exit(0);
    }
    long mib = -1;
    if (pid > 0 && read(fds[0], &mib, sizeof mib) != (ssize_t)sizeof mib)
        mib = -1;
    close(fds[0]);
    close(fds[1]);
    if (pid > 0)
        waitpid(pid, NULL, 0);
    return mib;
}

/* The victim: 1 GiB registered, calls enqueued behind a blocked host function (so that they
 * are launched on the daemon and wait on doorbells that will never ring), then it says so on
 * ready_fd and waits to be killed. */
static void run_victim(const char *sock, int ready_fd)
{
    int who = 9;
    fp f;
    fp_open(&f, sock, who, 1, 1024, 4, 128, LA_DTYPE_BF16, -3.0f);
    uint8_t *big;
    CUDA_CHECK(cudaMalloc((void **)&big, 1ull << 30));
    la_buffer *bb;
    uint64_t off;
    LA_CHECK(la_buffer_register_cuda(f.c, big, &bb, &off));
    static int never[2];
    if (pipe(never) != 0)
        CHILD_FAIL("pipe");
    CUDA_CHECK(cudaLaunchHostFunc(f.st, block_on_pipe, &never[0]));
    for (int i = 0; i < LAYERS; i++) {
        LA_CHECK(la_attn_set_position(f.l[i].a, (uint32_t)i, 0, 0));
        LA_CHECK(la_attn_enqueue(f.s, f.l[i].a, f.st, NULL));
    }
    sleep(1); /* the daemon launches them */
    char ok = 1;
    if (write(ready_fd, &ok, 1) != 1)
        CHILD_FAIL("write");
    pause();
    _exit(0);
}

/* Reads a daemon counter through a fresh connection (the Check process never touches CUDA,
 * but the library's stats need none). */
static int64_t daemon_stat(const char *sock, const char *name)
{
    la_client *c;
    if (la_connect(sock, "check_gpu_daemon stats", &c) != 0)
        return -1;
    la_table *t;
    int64_t v = -1;
    if (la_stats(c, &t) == 0) {
        for (size_t r = 0; r < la_table_rows(t); r++)
            if (!strcmp(la_table_text(t, r, 0), name))
                la_table_int(t, r, "value", &v);
        la_table_free(t);
    }
    la_disconnect(c);
    return v;
}

START_TEST(test_fast_client_killed_in_flight)
{
    td_daemon d;
    const char *args[] = {"--backend", "cuda", NULL};
    ck_assert_int_eq(td_start(&d, args), 0);
    /* First a client of the victim's shapes that ends normally: the daemon's context then has
     * the kernel's module loaded and its local-memory reservation grown (both kept for the
     * context's life), so that what the victim leaves behind is all the difference shows. */
    pid_t warm = fork();
    ck_assert_int_ge(warm, 0);
    if (warm == 0)
        run_fast_client(d.socket, 8, 1, 1024, 4, 128);
    wait_clients(1, &warm);
    long before = probe_free_mib();
    ck_assert_int_gt(before, 1024);
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    pid_t victim = fork();
    ck_assert_int_ge(victim, 0);
    if (victim == 0)
        run_victim(d.socket, fds[1]);
    char ch = 0;
    ck_assert_int_eq(read(fds[0], &ch, 1), 1);
    ck_assert_int_gt(daemon_stat(d.socket, "calls_inflight"), 0);
    kill(victim, SIGKILL);
    waitpid(victim, NULL, 0);
    /* The daemon releases the waits, the kernels end, the imports are closed. */
    int64_t inflight = -1, bufs = -1, dbs = -1;
    for (int i = 0; i < 200; i++) {
        inflight = daemon_stat(d.socket, "calls_inflight");
        bufs = daemon_stat(d.socket, "buffers");
        dbs = daemon_stat(d.socket, "doorbells");
        if (inflight == 0 && bufs == 0 && dbs == 0)
            break;
        usleep(50000);
    }
    ck_assert_int_eq(inflight, 0);
    ck_assert_int_eq(bufs, 0);
    ck_assert_int_eq(dbs, 0);
    /* The victim's memory (1 GiB and its tensors), pinned by the imports while they lived, is
     * back once they are closed. */
    long after = -1;
    for (int i = 0; i < 100; i++) {
        after = probe_free_mib();
        if (after >= before - 64)
            break;
        usleep(100000);
    }
    ck_assert_msg(after >= before - 64, "free GPU memory %ld MiB before the victim, %ld after",
                  before, after);
    /* And the daemon serves the next client. */
    pid_t next = fork();
    ck_assert_int_ge(next, 0);
    if (next == 0)
        run_fast_error_client(d.socket, 1);
    wait_clients(1, &next);
    ck_assert_int_eq(td_stop(&d), 0);
}
END_TEST

/* A client whose stream does not ring within the doorbell timeout: the daemon releases the
 * calls (LA_ETIMEDOUT), the layer restarts dense, and the stream goes on once unblocked. */
static void run_timeout_client(const char *sock)
{
    int who = 5;
    fp f;
    fp_open(&f, sock, who, 1, 1024, 4, 128, LA_DTYPE_BF16, -3.0f);
    int gate[2];
    if (pipe(gate) != 0)
        CHILD_FAIL("pipe");
    for (int i = 0; i < 2; i++)
        fp_inputs(&f, i, 0);
    CUDA_CHECK(cudaLaunchHostFunc(f.st, block_on_pipe, &gate[0]));
    for (int i = 0; i < 2; i++) {
        LA_CHECK(la_attn_set_position(f.l[i].a, (uint32_t)i, 0, 0));
        LA_CHECK(la_attn_enqueue(f.s, f.l[i].a, f.st, NULL));
    }
    int rc = la_session_sync(f.s, 30000); /* the daemon's timeout is 1 s */
    if (rc != LA_ETIMEDOUT || !strstr(la_last_error_message(), "doorbell"))
        CHILD_FAIL("sync with an unrung doorbell: %s (%s), expected the calls' LA_ETIMEDOUT", la_err_name(rc),
                   la_last_error_message());
    char go = 1;
    if (write(gate[1], &go, 1) != 1)
        CHILD_FAIL("write");
    alarm(60);
    CUDA_CHECK(cudaStreamSynchronize(f.st));
    alarm(0);
    /* The next calls work; the released layers start over dense. */
    int64_t before = 0, after = 0;
    LA_CHECK(la_session_counter(f.s, "tiles_computed", &before));
    for (int i = 0; i < 2; i++) {
        fp_inputs(&f, i, 1);
        LA_CHECK(la_attn_set_position(f.l[i].a, (uint32_t)i, 1, 0));
        LA_CHECK(la_attn_enqueue(f.s, f.l[i].a, f.st, NULL));
    }
    LA_CHECK(la_session_sync(f.s, 60000));
    LA_CHECK(la_session_counter(f.s, "tiles_computed", &after));
    const long long all = 2LL * 4 * la_tiles(1024, (int32_t)f.bm) * la_tiles(1024, (int32_t)f.bn);
    if (after - before != all)
        CHILD_FAIL("after the released calls: %lld of %lld tiles computed, want all (dense)",
                   (long long)(after - before), all);
    fp_close(&f);
    _exit(0);
}

/* A daemon started with args serving one client process, client(socket), which exits: the
 * daemon stops cleanly, then the client must have exited 0. */
static void serve_one_client(const char **args, void (*client)(const char *sock))
{
    td_daemon d;
    ck_assert_int_eq(td_start(&d, args), 0);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0)
        client(d.socket);
    int st = 0;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    ck_assert_int_eq(td_stop(&d), 0);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "client failed (status 0x%x)", st);
}

START_TEST(test_fast_doorbell_timeout)
{
    const char *args[] = {"--backend", "cuda", "--doorbell-timeout", "1", NULL};
    serve_one_client(args, run_timeout_client);
}
END_TEST

START_TEST(test_warm_start_and_guard)
{
    const char *args[] = {"--backend", "cuda", NULL};
    serve_one_client(args, run_warm_guard_client);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("gpu_daemon");
    TCase *tc = tu_gpu_tcase(s, "ipc", 120);
    tu_gpu_test(tc, test_two_clients_bf16);
    tu_gpu_test(tc, test_one_client_f16);
    tu_gpu_test(tc, test_warm_start_and_guard);
    tc = tu_gpu_tcase(s, "vmm", 180);
    tu_gpu_test(tc, test_two_clients_vmm);
    tu_gpu_test(tc, test_vmm_errors_and_killed_client);
    TCase *fast = tu_gpu_tcase(s, "fastpath", 180);
    tu_gpu_test(fast, test_fast_two_clients_pipelined);
    tu_gpu_test(fast, test_fast_error_mid_pipeline);
    tu_gpu_test(fast, test_fast_client_killed_in_flight);
    tu_gpu_test(fast, test_fast_doorbell_timeout);
    return tu_run_suite(s);
}
#endif           /* LA_HAVE_CUDA */
