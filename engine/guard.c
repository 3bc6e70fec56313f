/*
 * guard.c — what one call does about the warm seed, the guardrail and the warm capture
 * (sess_plan_call, loop thread), and the guardrail's check on the CPU backend
 * (be_guard_cpu, worker thread): the dense samples through the CPU reference (one LSE-only
 * call on the gathered rows, as the CUDA backend runs them) and the comparison of
 * kernels/guard_ref.c. docs/SKIP-SEMANTICS.md has the rules.
 */
#include <stdlib.h>
#include <string.h>

#include "engine_priv.h"
#include "guard.h"

void sess_plan_call(const sess *s, const eng_attn_req *req, int fresh, int restart, la_mode *mode,
                    be_job *bj)
{
    const uint32_t region = req->layer * s->kv_shards + req->kv_shard;
    const uint64_t roff = (uint64_t)region * s->layer_mask_bytes;
    int seeded = 0;
    if (s->warm_used && !req->dry_run) {
        /* A warm session's first steps are dense and still learn (observe). */
        if (req->step < s->warm_dense_steps && *mode == LA_MODE_SKIP)
            *mode = LA_MODE_OBSERVE;
        if ((restart || s->seed_due[region]) && req->step >= s->warm_dense_steps) {
            /* An offset: the cuda host view may not exist yet (backend.h). */
            bj->has_seed = 1;
            bj->seed_off = s->seed_off + roff;
            seeded = 1;
        }
    }
    if (s->guard_every) {
        bj->held = (uint32_t *)(void *)((char *)s->masks->mask->dev_ptr + s->held_off +
                                        (uint64_t)region * s->held_region_bytes);
        bj->held_len = s->held_region_bytes;
        bj->rows_b = (int32_t)s->batch;
        bj->rows_h = (int32_t)s->heads;
        bj->rows_nq = (int32_t)s->n_q_tiles;
        /* A mask known to be all ones skipped nothing: no check. */
        if (*mode == LA_MODE_SKIP && !req->dry_run && req->step % s->guard_every == 0 &&
            (!fresh || seeded)) {
            int32_t nq = la_tiles((int32_t)req->q.shape[1], (int32_t)s->bm);
            bj->guard_n = la_guard_sample(nq, (int32_t)s->guard_sample,
                                          req->step / s->guard_every, bj->guard_tile);
            bj->guard_budget = s->guard_budget;
        }
    }
    if (s->has_warm && s->has_warm_step && !req->dry_run && req->step == s->warm_step &&
        (restart || !s->captured[region]))
    {
        bj->has_capture = 1; /* an offset, as the seed's */
        bj->capture_off = s->capture_off + roff;
    }
}

void guard_sample_sizes(const be_job *j, size_t *q_elems, size_t *lse_floats)
{
    const la_attn_params *p = &j->p;
    size_t rows = (size_t)j->guard_n * (size_t)p->BM;
    *q_elems = (size_t)p->B * rows * (size_t)p->H * (size_t)p->D;
    *lse_floats = (size_t)p->B * (size_t)p->H * rows;
}

la_attn_params guard_sample_params(const be_job *j, const void *qs, float *dense)
{
    const la_attn_params *p = &j->p;
    const int32_t rows = j->guard_n * p->BM;
    la_attn_params sp = *p;
    sp.q = qs;
    sp.q_stride[3] = 1;
    sp.q_stride[2] = p->D;
    sp.q_stride[1] = (int64_t)p->H * p->D;
    sp.q_stride[0] = (int64_t)rows * p->H * p->D;
    sp.Sq = rows;
    sp.o = NULL; /* LSE only */
    memset(sp.o_stride, 0, sizeof sp.o_stride);
    sp.lse = dense;
    sp.lse_stride[2] = 1;
    sp.lse_stride[1] = rows;
    sp.lse_stride[0] = (int64_t)p->H * rows;
    sp.mode = LA_MODE_DENSE;
    sp.mask = NULL;
    sp.decisions = NULL;
    sp.row_max = NULL; /* the samples' maxima are their own; the call's R is untouched */
    sp.ret_tiles_computed = NULL;
    return sp;
}

la_guard_params guard_compare_params(const be_job *j, const float *dense, int n_tiles)
{
    const la_attn_params *p = &j->p;
    la_guard_params gp = {.lse = p->lse,
                          .dense_lse = dense,
                          .n_tiles = n_tiles,
                          .B = p->B,
                          .H = p->H,
                          .Sq = p->Sq,
                          .BM = p->BM,
                          .nq = j->rows_nq,
                          .budget = j->guard_budget,
                          .held = j->held};
    memcpy(gp.lse_stride, p->lse_stride, sizeof gp.lse_stride);
    memcpy(gp.tiles, j->guard_tile, (size_t)n_tiles * sizeof gp.tiles[0]);
    return gp;
}

int be_guard_cpu(be_job *j, int threads)
{
    const la_attn_params *p = &j->p;
    const int n = j->guard_n;
    const size_t es = la_dtype_size(p->dtype);
    size_t q_elems, lse_floats;
    guard_sample_sizes(j, &q_elems, &lse_floats);
    float *dense = malloc(lse_floats * sizeof(float));
    void *qs = malloc(q_elems * es);
    if (!dense || !qs) {
        free(dense);
        free(qs);
        return LA_ENOMEM;
    }
    la_guard_gather_q(qs, p->q, p->q_stride, p->B, p->Sq, p->H, p->D, es, p->BM, j->guard_tile,
                      n);
    la_attn_params sp = guard_sample_params(j, qs, dense);
    sp.threads = threads;
    int64_t tiles = 0;
    sp.ret_tiles_computed = &tiles;
    int rc = la_ref_attn_fwd(&sp);
    if (rc == 0) {
        la_guard_params gp = guard_compare_params(j, dense, n);
        j->guard_restored = la_guard_compare(&gp);
        j->guard_rows = (uint64_t)n * p->B * p->H;
        j->guard_tiles = (uint64_t)tiles;
    }
    free(dense);
    free(qs);
    return rc;
}
