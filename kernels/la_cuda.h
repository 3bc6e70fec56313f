/*
 * la_cuda.h — private: the CUDA forward kernels of kernels/, C-callable. Two families: the
 * Hopper kernel (fwd_sm90.cuh: wgmma, TMA, mbarriers, warp specialisation; compute capability
 * 9.0 only) and the portable one (fwd_sm80.cuh: mma.sync + ldmatrix + cp.async; sm_80 and
 * later). One selector (attn_dispatch.cu) answers both "is this supported?" and "run it", so
 * what is advertised is what runs; tile sizes depend on the family, hence on cc.
 * LA_CUDA_PORTABLE=1 in the environment (read once per process) selects the portable family
 * everywhere.
 *
 * Semantics: exactly la_attn.h / SKIP-SEMANTICS.md. Restrictions of these kernels on top of
 * la_attn_validate():
 *   - dtype F16 or BF16; head dim 64 or 128; the last (d) stride of Q, K, V, O is 1;
 *   - Q, K, V, O base pointers 16-byte aligned and their b, s, h strides multiples of 8
 *     elements (tiles are copied in 16-byte pieces with cp.async); any order of b, s, h;
 *   - nK = ceil(Sk / BN) <= LA_CUDA_MAX_K_TILES (the must-do / must-skip tile flags travel by
 *     value in the kernel parameters);
 *   - p->BM, p->BN equal la_cuda_tile_sizes() for (D, dtype, cc).
 */
#ifndef LA_CUDA_H
#define LA_CUDA_H

#include <stdint.h>

#include <cuda_runtime_api.h>

#include "la_attn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Most k-tiles per mask row the CUDA kernels accept (128 words of flags). */
#define LA_CUDA_MAX_K_TILES 4096

/* Tile sizes of the kernel that runs (head_dim, dtype) on compute capability cc (10*major +
 * minor, e.g. 90 for H100). Returns 0 and sets *ret_bm, *ret_bn, or LA_ENOTSUP when no kernel
 * exists (LA_EINVAL for NULL outputs). */
int la_cuda_tile_sizes(int head_dim, la_dtype dtype, int cc, int32_t *ret_bm, int32_t *ret_bn);

/* Name of the kernel family and instance that runs (head_dim, dtype) on cc, e.g.
 * "sm90_hd128_bf16" or "sm80_hd64_f16"; NULL when none. A static string. */
const char *la_cuda_variant_name(int head_dim, la_dtype dtype, int cc);

/* 0 when la_attn_fwd_cuda(p) can run on a device of compute capability cc; LA_EINVAL when p is
 * invalid (la_attn_validate, or BM/BN not the kernel's), LA_ENOTSUP when valid but outside the
 * restrictions above. Reads only p's scalars and pointer values (never dereferences them,
 * except must_do/must_skip, which are host arrays). */
int la_cuda_supported(const la_attn_params *p, int cc);

/* Enqueues the forward attention of p on stream. q, k, v, o, lse, mask, decisions are device
 * pointers; must_do / must_skip are host arrays (turned into tile flags here, passed by value);
 * p->ret_tiles_computed, when not NULL, is a DEVICE pointer to a 64-bit counter the kernel adds
 * the number of computed tiles to (it is not zeroed here). p->threads is ignored. Never
 * synchronises. Returns cudaSuccess, cudaErrorInvalidValue when la_cuda_supported() refuses p
 * on the current device, or the launch error. */
cudaError_t la_attn_fwd_cuda(const la_attn_params *p, cudaStream_t stream);

/* For tests and benchmarks: which kernel build runs p.
 *   LA_CUDA_VARIANT_AUTO: the one la_attn_fwd_cuda uses (the build with skipping compiled out
 *     for mode DENSE without must-skip-only tiles, the skipping build otherwise);
 *   LA_CUDA_VARIANT_SKIP: always the skipping build (mode DENSE too);
 *   LA_CUDA_VARIANT_DENSE_ONLY: skipping compiled out; only for mode DENSE with no must-skip-only
 *     tile (cudaErrorInvalidValue otherwise).
 * OR-ed with LA_CUDA_VARIANT_PORTABLE: the portable family runs, as on a device of compute
 * capability 8.0 (p->BM, p->BN must then be la_cuda_tile_sizes(D, dtype, 80)'s), so that a
 * benchmark compares both families in one process.
 * OR-ed with LA_CUDA_VARIANT_ONE_CTA_PER_TILE: the Hopper family launches one CTA per q-tile
 * instead of its persistent grid (the portable family always does), for the same purpose. */
enum {
    LA_CUDA_VARIANT_AUTO = 0,
    LA_CUDA_VARIANT_SKIP = 1,
    LA_CUDA_VARIANT_DENSE_ONLY = 2,
    LA_CUDA_VARIANT_PORTABLE = 4,
    LA_CUDA_VARIANT_ONE_CTA_PER_TILE = 8
};
cudaError_t la_attn_fwd_cuda_variant(const la_attn_params *p, int variant, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif /* LA_CUDA_H */
