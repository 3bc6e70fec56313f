/*
 * bench_direct — liteattn-demo's simulated generation without a daemon: every call goes to the
 * CPU reference (la_ref_attn_fwd) in-process, and the error is measured against the
 * reference's own mode dense on the same inputs. Set beside `make demo`'s daemon path, it shows
 * what the daemon adds; options as liteattn-demo's (--help), plus --tile.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codes.h"
#include "la_attn.h"
#include "sim.h"

/* One la_ref_attn_fwd call of p, its time added to *t; says what failed (what: "" or a note). */
static int timed_call(la_attn_params *p, double *t, const char *what)
{
    double t0 = sim_now_s();
    int rc = la_ref_attn_fwd(p);
    *t += sim_now_s() - t0;
    if (rc < 0)
        fprintf(stderr, "bench_direct: la_ref_attn_fwd%s: %s\n", what, codes_strerror(rc));
    return rc;
}

/* p's inputs in mode dense into ref (its mask is not touched), timed into *t. */
static int dense_call(la_attn_params *p, void *ref, double *t)
{
    p->mode = LA_MODE_DENSE;
    p->o = ref;
    p->ret_tiles_computed = NULL;
    return timed_call(p, t, " (dense)");
}

static int run_direct(const sim_opts *o)
{
    const int S = o->seq, H = o->heads, D = o->head_dim, L = o->layers;
    const size_t n = (size_t)S * H * D, bytes = n * la_dtype_size(o->dtype);
    const int nQ = la_tiles(S, o->bm), nK = la_tiles(S, o->bn), nW = la_mask_words(nK);
    const size_t mask_words = (size_t)H * nQ * nW;
    void *q = malloc(bytes), *k = malloc(bytes), *v = malloc(bytes), *out = malloc(bytes),
         *ref = malloc(bytes);
    uint32_t *mask = malloc((size_t)L * mask_words * 4);
    sim_layer *ld = calloc((size_t)L, sizeof(*ld));
    sim_row *rows = calloc((size_t)o->steps, sizeof(*rows));
    double *dense_t = calloc((size_t)(o->dense_runs + o->steps), sizeof(*dense_t));
    int n_dense = 0;
    if (!q || !k || !v || !out || !ref || !mask || !ld || !rows || !dense_t) {
        fprintf(stderr, "bench_direct: out of memory\n");
        return 1;
    }
    for (int l = 0; l < L; l++)
        if (sim_layer_init(o, &ld[l], l) < 0) {
            fprintf(stderr, "bench_direct: out of memory\n");
            return 1;
        }
    memset(mask, 0xff, (size_t)L * mask_words * 4);
    sim_print_header(o, "in-process CPU reference");

    la_attn_params p;
    memset(&p, 0, sizeof(p));
    p.q = q;
    p.k = k;
    p.v = v;
    sim_fill_strides(p.q_stride, S, H, D);
    memcpy(p.k_stride, p.q_stride, sizeof(p.q_stride));
    memcpy(p.v_stride, p.q_stride, sizeof(p.q_stride));
    memcpy(p.o_stride, p.q_stride, sizeof(p.q_stride));
    p.B = 1;
    p.Sq = p.Sk = S;
    p.H = H;
    p.D = D;
    p.dtype = o->dtype;
    p.scale = 1.0f / sqrtf((float)D);
    p.tau = o->threshold;
    p.direction = LA_DIR_ALTERNATE;
    p.mask_stride[0] = (int64_t)H * nQ * nW;
    p.mask_stride[1] = (int64_t)nQ * nW;
    p.mask_stride[2] = nW;
    p.BM = o->bm;
    p.BN = o->bn;
    p.threads = o->threads;

    double t_start = sim_now_s();
    /* The baseline (sim.h): dense passes on step 0's inputs, the first one untimed. */
    p.step = 0;
    for (int run = -1; run < o->dense_runs; run++) {
        double t = 0;
        for (int l = 0; l < L; l++) {
            sim_generate(o, &ld[l], l, 0, q, k, v);
            p.mask = mask + (size_t)l * mask_words;
            if (dense_call(&p, ref, &t) < 0)
                return 1;
        }
        if (run >= 0)
            dense_t[n_dense++] = t;
    }
    sim_baseline base = sim_baseline_of(dense_t, n_dense);
    sim_print_baseline(" before the generation", &base);
    sim_print_columns();
    for (int step = 0; step < o->steps; step++) {
        double attn = 0, num = 0, den = 0, dense = 0;
        int64_t computed = 0, total = 0;
        for (int l = 0; l < L; l++) {
            sim_generate(o, &ld[l], l, step, q, k, v);
            p.step = step;
            p.mode = LA_MODE_SKIP;
            p.o = out;
            p.mask = mask + (size_t)l * mask_words;
            int64_t tiles = 0;
            p.ret_tiles_computed = &tiles;
            if (timed_call(&p, &attn, "") < 0)
                return 1;
            computed += tiles;
            total += (int64_t)H * nQ * nK;
            if (dense_call(&p, ref, &dense) < 0)
                return 1;
            sim_err_acc(out, ref, n, o->dtype, &num, &den);
        }
        rows[step] =
            (sim_row){(double)computed / (double)total, attn, den > 0 ? sqrt(num / den) : 0, dense};
        dense_t[n_dense++] = dense;
        base = sim_baseline_of(dense_t, n_dense);
        sim_print_row(step, &rows[step], base.median_s);
    }
    sim_print_summary(o, rows, &base, sim_now_s() - t_start);
    free(dense_t);
    for (int l = 0; l < L; l++)
        sim_layer_free(&ld[l]);
    free(ld);
    free(rows);
    free(q);
    free(k);
    free(v);
    free(out);
    free(ref);
    free(mask);
    return 0;
}

int main(int argc, char **argv)
{
    sim_prog = "bench_direct";
    sim_opts o;
    int rc = sim_parse_args(&o, argc, argv, SIM_DIRECT);
    if (rc != 0)
        return rc > 0 ? 0 : 2;
    return run_direct(&o);
}
