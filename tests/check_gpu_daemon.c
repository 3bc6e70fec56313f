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
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cuda_runtime_api.h>

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

/* One client: its own session of geometry (B, S, H, D), STEPS steps through the daemon and the
 * same steps through the kernel directly; exits 0 when everything matched. */
static void run_client(const char *sock, int who, int32_t B, int32_t Sq, int32_t Sk, int32_t H,
                       int32_t D, la_dtype dt)
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
    CUDA_CHECK(cudaMalloc((void **)&blk, total));
    CUDA_CHECK(cudaMalloc((void **)&direct, align_up(nq) + align_up(nlse) + t->mask_words * 4));
    uint8_t *d_o = direct, *d_lse = direct + align_up(nq), *d_mask = d_lse + align_up(nlse);
    CUDA_CHECK(cudaMemcpy(d_mask, t->mask, t->mask_words * 4, cudaMemcpyHostToDevice));
    /* Register a pointer inside the block: the library must find the block's base. */
    la_buffer *buf;
    uint64_t base_off = 1;
    LA_CHECK(la_buffer_register_cuda(c, blk + off_k, &buf, &base_off));
    if (base_off != off_k)
        CHILD_FAIL("register_cuda: offset %llu, expected %zu", (unsigned long long)base_off, off_k);

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

    /* Bad input: V's extent 256 bytes past the block. Refused, nothing launched. */
    LA_CHECK(la_attn_set_tensor(a, LA_TENSOR_V, buf, total - nk + 256, dt, 4, shk, NULL));
    int rc = la_attn_run(s, a, NULL);
    if (rc != LA_ERANGE)
        CHILD_FAIL("extent past the block: %s, expected LA_ERANGE", la_err_name(rc));
    uint64_t rtt;
    LA_CHECK(la_ping(c, &rtt));

    la_attn_free(a);
    LA_CHECK(la_session_close(s));
    LA_CHECK(la_buffer_unregister(buf));
    la_disconnect(c);
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

static void run_clients(int n, const int32_t (*geo)[5], la_dtype dt)
{
    td_daemon d;
    const char *args[] = {"--backend", "cuda", NULL};
    ck_assert_int_eq(td_start(&d, args), 0);
    pid_t pids[4];
    for (int i = 0; i < n; i++) {
        pids[i] = fork();
        ck_assert_int_ge(pids[i], 0);
        if (pids[i] == 0)
            run_client(d.socket, i, geo[i][0], geo[i][1], geo[i][2], geo[i][3], geo[i][4], dt);
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
    run_clients(2, geo, LA_DTYPE_BF16);
}
END_TEST

START_TEST(test_one_client_f16)
{
    const int32_t geo[1][5] = {{1, 777, 777, 2, 128}};
    run_clients(1, geo, LA_DTYPE_F16);
}
END_TEST

START_TEST(test_warm_start_and_guard)
{
    td_daemon d;
    const char *args[] = {"--backend", "cuda", NULL};
    ck_assert_int_eq(td_start(&d, args), 0);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0)
        run_warm_guard_client(d.socket);
    int st = 0;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    ck_assert_int_eq(td_stop(&d), 0);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "client failed (status 0x%x)", st);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("gpu_daemon");
    TCase *tc = tu_gpu_tcase(s, "ipc", 120);
    tu_gpu_test(tc, test_two_clients_bf16);
    tu_gpu_test(tc, test_one_client_f16);
    tu_gpu_test(tc, test_warm_start_and_guard);
    return tu_run_suite(s);
}
#endif /* LA_HAVE_CUDA */
