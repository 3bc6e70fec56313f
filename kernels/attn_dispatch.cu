/*
 * attn_dispatch.cu — private: the one selector of CUDA kernel variants. la_cuda_tile_sizes,
 * la_cuda_supported, la_cuda_variant_name and la_attn_fwd_cuda all go through select_variant(),
 * so what is advertised is what runs. Also the host half of a call: tile flags from the must-do
 * / must-skip ranges, kernel parameters, direction.
 *
 * Variants are keyed by {compute capability range, head dim, dtype}; the first match wins, so
 * the Hopper family (wgmma, sm_90a code: exactly cc 9.0) comes before the portable one (sm_80
 * and later, also sm_100+, which has no wgmma). The instances that exist are the ones
 * kernels/module.mk built: it passes -DLA_INST_<family>_hd<D>_<dtype> for each (make variables
 * LA_FAMILIES, LA_HEAD_DIMS, LA_DTYPES prune the set). LA_CUDA_PORTABLE=1 in the environment
 * (read once) hides the Hopper family, so that the portable kernel can be tested on an H100.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fwd_sm80.cuh"
#include "fwd_sm90.cuh"
#include "la_cuda.h"

namespace {

typedef cudaError_t (*launch_fn)(const la_cuda::KParams &, int, int, int, cudaStream_t);

struct Variant {
    const char *name;
    int min_cc, max_cc; /* compute capability range, 10*major + minor */
    bool hopper;        /* hidden by LA_CUDA_PORTABLE=1 */
    int head_dim;
    la_dtype dtype;
    int bm, bn;
    launch_fn skip;  /* skipping compiled in */
    launch_fn dense; /* skipping compiled out */
};

/* sm_90a code runs on compute capability 9.0 only (the "a" features are not forward
 * compatible). */
#define LA_SM90_VARIANT(D, DT, T, TN)                                                          \
    {"sm90_hd" #D "_" TN, 90, 90, true, D, DT, la_cuda::sm90::Tiles<D>::BM,                     \
     la_cuda::sm90::Tiles<D>::BN, &la_cuda::sm90::launch<D, T, true>,                           \
     &la_cuda::sm90::launch<D, T, false>}
/* mma.sync bf16/f16, ldmatrix, cp.async: sm_80 and later. */
#define LA_SM80_VARIANT(D, DT, T, TN)                                                          \
    {"sm80_hd" #D "_" TN, 80, 1 << 30, false, D, DT, la_cuda::sm80::Tiles<D>::BM,               \
     la_cuda::sm80::Tiles<D>::BN, &la_cuda::sm80::launch<D, T, true>,                           \
     &la_cuda::sm80::launch<D, T, false>}

const Variant kVariants[] = {
#ifdef LA_INST_sm90_hd64_bf16
    LA_SM90_VARIANT(64, LA_DTYPE_BF16, __nv_bfloat16, "bf16"),
#endif
#ifdef LA_INST_sm90_hd64_f16
    LA_SM90_VARIANT(64, LA_DTYPE_F16, __half, "f16"),
#endif
#ifdef LA_INST_sm90_hd128_bf16
    LA_SM90_VARIANT(128, LA_DTYPE_BF16, __nv_bfloat16, "bf16"),
#endif
#ifdef LA_INST_sm90_hd128_f16
    LA_SM90_VARIANT(128, LA_DTYPE_F16, __half, "f16"),
#endif
#ifdef LA_INST_sm80_hd64_bf16
    LA_SM80_VARIANT(64, LA_DTYPE_BF16, __nv_bfloat16, "bf16"),
#endif
#ifdef LA_INST_sm80_hd64_f16
    LA_SM80_VARIANT(64, LA_DTYPE_F16, __half, "f16"),
#endif
#ifdef LA_INST_sm80_hd128_bf16
    LA_SM80_VARIANT(128, LA_DTYPE_BF16, __nv_bfloat16, "bf16"),
#endif
#ifdef LA_INST_sm80_hd128_f16
    LA_SM80_VARIANT(128, LA_DTYPE_F16, __half, "f16"),
#endif
    {nullptr, 0, 0, false, 0, LA_DTYPE_F32, 0, 0, nullptr, nullptr} /* end (never matches) */
};

bool portable_only() {
    static int cached = -1; /* benign race: every thread computes the same value */
    if (cached < 0) {
        const char *e = getenv("LA_CUDA_PORTABLE");
        cached = e && e[0] && strcmp(e, "0") != 0;
    }
    return cached == 1;
}

const Variant *select_variant(int head_dim, la_dtype dtype, int cc) {
    const bool portable = portable_only();
    for (const Variant &v : kVariants)
        if (v.name && v.head_dim == head_dim && v.dtype == dtype && cc >= v.min_cc && cc <= v.max_cc &&
            !(portable && v.hopper))
            return &v;
    return nullptr;
}

bool aligned16(const void *ptr) { return ((uintptr_t)ptr & 15u) == 0; }

bool strides_ok(const int64_t s[4]) {
    return s[3] == 1 && s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0;
}

/* Compute capability of the current device, read once per device (launches never ask the
 * driver again). */
int current_cc(int *ret_cc) {
    static int cc_of[64]; /* 0: not read yet */
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return -1;
    if (dev >= 0 && dev < 64) {
        const int c = __atomic_load_n(&cc_of[dev], __ATOMIC_RELAXED);
        if (c) {
            *ret_cc = c;
            return 0;
        }
    }
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
        return -1;
    *ret_cc = 10 * major + minor;
    if (dev >= 0 && dev < 64) __atomic_store_n(&cc_of[dev], *ret_cc, __ATOMIC_RELAXED);
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

extern "C" const char *la_cuda_variant_name(int head_dim, la_dtype dtype, int cc) {
    const Variant *v = select_variant(head_dim, dtype, cc);
    return v ? v->name : nullptr;
}

extern "C" int la_cuda_supported(const la_attn_params *p, int cc) {
    if (!p) return LA_EINVAL;
    int rc = la_attn_validate(p);
    if (rc != 0) return rc;
    const Variant *v = select_variant(p->D, p->dtype, cc);
    if (!v) return LA_ENOTSUP;
    if (p->BM != v->bm || p->BN != v->bn) return LA_EINVAL;
    if (!strides_ok(p->q_stride) || !strides_ok(p->k_stride) || !strides_ok(p->v_stride) ||
        (p->o && !strides_ok(p->o_stride)))
        return LA_ENOTSUP;
    if (!aligned16(p->q) || !aligned16(p->k) || !aligned16(p->v) || (p->o && !aligned16(p->o)))
        return LA_ENOTSUP;
    if (p->row_max && ((uintptr_t)p->row_max & 3u)) return LA_ENOTSUP; /* f32 loads */
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
    if (variant & LA_CUDA_VARIANT_PORTABLE) {
        if (cc < 80) return cudaErrorInvalidValue;
        cc = 80; /* the portable family's code runs on every device it was built for */
        variant &= ~LA_CUDA_VARIANT_PORTABLE;
    }
    const bool persist = !(variant & LA_CUDA_VARIANT_ONE_CTA_PER_TILE);
    variant &= ~LA_CUDA_VARIANT_ONE_CTA_PER_TILE;
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
    kp.rmax = p->row_max;
    kp.rmax_sb = p->row_max_stride[0], kp.rmax_sh = p->row_max_stride[1];
    kp.rmax_ss = p->row_max_stride[2];
    kp.B = p->B;
    kp.H = p->H;
    kp.Sq = p->Sq;
    kp.Sk = p->Sk;
    kp.nQ = la_tiles(p->Sq, p->BM);
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
    kp.order = nullptr; /* the Hopper family's launcher sets its own */
    kp.persist = persist;
    return fn(kp, la_tiles(p->Sq, p->BM), p->H, p->B, stream);
}

extern "C" cudaError_t la_attn_fwd_cuda(const la_attn_params *p, cudaStream_t stream) {
    return la_attn_fwd_cuda_variant(p, LA_CUDA_VARIANT_AUTO, stream);
}
