/*
 * engine.c — the engine's core: creation and teardown, backends, attention-call validation and
 * submission, the completion queue, counters. Sessions live in session.c, buffers in
 * buffers.c, compute in backend_cpu.c / backend_cuda.c.
 *
 * Completions: a backend thread that finishes a job appends it to the done list under
 * done_lock and calls cfg.notify; eng_process_completions() takes the whole queue at once on
 * the loop thread, releases the job's references (buffers, masks, session), updates the
 * session's figures and runs the done callback.
 *
 * Over 900 lines on purpose: most of it is one path, an attention call's checks, parameters
 * and submission over the same request, session and tensor references; what else the engine
 * does is already in session.c, buffers.c, doorbell.c and the backends.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine_priv.h"

void eng_errf(eng_error *err, const char *fmt, ...)
{
    if (!err)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
}

void eng_logf(eng *e, int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    logsink_vprintf(e->cfg.log, e->cfg.log_data, level, fmt, ap);
    va_end(ap);
}

uint64_t eng_now_ms(void) { return be_now_ns() / 1000000u; }

eng_error eng_index_error(const char *what, uint32_t index, uint32_t count)
{
    eng_error e;
    if (index > INT32_MAX)
        snprintf(e.msg, sizeof e.msg, "%s %d (%u as unsigned) out of range: %ss count from 0 to %u",
                 what, (int32_t)index, index, what, count - 1);
    else
        snprintf(e.msg, sizeof e.msg, "%s %u out of range: %ss count from 0 to %u", what, index,
                 what, count - 1);
    return e;
}

void eng_config_default(eng_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->backend = "auto";
    cfg->cpu_threads = 0;
    cfg->limits.max_buffers_per_conn = 256;
    cfg->limits.max_buffer_bytes_per_conn = 64ull << 30;
    cfg->limits.max_buffers_per_user = 2048;
    cfg->limits.max_buffers_total = 0;
    cfg->limits.max_sessions_per_user = 64;
    cfg->limits.max_mask_bytes_per_user = 4ull << 30;
    cfg->limits.mask_memory_cap = 0;
    cfg->limits.max_inflight_per_conn = 64;
    cfg->limits.session_grace_s = 300;
    cfg->limits.session_ttl_s = 3600;
    cfg->limits.max_call_cost = 1ull << 47;
    cfg->limits.max_queued_cost_per_user = 1ull << 53;
    cfg->limits.warm_store_bytes_per_user = 256ull << 20;
    cfg->limits.warm_max_generations = 8;
    cfg->limits.max_doorbell_slots = 4096;
    cfg->limits.doorbell_timeout_s = 60;
}

/* Backend threads: queue the finished job for the loop thread. A fast-path call's slot is
 * written here, before the loop thread (and the reply) can see the job, so that the client
 * never reuses a slot the daemon still writes. */
static void job_complete(void *data, be_job *bj)
{
    eng *e = data;
    eng_job *j = (eng_job *)bj;
    if (bj->db)
        db_finish(bj->db, bj->db_slot, bj->db_value, bj->status);
    pthread_mutex_lock(&e->done_lock);
    list_append(&e->done, &j->done_link);
    pthread_mutex_unlock(&e->done_lock);
    if (e->cfg.notify)
        e->cfg.notify(e->cfg.notify_data);
}

int eng_new(const eng_config *cfg, eng **ret_engine, eng_error *err)
{
    eng *e = calloc(1, sizeof *e);
    if (!e) {
        eng_errf(err, "out of memory");
        return LA_ENOMEM;
    }
    e->cfg = *cfg;
    e->max_buffers_total = cfg->limits.max_buffers_total;
    if (!e->max_buffers_total) {
        /* Half of the process's mapping budget: the rest stays for masks, thread stacks,
         * malloc and the connections' buffers. */
        unsigned long long maps = 65530;
        FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
        if (f) {
            if (fscanf(f, "%llu", &maps) != 1)
                maps = 65530;
            fclose(f);
        }
        e->max_buffers_total = maps / 2;
    }
    list_init(&e->sessions);
    list_init(&e->users);
    list_init(&e->buffers);
    list_init(&e->doorbells);
    list_init(&e->jobs);
    list_init(&e->done);
    pthread_mutex_init(&e->done_lock, NULL);
    ws_config wc = {.bytes_per_user = cfg->limits.warm_store_bytes_per_user,
                    .max_generations = cfg->limits.warm_max_generations,
                    .state_dir = cfg->warm_state_dir,
                    .log = cfg->log,
                    .log_data = cfg->log_data};
    if (!wc.bytes_per_user || !wc.max_generations || wc.max_generations > WS_MAX_GENERATIONS) {
        eng_errf(err, "warm store: %s (bytes per user > 0, generations 1..%d)",
                 !wc.bytes_per_user ? "no bytes per user" : "generations per key out of range",
                 WS_MAX_GENERATIONS);
        eng_free(e);
        return LA_EINVAL;
    }
    if (ws_new(&wc, &e->warm) < 0) {
        eng_errf(err, "out of memory");
        eng_free(e);
        return LA_ENOMEM;
    }
    const char *want = cfg->backend && cfg->backend[0] ? cfg->backend : "auto";
    int want_cuda = !strcmp(want, "cuda"), auto_ = !strcmp(want, "auto");
    if (!want_cuda && !auto_ && strcmp(want, "cpu")) {
        eng_errf(err, "unknown backend '%s' (cpu, cuda or auto)", want);
        eng_free(e);
        return LA_EINVAL;
    }
    char msg[256] = "";
    int rc = be_cpu_new(cfg->cpu_threads, cfg->cpu_slice_macs, job_complete, e, &e->cpu, msg,
                        sizeof msg);
    if (rc < 0) {
        eng_errf(err, "%s", msg[0] ? msg : "cpu backend: out of memory");
        eng_free(e);
        return rc;
    }
    if (want_cuda || auto_) {
        msg[0] = 0;
        rc = be_cuda_new(job_complete, e, cfg->log, cfg->log_data, &e->cuda, msg, sizeof msg);
        if (rc < 0) {
            e->cuda = NULL;
            if (want_cuda) {
                eng_errf(err, "cuda backend: %s", msg[0] ? msg : codes_strerror(rc));
                eng_free(e);
                return rc == LA_ENOMEM ? rc : LA_ENODEV;
            }
            eng_logf(e, LOG_INFO, "cuda backend not used: %s", msg[0] ? msg : codes_strerror(rc));
        }
    }
    e->cpu->doorbell_timeout_ns = (uint64_t)cfg->limits.doorbell_timeout_s * 1000000000u;
    if (e->cuda)
        e->cuda->doorbell_timeout_ns = e->cpu->doorbell_timeout_ns;
    snprintf(e->backends, sizeof e->backends, "%s", e->cuda ? "cpu,cuda" : "cpu");
    *ret_engine = e;
    return 0;
}

void eng_free(eng *e)
{
    if (!e)
        return;
    e->shutting_down = 1;
    if (e->cpu)
        e->cpu->ops->stop(e->cpu);
    if (e->cuda)
        e->cuda->ops->stop(e->cuda);
    eng_process_completions(e);
    buf_free_all(e);
    db_free_all(e);
    sess_free_all(e); /* deposits what closes now, before the store goes */
    ws_free(e->warm);
    if (e->cpu)
        e->cpu->ops->free(e->cpu);
    if (e->cuda)
        e->cuda->ops->free(e->cuda);
    pthread_mutex_destroy(&e->done_lock);
    free(e);
}

size_t eng_devices(const eng *e, eng_device_info *out, size_t max)
{
    size_t n = e->cpu->ops->devices(e->cpu, out, max);
    if (n > max)
        n = max;
    size_t n_cpu = n;
    if (e->cuda && n < max)
        n += e->cuda->ops->devices(e->cuda, out + n, max - n);
    if (n > max)
        n = max;
    for (size_t i = 0; i < n; i++) {
        be_backend *be = i < n_cpu ? e->cpu : e->cuda;
        char why[8];
        out[i].fastpath =
            be->ops->fastpath &&
            be->ops->fastpath(be, (int)(i < n_cpu ? i : i - n_cpu), why, sizeof why) == 0;
    }
    return n;
}

const char *eng_backends(const eng *e) { return e->backends; }

static void cancel(eng *e, uint64_t conn_id, int all, int code)
{
    be_backend *bes[2] = {e->cpu, e->cuda};
    for (int i = 0; i < 2; i++)
        if (bes[i] && bes[i]->ops->cancel)
            bes[i]->ops->cancel(bes[i], conn_id, all, code);
}

void eng_conn_closed(eng *e, uint64_t conn_id)
{
    eng_job *j;
    list_for_each_entry (j, &e->jobs, eng_job, link)
        if (j->conn_id == conn_id)
            j->conn_closed = 1;
    cancel(e, conn_id, 0, LA_ECLOSED);
    buf_conn_closed(e, conn_id);
    db_conn_closed(e, conn_id);
    sess_conn_closed(e, conn_id);
}

void eng_tick(eng *e) { sess_tick(e); }

/* ---- attention ------------------------------------------------------------------------ */

static const char *dtype_name(la_dtype t)
{
    switch (t) {
    case LA_DTYPE_F32: return "f32";
    case LA_DTYPE_F16: return "f16";
    case LA_DTYPE_BF16: return "bf16";
    case LA_DTYPE_U32: return "u32";
    }
    return "unknown";
}

/* One checked tensor: its buffer, byte range [begin, end) and strides in elements. */
typedef struct tref {
    const char *role;
    int writes; /* o, lse, decisions */
    const eng_tensor *t;
    buf *b;
    uint64_t begin, end;
    int64_t strides[4];
    void *ptr;
    int present;
    int extent_rc; /* la_extent_bytes's answer: < 0 leaves the tensor to la_attn_check */
} tref;

/* Tensors of a call, in this order: q, k, v, o, lse, decisions, row_max. */
#define N_TREF 7

static int check_shape(const char *sname, const char *role, const eng_tensor *t, int ndim,
                       const int64_t *want, const char *dims, eng_error *err)
{
    if (t->ndim != ndim) {
        eng_errf(err, "%s: %s has %d dimensions, expected %d [%s]", sname, role, t->ndim, ndim,
                 dims);
        return LA_EINVAL;
    }
    for (int i = 0; i < ndim; i++)
        if (t->shape[i] != want[i]) {
            char got[96], exp[96];
            int g = 0, x = 0;
            for (int k = 0; k < ndim; k++) {
                g += snprintf(got + g, sizeof got - (size_t)g, "%s%lld", k ? ", " : "",
                              (long long)t->shape[k]);
                x += snprintf(exp + x, sizeof exp - (size_t)x, "%s%lld", k ? ", " : "",
                              (long long)want[k]);
            }
            eng_errf(err, "%s: %s shape [%s] does not match [%s] = [%s]", sname, role, got, dims,
                     exp);
            return LA_EINVAL;
        }
    return 0;
}

/* Buffer, dtype, alignment, strides and pointer of r->t, and its byte range inside its
 * buffer. A tensor of ndim 0 (decisions) is fixed_bytes contiguous bytes. A tensor whose extent
 * cannot be computed (a negative stride, one that overflows) is left to la_attn_check, which
 * names the rule (r->extent_rc < 0). */
static int resolve_tensor(eng *e, const sess *s, uint64_t conn_id, const char *sname, tref *r,
                          la_dtype want_dtype, uint64_t fixed_bytes, eng_error *err)
{
    const eng_tensor *t = r->t;
    if (t->dtype != want_dtype) {
        eng_errf(err, "%s: %s has dtype %s, expected %s", sname, r->role, dtype_name(t->dtype),
                 dtype_name(want_dtype));
        return LA_EINVAL;
    }
    buf *b = buf_get(e, conn_id, t->buffer_id);
    if (!b) {
        eng_errf(err, "%s: %s names buffer %llu, which this connection has not registered", sname,
                 r->role, (unsigned long long)t->buffer_id);
        return LA_ENOENT;
    }
    int host = s->be == e->cpu, on_gpu = b->kind == BUF_CUDA || b->kind == BUF_VMM;
    if (host ? b->kind != BUF_SHM : !on_gpu || b->dev != s->dev) {
        eng_errf(err, "%s: %s is in buffer %llu (%s), but the session computes on %s", sname,
                 r->role, (unsigned long long)b->id,
                 b->kind == BUF_SHM    ? "host memory"
                 : b->kind == BUF_VMM ? "GPU memory, VMM"
                                      : "GPU memory",
                 s->device);
        return LA_EINVAL;
    }
    if (b->pending) {
        eng_errf(err,
                 "%s: %s is in buffer %llu, which is still being registered (%u of its %u VMM "
                 "allocations have not arrived)",
                 sname, r->role, (unsigned long long)b->id, b->pending, b->n_allocs);
        return LA_EINVAL;
    }
    unsigned need = r->writes ? LA_ACCESS_WRITE : LA_ACCESS_READ;
    if (!(b->access & need)) {
        eng_errf(err, "%s: %s is in buffer %llu, registered %s", sname, r->role,
                 (unsigned long long)b->id,
                 r->writes ? "read-only: the daemon may not write it"
                           : "write-only: the daemon may not read it");
        return LA_EPERM;
    }
    uint64_t es = la_dtype_size(t->dtype);
    if (t->offset % es) {
        eng_errf(err, "%s: %s offset %llu is not a multiple of its element size %llu", sname,
                 r->role, (unsigned long long)t->offset, (unsigned long long)es);
        return LA_EINVAL;
    }
    uint64_t bytes = fixed_bytes;
    if (t->ndim > 0) {
        if (t->has_strides) {
            memcpy(r->strides, t->strides, (size_t)t->ndim * sizeof r->strides[0]);
        } else {
            int64_t acc = 1;
            for (int i = t->ndim - 1; i >= 0; i--) {
                r->strides[i] = acc;
                if (__builtin_mul_overflow(acc, t->shape[i], &acc)) {
                    eng_errf(err,
                             "%s: %s extent overflows 64 bits (offset %llu, its "
                             "contiguous strides too large)",
                             sname, r->role, (unsigned long long)t->offset);
                    return LA_ERANGE;
                }
            }
        }
        r->extent_rc = la_extent_bytes(t->ndim, t->shape, r->strides, es, &bytes);
    }
    r->b = b;
    r->begin = t->offset;
    r->ptr = (void *)((uintptr_t)b->ptr + (uintptr_t)t->offset);
    r->present = 1;
    if (r->extent_rc < 0)
        return 0;
    if (__builtin_add_overflow(t->offset, bytes, &r->end)) {
        eng_errf(err, "%s: %s extent overflows 64 bits (offset %llu, strides too large)", sname,
                 r->role, (unsigned long long)t->offset);
        return LA_ERANGE;
    }
    if (r->end > b->size) {
        eng_errf(err, "%s: %s spans bytes [%llu, %llu) but buffer %llu holds %llu bytes", sname,
                 r->role, (unsigned long long)t->offset, (unsigned long long)r->end,
                 (unsigned long long)b->id, (unsigned long long)b->size);
        return LA_ERANGE;
    }
    return 0;
}

static const tref *find_role(const tref t[N_TREF], const char *role)
{
    for (int i = 0; role && i < N_TREF; i++)
        if (t[i].present && strcmp(t[i].role, role) == 0)
            return &t[i];
    return NULL;
}

/* The one validity decision (la_attn_check) on the call's parameters; its answer names the
 * rule and the tensor, to which this adds the buffer and byte range it knows. */
static int check_params(const char *sname, const tref t[N_TREF], const la_attn_params *p,
                        eng_error *err)
{
    la_attn_error ve;
    int rc = la_attn_check(p, &ve);
    if (rc == 0) {
        for (int i = 0; i < N_TREF; i++)
            if (t[i].present && t[i].extent_rc < 0) { /* la_attn_check refuses these */
                eng_errf(err, "%s: %s extent cannot be computed", sname, t[i].role);
                return t[i].extent_rc;
            }
        return 0;
    }
    const tref *a = find_role(t, ve.tensor), *o = find_role(t, ve.other);
    if (a && o && a->b == o->b)
        eng_errf(err, "%s: %s in buffer %llu (bytes [%llu, %llu) and [%llu, %llu))", sname, ve.msg,
                 (unsigned long long)a->b->id, (unsigned long long)a->begin,
                 (unsigned long long)a->end, (unsigned long long)o->begin,
                 (unsigned long long)o->end);
    else if (a && rc == LA_ERANGE)
        eng_errf(err, "%s: %s (offset %llu in buffer %llu)", sname, ve.msg,
                 (unsigned long long)a->begin, (unsigned long long)a->b->id);
    else
        eng_errf(err, "%s: %s", sname, ve.msg);
    return rc;
}

/* The call's session (owned by uid) and its indices: layer, kv shard, step, mode. */
static int resolve_session(eng *e, uint32_t uid, const eng_attn_req *req, sess **ret_s,
                           la_mode *ret_mode, char *sname, size_t sname_len, eng_error *err)
{
    if (e->shutting_down) {
        eng_errf(err, "the daemon is shutting down");
        return LA_ESHUTDOWN;
    }
    if (eng_fatal(e)) {
        eng_errf(err, "a GPU error poisoned the daemon's CUDA context; it is restarting");
        return LA_EDEVICE;
    }
    sess *s = sess_get(e, uid, req->session_id, 0, err);
    if (!s)
        return LA_ENOENT;
    sess_name(s, sname, sname_len);
    if (req->layer >= s->layers) {
        eng_errf(err, "%s: %s", sname, eng_index_error("layer", req->layer, s->layers).msg);
        return LA_EINVAL;
    }
    if (req->kv_shard >= s->kv_shards) {
        eng_errf(err, "%s: %s", sname,
                 eng_index_error("kv shard", req->kv_shard, s->kv_shards).msg);
        return LA_EINVAL;
    }
    if (req->step > INT32_MAX) {
        eng_errf(err,
                 "%s: step %u (%d as a signed 32-bit number) out of range: steps count "
                 "from 0",
                 sname, req->step, (int32_t)req->step);
        return LA_EINVAL;
    }
    *ret_s = s;
    *ret_mode = req->mode == LA_MODE_SESSION ? s->mode : req->mode; /* judged by la_attn_check */
    return 0;
}

/* Ranks and sizes of every tensor against the session's geometry. */
static int check_geometry(const sess *s, const char *sname, const eng_attn_req *req, eng_error *err)
{
    int rc;
    const eng_tensor *q = &req->q, *k = &req->k;
    if (q->ndim != 4 || k->ndim != 4) {
        eng_errf(err, "%s: %s has %d dimensions, expected 4 [B, S, H, D]", sname,
                 q->ndim != 4 ? "q" : "k", q->ndim != 4 ? q->ndim : k->ndim);
        return LA_EINVAL;
    }
    int64_t B = q->shape[0], Sq = q->shape[1], Sk = k->shape[1];
    if (B < 1 || B > s->batch || Sq < 1 || Sq > s->max_seq_q || q->shape[2] != s->heads ||
        q->shape[3] != s->head_dim) {
        eng_errf(err,
                 "%s: q shape [%lld, %lld, %lld, %lld] outside the session's [B <= %u, "
                 "Sq <= %u, H = %u, D = %u]",
                 sname, (long long)q->shape[0], (long long)q->shape[1], (long long)q->shape[2],
                 (long long)q->shape[3], s->batch, s->max_seq_q, s->heads, s->head_dim);
        return LA_EINVAL;
    }
    if (Sk < 1 || Sk > s->max_seq_k) {
        eng_errf(err, "%s: k has %lld keys, outside [1, %u] (the session's max Sk)", sname,
                 (long long)Sk, s->max_seq_k);
        return LA_EINVAL;
    }
    int64_t kshape[4] = {B, Sk, s->heads, s->head_dim};
    if ((rc = check_shape(sname, "k", k, 4, kshape, "B, Sk, H, D", err)) < 0 ||
        (rc = check_shape(sname, "v", &req->v, 4, kshape, "B, Sk, H, D", err)) < 0 ||
        (rc = check_shape(sname, "o", &req->o, 4, q->shape, "B, Sq, H, D", err)) < 0)
        return rc;
    int64_t lshape[3] = {B, s->heads, Sq};
    if (req->has_lse && (rc = check_shape(sname, "lse", &req->lse, 3, lshape, "B, H, Sq", err)) < 0)
        return rc;
    if (req->has_row_max &&
        (rc = check_shape(sname, "row_max", &req->row_max, 3, lshape, "B, H, Sq", err)) < 0)
        return rc;
    if (req->dry_run) {
        if (!req->has_decisions) {
            eng_errf(err, "%s: dry run without a decisions tensor", sname);
            return LA_EINVAL;
        }
        if (req->decisions.ndim != 0) {
            eng_errf(err,
                     "%s: the decisions tensor takes no shape (it has the layer mask's "
                     "layout, %llu bytes)",
                     sname, (unsigned long long)s->layer_mask_bytes);
            return LA_EINVAL;
        }
    }
    return 0;
}

/* Buffers, dtypes, strides and byte ranges of every tensor the call uses (overlaps are
 * la_attn_check's to find). */
static int resolve_tensors(eng *e, const sess *s, uint64_t conn_id, const char *sname,
                           const eng_attn_req *req, tref t[N_TREF], eng_error *err)
{
    int rc;
    memset(t, 0, N_TREF * sizeof *t);
    const char *roles[N_TREF] = {"q", "k", "v", "o", "lse", "decisions", "row_max"};
    const eng_tensor *ts[N_TREF] = {&req->q,   &req->k,         &req->v,      &req->o,
                                    &req->lse, &req->decisions, &req->row_max};
    for (int i = 0; i < N_TREF; i++) {
        t[i].role = roles[i];
        t[i].writes = i >= 3;
        t[i].t = ts[i];
        if (i == 4 && !req->has_lse)
            continue;
        if (i == 5 && !req->dry_run)
            continue;
        if (i == 6 && !req->has_row_max)
            continue;
        la_dtype want = i < 4 ? s->dtype : i == 5 ? LA_DTYPE_U32 : LA_DTYPE_F32;
        if ((rc = resolve_tensor(e, s, conn_id, sname, &t[i], want, s->layer_mask_bytes, err)) < 0)
            return rc;
    }
    return 0;
}

/* Softmax scale (0: 1/sqrt(D)) and threshold (the call's, else the session's schedule or
 * threshold); la_attn_check judges them. */
static void resolve_scalars(const sess *s, const eng_attn_req *req, float *ret_scale,
                            float *ret_tau)
{
    float tau = s->threshold;
    if (req->has_threshold)
        tau = req->threshold;
    else if (s->n_schedule)
        tau = s->schedule[req->step < s->n_schedule ? req->step : s->n_schedule - 1];
    *ret_scale = req->scale == 0.0f ? 1.0f / sqrtf((float)s->head_dim) : req->scale;
    *ret_tau = tau;
}

/* Ranges are key positions of this call: [start, end) with 0 <= start <= end <= Sk. A reversed
 * or out-of-range one is a caller's mistake (swapped pair, positions of another shard or
 * length); clipping it silently, as the kernels do, would hide it. Their count was checked by
 * la_attn_check. */
static int check_ranges(const char *sname, const eng_attn_req *req, eng_error *err)
{
    const int64_t Sk = req->k.shape[1];
    for (int i = 0; i < req->n_must_do + req->n_must_skip; i++) {
        int skip = i >= req->n_must_do;
        const la_range *g = skip ? &req->must_skip[i - req->n_must_do] : &req->must_do[i];
        const char *what = skip ? "must-skip" : "must-do";
        int idx = skip ? i - req->n_must_do : i;
        if (g->end < g->start) {
            eng_errf(err, "%s: %s range %d [%lld, %lld) is reversed (end before start)", sname,
                     what, idx, (long long)g->start, (long long)g->end);
            return LA_EINVAL;
        }
        if (g->start < 0 || g->end > Sk) {
            eng_errf(err, "%s: %s range %d [%lld, %lld) lies outside the call's keys [0, %lld)",
                     sname, what, idx, (long long)g->start, (long long)g->end, (long long)Sk);
            return LA_EINVAL;
        }
    }
    return 0;
}

/* The backend job of a checked call: kernel parameters with the tensors' pointers, the
 * session's mask of (layer, shard), the ranges and the wait event. */
static void build_params(const sess *s, const eng_attn_req *req, const tref t[N_TREF], la_mode mode,
                         float scale, float tau, be_job *bj)
{
    la_attn_params *p = &bj->p;
    /* The counts travel as sent (la_attn_check refuses more than LA_MAX_RANGES); the copies
     * stay inside the arrays. */
    int n_do = req->n_must_do < 0               ? 0
               : req->n_must_do > LA_MAX_RANGES ? LA_MAX_RANGES
                                                : req->n_must_do;
    int n_skip = req->n_must_skip < 0               ? 0
                 : req->n_must_skip > LA_MAX_RANGES ? LA_MAX_RANGES
                                                    : req->n_must_skip;
    memcpy(bj->must_do, req->must_do, (size_t)n_do * sizeof(la_range));
    memcpy(bj->must_skip, req->must_skip, (size_t)n_skip * sizeof(la_range));
    p->q = t[0].ptr;
    p->k = t[1].ptr;
    p->v = t[2].ptr;
    p->o = t[3].ptr;
    memcpy(p->q_stride, t[0].strides, sizeof p->q_stride);
    memcpy(p->k_stride, t[1].strides, sizeof p->k_stride);
    memcpy(p->v_stride, t[2].strides, sizeof p->v_stride);
    memcpy(p->o_stride, t[3].strides, sizeof p->o_stride);
    if (req->has_lse) {
        p->lse = t[4].ptr;
        memcpy(p->lse_stride, t[4].strides, sizeof p->lse_stride);
    }
    if (req->has_row_max) {
        p->row_max = t[6].ptr;
        memcpy(p->row_max_stride, t[6].strides, sizeof p->row_max_stride);
    }
    p->B = (int32_t)req->q.shape[0];
    p->Sq = (int32_t)req->q.shape[1];
    p->Sk = (int32_t)req->k.shape[1];
    p->H = (int32_t)s->heads;
    p->D = (int32_t)s->head_dim;
    p->dtype = s->dtype;
    p->scale = scale;
    p->tau = tau;
    p->mode = mode;
    p->step = (int32_t)req->step;
    p->direction = s->direction;
    p->must_do = bj->must_do;
    p->n_must_do = req->n_must_do;
    p->must_skip = bj->must_skip;
    p->n_must_skip = req->n_must_skip;
    uint64_t mask_off = ((uint64_t)req->layer * s->kv_shards + req->kv_shard) * s->layer_mask_bytes;
    p->mask = (uint32_t *)((char *)s->masks->mask->dev_ptr + mask_off);
    p->mask_stride[2] = s->n_k_words;
    p->mask_stride[1] = (int64_t)s->n_k_words * s->n_q_tiles;
    p->mask_stride[0] = p->mask_stride[1] * s->heads;
    if (req->dry_run)
        p->decisions = t[5].ptr;
    p->BM = (int32_t)s->bm;
    p->BN = (int32_t)s->bn;
    p->threads = 1;
    bj->dev = s->dev;
    bj->mask = s->masks->mask;
    bj->mask_off = mask_off;
    bj->mask_len = s->layer_mask_bytes;
    bj->mask_ready = &s->masks->ready[req->layer * s->kv_shards + req->kv_shard];
    bj->mask_words = s->n_k_words;
    bj->mask_k_tiles = s->n_k_tiles;
    bj->has_wait_event = req->has_wait_event;
    if (req->has_wait_event)
        memcpy(bj->wait_event, req->wait_event, sizeof bj->wait_event);
}

/* The call's cost in multiply-adds, from the shapes alone (zero strides let a small buffer
 * stand for a huge tensor, but the kernel still does every multiply-add), against the per-call
 * and per-user limits. */
static int check_cost(eng *e, uint32_t uid, const sess *s, const char *sname,
                      const eng_attn_req *req, uint64_t *ret_cost, eng_user **ret_user,
                      eng_error *err)
{
    uint64_t cost = 2;
    int64_t dims[5] = {req->q.shape[0], (int64_t)s->heads, req->q.shape[1], req->k.shape[1],
                       (int64_t)s->head_dim};
    for (int i = 0; i < 5; i++)
        if (__builtin_mul_overflow(cost, (uint64_t)dims[i], &cost))
            cost = UINT64_MAX;
    const eng_limits *lim = &e->cfg.limits;
    if (lim->max_call_cost && cost > lim->max_call_cost) {
        eng_errf(err,
                 "%s: the call costs %llu multiply-adds, above the daemon's max_call_cost "
                 "limit of %llu",
                 sname, (unsigned long long)cost, (unsigned long long)lim->max_call_cost);
        return LA_ELIMIT;
    }
    eng_user *u = sess_user(e, uid, 1);
    if (!u) {
        eng_errf(err, "out of memory");
        return LA_ENOMEM;
    }
    if (lim->max_queued_cost_per_user && (cost > lim->max_queued_cost_per_user ||
                                          u->queued_cost > lim->max_queued_cost_per_user - cost)) {
        eng_errf(err,
                 "%s: uid %u already has %llu multiply-adds of calls queued or running; "
                 "this one (%llu) would exceed the max_queued_cost_per_user limit of %llu",
                 sname, uid, (unsigned long long)u->queued_cost, (unsigned long long)cost,
                 (unsigned long long)lim->max_queued_cost_per_user);
        return LA_ELIMIT;
    }
    *ret_cost = cost;
    *ret_user = u;
    return 0;
}

/* The backend would not take j (its supports, or its submit when queueing): the message, and
 * j freed. */
static int backend_refused(eng_job *j, const sess *s, const char *sname, int queueing, int rc,
                           eng_error *err)
{
    if (queueing)
        eng_errf(err, "%s: the %s backend refused the call: %s", sname, s->be->ops->name,
                 codes_strerror(rc));
    else
        eng_errf(err, "%s: the %s backend cannot run this call (%s)", sname, s->be->ops->name,
                 codes_strerror(rc));
    free(j);
    return rc;
}

static int submit(eng *e, uint32_t uid, uint64_t conn_id, const eng_attn_req *req, eng_doorbell *db,
                  eng_done_fn done, void *user, eng_error *err)
{
    int rc;
    sess *s;
    la_mode mode;
    char sname[SESS_NAME_MAX];
    tref t[N_TREF];
    float scale, tau;
    uint64_t cost;
    eng_user *u;
    if ((rc = resolve_session(e, uid, req, &s, &mode, sname, sizeof sname, err)) < 0 ||
        (rc = check_geometry(s, sname, req, err)) < 0 ||
        (rc = resolve_tensors(e, s, conn_id, sname, req, t, err)) < 0)
        return rc;
    resolve_scalars(s, req, &scale, &tau);
    eng_job *j = calloc(1, sizeof *j);
    if (!j) {
        eng_errf(err, "out of memory");
        return LA_ENOMEM;
    }
    be_job *bj = &j->bj;
    build_params(s, req, t, mode, scale, tau, bj);
    if ((rc = check_params(sname, t, &bj->p, err)) < 0 ||
        (rc = check_ranges(sname, req, err)) < 0 ||
        (rc = check_cost(e, uid, s, sname, req, &cost, &u, err)) < 0) {
        free(j);
        return rc;
    }
    /* Generations restart dense: a step below the layer's last one starts the layer over,
     * every kv shard of it (each shard's mask is set to all ones by its own next call, so it
     * stays ordered with the calls still queued on that mask). Dry runs leave the store alone
     * and do not count as steps. */
    size_t shard_idx = (size_t)req->layer * s->kv_shards + req->kv_shard;
    int restart = !req->dry_run && s->last_step[req->layer] >= 0 &&
                  (int64_t)req->step < s->last_step[req->layer];
    bj->mask_restart = !req->dry_run && (restart || s->restart_due[shard_idx]);
    /* The warm seed, the guardrail's check and the warm capture of this call (guard.c); a
     * warm session's dense first steps run in mode observe. */
    sess_plan_call(s, req, s->region_fresh[shard_idx] || bj->mask_restart, restart, &mode, bj);
    bj->p.mode = mode;
    /* What this backend's kernels support (head dims, dtypes, alignment); the backend's own
     * checks of the parameters run here too (la_attn_validate). */
    if ((rc = s->be->ops->supports(s->be, s->dev, &bj->p)) < 0)
        return backend_refused(j, s, sname, 0, rc, err);
    if (db) {
        char why[128] = "";
        if (!s->be->ops->fastpath ||
            (rc = s->be->ops->fastpath(s->be, s->dev, why, sizeof why)) < 0) {
            eng_errf(err, "%s: calls on %s cannot use a doorbell (the fast path): %s", sname,
                     s->device, why[0] ? why : "the backend has none");
            free(j);
            return LA_ENOTSUP;
        }
        bj->db = &db->bd;
        bj->db_slot = req->doorbell_slot;
        bj->db_value = req->doorbell_value;
    }

    j->e = e;
    j->conn_id = conn_id;
    j->done = done;
    j->user = user;
    j->tiles_total = (uint64_t)bj->p.B * s->heads * (uint64_t)la_tiles(bj->p.Sq, (int32_t)s->bm) *
                     (uint64_t)la_tiles(bj->p.Sk, (int32_t)s->bn);
    bj->t_submit_ns = be_now_ns();
    bj->uid = uid;
    bj->conn_id = conn_id;
    bj->flow_id = s->id;
    bj->cost = cost;
    if ((rc = s->be->ops->submit(s->be, bj)) < 0)
        return backend_refused(j, s, sname, 1, rc, err);
    /* From here on the job is the backend's until complete(); the references it holds are
     * released in eng_process_completions. */
    j->s = s;
    j->owner = u;
    u->queued_cost += cost;
    s->refs++;
    s->inflight++;
    j->mset = s->masks;
    s->masks->refs++;
    for (int i = 0; i < N_TREF; i++)
        if (t[i].present) {
            t[i].b->refs++;
            j->bufs[j->n_bufs++] = t[i].b;
        }
    if (db) {
        db->refs++;
        j->db = db;
        e->n_fast_calls++;
    }
    if (!req->dry_run) {
        if (restart) {
            memset(s->restart_due + (size_t)req->layer * s->kv_shards, 1, s->kv_shards);
            memset(s->region_fresh + (size_t)req->layer * s->kv_shards, 1, s->kv_shards);
            sess_warm_restart(s, req->layer);
            s->stats.restarts++;
            e->n_restarts++;
            if (!s->restart_logged) {
                s->restart_logged = 1;
                eng_logf(e, 2,
                         "%s: layer %u: step %u after step %lld: the layer starts over "
                         "with all tiles live (a new generation; logged once per session)",
                         sname, req->layer, req->step, (long long)s->last_step[req->layer]);
            }
        }
        s->restart_due[shard_idx] = 0;
        s->region_fresh[shard_idx] = 0;
        s->last_step[req->layer] = req->step;
        if (bj->has_seed)
            s->seed_due[shard_idx] = 0;
    }
    list_append(&e->jobs, &j->link);
    e->inflight++;
    sess_touch(e, s);
    return 0;
}

/* The call's doorbell slot: first of all, so that every later refusal can write it. */
static int resolve_doorbell(eng *e, uint64_t conn_id, const eng_attn_req *req,
                            eng_doorbell **ret_db, eng_error *err)
{
    *ret_db = NULL;
    if (!req->has_doorbell)
        return 0;
    eng_doorbell *d = db_get(e, conn_id);
    if (!d) {
        eng_errf(err,
                 "conn %llu: the call names doorbell slot %u, but the connection has "
                 "registered no doorbell (DoorbellRegister)",
                 (unsigned long long)conn_id, req->doorbell_slot);
        return LA_ENOENT;
    }
    if (req->doorbell_slot >= d->bd.n_slots) {
        eng_errf(err, "conn %llu: doorbell slot %u out of range: the doorbell has slots 0 to %u",
                 (unsigned long long)conn_id, req->doorbell_slot, d->bd.n_slots - 1);
        return LA_EINVAL;
    }
    *ret_db = d;
    return 0;
}

int eng_attn_submit(eng *e, uint32_t uid, uint64_t conn_id, const eng_attn_req *req,
                    eng_done_fn done, void *user, eng_error *err)
{
    e->n_calls++;
    eng_doorbell *db;
    int rc = resolve_doorbell(e, conn_id, req, &db, err);
    if (rc == 0)
        rc = submit(e, uid, conn_id, req, db, done, user, err);
    if (rc < 0) {
        e->n_call_errors++;
        /* Nothing was queued: the slot is over now, with the error. */
        if (db)
            db_finish(&db->bd, req->doorbell_slot, req->doorbell_value, rc);
    }
    return rc;
}

int eng_process_completions(eng *e)
{
    /* Take the whole queue at once: the workers keep appending to an empty one meanwhile. */
    list_node done;
    pthread_mutex_lock(&e->done_lock);
    list_take(&done, &e->done);
    pthread_mutex_unlock(&e->done_lock);
    int n = 0;
    eng_job *j;
    list_for_each_entry (j, &done, eng_job, done_link) {
        list_remove(&j->done_link);
        list_remove(&j->link);
        e->inflight--;

        be_job *bj = &j->bj;
        sess *s = j->s;
        j->owner->queued_cost -= bj->cost;
        s->inflight--;
        s->last_used_ms = eng_now_ms();
        eng_attn_result res;
        memset(&res, 0, sizeof res);
        if (bj->status == 0) {
            if (bj->guard_n) {
                s->stats.guard_checks++;
                s->stats.guard_rows += bj->guard_rows;
                s->stats.guard_restored += bj->guard_restored;
                s->stats.guard_tiles += bj->guard_tiles;
                e->n_guard_checks++;
                e->n_guard_rows += bj->guard_rows;
                e->n_guard_restored += bj->guard_restored;
                e->n_guard_tiles += bj->guard_tiles;
            }
            if (bj->has_capture && j->mset == s->masks)
                sess_warm_captured(e, s, (uint32_t)(bj->mask_ready - j->mset->ready));
            s->stats.calls++;
            s->stats.tiles_total += j->tiles_total;
            s->stats.tiles_computed += (uint64_t)bj->tiles_computed;
            e->n_completed++;
            e->n_tiles_total += j->tiles_total;
            e->n_tiles_computed += (uint64_t)bj->tiles_computed;
            res.tiles_total = j->tiles_total;
            res.tiles_computed = (uint64_t)bj->tiles_computed;
        } else {
            e->n_failed++;
        }
        res.compute_ns = bj->t_end_ns > bj->t_start_ns ? bj->t_end_ns - bj->t_start_ns : 0;
        res.queue_ns = bj->t_start_ns > bj->t_submit_ns ? bj->t_start_ns - bj->t_submit_ns : 0;
        e->compute_ns += res.compute_ns;
        e->queue_ns += res.queue_ns;
        res.has_done_event = bj->has_done_event;
        if (bj->has_done_event)
            memcpy(res.done_event, bj->done_event, sizeof res.done_event);

        for (int i = 0; i < j->n_bufs; i++)
            buf_unref(e, j->bufs[i]);
        if (j->db && bj->status == LA_ETIMEDOUT)
            e->n_fast_timeouts++;
        db_unref(e, j->db);
        if (bj->has_live) /* the worker counted the region it changed */
            j->mset->live[bj->mask_ready - j->mset->ready] = bj->live_bits;
        if (bj->mask_tainted && bj->mask_ready && j->mset == s->masks) {
            /* Its skip decisions came from inputs that may never have been written: the
             * region's next call starts dense (as after a restart). */
            size_t region = (size_t)(bj->mask_ready - j->mset->ready);
            s->restart_due[region] = 1;
            j->mset->live[region] = j->mset->region_bits;
        }
        mset_unref(e, j->mset);

        int status = bj->status;
        char msg[BE_MSG_MAX + SESS_NAME_MAX + 32];
        msg[0] = 0;
        if (status < 0) {
            char sname[SESS_NAME_MAX];
            sess_name(s, sname, sizeof sname);
            snprintf(msg, sizeof msg, "%s: %s", sname,
                     bj->msg[0] ? bj->msg : codes_strerror(status));
        } else if (j->conn_closed) {
            status = LA_ECLOSED;
            snprintf(msg, sizeof msg, "conn %llu closed before the call finished",
                     (unsigned long long)j->conn_id);
        }
        sess_unref(e, s);
        if (j->done)
            j->done(j->user, status, &res, msg[0] ? msg : NULL);
        free(j);
        n++;
    }
    return n;
}

void eng_shutdown(eng *e)
{
    if (e->shutting_down)
        return;
    e->shutting_down = 1;
    cancel(e, 0, 1, LA_ESHUTDOWN);
}

int eng_idle(const eng *e) { return e->inflight == 0; }

int eng_fatal(const eng *e) { return e->cuda && e->cuda->ops->fatal(e->cuda); }

void eng_stats(const eng *e, void (*fn)(void *data, const char *name, int64_t value), void *data)
{
    uint64_t n_sess = 0, n_detached = 0;
    const sess *s;
    list_for_each_entry (s, &e->sessions, sess, link) {
        n_sess++;
        n_detached += !s->attached;
    }
    uint64_t bytes = 0, n_buf = buf_count(e, &bytes);
#define STAT(name, v) fn(data, name, (int64_t)(v))
    STAT("calls", e->n_calls);
    STAT("call_errors", e->n_call_errors);
    STAT("calls_completed", e->n_completed);
    STAT("calls_failed", e->n_failed);
    STAT("calls_inflight", e->inflight);
    STAT("tiles_total", e->n_tiles_total);
    STAT("tiles_computed", e->n_tiles_computed);
    STAT("tiles_skipped", e->n_tiles_total - e->n_tiles_computed);
    STAT("layer_restarts", e->n_restarts);
    STAT("compute_ns", e->compute_ns);
    STAT("queue_ns", e->queue_ns);
    STAT("sessions", n_sess);
    STAT("sessions_detached", n_detached);
    STAT("sessions_opened", e->n_sessions_opened);
    STAT("sessions_closed", e->n_sessions_closed);
    STAT("sessions_evicted", e->n_evicted);
    STAT("sessions_expired", e->n_expired);
    STAT("sessions_grace_expired", e->n_detached_freed);
    STAT("mask_bytes", e->mask_bytes_live);
    STAT("buffers", n_buf);
    STAT("buffer_bytes", bytes);
    STAT("buffers_registered", e->n_buffers_added);
    STAT("buffers_unregistered", e->n_buffers_removed);
    STAT("doorbells", db_count(e));
    STAT("doorbells_registered", e->n_doorbells);
    STAT("fastpath_calls", e->n_fast_calls);
    STAT("fastpath_timeouts", e->n_fast_timeouts);
    STAT("fatal", eng_fatal(e));
    STAT("guard_checks", e->n_guard_checks);
    STAT("guard_rows", e->n_guard_rows);
    STAT("guard_restored", e->n_guard_restored);
    STAT("guard_tiles", e->n_guard_tiles);
    STAT("warm_starts", e->n_warm_starts);
#undef STAT
    ws_stats(e->warm, fn, data);
}
