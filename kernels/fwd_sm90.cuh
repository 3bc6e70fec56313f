/*
 * fwd_sm90.cuh — private: the Hopper (sm_90a) LiteAttention forward kernel family: warpgroup
 * matrix products (wgmma), K/V tiles by the tensor memory accelerator (TMA) into a ring of
 * shared-memory stages guarded by mbarriers, warp specialisation (one producer warp, NC
 * consumer warpgroups of 64 query rows each, setmaxnreg), online softmax in the exp2 domain
 * with fp32 accumulation, and the skip semantics of SKIP-SEMANTICS.md through attn_skip.cuh.
 *
 * Persistent grid: one CTA per multiprocessor takes work items (the q-tiles of every (b, h),
 * BM = 64*NC rows each) in turn, statically strided, or in mode SKIP heaviest first from a
 * counter (order_kernel). Warp 0 is the producer: per item it reads the row's effective live
 * set into shared memory, hands the item to the consumers, loads Q, then walks the live
 * k-tiles in the call's visit order and loads only those K/V tiles (skipped tiles cost no
 * load, no QK^T, no softmax, no PV); the next item's Q and first stages load while the
 * consumers run the last one's epilogue. The consumers get the tile index with each K stage,
 * and per tile:
 *   wait K(n); S = Q K(n)^T (wgmma, both from shared memory); release K(n);
 *   mask keys past Sk; running max, keep vote, exp2, row sums; O *= alpha;
 *   wait V(n); O += P V(n) (wgmma, P from registers); release V(n).
 * The two (three) consumer warpgroups alternate between softmax and matrix products through
 * a pair of named barriers (ping-pong, as FlashAttention-3), so the tensor cores stay busy
 * while one warpgroup does its exponentials.
 *
 * Shared memory (1024-byte aligned, 128-byte swizzle as TMA writes it and wgmma reads it):
 * a [rows, D] tile is D/64 column blocks of [rows, 64] elements (128-byte rows), block j at
 * j * rows * 128 bytes. Q: BM rows; K and V: ST stages of BN rows each; O's staging (OStage).
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
/* Independent chains of the softmax's row max and row sum (see softmax in fwd_kernel). */
#ifndef LA_SM90_RED_CHAINS
#define LA_SM90_RED_CHAINS 4
#endif
/* Which builds give the masked last tile its own copy of the softmax statistics (see softmax
 * in fwd_kernel): 0 none, 1 the builds without skipping, 2 all. The H200 (bench/RESULTS.md,
 * 2026-12-03): dense 3.3% (D128) and 5% (D64) faster with the copy; the SKIP builds gained
 * nothing at full live fraction and lost 4-13% at live fractions 0.1-0.05 (D64 spills 20 B). */
#ifndef LA_SM90_SPLIT_SOFTMAX
#define LA_SM90_SPLIT_SOFTMAX 1
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
    /* setmaxnreg: the producer gives up registers to the consumers. The CTA keeps what it
     * was launched with (__launch_bounds__(NT, 1): 64K / NT per thread, in steps of 8), so the
     * new counts must fit in that, not in the 64K of the register file: setmaxnreg.inc
     * blocks until the CTA's pool has the registers. A build with 32 for the producer at
     * NC = 2 (65536 > 64512) gave no result in 150 s on the H200 (2026-12-03); at 24 the
     * producer spills 16 bytes in the dense D128 build (its loop state; not the consumers). */
    static constexpr int launch_regs = 65536 / NT / 8 * 8;
    static constexpr int producer_regs = NC == 2 ? 24 : 32;
    static constexpr int consumer_regs = NC == 2 ? 240 : 160;
    static_assert(D % 64 == 0 && BN % 16 == 0 && BN <= 256 && BM <= 256, "tile shape");
    static_assert(128 * producer_regs + 128 * NC * consumer_regs <= NT * launch_regs,
                  "register budget");
};

/* Parameters: the shared ones plus the TMA descriptors of Q, K, V, O (64-byte aligned). */
struct Params {
    CUtensorMap tq, tk, tv, to;
    KParams k;
    int32_t *sched; /* items claimed past the first gridDim.x (zeroed by order_kernel), or NULL */
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
/* The same by the threads with pred set, as one predicated instruction (no branch). */
__device__ __forceinline__ void mbar_arrive_if(uint32_t bar, bool pred) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.u32 p, %1, 0;\n@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(bar),
                 "r"((uint32_t)pred)
                 : "memory");
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
/* The same for a register A operand: it stays live (its registers untouched) until here, as
 * the wgmma that reads it may still be running. Without it the compiler takes the operand to
 * be dead once the wgmma is issued and reuses its registers, and ptxas then waits for the
 * wgmma before that reuse (nvcc 13.0: the whole softmax came after P V's wait). */
template <int N, int M> __device__ __forceinline__ void reg_fence(uint32_t (&r)[N][M]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < M; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
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
 * blocks, SBO = 1024 (8 keys of 128 bytes).
 * The low word holds the address in 16-byte units (14 bits: shared addresses are below 2^18
 * bytes) and LBO; the high word SBO and the swizzle mode. A tile's descriptors are one low
 * word plus constants (offset / 16 added to it), so that the main loop builds none. */
__device__ __forceinline__ uint32_t desc_lo(uint32_t saddr, uint32_t lbo) {
    return (saddr >> 4) | ((lbo >> 4) << 16);
}
__host__ __device__ constexpr uint32_t desc_hi(uint32_t sbo) { return (sbo >> 4) | (1u << 30); }
__device__ __forceinline__ uint64_t desc_of(uint32_t lo, uint32_t hi) {
    return ((uint64_t)hi << 32) | lo;
}

/* x, known to be the same in every lane of the warp, as the compiler can see it: the loop
 * and its stage indices stay in uniform registers (and so the matrix descriptors). */
__device__ __forceinline__ int uniform(int x) { return __shfl_sync(0xffffffffu, x, 0); }

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&h);
}

/* Shared memory of a CTA past Q and the K/V ring: O's staging for the TMA store. Its own
 * buffer when that fits (D64); otherwise (D128) the V buffer of the ring stage that carries
 * the end-of-row mark, which no load uses (the producer's next V load into that stage waits
 * for the store to have read it: its V-empty barrier is released only then). */
template <int D> struct OStage {
    using TL = Tiles<D>;
    static constexpr size_t own_bytes = TL::smem_bytes + TL::q_bytes;
    static constexpr bool own = own_bytes <= 227 * 1024;
    static constexpr size_t smem_bytes = own ? own_bytes : TL::smem_bytes;
    static_assert(own || TL::BM <= TL::BN, "O staging fits neither its own buffer nor a V stage");
};

/* Work items: the q-tiles of every (b, h), head-major (the CTAs in flight share their head's
 * K/V in L2): item x of head bh = b*H + h is q-tile order[bh*nQ + x] (heaviest first, mode
 * SKIP) or x. */
struct Item {
    int b, h, m;
};
__device__ __forceinline__ Item item_of(const KParams &p, int idx) {
    const int bh = idx / p.nQ, x = idx - bh * p.nQ;
    Item it;
    it.b = bh / p.H;
    it.h = bh - it.b * p.H;
    it.m = p.order ? p.order[(int64_t)bh * p.nQ + x] : x;
    return it;
}

template <int D, typename T, bool SKIP>
__global__ void __launch_bounds__(Tiles<D>::NT, 1) fwd_kernel(const __grid_constant__ Params P) {
    using TL = Tiles<D>;
    constexpr int NC = TL::NC, BN = TL::BN, BM = TL::BM, ST = TL::ST, NCT = 128 * NC;
    constexpr int DB = D / 64; /* 64-column blocks of a row */
    constexpr int LW = SKIP ? kFlagWords : 1;
    const KParams &p = P.k;
    extern __shared__ char smem_raw[];
    /* bars: [0] Q full; [1] Q empty; [2 + s] K full; [2 + ST + s] V full; [2 + 2ST + s] K
     * empty; [2 + 3ST + s] V empty; [2 + 4ST + j] item j full; [4 + 4ST + j] item j empty.
     * Empty barriers count one arrival per consumer warp. */
    __shared__ __align__(8) uint64_t bars[6 + 4 * ST];
    __shared__ int s_tile[ST];  /* k-tile index in each stage (-1: the row's walk has ended) */
    __shared__ int s_item[2];   /* the CTA's items, double-buffered (-1: no more work) */
    __shared__ uint32_t s_live[2 * LW];
    __shared__ uint32_t s_keep[2 * LW];

    const int tid = threadIdx.x, lane = tid & 31;
    /* warp and warpgroup through a shuffle from lane 0: the compiler then knows them to be
     * uniform across the warp and keeps what derives from them (shared-memory addresses,
     * matrix descriptors) in uniform registers (as CUTLASS's canonical_warp_group_idx) */
    const int warp = uniform(tid >> 5), wg = warp >> 2;
    const int nK = p.nK, W = p.W;
    const int total = p.B * p.H * p.nQ;
    const bool desc = p.desc != 0;

    const uint32_t sQ = ((uint32_t)__cvta_generic_to_shared(smem_raw) + 1023u) & ~1023u;
    const uint32_t sK = sQ + TL::q_bytes;
    const uint32_t sV = sK + ST * TL::kv_bytes;
    const uint32_t sO = sV + ST * TL::kv_bytes; /* OStage<D>::own only */
    const uint32_t bar0 = (uint32_t)__cvta_generic_to_shared(bars);
    const uint32_t bar_q = bar0, bar_qe = bar0 + 8u;
    auto bar_kf = [&](int s) { return bar0 + 8u * (2 + s); };
    auto bar_vf = [&](int s) { return bar0 + 8u * (2 + ST + s); };
    auto bar_ke = [&](int s) { return bar0 + 8u * (2 + 2 * ST + s); };
    auto bar_ve = [&](int s) { return bar0 + 8u * (2 + 3 * ST + s); };
    auto bar_if = [&](int j) { return bar0 + 8u * (2 + 4 * ST + j); };
    auto bar_ie = [&](int j) { return bar0 + 8u * (4 + 4 * ST + j); };

    if (tid == 0) {
        mbar_init(bar_q, 1);
        mbar_init(bar_qe, 4 * NC);
        for (int s = 0; s < ST; ++s) {
            mbar_init(bar_kf(s), 1);
            mbar_init(bar_vf(s), 1);
            mbar_init(bar_ke(s), 4 * NC);
            mbar_init(bar_ve(s), 4 * NC);
        }
        for (int j = 0; j < 2; ++j) {
            mbar_init(bar_if(j), 1);
            mbar_init(bar_ie(j), 4 * NC);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    /* Ring stages are used in one sequence across the CTA's items: use u goes to stage u % ST,
     * its barriers' phase is u / ST. The producer's waits on "empty" take the parity of the
     * previous use (a fresh barrier counts its previous phase, parity 1, as completed). */
    if (wg == 0) {
        /* ---- producer: warp 0 (lane 0 issues the copies) -------------------------------- */
        regs_dec<TL::producer_regs>();
        if (warp != 0) return;
        int u = 0;
        int item = blockIdx.x;
        for (int k = 0;; ++k) {
            const int j = k & 1;
            const bool more = item < total;
            /* item k - 2 (same buffers) has stored its mask row */
            mbar_wait(bar_ie(j), ((uint32_t)(k >> 1) & 1u) ^ 1u);
            Item it = {0, 0, 0};
            if (more) it = item_of(p, item);
            if (SKIP && more) skip_row_load(p, it.b, it.h, it.m, s_live + j * LW, s_keep + j * LW, lane, 32);
            __syncwarp();
            if (lane == 0) {
                s_item[j] = more ? item : -1;
                mbar_arrive(bar_if(j)); /* release: s_item, s_live, s_keep (after __syncwarp) */
            }
            if (!more) break;
            if (lane == 0) {
                /* Q of this item once every consumer is done with the previous one's */
                mbar_wait(bar_qe, ((uint32_t)k & 1u) ^ 1u);
                mbar_expect_tx(bar_q, TL::q_bytes);
#pragma unroll
                for (int jj = 0; jj < DB; ++jj)
                    tma_load4(sQ + jj * BM * 128, &P.tq, 64 * jj, it.m * BM, it.h, it.b, bar_q);
                LiveWalk walk;
                walk.start(desc, W);
                const uint32_t *live = s_live + j * LW;
                int n = SKIP ? walk.next(live, desc, W) : (desc ? nK - 1 : 0);
                /* V of a tile is loaded after the next tile's K: the consumers need K(u + 1)
                 * (for S) before V(u) (for P V), and V(u)'s stage is free only once P V(u - ST)
                 * has finished, which would otherwise hold K(u + 1) back. */
                auto load_v = [&](int vn, int vs, uint32_t vph) {
                    mbar_wait(bar_ve(vs), vph);
                    mbar_expect_tx(bar_vf(vs), TL::kv_bytes);
#pragma unroll
                    for (int jj = 0; jj < DB; ++jj)
                        tma_load4(sV + vs * TL::kv_bytes + jj * BN * 128, &P.tv, 64 * jj, vn * BN, it.h, it.b,
                                  bar_vf(vs));
                };
                int pn = -1, ps = 0;
                uint32_t pph = 0;
                for (; n >= 0; ++u) {
                    const int s = u % ST;
                    const uint32_t ph = ((uint32_t)(u / ST) & 1u) ^ 1u;
                    mbar_wait(bar_ke(s), ph);
                    s_tile[s] = n; /* published by the arrive below (release), read after the wait */
                    mbar_expect_tx(bar_kf(s), TL::kv_bytes);
#pragma unroll
                    for (int jj = 0; jj < DB; ++jj)
                        tma_load4(sK + s * TL::kv_bytes + jj * BN * 128, &P.tk, 64 * jj, n * BN, it.h, it.b,
                                  bar_kf(s));
                    if (pn >= 0) load_v(pn, ps, pph);
                    pn = n;
                    ps = s;
                    pph = ph;
                    n = SKIP ? walk.next(live, desc, W) : (desc ? n - 1 : (n + 1 < nK ? n + 1 : -1));
                }
                if (pn >= 0) load_v(pn, ps, pph);
                /* End of the row: one use of a stage carries the tile index -1, with plain
                 * arrivals on both of its full barriers (so that their phases stay in step). */
                const int s = u % ST;
                const uint32_t ph = ((uint32_t)(u / ST) & 1u) ^ 1u;
                mbar_wait(bar_ke(s), ph);
                mbar_wait(bar_ve(s), ph);
                s_tile[s] = -1;
                mbar_arrive(bar_kf(s));
                mbar_arrive(bar_vf(s));
                ++u;
                /* The next item: from the counter when the launcher made one (the heaviest
                 * rows are taken first by whichever CTA is free), else the next of a static
                 * stride. Claimed only now, when this CTA is about to be free. */
                item = P.sched ? atomicAdd(P.sched, 1) + (int)gridDim.x : item + (int)gridDim.x;
            }
            item = __shfl_sync(0xffffffffu, item, 0);
            u = __shfl_sync(0xffffffffu, u, 0);
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
    const bool k_partial = (p.Sk % BN) != 0;
    const uint32_t q_base = sQ + cw * 64 * 128;

    float o[D / 2];
    float mrow[2], lrow[2];
    float rrow[2]; /* carried row maxima R (SKIP builds: the votes compare against max(m, R)) */

    /* S = Q K(stage)^T for this warpgroup's 64 rows: D/16 k-steps of m64nBNk16. */
    const uint32_t q_lo = desc_lo(q_base, 16), k_lo = desc_lo(sK, 16), v_lo = desc_lo(sV, BN * 128);
    auto issue_s = [&](float (&sc)[BN / 2], int st) {
        const uint32_t klo = k_lo + st * (TL::kv_bytes >> 4);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const uint64_t da = desc_of(q_lo + (((kk >> 2) * BM * 128 + (kk & 3) * 32) >> 4), desc_hi(1024));
            const uint64_t db = desc_of(klo + (((kk >> 2) * BN * 128 + (kk & 3) * 32) >> 4), desc_hi(1024));
            Wgmma<T, BN>::ss(sc, da, db, kk > 0);
        }
        wg_commit();
    };
    /* O += P V(stage): BN/16 k-steps of m64nDk16, P from registers, V MN-major. */
    auto issue_pv = [&](const uint32_t (&pa)[BN / 16][4], int st) {
        const uint32_t vlo = v_lo + st * (TL::kv_bytes >> 4);
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const uint64_t dv = desc_of(vlo + ((kk * 16 * 128) >> 4), desc_hi(1024));
            Wgmma<T, D>::rs(o, pa[kk], dv, 1);
        }
        wg_commit();
    };
    /* Softmax statistics of tile n in sc: mask keys past Sk, running max, exp2 (sc becomes P
     * in fp32), row sums; alpha = the factor O must be rescaled by (applied by rescale,
     * once the previous P V has finished with O). Returns the vote margin dmax. In the
     * accumulator layout sc[4j + 2r + e] is row row0 + 8r, key 8j + 2tq + e. */
    auto stats = [&](float (&sc)[BN / 2], float (&alpha)[2]) -> float {
        float dmax = -INFINITY;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            /* Row max and row sum in RC independent chains: short dependency chains without
             * the registers of a full tree (BN/8 temporaries: with P V(n)'s operands pinned in
             * registers, ptxas then waits for P V(n) before the softmax instead of overlapping
             * them; nvcc 13.0 SASS). */
            constexpr int RC = LA_SM90_RED_CHAINS < BN / 8 ? LA_SM90_RED_CHAINS : BN / 8;
            float red[RC];
#pragma unroll
            for (int q = 0; q < RC; ++q) red[q] = fmaxf(sc[4 * q + 2 * r], sc[4 * q + 2 * r + 1]);
#pragma unroll
            for (int j = RC; j < BN / 8; ++j)
                red[j % RC] = fmaxf(red[j % RC], fmaxf(sc[4 * j + 2 * r], sc[4 * j + 2 * r + 1]));
#pragma unroll
            for (int q = 1; q < RC; ++q) red[0] = fmaxf(red[0], red[q]);
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
                const float pair = sc[4 * j + 2 * r] + sc[4 * j + 2 * r + 1];
                red[j % RC] = j < RC ? pair : red[j % RC] + pair;
            }
#pragma unroll
            for (int q = 1; q < RC; ++q) red[0] += red[q];
            lrow[r] = lrow[r] * alpha[r] + red[0];
        }
        return dmax;
    };
    /* The statistics after the masking of keys past Sk. With kSplit the masked tile has its
     * own inlined copy, so that no control flow joins between wgmma.wait_group 1 and the
     * exponentials: at such a join ptxas (nvcc 13.0) put wait_group 0 (P V(n) done) before
     * them, and the softmax of one tile never overlapped this warpgroup's own P V. */
    constexpr bool kSplit = LA_SM90_SPLIT_SOFTMAX == 2 || (LA_SM90_SPLIT_SOFTMAX == 1 && !SKIP);
    auto softmax = [&](float (&sc)[BN / 2], float (&alpha)[2], int n) -> float {
        if (k_partial && n == nK - 1) { /* keys past Sk exist only here (zero-filled): -inf */
            const int lim = p.Sk - n * BN;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const int col = j * 8 + 2 * tq;
                if (col >= lim) sc[4 * j] = sc[4 * j + 2] = -INFINITY;
                if (col + 1 >= lim) sc[4 * j + 1] = sc[4 * j + 3] = -INFINITY;
            }
            if (kSplit) return stats(sc, alpha);
        }
        return stats(sc, alpha);
    };
    /* O *= alpha, once the previous P V has finished with O. */
    auto rescale = [&](const float (&alpha)[2]) {
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            o[4 * j] *= alpha[0];
            o[4 * j + 1] *= alpha[0];
            o[4 * j + 2] *= alpha[1];
            o[4 * j + 3] *= alpha[1];
        }
    };
    /* P packed into pa (the A operand layout of m64k16: the accumulator's). */
    auto pack = [&](const float (&sc)[BN / 2], uint32_t (&pa)[BN / 16][4]) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            pa[kk][0] = pack2<T>(sc[8 * kk + 0], sc[8 * kk + 1]);
            pa[kk][1] = pack2<T>(sc[8 * kk + 2], sc[8 * kk + 3]);
            pa[kk][2] = pack2<T>(sc[8 * kk + 4], sc[8 * kk + 5]);
            pa[kk][3] = pack2<T>(sc[8 * kk + 6], sc[8 * kk + 7]);
        }
    };
    /* One arrival per warp: lane 0's, by a predicated instruction (no branch, so no divergent
     * region in the main loop). After a wgmma wait no other lane has shared-memory reads of
     * the stage outstanding; release_sync is for buffers the lanes read themselves. */
    auto release = [&](uint32_t bar) { mbar_arrive_if(bar, lane == 0); };
    auto release_sync = [&](uint32_t bar) {
        __syncwarp();
        mbar_arrive_if(bar, lane == 0);
    };

    /* Ping-pong between the consumer warpgroups: cw issues its matrix products (P V of this
     * tile and Q K^T of the next, back to back) only after warpgroup cw-1 (cyclically) has
     * issued its own, then passes the turn on; so one warpgroup's exponentials run while the
     * other's products occupy the tensor cores. Named barrier 2 + cw = "cw's turn" (256
     * arrivals: cw syncs, its predecessor arrives). Warpgroup 0 holds the first turn; the
     * turns run on across items (every warpgroup takes as many per item). */
    constexpr int kTurn = 2;
    if (cw == 0) named_arrive<256>(kTurn);
    auto take_turn = [&]() { if (NC > 1) named_sync<256>(kTurn + cw); };
    auto pass_turn = [&]() { if (NC > 1) named_arrive<256>(kTurn + (cw + 1) % NC); };

    float sc[BN / 2];
    uint32_t pa[BN / 16][4];
    float alpha[2];
    unsigned u = 0; /* ring use of the current tile, as the producer counts */
    for (int k = 0;; ++k) {
        const int j = k & 1;
        mbar_wait(bar_if(j), (uint32_t)(k >> 1) & 1u);
        const int item = uniform(s_item[j]);
        if (item < 0) break;
        {
            const Item it = item_of(p, item);
            const int q_valid = min(BM, p.Sq - it.m * BM);
#pragma unroll
            for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                /* Rows past Sq never vote: their running max starts at +inf, so their margin
                 * is -inf (their O and LSE become NaN and are never stored). */
                mrow[r] = row0 + 8 * r < q_valid ? -INFINITY : INFINITY;
                lrow[r] = 0.f;
                rrow[r] = SKIP ? skip_carried_load(p, it.b, it.h, it.m * BM + row0 + 8 * r) : NAN;
            }
        }
        uint32_t *keep = s_keep + j * LW;
        float dmax = -INFINITY; /* vote of the last softmax, cast while the next products run */
        mbar_wait(bar_q, (uint32_t)k & 1u);
        /* The consumers do not walk the mask: the producer's tile index comes with each K
         * stage (walking it in every consumer thread, inside the main loop, measured 10-20%
         * slower). */
        mbar_wait(bar_kf(u % ST), (uint32_t)(u / ST) & 1u);
        int n = uniform(s_tile[u % ST]);
        if (n >= 0) {
            take_turn();
            wg_fence();
            issue_s(sc, u % ST);
            pass_turn();
            wg_wait<0>();
            reg_fence(sc);
            release(bar_ke(u % ST));
            dmax = softmax(sc, alpha, n);
            rescale(alpha);
            pack(sc, pa);
            /* Steady state, per tile: Q K(nn)^T and P V(n) issued back to back (no wgmma
             * under a branch: the compiler would serialise them); the softmax of nn is written
             * between the two waits, O is rescaled and the new P packed once P V(n) is done.
             * Note (nvcc 13.0 SASS): where control flow joins inside the softmax (the
             * masking of the last tile), ptxas places wgmma.wait_group 0 there, so the
             * softmax overlaps the other warpgroup's products (ping-pong) but not this
             * warpgroup's own P V(n); kSplit (above) removes the join. Before that was found,
             * neither a predicated release, nor keeping pa live past the wait, nor moving the
             * rescale and the packing into the next turn (as FlashAttention-3) moved the
             * wait, and the last measured 4-5% slower on the H200 (bench/RESULTS.md). */
            for (;; ++u) {
                const int s = u % ST, s1 = (u + 1) % ST;
                mbar_wait(bar_kf(s1), (uint32_t)((u + 1) / ST) & 1u);
                const int nn = uniform(s_tile[s1]);
                if (nn < 0) break;
                mbar_wait(bar_vf(s), (uint32_t)(u / ST) & 1u);
                take_turn();
                reg_fence(o);
                wg_fence();
                issue_s(sc, s1);
                issue_pv(pa, s);
                pass_turn();
                if (voting) skip_vote(dmax, c, tau, n, keep); /* tile n's vote, off the critical path */
                wg_wait<1>(); /* groups complete in order: Q K(nn)^T is done */
                reg_fence(sc);
                release(bar_ke(s1));
                dmax = softmax(sc, alpha, nn);
                wg_wait<0>(); /* P V(n) is done: O and pa are free */
                reg_fence(o);
                release(bar_ve(s));
                rescale(alpha);
                pack(sc, pa);
                n = nn;
            }
            /* the last tile's P V */
            const int s = u % ST;
            mbar_wait(bar_vf(s), (uint32_t)(u / ST) & 1u);
            take_turn();
            reg_fence(o);
            wg_fence();
            issue_pv(pa, s);
            pass_turn();
            if (voting) skip_vote(dmax, c, tau, n, keep);
            wg_wait<0>();
            reg_fence(o);
            release(bar_ve(s));
            ++u;
        }
        /* The item again, read back from shared memory rather than kept in registers through
         * the loop (they are needed there). */
        const Item it = item_of(p, uniform(s_item[j]));
        const int b = it.b, h = it.h, m = it.m;
        /* u: the end-of-row use. Its K buffer is free at once; Q is free too (every Q K^T of
         * this warpgroup has completed), so the producer may load the next item's. */
        const int se = u % ST;
        /* its V-full phase too is waited for (completed by the producer's plain arrival along
         * with K-full's): compute-sanitizer synccheck counts a phase nobody waited on as an
         * error, which back-to-back empty rows produced. */
        mbar_wait(bar_vf(se), (uint32_t)(u / ST) & 1u);
        release(bar_ke(se));
        release(bar_qe);
        ++u;

        /* Epilogue. O: [B, Sq, H, D]; rows with no computed tile (l = 0) get O = 0 and LSE =
         * -inf. O goes through shared memory (OStage) and one TMA store per 64-column block
         * (128-byte swizzle, the layout the store reads); rows past Sq are clipped by the TMA
         * unit. */
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
        if (OStage<D>::own) release(bar_ve(se));
        if (p.o) { /* none in an LSE-only call (o NULL; the same for every thread) */
            const uint32_t o_base = (OStage<D>::own ? sO : sV + se * TL::kv_bytes) + cw * 64 * 128;
            const int lr0 = (warp & 3) * 16 + g; /* row within the warpgroup's 64 */
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int lr = lr0 + 8 * r;
#pragma unroll
                for (int jj = 0; jj < D / 8; ++jj) {
                    const uint32_t addr =
                        o_base + (jj >> 3) * BM * 128 + lr * 128 + ((((jj & 7) ^ (lr & 7))) << 4) + 4 * tq;
                    const uint32_t v = pack2<T>(o[4 * jj + 2 * r] * inv[r], o[4 * jj + 2 * r + 1] * inv[r]);
                    asm volatile("st.shared.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
                }
            }
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            named_sync<128>(5 + cw);
            if ((ctid & 127) == 0) {
#pragma unroll
                for (int jj = 0; jj < DB; ++jj)
                    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%1, %2, %3, %4}], [%5];" ::"l"(
                                     reinterpret_cast<uint64_t>(&P.to)),
                                 "r"(64 * jj), "r"(m * BM + cw * 64), "r"(h), "r"(b), "r"(o_base + jj * BM * 128)
                                 : "memory");
                asm volatile("cp.async.bulk.commit_group;" ::: "memory");
                asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
            }
            named_sync<128>(5 + cw); /* the staging has been read: it may be written again */
        }
        if (!OStage<D>::own) release(bar_ve(se));

        if (SKIP) {
            /* Every vote of the item is in keep once all consumers have passed named barrier
             * 1 + 7j (two ids: a warpgroup may arrive for item k + 1 before the last one has
             * synced for item k); the last warpgroup writes the row, the others go on. */
            if (cw == NC - 1) {
                named_sync<NCT>(1 + 7 * j);
                skip_row_store(p, b, h, m, s_live + j * LW, keep, ctid - 128 * cw, 128);
            } else {
                named_arrive<NCT>(1 + 7 * j);
            }
        } else if (p.tiles && ctid == 0) {
            atomicAdd(p.tiles, (unsigned long long)nK);
        }
        release_sync(bar_ie(j)); /* the item's buffers (s_item, s_live, s_keep) may be reused */
    }
    /* Every turn passed to warpgroup 0 is taken: the initial one when no tile was visited,
     * else the last warpgroup's last one. */
    if (NC > 1 && cw == 0) named_sync<256>(kTurn);
    /* The last TMA stores have been read from shared memory (each issuing thread waited);
     * the writes to global memory complete before the grid does. */
}

/* Scheduling for mode SKIP, one CTA per head (b, h): the q-tiles of the head sorted by the
 * number of tiles their rows visit, most first (ties by q-tile index, so the order is
 * deterministic): order[(b*H + h)*nQ + rank] = m. Within a head only, so that the CTAs in
 * flight still share their head's K/V in L2. counts: nQ ints of dynamic shared memory. */
static __global__ void order_kernel(const __grid_constant__ KParams p, int32_t *order, int32_t *sched) {
    extern __shared__ int counts[];
    const int h = blockIdx.x, b = blockIdx.y, nQ = p.nQ;
    if (h == 0 && b == 0 && threadIdx.x == 0) *sched = 0; /* the persistent grid's counter */
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

/* Multiprocessors of the current device, read once per device (at most 64 devices). */
inline int sm_count() {
    static int counts[64]; /* 0: not read yet (benign race: same value) */
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    int *at = &counts[dev & 63];
    int n = __atomic_load_n(at, __ATOMIC_RELAXED);
    if (n == 0 && cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess)
        __atomic_store_n(at, n, __ATOMIC_RELAXED);
    return n;
}

template <int D, typename T, bool SKIP>
cudaError_t launch(const KParams &kp, int nQ, int H, int B, cudaStream_t stream) {
    using TL = Tiles<D>;
    auto kern = fwd_kernel<D, T, SKIP>;
    static unsigned long long attr_done = 0;
    cudaError_t err = smem_limit_once(kern, OStage<D>::smem_bytes, &attr_done);
    if (err != cudaSuccess) return err;
    Params pp;
    pp.k = kp;
    pp.sched = nullptr;
    pp.to = CUtensorMap{}; /* stays zero in an LSE-only call */
    if (!make_map<T>(&pp.tq, kp.q, D, kp.Sq, H, B, kp.q_ss, kp.q_sh, kp.q_sb, TL::BM) ||
        !make_map<T>(&pp.tk, kp.k, D, kp.Sk, H, B, kp.k_ss, kp.k_sh, kp.k_sb, TL::BN) ||
        !make_map<T>(&pp.tv, kp.v, D, kp.Sk, H, B, kp.v_ss, kp.v_sh, kp.v_sb, TL::BN) ||
        (kp.o && !make_map<T>(&pp.to, kp.o, D, kp.Sq, H, B, kp.o_ss, kp.o_sh, kp.o_sb, 64)))
        return cudaErrorInvalidValue;
    const int64_t total = (int64_t)nQ * H * B;
    if (total > 0x7fffffff) return cudaErrorInvalidValue;
    /* Persistent grid: one CTA per multiprocessor, each takes items until none is left (the
     * next item's Q and first K/V stages load while the last one's epilogue runs). */
    const int nsm = kp.persist ? sm_count() : 0;
    const int grid = nsm > 0 && nsm < total ? nsm : (int)total;
    /* Mode SKIP: rows differ in length, so the heaviest of each head go first, taken by
     * whichever CTA is free (a counter) when the grid is persistent. Scratch from the
     * stream's memory pool: the counter (16 bytes) and the order; without it the CTAs take the
     * rows in their natural order, in a static stride. */
    int32_t *scratch = nullptr;
    if (kp.mode == LA_MODE_SKIP && nQ > 1 && nQ <= kOrderMaxQTiles &&
        cudaMallocAsync((void **)&scratch, sizeof(int32_t) * (4 + (size_t)total), stream) == cudaSuccess) {
        /* counts padded by 16 ints: the compiler's vectorised reads of the last elements went
         * past nQ ints (compute-sanitizer memcheck on the H200, 12-byte reads at nQ = 2). */
        order_kernel<<<dim3(H, B), 256, sizeof(int) * (nQ + 16), stream>>>(kp, scratch + 4, scratch);
        pp.k.order = scratch + 4;
        if (grid < total) pp.sched = scratch;
    } else {
        (void)cudaGetLastError(); /* a failed allocation is not this call's error */
        pp.k.order = nullptr;
    }
    kern<<<grid, TL::NT, OStage<D>::smem_bytes, stream>>>(pp);
    cudaError_t e = cudaGetLastError();
    if (scratch) {
        cudaError_t ef = cudaFreeAsync(scratch, stream);
        if (e == cudaSuccess) e = ef;
    }
    return e;
}

#endif /* LA_ATTN_FWD_INSTANTIATE */

} /* namespace sm90 */
} /* namespace la_cuda */

#endif /* LA_FWD_SM90_CUH */
