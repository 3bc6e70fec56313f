/*
 * ref_validate.c — private: checking an la_attn_params before any backend touches memory, and
 * turning must-do / must-skip key ranges into per-k-tile flags. Shared by the CPU reference and
 * the CUDA launchers (la_attn.h).
 */
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "la_attn.h"

size_t la_dtype_size(la_dtype dtype)
{
    switch (dtype) {
    case LA_DTYPE_F32: return 4;
    case LA_DTYPE_F16: return 2;
    case LA_DTYPE_BF16: return 2;
    case LA_DTYPE_U32: return 4;
    }
    return 0;
}

/* Half-open byte interval [lo, hi) that a strided tensor can touch. */
typedef struct extent {
    uintptr_t lo, hi;
} extent;

/* Extent of a tensor of n dims (sizes > 0, strides >= 0, in elements of esize bytes) starting at
 * base. Returns false on arithmetic overflow (a stride so large that no real buffer fits it). */
static bool tensor_extent(const void *base, int n, const int64_t *size, const int64_t *stride,
                          size_t esize, extent *ret)
{
    int64_t last = 0; /* element offset of the last element */
    for (int i = 0; i < n; i++) {
        int64_t t;
        if (__builtin_mul_overflow(size[i] - 1, stride[i], &t) ||
            __builtin_add_overflow(last, t, &last))
            return false;
    }
    int64_t bytes;
    if (__builtin_add_overflow(last, 1, &last) ||
        __builtin_mul_overflow(last, (int64_t)esize, &bytes))
        return false;
    uintptr_t lo = (uintptr_t)base, hi;
    if (__builtin_add_overflow(lo, (uintptr_t)bytes, &hi))
        return false;
    ret->lo = lo;
    ret->hi = hi;
    return true;
}

static bool extents_overlap(extent a, extent b) { return a.lo < b.hi && b.lo < a.hi; }

/* True when no two index tuples of the tensor map to the same element, so that threads writing
 * different elements never race. Sufficient test (as in PyTorch's non-overlapping check): sorted
 * by stride, each stride must step over the whole extent of the smaller dims. Dims of size 1 do
 * not matter. */
static bool strides_distinct(int n, const int64_t *size, const int64_t *stride)
{
    int idx[8], m = 0;
    for (int i = 0; i < n; i++)
        if (size[i] > 1)
            idx[m++] = i;
    for (int i = 1; i < m; i++) /* insertion sort by stride */
        for (int j = i; j > 0 && stride[idx[j]] < stride[idx[j - 1]]; j--) {
            int t = idx[j];
            idx[j] = idx[j - 1];
            idx[j - 1] = t;
        }
    int64_t span = 1; /* elements covered by the dims sorted so far */
    for (int i = 0; i < m; i++) {
        int64_t s = stride[idx[i]];
        if (s < span)
            return false;
        if (__builtin_mul_overflow(s, size[idx[i]], &span))
            return false;
    }
    return true;
}

static bool strides_nonneg(int n, const int64_t *stride)
{
    for (int i = 0; i < n; i++)
        if (stride[i] < 0)
            return false;
    return true;
}

static int check_ranges(const la_range *r, int32_t n)
{
    if (n < 0 || n > LA_MAX_RANGES)
        return LA_EINVAL;
    if (n > 0 && r == NULL)
        return LA_EINVAL;
    return 0;
}

int la_attn_validate(const la_attn_params *p)
{
    if (p == NULL)
        return LA_EINVAL;
    if (p->B <= 0 || p->Sq <= 0 || p->Sk <= 0 || p->H <= 0 || p->D <= 0)
        return LA_EINVAL;
    if (p->BM <= 0 || p->BN <= 0)
        return LA_EINVAL;
    switch (p->dtype) {
    case LA_DTYPE_F32: case LA_DTYPE_F16: case LA_DTYPE_BF16: break;
    case LA_DTYPE_U32: return LA_ENOTSUP; /* a known dtype, but not one attention computes in */
    default: return LA_EINVAL;
    }
    if (!LA_REF_HEAD_DIM_OK(p->D))
        return LA_ENOTSUP;
    /* LA_MODE_SESSION must be resolved by the caller (the daemon) before a kernel sees it. */
    if (p->mode != LA_MODE_DENSE && p->mode != LA_MODE_OBSERVE && p->mode != LA_MODE_SKIP)
        return LA_EINVAL;
    if (p->direction != LA_DIR_ALTERNATE && p->direction != LA_DIR_ASCENDING &&
        p->direction != LA_DIR_DESCENDING)
        return LA_EINVAL;
    if (!(p->scale > 0.0f) || !isfinite(p->scale))
        return LA_EINVAL;
    if (isnan(p->tau)) /* +-inf are meaningful: keep everything / keep only the first tile */
        return LA_EINVAL;
    if (p->q == NULL || p->k == NULL || p->v == NULL || p->o == NULL)
        return LA_EINVAL;
    bool uses_mask = p->mode != LA_MODE_DENSE;
    if (uses_mask && p->mask == NULL)
        return LA_EINVAL;
    int rc;
    if ((rc = check_ranges(p->must_do, p->n_must_do)) < 0 ||
        (rc = check_ranges(p->must_skip, p->n_must_skip)) < 0)
        return rc;

    if (!strides_nonneg(4, p->q_stride) || !strides_nonneg(4, p->k_stride) ||
        !strides_nonneg(4, p->v_stride) || !strides_nonneg(4, p->o_stride))
        return LA_EINVAL;
    if (p->lse != NULL && !strides_nonneg(3, p->lse_stride))
        return LA_EINVAL;
    if (uses_mask && !strides_nonneg(3, p->mask_stride))
        return LA_EINVAL;

    /* Byte extents: an output may not overlap any input or another output, and the outputs
     * must not map two indices onto one element (threads would race on it). */
    size_t es = la_dtype_size(p->dtype);
    int64_t qsz[4] = {p->B, p->Sq, p->H, p->D}, ksz[4] = {p->B, p->Sk, p->H, p->D};
    extent eq, ek, ev, eo, el = {0, 0}, em = {0, 0}, ed = {0, 0};
    if (!tensor_extent(p->q, 4, qsz, p->q_stride, es, &eq) ||
        !tensor_extent(p->k, 4, ksz, p->k_stride, es, &ek) ||
        !tensor_extent(p->v, 4, ksz, p->v_stride, es, &ev) ||
        !tensor_extent(p->o, 4, qsz, p->o_stride, es, &eo))
        return LA_EINVAL;
    if (!strides_distinct(4, qsz, p->o_stride))
        return LA_EINVAL;
    extent outs[4];
    int n_out = 0;
    outs[n_out++] = eo;
    if (p->lse != NULL) {
        int64_t lsz[3] = {p->B, p->H, p->Sq};
        if (!tensor_extent(p->lse, 3, lsz, p->lse_stride, 4, &el) ||
            !strides_distinct(3, lsz, p->lse_stride))
            return LA_EINVAL;
        outs[n_out++] = el;
    }
    if (uses_mask) {
        /* A mask row is ceil(nK/32) contiguous words; rows are indexed (b, h, m). */
        int32_t nq = la_tiles(p->Sq, p->BM), words = la_mask_words(la_tiles(p->Sk, p->BN));
        int64_t msz[4] = {p->B, p->H, nq, words};
        int64_t mst[4] = {p->mask_stride[0], p->mask_stride[1], p->mask_stride[2], 1};
        if (!tensor_extent(p->mask, 4, msz, mst, 4, &em) || !strides_distinct(4, msz, mst))
            return LA_EINVAL;
        if (p->decisions != NULL) {
            if (!tensor_extent(p->decisions, 4, msz, mst, 4, &ed))
                return LA_EINVAL;
            outs[n_out++] = ed;
        } else {
            outs[n_out++] = em;
        }
    }
    for (int i = 0; i < n_out; i++) {
        if (extents_overlap(outs[i], eq) || extents_overlap(outs[i], ek) ||
            extents_overlap(outs[i], ev))
            return LA_EINVAL;
        for (int j = i + 1; j < n_out; j++)
            if (extents_overlap(outs[i], outs[j]))
                return LA_EINVAL;
    }
    /* A dry run reads the mask while writing decisions: they must be apart. */
    if (uses_mask && p->decisions != NULL && extents_overlap(em, ed))
        return LA_EINVAL;
    return 0;
}

static int range_cmp(const void *a, const void *b)
{
    const la_range *x = a, *y = b;
    return (x->start > y->start) - (x->start < y->start);
}

void la_tile_flags(const la_attn_params *p, uint32_t *must_do, uint32_t *skip_only)
{
    int32_t nk = la_tiles(p->Sk, p->BN), words = la_mask_words(nk);
    memset(must_do, 0, (size_t)words * 4);
    memset(skip_only, 0, (size_t)words * 4);

    /* Must-do: tiles n with any key of [start, end) ∩ [0, Sk); ranges past Sk are clipped,
     * empty ones ignored. */
    for (int32_t i = 0; i < p->n_must_do; i++) {
        int64_t s = p->must_do[i].start < 0 ? 0 : p->must_do[i].start;
        int64_t e = p->must_do[i].end > p->Sk ? p->Sk : p->must_do[i].end;
        if (e <= s)
            continue;
        for (int64_t n = s / p->BN; n <= (e - 1) / p->BN; n++)
            must_do[n / 32] |= 1u << (n % 32);
    }

    /* Must-skip-only: every key of the tile lies in the union of the must-skip ranges. Merge the
     * clipped ranges into disjoint intervals first, so that a tile covered by two adjacent or
     * overlapping ranges counts as covered. */
    la_range r[LA_MAX_RANGES];
    int n = 0;
    for (int32_t i = 0; i < p->n_must_skip; i++) {
        int64_t s = p->must_skip[i].start < 0 ? 0 : p->must_skip[i].start;
        int64_t e = p->must_skip[i].end > p->Sk ? p->Sk : p->must_skip[i].end;
        if (e > s)
            r[n++] = (la_range){s, e};
    }
    if (n == 0)
        return;
    qsort(r, (size_t)n, sizeof r[0], range_cmp);
    int m = 0;
    for (int i = 1; i < n; i++) {
        if (r[i].start <= r[m].end) {
            if (r[i].end > r[m].end)
                r[m].end = r[i].end;
        } else {
            r[++m] = r[i];
        }
    }
    m++;
    for (int i = 0; i < m; i++) {
        /* Tiles wholly inside [start, end): first tile starting at or after start, through the
         * last tile whose end (clipped to Sk) is at or before end. */
        int64_t n0 = (r[i].start + p->BN - 1) / p->BN;
        for (int64_t t = n0; t < nk; t++) {
            int64_t hi = (t + 1) * p->BN < p->Sk ? (t + 1) * p->BN : p->Sk;
            if (hi > r[i].end)
                break;
            if (!(must_do[t / 32] & (1u << (t % 32))))
                skip_only[t / 32] |= 1u << (t % 32);
        }
    }
}
