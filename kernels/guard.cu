/*
 * guard.cu — private: the CUDA twins of kernels/guard_ref.c (la_guard.h): the gather of the
 * guardrail's sampled Q rows, its compare-and-restore, the fill of restored rows and the AND
 * of a warm seed into a mask. Small memory-bound kernels beside the attention call; they
 * follow guard_ref.c line for line so that both backends restore the same rows (fp32 expf may
 * differ in the last bit).
 */
#include <math.h>

#ifndef LA_HAVE_CUDA
#define LA_HAVE_CUDA 1 /* nvcc does not get the C flags: declare the CUDA half, checked here */
#endif
#include "la_guard.h"

namespace {

__device__ float lost_mass(float ls, float ld)
{
    if (ld == -INFINITY || isnan(ls) || isnan(ld))
        return 0.0f;
    float d = ls - ld;
    if (isnan(d))
        return 0.0f;
    if (d > 0.0f)
        d = 0.0f;
    return 1.0f - expf(d);
}

/* A block per (b, h), a thread per sampled q-tile j (blockDim.x = LA_GUARD_MAX_SAMPLE): LSE
 * [B, H, Sq] (strides in elements), dense_lse [B, H, n_tiles * BM] contiguous. The parameters come by value (the sampled
 * tile list is at most LA_GUARD_MAX_SAMPLE ints). */
__global__ void compare_kernel(la_guard_params a, unsigned long long *restored)
{
    int h = (int)(blockIdx.x % a.H), b = (int)(blockIdx.x / a.H), j = (int)threadIdx.x;
    int failed = 0;
    if (j < a.n_tiles) {
        int m = a.tiles[j], r0 = m * a.BM;
        int rows = a.Sq - r0 < a.BM ? a.Sq - r0 : a.BM;
        const float *ld = a.dense_lse + ((long long)b * a.H + h) * a.n_tiles * a.BM +
                          (long long)j * a.BM;
        float worst = 0.0f;
        for (int i = 0; i < rows; i++) {
            float ls = a.lse[b * a.lse_stride[0] + h * a.lse_stride[1] +
                             (long long)(r0 + i) * a.lse_stride[2]];
            float l = lost_mass(ls, ld[i]);
            worst = l > worst ? l : worst;
        }
        failed = worst > a.budget;
    }
    int n_failed = __syncthreads_count(failed);
    unsigned long long head = ((unsigned long long)b * a.H + h) * a.nq, added = 0;
    if (la_guard_escalates(n_failed, a.n_tiles)) {
        for (int m = j; m < a.nq; m += blockDim.x) { /* the whole head */
            unsigned long long row = head + m;
            uint32_t bit = 1u << (row % 32);
            added += !(atomicOr(a.held + row / 32, bit) & bit);
        }
    } else if (failed) {
        unsigned long long row = head + a.tiles[j];
        uint32_t bit = 1u << (row % 32);
        added = !(atomicOr(a.held + row / 32, bit) & bit);
    }
    if (added)
        atomicAdd(restored, added);
}

/* One thread per mask row (b, h, m) of the region. */
__global__ void fill_kernel(uint32_t *mask, long long s0, long long s1, long long s2, int rows_b,
                            int H, int nq, int words, int k_tiles, const uint32_t *held)
{
    long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (long long)rows_b * H * nq)
        return;
    if (!((held[row / 32] >> (row % 32)) & 1u))
        return;
    int m = (int)(row % nq), h = (int)(row / nq % H), b = (int)(row / nq / H);
    uint32_t *w = mask + b * s0 + h * s1 + m * s2;
    int full = k_tiles / 32, rem = k_tiles % 32;
    for (int i = 0; i < words; i++)
        w[i] = i < full ? 0xffffffffu : (i == full && rem) ? (1u << rem) - 1u : 0u;
}

__global__ void and_kernel(uint32_t *dst, const uint32_t *src, size_t n)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        dst[i] &= src[i];
}

struct SampleSet {
    int32_t tiles[LA_GUARD_MAX_SAMPLE];
    int32_t n;
};

/* One thread per element of the gathered Q [B, n * BM, H, D] (guard_ref.c's
 * la_guard_gather_q): row j * BM + i is Q row tiles[j] * BM + i, zero past Sq. */
template <typename T>
__global__ void gather_kernel(T *dst, const T *q, long long s0, long long s1, long long s2,
                              long long s3, long long total, int Sq, int H, int D, int BM,
                              SampleSet set)
{
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total)
        return;
    int k = (int)(e % D), h = (int)(e / D % H);
    long long row = e / ((long long)D * H); /* b * n * BM + j * BM + i */
    int i = (int)(row % BM), j = (int)(row / BM % set.n), b = (int)(row / BM / set.n);
    long long r = (long long)set.tiles[j] * BM + i;
    dst[e] = r < Sq ? q[b * s0 + r * s1 + h * s2 + k * s3] : T(0);
}

unsigned blocks(long long n, int threads) { return (unsigned)((n + threads - 1) / threads); }

} // namespace

extern "C" cudaError_t la_guard_compare_cuda(const la_guard_params *p,
                                             unsigned long long *d_restored, cudaStream_t stream)
{
    if (!p || !d_restored || p->n_tiles < 0 || p->n_tiles > LA_GUARD_MAX_SAMPLE)
        return cudaErrorInvalidValue;
    long long heads = (long long)p->B * p->H;
    if (p->n_tiles == 0 || heads == 0)
        return cudaSuccess;
    compare_kernel<<<(unsigned)heads, LA_GUARD_MAX_SAMPLE, 0, stream>>>(*p, d_restored);
    return cudaGetLastError();
}

extern "C" cudaError_t la_mask_fill_held_cuda(uint32_t *mask, const int64_t mask_stride[3],
                                              int32_t rows_b, int32_t H, int32_t nq,
                                              int32_t words, int32_t k_tiles,
                                              const uint32_t *held, cudaStream_t stream)
{
    long long n = (long long)rows_b * H * nq;
    if (n <= 0)
        return cudaSuccess;
    fill_kernel<<<blocks(n, 256), 256, 0, stream>>>(mask, mask_stride[0], mask_stride[1],
                                                     mask_stride[2], rows_b, H, nq, words,
                                                     k_tiles, held);
    return cudaGetLastError();
}

extern "C" cudaError_t la_mask_and_cuda(uint32_t *dst, const uint32_t *src, size_t n_words,
                                        cudaStream_t stream)
{
    if (n_words == 0)
        return cudaSuccess;
    and_kernel<<<blocks((long long)n_words, 256), 256, 0, stream>>>(dst, src, n_words);
    return cudaGetLastError();
}

extern "C" cudaError_t la_guard_gather_q_cuda(void *dst, const void *q, const int64_t q_stride[4],
                                              int32_t B, int32_t Sq, int32_t H, int32_t D,
                                              size_t es, int32_t BM, const int32_t *tiles,
                                              int32_t n, cudaStream_t stream)
{
    if (!dst || !q || n < 0 || n > LA_GUARD_MAX_SAMPLE || (n && !tiles) || (es != 2 && es != 4))
        return cudaErrorInvalidValue;
    long long total = (long long)B * n * BM * H * D;
    if (total <= 0)
        return cudaSuccess;
    SampleSet set;
    set.n = n;
    for (int j = 0; j < LA_GUARD_MAX_SAMPLE; j++)
        set.tiles[j] = j < n ? tiles[j] : 0;
    const int64_t *s = q_stride;
    if (es == 2)
        gather_kernel<uint16_t><<<blocks(total, 256), 256, 0, stream>>>(
            (uint16_t *)dst, (const uint16_t *)q, s[0], s[1], s[2], s[3], total, Sq, H, D, BM, set);
    else
        gather_kernel<uint32_t><<<blocks(total, 256), 256, 0, stream>>>(
            (uint32_t *)dst, (const uint32_t *)q, s[0], s[1], s[2], s[3], total, Sq, H, D, BM, set);
    return cudaGetLastError();
}
