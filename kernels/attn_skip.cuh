/*
 * attn_skip.cuh — private: the skip logic of SKIP-SEMANTICS.md for every GPU forward kernel
 * (fwd_sm80.cuh, fwd_sm90.cuh), so that no kernel restates the semantics:
 *   - KParams, the kernel parameters every family shares (by value);
 *   - the effective live set of a CTA's (b, h, m) row, read once into shared memory;
 *   - the visit order (LiveWalk / next_live over the set bits, descending or ascending);
 *   - the keep vote of one warp and the CTA's keep bits;
 *   - the write-back of the mask row (in place, or to the decisions buffer in a dry run) and
 *     the computed-tile counter;
 *   - on the host, what every family's launcher does alike: its kernel's dynamic shared-memory
 *     limit, set once per device (smem_limit_once), and the instances (LA_FWD_INSTANCE).
 * A kernel calls skip_row_load() with all its threads, walks the row, calls skip_vote() per
 * warp and tile, and skip_row_store() with a group of threads once every vote is in.
 */
#ifndef LA_ATTN_SKIP_CUH
#define LA_ATTN_SKIP_CUH

#include <stdint.h>

#include <cuda_runtime.h>

#include "la_cuda.h"

namespace la_cuda {

constexpr int kFlagWords = LA_CUDA_MAX_K_TILES / 32;

/* Kernel parameters, by value (about 1.2 KB). Strides in elements. */
struct KParams {
    const void *q, *k, *v; /* Q: [B, Sq, H, D]; K, V: [B, Sk, H, D]; d stride 1 */
    void *o;               /* O: [B, Sq, H, D], d stride 1 */
    float *lse;            /* LSE: [B, H, Sq] f32 or NULL */
    float *rmax;           /* carried row maxima R: [B, H, Sq] f32, in and out, or NULL */
    int64_t q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, o_sb, o_ss, o_sh;
    int64_t lse_sb, lse_sh, lse_ss;
    int64_t rmax_sb, rmax_sh, rmax_ss;
    int32_t B, H, Sq, Sk, nQ, nK, W; /* W = ceil(nK / 32) mask words per row */
    float c;               /* scale * log2(e): raw score -> log2 units */
    float tau;
    int32_t mode;          /* la_mode: DENSE, OBSERVE or SKIP */
    int32_t desc;          /* 1: visit k-tiles in descending order */
    uint32_t *mask;        /* mask row (b, h, m) at b*m_sb + h*m_sh + m*m_sm words */
    uint32_t *dec;         /* dry run: new rows go here (same strides) instead of mask */
    int64_t m_sb, m_sh, m_sm;
    unsigned long long *tiles; /* device counter of computed tiles, or NULL */
    const int32_t *order;  /* Hopper family, mode SKIP: q-tile visited by CTA x of head (b, h)
                            * is order[(b*H + h)*nQ + x] (heaviest rows first), or NULL */
    int32_t persist;       /* Hopper family: 1 = persistent grid (a CTA per multiprocessor
                            * takes q-tiles in turn), 0 = one CTA per q-tile */
    uint32_t must_do[kFlagWords];   /* bit n: k-tile n holds a must-do key */
    uint32_t skip_only[kFlagWords]; /* bit n: every key of k-tile n is must-skip only */
};

#if defined(__CUDACC__)

/* Valid bits of mask word w of a row of nK tiles (bits >= nK are never visited, written 0). */
__device__ __forceinline__ uint32_t skip_valid_bits(int w, int W, int nK) {
    return (w == W - 1 && (nK & 31)) ? ((1u << (nK & 31)) - 1u) : 0xffffffffu;
}

/* Mode SKIP with tracking (mask update) and votes: which parts of the logic a call needs.
 * At tau = -inf every visited tile is kept (any margin exceeds it), so no vote is computed. */
struct SkipMode {
    bool track;  /* the mask row is rewritten (modes OBSERVE, SKIP) */
    bool voting; /* votes are computed (tracking and tau > -inf) */
};
__device__ __forceinline__ SkipMode skip_mode(const KParams &p) {
    SkipMode s;
    s.track = p.mode != LA_MODE_DENSE;
    s.voting = s.track && p.tau != -INFINITY;
    return s;
}

/* Effective live set of row (b, h, m) into s_live[0..W), s_keep cleared; threads tid of nt
 * share the words. Visited: mode SKIP (live | must-do) & ~must-skip-only; modes DENSE and
 * OBSERVE every tile but the must-skip-only ones (as the CPU reference, kernels/ref.c). The
 * caller synchronises before anyone walks s_live. */
__device__ __forceinline__ void skip_row_load(const KParams &p, int b, int h, int m, uint32_t *s_live,
                                              uint32_t *s_keep, int tid, int nt) {
    const uint32_t *row_in = p.mask ? p.mask + b * p.m_sb + h * p.m_sh + m * p.m_sm : nullptr;
    for (int w = tid; w < p.W; w += nt) {
        uint32_t live = skip_valid_bits(w, p.W, p.nK) & ~p.skip_only[w];
        if (p.mode == LA_MODE_SKIP) live &= row_in[w] | p.must_do[w];
        s_live[w] = live;
        s_keep[w] = 0;
    }
}

/* Number of tiles row (b, h, m) visits (the popcount of its effective live set). */
__device__ __forceinline__ int skip_row_count(const KParams &p, int b, int h, int m) {
    const uint32_t *row_in = p.mask ? p.mask + b * p.m_sb + h * p.m_sh + m * p.m_sm : nullptr;
    int cnt = 0;
    for (int w = 0; w < p.W; ++w) {
        uint32_t live = skip_valid_bits(w, p.W, p.nK) & ~p.skip_only[w];
        if (p.mode == LA_MODE_SKIP) live &= row_in[w] | p.must_do[w];
        cnt += __popc(live);
    }
    return cnt;
}

/* Walks the live k-tiles of a row in the visiting direction. live: W words in shared memory
 * (bits past nK are 0); w: the word being walked, rem: its bits not yet visited. Each step is
 * a few register operations; shared memory is read once per word. Every thread that walks the
 * same row sees the same sequence: uniform control flow. next() returns -1 at the end. */
struct LiveWalk {
    int w;
    uint32_t rem;
    __device__ __forceinline__ void start(bool desc, int W) {
        w = desc ? W : -1;
        rem = 0u;
    }
    __device__ __forceinline__ int next(const uint32_t *live, bool desc, int W) {
        while (rem == 0) {
            w += desc ? -1 : 1;
            if (w < 0 || w >= W) return -1;
            rem = live[w];
        }
        const int bit = desc ? 31 - __clz(rem) : __ffs(rem) - 1;
        rem &= ~(1u << bit);
        return (w << 5) + bit;
    }
};

/* Next live k-tile after n in the visiting direction, or -1, scanning the words from shared
 * memory: no state across tiles (two registers fewer than LiveWalk). n = W*32 (descending) or
 * -1 (ascending) gives the first. */
__device__ __forceinline__ int next_live(const uint32_t *live, int n, bool desc, int W) {
    if (desc) {
        int i = n - 1;
        while (i >= 0) {
            int w = i >> 5;
            uint32_t bits = live[w] & (0xffffffffu >> (31 - (i & 31)));
            if (bits) return (w << 5) + 31 - __clz(bits);
            i = (w << 5) - 1;
        }
    } else {
        int i = n + 1;
        while (i < (W << 5)) {
            int w = i >> 5;
            uint32_t bits = live[w] & (0xffffffffu << (i & 31));
            if (bits) return (w << 5) + __ffs(bits) - 1;
            i = (w + 1) << 5;
        }
    }
    return -1;
}

/* One warp's keep vote on tile n. dmax: max over this thread's valid rows of t_i - m_i (raw
 * score units; -inf for rows past Sq, +inf on the first tile of a row). Since rounding is
 * monotone, fl(dmax * c) > tau exactly when some row has fl((t_i - m_i) * c) > tau, which is
 * the CPU reference's fp32 test. tau = +inf arrives as FLT_MAX (see attn_dispatch.cu), so a
 * first tile (+inf margin) is kept and no finite one is. A NaN margin never keeps. */
__device__ __forceinline__ void skip_vote(float dmax, float c, float tau, int n, uint32_t *s_keep) {
    if (__any_sync(0xffffffffu, dmax * c > tau) && (threadIdx.x & 31) == 0)
        atomicOr(&s_keep[n >> 5], 1u << (n & 31));
}

/* Carried row maxima (SKIP-SEMANTICS "Carried row maxima"). R [B, H, Sq] f32, element (b, h,
 * s) at b*rmax_sb + h*rmax_sh + s*rmax_ss. The votes compare against fmaxf(m_i, R_i) (fmaxf
 * drops a NaN R_i, which so carries nothing); the softmax never sees R. The element is read once
 * at the start by lane tq == 0 of the quad that holds the row and shuffled to the other three,
 * and written at the end by the same lane: one thread owns it, no race with the in-place write.
 * All 32 lanes of the warp call this. Rows past Sq and calls without R get -inf. */
__device__ __forceinline__ float skip_carried_load(const KParams &p, int b, int h, int row) {
    const int lane = threadIdx.x & 31;
    float x = -INFINITY;
    if (p.rmax && (lane & 3) == 0 && row < p.Sq) x = p.rmax[b * p.rmax_sb + h * p.rmax_sh + row * p.rmax_ss];
    return __shfl_sync(0xffffffffu, x, lane & ~3);
}
/* R_i = max(R_i, m_i) at the end of the row (every mode); lane tq == 0 of the quad, as the
 * load. r: what skip_carried_load returned (the SKIP builds), or NAN to read R here (the builds
 * without skipping, which keep no register for it). m: the row's running maximum. */
__device__ __forceinline__ void skip_carried_store(const KParams &p, int b, int h, int row, float r, float m) {
    if (p.rmax && (threadIdx.x & 3) == 0 && row < p.Sq) {
        float *at = p.rmax + b * p.rmax_sb + h * p.rmax_sh + row * p.rmax_ss;
        if (r != r) r = *at;
        *at = fmaxf(m, r);
    }
}

/* Writes row (b, h, m) once every vote is in s_keep (the caller synchronises its voters
 * first), and adds the row's computed tiles to p.tiles. Threads tid of nt. Visited tiles:
 * keep(n) (SKIP) or old & keep(n) (OBSERVE), keep(n) = vote | must-do (every visited tile at
 * tau = -inf); unvisited tiles keep their old bit; bits past nK are written 0; mode DENSE
 * leaves the mask (and any decisions buffer) alone. */
__device__ __forceinline__ void skip_row_store(const KParams &p, int b, int h, int m,
                                               const uint32_t *s_live, const uint32_t *s_keep,
                                               int tid, int nt) {
    const SkipMode sm = skip_mode(p);
    uint32_t *row_in = p.mask ? p.mask + b * p.m_sb + h * p.m_sh + m * p.m_sm : nullptr;
    uint32_t *row_out = p.dec ? p.dec + b * p.m_sb + h * p.m_sh + m * p.m_sm : row_in;
    if (sm.track)
        for (int w = tid; w < p.W; w += nt) {
            const uint32_t vis = s_live[w], old = row_in[w];
            const uint32_t keep = sm.voting ? s_keep[w] | (p.must_do[w] & vis) : vis;
            const uint32_t upd = p.mode == LA_MODE_SKIP ? keep : (old & keep);
            row_out[w] = ((vis & upd) | (~vis & old)) & skip_valid_bits(w, p.W, p.nK);
        }
    if (p.tiles && tid == 0) {
        unsigned long long cnt = 0;
        for (int w = 0; w < p.W; ++w) cnt += __popc(s_live[w]);
        atomicAdd(p.tiles, cnt);
    }
}

/* The dynamic shared-memory limit of kern is a per-device function attribute: set to bytes
 * once per device; *done is the launcher's own bitmask of devices (a benign race sets it
 * twice). */
template <typename Kernel>
inline cudaError_t smem_limit_once(Kernel kern, size_t bytes, unsigned long long *done) {
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    const unsigned long long bit = 1ull << (dev & 63);
    if (!(__atomic_load_n(done, __ATOMIC_ACQUIRE) & bit)) {
        err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
        if (err != cudaSuccess) return err;
        __atomic_fetch_or(done, bit, __ATOMIC_RELEASE);
    }
    return cudaSuccess;
}

/* An instance file's explicit instantiation of its family's launch<D, T, SKIP> (expanded in
 * the family's namespace), with skipping and with it compiled out. */
#define LA_FWD_INSTANCE(D, T)                                                                  \
    template cudaError_t launch<D, T, true>(const KParams &, int, int, int, cudaStream_t);     \
    template cudaError_t launch<D, T, false>(const KParams &, int, int, int, cudaStream_t);

#endif /* __CUDACC__ */

} /* namespace la_cuda */

#endif /* LA_ATTN_SKIP_CUH */
