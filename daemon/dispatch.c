/* dispatch.c — requests to engine calls to replies (see dispatch.h).
 *
 * Over 900 lines on purpose: it is the one table from request to engine call, and its
 * handlers are short, alike and share the reply helpers and the row accumulator, which
 * splitting them by request family would only have to export. */
#include "dispatch.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"
#include "codes.h"
#include "mps.h"

/* An attention request in flight: the reply is sent from its done callback. */
typedef struct disp_job {
    conn_job cj; /* the connection's record of it */
    conn *c;
    int row_max; /* the call carries row maxima: the reply says they were written */
} disp_job;

/* Sends Error(code, printf-formatted message); returns CONN_REQ_OK (semantic errors keep the
 * connection). */
static int reply_err(conn *c, uint64_t id, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int reply_err(conn *c, uint64_t id, int code, const char *fmt, ...)
{
    char msg[ENG_ERR_MAX + 64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    conn_send_error(c, id, code, msg);
    return CONN_REQ_OK;
}

static int reply_eng_err(conn *c, uint64_t id, int code, const eng_error *err)
{
    conn_send_error(c, id, code, err->msg[0] ? err->msg : codes_strerror(code));
    return CONN_REQ_OK;
}

/* Sends a Reply whose body (body_case) is the message body points at. The oneof's members
 * are pointers in one union, so storing through one of them sets the body. */
static int send_reply(conn *c, uint64_t id, Liteattn__Reply__BodyCase body_case, void *body)
{
    Liteattn__Reply r = LITEATTN__REPLY__INIT;
    r.id = id;
    r.body_case = body_case;
    r.ack = body;
    conn_send(c, &r);
    return CONN_REQ_OK;
}

static int send_ack(conn *c, uint64_t id)
{
    Liteattn__Ack ack = LITEATTN__ACK__INIT;
    return send_reply(c, id, LITEATTN__REPLY__BODY_ACK, &ack);
}

/* The rows of a listing reply, gathered by a walk's callback. Each row is allocated on its own
 * and starts with its item, so the item can point into its row at once, and items is the array
 * the reply's repeated field points at (cast to the element type: protobuf-c reads it as
 * message pointers, and all pointers to structures have one representation). */
typedef struct row_acc {
    ProtobufCMessage **items;
    size_t n, cap;
    int failed;
} row_acc;

/* The next row (size bytes, zeroed); NULL once max rows are there, or when memory ran short
 * (then failed is set; the rows so far stay). */
static void *acc_next(row_acc *a, size_t size, size_t max)
{
    if (a->failed || a->n >= max)
        return NULL;
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 16;
        void *q = realloc(a->items, cap * sizeof(*a->items));
        if (!q) {
            a->failed = 1;
            return NULL;
        }
        a->items = q, a->cap = cap;
    }
    void *r = calloc(1, size);
    if (!r) {
        a->failed = 1;
        return NULL;
    }
    a->items[a->n++] = r;
    return r;
}

/* Sends a's rows as the listing reply of body_case (stats, sessions or the warm-start store:
 * each reply is one list of them), or an out-of-memory error when the walk ran short; frees
 * the rows. */
static int send_rows(conn *c, uint64_t id, row_acc *a, Liteattn__Reply__BodyCase body_case)
{
    Liteattn__StatsReply sr = LITEATTN__STATS_REPLY__INIT;
    Liteattn__SessionListReply lr = LITEATTN__SESSION_LIST_REPLY__INIT;
    Liteattn__WarmListReply wr = LITEATTN__WARM_LIST_REPLY__INIT;
    void *msg = &sr;
    const char *oom = "out of memory";
    if (body_case == LITEATTN__REPLY__BODY_SESSION_LIST) {
        lr.n_sessions = a->n, lr.sessions = (Liteattn__SessionSummary **)a->items;
        msg = &lr, oom = "out of memory listing sessions";
    } else if (body_case == LITEATTN__REPLY__BODY_WARM_LIST) {
        wr.n_entries = a->n, wr.entries = (Liteattn__WarmEntry **)a->items;
        msg = &wr, oom = "out of memory listing the warm-start store";
    } else {
        sr.n_stats = a->n, sr.stats = (Liteattn__Stat **)a->items;
    }
    if (a->failed)
        reply_err(c, id, LA_ENOMEM, "%s", oom);
    else
        send_reply(c, id, body_case, msg);
    for (size_t i = 0; i < a->n; i++)
        free(a->items[i]);
    free(a->items);
    return CONN_REQ_OK;
}

/* ---- Hello -------------------------------------------------------------------------------- */

static int do_hello(const disp *d, conn *c, uint64_t id, const Liteattn__Hello *h, char *why,
                    size_t whylen)
{
    if (c->hello_done)
        return reply_err(c, id, LA_EINVAL, "Hello was already done on this connection");
    if (h->major != LA_PROTOCOL_MAJOR) {
        char msg[128];
        snprintf(msg, sizeof(msg), "protocol %u.%u is not supported; this daemon speaks %d.%d",
                 h->major, h->minor, LA_PROTOCOL_MAJOR, LA_PROTOCOL_MINOR);
        conn_send_error(c, id, LA_EVERSION, msg);
        snprintf(why, whylen, "%s", msg);
        return CONN_REQ_CLOSE;
    }
    /* The name is only for logs: keep it short and printable. */
    size_t j = 0;
    for (const char *p = h->client_name ? h->client_name : ""; *p && j + 1 < sizeof(c->client_name);
         p++)
        c->client_name[j++] = (*p >= 0x20 && *p < 0x7f) ? *p : '?';
    c->client_name[j] = 0;
    conn_hello_done(c);

    char backends[64];
    snprintf(backends, sizeof(backends), "%s", eng_backends(d->eng));
    char *bk[8];
    size_t nb = 0;
    for (char *save = NULL, *t = strtok_r(backends, ",", &save); t && nb < 8;
         t = strtok_r(NULL, ",", &save))
        bk[nb++] = t;

    eng_device_info info[16];
    size_t nd = eng_devices(d->eng, info, 16);
    if (nd > 16)
        nd = 16;
    Liteattn__Device dev[16], *devp[16];
    for (size_t i = 0; i < nd; i++) {
        liteattn__device__init(&dev[i]);
        info[i].uuid[sizeof(info[i].uuid) - 1] = 0;
        info[i].backend[sizeof(info[i].backend) - 1] = 0;
        info[i].name[sizeof(info[i].name) - 1] = 0;
        dev[i].uuid = info[i].uuid;
        dev[i].backend = info[i].backend;
        dev[i].name = info[i].name;
        dev[i].has_memory_bytes = 1;
        dev[i].memory_bytes = info[i].memory_bytes;
        dev[i].has_compute_capability = 1;
        dev[i].compute_capability = info[i].compute_capability;
        if (info[i].mps >= 0) {
            dev[i].has_mps = 1;
            dev[i].mps = info[i].mps != 0;
        }
        if (info[i].sm_count) {
            dev[i].has_sm_count = 1;
            dev[i].sm_count = info[i].sm_count;
        }
        devp[i] = &dev[i];
    }
    mps_view mv;
    mps_look(&mv);

    const cfg *g = d->cfg;
    Liteattn__Limits lim = LITEATTN__LIMITS__INIT;
    lim.has_max_frame = 1, lim.max_frame = g->max_frame;
    lim.has_max_inflight = 1, lim.max_inflight = g->limits.max_inflight_per_conn;
    lim.has_max_buffers = 1, lim.max_buffers = g->limits.max_buffers_per_conn;
    lim.has_max_sessions = 1, lim.max_sessions = g->limits.max_sessions_per_user;
    lim.has_max_mask_bytes = 1, lim.max_mask_bytes = g->limits.max_mask_bytes_per_user;
    lim.has_max_connections = 1, lim.max_connections = g->max_conns_per_user;
    lim.has_session_grace_s = 1, lim.session_grace_s = g->limits.session_grace_s;
    lim.has_session_ttl_s = 1, lim.session_ttl_s = g->limits.session_ttl_s;
    lim.has_warm_store_bytes = 1, lim.warm_store_bytes = g->limits.warm_store_bytes_per_user;
    lim.has_warm_max_generations = 1;
    lim.warm_max_generations = g->limits.warm_max_generations;
    lim.has_doorbell_timeout_ms = 1, lim.doorbell_timeout_ms = g->limits.doorbell_timeout_s * 1000u;
    lim.has_max_doorbell_slots = 1, lim.max_doorbell_slots = g->limits.max_doorbell_slots;

    /* The devices that take fast-path calls (a doorbell slot). */
    char *fast[16];
    size_t nf = 0;
    for (size_t i = 0; i < nd; i++)
        if (info[i].fastpath)
            fast[nf++] = info[i].uuid;

    Liteattn__HelloReply hr = LITEATTN__HELLO_REPLY__INIT;
    hr.major = LA_PROTOCOL_MAJOR;
    hr.minor = LA_PROTOCOL_MINOR;
    hr.daemon_version = (char *)LA_VERSION_STRING;
    hr.n_backends = nb;
    hr.backends = bk;
    hr.n_devices = nd;
    hr.devices = devp;
    hr.limits = &lim;
    hr.n_doorbell_devices = nf;
    hr.doorbell_devices = fast;
    hr.mps_pipe_directory = mv.pipe_dir;
    hr.has_mps_control = 1;
    hr.mps_control = mv.control != 0;
    return send_reply(c, id, LITEATTN__REPLY__BODY_HELLO, &hr);
}

/* ---- sessions ----------------------------------------------------------------------------- */

static int send_session_view(conn *c, uint64_t id, const eng_session_view *v)
{
    Liteattn__SessionReply sr = LITEATTN__SESSION_REPLY__INIT;
    sr.session_id = v->id;
    sr.bm = v->bm;
    sr.bn = v->bn;
    sr.mask_bytes = v->mask_bytes;
    sr.has_layer_mask_bytes = 1, sr.layer_mask_bytes = v->layer_mask_bytes;
    sr.has_n_q_tiles = 1, sr.n_q_tiles = v->n_q_tiles;
    sr.has_n_k_words = 1, sr.n_k_words = v->n_k_words;
    sr.has_layers = 1, sr.layers = v->layers;
    sr.has_heads = 1, sr.heads = v->heads;
    sr.has_head_dim = 1, sr.head_dim = v->head_dim;
    sr.has_dtype = 1, sr.dtype = (Liteattn__DType)v->dtype;
    sr.has_max_seq_q = 1, sr.max_seq_q = v->max_seq_q;
    sr.has_max_seq_k = 1, sr.max_seq_k = v->max_seq_k;
    sr.has_batch = 1, sr.batch = v->batch;
    sr.has_kv_shards = 1, sr.kv_shards = v->kv_shards;
    char device[sizeof(v->device)];
    memcpy(device, v->device, sizeof(device));
    device[sizeof(device) - 1] = 0;
    sr.device = device;
    char status[sizeof(v->warm_status)];
    memcpy(status, v->warm_status, sizeof(status));
    status[sizeof(status) - 1] = 0;
    if (status[0]) {
        sr.has_warm_generations = 1, sr.warm_generations = v->warm_generations;
        sr.warm_status = status;
    }
    return send_reply(c, id, LITEATTN__REPLY__BODY_SESSION, &sr);
}

static int do_session_open(const disp *d, conn *c, uint64_t id, const Liteattn__SessionOpen *m)
{
    /* Translation only: the engine decides what is valid (eng_session_open). */
    eng_session_spec spec;
    memset(&spec, 0, sizeof(spec));
    spec.key = m->key;
    spec.device = m->device;
    spec.layers = m->layers;
    spec.heads = m->heads;
    spec.head_dim = m->head_dim;
    spec.dtype = (la_dtype)m->dtype;
    spec.max_seq_q = m->max_seq_q;
    spec.max_seq_k = m->has_max_seq_k ? m->max_seq_k : 0;
    spec.batch = m->has_batch && m->batch ? m->batch : 1;
    spec.kv_shards = m->has_kv_shards && m->kv_shards ? m->kv_shards : 1;
    spec.threshold = m->has_threshold ? m->threshold : -3.0f;
    spec.schedule = m->n_schedule ? m->schedule : NULL;
    spec.n_schedule = m->n_schedule;
    spec.mode = m->has_mode ? (la_mode)m->mode : LA_MODE_SKIP;
    spec.direction = m->has_direction ? (la_direction)m->direction : LA_DIR_ALTERNATE;
    spec.warm_key = m->warm_key;
    if (m->warm) {
        spec.has_warm_step = m->warm->has_step, spec.warm_step = m->warm->step;
        spec.has_warm_generations = m->warm->has_generations;
        spec.warm_generations = m->warm->generations;
        spec.has_warm_margin = m->warm->has_margin, spec.warm_margin = m->warm->margin;
        spec.has_warm_dense_steps = m->warm->has_dense_steps;
        spec.warm_dense_steps = m->warm->dense_steps;
    }
    if (m->guard) {
        spec.guard_every = m->guard->has_every ? m->guard->every : 0;
        spec.guard_sample = m->guard->has_sample ? m->guard->sample : 0;
        spec.guard_budget = m->guard->has_budget ? m->guard->budget : 0.0f;
        if (m->guard->has_budget && m->guard->budget == 0.0f)
            spec.guard_budget = NAN; /* an explicit 0 is refused by the engine, not defaulted */
    }

    eng_session_view v;
    eng_error err = {{0}};
    int rc = eng_session_open(d->eng, c->uid, c->id, &spec, &v, &err);
    if (rc < 0)
        return reply_eng_err(c, id, rc, &err);
    return send_session_view(c, id, &v);
}

static int do_session_attach(const disp *d, conn *c, uint64_t id, const Liteattn__SessionAttach *m)
{
    eng_session_view v;
    eng_error err = {{0}};
    int rc = eng_session_attach(d->eng, c->uid, c->id, m->key, &v, &err);
    if (rc < 0)
        return reply_eng_err(c, id, rc, &err);
    return send_session_view(c, id, &v);
}

enum { SREF_RESET, SREF_CLOSE };

static int do_session_ref(const disp *d, conn *c, uint64_t id, const Liteattn__SessionRef *m,
                          int what)
{
    eng_error err = {{0}};
    int rc = what == SREF_RESET ? eng_session_reset(d->eng, c->uid, m->session_id, &err)
                                : eng_session_close(d->eng, c->uid, m->session_id, &err);
    if (rc < 0)
        return reply_eng_err(c, id, rc, &err);
    return send_ack(c, id);
}

/* Layers reported by SessionInfo at most (a session has far fewer). */
#define INFO_LAYERS_MAX 4096

static int do_session_info(const disp *d, conn *c, uint64_t id, const Liteattn__SessionRef *m)
{
    double *live = malloc(INFO_LAYERS_MAX * sizeof(double));
    if (!live)
        return reply_err(c, id, LA_ENOMEM, "out of memory");
    /* The engine fills one entry per layer and leaves the rest: mark them to count layers. */
    for (size_t i = 0; i < INFO_LAYERS_MAX; i++)
        live[i] = -1.0;
    eng_session_stats st = {0};
    eng_error err = {{0}};
    int rc = eng_session_info(d->eng, c->uid, m->session_id, live, INFO_LAYERS_MAX, &st, &err);
    if (rc < 0) {
        free(live);
        return reply_eng_err(c, id, rc, &err);
    }
    size_t n = 0;
    while (n < INFO_LAYERS_MAX && live[n] >= 0.0)
        n++;
    Liteattn__SessionInfoReply ir = LITEATTN__SESSION_INFO_REPLY__INIT;
    ir.n_live_fraction = n;
    ir.live_fraction = live;
    ir.has_calls = 1, ir.calls = st.calls;
    ir.has_tiles_total = 1, ir.tiles_total = st.tiles_total;
    ir.has_tiles_computed = 1, ir.tiles_computed = st.tiles_computed;
    ir.has_restarts = 1, ir.restarts = st.restarts;
    st.warm_key[sizeof(st.warm_key) - 1] = 0;
    ir.warm_key = st.warm_key;
    ir.has_warm_generations = 1, ir.warm_generations = st.warm_generations;
    ir.has_warm_deposits = 1, ir.warm_deposits = st.warm_deposits;
    ir.has_guard_checks = 1, ir.guard_checks = st.guard_checks;
    ir.has_guard_rows = 1, ir.guard_rows = st.guard_rows;
    ir.has_guard_restored = 1, ir.guard_restored = st.guard_restored;
    ir.has_guard_tiles = 1, ir.guard_tiles = st.guard_tiles;
    send_reply(c, id, LITEATTN__REPLY__BODY_SESSION_INFO, &ir);
    free(live);
    return CONN_REQ_OK;
}

typedef struct list_row {
    Liteattn__SessionSummary item;
    char key[ENG_KEY_MAX + 1];
    char warm[ENG_KEY_MAX + 1];
    char dev[64];
    double live[]; /* its layers' live fractions */
} list_row;

static void list_one(void *data, const eng_session_summary *s)
{
    size_t n_live = s->layer_live ? s->layers : 0;
    list_row *r = acc_next(data, sizeof(*r) + n_live * sizeof(double), DISP_LIST_MAX);
    if (!r)
        return;
    Liteattn__SessionSummary *o = &r->item;
    liteattn__session_summary__init(o);
    memcpy(r->key, s->key, sizeof(r->key));
    r->key[ENG_KEY_MAX] = 0;
    memcpy(r->dev, s->device, sizeof(r->dev));
    r->dev[sizeof(r->dev) - 1] = 0;
    o->has_id = 1, o->id = s->id;
    o->has_uid = 1, o->uid = s->uid;
    o->has_layers = 1, o->layers = s->layers;
    o->has_heads = 1, o->heads = s->heads;
    o->has_head_dim = 1, o->head_dim = s->head_dim;
    o->has_batch = 1, o->batch = s->batch;
    o->has_bm = 1, o->bm = s->bm;
    o->has_bn = 1, o->bn = s->bn;
    o->has_mask_bytes = 1, o->mask_bytes = s->mask_bytes;
    o->has_calls = 1, o->calls = s->calls;
    o->has_restarts = 1, o->restarts = s->restarts;
    o->has_live_fraction = 1, o->live_fraction = s->live_fraction;
    o->has_attached = 1, o->attached = s->attached != 0;
    o->has_idle_ms = 1, o->idle_ms = s->idle_ms;
    memcpy(r->warm, s->warm_key, sizeof(r->warm));
    r->warm[ENG_KEY_MAX] = 0;
    o->has_warm_generations = 1, o->warm_generations = s->warm_generations;
    o->has_guard_checks = 1, o->guard_checks = s->guard_checks;
    o->has_guard_restored = 1, o->guard_restored = s->guard_restored;
    o->key = r->key, o->device = r->dev, o->warm_key = r->warm;
    if (n_live) {
        memcpy(r->live, s->layer_live, n_live * sizeof(double));
        o->n_layer_live_fraction = n_live, o->layer_live_fraction = r->live;
    }
}

static int do_session_list(const disp *d, conn *c, uint64_t id)
{
    row_acc a = {0};
    eng_session_list(d->eng, c->uid, list_one, &a);
    return send_rows(c, id, &a, LITEATTN__REPLY__BODY_SESSION_LIST);
}

static int do_mask_read(const disp *d, conn *c, uint64_t id, const Liteattn__MaskRead *m)
{
    size_t want = m->has_length ? m->length : DISP_MASK_REPLY_MAX;
    if (want > DISP_MASK_REPLY_MAX)
        want = DISP_MASK_REPLY_MAX;
    uint8_t *buf = malloc(want ? want : 1);
    if (!buf)
        return reply_err(c, id, LA_ENOMEM, "out of memory");
    size_t got = 0;
    uint64_t total = 0;
    eng_error err = {{0}};
    int rc =
        eng_mask_read(d->eng, c->uid, m->session_id, m->layer, m->has_kv_shard ? m->kv_shard : 0,
                      m->has_offset ? m->offset : 0, buf, want, &got, &total, &err);
    if (rc < 0) {
        free(buf);
        return reply_eng_err(c, id, rc, &err);
    }
    Liteattn__MaskReply mr = LITEATTN__MASK_REPLY__INIT;
    mr.data.data = buf;
    mr.data.len = got > want ? want : got;
    mr.total_bytes = total;
    send_reply(c, id, LITEATTN__REPLY__BODY_MASK, &mr);
    free(buf);
    return CONN_REQ_OK;
}

/* ---- buffers ------------------------------------------------------------------------------ */

static int send_buffer(conn *c, uint64_t id, const eng_buffer_info *info, int vmm)
{
    Liteattn__BufferReply br = LITEATTN__BUFFER_REPLY__INIT;
    br.buffer_id = info->id;
    br.size = info->size;
    br.has_access = 1;
    br.access = info->access;
    if (vmm) {
        br.has_vmm_pending = 1;
        br.vmm_pending = info->pending;
        br.has_granularity = info->granularity != 0;
        br.granularity = info->granularity;
    }
    return send_reply(c, id, LITEATTN__REPLY__BODY_BUFFER, &br);
}

/* Kinds SHM and VMM carry exactly one fd: a frame without it is a protocol error (the
 * connection closes: the fds it and later frames carry can no longer be told apart). */
static int take_fd(conn *c, uint64_t id, const char *kind, char *why, size_t whylen)
{
    int fd = frame_take_fd(&c->fr);
    if (fd < 0)
        snprintf(why, whylen,
                 "BufferRegister(%s) of request %llu came without a file descriptor (each "
                 "allocation's fd comes by SCM_RIGHTS with its own frame)",
                 kind, (unsigned long long)id);
    return fd;
}

static int do_buffer_register(const disp *d, conn *c, uint64_t id,
                              const Liteattn__BufferRegister *m, char *why, size_t whylen)
{
    eng_error err = {{0}};
    eng_buffer_info info = {.size = m->size, .access = LA_ACCESS_RW};
    unsigned access = m->has_access ? m->access : LA_ACCESS_RW;
    int rc, fd = -1;
    if (m->kind == LITEATTN__BUFFER_KIND__BUFFER_SHM ||
        m->kind == LITEATTN__BUFFER_KIND__BUFFER_VMM) {
        int shm = m->kind == LITEATTN__BUFFER_KIND__BUFFER_SHM;
        fd = take_fd(c, id, shm ? "SHM" : "VMM", why, whylen);
        if (fd < 0 && shm)
            return CONN_REQ_FAIL;
        if (fd < 0) { /* the client is told why before the connection closes */
            conn_send_error(c, id, LA_EPROTO, why);
            return CONN_REQ_CLOSE;
        }
    }
    if (access < 1 || access > LA_ACCESS_RW) {
        if (fd >= 0)
            close(fd);
        return reply_err(c, id, LA_EINVAL,
                         "access %u is not a set of LA_ACCESS_READ (1) and LA_ACCESS_WRITE (2)",
                         access);
    }
    if (m->kind == LITEATTN__BUFFER_KIND__BUFFER_SHM) {
        rc = eng_buffer_add_shm(d->eng, c->uid, c->id, fd, m->size, &info.id, &err);
    } else if (m->kind == LITEATTN__BUFFER_KIND__BUFFER_CUDA_IPC) {
        rc = eng_buffer_add_cuda_ipc(d->eng, c->uid, c->id,
                                     m->has_ipc_handle ? m->ipc_handle.data : NULL,
                                     m->has_ipc_handle ? m->ipc_handle.len : 0, m->device_uuid,
                                     m->size, &info.id, &info.size, &err);
    } else if (m->kind == LITEATTN__BUFFER_KIND__BUFFER_VMM) {
        if (m->has_vmm_append) {
            if (m->n_vmm_alloc_sizes || m->has_vmm_offset || m->has_access ||
                (m->device_uuid && m->device_uuid[0])) {
                close(fd);
                return reply_err(c, id, LA_EINVAL,
                                 "a VMM append (vmm_append %llu) carries only the allocation's "
                                 "size and fd; the first frame lists sizes, offset, access and "
                                 "device",
                                 (unsigned long long)m->vmm_append);
            }
            rc = eng_buffer_vmm_append(d->eng, c->id, m->vmm_append, fd, m->size, &info, &err);
        } else {
            eng_vmm_spec sp = {.device_uuid = m->device_uuid,
                               .alloc_sizes = m->vmm_alloc_sizes,
                               .n_allocs = m->n_vmm_alloc_sizes,
                               .offset = m->has_vmm_offset ? m->vmm_offset : 0,
                               .size = m->size,
                               .access = access};
            rc = eng_buffer_add_vmm(d->eng, c->uid, c->id, fd, &sp, &info, &err);
        }
        if (rc < 0)
            return reply_eng_err(c, id, rc, &err);
        return send_buffer(c, id, &info, 1);
    } else {
        return reply_err(c, id, LA_EINVAL, "buffer kind %d is not a BufferKind", (int)m->kind);
    }
    if (rc < 0)
        return reply_eng_err(c, id, rc, &err);
    if (access != LA_ACCESS_RW && (rc = eng_buffer_set_access(d->eng, c->id, info.id, access,
                                                              &err)) < 0)
        return reply_eng_err(c, id, rc, &err);
    info.access = access;
    return send_buffer(c, id, &info, 0);
}

/* The connection's doorbell (fast path): its fd came with this frame. */
static int do_doorbell_register(const disp *d, conn *c, uint64_t id,
                                const Liteattn__DoorbellRegister *m, char *why, size_t whylen)
{
    int fd = frame_take_fd(&c->fr);
    if (fd < 0) {
        snprintf(why, whylen, "DoorbellRegister of request %llu came without a file descriptor",
                 (unsigned long long)id);
        return CONN_REQ_FAIL;
    }
    eng_error err = {{0}};
    int rc = eng_doorbell_add(d->eng, c->uid, c->id, fd, m->slots, &err);
    if (rc < 0)
        return reply_eng_err(c, id, rc, &err);
    Liteattn__DoorbellReply dr = LITEATTN__DOORBELL_REPLY__INIT;
    dr.slots = m->slots;
    dr.has_timeout_ms = 1;
    dr.timeout_ms = d->cfg->limits.doorbell_timeout_s * 1000u;
    return send_reply(c, id, LITEATTN__REPLY__BODY_DOORBELL, &dr);
}

static int do_buffer_unregister(const disp *d, conn *c, uint64_t id,
                                const Liteattn__BufferUnregister *m)
{
    eng_error err = {{0}};
    int rc = eng_buffer_remove(d->eng, c->id, m->buffer_id, &err);
    if (rc < 0)
        return reply_eng_err(c, id, rc, &err);
    return send_ack(c, id);
}

/* ---- attention ---------------------------------------------------------------------------- */

/* Translates a TensorRef as it is (the engine checks ranks, shapes, dtypes and strides
 * against the session); refused here is only what an eng_tensor cannot hold. */
static int tensor_from(const Liteattn__TensorRef *t, const char *role, eng_tensor *out, char *msg,
                       size_t msglen)
{
    memset(out, 0, sizeof(*out));
    if (!t) {
        snprintf(msg, msglen, "tensor %s is missing", role);
        return LA_EINVAL;
    }
    size_t cap = sizeof(out->shape) / sizeof(out->shape[0]);
    if (t->n_shape > cap || (t->n_strides != 0 && t->n_strides != t->n_shape)) {
        snprintf(msg, msglen,
                 "tensor %s: %zu sizes and %zu strides (at most %zu sizes, and "
                 "as many strides or none)",
                 role, t->n_shape, t->n_strides, cap);
        return LA_EINVAL;
    }
    for (size_t i = 0; i < t->n_shape; i++)
        out->shape[i] = t->shape[i];
    for (size_t i = 0; i < t->n_strides; i++)
        out->strides[i] = t->strides[i];
    out->buffer_id = t->buffer_id;
    out->offset = t->has_offset ? t->offset : 0;
    out->dtype = t->has_dtype ? (la_dtype)t->dtype : LA_DTYPE_F32;
    out->ndim = (int)t->n_shape;
    out->has_strides = t->n_strides != 0;
    return 0;
}

/* Copies the ranges the request can hold and keeps the count as sent: the engine refuses more
 * than LA_MAX_RANGES (the one check of that limit). */
static void ranges_from(Liteattn__Range *const *in, size_t n, la_range *out, int *ret_n)
{
    for (size_t i = 0; i < n && i < LA_MAX_RANGES; i++) {
        out[i].start = in[i]->start;
        out[i].end = in[i]->end;
    }
    *ret_n = n > INT32_MAX ? INT32_MAX : (int)n;
}

static void on_attn_done(void *user, int status, const eng_attn_result *res, const char *message)
{
    disp_job *j = user;
    conn *c = j->c;
    if (!j->cj.answered && !c->closing) {
        if (status < 0)
            conn_send_error(c, j->cj.req_id, status, message);
        else {
            Liteattn__AttentionReply ar = LITEATTN__ATTENTION_REPLY__INIT;
            if (res) {
                ar.has_tiles_total = 1, ar.tiles_total = res->tiles_total;
                ar.has_tiles_computed = 1, ar.tiles_computed = res->tiles_computed;
                ar.has_compute_ns = 1, ar.compute_ns = res->compute_ns;
                ar.has_queue_ns = 1, ar.queue_ns = res->queue_ns;
                if (res->has_done_event) {
                    ar.has_done_event = 1;
                    ar.done_event.data = (uint8_t *)res->done_event;
                    ar.done_event.len = sizeof(res->done_event);
                }
            }
            if (j->row_max)
                ar.has_row_max = 1, ar.row_max = 1;
            send_reply(c, j->cj.req_id, LITEATTN__REPLY__BODY_ATTENTION, &ar);
        }
    }
    conn_job_end(c, &j->cj);
    free(j);
}

/* A call refused before the engine saw it: a fast-path call's slot is over too, so that the
 * client's stream does not wait for it. */
static void refuse_doorbell(const disp *d, conn *c, const Liteattn__Attention *m, int code)
{
    if (m->has_doorbell_slot && m->has_doorbell_value)
        eng_doorbell_refuse(d->eng, c->id, m->doorbell_slot, m->doorbell_value, code);
}

static int do_attention(const disp *d, conn *c, uint64_t id, const Liteattn__Attention *m)
{
    if (c->inflight >= c->lim.max_inflight) {
        refuse_doorbell(d, c, m, LA_EBUSY);
        return reply_err(c, id, LA_EBUSY,
                         "%u attention requests already in flight on this "
                         "connection (limit %u)",
                         c->inflight, c->lim.max_inflight);
    }
    eng_attn_req *q = calloc(1, sizeof(*q));
    if (!q) {
        refuse_doorbell(d, c, m, LA_ENOMEM);
        return reply_err(c, id, LA_ENOMEM, "out of memory");
    }
    char msg[ENG_ERR_MAX];
    int rc = 0;
    q->session_id = m->session_id;
    q->layer = m->layer;
    q->step = m->step;
    q->kv_shard = m->has_kv_shard ? m->kv_shard : 0;
    if ((rc = tensor_from(m->q, "q", &q->q, msg, sizeof(msg))) < 0 ||
        (rc = tensor_from(m->k, "k", &q->k, msg, sizeof(msg))) < 0 ||
        (rc = tensor_from(m->v, "v", &q->v, msg, sizeof(msg))) < 0 ||
        (rc = tensor_from(m->o, "o", &q->o, msg, sizeof(msg))) < 0)
        goto bad;
    if (m->lse) {
        if ((rc = tensor_from(m->lse, "lse", &q->lse, msg, sizeof(msg))) < 0)
            goto bad;
        q->has_lse = 1;
    }
    if (m->decisions) {
        if ((rc = tensor_from(m->decisions, "decisions", &q->decisions, msg, sizeof(msg))) < 0)
            goto bad;
        q->has_decisions = 1;
    }
    if (m->row_max) {
        if ((rc = tensor_from(m->row_max, "row_max", &q->row_max, msg, sizeof(msg))) < 0)
            goto bad;
        q->has_row_max = 1;
    }
    q->dry_run = m->has_dry_run && m->dry_run;
    q->scale = m->has_scale ? m->scale : 0.0f;
    q->has_threshold = m->has_threshold;
    q->threshold = m->threshold;
    q->mode = m->has_mode ? (la_mode)m->mode : LA_MODE_SESSION;
    ranges_from(m->must_do, m->n_must_do, q->must_do, &q->n_must_do);
    ranges_from(m->must_skip, m->n_must_skip, q->must_skip, &q->n_must_skip);
    if (m->has_wait_event) {
        if (m->wait_event.len != sizeof(q->wait_event)) {
            rc = LA_EINVAL;
            snprintf(msg, sizeof(msg), "wait event must be %zu bytes (got %zu)",
                     sizeof(q->wait_event), m->wait_event.len);
            goto bad;
        }
        q->has_wait_event = 1;
        memcpy(q->wait_event, m->wait_event.data, sizeof(q->wait_event));
    }
    if (m->has_doorbell_slot != m->has_doorbell_value) {
        rc = LA_EINVAL;
        snprintf(msg, sizeof(msg),
                 "a doorbell call names doorbell_slot and doorbell_value together (one came "
                 "without the other)");
        goto bad;
    }
    q->has_doorbell = m->has_doorbell_slot;
    q->doorbell_slot = m->doorbell_slot;
    q->doorbell_value = m->doorbell_value;

    disp_job *j = calloc(1, sizeof(*j));
    if (!j) {
        rc = LA_ENOMEM;
        snprintf(msg, sizeof(msg), "out of memory");
        goto bad;
    }
    j->c = c;
    j->row_max = q->has_row_max;
    eng_error err = {{0}};
    rc = eng_attn_submit(d->eng, c->uid, c->id, q, on_attn_done, j, &err);
    free(q);
    if (rc < 0) {
        free(j);
        return reply_eng_err(c, id, rc, &err);
    }
    conn_job_begin(c, &j->cj, id);
    return CONN_REQ_OK;
bad:
    free(q);
    refuse_doorbell(d, c, m, rc);
    conn_send_error(c, id, rc, msg);
    return CONN_REQ_OK;
}

/* ---- stats, ping -------------------------------------------------------------------------- */

typedef struct stat_row {
    Liteattn__Stat item;
    char name[64];
} stat_row;

static void stat_one(void *data, const char *name, int64_t value)
{
    stat_row *r = acc_next(data, sizeof(*r), 1024);
    if (!r)
        return;
    liteattn__stat__init(&r->item);
    snprintf(r->name, sizeof(r->name), "%s", name);
    r->item.name = r->name;
    r->item.value = value;
}

static int do_stats(const disp *d, conn *c, uint64_t id)
{
    row_acc a = {0};
    eng_stats(d->eng, stat_one, &a);
    if (d->server_stats)
        d->server_stats(d->server_data, stat_one, &a);
    return send_rows(c, id, &a, LITEATTN__REPLY__BODY_STATS);
}

/* ---- the warm-start store ------------------------------------------------------------------- */

typedef struct warm_row {
    Liteattn__WarmEntry item;
    char key[ENG_KEY_MAX + 1];
} warm_row;

static void warm_one(void *data, const eng_warm_entry *w)
{
    warm_row *r = acc_next(data, sizeof(*r), DISP_LIST_MAX);
    if (!r)
        return;
    Liteattn__WarmEntry *o = &r->item;
    liteattn__warm_entry__init(o);
    snprintf(r->key, sizeof(r->key), "%s", w->key);
    o->key = r->key;
    o->has_uid = 1, o->uid = w->uid;
    o->has_layers = 1, o->layers = w->layers;
    o->has_kv_shards = 1, o->kv_shards = w->kv_shards;
    o->has_batch = 1, o->batch = w->batch;
    o->has_heads = 1, o->heads = w->heads;
    o->has_n_q_tiles = 1, o->n_q_tiles = w->n_q_tiles;
    o->has_n_k_tiles = 1, o->n_k_tiles = w->n_k_tiles;
    o->has_bm = 1, o->bm = w->bm;
    o->has_bn = 1, o->bn = w->bn;
    o->has_generations = 1, o->generations = w->generations;
    o->has_bytes = 1, o->bytes = w->bytes;
    o->has_deposited_ago_ms = 1, o->deposited_ago_ms = w->deposited_ago_ms;
    o->has_seeds = 1, o->seeds = w->seeds;
    o->has_persisted = 1, o->persisted = w->persisted != 0;
}

static int do_warm_list(const disp *d, conn *c, uint64_t id)
{
    row_acc a = {0};
    eng_warm_list(d->eng, c->uid, warm_one, &a);
    return send_rows(c, id, &a, LITEATTN__REPLY__BODY_WARM_LIST);
}

static int do_warm_drop(const disp *d, conn *c, uint64_t id, const Liteattn__WarmDrop *m)
{
    uint64_t n = 0;
    eng_error err = {{0}};
    int rc = eng_warm_drop(d->eng, c->uid, m->key, &n, &err);
    if (rc < 0)
        return reply_eng_err(c, id, rc, &err);
    Liteattn__WarmDropReply wr = LITEATTN__WARM_DROP_REPLY__INIT;
    wr.has_dropped = 1, wr.dropped = n;
    return send_reply(c, id, LITEATTN__REPLY__BODY_WARM_DROP, &wr);
}

static int do_ping(conn *c, uint64_t id, const Liteattn__Ping *m)
{
    Liteattn__Pong p = LITEATTN__PONG__INIT;
    p.has_payload = m->has_payload;
    p.payload = m->payload;
    return send_reply(c, id, LITEATTN__REPLY__BODY_PONG, &p);
}

/* ---- entry -------------------------------------------------------------------------------- */

int disp_request(void *data, conn *c, const Liteattn__Request *req, char *why, size_t whylen)
{
    const disp *d = data;
    uint64_t id = req->id;
    if (!c->hello_done && req->body_case != LITEATTN__REQUEST__BODY_HELLO) {
        conn_send_error(c, id, LA_EPROTO, "the first request must be Hello");
        snprintf(why, whylen, "request %llu (type %d) before Hello", (unsigned long long)id,
                 (int)req->body_case);
        return CONN_REQ_CLOSE;
    }
    switch (req->body_case) {
    case LITEATTN__REQUEST__BODY_HELLO: return do_hello(d, c, id, req->hello, why, whylen);
    case LITEATTN__REQUEST__BODY_SESSION_OPEN: return do_session_open(d, c, id, req->session_open);
    case LITEATTN__REQUEST__BODY_SESSION_ATTACH:
        return do_session_attach(d, c, id, req->session_attach);
    case LITEATTN__REQUEST__BODY_SESSION_RESET:
        return do_session_ref(d, c, id, req->session_reset, SREF_RESET);
    case LITEATTN__REQUEST__BODY_SESSION_CLOSE:
        return do_session_ref(d, c, id, req->session_close, SREF_CLOSE);
    case LITEATTN__REQUEST__BODY_SESSION_INFO: return do_session_info(d, c, id, req->session_info);
    case LITEATTN__REQUEST__BODY_SESSION_LIST: return do_session_list(d, c, id);
    case LITEATTN__REQUEST__BODY_MASK_READ: return do_mask_read(d, c, id, req->mask_read);
    case LITEATTN__REQUEST__BODY_BUFFER_REGISTER:
        return do_buffer_register(d, c, id, req->buffer_register, why, whylen);
    case LITEATTN__REQUEST__BODY_BUFFER_UNREGISTER:
        return do_buffer_unregister(d, c, id, req->buffer_unregister);
    case LITEATTN__REQUEST__BODY_ATTENTION: return do_attention(d, c, id, req->attention);
    case LITEATTN__REQUEST__BODY_STATS: return do_stats(d, c, id);
    case LITEATTN__REQUEST__BODY_PING: return do_ping(c, id, req->ping);
    case LITEATTN__REQUEST__BODY_WARM_LIST: return do_warm_list(d, c, id);
    case LITEATTN__REQUEST__BODY_WARM_DROP: return do_warm_drop(d, c, id, req->warm_drop);
    case LITEATTN__REQUEST__BODY_DOORBELL_REGISTER:
        return do_doorbell_register(d, c, id, req->doorbell_register, why, whylen);
    default:
        /* A request type of a later minor version (unknown oneof member): not an error of
         * the framing, so the connection stays. */
        return reply_err(c, id, LA_ENOTSUP, "unknown request type");
    }
}
