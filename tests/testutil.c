/*
 * testutil.c — private to tests/: see testutil.h. The conversions and the attention here are
 * written independently of kernels/ref.c (float64, other algorithms), so that a test compares
 * two implementations rather than one with itself.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"

/* ---- randomness ------------------------------------------------------------------------ */

static uint64_t g_seed;
static int g_seed_set;

uint64_t tu_seed(void)
{
    if (!g_seed_set) {
        const char *e = getenv("LA_TEST_SEED");
        if (e != NULL && *e != '\0') {
            g_seed = strtoull(e, NULL, 0);
        } else {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            g_seed = ((uint64_t)ts.tv_sec * 1000000007ull) ^ (uint64_t)ts.tv_nsec ^
                     ((uint64_t)getpid() << 32);
        }
        g_seed_set = 1;
    }
    return g_seed;
}

static uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void tu_rng_init(tu_rng *r, uint64_t salt)
{
    uint64_t x = tu_seed() ^ (salt * 0xd1b54a32d192ed03ull);
    r->s[0] = splitmix(&x);
    r->s[1] = splitmix(&x) | 1; /* xorshift128+ must not start all zero */
}

uint64_t tu_rng_u64(tu_rng *r)
{
    uint64_t a = r->s[0], b = r->s[1];
    r->s[0] = b;
    a ^= a << 23;
    r->s[1] = a ^ b ^ (a >> 17) ^ (b >> 26);
    return r->s[1] + b;
}

double tu_rng_uniform(tu_rng *r) { return (double)(tu_rng_u64(r) >> 11) * 0x1p-53; }

double tu_rng_normal(tu_rng *r)
{
    double u1 = tu_rng_uniform(r), u2 = tu_rng_uniform(r);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

/* ---- dtypes ---------------------------------------------------------------------------- */

float tu_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* By value rather than by bits: RNE of a float to 8 significant bits, in double. */
uint16_t tu_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if (isnan(f))
        return (uint16_t)((u >> 16) | 0x40);
    if (isinf(f) || f == 0.0f)
        return (uint16_t)(u >> 16);
    int e;
    frexp(fabs((double)f), &e); /* |f| = m * 2^e, m in [0.5, 1) */
    /* bf16 keeps 8 significant bits unless f is an fp32 subnormal (exponent < -125), where the
     * grid is 2^-133. */
    int q = e - 8 < -133 ? -133 : e - 8;
    double r = nearbyint(ldexp(fabs((double)f), -q)); /* default mode: ties to even */
    float g = (float)ldexp(r, q);                     /* exact or overflows to inf */
    if (fabs((double)g) > 0x1.fep127)
        g = INFINITY;
    uint32_t v;
    memcpy(&v, &g, 4);
    return (uint16_t)((v >> 16) | (signbit(f) ? 0x8000u : 0));
}

float tu_f16_to_f32(uint16_t h)
{
    int e = (h >> 10) & 0x1f, man = h & 0x3ff;
    double v;
    if (e == 0x1f)
        v = man ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp(man, -24);
    else
        v = ldexp(man + 1024, e - 25);
    return (float)((h & 0x8000) ? -v : v);
}

uint16_t tu_f32_to_f16(float f)
{
    uint16_t sign = signbit(f) ? 0x8000u : 0;
    if (isnan(f))
        return sign | 0x7e00u;
    double a = fabs((double)f);
    if (a >= 65520.0)
        return sign | 0x7c00u;
    int e;
    frexp(a, &e);
    /* half: 11 significant bits for normals (|x| >= 2^-14), fixed grid 2^-24 below */
    int q = e - 11 < -24 ? -24 : e - 11;
    double r = nearbyint(ldexp(a, -q)) * ldexp(1.0, q);
    if (r == 0.0)
        return sign;
    if (r < 0x1p-14)
        return sign | (uint16_t)(r * 0x1p24);
    int re;
    double rm = frexp(r, &re); /* r = rm * 2^re, rm in [0.5, 1) */
    uint16_t exp_bits = (uint16_t)(re - 1 + 15), man = (uint16_t)(ldexp(rm, 11) - 1024);
    return sign | (uint16_t)(exp_bits << 10) | man;
}

double tu_get(const void *base, la_dtype dt, int64_t idx)
{
    switch (dt) {
    case LA_DTYPE_F32: return ((const float *)base)[idx];
    case LA_DTYPE_BF16: return tu_bf16_to_f32(((const uint16_t *)base)[idx]);
    case LA_DTYPE_F16: return tu_f16_to_f32(((const uint16_t *)base)[idx]);
    default: return NAN;
    }
}

void tu_set(void *base, la_dtype dt, int64_t idx, double v)
{
    switch (dt) {
    case LA_DTYPE_F32: ((float *)base)[idx] = (float)v; break;
    case LA_DTYPE_BF16: ((uint16_t *)base)[idx] = tu_f32_to_bf16((float)v); break;
    case LA_DTYPE_F16: ((uint16_t *)base)[idx] = tu_f32_to_f16((float)v); break;
    default: break;
    }
}

/* A normal draw pushed away from zero, so that the rounded value is never 0. */
static double nonzero_normal(tu_rng *r)
{
    double x = tu_rng_normal(r);
    if (fabs(x) < 1e-3)
        x = x < 0 ? -1e-3 : 1e-3;
    return x;
}

void tu_fill(tu_rng *r, void *base, la_dtype dt, int64_t n, double amp)
{
    for (int64_t i = 0; i < n; i++)
        tu_set(base, dt, i, amp * nonzero_normal(r));
}

/* ---- attention problems -------------------------------------------------------------------- */

void tu_params(la_attn_params *p, const void *q, const void *k, const void *v, void *o, float *lse,
               uint32_t *mask, int32_t B, int32_t Sq, int32_t Sk, int32_t H, int32_t D, la_dtype dt,
               int32_t BM, int32_t BN)
{
    memset(p, 0, sizeof *p);
    p->q = q;
    p->k = k;
    p->v = v;
    p->o = o;
    p->lse = lse;
    p->mask = mask;
    /* [B, S, H, D] contiguous */
    int64_t qs[4] = {(int64_t)Sq * H * D, (int64_t)H * D, D, 1};
    int64_t ks[4] = {(int64_t)Sk * H * D, (int64_t)H * D, D, 1};
    memcpy(p->q_stride, qs, sizeof qs);
    memcpy(p->o_stride, qs, sizeof qs);
    memcpy(p->k_stride, ks, sizeof ks);
    memcpy(p->v_stride, ks, sizeof ks);
    /* LSE [B, H, Sq]; mask [B, H, nQ, words] */
    p->lse_stride[0] = (int64_t)H * Sq;
    p->lse_stride[1] = Sq;
    p->lse_stride[2] = 1;
    int64_t nq = la_tiles(Sq, BM), words = la_mask_words(la_tiles(Sk, BN));
    p->mask_stride[0] = (int64_t)H * nq * words;
    p->mask_stride[1] = nq * words;
    p->mask_stride[2] = words;
    p->B = B;
    p->Sq = Sq;
    p->Sk = Sk;
    p->H = H;
    p->D = D;
    p->dtype = dt;
    p->scale = (float)(1.0 / sqrt((double)D));
    p->tau = -INFINITY;
    p->mode = LA_MODE_DENSE;
    p->direction = LA_DIR_ALTERNATE;
    p->BM = BM;
    p->BN = BN;
    p->threads = 1;
}

static void fill_from(tu_problem *t, int which, double eps, int step)
{
    const la_attn_params *p = &t->p;
    int64_t n = (int64_t)p->B * (which == 0 ? p->Sq : p->Sk) * p->H * p->D;
    void *dst = which == 0 ? t->q : which == 1 ? t->k : t->v;
    for (int64_t i = 0; i < n; i++)
        tu_set(dst, p->dtype, i, t->base[which][i] + eps * step * t->dir[which][i]);
}

tu_problem *tu_problem_new(tu_rng *r, int32_t B, int32_t Sq, int32_t Sk, int32_t H, int32_t D,
                           la_dtype dt, int32_t BM, int32_t BN, double qk_amp)
{
    tu_problem *t = calloc(1, sizeof *t);
    if (t == NULL)
        return NULL;
    size_t es = la_dtype_size(dt);
    size_t nq = (size_t)B * Sq * H * D, nk = (size_t)B * Sk * H * D;
    int32_t nqt = la_tiles(Sq, BM), words = la_mask_words(la_tiles(Sk, BN));
    t->mask_words = (size_t)B * H * nqt * words;
    t->q = malloc(nq * es);
    t->k = malloc(nk * es);
    t->v = malloc(nk * es);
    t->o = malloc(nq * es);
    t->lse = malloc((size_t)B * H * Sq * sizeof(float));
    t->mask = malloc(t->mask_words * 4);
    size_t n[3] = {nq, nk, nk};
    int ok = t->q && t->k && t->v && t->o && t->lse && t->mask;
    for (int i = 0; i < 3 && ok; i++) {
        t->base[i] = malloc(n[i] * sizeof(double));
        t->dir[i] = malloc(n[i] * sizeof(double));
        ok = t->base[i] && t->dir[i];
        for (size_t j = 0; ok && j < n[i]; j++) {
            t->base[i][j] = (i < 2 ? qk_amp : 1.0) * nonzero_normal(r);
            t->dir[i][j] = tu_rng_normal(r);
        }
    }
    if (!ok) {
        tu_problem_free(t);
        return NULL;
    }
    tu_params(&t->p, t->q, t->k, t->v, t->o, t->lse, t->mask, B, Sq, Sk, H, D, dt, BM, BN);
    tu_problem_drift(t, 0, 0.0);
    /* O starts as garbage-free but non-zero, so that a row the kernel forgets shows up. */
    for (size_t i = 0; i < nq; i++)
        tu_set(t->o, dt, (int64_t)i, 12345.0);
    tu_mask_ones(t);
    return t;
}

void tu_problem_free(tu_problem *t)
{
    if (t == NULL)
        return;
    free(t->q);
    free(t->k);
    free(t->v);
    free(t->o);
    free(t->lse);
    free(t->mask);
    for (int i = 0; i < 3; i++) {
        free(t->base[i]);
        free(t->dir[i]);
    }
    free(t);
}

void tu_mask_ones(tu_problem *t)
{
    int32_t nk = la_tiles(t->p.Sk, t->p.BN), words = la_mask_words(nk);
    for (size_t r = 0; r < t->mask_words / (size_t)words; r++)
        for (int32_t w = 0; w < words; w++)
            t->mask[r * words + w] =
                (w + 1) * 32 <= nk ? 0xffffffffu : (uint32_t)((1ull << (nk % 32)) - 1);
}

void tu_problem_drift(tu_problem *t, int step_index, double eps)
{
    for (int i = 0; i < 3; i++)
        fill_from(t, i, eps, step_index);
}

int64_t tu_mask_popcount(const tu_problem *t, const uint32_t *mask)
{
    int32_t nk = la_tiles(t->p.Sk, t->p.BN), words = la_mask_words(nk);
    int64_t c = 0;
    for (size_t r = 0; r < t->mask_words / (size_t)words; r++)
        for (int32_t n = 0; n < nk; n++)
            c += (mask[r * words + n / 32] >> (n % 32)) & 1u;
    return c;
}

/* One head's [S, D] of a [B, S, H, D] tensor (through its strides) as contiguous doubles. */
static void gather_head(const void *base, la_dtype dt, const int64_t st[4], int32_t b, int32_t h,
                        int32_t S, int32_t D, double *out)
{
    for (int32_t i = 0; i < S; i++)
        for (int32_t d = 0; d < D; d++)
            out[(size_t)i * D + d] =
                tu_get(base, dt, b * st[0] + i * st[1] + h * st[2] + d * st[3]);
}

void naive_attn_f64(const la_attn_params *p, const uint8_t *computed, double *ret_o,
                    double *ret_lse)
{
    const int32_t nq = la_tiles(p->Sq, p->BM), nk = la_tiles(p->Sk, p->BN), D = p->D;
    double *s = malloc(sizeof(double) * (size_t)p->Sk);
    double *acc = malloc(sizeof(double) * (size_t)D);
    /* The head's Q, K, V as doubles first: the same products and sums in the same order as
     * reading each element through its strides, without a conversion per multiply-add. */
    double *qh = malloc(sizeof(double) * (size_t)p->Sq * D);
    double *kh = malloc(sizeof(double) * (size_t)p->Sk * D);
    double *vh = malloc(sizeof(double) * (size_t)p->Sk * D);
    if (s == NULL || acc == NULL || qh == NULL || kh == NULL || vh == NULL)
        abort();
    for (int32_t b = 0; b < p->B; b++)
        for (int32_t h = 0; h < p->H; h++) {
            gather_head(p->q, p->dtype, p->q_stride, b, h, p->Sq, D, qh);
            gather_head(p->k, p->dtype, p->k_stride, b, h, p->Sk, D, kh);
            gather_head(p->v, p->dtype, p->v_stride, b, h, p->Sk, D, vh);
            for (int32_t i = 0; i < p->Sq; i++) {
                const uint8_t *row =
                    computed ? computed + (((size_t)b * p->H + h) * nq + i / p->BM) * nk : NULL;
                const double *qi = qh + (size_t)i * D;
                double mx = -INFINITY;
                for (int32_t j = 0; j < p->Sk; j++) {
                    if (row && !row[j / p->BN]) {
                        s[j] = NAN;
                        continue;
                    }
                    const double *kj = kh + (size_t)j * D;
                    double dot = 0;
                    for (int32_t d = 0; d < D; d++)
                        dot += qi[d] * kj[d];
                    s[j] = dot * p->scale;
                    if (s[j] > mx)
                        mx = s[j];
                }
                double z = 0;
                memset(acc, 0, sizeof(double) * (size_t)D);
                for (int32_t j = 0; j < p->Sk && mx > -INFINITY; j++) {
                    if (isnan(s[j]))
                        continue;
                    double w = exp(s[j] - mx);
                    const double *vj = vh + (size_t)j * D;
                    z += w;
                    for (int32_t d = 0; d < D; d++)
                        acc[d] += w * vj[d];
                }
                double *o = ret_o + (((size_t)b * p->Sq + i) * p->H + h) * D;
                for (int32_t d = 0; d < D; d++)
                    o[d] = z > 0 ? acc[d] / z : 0.0;
                if (ret_lse)
                    ret_lse[((size_t)b * p->H + h) * p->Sq + i] = z > 0 ? mx + log(z) : -INFINITY;
            }
        }
    free(s);
    free(acc);
    free(qh);
    free(kh);
    free(vh);
}

void tu_o_f64(const la_attn_params *p, double *ret)
{
    for (int32_t b = 0; b < p->B; b++)
        for (int32_t i = 0; i < p->Sq; i++)
            for (int32_t h = 0; h < p->H; h++)
                for (int32_t d = 0; d < p->D; d++)
                    *ret++ = tu_get(p->o, p->dtype,
                                    b * p->o_stride[0] + i * p->o_stride[1] + h * p->o_stride[2] +
                                        d * p->o_stride[3]);
}

double tu_rel_l2(const double *ref, const double *got, int64_t n)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        if (isfinite(ref[i]))
            den += ref[i] * ref[i];
        if (ref[i] == got[i]) /* also -inf == -inf */
            continue;
        double d = got[i] - ref[i];
        num += isnan(d) ? INFINITY : d * d;
    }
    if (num == 0)
        return 0;
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* ---- environment ------------------------------------------------------------------------- */
