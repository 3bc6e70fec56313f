/*
 * ref_validate.c — private: checking an la_attn_params before any backend touches memory, and
 * turning must-do / must-skip key ranges into per-k-tile flags. Shared by the CPU reference and
 * the CUDA launchers (la_attn.h).
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
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

int la_extent_bytes(int n, const int64_t *size, const int64_t *stride, uint64_t esize,
                    uint64_t *ret_bytes)
{
    int64_t last = 0; /* element offset of the last element */
    for (int i = 0; i < n; i++) {
        int64_t t;
        if (size[i] < 1 || stride[i] < 0)
            return LA_EINVAL;
        if (__builtin_mul_overflow(size[i] - 1, stride[i], &t) ||
            __builtin_add_overflow(last, t, &last))
            return LA_ERANGE;
    }
    int64_t bytes;
    if (esize > INT64_MAX || __builtin_add_overflow(last, 1, &last) ||
        __builtin_mul_overflow(last, (int64_t)esize, &bytes))
        return LA_ERANGE;
    *ret_bytes = (uint64_t)bytes;
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
    uint64_t bytes;
    uintptr_t lo = (uintptr_t)base, hi;
    if (la_extent_bytes(n, size, stride, esize, &bytes) < 0 || bytes > UINTPTR_MAX ||
        __builtin_add_overflow(lo, (uintptr_t)bytes, &hi))
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

/* Fills *err (when not NULL) and returns code. */
__attribute__((format(printf, 5, 6))) static int
fail(la_attn_error *err, int code, const char *tensor, const char *other, const char *fmt, ...)
{
    if (err) {
        err->tensor = tensor;
        err->other = other;
        err->dim = -1;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

static int strides_nonneg(const char *role, int n, const int64_t *stride, la_attn_error *err)
{
    for (int i = 0; i < n; i++)
        if (stride[i] < 0) {
            fail(err, LA_EINVAL, role, NULL, "%s stride %d is negative (%lld)", role, i,
                 (long long)stride[i]);
            if (err)
                err->dim = i;
            return LA_EINVAL;
        }
    return 0;
}

/* The extent of one tensor, or an error naming it. */
static int check_extent(const char *role, const void *base, int n, const int64_t *size,
                        const int64_t *stride, size_t esize, extent *ret, la_attn_error *err)
{
    if (!tensor_extent(base, n, size, stride, esize, ret))
        return fail(err, LA_ERANGE, role, NULL, "%s extent overflows 64 bits (strides too large)",
                    role);
    return 0;
}

static int check_distinct(const char *role, int n, const int64_t *size, const int64_t *stride,
                          la_attn_error *err)
{
    if (!strides_distinct(n, size, stride))
        return fail(err, LA_EINVAL, role, NULL,
                    "%s strides map two indices onto one element (an output may not)", role);
    return 0;
}

static int check_scalars(const la_attn_params *p, la_attn_error *err)
{
    if (p->B <= 0 || p->Sq <= 0 || p->Sk <= 0 || p->H <= 0 || p->D <= 0)
        return fail(err, LA_EINVAL, NULL, NULL,
                    "sizes B %d, Sq %d, Sk %d, H %d, D %d (must be > 0)", p->B, p->Sq, p->Sk, p->H,
                    p->D);
    if (p->BM <= 0 || p->BN <= 0)
        return fail(err, LA_EINVAL, NULL, NULL, "tile sizes %d x %d (must be > 0)", p->BM, p->BN);
    switch (p->dtype) {
    case LA_DTYPE_F32:
    case LA_DTYPE_F16:
    case LA_DTYPE_BF16: break;
    case LA_DTYPE_U32: /* a known dtype, but not one attention computes in */
        return fail(err, LA_ENOTSUP, NULL, NULL, "attention does not compute in u32");
    default: return fail(err, LA_EINVAL, NULL, NULL, "unknown dtype %d", (int)p->dtype);
    }
    if (!LA_REF_HEAD_DIM_OK(p->D))
        return fail(err, LA_ENOTSUP, NULL, NULL, "head dim %d (64, 96, 128 or 256)", p->D);
    /* LA_MODE_SESSION must be resolved by the caller (the daemon) before a kernel sees it. */
    if (p->mode != LA_MODE_DENSE && p->mode != LA_MODE_OBSERVE && p->mode != LA_MODE_SKIP)
        return fail(err, LA_EINVAL, NULL, NULL, "unknown mode %d", (int)p->mode);
    if (p->direction != LA_DIR_ALTERNATE && p->direction != LA_DIR_ASCENDING &&
        p->direction != LA_DIR_DESCENDING)
        return fail(err, LA_EINVAL, NULL, NULL, "unknown direction %d", (int)p->direction);
    if (!(p->scale > 0.0f) || !isfinite(p->scale))
        return fail(err, LA_EINVAL, NULL, NULL, "softmax scale %g (must be finite and > 0)",
                    (double)p->scale);
    if (isnan(p->tau)) /* +-inf are meaningful: keep everything / keep only the first tile */
        return fail(err, LA_EINVAL, NULL, NULL, "threshold is NaN");
    if (p->n_must_do < 0 || p->n_must_do > LA_MAX_RANGES || p->n_must_skip < 0 ||
        p->n_must_skip > LA_MAX_RANGES || (p->n_must_do > 0 && p->must_do == NULL) ||
        (p->n_must_skip > 0 && p->must_skip == NULL))
        return fail(err, LA_EINVAL, NULL, NULL,
                    "%d must-do and %d must-skip ranges (at most %d each)", p->n_must_do,
                    p->n_must_skip, LA_MAX_RANGES);
    return 0;
}

int la_attn_validate(const la_attn_params *p) { return la_attn_check(p, NULL); }

int la_attn_check(const la_attn_params *p, la_attn_error *err)
{
    if (p == NULL)
        return fail(err, LA_EINVAL, NULL, NULL, "no parameters");
    int rc;
    if ((rc = check_scalars(p, err)) < 0)
        return rc;
    const char *nul = p->q == NULL   ? "q"
                      : p->k == NULL ? "k"
                      : p->v == NULL ? "v"
                                     : NULL;
    if (nul)
        return fail(err, LA_EINVAL, nul, NULL, "%s is NULL", nul);
    if (p->o == NULL && p->lse == NULL)
        return fail(err, LA_EINVAL, "o", NULL, "o is NULL and so is lse (a call writes one)");
    bool uses_mask = p->mode != LA_MODE_DENSE;
    if (uses_mask && p->mask == NULL)
        return fail(err, LA_EINVAL, "mask", NULL, "mode %d reads a mask, and mask is NULL",
                    (int)p->mode);

    if ((rc = strides_nonneg("q", 4, p->q_stride, err)) < 0 ||
        (rc = strides_nonneg("k", 4, p->k_stride, err)) < 0 ||
        (rc = strides_nonneg("v", 4, p->v_stride, err)) < 0 ||
        (p->o != NULL && (rc = strides_nonneg("o", 4, p->o_stride, err)) < 0) ||
        (p->lse != NULL && (rc = strides_nonneg("lse", 3, p->lse_stride, err)) < 0) ||
        (p->row_max != NULL && (rc = strides_nonneg("row_max", 3, p->row_max_stride, err)) < 0) ||
        (uses_mask && (rc = strides_nonneg("mask", 3, p->mask_stride, err)) < 0))
        return rc;

    /* Byte extents: an output may not overlap any input or another output, and the outputs
     * must not map two indices onto one element (threads would race on it). */
    size_t es = la_dtype_size(p->dtype);
    int64_t qsz[4] = {p->B, p->Sq, p->H, p->D}, ksz[4] = {p->B, p->Sk, p->H, p->D};
    extent eq, ek, ev, eo = {0, 0}, el = {0, 0}, em = {0, 0}, ed = {0, 0};
    if ((rc = check_extent("q", p->q, 4, qsz, p->q_stride, es, &eq, err)) < 0 ||
        (rc = check_extent("k", p->k, 4, ksz, p->k_stride, es, &ek, err)) < 0 ||
        (rc = check_extent("v", p->v, 4, ksz, p->v_stride, es, &ev, err)) < 0 ||
        (p->o != NULL &&
         ((rc = check_extent("o", p->o, 4, qsz, p->o_stride, es, &eo, err)) < 0 ||
          (rc = check_distinct("o", 4, qsz, p->o_stride, err)) < 0)))
        return rc;
    extent outs[5];
    const char *out_role[5];
    int n_out = 0;
    if (p->o != NULL) {
        out_role[n_out] = "o";
        outs[n_out++] = eo;
    }
    if (p->lse != NULL) {
        int64_t lsz[3] = {p->B, p->H, p->Sq};
        if ((rc = check_extent("lse", p->lse, 3, lsz, p->lse_stride, 4, &el, err)) < 0 ||
            (rc = check_distinct("lse", 3, lsz, p->lse_stride, err)) < 0)
            return rc;
        out_role[n_out] = "lse";
        outs[n_out++] = el;
    }
    if (p->row_max != NULL) {
        /* Read and written in place: an output like lse, apart from every other tensor. */
        int64_t rsz[3] = {p->B, p->H, p->Sq};
        extent er;
        if ((rc = check_extent("row_max", p->row_max, 3, rsz, p->row_max_stride, 4, &er, err)) < 0 ||
            (rc = check_distinct("row_max", 3, rsz, p->row_max_stride, err)) < 0)
            return rc;
        out_role[n_out] = "row_max";
        outs[n_out++] = er;
    }
    if (uses_mask) {
        /* A mask row is ceil(nK/32) contiguous words; rows are indexed (b, h, m). */
        int32_t nq = la_tiles(p->Sq, p->BM), words = la_mask_words(la_tiles(p->Sk, p->BN));
        int64_t msz[4] = {p->B, p->H, nq, words};
        int64_t mst[4] = {p->mask_stride[0], p->mask_stride[1], p->mask_stride[2], 1};
        if ((rc = check_extent("mask", p->mask, 4, msz, mst, 4, &em, err)) < 0 ||
            (rc = check_distinct("mask", 4, msz, mst, err)) < 0)
            return rc;
        if (p->decisions != NULL) {
            if ((rc = check_extent("decisions", p->decisions, 4, msz, mst, 4, &ed, err)) < 0)
                return rc;
            out_role[n_out] = "decisions";
            outs[n_out++] = ed;
        } else {
            out_role[n_out] = "mask";
            outs[n_out++] = em;
        }
    }
    const char *in_role[3] = {"q", "k", "v"};
    extent ins[3] = {eq, ek, ev};
    for (int i = 0; i < n_out; i++) {
        for (int j = 0; j < 3; j++)
            if (extents_overlap(outs[i], ins[j]))
                return fail(err, LA_EINVAL, out_role[i], in_role[j], "%s overlaps %s", out_role[i],
                            in_role[j]);
        for (int j = 0; j < i; j++)
            if (extents_overlap(outs[i], outs[j]))
                return fail(err, LA_EINVAL, out_role[i], out_role[j], "%s overlaps %s", out_role[i],
                            out_role[j]);
    }
    /* A dry run reads the mask while writing decisions: they must be apart. */
    if (uses_mask && p->decisions != NULL && extents_overlap(em, ed))
        return fail(err, LA_EINVAL, "decisions", "mask", "decisions overlaps mask");
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
