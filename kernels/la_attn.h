/*
 * la_attn.h — the face of kernels/: one POD parameter struct for an attention call, the CPU
 * reference, and the CUDA entry points. Private to the project (not installed).
 *
 * The semantics are those of shared/design SKIP-SEMANTICS.md, restated briefly:
 *   Q: [B, Sq, H, D], K, V: [B, Sk, H, D], O: [B, Sq, H, D]; strides in elements, any sign-
 *   free layout; LSE (optional): [B, H, Sq] f32, natural log of the softmax normaliser over the
 *   keys actually computed (scores already multiplied by scale).
 *   q-tile m = rows [m*BM, min((m+1)*BM, Sq)), k-tile n = keys [n*BN, min((n+1)*BN, Sk)).
 *   Mask row (b, h, m): ceil(nK/32) uint32 words, bit n%32 of word n/32, 1 = compute.
 *   Effective live set = (live | must_do_tiles) & ~must_skip_only_tiles (mode dense: all).
 *   Visit order: descending on even steps, ascending on odd ones (LA_DIR_ALTERNATE).
 *   Row i votes keep on tile n when (t_i - m_i) * scale * log2(e) > tau, t_i = max raw score
 *   q_i.k_j over the tile's valid keys, m_i = running max before the tile (-inf at first).
 *   keep(n) = any valid row voted keep, or n is a must-do tile.
 *   skip: visited tile bit = keep(n); unvisited bits stay 0. observe: new = old & keep.
 *   dense: mask unchanged. The decisions go to `decisions` instead of `mask` when it is set.
 * Details fixed by the CPU reference (kernels/ref.c) that every backend follows:
 *   must-skip-only tiles are not computed in any mode (dense and observe visit all the others);
 *   a visited tile's bit is keep(n) (skip) or old & keep(n) (observe), an unvisited tile keeps
 *   its old bit; bits >= nK of a row's words are written 0 and ignored on input, words past
 *   ceil(nK/32) are never touched; dense reads and writes neither mask nor decisions; a query
 *   row whose (b, h, m) row visits no tile gets O = 0 and LSE = -inf; the vote is evaluated in
 *   fp32 as (t_i - m_i) * (float)(scale * log2 e) > tau, keep when m_i == -inf.
 * Carried row maxima (optional row_max, [B, H, Sq] f32, in and out): the vote compares against
 *   r_i = max(row_max_i, m_i) instead of m_i (NaN in row_max read as -inf); the softmax keeps
 *   its own m_i, so O and LSE do not depend on row_max; at the end row_max_i = max(row_max_i,
 *   m_i) over the visited tiles, for every valid row, in every mode.
 */
#ifndef LA_ATTN_H
#define LA_ATTN_H

#include <stddef.h>
#include <stdint.h>

#include "liteattn_codes.h" /* error codes, la_dtype, la_mode, la_direction, LA_MAX_RANGES */

#ifdef __cplusplus
extern "C" {
#endif

/* Head dims the reference accepts. */
#define LA_REF_HEAD_DIM_OK(d) ((d) == 64 || (d) == 96 || (d) == 128 || (d) == 256)

typedef struct la_range {
    int64_t start, end; /* keys [start, end); empty when end <= start */
} la_range;

typedef struct la_attn_params {
    /* Tensors. Q: [B, Sq, H, D]; K, V: [B, Sk, H, D]; O: [B, Sq, H, D]. Strides in elements,
     * index order (b, s, h, d). All of q/k/v/o share `dtype`. o may be NULL when lse is not:
     * an LSE-only call (the guardrail's dense samples), which computes the same and writes
     * no O. */
    const void *q, *k, *v;
    void *o;
    int64_t q_stride[4], k_stride[4], v_stride[4], o_stride[4];
    /* LSE: [B, H, Sq] f32, strides (b, h, s) in elements; NULL when not wanted. */
    float *lse;
    int64_t lse_stride[3];
    /* Carried row maxima: [B, H, Sq] f32, strides (b, h, s) in elements, raw-score units; read
     * as the votes' starting maxima and overwritten with max(row_max, this call's row maxima)
     * (SKIP-SEMANTICS "Carried row maxima"). NULL when not used. */
    float *row_max;
    int64_t row_max_stride[3];

    int32_t B, Sq, Sk, H, D;
    la_dtype dtype; /* F32 (reference only), F16, BF16 */

    float scale;  /* softmax scale (> 0; callers resolve the 1/sqrt(D) default) */
    float tau;    /* threshold in log2 units; -INFINITY keeps every tile */
    la_mode mode; /* DENSE, OBSERVE or SKIP (never LA_MODE_SESSION here) */
    int32_t step; /* denoising step; its parity picks the direction under ALTERNATE */
    la_direction direction;

    const la_range *must_do; /* host memory, n_must_do <= LA_MAX_RANGES */
    int32_t n_must_do;
    const la_range *must_skip;
    int32_t n_must_skip;

    /* Live mask of this (session, layer, kv shard): row (b, h, m) starts at word
     * b*mask_stride[0] + h*mask_stride[1] + m*mask_stride[2] and holds ceil(nK/32) words.
     * Read by modes OBSERVE/SKIP and updated in place unless `decisions` is set. May be NULL
     * in mode DENSE. The rows may be longer than ceil(nK/32) (sized for a larger max Sk). */
    uint32_t *mask;
    int64_t mask_stride[3];
    /* Dry run: when non-NULL the new mask rows are written here (same strides) instead. */
    uint32_t *decisions;

    int32_t BM, BN;  /* tile sizes, > 0 */
    int32_t threads; /* CPU reference: worker threads (<= 0: 1) */

    /* Out (may be NULL): number of (b, h, m, n) tiles actually computed in this call. */
    int64_t *ret_tiles_computed;
} la_attn_params;

static inline int32_t la_tiles(int32_t len, int32_t tile) { return (len + tile - 1) / tile; }
static inline int32_t la_mask_words(int32_t n_k_tiles) { return (n_k_tiles + 31) / 32; }

/* Bytes of one element of dtype (0 for an unknown dtype). */
size_t la_dtype_size(la_dtype dtype);

/* Bytes a strided tensor of n dims spans from its first element,
 * esize * (1 + sum (size_i - 1) * stride_i), in int64 arithmetic: the one extent computation
 * of the project (the validator's, and the engine's against a buffer). Sizes must be >= 1 and
 * strides >= 0 (else LA_EINVAL). Returns 0, or LA_ERANGE when the extent overflows 63 bits. */
int la_extent_bytes(int n, const int64_t *size, const int64_t *stride, uint64_t esize,
                    uint64_t *ret_bytes);

/* What la_attn_check refused: the rule in words and the tensor it concerns, so that a caller
 * that knows more (the engine: buffers, offsets) can name it. Tensor roles: "q", "k", "v", "o",
 * "lse", "row_max", "mask", "decisions". */
typedef struct la_attn_error {
    const char *tensor; /* the tensor the rule failed for, NULL when none */
    const char *other;  /* an overlap's second tensor, else NULL */
    int dim;            /* the dimension for a stride rule, else -1 */
    char msg[192];      /* e.g. "q stride 3 is negative (-1)", "o overlaps q" */
} la_attn_error;

/* Validates p for the CPU reference: sizes, pointers, head dim, dtype, strides (no output
 * aliasing an input, no negative strides), extents (LA_ERANGE when one overflows), ranges, tile
 * sizes, mode. Returns 0 or LA_EINVAL / LA_ERANGE / LA_ENOTSUP; on an error fills *err when err
 * is not NULL. The one place that decides whether a call is valid: the engine calls it with the
 * session's and buffers' facts; GPU backends call it first and add their own restrictions. */
int la_attn_check(const la_attn_params *p, la_attn_error *err);
/* la_attn_check(p, NULL). */
int la_attn_validate(const la_attn_params *p);

/* Per k-tile flags from the ranges: must_do[w] bit n set when tile n holds a must-do key;
 * skip_only[w] bit n set when every key of tile n is in must-skip ranges and none in must-do.
 * Both arrays hold la_mask_words(nK) words. */
void la_tile_flags(const la_attn_params *p, uint32_t *must_do, uint32_t *skip_only);

/* The CPU reference: exact SKIP-SEMANTICS, fp32 accumulation (bf16/fp16 widened on load),
 * multi-threaded over (b, h, q-tile) with p->threads pthreads. Returns 0 or an error of
 * la_attn_validate / LA_ENOMEM. */
int la_ref_attn_fwd(const la_attn_params *p);
/* la_ref_attn_fwd that stops early once *cancel is non-zero (another thread sets it with an
 * atomic store, e.g. __atomic_store_n): an item still running stops before its next k-tile and
 * writes nothing, items not begun are left, and the call returns *cancel, which must be a
 * negative LA_E* code of the caller's choosing. Items that finished have written their O, LSE,
 * row maxima and mask rows; the others are as they were (the caller treats the call's outputs
 * and mask as undefined). A call whose every item finished returns 0 even when *cancel was set
 * meanwhile. cancel NULL: la_ref_attn_fwd. */
int la_ref_attn_fwd_cancel(const la_attn_params *p, const int *cancel);

#ifdef __cplusplus
}
#endif
#endif /* LA_ATTN_H */
