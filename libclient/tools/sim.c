/* sim.c — the simulated generation of liteattn-demo and bench_direct (see sim.h). */
#include "sim.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "la_half.h"

const char *sim_prog = "liteattn-demo";

/* ---- options ----------------------------------------------------------------------------- */

static void sim_usage(int which)
{
    if (which == SIM_DEMO)
        printf("usage: liteattn-demo [options]\n"
               "Simulates a video-diffusion generation (drifting Q/K/V, several layers x steps)\n"
               "through liteattnd and prints per step the live-tile fraction, the attention time\n"
               "and the error against dense attention.\n\n"
               "  --socket PATH      daemon socket (default: as liteattnctl)\n"
               "  --device D         auto, cpu or cuda (default auto: cuda when the daemon has a\n"
               "                     GPU)\n");
    else
        printf("usage: bench_direct [options]\n"
               "The generation of liteattn-demo without a daemon: the CPU reference called\n"
               "in-process, the error against its own mode dense.\n\n"
               "  --tile BMxBN       tile sizes (default 128x64, as the daemon's CPU backend)\n");
    printf("  --layers N         layers (default 4)\n"
           "  --heads N          heads (default 4)\n"
           "  --head-dim N       64, 96, 128 or 256 (default 64)\n"
           "  --seq N            tokens (default 1024)\n"
           "  --steps N          denoising steps (default 20)\n"
           "  --threshold T      tau in log2 units (default -3)\n"
           "  --dtype T          bf16, f16 or f32 (default bf16; f32 only on the CPU)\n"
           "  --threads N        threads for the data, the dense reference and bench_direct's\n"
           "                     calls (default: online CPUs)\n"
           "  --preset wan480    Wan2.1-14B 480p attention: 40 heads x 128, S 32760, 2 layers\n"
           "  --clusters N       token clusters (default 8)\n"
           "  --seed N           random seed (default 1)\n"
           "  --dense-runs N     timed dense passes over all layers before the generation\n"
           "                     (after one warm-up pass), for the speed-up baseline\n"
           "                     (default 5)\n"
           "  -h, --help         this text\n");
}

static int parse_int(const char *name, const char *v, int lo, int hi, int *out)
{
    char *end;
    errno = 0;
    long x = v ? strtol(v, &end, 10) : 0;
    if (!v || errno || *end || x < lo || x > hi) {
        fprintf(stderr, "%s: %s wants an integer from %d to %d\n", sim_prog, name, lo, hi);
        return -1;
    }
    *out = (int)x;
    return 0;
}

/* The options that take an integer: their range and field. */
static const struct int_opt {
    const char *name;
    int lo, hi;
    size_t off;
} int_opts[] = {
    {"--layers", 1, 1000, offsetof(sim_opts, layers)},
    {"--heads", 1, 1024, offsetof(sim_opts, heads)},
    {"--head-dim", 1, 1024, offsetof(sim_opts, head_dim)},
    {"--seq", 1, 1 << 24, offsetof(sim_opts, seq)},
    {"--steps", 1, 10000, offsetof(sim_opts, steps)},
    {"--threads", 1, 256, offsetof(sim_opts, threads)},
    {"--dense-runs", 1, 1000, offsetof(sim_opts, dense_runs)},
    {"--clusters", 1, 1 << 20, offsetof(sim_opts, clusters)},
};

/* The entry of int_opts named a, or NULL. */
static const struct int_opt *find_int_opt(const char *a)
{
    for (size_t i = 0; i < sizeof(int_opts) / sizeof(int_opts[0]); i++)
        if (!strcmp(a, int_opts[i].name))
            return &int_opts[i];
    return NULL;
}

int sim_parse_args(sim_opts *o, int argc, char **argv, int which)
{
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    *o = (sim_opts){.socket = NULL,
                    .layers = 4,
                    .heads = 4,
                    .head_dim = 64,
                    .seq = 1024,
                    .steps = 20,
                    .threads = ncpu > 0 ? (int)ncpu : 1,
                    .clusters = 8,
                    .threshold = -3.0f,
                    .dtype = LA_DTYPE_BF16,
                    .device = "auto",
                    .bm = 128,
                    .bn = 64,
                    .seed = 1,
                    .dense_runs = 5};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        const struct int_opt *io = find_int_opt(a);
        int r = 0, used = 1;
        if (io) {
            r = parse_int(a, v, io->lo, io->hi, (int *)((char *)o + io->off));
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            sim_usage(which);
            return 1;
        } else if (which == SIM_DEMO && !strcmp(a, "--socket")) {
            if (!v) {
                fprintf(stderr, "%s: --socket needs a path\n", sim_prog);
                return -1;
            }
            o->socket = v;
        } else if (!strcmp(a, "--seed")) {
            int sd;
            r = parse_int(a, v, 0, 1 << 30, &sd);
            o->seed = (unsigned long long)sd;
        } else if (!strcmp(a, "--threshold")) {
            char *end;
            errno = 0;
            o->threshold = v ? strtof(v, &end) : 0;
            if (!v || errno || *end || isnan(o->threshold)) {
                fprintf(stderr, "%s: --threshold wants a number (or -inf)\n", sim_prog);
                return -1;
            }
        } else if (!strcmp(a, "--dtype")) {
            if (v && !strcmp(v, "bf16"))
                o->dtype = LA_DTYPE_BF16;
            else if (v && !strcmp(v, "f16"))
                o->dtype = LA_DTYPE_F16;
            else if (v && !strcmp(v, "f32"))
                o->dtype = LA_DTYPE_F32;
            else {
                fprintf(stderr, "%s: --dtype wants bf16, f16 or f32\n", sim_prog);
                return -1;
            }
        } else if (which == SIM_DEMO && !strcmp(a, "--device")) {
            if (!v || (strcmp(v, "auto") && strcmp(v, "cpu") && strcmp(v, "cuda"))) {
                fprintf(stderr, "%s: --device wants auto, cpu or cuda\n", sim_prog);
                return -1;
            }
            o->device = v;
        } else if (!strcmp(a, "--preset")) {
            if (!v || strcmp(v, "wan480")) {
                fprintf(stderr, "%s: --preset knows wan480 only\n", sim_prog);
                return -1;
            }
            o->heads = 40;
            o->head_dim = 128;
            o->seq = 32760;
            o->layers = 2;
        } else if (which == SIM_DIRECT && !strcmp(a, "--tile")) {
            if (!v || sscanf(v, "%dx%d", &o->bm, &o->bn) != 2 || o->bm < 1 || o->bn < 1) {
                fprintf(stderr, "%s: --tile wants BMxBN, e.g. 64x64\n", sim_prog);
                return -1;
            }
        } else {
            fprintf(stderr, "%s: unknown option %s (see --help)\n", sim_prog, a);
            return -1;
        }
        if (r < 0)
            return -1;
        i += used;
    }
    if (o->clusters > o->seq)
        o->clusters = o->seq;
    return 0;
}

double sim_now_s(void)
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

typedef struct gen_job {
    const sim_opts *o;
    sim_layer *ld;
    int layer, step;
    void *q, *k, *v; /* destinations [1, S, H, D] in o->dtype */
    int t0, t1;
} gen_job;

/* Weight of the cluster structure at a step: weak at first (noisy latents, broad attention),
 * strong at the end (sharp attention), as attention maps sharpen during denoising. */
static float structure(const sim_opts *o, int step)
{
    float x = o->steps > 1 ? (float)step / (float)(o->steps - 1) : 1.0f;
    return 0.7f + 0.5f * x;
}

static void *gen_range(void *arg)
{
    gen_job *j = arg;
    const sim_opts *o = j->o;
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

int sim_layer_init(const sim_opts *o, sim_layer *ld, int layer)
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

void sim_layer_free(sim_layer *ld)
{
    free(ld->centre);
    free(ld->nq);
    free(ld->nk);
    free(ld->nv);
}

/* Drifts layer's data one step and writes Q/K/V in o->dtype, on o->threads threads. */
void sim_generate(const sim_opts *o, sim_layer *ld, int layer, int step, void *q, void *k, void *v)
{
    int nt = o->threads > 0 ? o->threads : 1;
    if (nt > 64)
        nt = 64;
    gen_job jobs[64];
    pthread_t th[64];
    for (int t = 0; t < nt; t++) {
        jobs[t] = (gen_job){o,
                            ld,
                            layer,
                            step,
                            q,
                            k,
                            v,
                            (int)((int64_t)o->seq * t / nt),
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
void sim_err_acc(const void *out, const void *ref, size_t n, la_dtype dt, double *num, double *den)
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

/* ---- the table ------------------------------------------------------------------------- */

void sim_print_header(const sim_opts *o, const char *path)
{
    printf("%s: %s, %d layers x %d steps, B1 H%d S%d D%d %s, tau %g\n", sim_prog, path, o->layers,
           o->steps, o->heads, o->seq, o->head_dim,
           o->dtype == LA_DTYPE_BF16  ? "bf16"
           : o->dtype == LA_DTYPE_F16 ? "f16"
                                      : "f32",
           o->threshold);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

sim_baseline sim_baseline_of(const double *t, int n)
{
    double *s = malloc((size_t)n * sizeof(*s));
    if (!s)
        return (sim_baseline){t[0], t[0], t[0], 1};
    memcpy(s, t, (size_t)n * sizeof(*s));
    qsort(s, (size_t)n, sizeof(*s), cmp_double);
    sim_baseline b = {n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2, s[0], s[n - 1], n};
    free(s);
    return b;
}

void sim_print_baseline(const char *what, const sim_baseline *b)
{
    printf("dense baseline%s: %.1f ms per step, median of %d warm runs (min %.1f, max %.1f ms, "
           "spread %.0f%% of the median)\n",
           what, b->median_s * 1e3, b->runs, b->min_s * 1e3, b->max_s * 1e3,
           b->median_s > 0 ? 100 * (b->max_s - b->min_s) / b->median_s : 0.0);
}

void sim_print_columns(void)
{
    printf("%4s  %9s  %11s  %12s  %8s  %11s\n", "step", "live", "attn ms", "dense ms", "speedup",
           "rel.err");
}

void sim_print_row(int step, const sim_row *r, double median_s)
{
    printf("%4d  %8.1f%%  %11.1f  %12.1f  %7.2fx  %11.2e\n", step, 100 * r->live, r->attn_s * 1e3,
           r->dense_s * 1e3, r->attn_s > 0 ? median_s / r->attn_s : 0.0, r->err);
    fflush(stdout);
}

void sim_print_summary(const sim_opts *o, const sim_row *rows, const sim_baseline *b,
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
    sim_print_baseline("", b);
    printf("summary: mean live fraction %.1f%%, attention %.2f s vs %.2f s dense (the dense "
           "pass of each of the %d steps): %.2fx; last step %.2fx; max rel.err %.2e; "
           "wall %.1f s\n",
           100 * live, attn, dense, o->steps, attn > 0 ? dense / attn : 0.0,
           rows[o->steps - 1].attn_s > 0 ? b->median_s / rows[o->steps - 1].attn_s : 0.0, maxerr,
           total_s);
}

void sim_fill_strides(int64_t st[4], int S, int H, int D)
{
    st[3] = 1;
    st[2] = D;
    st[1] = (int64_t)H * D;
    st[0] = (int64_t)S * H * D;
}
