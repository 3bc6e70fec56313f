/*
 * bench_util.h — what the bench programs (bench_daemon, bench_throughput, ipc_probe) share.
 * Header only: static inline helpers, so that each program builds from its one source file.
 */
#ifndef LA_BENCH_UTIL_H
#define LA_BENCH_UTIL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "la_attn.h"
#ifdef LA_HAVE_CUDA
#include <cuda.h>

/* A cuMemCreate allocation on GPU dev exportable as a POSIX fd: what the daemon imports by
 * SCM_RIGHTS (PyTorch's expandable_segments memory is made so). */
static inline CUmemAllocationProp bench_vmm_prop(int dev)
{
    CUmemAllocationProp p;
    memset(&p, 0, sizeof p);
    p.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    p.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    p.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = dev;
    return p;
}
#endif

/* A dense-threshold call on four contiguous bf16 tensors [B, S, H, D] (self-attention, so
 * Sq = Sk = S): the tensors, their strides, the shape, the 1/sqrt(D) scale, tau -INFINITY (every
 * tile kept), `mode` and the alternating direction. The rest of *p (mask, tiles, threads) is the
 * caller's. */
static inline void bench_bf16_params(la_attn_params *p, const void *q, const void *k,
                                     const void *v, void *o, int B, int S, int H, int D,
                                     la_mode mode)
{
    p->q = q, p->k = k, p->v = v, p->o = o;
    int64_t st[4] = {(int64_t)S * H * D, (int64_t)H * D, D, 1};
    memcpy(p->q_stride, st, sizeof st);
    memcpy(p->k_stride, st, sizeof st);
    memcpy(p->v_stride, st, sizeof st);
    memcpy(p->o_stride, st, sizeof st);
    p->B = B, p->Sq = S, p->Sk = S, p->H = H, p->D = D;
    p->dtype = LA_DTYPE_BF16;
    p->scale = 1.0f / sqrtf((float)D);
    p->tau = -INFINITY;
    p->mode = mode;
    p->direction = LA_DIR_ALTERNATE;
}

#endif
