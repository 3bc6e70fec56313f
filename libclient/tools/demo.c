/*
 * liteattn-demo — a short simulated video-diffusion generation through liteattnd.
 *
 * Every layer's Q/K/V drift from step to step (each step = previous + a little fresh noise), on
 * top of a clustered structure that sharpens as the "denoising" proceeds: token i belongs to
 * cluster i*G/S (contiguous, like a spatial region of a video), queries and keys of one cluster
 * share a centre whose weight grows over the steps. Attention therefore becomes peaked, and
 * with tau = -3 the fraction of tiles that must be computed falls over the steps.
 *
 * Paths:
 * - default: through the daemon (host buffers in shared memory; one session for all layers);
 *   the error against dense attention comes from a dense-mode call of the same session on the
 *   same inputs (mode dense leaves the masks alone).
 * - --device cuda (or auto when the daemon has a GPU): device buffers (CUDA driver loaded at
 *   run time), registered by CUDA IPC, ordered with interprocess events.
 * - --direct: the same loop in-process through the CPU reference (la_ref_attn_fwd), error
 *   against the reference in mode dense.
 *
 * Speed-up: every dense pass is timed like a step (same path, same round trips), warm: one
 * untimed warm-up pass, --dense-runs timed passes before the generation, then the dense
 * reference pass of each step. A row's speed-up is the median dense step so far over the
 * step's attention time; the summary divides the sum of the steps' dense passes by the sum of
 * their attention times (interleaved, so both see the same machine load). With nothing skipped
 * (--threshold -1000) both read about 1.0x.
 */
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "la_attn.h"
#include "la_half.h"
#include "liteattn.h"

/* ---- options --------------------------------------------------------------------------- */

typedef struct opts {
    const char *socket;
    int direct;
    int layers, heads, head_dim, seq, steps, threads, clusters;
    float threshold;
    la_dtype dtype;
    const char *device; /* auto, cpu, cuda */
    int bm, bn;         /* --direct tile sizes */
    int dense_runs;     /* timed dense passes for the speed-up baseline */
    unsigned long long seed;
    int quiet;
} opts;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: liteattn-demo [options]\n"
            "Simulates a video-diffusion generation (drifting Q/K/V, several layers x steps)\n"
            "and prints per step the live-tile fraction, the attention time and the error\n"
            "against dense attention.\n\n"
            "  --socket PATH      daemon socket (default: as liteattnctl)\n"
            "  --direct           no daemon: call the CPU reference in-process\n"
            "  --layers N         layers (default 4)\n"
            "  --heads N          heads (default 4)\n"
            "  --head-dim N       64, 96, 128 or 256 (default 64)\n"
            "  --seq N            tokens (default 1024)\n"
            "  --steps N          denoising steps (default 20)\n"
            "  --threshold T      tau in log2 units (default -3)\n"
            "  --dtype T          bf16, f16 or f32 (default bf16; f32 only on the CPU)\n"
            "  --threads N        threads for --direct, data generation and the dense\n"
            "                     reference (default: online CPUs)\n"
            "  --device D         auto, cpu or cuda (default auto: cuda when the daemon has a\n"
            "                     GPU)\n"
            "  --preset wan480    Wan2.1-14B 480p attention: 40 heads x 128, S 32760, 2 layers\n"
            "  --clusters N       token clusters (default 8)\n"
            "  --tile BMxBN       tile sizes for --direct (default 128x64, as the\n"
            "                     daemon's CPU backend)\n"
            "  --seed N           random seed (default 1)\n"
            "  --dense-runs N     timed dense passes over all layers (after one warm-up\n"
            "                     pass) whose median is the speed-up baseline (default 5)\n"
            "  -h, --help         this text\n");
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- element conversion (round to nearest even) -------------------------------------- */

static inline void put(void *dst, size_t i, float v, la_dtype dt)
{
    if (dt == LA_DTYPE_F32)
        ((float *)dst)[i] = v;
    else if (dt == LA_DTYPE_BF16)
        ((uint16_t *)dst)[i] = la_cvt_f32_bf16(v);
    else
        ((uint16_t *)dst)[i] = la_cvt_f32_f16(v);
}

static inline float get(const void *src, size_t i, la_dtype dt)
{
    if (dt == LA_DTYPE_F32)
        return ((const float *)src)[i];
    if (dt == LA_DTYPE_BF16)
        return la_cvt_bf16_f32(((const uint16_t *)src)[i]);
    return la_cvt_f16_f32(((const uint16_t *)src)[i]);
}

/* ---- drifting data ---------------------------------------------------------------------- */

static inline uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Unit-variance noise (uniform on [-sqrt 3, sqrt 3]: the shape does not matter here). */
static inline float noise(uint64_t *s)
{
    return ((float)(splitmix(s) >> 40) * 0x1p-24f - 0.5f) * 3.4641016f;
}

typedef struct layer_data {
    float *centre; /* [G, H, D] cluster centres, shared by queries and keys */
    float *nq, *nk, *nv; /* [S, H, D] drifting noise */
} layer_data;

typedef struct gen_job {
    const opts *o;
    layer_data *ld;
    int layer, step;
    void *q, *k, *v; /* destinations [1, S, H, D] in o->dtype */
    int t0, t1;
} gen_job;

/* Weight of the cluster structure at a step: weak at first (noisy latents, broad attention),
 * strong at the end (sharp attention), as attention maps sharpen during denoising. */
static float structure(const opts *o, int step)
{
    float x = o->steps > 1 ? (float)step / (float)(o->steps - 1) : 1.0f;
    return 0.7f + 0.5f * x;
}

static void *gen_range(void *arg)
{
    gen_job *j = arg;
    const opts *o = j->o;
    const int H = o->heads, D = o->head_dim, G = o->clusters, S = o->seq;
    const float a = structure(o, j->step);
    const float drift = 0.12f, keep = sqrtf(1.0f - drift * drift);
    for (int i = j->t0; i < j->t1; i++) {
        uint64_t s = o->seed * 0x100000001b3ull ^ ((uint64_t)j->layer << 48) ^
                     ((uint64_t)j->step << 32) ^ (uint64_t)i;
        splitmix(&s);
        int g = (int)((int64_t)i * G / S);
        for (int h = 0; h < H; h++) {
            const float *c = j->ld->centre + ((size_t)g * H + h) * D;
            size_t base = ((size_t)i * H + h) * D;
            for (int d = 0; d < D; d++) {
                size_t e = base + d;
                float *nq = j->ld->nq + e, *nk = j->ld->nk + e, *nv = j->ld->nv + e;
                if (j->step > 0) {
                    *nq = keep * *nq + drift * noise(&s);
                    *nk = keep * *nk + drift * noise(&s);
                    *nv = keep * *nv + drift * noise(&s);
                }
                put(j->q, e, a * c[d] + *nq, o->dtype);
                put(j->k, e, a * c[d] + *nk, o->dtype);
                put(j->v, e, *nv, o->dtype);
            }
        }
    }
    return NULL;
}

static int layer_init(const opts *o, layer_data *ld, int layer)
{
    size_t n = (size_t)o->seq * o->heads * o->head_dim;
    size_t nc = (size_t)o->clusters * o->heads * o->head_dim;
    ld->centre = malloc(nc * sizeof(float));
    ld->nq = malloc(n * sizeof(float));
    ld->nk = malloc(n * sizeof(float));
    ld->nv = malloc(n * sizeof(float));
    if (!ld->centre || !ld->nq || !ld->nk || !ld->nv)
        return -1;
    uint64_t s = o->seed * 7919u + (uint64_t)layer * 104729u;
    for (size_t i = 0; i < nc; i++)
        ld->centre[i] = noise(&s);
    for (size_t i = 0; i < n; i++) {
        ld->nq[i] = noise(&s);
        ld->nk[i] = noise(&s);
        ld->nv[i] = noise(&s);
    }
    return 0;
}

static void layer_free(layer_data *ld)
{
    free(ld->centre);
    free(ld->nq);
    free(ld->nk);
    free(ld->nv);
}

/* Drifts layer's data one step and writes Q/K/V in o->dtype, on o->threads threads. */
static void generate(const opts *o, layer_data *ld, int layer, int step, void *q, void *k,
                     void *v)
{
    int nt = o->threads > 0 ? o->threads : 1;
    if (nt > 64)
        nt = 64;
    gen_job jobs[64];
    pthread_t th[64];
    for (int t = 0; t < nt; t++) {
        jobs[t] = (gen_job){o, ld, layer, step, q, k, v, (int)((int64_t)o->seq * t / nt),
                            (int)((int64_t)o->seq * (t + 1) / nt)};
        if (t > 0 && pthread_create(&th[t], NULL, gen_range, &jobs[t]) != 0) {
            gen_range(&jobs[t]);
            th[t] = 0;
        }
    }
    gen_range(&jobs[0]);
    for (int t = 1; t < nt; t++)
        if (th[t])
            pthread_join(th[t], NULL);
}

/* Sums of squares for the relative L2 error of out against ref. */
static void err_acc(const void *out, const void *ref, size_t n, la_dtype dt, double *num,
                    double *den)
{
    double a = 0, b = 0;
    for (size_t i = 0; i < n; i++) {
        double r = get(ref, i, dt), x = get(out, i, dt);
        a += (x - r) * (x - r);
        b += r * r;
    }
    *num += a;
    *den += b;
}

/* ---- CUDA driver, loaded at run time ---------------------------------------------------- */

typedef unsigned long long cu_ptr;
typedef struct {
    char reserved[64];
} cu_ipc_event;
typedef struct {
    char bytes[16];
} cu_uuid;
static struct {
    void *lib;
    int (*Init)(unsigned);
    int (*DeviceGetCount)(int *);
    int (*DeviceGet)(int *, int);
    int (*DeviceGetUuid)(cu_uuid *, int);
    int (*PrimaryCtxRetain)(void **, int);
    int (*CtxSetCurrent)(void *);
    int (*MemAlloc)(cu_ptr *, size_t);
    int (*MemFree)(cu_ptr);
    int (*MemcpyHtoD)(cu_ptr, const void *, size_t);
    int (*MemcpyDtoH)(void *, cu_ptr, size_t);
    int (*EventCreate)(void **, unsigned);
    int (*EventRecord)(void *, void *);
    int (*EventSynchronize)(void *);
    int (*EventDestroy)(void *);
    int (*IpcGetEventHandle)(cu_ipc_event *, void *);
    int (*IpcOpenEventHandle)(void **, cu_ipc_event);
} cu;

static int cu_load(char *why, size_t n)
{
    cu.lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!cu.lib) {
        snprintf(why, n, "no CUDA driver (%s)", dlerror());
        return -1;
    }
#define SYM(f, name)                                                  \
    if (!(*(void **)&cu.f = dlsym(cu.lib, name))) {                   \
        snprintf(why, n, "the CUDA driver lacks %s", name);           \
        return -1;                                                    \
    }
    SYM(Init, "cuInit");
    SYM(DeviceGetCount, "cuDeviceGetCount");
    SYM(DeviceGet, "cuDeviceGet");
    if (!(*(void **)&cu.DeviceGetUuid = dlsym(cu.lib, "cuDeviceGetUuid_v2")))
        SYM(DeviceGetUuid, "cuDeviceGetUuid");
    SYM(PrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    SYM(CtxSetCurrent, "cuCtxSetCurrent");
    SYM(MemAlloc, "cuMemAlloc_v2");
    SYM(MemFree, "cuMemFree_v2");
    SYM(MemcpyHtoD, "cuMemcpyHtoD_v2");
    SYM(MemcpyDtoH, "cuMemcpyDtoH_v2");
    SYM(EventCreate, "cuEventCreate");
    SYM(EventRecord, "cuEventRecord");
    SYM(EventSynchronize, "cuEventSynchronize");
    SYM(EventDestroy, "cuEventDestroy_v2");
    SYM(IpcGetEventHandle, "cuIpcGetEventHandle");
    SYM(IpcOpenEventHandle, "cuIpcOpenEventHandle");
#undef SYM
    int r = cu.Init(0);
    if (r) {
        snprintf(why, n, "cuInit failed (error %d)", r);
        return -1;
    }
    return 0;
}

static void uuid_str(const cu_uuid *u, char out[48])
{
    const unsigned char *b = (const unsigned char *)u->bytes;
    snprintf(out, 48, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12],
             b[13], b[14], b[15]);
}

/* Makes current the primary context of the daemon's first CUDA device (matched by UUID,
 * since ordinals differ between processes). Writes its UUID. */
static int cu_pick_device(la_client *c, char uuid_out[48], char *why, size_t n)
{
    const char *devs = la_client_property(c, "devices");
    int count = 0;
    if (cu.DeviceGetCount(&count) || count == 0) {
        snprintf(why, n, "no CUDA device visible to this process");
        return -1;
    }
    for (int i = 0; i < count; i++) {
        int dev;
        cu_uuid u;
        char s[48];
        if (cu.DeviceGet(&dev, i) || cu.DeviceGetUuid(&u, dev))
            continue;
        uuid_str(&u, s);
        if (devs && strstr(devs, s)) {
            void *ctx;
            if (cu.PrimaryCtxRetain(&ctx, dev) || cu.CtxSetCurrent(ctx)) {
                snprintf(why, n, "cannot make a context on %s", s);
                return -1;
            }
            memcpy(uuid_out, s, 48);
            return 0;
        }
    }
    snprintf(why, n, "none of this process's GPUs is one of the daemon's (%s)",
             devs ? devs : "none");
    return -1;
}

/* ---- the generation --------------------------------------------------------------------- */

typedef struct step_row {
    double live, attn_s, err;
    double dense_s; /* the step's dense reference pass, timed the same way */
} step_row;

static void print_header(const opts *o, const char *path)
{
    printf("liteattn-demo: %s, %d layers x %d steps, B1 H%d S%d D%d %s, tau %g\n", path,
           o->layers, o->steps, o->heads, o->seq, o->head_dim,
           o->dtype == LA_DTYPE_BF16 ? "bf16" : o->dtype == LA_DTYPE_F16 ? "f16" : "f32",
           o->threshold);
}

/* The speed-up baseline: the median of warm timings of one dense step (every layer, the same
 * path and round trips as a step of the generation), with its spread: o->dense_runs passes
 * before the generation (after one untimed warm-up pass), then the dense reference pass of
 * every step, so that the baseline sees the same machine load as the steps it is compared
 * with. A single cold timing would fold thread start-up, first-touch page faults and caches
 * into the baseline (and made nothing skipped look like a 1.3x speed-up). */
typedef struct baseline {
    double median_s, min_s, max_s;
    int runs;
} baseline;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Timings t[0..n) (n >= 1) stay in their order. */
static baseline baseline_of(const double *t, int n)
{
    double *s = malloc((size_t)n * sizeof(*s));
    if (!s)
        return (baseline){t[0], t[0], t[0], 1};
    memcpy(s, t, (size_t)n * sizeof(*s));
    qsort(s, (size_t)n, sizeof(*s), cmp_double);
    baseline b = {n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2, s[0], s[n - 1], n};
    free(s);
    return b;
}

static void print_baseline(const char *what, const baseline *b)
{
    printf("dense baseline%s: %.1f ms per step, median of %d warm runs (min %.1f, max %.1f ms, "
           "spread %.0f%% of the median)\n",
           what, b->median_s * 1e3, b->runs, b->min_s * 1e3, b->max_s * 1e3,
           b->median_s > 0 ? 100 * (b->max_s - b->min_s) / b->median_s : 0.0);
}

static void print_columns(void)
{
    printf("%4s  %9s  %11s  %12s  %8s  %11s\n", "step", "live", "attn ms", "dense ms", "speedup",
           "rel.err");
}

/* dense_s: this step's dense reference pass; the speed-up is against the median so far. */
static void print_row(int step, const step_row *r, double dense_s, double median_s)
{
    printf("%4d  %8.1f%%  %11.1f  %12.1f  %7.2fx  %11.2e\n", step, 100 * r->live,
           r->attn_s * 1e3, dense_s * 1e3, r->attn_s > 0 ? median_s / r->attn_s : 0.0, r->err);
    fflush(stdout);
}

static void print_summary(const opts *o, const step_row *rows, const baseline *b,
                          double total_s)
{
    double live = 0, attn = 0, dense = 0, maxerr = 0;
    for (int s = 0; s < o->steps; s++) {
        live += rows[s].live;
        attn += rows[s].attn_s;
        dense += rows[s].dense_s;
        if (rows[s].err > maxerr)
            maxerr = rows[s].err;
    }
    live /= o->steps;
    /* Against the dense passes interleaved with the steps: both sums see the same machine. */
    printf("summary: mean live fraction %.1f%%, attention %.2f s vs %.2f s dense (the dense "
           "pass of each of the %d steps): %.2fx; last step %.2fx; max rel.err %.2e; "
           "wall %.1f s\n",
           100 * live, attn, dense, o->steps, attn > 0 ? dense / attn : 0.0,
           rows[o->steps - 1].attn_s > 0 ? b->median_s / rows[o->steps - 1].attn_s : 0.0,
           maxerr, total_s);
}

static void fill_strides(int64_t st[4], int S, int H, int D)
{
    st[3] = 1;
    st[2] = D;
    st[1] = (int64_t)H * D;
    st[0] = (int64_t)S * H * D;
}

static int run_direct(const opts *o)
{
    const int S = o->seq, H = o->heads, D = o->head_dim, L = o->layers;
    const size_t n = (size_t)S * H * D, bytes = n * la_dtype_size(o->dtype);
    const int nQ = la_tiles(S, o->bm), nK = la_tiles(S, o->bn), nW = la_mask_words(nK);
    const size_t mask_words = (size_t)H * nQ * nW;
    void *q = malloc(bytes), *k = malloc(bytes), *v = malloc(bytes), *out = malloc(bytes),
         *ref = malloc(bytes);
    uint32_t *mask = malloc((size_t)L * mask_words * 4);
    layer_data *ld = calloc((size_t)L, sizeof(*ld));
    step_row *rows = calloc((size_t)o->steps, sizeof(*rows));
    if (!q || !k || !v || !out || !ref || !mask || !ld || !rows) {
        fprintf(stderr, "liteattn-demo: out of memory\n");
        return 1;
    }
    for (int l = 0; l < L; l++)
        if (layer_init(o, &ld[l], l) < 0) {
            fprintf(stderr, "liteattn-demo: out of memory\n");
            return 1;
        }
    memset(mask, 0xff, (size_t)L * mask_words * 4);
    print_header(o, "in-process CPU reference (--direct)");

    la_attn_params p;
    memset(&p, 0, sizeof(p));
    p.q = q;
    p.k = k;
    p.v = v;
    fill_strides(p.q_stride, S, H, D);
    memcpy(p.k_stride, p.q_stride, sizeof(p.q_stride));
    memcpy(p.v_stride, p.q_stride, sizeof(p.q_stride));
    memcpy(p.o_stride, p.q_stride, sizeof(p.q_stride));
    p.B = 1;
    p.Sq = p.Sk = S;
    p.H = H;
    p.D = D;
    p.dtype = o->dtype;
    p.scale = 1.0f / sqrtf((float)D);
    p.tau = o->threshold;
    p.direction = LA_DIR_ALTERNATE;
    p.mask_stride[0] = (int64_t)H * nQ * nW;
    p.mask_stride[1] = (int64_t)nQ * nW;
    p.mask_stride[2] = nW;
    p.BM = o->bm;
    p.BN = o->bn;
    p.threads = o->threads;

    double t_start = now_s();
    /* Baseline: dense passes over every layer on the step-0 inputs (generating step 0 again
     * later gives the same data), the first one untimed (warm-up). */
    double *dense_t = calloc((size_t)(o->dense_runs + o->steps), sizeof(*dense_t));
    if (!dense_t) {
        fprintf(stderr, "liteattn-demo: out of memory\n");
        return 1;
    }
    p.mode = LA_MODE_DENSE;
    p.o = ref;
    p.step = 0;
    for (int run = -1; run < o->dense_runs; run++)
        for (int l = 0; l < L; l++) {
            generate(o, &ld[l], l, 0, q, k, v);
            p.mask = mask + (size_t)l * mask_words;
            double t0 = now_s();
            int rc = la_ref_attn_fwd(&p);
            if (run >= 0)
                dense_t[run] += now_s() - t0;
            if (rc < 0) {
                fprintf(stderr, "liteattn-demo: la_ref_attn_fwd (dense): %s\n", la_strerror(rc));
                return 1;
            }
        }
    int n_dense = o->dense_runs;
    baseline base = baseline_of(dense_t, n_dense);
    print_baseline(" before the generation", &base);
    print_columns();
    for (int step = 0; step < o->steps; step++) {
        double attn = 0, num = 0, den = 0, dense = 0;
        int64_t computed = 0, total = 0;
        for (int l = 0; l < L; l++) {
            generate(o, &ld[l], l, step, q, k, v);
            p.step = step;
            p.mode = LA_MODE_SKIP;
            p.o = out;
            p.mask = mask + (size_t)l * mask_words;
            int64_t tiles = 0;
            p.ret_tiles_computed = &tiles;
            double t0 = now_s();
            int rc = la_ref_attn_fwd(&p);
            attn += now_s() - t0;
            if (rc < 0) {
                fprintf(stderr, "liteattn-demo: la_ref_attn_fwd: %s\n", la_strerror(rc));
                return 1;
            }
            computed += tiles;
            total += (int64_t)H * nQ * nK;
            p.mode = LA_MODE_DENSE;
            p.o = ref;
            p.ret_tiles_computed = NULL;
            t0 = now_s();
            rc = la_ref_attn_fwd(&p);
            dense += now_s() - t0;
            if (rc < 0) {
                fprintf(stderr, "liteattn-demo: la_ref_attn_fwd (dense): %s\n", la_strerror(rc));
                return 1;
            }
            err_acc(out, ref, n, o->dtype, &num, &den);
        }
        rows[step] = (step_row){(double)computed / (double)total, attn,
                                den > 0 ? sqrt(num / den) : 0, dense};
        dense_t[n_dense++] = dense;
        base = baseline_of(dense_t, n_dense);
        print_row(step, &rows[step], dense, base.median_s);
    }
    free(dense_t);
    print_baseline("", &base);
    print_summary(o, rows, &base, now_s() - t_start);
    for (int l = 0; l < L; l++)
        layer_free(&ld[l]);
    free(ld);
    free(rows);
    free(q);
    free(k);
    free(v);
    free(out);
    free(ref);
    free(mask);
    return 0;
}

/* Waits for a CUDA call's completion event (when the daemon sent one). */
static int wait_done_event(la_call *call)
{
    unsigned char h[64];
    if (la_call_done_event(call, h, sizeof(h)) < 0)
        return 0; /* no event: the reply itself means done */
    cu_ipc_event eh;
    memcpy(eh.reserved, h, 64);
    void *ev;
    int r = cu.IpcOpenEventHandle(&ev, eh);
    if (r) {
        fprintf(stderr, "liteattn-demo: cuIpcOpenEventHandle failed (error %d)\n", r);
        return -1;
    }
    r = cu.EventSynchronize(ev);
    cu.EventDestroy(ev);
    return r ? -1 : 0;
}

static int fail(const char *what, int rc)
{
    fprintf(stderr, "liteattn-demo: %s: %s [%s]\n", what, la_last_error_message(),
            la_err_name(rc));
    return 1;
}

static int run_daemon(const opts *o)
{
    const int S = o->seq, H = o->heads, D = o->head_dim, L = o->layers;
    const size_t n = (size_t)S * H * D, bytes = n * la_dtype_size(o->dtype);
    la_client *c;
    int rc = la_connect(o->socket, "liteattn-demo", &c);
    if (rc == LA_ECONN) {
        fprintf(stderr, "liteattn-demo: %s: is liteattnd running? (or use --direct)\n",
                la_last_error_message());
        return 1;
    }
    if (rc < 0)
        return fail("connect", rc);

    /* Device: auto = cuda when the daemon offers it and this process has the driver. */
    const char *backends = la_client_property(c, "backends");
    int want_cuda = !strcmp(o->device, "cuda");
    int has_cuda_backend = backends && strstr(backends, "cuda") != NULL;
    char why[256] = "", uuid[48] = "";
    int use_cuda = 0;
    if (want_cuda || (!strcmp(o->device, "auto") && has_cuda_backend)) {
        if (!has_cuda_backend)
            snprintf(why, sizeof(why), "the daemon has no cuda backend (backends: %s)",
                     backends ? backends : "?");
        else if (cu_load(why, sizeof(why)) == 0 && cu_pick_device(c, uuid, why, sizeof(why)) == 0)
            use_cuda = 1;
        if (!use_cuda && want_cuda) {
            fprintf(stderr, "liteattn-demo: --device cuda: %s\n", why);
            la_disconnect(c);
            return 1;
        }
        if (!use_cuda)
            fprintf(stderr, "liteattn-demo: using host buffers: %s\n", why);
    }
    if (use_cuda && o->dtype == LA_DTYPE_F32) {
        fprintf(stderr, "liteattn-demo: f32 is CPU-only; use --dtype bf16 or f16 on a GPU\n");
        la_disconnect(c);
        return 1;
    }

    la_session_config *cfg;
    if ((rc = la_session_config_new(&cfg)) < 0 ||
        (rc = la_session_config_set_geometry(cfg, (uint32_t)L, (uint32_t)H, (uint32_t)D,
                                             o->dtype, (uint32_t)S, 0, 1, 1)) < 0 ||
        (rc = la_session_config_set_threshold(cfg, o->threshold)) < 0 ||
        (rc = la_session_config_set_device(cfg, use_cuda ? uuid : "cpu")) < 0)
        return fail("session config", rc);
    char key[64];
    snprintf(key, sizeof(key), "liteattn-demo-%ld", (long)getpid());
    la_session *s;
    rc = la_session_open(c, key, cfg, &s);
    la_session_config_free(cfg);
    if (rc < 0) {
        la_disconnect(c);
        return fail("session open", rc);
    }
    int64_t bm = 0, bn = 0;
    la_session_get(s, "bm", &bm);
    la_session_get(s, "bn", &bn);

    /* One buffer per layer: Q, K, V, O, O_dense. */
    la_buffer **buf = calloc((size_t)L, sizeof(*buf));
    uint64_t *base_off = calloc((size_t)L, sizeof(*base_off));
    cu_ptr *dmem = calloc((size_t)L, sizeof(*dmem));
    layer_data *ld = calloc((size_t)L, sizeof(*ld));
    step_row *rows = calloc((size_t)o->steps, sizeof(*rows));
    void *hq = NULL, *hk = NULL, *hv = NULL, *ho = NULL, *hr = NULL;
    void *ready = NULL; /* CUDA: interprocess event recorded after the uploads */
    unsigned char ready_h[64];
    if (!buf || !base_off || !dmem || !ld || !rows) {
        fprintf(stderr, "liteattn-demo: out of memory\n");
        return 1;
    }
    for (int l = 0; l < L; l++) {
        if (layer_init(o, &ld[l], l) < 0) {
            fprintf(stderr, "liteattn-demo: out of memory\n");
            return 1;
        }
        if (use_cuda) {
            int r = cu.MemAlloc(&dmem[l], 5 * bytes);
            if (r) {
                fprintf(stderr, "liteattn-demo: cuMemAlloc of %zu bytes failed (error %d)\n",
                        5 * bytes, r);
                return 1;
            }
            rc = la_buffer_register_cuda(c, (const void *)(uintptr_t)dmem[l], &buf[l],
                                         &base_off[l]);
        } else {
            rc = la_buffer_new_host(c, 5 * bytes, &buf[l]);
        }
        if (rc < 0)
            return fail("buffer", rc);
    }
    if (use_cuda) {
        hq = malloc(bytes);
        hk = malloc(bytes);
        hv = malloc(bytes);
        ho = malloc(bytes);
        hr = malloc(bytes);
        if (!hq || !hk || !hv || !ho || !hr) {
            fprintf(stderr, "liteattn-demo: out of memory\n");
            return 1;
        }
        cu_ipc_event eh;
        /* CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS */
        if (cu.EventCreate(&ready, 0x2 | 0x4) || cu.IpcGetEventHandle(&eh, ready)) {
            fprintf(stderr, "liteattn-demo: cannot create an interprocess CUDA event\n");
            return 1;
        }
        memcpy(ready_h, eh.reserved, 64);
    }

    char path[160];
    snprintf(path, sizeof(path), "through liteattnd (%s, tiles %lldx%lld)",
             use_cuda ? uuid : "cpu, shared memory", (long long)bm, (long long)bn);
    print_header(o, path);

    la_attn *a;
    if ((rc = la_attn_new(&a)) < 0)
        return fail("attn", rc);
    int64_t shape[4] = {1, S, H, D};
    double t_start = now_s();
    /* Baseline: the step-0 inputs in every layer's buffer (generating step 0 again later gives
     * the same data), then dense passes over every layer, the first one untimed (warm-up). */
    for (int l = 0; l < L; l++) {
        if (use_cuda) {
            generate(o, &ld[l], l, 0, hq, hk, hv);
            if (cu.MemcpyHtoD(dmem[l], hq, bytes) || cu.MemcpyHtoD(dmem[l] + bytes, hk, bytes) ||
                cu.MemcpyHtoD(dmem[l] + 2 * bytes, hv, bytes)) {
                fprintf(stderr, "liteattn-demo: upload to the GPU failed\n");
                return 1;
            }
        } else {
            uint8_t *hp = la_buffer_host_ptr(buf[l]);
            generate(o, &ld[l], l, 0, hp, hp + bytes, hp + 2 * bytes);
        }
    }
    if (use_cuda && cu.EventRecord(ready, NULL)) {
        fprintf(stderr, "liteattn-demo: cannot record the upload event\n");
        return 1;
    }
    double *dense_t = calloc((size_t)(o->dense_runs + o->steps), sizeof(*dense_t));
    if (!dense_t) {
        fprintf(stderr, "liteattn-demo: out of memory\n");
        return 1;
    }
    for (int run = -1; run < o->dense_runs; run++)
        for (int l = 0; l < L; l++) {
            uint64_t b0 = base_off[l];
            la_attn_set_tensor(a, LA_TENSOR_Q, buf[l], b0, o->dtype, 4, shape, NULL);
            la_attn_set_tensor(a, LA_TENSOR_K, buf[l], b0 + bytes, o->dtype, 4, shape, NULL);
            la_attn_set_tensor(a, LA_TENSOR_V, buf[l], b0 + 2 * bytes, o->dtype, 4, shape, NULL);
            la_attn_set_tensor(a, LA_TENSOR_O, buf[l], b0 + 4 * bytes, o->dtype, 4, shape, NULL);
            la_attn_set_position(a, (uint32_t)l, 0, 0);
            la_attn_set_mode(a, LA_MODE_DENSE);
            if (use_cuda)
                la_attn_set_wait_event(a, ready_h, 64);
            la_call *call;
            double t0 = now_s();
            rc = la_attn_run(s, a, &call);
            if (rc == 0 && use_cuda && wait_done_event(call) < 0)
                rc = LA_EDEVICE;
            if (run >= 0)
                dense_t[run] += now_s() - t0;
            if (rc < 0)
                return fail("dense attention", rc);
            la_call_free(call);
        }
    int n_dense = o->dense_runs;
    baseline base = baseline_of(dense_t, n_dense);
    print_baseline(" before the generation", &base);
    print_columns();
    for (int step = 0; step < o->steps; step++) {
        double attn = 0, num = 0, den = 0, dense = 0;
        int64_t computed = 0, total = 0;
        for (int l = 0; l < L; l++) {
            uint64_t b0 = base_off[l];
            la_attn_set_tensor(a, LA_TENSOR_Q, buf[l], b0, o->dtype, 4, shape, NULL);
            la_attn_set_tensor(a, LA_TENSOR_K, buf[l], b0 + bytes, o->dtype, 4, shape, NULL);
            la_attn_set_tensor(a, LA_TENSOR_V, buf[l], b0 + 2 * bytes, o->dtype, 4, shape, NULL);
            la_attn_set_tensor(a, LA_TENSOR_O, buf[l], b0 + 3 * bytes, o->dtype, 4, shape, NULL);
            la_attn_set_position(a, (uint32_t)l, (uint32_t)step, 0);
            la_attn_set_mode(a, LA_MODE_SESSION);
            if (use_cuda) {
                generate(o, &ld[l], l, step, hq, hk, hv);
                if (cu.MemcpyHtoD(dmem[l], hq, bytes) || cu.MemcpyHtoD(dmem[l] + bytes, hk, bytes) ||
                    cu.MemcpyHtoD(dmem[l] + 2 * bytes, hv, bytes) || cu.EventRecord(ready, NULL)) {
                    fprintf(stderr, "liteattn-demo: upload to the GPU failed\n");
                    return 1;
                }
                la_attn_set_wait_event(a, ready_h, 64);
            } else {
                uint8_t *hp = la_buffer_host_ptr(buf[l]);
                generate(o, &ld[l], l, step, hp, hp + bytes, hp + 2 * bytes);
            }
            la_call *call;
            double t0 = now_s();
            rc = la_attn_run(s, a, &call);
            if (rc == 0 && use_cuda && wait_done_event(call) < 0)
                rc = LA_EDEVICE;
            attn += now_s() - t0;
            if (rc < 0)
                return fail("attention", rc);
            int64_t tc = 0, tt = 0;
            la_call_stat(call, "tiles_computed", &tc);
            la_call_stat(call, "tiles_total", &tt);
            la_call_free(call);
            computed += tc;
            total += tt;

            /* Dense reference: same session, same inputs, mode dense (masks untouched). */
            la_attn_set_tensor(a, LA_TENSOR_O, buf[l], b0 + 4 * bytes, o->dtype, 4, shape, NULL);
            la_attn_set_mode(a, LA_MODE_DENSE);
            t0 = now_s();
            rc = la_attn_run(s, a, &call);
            if (rc == 0 && use_cuda && wait_done_event(call) < 0)
                rc = LA_EDEVICE;
            dense += now_s() - t0;
            if (rc < 0)
                return fail("dense attention", rc);
            la_call_free(call);
            if (use_cuda) {
                if (cu.MemcpyDtoH(ho, dmem[l] + 3 * bytes, bytes) ||
                    cu.MemcpyDtoH(hr, dmem[l] + 4 * bytes, bytes)) {
                    fprintf(stderr, "liteattn-demo: download from the GPU failed\n");
                    return 1;
                }
                err_acc(ho, hr, n, o->dtype, &num, &den);
            } else {
                uint8_t *hp = la_buffer_host_ptr(buf[l]);
                err_acc(hp + 3 * bytes, hp + 4 * bytes, n, o->dtype, &num, &den);
            }
        }
        rows[step] = (step_row){total ? (double)computed / (double)total : 1.0, attn,
                                den > 0 ? sqrt(num / den) : 0, dense};
        dense_t[n_dense++] = dense;
        base = baseline_of(dense_t, n_dense);
        print_row(step, &rows[step], dense, base.median_s);
    }
    free(dense_t);
    print_baseline("", &base);
    print_summary(o, rows, &base, now_s() - t_start);

    la_attn_free(a);
    la_session_close(s);
    for (int l = 0; l < L; l++) {
        la_buffer_unregister(buf[l]);
        if (use_cuda)
            cu.MemFree(dmem[l]);
        layer_free(&ld[l]);
    }
    if (ready)
        cu.EventDestroy(ready);
    la_disconnect(c);
    free(buf);
    free(base_off);
    free(dmem);
    free(ld);
    free(rows);
    free(hq);
    free(hk);
    free(hv);
    free(ho);
    free(hr);
    return 0;
}

static int parse_int(const char *name, const char *v, int lo, int hi, int *out)
{
    char *end;
    errno = 0;
    long x = v ? strtol(v, &end, 10) : 0;
    if (!v || errno || *end || x < lo || x > hi) {
        fprintf(stderr, "liteattn-demo: %s wants an integer from %d to %d\n", name, lo, hi);
        return -1;
    }
    *out = (int)x;
    return 0;
}

int main(int argc, char **argv)
{
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    opts o = {.socket = NULL, .layers = 4, .heads = 4, .head_dim = 64, .seq = 1024,
              .steps = 20, .threads = ncpu > 0 ? (int)ncpu : 1, .clusters = 8,
              .threshold = -3.0f, .dtype = LA_DTYPE_BF16, .device = "auto", .bm = 128,
              .bn = 64, .seed = 1, .dense_runs = 5};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int r = 0, used = 1;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--direct")) {
            o.direct = 1;
            used = 0;
        } else if (!strcmp(a, "--socket")) {
            if (!v) {
                fprintf(stderr, "liteattn-demo: --socket needs a path\n");
                return 2;
            }
            o.socket = v;
        } else if (!strcmp(a, "--layers")) {
            r = parse_int(a, v, 1, 1000, &o.layers);
        } else if (!strcmp(a, "--heads")) {
            r = parse_int(a, v, 1, 1024, &o.heads);
        } else if (!strcmp(a, "--head-dim")) {
            r = parse_int(a, v, 1, 1024, &o.head_dim);
        } else if (!strcmp(a, "--seq")) {
            r = parse_int(a, v, 1, 1 << 24, &o.seq);
        } else if (!strcmp(a, "--steps")) {
            r = parse_int(a, v, 1, 10000, &o.steps);
        } else if (!strcmp(a, "--threads")) {
            r = parse_int(a, v, 1, 256, &o.threads);
        } else if (!strcmp(a, "--dense-runs")) {
            r = parse_int(a, v, 1, 1000, &o.dense_runs);
        } else if (!strcmp(a, "--clusters")) {
            r = parse_int(a, v, 1, 1 << 20, &o.clusters);
        } else if (!strcmp(a, "--seed")) {
            int sd;
            r = parse_int(a, v, 0, 1 << 30, &sd);
            o.seed = (unsigned long long)sd;
        } else if (!strcmp(a, "--threshold")) {
            char *end;
            errno = 0;
            o.threshold = v ? strtof(v, &end) : 0;
            if (!v || errno || *end || isnan(o.threshold)) {
                fprintf(stderr, "liteattn-demo: --threshold wants a number (or -inf)\n");
                return 2;
            }
        } else if (!strcmp(a, "--dtype")) {
            if (v && !strcmp(v, "bf16"))
                o.dtype = LA_DTYPE_BF16;
            else if (v && !strcmp(v, "f16"))
                o.dtype = LA_DTYPE_F16;
            else if (v && !strcmp(v, "f32"))
                o.dtype = LA_DTYPE_F32;
            else {
                fprintf(stderr, "liteattn-demo: --dtype wants bf16, f16 or f32\n");
                return 2;
            }
        } else if (!strcmp(a, "--device")) {
            if (!v || (strcmp(v, "auto") && strcmp(v, "cpu") && strcmp(v, "cuda"))) {
                fprintf(stderr, "liteattn-demo: --device wants auto, cpu or cuda\n");
                return 2;
            }
            o.device = v;
        } else if (!strcmp(a, "--preset")) {
            if (!v || strcmp(v, "wan480")) {
                fprintf(stderr, "liteattn-demo: --preset knows wan480 only\n");
                return 2;
            }
            o.heads = 40;
            o.head_dim = 128;
            o.seq = 32760;
            o.layers = 2;
        } else if (!strcmp(a, "--tile")) {
            if (!v || sscanf(v, "%dx%d", &o.bm, &o.bn) != 2 || o.bm < 1 || o.bn < 1) {
                fprintf(stderr, "liteattn-demo: --tile wants BMxBN, e.g. 64x64\n");
                return 2;
            }
        } else {
            fprintf(stderr, "liteattn-demo: unknown option %s (see --help)\n", a);
            return 2;
        }
        if (r < 0)
            return 2;
        i += used;
    }
    if (o.clusters > o.seq)
        o.clusters = o.seq;
    if (o.direct) {
        if (!strcmp(o.device, "cuda")) {
            fprintf(stderr, "liteattn-demo: --direct runs the CPU reference; drop --device cuda\n");
            return 2;
        }
        return run_direct(&o);
    }
    return run_daemon(&o);
}
