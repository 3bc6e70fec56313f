/*
 * attn_dispatch.cu — private: the one selector of CUDA kernel variants. la_cuda_tile_sizes,
 * la_cuda_supported and la_attn_fwd_cuda all go through select(), so what is advertised is
 * what runs. Also the host half of a call: tile flags from the must-do / must-skip ranges,
 * kernel parameters, direction.
 *
 * Pruning: build with -DLA_CUDA_NO_HD64 or -DLA_CUDA_NO_HD128 (and leave the instance file
 * out) to drop a head dim.
 */
#include <float.h>
#include <math.h>
#include <string.h>

#include "attn_fwd.cuh"
#include "la_cuda.h"

namespace {

typedef cudaError_t (*launch_fn)(const la_cuda::KParams &, int, int, int, cudaStream_t);

struct Variant {
    int head_dim;
    la_dtype dtype;
    int min_cc;      /* mma.sync bf16/f16, ldmatrix, cp.async: sm_80 and later */
    int bm, bn;
    launch_fn skip;  /* skipping compiled in */
    launch_fn dense; /* skipping compiled out */
};

#define LA_VARIANT(D, DT, T)                                                                  \
    {D, DT, 80, la_cuda::Tiles<D>::BM, la_cuda::Tiles<D>::BN, &la_cuda::launch<D, T, true>,   \
     &la_cuda::launch<D, T, false>}

const Variant kVariants[] = {
#ifndef LA_CUDA_NO_HD64
    LA_VARIANT(64, LA_DTYPE_BF16, __nv_bfloat16),
    LA_VARIANT(64, LA_DTYPE_F16, __half),
#endif
#ifndef LA_CUDA_NO_HD128
    LA_VARIANT(128, LA_DTYPE_BF16, __nv_bfloat16),
    LA_VARIANT(128, LA_DTYPE_F16, __half),
#endif
};

const Variant *select_variant(int head_dim, la_dtype dtype, int cc) {
    for (const Variant &v : kVariants)
        if (v.head_dim == head_dim && v.dtype == dtype && cc >= v.min_cc) return &v;
    return nullptr;
}

bool aligned16(const void *ptr) { return ((uintptr_t)ptr & 15u) == 0; }

bool strides_ok(const int64_t s[4]) {
    return s[3] == 1 && s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0;
}

int current_cc(int *ret_cc) {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return -1;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
        return -1;
    *ret_cc = 10 * major + minor;
    return 0;
}

} /* namespace */

extern "C" int la_cuda_tile_sizes(int head_dim, la_dtype dtype, int cc, int32_t *ret_bm,
                                  int32_t *ret_bn) {
    if (!ret_bm || !ret_bn) return LA_EINVAL;
    const Variant *v = select_variant(head_dim, dtype, cc);
    if (!v) return LA_ENOTSUP;
    *ret_bm = v->bm;
    *ret_bn = v->bn;
    return 0;
}

extern "C" int la_cuda_supported(const la_attn_params *p, int cc) {
    if (!p) return LA_EINVAL;
    int rc = la_attn_validate(p);
    if (rc != 0) return rc;
    const Variant *v = select_variant(p->D, p->dtype, cc);
    if (!v) return LA_ENOTSUP;
    if (p->BM != v->bm || p->BN != v->bn) return LA_EINVAL;
    if (!strides_ok(p->q_stride) || !strides_ok(p->k_stride) || !strides_ok(p->v_stride) ||
        !strides_ok(p->o_stride))
        return LA_ENOTSUP;
    if (!aligned16(p->q) || !aligned16(p->k) || !aligned16(p->v) || !aligned16(p->o))
        return LA_ENOTSUP;
    const int64_t nQ = la_tiles(p->Sq, p->BM), nK = la_tiles(p->Sk, p->BN);
    if (nK > LA_CUDA_MAX_K_TILES) return LA_ENOTSUP;
    if (nQ > 0x7fffffff || p->H > 65535 || p->B > 65535) return LA_ENOTSUP;
    if (p->mode != LA_MODE_DENSE && !p->mask) return LA_EINVAL;
    return 0;
}

extern "C" cudaError_t la_attn_fwd_cuda_variant(const la_attn_params *p, int variant,
                                                cudaStream_t stream) {
    int cc = 0;
    if (!p || current_cc(&cc) != 0) return cudaErrorInvalidValue;
    if (la_cuda_supported(p, cc) != 0) return cudaErrorInvalidValue;
    const Variant *v = select_variant(p->D, p->dtype, cc);
    la_cuda::KParams kp;
    memset(&kp, 0, sizeof kp);
    kp.nK = la_tiles(p->Sk, p->BN);
    kp.W = la_mask_words(kp.nK);
    bool any_skip_only = false;
    if (p->n_must_do > 0 || p->n_must_skip > 0) {
        la_tile_flags(p, kp.must_do, kp.skip_only);
        for (int w = 0; w < kp.W; ++w) any_skip_only |= kp.skip_only[w] != 0;
    }
    /* Mode DENSE reads and writes no mask; it visits every tile but the must-skip-only ones,
     * so the build without skipping runs it when there are none. */
    const bool dense_plain = p->mode == LA_MODE_DENSE && !any_skip_only;
    launch_fn fn;
    switch (variant) {
    case LA_CUDA_VARIANT_AUTO: fn = dense_plain ? v->dense : v->skip; break;
    case LA_CUDA_VARIANT_SKIP: fn = v->skip; break;
    case LA_CUDA_VARIANT_DENSE_ONLY:
        if (!dense_plain) return cudaErrorInvalidValue;
        fn = v->dense;
        break;
    default: return cudaErrorInvalidValue;
    }
    if (p->B == 0 || p->H == 0 || p->Sq == 0) return cudaSuccess; /* nothing to compute */

    kp.q = p->q;
    kp.k = p->k;
    kp.v = p->v;
    kp.o = p->o;
    kp.lse = p->lse;
    kp.q_sb = p->q_stride[0], kp.q_ss = p->q_stride[1], kp.q_sh = p->q_stride[2];
    kp.k_sb = p->k_stride[0], kp.k_ss = p->k_stride[1], kp.k_sh = p->k_stride[2];
    kp.v_sb = p->v_stride[0], kp.v_ss = p->v_stride[1], kp.v_sh = p->v_stride[2];
    kp.o_sb = p->o_stride[0], kp.o_ss = p->o_stride[1], kp.o_sh = p->o_stride[2];
    kp.lse_sb = p->lse_stride[0], kp.lse_sh = p->lse_stride[1], kp.lse_ss = p->lse_stride[2];
    kp.Sq = p->Sq;
    kp.Sk = p->Sk;
    /* scale * log2(e) rounded exactly as the CPU reference does, so that votes agree. */
    kp.c = p->scale * 1.44269504088896340736f;
    kp.tau = p->tau == INFINITY ? FLT_MAX : p->tau; /* see the votes in attn_fwd.cuh */
    kp.mode = p->mode;
    kp.desc = p->direction == LA_DIR_DESCENDING ||
              (p->direction == LA_DIR_ALTERNATE && (p->step & 1) == 0);
    kp.mask = p->mask;
    kp.dec = p->decisions;
    kp.m_sb = p->mask_stride[0], kp.m_sh = p->mask_stride[1], kp.m_sm = p->mask_stride[2];
    kp.tiles = (unsigned long long *)p->ret_tiles_computed;
    return fn(kp, la_tiles(p->Sq, p->BM), p->H, p->B, stream);
}

extern "C" cudaError_t la_attn_fwd_cuda(const la_attn_params *p, cudaStream_t stream) {
    return la_attn_fwd_cuda_variant(p, LA_CUDA_VARIANT_AUTO, stream);
}
