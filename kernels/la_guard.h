/*
 * la_guard.h — private: the mask operations of the warm start and the online quality
 * guardrail (docs/SKIP-SEMANTICS.md, "Warm start across generations" and "Online quality
 * guardrail"), host versions (guard_ref.c, the reference) and, with LA_HAVE_CUDA, their CUDA
 * twins (guard.cu), which follow the same rules on device memory in stream order.
 *
 * Layouts:
 *   mask region: rows (b, h, m) of `words` uint32 words at b*ms[0] + h*ms[1] + m*ms[2] (the
 *     session's layout: ms[2] = words, ms[1] = words * nq, ms[0] = ms[1] * H).
 *   held bitmap of a region: bit r of word r/32, r = (b * H + h) * nq + m; 1 = restored row.
 *   lse of the call: [B, H, Sq] f32, strides in elements (b, h, s).
 *   gathered Q of the samples: [B, n * BM, H, D] contiguous, row j * BM + i = the call's Q row
 *     tiles[j] * BM + i (zero past Sq). The samples of a checked call are one LSE-only call
 *     in mode dense on it (engine/guard.c).
 *   dense_lse of the samples: [B, H, n * BM] f32 contiguous, that call's LSE: row i of sampled
 *     q-tile j at (b * H + h) * n * BM + j * BM + i (rows past Sq unused).
 */
#ifndef LA_GUARD_H
#define LA_GUARD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Most q-tiles one checked call samples. */
#define LA_GUARD_MAX_SAMPLE 64

/* The sampled q-tiles of check number c (= step / N) of a call with n_q_tiles q-tiles:
 * S' = min(sample, n_q_tiles, LA_GUARD_MAX_SAMPLE), T = n_q_tiles / S', m_j = c % T + j * T.
 * Writes S' indices into ret_tiles[LA_GUARD_MAX_SAMPLE] and returns S' (0 when n_q_tiles or
 * sample is < 1). */
int la_guard_sample(int32_t n_q_tiles, int32_t sample, uint32_t check_index, int32_t *ret_tiles);

typedef struct la_guard_params {
    const float *lse; /* the call's LSE [B, H, Sq] */
    int64_t lse_stride[3];
    const float *dense_lse; /* [B, H, n_tiles * BM] */
    int32_t tiles[LA_GUARD_MAX_SAMPLE];
    int32_t n_tiles;
    int32_t B, H, Sq, BM;
    int32_t nq; /* q-tiles per (b, h) of the region (the session's), for the held index */
    float budget;
    uint32_t *held; /* the region's held bitmap */
} la_guard_params;

/* Escalation (docs/SKIP-SEMANTICS.md): more than half of a head's n sampled q-tiles (n >= 2)
 * lost more than the budget, so every q-tile row of that head is restored. */
#ifdef __CUDACC__
__host__ __device__
#endif
static inline int la_guard_escalates(int32_t n_failed, int32_t n)
{
    return n >= 2 && 2 * n_failed > n;
}

/* Per sampled (b, h, m): the largest lost mass 1 - exp(min(0, lse - dense_lse)) over its
 * valid rows (fp32; 0 where dense_lse is -inf, NaN counts as 0); above budget, held bit (b, h,
 * m) is set, or every held bit (b, h, 0..nq) when the head escalates (la_guard_escalates).
 * Returns the number of bits newly set. */
uint64_t la_guard_compare(const la_guard_params *p);

/* Every row of the region whose held bit is set becomes all ones in its first ceil(k_tiles/32)
 * words (bits >= k_tiles 0). rows_b, H, nq: the region's rows (the session's batch, heads,
 * q-tiles). */
void la_mask_fill_held(uint32_t *mask, const int64_t mask_stride[3], int32_t rows_b, int32_t H,
                       int32_t nq, int32_t words, int32_t k_tiles, const uint32_t *held);

/* dst[i] &= src[i] for i < n_words. */
void la_mask_and(uint32_t *dst, const uint32_t *src, size_t n_words);

/* The rows of the n sampled q-tiles tiles[0..n) of Q (elements of es bytes, strides in
 * elements (b, s, h, d)) gathered into dst (layout above, B * n * BM * H * D elements, zero
 * past Sq). */
void la_guard_gather_q(void *dst, const void *q, const int64_t q_stride[4], int32_t B,
                       int32_t Sq, int32_t H, int32_t D, size_t es, int32_t BM,
                       const int32_t *tiles, int32_t n);

/* Bytes of the held bitmap of a region of rows_b * H * nq rows (whole uint32 words). */
static inline uint64_t la_guard_held_bytes(uint64_t rows_b, uint64_t H, uint64_t nq)
{
    return (rows_b * H * nq + 31) / 32 * 4;
}

#ifdef LA_HAVE_CUDA
#include <cuda_runtime_api.h>
/* The same three operations on device memory, enqueued on stream, never synchronising.
 * p->lse, p->dense_lse, p->held are device pointers; *d_restored (device, 64-bit) gets the
 * number of newly held rows added. */
cudaError_t la_guard_compare_cuda(const la_guard_params *p, unsigned long long *d_restored,
                                  cudaStream_t stream);
cudaError_t la_mask_fill_held_cuda(uint32_t *mask, const int64_t mask_stride[3], int32_t rows_b,
                                   int32_t H, int32_t nq, int32_t words, int32_t k_tiles,
                                   const uint32_t *held, cudaStream_t stream);
cudaError_t la_mask_and_cuda(uint32_t *dst, const uint32_t *src, size_t n_words,
                             cudaStream_t stream);
/* q and dst in device memory, es 2 or 4; tiles: host memory, n <= LA_GUARD_MAX_SAMPLE
 * (passed by value to the kernel). */
cudaError_t la_guard_gather_q_cuda(void *dst, const void *q, const int64_t q_stride[4], int32_t B,
                                   int32_t Sq, int32_t H, int32_t D, size_t es, int32_t BM,
                                   const int32_t *tiles, int32_t n, cudaStream_t stream);
#endif

#ifdef __cplusplus
}
#endif
#endif /* LA_GUARD_H */
