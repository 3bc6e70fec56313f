/*
 * guard.h — private to the engine: the guardrail's check on the CPU backend (guard.c).
 */
#ifndef LA_ENGINE_GUARD_H
#define LA_ENGINE_GUARD_H

#include "backend.h"

/* After the call j (p.lse filled): the dense LSE of the sampled q-tiles through the CPU
 * reference with `threads` threads, compared with the call's; held bits set, j->guard_rows,
 * guard_restored, guard_tiles written. Returns 0 or LA_ENOMEM (nothing checked). */
int be_guard_cpu(be_job *j, int threads);

/* Elements of the gathered Q of the call j's samples (kernels/la_guard.h: B * n * BM * H * D)
 * and floats of their LSE (B * H * n * BM). */
void guard_sample_sizes(const be_job *j, size_t *q_elems, size_t *lse_floats);

/* The samples of the call j's guardrail (either backend) as one call: j->p on the gathered Q
 * qs (la_guard_gather_q: the sampled q-tiles' rows, Sq = n * BM), LSE only (o NULL) into dense
 * ([B, H, n * BM]), in mode dense; no mask, decisions nor row maxima (the call's R is
 * untouched), no tile count. One call, so that every sampled (b, h, q-tile) runs side by side
 * on the device. */
la_attn_params guard_sample_params(const be_job *j, const void *qs, float *dense);

/* The comparison of the call j's LSE with the samples' dense LSE in dense (as above; held:
 * j->held). */
la_guard_params guard_compare_params(const be_job *j, const float *dense, int n_tiles);

#endif /* LA_ENGINE_GUARD_H */
