/*
 * guard_cuda.h — private to the CUDA backend: the warm seed, the guardrail's check and the
 * held-row fill of one call in stream order (guard_cuda.c), so that backend_cuda.c only calls
 * four hooks around its launch. Everything runs on the device's worker thread, except
 * gguard_done (the stream's host function: no CUDA call).
 */
#ifndef LA_ENGINE_GUARD_CUDA_H
#define LA_ENGINE_GUARD_CUDA_H

#ifdef LA_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "backend.h"

typedef struct gguard {
    void *scratch; /* device: the call's LSE when it has none, the samples' LSE and O */
    size_t scratch_bytes;
    unsigned long long *d_counts; /* [n_slots] rows restored by the call of a counter slot */
    unsigned long long *h_counts; /* pinned copies */
    int n_slots;
} gguard;

void gguard_init(gguard *gg, int n_slots);
/* After the stream is idle. */
void gguard_teardown(gguard *gg);
/* Before the kernel: held bits zeroed when the region was just set to all ones (filled), the
 * seed uploaded and ANDed in, and the call's LSE pointed at scratch when the guard checks a
 * call that asked for none. */
cudaError_t gguard_before(gguard *gg, be_job *j, int filled, cudaStream_t stream);
/* After the kernel, before the client's event (the samples read Q, K, V): the dense samples,
 * the comparison (restored rows counted in slot), the fill of held rows. */
cudaError_t gguard_after(gguard *gg, be_job *j, int slot, cudaStream_t stream);
/* The host function: the restored count, and the capture from the refreshed host view. */
void gguard_done(gguard *gg, be_job *j, int slot);
#endif

#endif /* LA_ENGINE_GUARD_CUDA_H */
