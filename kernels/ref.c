/*
 * ref.c — private: the CPU reference of LiteAttention (shared/design SKIP-SEMANTICS.md), the
 * definition every CUDA kernel is checked against and the daemon's CPU backend.
 *
 * Work is split into (b, h, q-tile) items taken from an atomic counter by p->threads pthreads.
 * An item owns its mask row, so the row is updated in place with no locking. For each visited
 * k-tile the K and V tiles are widened to fp32 into per-thread scratch (K transposed), so that
 * the score block S = Q K^T and the update O += P V are plain loops over independent outputs that
 * the compiler vectorises without reassociating any sum: the result does not depend on the
 * vector width, the thread count or the order in which items are taken. A caller may stop a
 * call between k-tiles (la_ref_attn_fwd_cancel): the daemon does when the call's client leaves
 * or on SIGTERM, since one q-tile against millions of keys can take minutes.
 *
 * Choices SKIP-SEMANTICS.md leaves open, fixed here (and followed by every backend):
 * - Must-skip-only tiles are never computed, in any mode; modes DENSE and OBSERVE visit every
 *   other tile, SKIP visits (live | must-do) & ~must-skip-only.
 * - A row (b, h, m) that visits no tile (all its tiles skipped) has O = 0 and LSE = -inf for its
 *   query rows, and its mask row is rewritten unchanged.
 * - NaN, as PyTorch's SDPA: a query row with a NaN score (q_i . k_j over a visited tile's valid
 *   keys, e.g. from a NaN in Q or K) gets O = NaN in every element and LSE = NaN; a NaN in V
 *   reaches O through P V on its own. NaN scores are left out of the row's max t_i, so they
 *   never raise m_i and never vote: votes are as if those scores were absent, and a row with
 *   no finite score in the tile (t_i = -inf) casts no vote on it (tau = -inf still keeps
 *   every visited tile).
 * - Vote: row i keeps tile n when m_i == -inf (nothing visited yet for that row) or
 *   (t_i - m_i) * sl2e > tau in fp32, sl2e = (float)scale * (float)log2(e) rounded once.
 * - Carried row maxima (row_max set): the vote's reference is r_i = max(R_i, m_i), NaN in R_i
 *   read as -inf, and the rule above applies with r_i for m_i; the softmax keeps m_i alone. At the
 *   end R_i = max(R_i, m_i) for every valid row of the item, in every mode.
 * - Mask update (OBSERVE/SKIP, into `decisions` when set): a visited tile's bit becomes keep(n)
 *   (SKIP) or old & keep(n) (OBSERVE); an unvisited tile keeps its old bit. Bits n >= nK of the
 *   first ceil(nK/32) words are written 0 and ignored on input; words past them are untouched.
 *   DENSE reads and writes neither mask nor decisions.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "la_attn.h"
#include "la_half.h"

#define LOG2E_F 1.44269504088896340736f
/* Register blocking of the two inner products: RB query rows by CB columns at a time. */
#define RB 4
#define CB 16
#define MAX_THREADS 256

/* Widens n elements, element i at src[i * stride], into dst. */
static void load_row(float *dst, const void *src, int64_t stride, int n, la_dtype dt)
{
    switch (dt) {
    case LA_DTYPE_F32: {
        const float *s = src;
        if (stride == 1)
            memcpy(dst, s, (size_t)n * sizeof *dst);
        else
            for (int i = 0; i < n; i++)
                dst[i] = s[i * stride];
        break;
    }
    case LA_DTYPE_BF16: {
        const uint16_t *s = src;
        if (stride == 1) /* the common layout: a loop the compiler vectorises */
            for (int i = 0; i < n; i++)
                dst[i] = la_cvt_bf16_f32(s[i]);
        else
            for (int i = 0; i < n; i++)
                dst[i] = la_cvt_bf16_f32(s[i * stride]);
        break;
    }
    default: {
        const uint16_t *s = src;
        for (int i = 0; i < n; i++)
            dst[i] = la_cvt_f16_f32(s[i * stride]);
        break;
    }
    }
}

static void store_row(void *dst, int64_t stride, const float *src, int n, la_dtype dt)
{
    switch (dt) {
    case LA_DTYPE_F32: {
        float *d = dst;
        for (int i = 0; i < n; i++)
            d[i * stride] = src[i];
        break;
    }
    case LA_DTYPE_BF16: {
        uint16_t *d = dst;
        for (int i = 0; i < n; i++)
            d[i * stride] = la_cvt_f32_bf16(src[i]);
        break;
    }
    default: {
        uint16_t *d = dst;
        for (int i = 0; i < n; i++)
            d[i * stride] = la_cvt_f32_f16(src[i]);
        break;
    }
    }
}

/* ---- the two products -------------------------------------------------------------------- */

/* 8 floats; on targets without 256-bit vectors GCC splits each operation in two. Loads go through
 * memcpy, so no alignment is assumed. fp-contract is off under -std=c11, so a*b+c is a multiply
 * then an add in every clone: the AVX2 and the baseline clones give the same bits. */
typedef float v8 __attribute__((vector_size(32)));

typedef int32_t v8i __attribute__((vector_size(32)));

/* Macros rather than functions: a function passing v8 by value would change the ABI between the
 * clones (GCC warns, -Wpsabi). */
#define ld8(p) ({ v8 x_; memcpy(&x_, (p), sizeof x_); x_; })
#define st8(p, x) do { v8 y_ = (x); memcpy((p), &y_, sizeof y_); } while (0)

/* An AVX2 clone picked at load time where the CPU has it, so that one binary is fast on every
 * x86-64 (the CI and the GPU machine differ) without -march. LA_REF_NO_CLONES builds the baseline
 * alone, to check that both give the same bits. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(LA_REF_NO_CLONES)
#define LA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LA_CLONES
#endif

/* The block both products are made of: RB = 4 rows by CB = 16 columns of C, held in eight
 * vector accumulators, C[r][c] (+)= the sum over t < n, in order, of X[r][t] * B[t][c]. Row r of
 * C is at c + r * cs, row r of X at x + r * xs, row t of B at b + t * bs. add 0: C starts at
 * 0; add 1: from its values. Always inlined, so that each clone of its callers compiles it for
 * that clone's target (and add is a constant). */
__attribute__((always_inline)) static inline void block4x16(float *restrict c, size_t cs, int add,
                                                            const float *restrict x, size_t xs,
                                                            const float *restrict b, size_t bs,
                                                            int n)
{
    const float *x0 = x, *x1 = x0 + xs, *x2 = x1 + xs, *x3 = x2 + xs;
    float *c0 = c, *c1 = c0 + cs, *c2 = c1 + cs, *c3 = c2 + cs;
    v8 a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0};
    if (add) {
        a00 = ld8(c0), a01 = ld8(c0 + 8), a10 = ld8(c1), a11 = ld8(c1 + 8);
        a20 = ld8(c2), a21 = ld8(c2 + 8), a30 = ld8(c3), a31 = ld8(c3 + 8);
    }
    for (int t = 0; t < n; t++, b += bs) {
        v8 b0 = ld8(b), b1 = ld8(b + 8);
        a00 += b0 * x0[t];
        a01 += b1 * x0[t];
        a10 += b0 * x1[t];
        a11 += b1 * x1[t];
        a20 += b0 * x2[t];
        a21 += b1 * x2[t];
        a30 += b0 * x3[t];
        a31 += b1 * x3[t];
    }
    st8(c0, a00);
    st8(c0 + 8, a01);
    st8(c1, a10);
    st8(c1 + 8, a11);
    st8(c2, a20);
    st8(c2 + 8, a21);
    st8(c3, a30);
    st8(c3 + 8, a31);
}

/* S[bmp][bnp] = Q[bmp][D] . KT[D][bnp]; bmp % RB == 0, bnp % CB == 0. Each S element is summed
 * over d in order, so any vector width gives the same bits. */
LA_CLONES static void qk_block(const float *restrict q, const float *restrict kt,
                               float *restrict s, int bmp, int bnp, int D)
{
    for (int i = 0; i < bmp; i += RB)
        for (int j = 0; j < bnp; j += CB)
            block4x16(s + (size_t)i * bnp + j, bnp, 0, q + (size_t)i * D, D, kt + j, bnp, D);
}

/* O[bmp][D] += P[bmp][bnp] . V[bnp][D], summed over j in order; D % CB == 0. */
LA_CLONES static void pv_block(const float *restrict pm, const float *restrict v,
                               float *restrict o, int bmp, int bnp, int D)
{
    for (int i = 0; i < bmp; i += RB)
        for (int d0 = 0; d0 < D; d0 += CB)
            block4x16(o + (size_t)i * D + d0, D, 1, pm + (size_t)i * bnp, bnp, v + d0, D, bnp);
}

/* Cephes exp2f minimax polynomial for 2^f - 1 = f * P(f), f in [-0.5, 0.5], relative error
 * about 1.5e-7 (libm's exp2f per element costs as much as the two products together). */
#define EXP2_P0 1.535336188319500e-4f
#define EXP2_P1 1.339887440266574e-3f
#define EXP2_P2 9.618437357674640e-3f
#define EXP2_P3 5.550332471162809e-2f
#define EXP2_P4 2.402264791363012e-1f
#define EXP2_P5 6.931472028550421e-1f

/* srow[j] = 2^((srow[j] - mx) * c) for j < bn, 0 for bn <= j < bnp; returns the sum over j < bn.
 * Arguments below -125 give exactly 0 (as the GPU's flush-to-zero ex2 does): those weights are
 * below 2^-125 of the row maximum, which itself weighs 1. -inf gives 0. The sum is taken in 8
 * lanes and then added lane 0..7, a fixed order in every clone. */
LA_CLONES static float exp2_row(float *restrict srow, int bn, int bnp, float mx, float c)
{
    const v8 magic = (v8){0} + 0x1.8p23f; /* adding it rounds to an integer, kept in the mantissa */
    v8 acc = {0};
    for (int j = 0; j < bnp; j += 8) {
        v8 x = (ld8(srow + j) - mx) * c;
        v8i low = x < -125.0f;
        v8 xc = (v8)(((v8i)x & ~low) | ((v8i)((v8){0} - 125.0f) & low));
        v8 t = xc + magic, n = t - magic, f = xc - n;
        v8 pl = ((((((f * EXP2_P0 + EXP2_P1) * f + EXP2_P2) * f + EXP2_P3) * f + EXP2_P4) * f +
                  EXP2_P5) * f) + 1.0f;
        v8i e = ((v8i)t - 0x4b400000) << 23; /* the integer n, moved to the exponent field */
        v8 r = (v8)(((v8i)pl + e) & ~low);
        /* keys past Sk (j >= bn) weigh nothing */
        v8i jj = (v8i){0, 1, 2, 3, 4, 5, 6, 7} + j;
        r = (v8)((v8i)r & (jj < bn));
        st8(srow + j, r);
        acc += r;
    }
    float sum = 0.0f;
    for (int l = 0; l < 8; l++)
        sum += acc[l];
    return sum;
}

/* max over srow[0..bn) (exact in any order; NaN are passed over). */
/* NaN scores are left out of the max (so they never raise m_i nor vote); *ret_nan says whether
 * srow[0..bn) held one. */
LA_CLONES static float max_row(const float *restrict srow, int bn, bool *ret_nan)
{
    v8 m = (v8){0} - INFINITY;
    v8i un = {0};
    int j = 0;
    for (; j + 8 <= bn; j += 8) {
        v8 x = ld8(srow + j);
        v8i gt = x > m;
        un |= x != x;
        m = (v8)(((v8i)x & gt) | ((v8i)m & ~gt));
    }
    float t = -INFINITY;
    bool nan = false;
    for (int l = 0; l < 8; l++) {
        t = m[l] > t ? m[l] : t;
        nan |= un[l] != 0;
    }
    for (; j < bn; j++) {
        t = srow[j] > t ? srow[j] : t;
        nan |= srow[j] != srow[j];
    }
    *ret_nan = nan;
    return t;
}

/* ---- one (b, h, q-tile) item -------------------------------------------------------------- */

typedef struct scratch {
    float *q;    /* [BMp][D] query rows of the tile (rows past Sq are 0) */
    float *kt;   /* [D][BNp] K tile transposed (keys past Sk are 0) */
    float *v;    /* [BNp][D] V tile (keys past Sk are 0) */
    float *s;    /* [BMp][BNp] raw scores, then probabilities */
    float *o;    /* [BMp][D] unnormalised output accumulator */
    float *m;    /* [BMp] running max of raw scores */
    float *r;    /* [BMp] carried row maxima R (-inf without row_max) */
    float *l;    /* [BMp] running softmax sum */
    uint32_t *row; /* [words] keep(n) of the visited tiles */
    uint32_t *vis; /* [words] visited tiles */
    int32_t *order; /* [nK] visit order */
    /* Widened K (transposed) and V of every k-tile of one head (b, h), filled as tiles are first
     * visited: consecutive items of a thread mostly share the head, so K and V are widened
     * once per head instead of once per q-tile. NULL when too large (then kt/v per tile). */
    float *head_kt;   /* [nK][D][BNp] */
    float *head_v;    /* [nK][BNp][D] */
    uint32_t *loaded; /* [words] tiles of head_b/head_h already widened */
    int32_t head_b, head_h;
} scratch;

/* Largest per-thread head cache (K and V of one head in fp32). */
#define HEAD_CACHE_MAX ((size_t)256 << 20)

typedef struct job {
    const la_attn_params *p;
    int32_t nq, nk, words, bmp, bnp;
    float sl2e;
    bool ascending;
    const uint32_t *must_do, *skip_only; /* [words] tile flags */
    scratch *scr;                        /* [threads] */
    atomic_int_fast64_t next;
    int64_t n_items;
    atomic_int_fast64_t tiles;
    const int *cancel;   /* la_ref_attn_fwd_cancel: stop once non-zero (NULL: never) */
    atomic_bool stopped; /* an item was left unfinished because of it */
} job;

/* The caller asked to stop (an atomic load: another thread writes *cancel). */
static inline bool cancelled(const job *jb)
{
    return jb->cancel != NULL && __atomic_load_n(jb->cancel, __ATOMIC_RELAXED) != 0;
}

static inline bool bit(const uint32_t *w, int64_t n) { return (w[n / 32] >> (n % 32)) & 1u; }

static void run_item(job *jb, scratch *sc, int64_t item)
{
    const la_attn_params *p = jb->p;
    const int D = p->D, bnp = jb->bnp, bmp = jb->bmp, nk = jb->nk;
    /* item = ((b * H) + h) * nq + m: consecutive items share K/V of one head (cache reuse). */
    const int32_t m = (int32_t)(item % jb->nq), h = (int32_t)(item / jb->nq % p->H),
                  b = (int32_t)(item / jb->nq / p->H);
    const int32_t r0 = m * p->BM, bm = (p->Sq - r0 < p->BM) ? p->Sq - r0 : p->BM;
    const size_t es = la_dtype_size(p->dtype);
    const char *qb = p->q, *kb = p->k, *vb = p->v;

    /* Q: [B, Sq, H, D], element (b, s, h, d) at b*qs0 + s*qs1 + h*qs2 + d*qs3. */
    memset(sc->q, 0, sizeof(float) * (size_t)bmp * D);
    for (int i = 0; i < bm; i++)
        load_row(sc->q + (size_t)i * D,
                 qb + es * (size_t)(b * p->q_stride[0] + (r0 + i) * p->q_stride[1] +
                                    h * p->q_stride[2]),
                 p->q_stride[3], D, p->dtype);
    memset(sc->o, 0, sizeof(float) * (size_t)bmp * D);
    for (int i = 0; i < bmp; i++) {
        sc->m[i] = -INFINITY;
        sc->l[i] = 0.0f;
        sc->r[i] = -INFINITY;
    }
    /* R: [B, H, Sq], element (b, h, s) at b*rs0 + h*rs1 + s*rs2; NaN carries nothing. */
    float *rmax = NULL;
    if (p->row_max != NULL) {
        rmax = p->row_max + b * p->row_max_stride[0] + h * p->row_max_stride[1] +
               r0 * p->row_max_stride[2];
        for (int i = 0; i < bm; i++) {
            const float x = rmax[i * p->row_max_stride[2]];
            sc->r[i] = x == x ? x : -INFINITY;
        }
    }

    /* Mask row (b, h, m): words at b*ms0 + h*ms1 + m*ms2. */
    uint32_t *old = NULL;
    if (p->mode != LA_MODE_DENSE)
        old = p->mask + b * p->mask_stride[0] + h * p->mask_stride[1] + m * p->mask_stride[2];
    memset(sc->row, 0, sizeof(uint32_t) * (size_t)jb->words);
    memset(sc->vis, 0, sizeof(uint32_t) * (size_t)jb->words);

    int32_t n_visit = 0;
    for (int32_t k = 0; k < nk; k++) {
        int32_t n = jb->ascending ? k : nk - 1 - k;
        if (bit(jb->skip_only, n))
            continue; /* never computed, in any mode */
        if (p->mode == LA_MODE_SKIP && !bit(old, n) && !bit(jb->must_do, n))
            continue;
        sc->order[n_visit++] = n;
        sc->vis[n / 32] |= 1u << (n % 32);
    }

    if (sc->head_kt != NULL && (sc->head_b != b || sc->head_h != h)) {
        sc->head_b = b;
        sc->head_h = h;
        memset(sc->loaded, 0, sizeof(uint32_t) * (size_t)jb->words);
    }
    for (int32_t vi = 0; vi < n_visit; vi++) {
        /* Stopped: the item writes nothing (its O, LSE, row maxima and mask row stay as they
         * were), so that a call of one q-tile against millions of keys stops within a tile. */
        if (cancelled(jb)) {
            atomic_store(&jb->stopped, true);
            return;
        }
        const int32_t n = sc->order[vi], c0 = n * p->BN;
        const int bn = (p->Sk - c0 < p->BN) ? p->Sk - c0 : p->BN;
        float *kt = sc->kt, *vt = sc->v;
        if (sc->head_kt != NULL) {
            kt = sc->head_kt + (size_t)n * D * bnp;
            vt = sc->head_v + (size_t)n * bnp * D;
        }
        if (sc->head_kt == NULL || !bit(sc->loaded, n)) {
            /* K, V: [B, Sk, H, D]. K goes in transposed so that S rows are contiguous. */
            float tmp[256];
            for (int j = 0; j < bn; j++) {
                load_row(tmp,
                         kb + es * (size_t)(b * p->k_stride[0] + (c0 + j) * p->k_stride[1] +
                                            h * p->k_stride[2]),
                         p->k_stride[3], D, p->dtype);
                for (int d = 0; d < D; d++)
                    kt[(size_t)d * bnp + j] = tmp[d];
                load_row(vt + (size_t)j * D,
                         vb + es * (size_t)(b * p->v_stride[0] + (c0 + j) * p->v_stride[1] +
                                            h * p->v_stride[2]),
                         p->v_stride[3], D, p->dtype);
            }
            /* Padding keys must be exact zeros: P is 0 there, and 0 * garbage could be NaN. */
            if (bn < bnp) {
                for (int d = 0; d < D; d++)
                    memset(kt + (size_t)d * bnp + bn, 0, sizeof(float) * (size_t)(bnp - bn));
                memset(vt + (size_t)bn * D, 0, sizeof(float) * (size_t)(bnp - bn) * D);
            }
            if (sc->head_kt != NULL)
                sc->loaded[n / 32] |= 1u << (n % 32);
        }

        qk_block(sc->q, kt, sc->s, bmp, bnp, D);

        bool keep = bit(jb->must_do, n);
        for (int i = 0; i < bmp; i++) {
            float *srow = sc->s + (size_t)i * bnp, *orow = sc->o + (size_t)i * D;
            if (i >= bm) { /* rows past Sq: no vote, no output */
                memset(srow, 0, sizeof(float) * (size_t)bnp);
                continue;
            }
            bool nan;
            const float t = max_row(srow, bn, &nan);
            if (nan) /* as in SDPA: a NaN score makes the row's O and LSE NaN (l stays NaN) */
                sc->l[i] = NAN;
            const float mo = sc->m[i];
            /* The vote's reference: the carried maximum where it is larger (r is never NaN). */
            const float rv = sc->r[i] > mo ? sc->r[i] : mo;
            /* A row with no finite score in the tile (all NaN) casts no vote, as in the CUDA
             * kernels, where its margin t - m is NaN; at tau = -inf every tile is kept anyway. */
            if (p->tau == -INFINITY ||
                (t > -INFINITY && (rv == -INFINITY || (t - rv) * jb->sl2e > p->tau)))
                keep = true;
            const float mn = t > mo ? t : mo;
            if (mn == -INFINITY) {
                /* Every score so far is -inf (only with infinite inputs): nothing to add. */
                memset(srow, 0, sizeof(float) * (size_t)bnp);
                continue;
            }
            const float alpha = mo == -INFINITY ? 0.0f : exp2f((mo - mn) * jb->sl2e);
            const float sum = exp2_row(srow, bn, bnp, mn, jb->sl2e);
            sc->l[i] = sc->l[i] * alpha + sum;
            sc->m[i] = mn;
            if (alpha != 1.0f)
                for (int d = 0; d < D; d++)
                    orow[d] *= alpha;
        }
        if (keep)
            sc->row[n / 32] |= 1u << (n % 32);

        pv_block(sc->s, vt, sc->o, bmp, bnp, D);
    }

    /* O: [B, Sq, H, D]; LSE: [B, H, Sq] natural log, scale * m + ln l. */
    char *ob = p->o;
    for (int i = 0; i < bm; i++) {
        float *orow = sc->o + (size_t)i * D;
        double lse;
        if (n_visit == 0 || sc->l[i] == 0.0f) {
            memset(orow, 0, sizeof(float) * (size_t)D);
            lse = -INFINITY;
        } else {
            const float l = sc->l[i];
            for (int d = 0; d < D; d++)
                orow[d] /= l;
            lse = (double)sc->m[i] * p->scale + log((double)l);
        }
        if (ob != NULL) /* NULL: an LSE-only call */
            store_row(ob + es * (size_t)(b * p->o_stride[0] + (r0 + i) * p->o_stride[1] +
                                         h * p->o_stride[2]),
                      p->o_stride[3], orow, D, p->dtype);
        if (p->lse != NULL)
            p->lse[b * p->lse_stride[0] + h * p->lse_stride[1] + (r0 + i) * p->lse_stride[2]] =
                (float)lse;
        if (rmax != NULL) /* m is -inf when the row visited no tile (or saw no finite score) */
            rmax[i * p->row_max_stride[2]] = sc->m[i] > sc->r[i] ? sc->m[i] : sc->r[i];
    }

    if (p->mode != LA_MODE_DENSE) {
        /* sc->row holds keep(n) for visited tiles; merge with the old row. */
        uint32_t *dst = p->decisions == NULL
                            ? old
                            : p->decisions + b * p->mask_stride[0] + h * p->mask_stride[1] +
                                  m * p->mask_stride[2];
        for (int32_t w = 0; w < jb->words; w++) {
            const uint32_t vis = sc->vis[w];
            uint32_t valid = (w + 1) * 32 <= nk ? 0xffffffffu : (1u << (nk % 32)) - 1u;
            uint32_t o = old[w], k = sc->row[w];
            uint32_t nw = p->mode == LA_MODE_SKIP ? (vis & k) | (~vis & o)
                                                  : (vis & o & k) | (~vis & o);
            dst[w] = nw & valid;
        }
    }
    atomic_fetch_add(&jb->tiles, n_visit);
}

static void *worker(void *arg)
{
    job *jb = ((void **)arg)[0];
    scratch *sc = ((void **)arg)[1];
    for (;;) {
        int64_t item = atomic_fetch_add(&jb->next, 1);
        if (item >= jb->n_items)
            break;
        if (cancelled(jb)) {
            atomic_store(&jb->stopped, true);
            break;
        }
        run_item(jb, sc, item);
    }
    return NULL;
}

static void scratch_free(scratch *sc)
{
    free(sc->q);
    free(sc->kt);
    free(sc->v);
    free(sc->s);
    free(sc->o);
    free(sc->m);
    free(sc->l);
    free(sc->r);
    free(sc->row);
    free(sc->vis);
    free(sc->order);
    free(sc->head_kt);
    free(sc->head_v);
    free(sc->loaded);
    memset(sc, 0, sizeof *sc); /* freeing twice is harmless */
}

/* 64-byte aligned so that the vector loops start on a cache line. */
static void *alloc_f(size_t n, size_t esize)
{
    void *ptr = NULL;
    if (n > SIZE_MAX / esize / 2)
        return NULL;
    size_t bytes = (n * esize + 63) & ~(size_t)63;
    if (posix_memalign(&ptr, 64, bytes ? bytes : 64) != 0)
        return NULL;
    return ptr;
}

static int scratch_init(scratch *sc, const job *jb)
{
    const size_t D = (size_t)jb->p->D, bmp = (size_t)jb->bmp, bnp = (size_t)jb->bnp;
    memset(sc, 0, sizeof *sc);
    if (bmp > SIZE_MAX / 8 / bnp)
        return LA_ENOMEM;
    sc->q = alloc_f(bmp * D, 4);
    sc->kt = alloc_f(D * bnp, 4);
    sc->v = alloc_f(bnp * D, 4);
    sc->s = alloc_f(bmp * bnp, 4);
    sc->o = alloc_f(bmp * D, 4);
    sc->m = alloc_f(bmp, 4);
    sc->l = alloc_f(bmp, 4);
    sc->r = alloc_f(bmp, 4);
    sc->row = alloc_f((size_t)jb->words, 4);
    sc->vis = alloc_f((size_t)jb->words, 4);
    sc->order = alloc_f((size_t)jb->nk, 4);
    if (!sc->q || !sc->kt || !sc->v || !sc->s || !sc->o || !sc->m || !sc->l || !sc->r || !sc->row ||
        !sc->vis || !sc->order) {
        scratch_free(sc);
        return LA_ENOMEM;
    }
    /* The head cache is an optimisation: without the memory for it, tiles are widened per
     * q-tile as before. Skipped when one head's K and V would exceed HEAD_CACHE_MAX. */
    const size_t tile = D * bnp, nk = (size_t)jb->nk;
    if (jb->nq > 1 && tile <= HEAD_CACHE_MAX / 8 / nk) {
        sc->head_kt = alloc_f(nk * tile, 4);
        sc->head_v = alloc_f(nk * tile, 4);
        sc->loaded = alloc_f((size_t)jb->words, 4);
        if (!sc->head_kt || !sc->head_v || !sc->loaded) {
            free(sc->head_kt);
            free(sc->head_v);
            free(sc->loaded);
            sc->head_kt = sc->head_v = NULL;
            sc->loaded = NULL;
        }
        sc->head_b = sc->head_h = -1;
    }
    return 0;
}

int la_ref_attn_fwd(const la_attn_params *p) { return la_ref_attn_fwd_cancel(p, NULL); }

int la_ref_attn_fwd_cancel(const la_attn_params *p, const int *cancel)
{
    int rc = la_attn_validate(p);
    if (rc < 0)
        return rc;

    job jb;
    memset(&jb, 0, sizeof jb);
    jb.p = p;
    jb.cancel = cancel;
    atomic_init(&jb.stopped, false);
    jb.nq = la_tiles(p->Sq, p->BM);
    jb.nk = la_tiles(p->Sk, p->BN);
    jb.words = la_mask_words(jb.nk);
    /* Tiles never exceed the sequence, so scratch is sized by min(BM, Sq), min(BN, Sk). */
    int32_t bm = p->BM < p->Sq ? p->BM : p->Sq, bn = p->BN < p->Sk ? p->BN : p->Sk;
    jb.bmp = (bm + RB - 1) / RB * RB;
    jb.bnp = (bn + CB - 1) / CB * CB;
    jb.sl2e = p->scale * LOG2E_F;
    switch (p->direction) {
    case LA_DIR_ASCENDING: jb.ascending = true; break;
    case LA_DIR_DESCENDING: jb.ascending = false; break;
    default: jb.ascending = (p->step % 2) != 0; break; /* odd steps ascend (also for step < 0) */
    }
    jb.n_items = (int64_t)p->B * p->H * jb.nq;
    atomic_init(&jb.next, 0);
    atomic_init(&jb.tiles, 0);

    int threads = p->threads <= 0 ? 1 : p->threads > MAX_THREADS ? MAX_THREADS : p->threads;
    if (threads > jb.n_items)
        threads = (int)jb.n_items;

    uint32_t *flags = calloc((size_t)jb.words * 2, 4);
    scratch *scr = calloc((size_t)threads, sizeof *scr);
    pthread_t *tid = calloc((size_t)threads, sizeof *tid);
    void *(*args)[2] = calloc((size_t)threads, sizeof *args);
    rc = (flags && scr && tid && args) ? 0 : LA_ENOMEM;
    /* All memory is taken before any output is touched: an ENOMEM leaves O, LSE and the mask
     * as they were. */
    for (int t = 0; rc == 0 && t < threads; t++)
        rc = scratch_init(&scr[t], &jb);
    if (rc == 0) {
        jb.must_do = flags;
        jb.skip_only = flags + jb.words;
        la_tile_flags(p, flags, flags + jb.words);

        /* Thread 0 is this one; a failed pthread_create only means fewer workers, since the
         * remaining items are taken by whoever is running. */
        int started = 0;
        for (int t = 1; t < threads; t++) {
            args[t][0] = &jb;
            args[t][1] = &scr[t];
            if (pthread_create(&tid[t], NULL, worker, args[t]) != 0)
                break;
            started = t;
        }
        args[0][0] = &jb;
        args[0][1] = &scr[0];
        worker(args[0]);
        for (int t = 1; t <= started; t++)
            pthread_join(tid[t], NULL);
        if (p->ret_tiles_computed != NULL)
            *p->ret_tiles_computed = atomic_load(&jb.tiles);
        if (atomic_load(&jb.stopped))
            rc = __atomic_load_n(cancel, __ATOMIC_RELAXED);
    }
    for (int t = 0; scr != NULL && t < threads; t++)
        scratch_free(&scr[t]);
    free(args);
    free(tid);
    free(scr);
    free(flags);
    return rc;
}
