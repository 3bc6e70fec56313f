/*
 * fwd_sm80.cuh — private: the portable LiteAttention forward kernel family (FlashAttention-2
 * style) for sm_80 and later: mma.sync.m16n8k16 tensor cores fed by ldmatrix from XOR-swizzled shared
 * memory, cp.async copies of K/V tiles overlapped with the math, online softmax in the exp2
 * domain with fp32 accumulation, and the skip semantics of SKIP-SEMANTICS.md.
 *
 * One CTA owns one (b, h, q-tile m): BM = NW*16*MT query rows, NW warps of MT 16-row slabs.
 * It reads its mask row once, visits the live k-tiles of the row in the call's direction
 * (iterating over set bits: skipped tiles cost no load, no QK, no softmax, no PV), collects
 * the keep votes with one shared-memory atomicOr per warp and tile, and writes its mask row
 * once at the end.
 *
 * Pipeline per visited tile n (one K and one V buffer, as FlashAttention-2):
 *   wait K(n); barrier; issue V(n); S = Q K(n)^T; wait V(n); barrier; issue K(next live);
 *   softmax + votes; O += P V(n).
 * so V(n) streams in under QK and K(next) under softmax and PV. The barrier after each wait
 * also guarantees that nobody still reads the buffer about to be overwritten.
 *
 * Instances: one per (head dim, dtype) in attn_fwd_hd<D>_<dtype>_sm80.cu; each builds the
 * kernel twice, with skipping (SKIP=true) and with it compiled out (SKIP=false, pure dense).
 * The skip logic itself (live set, walk, votes, write-back) is attn_skip.cuh's.
 */
#ifndef LA_FWD_SM80_CUH
#define LA_FWD_SM80_CUH

#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attn_skip.cuh"

namespace la_cuda {
namespace sm80 {

/* Tile shape per head dim: NW warps, each MT 16-row slabs; BN keys per k-tile. */
/* Chosen on an H100 (bench/RESULTS.md); the macros let bench builds try others. */
#ifndef LA_HD64_NW
#define LA_HD64_NW 4
#define LA_HD64_MT 2
#define LA_HD64_BN 64
#endif
#ifndef LA_HD128_NW
#define LA_HD128_NW 4
#define LA_HD128_MT 2
#define LA_HD128_BN 64
#endif
template <int NW_, int MT_, int BN_> struct ShapeOf {
    static constexpr int NW = NW_, MT = MT_, BN = BN_;
};
template <int D> struct Shape;
template <> struct Shape<64> : ShapeOf<LA_HD64_NW, LA_HD64_MT, LA_HD64_BN> {};
template <> struct Shape<128> : ShapeOf<LA_HD128_NW, LA_HD128_MT, LA_HD128_BN> {};
template <int D> struct Tiles {
    static constexpr int NW = Shape<D>::NW, MT = Shape<D>::MT, BN = Shape<D>::BN;
    static constexpr int BM = NW * 16 * MT;
    static constexpr int NT = NW * 32;
    static constexpr size_t smem_bytes = (size_t)(BM + 2 * BN) * D * 2;
};

template <int D, typename T, bool SKIP>
cudaError_t launch(const KParams &kp, int nQ, int H, int B, cudaStream_t stream);

#ifdef LA_ATTN_FWD_INSTANTIATE /* only instance files compile the kernel body */

/* ---- element types ---------------------------------------------------------------------- */
template <typename T> struct Ty;
template <> struct Ty<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pack(float a, float b) {
        __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<uint32_t *>(&h);
    }
    static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
            "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct Ty<__half> {
    static __device__ __forceinline__ uint32_t pack(float a, float b) {
        __half2 h = __floats2half2_rn(a, b);
        return *reinterpret_cast<uint32_t *>(&h);
    }
    static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
            "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

/* ---- PTX helpers ------------------------------------------------------------------------ */
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
/* 16-byte copy global -> shared; src_bytes 0 zero-fills (rows past Sq / Sk: zeros keep the
 * padded scores finite and 0 * V finite). */
__device__ __forceinline__ void cp16(uint32_t saddr, const void *g, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(saddr), "l"(g),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_wait_all() {
    asm volatile("cp.async.wait_group 0;" ::: "memory");
}
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

/* Copies rows [0, R) of a tile (row r at g + r*row_stride) into swizzled shared memory:
 * element (r, d) at r*D + ((d/8) ^ (r%8))*8 + d%8, so that the 8 rows an ldmatrix phase reads
 * hit 8 distinct 16-byte bank groups. Rows >= valid are zero-filled. */
template <int D, int R, int NT>
__device__ __forceinline__ void load_tile(uint32_t s, const char *g, int64_t row_stride,
                                          int valid, int tid) {
    constexpr int CPR = D / 8;     /* 16-byte chunks per row */
    constexpr int RPI = NT / CPR;  /* rows per pass */
    static_assert(R % RPI == 0, "tile rows must be a multiple of rows per pass");
    const int ch = tid % CPR, r0 = tid / CPR;
    const uint32_t soff = (uint32_t)(r0 * D + ((ch ^ (r0 & 7)) * 8)) * 2;
    const char *gp = g + ((int64_t)r0 * row_stride + ch * 8) * 2;
#pragma unroll
    for (int it = 0; it < R / RPI; ++it) {
        const int r = r0 + it * RPI;
        const bool ok = r < valid;
        cp16(s + soff + (uint32_t)(it * RPI * D * 2), ok ? (const void *)(gp + (int64_t)it * RPI * row_stride * 2) : (const void *)g,
             ok ? 16 : 0);
    }
}

template <int D, typename T, bool SKIP>
__global__ void __launch_bounds__(Tiles<D>::NT, Tiles<D>::NT <= 128 ? 2 : 1) attn_fwd_kernel(const __grid_constant__ KParams p) {
    using TL = Tiles<D>;
    constexpr int NW = TL::NW, MT = TL::MT, BN = TL::BN, BM = TL::BM, NT = TL::NT;
    (void)NW;
    extern __shared__ __align__(128) char smem[];
    __shared__ uint32_t s_live[SKIP ? kFlagWords : 1];
    __shared__ uint32_t s_keep[SKIP ? kFlagWords : 1];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int nK = p.nK, W = p.W;
    const bool desc = p.desc != 0;
    const bool voting = SKIP && skip_mode(p).voting;
    const float tau = p.tau;

    /* Mask row (b, h, m): W words, bit n%32 of word n/32. Read here and again (by the same
     * thread, nobody else writes the row) at the end, so that no register holds it across
     * the main loop. */
    if (SKIP) {
        skip_row_load(p, b, h, m, s_live, s_keep, tid, NT);
        __syncthreads();
    }

    const uint32_t sQ = (uint32_t)__cvta_generic_to_shared(smem);
    const uint32_t sK = sQ + BM * D * 2;
    const uint32_t sV = sK + BN * D * 2;

    const char *gQ = (const char *)p.q + (b * p.q_sb + (int64_t)m * BM * p.q_ss + h * p.q_sh) * 2;
    const char *gK = (const char *)p.k + (b * p.k_sb + h * p.k_sh) * 2;
    const char *gV = (const char *)p.v + (b * p.v_sb + h * p.v_sh) * 2;
    const int q_valid = min(BM, p.Sq - m * BM);
    const bool k_partial = (p.Sk % BN) != 0;

    /* Prologue: Q and the first K tile. */
    /* Finding the next live tile: register walk where registers allow (see next_live). */
    constexpr bool kWalk = D <= 64; /* +6.9% vs +8.5% over dense with the scan (H100) */
    constexpr bool kLateVote = D <= 64; /* see the votes below */
    LiveWalk walk;
    walk.start(desc, W);
    int n = !SKIP ? (desc ? nK - 1 : 0)
            : kWalk ? walk.next(s_live, desc, W)
                    : (desc ? next_live(s_live, W << 5, true, W) : next_live(s_live, -1, false, W));
    load_tile<D, BM, NT>(sQ, gQ, p.q_ss, q_valid, tid);
    if (n >= 0) load_tile<D, BN, NT>(sK, gK + (int64_t)n * BN * p.k_ss * 2, p.k_ss, p.Sk - n * BN, tid);
    cp_commit();

    /* Per-thread rows: slab mt, half r: row warp*16*MT + mt*16 + lane/4 + 8r of the q-tile. */
    const int g = lane >> 2, tq = lane & 3;
    float o[MT][D / 8][4];
    float mrow[MT][2], lrow[MT][2];
    /* Carried row maxima R (SKIP builds: the votes compare against max(m, R)): in registers,
     * or in shared memory where registers are all taken (hd128: four more registers spilled
     * there; one shared load per row and tile instead). Filled before the loop's first
     * barrier, read only after it. */
    constexpr bool kRmaxShared = D > 64;
    float rrow[SKIP && !kRmaxShared ? MT : 1][2];
    __shared__ float s_rmax[SKIP && kRmaxShared ? BM : 1];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            /* Rows past Sq never vote: their running max starts at +inf, so their margin is
             * -inf (their O and LSE become NaN and are never stored). */
            mrow[mt][r] = warp * 16 * MT + mt * 16 + g + 8 * r < q_valid ? -INFINITY : INFINITY;
            lrow[mt][r] = 0.f;
            if (SKIP) {
                const int lr = warp * 16 * MT + mt * 16 + g + 8 * r;
                const float x = skip_carried_load(p, b, h, m * BM + lr);
                if (kRmaxShared) {
                    if (tq == 0) s_rmax[lr] = x;
                } else {
                    rrow[kRmaxShared ? 0 : mt][r] = x;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
            o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
    }

    /* ldmatrix lane addresses (see the fragment layouts of mma.m16n8k16). */
    const uint32_t q_row_off = (uint32_t)((warp * 16 * MT + (lane & 15)) * D * 2);
    const uint32_t q_x = (uint32_t)((lane >> 4) ^ (lane & 7));
    const uint32_t k_row_off = (uint32_t)(((lane & 7) + ((lane >> 4) << 3)) * D * 2);
    const uint32_t k_x = (uint32_t)(((lane >> 3) & 1) ^ (lane & 7));
    const uint32_t v_row_off = (uint32_t)(((lane & 7) + (((lane >> 3) & 1) << 3)) * D * 2);
    const uint32_t v_x = (uint32_t)((lane >> 4) ^ (lane & 7));
    const float c = p.c;

    while (n >= 0) {
        const int nn = !SKIP ? (desc ? n - 1 : (n + 1 < nK ? n + 1 : -1))
                       : kWalk ? walk.next(s_live, desc, W) : next_live(s_live, n, desc, W);
        cp_wait_all();
        __syncthreads(); /* K(n) (and Q) landed; all warps are done with V(previous) */
        load_tile<D, BN, NT>(sV, gV + (int64_t)n * BN * p.v_ss * 2, p.v_ss, p.Sk - n * BN, tid);
        cp_commit();

        /* S = Q K^T: rows of this warp x BN keys, fp32. */
        float s[MT][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                ldsm_x4(a[mt], sQ + q_row_off + mt * 16 * D * 2 + (((kk * 2) ^ q_x) << 4));
#pragma unroll
            for (int jn = 0; jn < BN / 16; ++jn) {
                uint32_t bb[4];
                ldsm_x4(bb, sK + jn * 16 * D * 2 + k_row_off + (((kk * 2) ^ k_x) << 4));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Ty<T>::mma(s[mt][2 * jn], a[mt], bb[0], bb[1]);
                    Ty<T>::mma(s[mt][2 * jn + 1], a[mt], bb[2], bb[3]);
                }
            }
        }
        /* Keys past Sk exist only in the last tile. */
        if (k_partial && n == nK - 1) {
            const int lim = p.Sk - n * BN;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const int col = j * 8 + 2 * tq;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if (col >= lim) s[mt][j][0] = s[mt][j][2] = -INFINITY;
                    if (col + 1 >= lim) s[mt][j][1] = s[mt][j][3] = -INFINITY;
                }
            }
        }

        cp_wait_all();
        __syncthreads(); /* V(n) landed; all warps are done with K(n) */
        if (nn >= 0) {
            load_tile<D, BN, NT>(sK, gK + (int64_t)nn * BN * p.k_ss * 2, p.k_ss, p.Sk - nn * BN, tid);
            cp_commit();
        }

        /* Online softmax (exp2 domain) and the keep votes. The vote is branch-free (a branch
         * inside this unrolled loop would cut it into small blocks and cost the scheduler):
         * dmax = max over the thread's rows of t_i - m_i, and since rounding is monotone,
         * fl(dmax * c) > tau exactly when some row has fl((t_i - m_i) * c) > tau. */
        float dmax = -INFINITY;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float t = -INFINITY;
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) t = fmaxf(t, fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]));
                t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, 1));
                t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, 2));
                const float mprev = mrow[mt][r];
                /* t: max raw score over the tile's valid keys; the carried R raises the bar */
                if (SKIP) {
                    const float rr = kRmaxShared ? s_rmax[warp * 16 * MT + mt * 16 + g + 8 * r]
                                                 : rrow[kRmaxShared ? 0 : mt][r];
                    dmax = fmaxf(dmax, t - fmaxf(mprev, rr));
                }
                const float mnew = fmaxf(mprev, t);
                const float alpha = ex2((mprev - mnew) * c); /* 0 on the first tile */
                mrow[mt][r] = mnew;
                const float mc = mnew * c;
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) {
                    s[mt][j][2 * r] = ex2(fmaf(s[mt][j][2 * r], c, -mc));
                    s[mt][j][2 * r + 1] = ex2(fmaf(s[mt][j][2 * r + 1], c, -mc));
                    sum += s[mt][j][2 * r] + s[mt][j][2 * r + 1];
                }
                lrow[mt][r] = lrow[mt][r] * alpha + sum;
#pragma unroll
                for (int j = 0; j < D / 8; ++j) {
                    o[mt][j][2 * r] *= alpha;
                    o[mt][j][2 * r + 1] *= alpha;
                }
            }
        }

        /* keep(n) = any valid row of the CTA voted: warp vote, then one shared atomic. hd64 does
         * it at the end of the body, where the block ends anyway: a branch here keeps the
         * scheduler from overlapping the softmax with P V (about 10% at hd64); hd128 has no
         * register left to carry dmax across P V, and its long P V hides the cut. */
        if (!kLateVote && voting) {
            skip_vote(dmax, c, tau, n, s_keep);
        }

        /* O += P V: P (fp32 accumulators) repacked as the A operand, V by ldmatrix.trans. */
        uint32_t pa[BN / 16][MT][4];
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pa[kk][mt][0] = Ty<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[kk][mt][1] = Ty<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[kk][mt][2] = Ty<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[kk][mt][3] = Ty<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
            for (int jd = 0; jd < D / 16; ++jd) {
                uint32_t bb[4];
                ldsm_x4_t(bb, sV + kk * 16 * D * 2 + v_row_off + (((jd * 2) ^ v_x) << 4));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Ty<T>::mma(o[mt][2 * jd], pa[kk][mt], bb[0], bb[1]);
                    Ty<T>::mma(o[mt][2 * jd + 1], pa[kk][mt], bb[2], bb[3]);
                }
            }
        }
        if (kLateVote && voting) {
            skip_vote(dmax, c, tau, n, s_keep);
        }
        n = nn;
    }
    cp_wait_all(); /* nothing in flight at exit (a CTA with no live tile still loaded Q) */

    /* Epilogue. O: [B, Sq, H, D] row q at b*o_sb + q*o_ss + h*o_sh (none in an LSE-only
     * call, o NULL); rows with no computed tile (l = 0) get O = 0 and LSE = -inf. */
    T *gO = p.o ? (T *)p.o + b * p.o_sb + h * p.o_sh : nullptr;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = lrow[mt][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l == 0.f ? 0.f : 1.f / l;
            const int row = m * BM + warp * 16 * MT + mt * 16 + g + 8 * r;
            if (row < p.Sq) {
                if (gO) {
                    T *orow = gO + (int64_t)row * p.o_ss;
#pragma unroll
                    for (int j = 0; j < D / 8; ++j)
                        *reinterpret_cast<uint32_t *>(orow + j * 8 + 2 * tq) =
                            Ty<T>::pack(o[mt][j][2 * r] * inv, o[mt][j][2 * r + 1] * inv);
                }
                if (p.lse && tq == 0)
                    p.lse[b * p.lse_sb + h * p.lse_sh + row * p.lse_ss] =
                        l == 0.f ? -INFINITY : (mrow[mt][r] * c + __log2f(l)) * 0.69314718055994531f;
            }
            skip_carried_store(p, b, h, row,
                               !SKIP ? NAN
                               : kRmaxShared ? s_rmax[warp * 16 * MT + mt * 16 + g + 8 * r]
                                             : rrow[kRmaxShared ? 0 : mt][r],
                               mrow[mt][r]);
        }
    }

    /* The mask row and the tile count. */
    if (SKIP) {
        __syncthreads(); /* every vote is in s_keep */
        skip_row_store(p, b, h, m, s_live, s_keep, tid, NT);
    } else if (p.tiles && tid == 0) {
        atomicAdd(p.tiles, (unsigned long long)nK);
    }
}

template <int D, typename T, bool SKIP>
cudaError_t launch(const KParams &kp, int nQ, int H, int B, cudaStream_t stream) {
    using TL = Tiles<D>;
    auto kern = attn_fwd_kernel<D, T, SKIP>;
    static unsigned long long attr_done = 0;
    cudaError_t err = smem_limit_once(kern, TL::smem_bytes, &attr_done);
    if (err != cudaSuccess) return err;
    kern<<<dim3(nQ, H, B), TL::NT, TL::smem_bytes, stream>>>(kp);
    return cudaGetLastError();
}

#endif /* LA_ATTN_FWD_INSTANTIATE */

} /* namespace sm80 */
} /* namespace la_cuda */

#endif /* LA_FWD_SM80_CUH */
