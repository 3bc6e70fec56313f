/* attn.c — describing an attention call (la_attn), submitting it (pipelined), and the call
 * objects that carry its result. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define N_ROLES 7

typedef struct attn_tensor {
    int set;
    uint64_t buffer_id;
    const la_client *client;
    uint64_t offset;
    la_dtype dtype;
    int ndim;
    int64_t shape[4], strides[4];
    int has_strides;
} attn_tensor;

struct la_attn {
    attn_tensor t[N_ROLES];
    uint32_t layer, step, kv_shard;
    float scale;
    float tau; /* NAN: session's */
    la_mode mode;
    int64_t must_do[2 * LA_MAX_RANGES];
    size_t n_must_do;
    int64_t must_skip[2 * LA_MAX_RANGES];
    size_t n_must_skip;
    int dry_run;
    uint8_t wait_event[64];
    int has_wait_event;
};

LA_API int la_attn_new(la_attn **ret_attn)
{
    if (!ret_attn)
        return cl_fail(LA_EINVAL, "la_attn_new: ret_attn is NULL");
    la_attn *a = calloc(1, sizeof(*a));
    if (!a)
        return cl_fail(LA_ENOMEM, NULL);
    a->tau = NAN;
    a->mode = LA_MODE_SESSION;
    *ret_attn = a;
    return 0;
}

LA_API void la_attn_free(la_attn *a) { free(a); }

LA_API int la_attn_set_tensor(la_attn *a, la_tensor_role role, const la_buffer *buf,
                              uint64_t byte_offset, la_dtype dtype, int ndim, const int64_t *shape,
                              const int64_t *strides)
{
    if (!a || (int)role < 0 || (int)role >= N_ROLES)
        return cl_fail(LA_EINVAL, "la_attn_set_tensor: bad attn or role %d", (int)role);
    attn_tensor *t = &a->t[role];
    if (!buf) {
        if (role != LA_TENSOR_LSE && role != LA_TENSOR_DECISIONS && role != LA_TENSOR_ROW_MAX)
            return cl_fail(LA_EINVAL, "Q, K, V and O need a buffer");
        memset(t, 0, sizeof(*t));
        return 0;
    }
    static const char *const names[N_ROLES] = {"q", "k", "v", "o", "lse", "decisions", "row_max"};
    static const char *const dims4[2][4] = {{"B", "Sq", "H", "D"}, {"B", "Sk", "H", "D"}};
    static const char *const dims3[3] = {"B", "H", "Sq"};
    const char *name = names[role];
    int want = role == LA_TENSOR_LSE || role == LA_TENSOR_ROW_MAX ? 3
               : role == LA_TENSOR_DECISIONS                        ? 0
                                                                    : 4;
    if (ndim != want)
        return cl_fail(LA_EINVAL, "%s takes %d dimensions%s, not %d", name, want,
                       want == 4   ? " [B, S, H, D]"
                       : want == 3 ? " [B, H, Sq]"
                                   : "",
                       ndim);
    if (ndim && !shape)
        return cl_fail(LA_EINVAL, "%s: shape is NULL", name);
    if (dtype != LA_DTYPE_F32 && dtype != LA_DTYPE_F16 && dtype != LA_DTYPE_BF16 &&
        dtype != LA_DTYPE_U32)
        return cl_fail(LA_EINVAL, "unknown dtype %d", (int)dtype);
    for (int i = 0; i < ndim; i++)
        if (shape[i] <= 0)
            return cl_fail(LA_EINVAL,
                           "%s: dimension %d (%s) is %lld; every size must be at "
                           "least 1",
                           name, i,
                           ndim == 3 ? dims3[i]
                                     : dims4[role == LA_TENSOR_K || role == LA_TENSOR_V][i],
                           (long long)shape[i]);
    t->set = 1;
    t->buffer_id = buf->id;
    t->client = buf->client;
    t->offset = byte_offset;
    t->dtype = dtype;
    t->ndim = ndim;
    memset(t->shape, 0, sizeof(t->shape));
    memset(t->strides, 0, sizeof(t->strides));
    for (int i = 0; i < ndim; i++)
        t->shape[i] = shape[i];
    t->has_strides = strides != NULL && ndim > 0;
    if (t->has_strides)
        for (int i = 0; i < ndim; i++)
            t->strides[i] = strides[i];
    return 0;
}

LA_API int la_attn_set_position(la_attn *a, uint32_t layer, uint32_t step, uint32_t kv_shard)
{
    if (!a)
        return cl_fail(LA_EINVAL, "la_attn_set_position: attn is NULL");
    a->layer = layer;
    a->step = step;
    a->kv_shard = kv_shard;
    return 0;
}

LA_API int la_attn_set_scale(la_attn *a, float scale)
{
    if (!a || !(scale >= 0) || isinf(scale))
        return cl_fail(LA_EINVAL, "softmax scale must be finite and >= 0 (0: 1/sqrt(D))");
    a->scale = scale;
    return 0;
}

LA_API int la_attn_set_threshold(la_attn *a, float tau)
{
    if (!a)
        return cl_fail(LA_EINVAL, "la_attn_set_threshold: attn is NULL");
    a->tau = tau;
    return 0;
}

LA_API int la_attn_set_mode(la_attn *a, la_mode mode)
{
    if (!a || (int)mode < LA_MODE_SESSION || (int)mode > LA_MODE_SKIP)
        return cl_fail(LA_EINVAL, "mode must be session, dense, observe or skip");
    a->mode = mode;
    return 0;
}

static int set_ranges(int64_t *dst, size_t *n_dst, const int64_t *pairs, size_t n)
{
    if (n && !pairs)
        return cl_fail(LA_EINVAL, "ranges: pairs is NULL");
    if (n > LA_MAX_RANGES)
        return cl_fail(LA_EINVAL, "%zu ranges, at most %d", n, LA_MAX_RANGES);
    if (n)
        memcpy(dst, pairs, 2 * n * sizeof(int64_t));
    *n_dst = n;
    return 0;
}

LA_API int la_attn_set_must_do(la_attn *a, const int64_t *pairs, size_t n)
{
    if (!a)
        return cl_fail(LA_EINVAL, "la_attn_set_must_do: attn is NULL");
    return set_ranges(a->must_do, &a->n_must_do, pairs, n);
}

LA_API int la_attn_set_must_skip(la_attn *a, const int64_t *pairs, size_t n)
{
    if (!a)
        return cl_fail(LA_EINVAL, "la_attn_set_must_skip: attn is NULL");
    return set_ranges(a->must_skip, &a->n_must_skip, pairs, n);
}

LA_API int la_attn_set_dry_run(la_attn *a, int on)
{
    if (!a)
        return cl_fail(LA_EINVAL, "la_attn_set_dry_run: attn is NULL");
    a->dry_run = on != 0;
    return 0;
}

LA_API int la_attn_set_wait_event(la_attn *a, const void *ipc_event_handle, size_t len)
{
    if (!a)
        return cl_fail(LA_EINVAL, "la_attn_set_wait_event: attn is NULL");
    if (len == 0) {
        a->has_wait_event = 0;
        return 0;
    }
    if (len != 64 || !ipc_event_handle)
        return cl_fail(LA_EINVAL, "a CUDA IPC event handle has 64 bytes, not %zu", len);
    memcpy(a->wait_event, ipc_event_handle, 64);
    a->has_wait_event = 1;
    return 0;
}

/* ---- calls --------------------------------------------------------------------------------- */

void cl_calls_free_all(la_client *c) { list_drain(&c->calls, la_call, link, free); }

void cl_call_complete(la_client *c, la_call *call, int status, Liteattn__Reply *r)
{
    if (r && r->body_case == LITEATTN__REPLY__BODY_ERROR) {
        status = r->error->code < 0 ? r->error->code : LA_EPROTO;
        snprintf(call->pend.errmsg, sizeof(call->pend.errmsg), "%s",
                 r->error->message && *r->error->message ? r->error->message : la_strerror(status));
    } else if (r && r->body_case == LITEATTN__REPLY__BODY_ATTENTION) {
        const Liteattn__AttentionReply *ar = r->attention;
        call->tiles_total = ar->tiles_total;
        call->tiles_computed = ar->tiles_computed;
        call->compute_ns = ar->compute_ns;
        call->queue_ns = ar->queue_ns;
        if (ar->has_done_event && ar->done_event.len == 64) {
            memcpy(call->done_event, ar->done_event.data, 64);
            call->has_done_event = 1;
        }
        if (call->row_max && !(ar->has_row_max && ar->row_max)) {
            /* A daemon older than Attention.row_max computed the call without it. */
            status = LA_ENOTSUP;
            snprintf(call->pend.errmsg, sizeof(call->pend.errmsg),
                     "the daemon does not carry row maxima (it predates the ROW_MAX tensor): the "
                     "call ran without them and left the ROW_MAX tensor unchanged");
        }
    } else if (r) {
        status = LA_EPROTO;
        snprintf(call->pend.errmsg, sizeof(call->pend.errmsg),
                 "the daemon answered an attention call with reply type %d", (int)r->body_case);
    } else if (status < 0) {
        snprintf(call->pend.errmsg, sizeof(call->pend.errmsg), "%s",
                 status == LA_ECLOSED ? "connection to the daemon closed" : la_strerror(status));
    }
    if (r)
        liteattn__reply__free_unpacked(r, NULL);
    call->pend.status = status;
    call->pend.done = 1;
    c->completions++;
    if (call->fast)
        cl_fast_complete(c, call, status);
    if (call->orphan) {
        list_remove(&call->link);
        free(call);
        return;
    }
    la_done_fn cb = call->cb;
    call->cb = NULL;
    /* Last use of call here: the callback may free it. */
    if (cb)
        cb(call, status, call->user);
}

static void fill_ref(Liteattn__TensorRef *ref, const attn_tensor *t)
{
    ref->buffer_id = t->buffer_id;
    ref->has_offset = 1;
    ref->offset = t->offset;
    ref->has_dtype = 1;
    ref->dtype = (Liteattn__DType)t->dtype;
    ref->n_shape = (size_t)t->ndim;
    ref->shape = (int64_t *)t->shape;
    ref->n_strides = t->has_strides ? (size_t)t->ndim : 0;
    ref->strides = (int64_t *)t->strides;
}

/* What the client needs to build the message: Q, K, V, O set, every tensor in a buffer of
 * this client (buffer ids are per connection). Everything else is the daemon's to judge. */
static int check_tensors(const la_client *c, const la_attn *a)
{
    static const char *const role_name[N_ROLES] = {"Q", "K", "V", "O", "LSE", "DECISIONS",
                                                   "ROW_MAX"};
    for (int i = 0; i < N_ROLES; i++) {
        if (i <= LA_TENSOR_O && !a->t[i].set)
            return cl_fail(LA_EINVAL, "tensor %s is not set", role_name[i]);
        if (a->t[i].set && a->t[i].client != c)
            return cl_fail(LA_EINVAL, "tensor %s names a buffer of another client", role_name[i]);
    }
    return 0;
}

/* The Attention message of a call, with the storage its pointers point into. */
typedef struct attn_msg {
    Liteattn__TensorRef refs[N_ROLES];
    Liteattn__Range rd[LA_MAX_RANGES], rs[LA_MAX_RANGES];
    Liteattn__Range *prd[LA_MAX_RANGES], *prs[LA_MAX_RANGES];
    Liteattn__Attention at;
    Liteattn__Request req;
} attn_msg;

static void ranges_to_wire(const int64_t *pairs, size_t n, Liteattn__Range *r,
                           Liteattn__Range **ptrs)
{
    for (size_t i = 0; i < n; i++) {
        liteattn__range__init(&r[i]);
        r[i].start = pairs[2 * i];
        r[i].end = pairs[2 * i + 1];
        ptrs[i] = &r[i];
    }
}

static void build_attention(const la_session *s, const la_attn *a, attn_msg *m)
{
    for (int i = 0; i < N_ROLES; i++) {
        liteattn__tensor_ref__init(&m->refs[i]);
        if (a->t[i].set)
            fill_ref(&m->refs[i], &a->t[i]);
    }
    ranges_to_wire(a->must_do, a->n_must_do, m->rd, m->prd);
    ranges_to_wire(a->must_skip, a->n_must_skip, m->rs, m->prs);
    Liteattn__Attention *at = &m->at;
    liteattn__attention__init(at);
    at->session_id = s->id;
    at->layer = a->layer;
    at->step = a->step;
    at->has_kv_shard = 1;
    at->kv_shard = a->kv_shard;
    at->q = &m->refs[LA_TENSOR_Q];
    at->k = &m->refs[LA_TENSOR_K];
    at->v = &m->refs[LA_TENSOR_V];
    at->o = &m->refs[LA_TENSOR_O];
    if (a->t[LA_TENSOR_LSE].set)
        at->lse = &m->refs[LA_TENSOR_LSE];
    if (a->t[LA_TENSOR_DECISIONS].set)
        at->decisions = &m->refs[LA_TENSOR_DECISIONS];
    if (a->t[LA_TENSOR_ROW_MAX].set)
        at->row_max = &m->refs[LA_TENSOR_ROW_MAX];
    at->has_scale = a->scale > 0;
    at->scale = a->scale;
    at->has_threshold = !isnan(a->tau);
    at->threshold = a->tau;
    at->has_mode = a->mode != LA_MODE_SESSION;
    at->mode = (Liteattn__Mode)a->mode;
    at->n_must_do = a->n_must_do;
    at->must_do = m->prd;
    at->n_must_skip = a->n_must_skip;
    at->must_skip = m->prs;
    at->has_dry_run = at->dry_run = a->dry_run != 0;
    if (a->has_wait_event) {
        at->has_wait_event = 1;
        at->wait_event.data = (uint8_t *)a->wait_event;
        at->wait_event.len = 64;
    }
    m->req = cl_req_body(LITEATTN__REQUEST__BODY_ATTENTION, at);
}

/* Sends req as a new call of c (refused while c is closed or at the daemon's in-flight limit). */
static int send_call(la_client *c, Liteattn__Request *req, la_done_fn cb, void *user,
                     la_call **ret_call)
{
    la_call *call = calloc(1, sizeof(*call));
    if (!call)
        return cl_fail(LA_ENOMEM, NULL);
    list_init(&call->link);
    call->client = c;
    call->cb = cb;
    call->user = user;
    call->pend.call = call;
    call->pend.status = LA_EAGAIN;
    call->row_max = req->attention != NULL && req->attention->row_max != NULL;

    pthread_mutex_lock(&c->lock);
    int rc = 0;
    if (c->closed)
        rc = cl_fail(c->closed, "connection to the daemon closed");
    else if (c->n_pending >= c->max_inflight)
        rc = cl_fail(LA_EBUSY, "%u requests in flight on this client, the daemon's limit is %u",
                     c->n_pending, c->max_inflight);
    if (rc == 0)
        rc = cl_send(c, req, -1, &call->pend);
    if (rc == 0) {
        call->pend.status = LA_EAGAIN;
        list_append(&c->calls, &call->link);
    }
    pthread_mutex_unlock(&c->lock);
    if (rc < 0) {
        free(call);
        return rc;
    }
    *ret_call = call;
    return 0;
}

LA_API int la_attn_submit(la_session *s, const la_attn *a, la_done_fn cb, void *user,
                          la_call **ret_call)
{
    if (!s || !a || !ret_call)
        return cl_fail(LA_EINVAL, "la_attn_submit: NULL argument");
    int rc = check_tensors(s->client, a);
    if (rc < 0)
        return rc;
    attn_msg m;
    build_attention(s, a, &m);
    return send_call(s->client, &m.req, cb, user, ret_call);
}

LA_API int la_attn_enqueue(la_session *s, const la_attn *a, void *cuda_stream, la_call **ret_call)
{
    if (!s || !a)
        return cl_fail(LA_EINVAL, "la_attn_enqueue: NULL argument");
    la_client *c = s->client;
    int rc = check_tensors(c, a);
    if (rc < 0)
        return rc;
    if (cuda_stream && !strcmp(s->device, "cpu"))
        return cl_fail(LA_EINVAL, "the session computes on the CPU: there is no CUDA stream to "
                                  "order its calls on (pass NULL)");
    attn_msg m;
    build_attention(s, a, &m);
    la_call *call = calloc(1, sizeof(*call));
    if (!call)
        return cl_fail(LA_ENOMEM, NULL);
    list_init(&call->link);
    call->client = c;
    call->pend.call = call;
    call->pend.status = LA_EAGAIN;
    call->fast = 1;
    call->internal = ret_call == NULL;
    call->orphan = call->internal; /* freed when its reply arrives */
    call->layer = a->layer;
    call->step = a->step;
    call->session = s;

    pthread_mutex_lock(&c->lock);
    uint32_t slot = 0, value = 0;
    /* An earlier call's failure is this call's answer: this one is not made. */
    if ((rc = cl_fast_deferred(s)) < 0)
        goto out;
    if (c->closed) {
        rc = cl_fail(c->closed, "connection to the daemon closed");
        goto out;
    }
    /* A full pipeline waits here, as a full CUDA launch queue would. */
    if ((rc = cl_fast_wait_room(c)) < 0)
        goto out;
    if ((rc = cl_fast_begin(c, s, cuda_stream, &slot, &value)) < 0)
        goto out;
    m.at.has_doorbell_slot = 1;
    m.at.doorbell_slot = slot;
    m.at.has_doorbell_value = 1;
    m.at.doorbell_value = value;
    if ((rc = cl_send(c, &m.req, -1, &call->pend)) < 0) {
        cl_fast_undo(c, slot, value, rc);
        goto out;
    }
    call->slot = slot;
    call->value = value;
    call->seq = ++c->fast_seq;
    call->pend.status = LA_EAGAIN;
    list_append(&c->calls, &call->link);
    s->fast.inflight++;
    c->fast_inflight++;
out:
    pthread_mutex_unlock(&c->lock);
    if (rc < 0) {
        free(call);
        return rc;
    }
    if (ret_call)
        *ret_call = call;
    return 0;
}

static int call_done(la_client *c, void *arg)
{
    (void)c;
    return ((la_call *)arg)->pend.done;
}

LA_API int la_call_wait(la_call *call, int timeout_ms)
{
    if (!call)
        return cl_fail(LA_EINVAL, "la_call_wait: call is NULL");
    la_client *c = call->client;
    pthread_mutex_lock(&c->lock);
    int rc = cl_wait_cond(c, call_done, call, timeout_ms);
    int status;
    if (call->pend.done) {
        status = call->pend.status;
        if (status < 0)
            cl_fail(status, "%s", call->pend.errmsg);
    } else {
        status = rc == LA_ETIMEDOUT ? cl_fail(LA_ETIMEDOUT,
                                              "the call did not finish within %d "
                                              "ms",
                                              timeout_ms)
                                    : cl_fail(rc, NULL);
    }
    pthread_mutex_unlock(&c->lock);
    return status;
}

LA_API int la_attn_run(la_session *s, const la_attn *a, la_call **ret_call)
{
    la_call *call;
    int rc = la_attn_submit(s, a, NULL, NULL, &call);
    if (rc < 0)
        return rc;
    rc = la_call_wait(call, -1);
    if (rc == 0 && ret_call)
        *ret_call = call;
    else
        la_call_free(call);
    return rc;
}

LA_API int la_call_status(const la_call *call)
{
    if (!call)
        return LA_EINVAL;
    la_client *c = call->client;
    pthread_mutex_lock(&c->lock);
    int st = call->pend.done ? call->pend.status : LA_EAGAIN;
    pthread_mutex_unlock(&c->lock);
    return st;
}

/* 0 once call has its reply (what cl_call_complete wrote is then read without the lock: it
 * is not written again), else LA_EAGAIN. */
static int call_finished(const la_call *call)
{
    la_client *c = call->client;
    pthread_mutex_lock(&c->lock);
    int done = call->pend.done;
    pthread_mutex_unlock(&c->lock);
    return done ? 0 : cl_fail(LA_EAGAIN, "the call has not finished");
}

LA_API int la_call_stat(const la_call *call, const char *name, int64_t *ret_value)
{
    if (!call || !name)
        return cl_fail(LA_EINVAL, "la_call_stat: NULL argument");
    int rc = call_finished(call);
    if (rc < 0)
        return rc;
    static const char *const names[] = {"tiles_total", "tiles_computed", "compute_ns",
                                        "queue_ns"};
    const uint64_t values[] = {call->tiles_total, call->tiles_computed, call->compute_ns,
                               call->queue_ns};
    int i = cl_name_index(names, sizeof(names) / sizeof(names[0]), name);
    if (i < 0)
        return cl_fail(LA_ENOENT, "no call figure \"%s\"", name);
    if (ret_value)
        *ret_value = (int64_t)values[i];
    return 0;
}

LA_API int la_call_done_event(const la_call *call, void *ret_handle, size_t len)
{
    if (!call || !ret_handle || len < 64)
        return cl_fail(LA_EINVAL, "la_call_done_event: NULL argument or len < 64");
    int rc = call_finished(call);
    if (rc < 0)
        return rc;
    if (!call->has_done_event)
        return cl_fail(LA_ENOENT, "the call has no completion event (CPU backend)");
    memcpy(ret_handle, call->done_event, 64);
    return 0;
}

LA_API void la_call_free(la_call *call)
{
    if (!call)
        return;
    la_client *c = call->client;
    pthread_mutex_lock(&c->lock);
    if (!call->pend.done) {
        /* Still in flight: freed when its reply (or the connection's end) arrives. */
        call->orphan = 1;
        call->cb = NULL;
    } else {
        list_remove(&call->link);
        free(call);
    }
    pthread_mutex_unlock(&c->lock);
}
