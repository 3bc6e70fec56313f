/*
 * check_fastpath.c — the fast path's protocol and error paths through the CPU backend (what CI
 * can run): la_attn_enqueue pipelined across layers against la_attn_run of a twin session and
 * against float64 attention; an error in the middle of a pipeline reported by the next call
 * and by la_session_sync while the later calls still complete; the doorbell slot words the
 * daemon writes for calls that succeed, fail validation, are refused at the in-flight limit or
 * were never rung (raw protocol, the slots read directly); DoorbellRegister's refusals; a
 * client that disconnects with calls in flight.
 *
 * The GPU half (calls ordered on CUDA streams) is tests/check_gpu_daemon.c.
 */
#include <check.h>
#include <fcntl.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "la_attn.h"
#include "liteattn.h"
#include "liteattn.pb-c.h"
#include "rawproto.h"
#include "testutil.h"
#include "testutil_daemon.h"

#define OK(expr)                                                                                   \
    do {                                                                                           \
        int rc_ = (expr);                                                                          \
        ck_assert_msg(rc_ == 0, "%s = %s (%s)", #expr, la_err_name(rc_), la_last_error_message()); \
    } while (0)

static la_client *connect_ok(const td_daemon *d)
{
    la_client *c = NULL;
    int rc = la_connect(d->socket, "check_fastpath", &c);
    ck_assert_msg(rc == 0, "la_connect: %s (%s)", la_err_name(rc), la_last_error_message());
    return c;
}

enum { H = 2, D = 64 };

static la_session *open_session(la_client *c, const char *key, uint32_t layers, uint32_t S,
                                float tau)
{
    la_session_config *cfg;
    OK(la_session_config_new(&cfg));
    OK(la_session_config_set_geometry(cfg, layers, H, D, LA_DTYPE_F32, S, S, 1, 1));
    OK(la_session_config_set_threshold(cfg, tau));
    OK(la_session_config_set_device(cfg, "cpu"));
    la_session *s = NULL;
    OK(la_session_open(c, key, cfg, &s));
    la_session_config_free(cfg);
    return s;
}

/* L layers of f32 tensors [1, S, H, D] in one host buffer: per layer Q, K, V, O, LSE. */
typedef struct bank {
    int L, S;
    size_t n;     /* elements of one [1, S, H, D] tensor */
    size_t layer; /* bytes of one layer's tensors */
    la_buffer *buf;
    uint8_t *base;
    la_attn **a; /* per layer, pointing at its tensors */
} bank;

static size_t off_of(const bank *b, int l, int t) /* t: 0 q, 1 k, 2 v, 3 o, 4 lse */
{
    return (size_t)l * b->layer + (size_t)t * b->n * 4;
}

static void bank_init(bank *b, la_client *c, int L, int S)
{
    memset(b, 0, sizeof(*b));
    b->L = L;
    b->S = S;
    b->n = (size_t)S * H * D;
    b->layer = 4 * b->n * 4 + (size_t)H * S * 4;
    OK(la_buffer_new_host(c, b->layer * (size_t)L, &b->buf));
    b->base = la_buffer_host_ptr(b->buf);
    b->a = calloc((size_t)L, sizeof(*b->a));
    int64_t sh[4] = {1, S, H, D}, shl[3] = {1, H, S};
    for (int l = 0; l < L; l++) {
        OK(la_attn_new(&b->a[l]));
        for (int t = 0; t < 4; t++)
            OK(la_attn_set_tensor(b->a[l], (la_tensor_role)t, b->buf, off_of(b, l, t), LA_DTYPE_F32,
                                  4, sh, NULL));
        OK(la_attn_set_tensor(b->a[l], LA_TENSOR_LSE, b->buf, off_of(b, l, 4), LA_DTYPE_F32, 3, shl,
                              NULL));
    }
}

static void bank_free(bank *b)
{
    for (int l = 0; l < b->L; l++)
        la_attn_free(b->a[l]);
    free(b->a);
    OK(la_buffer_unregister(b->buf));
}

/* The bank's calls only: its buffer went with its client (la_disconnect). */
static void bank_forget(bank *b)
{
    for (int l = 0; l < b->L; l++)
        la_attn_free(b->a[l]);
    free(b->a);
}

static float *tensor(const bank *b, int l, int t) { return (float *)(b->base + off_of(b, l, t)); }

/* Inputs of (layer, step): a fixed random part and a smaller step-dependent one. Queries and
 * keys of the same quarter of the sequence share a centre, so that attention stays mostly
 * inside the quarter and tau = -3 finds tiles to skip. */
static void bank_fill(bank *b, int l, int step)
{
    tu_rng fixed, drift;
    tu_rng_init(&fixed, 1000 + (uint64_t)l);
    tu_rng_init(&drift, 5000 + (uint64_t)l * 97 + (uint64_t)step);
    double centre[4][H][D];
    for (int c = 0; c < 4; c++)
        for (int h = 0; h < H; h++)
            for (int e = 0; e < D; e++)
                centre[c][h][e] = 0.6 * tu_rng_normal(&fixed);
    for (int t = 0; t < 3; t++) {
        float *x = tensor(b, l, t);
        for (size_t i = 0; i < b->n; i++) {
            size_t tok = i / ((size_t)H * D), h = i / D % H, e = i % D;
            double c = t < 2 ? centre[tok * 4 / (size_t)b->S][h][e] : 0.0;
            x[i] = (float)(c + tu_rng_normal(&fixed) * 0.5 + 0.05 * tu_rng_normal(&drift));
        }
    }
    memset(tensor(b, l, 3), 0xff, b->n * 4); /* NaN: the call must write every element */
}

/* Copies layer l's inputs of a into b. */
static void bank_copy_inputs(bank *dst, const bank *src, int l)
{
    for (int t = 0; t < 3; t++)
        memcpy(tensor(dst, l, t), tensor(src, l, t), src->n * 4);
    memset(tensor(dst, l, 3), 0xff, src->n * 4);
}

static void outputs_equal(const bank *x, const bank *y, int l, const char *what)
{
    ck_assert_msg(!memcmp(tensor(x, l, 3), tensor(y, l, 3), x->n * 4), "%s: O of layer %d differs",
                  what, l);
    ck_assert_msg(!memcmp(tensor(x, l, 4), tensor(y, l, 4), (size_t)H * x->S * 4),
                  "%s: LSE of layer %d differs", what, l);
}

/* Layer l's O against float64 attention over every tile. */
static void dense_vs_f64(const bank *b, int l)
{
    la_attn_params p;
    tu_params(&p, tensor(b, l, 0), tensor(b, l, 1), tensor(b, l, 2), tensor(b, l, 3), NULL, NULL, 1,
              b->S, b->S, H, D, LA_DTYPE_F32, 128, 64);
    double *ref = malloc(b->n * sizeof(double)), *got = malloc(b->n * sizeof(double));
    naive_attn_f64(&p, NULL, ref, NULL);
    tu_o_f64(&p, got);
    double err = tu_rel_l2(ref, got, (int64_t)b->n);
    ck_assert_msg(err <= 2e-5, "layer %d: rel L2 %.3g against float64 attention", l, err);
    free(ref);
    free(got);
}

static int64_t counter(const la_session *s, const char *name)
{
    int64_t v = -1;
    OK(la_session_counter(s, name, &v));
    return v;
}

/* ---- through the library ------------------------------------------------------------------- */

START_TEST(test_pipeline_matches_sync_and_f64)
{
    td_daemon d;
    ck_assert_int_eq(td_start(&d, NULL), 0);
    la_client *c = connect_ok(&d);
    const char *fp = la_client_property(c, "fastpath.devices");
    ck_assert_ptr_nonnull(fp);
    ck_assert_msg(strstr(fp, "cpu") != NULL, "fastpath.devices = '%s'", fp);
    ck_assert_ptr_nonnull(la_client_property(c, "limit.doorbell_timeout_ms"));
    enum { L = 8, S = 320, STEPS = 3 }; /* partial tiles: 320 = 2.5 x 128 */
    la_session *fast = open_session(c, "fast", L, S, -3.0f);
    la_session *slow = open_session(c, "slow", L, S, -3.0f);
    OK(la_session_fastpath(fast));
    bank bf, bs;
    bank_init(&bf, c, L, S);
    bank_init(&bs, c, L, S);
    for (int step = 0; step < STEPS; step++) {
        for (int l = 0; l < L; l++) {
            bank_fill(&bf, l, step);
            bank_copy_inputs(&bs, &bf, l);
            OK(la_attn_set_position(bf.a[l], (uint32_t)l, (uint32_t)step, 0));
            OK(la_attn_set_position(bs.a[l], (uint32_t)l, (uint32_t)step, 0));
        }
        /* All layers in flight at once, no handles: the first error would be deferred. */
        for (int l = 0; l < L; l++)
            OK(la_attn_enqueue(fast, bf.a[l], NULL, NULL));
        OK(la_session_sync(fast, 30000));
        ck_assert_int_eq(counter(fast, "inflight"), 0);
        for (int l = 0; l < L; l++)
            OK(la_attn_run(slow, bs.a[l], NULL));
        for (int l = 0; l < L; l++) {
            outputs_equal(&bf, &bs, l, "enqueued against run");
            if (step == 0)
                dense_vs_f64(&bf, l); /* the first step of a session is dense */
        }
    }
    /* The masks the two sessions built are the same. */
    int64_t mbytes;
    OK(la_session_get(fast, "layer_mask_bytes", &mbytes));
    uint32_t *m1 = malloc((size_t)mbytes), *m2 = malloc((size_t)mbytes);
    for (int l = 0; l < L; l++) {
        OK(la_session_read_mask(fast, (uint32_t)l, 0, m1, (size_t)mbytes));
        OK(la_session_read_mask(slow, (uint32_t)l, 0, m2, (size_t)mbytes));
        ck_assert_msg(!memcmp(m1, m2, (size_t)mbytes), "layer %d: masks differ", l);
    }
    free(m1);
    free(m2);
    ck_assert_int_eq(counter(fast, "calls"), L * STEPS);
    ck_assert_int_eq(counter(fast, "failed"), 0);
    int64_t tiles = 0, computed = 0;
    OK(la_session_stat(fast, "tiles_total", &tiles));
    OK(la_session_stat(fast, "tiles_computed", &computed));
    ck_assert_int_eq(counter(fast, "tiles_total"), tiles);
    ck_assert_int_eq(counter(fast, "tiles_computed"), computed);
    ck_assert_int_lt(computed, tiles); /* tau = -3 skipped tiles after step 0 */
    ck_assert_int_eq(la_session_counter(fast, "bogus", NULL), LA_ENOENT);
    /* A CPU session has no stream to order on. */
    ck_assert_int_eq(la_attn_enqueue(fast, bf.a[0], (void *)0x1, NULL), LA_EINVAL);
    la_table *t;
    OK(la_stats(c, &t));
    int64_t fcalls = -1, ndb = -1;
    for (size_t r = 0; r < la_table_rows(t); r++) {
        const char *name = la_table_text(t, r, 0);
        if (!strcmp(name, "fastpath_calls"))
            OK(la_table_int(t, r, "value", &fcalls));
        if (!strcmp(name, "doorbells"))
            OK(la_table_int(t, r, "value", &ndb));
    }
    la_table_free(t);
    ck_assert_int_eq(fcalls, L * STEPS);
    ck_assert_int_eq(ndb, 1);
    bank_free(&bf);
    bank_free(&bs);
    OK(la_session_close(fast));
    OK(la_session_close(slow));
    la_disconnect(c);
    ck_assert_int_eq(td_stop(&d), 0);
}
END_TEST

START_TEST(test_error_mid_pipeline)
{
    td_daemon d;
    ck_assert_int_eq(td_start(&d, NULL), 0);
    la_client *c = connect_ok(&d);
    enum { L = 8, S = 256, BAD = 4 };
    la_session *fast = open_session(c, "fast", L, S, -INFINITY);
    la_session *slow = open_session(c, "slow", L, S, -INFINITY);
    bank bf, bs;
    bank_init(&bf, c, L, S);
    bank_init(&bs, c, L, S);
    int64_t bad_range[2] = {0, S + 64}; /* past the call's keys: the engine refuses it */
    for (int l = 0; l < L; l++) {
        bank_fill(&bf, l, 0);
        bank_copy_inputs(&bs, &bf, l);
        OK(la_attn_set_position(bf.a[l], (uint32_t)l, 0, 0));
        OK(la_attn_set_position(bs.a[l], (uint32_t)l, 0, 0));
    }
    OK(la_attn_set_must_do(bf.a[BAD], bad_range, 1));
    /* Every enqueue succeeds: the error comes with a reply. */
    for (int l = 0; l < L; l++)
        OK(la_attn_enqueue(fast, bf.a[l], NULL, NULL));
    int rc = la_session_sync(fast, 30000);
    ck_assert_int_eq(rc, LA_EINVAL);
    const char *msg = la_last_error_message();
    ck_assert_msg(strstr(msg, "layer 4") && strstr(msg, "must-do"), "message: %s", msg);
    OK(la_session_sync(fast, 1000)); /* reported once */
    ck_assert_int_eq(counter(fast, "failed"), 1);
    ck_assert_int_eq(counter(fast, "calls"), L - 1);
    for (int l = 0; l < L; l++) {
        if (l == BAD)
            continue;
        OK(la_attn_run(slow, bs.a[l], NULL));
        outputs_equal(&bf, &bs, l, "calls around the failed one");
        dense_vs_f64(&bf, l);
    }

    /* The next call reports a deferred error instead of being made. */
    OK(la_attn_set_position(bf.a[BAD], BAD, 1, 0));
    OK(la_attn_enqueue(fast, bf.a[BAD], NULL, NULL));
    for (int guard = 0; counter(fast, "failed") < 2; guard++) {
        ck_assert_int_lt(guard, 1000);
        ck_assert_int_ge(la_client_process(c, 100), 0);
    }
    OK(la_attn_set_position(bf.a[0], 0, 1, 0));
    ck_assert_int_eq(la_attn_enqueue(fast, bf.a[0], NULL, NULL), LA_EINVAL);
    ck_assert_msg(strstr(la_last_error_message(), "asynchronous call (layer 4, step 1)"),
                  "message: %s", la_last_error_message());
    ck_assert_int_eq(counter(fast, "inflight"), 0); /* that call was not made */
    OK(la_attn_enqueue(fast, bf.a[0], NULL, NULL));
    OK(la_client_sync(c, 30000));
    ck_assert_int_eq(counter(fast, "calls"), L);

    /* With a handle, the error is the call's, not deferred. */
    la_call *call;
    OK(la_attn_set_position(bf.a[BAD], BAD, 2, 0));
    OK(la_attn_enqueue(fast, bf.a[BAD], NULL, &call));
    ck_assert_int_eq(la_call_wait(call, 30000), LA_EINVAL);
    la_call_free(call);
    OK(la_session_sync(fast, 1000));

    /* A deferred error of a session closed meanwhile is the client's. */
    OK(la_attn_set_position(bf.a[BAD], BAD, 3, 0));
    OK(la_attn_enqueue(fast, bf.a[BAD], NULL, NULL));
    for (int guard = 0; counter(fast, "failed") < 4; guard++) {
        ck_assert_int_lt(guard, 1000);
        ck_assert_int_ge(la_client_process(c, 100), 0);
    }
    OK(la_session_close(fast));
    ck_assert_int_eq(la_client_sync(c, 1000), LA_EINVAL);
    OK(la_client_sync(c, 1000));
    bank_free(&bf);
    bank_free(&bs);
    OK(la_session_close(slow));
    la_disconnect(c);
    ck_assert_int_eq(td_stop(&d), 0);
}
END_TEST

/* A client that disconnects with calls in flight: the daemon finishes or cancels them,
 * releases the doorbell and goes on serving. */
START_TEST(test_disconnect_in_flight)
{
    td_daemon d;
    ck_assert_int_eq(td_start(&d, NULL), 0);
    la_client *c = connect_ok(&d);
    enum { L = 4, S = 1024 };
    la_session *s = open_session(c, "gone", L, S, -3.0f);
    bank b;
    bank_init(&b, c, L, S);
    for (int round = 0; round < 3; round++)
        for (int l = 0; l < L; l++) {
            bank_fill(&b, l, 0);
            OK(la_attn_set_position(b.a[l], (uint32_t)l, (uint32_t)round, 0));
            OK(la_attn_enqueue(s, b.a[l], NULL, NULL));
        }
    la_disconnect(c); /* no sync: calls in flight */
    bank_forget(&b);
    la_client *c2 = connect_ok(&d);
    OK(la_ping(c2, NULL));
    int64_t ndb = -1;
    for (int guard = 0; guard < 200 && ndb != 0; guard++) {
        la_table *t;
        OK(la_stats(c2, &t));
        for (size_t r = 0; r < la_table_rows(t); r++)
            if (!strcmp(la_table_text(t, r, 0), "doorbells"))
                OK(la_table_int(t, r, "value", &ndb));
        la_table_free(t);
        if (ndb != 0)
            usleep(20000);
    }
    ck_assert_int_eq(ndb, 0);
    /* And a new client's fast path works as before. */
    la_session *s2 = open_session(c2, "after", 1, 256, -INFINITY);
    bank b2;
    bank_init(&b2, c2, 1, 256);
    bank_fill(&b2, 0, 0);
    OK(la_attn_enqueue(s2, b2.a[0], NULL, NULL));
    OK(la_session_sync(s2, 30000));
    dense_vs_f64(&b2, 0);
    bank_free(&b2);
    OK(la_session_close(s2));
    la_disconnect(c2);
    ck_assert_int_eq(td_stop(&d), 0);
}
END_TEST

/* ---- raw protocol: the slot words ------------------------------------------------------------ */

typedef struct raw_db {
    int fd;
    size_t len;
    volatile uint32_t *w; /* slot i: w[4i] ready, w[4i+1] done, w[4i+2] status */
} raw_db;

static void raw_db_make(raw_db *db, size_t len)
{
    db->len = len;
    db->fd = raw_memfd(len);
    ck_assert_int_ge(db->fd, 0);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, db->fd, 0);
    ck_assert_ptr_ne(p, MAP_FAILED);
    db->w = p;
}

static int raw_db_register(int sock, int fd, uint32_t slots)
{
    Liteattn__DoorbellRegister dr = LITEATTN__DOORBELL_REGISTER__INIT;
    dr.slots = slots;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 7;
    q.body_case = LITEATTN__REQUEST__BODY_DOORBELL_REGISTER;
    q.doorbell_register = &dr;
    Liteattn__Reply *r = raw_call_fd(sock, &q, fd);
    int rc = raw_code(r);
    if (rc == 0)
        ck_assert_int_eq(r->body_case, LITEATTN__REPLY__BODY_DOORBELL);
    if (r)
        liteattn__reply__free_unpacked(r, NULL);
    return rc;
}

static uint32_t done_of(const raw_db *db, int slot)
{
    return atomic_load((_Atomic uint32_t *)&db->w[4 * slot + 1]);
}

static int32_t status_of(const raw_db *db, int slot)
{
    return (int32_t)atomic_load((_Atomic uint32_t *)&db->w[4 * slot + 2]);
}

static void ring(raw_db *db, int slot, uint32_t v)
{
    atomic_store((_Atomic uint32_t *)&db->w[4 * slot], v);
}

START_TEST(test_raw_slots)
{
    td_daemon d;
    const char *args[] = {"--max-doorbell-slots", "64", NULL};
    ck_assert_int_eq(td_start(&d, args), 0);
    int sock = raw_connect(d.socket);
    ck_assert_int_ge(sock, 0);
    enum { S = 128 };
    int64_t sid = raw_session_open(sock, "raw", 2, H, S);
    ck_assert_int_gt(sid, 0);
    int bfd = raw_memfd((size_t)4 * S * H * D * 4);
    int64_t bid = raw_register(sock, bfd, (uint64_t)4 * S * H * D * 4);
    ck_assert_int_gt(bid, 0);
    close(bfd);
    long page = sysconf(_SC_PAGESIZE);
    raw_attn x;
    raw_attn_init(&x, (uint64_t)sid, (uint64_t)bid, S, H);
    x.a.has_doorbell_slot = x.a.has_doorbell_value = 1;

    /* A doorbell call before a doorbell: LA_ENOENT (nothing to write). */
    x.a.doorbell_slot = 0;
    x.a.doorbell_value = 1;
    ck_assert_int_eq(raw_rc(sock, &x.req), LA_ENOENT);

    /* Refusals of DoorbellRegister; the connection stays. */
    raw_db small;
    raw_db_make(&small, (size_t)page);
    ck_assert_int_eq(raw_db_register(sock, small.fd, 0), LA_EINVAL);
    ck_assert_int_eq(raw_db_register(sock, small.fd, 65), LA_EINVAL); /* over the limit */
    ck_assert_int_eq(raw_db_register(sock, small.fd, (uint32_t)(page / 16 + 1)), LA_EINVAL);
    munmap((void *)small.w, small.len);
    close(small.fd);
    ck_assert_int_eq(raw_ping(sock), 0);

    raw_db db;
    raw_db_make(&db, (size_t)page);
    ck_assert_int_eq(raw_db_register(sock, db.fd, 8), 0);
    ck_assert_int_eq(raw_db_register(sock, db.fd, 8), LA_EEXIST); /* one per connection */

    /* Rung before it is sent: it runs; done = the value, status 0. */
    ring(&db, 2, 7);
    x.a.doorbell_slot = 2;
    x.a.doorbell_value = 7;
    ck_assert_int_eq(raw_rc(sock, &x.req), 0);
    ck_assert_uint_eq(done_of(&db, 2), 7);
    ck_assert_int_eq(status_of(&db, 2), 0);

    /* Not rung: the CPU backend cannot wait for it; the slot still finishes, with the error. */
    x.a.doorbell_slot = 3;
    x.a.doorbell_value = 5;
    Liteattn__Reply *r = raw_call(sock, &x.req);
    ck_assert_int_eq(raw_code(r), LA_EINVAL);
    ck_assert_msg(strstr(r->error->message, "not rung"), "message: %s", r->error->message);
    liteattn__reply__free_unpacked(r, NULL);
    ck_assert_uint_eq(done_of(&db, 3), 5);
    ck_assert_int_eq(status_of(&db, 3), LA_EINVAL);

    /* Refused by the engine (layer out of range): the slot finishes with the error. */
    ring(&db, 1, 9);
    x.a.doorbell_slot = 1;
    x.a.doorbell_value = 9;
    x.a.layer = 2;
    ck_assert_int_eq(raw_rc(sock, &x.req), LA_EINVAL);
    ck_assert_uint_eq(done_of(&db, 1), 9);
    ck_assert_int_eq(status_of(&db, 1), LA_EINVAL);
    x.a.layer = 0;

    /* Refused by the dispatcher (a tensor it cannot hold): the same. */
    ring(&db, 4, 11);
    x.a.doorbell_slot = 4;
    x.a.doorbell_value = 11;
    x.t[0].n_strides = 2; /* strides must match the sizes */
    int64_t st2[2] = {1, 1};
    x.t[0].strides = st2;
    ck_assert_int_eq(raw_rc(sock, &x.req), LA_EINVAL);
    ck_assert_uint_eq(done_of(&db, 4), 11);
    ck_assert_int_eq(status_of(&db, 4), LA_EINVAL);
    x.t[0].n_strides = 0;
    x.t[0].strides = NULL;

    /* Values compare cyclically: 3 comes after 0xffffffff, 0xfffffff0 before 3. */
    ring(&db, 5, 3);
    x.a.doorbell_slot = 5;
    x.a.doorbell_value = 0xffffffffu;
    ck_assert_int_eq(raw_rc(sock, &x.req), 0);
    ck_assert_uint_eq(done_of(&db, 5), 0xffffffffu);
    ring(&db, 6, 0xfffffff0u);
    x.a.doorbell_slot = 6;
    x.a.doorbell_value = 3;
    ck_assert_int_eq(raw_rc(sock, &x.req), LA_EINVAL);
    ck_assert_uint_eq(done_of(&db, 6), 3);

    /* A slot the doorbell does not have: refused, nothing written. */
    x.a.doorbell_slot = 8;
    ck_assert_int_eq(raw_rc(sock, &x.req), LA_EINVAL);
    /* A slot without its value. */
    x.a.doorbell_slot = 7;
    x.a.has_doorbell_value = 0;
    ck_assert_int_eq(raw_rc(sock, &x.req), LA_EINVAL);
    x.a.has_doorbell_value = 1;

    /* A DoorbellRegister without its fd is a protocol error: the connection closes. */
    int sock2 = raw_connect(d.socket);
    ck_assert_int_ge(sock2, 0);
    Liteattn__DoorbellRegister dr = LITEATTN__DOORBELL_REGISTER__INIT;
    dr.slots = 4;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 9;
    q.body_case = LITEATTN__REQUEST__BODY_DOORBELL_REGISTER;
    q.doorbell_register = &dr;
    ck_assert_int_eq(raw_send(sock2, &q, -1), 0);
    ck_assert(raw_eof(sock2, 5000));
    close(sock2);
    ck_assert_int_eq(raw_ping(sock), 0);

    munmap((void *)db.w, db.len);
    close(db.fd);
    close(sock);
    ck_assert_int_eq(td_stop(&d), 0);
}
END_TEST

/* Calls beyond the in-flight limit that came in one write get LA_EBUSY, and their slots
 * finish with it: the client's stream never waits for a call that was refused. */
START_TEST(test_raw_busy_finishes_slot)
{
    td_daemon d;
    const char *args[] = {"--max-inflight", "1", NULL};
    ck_assert_int_eq(td_start(&d, args), 0);
    int sock = raw_connect(d.socket);
    ck_assert_int_ge(sock, 0);
    enum { S = 2048 };
    int64_t sid = raw_session_open(sock, "busy", 1, H, S);
    ck_assert_int_gt(sid, 0);
    size_t bytes = (size_t)4 * S * H * D * 4;
    int bfd = raw_memfd(bytes);
    int64_t bid = raw_register(sock, bfd, bytes);
    ck_assert_int_gt(bid, 0);
    close(bfd);
    raw_db db;
    raw_db_make(&db, (size_t)sysconf(_SC_PAGESIZE));
    ck_assert_int_eq(raw_db_register(sock, db.fd, 4), 0);
    raw_attn x;
    raw_attn_init(&x, (uint64_t)sid, (uint64_t)bid, S, H);
    x.a.has_doorbell_slot = x.a.has_doorbell_value = 1;
    /* Three calls in one write: the first runs (S 2048 takes a while), the others are over
     * the limit when the daemon reads them. */
    uint8_t *frames[3];
    size_t lens[3], total = 0;
    for (int i = 0; i < 3; i++) {
        ring(&db, i, 1);
        x.a.doorbell_slot = (uint32_t)i;
        x.a.doorbell_value = 1;
        x.req.id = 200 + (uint64_t)i;
        ck_assert_int_eq(raw_pack(&x.req, &frames[i], &lens[i]), 0);
        total += lens[i];
    }
    uint8_t *all = malloc(total);
    for (size_t i = 0, o = 0; i < 3; o += lens[i], i++)
        memcpy(all + o, frames[i], lens[i]);
    ck_assert_int_eq(raw_send_bytes(sock, all, total, -1), 0);
    int ok = 0, busy = 0;
    for (int i = 0; i < 3; i++) {
        Liteattn__Reply *r = raw_recv(sock, 30000);
        ck_assert_ptr_nonnull(r);
        int code = raw_code(r);
        int slot = (int)(r->id - 200);
        ck_assert_msg(code == 0 || code == LA_EBUSY, "reply %d: %s", slot, la_err_name(code));
        ok += code == 0;
        busy += code == LA_EBUSY;
        ck_assert_uint_eq(done_of(&db, slot), 1);
        ck_assert_int_eq(status_of(&db, slot), code);
        liteattn__reply__free_unpacked(r, NULL);
    }
    ck_assert_int_eq(ok, 1);
    ck_assert_int_eq(busy, 2);
    for (int i = 0; i < 3; i++)
        free(frames[i]);
    free(all);
    munmap((void *)db.w, db.len);
    close(db.fd);
    close(sock);
    ck_assert_int_eq(td_stop(&d), 0);
}
END_TEST

static Suite *fastpath_suite(void)
{
    Suite *s = suite_create("fastpath");
    TCase *lib = tcase_create("library");
    tcase_set_timeout(lib, 120);
    tcase_add_test(lib, test_pipeline_matches_sync_and_f64);
    tcase_add_test(lib, test_error_mid_pipeline);
    tcase_add_test(lib, test_disconnect_in_flight);
    suite_add_tcase(s, lib);
    TCase *raw = tcase_create("raw");
    tcase_set_timeout(raw, 60);
    tcase_add_test(raw, test_raw_slots);
    tcase_add_test(raw, test_raw_busy_finishes_slot);
    suite_add_tcase(s, raw);
    return s;
}

int main(void) { return tu_run_suite(fastpath_suite()); }
