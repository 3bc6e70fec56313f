/*
 * sim.h — private to liteattn-demo (libclient/tools/demo.c) and bench_direct
 * (bench/bench_direct.c): the simulated video-diffusion generation they both run (options,
 * drifting Q/K/V, the error against dense attention, the per-step table).
 *
 * Every layer's Q/K/V drift from step to step (each step = previous + a little fresh noise), on
 * top of a clustered structure that sharpens as the "denoising" proceeds: token i belongs to
 * cluster i*G/S (contiguous, like a spatial region of a video), queries and keys of one cluster
 * share a centre whose weight grows over the steps. Attention therefore becomes peaked, and
 * with tau = -3 the fraction of tiles that must be computed falls over the steps.
 */
#ifndef LA_TOOLS_SIM_H
#define LA_TOOLS_SIM_H

#include <stddef.h>
#include <stdint.h>

#include "liteattn_codes.h"

typedef struct sim_opts {
    const char *socket; /* demo: daemon socket (NULL: the default) */
    int layers, heads, head_dim, seq, steps, threads, clusters;
    float threshold;
    la_dtype dtype;
    const char *device; /* demo: auto, cpu, cuda */
    int bm, bn;         /* bench_direct: tile sizes */
    unsigned long long seed;
    int dense_runs; /* timed dense passes before the generation (speed-up baseline) */
} sim_opts;

/* The program's name in messages ("liteattn-demo", "bench_direct"). */
extern const char *sim_prog;

/* Which program parses: the demo takes --socket and --device, bench_direct --tile. */
enum { SIM_DEMO, SIM_DIRECT };

/* Fills o from argv. Returns 0, 1 when --help was printed (exit 0), or -1 after a message
 * on stderr (exit 2). */
int sim_parse_args(sim_opts *o, int argc, char **argv, int which);

double sim_now_s(void);

/* One layer's cluster centres and drifting noise. */
typedef struct sim_layer {
    float *centre;       /* [G, H, D] cluster centres, shared by queries and keys */
    float *nq, *nk, *nv; /* [S, H, D] drifting noise */
} sim_layer;

int sim_layer_init(const sim_opts *o, sim_layer *ld, int layer);
void sim_layer_free(sim_layer *ld);
/* Drifts layer's data one step and writes Q/K/V [1, S, H, D] in o->dtype, on o->threads
 * threads. */
void sim_generate(const sim_opts *o, sim_layer *ld, int layer, int step, void *q, void *k, void *v);
/* Adds the sums of squares for the relative L2 error of out against ref. */
void sim_err_acc(const void *out, const void *ref, size_t n, la_dtype dt, double *num, double *den);
/* Contiguous strides of a [1, S, H, D] tensor. */
void sim_fill_strides(int64_t st[4], int S, int H, int D);

/* One step's figures: live tile fraction, attention seconds, relative error, and the seconds
 * of the step's dense reference pass (every layer, timed like the step). */
typedef struct sim_row {
    double live, attn_s, err, dense_s;
} sim_row;

/* The speed-up baseline: the median of warm timings of one dense step (every layer, through
 * the same path and round trips as a step of the generation), with its spread. The timings:
 * o->dense_runs passes before the generation (after one untimed warm-up pass), then the dense
 * reference pass of every step, so that the baseline sees the machine load the steps see. A
 * single cold timing (step 0, as before) folds thread start-up, first-touch page faults and
 * cold caches into it: nothing skipped then read as a 1.3x speed-up. */
typedef struct sim_baseline {
    double median_s, min_s, max_s;
    int runs;
} sim_baseline;
/* Of timings t[0..n), n >= 1 (t is left as it is). */
sim_baseline sim_baseline_of(const double *t, int n);

/* The header line; then sim_print_baseline, then sim_print_columns, then a row per step. */
void sim_print_header(const sim_opts *o, const char *path);
void sim_print_baseline(const char *what, const sim_baseline *b);
void sim_print_columns(void);
/* The step's speed-up is median_s (the baseline so far) over its attention time. */
void sim_print_row(int step, const sim_row *r, double median_s);
/* Compares the sums of the steps' attention times and of their dense passes (interleaved, so
 * both saw the same machine). */
void sim_print_summary(const sim_opts *o, const sim_row *rows, const sim_baseline *b,
                       double total_s);

#endif /* LA_TOOLS_SIM_H */
