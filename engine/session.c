/*
 * session.c — the session store: generation sessions keyed by (uid, key), their skip masks
 * (allocated through the session's backend), per-user limits, the global mask-memory cap with
 * eviction of detached sessions (make_room), idle TTL and the grace period of detached
 * sessions. A session is attached while any connection that opened or attached it is open.
 *
 * The engine keeps linked sessions in one list, least recently used first (a session moves to
 * the tail when it is opened, attached, reset or called). A session leaves the list when it is
 * closed, evicted or expired; jobs in flight keep it (and its masks) alive until they finish.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_priv.h"
#include "escape.h"

void sess_name(const sess *s, char *out, size_t len)
{
    snprintf(out, len, "session %llu (key '%s')", (unsigned long long)s->id, s->key_esc);
}

eng_user *sess_user(eng *e, uint32_t uid, int create)
{
    return uid_get(&e->users, uid, sizeof(eng_user), create);
}

sess *sess_find(eng *e, uint64_t id)
{
    sess *s;
    list_find_entry(s, &e->sessions, sess, link, s->id == id);
    return s;
}

sess *sess_get(eng *e, uint32_t uid, uint64_t id, int allow_root, eng_error *err)
{
    sess *s = sess_find(e, id);
    if (!s || (s->uid != uid && !(allow_root && uid == 0))) {
        eng_errf(err, "session %llu: no such session", (unsigned long long)id);
        return NULL;
    }
    return s;
}

void sess_touch(eng *e, sess *s)
{
    s->last_used_ms = eng_now_ms();
    if (s->linked)
        list_move_tail(&e->sessions, &s->link);
}

/* Every region all ones again (lazily: the next call of a region sets it). O(regions). */
static void mset_clear(eng_mset *m)
{
    for (uint32_t i = 0; i < m->n_regions; i++) {
        atomic_store(&m->ready[i], 0);
        m->live[i] = m->region_bits;
    }
}

static int mset_new(eng *e, sess *s, eng_mset **ret, eng_error *err)
{
    eng_mset *m = calloc(1, sizeof *m);
    if (!m) {
        eng_errf(err, "out of memory");
        return LA_ENOMEM;
    }
    /* The seed goes into the host view through the backend: the cuda view is pinned later by
     * its service thread (m->host NULL here), so writing it from here faulted the daemon. */
    int rc = s->be->ops->mask_alloc(s->be, s->dev, s->alloc_bytes, s->seed, s->seed_off,
                                    s->seed ? s->mask_bytes : 0, &m->mask);
    if (rc < 0) {
        free(m);
        eng_errf(err, "session '%s': cannot allocate %llu bytes of masks on %s: %s", s->key_esc,
                 (unsigned long long)s->alloc_bytes, s->device, codes_strerror(rc));
        return rc;
    }
    m->be = s->be;
    m->bytes = s->alloc_bytes;
    m->refs = 1;
    m->n_regions = s->layers * s->kv_shards;
    m->region_bits = (uint64_t)s->batch * s->heads * s->n_q_tiles * s->n_k_tiles;
    m->ready = calloc(m->n_regions, sizeof *m->ready);
    m->live = malloc(m->n_regions * sizeof *m->live);
    if (!m->ready || !m->live) {
        s->be->ops->mask_free(s->be, m->mask);
        free(m->ready);
        free(m->live);
        free(m);
        eng_errf(err, "out of memory");
        return LA_ENOMEM;
    }
    mset_clear(m);
    e->mask_bytes_live += m->bytes;
    *ret = m;
    return 0;
}

void mset_unref(eng *e, eng_mset *m)
{
    if (!m || --m->refs > 0)
        return;
    m->be->ops->mask_free(m->be, m->mask);
    e->mask_bytes_live -= m->bytes;
    free(m->ready);
    free(m->live);
    free(m);
}

/* The session's own arrays, and s. */
static void sess_free(sess *s)
{
    free(s->schedule);
    free(s->conns);
    free(s->last_step);
    free(s->restart_due);
    free(s->region_fresh);
    free(s->seed_due);
    free(s->captured);
    free(s->seed);
    free(s);
}

void sess_unref(eng *e, sess *s)
{
    if (!s || --s->refs > 0)
        return;
    sess_warm_close(e, s);
    mset_unref(e, s->masks);
    sess_free(s);
}

/* conn_id holds a reference on s (once, however often it attaches). */
static int conn_add(sess *s, uint64_t conn_id)
{
    for (uint32_t i = 0; i < s->n_conns; i++)
        if (s->conns[i] == conn_id)
            return 0;
    if (s->n_conns == s->cap_conns) {
        uint32_t cap = s->cap_conns ? 2 * s->cap_conns : 2;
        uint64_t *c = realloc(s->conns, cap * sizeof *c);
        if (!c)
            return LA_ENOMEM;
        s->conns = c;
        s->cap_conns = cap;
    }
    s->conns[s->n_conns++] = conn_id;
    s->attached = 1;
    s->detached_ms = 0;
    return 0;
}

void sess_unlink(eng *e, sess *s)
{
    if (!s->linked)
        return;
    list_remove(&s->link);
    s->linked = 0;
    eng_user *u = sess_user(e, s->uid, 0);
    if (u) {
        u->sessions--;
        u->mask_bytes -= s->alloc_bytes;
    }
    sess_unref(e, s);
}

/* Makes room under the mask memory cap for need more bytes of uid by evicting detached
 * sessions with no call in flight, oldest detachment first (least recently used among equals).
 * A session of another user is taken only while that user holds more than its fair share of
 * the cap (the cap divided by the users holding sessions, the requester included). The whole
 * plan is made first: when it cannot make enough room, nothing is evicted. */
static int make_room(eng *e, uint32_t uid, uint64_t need)
{
    uint64_t cap = e->cfg.limits.mask_memory_cap;
    if (!cap)
        return 0;
    if (need > cap)
        return LA_ELIMIT;
    if (e->mask_bytes_live <= cap - need)
        return 0;
    uint64_t excess = e->mask_bytes_live - (cap - need), n_users = 0;
    int requester_counted = 0;
    eng_user *u;
    list_for_each_entry (u, &e->users, eng_user, node.link) {
        u->plan_bytes = u->mask_bytes;
        if (u->sessions) {
            n_users++;
            requester_counted |= u->node.uid == uid;
        }
    }
    uint64_t share = cap / (n_users + !requester_counted);
    size_t n = 0;
    sess *s;
    list_for_each_entry (s, &e->sessions, sess, link)
        n += !s->attached && s->inflight == 0;
    if (n == 0)
        return LA_ELIMIT;
    sess **cand = malloc(n * sizeof *cand);
    if (!cand)
        return LA_ENOMEM;
    n = 0;
    list_for_each_entry (s, &e->sessions, sess, link) /* least recently used first */
        if (!s->attached && s->inflight == 0)
            cand[n++] = s;
    /* Oldest detachment first; a stable insertion sort keeps LRU order among equals. */
    for (size_t i = 1; i < n; i++) {
        sess *x = cand[i];
        size_t k = i;
        for (; k > 0 && cand[k - 1]->detached_ms > x->detached_ms; k--)
            cand[k] = cand[k - 1];
        cand[k] = x;
    }
    uint64_t freed = 0;
    size_t chosen = 0;
    for (size_t i = 0; i < n && freed < excess; i++) {
        s = cand[i];
        u = sess_user(e, s->uid, 0);
        if (!u || (s->uid != uid && u->plan_bytes <= share))
            continue;
        u->plan_bytes -= s->alloc_bytes;
        freed += s->alloc_bytes;
        cand[chosen++] = s;
    }
    if (freed < excess) {
        free(cand);
        return LA_ELIMIT;
    }
    for (size_t i = 0; i < chosen; i++) {
        s = cand[i];
        char name[SESS_NAME_MAX];
        sess_name(s, name, sizeof name);
        eng_logf(e, LOG_INFO,
                 "%s of uid %u: evicted (detached %llu ms ago) to stay under the mask "
                 "memory cap of %llu bytes",
                 name, s->uid, (unsigned long long)(eng_now_ms() - s->detached_ms),
                 (unsigned long long)cap);
        e->n_evicted++;
        sess_unlink(e, s);
    }
    free(cand);
    return 0;
}

static void fill_view(const sess *s, eng_session_view *v)
{
    memset(v, 0, sizeof *v);
    v->id = s->id;
    v->bm = s->bm;
    v->bn = s->bn;
    v->n_q_tiles = s->n_q_tiles;
    v->n_k_words = s->n_k_words;
    v->layer_mask_bytes = s->layer_mask_bytes;
    v->mask_bytes = s->mask_bytes;
    v->layers = s->layers;
    v->heads = s->heads;
    v->head_dim = s->head_dim;
    v->max_seq_q = s->max_seq_q;
    v->max_seq_k = s->max_seq_k;
    v->batch = s->batch;
    v->kv_shards = s->kv_shards;
    v->dtype = s->dtype;
    snprintf(v->device, sizeof v->device, "%s", s->device);
    v->warm_generations = s->warm_used;
}

/* A session key is 1..ENG_KEY_MAX bytes, none of them a control character (a newline or an
 * ESC would reach logs and terminals; keys are printed escaped all the same): the one check,
 * for open and attach. */
static int key_check(const char *key, size_t *ret_len, eng_error *err)
{
    size_t n = key ? strlen(key) : 0;
    if (n == 0 || n > ENG_KEY_MAX) {
        eng_errf(err, "session key must be 1..%d bytes (got %zu)", ENG_KEY_MAX, n);
        return LA_EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)key[i];
        if (c < 0x20 || c == 0x7f) {
            eng_errf(err,
                     "session key holds control byte 0x%02x at offset %zu (keys are "
                     "printable text)",
                     c, i);
            return LA_EINVAL;
        }
    }
    *ret_len = n;
    return 0;
}

static const char *dtype_long_name(la_dtype t)
{
    switch (t) {
    case LA_DTYPE_F32: return "float32";
    case LA_DTYPE_F16: return "float16";
    case LA_DTYPE_BF16: return "bfloat16";
    case LA_DTYPE_U32: return "uint32";
    }
    return "an unknown dtype";
}

/* Picks the backend and device of a new session from spec->device. */
static int pick_device(eng *e, sess *s, const char *want, eng_error *err)
{
    be_backend *be = NULL;
    int dev = 0, rc;
    uint32_t bm = 0, bn = 0;
    if (!want[0] || !strcmp(want, "auto")) {
        /* The GPU when one is usable and has a kernel for this geometry, else the CPU. */
        if (e->cuda && e->cuda->ops->find_device(e->cuda, "", &dev) == 0 &&
            e->cuda->ops->tile_sizes(e->cuda, dev, s->head_dim, s->dtype, &bm, &bn) == 0)
            be = e->cuda;
        else
            be = e->cpu, dev = 0;
    } else if (!strcmp(want, "cpu")) {
        be = e->cpu;
    } else {
        if (!e->cuda) {
            eng_errf(err, "session '%s': device '%s' asked, but the daemon has no cuda backend",
                     s->key_esc, want);
            return LA_ENODEV;
        }
        rc = e->cuda->ops->find_device(e->cuda, strcmp(want, "cuda") ? want : "", &dev);
        if (rc < 0) {
            eng_errf(err, "session '%s': no GPU '%s' on this host", s->key_esc, want);
            return LA_ENODEV;
        }
        be = e->cuda;
    }
    rc = be->ops->tile_sizes(be, dev, s->head_dim, s->dtype, &bm, &bn);
    if (rc < 0) {
        /* Name the dtype as users write it (torch.bfloat16) and list what the backend has. */
        static const uint32_t dims[] = {32, 48, 64, 80, 96, 112, 128, 160, 192, 256};
        char have[96] = "";
        size_t n = 0;
        for (size_t i = 0; i < sizeof dims / sizeof dims[0] && n < sizeof have; i++)
            if (be->ops->tile_sizes(be, dev, dims[i], s->dtype, &bm, &bn) == 0)
                n += (size_t)snprintf(have + n, sizeof have - n, "%s%u", n ? ", " : "", dims[i]);
        eng_errf(err, "session '%s': the %s backend has no kernel for head dim %u in %s (%s%s)",
                 s->key_esc, be->ops->name, s->head_dim, dtype_long_name(s->dtype),
                 n ? "it has head dims " : "none in this dtype", have);
        return LA_ENOTSUP;
    }
    s->be = be;
    s->dev = dev;
    s->bm = bm;
    s->bn = bn;
    eng_device_info info[16];
    size_t n = be->ops->devices(be, info, 16);
    if ((size_t)dev < n && (size_t)dev < 16)
        snprintf(s->device, sizeof s->device, "%s", info[dev].uuid);
    else
        snprintf(s->device, sizeof s->device, "%s", be->ops->name);
    return 0;
}

/* The session's own settings: geometry, dtype, mode, direction, threshold and schedule. */
static int check_settings(const sess *s, const eng_session_spec *spec, eng_error *err)
{
    if (!s->layers || !s->heads || !s->head_dim || !s->max_seq_q || s->max_seq_q > INT32_MAX ||
        s->max_seq_k > INT32_MAX || s->heads > INT32_MAX || s->batch > INT32_MAX ||
        s->head_dim > INT32_MAX) {
        eng_errf(err,
                 "session '%s': bad geometry (layers %u, heads %u, head dim %u, max Sq %u, "
                 "max Sk %u, batch %u): each must be > 0 and < 2^31",
                 s->key_esc, s->layers, s->heads, s->head_dim, s->max_seq_q, s->max_seq_k,
                 s->batch);
        return LA_EINVAL;
    }
    if (s->dtype != LA_DTYPE_F32 && s->dtype != LA_DTYPE_F16 && s->dtype != LA_DTYPE_BF16) {
        eng_errf(err, "session '%s': dtype %d cannot hold Q/K/V (f32, f16 or bf16)", s->key_esc,
                 (int)s->dtype);
        return LA_EINVAL;
    }
    if (s->mode < LA_MODE_DENSE || s->mode > LA_MODE_SKIP) {
        eng_errf(err, "session '%s': unknown mode %d", s->key_esc, (int)s->mode);
        return LA_EINVAL;
    }
    if (s->direction < LA_DIR_ALTERNATE || s->direction > LA_DIR_DESCENDING) {
        eng_errf(err, "session '%s': unknown direction %d", s->key_esc, (int)s->direction);
        return LA_EINVAL;
    }
    if (isnan(s->threshold)) {
        eng_errf(err, "session '%s': threshold is NaN", s->key_esc);
        return LA_EINVAL;
    }
    if (spec->n_schedule && (!spec->schedule || spec->n_schedule > LA_MAX_SCHEDULE)) {
        eng_errf(err, "session '%s': threshold schedule of %zu steps (at most %d)", s->key_esc,
                 spec->n_schedule, LA_MAX_SCHEDULE);
        return LA_EINVAL;
    }
    for (size_t i = 0; i < spec->n_schedule; i++)
        if (isnan(spec->schedule[i])) {
            eng_errf(err, "session '%s': threshold schedule step %zu is NaN", s->key_esc, i);
            return LA_EINVAL;
        }
    return 0;
}

/* A new session object from a spec whose key and device were checked; NULL: out of memory. */
static sess *sess_from_spec(uint32_t uid, const eng_session_spec *spec, size_t klen)
{
    sess *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    memcpy(s->key, spec->key, klen);
    esc_bytes(s->key_esc, sizeof s->key_esc, s->key, klen);
    s->uid = uid;
    s->layers = spec->layers;
    s->heads = spec->heads;
    s->head_dim = spec->head_dim;
    s->dtype = spec->dtype;
    s->max_seq_q = spec->max_seq_q;
    s->max_seq_k = spec->max_seq_k ? spec->max_seq_k : spec->max_seq_q;
    s->batch = spec->batch ? spec->batch : 1;
    s->kv_shards = spec->kv_shards ? spec->kv_shards : 1;
    s->threshold = spec->threshold;
    s->mode = spec->mode == LA_MODE_SESSION ? LA_MODE_SKIP : spec->mode;
    s->direction = spec->direction;
    s->refs = 1;
    return s;
}

/* Tile counts and mask sizes from the tile sizes of the session's backend, overflow-safe. */
static int size_masks(sess *s, eng_error *err)
{
    s->n_q_tiles = (uint32_t)la_tiles((int32_t)s->max_seq_q, (int32_t)s->bm);
    s->n_k_tiles = (uint32_t)la_tiles((int32_t)s->max_seq_k, (int32_t)s->bn);
    s->n_k_words = (uint32_t)la_mask_words((int32_t)s->n_k_tiles);
    uint64_t lb, mb;
    if (__builtin_mul_overflow((uint64_t)s->batch, (uint64_t)s->heads, &lb) ||
        __builtin_mul_overflow(lb, (uint64_t)s->n_q_tiles, &lb) ||
        __builtin_mul_overflow(lb, (uint64_t)s->n_k_words * 4u, &lb) ||
        __builtin_mul_overflow(lb, (uint64_t)s->layers, &mb) ||
        __builtin_mul_overflow(mb, (uint64_t)s->kv_shards, &mb)) {
        eng_errf(err, "session '%s': mask size overflows", s->key_esc);
        return LA_ELIMIT;
    }
    s->layer_mask_bytes = lb;
    s->mask_bytes = mb;
    s->alloc_bytes = mb;
    return 0;
}

/* The allocation beside the masks: the warm seed, then the guardrail's held-row bitmaps. */
static int size_extras(sess *s, int seeded, eng_error *err)
{
    uint64_t a = s->mask_bytes, h = 0;
    s->seed_off = a;
    if (seeded && __builtin_add_overflow(a, s->mask_bytes, &a))
        goto overflow;
    s->capture_off = a;
    if (s->has_warm_step && __builtin_add_overflow(a, s->mask_bytes, &a))
        goto overflow;
    s->held_off = a;
    if (s->guard_every) {
        s->held_region_bytes = la_guard_held_bytes(s->batch, s->heads, s->n_q_tiles);
        if (__builtin_mul_overflow(s->held_region_bytes, (uint64_t)s->layers * s->kv_shards, &h) ||
            __builtin_add_overflow(a, h, &a))
            goto overflow;
    }
    s->alloc_bytes = a;
    return 0;
overflow:
    eng_errf(err, "session '%s': mask size overflows", s->key_esc);
    return LA_ELIMIT;
}

/* The user's session count and mask bytes, and the daemon's mask memory cap (evicting idle
 * sessions to make room), for one more session of s->alloc_bytes (its masks, and its warm
 * seed and guardrail bitmaps when it has them). */
static int check_room(eng *e, const sess *s, eng_user **ret_user, eng_error *err)
{
    const eng_limits *l = &e->cfg.limits;
    uint64_t mb = s->alloc_bytes;
    eng_user *u = sess_user(e, s->uid, 1);
    if (!u) {
        eng_errf(err, "out of memory");
        return LA_ENOMEM;
    }
    if (l->max_sessions_per_user && u->sessions >= l->max_sessions_per_user) {
        eng_errf(err, "session '%s': uid %u already has %u sessions open (limit %u)", s->key_esc,
                 s->uid, u->sessions, l->max_sessions_per_user);
        return LA_ELIMIT;
    }
    if (l->max_mask_bytes_per_user &&
        (mb > l->max_mask_bytes_per_user || u->mask_bytes > l->max_mask_bytes_per_user - mb)) {
        eng_errf(err,
                 "session '%s': %llu bytes of masks exceed the limit of uid %u (%llu of %llu "
                 "bytes in use)",
                 s->key_esc, (unsigned long long)mb, s->uid, (unsigned long long)u->mask_bytes,
                 (unsigned long long)l->max_mask_bytes_per_user);
        return LA_ELIMIT;
    }
    if (make_room(e, s->uid, mb) < 0) {
        eng_errf(err,
                 "session '%s': %llu bytes of masks do not fit under the daemon's mask memory "
                 "cap (%llu of %llu bytes held by sessions in use)",
                 s->key_esc, (unsigned long long)mb, (unsigned long long)e->mask_bytes_live,
                 (unsigned long long)l->mask_memory_cap);
        return LA_ELIMIT;
    }
    *ret_user = u;
    return 0;
}

/* LA_EEXIST when uid already has a session named key. */
static int key_unused(eng *e, uint32_t uid, const char *key, eng_error *err)
{
    sess *o;
    list_for_each_entry (o, &e->sessions, sess, link)
        if (o->uid == uid && !strcmp(o->key, key)) {
            char name[SESS_NAME_MAX];
            sess_name(o, name, sizeof name);
            eng_errf(err, "%s: key already in use by this user (attach to it instead)", name);
            return LA_EEXIST;
        }
    return 0;
}

int eng_session_open(eng *e, uint32_t uid, uint64_t conn_id, const eng_session_spec *spec,
                     eng_session_view *ret_view, eng_error *err)
{
    int rc;
    uint32_t *seed = NULL;
    char warm_status[ENG_WARM_STATUS_MAX] = "";
    if (e->shutting_down) {
        eng_errf(err, "the daemon is shutting down");
        return LA_ESHUTDOWN;
    }
    size_t klen;
    if ((rc = key_check(spec->key, &klen, err)) < 0)
        return rc;
    const char *device = spec->device ? spec->device : "";
    if (strlen(device) >= sizeof(((sess *)0)->device)) {
        char ek[ESC_MAX(ENG_KEY_MAX)];
        eng_errf(err, "session '%s': device name of %zu bytes (at most %zu)",
                 esc_str(ek, sizeof ek, spec->key), strlen(device),
                 sizeof(((sess *)0)->device) - 1);
        return LA_EINVAL;
    }
    sess *s = sess_from_spec(uid, spec, klen);
    if (!s) {
        eng_errf(err, "out of memory");
        return LA_ENOMEM;
    }
    eng_user *u = NULL;
    if ((rc = check_settings(s, spec, err)) < 0 || (rc = key_unused(e, uid, s->key, err)) < 0 ||
        (rc = pick_device(e, s, device, err)) < 0 || (rc = size_masks(s, err)) < 0 ||
        (rc = sess_warm_open(e, s, spec, &seed, warm_status, sizeof warm_status, err)) < 0 ||
        (rc = size_extras(s, seed != NULL, err)) < 0 || (rc = check_room(e, s, &u, err)) < 0)
        goto fail;
    if (conn_add(s, conn_id) < 0) {
        eng_errf(err, "out of memory");
        rc = LA_ENOMEM;
        goto fail;
    }
    if (spec->n_schedule) {
        s->schedule = malloc(spec->n_schedule * sizeof *s->schedule);
        if (!s->schedule) {
            eng_errf(err, "out of memory");
            rc = LA_ENOMEM;
            goto fail;
        }
        memcpy(s->schedule, spec->schedule, spec->n_schedule * sizeof *s->schedule);
        s->n_schedule = spec->n_schedule;
    }
    s->last_step = malloc((size_t)s->layers * sizeof *s->last_step);
    s->restart_due = calloc((size_t)s->layers * s->kv_shards, 1);
    if (!s->last_step || !s->restart_due) {
        eng_errf(err, "out of memory");
        rc = LA_ENOMEM;
        goto fail;
    }
    for (uint32_t i = 0; i < s->layers; i++)
        s->last_step[i] = -1;
    size_t n_regions = (size_t)s->layers * s->kv_shards;
    s->region_fresh = malloc(n_regions);
    if (s->has_warm) {
        s->seed_due = calloc(n_regions, 1);
        s->captured = calloc(n_regions, 1);
    }
    if (!s->region_fresh || (s->has_warm && (!s->seed_due || !s->captured))) {
        eng_errf(err, "out of memory");
        rc = LA_ENOMEM;
        goto fail;
    }
    memset(s->region_fresh, 1, n_regions);
    /* The seed lives beside the masks in the host view (mset_new has the backend put it
     * there); the workers AND it in (the CUDA one uploads it first). It is never written
     * again. */
    s->seed = seed;
    seed = NULL;
    if ((rc = mset_new(e, s, &s->masks, err)) < 0)
        goto fail;
    if (s->seed) {
        memset(s->seed_due, 1, n_regions);
        e->n_warm_starts++;
    }

    s->id = ++e->next_session_id;
    s->last_used_ms = eng_now_ms();
    s->linked = 1;
    list_append(&e->sessions, &s->link);
    u->sessions++;
    u->mask_bytes += s->alloc_bytes;
    e->n_sessions_opened++;
    fill_view(s, ret_view);
    snprintf(ret_view->warm_status, sizeof ret_view->warm_status, "%s", warm_status);
    if (s->has_warm) {
        char name[SESS_NAME_MAX];
        sess_name(s, name, sizeof name);
        eng_logf(e, LOG_DEBUG, "%s of uid %u: %s", name, uid, warm_status);
    }
    return 0;
fail:
    free(seed);
    sess_free(s);
    return rc;
}

int eng_session_attach(eng *e, uint32_t uid, uint64_t conn_id, const char *key,
                       eng_session_view *ret_view, eng_error *err)
{
    if (e->shutting_down) {
        eng_errf(err, "the daemon is shutting down");
        return LA_ESHUTDOWN;
    }
    size_t klen;
    int rc = key_check(key, &klen, err);
    if (rc < 0)
        return rc;
    sess *s;
    list_for_each_entry (s, &e->sessions, sess, link)
        if (s->uid == uid && !strcmp(s->key, key)) {
            if (conn_add(s, conn_id) < 0) {
                eng_errf(err, "out of memory");
                return LA_ENOMEM;
            }
            sess_touch(e, s);
            fill_view(s, ret_view);
            return 0;
        }
    char ek[ESC_MAX(ENG_KEY_MAX)];
    eng_errf(err, "session '%s': no such session", esc_str(ek, sizeof ek, key));
    return LA_ENOENT;
}

int eng_session_reset(eng *e, uint32_t uid, uint64_t session_id, eng_error *err)
{
    sess *s = sess_get(e, uid, session_id, 0, err);
    if (!s)
        return LA_ENOENT;
    int rc = 0;
    if (s->masks->refs == 1) {
        mset_clear(s->masks);
    } else {
        /* Jobs in flight still write the current set: give the session a fresh one. */
        eng_mset *m;
        /* mset_new places the seed (s->seed) in the new view: the old view is not read, the
         * cuda backend may not have made it yet. */
        if ((rc = mset_new(e, s, &m, err)) < 0)
            return rc;
        mset_unref(e, s->masks);
        s->masks = m;
    }
    if (rc < 0) {
        char name[SESS_NAME_MAX];
        sess_name(s, name, sizeof name);
        eng_errf(err, "%s: mask reset failed: %s", name, codes_strerror(rc));
        return rc;
    }
    /* Every mask is all ones again: whatever step comes next starts a generation. */
    for (uint32_t l = 0; l < s->layers; l++)
        s->last_step[l] = -1;
    memset(s->restart_due, 0, (size_t)s->layers * s->kv_shards);
    memset(s->region_fresh, 1, (size_t)s->layers * s->kv_shards);
    sess_warm_reset(s);
    sess_touch(e, s);
    return 0;
}

int eng_session_close(eng *e, uint32_t uid, uint64_t session_id, eng_error *err)
{
    sess *s = sess_get(e, uid, session_id, 0, err);
    if (!s)
        return LA_ENOENT;
    e->n_sessions_closed++;
    sess_unlink(e, s);
    return 0;
}

/* The live fraction of a layer, averaged over its shards: from the counts the workers keep. */
static double layer_fraction(const sess *s, uint32_t layer)
{
    const eng_mset *m = s->masks;
    if (m->region_bits == 0)
        return 0;
    double sum = 0;
    for (uint32_t k = 0; k < s->kv_shards; k++)
        sum += (double)m->live[layer * s->kv_shards + k] / (double)m->region_bits;
    return sum / s->kv_shards;
}

int eng_session_info(eng *e, uint32_t uid, uint64_t session_id, double *live, size_t n,
                     eng_session_stats *ret_stats, eng_error *err)
{
    sess *s = sess_get(e, uid, session_id, 1, err);
    if (!s)
        return LA_ENOENT;
    for (size_t l = 0; live && l < n && l < s->layers; l++)
        live[l] = layer_fraction(s, (uint32_t)l);
    if (ret_stats) {
        *ret_stats = s->stats;
        snprintf(ret_stats->warm_key, sizeof ret_stats->warm_key, "%s", s->warm_key);
        ret_stats->warm_generations = s->warm_used;
    }
    return 0;
}

void eng_session_list(eng *e, uint32_t uid, void (*fn)(void *data, const eng_session_summary *s),
                      void *data)
{
    uint64_t now = eng_now_ms();
    double *ll = NULL;
    size_t ll_cap = 0;
    sess *s;
    list_for_each_entry (s, &e->sessions, sess, link) {
        if (uid != 0 && s->uid != uid)
            continue;
        if (s->layers > ll_cap) {
            double *n = realloc(ll, s->layers * sizeof *ll);
            if (n) {
                ll = n;
                ll_cap = s->layers;
            }
        }
        eng_session_summary sum;
        memset(&sum, 0, sizeof sum);
        sum.id = s->id;
        memcpy(sum.key, s->key, sizeof sum.key);
        sum.uid = s->uid;
        sum.layers = s->layers;
        sum.heads = s->heads;
        sum.head_dim = s->head_dim;
        sum.batch = s->batch;
        sum.bm = s->bm;
        sum.bn = s->bn;
        sum.mask_bytes = s->mask_bytes;
        sum.calls = s->stats.calls;
        sum.restarts = s->stats.restarts;
        sum.idle_ms = s->inflight ? 0 : now - s->last_used_ms;
        double t = 0;
        for (uint32_t l = 0; l < s->layers; l++) {
            double f = layer_fraction(s, l);
            t += f;
            if (ll && l < ll_cap)
                ll[l] = f;
        }
        sum.live_fraction = t / s->layers;
        sum.attached = s->attached;
        snprintf(sum.device, sizeof sum.device, "%s", s->device);
        snprintf(sum.warm_key, sizeof sum.warm_key, "%s", s->warm_key);
        sum.warm_generations = s->warm_used;
        sum.guard_checks = s->stats.guard_checks;
        sum.guard_restored = s->stats.guard_restored;
        sum.layer_live = ll && s->layers <= ll_cap ? ll : NULL;
        fn(data, &sum);
    }
    free(ll);
}

int eng_mask_read(eng *e, uint32_t uid, uint64_t session_id, uint32_t layer, uint32_t kv_shard,
                  uint64_t offset, void *dst, size_t len, size_t *ret_len, uint64_t *ret_total,
                  eng_error *err)
{
    sess *s = sess_get(e, uid, session_id, 1, err);
    if (!s)
        return LA_ENOENT;
    char name[SESS_NAME_MAX];
    sess_name(s, name, sizeof name);
    if (layer >= s->layers) {
        eng_errf(err, "%s: %s", name, eng_index_error("layer", layer, s->layers).msg);
        return LA_EINVAL;
    }
    if (kv_shard >= s->kv_shards) {
        eng_errf(err, "%s: %s", name, eng_index_error("kv shard", kv_shard, s->kv_shards).msg);
        return LA_EINVAL;
    }
    uint64_t total = s->layer_mask_bytes;
    if (offset > total) {
        eng_errf(err, "%s: mask offset %llu past the layer's %llu bytes", name,
                 (unsigned long long)offset, (unsigned long long)total);
        return LA_ERANGE;
    }
    size_t n = total - offset < len ? (size_t)(total - offset) : len;
    if (n && !dst) {
        eng_errf(err, "%s: mask read into NULL", name);
        return LA_EINVAL;
    }
    uint32_t region = layer * s->kv_shards + kv_shard;
    const uint8_t *base = (const uint8_t *)s->masks->mask->host + (uint64_t)region * total;
    /* A region no call has touched yet is all ones (it is set when its first call runs). */
    if (n && !atomic_load(&s->masks->ready[region]))
        memset(dst, 0xff, n);
    else if (n)
        memcpy(dst, base + offset, n);
    if (ret_len)
        *ret_len = n;
    if (ret_total)
        *ret_total = total;
    return 0;
}

void sess_conn_closed(eng *e, uint64_t conn_id)
{
    uint64_t now = eng_now_ms();
    sess *s;
    list_for_each_entry (s, &e->sessions, sess, link)
        for (uint32_t i = 0; i < s->n_conns; i++)
            if (s->conns[i] == conn_id) {
                s->conns[i] = s->conns[--s->n_conns];
                if (s->n_conns == 0) {
                    s->attached = 0;
                    s->detached_ms = now;
                }
                break;
            }
}

void sess_tick(eng *e)
{
    uint64_t now = eng_now_ms();
    const eng_limits *l = &e->cfg.limits;
    sess *s;
    list_for_each_entry (s, &e->sessions, sess, link) {
        if (s->inflight == 0) {
            char name[SESS_NAME_MAX];
            sess_name(s, name, sizeof name);
            if (!s->attached && now - s->detached_ms >= (uint64_t)l->session_grace_s * 1000) {
                eng_logf(e, LOG_INFO, "%s of uid %u: freed, detached for longer than %u s", name,
                         s->uid, l->session_grace_s);
                e->n_detached_freed++;
                sess_unlink(e, s);
            } else if (l->session_ttl_s &&
                       now - s->last_used_ms >= (uint64_t)l->session_ttl_s * 1000) {
                eng_logf(e, LOG_INFO, "%s of uid %u: freed, idle for longer than %u s", name,
                         s->uid, l->session_ttl_s);
                e->n_expired++;
                sess_unlink(e, s);
            }
        }
    }
}

void sess_free_all(eng *e)
{
    while (!list_empty(&e->sessions))
        sess_unlink(e, list_first_entry(&e->sessions, sess, link));
    list_drain(&e->users, eng_user, node.link, free);
}
