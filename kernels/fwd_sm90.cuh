/*
 * fwd_sm90.cuh — private: the Hopper (sm_90a) LiteAttention forward kernel family: warpgroup
 * matrix products (wgmma), K/V tiles by the tensor memory accelerator (TMA) into a ring of
 * shared-memory stages guarded by mbarriers, warp specialisation (one producer warp, NC
 * consumer warpgroups of 64 query rows each, setmaxnreg), online softmax in the exp2 domain
 * with fp32 accumulation, and the skip semantics of SKIP-SEMANTICS.md through attn_skip.cuh.
 *
 * One CTA owns one (b, h, q-tile m) of BM = 64*NC rows. Warpgroup 0 is the producer: one
 * thread loads Q once, then walks the live k-tiles of the row in the call's visit order and
 * loads only those K/V tiles (skipped tiles cost no load, no QK^T, no softmax, no PV). Each
 * consumer warpgroup walks the same row (same order, no messages needed), and per tile:
 *   wait K(n); S = Q K(n)^T (wgmma, both from shared memory); release K(n);
 *   mask keys past Sk; running max, keep vote, exp2, row sums; O *= alpha;
 *   wait V(n); O += P V(n) (wgmma, P from registers); release V(n).
 * The two (three) consumer warpgroups alternate between softmax and matrix products through
 * a pair of named barriers (ping-pong, as FlashAttention-3), so the tensor cores stay busy
 * while one warpgroup does its exponentials.
 *
 * Shared memory (1024-byte aligned, 128-byte swizzle as TMA writes it and wgmma reads it):
 * a [rows, D] tile is D/64 column blocks of [rows, 64] elements (128-byte rows), block j at
 * j * rows * 128 bytes. Q: BM rows; K and V: ST stages of BN rows each.
 *
 * Instances: one per (head dim, dtype) in attn_fwd_hd<D>_<dtype>_sm90.cu, each built with
 * skipping (SKIP=true) and with it compiled out (SKIP=false). Only those files see the 90a
 * gencode (kernels/module.mk); attn_dispatch.cu sees the declarations and the tile sizes.
 */
#ifndef LA_FWD_SM90_CUH
#define LA_FWD_SM90_CUH

#include <stdint.h>

#include <cuda.h> /* CUtensorMap (a POD type; the driver is reached through cudart) */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attn_skip.cuh"

namespace la_cuda {
namespace sm90 {

/* Tile shape per head dim: NC consumer warpgroups (BM = 64 NC rows), BN keys per k-tile, ST
 * shared-memory stages of K and V. The macros let bench builds try others. */
#ifndef LA_SM90_HD64_NC
#define LA_SM90_HD64_NC 3
#define LA_SM90_HD64_BN 128
#define LA_SM90_HD64_ST 3
#endif
#ifndef LA_SM90_HD128_NC
#define LA_SM90_HD128_NC 2
#define LA_SM90_HD128_BN 176
#define LA_SM90_HD128_ST 2
#endif
/* O through shared memory and TMA (1) or direct stores from registers (0). */
#ifndef LA_SM90_TMA_STORE
#define LA_SM90_TMA_STORE 1
#endif
template <int NC_, int BN_, int ST_> struct ShapeOf {
    static constexpr int NC = NC_, BN = BN_, ST = ST_;
};
template <int D> struct Shape;
template <> struct Shape<64> : ShapeOf<LA_SM90_HD64_NC, LA_SM90_HD64_BN, LA_SM90_HD64_ST> {};
template <> struct Shape<128> : ShapeOf<LA_SM90_HD128_NC, LA_SM90_HD128_BN, LA_SM90_HD128_ST> {};
template <int D> struct Tiles {
    static constexpr int NC = Shape<D>::NC, BN = Shape<D>::BN, ST = Shape<D>::ST;
    static constexpr int BM = 64 * NC;
    static constexpr int NT = 128 * (NC + 1); /* producer warpgroup + consumers */
    static constexpr int q_bytes = BM * D * 2, kv_bytes = BN * D * 2;
    static constexpr size_t smem_bytes = 1024 /* alignment slack */ + q_bytes + 2 * ST * kv_bytes;
    /* setmaxnreg: the producer gives up registers to the consumers (total <= 64K). */
    static constexpr int producer_regs = NC == 2 ? 24 : 32;
    static constexpr int consumer_regs = NC == 2 ? 240 : 160;
    static_assert(D % 64 == 0 && BN % 16 == 0 && BN <= 256 && BM <= 256, "tile shape");
    static_assert(128 * producer_regs + 128 * NC * consumer_regs <= 65536, "register budget");
};

/* Parameters: the shared ones plus the TMA descriptors of Q, K, V, O (64-byte aligned). */
struct Params {
    CUtensorMap tq, tk, tv, to;
    KParams k;
};

template <int D, typename T, bool SKIP>
cudaError_t launch(const KParams &kp, int nQ, int H, int B, cudaStream_t stream);

#ifdef LA_ATTN_FWD_INSTANTIATE /* only instance files (sm_90a) compile the kernel body */
} /* namespace sm90 */
} /* namespace la_cuda */

#include <cudaTypedefs.h> /* PFN_cuTensorMapEncodeTiled */

#include "sm90_wgmma.cuh"

namespace la_cuda {
namespace sm90 {

/* ---- PTX helpers ------------------------------------------------------------------------ */
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
/* Waits until the phase of the given parity has completed (a fresh barrier counts its
 * "previous" phase, parity 1, as completed). */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
    } while (!done);
}
/* TMA: box {64, rows, 1, 1} of a 4-D map (d, s, h, b) at (c0, c1, c2, c3) into shared memory,
 * completing `bytes` on bar. Rows past the tensor's extent are zero-filled. */
__device__ __forceinline__ void tma_load4(uint32_t dst, const CUtensorMap *map, int c0, int c1,
                                          int c2, int c3, uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
                 : "memory");
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
/* Keeps the compiler from moving accesses of wgmma accumulators across the fences. */
template <int N> __device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int R> __device__ __forceinline__ void regs_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}
template <int R> __device__ __forceinline__ void regs_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
}
template <int N> __device__ __forceinline__ void named_sync(int id) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "n"(N) : "memory");
}
template <int N> __device__ __forceinline__ void named_arrive(int id) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "n"(N) : "memory");
}
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
/* Shared-memory matrix descriptor, 128-byte swizzle. K-major operands (Q, K): 8-row groups
 * 1024 bytes apart (SBO), LBO unused (16). MN-major V: LBO = distance of the 64-column
 * blocks, SBO = 1024 (8 keys of 128 bytes). */
__device__ __forceinline__ uint64_t desc_sw128(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((saddr & 0x3FFFF) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&h);
}

template <int D, typename T, bool SKIP>
__global__ void __launch_bounds__(Tiles<D>::NT, 1) fwd_kernel(const __grid_constant__ Params P) {
    using TL = Tiles<D>;
    constexpr int NC = TL::NC, BN = TL::BN, BM = TL::BM, ST = TL::ST, NCT = 128 * NC;
    constexpr int DB = D / 64; /* 64-column blocks of a row */
    const KParams &p = P.k;
    extern __shared__ char smem_raw[];
    __shared__ __align__(8) uint64_t bars[1 + 4 * ST];
    __shared__ int s_tile[ST]; /* k-tile index in each stage (-1: the walk has ended) */
    __shared__ uint32_t s_live[SKIP ? kFlagWords : 1];
    __shared__ uint32_t s_keep[SKIP ? kFlagWords : 1];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = tid >> 7;
    const int h = blockIdx.y, b = blockIdx.z;
    /* Heaviest rows of a head first (see order_kernel): CTAs start in blockIdx order, so the
     * long rows do not end up in the last wave. */
    const int m = p.order ? p.order[((int64_t)b * p.H + h) * p.nQ + blockIdx.x] : (int)blockIdx.x;
    const int nK = p.nK, W = p.W;
    const bool desc = p.desc != 0;

    const uint32_t sQ = ((uint32_t)__cvta_generic_to_shared(smem_raw) + 1023u) & ~1023u;
    const uint32_t sK = sQ + TL::q_bytes;
    const uint32_t sV = sK + ST * TL::kv_bytes;
    const uint32_t bar0 = (uint32_t)__cvta_generic_to_shared(bars);
    /* bars: [0] Q full; [1 + s] K full; [1 + ST + s] V full; [1 + 2ST + s] K empty;
     * [1 + 3ST + s] V empty (one arrival per consumer warp). */
    const uint32_t bar_q = bar0;
    auto bar_kf = [&](int s) { return bar0 + 8u * (1 + s); };
    auto bar_vf = [&](int s) { return bar0 + 8u * (1 + ST + s); };
    auto bar_ke = [&](int s) { return bar0 + 8u * (1 + 2 * ST + s); };
    auto bar_ve = [&](int s) { return bar0 + 8u * (1 + 3 * ST + s); };

    if (SKIP) skip_row_load(p, b, h, m, s_live, s_keep, tid, TL::NT);
    if (tid == 0) {
        mbar_init(bar_q, 1);
        for (int s = 0; s < ST; ++s) {
            mbar_init(bar_kf(s), 1);
            mbar_init(bar_vf(s), 1);
            mbar_init(bar_ke(s), 4 * NC);
            mbar_init(bar_ve(s), 4 * NC);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    LiveWalk walk;
    walk.start(desc, W);
    /* Visit order: the live set (SKIP) or every tile (skipping compiled out). */
    auto first_tile = [&]() { return SKIP ? walk.next(s_live, desc, W) : (desc ? nK - 1 : 0); };
    auto next_tile = [&](int n) {
        return SKIP ? walk.next(s_live, desc, W) : (desc ? n - 1 : (n + 1 < nK ? n + 1 : -1));
    };

    if (wg == 0) {
        /* ---- producer ---------------------------------------------------------------- */
        regs_dec<TL::producer_regs>();
        if (tid == 0) {
            mbar_expect_tx(bar_q, TL::q_bytes);
#pragma unroll
            for (int j = 0; j < DB; ++j) tma_load4(sQ + j * BM * 128, &P.tq, 64 * j, m * BM, h, b, bar_q);
            int i = 0;
            for (int n = first_tile(); n >= 0; n = next_tile(n), ++i) {
                const int s = i % ST;
                const uint32_t ph = (uint32_t)(i / ST) & 1u;
                mbar_wait(bar_ke(s), ph ^ 1u);
                s_tile[s] = n; /* published by the arrive below (release), read after the wait */
                mbar_expect_tx(bar_kf(s), TL::kv_bytes);
#pragma unroll
                for (int j = 0; j < DB; ++j)
                    tma_load4(sK + s * TL::kv_bytes + j * BN * 128, &P.tk, 64 * j, n * BN, h, b, bar_kf(s));
                mbar_wait(bar_ve(s), ph ^ 1u);
                mbar_expect_tx(bar_vf(s), TL::kv_bytes);
#pragma unroll
                for (int j = 0; j < DB; ++j)
                    tma_load4(sV + s * TL::kv_bytes + j * BN * 128, &P.tv, 64 * j, n * BN, h, b, bar_vf(s));
            }
            /* End of the walk: stage i gets the tile index -1 and a plain arrival. */
            const int s = i % ST;
            mbar_wait(bar_ke(s), ((uint32_t)(i / ST) & 1u) ^ 1u);
            s_tile[s] = -1;
            mbar_arrive(bar_kf(s));
        }
        return;
    }

    /* ---- consumers: warpgroup cw owns q-tile rows [64 cw, 64 cw + 64) ------------------ */
    regs_inc<TL::consumer_regs>();
    const int cw = wg - 1, ctid = tid - 128;
    const bool voting = SKIP && skip_mode(p).voting;
    const float c = p.c, tau = p.tau;
    const int g = lane >> 2, tq = lane & 3;
    const int row0 = cw * 64 + (warp & 3) * 16 + g; /* this thread's rows: row0, row0 + 8 */
    const int q_valid = min(BM, p.Sq - m * BM);
    const bool k_partial = (p.Sk % BN) != 0;

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float mrow[2], lrow[2];
    float rrow[2]; /* carried row maxima R (SKIP builds: the votes compare against max(m, R)) */
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        /* Rows past Sq never vote: their running max starts at +inf, so their margin is -inf
         * (their O and LSE become NaN and are never stored). */
        mrow[r] = row0 + 8 * r < q_valid ? -INFINITY : INFINITY;
        lrow[r] = 0.f;
        rrow[r] = SKIP ? skip_carried_load(p, b, h, m * BM + row0 + 8 * r) : NAN;
    }
    const uint32_t q_base = sQ + cw * 64 * 128;

    /* S = Q K(stage)^T for this warpgroup's 64 rows: D/16 k-steps of m64nBNk16. */
    auto issue_s = [&](float (&sc)[BN / 2], int st) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const uint64_t da = desc_sw128(q_base + (kk >> 2) * BM * 128 + (kk & 3) * 32, 16, 1024);
            const uint64_t db = desc_sw128(sK + st * TL::kv_bytes + (kk >> 2) * BN * 128 + (kk & 3) * 32, 16, 1024);
            Wgmma<T, BN>::ss(sc, da, db, kk > 0);
        }
        wg_commit();
    };
    /* O += P V(stage): BN/16 k-steps of m64nDk16, P from registers, V MN-major. */
    auto issue_pv = [&](const uint32_t (&pa)[BN / 16][4], int st) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const uint64_t dv = desc_sw128(sV + st * TL::kv_bytes + kk * 16 * 128, BN * 128, 1024);
            Wgmma<T, D>::rs(o, pa[kk], dv, 1);
        }
        wg_commit();
    };
    /* Softmax statistics of tile n in sc: mask keys past Sk, running max, exp2 (sc becomes P
     * in fp32), row sums; alpha = the factor O must be rescaled by (applied by rescale_pack,
     * once the previous P V has finished with O). Returns the vote margin dmax. In the
     * accumulator layout sc[4j + 2r + e] is row row0 + 8r, key 8j + 2tq + e. */
    auto softmax = [&](float (&sc)[BN / 2], float (&alpha)[2], int n) -> float {
        if (k_partial && n == nK - 1) { /* keys past Sk exist only here (zero-filled): -inf */
            const int lim = p.Sk - n * BN;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const int col = j * 8 + 2 * tq;
                if (col >= lim) sc[4 * j] = sc[4 * j + 2] = -INFINITY;
                if (col + 1 >= lim) sc[4 * j + 1] = sc[4 * j + 3] = -INFINITY;
            }
        }
        float dmax = -INFINITY;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            /* Row max and row sum as trees (a chain of BN/4 dependent operations would put
             * their latency on the critical path of the warpgroup). */
            float red[BN / 8];
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) red[j] = fmaxf(sc[4 * j + 2 * r], sc[4 * j + 2 * r + 1]);
#pragma unroll
            for (int st = 1; st < BN / 8; st *= 2)
#pragma unroll
                for (int j = 0; j + st < BN / 8; j += 2 * st) red[j] = fmaxf(red[j], red[j + st]);
            float t = red[0];
            t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, 1));
            t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, 2));
            const float mprev = mrow[r];
            /* t: max raw score over the valid keys; the carried R raises the bar */
            if (SKIP) dmax = fmaxf(dmax, t - fmaxf(mprev, rrow[r]));
            const float mnew = fmaxf(mprev, t);
            alpha[r] = ex2((mprev - mnew) * c); /* 0 on the first tile */
            mrow[r] = mnew;
            const float mc = mnew * c;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                sc[4 * j + 2 * r] = ex2(fmaf(sc[4 * j + 2 * r], c, -mc));
                sc[4 * j + 2 * r + 1] = ex2(fmaf(sc[4 * j + 2 * r + 1], c, -mc));
                red[j] = sc[4 * j + 2 * r] + sc[4 * j + 2 * r + 1];
            }
#pragma unroll
            for (int st = 1; st < BN / 8; st *= 2)
#pragma unroll
                for (int j = 0; j + st < BN / 8; j += 2 * st) red[j] += red[j + st];
            lrow[r] = lrow[r] * alpha[r] + red[0];
        }
        return dmax;
    };
    /* O *= alpha, and P packed into pa (the A operand layout of m64k16: the accumulator's). */
    auto rescale_pack = [&](const float (&sc)[BN / 2], uint32_t (&pa)[BN / 16][4], const float (&alpha)[2]) {
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            o[4 * j] *= alpha[0];
            o[4 * j + 1] *= alpha[0];
            o[4 * j + 2] *= alpha[1];
            o[4 * j + 3] *= alpha[1];
        }
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            pa[kk][0] = pack2<T>(sc[8 * kk + 0], sc[8 * kk + 1]);
            pa[kk][1] = pack2<T>(sc[8 * kk + 2], sc[8 * kk + 3]);
            pa[kk][2] = pack2<T>(sc[8 * kk + 4], sc[8 * kk + 5]);
            pa[kk][3] = pack2<T>(sc[8 * kk + 6], sc[8 * kk + 7]);
        }
    };

    /* Ping-pong between the consumer warpgroups: cw issues its matrix products (P V of this
     * tile and Q K^T of the next, back to back) only after warpgroup cw-1 (cyclically) has
     * issued its own, then passes the turn on; so one warpgroup's exponentials run while the
     * other's products occupy the tensor cores. Named barrier 2 + cw = "cw's turn" (256
     * arrivals: cw syncs, its predecessor arrives). Warpgroup 0 holds the first turn. */
    constexpr int kTurn = 2;
    if (cw == 0) named_arrive<256>(kTurn);
    auto take_turn = [&]() { if (NC > 1) named_sync<256>(kTurn + cw); };
    auto pass_turn = [&]() { if (NC > 1) named_arrive<256>(kTurn + (cw + 1) % NC); };

    float sc[BN / 2];
    uint32_t pa[BN / 16][4];
    float alpha[2];
    float dmax = -INFINITY; /* vote of the last softmax, cast while the next products run */
    mbar_wait(bar_q, 0);
    /* The consumers do not walk the mask: the producer's tile index comes with each K stage
     * (walking it in every consumer thread, inside the main loop, measured 10-20% slower). */
    mbar_wait(bar_kf(0), 0);
    int n = s_tile[0];
    if (n >= 0) {
        take_turn();
        wg_fence();
        issue_s(sc, 0);
        pass_turn();
        wg_wait<0>();
        reg_fence(sc);
        __syncwarp();
        if (lane == 0) mbar_arrive(bar_ke(0));
        dmax = softmax(sc, alpha, n);
        rescale_pack(sc, pa, alpha);
    }
    /* Steady state, per tile: Q K(nn)^T and P V(n) issued back to back (no wgmma under a
     * branch: the compiler would serialise them); the softmax of nn is written between the two
     * waits, O is rescaled and the new P packed once P V(n) is done. The last tile's P V is
     * peeled off below. Note (nvcc 13.0 SASS): ptxas hoists wgmma.wait_group 0 to the start of
     * the softmax, so the softmax overlaps the other warpgroup's products (ping-pong) but not
     * this warpgroup's own P V(n); forcing it inside the window (a block-ending branch) was
     * measured on the H200 and gained nothing (bench/RESULTS.md, issue 9). */
    int i = 0;
    for (; n >= 0; ++i) {
        const int s = i % ST, s1 = (i + 1) % ST;
        mbar_wait(bar_kf(s1), (uint32_t)((i + 1) / ST) & 1u);
        const int nn = s_tile[s1];
        if (nn < 0) break;
        mbar_wait(bar_vf(s), (uint32_t)(i / ST) & 1u);
        take_turn();
        reg_fence(o);
        wg_fence();
        issue_s(sc, s1);
        issue_pv(pa, s);
        pass_turn();
        if (voting) skip_vote(dmax, c, tau, n, s_keep); /* tile n's vote, off the critical path */
        wg_wait<1>(); /* groups complete in order: Q K(nn)^T is done */
        reg_fence(sc);
        __syncwarp();
        if (lane == 0) mbar_arrive(bar_ke(s1));
        dmax = softmax(sc, alpha, nn);
        wg_wait<0>(); /* P V(n) is done: O and pa are free */
        reg_fence(o);
        __syncwarp();
        if (lane == 0) mbar_arrive(bar_ve(s));
        rescale_pack(sc, pa, alpha);
        n = nn;
    }
    if (n >= 0) {
        const int s = i % ST;
        mbar_wait(bar_vf(s), (uint32_t)(i / ST) & 1u);
        take_turn();
        reg_fence(o);
        wg_fence();
        issue_pv(pa, s);
        pass_turn();
        if (voting) skip_vote(dmax, c, tau, n, s_keep);
        wg_wait<0>();
        reg_fence(o);
        __syncwarp();
        if (lane == 0) mbar_arrive(bar_ve(s));
    }
    /* Every turn passed to warpgroup 0 is taken: the initial one when no tile was visited,
     * else the last warpgroup's last one. */
    if (NC > 1 && cw == 0) named_sync<256>(kTurn);

    /* Epilogue. O: [B, Sq, H, D]; rows with no computed tile (l = 0) get O = 0 and LSE = -inf.
     * O goes through shared memory and one TMA store per 64-column block: the warpgroup's own
     * 64 rows of the Q tile are free once its last Q K^T is done, and have the layout (128-byte
     * swizzle) the store reads. Rows past Sq are clipped by the TMA unit. */
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = lrow[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        inv[r] = l == 0.f ? 0.f : 1.f / l;
        const int row = m * BM + row0 + 8 * r;
        if (p.lse && tq == 0 && row < p.Sq)
            p.lse[b * p.lse_sb + h * p.lse_sh + row * p.lse_ss] =
                l == 0.f ? -INFINITY : (mrow[r] * c + __log2f(l)) * 0.69314718055994531f;
        skip_carried_store(p, b, h, row, rrow[r], mrow[r]);
    }
#if LA_SM90_TMA_STORE
    {
        const int lr0 = (warp & 3) * 16 + g; /* row within the warpgroup's 64 */
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int lr = lr0 + 8 * r;
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                const uint32_t addr = q_base + (j >> 3) * BM * 128 + lr * 128 + ((((j & 7) ^ (lr & 7))) << 4) + 4 * tq;
                const uint32_t v = pack2<T>(o[4 * j + 2 * r] * inv[r], o[4 * j + 2 * r + 1] * inv[r]);
                asm volatile("st.shared.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
            }
        }
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        named_sync<128>(5 + cw);
        if ((ctid & 127) == 0) {
#pragma unroll
            for (int j = 0; j < DB; ++j)
                asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%1, %2, %3, %4}], [%5];" ::"l"(
                                 reinterpret_cast<uint64_t>(&P.to)),
                             "r"(64 * j), "r"(m * BM + cw * 64), "r"(h), "r"(b), "r"(q_base + j * BM * 128)
                             : "memory");
            asm volatile("cp.async.bulk.commit_group;" ::: "memory");
            asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
        }
    }
#else
    {
        T *gO = (T *)p.o + b * p.o_sb + h * p.o_sh;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = m * BM + row0 + 8 * r;
            if (row < p.Sq) {
                T *orow = gO + (int64_t)row * p.o_ss;
#pragma unroll
                for (int j = 0; j < D / 8; ++j)
                    *reinterpret_cast<uint32_t *>(orow + j * 8 + 2 * tq) =
                        pack2<T>(o[4 * j + 2 * r] * inv[r], o[4 * j + 2 * r + 1] * inv[r]);
            }
        }
    }
#endif

    if (SKIP) {
        named_sync<NCT>(1); /* every vote is in s_keep */
        skip_row_store(p, b, h, m, s_live, s_keep, ctid, NCT);
    } else if (p.tiles && ctid == 0) {
        atomicAdd(p.tiles, (unsigned long long)nK);
    }
}

/* Scheduling for mode SKIP, one CTA per head (b, h): the q-tiles of the head sorted by the
 * number of tiles their rows visit, most first (ties by q-tile index, so the order is
 * deterministic): order[(b*H + h)*nQ + rank] = m. Within a head only, so that the CTAs in
 * flight still share their head's K/V in L2. counts: nQ ints of dynamic shared memory. */
static __global__ void order_kernel(const __grid_constant__ KParams p, int32_t *order) {
    extern __shared__ int counts[];
    const int h = blockIdx.x, b = blockIdx.y, nQ = p.nQ;
    for (int m = threadIdx.x; m < nQ; m += blockDim.x) counts[m] = skip_row_count(p, b, h, m);
    __syncthreads();
    int32_t *out = order + ((int64_t)b * p.H + h) * nQ;
    for (int m = threadIdx.x; m < nQ; m += blockDim.x) {
        const int c = counts[m];
        int rank = 0;
        for (int j = 0; j < nQ; ++j) {
            const int cj = counts[j];
            rank += (cj > c) | ((cj == c) & (j < m));
        }
        out[rank] = m;
    }
}
/* Rows per head up to which order_kernel runs (its shared memory and its nQ^2 ranking). */
constexpr int kOrderMaxQTiles = 4096;

/* cuTensorMapEncodeTiled through the runtime (no link against libcuda). */
inline PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
    static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr; /* benign race: same value */
    if (!fn) {
        void *f = nullptr;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) ==
                cudaSuccess &&
            q == cudaDriverEntryPointSuccess)
            fn = (PFN_cuTensorMapEncodeTiled_v12000)f;
    }
    return fn;
}

template <typename T> struct TmaType;
template <> struct TmaType<__nv_bfloat16> {
    static constexpr CUtensorMapDataType value = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
};
template <> struct TmaType<__half> {
    static constexpr CUtensorMapDataType value = CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
};

/* A 4-D map (d, s, h, b) of a [B, S, H, D] tensor with strides in elements (d stride 1), box
 * {64, rows, 1, 1}, 128-byte swizzle, zero fill out of bounds. */
template <typename T>
bool make_map(CUtensorMap *map, const void *base, int D, int S, int H, int B, int64_t ss, int64_t sh,
              int64_t sb, int rows) {
    PFN_cuTensorMapEncodeTiled_v12000 enc = encode_fn();
    if (!enc) return false;
    const cuuint64_t dims[4] = {(cuuint64_t)D, (cuuint64_t)S, (cuuint64_t)H, (cuuint64_t)B};
    const cuuint64_t strides[3] = {(cuuint64_t)ss * 2, (cuuint64_t)sh * 2, (cuuint64_t)sb * 2};
    const cuuint32_t box[4] = {64, (cuuint32_t)rows, 1, 1};
    const cuuint32_t estr[4] = {1, 1, 1, 1};
    const CUtensorMapDataType dt = TmaType<T>::value;
    return enc(map, dt, 4, const_cast<void *>(base), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
               CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int D, typename T, bool SKIP>
cudaError_t launch(const KParams &kp, int nQ, int H, int B, cudaStream_t stream) {
    using TL = Tiles<D>;
    auto kern = fwd_kernel<D, T, SKIP>;
    static unsigned long long attr_done = 0;
    cudaError_t err = smem_limit_once(kern, TL::smem_bytes, &attr_done);
    if (err != cudaSuccess) return err;
    Params pp;
    pp.k = kp;
    if (!make_map<T>(&pp.tq, kp.q, D, kp.Sq, H, B, kp.q_ss, kp.q_sh, kp.q_sb, TL::BM) ||
        !make_map<T>(&pp.tk, kp.k, D, kp.Sk, H, B, kp.k_ss, kp.k_sh, kp.k_sb, TL::BN) ||
        !make_map<T>(&pp.tv, kp.v, D, kp.Sk, H, B, kp.v_ss, kp.v_sh, kp.v_sb, TL::BN) ||
        !make_map<T>(&pp.to, kp.o, D, kp.Sq, H, B, kp.o_ss, kp.o_sh, kp.o_sb, 64))
        return cudaErrorInvalidValue;
    /* Mode SKIP: rows differ in length, so the heaviest go first. Scratch from the stream's
     * memory pool; without it the CTAs take the rows in their natural order. */
    int32_t *order = nullptr;
    if (kp.mode == LA_MODE_SKIP && nQ > 1 && nQ <= kOrderMaxQTiles &&
        cudaMallocAsync((void **)&order, sizeof(int32_t) * (size_t)nQ * H * B, stream) == cudaSuccess) {
        /* counts padded by 16 ints: the compiler's vectorised reads of the last elements went
         * past nQ ints (compute-sanitizer memcheck on the H200, 12-byte reads at nQ = 2). */
        order_kernel<<<dim3(H, B), 256, sizeof(int) * (nQ + 16), stream>>>(kp, order);
        pp.k.order = order;
    } else {
        (void)cudaGetLastError(); /* a failed allocation is not this call's error */
        pp.k.order = nullptr;
    }
    kern<<<dim3(nQ, H, B), TL::NT, TL::smem_bytes, stream>>>(pp);
    cudaError_t e = cudaGetLastError();
    if (order) {
        cudaError_t ef = cudaFreeAsync(order, stream);
        if (e == cudaSuccess) e = ef;
    }
    return e;
}

#endif /* LA_ATTN_FWD_INSTANTIATE */

} /* namespace sm90 */
} /* namespace la_cuda */

#endif /* LA_FWD_SM90_CUH */
