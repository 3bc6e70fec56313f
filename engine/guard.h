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

/* Sample k of the call j's guardrail (either backend): j->p in mode dense on the rows of q-tile
 * j->guard_tile[k], O into the scratch o ([B, rows, H, D]), its LSE the k-th [B, H, BM] block of
 * dense; no mask, decisions nor row maxima (the call's R is untouched), no tile count. */
la_attn_params guard_sample_params(const be_job *j, int k, void *o, float *dense);

/* The comparison of the call j's LSE with the n_tiles dense samples' in dense (held: j->held). */
la_guard_params guard_compare_params(const be_job *j, const float *dense, int n_tiles);

#endif /* LA_ENGINE_GUARD_H */
