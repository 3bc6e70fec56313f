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
 * in main before forking so that every case sees the same one). la_test_run_suite prints it
 * when a case fails, so that LA_TEST_SEED=<seed> reproduces the run. */
uint64_t la_test_seed(void);

typedef struct la_rng {
    uint64_t s[2];
} la_rng;

/* Seeds from la_test_seed() mixed with salt (use a different salt per case). */
void la_rng_init(la_rng *r, uint64_t salt);
uint64_t la_rng_u64(la_rng *r);
double la_rng_uniform(la_rng *r); /* [0, 1) */
double la_rng_normal(la_rng *r);  /* standard normal */

/* ---- dtypes ---------------------------------------------------------------------------- */

float la_bf16_to_f32(uint16_t h);
uint16_t la_f32_to_bf16(float f); /* round to nearest even */
float la_f16_to_f32(uint16_t h);
uint16_t la_f32_to_f16(float f); /* round to nearest even */

/* Element idx (in elements) of a tensor of dtype F32/F16/BF16, as double. */
double la_test_get(const void *base, la_dtype dt, int64_t idx);
/* Stores v rounded to dtype (to float first, then to nearest even for F16/BF16). */
void la_test_set(void *base, la_dtype dt, int64_t idx, double v);

/* Fills n elements with normal values times amp, never exactly zero (a zero tensor hides
 * indexing bugs). */
void la_test_fill(la_rng *r, void *base, la_dtype dt, int64_t n, double amp);

/* ---- attention problems -------------------------------------------------------------------- */

/* Sets *p for contiguous [B, S, H, D] q, k, v, o, LSE [B, H, Sq] (lse may be NULL) and mask
 * [B, H, nQ, ceil(nK/32)] (may be NULL): scale 1/sqrt(D), tau -inf, mode DENSE, direction
 * ALTERNATE, step 0, no ranges, no decisions, 1 thread. */
void la_test_params(la_attn_params *p, const void *q, const void *k, const void *v, void *o,
                    float *lse, uint32_t *mask, int32_t B, int32_t Sq, int32_t Sk, int32_t H,
                    int32_t D, la_dtype dt, int32_t BM, int32_t BN);

/* A self-contained problem: owns contiguous Q, K, V, O, LSE and an all-ones mask, with params
 * t->p pointing at them. Inputs are random normal (Q, K scaled by qk_amp), stored in dtype. */
typedef struct la_test_problem {
    la_attn_params p;
    void *q, *k, *v, *o;
    float *lse;
    uint32_t *mask;
    size_t mask_words; /* B * H * nQ * ceil(nK/32) */
    double *base[3];   /* float64 Q, K, V before rounding: what drift perturbs */
    double *dir[3];    /* per-element drift direction */
} la_test_problem;

la_test_problem *la_test_problem_new(la_rng *r, int32_t B, int32_t Sq, int32_t Sk, int32_t H,
                                     int32_t D, la_dtype dt, int32_t BM, int32_t BN,
                                     double qk_amp);
void la_test_problem_free(la_test_problem *t);
/* Sets every mask bit of the first ceil(nK/32) words of every row (bits past nK stay 0). */
void la_test_mask_ones(la_test_problem *t);
/* One denoising step of drift: x = base + eps * step_index * dir, rounded to dtype, for Q, K, V;
 * the same (base, dir) every time, so small eps gives slowly changing attention. */
void la_test_problem_drift(la_test_problem *t, int step_index, double eps);
/* Live bits (n < nK) over all rows of a mask laid out like t's. */
int64_t la_test_mask_popcount(const la_test_problem *t, const uint32_t *mask);

/* Independent float64 attention over exactly the k-tiles marked in computed
 * ([B, H, nQ, nK] bytes, 1 = computed; NULL: all tiles). Reads q/k/v/dtype/shape/strides/scale/
 * BM/BN from p. Writes ret_o [B, Sq, H, D] and ret_lse [B, H, Sq] (natural log; may be NULL)
 * contiguous. A query row with no computed tile gets O = 0 and LSE = -inf. */
void naive_attn_f64(const la_attn_params *p, const uint8_t *computed, double *ret_o,
                    double *ret_lse);

/* p->o (dtype, p->o_stride) gathered into ret [B, Sq, H, D] contiguous double. */
void la_test_o_f64(const la_attn_params *p, double *ret);
/* ||got - ref|| / ||ref|| over n values (ref all zero: ||got||). -inf == -inf counts as 0. */
double la_test_rel_l2(const double *ref, const double *got, int64_t n);

/* ---- environment ------------------------------------------------------------------------- */

/* 1 when this machine has an NVIDIA GPU and LA_TEST_NO_GPU is not 1 (as tests/run.sh). */
int la_test_has_gpu(void);

/* Runs the suite with tu_run (runner.h) and prints the seed when a case failed; returns the
 * exit status. Inline, so that the program's own count of GPU cases is the one reported. */
static inline int la_test_run_suite(Suite *s)
{
    uint64_t seed = la_test_seed(); /* fixed before the cases fork */
    int rc = tu_run(s);
    if (rc != 0)
        fprintf(stderr, "reproduce with LA_TEST_SEED=%llu\n", (unsigned long long)seed);
    return rc;
}

#endif /* LA_TESTUTIL_H */
