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

#endif /* LA_ENGINE_GUARD_H */
