/*
 * testutil.h — private to tests/: helpers every Check program may use. Small on purpose:
 * seeded randomness, dtype conversions, tensors filled with random data, an independent float64
 * attention, error measures, drifting inputs for multi-step runs, GPU detection.
 *
 * Tensors here are host memory in the layout [B, S, H, D] contiguous unless a test sets its own
 * strides in la_attn_params; everything reads them through the params' pointers and strides.
 */
#ifndef LA_TESTUTIL_H
#define LA_TESTUTIL_H

#include <check.h>
#include <stdint.h>
#include <stdio.h>

#include "la_attn.h"
#include "runner.h"

/* ---- randomness ------------------------------------------------------------------------ */

/* The seed of this run: $LA_TEST_SEED if set, else time ^ pid, chosen once per process (call it
 * in main before forking so that every case sees the same one). tu_run_suite prints it
 * when a case fails, so that LA_TEST_SEED=<seed> reproduces the run. */
uint64_t tu_seed(void);

typedef struct tu_rng {
    uint64_t s[2];
} tu_rng;

/* Seeds from tu_seed() mixed with salt (use a different salt per case). */
void tu_rng_init(tu_rng *r, uint64_t salt);
uint64_t tu_rng_u64(tu_rng *r);
double tu_rng_uniform(tu_rng *r); /* [0, 1) */
double tu_rng_normal(tu_rng *r);  /* standard normal */

/* ---- dtypes ---------------------------------------------------------------------------- */

float tu_bf16_to_f32(uint16_t h);
uint16_t tu_f32_to_bf16(float f); /* round to nearest even */
float tu_f16_to_f32(uint16_t h);
uint16_t tu_f32_to_f16(float f); /* round to nearest even */

/* Element idx (in elements) of a tensor of dtype F32/F16/BF16, as double. */
double tu_get(const void *base, la_dtype dt, int64_t idx);
/* Stores v rounded to dtype (to float first, then to nearest even for F16/BF16). */
void tu_set(void *base, la_dtype dt, int64_t idx, double v);

/* Fills n elements with normal values times amp, never exactly zero (a zero tensor hides
 * indexing bugs). */
void tu_fill(tu_rng *r, void *base, la_dtype dt, int64_t n, double amp);

/* ---- attention problems -------------------------------------------------------------------- */

/* Sets *p for contiguous [B, S, H, D] q, k, v, o, LSE [B, H, Sq] (lse may be NULL) and mask
 * [B, H, nQ, ceil(nK/32)] (may be NULL): scale 1/sqrt(D), tau -inf, mode DENSE, direction
 * ALTERNATE, step 0, no ranges, no decisions, 1 thread. */
void tu_params(la_attn_params *p, const void *q, const void *k, const void *v, void *o, float *lse,
               uint32_t *mask, int32_t B, int32_t Sq, int32_t Sk, int32_t H, int32_t D, la_dtype dt,
               int32_t BM, int32_t BN);

/* A self-contained problem: owns contiguous Q, K, V, O, LSE and an all-ones mask, with params
 * t->p pointing at them. Inputs are random normal (Q, K scaled by qk_amp), stored in dtype. */
typedef struct tu_problem {
    la_attn_params p;
    void *q, *k, *v, *o;
    float *lse;
    uint32_t *mask;
    size_t mask_words; /* B * H * nQ * ceil(nK/32) */
    double *base[3];   /* float64 Q, K, V before rounding: what drift perturbs */
    double *dir[3];    /* per-element drift direction */
} tu_problem;

tu_problem *tu_problem_new(tu_rng *r, int32_t B, int32_t Sq, int32_t Sk, int32_t H, int32_t D,
                           la_dtype dt, int32_t BM, int32_t BN, double qk_amp);
void tu_problem_free(tu_problem *t);
/* Sets every mask bit of the first ceil(nK/32) words of every row (bits past nK stay 0). */
void tu_mask_ones(tu_problem *t);
/* One denoising step of drift: x = base + eps * step_index * dir, rounded to dtype, for Q, K, V;
 * the same (base, dir) every time, so small eps gives slowly changing attention. */
void tu_problem_drift(tu_problem *t, int step_index, double eps);
/* Live bits (n < nK) over all rows of a mask laid out like t's. */
int64_t tu_mask_popcount(const tu_problem *t, const uint32_t *mask);

/* Independent float64 attention over exactly the k-tiles marked in computed
 * ([B, H, nQ, nK] bytes, 1 = computed; NULL: all tiles). Reads q/k/v/dtype/shape/strides/scale/
 * BM/BN from p. Writes ret_o [B, Sq, H, D] and ret_lse [B, H, Sq] (natural log; may be NULL)
 * contiguous. A query row with no computed tile gets O = 0 and LSE = -inf. */
void naive_attn_f64(const la_attn_params *p, const uint8_t *computed, double *ret_o,
                    double *ret_lse);

/* p->o (dtype, p->o_stride) gathered into ret [B, Sq, H, D] contiguous double. */
void tu_o_f64(const la_attn_params *p, double *ret);
/* ||got - ref|| / ||ref|| over n values (ref all zero: ||got||). -inf == -inf counts as 0. */
double tu_rel_l2(const double *ref, const double *got, int64_t n);

/* ---- environment ------------------------------------------------------------------------- */

/* tu_has_gpu(): runner.h. */

/* Runs the suite with tu_run (runner.h) and prints the seed when a case failed; returns the
 * exit status. Inline, so that the program's own count of GPU cases is the one reported. */
static inline int tu_run_suite(Suite *s)
{
    uint64_t seed = tu_seed(); /* fixed before the cases fork */
    int rc = tu_run(s);
    if (rc != 0)
        fprintf(stderr, "reproduce with LA_TEST_SEED=%llu\n", (unsigned long long)seed);
    return rc;
}

#endif /* LA_TESTUTIL_H */
