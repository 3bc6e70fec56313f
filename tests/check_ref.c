/*
 * check_ref.c — the CPU reference (kernels/ref.c) against SKIP-SEMANTICS.md: outputs against an
 * independent float64 attention over exactly the tiles that should be computed, mask decisions
 * against votes re-derived here in double, and every error of la_attn_validate.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"
#include "testutil_proc.h"

#define LOG2E 1.4426950408889634
/* A vote is a tie when fp32 rounding could put it on either side of tau: each fp32 dot product
 * of D terms is within GAMMA * sum |q_d k_d| of the exact one (the classic n*u bound, with room
 * for the widening and the max), and the fp32 product by scale*log2(e) adds a relative 2^-22. */
#define GAMMA(D) (((D) + 4) * 0x1p-24)

static double tol_of(la_dtype dt) { return dt == LA_DTYPE_F32 ? 1e-5 : 1e-2; }

static int32_t nq_of(const la_attn_params *p) { return la_tiles(p->Sq, p->BM); }
static int32_t nk_of(const la_attn_params *p) { return la_tiles(p->Sk, p->BN); }
static int32_t words_of(const la_attn_params *p) { return la_mask_words(nk_of(p)); }

static const uint32_t *mrow(const la_attn_params *p, const uint32_t *mask, int b, int h, int m)
{
    return mask + b * p->mask_stride[0] + h * p->mask_stride[1] + m * p->mask_stride[2];
}

static int getbit(const uint32_t *row, int n) { return (row[n / 32] >> (n % 32)) & 1; }

/* ---- independent re-derivation of what one call must do -------------------------------- */

/* Tile flags key by key, without la_tile_flags: md[n], so[n] for n < nK. */
static void flags_bruteforce(const la_attn_params *p, uint8_t *md, uint8_t *so)
{
    for (int n = 0; n < nk_of(p); n++) {
        int any_do = 0, all_skip = 1;
        for (int64_t j = (int64_t)n * p->BN; j < (int64_t)(n + 1) * p->BN && j < p->Sk; j++) {
            int in_do = 0, in_skip = 0;
            for (int r = 0; r < p->n_must_do; r++)
                in_do |= p->must_do[r].start <= j && j < p->must_do[r].end;
            for (int r = 0; r < p->n_must_skip; r++)
                in_skip |= p->must_skip[r].start <= j && j < p->must_skip[r].end;
            any_do |= in_do;
            all_skip &= in_skip;
        }
        md[n] = (uint8_t)any_do;
        so[n] = (uint8_t)(all_skip && !any_do);
    }
}

static double dot64(const la_attn_params *p, int b, int h, int i, int j, double *ret_abs)
{
    double s = 0, a = 0;
    for (int d = 0; d < p->D; d++) {
        double x = tu_get(p->q, p->dtype,
                          b * p->q_stride[0] + i * p->q_stride[1] + h * p->q_stride[2] +
                              d * p->q_stride[3]) *
                   tu_get(p->k, p->dtype,
                          b * p->k_stride[0] + j * p->k_stride[1] + h * p->k_stride[2] +
                              d * p->k_stride[3]);
        s += x;
        a += fabs(x);
    }
    *ret_abs = a;
    return s;
}

typedef struct expect {
    uint8_t *visit;   /* [B, H, nQ, nK]: computed in this call */
    uint8_t *keep_lo; /* keep(n) with ties voting skip */
    uint8_t *keep_hi; /* keep(n) with ties voting keep */
    uint8_t *keep_ex; /* keep(n) as float64 decides it, ties and all */
    int64_t n_visit;
    int64_t n_tie_votes;
    /* With p->row_max: [B, H, Sq] the row maxima it must hold after the call, max(R, scores of
     * the visited tiles) in float64, and their fp32 error bound. */
    double *rmax, *rmax_err;
} expect;

/* Element (b, h, i) of p->row_max as the call reads it: NaN carries nothing (-inf). */
static double row_max_in(const la_attn_params *p, int b, int h, int i)
{
    float x = p->row_max[b * p->row_max_stride[0] + h * p->row_max_stride[1] +
                         i * p->row_max_stride[2]];
    return x == x ? (double)x : -INFINITY;
}

static int ascending_of(const la_attn_params *p)
{
    if (p->direction == LA_DIR_ASCENDING)
        return 1;
    if (p->direction == LA_DIR_DESCENDING)
        return 0;
    return p->step % 2 != 0;
}

/* What the call p must compute and decide, given the mask before the call (old). */
static expect expect_call(const la_attn_params *p, const uint32_t *old)
{
    const int nq = nq_of(p), nk = nk_of(p);
    size_t n = (size_t)p->B * p->H * nq * nk;
    expect e = {calloc(n, 1), calloc(n, 1), calloc(n, 1), calloc(n, 1), 0, 0, NULL, NULL};
    size_t nr = (size_t)p->B * p->H * p->Sq;
    if (p->row_max != NULL) {
        e.rmax = malloc(nr * sizeof(double));
        e.rmax_err = calloc(nr, sizeof(double));
        ck_assert(e.rmax && e.rmax_err);
    }
    uint8_t *md = calloc((size_t)nk, 1), *so = calloc((size_t)nk, 1);
    double *run = malloc(sizeof(double) * (size_t)p->BM);     /* running max per row */
    double *run_err = malloc(sizeof(double) * (size_t)p->BM); /* its fp32 error bound */
    ck_assert(e.visit && e.keep_lo && e.keep_hi && e.keep_ex && md && so && run && run_err);
    flags_bruteforce(p, md, so);
    const double c = p->scale * LOG2E;
    for (int b = 0; b < p->B; b++)
        for (int h = 0; h < p->H; h++)
            for (int m = 0; m < nq; m++) {
                size_t base = (((size_t)b * p->H + h) * nq + m) * nk;
                /* The votes' reference starts at the carried maximum (exact: no error). */
                for (int i = 0; i < p->BM; i++) {
                    int row = m * p->BM + i;
                    run[i] = p->row_max != NULL && row < p->Sq ? row_max_in(p, b, h, row)
                                                               : -INFINITY;
                    run_err[i] = 0;
                }
                for (int k = 0; k < nk; k++) {
                    int t = ascending_of(p) ? k : nk - 1 - k;
                    int live = p->mode != LA_MODE_SKIP || getbit(mrow(p, old, b, h, m), t) || md[t];
                    if (!live || so[t])
                        continue;
                    e.visit[base + t] = 1;
                    e.n_visit++;
                    int lo = md[t], hi = md[t], ex = md[t];
                    for (int i = 0; i < p->BM && m * p->BM + i < p->Sq; i++) {
                        double mx = -INFINITY, err = 0;
                        for (int j = t * p->BN; j < (t + 1) * p->BN && j < p->Sk; j++) {
                            double a, s = dot64(p, b, h, m * p->BM + i, j, &a);
                            mx = s > mx ? s : mx;
                            err = fmax(err, GAMMA(p->D) * a);
                        }
                        if (run[i] == -INFINITY) {
                            lo = hi = ex = 1;
                        } else {
                            double x = (mx - run[i]) * c;
                            ex |= x > p->tau;
                            double win = (err + run_err[i]) * c + fabs(x) * 0x1p-22 + 1e-12;
                            if (isfinite(x) && fabs(x - p->tau) <= win) {
                                hi = 1;
                                e.n_tie_votes++;
                            } else if (x > p->tau) {
                                lo = hi = 1;
                            }
                        }
                        run[i] = mx > run[i] ? mx : run[i];
                        run_err[i] = fmax(run_err[i], err);
                    }
                    e.keep_lo[base + t] = (uint8_t)lo;
                    e.keep_hi[base + t] = (uint8_t)hi;
                    e.keep_ex[base + t] = (uint8_t)ex;
                }
                for (int i = 0; e.rmax && i < p->BM && m * p->BM + i < p->Sq; i++) {
                    size_t at = ((size_t)b * p->H + h) * p->Sq + (size_t)(m * p->BM + i);
                    e.rmax[at] = run[i];
                    e.rmax_err[at] = run_err[i];
                }
            }
    free(md);
    free(so);
    free(run);
    free(run_err);
    return e;
}

static void expect_free(expect *e)
{
    free(e->rmax);
    free(e->rmax_err);
    free(e->visit);
    free(e->keep_lo);
    free(e->keep_hi);
    free(e->keep_ex);
}

/* Checks the new mask against e and the old mask; returns the number of tie tiles (a vote
 * within fp32 rounding of tau: either decision is accepted). Bits past nK must be 0. */
static int check_mask(const la_attn_params *p, const expect *e, const uint32_t *old,
                      const uint32_t *nw)
{
    const int nq = nq_of(p), nk = nk_of(p), words = words_of(p);
    int ties = 0, differ = 0;
    for (int b = 0; b < p->B; b++)
        for (int h = 0; h < p->H; h++)
            for (int m = 0; m < nq; m++) {
                const uint32_t *o = mrow(p, old, b, h, m), *r = mrow(p, nw, b, h, m);
                size_t base = (((size_t)b * p->H + h) * nq + m) * nk;
                for (int n = 0; n < nk; n++) {
                    int got = getbit(r, n), ob = getbit(o, n);
                    if (!e->visit[base + n]) {
                        ck_assert_msg(got == ob, "b%d h%d m%d n%d: unvisited bit %d, was %d", b, h,
                                      m, n, got, ob);
                        continue;
                    }
                    int lo = e->keep_lo[base + n], hi = e->keep_hi[base + n];
                    int ex = e->keep_ex[base + n];
                    if (p->mode == LA_MODE_OBSERVE) {
                        lo &= ob;
                        hi &= ob;
                        ex &= ob;
                    }
                    if (lo != hi) {
                        ties++;
                        differ += got != ex;
                        continue;
                    }
                    ck_assert_msg(got == lo, "b%d h%d m%d n%d: bit %d, expected %d (mode %d)", b, h,
                                  m, n, got, lo, p->mode);
                }
                if (nk % 32)
                    ck_assert_msg((r[words - 1] >> (nk % 32)) == 0, "bits past nK set: %08x",
                                  r[words - 1]);
            }
    /* Within the window the fp32 decision may differ from the float64 one, but the window is a
     * worst-case bound and real rounding is far smaller: many differences would mean a real
     * disagreement hiding in it. */
    ck_assert_msg(differ <= 1 + e->n_visit / 100,
                  "%d of %d tie tiles decided unlike float64 (%lld visited)", differ, ties,
                  (long long)e->n_visit);
    if (differ > 0)
        fprintf(stderr,
                "note: %d tile decision(s) differ from float64 within fp32 rounding of tau"
                " (%d in the window, %lld visited)\n",
                differ, ties, (long long)e->n_visit);
    return ties;
}

/* Output and LSE of p against the float64 attention over e's visited tiles. */
static void check_output(const la_attn_params *p, const expect *e, double tol)
{
    size_t no = (size_t)p->B * p->Sq * p->H * p->D, nl = (size_t)p->B * p->H * p->Sq;
    double *ro = malloc(no * 8), *go = malloc(no * 8), *rl = malloc(nl * 8), *gl = malloc(nl * 8);
    ck_assert(ro && go && rl && gl);
    naive_attn_f64(p, e ? e->visit : NULL, ro, rl);
    tu_o_f64(p, go);
    double err = tu_rel_l2(ro, go, (int64_t)no);
    ck_assert_msg(err <= tol, "O rel L2 %.3g > %.3g (seed %llu)", err, tol,
                  (unsigned long long)tu_seed());
    if (p->lse != NULL) {
        for (int b = 0; b < p->B; b++)
            for (int h = 0; h < p->H; h++)
                for (int i = 0; i < p->Sq; i++)
                    gl[((size_t)b * p->H + h) * p->Sq + i] =
                        p->lse[b * p->lse_stride[0] + h * p->lse_stride[1] + i * p->lse_stride[2]];
        /* LSE is a log: compare absolute differences, relative to 1 + |lse| */
        for (size_t i = 0; i < nl; i++) {
            if (rl[i] == -INFINITY) {
                ck_assert_msg(gl[i] == -INFINITY, "LSE[%zu] = %g, expected -inf", i, gl[i]);
                continue;
            }
            double d = fabs(gl[i] - rl[i]) / (1 + fabs(rl[i]));
            ck_assert_msg(d <= tol, "LSE[%zu] = %.9g, expected %.9g", i, gl[i], rl[i]);
        }
    }
    free(ro);
    free(go);
    free(rl);
    free(gl);
}

/* p->row_max after the call against max(R, the visited tiles' scores) in float64. */
static void check_row_max(const la_attn_params *p, const expect *e)
{
    for (int b = 0; b < p->B; b++)
        for (int h = 0; h < p->H; h++)
            for (int i = 0; i < p->Sq; i++) {
                size_t at = ((size_t)b * p->H + h) * p->Sq + (size_t)i;
                double got = p->row_max[b * p->row_max_stride[0] + h * p->row_max_stride[1] +
                                        i * p->row_max_stride[2]];
                double want = e->rmax[at];
                if (isinf(want)) {
                    ck_assert_msg(got == want, "row_max[%d, %d, %d] = %g, expected %g", b, h, i,
                                  got, want);
                    continue;
                }
                ck_assert_msg(fabs(got - want) <= e->rmax_err[at] + 1e-6 * fabs(want),
                              "row_max[%d, %d, %d] = %.9g, expected %.9g (+- %.3g)", b, h, i, got,
                              want, e->rmax_err[at]);
            }
}

static tu_problem *mk(uint64_t salt, int B, int Sq, int Sk, int H, int D, la_dtype dt, int BM,
                      int BN, double amp)
{
    tu_rng r;
    tu_rng_init(&r, salt);
    tu_problem *t = tu_problem_new(&r, B, Sq, Sk, H, D, dt, BM, BN, amp);
    ck_assert(t != NULL);
    return t;
}

static uint32_t *copy_mask(const tu_problem *t)
{
    uint32_t *m = malloc(t->mask_words * 4);
    ck_assert(m != NULL);
    memcpy(m, t->mask, t->mask_words * 4);
    return m;
}

/* One call: runs p, checks output against the tiles it must compute, the mask against the
 * re-derived decisions and the tile count; returns the number of tie tiles. */
static int call_and_check(tu_problem *t, double tol)
{
    la_attn_params *p = &t->p;
    uint32_t *old = copy_mask(t);
    expect e = expect_call(p, old);
    int64_t tiles = -1;
    p->ret_tiles_computed = &tiles;
    int rc = la_ref_attn_fwd(p);
    p->ret_tiles_computed = NULL;
    ck_assert_int_eq(rc, 0);
    ck_assert_int_eq(tiles, e.n_visit);
    check_output(p, &e, tol);
    if (p->row_max != NULL)
        check_row_max(p, &e);
    int ties = 0;
    if (p->mode == LA_MODE_DENSE)
        ck_assert_msg(memcmp(old, t->mask, t->mask_words * 4) == 0, "dense changed the mask");
    else
        ties = check_mask(p, &e, old, p->decisions ? p->decisions : t->mask);
    expect_free(&e);
    free(old);
    return ties;
}

static void check_all_ones(const tu_problem *t)
{
    int64_t all = (int64_t)t->p.B * t->p.H * nq_of(&t->p) * nk_of(&t->p);
    ck_assert_int_eq(tu_mask_popcount(t, t->mask), all);
}

/* ---- check 1: tau = -inf equals dense -------------------------------------------------- */

static void tau_neg_inf(la_dtype dt, la_mode mode, int D, uint64_t salt)
{
    tu_problem *t = mk(salt, 2, 100, 77, 3, D, dt, 16, 24, 1.0);
    t->p.mode = mode;
    t->p.threads = 2;
    for (int step = 0; step < 2; step++) {
        t->p.step = step;
        int64_t tiles = 0;
        t->p.ret_tiles_computed = &tiles;
        ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
        t->p.ret_tiles_computed = NULL;
        ck_assert_int_eq(tiles, (int64_t)2 * 3 * nq_of(&t->p) * nk_of(&t->p));
        check_output(&t->p, NULL, tol_of(dt));
        check_all_ones(t);
    }
    tu_problem_free(t);
}

START_TEST(dense_f32) { tau_neg_inf(LA_DTYPE_F32, LA_MODE_DENSE, 64, 1); }
END_TEST
START_TEST(skip_tau_neg_inf_f32) { tau_neg_inf(LA_DTYPE_F32, LA_MODE_SKIP, 64, 2); }
END_TEST
START_TEST(observe_tau_neg_inf_f32) { tau_neg_inf(LA_DTYPE_F32, LA_MODE_OBSERVE, 128, 3); }
END_TEST
START_TEST(skip_tau_neg_inf_bf16) { tau_neg_inf(LA_DTYPE_BF16, LA_MODE_SKIP, 64, 4); }
END_TEST
START_TEST(skip_tau_neg_inf_f16) { tau_neg_inf(LA_DTYPE_F16, LA_MODE_SKIP, 128, 5); }
END_TEST
START_TEST(head_dims)
{
    static const int dims[] = {64, 96, 128, 256};
    for (int i = 0; i < 4; i++) {
        tau_neg_inf(LA_DTYPE_F32, LA_MODE_SKIP, dims[i], 60 + (uint64_t)i);
        tau_neg_inf(LA_DTYPE_BF16, LA_MODE_DENSE, dims[i], 70 + (uint64_t)i);
    }
}
END_TEST

/* ---- check 2: tau = +inf over two calls ----------------------------------------------- */

static void tau_pos_inf(const la_range *md, int n_md)
{
    tu_problem *t = mk(10 + (uint64_t)n_md, 2, 90, 130, 2, 64, LA_DTYPE_F32, 32, 16, 1.0);
    la_attn_params *p = &t->p;
    p->mode = LA_MODE_SKIP;
    p->tau = INFINITY;
    p->must_do = md;
    p->n_must_do = n_md;
    uint8_t mdf[64] = {0}, so[64] = {0};
    flags_bruteforce(p, mdf, so);
    call_and_check(t, 1e-5); /* step 0: descending, the first visited tile is nK-1 */
    const int nk = nk_of(p);
    for (int b = 0; b < p->B; b++)
        for (int h = 0; h < p->H; h++)
            for (int m = 0; m < nq_of(p); m++)
                for (int n = 0; n < nk; n++)
                    ck_assert_int_eq(getbit(mrow(p, t->mask, b, h, m), n), n == nk - 1 || mdf[n]);
    p->step = 1; /* ascending; computes exactly the kept tiles */
    call_and_check(t, 1e-5);
    tu_problem_free(t);
}

START_TEST(tau_pos_inf_two_calls) { tau_pos_inf(NULL, 0); }
END_TEST
START_TEST(tau_pos_inf_must_do)
{
    la_range md[2] = {{5, 6}, {40, 70}};
    tau_pos_inf(md, 2);
}
END_TEST

/* Second call ascending with tau=+inf on a fresh mask keeps tile 0 (its first), not nK-1. */
START_TEST(tau_pos_inf_ascending_first)
{
    tu_problem *t = mk(12, 1, 40, 100, 2, 64, LA_DTYPE_BF16, 16, 32, 1.0);
    t->p.mode = LA_MODE_SKIP;
    t->p.tau = INFINITY;
    t->p.step = 3;
    call_and_check(t, 1e-2);
    for (int h = 0; h < 2; h++)
        for (int m = 0; m < nq_of(&t->p); m++)
            ck_assert_uint_eq(mrow(&t->p, t->mask, 0, h, m)[0], 1u);
    tu_problem_free(t);
}
END_TEST

/* ---- checks 3 and 4: monotone over drifting data; identical decisions ------------------ */

static void drift_run(la_dtype dt, int D, float tau, int calls, uint64_t salt, int *ret_ties)
{
    /* Q and K at 3x amplitude: peaked attention, so that tiles do get skipped. */
    tu_problem *t = mk(salt, 2, 150, 170, 2, D, dt, 32, 24, 3.0);
    t->p.mode = LA_MODE_SKIP;
    t->p.tau = tau;
    t->p.threads = 2;
    int64_t prev = tu_mask_popcount(t, t->mask);
    int ties = 0;
    for (int s = 0; s < calls; s++) {
        tu_problem_drift(t, s, 0.01);
        t->p.step = s;
        ties += call_and_check(t, tol_of(dt));
        int64_t now = tu_mask_popcount(t, t->mask);
        ck_assert_msg(now <= prev, "call %d: live tiles grew %lld -> %lld", s, (long long)prev,
                      (long long)now);
        prev = now;
    }
    /* the data must make something skip, or the test proves nothing */
    int64_t all = (int64_t)2 * 2 * nq_of(&t->p) * nk_of(&t->p);
    ck_assert_msg(prev < all, "nothing was skipped");
    if (getenv("LA_TEST_VERBOSE"))
        fprintf(stderr, "drift: %lld of %lld tiles live after %d calls\n", (long long)prev,
                (long long)all, calls);
    *ret_ties = ties;
    tu_problem_free(t);
}

START_TEST(monotone_10_calls_f32)
{
    int ties;
    drift_run(LA_DTYPE_F32, 64, -3.0f, 10, 20, &ties);
}
END_TEST
START_TEST(monotone_10_calls_bf16)
{
    int ties;
    drift_run(LA_DTYPE_BF16, 128, -4.0f, 10, 21, &ties);
}
END_TEST
START_TEST(decisions_identical_f16)
{
    int ties;
    drift_run(LA_DTYPE_F16, 64, -1.0f, 3, 22, &ties);
}
END_TEST

START_TEST(decisions_observe)
{
    tu_problem *t = mk(23, 1, 130, 200, 3, 64, LA_DTYPE_F32, 64, 32, 2.0);
    tu_rng r;
    tu_rng_init(&r, 230);
    for (size_t i = 0; i < t->mask_words; i++)
        t->mask[i] &= (uint32_t)tu_rng_u64(&r);
    t->p.mode = LA_MODE_OBSERVE;
    t->p.tau = -2.0f;
    call_and_check(t, 1e-5); /* observe visits every tile whatever the mask */
    tu_problem_free(t);
}
END_TEST

/* A partial last q-tile skips like any other: its missing rows do not vote. */
START_TEST(partial_qtile_rows_do_not_vote)
{
    /* Sq = BM + 1: the last q-tile has one real row. Its scores rise with the key index, so
     * visited descending, every later tile is far below the running max and is skipped. If the
     * 15 missing rows voted (as zero queries: all scores 0) they would keep every tile. */
    tu_problem *t = mk(24, 1, 17, 64, 1, 64, LA_DTYPE_F32, 16, 16, 1.0);
    float *q = t->q, *k = t->k;
    for (int i = 0; i < 17 * 64; i++)
        q[i] = i / 64 == 16 ? 1.0f : 0.01f;
    for (int j = 0; j < 64; j++)
        for (int d = 0; d < 64; d++)
            k[j * 64 + d] = (float)j * 0.05f;
    t->p.mode = LA_MODE_SKIP;
    t->p.tau = -4.0f;
    /* 3e-5, not 1e-5: sixteen of the 17 rows average 64 random values almost uniformly, and
     * for about 2% of seeds that mean is small enough for f32 rounding to reach 1.04e-5 of
     * its norm (measured over 300 seeds); the mask assertion below is this test's point. */
    call_and_check(t, 3e-5);
    ck_assert_uint_eq(mrow(&t->p, t->mask, 0, 0, 1)[0], 1u << 3);
    tu_problem_free(t);
}
END_TEST

/* ---- check 5 and shapes ---------------------------------------------------------------- */

START_TEST(shapes_partial_tiles)
{
    static const int shp[][6] = {/* B, Sq, Sk, H, BM, BN */
                                 {1, 1, 1, 1, 16, 16},  {3, 33, 65, 2, 16, 32},
                                 {2, 64, 31, 3, 64, 7}, {1, 100, 300, 1, 128, 176},
                                 {2, 129, 17, 2, 1, 1}, {1, 5, 257, 4, 3, 64}};
    for (int i = 0; i < 6; i++) {
        const int *s = shp[i];
        tu_problem *t =
            mk(30 + (uint64_t)i, s[0], s[1], s[2], s[3], 64, LA_DTYPE_F32, s[4], s[5], 1.5);
        t->p.mode = LA_MODE_SKIP;
        t->p.tau = -6.0f;
        t->p.threads = 1 + i % 3;
        for (int step = 0; step < 3; step++) {
            t->p.step = step;
            call_and_check(t, 1e-5);
        }
        tu_problem_free(t);
    }
}
END_TEST

START_TEST(lse_values)
{
    /* Large-magnitude scores, where a LSE without the max shift would overflow. */
    tu_problem *t = mk(40, 2, 70, 90, 2, 96, LA_DTYPE_F32, 32, 32, 6.0);
    t->p.scale = 0.3f;
    call_and_check(t, 1e-5);
    for (int i = 0; i < 2 * 2 * 70; i++)
        ck_assert(isfinite(t->lse[i]));
    tu_problem_free(t);
}
END_TEST

START_TEST(lse_bf16_with_skips)
{
    tu_problem *t = mk(41, 1, 100, 160, 2, 128, LA_DTYPE_BF16, 32, 32, 2.0);
    t->p.mode = LA_MODE_SKIP;
    t->p.tau = -1.0f;
    for (int s = 0; s < 3; s++) {
        t->p.step = s;
        call_and_check(t, 1e-2);
    }
    tu_problem_free(t);
}
END_TEST

/* An LSE-only call (o NULL) computes what the full call does: the same LSE bits, the same
 * mask and tile count, and writes no O (the guardrail's samples, docs/SKIP-SEMANTICS.md). */
START_TEST(lse_only_call)
{
    tu_problem *t = mk(43, 2, 100, 160, 2, 64, LA_DTYPE_BF16, 32, 32, 2.0);
    t->p.mode = LA_MODE_SKIP;
    t->p.tau = -1.0f;
    const size_t nl = 2 * 2 * 100;
    uint32_t *m0 = copy_mask(t);
    float *lse_full = malloc(nl * sizeof(float));
    ck_assert(lse_full != NULL);
    int64_t tiles_full = 0, tiles = 0;
    t->p.ret_tiles_computed = &tiles_full;
    ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
    memcpy(lse_full, t->lse, nl * sizeof(float));
    uint32_t *m_full = copy_mask(t);
    memcpy(t->mask, m0, t->mask_words * 4);
    for (size_t i = 0; i < nl; i++)
        t->lse[i] = 12345.0f;
    void *o = t->p.o;
    t->p.o = NULL;
    t->p.ret_tiles_computed = &tiles;
    ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
    ck_assert(memcmp(t->lse, lse_full, nl * sizeof(float)) == 0);
    ck_assert(memcmp(t->mask, m_full, t->mask_words * 4) == 0);
    ck_assert_int_eq(tiles, tiles_full);
    ck_assert(tiles > 0 && memcmp(m_full, m0, t->mask_words * 4) != 0); /* it skipped */
    t->p.o = o;
    t->p.ret_tiles_computed = NULL;
    free(m0);
    free(m_full);
    free(lse_full);
    tu_problem_free(t);
}
END_TEST

/* ---- direction ------------------------------------------------------------------------ */

/* One query row, two k-tiles: tile 0 scores 0, tile 1 scores 10 (raw). Descending visits tile 1
 * first and drops tile 0 (0 - 10 is far below tau); ascending keeps both (tile 1 raises the max). */
static tu_problem *two_tile_case(void)
{
    tu_problem *t = mk(50, 1, 1, 32, 1, 64, LA_DTYPE_F32, 16, 16, 1.0);
    float *q = t->q, *k = t->k;
    for (int d = 0; d < 64; d++)
        q[d] = d == 0 ? 1.0f : 0.0f;
    for (int j = 0; j < 32; j++)
        for (int d = 0; d < 64; d++)
            k[j * 64 + d] = d == 0 ? (j < 16 ? 0.0f : 10.0f) : 0.5f;
    t->p.scale = 1.0f;
    t->p.mode = LA_MODE_SKIP;
    t->p.tau = -3.0f;
    return t;
}

START_TEST(direction_alternates)
{
    tu_problem *t = two_tile_case();
    t->p.step = 0; /* even: descending */
    call_and_check(t, 1e-5);
    ck_assert_uint_eq(t->mask[0], 2u);
    tu_mask_ones(t);
    t->p.step = 1; /* odd: ascending */
    call_and_check(t, 1e-5);
    ck_assert_uint_eq(t->mask[0], 3u);
    tu_mask_ones(t);
    t->p.step = 6;
    call_and_check(t, 1e-5);
    ck_assert_uint_eq(t->mask[0], 2u);
    tu_problem_free(t);
}
END_TEST

/* A tile whose maximum only equals the running max has (t - m) = 0 exactly: at tau = 0 it does
 * not vote keep (strictly greater), at tau just below 0 it does. */
START_TEST(vote_is_strict)
{
    tu_problem *t = two_tile_case();
    float *k = t->k;
    for (int j = 0; j < 32; j++)
        k[j * 64] = 10.0f; /* both tiles reach the same max */
    t->p.tau = 0.0f;
    ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
    ck_assert_uint_eq(t->mask[0], 2u);
    tu_mask_ones(t);
    t->p.tau = -0x1p-20f;
    ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
    ck_assert_uint_eq(t->mask[0], 3u);
    tu_problem_free(t);
}
END_TEST

START_TEST(direction_pinned)
{
    tu_problem *t = two_tile_case();
    t->p.direction = LA_DIR_ASCENDING;
    t->p.step = 0;
    call_and_check(t, 1e-5);
    ck_assert_uint_eq(t->mask[0], 3u);
    tu_mask_ones(t);
    t->p.direction = LA_DIR_DESCENDING;
    t->p.step = 1;
    call_and_check(t, 1e-5);
    ck_assert_uint_eq(t->mask[0], 2u);
    tu_problem_free(t);
}
END_TEST

/* ---- modes and dry run ------------------------------------------------------------------ */

START_TEST(observe_is_old_and_keep)
{
    tu_problem *t = mk(60, 2, 80, 150, 2, 64, LA_DTYPE_BF16, 16, 16, 2.0);
    t->p.mode = LA_MODE_OBSERVE;
    t->p.tau = -1.5f;
    uint32_t *keep = calloc(t->mask_words, 4);
    t->p.decisions = keep; /* all-ones old: the decisions are keep itself */
    ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
    t->p.decisions = NULL;
    check_all_ones(t);
    tu_rng r;
    tu_rng_init(&r, 600);
    uint32_t *old = calloc(t->mask_words, 4);
    for (size_t i = 0; i < t->mask_words; i++)
        old[i] = t->mask[i] = t->mask[i] & (uint32_t)tu_rng_u64(&r);
    ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
    int64_t kept = 0;
    for (size_t i = 0; i < t->mask_words; i++) {
        ck_assert_uint_eq(t->mask[i], old[i] & keep[i]);
        kept += __builtin_popcount(keep[i]);
    }
    ck_assert_int_lt(kept, tu_mask_popcount(t, old) + tu_mask_popcount(t, keep) + 1);
    check_output(&t->p, NULL, 1e-2); /* observe computed everything */
    free(keep);
    free(old);
    tu_problem_free(t);
}
END_TEST

START_TEST(dense_leaves_mask)
{
    tu_problem *t = mk(61, 1, 64, 64, 2, 64, LA_DTYPE_F32, 16, 16, 2.0);
    tu_rng r;
    tu_rng_init(&r, 610);
    for (size_t i = 0; i < t->mask_words; i++)
        t->mask[i] = (uint32_t)tu_rng_u64(&r) & 0xfu;
    uint32_t *old = copy_mask(t), *dec = malloc(t->mask_words * 4);
    memset(dec, 0xab, t->mask_words * 4);
    t->p.tau = INFINITY;
    t->p.decisions = dec;
    call_and_check(t, 1e-5); /* dense: every tile computed */
    ck_assert(memcmp(old, t->mask, t->mask_words * 4) == 0);
    for (size_t i = 0; i < t->mask_words; i++)
        ck_assert_uint_eq(dec[i], 0xababababu);
    /* and without any mask at all */
    t->p.mask = NULL;
    t->p.decisions = NULL;
    ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
    free(old);
    free(dec);
    tu_problem_free(t);
}
END_TEST

START_TEST(dry_run_writes_decisions)
{
    tu_problem *t = mk(62, 2, 70, 100, 2, 64, LA_DTYPE_F32, 16, 16, 2.0);
    t->p.mode = LA_MODE_SKIP;
    t->p.tau = -2.0f;
    t->p.step = 1;
    tu_rng r;
    tu_rng_init(&r, 620);
    for (size_t i = 0; i < t->mask_words; i++)
        t->mask[i] &= (uint32_t)tu_rng_u64(&r) | 0x11u;
    uint32_t *old = copy_mask(t), *dec = malloc(t->mask_words * 4);
    memset(dec, 0xcd, t->mask_words * 4);
    t->p.decisions = dec;
    call_and_check(t, 1e-5);
    ck_assert(memcmp(old, t->mask, t->mask_words * 4) == 0);
    /* the same call for real writes exactly the decisions into the mask */
    t->p.decisions = NULL;
    ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
    ck_assert(memcmp(dec, t->mask, t->mask_words * 4) == 0);
    free(old);
    free(dec);
    tu_problem_free(t);
}
END_TEST

/* ---- carried row maxima (SKIP-SEMANTICS "Carried row maxima") ----------------------------- */

/* R [B, H, Sq] contiguous for p. */
static float *row_max_new(const la_attn_params *p, float fill)
{
    size_t n = (size_t)p->B * p->H * p->Sq;
    float *r = malloc(n * sizeof *r);
    ck_assert(r != NULL);
    for (size_t i = 0; i < n; i++)
        r[i] = fill;
    return r;
}

static void row_max_attach(la_attn_params *p, float *r)
{
    p->row_max = r;
    p->row_max_stride[0] = (int64_t)p->H * p->Sq;
    p->row_max_stride[1] = p->Sq;
    p->row_max_stride[2] = 1;
}

/* R = -inf is the call without R (O, LSE, mask bit for bit), and R comes back holding the row
 * maxima; a random finite R changes the votes only (O and LSE bit for bit), and each call's
 * decisions follow the float64 votes against max(R, m). Over several drifting steps, all modes. */
START_TEST(row_max_votes_only)
{
    static const la_mode modes[3] = {LA_MODE_SKIP, LA_MODE_OBSERVE, LA_MODE_DENSE};
    for (int mi = 0; mi < 3; mi++) {
        tu_problem *t = mk(130 + (uint64_t)mi, 2, 90, 150, 2, 64, LA_DTYPE_F32, 32, 16, 3.0);
        tu_problem *u = mk(130 + (uint64_t)mi, 2, 90, 150, 2, 64, LA_DTYPE_F32, 32, 16, 3.0);
        t->p.mode = u->p.mode = modes[mi];
        t->p.tau = u->p.tau = -3.0f;
        t->p.threads = u->p.threads = 2;
        const size_t ob = (size_t)2 * 90 * 2 * 64 * 4, lb = (size_t)2 * 2 * 90 * 4, nr = 2 * 2 * 90;
        float *r = row_max_new(&u->p, -INFINITY);
        row_max_attach(&u->p, r);
        tu_rng g;
        tu_rng_init(&g, 131);
        for (int step = 0; step < 3; step++) {
            t->p.step = u->p.step = step;
            tu_problem_drift(t, step, 0.01);
            tu_problem_drift(u, step, 0.01);
            uint32_t *before = copy_mask(u);
            for (size_t i = 0; i < nr; i++)
                r[i] = -INFINITY;
            ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
            call_and_check(u, 1e-5); /* R comes back holding the row maxima */
            ck_assert_msg(!memcmp(t->o, u->o, ob), "mode %d step %d: O differs with R = -inf",
                          modes[mi], step);
            ck_assert_msg(!memcmp(t->lse, u->lse, lb), "mode %d step %d: LSE differs", modes[mi],
                          step);
            ck_assert_msg(!memcmp(t->mask, u->mask, t->mask_words * 4),
                          "mode %d step %d: mask differs with R = -inf", modes[mi], step);
            /* The same call again from the same mask, with R scattered around the maxima:
             * other votes (checked against float64), the same O and LSE bit for bit. */
            for (size_t i = 0; i < nr; i++)
                r[i] = (float)(r[i] + 3.0 * tu_rng_normal(&g));
            memcpy(u->mask, before, u->mask_words * 4);
            call_and_check(u, 1e-5);
            ck_assert_msg(!memcmp(t->o, u->o, ob), "mode %d step %d: R changed O", modes[mi],
                          step);
            ck_assert_msg(!memcmp(t->lse, u->lse, lb), "mode %d step %d: R changed LSE",
                          modes[mi], step);
            memcpy(u->mask, t->mask, t->mask_words * 4); /* go on from the R = -inf decisions */
            free(before);
        }
        u->p.row_max = NULL;
        free(r);
        tu_problem_free(t);
        tu_problem_free(u);
    }
}
END_TEST

/* NaN in R carries nothing (as -inf, and comes back as the row maximum); +inf lets no tile
 * keep by vote (only must-do tiles stay live) and comes back +inf; neither touches O or LSE. */
START_TEST(row_max_nan_and_inf)
{
    tu_problem *t = mk(140, 1, 64, 128, 2, 64, LA_DTYPE_BF16, 16, 16, 3.0);
    t->p.mode = LA_MODE_SKIP;
    t->p.tau = -3.0f;
    la_range md = {40, 41}; /* k-tile 2 */
    t->p.must_do = &md;
    t->p.n_must_do = 1;
    ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
    uint32_t *plain = copy_mask(t);
    const size_t ob = (size_t)64 * 2 * 64 * 2, lb = (size_t)2 * 64 * 4;
    uint8_t *o0 = malloc(ob), *l0 = malloc(lb);
    memcpy(o0, t->o, ob);
    memcpy(l0, t->lse, lb);
    float *r = row_max_new(&t->p, NAN);
    row_max_attach(&t->p, r);
    tu_mask_ones(t);
    call_and_check(t, 1e-2);
    ck_assert_msg(!memcmp(plain, t->mask, t->mask_words * 4), "NaN in R changed the votes");
    ck_assert(!memcmp(o0, t->o, ob) && !memcmp(l0, t->lse, lb));
    for (int i = 0; i < 2 * 64; i++)
        ck_assert_msg(isfinite(r[i]), "R[%d] = %g after a NaN start", i, (double)r[i]);
    for (int i = 0; i < 2 * 64; i++)
        r[i] = INFINITY;
    tu_mask_ones(t);
    call_and_check(t, 1e-2);
    ck_assert(!memcmp(o0, t->o, ob) && !memcmp(l0, t->lse, lb));
    for (int h = 0; h < 2; h++)
        for (int m = 0; m < nq_of(&t->p); m++)
            ck_assert_uint_eq(mrow(&t->p, t->mask, 0, h, m)[0], 1u << 2);
    for (int i = 0; i < 2 * 64; i++)
        ck_assert(r[i] == INFINITY);
    free(plain);
    free(o0);
    free(l0);
    free(r);
    tu_problem_free(t);
}
END_TEST

/* The ring's property: the keys cut into P tile-aligned shards, each shard called with its own
 * mask (the single mask's columns) in the single call's visiting order with R carried from
 * -inf, decide bit for bit what the single call decides, compute as many tiles, end with the
 * same R; their outputs merged by LSE equal the single call's. Several drifting steps, both
 * directions, must-do and must-skip ranges, partial last q-tile, both q-tile splits. Calls in
 * another shard order (own shard first, as the ring) are each checked against the float64
 * votes of their own R (call_and_check). */
static void shards_case(la_dtype dt, la_mode mode, int P, uint64_t salt)
{
    enum { B = 2, SQ = 120, L = 96, H = 2, D = 64, BM = 32, BN = 32 };
    const int SK = P * L, nkl = L / BN, wl = la_mask_words(nkl);
    tu_problem *t = mk(salt, B, SQ, SK, H, D, dt, BM, BN, 3.0);
    /* Two k-tiles of three weak (keys at a tenth), so that their tiles get skipped. */
    for (int b = 0; b < B; b++)
        for (int j = 0; j < SK; j++)
            if ((j / BN) % 3 != 0)
                for (int i = 0; i < H * D; i++) {
                    size_t at = ((size_t)b * SK + (size_t)j) * H * D + (size_t)i;
                    t->base[1][at] *= 0.1;
                    t->dir[1][at] *= 0.1;
                }
    la_attn_params *p = &t->p;
    p->mode = mode;
    p->tau = -3.0f;
    la_range md[2] = {{3, 5}, {(int64_t)L + 40, (int64_t)L + 41}}; /* tiles 0 and 4 */
    la_range ms[1] = {{(int64_t)SK - BN, SK}};                    /* the last tile */
    p->must_do = md;
    p->n_must_do = 2;
    p->must_skip = ms;
    p->n_must_skip = 1;
    const size_t es = la_dtype_size(dt), nq = (size_t)la_tiles(SQ, BM);
    const size_t ob = (size_t)B * SQ * H * D * es, nr = (size_t)B * H * SQ;
    float *r_single = row_max_new(p, -INFINITY), *r = row_max_new(p, -INFINITY);
    row_max_attach(p, r_single);
    /* shard j's masks: [B, H, nQ, wl] */
    uint32_t *masks = malloc((size_t)P * B * H * nq * wl * 4);
    void *o = malloc(ob);
    float *lse = malloc(nr * 4);
    double *acc = calloc((size_t)B * SQ * H * D, 8), *lacc = malloc(nr * 8);
    ck_assert(masks && o && lse && acc && lacc);
    for (size_t i = 0; i < (size_t)P * B * H * nq * wl; i++)
        masks[i] = (1u << nkl) - 1u;
    for (int step = 0; step < 4; step++) {
        tu_problem_drift(t, step, 0.01);
        p->step = step;
        for (size_t i = 0; i < nr; i++)
            r_single[i] = r[i] = -INFINITY;
        int64_t single_tiles = 0, shard_tiles = 0;
        p->ret_tiles_computed = &single_tiles;
        ck_assert_int_eq(la_ref_attn_fwd(p), 0);
        p->ret_tiles_computed = NULL;
        const int asc = ascending_of(p);
        for (size_t i = 0; i < nr; i++)
            lacc[i] = -INFINITY;
        memset(acc, 0, (size_t)B * SQ * H * D * 8);
        for (int jj = 0; jj < P; jj++) {
            const int j = asc ? jj : P - 1 - jj;
            la_attn_params sp = *p;
            sp.k = (const char *)t->k + es * (size_t)(j * L) * (size_t)p->k_stride[1];
            sp.v = (const char *)t->v + es * (size_t)(j * L) * (size_t)p->v_stride[1];
            sp.Sk = L;
            sp.o = o;
            sp.lse = lse;
            sp.lse_stride[0] = (int64_t)H * SQ, sp.lse_stride[1] = SQ, sp.lse_stride[2] = 1;
            sp.mask = masks + (size_t)j * B * H * nq * wl;
            sp.mask_stride[0] = (int64_t)H * nq * wl;
            sp.mask_stride[1] = (int64_t)nq * wl;
            sp.mask_stride[2] = wl;
            la_range lmd[2], lms[1];
            int nmd = 0, nms = 0;
            for (int i = 0; i < 2; i++)
                if (md[i].start >= (int64_t)j * L && md[i].end <= (int64_t)(j + 1) * L)
                    lmd[nmd++] = (la_range){md[i].start - j * L, md[i].end - j * L};
            if (ms[0].start >= (int64_t)j * L)
                lms[nms++] = (la_range){ms[0].start - j * L, ms[0].end - j * L};
            sp.must_do = lmd, sp.n_must_do = nmd, sp.must_skip = lms, sp.n_must_skip = nms;
            row_max_attach(&sp, r);
            int64_t tiles = 0;
            sp.ret_tiles_computed = &tiles;
            ck_assert_int_eq(la_ref_attn_fwd(&sp), 0);
            shard_tiles += tiles;
            /* merge by LSE in float64 */
            for (int b = 0; b < B; b++)
                for (int h = 0; h < H; h++)
                    for (int i = 0; i < SQ; i++) {
                        size_t li = ((size_t)b * H + h) * SQ + (size_t)i;
                        double l = lse[li], lm = lacc[li] > l ? lacc[li] : l;
                        if (lm == -INFINITY)
                            continue;
                        double w0 = exp(lacc[li] - lm), w1 = exp(l - lm);
                        for (int d = 0; d < D; d++) {
                            size_t oi = (((size_t)b * SQ + i) * H + h) * D + (size_t)d;
                            acc[oi] = (acc[oi] * w0 + w1 * tu_get(o, dt, (int64_t)oi)) /
                                      (w0 + w1);
                        }
                        lacc[li] = lm + log(w0 + w1);
                    }
        }
        ck_assert_int_eq(shard_tiles, single_tiles);
        ck_assert_msg(!memcmp(r, r_single, nr * 4), "step %d: carried R differs from the single "
                      "call's row maxima", step);
        if (mode != LA_MODE_DENSE)
            for (int b = 0; b < B; b++)
                for (int h = 0; h < H; h++)
                    for (int m = 0; m < (int)nq; m++)
                        for (int n = 0; n < P * nkl; n++) {
                            const uint32_t *sr = masks + (size_t)(n / nkl) * B * H * nq * wl +
                                                 (((size_t)b * H + h) * nq + (size_t)m) * wl;
                            int a = getbit(mrow(p, t->mask, b, h, m), n), c = getbit(sr, n % nkl);
                            ck_assert_msg(a == c, "step %d (b %d, h %d, m %d) tile %d: single "
                                          "%d, shards %d", step, b, h, m, n, a, c);
                        }
        double num = 0, den = 0, lerr = 0;
        for (size_t i = 0; i < (size_t)B * SQ * H * D; i++) {
            double x = tu_get(t->o, dt, (int64_t)i);
            num += (acc[i] - x) * (acc[i] - x);
            den += x * x;
        }
        for (size_t i = 0; i < nr; i++)
            lerr = fmax(lerr, fabs(lacc[i] - t->lse[i]) / (1 + fabs(t->lse[i])));
        ck_assert_msg(sqrt(num / den) <= (dt == LA_DTYPE_F32 ? 1e-5 : 1e-2),
                      "step %d: merged O rel L2 %g", step, sqrt(num / den));
        ck_assert_msg(lerr <= 1e-5, "step %d: merged LSE off by %g", step, lerr);
    }
    /* the inputs made the shards skip something, or the equality proves little */
    if (mode == LA_MODE_SKIP)
        ck_assert_msg(tu_mask_popcount(t, t->mask) < (int64_t)B * H * (int64_t)nq * P * nkl,
                      "nothing skipped");
    /* Ring order (own shard first), each call against its own float64 votes. */
    for (size_t i = 0; i < nr; i++)
        r[i] = -INFINITY;
    for (int jj = 0; jj < P && mode != LA_MODE_DENSE; jj++) {
        const int j = (1 - jj + P) % P;
        tu_problem *u = t; /* reuse t's buffers through a shard view */
        la_attn_params keep = u->p;
        u->p.k = (const char *)t->k + es * (size_t)(j * L) * (size_t)keep.k_stride[1];
        u->p.v = (const char *)t->v + es * (size_t)(j * L) * (size_t)keep.v_stride[1];
        u->p.Sk = L;
        u->p.n_must_do = u->p.n_must_skip = 0;
        uint32_t *full = u->mask;
        u->mask = u->p.mask = masks + (size_t)j * B * H * nq * wl;
        u->p.mask_stride[0] = (int64_t)H * nq * wl;
        u->p.mask_stride[1] = (int64_t)nq * wl;
        u->p.mask_stride[2] = wl;
        size_t mw = u->mask_words;
        u->mask_words = (size_t)B * H * nq * wl;
        row_max_attach(&u->p, r);
        call_and_check(u, dt == LA_DTYPE_F32 ? 1e-5 : 1e-2);
        u->mask = full;
        u->mask_words = mw;
        u->p = keep;
    }
    p->row_max = NULL;
    free(masks);
    free(o);
    free(lse);
    free(acc);
    free(lacc);
    free(r);
    free(r_single);
    tu_problem_free(t);
}

START_TEST(row_max_shards_equal_single_call_f32) { shards_case(LA_DTYPE_F32, LA_MODE_SKIP, 3, 150); }
END_TEST
START_TEST(row_max_shards_equal_single_call_bf16) { shards_case(LA_DTYPE_BF16, LA_MODE_SKIP, 2, 151); }
END_TEST
START_TEST(row_max_shards_observe_and_dense)
{
    shards_case(LA_DTYPE_F32, LA_MODE_OBSERVE, 2, 152);
    shards_case(LA_DTYPE_F16, LA_MODE_DENSE, 3, 153);
}
END_TEST

/* ---- must-do and must-skip --------------------------------------------------------------- */

/* Runs tau=+inf skip with the given ranges and checks tile flags, output and mask. */
static void ranges_case(const la_range *md, int nmd, const la_range *ms, int nms,
                        const uint32_t *want_md, const uint32_t *want_so)
{
    tu_problem *t = mk(70, 1, 40, 100, 2, 64, LA_DTYPE_F32, 16, 16, 1.0); /* nK = 7 */
    t->p.mode = LA_MODE_SKIP;
    t->p.tau = INFINITY;
    t->p.must_do = md;
    t->p.n_must_do = nmd;
    t->p.must_skip = ms;
    t->p.n_must_skip = nms;
    uint32_t f_md = 0, f_so = 0;
    la_tile_flags(&t->p, &f_md, &f_so);
    ck_assert_uint_eq(f_md, *want_md);
    ck_assert_uint_eq(f_so, *want_so);
    for (int s = 0; s < 3; s++) {
        t->p.step = s;
        call_and_check(t, 1e-5);
    }
    tu_problem_free(t);
}

START_TEST(must_do_partial_tile)
{
    la_range md[] = {{17, 18}, {95, 200}}; /* one key of tile 1; tile 5's end and past Sk */
    uint32_t w_md = (1u << 1) | (1u << 5) | (1u << 6), w_so = 0;
    ranges_case(md, 2, NULL, 0, &w_md, &w_so);
}
END_TEST

START_TEST(must_skip_partial_and_full)
{
    la_range ms[] = {
        {0, 8}, {32, 48}, {96, 100}}; /* half of tile 0, all of 2, all of 6 (partial) */
    uint32_t w_md = 0, w_so = (1u << 2) | (1u << 6);
    ranges_case(NULL, 0, ms, 3, &w_md, &w_so);
}
END_TEST

START_TEST(must_skip_overlapping_ranges)
{
    /* Tile 1 [16, 32) is covered only by the union of two ranges; tile 3 by overlapping ones;
     * tile 4 [64, 80) misses key 70 (hole). */
    la_range ms[] = {{16, 24}, {24, 32}, {48, 60}, {50, 64}, {64, 70}, {71, 80}};
    uint32_t w_md = 0, w_so = (1u << 1) | (1u << 3);
    ranges_case(NULL, 0, ms, 6, &w_md, &w_so);
}
END_TEST

START_TEST(must_do_wins_over_must_skip)
{
    la_range md[] = {{40, 41}};
    la_range ms[] = {{0, 100}};
    uint32_t w_md = 1u << 2, w_so = 0x7fu & ~(1u << 2);
    ranges_case(md, 1, ms, 1, &w_md, &w_so);
}
END_TEST

START_TEST(ranges_empty_and_out_of_range)
{
    la_range md[] = {{30, 30}, {50, 20}, {100, 500}, {-10, 0}};
    la_range ms[] = {{60, 60}, {-5, 16}, {1000, 2000}};
    uint32_t w_md = 0, w_so = 1u;
    ranges_case(md, 4, ms, 3, &w_md, &w_so);
}
END_TEST

START_TEST(all_tiles_must_skip)
{
    /* Nothing left to compute: O = 0 and LSE = -inf, in every mode. */
    la_range ms[] = {{0, 1000}};
    for (int mode = LA_MODE_DENSE; mode <= LA_MODE_SKIP; mode++) {
        tu_problem *t = mk(71, 1, 20, 50, 1, 64, LA_DTYPE_BF16, 16, 16, 1.0);
        t->p.must_skip = ms;
        t->p.n_must_skip = 1;
        t->p.mode = (la_mode)mode;
        call_and_check(t, 0.0);
        for (int i = 0; i < 20; i++)
            ck_assert(t->lse[i] == -INFINITY);
        tu_problem_free(t);
    }
}
END_TEST

START_TEST(tile_flags_random)
{
    tu_rng r;
    tu_rng_init(&r, 72);
    for (int it = 0; it < 300; it++) {
        la_attn_params p;
        memset(&p, 0, sizeof p);
        p.Sk = 1 + (int)(tu_rng_u64(&r) % 300);
        p.BN = 1 + (int)(tu_rng_u64(&r) % 40);
        la_range md[LA_MAX_RANGES], ms[LA_MAX_RANGES];
        p.n_must_do = (int)(tu_rng_u64(&r) % 4);
        p.n_must_skip = (int)(tu_rng_u64(&r) % 12);
        for (int i = 0; i < p.n_must_do; i++) {
            md[i].start = (int64_t)(tu_rng_u64(&r) % 340) - 20;
            md[i].end = md[i].start + (int64_t)(tu_rng_u64(&r) % 30) - 3;
        }
        for (int i = 0; i < p.n_must_skip; i++) {
            ms[i].start = (int64_t)(tu_rng_u64(&r) % 340) - 20;
            ms[i].end = ms[i].start + (int64_t)(tu_rng_u64(&r) % 80) - 3;
        }
        p.must_do = md;
        p.must_skip = ms;
        int nk = la_tiles(p.Sk, p.BN);
        uint32_t fmd[10], fso[10];
        uint8_t bmd[300], bso[300];
        la_tile_flags(&p, fmd, fso);
        flags_bruteforce(&p, bmd, bso);
        for (int n = 0; n < nk; n++) {
            ck_assert_int_eq(getbit(fmd, n), bmd[n]);
            ck_assert_int_eq(getbit(fso, n), bso[n]);
        }
    }
}
END_TEST

/* ---- strides and threads ---------------------------------------------------------------- */

START_TEST(strides_bhsd_layout)
{
    /* The same problem in [B, H, S, D] storage passed through strides. */
    const int B = 2, H = 3, Sq = 50, Sk = 70, D = 64;
    tu_problem *t = mk(80, B, Sq, Sk, H, D, LA_DTYPE_BF16, 16, 16, 2.0);
    uint16_t *q = malloc(2 * B * H * Sq * D), *k = malloc(2 * B * H * Sk * D),
             *v = malloc(2 * B * H * Sk * D), *o = malloc(2 * B * H * Sq * D);
    const uint16_t *sq = t->q, *sk = t->k, *sv = t->v;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int d = 0; d < D; d++) {
                for (int s = 0; s < Sq; s++)
                    q[((b * H + h) * Sq + s) * D + d] = sq[((b * Sq + s) * H + h) * D + d];
                for (int s = 0; s < Sk; s++) {
                    k[((b * H + h) * Sk + s) * D + d] = sk[((b * Sk + s) * H + h) * D + d];
                    v[((b * H + h) * Sk + s) * D + d] = sv[((b * Sk + s) * H + h) * D + d];
                }
            }
    la_attn_params p = t->p;
    p.mode = LA_MODE_SKIP;
    p.tau = -2.0f;
    ck_assert_int_eq(la_ref_attn_fwd(&p), 0); /* contiguous run: the expected bits */
    uint32_t *want_mask = copy_mask(t);
    uint16_t *want_o = malloc(2 * B * H * Sq * D);
    memcpy(want_o, t->o, 2 * B * H * Sq * D);
    tu_mask_ones(t);
    int64_t st_q[4] = {H * Sq * D, D, Sq * D, 1}, st_k[4] = {H * Sk * D, D, Sk * D, 1};
    memcpy(p.q_stride, st_q, sizeof st_q);
    memcpy(p.o_stride, st_q, sizeof st_q);
    memcpy(p.k_stride, st_k, sizeof st_k);
    memcpy(p.v_stride, st_k, sizeof st_k);
    p.q = q;
    p.k = k;
    p.v = v;
    p.o = o;
    ck_assert_int_eq(la_ref_attn_fwd(&p), 0);
    ck_assert(memcmp(want_mask, t->mask, t->mask_words * 4) == 0);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int s = 0; s < Sq; s++)
                for (int d = 0; d < D; d++)
                    ck_assert_uint_eq(o[((b * H + h) * Sq + s) * D + d],
                                      want_o[((b * Sq + s) * H + h) * D + d]);
    free(q);
    free(k);
    free(v);
    free(o);
    free(want_o);
    free(want_mask);
    tu_problem_free(t);
}
END_TEST

START_TEST(strides_padded_rows)
{
    /* Row strides padded past H*D, a d stride of 2, a strided LSE, and mask rows of 5 words for a
     * 3-word row: words past 3 are never touched. */
    const int B = 1, Sq = 40, Sk = 70, H = 2, D = 64, BM = 8, BN = 1; /* nK = 70: 3 words */
    const int64_t rs = H * D * 2 + 24;
    float *q = malloc(4 * (size_t)(Sq * rs)), *k = malloc(4 * (size_t)(Sk * rs)),
          *v = malloc(4 * (size_t)(Sk * rs)), *o = malloc(4 * (size_t)(Sq * rs));
    float *lse = malloc(4 * (size_t)(H * Sq * 3));
    const int nq = la_tiles(Sq, BM);
    uint32_t *mask = malloc(4 * (size_t)(H * nq * 5));
    for (int i = 0; i < H * nq * 5; i++)
        mask[i] = (i % 5) < 3 ? 0xffffffffu : 0xdeadbeefu; /* bits 70..95 set: ignored */
    tu_rng r;
    tu_rng_init(&r, 81);
    tu_fill(&r, q, LA_DTYPE_F32, Sq * rs, 1.5);
    tu_fill(&r, k, LA_DTYPE_F32, Sk * rs, 1.5);
    tu_fill(&r, v, LA_DTYPE_F32, Sk * rs, 1.0);
    la_attn_params p;
    tu_params(&p, q, k, v, o, lse, mask, B, Sq, Sk, H, D, LA_DTYPE_F32, BM, BN);
    int64_t st[4] = {Sq * rs, rs, D * 2, 2}, stk[4] = {Sk * rs, rs, D * 2, 2};
    memcpy(p.q_stride, st, sizeof st);
    memcpy(p.o_stride, st, sizeof st);
    memcpy(p.k_stride, stk, sizeof stk);
    memcpy(p.v_stride, stk, sizeof stk);
    p.lse_stride[0] = H * Sq * 3;
    p.lse_stride[1] = Sq * 3;
    p.lse_stride[2] = 3;
    p.mask_stride[0] = H * nq * 5;
    p.mask_stride[1] = nq * 5;
    p.mask_stride[2] = 5;
    p.mode = LA_MODE_SKIP;
    p.tau = -3.0f;
    uint32_t *old = malloc(4 * (size_t)(H * nq * 5));
    memcpy(old, mask, 4 * (size_t)(H * nq * 5));
    expect e = expect_call(&p, old);
    ck_assert_int_eq(la_ref_attn_fwd(&p), 0);
    check_output(&p, &e, 1e-5);
    check_mask(&p, &e, old, mask);
    for (int i = 0; i < H * nq * 5; i++)
        if (i % 5 >= 3)
            ck_assert_uint_eq(mask[i], 0xdeadbeefu);
    expect_free(&e);
    free(old);
    free(q);
    free(k);
    free(v);
    free(o);
    free(lse);
    free(mask);
}
END_TEST

START_TEST(threads_bit_identical)
{
    tu_problem *t = mk(90, 2, 200, 230, 3, 64, LA_DTYPE_BF16, 32, 48, 2.0);
    t->p.mode = LA_MODE_SKIP;
    t->p.tau = -4.0f;
    size_t ob = (size_t)2 * 200 * 3 * 64 * 2, lb = (size_t)2 * 3 * 200 * 4;
    uint8_t *o1 = malloc(ob), *l1 = malloc(lb);
    uint32_t *m1 = NULL;
    static const int threads[] = {1, 2, 3, 7, 64};
    for (int i = 0; i < 5; i++) {
        tu_mask_ones(t);
        t->p.threads = threads[i];
        for (int s = 0; s < 2; s++) {
            t->p.step = s;
            ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
        }
        if (i == 0) {
            memcpy(o1, t->o, ob);
            memcpy(l1, t->lse, lb);
            m1 = copy_mask(t);
            continue;
        }
        ck_assert_msg(memcmp(o1, t->o, ob) == 0, "O differs with %d threads", threads[i]);
        ck_assert_msg(memcmp(l1, t->lse, lb) == 0, "LSE differs with %d threads", threads[i]);
        ck_assert_msg(memcmp(m1, t->mask, t->mask_words * 4) == 0, "mask differs with %d threads",
                      threads[i]);
    }
    free(o1);
    free(l1);
    free(m1);
    tu_problem_free(t);
}
END_TEST

/* ---- cancellation (la_ref_attn_fwd_cancel) ---------------------------------------------- */

typedef struct canceller {
    int *flag;
    int code;
    unsigned delay_us;
} canceller;

static void *cancel_later(void *arg)
{
    canceller *c = arg;
    usleep(c->delay_us);
    __atomic_store_n(c->flag, c->code, __ATOMIC_RELAXED);
    return NULL;
}

/* A flag that stays 0 changes nothing (bit for bit); one set before the call stops it before
 * any output is written; one set while 2 threads each run one q-tile against 4 Mi keys (zero
 * strides: one K and one V row stand for all; 2^36 multiply-adds each, seconds of CPU)
 * stops them within a k-tile: the call returns the flag's code at once and leaves O, LSE and
 * the mask as they were. */
START_TEST(cancel_stops_within_a_tile)
{
    tu_problem *t = mk(95, 1, 200, 230, 3, 64, LA_DTYPE_BF16, 32, 48, 2.0);
    t->p.mode = LA_MODE_SKIP;
    t->p.tau = -4.0f;
    t->p.threads = 2;
    size_t ob = (size_t)200 * 3 * 64 * 2, lb = (size_t)3 * 200 * 4;
    ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
    uint8_t *o1 = malloc(ob), *l1 = malloc(lb);
    memcpy(o1, t->o, ob);
    memcpy(l1, t->lse, lb);
    uint32_t *m1 = copy_mask(t);
    tu_mask_ones(t);
    int flag = 0;
    ck_assert_int_eq(la_ref_attn_fwd_cancel(&t->p, &flag), 0);
    ck_assert(memcmp(o1, t->o, ob) == 0 && memcmp(l1, t->lse, lb) == 0);
    ck_assert(memcmp(m1, t->mask, t->mask_words * 4) == 0);

    memset(t->o, 0x5a, ob);
    memset(t->lse, 0x5a, lb);
    tu_mask_ones(t);
    uint32_t *ones = copy_mask(t);
    flag = LA_ESHUTDOWN;
    ck_assert_int_eq(la_ref_attn_fwd_cancel(&t->p, &flag), LA_ESHUTDOWN);
    for (size_t i = 0; i < ob; i++)
        ck_assert_msg(((uint8_t *)t->o)[i] == 0x5a, "O byte %zu written by a stopped call", i);
    for (size_t i = 0; i < lb; i++)
        ck_assert_msg(((uint8_t *)t->lse)[i] == 0x5a, "LSE byte %zu written", i);
    ck_assert(memcmp(ones, t->mask, t->mask_words * 4) == 0);
    free(o1);
    free(l1);
    free(m1);
    free(ones);
    tu_problem_free(t);

    enum { SQ = 128, H = 2, D = 64, BM = 128, BN = 64 };
    const int32_t sk = 1 << 22;
    float *q = calloc((size_t)SQ * H * D, 4), *o = malloc((size_t)SQ * H * D * 4),
          *kv = calloc(2 * D, 4), *lse = malloc((size_t)H * SQ * 4);
    int64_t words = la_mask_words(la_tiles(sk, BN));
    uint32_t *mask = malloc((size_t)H * words * 4);
    ck_assert(q && o && kv && lse && mask);
    for (int i = 0; i < SQ * H * D; i++)
        q[i] = (float)((i * 7) % 11) / 11.0f - 0.5f;
    for (int i = 0; i < 2 * D; i++)
        kv[i] = (float)((i * 5) % 13) / 13.0f - 0.5f;
    memset(o, 0x5a, (size_t)SQ * H * D * 4);
    memset(mask, 0xff, (size_t)H * words * 4);
    la_attn_params p;
    tu_params(&p, q, kv, kv + D, o, lse, mask, 1, SQ, sk, H, D, LA_DTYPE_F32, BM, BN);
    p.k_stride[0] = p.k_stride[1] = p.k_stride[2] = 0;
    p.v_stride[0] = p.v_stride[1] = p.v_stride[2] = 0;
    p.mode = LA_MODE_SKIP;
    p.tau = INFINITY; /* a finished item would keep only its first tile: the mask would change */
    p.threads = 2;
    flag = 0;
    canceller c = {&flag, LA_ECLOSED, 200 * 1000};
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, cancel_later, &c), 0);
    double t0 = tu_now_s();
    int rc = la_ref_attn_fwd_cancel(&p, &flag);
    double took = tu_now_s() - t0;
    pthread_join(th, NULL);
    fprintf(stderr,
            "cancel_stops_within_a_tile: a call of 2 x 2^36 multiply-adds stopped %.3f s after "
            "it began (cancelled at 0.2 s)\n",
            took);
    ck_assert_int_eq(rc, LA_ECLOSED);
    ck_assert_msg(took < 2.0, "the call ran %.2f s after its flag was set at 0.2 s", took);
    for (size_t i = 0; i < (size_t)SQ * H * D * 4; i++)
        ck_assert_msg(((uint8_t *)o)[i] == 0x5a, "O byte %zu written by a stopped call", i);
    for (int64_t i = 0; i < H * words; i++)
        ck_assert_msg(mask[i] == 0xffffffffu, "mask word %lld written by a stopped call",
                      (long long)i);
    free(q);
    free(o);
    free(kv);
    free(lse);
    free(mask);
}
END_TEST

/* ---- output rounding -------------------------------------------------------------------- */

/* The bf16/f16 path widens exactly, so on inputs representable in the half type it computes the
 * same fp32 values as the f32 path: its output must be their round-to-nearest-even, bit for bit. */
static void rounding_case(la_dtype dt, uint64_t salt)
{
    tu_problem *h = mk(salt, 1, 50, 60, 2, 64, dt, 16, 16, 2.0);
    tu_problem *f = mk(salt, 1, 50, 60, 2, 64, LA_DTYPE_F32, 16, 16, 2.0);
    int64_t nq = 50 * 2 * 64, nk = 60 * 2 * 64;
    for (int64_t i = 0; i < nq; i++)
        ((float *)f->q)[i] = (float)tu_get(h->q, dt, i);
    for (int64_t i = 0; i < nk; i++) {
        ((float *)f->k)[i] = (float)tu_get(h->k, dt, i);
        ((float *)f->v)[i] = (float)tu_get(h->v, dt, i);
    }
    h->p.mode = f->p.mode = LA_MODE_SKIP;
    h->p.tau = f->p.tau = -3.0f;
    for (int s = 0; s < 2; s++) {
        h->p.step = f->p.step = s;
        ck_assert_int_eq(la_ref_attn_fwd(&h->p), 0);
        ck_assert_int_eq(la_ref_attn_fwd(&f->p), 0);
        for (int64_t i = 0; i < nq; i++) {
            float x = ((float *)f->o)[i];
            uint16_t want = dt == LA_DTYPE_BF16 ? tu_f32_to_bf16(x) : tu_f32_to_f16(x);
            ck_assert_msg(((uint16_t *)h->o)[i] == want, "O[%lld] = %04x, RNE(%a) = %04x",
                          (long long)i, ((uint16_t *)h->o)[i], (double)x, want);
        }
        ck_assert(memcmp(h->lse, f->lse, 2 * 50 * 4) == 0);
        ck_assert(memcmp(h->mask, f->mask, h->mask_words * 4) == 0);
    }
    tu_problem_free(h);
    tu_problem_free(f);
}

START_TEST(bf16_output_rne) { rounding_case(LA_DTYPE_BF16, 100); }
END_TEST
START_TEST(f16_output_rne) { rounding_case(LA_DTYPE_F16, 101); }
END_TEST

START_TEST(testutil_conversions)
{
    /* every half and bf16 value survives f32 and back; rounding ties go to even */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = tu_f16_to_f32((uint16_t)h);
        if (!isnan(f))
            ck_assert_uint_eq(tu_f32_to_f16(f), h);
        float g = tu_bf16_to_f32((uint16_t)h);
        if (!isnan(g))
            ck_assert_uint_eq(tu_f32_to_bf16(g), h);
    }
    ck_assert_uint_eq(tu_f32_to_bf16(1.0f + 0x1p-8f), 0x3f80u);            /* tie, to even */
    ck_assert_uint_eq(tu_f32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81u); /* above the tie */
    ck_assert_uint_eq(tu_f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82u);        /* tie, to even */
    ck_assert_uint_eq(tu_f32_to_f16(1.0f + 0x1p-11f), 0x3c00u);
    ck_assert_uint_eq(tu_f32_to_f16(65520.0f), 0x7c00u);
    ck_assert_uint_eq(tu_f32_to_f16(65519.0f), 0x7bffu);
    ck_assert_uint_eq(tu_f32_to_f16(0x1p-25f), 0x0000u);   /* tie to 0 */
    ck_assert_uint_eq(tu_f32_to_f16(0x1.8p-24f), 0x0002u); /* tie to even 2 */
}
END_TEST

/* ---- NaN ------------------------------------------------------------------------------- */

/* NaN propagates as in PyTorch's SDPA: a NaN in Q row i makes that row's O and LSE NaN; a NaN
 * in key j of a computed tile makes every row of that head NaN; a NaN in V reaches only its
 * column of O; a NaN key in a tile that is not computed changes nothing. Everything else is bit
 * for bit the clean call. NaN scores never vote: a row whose scores are all NaN keeps every
 * tile it visits (its running max stays -inf, as before its first tile). */
static void nan_case(la_dtype dt)
{
    enum { SQ = 50, SK = 60, H = 2, D = 64, BM = 16, BN = 16 };
    tu_problem *t = mk(77, 1, SQ, SK, H, D, dt, BM, BN, 2.0);
    t->p.mode = LA_MODE_SKIP;
    t->p.tau = -3.0f;
    t->p.step = 0;
    const size_t ob = (size_t)SQ * H * D * la_dtype_size(dt), lb = (size_t)H * SQ * 4;
    uint8_t *o0 = malloc(ob), *l0 = malloc(lb);
    uint32_t *m0 = NULL;
    tu_mask_ones(t);
    ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
    memcpy(o0, t->o, ob);
    memcpy(l0, t->lse, lb);
    m0 = copy_mask(t);
    /* index of element (i, h, d) of O / Q: [1, S, H, D]; of LSE: [1, H, Sq] */
#define QI(i, h, d) (((int64_t)(i)*H + (h)) * D + (d))
    for (int c = 0; c < 4; c++) {
        const int64_t qi = QI(5, 1, 3), ki = QI(20, 0, 0), vi = QI(20, 0, 7);
        la_range skip = {16, 32}; /* k-tile 1, which holds key 20 */
        void *base = c == 0 ? t->q : c == 2 ? t->v : t->k;
        const int64_t at = c == 0 ? qi : c == 2 ? vi : ki;
        const double saved = tu_get(base, dt, at);
        if (c == 0)
            tu_set(t->q, dt, qi, NAN);
        else if (c == 1 || c == 3)
            tu_set(t->k, dt, ki, NAN);
        else
            tu_set(t->v, dt, vi, NAN);
        if (c == 3) {
            t->p.must_skip = &skip;
            t->p.n_must_skip = 1;
        }
        tu_mask_ones(t);
        ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
        for (int i = 0; i < SQ; i++)
            for (int h = 0; h < H; h++) {
                int nan_row = (c == 0 && i == 5 && h == 1) || (c == 1 && h == 0);
                float lse = t->lse[h * SQ + i], lse0 = ((float *)l0)[h * SQ + i];
                if (nan_row)
                    ck_assert_msg(isnan(lse), "case %d: LSE[%d, %d] = %g, want NaN", c, h, i,
                                  (double)lse);
                else if (c != 3)
                    ck_assert_msg(!memcmp(&lse, &lse0, 4), "case %d: LSE[%d, %d] = %a, clean %a", c,
                                  h, i, (double)lse, (double)lse0);
                else
                    ck_assert_msg(!isnan(lse), "case %d: LSE[%d, %d] is NaN", c, h, i);
                for (int d = 0; d < D; d++) {
                    int64_t e = QI(i, h, d);
                    double x = tu_get(t->o, dt, e), x0 = tu_get(o0, dt, e);
                    if (nan_row || (c == 2 && h == 0 && d == 7))
                        ck_assert_msg(isnan(x), "case %d: O[%d, %d, %d] = %g, want NaN", c, i, h, d,
                                      x);
                    else if (c != 3)
                        ck_assert_msg(x == x0, "case %d: O[%d, %d, %d] = %a, clean %a", c, i, h, d,
                                      x, x0);
                    else
                        ck_assert_msg(!isnan(x), "case %d: O[%d, %d, %d] is NaN", c, i, h, d);
                }
            }
        /* Votes: the NaN query row (c 0) casts none, so its q-tile keeps a subset of what it
         * kept clean; a NaN in V (c 2) changes no vote; a NaN key (c 1) changes none in the
         * other head. */
        const int nk = nk_of(&t->p);
        for (int h = 0; h < H && c != 3; h++)
            for (int m = 0; m < nq_of(&t->p) && !(c == 1 && h == 0); m++) {
                const uint32_t *got = mrow(&t->p, t->mask, 0, h, m),
                               *was = mrow(&t->p, m0, 0, h, m);
                for (int n = 0; n < nk; n++) {
                    int want = getbit(was, n);
                    if (c == 0 && h == 1 && m == 0)
                        want &= getbit(got, n); /* a subset */
                    ck_assert_msg(getbit(got, n) == want,
                                  "case %d: mask (h %d, m %d) tile %d = %d, "
                                  "want %d",
                                  c, h, m, n, getbit(got, n), want);
                }
            }
        /* Clean again for the next case. */
        tu_set(base, dt, at, saved);
        t->p.must_skip = NULL;
        t->p.n_must_skip = 0;
    }
    /* A q-tile whose every row is NaN (q-tile 0 of head 1) votes for nothing: its mask row
     * ends all zeros at a finite tau, and stays all ones at tau = -inf. */
    for (int i = 0; i < BM; i++)
        tu_set(t->q, dt, QI(i, 1, 0), NAN);
    for (int pass = 0; pass < 2; pass++) {
        t->p.tau = pass ? -INFINITY : -3.0f;
        tu_mask_ones(t);
        ck_assert_int_eq(la_ref_attn_fwd(&t->p), 0);
        const uint32_t *row = mrow(&t->p, t->mask, 0, 1, 0);
        for (int n = 0; n < nk_of(&t->p); n++)
            ck_assert_msg(getbit(row, n) == pass, "all-NaN q-tile, tau %g: tile %d = %d",
                          (double)t->p.tau, n, getbit(row, n));
        for (int i = 0; i < BM; i++)
            ck_assert_msg(isnan(t->lse[1 * SQ + i]), "all-NaN q-tile: LSE[1, %d] not NaN", i);
    }
#undef QI
    free(o0);
    free(l0);
    free(m0);
    tu_problem_free(t);
}

START_TEST(nan_as_sdpa_f32) { nan_case(LA_DTYPE_F32); }
END_TEST
START_TEST(nan_as_sdpa_bf16) { nan_case(LA_DTYPE_BF16); }
END_TEST

/* ---- errors ---------------------------------------------------------------------------- */

typedef struct err_fixture {
    float q[64 * 64], k[64 * 64], v[64 * 64], o[64 * 64], lse[64], rmax[64];
    uint32_t mask[16], dec[16];
    la_range r[LA_MAX_RANGES + 1];
    la_attn_params p;
} err_fixture;

static err_fixture *err_new(void)
{
    err_fixture *f = calloc(1, sizeof *f);
    ck_assert(f != NULL);
    /* B1 Sq 64 Sk 64 H1 D64 f32, BM 16 BN 16: nQ 4, 1 word per row */
    tu_params(&f->p, f->q, f->k, f->v, f->o, f->lse, f->mask, 1, 64, 64, 1, 64, LA_DTYPE_F32, 16,
              16);
    f->p.mode = LA_MODE_SKIP;
    for (int i = 0; i < 16; i++)
        f->mask[i] = 0xf;
    ck_assert_int_eq(la_attn_validate(&f->p), 0);
    return f;
}

/* An invalid p is refused by la_attn_validate and by la_ref_attn_fwd, without touching the
 * outputs or the tile count. */
static void expect_err(err_fixture *f, int code)
{
    ck_assert_int_eq(la_attn_validate(&f->p), code);
    int64_t tiles = -7;
    f->p.ret_tiles_computed = &tiles;
    memset(f->o, 0x5a, sizeof f->o);
    uint32_t m0 = f->mask[0];
    ck_assert_int_eq(la_ref_attn_fwd(&f->p), code);
    ck_assert_int_eq(tiles, -7);
    uint32_t o0;
    memcpy(&o0, f->o, 4);
    ck_assert_uint_eq(o0, 0x5a5a5a5au);
    ck_assert_uint_eq(f->mask[0], m0);
    f->p.ret_tiles_computed = NULL;
}

#define ERR_CASE(name, code, ...)   \
    START_TEST(name)                \
    {                               \
        err_fixture *f = err_new(); \
        la_attn_params *p = &f->p;  \
        (void)p;                    \
        __VA_ARGS__;                \
        expect_err(f, code);        \
        free(f);                    \
    }                               \
    END_TEST

ERR_CASE(err_zero_b, LA_EINVAL, p->B = 0)
ERR_CASE(err_neg_sq, LA_EINVAL, p->Sq = -1)
ERR_CASE(err_zero_sk, LA_EINVAL, p->Sk = 0)
ERR_CASE(err_zero_h, LA_EINVAL, p->H = 0)
ERR_CASE(err_zero_d, LA_EINVAL, p->D = 0)
ERR_CASE(err_head_dim_32, LA_ENOTSUP, p->D = 32)
ERR_CASE(err_head_dim_80, LA_ENOTSUP, p->D = 80)
ERR_CASE(err_dtype_u32, LA_ENOTSUP, p->dtype = LA_DTYPE_U32)
ERR_CASE(err_dtype_unknown, LA_EINVAL, p->dtype = (la_dtype)9)
ERR_CASE(err_mode_session, LA_EINVAL, p->mode = LA_MODE_SESSION)
ERR_CASE(err_mode_unknown, LA_EINVAL, p->mode = (la_mode)7)
ERR_CASE(err_direction_unknown, LA_EINVAL, p->direction = (la_direction)3)
ERR_CASE(err_null_q, LA_EINVAL, p->q = NULL)
ERR_CASE(err_null_k, LA_EINVAL, p->k = NULL)
ERR_CASE(err_null_v, LA_EINVAL, p->v = NULL)
ERR_CASE(err_null_o_and_lse, LA_EINVAL, p->o = NULL; p->lse = NULL)
ERR_CASE(err_null_mask_skip, LA_EINVAL, p->mask = NULL)
ERR_CASE(err_null_mask_observe, LA_EINVAL, p->mask = NULL; p->mode = LA_MODE_OBSERVE)
ERR_CASE(err_bm_zero, LA_EINVAL, p->BM = 0)
ERR_CASE(err_bn_negative, LA_EINVAL, p->BN = -16)
ERR_CASE(err_neg_stride_q, LA_EINVAL, p->q_stride[1] = -64)
ERR_CASE(err_neg_stride_k, LA_EINVAL, p->k_stride[3] = -1)
ERR_CASE(err_neg_stride_lse, LA_EINVAL, p->lse_stride[2] = -1)
ERR_CASE(err_neg_stride_mask, LA_EINVAL, p->mask_stride[2] = -1)
ERR_CASE(err_o_aliases_q, LA_EINVAL, p->o = (void *)(f->q + 100))
ERR_CASE(err_o_aliases_v, LA_EINVAL, p->o = (void *)(f->v + 4095))
ERR_CASE(err_lse_aliases_o, LA_EINVAL, p->lse = f->o + 4090)
ERR_CASE(err_lse_aliases_k, LA_EINVAL, p->lse = f->k)
ERR_CASE(err_mask_aliases_o, LA_EINVAL, p->mask = (uint32_t *)(f->o + 10))
ERR_CASE(err_decisions_alias_mask, LA_EINVAL, p->decisions = f->mask + 2)
ERR_CASE(err_neg_stride_row_max, LA_EINVAL, p->row_max = f->rmax; p->row_max_stride[0] = 64;
         p->row_max_stride[1] = 64; p->row_max_stride[2] = -1)
ERR_CASE(err_row_max_aliases_lse, LA_EINVAL, p->row_max = f->lse + 8; p->row_max_stride[0] = 64;
         p->row_max_stride[1] = 64; p->row_max_stride[2] = 1)
ERR_CASE(err_row_max_aliases_q, LA_EINVAL, p->row_max = f->q + 64; p->row_max_stride[0] = 64;
         p->row_max_stride[1] = 64; p->row_max_stride[2] = 1)
ERR_CASE(err_row_max_rows_overlap, LA_EINVAL, p->row_max = f->rmax; p->row_max_stride[0] = 64;
         p->row_max_stride[1] = 64; p->row_max_stride[2] = 0)
ERR_CASE(err_o_stride_zero, LA_EINVAL, p->o_stride[1] = 0) /* rows write one place */
ERR_CASE(err_o_rows_overlap, LA_EINVAL, p->o_stride[1] = 32)
ERR_CASE(err_mask_rows_overlap, LA_EINVAL, p->mask_stride[2] = 0)
ERR_CASE(err_too_many_must_do, LA_EINVAL, p->must_do = f->r; p->n_must_do = LA_MAX_RANGES + 1)
ERR_CASE(err_too_many_must_skip, LA_EINVAL, p->must_skip = f->r; p->n_must_skip = LA_MAX_RANGES + 1)
ERR_CASE(err_negative_ranges, LA_EINVAL, p->must_do = f->r; p->n_must_do = -1)
ERR_CASE(err_null_ranges, LA_EINVAL, p->n_must_skip = 2)
ERR_CASE(err_scale_zero, LA_EINVAL, p->scale = 0.0f)
ERR_CASE(err_scale_negative, LA_EINVAL, p->scale = -0.125f)
ERR_CASE(err_scale_inf, LA_EINVAL, p->scale = INFINITY)
ERR_CASE(err_scale_nan, LA_EINVAL, p->scale = NAN)
ERR_CASE(err_tau_nan, LA_EINVAL, p->tau = NAN)
ERR_CASE(err_null_params, LA_EINVAL, ck_assert_int_eq(la_attn_validate(NULL), LA_EINVAL);
         ck_assert_int_eq(la_ref_attn_fwd(NULL), LA_EINVAL); p->B = 0)

START_TEST(valid_edge_values)
{
    /* What must be accepted: tau +-inf, zero input strides (broadcast K/V over batch), a dense
     * call with no mask, ranges exactly LA_MAX_RANGES long, zero threads. */
    err_fixture *f = err_new();
    la_attn_params *p = &f->p;
    p->tau = INFINITY;
    ck_assert_int_eq(la_attn_validate(p), 0);
    p->tau = -INFINITY;
    p->k_stride[0] = 0;
    p->must_do = f->r;
    p->n_must_do = LA_MAX_RANGES;
    p->threads = 0;
    ck_assert_int_eq(la_ref_attn_fwd(p), 0);
    p->mode = LA_MODE_DENSE;
    p->mask = NULL;
    p->mask_stride[2] = -1; /* unused in dense */
    ck_assert_int_eq(la_ref_attn_fwd(p), 0);
    ck_assert_uint_eq(la_dtype_size(LA_DTYPE_BF16), 2);
    ck_assert_uint_eq(la_dtype_size(LA_DTYPE_F32), 4);
    ck_assert_uint_eq(la_dtype_size((la_dtype)42), 0);
    free(f);
}
END_TEST

static Suite *ref_suite(void)
{
    Suite *s = suite_create("ref");
    TCase *tc = tcase_create("semantics");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, dense_f32);
    tcase_add_test(tc, skip_tau_neg_inf_f32);
    tcase_add_test(tc, observe_tau_neg_inf_f32);
    tcase_add_test(tc, skip_tau_neg_inf_bf16);
    tcase_add_test(tc, skip_tau_neg_inf_f16);
    tcase_add_test(tc, head_dims);
    tcase_add_test(tc, tau_pos_inf_two_calls);
    tcase_add_test(tc, tau_pos_inf_must_do);
    tcase_add_test(tc, tau_pos_inf_ascending_first);
    tcase_add_test(tc, monotone_10_calls_f32);
    tcase_add_test(tc, monotone_10_calls_bf16);
    tcase_add_test(tc, decisions_identical_f16);
    tcase_add_test(tc, decisions_observe);
    tcase_add_test(tc, partial_qtile_rows_do_not_vote);
    tcase_add_test(tc, shapes_partial_tiles);
    tcase_add_test(tc, lse_values);
    tcase_add_test(tc, lse_bf16_with_skips);
    tcase_add_test(tc, lse_only_call);
    tcase_add_test(tc, direction_alternates);
    tcase_add_test(tc, direction_pinned);
    tcase_add_test(tc, vote_is_strict);
    tcase_add_test(tc, observe_is_old_and_keep);
    tcase_add_test(tc, dense_leaves_mask);
    tcase_add_test(tc, dry_run_writes_decisions);
    tcase_add_test(tc, row_max_votes_only);
    tcase_add_test(tc, row_max_nan_and_inf);
    tcase_add_test(tc, row_max_shards_equal_single_call_f32);
    tcase_add_test(tc, row_max_shards_equal_single_call_bf16);
    tcase_add_test(tc, row_max_shards_observe_and_dense);
    suite_add_tcase(s, tc);

    tc = tcase_create("ranges");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, must_do_partial_tile);
    tcase_add_test(tc, must_skip_partial_and_full);
    tcase_add_test(tc, must_skip_overlapping_ranges);
    tcase_add_test(tc, must_do_wins_over_must_skip);
    tcase_add_test(tc, ranges_empty_and_out_of_range);
    tcase_add_test(tc, all_tiles_must_skip);
    tcase_add_test(tc, tile_flags_random);
    suite_add_tcase(s, tc);

    tc = tcase_create("layout");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, strides_bhsd_layout);
    tcase_add_test(tc, strides_padded_rows);
    tcase_add_test(tc, threads_bit_identical);
    tcase_add_test(tc, cancel_stops_within_a_tile);
    tcase_add_test(tc, nan_as_sdpa_f32);
    tcase_add_test(tc, nan_as_sdpa_bf16);
    tcase_add_test(tc, bf16_output_rne);
    tcase_add_test(tc, f16_output_rne);
    tcase_add_test(tc, testutil_conversions);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_set_timeout(tc, 10);
    tcase_add_test(tc, err_zero_b);
    tcase_add_test(tc, err_neg_sq);
    tcase_add_test(tc, err_zero_sk);
    tcase_add_test(tc, err_zero_h);
    tcase_add_test(tc, err_zero_d);
    tcase_add_test(tc, err_head_dim_32);
    tcase_add_test(tc, err_head_dim_80);
    tcase_add_test(tc, err_dtype_u32);
    tcase_add_test(tc, err_dtype_unknown);
    tcase_add_test(tc, err_mode_session);
    tcase_add_test(tc, err_mode_unknown);
    tcase_add_test(tc, err_direction_unknown);
    tcase_add_test(tc, err_null_q);
    tcase_add_test(tc, err_null_k);
    tcase_add_test(tc, err_null_v);
    tcase_add_test(tc, err_null_o_and_lse);
    tcase_add_test(tc, err_null_mask_skip);
    tcase_add_test(tc, err_null_mask_observe);
    tcase_add_test(tc, err_bm_zero);
    tcase_add_test(tc, err_bn_negative);
    tcase_add_test(tc, err_neg_stride_q);
    tcase_add_test(tc, err_neg_stride_k);
    tcase_add_test(tc, err_neg_stride_lse);
    tcase_add_test(tc, err_neg_stride_mask);
    tcase_add_test(tc, err_o_aliases_q);
    tcase_add_test(tc, err_o_aliases_v);
    tcase_add_test(tc, err_lse_aliases_o);
    tcase_add_test(tc, err_lse_aliases_k);
    tcase_add_test(tc, err_mask_aliases_o);
    tcase_add_test(tc, err_decisions_alias_mask);
    tcase_add_test(tc, err_neg_stride_row_max);
    tcase_add_test(tc, err_row_max_aliases_lse);
    tcase_add_test(tc, err_row_max_aliases_q);
    tcase_add_test(tc, err_row_max_rows_overlap);
    tcase_add_test(tc, err_o_stride_zero);
    tcase_add_test(tc, err_o_rows_overlap);
    tcase_add_test(tc, err_mask_rows_overlap);
    tcase_add_test(tc, err_too_many_must_do);
    tcase_add_test(tc, err_too_many_must_skip);
    tcase_add_test(tc, err_negative_ranges);
    tcase_add_test(tc, err_null_ranges);
    tcase_add_test(tc, err_scale_zero);
    tcase_add_test(tc, err_scale_negative);
    tcase_add_test(tc, err_scale_inf);
    tcase_add_test(tc, err_scale_nan);
    tcase_add_test(tc, err_tau_nan);
    tcase_add_test(tc, err_null_params);
    tcase_add_test(tc, valid_edge_values);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    tu_seed();
    return tu_run_suite(ref_suite());
}
