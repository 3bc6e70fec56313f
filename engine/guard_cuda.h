/*
 * guard_cuda.h — private to the CUDA backend: the warm seed, the guardrail's check and the
 * held-row fill of one call, in its lane's stream (guard_cuda.c), so that backend_cuda.c only
 * calls a few hooks around its launch. The launcher calls the enqueueing ones; gguard_done is
 * the service thread's (no CUDA call), before the call's counter slot goes to another call.
 */
#ifndef LA_ENGINE_GUARD_CUDA_H
#define LA_ENGINE_GUARD_CUDA_H

#ifdef LA_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "backend.h"

typedef struct gguard {
    unsigned long long *d_counts; /* [n_slots] rows restored by the call of a counter slot */
    unsigned long long *h_counts; /* pinned copies */
    void **scratch;               /* [n_slots] the call's scratch (stream-ordered), or NULL */
    int n_slots;
} gguard;

/* No CUDA call: the counters come with gguard_alloc (the device's context current). */
void gguard_init(gguard *gg, int n_slots);
cudaError_t gguard_alloc(gguard *gg);
/* After the streams are idle. */
void gguard_teardown(gguard *gg);
/* Before the kernel, in stream: held bits zeroed when the region was just set to all ones
 * (filled), the seed uploaded and ANDed in; for a checked call its scratch (the call's LSE
 * when it asked for none, the samples' LSE and their gathered Q), allocated stream-ordered. */
cudaError_t gguard_before(gguard *gg, be_job *j, int slot, int filled, cudaStream_t stream);
/* After the kernel, before the doorbell's done word and the client's event (the samples read
 * Q, K, V): the dense samples (one LSE-only call), the comparison (restored rows counted in
 * slot), the scratch freed, the fill of held rows. */
cudaError_t gguard_after(gguard *gg, be_job *j, int slot, cudaStream_t stream);
/* A launch failed after gguard_before: its scratch is freed in stream order. */
void gguard_abort(gguard *gg, int slot, cudaStream_t stream);
/* The call's work is over: its restored count (j->guard_restored). */
void gguard_done(gguard *gg, be_job *j, int slot);
#endif

#endif /* LA_ENGINE_GUARD_CUDA_H */
