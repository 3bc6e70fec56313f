/*
 * bench_ref.c — times the CPU reference (la_ref_attn_fwd) on one attention call.
 *
 *   bench_ref [--threads N] [--runs R] [--seq S] [--heads H] [--dim D] [--amp A]
 *
 * Default shape B1 H8 S4096 D64, tiles 64x64. Cases: f32 and bf16 dense (tau = -inf), and bf16
 * skip at tau = -3 on inputs with local attention (position features, so that many tiles are
 * negligible): one untimed call (step 0) settles the mask, then the step-1 call is timed, each
 * run from that same mask. Each time is
 * the median of R runs; GFLOP/s counts the dense work 4*B*H*Sq*Sk*D (so a skipping call shows its
 * dense-equivalent rate) and "computed" the fraction of tiles actually computed. "cpu ms" is
 * the CPU time of all threads (GFLOP per CPU-second: the rate of one core, free of neighbours).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "la_attn.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* CPU time of the whole process (all threads): on a shared machine, wall time measures the
 * neighbours too; cpu time per call divided by the thread count is what an idle machine would
 * show, within cache effects. */
static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static double uniform(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) * 0x1p-53;
}

static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* [B, S, H, D] contiguous. local: position features cos/sin(w_f * s) make q_i . k_j peak at
 * i == j (attention mostly local, as in video DiTs); otherwise uniform noise in [-1, 1). */
static void fill(void *x, la_dtype dt, int S, int H, int D, int local, double amp)
{
    for (int s = 0; s < S; s++)
        for (int h = 0; h < H; h++)
            for (int d = 0; d < D; d++) {
                double v = 2 * uniform() - 1;
                if (local) {
                    double w = pow(10000.0, -(double)(d / 2) / (D / 2)) * 3.0;
                    v = amp * (d % 2 ? sin(w * s) : cos(w * s)) + 0.3 * v;
                }
                size_t i = ((size_t)s * H + h) * D + d;
                if (dt == LA_DTYPE_F32)
                    ((float *)x)[i] = (float)v;
                else
                    ((uint16_t *)x)[i] = to_bf16((float)v);
            }
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int threads = 1, runs = 3, S = 4096, H = 8, D = 64, BM = 64, BN = 64;
    double amp = 1.0; /* amplitude of the position features: higher, more local, more skipped */
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--runs"))
            runs = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seq"))
            S = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--heads"))
            H = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--dim"))
            D = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--amp"))
            amp = atof(argv[i + 1]);
        else {
            fprintf(
                stderr,
                "usage: %s [--threads N] [--runs R] [--seq S] [--heads H] [--dim D] [--amp A]\n",
                argv[0]);
            return 2;
        }
    }
    if (runs < 1 || runs > 100) {
        fprintf(stderr, "--runs must be 1..100\n");
        return 2;
    }
    const int B = 1;
    const size_t n = (size_t)B * S * H * D;
    void *q = malloc(n * 4), *k = malloc(n * 4), *v = malloc(n * 4), *o = malloc(n * 4);
    const int nq = la_tiles(S, BM), nk = la_tiles(S, BN), words = la_mask_words(nk);
    uint32_t *mask = malloc((size_t)B * H * nq * words * 4);
    uint32_t *mask0 = malloc((size_t)B * H * nq * words * 4);
    if (!q || !k || !v || !o || !mask || !mask0) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    struct {
        const char *name;
        la_dtype dt;
        la_mode mode;
        float tau;
    } cases[] = {
        {"f32  dense tau=-inf", LA_DTYPE_F32, LA_MODE_DENSE, -INFINITY},
        {"bf16 dense tau=-inf", LA_DTYPE_BF16, LA_MODE_DENSE, -INFINITY},
        {"bf16 skip  tau=-inf", LA_DTYPE_BF16, LA_MODE_SKIP, -INFINITY},
        {"bf16 skip  tau=-3 (local)", LA_DTYPE_BF16, LA_MODE_SKIP, -3.0f},
    };
    const double flop = 4.0 * B * H * (double)S * S * D;
    printf("la_ref_attn_fwd  B%d H%d Sq=Sk=%d D%d  BM%d BN%d  threads %d  median of %d\n", B, H, S,
           D, BM, BN, threads, runs);
    printf("%-28s %10s %10s %10s %12s %9s\n", "case", "wall ms", "GFLOP/s", "cpu ms", "GFLOP/cpu-s",
           "computed");
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        int local = cases[c].tau > -INFINITY;
        fill(q, cases[c].dt, S, H, D, local, amp);
        fill(k, cases[c].dt, S, H, D, local, amp);
        fill(v, cases[c].dt, S, H, D, 0, 1.0);
        la_attn_params p;
        memset(&p, 0, sizeof p);
        p.q = q;
        p.k = k;
        p.v = v;
        p.o = o;
        int64_t st[4] = {(int64_t)S * H * D, (int64_t)H * D, D, 1};
        memcpy(p.q_stride, st, sizeof st);
        memcpy(p.k_stride, st, sizeof st);
        memcpy(p.v_stride, st, sizeof st);
        memcpy(p.o_stride, st, sizeof st);
        p.mask = mask;
        p.mask_stride[0] = (int64_t)H * nq * words;
        p.mask_stride[1] = (int64_t)nq * words;
        p.mask_stride[2] = words;
        p.B = B;
        p.Sq = p.Sk = S;
        p.H = H;
        p.D = D;
        p.dtype = cases[c].dt;
        p.scale = 1.0f / sqrtf((float)D);
        p.tau = cases[c].tau;
        p.mode = cases[c].mode;
        p.BM = BM;
        p.BN = BN;
        p.threads = threads;
        int64_t tiles = 0;
        p.ret_tiles_computed = &tiles;
        for (size_t i = 0; i < (size_t)B * H * nq * words; i++)
            mask[i] = ~0u;
        int rc = 0;
        if (local) { /* settle the mask with one untimed call */
            p.step = 0;
            rc = la_ref_attn_fwd(&p);
            p.step = 1;
        }
        /* every timed run starts from the same mask, so that each computes the same tiles */
        memcpy(mask0, mask, (size_t)B * H * nq * words * 4);
        double t[100], ct[100];
        for (int r = 0; r < runs && rc == 0; r++) {
            memcpy(mask, mask0, (size_t)B * H * nq * words * 4);
            double t0 = now_s(), c0 = cpu_s();
            rc = la_ref_attn_fwd(&p);
            t[r] = now_s() - t0;
            ct[r] = cpu_s() - c0;
        }
        if (rc != 0) {
            fprintf(stderr, "%s: la_ref_attn_fwd: error %d\n", cases[c].name, rc);
            return 1;
        }
        qsort(t, (size_t)runs, sizeof t[0], cmp_d);
        qsort(ct, (size_t)runs, sizeof ct[0], cmp_d);
        double med = t[runs / 2], cmed = ct[runs / 2];
        printf("%-28s %10.1f %10.2f %10.1f %12.2f %8.1f%%\n", cases[c].name, med * 1e3,
               flop / med * 1e-9, cmed * 1e3, flop / cmed * 1e-9,
               100.0 * (double)tiles / ((double)B * H * nq * nk));
    }
    free(q);
    free(k);
    free(v);
    free(o);
    free(mask);
    free(mask0);
    return 0;
}
