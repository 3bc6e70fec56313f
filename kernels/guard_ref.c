/*
 * guard_ref.c — private: the host reference of the warm-start and guardrail mask operations
 * (la_guard.h). The CPU backend runs these; kernels/guard.cu follows them on the GPU.
 */
#include <math.h>
#include <string.h>

#include "la_guard.h"

int la_guard_sample(int32_t n_q_tiles, int32_t sample, uint32_t check_index, int32_t *ret_tiles)
{
    if (n_q_tiles < 1 || sample < 1)
        return 0;
    int32_t s = sample < n_q_tiles ? sample : n_q_tiles;
    if (s > LA_GUARD_MAX_SAMPLE)
        s = LA_GUARD_MAX_SAMPLE;
    int32_t t = n_q_tiles / s; /* >= 1 */
    int32_t r = (int32_t)(check_index % (uint32_t)t);
    for (int32_t j = 0; j < s; j++)
        ret_tiles[j] = r + j * t;
    return s;
}

/* fp32, as on the GPU: 1 - exp(min(0, ls - ld)); 0 when nothing was there to lose. */
static float lost_mass(float ls, float ld)
{
    if (ld == -INFINITY || isnan(ls) || isnan(ld))
        return 0.0f;
    float d = ls - ld;
    if (isnan(d)) /* -inf - -inf cannot happen here (ld finite or +inf) */
        return 0.0f;
    if (d > 0.0f)
        d = 0.0f;
    return 1.0f - expf(d);
}

/* Sets held bit (b, h, m); 1 when it was not set. */
static uint64_t hold(uint32_t *held, int32_t H, int32_t nq, int32_t b, int32_t h, int32_t m)
{
    uint64_t row = ((uint64_t)b * H + h) * nq + m;
    uint32_t bit = 1u << (row % 32);
    if (held[row / 32] & bit)
        return 0;
    held[row / 32] |= bit;
    return 1;
}

uint64_t la_guard_compare(const la_guard_params *p)
{
    uint64_t added = 0;
    for (int32_t b = 0; b < p->B; b++)
        for (int32_t h = 0; h < p->H; h++) {
            uint64_t failed = 0; /* bit j: sampled q-tile j lost more than the budget */
            int32_t n_failed = 0;
            for (int32_t j = 0; j < p->n_tiles; j++) {
                int32_t m = p->tiles[j], r0 = m * p->BM;
                int32_t rows = p->Sq - r0 < p->BM ? p->Sq - r0 : p->BM;
                const float *ld = p->dense_lse +
                                  ((int64_t)b * p->H + h) * p->n_tiles * p->BM +
                                  (int64_t)j * p->BM;
                float worst = 0.0f;
                for (int32_t i = 0; i < rows; i++) {
                    float ls = p->lse[b * p->lse_stride[0] + h * p->lse_stride[1] +
                                      (int64_t)(r0 + i) * p->lse_stride[2]];
                    float l = lost_mass(ls, ld[i]);
                    if (l > worst)
                        worst = l;
                }
                if (worst > p->budget) {
                    failed |= 1ull << j;
                    n_failed++;
                }
            }
            if (la_guard_escalates(n_failed, p->n_tiles)) {
                for (int32_t m = 0; m < p->nq; m++) /* the whole head */
                    added += hold(p->held, p->H, p->nq, b, h, m);
                continue;
            }
            for (int32_t j = 0; j < p->n_tiles; j++)
                if (failed >> j & 1u)
                    added += hold(p->held, p->H, p->nq, b, h, p->tiles[j]);
        }
    return added;
}

void la_mask_fill_held(uint32_t *mask, const int64_t mask_stride[3], int32_t rows_b, int32_t H,
                       int32_t nq, int32_t words, int32_t k_tiles, const uint32_t *held)
{
    int32_t full = k_tiles / 32, rem = k_tiles % 32;
    for (int32_t b = 0; b < rows_b; b++)
        for (int32_t h = 0; h < H; h++)
            for (int32_t m = 0; m < nq; m++) {
                uint64_t row = ((uint64_t)b * H + h) * nq + m;
                if (!((held[row / 32] >> (row % 32)) & 1u))
                    continue;
                uint32_t *w = mask + b * mask_stride[0] + h * mask_stride[1] + m * mask_stride[2];
                for (int32_t i = 0; i < words; i++)
                    w[i] = i < full ? 0xffffffffu : i == full && rem ? (1u << rem) - 1u : 0u;
            }
}

void la_mask_and(uint32_t *dst, const uint32_t *src, size_t n_words)
{
    for (size_t i = 0; i < n_words; i++)
        dst[i] &= src[i];
}

void la_guard_gather_q(void *dst, const void *q, const int64_t q_stride[4], int32_t B,
                       int32_t Sq, int32_t H, int32_t D, size_t es, int32_t BM,
                       const int32_t *tiles, int32_t n)
{
    char *d = dst;
    const char *src = q;
    for (int32_t b = 0; b < B; b++)
        for (int32_t j = 0; j < n; j++)
            for (int32_t i = 0; i < BM; i++) {
                int64_t r = (int64_t)tiles[j] * BM + i;
                for (int32_t h = 0; h < H; h++) {
                    char *row = d + es * (size_t)((((int64_t)b * n * BM + (int64_t)j * BM + i) *
                                                   H + h) * D);
                    if (r >= Sq) {
                        memset(row, 0, es * (size_t)D);
                        continue;
                    }
                    for (int32_t k = 0; k < D; k++)
                        memcpy(row + es * (size_t)k,
                               src + es * (size_t)(b * q_stride[0] + r * q_stride[1] +
                                                   h * q_stride[2] + k * q_stride[3]),
                               es);
                }
            }
}
