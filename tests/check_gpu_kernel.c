/*
 * check_gpu_kernel.c — the CUDA forward kernels (kernels/la_cuda.h) against the CPU reference
 * (la_ref_attn_fwd) and against a float64 model of SKIP-SEMANTICS.md written here.
 *
 * Every case draws fresh random inputs (seeded from the clock; the seed is printed), poisons
 * the outputs before each launch, and checks:
 *   - O against the float64 model and against the CPU reference: relative L2 <= 1e-2;
 *   - LSE against the float64 model (abs 5e-3 + 1e-3 |lse|), every valid element written;
 *   - mask bits against the CPU reference and the float64 model: equal, except at ties — tiles
 *     whose float64 decision margin max_i (t_i - m_i) * scale * log2(e) - tau lies within
 *     LA_TIE_TOL of 0; ties are counted and printed;
 *   - the computed-tile counter against the reference;
 *   - the same call once more in the persistent grid's twin (one CTA per q-tile) and as an
 *     LSE-only call (o NULL): bit for bit the same LSE, mask and count, no O written.
 * Multi-step runs drift the inputs a little each step; after each step both sides continue
 * from the GPU's mask, so that one tie does not cascade.
 *
 * The cases that need a GPU are tagged "gpu" (tests/runner.h) and skipped where there is none.
 * The parent process never touches CUDA: each case initialises it in its forked child.
 */
#include <check.h>
#include <stdio.h>

#include "runner.h"

#ifndef LA_HAVE_CUDA
/* Built without CUDA: no cases at all; the CUDA-less builds (sanitizers) leave this program
 * out. */
int main(void) { return 0; }
#else

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>

#include "la_attn.h"
#include "la_cuda.h"

#define LA_TIE_TOL 2e-2 /* log2 units: fp32 score rounding is ~1e-4 of that */

#define CUDA_OK(call)                                                                          \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        ck_assert_msg(e_ == cudaSuccess, "%s: %s", #call, cudaGetErrorString(e_));             \
    } while (0)

/* ---- random numbers and element conversion ---------------------------------------------- */
static uint64_t rng_state;
static uint64_t rng_next(void) {
    uint64_t x = rng_state;
    x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}
static double rng_uniform(void) { return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0); }
static double rng_normal(void) {
    double u = rng_uniform(), v = rng_uniform();
    if (u < 1e-300) u = 1e-300;
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}
static void seed_from_clock(const char *name) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    rng_state = ((uint64_t)ts.tv_sec * 1000000007ULL) ^ (uint64_t)ts.tv_nsec ^ 0x9E3779B97F4A7C15ULL;
    if (!rng_state) rng_state = 1;
    printf("%s: seed %llu\n", name, (unsigned long long)rng_state);
}

static uint16_t to_half_bits(float f, la_dtype dt) {
    uint16_t r;
    if (dt == LA_DTYPE_BF16) {
        uint32_t u;
        memcpy(&u, &f, 4);
        u += 0x7fffu + ((u >> 16) & 1u);
        return (uint16_t)(u >> 16);
    }
    _Float16 h = (_Float16)f;
    memcpy(&r, &h, 2);
    return r;
}
static double from_half_bits(uint16_t b, la_dtype dt) {
    if (dt == LA_DTYPE_BF16) {
        uint32_t u = (uint32_t)b << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    _Float16 h;
    memcpy(&h, &b, 2);
    return (double)h;
}

/* ---- one test configuration ------------------------------------------------------------- */
typedef struct cfg {
    const char *name;
    int B, Sq, Sk, H, D;
    la_dtype dtype;
    int layout;        /* 0: [B, S, H, D] contiguous; 1: [B, H, S, D] with padded rows */
    la_mode mode;
    la_direction dir;
    float tau;
    int steps;
    bool dry_run;
    bool lse;
    la_range must_do[2];
    int n_must_do;
    la_range must_skip[2];
    int n_must_skip;
    double drift;      /* per-step noise added to Q and K */
    double peak;       /* weight of the cluster structure (0: plain Gaussian data) */
    int mask_init;     /* 0 all ones, 1 random ~50%, 2 all zero, 3 rows in turn empty, full,
                        * random (row lengths as uneven as they get) */
    bool carry;        /* carried row maxima R: around the rows' true maxima, some NaN, -inf */
} cfg;

/* A [B, S, H, D] tensor: logical fp32 values, the dtype storage (host) with strides, device. */
typedef struct tens {
    int B, S, H, D;
    la_dtype dt;
    int64_t stride[4];
    size_t elems; /* storage elements */
    float *val;   /* logical [B][S][H][D] */
    uint16_t *host;
    void *dev;
} tens;

static void tens_init(tens *t, int B, int S, int H, int D, la_dtype dt, int layout) {
    memset(t, 0, sizeof *t);
    t->B = B, t->S = S, t->H = H, t->D = D, t->dt = dt;
    if (layout == 0) {
        t->stride[3] = 1, t->stride[2] = D, t->stride[1] = (int64_t)H * D,
        t->stride[0] = (int64_t)S * H * D;
    } else { /* [B, H, S, D+8]: s/h swapped and every row padded by 8 elements */
        int64_t row = D + 8;
        t->stride[3] = 1, t->stride[1] = row, t->stride[2] = (int64_t)S * row,
        t->stride[0] = (int64_t)H * S * row;
    }
    t->elems = (size_t)B * t->stride[0];
    t->val = calloc((size_t)B * S * H * D, sizeof(float));
    t->host = malloc(t->elems * 2);
    ck_assert_ptr_nonnull(t->val);
    ck_assert_ptr_nonnull(t->host);
    for (size_t i = 0; i < t->elems; i++) t->host[i] = to_half_bits(NAN, dt); /* padding */
    CUDA_OK(cudaMalloc(&t->dev, t->elems * 2));
}
static void tens_free(tens *t) {
    free(t->val);
    free(t->host);
    cudaFree(t->dev);
}
static size_t tens_off(const tens *t, int b, int s, int h, int d) {
    return (size_t)(b * t->stride[0] + s * t->stride[1] + h * t->stride[2] + d);
}
static float *tens_val(tens *t, int b, int s, int h) {
    return t->val + (((size_t)b * t->S + s) * t->H + h) * t->D;
}
static void tens_upload(tens *t) {
    for (int b = 0; b < t->B; b++)
        for (int s = 0; s < t->S; s++)
            for (int h = 0; h < t->H; h++) {
                const float *v = tens_val(t, b, s, h);
                for (int d = 0; d < t->D; d++) t->host[tens_off(t, b, s, h, d)] = to_half_bits(v[d], t->dt);
            }
    CUDA_OK(cudaMemcpy(t->dev, t->host, t->elems * 2, cudaMemcpyHostToDevice));
}
static double tens_get(const tens *t, int b, int s, int h, int d) {
    return from_half_bits(t->host[tens_off(t, b, s, h, d)], t->dt);
}

/* Data with structure: C cluster centroids; key j belongs to cluster (j / 150) % C, query i to
 * (i / 160 + h) % C; x = peak * centroid + noise. With peak > 0 each query attends mostly to its
 * cluster's keys, so many tiles can be skipped. */
#define NCLUSTER 6
static void fill_inputs(tens *q, tens *k, tens *v, double peak) {
    int D = q->D;
    double *cent = malloc(sizeof(double) * NCLUSTER * D);
    for (int i = 0; i < NCLUSTER * D; i++) cent[i] = rng_normal();
    for (int b = 0; b < q->B; b++)
        for (int h = 0; h < q->H; h++) {
            for (int s = 0; s < q->S; s++) {
                float *x = tens_val(q, b, s, h);
                const double *c = cent + ((s / 160 + h) % NCLUSTER) * D;
                for (int d = 0; d < D; d++) x[d] = (float)(peak * c[d] + rng_normal());
            }
            for (int s = 0; s < k->S; s++) {
                float *x = tens_val(k, b, s, h), *y = tens_val(v, b, s, h);
                const double *c = cent + ((s / 150) % NCLUSTER) * D;
                for (int d = 0; d < D; d++) {
                    x[d] = (float)(peak * c[d] + rng_normal());
                    y[d] = (float)rng_normal();
                }
            }
        }
    free(cent);
}
static void drift(tens *t, double eps) {
    size_t n = (size_t)t->B * t->S * t->H * t->D;
    for (size_t i = 0; i < n; i++) t->val[i] += (float)(eps * rng_normal());
}

/* ---- float64 model of one call -------------------------------------------------------------
 * For each (b, h, m): effective live set, visit order, running max, votes, keep, new mask row,
 * O and LSE in float64, and per tile the decision margin max_i (t_i - m_i)*c - tau
 * (+inf for the first tile of a row). */
typedef struct model_out {
    double *o;      /* [B][Sq][H][D] */
    double *lse;    /* [B][H][Sq] */
    double *rmax;   /* [B][H][Sq] R after the call, max(R, m) (with rmax_in only) */
    uint32_t *mask; /* [B][H][nQ][W] new rows (== input rows in mode DENSE) */
    double *margin; /* [B][H][nQ][nK], NAN where not visited */
    int64_t tiles;
} model_out;

static void model_run(const cfg *c, const tens *q, const tens *k, const tens *v, int step,
                      const uint32_t *mask_in /* [B][H][nQ][W] */, const float *rmax_in,
                      int BM, int BN, model_out *out) {
    const int B = c->B, H = c->H, Sq = c->Sq, Sk = c->Sk, D = c->D;
    const int nQ = la_tiles(Sq, BM), nK = la_tiles(Sk, BN), W = la_mask_words(nK);
    const double scale = (double)(float)(1.0 / sqrt((double)D)),
                 cl = (double)((float)scale * 1.44269504088896340736f);
    la_attn_params fp = {0};
    fp.Sk = Sk, fp.BN = BN, fp.must_do = c->must_do, fp.n_must_do = c->n_must_do;
    fp.must_skip = c->must_skip, fp.n_must_skip = c->n_must_skip;
    uint32_t mdo[LA_CUDA_MAX_K_TILES / 32], sko[LA_CUDA_MAX_K_TILES / 32];
    la_tile_flags(&fp, mdo, sko);
    bool desc = c->dir == LA_DIR_DESCENDING || (c->dir == LA_DIR_ALTERNATE && step % 2 == 0);
    double *s = malloc(sizeof(double) * BN), *m = malloc(sizeof(double) * BM),
           *r = malloc(sizeof(double) * BM),
           *l = malloc(sizeof(double) * BM), *acc = malloc(sizeof(double) * BM * D);
    double *qd = malloc(sizeof(double) * BM * D), *kd = malloc(sizeof(double) * BN * D),
           *vd = malloc(sizeof(double) * BN * D);
    int *order = malloc(sizeof(int) * nK);
    out->tiles = 0;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int mt = 0; mt < nQ; mt++) {
                const size_t row = (((size_t)b * H + h) * nQ + mt);
                const uint32_t *in = mask_in + row * W;
                uint32_t *newrow = out->mask + row * W;
                double *mar = out->margin + row * nK;
                int nvis = 0;
                for (int n = 0; n < nK; n++) {
                    mar[n] = NAN;
                    /* SKIP: (live | must-do) & ~must-skip-only; DENSE, OBSERVE: ~must-skip-only */
                    uint32_t wv = ~sko[n / 32];
                    if (c->mode == LA_MODE_SKIP) wv &= in[n / 32] | mdo[n / 32];
                    bool live = (wv >> (n % 32)) & 1;
                    if (live) order[nvis++] = n;
                }
                if (desc)
                    for (int i = 0; i < nvis / 2; i++) {
                        int t = order[i];
                        order[i] = order[nvis - 1 - i], order[nvis - 1 - i] = t;
                    }
                out->tiles += nvis;
                const int rows = Sq - mt * BM < BM ? Sq - mt * BM : BM;
                for (int i = 0; i < rows; i++) {
                    m[i] = -INFINITY, l[i] = 0;
                    /* the votes' reference starts at R (NaN carries nothing) */
                    r[i] = -INFINITY;
                    if (rmax_in) {
                        float x = rmax_in[((size_t)b * H + h) * Sq + mt * BM + i];
                        r[i] = x == x ? x : -INFINITY;
                    }
                    for (int d = 0; d < D; d++) {
                        acc[i * D + d] = 0;
                        qd[i * D + d] = tens_get(q, b, mt * BM + i, h, d);
                    }
                }
                uint32_t keep[LA_CUDA_MAX_K_TILES / 32] = {0}, vis[LA_CUDA_MAX_K_TILES / 32] = {0};
                for (int vi = 0; vi < nvis; vi++) vis[order[vi] / 32] |= 1u << (order[vi] % 32);
                for (int vi = 0; vi < nvis; vi++) {
                    const int n = order[vi], keys = Sk - n * BN < BN ? Sk - n * BN : BN;
                    for (int j = 0; j < keys; j++)
                        for (int d = 0; d < D; d++) {
                            kd[j * D + d] = tens_get(k, b, n * BN + j, h, d);
                            vd[j * D + d] = tens_get(v, b, n * BN + j, h, d);
                        }
                    double best = -INFINITY;
                    for (int i = 0; i < rows; i++) {
                        double t = -INFINITY;
                        for (int j = 0; j < keys; j++) {
                            double dot = 0;
                            for (int d = 0; d < D; d++) dot += qd[i * D + d] * kd[j * D + d];
                            s[j] = dot;
                            if (dot > t) t = dot;
                        }
                        const double ref = r[i] > m[i] ? r[i] : m[i];
                        double mg = ref == -INFINITY ? INFINITY : (t - ref) * cl - c->tau;
                        if (mg > best) best = mg;
                        if (t > r[i]) r[i] = t;
                        double mn = t > m[i] ? t : m[i];
                        double alpha = m[i] == -INFINITY ? 0 : exp((m[i] - mn) * scale);
                        l[i] *= alpha;
                        for (int d = 0; d < D; d++) acc[i * D + d] *= alpha;
                        for (int j = 0; j < keys; j++) {
                            double pj = exp((s[j] - mn) * scale);
                            l[i] += pj;
                            for (int d = 0; d < D; d++) acc[i * D + d] += pj * vd[j * D + d];
                        }
                        m[i] = mn;
                    }
                    mar[n] = best;
                    if (best > 0 || ((mdo[n / 32] >> (n % 32)) & 1)) keep[n / 32] |= 1u << (n % 32);
                }
                /* Visited tiles: keep (SKIP) or old & keep (OBSERVE); others keep the old bit;
                 * bits past nK are 0. */
                for (int w = 0; w < W; w++) {
                    uint32_t valid = (w + 1) * 32 <= nK ? 0xffffffffu : (1u << (nK % 32)) - 1u;
                    uint32_t upd = c->mode == LA_MODE_SKIP ? keep[w] : (in[w] & keep[w]);
                    if (c->mode == LA_MODE_DENSE) newrow[w] = in[w];
                    else newrow[w] = ((vis[w] & upd) | (~vis[w] & in[w])) & valid;
                }
                for (int i = 0; i < rows; i++) {
                    const int sq = mt * BM + i;
                    for (int d = 0; d < D; d++)
                        out->o[(((size_t)b * Sq + sq) * H + h) * D + d] = l[i] > 0 ? acc[i * D + d] / l[i] : 0;
                    out->lse[((size_t)b * H + h) * Sq + sq] = l[i] > 0 ? m[i] * scale + log(l[i]) : -INFINITY;
                    if (rmax_in) out->rmax[((size_t)b * H + h) * Sq + sq] = r[i];
                }
            }
    free(s), free(m), free(r), free(l), free(acc), free(qd), free(kd), free(vd), free(order);
}

/* Compute capability of the current device (10*major + minor): the selector picks the kernel
 * family, hence the tile sizes, from it. */
static int device_cc(void) {
    int dev = 0, major = 0, minor = 0;
    CUDA_OK(cudaGetDevice(&dev));
    CUDA_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    CUDA_OK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    return 10 * major + minor;
}

/* ---- one case: `steps` calls on the GPU, the CPU reference and the model ------------------ */
typedef struct stats {
    int ties, mismatches_ref, mismatches_model;
    double worst_o, worst_o_ref;
    double live_fraction;
} stats;

static double rel_l2(const double *ref, const double *x, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = x[i] - ref[i];
        num += d * d, den += ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static stats run_case(const cfg *c) {
    stats st = {0};
    int32_t BM, BN;
    const int cc = device_cc();
    ck_assert_int_eq(la_cuda_tile_sizes(c->D, c->dtype, cc, &BM, &BN), 0);
    const int B = c->B, H = c->H, Sq = c->Sq, Sk = c->Sk, D = c->D;
    const int nQ = la_tiles(Sq, BM), nK = la_tiles(Sk, BN), W = la_mask_words(nK);
    const size_t rows = (size_t)B * H * nQ, nO = (size_t)B * Sq * H * D, nL = (size_t)B * H * Sq;

    tens q, k, v, o;
    tens_init(&q, B, Sq, H, D, c->dtype, c->layout);
    tens_init(&k, B, Sk, H, D, c->dtype, c->layout);
    tens_init(&v, B, Sk, H, D, c->dtype, c->layout);
    tens_init(&o, B, Sq, H, D, c->dtype, c->layout);
    fill_inputs(&q, &k, &v, c->peak);

    /* Mask rows with 2 spare words each (rows may be longer than W). */
    const int64_t mrow = W + 2;
    const size_t mwords = rows * (size_t)mrow;
    uint32_t *mask = malloc(mwords * 4), *mask_ref = malloc(mwords * 4), *gpu_mask = malloc(mwords * 4);
    uint32_t *packed_in = malloc(rows * W * 4);
    for (size_t r = 0; r < rows; r++)
        for (int w = 0; w < mrow; w++) {
            uint32_t x = w < W ? 0xffffffffu : 0xdeadbeefu;
            if (w < W && c->mask_init == 1) x = (uint32_t)rng_next();
            if (w < W && c->mask_init == 2) x = 0;
            if (w < W && c->mask_init == 3) x = r % 3 == 0 ? 0 : r % 3 == 1 ? 0xffffffffu : (uint32_t)rng_next();
            if (w == W - 1 && (nK % 32)) x &= (1u << (nK % 32)) - 1;
            mask[r * mrow + w] = x;
        }
    uint32_t *d_mask, *d_dec = NULL;
    float *d_lse;
    unsigned long long *d_tiles;
    CUDA_OK(cudaMalloc((void **)&d_mask, mwords * 4));
    if (c->dry_run) CUDA_OK(cudaMalloc((void **)&d_dec, mwords * 4));
    CUDA_OK(cudaMalloc((void **)&d_lse, nL * 4));
    CUDA_OK(cudaMalloc((void **)&d_tiles, 8));
    float *lse = malloc(nL * 4), *lse_ref = malloc(nL * 4);
    uint16_t *o_ref_store = malloc(o.elems * 2);
    double *o_gpu = malloc(nO * 8), *o_cpu = malloc(nO * 8);
    model_out mo = {malloc(nO * 8), malloc(nL * 8), malloc(nL * 8), malloc(rows * W * 4),
                    malloc(rows * nK * 8), 0};
    /* Carried row maxima: host input, GPU and reference outputs; O and LSE of a run without R. */
    float *rmax_in = c->carry ? malloc(nL * 4) : NULL, *rmax_gpu = malloc(nL * 4),
          *rmax_ref = malloc(nL * 4), *d_rmax = NULL;
    uint16_t *o_plain = malloc(o.elems * 2);
    float *lse_plain = malloc(nL * 4);
    if (c->carry) CUDA_OK(cudaMalloc((void **)&d_rmax, nL * 4));
    int64_t live_sum = 0, live_total = 0;

    for (int step = 0; step < c->steps; step++) {
        if (step > 0) drift(&q, c->drift), drift(&k, c->drift);
        tens_upload(&q), tens_upload(&k), tens_upload(&v);

        la_attn_params p = {0};
        p.q = q.dev, p.k = k.dev, p.v = v.dev, p.o = o.dev;
        memcpy(p.q_stride, q.stride, 32), memcpy(p.k_stride, k.stride, 32);
        memcpy(p.v_stride, v.stride, 32), memcpy(p.o_stride, o.stride, 32);
        p.lse = c->lse ? d_lse : NULL;
        p.lse_stride[0] = (int64_t)H * Sq, p.lse_stride[1] = Sq, p.lse_stride[2] = 1;
        p.B = B, p.Sq = Sq, p.Sk = Sk, p.H = H, p.D = D, p.dtype = c->dtype;
        p.scale = (float)(1.0 / sqrt((double)D));
        p.tau = c->tau, p.mode = c->mode, p.step = step, p.direction = c->dir;
        p.must_do = c->must_do, p.n_must_do = c->n_must_do;
        p.must_skip = c->must_skip, p.n_must_skip = c->n_must_skip;
        p.mask = d_mask;
        p.mask_stride[0] = (int64_t)H * nQ * mrow, p.mask_stride[1] = (int64_t)nQ * mrow,
        p.mask_stride[2] = mrow;
        p.decisions = d_dec;
        p.BM = BM, p.BN = BN, p.threads = 8;
        p.ret_tiles_computed = (int64_t *)d_tiles;

        if (c->carry) {
            /* R around each row's true maximum (float64, every key), +-3 log2 units; every
             * 16th row NaN, every 16th + 5 -inf. */
            const double cl = (double)(p.scale * 1.44269504088896340736f);
            for (int b = 0; b < B; b++)
                for (int h = 0; h < H; h++)
                    for (int i = 0; i < Sq; i++) {
                        double mx = -INFINITY;
                        for (int j = 0; j < Sk; j++) {
                            double dot = 0;
                            for (int d = 0; d < D; d++) dot += tens_get(&q, b, i, h, d) * tens_get(&k, b, j, h, d);
                            if (dot > mx) mx = dot;
                        }
                        float x = (float)(mx + 3.0 * (2.0 * rng_uniform() - 1.0) / cl);
                        if (i % 16 == 3) x = NAN;
                        if (i % 16 == 8) x = -INFINITY;
                        rmax_in[((size_t)b * H + h) * Sq + i] = x;
                    }
            /* The same call without R first: with R, O and LSE must come out bit for bit. */
            /* Poisoned as the call with R is below: a strided O has gaps the kernel never
             * writes, and the comparison covers them (seen on the H200: at step 0 the gaps of
             * an unpoisoned first run differed from the poisoned second one). */
            CUDA_OK(cudaMemcpy(d_mask, mask, mwords * 4, cudaMemcpyHostToDevice));
            CUDA_OK(cudaMemset(o.dev, 0xFF, o.elems * 2));
            CUDA_OK(cudaMemset(d_lse, 0xFF, nL * 4));
            CUDA_OK(la_attn_fwd_cuda(&p, 0));
            CUDA_OK(cudaDeviceSynchronize());
            CUDA_OK(cudaMemcpy(o_plain, o.dev, o.elems * 2, cudaMemcpyDeviceToHost));
            CUDA_OK(cudaMemcpy(lse_plain, d_lse, nL * 4, cudaMemcpyDeviceToHost));
            CUDA_OK(cudaMemcpy(d_rmax, rmax_in, nL * 4, cudaMemcpyHostToDevice));
            p.row_max = d_rmax;
            p.row_max_stride[0] = (int64_t)H * Sq, p.row_max_stride[1] = Sq, p.row_max_stride[2] = 1;
        }

        /* GPU, outputs poisoned first. */
        CUDA_OK(cudaMemcpy(d_mask, mask, mwords * 4, cudaMemcpyHostToDevice));
        if (d_dec) CUDA_OK(cudaMemset(d_dec, 0xA5, mwords * 4));
        CUDA_OK(cudaMemset(o.dev, 0xFF, o.elems * 2)); /* NaN in bf16 and fp16 */
        CUDA_OK(cudaMemset(d_lse, 0xFF, nL * 4));
        CUDA_OK(cudaMemset(d_tiles, 0, 8));
        ck_assert_int_eq(la_cuda_supported(&p, cc), 0);
        CUDA_OK(la_attn_fwd_cuda(&p, 0));
        CUDA_OK(cudaDeviceSynchronize());
        uint16_t *o_store = malloc(o.elems * 2);
        CUDA_OK(cudaMemcpy(o_store, o.dev, o.elems * 2, cudaMemcpyDeviceToHost));
        CUDA_OK(cudaMemcpy(gpu_mask, d_dec ? d_dec : d_mask, mwords * 4, cudaMemcpyDeviceToHost));
        CUDA_OK(cudaMemcpy(lse, d_lse, nL * 4, cudaMemcpyDeviceToHost));
        unsigned long long tiles_gpu = 0;
        CUDA_OK(cudaMemcpy(&tiles_gpu, d_tiles, 8, cudaMemcpyDeviceToHost));
        if (c->carry) {
            CUDA_OK(cudaMemcpy(rmax_gpu, d_rmax, nL * 4, cudaMemcpyDeviceToHost));
            ck_assert_msg(memcmp(o_store, o_plain, o.elems * 2) == 0, "%s step %d: R changed O", c->name,
                          step);
            ck_assert_msg(!c->lse || memcmp(lse, lse_plain, nL * 4) == 0, "%s step %d: R changed LSE",
                          c->name, step);
        }
        /* The Hopper family's persistent grid against one CTA per q-tile on the same input:
         * bit for bit the same O, LSE, R, mask and tile count (each row is computed in the
         * same order either way; only which CTA computes it differs). */
        {
            uint16_t *o_twin = malloc(o.elems * 2);
            uint32_t *mask_twin = malloc(mwords * 4);
            float *lse_twin = malloc(nL * 4), *rmax_twin = malloc(nL * 4);
            unsigned long long tiles_twin = 0;
            CUDA_OK(cudaMemcpy(d_mask, mask, mwords * 4, cudaMemcpyHostToDevice));
            if (d_dec) CUDA_OK(cudaMemset(d_dec, 0xA5, mwords * 4));
            if (c->carry) CUDA_OK(cudaMemcpy(d_rmax, rmax_in, nL * 4, cudaMemcpyHostToDevice));
            CUDA_OK(cudaMemset(o.dev, 0xFF, o.elems * 2));
            CUDA_OK(cudaMemset(d_lse, 0xFF, nL * 4));
            CUDA_OK(cudaMemset(d_tiles, 0, 8));
            CUDA_OK(la_attn_fwd_cuda_variant(&p, LA_CUDA_VARIANT_AUTO | LA_CUDA_VARIANT_ONE_CTA_PER_TILE, 0));
            CUDA_OK(cudaDeviceSynchronize());
            CUDA_OK(cudaMemcpy(o_twin, o.dev, o.elems * 2, cudaMemcpyDeviceToHost));
            CUDA_OK(cudaMemcpy(mask_twin, d_dec ? d_dec : d_mask, mwords * 4, cudaMemcpyDeviceToHost));
            CUDA_OK(cudaMemcpy(lse_twin, d_lse, nL * 4, cudaMemcpyDeviceToHost));
            CUDA_OK(cudaMemcpy(&tiles_twin, d_tiles, 8, cudaMemcpyDeviceToHost));
            ck_assert_msg(memcmp(o_twin, o_store, o.elems * 2) == 0, "%s step %d: O differs between grids",
                          c->name, step);
            ck_assert_msg(memcmp(mask_twin, gpu_mask, mwords * 4) == 0, "%s step %d: mask differs between grids",
                          c->name, step);
            ck_assert_msg(memcmp(lse_twin, lse, nL * 4) == 0, "%s step %d: LSE differs between grids", c->name,
                          step);
            ck_assert_msg(tiles_twin == tiles_gpu, "%s step %d: tiles %llu against %llu between grids", c->name,
                          step, tiles_twin, tiles_gpu);
            if (c->carry) {
                CUDA_OK(cudaMemcpy(rmax_twin, d_rmax, nL * 4, cudaMemcpyDeviceToHost));
                ck_assert_msg(memcmp(rmax_twin, rmax_gpu, nL * 4) == 0, "%s step %d: R differs between grids",
                              c->name, step);
            }
            free(o_twin), free(mask_twin), free(lse_twin), free(rmax_twin);
        }
        /* LSE only (o NULL, the guardrail's samples): bit for bit the same LSE, R, mask and
         * tile count as the full call, and O left as it was. */
        if (c->lse) {
            uint16_t *o_left = malloc(o.elems * 2), *poison = malloc(o.elems * 2);
            uint32_t *mask_lo = malloc(mwords * 4);
            float *lse_lo = malloc(nL * 4), *rmax_lo = malloc(nL * 4);
            unsigned long long tiles_lo = 0;
            la_attn_params lo = p;
            lo.o = NULL;
            CUDA_OK(cudaMemcpy(d_mask, mask, mwords * 4, cudaMemcpyHostToDevice));
            if (d_dec) CUDA_OK(cudaMemset(d_dec, 0xA5, mwords * 4));
            if (c->carry) CUDA_OK(cudaMemcpy(d_rmax, rmax_in, nL * 4, cudaMemcpyHostToDevice));
            CUDA_OK(cudaMemset(o.dev, 0x3C, o.elems * 2));
            memset(poison, 0x3C, o.elems * 2);
            CUDA_OK(cudaMemset(d_lse, 0xFF, nL * 4));
            CUDA_OK(cudaMemset(d_tiles, 0, 8));
            ck_assert_int_eq(la_cuda_supported(&lo, cc), 0);
            CUDA_OK(la_attn_fwd_cuda(&lo, 0));
            CUDA_OK(cudaDeviceSynchronize());
            CUDA_OK(cudaMemcpy(o_left, o.dev, o.elems * 2, cudaMemcpyDeviceToHost));
            CUDA_OK(cudaMemcpy(mask_lo, d_dec ? d_dec : d_mask, mwords * 4, cudaMemcpyDeviceToHost));
            CUDA_OK(cudaMemcpy(lse_lo, d_lse, nL * 4, cudaMemcpyDeviceToHost));
            CUDA_OK(cudaMemcpy(&tiles_lo, d_tiles, 8, cudaMemcpyDeviceToHost));
            ck_assert_msg(memcmp(o_left, poison, o.elems * 2) == 0, "%s step %d: an LSE-only call wrote O",
                          c->name, step);
            ck_assert_msg(memcmp(lse_lo, lse, nL * 4) == 0, "%s step %d: LSE-only LSE differs", c->name, step);
            ck_assert_msg(memcmp(mask_lo, gpu_mask, mwords * 4) == 0, "%s step %d: LSE-only mask differs",
                          c->name, step);
            ck_assert_msg(tiles_lo == tiles_gpu, "%s step %d: LSE-only tiles %llu against %llu", c->name, step,
                          tiles_lo, tiles_gpu);
            if (c->carry) {
                CUDA_OK(cudaMemcpy(rmax_lo, d_rmax, nL * 4, cudaMemcpyDeviceToHost));
                ck_assert_msg(memcmp(rmax_lo, rmax_gpu, nL * 4) == 0, "%s step %d: LSE-only R differs", c->name,
                              step);
            }
            free(o_left), free(poison), free(mask_lo), free(lse_lo), free(rmax_lo);
        }
        if (d_dec) { /* the store itself must be untouched by a dry run */
            uint32_t *chk = malloc(mwords * 4);
            CUDA_OK(cudaMemcpy(chk, d_mask, mwords * 4, cudaMemcpyDeviceToHost));
            ck_assert_msg(memcmp(chk, mask, mwords * 4) == 0, "%s: dry run modified the mask", c->name);
            free(chk);
        }

        /* CPU reference on host copies (same strides). */
        la_attn_params r = p;
        memcpy(mask_ref, mask, mwords * 4);
        uint32_t *dec_ref = c->dry_run ? malloc(mwords * 4) : NULL;
        if (dec_ref) memset(dec_ref, 0xA5, mwords * 4);
        r.q = q.host, r.k = k.host, r.v = v.host, r.o = o_ref_store;
        r.lse = c->lse ? lse_ref : NULL;
        r.mask = mask_ref, r.decisions = dec_ref;
        if (c->carry) {
            memcpy(rmax_ref, rmax_in, nL * 4);
            r.row_max = rmax_ref;
        }
        int64_t tiles_ref = 0;
        r.ret_tiles_computed = &tiles_ref;
        ck_assert_int_eq(la_ref_attn_fwd(&r), 0);
        const uint32_t *ref_mask = dec_ref ? dec_ref : mask_ref;

        /* Model. */
        for (size_t rr = 0; rr < rows; rr++) memcpy(packed_in + rr * W, mask + rr * mrow, W * 4);
        model_run(c, &q, &k, &v, step, packed_in, rmax_in, BM, BN, &mo);

        /* O and LSE. */
        for (int b = 0; b < B; b++)
            for (int s = 0; s < Sq; s++)
                for (int h = 0; h < H; h++)
                    for (int d = 0; d < D; d++) {
                        size_t i = (((size_t)b * Sq + s) * H + h) * D + d, off = tens_off(&o, b, s, h, d);
                        o_gpu[i] = from_half_bits(o_store[off], c->dtype);
                        o_cpu[i] = from_half_bits(o_ref_store[off], c->dtype);
                        ck_assert_msg(isfinite(o_gpu[i]), "%s step %d: O[%d,%d,%d,%d] not written (%g)",
                                      c->name, step, b, s, h, d, o_gpu[i]);
                    }
        double e_model = rel_l2(mo.o, o_gpu, nO), e_ref = rel_l2(o_cpu, o_gpu, nO);
        if (e_model > st.worst_o) st.worst_o = e_model;
        if (e_ref > st.worst_o_ref) st.worst_o_ref = e_ref;
        ck_assert_msg(e_model <= 1e-2, "%s step %d: O rel L2 vs float64 %.3e", c->name, step, e_model);
        ck_assert_msg(e_ref <= 1e-2, "%s step %d: O rel L2 vs CPU reference %.3e", c->name, step, e_ref);
        if (c->lse)
            for (size_t i = 0; i < nL; i++) {
                double ref = mo.lse[i], got = lse[i];
                if (ref == -INFINITY) {
                    ck_assert_msg(got == -INFINITY, "%s: LSE[%zu] = %g, want -inf", c->name, i, got);
                    continue;
                }
                ck_assert_msg(fabs(got - ref) <= 5e-3 + 1e-3 * fabs(ref),
                              "%s step %d: LSE[%zu] = %.6f, float64 %.6f", c->name, step, i, got, ref);
                ck_assert_msg(fabs(lse_ref[i] - got) <= 5e-3 + 1e-3 * fabs(ref),
                              "%s step %d: LSE[%zu] = %.6f, CPU reference %.6f", c->name, step, i, got,
                              (double)lse_ref[i]);
            }

        /* R written back: max(R, the row's maximum) against the reference and float64. */
        for (size_t i = 0; c->carry && i < nL; i++) {
            double want = mo.rmax[i], got = rmax_gpu[i];
            if (isinf(want)) {
                ck_assert_msg(got == want && rmax_ref[i] == want, "%s step %d: R[%zu] = %g (ref %g), want %g",
                              c->name, step, i, got, (double)rmax_ref[i], want);
                continue;
            }
            ck_assert_msg(fabs(got - want) <= 1e-3 * (1 + fabs(want)) &&
                              fabs(got - rmax_ref[i]) <= 1e-3 * (1 + fabs(want)),
                          "%s step %d: R[%zu] = %.6f, CPU reference %.6f, float64 %.6f", c->name, step, i,
                          got, (double)rmax_ref[i], want);
        }

        /* Masks: word by word, bit by bit; spare words never written. */
        for (size_t rr = 0; rr < rows; rr++) {
            for (int w = W; w < mrow; w++)
                ck_assert_msg(gpu_mask[rr * mrow + w] == (d_dec ? 0xA5A5A5A5u : mask[rr * mrow + w]),
                              "%s: spare word %d of row %zu written", c->name, w, rr);
            for (int n = 0; n < nK; n++) {
                int g = (gpu_mask[rr * mrow + n / 32] >> (n % 32)) & 1;
                int cr = (ref_mask[rr * mrow + n / 32] >> (n % 32)) & 1;
                int md = (mo.mask[rr * W + n / 32] >> (n % 32)) & 1;
                double mg = mo.margin[rr * nK + n];
                bool tie = !isnan(mg) && fabs(mg) < LA_TIE_TOL;
                if (g != cr || g != md) {
                    if (tie) {
                        st.ties++;
                    } else {
                        if (g != cr) st.mismatches_ref++;
                        if (g != md) st.mismatches_model++;
                        printf("%s step %d row %zu tile %d: gpu %d ref %d model %d margin %.6g\n",
                               c->name, step, rr, n, g, cr, md, mg);
                    }
                }
            }
            /* bits past nK stay 0 wherever the row was written */
            if (c->mode != LA_MODE_DENSE && (nK % 32))
                ck_assert_msg((gpu_mask[rr * mrow + W - 1] >> (nK % 32)) == 0,
                              "%s: bits past nK set in row %zu", c->name, rr);
        }
        ck_assert_msg(st.mismatches_ref == 0 && st.mismatches_model == 0,
                      "%s step %d: %d mask bits differ from the CPU reference, %d from float64 (not ties)",
                      c->name, step, st.mismatches_ref, st.mismatches_model);
        ck_assert_msg((int64_t)tiles_gpu == tiles_ref, "%s step %d: tiles %llu, reference %lld", c->name,
                      step, tiles_gpu, (long long)tiles_ref);
        ck_assert_msg((int64_t)tiles_gpu == mo.tiles, "%s step %d: tiles %llu, model %lld", c->name, step,
                      tiles_gpu, (long long)mo.tiles);
        live_sum += (int64_t)tiles_gpu, live_total += (int64_t)rows * nK;

        /* Continue from the GPU's mask (a dry run leaves the store as it was). */
        if (!c->dry_run) memcpy(mask, gpu_mask, mwords * 4);
        free(o_store);
        free(dec_ref);
    }
    st.live_fraction = (double)live_sum / (double)live_total;
    printf("%s [%s, BM %d BN %d]: %d steps, O rel L2 vs float64 %.2e, vs CPU ref %.2e, live fraction "
           "%.3f, ties %d\n",
           c->name, la_cuda_variant_name(D, c->dtype, cc), BM, BN, c->steps, st.worst_o, st.worst_o_ref,
           st.live_fraction, st.ties);

    tens_free(&q), tens_free(&k), tens_free(&v), tens_free(&o);
    free(mask), free(mask_ref), free(gpu_mask), free(packed_in), free(lse), free(lse_ref);
    free(o_ref_store), free(o_gpu), free(o_cpu);
    free(mo.o), free(mo.lse), free(mo.rmax), free(mo.mask), free(mo.margin);
    free(rmax_in), free(rmax_gpu), free(rmax_ref), free(o_plain), free(lse_plain);
    cudaFree(d_rmax);
    cudaFree(d_mask), cudaFree(d_dec), cudaFree(d_lse), cudaFree(d_tiles);
    return st;
}

/* Ring attention's property (SKIP-SEMANTICS "Carried row maxima"): the keys cut into P shards
 * of L = 2 BN keys, each shard called with its own mask (the single mask's columns) in the
 * single call's visiting order, R carried from -inf, give bit for bit the single call's mask,
 * tile count and row maxima on the GPU too: the same tiles are scored by the same instructions.
 * Several drifting steps in alternating directions, a must-do range in shard 0. */
static void run_shards_case(const cfg *c, int P) {
    int32_t BM, BN;
    const int cc = device_cc();
    ck_assert_int_eq(la_cuda_tile_sizes(c->D, c->dtype, cc, &BM, &BN), 0);
    const int B = c->B, H = c->H, Sq = c->Sq, D = c->D, L = 2 * BN, Sk = P * L;
    const int nQ = la_tiles(Sq, BM), nK = la_tiles(Sk, BN), W = la_mask_words(nK), nkl = L / BN;
    const size_t rows = (size_t)B * H * nQ, nL = (size_t)B * H * Sq;
    tens q, k, v, o;
    tens_init(&q, B, Sq, H, D, c->dtype, c->layout);
    tens_init(&k, B, Sk, H, D, c->dtype, c->layout);
    tens_init(&v, B, Sk, H, D, c->dtype, c->layout);
    tens_init(&o, B, Sq, H, D, c->dtype, c->layout);
    fill_inputs(&q, &k, &v, c->peak);
    uint32_t *mask = malloc(rows * W * 4), *got = malloc(rows * W * 4), *shard = malloc(rows * 4);
    float *r_single = malloc(nL * 4), *r_shards = malloc(nL * 4), *ninf = malloc(nL * 4);
    for (size_t i = 0; i < rows * W; i++) mask[i] = 0xffffffffu;
    for (size_t rr = 0; rr < rows; rr++)
        if (nK % 32) mask[rr * W + W - 1] = (1u << (nK % 32)) - 1u;
    for (size_t i = 0; i < nL; i++) ninf[i] = -INFINITY;
    uint32_t *d_mask, *d_shard;
    float *d_r, *d_lse;
    unsigned long long *d_tiles;
    CUDA_OK(cudaMalloc((void **)&d_mask, rows * W * 4));
    CUDA_OK(cudaMalloc((void **)&d_shard, (size_t)P * rows * 4));
    CUDA_OK(cudaMalloc((void **)&d_r, nL * 4));
    CUDA_OK(cudaMalloc((void **)&d_lse, nL * 4));
    CUDA_OK(cudaMalloc((void **)&d_tiles, 8));
    ck_assert_int_le(nkl, 32);
    la_range md = {0, 5};
    for (int step = 0; step < c->steps; step++) {
        if (step > 0) drift(&q, c->drift), drift(&k, c->drift);
        tens_upload(&q), tens_upload(&k), tens_upload(&v);
        la_attn_params p = {0};
        p.q = q.dev, p.k = k.dev, p.v = v.dev, p.o = o.dev;
        memcpy(p.q_stride, q.stride, 32), memcpy(p.k_stride, k.stride, 32);
        memcpy(p.v_stride, v.stride, 32), memcpy(p.o_stride, o.stride, 32);
        p.lse = d_lse, p.lse_stride[0] = (int64_t)H * Sq, p.lse_stride[1] = Sq, p.lse_stride[2] = 1;
        p.row_max = d_r;
        p.row_max_stride[0] = (int64_t)H * Sq, p.row_max_stride[1] = Sq, p.row_max_stride[2] = 1;
        p.B = B, p.Sq = Sq, p.Sk = Sk, p.H = H, p.D = D, p.dtype = c->dtype;
        p.scale = (float)(1.0 / sqrt((double)D));
        p.tau = c->tau, p.mode = c->mode, p.step = step, p.direction = c->dir;
        p.must_do = &md, p.n_must_do = 1;
        p.mask = d_mask;
        p.mask_stride[0] = (int64_t)H * nQ * W, p.mask_stride[1] = (int64_t)nQ * W, p.mask_stride[2] = W;
        p.BM = BM, p.BN = BN;
        p.ret_tiles_computed = (int64_t *)d_tiles;
        /* the single call */
        CUDA_OK(cudaMemcpy(d_mask, mask, rows * W * 4, cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(d_r, ninf, nL * 4, cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemset(d_tiles, 0, 8));
        ck_assert_int_eq(la_cuda_supported(&p, cc), 0);
        CUDA_OK(la_attn_fwd_cuda(&p, 0));
        unsigned long long tiles_single = 0, tiles_shards = 0;
        CUDA_OK(cudaDeviceSynchronize());
        CUDA_OK(cudaMemcpy(got, d_mask, rows * W * 4, cudaMemcpyDeviceToHost));
        CUDA_OK(cudaMemcpy(r_single, d_r, nL * 4, cudaMemcpyDeviceToHost));
        CUDA_OK(cudaMemcpy(&tiles_single, d_tiles, 8, cudaMemcpyDeviceToHost));
        /* the shards, in the visiting order, R carried */
        const bool desc = c->dir == LA_DIR_DESCENDING || (c->dir == LA_DIR_ALTERNATE && step % 2 == 0);
        CUDA_OK(cudaMemcpy(d_r, ninf, nL * 4, cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemset(d_tiles, 0, 8));
        for (int jj = 0; jj < P; jj++) {
            const int j = desc ? P - 1 - jj : jj;
            for (size_t rr = 0; rr < rows; rr++) {
                uint32_t x = 0;
                for (int n = 0; n < nkl; n++) x |= ((mask[rr * W + (j * nkl + n) / 32] >> ((j * nkl + n) % 32)) & 1u) << n;
                shard[rr] = x;
            }
            CUDA_OK(cudaMemcpy(d_shard + (size_t)j * rows, shard, rows * 4, cudaMemcpyHostToDevice));
            la_attn_params sp = p;
            sp.k = (const char *)k.dev + (size_t)j * L * k.stride[1] * 2;
            sp.v = (const char *)v.dev + (size_t)j * L * v.stride[1] * 2;
            sp.Sk = L;
            sp.n_must_do = j == 0;
            sp.mask = d_shard + (size_t)j * rows;
            sp.mask_stride[0] = (int64_t)H * nQ, sp.mask_stride[1] = nQ, sp.mask_stride[2] = 1;
            ck_assert_int_eq(la_cuda_supported(&sp, cc), 0);
            CUDA_OK(la_attn_fwd_cuda(&sp, 0));
        }
        CUDA_OK(cudaDeviceSynchronize());
        CUDA_OK(cudaMemcpy(r_shards, d_r, nL * 4, cudaMemcpyDeviceToHost));
        CUDA_OK(cudaMemcpy(&tiles_shards, d_tiles, 8, cudaMemcpyDeviceToHost));
        ck_assert_msg(tiles_shards == tiles_single, "%s step %d: shards computed %llu tiles, the single call %llu",
                      c->name, step, tiles_shards, tiles_single);
        ck_assert_msg(memcmp(r_shards, r_single, nL * 4) == 0, "%s step %d: carried R differs from the single call's",
                      c->name, step);
        int differ = 0;
        for (int j = 0; j < P; j++) {
            CUDA_OK(cudaMemcpy(shard, d_shard + (size_t)j * rows, rows * 4, cudaMemcpyDeviceToHost));
            for (size_t rr = 0; rr < rows; rr++)
                for (int n = 0; n < nkl; n++) {
                    const int gn = j * nkl + n;
                    differ += (int)((got[rr * W + gn / 32] >> (gn % 32)) & 1u) != (int)((shard[rr] >> n) & 1u);
                }
        }
        ck_assert_msg(differ == 0, "%s step %d: %d mask bits of the shard calls differ from the single call", c->name,
                      step, differ);
        memcpy(mask, got, rows * W * 4);
    }
    int64_t live = 0;
    for (size_t rr = 0; rr < rows; rr++)
        for (int w = 0; w < W; w++) live += __builtin_popcount(mask[rr * W + w]);
    printf("%s [%s, BM %d BN %d, %d shards]: shard calls = single call over %d steps, live fraction %.3f\n",
           c->name, la_cuda_variant_name(D, c->dtype, cc), BM, BN, P, c->steps, (double)live / ((double)rows * nK));
    ck_assert_msg(live < (int64_t)rows * nK, "%s: nothing skipped, the equality proves little", c->name);
    tens_free(&q), tens_free(&k), tens_free(&v), tens_free(&o);
    free(mask), free(got), free(shard), free(r_single), free(r_shards), free(ninf);
    cudaFree(d_mask), cudaFree(d_shard), cudaFree(d_r), cudaFree(d_lse), cudaFree(d_tiles);
}

static void need_gpu(void) {
    int n = 0;
    ck_assert_msg(cudaGetDeviceCount(&n) == cudaSuccess && n > 0, "no CUDA device");
}

/* ---- cases -------------------------------------------------------------------------------- */
static const la_dtype kDtypes[2] = {LA_DTYPE_BF16, LA_DTYPE_F16};
static const int kDims[2] = {64, 128};

/* tau = -inf, dense and skip modes: dense attention, masks stay all ones. Loop over D x dtype. */
START_TEST(test_dense_exact) {
    need_gpu();
    const int D = kDims[_i / 2];
    const la_dtype dt = kDtypes[_i % 2];
    seed_from_clock("dense_exact");
    cfg c = {.name = "dense", .B = 2, .Sq = 333, .Sk = 301, .H = 3, .D = D, .dtype = dt,
             .mode = LA_MODE_DENSE, .dir = LA_DIR_ALTERNATE, .tau = -INFINITY, .steps = 1,
             .lse = true, .peak = 0.0};
    run_case(&c);
    c.name = "dense_must_skip"; /* must-skip-only tiles are not computed in mode DENSE either */
    c.must_skip[0] = (la_range){0, 130}, c.n_must_skip = 1;
    run_case(&c);
    c.n_must_skip = 0;
    c.name = "skip_tau_-inf";
    c.mode = LA_MODE_SKIP;
    c.steps = 2;
    c.Sq = 129, c.Sk = 515, c.B = 1, c.H = 2;
    stats st = run_case(&c);
    ck_assert_double_eq(st.live_fraction, 1.0);
}
END_TEST

/* Multi-step skipping on drifting, peaked data: alternate direction, must-do and must-skip,
 * partial tiles, B > 1, H > 1, Sq != Sk. The peak is strong enough that the Hopper kernel's
 * larger tiles (a 192-row q-tile spans two query clusters) still skip: with the CPU reference,
 * live fraction 0.72-0.78 at 192x128, 0.64 at 128x128, 0.51 at 128x64 (0.6 gave 0.94-1.0 at
 * the Hopper tiles). */
START_TEST(test_skip_multistep) {
    need_gpu();
    const int D = kDims[_i / 2];
    const la_dtype dt = kDtypes[_i % 2];
    seed_from_clock("skip_multistep");
    cfg c = {.name = "skip", .B = 2, .Sq = 300, .Sk = 1100, .H = 2, .D = D, .dtype = dt,
             .mode = LA_MODE_SKIP, .dir = LA_DIR_ALTERNATE, .tau = -3.0f, .steps = 4,
             .lse = true, .drift = 0.05, .peak = 1.0,
             .must_do = {{0, 5}}, .n_must_do = 1, .must_skip = {{1050, 1100}, {700, 830}},
             .n_must_skip = 2};
    stats st = run_case(&c);
    ck_assert_msg(st.live_fraction < 0.95, "skipping never engaged (live %.3f)", st.live_fraction);
    c.name = "skip_tau_-8_desc";
    c.tau = -8.0f, c.dir = LA_DIR_DESCENDING, c.n_must_skip = 0, c.steps = 3;
    run_case(&c);
}
END_TEST

/* Observe mode (new = old & keep, every tile computed), dry run (decisions buffer, store
 * untouched), random input masks, ascending direction, strided [B, H, S, D+8] layout. */
START_TEST(test_observe_dryrun_strided) {
    need_gpu();
    const int D = kDims[_i / 2];
    const la_dtype dt = kDtypes[_i % 2];
    seed_from_clock("observe_dryrun_strided");
    cfg c = {.name = "observe_strided", .B = 2, .Sq = 200, .Sk = 700, .H = 3, .D = D, .dtype = dt,
             .layout = 1, .mode = LA_MODE_OBSERVE, .dir = LA_DIR_ASCENDING, .tau = -2.0f,
             .steps = 3, .lse = true, .drift = 0.05, .peak = 0.6, .mask_init = 1};
    run_case(&c);
    c.name = "skip_dryrun_random_mask";
    c.mode = LA_MODE_SKIP, c.dry_run = true, c.dir = LA_DIR_ALTERNATE, c.lse = false;
    c.must_do[0] = (la_range){650, 700}, c.n_must_do = 1;
    run_case(&c);
}
END_TEST

/* tau = +inf over two calls: each row keeps its first visited tile plus must-do tiles; the
 * second call computes exactly those. Empty rows (all-zero mask): O = 0, LSE = -inf. */
START_TEST(test_extremes) {
    need_gpu();
    const int D = kDims[_i / 2];
    const la_dtype dt = kDtypes[_i % 2];
    seed_from_clock("extremes");
    cfg c = {.name = "tau_+inf", .B = 1, .Sq = 250, .Sk = 900, .H = 2, .D = D, .dtype = dt,
             .mode = LA_MODE_SKIP, .dir = LA_DIR_DESCENDING, .tau = INFINITY, .steps = 2,
             .lse = true, .peak = 0.3, .must_do = {{300, 301}}, .n_must_do = 1};
    /* The float64 model keeps, after the first call, exactly the first visited tile of each
     * row (the last one, descending) and the must-do tile 300/BN; run_case checks the second
     * call's mask and tile count against it. */
    stats st = run_case(&c);
    int32_t BM, BN;
    la_cuda_tile_sizes(D, dt, device_cc(), &BM, &BN);
    const int nK = la_tiles(c.Sk, BN); /* step 0: nK tiles per row; step 1: 2 (last, 300/BN) */
    ck_assert_double_eq_tol(st.live_fraction, (nK + 2.0) / (2.0 * nK), 1e-9);
    cfg c2 = c;
    c2.name = "empty_rows";
    c2.mask_init = 2, c2.steps = 1, c2.n_must_do = 0;
    run_case(&c2);
}
END_TEST

/* Larger rows: many k-tiles per row, so that the Hopper kernel's shared-memory ring wraps many
 * times with skipped tiles in between (and several q-tiles per head). */
START_TEST(test_long_rows) {
    need_gpu();
    const int D = kDims[_i / 2];
    const la_dtype dt = kDtypes[_i % 2];
    seed_from_clock("long_rows");
    cfg c = {.name = "long_skip", .B = 1, .Sq = 700, .Sk = 3000, .H = 2, .D = D, .dtype = dt,
             .mode = LA_MODE_SKIP, .dir = LA_DIR_ALTERNATE, .tau = -4.0f, .steps = 3,
             .lse = true, .drift = 0.05, .peak = 0.6, .mask_init = 1,
             .must_do = {{0, 40}}, .n_must_do = 1};
    run_case(&c);
}
END_TEST

/* More q-tiles than the H200 has multiprocessors (132): the Hopper family's persistent CTAs
 * take several rows each, in SKIP mode by a counter, heaviest rows first; a third of the rows
 * empty, a third full, a third random, so that a CTA runs through empty rows back to back and
 * the rows' lengths differ as much as they can. Then mode DENSE on as many rows. run_case
 * checks the persistent grid against one CTA per q-tile, bit for bit. */
START_TEST(test_many_rows) {
    need_gpu();
    const int D = kDims[_i / 2];
    const la_dtype dt = kDtypes[_i % 2];
    seed_from_clock("many_rows");
    cfg c = {.name = "many_rows_skip", .B = 2, .Sq = 800, .Sk = 450, .H = 20, .D = D, .dtype = dt,
             .mode = LA_MODE_SKIP, .dir = LA_DIR_ALTERNATE, .tau = -3.0f, .steps = 2,
             .lse = true, .drift = 0.05, .peak = 0.6, .mask_init = 3,
             .must_skip = {{440, 450}}, .n_must_skip = 1};
    run_case(&c);
    c.name = "many_rows_dense";
    c.mode = LA_MODE_DENSE, c.tau = -INFINITY, c.steps = 1, c.mask_init = 0, c.n_must_skip = 0;
    c.B = 1, c.H = 40, c.Sk = 300; /* 200 (D64) and 280 (D128) q-tiles, as above */
    run_case(&c);
}
END_TEST

/* Small shapes for compute-sanitizer (memcheck, racecheck): CK_RUN_CASE=sanitize. Partial
 * q- and k-tiles, must-do and must-skip, skip and dense modes, both directions, and a
 * persistent grid with several rows per CTA. */
START_TEST(test_sanitize_small) {
    need_gpu();
    const int D = kDims[_i / 2];
    const la_dtype dt = kDtypes[_i % 2];
    seed_from_clock("sanitize_small");
    cfg c = {.name = "small_skip", .B = 1, .Sq = 200, .Sk = 700, .H = 2, .D = D, .dtype = dt,
             .mode = LA_MODE_SKIP, .dir = LA_DIR_ALTERNATE, .tau = -3.0f, .steps = 2,
             .lse = true, .drift = 0.05, .peak = 0.6, .mask_init = 1,
             .must_do = {{0, 5}}, .n_must_do = 1, .must_skip = {{650, 700}}, .n_must_skip = 1};
    run_case(&c);
    c.name = "small_dense";
    c.mode = LA_MODE_DENSE, c.tau = -INFINITY, c.steps = 1, c.Sq = 70, c.Sk = 130;
    c.n_must_do = 0, c.n_must_skip = 0;
    run_case(&c);
    /* More q-tiles than the H200's 132 multiprocessors (144 at D64, 192 at D128): persistent
     * CTAs take several rows each, empty ones among them (as test_many_rows, smaller). */
    c.name = "small_persistent";
    c.mode = LA_MODE_SKIP, c.tau = -3.0f, c.steps = 1, c.B = 1, c.H = 48, c.Sq = 400, c.Sk = 200;
    c.mask_init = 3;
    run_case(&c);
}
END_TEST

/* Carried row maxima: R scattered around the rows' true maxima (some NaN, some -inf) changes
 * the votes as the CPU reference and the float64 model say, comes back as max(R, m), and leaves
 * O and LSE bit for bit as without R; skip, observe, dense and dry runs, partial tiles, both
 * layouts. Then shard calls with R carried against the single call (run_shards_case). */
START_TEST(test_carried_row_max) {
    need_gpu();
    const int D = kDims[_i / 2];
    const la_dtype dt = kDtypes[_i % 2];
    seed_from_clock("carried_row_max");
    cfg c = {.name = "carry_skip", .B = 2, .Sq = 300, .Sk = 1100, .H = 2, .D = D, .dtype = dt,
             .mode = LA_MODE_SKIP, .dir = LA_DIR_ALTERNATE, .tau = -3.0f, .steps = 3,
             .lse = true, .drift = 0.05, .peak = 1.0, .carry = true,
             .must_do = {{0, 5}}, .n_must_do = 1, .must_skip = {{1050, 1100}}, .n_must_skip = 1};
    run_case(&c);
    c.name = "carry_observe_strided";
    c.mode = LA_MODE_OBSERVE, c.layout = 1, c.mask_init = 1, c.n_must_skip = 0, c.steps = 2;
    run_case(&c);
    c.name = "carry_dense";
    c.mode = LA_MODE_DENSE, c.layout = 0, c.mask_init = 0, c.tau = -INFINITY, c.steps = 1;
    run_case(&c);
    c.name = "carry_dryrun";
    c.mode = LA_MODE_SKIP, c.dry_run = true, c.tau = -2.0f, c.mask_init = 1, c.lse = false;
    run_case(&c);
    cfg r = {.name = "shards", .B = 2, .Sq = 333, .H = 2, .D = D, .dtype = dt, .mode = LA_MODE_SKIP,
             .dir = LA_DIR_ALTERNATE, .tau = -3.0f, .steps = 4, .drift = 0.05, .peak = 1.0};
    run_shards_case(&r, 4);
    r.name = "shards_observe";
    r.mode = LA_MODE_OBSERVE, r.steps = 2;
    run_shards_case(&r, 3);
}
END_TEST

START_TEST(test_supported) {
    int32_t bm = 0, bn = 0;
    /* The portable family below compute capability 9.0 (and on 8.x), its tile sizes fixed. */
    ck_assert_int_eq(la_cuda_tile_sizes(128, LA_DTYPE_BF16, 80, &bm, &bn), 0);
    ck_assert_int_eq(bm, 128);
    ck_assert_int_eq(bn, 64);
    ck_assert_str_eq(la_cuda_variant_name(128, LA_DTYPE_BF16, 80), "sm80_hd128_bf16");
    ck_assert_str_eq(la_cuda_variant_name(64, LA_DTYPE_F16, 89), "sm80_hd64_f16");
    ck_assert_int_eq(la_cuda_tile_sizes(64, LA_DTYPE_F16, 80, &bm, &bn), 0);
    ck_assert_int_eq(la_cuda_tile_sizes(96, LA_DTYPE_BF16, 90, &bm, &bn), LA_ENOTSUP);
    ck_assert_int_eq(la_cuda_tile_sizes(128, LA_DTYPE_F32, 90, &bm, &bn), LA_ENOTSUP);
    ck_assert_int_eq(la_cuda_tile_sizes(128, LA_DTYPE_BF16, 75, &bm, &bn), LA_ENOTSUP);
    ck_assert_ptr_null(la_cuda_variant_name(128, LA_DTYPE_BF16, 75));
    /* sm_90a code never runs past 9.0: sm_100 and later get the portable family. */
    ck_assert_str_eq(la_cuda_variant_name(128, LA_DTYPE_BF16, 100), "sm80_hd128_bf16");
    ck_assert_str_eq(la_cuda_variant_name(64, LA_DTYPE_BF16, 120), "sm80_hd64_bf16");
    /* On 9.0: the Hopper family when it was built (and LA_CUDA_PORTABLE is unset), with tiles
     * of whole warpgroups; the portable one otherwise. */
    const int dims[2] = {64, 128};
    const la_dtype dts[2] = {LA_DTYPE_BF16, LA_DTYPE_F16};
    for (int i = 0; i < 4; i++) {
        const char *name = la_cuda_variant_name(dims[i / 2], dts[i % 2], 90);
        ck_assert_ptr_nonnull(name);
        ck_assert_int_eq(la_cuda_tile_sizes(dims[i / 2], dts[i % 2], 90, &bm, &bn), 0);
        const char *portable = getenv("LA_CUDA_PORTABLE");
        if (portable && portable[0] && strcmp(portable, "0") != 0)
            ck_assert_msg(strncmp(name, "sm80_", 5) == 0, "LA_CUDA_PORTABLE set, %s selected", name);
        if (strncmp(name, "sm90_", 5) == 0)
            ck_assert_msg(bm % 64 == 0 && bn % 16 == 0, "%s: BM %d BN %d", name, bm, bn);
        printf("cc 9.0, head dim %d %s: %s, BM %d BN %d\n", dims[i / 2], i % 2 ? "f16" : "bf16", name,
               bm, bn);
    }
    /* Pointer values only: la_cuda_supported never dereferences the tensors. */
    static char buf[1 << 17] __attribute__((aligned(16)));
    la_cuda_tile_sizes(128, LA_DTYPE_BF16, 90, &bm, &bn);
    la_attn_params p = {0};
    p.q = buf, p.k = buf, p.v = buf, p.o = buf + 65536;
    p.B = 1, p.Sq = 16, p.Sk = 16, p.H = 8, p.D = 128, p.dtype = LA_DTYPE_BF16;
    const int64_t st[4] = {16 * 8 * 128, 8 * 128, 128, 1};
    memcpy(p.q_stride, st, 32), memcpy(p.k_stride, st, 32), memcpy(p.v_stride, st, 32);
    memcpy(p.o_stride, st, 32);
    p.scale = 0.088f, p.tau = -3, p.mode = LA_MODE_DENSE, p.BM = bm, p.BN = bn;
    ck_assert_int_eq(la_cuda_supported(&p, 90), 0);
    p.BN = 32;
    ck_assert_int_eq(la_cuda_supported(&p, 90), LA_EINVAL);
    p.BN = bn;
    p.k_stride[1] = 8 * 128 + 4; /* s stride not a multiple of 8 elements */
    ck_assert_int_eq(la_cuda_supported(&p, 90), LA_ENOTSUP);
    p.k_stride[1] = 8 * 128;
    p.k = buf + 2; /* misaligned */
    ck_assert_int_eq(la_cuda_supported(&p, 90), LA_ENOTSUP);
    p.k = buf;
    p.mode = LA_MODE_SKIP; /* needs a mask */
    ck_assert_int_eq(la_cuda_supported(&p, 90), LA_EINVAL);
}
END_TEST

static Suite *kernel_suite(void) {
    Suite *s = suite_create("gpu_kernel");
    TCase *tc = tcase_create("supported");
    tcase_add_test(tc, test_supported);
    suite_add_tcase(s, tc);
    tc = tu_gpu_tcase(s, "against_reference", 300);
    tu_gpu_loop_test(tc, test_dense_exact, 0, 4);
    tu_gpu_loop_test(tc, test_skip_multistep, 0, 4);
    tu_gpu_loop_test(tc, test_observe_dryrun_strided, 0, 4);
    tu_gpu_loop_test(tc, test_extremes, 0, 4);
    tu_gpu_loop_test(tc, test_long_rows, 0, 4);
    tu_gpu_loop_test(tc, test_many_rows, 0, 4);
    tu_gpu_loop_test(tc, test_carried_row_max, 0, 4);
    tc = tu_gpu_tcase(s, "sanitize", 600);
    tu_gpu_loop_test(tc, test_sanitize_small, 0, 4);
    return s;
}

int main(void) { return tu_run(kernel_suite()); }
#endif /* LA_HAVE_CUDA */
