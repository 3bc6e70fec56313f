/* session.c — session configuration, open/attach, facts, masks, reset and close. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct la_session_config {
    int has_geometry;
    uint32_t layers, heads, head_dim, max_seq_q, max_seq_k, batch, kv_shards;
    la_dtype dtype;
    float tau;
    float *schedule;
    size_t n_schedule;
    la_mode mode;
    la_direction dir;
    char device[64];
    char *warm_key; /* NULL: no warm start */
    uint32_t warm_step, warm_generations, warm_margin, warm_dense_steps; /* LA_WARM_DEFAULT */
    uint32_t guard_every, guard_sample;
    float guard_budget;
};

LA_API int la_session_config_new(la_session_config **ret_config)
{
    if (!ret_config)
        return cl_fail(LA_EINVAL, "la_session_config_new: ret_config is NULL");
    la_session_config *cfg = calloc(1, sizeof(*cfg));
    if (!cfg)
        return cl_fail(LA_ENOMEM, NULL);
    cfg->tau = -3.0f;
    cfg->mode = LA_MODE_SKIP;
    cfg->dir = LA_DIR_ALTERNATE;
    strcpy(cfg->device, "auto");
    *ret_config = cfg;
    return 0;
}

LA_API void la_session_config_free(la_session_config *cfg)
{
    if (!cfg)
        return;
    free(cfg->schedule);
    free(cfg->warm_key);
    free(cfg);
}

LA_API int la_session_config_set_geometry(la_session_config *cfg, uint32_t layers, uint32_t heads,
                                          uint32_t head_dim, la_dtype dtype, uint32_t max_seq_q,
                                          uint32_t max_seq_k, uint32_t batch, uint32_t kv_shards)
{
    if (!cfg)
        return cl_fail(LA_EINVAL, "la_session_config_set_geometry: cfg is NULL");
    if (!layers || !heads || !head_dim || !max_seq_q)
        return cl_fail(LA_EINVAL, "layers, heads, head_dim and max_seq_q must be positive");
    if (dtype != LA_DTYPE_F32 && dtype != LA_DTYPE_F16 && dtype != LA_DTYPE_BF16)
        return cl_fail(LA_EINVAL, "dtype %d is not f32, f16 or bf16", (int)dtype);
    cfg->layers = layers;
    cfg->heads = heads;
    cfg->head_dim = head_dim;
    cfg->dtype = dtype;
    cfg->max_seq_q = max_seq_q;
    cfg->max_seq_k = max_seq_k ? max_seq_k : max_seq_q;
    cfg->batch = batch ? batch : 1;
    cfg->kv_shards = kv_shards ? kv_shards : 1;
    cfg->has_geometry = 1;
    return 0;
}

LA_API int la_session_config_set_threshold(la_session_config *cfg, float tau)
{
    if (!cfg || isnan(tau))
        return cl_fail(LA_EINVAL, "la_session_config_set_threshold: NULL config or NaN");
    cfg->tau = tau;
    return 0;
}

LA_API int la_session_config_set_schedule(la_session_config *cfg, const float *tau, size_t n)
{
    if (!cfg || (n && !tau))
        return cl_fail(LA_EINVAL, "la_session_config_set_schedule: NULL argument");
    /* Length and values are the daemon's to judge (one message, from one place). */
    float *s = NULL;
    if (n) {
        s = malloc(n * sizeof(float));
        if (!s)
            return cl_fail(LA_ENOMEM, NULL);
        memcpy(s, tau, n * sizeof(float));
    }
    free(cfg->schedule);
    cfg->schedule = s;
    cfg->n_schedule = n;
    return 0;
}

LA_API int la_session_config_set_mode(la_session_config *cfg, la_mode mode)
{
    if (!cfg || (mode != LA_MODE_DENSE && mode != LA_MODE_OBSERVE && mode != LA_MODE_SKIP))
        return cl_fail(LA_EINVAL, "session mode must be dense, observe or skip");
    cfg->mode = mode;
    return 0;
}

LA_API int la_session_config_set_direction(la_session_config *cfg, la_direction dir)
{
    if (!cfg || (dir != LA_DIR_ALTERNATE && dir != LA_DIR_ASCENDING && dir != LA_DIR_DESCENDING))
        return cl_fail(LA_EINVAL, "direction must be alternate, ascending or descending");
    cfg->dir = dir;
    return 0;
}

LA_API int la_session_config_set_device(la_session_config *cfg, const char *device)
{
    if (!cfg || !device || !*device || strlen(device) >= sizeof(cfg->device))
        return cl_fail(LA_EINVAL, "device must be \"auto\", \"cpu\", \"cuda\" or a GPU UUID");
    strcpy(cfg->device, device);
    return 0;
}

LA_API int la_session_config_set_warm_start(la_session_config *cfg, const char *key,
                                            uint32_t step, uint32_t generations, uint32_t margin,
                                            uint32_t dense_steps)
{
    if (!cfg)
        return cl_fail(LA_EINVAL, "la_session_config_set_warm_start: cfg is NULL");
    char *k = NULL;
    if (key) {
        /* Its length and bytes are the daemon's to judge (one message, from one place). */
        if (!(k = strdup(key)))
            return cl_fail(LA_ENOMEM, NULL);
    }
    free(cfg->warm_key);
    cfg->warm_key = k;
    cfg->warm_step = step;
    cfg->warm_generations = generations;
    cfg->warm_margin = margin;
    cfg->warm_dense_steps = dense_steps;
    return 0;
}

LA_API int la_session_config_set_guard(la_session_config *cfg, uint32_t every, uint32_t sample,
                                       float budget)
{
    if (!cfg)
        return cl_fail(LA_EINVAL, "la_session_config_set_guard: cfg is NULL");
    if (isnan(budget))
        return cl_fail(LA_EINVAL, "guard budget is NaN");
    cfg->guard_every = every;
    cfg->guard_sample = sample;
    cfg->guard_budget = budget;
    return 0;
}

/* ---- sessions ------------------------------------------------------------------------------ */

/* The session of a SessionReply, opened or attached with key (and warm_key, NULL for none),
 * linked to c. */
static int session_from_reply(la_client *c, const Liteattn__SessionReply *r, const char *key,
                              const char *warm_key, la_session **ret_session)
{
    la_session *s = calloc(1, sizeof(*s));
    if (!s)
        return cl_fail(LA_ENOMEM, NULL);
    s->client = c;
    snprintf(s->key, sizeof(s->key), "%s", key);
    snprintf(s->warm_key, sizeof(s->warm_key), "%s", warm_key ? warm_key : "");
    s->id = r->session_id;
    s->bm = r->bm;
    s->bn = r->bn;
    s->mask_bytes = r->mask_bytes;
    s->layers = r->layers;
    s->heads = r->heads;
    s->head_dim = r->head_dim;
    s->dtype = r->has_dtype ? (int)r->dtype : -1;
    s->max_seq_q = r->max_seq_q;
    s->max_seq_k = r->has_max_seq_k && r->max_seq_k ? r->max_seq_k : r->max_seq_q;
    s->batch = r->has_batch && r->batch ? r->batch : 1;
    s->kv_shards = r->has_kv_shards && r->kv_shards ? r->kv_shards : 1;
    s->n_q_tiles =
        r->has_n_q_tiles ? r->n_q_tiles : (s->bm ? (s->max_seq_q + s->bm - 1) / s->bm : 0);
    s->n_k_words = r->has_n_k_words ? r->n_k_words
                                    : (s->bn ? ((s->max_seq_k + s->bn - 1) / s->bn + 31) / 32 : 0);
    s->layer_mask_bytes = r->has_layer_mask_bytes
                              ? r->layer_mask_bytes
                              : (uint64_t)s->batch * s->heads * s->n_q_tiles * s->n_k_words * 4;
    s->warm_generations = r->has_warm_generations ? r->warm_generations : 0;
    snprintf(s->warm_status, sizeof(s->warm_status), "%s", r->warm_status ? r->warm_status : "");
    snprintf(s->device, sizeof(s->device), "%s", r->device ? r->device : "");
    list_append(&c->sessions, &s->link);
    *ret_session = s;
    return 0;
}

void cl_sessions_free_all(la_client *c) { list_drain(&c->sessions, la_session, link, free); }

/* Sends an open or attach request; the reply becomes *ret_session. */
static int session_call(la_client *c, Liteattn__Request *req, const char *key,
                        const char *warm_key, la_session **ret_session)
{
    Liteattn__Reply *r;
    pthread_mutex_lock(&c->lock);
    int rc = cl_call(c, req, -1, LITEATTN__REPLY__BODY_SESSION, &r);
    if (rc == 0) {
        rc = session_from_reply(c, r->session, key, warm_key, ret_session);
        liteattn__reply__free_unpacked(r, NULL);
    }
    pthread_mutex_unlock(&c->lock);
    return rc;
}

LA_API int la_session_open(la_client *c, const char *key, const la_session_config *cfg,
                           la_session **ret_session)
{
    if (!c || !key || !cfg || !ret_session)
        return cl_fail(LA_EINVAL, "la_session_open: NULL argument");
    if (!cfg->has_geometry)
        return cl_fail(LA_EINVAL, "session config has no geometry "
                                  "(la_session_config_set_geometry)");
    Liteattn__SessionOpen so = LITEATTN__SESSION_OPEN__INIT;
    so.key = (char *)key;
    so.layers = cfg->layers;
    so.heads = cfg->heads;
    so.head_dim = cfg->head_dim;
    so.dtype = (Liteattn__DType)cfg->dtype;
    so.max_seq_q = cfg->max_seq_q;
    so.has_max_seq_k = 1;
    so.max_seq_k = cfg->max_seq_k;
    so.has_batch = 1;
    so.batch = cfg->batch;
    so.has_kv_shards = 1;
    so.kv_shards = cfg->kv_shards;
    so.has_threshold = 1;
    so.threshold = cfg->tau;
    so.n_schedule = cfg->n_schedule;
    so.schedule = cfg->schedule;
    so.has_mode = 1;
    so.mode = (Liteattn__Mode)cfg->mode;
    so.has_direction = 1;
    so.direction = (Liteattn__Direction)cfg->dir;
    so.device = (char *)cfg->device;
    Liteattn__WarmStart ws = LITEATTN__WARM_START__INIT;
    if (cfg->warm_key) {
        so.warm_key = cfg->warm_key;
        ws.has_step = cfg->warm_step != LA_WARM_DEFAULT, ws.step = cfg->warm_step;
        ws.has_generations = cfg->warm_generations != LA_WARM_DEFAULT;
        ws.generations = cfg->warm_generations;
        ws.has_margin = cfg->warm_margin != LA_WARM_DEFAULT, ws.margin = cfg->warm_margin;
        ws.has_dense_steps = cfg->warm_dense_steps != LA_WARM_DEFAULT;
        ws.dense_steps = cfg->warm_dense_steps;
        so.warm = &ws;
    }
    Liteattn__Guard gd = LITEATTN__GUARD__INIT;
    if (cfg->guard_every) {
        gd.has_every = 1, gd.every = cfg->guard_every;
        gd.has_sample = cfg->guard_sample != 0, gd.sample = cfg->guard_sample;
        gd.has_budget = cfg->guard_budget != 0.0f, gd.budget = cfg->guard_budget;
        so.guard = &gd;
    }
    Liteattn__Request req = cl_req_body(LITEATTN__REQUEST__BODY_SESSION_OPEN, &so);
    return session_call(c, &req, key, cfg->warm_key, ret_session);
}

LA_API int la_session_attach(la_client *c, const char *key, la_session **ret_session)
{
    if (!c || !key || !ret_session)
        return cl_fail(LA_EINVAL, "la_session_attach: NULL argument");
    Liteattn__SessionAttach sa = LITEATTN__SESSION_ATTACH__INIT;
    sa.key = (char *)key;
    Liteattn__Request req = cl_req_body(LITEATTN__REQUEST__BODY_SESSION_ATTACH, &sa);
    return session_call(c, &req, key, NULL, ret_session);
}

LA_API int la_session_get(const la_session *s, const char *name, int64_t *ret_value)
{
    if (!s || !name)
        return cl_fail(LA_EINVAL, "la_session_get: NULL argument");
    static const char *const names[] = {
        "id",       "layers",    "heads", "head_dim", "dtype",      "max_seq_q",        "max_seq_k",
        "batch",    "kv_shards", "bm",    "bn",       "mask_bytes", "layer_mask_bytes", "n_q_tiles",
        "n_k_words", "warm_generations"};
    /* The facts in the order of names (a table: not reflowed). */
    /* clang-format off */
    const int64_t values[] = {
        (int64_t)s->id, s->layers, s->heads, s->head_dim, s->dtype, s->max_seq_q, s->max_seq_k,
        s->batch, s->kv_shards, s->bm, s->bn, (int64_t)s->mask_bytes,
        (int64_t)s->layer_mask_bytes, s->n_q_tiles, s->n_k_words, s->warm_generations};
    /* clang-format on */
    _Static_assert(sizeof(names) / sizeof(names[0]) == sizeof(values) / sizeof(values[0]),
                   "one value per fact");
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (!strcmp(name, names[i])) {
            if (ret_value)
                *ret_value = values[i];
            return 0;
        }
    return cl_fail(LA_ENOENT, "no session fact \"%s\"", name);
}

LA_API const char *la_session_text(const la_session *s, const char *name)
{
    if (!s || !name) {
        cl_fail(LA_EINVAL, "la_session_text: NULL argument");
        return NULL;
    }
    if (!strcmp(name, "key"))
        return s->key;
    if (!strcmp(name, "warm_key"))
        return s->warm_key;
    if (!strcmp(name, "warm_status"))
        return s->warm_status;
    cl_fail(LA_ENOENT, "no session text \"%s\" (key, warm_key, warm_status)", name);
    return NULL;
}

static int session_ref_call(la_session *s, int body, int want, Liteattn__Reply **ret_reply)
{
    Liteattn__SessionRef ref = LITEATTN__SESSION_REF__INIT;
    ref.session_id = s->id;
    Liteattn__Request req = cl_req_body((Liteattn__Request__BodyCase)body, &ref);
    return cl_call(s->client, &req, -1, want, ret_reply);
}

/* The session's SessionInfo reply, under the client's lock. */
static int session_info_call(la_session *s, Liteattn__Reply **ret_reply)
{
    pthread_mutex_lock(&s->client->lock);
    cl_fast_drain(s);
    int rc = session_ref_call(s, LITEATTN__REQUEST__BODY_SESSION_INFO,
                              LITEATTN__REPLY__BODY_SESSION_INFO, ret_reply);
    pthread_mutex_unlock(&s->client->lock);
    return rc;
}

LA_API int la_session_info(la_session *s, double *ret_live, size_t n, uint64_t *ret_calls)
{
    if (!s)
        return cl_fail(LA_EINVAL, "la_session_info: no session");
    Liteattn__Reply *r;
    int rc = session_info_call(s, &r);
    if (rc < 0)
        return rc;
    if (ret_live)
        for (size_t i = 0; i < n && i < r->session_info->n_live_fraction; i++)
            ret_live[i] = r->session_info->live_fraction[i];
    if (ret_calls)
        *ret_calls = r->session_info->calls;
    liteattn__reply__free_unpacked(r, NULL);
    return 0;
}

LA_API int la_session_stat(la_session *s, const char *name, int64_t *ret_value)
{
    if (!s || !name)
        return cl_fail(LA_EINVAL, "la_session_stat: NULL argument");
    static const char *const names[] = {
        "calls",        "tiles_total", "tiles_computed", "tiles_skipped", "restarts",
        "warm_generations", "warm_deposits", "guard_checks", "guard_rows", "guard_restored",
        "guard_tiles"};
    int which = cl_name_index(names, sizeof(names) / sizeof(names[0]), name);
    if (which < 0)
        return cl_fail(LA_ENOENT,
                       "no session statistic \"%s\" (calls, tiles_total, tiles_computed, "
                       "tiles_skipped, restarts, warm_generations, warm_deposits, "
                       "guard_checks, guard_rows, guard_restored, guard_tiles)",
                       name);
    Liteattn__Reply *r;
    int rc = session_info_call(s, &r);
    if (rc < 0)
        return rc;
    const Liteattn__SessionInfoReply *ir = r->session_info;
    /* In the order of names. */
    const uint64_t values[] = {ir->calls,
                               ir->tiles_total,
                               ir->tiles_computed,
                               ir->tiles_total - ir->tiles_computed,
                               ir->restarts,
                               ir->warm_generations,
                               ir->warm_deposits,
                               ir->guard_checks,
                               ir->guard_rows,
                               ir->guard_restored,
                               ir->guard_tiles};
    _Static_assert(sizeof(values) / sizeof(values[0]) == sizeof(names) / sizeof(names[0]),
                   "one value per statistic");
    uint64_t v = values[which];
    liteattn__reply__free_unpacked(r, NULL);
    if (ret_value)
        *ret_value = (int64_t)v;
    return 0;
}

LA_API int la_session_read_mask(la_session *s, uint32_t layer, uint32_t kv_shard, void *dst,
                                size_t len)
{
    if (!s || !dst)
        return cl_fail(LA_EINVAL, "la_session_read_mask: NULL argument");
    if (len < s->layer_mask_bytes)
        return cl_fail(LA_EINVAL, "mask buffer of %zu bytes, the layer mask has %llu", len,
                       (unsigned long long)s->layer_mask_bytes);
    la_client *c = s->client;
    /* Chunks well under the frame limit (the reply carries the bytes plus a few fields). */
    uint32_t chunk = c->max_frame > 8192 ? c->max_frame - 4096 : 4096;
    uint64_t off = 0, total = s->layer_mask_bytes;
    uint8_t *out = dst;
    int rc = 0;
    pthread_mutex_lock(&c->lock);
    cl_fast_drain(s);
    while (off < total) {
        Liteattn__MaskRead mr = LITEATTN__MASK_READ__INIT;
        mr.session_id = s->id;
        mr.layer = layer;
        mr.has_kv_shard = 1;
        mr.kv_shard = kv_shard;
        mr.has_offset = 1;
        mr.offset = off;
        mr.has_length = 1;
        mr.length = (uint32_t)(total - off < chunk ? total - off : chunk);
        Liteattn__Request req = cl_req_body(LITEATTN__REQUEST__BODY_MASK_READ, &mr);
        Liteattn__Reply *r;
        rc = cl_call(c, &req, -1, LITEATTN__REPLY__BODY_MASK, &r);
        if (rc < 0)
            break;
        size_t got = r->mask->data.len;
        if (r->mask->total_bytes != total || got == 0 || got > total - off) {
            rc = cl_fail(LA_EPROTO,
                         "mask reply of %zu bytes at offset %llu (layer mask %llu, "
                         "daemon says %llu)",
                         got, (unsigned long long)off, (unsigned long long)total,
                         (unsigned long long)r->mask->total_bytes);
            liteattn__reply__free_unpacked(r, NULL);
            break;
        }
        memcpy(out + off, r->mask->data.data, got);
        off += got;
        liteattn__reply__free_unpacked(r, NULL);
    }
    pthread_mutex_unlock(&c->lock);
    return rc;
}

/* Sends reset or close for s and waits for the Ack; with close, s is freed after it, under the
 * same lock. */
static int session_ack(la_session *s, int body)
{
    la_client *c = s->client;
    Liteattn__Reply *r;
    pthread_mutex_lock(&c->lock);
    if (body == LITEATTN__REQUEST__BODY_SESSION_RESET)
        cl_fast_drain(s);
    int rc = session_ref_call(s, body, LITEATTN__REPLY__BODY_ACK, &r);
    if (rc == 0)
        liteattn__reply__free_unpacked(r, NULL);
    if (body == LITEATTN__REQUEST__BODY_SESSION_CLOSE) {
        cl_fast_session_gone(c, s);
        list_remove(&s->link);
        free(s);
    }
    pthread_mutex_unlock(&c->lock);
    return rc;
}

LA_API int la_session_reset(la_session *s)
{
    if (!s)
        return cl_fail(LA_EINVAL, "la_session_reset: no session");
    return session_ack(s, LITEATTN__REQUEST__BODY_SESSION_RESET);
}

LA_API int la_session_close(la_session *s)
{
    return s ? session_ack(s, LITEATTN__REQUEST__BODY_SESSION_CLOSE) : 0;
}

LA_API void la_session_detach(la_session *s)
{
    if (!s)
        return;
    la_client *c = s->client;
    pthread_mutex_lock(&c->lock);
    cl_fast_session_gone(c, s);
    list_remove(&s->link);
    free(s);
    pthread_mutex_unlock(&c->lock);
}
