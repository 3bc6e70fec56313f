/*
 * check_daemon.c — liteattnd over its raw protocol: frames built with proto/frame.h and the
 * generated protobuf-c code, no client library. Each case starts its own daemon on a temporary
 * socket (tests/testutil_daemon.h) and, after every bad input, checks that a healthy client can
 * still Hello + Ping. Attention results are compared with the CPU reference called directly.
 */

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "la_attn.h"
#include "liteattn.h"
#include "liteattn.pb-c.h"
#include "rawproto.h"
#include "runner.h"
#include "testutil_daemon.h"

/* ---- the raw protocol client (tests/rawproto.c), with this file's assertions ------------- */

typedef struct rcl {
    int fd;
} rcl;

static void rcl_open(rcl *r, const td_daemon *d)
{
    r->fd = td_connect(d);
    ck_assert_msg(r->fd >= 0, "connect to %s failed: %s", d->socket, strerror(errno));
}

static void rcl_close(rcl *r)
{
    if (r->fd >= 0)
        close(r->fd);
    r->fd = -1;
}

static int rcl_send(rcl *r, const Liteattn__Request *q, int fd) { return raw_send(r->fd, q, fd); }

/* Next reply, or NULL at end of file or after timeout_ms; a reply that does not decode fails
 * the case. */
static Liteattn__Reply *rcl_recv(rcl *r, int timeout_ms)
{
    Liteattn__Reply *rep;
    ck_assert_msg(raw_recv_status(r->fd, timeout_ms, &rep) >= 0, "undecodable reply");
    return rep;
}

/* 1 when the daemon closes the connection within timeout_ms (replies before are dropped). */
static int rcl_eof(rcl *r, int timeout_ms) { return raw_eof(r->fd, timeout_ms); }

static void rcl_free_reply(Liteattn__Reply *rep) { liteattn__reply__free_unpacked(rep, NULL); }

static Liteattn__Reply *expect_body(rcl *r, uint64_t id, int body)
{
    Liteattn__Reply *rep = rcl_recv(r, 10000);
    ck_assert_msg(rep != NULL, "no reply to request %llu", (unsigned long long)id);
    ck_assert_msg(rep->id == id, "reply id %llu, expected %llu", (unsigned long long)rep->id,
                  (unsigned long long)id);
    if ((int)rep->body_case != body && rep->body_case == LITEATTN__REPLY__BODY_ERROR)
        ck_abort_msg("request %llu: error %d (%s): %s", (unsigned long long)id, rep->error->code,
                     la_err_name(rep->error->code), rep->error->message);
    ck_assert_int_eq(rep->body_case, body);
    return rep;
}

static void expect_error(rcl *r, uint64_t id, int code)
{
    Liteattn__Reply *rep = rcl_recv(r, 10000);
    ck_assert_msg(rep != NULL, "no reply to request %llu", (unsigned long long)id);
    ck_assert_msg(rep->id == id, "reply id %llu, expected %llu", (unsigned long long)rep->id,
                  (unsigned long long)id);
    ck_assert_msg(rep->body_case == LITEATTN__REPLY__BODY_ERROR,
                  "request %llu: reply type %d, expected an error %s", (unsigned long long)id,
                  rep->body_case, la_err_name(code));
    ck_assert_msg(rep->error->code == code, "request %llu: error %s (%s), expected %s",
                  (unsigned long long)id, la_err_name(rep->error->code), rep->error->message,
                  la_err_name(code));
    ck_assert_ptr_nonnull(rep->error->message);
    rcl_free_reply(rep);
}

static void send_hello(rcl *r, uint64_t id, uint32_t major)
{
    Liteattn__Hello h = LITEATTN__HELLO__INIT;
    h.major = major;
    h.minor = 0;
    h.client_name = (char *)"check_daemon";
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = id;
    q.body_case = LITEATTN__REQUEST__BODY_HELLO;
    q.hello = &h;
    ck_assert_int_eq(rcl_send(r, &q, -1), 0);
}

static void rcl_hello(rcl *r)
{
    send_hello(r, 1, LA_PROTOCOL_MAJOR);
    rcl_free_reply(expect_body(r, 1, LITEATTN__REPLY__BODY_HELLO));
}

static void send_ping(rcl *r, uint64_t id)
{
    Liteattn__Ping p = LITEATTN__PING__INIT;
    p.has_payload = 1;
    p.payload = id * 7;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = id;
    q.body_case = LITEATTN__REQUEST__BODY_PING;
    q.ping = &p;
    ck_assert_int_eq(rcl_send(r, &q, -1), 0);
}

/* A new client can still Hello and Ping. */
static void assert_healthy(const td_daemon *d)
{
    rcl r;
    rcl_open(&r, d);
    rcl_hello(&r);
    send_ping(&r, 2);
    Liteattn__Reply *rep = expect_body(&r, 2, LITEATTN__REPLY__BODY_PONG);
    ck_assert_uint_eq(rep->pong->payload, 14);
    rcl_free_reply(rep);
    rcl_close(&r);
}

static void start(td_daemon *d, const char *const *args)
{
    ck_assert_msg(td_start(d, args) == 0, "liteattnd did not start");
}

static void stop_ok(td_daemon *d) { ck_assert_int_eq(td_stop(d), 0); }

/* Value of a named counter of a Stats reply, or -1. */
static int64_t stat_of(rcl *r, uint64_t id, const char *name)
{
    Liteattn__Stats st = LITEATTN__STATS__INIT;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = id;
    q.body_case = LITEATTN__REQUEST__BODY_STATS;
    q.stats = &st;
    ck_assert_int_eq(rcl_send(r, &q, -1), 0);
    Liteattn__Reply *rep = expect_body(r, id, LITEATTN__REPLY__BODY_STATS);
    int64_t v = -1;
    for (size_t i = 0; i < rep->stats->n_stats; i++)
        if (strcmp(rep->stats->stats[i]->name, name) == 0)
            v = rep->stats->stats[i]->value;
    rcl_free_reply(rep);
    return v;
}

/* ---- fixtures ------------------------------------------------------------------------------ */

/* The fixtures' daemon is td_fx (tests/testutil_daemon.h: default arguments, exit status 0
 * asserted at the stop). The "protocol_shared" cases share one per test case (td_fx_up as an
 * unchecked fixture: started before its cases fork, stopped after the last); each such case
 * ends by checking that a new client is still served. The "engine" cases get one each (a
 * checked fixture, in the case's own process), because they count sessions, buffers and
 * calls. */

/* ---- sessions, buffers, attention --------------------------------------------------------- */

enum { GB = 1, GH = 2, GD = 64, GL = 2 };
static int GS = 256; /* max Sq = Sk of the sessions opened here; a case may raise it */

static void send_session_ref(rcl *r, uint64_t id, int body, uint64_t sid)
{
    Liteattn__SessionRef s = LITEATTN__SESSION_REF__INIT;
    s.session_id = sid;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = id;
    q.body_case = body;
    if (body == LITEATTN__REQUEST__BODY_SESSION_RESET)
        q.session_reset = &s;
    else if (body == LITEATTN__REQUEST__BODY_SESSION_CLOSE)
        q.session_close = &s;
    else
        q.session_info = &s;
    ck_assert_int_eq(rcl_send(r, &q, -1), 0);
}

static void send_open(rcl *r, uint64_t id, const char *key, int dtype, size_t n_schedule)
{
    Liteattn__SessionOpen o = LITEATTN__SESSION_OPEN__INIT;
    o.key = (char *)key;
    o.layers = GL;
    o.heads = GH;
    o.head_dim = GD;
    o.dtype = dtype;
    o.max_seq_q = GS;
    o.has_batch = 1;
    o.batch = GB;
    float *sched = NULL;
    if (n_schedule) {
        sched = calloc(n_schedule, sizeof(float));
        for (size_t i = 0; i < n_schedule; i++)
            sched[i] = -3.0f;
        o.n_schedule = n_schedule;
        o.schedule = sched;
    }
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = id;
    q.body_case = LITEATTN__REQUEST__BODY_SESSION_OPEN;
    q.session_open = &o;
    ck_assert_int_eq(rcl_send(r, &q, -1), 0);
    free(sched);
}

/* Opens session key (F32, geometry G*); returns its id and writes the reply's bm/bn/words. */
static uint64_t open_session(rcl *r, uint64_t id, const char *key, uint32_t *bm, uint32_t *bn,
                             uint32_t *nkw)
{
    send_open(r, id, key, LITEATTN__DTYPE__DTYPE_F32, 0);
    Liteattn__Reply *rep = expect_body(r, id, LITEATTN__REPLY__BODY_SESSION);
    Liteattn__SessionReply *s = rep->session;
    ck_assert_uint_gt(s->session_id, 0);
    ck_assert_uint_gt(s->bm, 0);
    ck_assert_uint_gt(s->bn, 0);
    ck_assert_uint_eq(s->layers, GL);
    ck_assert_uint_eq(s->heads, GH);
    ck_assert_uint_eq(s->head_dim, GD);
    ck_assert_uint_eq(s->max_seq_q, GS);
    uint32_t nq = (GS + s->bm - 1) / s->bm, nk = (GS + s->bn - 1) / s->bn;
    ck_assert_uint_eq(s->n_q_tiles, nq);
    ck_assert_uint_eq(s->n_k_words, (nk + 31) / 32);
    ck_assert_uint_eq(s->layer_mask_bytes, (uint64_t)GB * GH * nq * s->n_k_words * 4);
    ck_assert_uint_eq(s->mask_bytes, s->layer_mask_bytes * GL);
    if (bm)
        *bm = s->bm;
    if (bn)
        *bn = s->bn;
    if (nkw)
        *nkw = s->n_k_words;
    uint64_t sid = s->session_id;
    rcl_free_reply(rep);
    return sid;
}

/* A sealed-able memfd of size bytes mapped here. */
typedef struct shm {
    int fd;
    size_t size;
    void *p;
} shm;

static shm shm_new(size_t size)
{
    shm s = {.size = size};
    s.fd = memfd_create("check_daemon", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    ck_assert_int_ge(s.fd, 0);
    ck_assert_int_eq(ftruncate(s.fd, (off_t)size), 0);
    s.p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, s.fd, 0);
    ck_assert_ptr_ne(s.p, MAP_FAILED);
    return s;
}

static void shm_free(shm *s)
{
    munmap(s->p, s->size);
    close(s->fd);
}

static void send_register(rcl *r, uint64_t id, uint64_t size, int fd)
{
    Liteattn__BufferRegister b = LITEATTN__BUFFER_REGISTER__INIT;
    b.kind = LITEATTN__BUFFER_KIND__BUFFER_SHM;
    b.size = size;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = id;
    q.body_case = LITEATTN__REQUEST__BODY_BUFFER_REGISTER;
    q.buffer_register = &b;
    ck_assert_int_eq(rcl_send(r, &q, fd), 0);
}

static uint64_t register_shm(rcl *r, uint64_t id, const shm *s)
{
    send_register(r, id, s->size, s->fd);
    Liteattn__Reply *rep = expect_body(r, id, LITEATTN__REPLY__BODY_BUFFER);
    ck_assert_uint_eq(rep->buffer->size, s->size);
    uint64_t bid = rep->buffer->buffer_id;
    rcl_free_reply(rep);
    return bid;
}

/* Q, K, V, O of [GB, GS, GH, GD] f32, one after another in the buffer. */
#define TENSOR_BYTES ((size_t)GB * GS * GH * GD * 4)

typedef struct attn_args {
    uint64_t sid, bid;
    uint32_t layer, step;
    uint64_t off[4];  /* byte offsets of q, k, v, o */
    int64_t shape[4]; /* of q (and k, v, o) */
    int64_t strides[4];
    int n_strides;
    int n_must_do;
} attn_args;

static void attn_defaults(attn_args *a, uint64_t sid, uint64_t bid)
{
    memset(a, 0, sizeof(*a));
    a->sid = sid;
    a->bid = bid;
    for (int i = 0; i < 4; i++)
        a->off[i] = i * TENSOR_BYTES;
    a->shape[0] = GB, a->shape[1] = GS, a->shape[2] = GH, a->shape[3] = GD;
}

static void send_attn(rcl *r, uint64_t id, const attn_args *a)
{
    Liteattn__TensorRef t[4];
    for (int i = 0; i < 4; i++) {
        liteattn__tensor_ref__init(&t[i]);
        t[i].buffer_id = a->bid;
        t[i].has_offset = 1;
        t[i].offset = a->off[i];
        t[i].has_dtype = 1;
        t[i].dtype = LITEATTN__DTYPE__DTYPE_F32;
        t[i].n_shape = 4;
        t[i].shape = (int64_t *)a->shape;
        t[i].n_strides = (size_t)a->n_strides;
        t[i].strides = (int64_t *)a->strides;
    }
    Liteattn__Range rg = LITEATTN__RANGE__INIT, *rgp[100];
    rg.start = 0, rg.end = 1;
    for (int i = 0; i < 100; i++)
        rgp[i] = &rg;
    Liteattn__Attention m = LITEATTN__ATTENTION__INIT;
    m.session_id = a->sid;
    m.layer = a->layer;
    m.step = a->step;
    m.q = &t[0], m.k = &t[1], m.v = &t[2], m.o = &t[3];
    m.n_must_do = (size_t)a->n_must_do;
    m.must_do = rgp;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = id;
    q.body_case = LITEATTN__REQUEST__BODY_ATTENTION;
    q.attention = &m;
    ck_assert_int_eq(rcl_send(r, &q, -1), 0);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float rnd(void)
{
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return (float)((double)(rng_state >> 11) / (double)(1ull << 53)) * 2.0f - 1.0f;
}

/* A session and a filled buffer, ready for attention calls. */
typedef struct setup {
    uint64_t sid, bid;
    uint32_t bm, bn, nkw;
    shm s;
} setup;

static void setup_attn(rcl *r, setup *st, const char *key)
{
    st->sid = open_session(r, 10, key, &st->bm, &st->bn, &st->nkw);
    st->s = shm_new(4 * TENSOR_BYTES);
    float *f = st->s.p;
    for (size_t i = 0; i < 3 * TENSOR_BYTES / 4; i++)
        f[i] = rnd() * (i < 2 * TENSOR_BYTES / 4 ? 3.0f : 1.0f);
    st->bid = register_shm(r, 11, &st->s);
}

/* ---- cases -------------------------------------------------------------------------------- */

START_TEST(test_hello)
{
    td_daemon d;
    const char *args[] = {"--max-frame",
                          "64K",
                          "--max-inflight",
                          "7",
                          "--max-buffers",
                          "9",
                          "--max-sessions",
                          "5",
                          "--max-connections-per-user",
                          "11",
                          NULL};
    start(&d, args);
    rcl r;
    rcl_open(&r, &d);
    send_hello(&r, 42, LA_PROTOCOL_MAJOR);
    Liteattn__Reply *rep = expect_body(&r, 42, LITEATTN__REPLY__BODY_HELLO);
    Liteattn__HelloReply *h = rep->hello;
    ck_assert_uint_eq(h->major, LA_PROTOCOL_MAJOR);
    ck_assert_uint_eq(h->minor, LA_PROTOCOL_MINOR);
    ck_assert_str_eq(h->daemon_version, LA_VERSION_STRING);
    int has_cpu = 0;
    for (size_t i = 0; i < h->n_backends; i++)
        has_cpu |= strcmp(h->backends[i], "cpu") == 0;
    ck_assert_msg(has_cpu, "backends lack cpu");
    ck_assert_uint_ge(h->n_devices, 1);
    ck_assert_ptr_nonnull(h->devices[0]->uuid);
    ck_assert_ptr_nonnull(h->limits);
    ck_assert_uint_eq(h->limits->max_frame, 64 * 1024);
    ck_assert_uint_eq(h->limits->max_inflight, 7);
    ck_assert_uint_eq(h->limits->max_buffers, 9);
    ck_assert_uint_eq(h->limits->max_sessions, 5);
    ck_assert_uint_eq(h->limits->max_connections, 11);
    rcl_free_reply(rep);
    /* A second Hello is a semantic error: the connection stays. */
    send_hello(&r, 43, LA_PROTOCOL_MAJOR);
    expect_error(&r, 43, LA_EINVAL);
    /* A request type this daemon does not know (empty oneof) is not a framing error either. */
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 44;
    ck_assert_int_eq(rcl_send(&r, &q, -1), 0);
    expect_error(&r, 44, LA_ENOTSUP);
    send_ping(&r, 45);
    rcl_free_reply(expect_body(&r, 45, LITEATTN__REPLY__BODY_PONG));
    rcl_close(&r);
    stop_ok(&d);
}
END_TEST

START_TEST(test_no_hello)
{
    rcl r;
    rcl_open(&r, &td_fx);
    send_ping(&r, 5);
    expect_error(&r, 5, LA_EPROTO);
    ck_assert_msg(rcl_eof(&r, 5000), "connection not closed after a request before Hello");
    rcl_close(&r);
    assert_healthy(&td_fx);
}
END_TEST

START_TEST(test_wrong_major)
{
    rcl r;
    rcl_open(&r, &td_fx);
    send_hello(&r, 3, LA_PROTOCOL_MAJOR + 1);
    expect_error(&r, 3, LA_EVERSION);
    ck_assert_msg(rcl_eof(&r, 5000), "connection not closed after a wrong major version");
    rcl_close(&r);
    assert_healthy(&td_fx);
}
END_TEST

START_TEST(test_hello_timeout)
{
    td_daemon d;
    const char *args[] = {"--hello-timeout", "1", NULL};
    start(&d, args);
    rcl r;
    rcl_open(&r, &d);
    expect_error(&r, 0, LA_ETIMEDOUT);
    ck_assert(rcl_eof(&r, 5000));
    rcl_close(&r);
    assert_healthy(&d);
    stop_ok(&d);
}
END_TEST

START_TEST(test_oversize_frame)
{
    td_daemon d;
    const char *args[] = {"--max-frame", "4K", NULL};
    start(&d, args);
    rcl r;
    rcl_open(&r, &d);
    rcl_hello(&r);
    uint8_t hdr[4 + 100] = {0};
    uint32_t n = 9u << 20; /* 9 MiB announced */
    hdr[0] = (uint8_t)n, hdr[1] = (uint8_t)(n >> 8), hdr[2] = (uint8_t)(n >> 16),
    hdr[3] = (uint8_t)(n >> 24);
    ck_assert_int_eq(raw_send_bytes(r.fd, hdr, sizeof(hdr), -1), 0);
    ck_assert_msg(rcl_eof(&r, 5000), "connection not closed after an oversized frame");
    rcl_close(&r);
    /* Just over the limit, complete: closed as well. */
    rcl_open(&r, &d);
    rcl_hello(&r);
    size_t big = 4096 + 1;
    uint8_t *f = calloc(1, 4 + big);
    f[0] = (uint8_t)big, f[1] = (uint8_t)(big >> 8);
    raw_send_bytes(r.fd, f, 4 + big, -1);
    free(f);
    ck_assert(rcl_eof(&r, 5000));
    rcl_close(&r);
    assert_healthy(&d);
    rcl_open(&r, &d);
    rcl_hello(&r);
    ck_assert_int_ge(stat_of(&r, 9, "server.protocol_errors"), 2);
    rcl_close(&r);
    stop_ok(&d);
}
END_TEST

START_TEST(test_undecodable)
{
    rcl r;
    rcl_open(&r, &td_fx);
    rcl_hello(&r);
    uint8_t f[4 + 24];
    memset(f, 0xff, sizeof(f));
    f[0] = 24, f[1] = f[2] = f[3] = 0;
    ck_assert_int_eq(raw_send_bytes(r.fd, f, sizeof(f), -1), 0);
    ck_assert_msg(rcl_eof(&r, 5000), "connection not closed after undecodable bytes");
    rcl_close(&r);
    /* A Request missing its required id does not decode either, even before Hello. */
    rcl_open(&r, &td_fx);
    uint8_t g[4 + 2] = {2, 0, 0, 0, 0xb2, 0x01}; /* field 22 (ping), length... cut */
    raw_send_bytes(r.fd, g, sizeof(g), -1);
    ck_assert(rcl_eof(&r, 5000));
    rcl_close(&r);
    assert_healthy(&td_fx);
}
END_TEST

START_TEST(test_truncated_then_eof)
{
    for (int i = 0; i < 3; i++) {
        rcl r;
        rcl_open(&r, &td_fx);
        if (i > 0)
            rcl_hello(&r);
        uint8_t f[4 + 10] = {100, 0, 0, 0, 8, 1};
        raw_send_bytes(r.fd, f, i == 2 ? 2 : sizeof(f), -1); /* a frame (or header) cut short */
        shutdown(r.fd, SHUT_WR);
        ck_assert(rcl_eof(&r, 5000));
        rcl_close(&r);
    }
    assert_healthy(&td_fx);
}
END_TEST

START_TEST(test_ping_pipeline)
{
    rcl r;
    rcl_open(&r, &td_fx);
    /* Hello and 2000 pings in one write. */
    enum { N = 2000 };
    uint8_t *all = NULL;
    size_t total = 0;
    for (uint64_t id = 1; id <= N + 1; id++) {
        Liteattn__Ping p = LITEATTN__PING__INIT;
        Liteattn__Hello h = LITEATTN__HELLO__INIT;
        Liteattn__Request q = LITEATTN__REQUEST__INIT;
        q.id = id;
        if (id == 1) {
            h.major = LA_PROTOCOL_MAJOR;
            q.body_case = LITEATTN__REQUEST__BODY_HELLO;
            q.hello = &h;
        } else {
            p.has_payload = 1;
            p.payload = id * 3;
            q.body_case = LITEATTN__REQUEST__BODY_PING;
            q.ping = &p;
        }
        uint8_t *b;
        size_t n;
        ck_assert_int_eq(raw_pack(&q, &b, &n), 0);
        all = realloc(all, total + n);
        memcpy(all + total, b, n);
        total += n;
        free(b);
    }
    ck_assert_int_eq(raw_send_bytes(r.fd, all, total, -1), 0);
    free(all);
    static char seen[N + 2];
    memset(seen, 0, sizeof(seen));
    rcl_free_reply(expect_body(&r, 1, LITEATTN__REPLY__BODY_HELLO));
    for (int i = 0; i < N; i++) {
        Liteattn__Reply *rep = rcl_recv(&r, 10000);
        ck_assert_ptr_nonnull(rep);
        ck_assert_int_eq(rep->body_case, LITEATTN__REPLY__BODY_PONG);
        ck_assert_uint_ge(rep->id, 2);
        ck_assert_uint_le(rep->id, N + 1);
        ck_assert_uint_eq(rep->pong->payload, rep->id * 3);
        ck_assert_msg(!seen[rep->id], "id %llu answered twice", (unsigned long long)rep->id);
        seen[rep->id] = 1;
        rcl_free_reply(rep);
    }
    rcl_close(&r);
    assert_healthy(&td_fx);
}
END_TEST

START_TEST(test_unknown_session)
{
    rcl r;
    rcl_open(&r, &td_fx);
    rcl_hello(&r);
    send_session_ref(&r, 2, LITEATTN__REQUEST__BODY_SESSION_INFO, 12345);
    expect_error(&r, 2, LA_ENOENT);
    send_session_ref(&r, 3, LITEATTN__REQUEST__BODY_SESSION_CLOSE, 12345);
    expect_error(&r, 3, LA_ENOENT);
    send_session_ref(&r, 4, LITEATTN__REQUEST__BODY_SESSION_RESET, 12345);
    expect_error(&r, 4, LA_ENOENT);
    Liteattn__SessionAttach a = LITEATTN__SESSION_ATTACH__INIT;
    a.key = (char *)"nobody";
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 5;
    q.body_case = LITEATTN__REQUEST__BODY_SESSION_ATTACH;
    q.session_attach = &a;
    ck_assert_int_eq(rcl_send(&r, &q, -1), 0);
    expect_error(&r, 5, LA_ENOENT);
    /* Attention on an unknown session, unknown buffer. */
    attn_args aa;
    attn_defaults(&aa, 999, 999);
    send_attn(&r, 6, &aa);
    expect_error(&r, 6, LA_ENOENT);
    Liteattn__BufferUnregister u = LITEATTN__BUFFER_UNREGISTER__INIT;
    u.buffer_id = 77;
    q.id = 7;
    q.body_case = LITEATTN__REQUEST__BODY_BUFFER_UNREGISTER;
    q.buffer_unregister = &u;
    ck_assert_int_eq(rcl_send(&r, &q, -1), 0);
    expect_error(&r, 7, LA_ENOENT);
    rcl_close(&r);
    assert_healthy(&td_fx);
}
END_TEST

START_TEST(test_session_lifecycle)
{
    rcl r;
    rcl_open(&r, &td_fx);
    rcl_hello(&r);
    uint64_t sid = open_session(&r, 2, "gen-1", NULL, NULL, NULL);
    /* The same key again: exists. */
    send_open(&r, 3, "gen-1", LITEATTN__DTYPE__DTYPE_F32, 0);
    expect_error(&r, 3, LA_EEXIST);
    /* Validation the protobuf decoder does not do. */
    char longkey[300];
    memset(longkey, 'k', sizeof(longkey) - 1);
    longkey[299] = 0;
    send_open(&r, 4, longkey, LITEATTN__DTYPE__DTYPE_F32, 0);
    expect_error(&r, 4, LA_EINVAL);
    send_open(&r, 5, "", LITEATTN__DTYPE__DTYPE_F32, 0);
    expect_error(&r, 5, LA_EINVAL);
    send_open(&r, 6, "gen-bad-dtype", 9, 0);
    expect_error(&r, 6, LA_EINVAL);
    send_open(&r, 7, "gen-long-schedule", LITEATTN__DTYPE__DTYPE_F32, 10001);
    expect_error(&r, 7, LA_EINVAL);
    send_open(&r, 8, "gen-schedule", LITEATTN__DTYPE__DTYPE_F32, 10000);
    rcl_free_reply(expect_body(&r, 8, LITEATTN__REPLY__BODY_SESSION));

    send_session_ref(&r, 10, LITEATTN__REQUEST__BODY_SESSION_INFO, sid);
    Liteattn__Reply *rep = expect_body(&r, 10, LITEATTN__REPLY__BODY_SESSION_INFO);
    ck_assert_uint_eq(rep->session_info->n_live_fraction, GL);
    for (size_t i = 0; i < GL; i++)
        ck_assert_double_eq_tol(rep->session_info->live_fraction[i], 1.0, 1e-12);
    ck_assert_uint_eq(rep->session_info->calls, 0);
    rcl_free_reply(rep);

    Liteattn__SessionList sl = LITEATTN__SESSION_LIST__INIT;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 11;
    q.body_case = LITEATTN__REQUEST__BODY_SESSION_LIST;
    q.session_list = &sl;
    ck_assert_int_eq(rcl_send(&r, &q, -1), 0);
    rep = expect_body(&r, 11, LITEATTN__REPLY__BODY_SESSION_LIST);
    ck_assert_uint_eq(rep->session_list->n_sessions, 2);
    int found = 0;
    for (size_t i = 0; i < rep->session_list->n_sessions; i++) {
        Liteattn__SessionSummary *s = rep->session_list->sessions[i];
        if (s->id == sid) {
            found = 1;
            ck_assert_str_eq(s->key, "gen-1");
            ck_assert_uint_eq(s->uid, getuid());
            ck_assert_uint_eq(s->layers, GL);
        }
    }
    ck_assert(found);
    rcl_free_reply(rep);

    /* Mask of layer 1: all ones at first. */
    Liteattn__MaskRead mr = LITEATTN__MASK_READ__INIT;
    mr.session_id = sid;
    mr.layer = 1;
    q.id = 12;
    q.body_case = LITEATTN__REQUEST__BODY_MASK_READ;
    q.mask_read = &mr;
    ck_assert_int_eq(rcl_send(&r, &q, -1), 0);
    rep = expect_body(&r, 12, LITEATTN__REPLY__BODY_MASK);
    ck_assert_uint_gt(rep->mask->total_bytes, 0);
    ck_assert_uint_eq(rep->mask->data.len, rep->mask->total_bytes);
    for (size_t i = 0; i < rep->mask->data.len; i++)
        ck_assert_uint_eq(rep->mask->data.data[i], 0xff);
    rcl_free_reply(rep);
    mr.layer = GL; /* out of range */
    q.id = 13;
    ck_assert_int_eq(rcl_send(&r, &q, -1), 0);
    Liteattn__Reply *e13 = expect_body(&r, 13, LITEATTN__REPLY__BODY_ERROR);
    ck_assert_int_lt(e13->error->code, 0);
    rcl_free_reply(e13);

    send_session_ref(&r, 14, LITEATTN__REQUEST__BODY_SESSION_RESET, sid);
    rcl_free_reply(expect_body(&r, 14, LITEATTN__REPLY__BODY_ACK));
    send_session_ref(&r, 15, LITEATTN__REQUEST__BODY_SESSION_CLOSE, sid);
    rcl_free_reply(expect_body(&r, 15, LITEATTN__REPLY__BODY_ACK));
    send_session_ref(&r, 16, LITEATTN__REQUEST__BODY_SESSION_INFO, sid);
    expect_error(&r, 16, LA_ENOENT);
    rcl_close(&r);
}
END_TEST

START_TEST(test_many_sessions_listed)
{
    rcl r;
    rcl_open(&r, &td_fx);
    rcl_hello(&r);
    enum { N = 40 }; /* more than the first allocation of the daemon's list */
    for (int i = 0; i < N; i++) {
        char key[32];
        snprintf(key, sizeof(key), "many-%02d", i);
        send_open(&r, 100 + i, key, LITEATTN__DTYPE__DTYPE_F32, 0);
        rcl_free_reply(expect_body(&r, 100 + i, LITEATTN__REPLY__BODY_SESSION));
    }
    Liteattn__SessionList sl = LITEATTN__SESSION_LIST__INIT;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 200;
    q.body_case = LITEATTN__REQUEST__BODY_SESSION_LIST;
    q.session_list = &sl;
    ck_assert_int_eq(rcl_send(&r, &q, -1), 0);
    Liteattn__Reply *rep = expect_body(&r, 200, LITEATTN__REPLY__BODY_SESSION_LIST);
    ck_assert_uint_eq(rep->session_list->n_sessions, N);
    char seen[N] = {0};
    for (size_t i = 0; i < N; i++) {
        int k = -1;
        ck_assert_int_eq(sscanf(rep->session_list->sessions[i]->key, "many-%d", &k), 1);
        ck_assert(k >= 0 && k < N && !seen[k]);
        seen[k] = 1;
    }
    rcl_free_reply(rep);
    rcl_close(&r);
}
END_TEST

/* The reference, called directly on copies of the inputs, for steps 0..n_steps-1 of layer 0. */
static void reference(const setup *st, int n_steps, float *o, uint32_t *mask, size_t mask_words)
{
    const float *base = st->s.p;
    for (size_t i = 0; i < mask_words; i++)
        mask[i] = 0xffffffffu;
    for (int step = 0; step < n_steps; step++) {
        la_attn_params p;
        memset(&p, 0, sizeof(p));
        p.q = base;
        p.k = base + TENSOR_BYTES / 4;
        p.v = base + 2 * TENSOR_BYTES / 4;
        p.o = o;
        int64_t cs[4] = {(int64_t)GS * GH * GD, GH * GD, GD, 1};
        memcpy(p.q_stride, cs, sizeof(cs));
        memcpy(p.k_stride, cs, sizeof(cs));
        memcpy(p.v_stride, cs, sizeof(cs));
        memcpy(p.o_stride, cs, sizeof(cs));
        p.B = GB, p.Sq = GS, p.Sk = GS, p.H = GH, p.D = GD;
        p.dtype = LA_DTYPE_F32;
        p.scale = 1.0f / sqrtf((float)GD);
        p.tau = -3.0f;
        p.mode = LA_MODE_SKIP;
        p.step = step;
        p.direction = LA_DIR_ALTERNATE;
        p.mask = mask;
        uint32_t nq = (GS + st->bm - 1) / st->bm;
        p.mask_stride[2] = st->nkw;
        p.mask_stride[1] = (int64_t)st->nkw * nq;
        p.mask_stride[0] = (int64_t)st->nkw * nq * GH;
        p.BM = (int32_t)st->bm, p.BN = (int32_t)st->bn;
        p.threads = 1;
        ck_assert_int_eq(la_ref_attn_fwd(&p), 0);
    }
}

START_TEST(test_attention_shm)
{
    rcl r;
    rcl_open(&r, &td_fx);
    rcl_hello(&r);
    setup st;
    setup_attn(&r, &st, "attn");
    const int steps = 3;
    uint64_t total = 0, computed = 0;
    for (int step = 0; step < steps; step++) {
        attn_args a;
        attn_defaults(&a, st.sid, st.bid);
        a.step = (uint32_t)step;
        send_attn(&r, 100 + step, &a);
        Liteattn__Reply *rep = expect_body(&r, 100 + step, LITEATTN__REPLY__BODY_ATTENTION);
        uint32_t nq = (GS + st.bm - 1) / st.bm, nk = (GS + st.bn - 1) / st.bn;
        ck_assert_uint_eq(rep->attention->tiles_total, (uint64_t)GB * GH * nq * nk);
        ck_assert_uint_le(rep->attention->tiles_computed, rep->attention->tiles_total);
        total += rep->attention->tiles_total;
        computed += rep->attention->tiles_computed;
        rcl_free_reply(rep);
    }
    /* Same output and mask as the reference run directly. */
    float *o = calloc(TENSOR_BYTES / 4, sizeof(float));
    uint32_t nq = (GS + st.bm - 1) / st.bm;
    size_t mw = (size_t)GB * GH * nq * st.nkw;
    uint32_t *mask = calloc(mw, sizeof(uint32_t));
    reference(&st, steps, o, mask, mw);
    const float *got = (const float *)st.s.p + 3 * TENSOR_BYTES / 4;
    double num = 0, den = 0;
    for (size_t i = 0; i < TENSOR_BYTES / 4; i++) {
        num += ((double)got[i] - o[i]) * ((double)got[i] - o[i]);
        den += (double)o[i] * o[i];
    }
    ck_assert_msg(sqrt(num / den) < 1e-6, "O differs from the reference: rel L2 %g",
                  sqrt(num / den));

    Liteattn__MaskRead mr = LITEATTN__MASK_READ__INIT;
    mr.session_id = st.sid;
    mr.layer = 0;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 200;
    q.body_case = LITEATTN__REQUEST__BODY_MASK_READ;
    q.mask_read = &mr;
    ck_assert_int_eq(rcl_send(&r, &q, -1), 0);
    Liteattn__Reply *rep = expect_body(&r, 200, LITEATTN__REPLY__BODY_MASK);
    ck_assert_uint_eq(rep->mask->data.len, mw * 4);
    uint32_t nk = (GS + st.bn - 1) / st.bn;
    for (size_t row = 0; row < (size_t)GB * GH * nq; row++)
        for (uint32_t n = 0; n < nk; n++) {
            uint32_t w;
            memcpy(&w, rep->mask->data.data + (row * st.nkw + n / 32) * 4, 4);
            ck_assert_uint_eq((w >> (n % 32)) & 1, (mask[row * st.nkw + n / 32] >> (n % 32)) & 1);
        }
    rcl_free_reply(rep);

    send_session_ref(&r, 201, LITEATTN__REQUEST__BODY_SESSION_INFO, st.sid);
    rep = expect_body(&r, 201, LITEATTN__REPLY__BODY_SESSION_INFO);
    ck_assert_uint_eq(rep->session_info->calls, steps);
    ck_assert_uint_eq(rep->session_info->tiles_total, total);
    ck_assert_uint_eq(rep->session_info->tiles_computed, computed);
    rcl_free_reply(rep);

    /* Unregister: later calls on it fail, the connection stays. */
    Liteattn__BufferUnregister u = LITEATTN__BUFFER_UNREGISTER__INIT;
    u.buffer_id = st.bid;
    q.id = 202;
    q.body_case = LITEATTN__REQUEST__BODY_BUFFER_UNREGISTER;
    q.buffer_unregister = &u;
    ck_assert_int_eq(rcl_send(&r, &q, -1), 0);
    rcl_free_reply(expect_body(&r, 202, LITEATTN__REPLY__BODY_ACK));
    attn_args a;
    attn_defaults(&a, st.sid, st.bid);
    send_attn(&r, 203, &a);
    expect_error(&r, 203, LA_ENOENT);
    free(o);
    free(mask);
    shm_free(&st.s);
    rcl_close(&r);
}
END_TEST

START_TEST(test_bad_extents)
{
    rcl r;
    rcl_open(&r, &td_fx);
    rcl_hello(&r);
    setup st;
    setup_attn(&r, &st, "extents");
    uint64_t id = 100;
    attn_args a;
    /* O starting 100 bytes before the end of the buffer. */
    attn_defaults(&a, st.sid, st.bid);
    a.off[3] = st.s.size - 100;
    send_attn(&r, ++id, &a);
    expect_error(&r, id, LA_ERANGE);
    /* An offset that overflows with the extent. */
    attn_defaults(&a, st.sid, st.bid);
    a.off[0] = UINT64_MAX - 3;
    send_attn(&r, ++id, &a);
    expect_error(&r, id, LA_ERANGE);
    /* Strides that reach past the buffer, and strides that overflow 64 bits. */
    attn_defaults(&a, st.sid, st.bid);
    a.n_strides = 4;
    a.strides[0] = (int64_t)GS * GH * GD, a.strides[1] = GH * GD * 2, a.strides[2] = GD,
    a.strides[3] = 1;
    send_attn(&r, ++id, &a);
    expect_error(&r, id, LA_ERANGE);
    a.strides[1] = INT64_MAX / 2;
    send_attn(&r, ++id, &a);
    expect_error(&r, id, LA_ERANGE);
    /* Negative and oversized sizes and strides. */
    attn_defaults(&a, st.sid, st.bid);
    a.shape[1] = -GS;
    send_attn(&r, ++id, &a);
    expect_error(&r, id, LA_EINVAL);
    a.shape[1] = (int64_t)1 << 40;
    send_attn(&r, ++id, &a);
    expect_error(&r, id, LA_EINVAL);
    attn_defaults(&a, st.sid, st.bid);
    a.n_strides = 4;
    a.strides[0] = -1;
    send_attn(&r, ++id, &a);
    expect_error(&r, id, LA_EINVAL);
    /* More than the session allows. */
    attn_defaults(&a, st.sid, st.bid);
    a.shape[1] = GS + 1;
    send_attn(&r, ++id, &a);
    expect_error(&r, id, LA_EINVAL);
    attn_defaults(&a, st.sid, st.bid);
    a.layer = GL;
    send_attn(&r, ++id, &a);
    expect_error(&r, id, LA_EINVAL);
    /* Too many ranges. */
    attn_defaults(&a, st.sid, st.bid);
    a.n_must_do = 65;
    send_attn(&r, ++id, &a);
    expect_error(&r, id, LA_EINVAL);
    /* Buffers: size 0, larger than the fd, negative as int64. */
    shm s2 = shm_new(4096);
    send_register(&r, ++id, 0, s2.fd);
    expect_error(&r, id, LA_EINVAL);
    send_register(&r, ++id, 8192, s2.fd);
    Liteattn__Reply *rep = expect_body(&r, id, LITEATTN__REPLY__BODY_ERROR);
    ck_assert_msg(rep->error->code == LA_EINVAL || rep->error->code == LA_ERANGE,
                  "register past the fd's size: %s", la_err_name(rep->error->code));
    rcl_free_reply(rep);
    send_register(&r, ++id, (uint64_t)-4096, s2.fd);
    expect_error(&r, id, LA_EINVAL);
    shm_free(&s2);
    /* A correct call still works on this connection. */
    attn_defaults(&a, st.sid, st.bid);
    send_attn(&r, ++id, &a);
    rcl_free_reply(expect_body(&r, id, LITEATTN__REPLY__BODY_ATTENTION));
    rcl_close(&r);
    shm_free(&st.s);
    assert_healthy(&td_fx);
}
END_TEST

START_TEST(test_fd_protocol_errors)
{
    rcl r;
    /* BufferRegister(SHM) without an fd: closed. */
    rcl_open(&r, &td_fx);
    rcl_hello(&r);
    send_register(&r, 2, 4096, -1);
    ck_assert_msg(rcl_eof(&r, 5000), "not closed after a BufferRegister without an fd");
    rcl_close(&r);
    /* An fd riding on a Ping: closed. */
    shm s = shm_new(4096);
    rcl_open(&r, &td_fx);
    rcl_hello(&r);
    Liteattn__Ping p = LITEATTN__PING__INIT;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 3;
    q.body_case = LITEATTN__REQUEST__BODY_PING;
    q.ping = &p;
    ck_assert_int_eq(rcl_send(&r, &q, s.fd), 0);
    ck_assert_msg(rcl_eof(&r, 5000), "not closed after an fd without a BufferRegister");
    rcl_close(&r);
    shm_free(&s);
    assert_healthy(&td_fx);
}
END_TEST

START_TEST(test_inflight_limit)
{
    td_daemon d;
    const char *args[] = {"--max-inflight", "2", NULL};
    start(&d, args);
    rcl r;
    rcl_open(&r, &d);
    rcl_hello(&r);
    setup st;
    setup_attn(&r, &st, "busy");
    /* 8 calls in one write: the first 2 go in flight, the 6 read with them get LA_EBUSY. */
    enum { N = 8 };
    uint8_t *all = NULL;
    size_t total = 0;
    for (int i = 0; i < N; i++) {
        /* Pack each call by sending into a socketpair-free buffer: build with send_attn's
         * message through a temporary rcl on a pipe would be overkill; pack directly. */
        Liteattn__TensorRef t[4];
        int64_t shape[4] = {GB, GS, GH, GD};
        for (int k = 0; k < 4; k++) {
            liteattn__tensor_ref__init(&t[k]);
            t[k].buffer_id = st.bid;
            t[k].has_offset = 1;
            t[k].offset = k * TENSOR_BYTES;
            t[k].n_shape = 4;
            t[k].shape = shape;
        }
        Liteattn__Attention m = LITEATTN__ATTENTION__INIT;
        m.session_id = st.sid;
        m.layer = (uint32_t)(i % GL);
        m.q = &t[0], m.k = &t[1], m.v = &t[2], m.o = &t[3];
        Liteattn__Request q = LITEATTN__REQUEST__INIT;
        q.id = 100 + i;
        q.body_case = LITEATTN__REQUEST__BODY_ATTENTION;
        q.attention = &m;
        uint8_t *b;
        size_t n;
        ck_assert_int_eq(raw_pack(&q, &b, &n), 0);
        all = realloc(all, total + n);
        memcpy(all + total, b, n);
        total += n;
        free(b);
    }
    ck_assert_int_eq(raw_send_bytes(r.fd, all, total, -1), 0);
    free(all);
    int ok = 0, busy = 0;
    char seen[N] = {0};
    for (int i = 0; i < N; i++) {
        Liteattn__Reply *rep = rcl_recv(&r, 10000);
        ck_assert_ptr_nonnull(rep);
        ck_assert_uint_ge(rep->id, 100);
        ck_assert_uint_lt(rep->id, 100 + N);
        ck_assert(!seen[rep->id - 100]);
        seen[rep->id - 100] = 1;
        if (rep->body_case == LITEATTN__REPLY__BODY_ATTENTION)
            ok++;
        else {
            ck_assert_int_eq(rep->body_case, LITEATTN__REPLY__BODY_ERROR);
            ck_assert_int_eq(rep->error->code, LA_EBUSY);
            busy++;
        }
        rcl_free_reply(rep);
    }
    ck_assert_int_eq(ok, 2);
    ck_assert_int_eq(busy, N - 2);
    /* Reading resumed: one more call goes through. */
    attn_args a;
    attn_defaults(&a, st.sid, st.bid);
    send_attn(&r, 300, &a);
    rcl_free_reply(expect_body(&r, 300, LITEATTN__REPLY__BODY_ATTENTION));
    rcl_close(&r);
    shm_free(&st.s);
    assert_healthy(&d);
    stop_ok(&d);
}
END_TEST

START_TEST(test_client_killed)
{
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        rcl r;
        rcl_open(&r, &td_fx);
        rcl_hello(&r);
        setup st;
        setup_attn(&r, &st, "doomed");
        for (int i = 0; i < 6; i++) {
            attn_args a;
            attn_defaults(&a, st.sid, st.bid);
            a.layer = (uint32_t)(i % GL);
            send_attn(&r, 100 + i, &a);
        }
        raise(SIGKILL);
        _exit(1);
    }
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    assert_healthy(&td_fx);
    /* Its buffer goes away once its calls finished; its session stays, detached. */
    rcl r;
    rcl_open(&r, &td_fx);
    rcl_hello(&r);
    int64_t buffers = -1;
    for (int i = 0; i < 200 && buffers != 0; i++) {
        buffers = stat_of(&r, 10 + i, "buffers");
        if (buffers != 0)
            usleep(20000);
    }
    ck_assert_int_eq(buffers, 0);
    ck_assert_int_eq(stat_of(&r, 500, "server.connections"), 1);
    Liteattn__SessionAttach at = LITEATTN__SESSION_ATTACH__INIT;
    at.key = (char *)"doomed";
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 501;
    q.body_case = LITEATTN__REQUEST__BODY_SESSION_ATTACH;
    q.session_attach = &at;
    ck_assert_int_eq(rcl_send(&r, &q, -1), 0);
    rcl_free_reply(expect_body(&r, 501, LITEATTN__REPLY__BODY_SESSION));
    rcl_close(&r);
}
END_TEST

/* Exit status of the other-user child: 0 or the failing check's number. */
static int other_user_child(const td_daemon *d, uint64_t sid)
{
    if (setgid(65534) != 0 || setuid(65534) != 0)
        return 2;
    rcl r;
    r.fd = td_connect(d);
    if (r.fd < 0)
        return 3;
    send_hello(&r, 1, LA_PROTOCOL_MAJOR);
    Liteattn__Reply *rep = rcl_recv(&r, 5000);
    if (!rep || rep->body_case != LITEATTN__REPLY__BODY_HELLO)
        return 4;
    rcl_free_reply(rep);
    int body[3] = {LITEATTN__REQUEST__BODY_SESSION_INFO, LITEATTN__REQUEST__BODY_SESSION_RESET,
                   LITEATTN__REQUEST__BODY_SESSION_CLOSE};
    for (int i = 0; i < 3; i++) {
        send_session_ref(&r, 10 + i, body[i], sid);
        rep = rcl_recv(&r, 5000);
        if (!rep || rep->body_case != LITEATTN__REPLY__BODY_ERROR || rep->error->code != LA_ENOENT)
            return 10 + i;
        rcl_free_reply(rep);
    }
    Liteattn__SessionAttach at = LITEATTN__SESSION_ATTACH__INIT;
    at.key = (char *)"root-gen";
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 20;
    q.body_case = LITEATTN__REQUEST__BODY_SESSION_ATTACH;
    q.session_attach = &at;
    rcl_send(&r, &q, -1);
    rep = rcl_recv(&r, 5000);
    if (!rep || rep->body_case != LITEATTN__REPLY__BODY_ERROR || rep->error->code != LA_ENOENT)
        return 20;
    rcl_free_reply(rep);
    Liteattn__MaskRead mr = LITEATTN__MASK_READ__INIT;
    mr.session_id = sid;
    q.id = 21;
    q.body_case = LITEATTN__REQUEST__BODY_MASK_READ;
    q.mask_read = &mr;
    rcl_send(&r, &q, -1);
    rep = rcl_recv(&r, 5000);
    if (!rep || rep->body_case != LITEATTN__REPLY__BODY_ERROR || rep->error->code != LA_ENOENT)
        return 21;
    rcl_free_reply(rep);
    Liteattn__SessionList sl = LITEATTN__SESSION_LIST__INIT;
    q.id = 22;
    q.body_case = LITEATTN__REQUEST__BODY_SESSION_LIST;
    q.session_list = &sl;
    rcl_send(&r, &q, -1);
    rep = rcl_recv(&r, 5000);
    if (!rep || rep->body_case != LITEATTN__REPLY__BODY_SESSION_LIST ||
        rep->session_list->n_sessions != 0)
        return 22;
    rcl_free_reply(rep);
    /* The same key is free for this user: its own session, separate from root's. */
    send_open(&r, 23, "root-gen", LITEATTN__DTYPE__DTYPE_F32, 0);
    rep = rcl_recv(&r, 5000);
    if (!rep || rep->body_case != LITEATTN__REPLY__BODY_SESSION || rep->session->session_id == sid)
        return 23;
    rcl_free_reply(rep);
    rcl_close(&r);
    return 0;
}

START_TEST(test_other_user)
{
    if (geteuid() != 0) {
        fprintf(stderr, "test_other_user: skipped (needs root to run a client as uid 65534)\n");
        return;
    }
    td_daemon d;
    const char *args[] = {"--socket-mode", "0666", NULL};
    start(&d, args);
    rcl r;
    rcl_open(&r, &d);
    rcl_hello(&r);
    uint64_t sid = open_session(&r, 2, "root-gen", NULL, NULL, NULL);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0)
        _exit(other_user_child(&d, sid));
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "the uid 65534 client failed at check %d", WEXITSTATUS(status));
    /* Root's session is untouched. */
    send_session_ref(&r, 3, LITEATTN__REQUEST__BODY_SESSION_INFO, sid);
    rcl_free_reply(expect_body(&r, 3, LITEATTN__REPLY__BODY_SESSION_INFO));
    rcl_close(&r);
    assert_healthy(&d);
    stop_ok(&d);
}
END_TEST

START_TEST(test_connections_per_user)
{
    td_daemon d;
    const char *args[] = {"--max-connections-per-user", "3", NULL};
    start(&d, args);
    rcl r[3], extra;
    for (int i = 0; i < 3; i++) {
        rcl_open(&r[i], &d);
        rcl_hello(&r[i]);
    }
    rcl_open(&extra, &d);
    expect_error(&extra, 0, LA_ELIMIT);
    ck_assert(rcl_eof(&extra, 5000));
    rcl_close(&extra);
    rcl_close(&r[0]);
    /* Once the daemon saw the close, there is room again. */
    int ok = 0;
    for (int i = 0; i < 100 && !ok; i++) {
        rcl_open(&extra, &d);
        send_hello(&extra, 1, LA_PROTOCOL_MAJOR);
        Liteattn__Reply *rep = rcl_recv(&extra, 5000);
        ck_assert_ptr_nonnull(rep);
        ok = rep->body_case == LITEATTN__REPLY__BODY_HELLO;
        rcl_free_reply(rep);
        if (!ok) {
            rcl_close(&extra);
            usleep(20000);
        }
    }
    ck_assert(ok);
    rcl_close(&extra);
    rcl_close(&r[1]);
    rcl_close(&r[2]);
    stop_ok(&d);
}
END_TEST

/* A clean SIGTERM leaves neither the socket nor its lock file behind, and a second daemon on
 * the same path starts afterwards (it locks a fresh lock file). */
START_TEST(test_sigterm_removes_lock)
{
    td_daemon d;
    start(&d, NULL);
    char lock[160];
    snprintf(lock, sizeof(lock), "%s.lock", d.socket);
    ck_assert_msg(access(lock, F_OK) == 0, "no lock file %s while the daemon runs", lock);
    kill(d.pid, SIGTERM);
    ck_assert_int_eq(td_wait(&d, 10000), 0);
    ck_assert_msg(access(lock, F_OK) < 0 && errno == ENOENT, "%s left behind", lock);
    ck_assert_msg(access(d.socket, F_OK) < 0 && errno == ENOENT, "%s left behind", d.socket);
    stop_ok(&d);
}
END_TEST

/* On a machine without an NVIDIA driver the auto backend says so in those words, not with the
 * CUDA runtime's "driver version is insufficient". Only meaningful where CUDA was built in and
 * no driver is present. */
START_TEST(test_no_driver_message)
{
#ifndef LA_HAVE_CUDA
    fprintf(stderr, "test_no_driver_message: built without CUDA, nothing to check\n");
#else
    if (access("/dev/nvidiactl", F_OK) == 0) {
        fprintf(stderr, "test_no_driver_message: an NVIDIA driver is present, nothing to check\n");
        return;
    }
    td_daemon d;
    const char *args[] = {"--backend", "auto", NULL};
    start(&d, args);
    /* The socket listens before the engine starts: wait for the "listening" line. */
    char line[1024], first[1024] = "";
    int found = 0, insufficient = 0, listening = 0;
    for (int tries = 0; !listening && tries < 1000; tries++) {
        FILE *f = fopen(d.log, "r");
        ck_assert_ptr_nonnull(f);
        found = insufficient = 0;
        while (fgets(line, sizeof(line), f)) {
            if (!first[0])
                snprintf(first, sizeof(first), "%s", line);
            found |= strstr(line, "cuda backend not used: no NVIDIA driver/GPU found") != NULL;
            insufficient |= strstr(line, "insufficient") != NULL;
            listening |= strstr(line, " listening on ") != NULL;
        }
        fclose(f);
        if (!listening)
            usleep(10000);
    }
    ck_assert_msg(found && !insufficient,
                  "the log does not say \"no NVIDIA driver/GPU found\"; it begins: %s", first);
    stop_ok(&d);
#endif
}
END_TEST

START_TEST(test_sigterm_inflight)
{
    GS = 1024; /* calls of a few hundred ms on 2 cores: still running when the signal comes */
    td_daemon d;
    start(&d, NULL);
    rcl r;
    rcl_open(&r, &d);
    rcl_hello(&r);
    setup st;
    setup_attn(&r, &st, "term");
    for (int i = 0; i < 4; i++) {
        attn_args a;
        attn_defaults(&a, st.sid, st.bid);
        a.layer = (uint32_t)(i % GL);
        send_attn(&r, 100 + i, &a);
    }
    /* Make sure the daemon read them before the signal (a Ping is answered in order). */
    send_ping(&r, 99);
    Liteattn__Reply *rep;
    int answered = 0, pong = 0;
    while (!pong) {
        rep = rcl_recv(&r, 10000);
        ck_assert_ptr_nonnull(rep);
        if (rep->body_case == LITEATTN__REPLY__BODY_PONG)
            pong = 1;
        else {
            ck_assert_int_eq(rep->body_case, LITEATTN__REPLY__BODY_ATTENTION);
            answered++;
        }
        rcl_free_reply(rep);
    }
    int before = answered;
    kill(d.pid, SIGTERM);
    /* Every call is answered: the running ones finish (or stop at a slice boundary) and the
     * queued ones are cancelled at once, with LA_ESHUTDOWN. */
    while (answered < 4) {
        rep = rcl_recv(&r, 10000);
        ck_assert_msg(rep != NULL, "only %d of 4 calls answered before the daemon left", answered);
        if (rep->body_case == LITEATTN__REPLY__BODY_ERROR)
            ck_assert_int_eq(rep->error->code, LA_ESHUTDOWN);
        else
            ck_assert_int_eq(rep->body_case, LITEATTN__REPLY__BODY_ATTENTION);
        answered++;
        rcl_free_reply(rep);
    }
    if (before == 4)
        fprintf(stderr, "test_sigterm_inflight: note: every call finished before SIGTERM\n");
    ck_assert(rcl_eof(&r, 10000));
    ck_assert_int_eq(td_wait(&d, 10000), 0);
    rcl_close(&r);
    shm_free(&st.s);
    ck_assert_int_eq(td_stop(&d), 0);
}
END_TEST

START_TEST(test_slow_reader)
{
    td_daemon d;
    const char *args[] = {"--max-outbound-bytes", "64K", NULL};
    start(&d, args);
    rcl r;
    rcl_open(&r, &d);
    rcl_hello(&r);
    /* 200000 pings (about 2.4 MB of replies) and never a read: more than the socket buffers
     * and the 64 KiB outbound limit hold, so the daemon drops this client. */
    enum { N = 200000 };
    size_t cap = (size_t)N * 16, total = 0;
    uint8_t *all = malloc(cap);
    for (uint64_t id = 2; id < N + 2; id++) {
        Liteattn__Ping p = LITEATTN__PING__INIT;
        Liteattn__Request q = LITEATTN__REQUEST__INIT;
        q.id = id;
        q.body_case = LITEATTN__REQUEST__BODY_PING;
        q.ping = &p;
        uint8_t *b;
        size_t n;
        ck_assert_int_eq(raw_pack(&q, &b, &n), 0);
        ck_assert_uint_le(total + n, cap);
        memcpy(all + total, b, n);
        total += n;
        free(b);
    }
    raw_send_bytes(r.fd, all, total, -1); /* fails part-way once the daemon closes: fine */
    free(all);
    ck_assert_msg(rcl_eof(&r, 10000), "a client that never reads was not disconnected");
    rcl_close(&r);
    assert_healthy(&d);
    stop_ok(&d);
}
END_TEST

START_TEST(test_config_file)
{
    char conf[] = "/tmp/la-conf.XXXXXX";
    int fd = mkstemp(conf);
    ck_assert_int_ge(fd, 0);
    const char *text = "# a comment\n  max_inflight = 3  # trailing comment\nmax_buffers=7\n"
                       "log_level = \"debug\"\nmax_frame = 128K\n";
    ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    td_daemon d;
    /* The file's keys apply; a command-line flag overrides the file wherever it stands. */
    const char *args[] = {"--max-buffers", "9", "--config", conf, NULL};
    int rc = td_start(&d, args);
    unlink(conf);
    ck_assert_int_eq(rc, 0);
    rcl r;
    rcl_open(&r, &d);
    send_hello(&r, 1, LA_PROTOCOL_MAJOR);
    Liteattn__Reply *rep = expect_body(&r, 1, LITEATTN__REPLY__BODY_HELLO);
    ck_assert_uint_eq(rep->hello->limits->max_inflight, 3);
    ck_assert_uint_eq(rep->hello->limits->max_buffers, 9);
    ck_assert_uint_eq(rep->hello->limits->max_frame, 128 * 1024);
    rcl_free_reply(rep);
    rcl_close(&r);
    stop_ok(&d);
}
END_TEST

START_TEST(test_second_signal)
{
    GS = 1024;
    td_daemon d;
    /* Calls in one slice each, so that the running ones still run when the second signal
     * comes (SIGTERM cancels only the queued ones at once). */
    const char *args[] = {"--cpu-slice", "1T", NULL};
    start(&d, args);
    rcl r;
    rcl_open(&r, &d);
    rcl_hello(&r);
    setup st;
    setup_attn(&r, &st, "second");
    for (int i = 0; i < 8; i++) {
        attn_args a;
        attn_defaults(&a, st.sid, st.bid);
        a.layer = (uint32_t)(i % GL);
        send_attn(&r, 100 + i, &a);
    }
    send_ping(&r, 99);
    for (;;) { /* the calls were read once the Ping is answered */
        Liteattn__Reply *rep = rcl_recv(&r, 10000);
        ck_assert_ptr_nonnull(rep);
        int pong = rep->body_case == LITEATTN__REPLY__BODY_PONG;
        rcl_free_reply(rep);
        if (pong)
            break;
    }
    kill(d.pid, SIGTERM);
    kill(d.pid, SIGINT);
    ck_assert_int_eq(td_wait(&d, 10000), 1);
    ck_assert_int_eq(td_stop(&d), 1);
    rcl_close(&r);
    shm_free(&st.s);
}
END_TEST

/* liteattnd with arguments, no socket: its exit status. */
static int run_daemon(const char *const *args)
{
    const char *build = getenv("BUILD");
    char exe[256];
    snprintf(exe, sizeof(exe), "%s/liteattnd", build && *build ? build : "build");
    pid_t pid = fork();
    if (pid == 0) {
        const char *argv[16] = {exe};
        int n = 1;
        for (int i = 0; args[i] && n < 15; i++)
            argv[n++] = args[i];
        argv[n] = NULL;
        int nul = open("/dev/null", O_WRONLY);
        dup2(nul, 1);
        dup2(nul, 2);
        execv(exe, (char *const *)argv);
        _exit(127);
    }
    int st;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

START_TEST(test_options)
{
    const char *bad1[] = {"--bogus", NULL};
    const char *bad2[] = {"--max-frame", "12Q", NULL};
    const char *bad3[] = {"--backend", "tpu", NULL};
    const char *bad4[] = {"--config", "/nonexistent/liteattnd.conf", NULL};
    const char *bad5[] = {"--max-inflight", "0", NULL};
    const char *help[] = {"--help", NULL};
    const char *ver[] = {"--version", NULL};
    ck_assert_int_eq(run_daemon(bad1), 2);
    ck_assert_int_eq(run_daemon(bad2), 2);
    ck_assert_int_eq(run_daemon(bad3), 2);
    ck_assert_int_eq(run_daemon(bad4), 2);
    ck_assert_int_eq(run_daemon(bad5), 2);
    ck_assert_int_eq(run_daemon(help), 0);
    ck_assert_int_eq(run_daemon(ver), 0);
    /* A second daemon on the same socket refuses to start; the first goes on. */
    td_daemon d;
    start(&d, NULL);
    const char *dup[] = {"--socket", d.socket, "--backend", "cpu", "--config", "/dev/null", NULL};
    ck_assert_int_eq(run_daemon(dup), 1);
    assert_healthy(&d);
    stop_ok(&d);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("daemon");
    TCase *tc = tcase_create("protocol");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_hello);
    tcase_add_test(tc, test_hello_timeout);
    tcase_add_test(tc, test_oversize_frame);
    tcase_add_test(tc, test_options);
    tcase_add_test(tc, test_slow_reader);
    suite_add_tcase(s, tc);
    tc = tcase_create("protocol_shared");
    tcase_set_timeout(tc, 30);
    tcase_add_unchecked_fixture(tc, td_fx_up, td_fx_down);
    tcase_add_test(tc, test_no_hello);
    tcase_add_test(tc, test_wrong_major);
    tcase_add_test(tc, test_undecodable);
    tcase_add_test(tc, test_truncated_then_eof);
    tcase_add_test(tc, test_ping_pipeline);
    tcase_add_test(tc, test_fd_protocol_errors);
    suite_add_tcase(s, tc);
    tc = tcase_create("engine");
    tcase_set_timeout(tc, 30);
    tcase_add_checked_fixture(tc, td_fx_up, td_fx_down);
    tcase_add_test(tc, test_unknown_session);
    tcase_add_test(tc, test_session_lifecycle);
    tcase_add_test(tc, test_many_sessions_listed);
    tcase_add_test(tc, test_attention_shm);
    tcase_add_test(tc, test_bad_extents);
    tcase_add_test(tc, test_client_killed);
    suite_add_tcase(s, tc);
    tc = tcase_create("engine_own_daemon");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_inflight_limit);
    tcase_add_test(tc, test_other_user);
    tcase_add_test(tc, test_connections_per_user);
    tcase_add_test(tc, test_sigterm_removes_lock);
    tcase_add_test(tc, test_no_driver_message);
    tcase_add_test(tc, test_sigterm_inflight);
    tcase_add_test(tc, test_second_signal);
    tcase_add_test(tc, test_config_file);
    suite_add_tcase(s, tc);
    return tu_run(s); /* CK_VERBOSITY=verbose lists the cases */
}
