/*
 * check_engine.c — the engine (daemon/engine.h) driven in-process, without a socket: sessions,
 * limits, eviction, TTL and grace, the buffer registry, every validation error of an attention
 * call, multi-step runs equal to direct la_ref_attn_fwd calls bit for bit, and teardown with
 * jobs in flight.
 */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "engine.h"
#include "testutil.h"
#include "testutil_engine.h"

#define UID 1000
#define UID2 1001
#define CONN 1
#define CONN2 2

/* Multiply-adds per CPU slice of the engines the cases open (0: the default). The sliced
 * variants of the number tests set it so small that every call runs in many slices: their
 * results must still equal one whole la_ref_attn_fwd call bit for bit. */
static uint64_t g_slice;

static eng_session_spec spec_make(const char *key, uint32_t layers, uint32_t H, uint32_t D,
                                  la_dtype dt, uint32_t sq, uint32_t sk, uint32_t batch)
{
    eng_session_spec sp;
    memset(&sp, 0, sizeof sp);
    sp.key = key;
    sp.layers = layers;
    sp.heads = H;
    sp.head_dim = D;
    sp.dtype = dt;
    sp.max_seq_q = sq;
    sp.max_seq_k = sk;
    sp.batch = batch;
    sp.kv_shards = 1;
    sp.threshold = -3;
    sp.mode = LA_MODE_SKIP;
    sp.device = "cpu";
    return sp;
}

static uint64_t open_ok(harness *h, uint32_t uid, uint64_t conn, const eng_session_spec *sp,
                        eng_session_view *ret)
{
    eng_session_view v;
    eng_error err = {{0}};
    int rc = eng_session_open(h->e, uid, conn, sp, &v, &err);
    ck_assert_msg(rc == 0, "open '%s': %d %s", sp->key, rc, err.msg);
    if (ret)
        *ret = v;
    return v.id;
}

static void tensor(eng_tensor *t, uint64_t buf, uint64_t off, la_dtype dt, int64_t a, int64_t b,
                   int64_t c, int64_t d)
{
    memset(t, 0, sizeof *t);
    t->buffer_id = buf;
    t->offset = off;
    t->dtype = dt;
    t->ndim = d ? 4 : 3;
    t->shape[0] = a;
    t->shape[1] = b;
    t->shape[2] = c;
    t->shape[3] = d;
}

/* ---- sessions --------------------------------------------------------------------------- */

START_TEST(session_open_attach_close)
{
    harness h;
    h_open(&h, NULL, g_slice);
    eng_session_spec sp = spec_make("wan-run-3", 3, 4, 64, LA_DTYPE_F32, 200, 300, 2);
    eng_session_view v;
    uint64_t id = open_ok(&h, UID, CONN, &sp, &v);
    ck_assert_uint_eq(v.bm, 128);
    ck_assert_uint_eq(v.bn, 64);
    ck_assert_uint_eq(v.n_q_tiles, 2); /* ceil(200/128) */
    ck_assert_uint_eq(v.n_k_words, 1); /* ceil(ceil(300/64)/32) */
    ck_assert_uint_eq(v.layer_mask_bytes, 2 * 4 * 2 * 1 * 4);
    ck_assert_uint_eq(v.mask_bytes, 3 * v.layer_mask_bytes);
    ck_assert_str_eq(v.device, "cpu");

    eng_error err = {{0}};
    eng_session_view v2;
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &sp, &v2, &err), LA_EEXIST);
    ck_assert_msg(strstr(err.msg, "wan-run-3"), "message names the key: %s", err.msg);
    /* another user may use the same key */
    uint64_t other = open_ok(&h, UID2, CONN2, &sp, NULL);
    ck_assert_uint_ne(other, id);

    ck_assert_int_eq(eng_session_attach(h.e, UID, CONN2, "wan-run-3", &v2, &err), 0);
    ck_assert_uint_eq(v2.id, id);
    ck_assert_int_eq(eng_session_attach(h.e, UID, CONN2, "nope", &v2, &err), LA_ENOENT);

    double live[4] = {-1, -1, -1, -1};
    eng_session_stats st;
    ck_assert_int_eq(eng_session_info(h.e, UID, id, live, 4, &st, &err), 0);
    for (int l = 0; l < 3; l++)
        ck_assert_double_eq(live[l], 1.0);
    ck_assert_double_eq(live[3], -1);
    ck_assert_uint_eq(st.calls, 0);
    /* another uid cannot see it; root can read it */
    ck_assert_int_eq(eng_session_info(h.e, UID2, id, live, 4, &st, &err), LA_ENOENT);
    ck_assert_int_eq(eng_session_info(h.e, 0, id, live, 4, &st, &err), 0);
    ck_assert_int_eq(eng_session_close(h.e, UID2, id, &err), LA_ENOENT);
    ck_assert_int_eq(eng_session_reset(h.e, UID2, id, &err), LA_ENOENT);

    uint32_t words[64];
    size_t got = 0;
    uint64_t total = 0;
    ck_assert_int_eq(eng_mask_read(h.e, UID, id, 2, 0, 0, words, sizeof words, &got, &total, &err),
                     0);
    ck_assert_uint_eq(total, v.layer_mask_bytes);
    ck_assert_uint_eq(got, v.layer_mask_bytes);
    ck_assert_uint_eq(words[0], 0xffffffffu);
    ck_assert_int_eq(eng_mask_read(h.e, UID, id, 3, 0, 0, words, sizeof words, &got, &total, &err),
                     LA_EINVAL);
    ck_assert_msg(strstr(err.msg, "layer 3 out of range"), "%s", err.msg);
    ck_assert_int_eq(eng_mask_read(h.e, UID, id, 0, 1, 0, words, sizeof words, &got, &total, &err),
                     LA_EINVAL);
    ck_assert_int_eq(eng_mask_read(h.e, UID, id, 0, 0, total + 1, words, 4, &got, &total, &err),
                     LA_ERANGE);

    ck_assert_int_eq(eng_session_close(h.e, UID, id, &err), 0);
    ck_assert_int_eq(eng_session_info(h.e, UID, id, live, 4, &st, &err), LA_ENOENT);
    ck_assert_int_eq(eng_session_close(h.e, UID, id, &err), LA_ENOENT);
    /* ids are never reused */
    uint64_t id2 = open_ok(&h, UID, CONN, &sp, NULL);
    ck_assert_uint_gt(id2, other);

    /* bad specs */
    eng_session_spec bad = spec_make("bad", 0, 4, 64, LA_DTYPE_F32, 100, 100, 1);
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &bad, &v2, &err), LA_EINVAL);
    bad = spec_make("bad", 1, 4, 72, LA_DTYPE_F32, 100, 100, 1);
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &bad, &v2, &err), LA_ENOTSUP);
    bad = spec_make("bad", 1, 4, 64, LA_DTYPE_U32, 100, 100, 1);
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &bad, &v2, &err), LA_EINVAL);
    bad = spec_make("", 1, 4, 64, LA_DTYPE_F32, 100, 100, 1);
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &bad, &v2, &err), LA_EINVAL);
    bad = spec_make("bad", 1, 4, 64, LA_DTYPE_F32, 100, 100, 1);
    bad.device = "GPU-00000000-0000-0000-0000-000000000000";
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &bad, &v2, &err), LA_ENODEV);
    h_close(&h);
}
END_TEST

typedef struct stat_q {
    const char *name;
    int64_t value;
    int found;
} stat_q;
static void stat_cb(void *data, const char *name, int64_t value)
{
    stat_q *q = data;
    if (!strcmp(q->name, name)) {
        q->value = value;
        q->found = 1;
    }
}
static int64_t stat_get(harness *h, const char *name)
{
    stat_q q = {name, 0, 0};
    eng_stats(h->e, stat_cb, &q);
    ck_assert_msg(q.found, "stat %s missing", name);
    return q.value;
}

START_TEST(session_limits)
{
    eng_config d;
    eng_config_default(&d);
    eng_limits lim = d.limits;
    lim.max_sessions_per_user = 2;
    lim.max_mask_bytes_per_user = 3 * 1024;
    harness h;
    h_open(&h, &lim, g_slice);
    eng_error err = {{0}};
    eng_session_view v;
    /* 1 layer, B1 H8, 64 q-tiles (8192/128), 1 word: 8*64*4 = 2048 bytes */
    eng_session_spec a = spec_make("a", 1, 8, 64, LA_DTYPE_F32, 8192, 1024, 1);
    open_ok(&h, UID, CONN, &a, &v);
    ck_assert_uint_eq(v.mask_bytes, 2048);
    eng_session_spec b = spec_make("b", 1, 8, 64, LA_DTYPE_F32, 8192, 1024, 1);
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &b, &v, &err), LA_ELIMIT);
    ck_assert_msg(strstr(err.msg, "uid 1000"), "%s", err.msg);
    eng_session_spec c = spec_make("c", 1, 4, 64, LA_DTYPE_F32, 8192, 1024, 1); /* 1024 B */
    open_ok(&h, UID, CONN, &c, NULL);
    eng_session_spec dd = spec_make("d", 1, 1, 64, LA_DTYPE_F32, 64, 64, 1);
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &dd, &v, &err), LA_ELIMIT);
    ck_assert_msg(strstr(err.msg, "2 sessions"), "%s", err.msg);
    /* another user has its own budget */
    open_ok(&h, UID2, CONN2, &dd, NULL);
    ck_assert_int_eq(stat_get(&h, "sessions"), 3);
    h_close(&h);
}
END_TEST

/* ---- attention helpers ----------------------------------------------------------------- */

/* A problem in one shm buffer: q, k, v, o, lse, decisions laid out one after another. */
typedef struct prob {
    shm s;
    int64_t B, Sq, Sk, H, D;
    la_dtype dt;
    uint64_t off[6], bytes[6];
} prob;

static void prob_make(harness *h, prob *p, uint64_t conn, int64_t B, int64_t Sq, int64_t Sk,
                      int64_t H, int64_t D, la_dtype dt, uint64_t dec_bytes)
{
    memset(p, 0, sizeof *p);
    p->B = B, p->Sq = Sq, p->Sk = Sk, p->H = H, p->D = D, p->dt = dt;
    size_t es = dt == LA_DTYPE_F32 ? 4 : 2;
    p->bytes[0] = (uint64_t)(B * Sq * H * D) * es;
    p->bytes[1] = p->bytes[2] = (uint64_t)(B * Sk * H * D) * es;
    p->bytes[3] = p->bytes[0];
    p->bytes[4] = (uint64_t)(B * H * Sq) * 4;
    p->bytes[5] = dec_bytes ? dec_bytes : 4;
    uint64_t o = 0;
    for (int i = 0; i < 6; i++) {
        p->off[i] = o;
        o += (p->bytes[i] + 63) & ~63ull;
    }
    ck_assert_int_eq(shm_make(h, UID, conn, (size_t)o, &p->s), 0);
}

static void prob_req(const prob *p, eng_attn_req *r, uint64_t sid, uint32_t layer, uint32_t step)
{
    memset(r, 0, sizeof *r);
    r->session_id = sid;
    r->layer = layer;
    r->step = step;
    uint64_t id = p->s.id;
    tensor(&r->q, id, p->off[0], p->dt, p->B, p->Sq, p->H, p->D);
    tensor(&r->k, id, p->off[1], p->dt, p->B, p->Sk, p->H, p->D);
    tensor(&r->v, id, p->off[2], p->dt, p->B, p->Sk, p->H, p->D);
    tensor(&r->o, id, p->off[3], p->dt, p->B, p->Sq, p->H, p->D);
    tensor(&r->lse, id, p->off[4], LA_DTYPE_F32, p->B, p->H, p->Sq, 0);
    r->has_lse = 1;
    r->mode = LA_MODE_SESSION;
}

static void *prob_ptr(const prob *p, int i) { return (char *)p->s.p + p->off[i]; }

static void prob_fill(const prob *p, tu_rng *r, double amp)
{
    tu_fill(r, prob_ptr(p, 0), p->dt, p->B * p->Sq * p->H * p->D, amp);
    tu_fill(r, prob_ptr(p, 1), p->dt, p->B * p->Sk * p->H * p->D, amp);
    tu_fill(r, prob_ptr(p, 2), p->dt, p->B * p->Sk * p->H * p->D, 1.0);
}

static void run_ok(harness *h, const eng_attn_req *r, call *c)
{
    eng_error err = {{0}};
    int rc = h_submit(h, UID, CONN, r, c, &err);
    ck_assert_msg(rc == 0, "submit: %d %s", rc, err.msg);
    h_wait(h, 1);
    ck_assert_int_eq(c->ran, 1);
    ck_assert_int_eq(c->status, 0);
}

/* ---- validation ------------------------------------------------------------------------ */

typedef struct bad_case {
    const char *name;
    int want;
} bad_case;

START_TEST(attn_validation)
{
    harness h;
    h_open(&h, NULL, g_slice);
    eng_session_spec sp = spec_make("val", 2, 2, 64, LA_DTYPE_F32, 128, 192, 2);
    eng_session_view v;
    uint64_t sid = open_ok(&h, UID, CONN, &sp, &v);
    uint64_t sid_other = open_ok(&h, UID2, CONN2, &sp, NULL);
    prob p;
    prob_make(&h, &p, CONN, 2, 100, 150, 2, 64, LA_DTYPE_F32, v.layer_mask_bytes);
    shm other, rm;
    ck_assert_int_eq(shm_make(&h, UID, CONN2, 1 << 20, &other), 0);
    ck_assert_int_eq(shm_make(&h, UID, CONN, 4096, &rm), 0);
    tu_rng rng;
    tu_rng_init(&rng, 11);
    prob_fill(&p, &rng, 1.0);

    eng_attn_req good;
    prob_req(&p, &good, sid, 1, 0);
    call c;
    run_ok(&h, &good, &c); /* the base request is valid */

    for (int i = 0;; i++) {
        eng_attn_req r = good;
        const char *name = NULL;
        int want = 0;
        switch (i) {
        case 0:
            name = "unknown session";
            r.session_id = 999;
            want = LA_ENOENT;
            break;
        case 1:
            name = "another uid's session";
            r.session_id = sid_other;
            want = LA_ENOENT;
            break;
        case 2:
            name = "layer";
            r.layer = 2;
            want = LA_EINVAL;
            break;
        case 3:
            name = "kv shard";
            r.kv_shard = 1;
            want = LA_EINVAL;
            break;
        case 4:
            name = "heads";
            r.q.shape[2] = 3;
            want = LA_EINVAL;
            break;
        case 5:
            name = "Sq > max";
            r.q.shape[1] = 129;
            r.o.shape[1] = 129;
            want = LA_EINVAL;
            break;
        case 6:
            name = "B > batch";
            r.q.shape[0] = 3;
            want = LA_EINVAL;
            break;
        case 7:
            name = "k head dim";
            r.k.shape[3] = 32;
            want = LA_EINVAL;
            break;
        case 8:
            name = "v keys";
            r.v.shape[1] = 149;
            want = LA_EINVAL;
            break;
        case 9:
            name = "o shape";
            r.o.shape[1] = 99;
            want = LA_EINVAL;
            break;
        case 10:
            name = "lse shape";
            r.lse.shape[2] = 99;
            want = LA_EINVAL;
            break;
        case 11:
            name = "lse dtype";
            r.lse.dtype = LA_DTYPE_F16;
            want = LA_EINVAL;
            break;
        case 12:
            name = "q dtype";
            r.q.dtype = LA_DTYPE_BF16;
            want = LA_EINVAL;
            break;
        case 13:
            name = "offset past buffer";
            r.v.offset = p.s.size - 64;
            want = LA_ERANGE;
            break;
        case 14:
            name = "overflowing strides";
            r.k.has_strides = 1;
            r.k.strides[0] = INT64_MAX / 2;
            r.k.strides[1] = 128, r.k.strides[2] = 64, r.k.strides[3] = 1;
            want = LA_ERANGE;
            break;
        case 15:
            name = "negative stride";
            r.q.has_strides = 1;
            r.q.strides[0] = 100 * 128, r.q.strides[1] = 128, r.q.strides[2] = 64;
            r.q.strides[3] = -1;
            want = LA_EINVAL;
            break;
        case 16:
            name = "unknown buffer";
            r.k.buffer_id = 12345;
            want = LA_ENOENT;
            break;
        case 17:
            name = "another conn's buffer";
            r.k.buffer_id = other.id;
            want = LA_ENOENT;
            break;
        case 18:
            name = "o overlaps q";
            r.o.offset = p.off[0] + 64;
            want = LA_EINVAL;
            break;
        case 19:
            name = "lse overlaps o";
            r.lse.offset = p.off[3];
            want = LA_EINVAL;
            break;
        case 20:
            name = "dry run without decisions";
            r.dry_run = 1;
            want = LA_EINVAL;
            break;
        case 21:
            name = "decisions dtype";
            r.dry_run = 1, r.has_decisions = 1;
            r.decisions.buffer_id = p.s.id, r.decisions.offset = p.off[5];
            r.decisions.dtype = LA_DTYPE_F32;
            want = LA_EINVAL;
            break;
        case 22:
            name = "decisions past buffer";
            r.dry_run = 1, r.has_decisions = 1;
            r.decisions.buffer_id = p.s.id;
            r.decisions.offset = p.s.size - 4;
            r.decisions.dtype = LA_DTYPE_U32;
            want = LA_ERANGE;
            break;
        case 23:
            name = "too many ranges";
            r.n_must_do = LA_MAX_RANGES + 1;
            want = LA_EINVAL;
            break;
        case 24:
            name = "misaligned offset";
            r.q.offset = 2;
            want = LA_EINVAL;
            break;
        case 25:
            name = "negative scale";
            r.scale = -1;
            want = LA_EINVAL;
            break;
        case 26:
            name = "mode";
            r.mode = (la_mode)7;
            want = LA_EINVAL;
            break;
        case 27:
            name = "q ndim";
            r.q.ndim = 3;
            want = LA_EINVAL;
            break;
        case 28:
            name = "offset overflow";
            r.o.offset = UINT64_MAX - 7;
            want = LA_ERANGE;
            break;
        case 29:
            name = "zero keys";
            r.k.shape[1] = 0;
            want = LA_EINVAL;
            break;
        case 30:
            name = "NaN threshold";
            r.has_threshold = 1;
            r.threshold = NAN;
            want = LA_EINVAL;
            break;
        case 31:
            name = "reversed range";
            r.n_must_do = 1;
            r.must_do[0].start = 5;
            r.must_do[0].end = -3;
            want = LA_EINVAL;
            break;
        case 32:
            name = "range before 0";
            r.n_must_skip = 1;
            r.must_skip[0] = (la_range){-1, 4};
            want = LA_EINVAL;
            break;
        case 33:
            name = "range past Sk";
            r.n_must_do = 1;
            r.must_do[0] = (la_range){100, 151};
            want = LA_EINVAL;
            break;
        case 34:
            name = "layer -1";
            r.layer = (uint32_t)-1;
            want = LA_EINVAL;
            break;
        case 35:
            name = "kv shard -1";
            r.kv_shard = (uint32_t)-1;
            want = LA_EINVAL;
            break;
        case 36:
            name = "row_max shape";
            r.has_row_max = 1;
            tensor(&r.row_max, rm.id, 0, LA_DTYPE_F32, 2, 2, 99, 0);
            want = LA_EINVAL;
            break;
        case 37:
            name = "row_max dtype";
            r.has_row_max = 1;
            tensor(&r.row_max, rm.id, 0, LA_DTYPE_F16, 2, 2, 100, 0);
            want = LA_EINVAL;
            break;
        case 38:
            name = "row_max overlaps lse";
            r.has_row_max = 1;
            tensor(&r.row_max, p.s.id, p.off[4] + 4, LA_DTYPE_F32, 2, 2, 100, 0);
            want = LA_EINVAL;
            break;
        case 39:
            name = "row_max past buffer";
            r.has_row_max = 1;
            tensor(&r.row_max, rm.id, 4096 - 64, LA_DTYPE_F32, 2, 2, 100, 0);
            want = LA_ERANGE;
            break;
        case 40:
            name = "row_max rows overlap";
            r.has_row_max = 1;
            tensor(&r.row_max, rm.id, 0, LA_DTYPE_F32, 2, 2, 100, 0);
            r.row_max.has_strides = 1;
            r.row_max.strides[0] = 200, r.row_max.strides[1] = 100, r.row_max.strides[2] = 0;
            want = LA_EINVAL;
            break;
        }
        if (!name)
            break;
        eng_error err = {{0}};
        call cc;
        int rc = h_submit(&h, UID, CONN, &r, &cc, &err);
        if (want == 0) {
            /* la_attn_validate decides on a reversed range; either way no callback on error */
            if (rc == 0)
                h_wait(&h, 1);
            continue;
        }
        ck_assert_msg(rc == want, "case %d (%s): got %d (%s), want %d", i, name, rc, err.msg, want);
        ck_assert_msg(err.msg[0], "case %d (%s): no message", i, name);
        static const char *const says[][2] = {
            {"reversed range", "must-do range 0 [5, -3) is reversed (end before start)"},
            {"range before 0", "must-skip range 0 [-1, 4) lies outside the call's keys [0, 150)"},
            {"range past Sk", "must-do range 0 [100, 151) lies outside the call's keys [0, 150)"},
            {"layer -1",
             "layer -1 (4294967295 as unsigned) out of range: layers count from 0 to 1"},
            {"kv shard -1", "kv shard -1 (4294967295 as unsigned) out of range: kv shards count "
                            "from 0 to 0"},
            /* The kernel-level rules, as la_attn_check words them, with the engine's facts. */
            {"negative stride", "q stride 3 is negative (-1)"},
            {"overflowing strides", "k extent overflows 64 bits"},
            {"o overlaps q", "o overlaps q in buffer"},
            {"lse overlaps o", "lse overlaps o in buffer"},
            {"too many ranges", "must-skip ranges (at most"},
            {"negative scale", "softmax scale -1 (must be finite and > 0)"},
            {"mode", "unknown mode 7"},
            {"NaN threshold", "threshold is NaN"},
            {"row_max shape", "row_max shape [2, 2, 99] does not match [B, H, Sq] = [2, 2, 100]"},
            {"row_max dtype", "row_max has dtype f16, expected f32"},
            {"row_max overlaps lse", "row_max overlaps lse in buffer"},
            {"row_max past buffer", "row_max spans bytes [4032, 5632) but buffer"},
            {"row_max rows overlap", "row_max strides map two indices onto one element"},
        };
        for (size_t k = 0; k < sizeof says / sizeof says[0]; k++)
            if (!strcmp(name, says[k][0]))
                ck_assert_msg(strstr(err.msg, says[k][1]), "case %d (%s): message %s", i, name,
                              err.msg);
        if (want != LA_ENOENT || i >= 16)
            ck_assert_msg(strstr(err.msg, "session") && strstr(err.msg, "'val'"),
                          "case %d (%s): message does not name the session: %s", i, name, err.msg);
    }
    /* no callback ran for any refused call */
    for (int k = 0; k < 20; k++)
        eng_process_completions(h.e);
    ck_assert_int_eq(h.done_calls, 1 + (stat_get(&h, "calls_completed") - 1));
    ck_assert_int_eq(stat_get(&h, "calls_inflight"), 0);
    ck_assert_int_ge(stat_get(&h, "call_errors"), 30);

    /* buffer registry errors */
    eng_error err = {{0}};
    uint64_t bid;
    int fd = memfd_create("small", MFD_ALLOW_SEALING);
    ck_assert_int_eq(ftruncate(fd, 4096), 0);
    ck_assert_int_eq(eng_buffer_add_shm(h.e, UID, CONN, dup(fd), 8192, &bid, &err), LA_EINVAL);
    ck_assert_int_eq(eng_buffer_add_shm(h.e, UID, CONN, dup(fd), 0, &bid, &err), LA_EINVAL);
    ck_assert_int_eq(eng_buffer_add_shm(h.e, UID, CONN, dup(fd), 4096, &bid, &err), 0);
    ck_assert_int_eq(eng_buffer_remove(h.e, CONN2, bid, &err), LA_ENOENT);
    ck_assert_int_eq(eng_buffer_remove(h.e, CONN, bid, &err), 0);
    ck_assert_int_eq(eng_buffer_remove(h.e, CONN, bid, &err), LA_ENOENT);
    close(fd);
    /* a file that cannot be sealed against shrinking */
    char path[] = "/tmp/check_engine_XXXXXX";
    int tf = mkstemp(path);
    ck_assert_int_ge(tf, 0);
    unlink(path);
    ck_assert_int_eq(ftruncate(tf, 4096), 0);
    ck_assert_int_eq(eng_buffer_add_shm(h.e, UID, CONN, tf, 4096, &bid, &err), LA_EINVAL);
    ck_assert_msg(strstr(err.msg, "F_SEAL_SHRINK"), "%s", err.msg);
    uint8_t handle[64] = {0};
    uint64_t rsz;
    ck_assert_int_eq(
        eng_buffer_add_cuda_ipc(h.e, UID, CONN, handle, 64, "GPU-x", 4096, &bid, &rsz, &err),
        LA_ENODEV);
    shm_drop(&p.s);
    shm_drop(&other);
    shm_drop(&rm);
    h_close(&h);
}
END_TEST

START_TEST(buffer_limits)
{
    eng_config d;
    eng_config_default(&d);
    eng_limits lim = d.limits;
    lim.max_buffers_per_conn = 2;
    lim.max_buffer_bytes_per_conn = 3 * 4096;
    harness h;
    h_open(&h, &lim, g_slice);
    shm a, b, c;
    ck_assert_int_eq(shm_make(&h, UID, CONN, 4096, &a), 0);
    ck_assert_int_eq(shm_make(&h, UID, CONN, 3 * 4096, &b), LA_ELIMIT); /* bytes */
    shm_drop(&b);
    ck_assert_int_eq(shm_make(&h, UID, CONN, 4096, &b), 0);
    ck_assert_int_eq(shm_make(&h, UID, CONN, 4096, &c), LA_ELIMIT); /* count */
    shm_drop(&c);
    ck_assert_int_eq(shm_make(&h, UID, CONN2, 4096, &c), 0); /* per connection */
    ck_assert_int_eq(stat_get(&h, "buffers"), 3);
    eng_conn_closed(h.e, CONN);
    ck_assert_int_eq(stat_get(&h, "buffers"), 1);
    shm_drop(&a);
    shm_drop(&b);
    shm_drop(&c);
    h_close(&h);
}
END_TEST

/* ---- eviction, TTL, grace ------------------------------------------------------------- */

/* Eviction under the mask memory cap takes only detached sessions, oldest first, decides
 * before evicting anything, and leaves another user its fair share of the cap. */
START_TEST(mask_cap_lru)
{
    eng_config d;
    eng_config_default(&d);
    eng_limits lim = d.limits;
    lim.mask_memory_cap = 4 * 2048 + 1000; /* four sessions of 2048 bytes fit, not five */
    harness h;
    h_open(&h, &lim, g_slice);
    eng_error err = {{0}};
    eng_session_view v;
    eng_session_spec a = spec_make("a", 1, 8, 64, LA_DTYPE_F32, 8192, 64, 1);
    eng_session_spec c = spec_make("c", 1, 8, 64, LA_DTYPE_F32, 8192, 64, 1);
    eng_session_spec e2 = spec_make("e", 2, 8, 64, LA_DTYPE_F32, 8192, 64, 1);
    eng_session_spec b[3] = {spec_make("b0", 1, 8, 64, LA_DTYPE_F32, 8192, 64, 1),
                             spec_make("b1", 1, 8, 64, LA_DTYPE_F32, 8192, 64, 1),
                             spec_make("b2", 1, 8, 64, LA_DTYPE_F32, 8192, 64, 1)};
    uint64_t ia = open_ok(&h, UID, CONN, &a, &v);
    ck_assert_uint_eq(v.mask_bytes, 2048);
    uint64_t ib[3];
    for (int i = 0; i < 3; i++)
        ib[i] = open_ok(&h, UID2, CONN2, &b[i], NULL);
    /* Full, and every session attached: nothing is evicted. */
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &c, &v, &err), LA_ELIMIT);
    ck_assert_int_eq(stat_get(&h, "sessions_evicted"), 0);
    ck_assert_int_eq(stat_get(&h, "sessions"), 4);

    /* UID2 leaves: its three sessions are detached (b0 least recently used). UID2 holds 6144
     * bytes, the fair share of two users is 4596: one of them may go, not two. A two-layer
     * session would need two: refused, and nothing was evicted to find that out. */
    eng_conn_closed(h.e, CONN2);
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &e2, &v, &err), LA_ELIMIT);
    ck_assert_int_eq(stat_get(&h, "sessions_evicted"), 0);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(eng_session_info(h.e, UID2, ib[i], NULL, 0, NULL, &err), 0);
    /* One layer: the oldest detached session goes. */
    uint64_t ic = open_ok(&h, UID, CONN, &c, NULL);
    ck_assert_int_eq(stat_get(&h, "sessions_evicted"), 1);
    ck_assert_int_eq(eng_session_info(h.e, UID2, ib[0], NULL, 0, NULL, &err), LA_ENOENT);
    ck_assert_int_eq(eng_session_info(h.e, UID2, ib[1], NULL, 0, NULL, &err), 0);
    /* UID2 is at 4096 bytes, under its share: its last two sessions stay. */
    eng_session_spec dd = spec_make("d", 1, 8, 64, LA_DTYPE_F32, 8192, 64, 1);
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &dd, &v, &err), LA_ELIMIT);
    ck_assert_int_eq(stat_get(&h, "sessions_evicted"), 1);
    /* UID's own detached sessions may always make room for it: a in flight is kept, c goes. */
    prob p;
    prob_make(&h, &p, CONN, 1, 64, 64, 8, 64, LA_DTYPE_F32, 0);
    tu_rng rng;
    tu_rng_init(&rng, 3);
    prob_fill(&p, &rng, 1.0);
    eng_attn_req r;
    prob_req(&p, &r, ia, 0, 0);
    call cl;
    ck_assert_int_eq(h_submit(&h, UID, CONN, &r, &cl, &err), 0);
    eng_conn_closed(h.e, CONN); /* a (in flight) and c detached */
    ck_assert_int_eq(eng_session_open(h.e, UID, 3, &dd, &v, &err), 0);
    ck_assert_int_eq(eng_session_info(h.e, UID, ia, NULL, 0, NULL, &err), 0);
    ck_assert_int_eq(eng_session_info(h.e, UID, ic, NULL, 0, NULL, &err), LA_ENOENT);
    h_wait(&h, 1);
    /* larger than the cap: refused */
    eng_session_spec big = spec_make("big", 5, 8, 64, LA_DTYPE_F32, 8192, 64, 1);
    ck_assert_int_eq(eng_session_open(h.e, UID, 3, &big, &v, &err), LA_ELIMIT);
    ck_assert_int_eq(stat_get(&h, "mask_bytes"), 4 * 2048);
    shm_drop(&p.s);
    h_close(&h);
}
END_TEST

START_TEST(grace_and_attach)
{
    eng_config d;
    eng_config_default(&d);
    eng_limits lim = d.limits;
    lim.session_grace_s = 1;
    harness h;
    h_open(&h, &lim, g_slice);
    eng_error err = {{0}};
    eng_session_view v;
    eng_session_spec a = spec_make("a", 1, 1, 64, LA_DTYPE_F32, 64, 64, 1);
    eng_session_spec b = spec_make("b", 1, 1, 64, LA_DTYPE_F32, 64, 64, 1);
    eng_session_spec c = spec_make("c", 1, 1, 64, LA_DTYPE_F32, 64, 64, 1);
    uint64_t ia = open_ok(&h, UID, CONN, &a, NULL);
    uint64_t ib = open_ok(&h, UID, CONN2, &b, NULL);
    uint64_t ic = open_ok(&h, UID, CONN, &c, NULL);
    eng_conn_closed(h.e, CONN); /* a and c detached */
    ck_assert_int_eq(stat_get(&h, "sessions_detached"), 2);
    eng_tick(h.e);
    ck_assert_int_eq(stat_get(&h, "sessions"), 3);
    ck_assert_int_eq(eng_session_attach(h.e, UID, 3, "c", &v, &err), 0); /* re-bound */
    ck_assert_uint_eq(v.id, ic);
    usleep(1100 * 1000);
    eng_tick(h.e);
    ck_assert_int_eq(eng_session_info(h.e, UID, ia, NULL, 0, NULL, &err), LA_ENOENT);
    ck_assert_int_eq(eng_session_info(h.e, UID, ib, NULL, 0, NULL, &err), 0);
    ck_assert_int_eq(eng_session_info(h.e, UID, ic, NULL, 0, NULL, &err), 0);
    ck_assert_int_eq(stat_get(&h, "sessions_grace_expired"), 1);
    h_close(&h);
}
END_TEST

START_TEST(idle_ttl)
{
    eng_config d;
    eng_config_default(&d);
    eng_limits lim = d.limits;
    lim.session_ttl_s = 1;
    harness h;
    h_open(&h, &lim, g_slice);
    eng_error err = {{0}};
    eng_session_view v;
    eng_session_spec a = spec_make("a", 1, 1, 64, LA_DTYPE_F32, 64, 64, 1);
    eng_session_spec b = spec_make("b", 1, 1, 64, LA_DTYPE_F32, 64, 64, 1);
    uint64_t ia = open_ok(&h, UID, CONN, &a, NULL);
    usleep(600 * 1000);
    uint64_t ib = open_ok(&h, UID, CONN, &b, NULL);
    usleep(600 * 1000);
    eng_tick(h.e);
    ck_assert_int_eq(eng_session_info(h.e, UID, ia, NULL, 0, NULL, &err), LA_ENOENT);
    ck_assert_int_eq(eng_session_info(h.e, UID, ib, NULL, 0, NULL, &err), 0);
    ck_assert_int_eq(eng_session_attach(h.e, UID, CONN, "b", &v, &err), 0); /* used again */
    usleep(600 * 1000);
    eng_tick(h.e);
    ck_assert_int_eq(eng_session_info(h.e, UID, ib, NULL, 0, NULL, &err), 0);
    ck_assert_int_eq(stat_get(&h, "sessions_expired"), 1);
    h_close(&h);
}
END_TEST

/* ---- numbers: the engine against direct reference calls ---------------------------------- */

static void drift(const prob *p, const double *base, const double *dir, int step, double eps)
{
    int64_t nq = p->B * p->Sq * p->H * p->D, nk = p->B * p->Sk * p->H * p->D;
    int64_t n[3] = {nq, nk, nk};
    const double *bb = base, *dd = dir;
    for (int t = 0; t < 3; t++) {
        void *dst = prob_ptr(p, t);
        for (int64_t i = 0; i < n[t]; i++)
            tu_set(dst, p->dt, i, bb[i] + eps * step * dd[i]);
        bb += n[t];
        dd += n[t];
    }
}

static void multi_step(la_dtype dt, int B, int Sq, int Sk, int H, int D)
{
    harness h;
    h_open(&h, NULL, g_slice);
    const int layers = 2, steps = 5;
    float sched[3] = {-INFINITY, -4.0f, -2.0f};
    eng_session_spec sp = spec_make("multi", layers, (uint32_t)H, (uint32_t)D, dt,
                                    (uint32_t)Sq + 10, (uint32_t)Sk + 70, (uint32_t)B + 1);
    sp.schedule = sched;
    sp.n_schedule = 3;
    eng_session_view v;
    uint64_t sid = open_ok(&h, UID, CONN, &sp, &v);
    prob p;
    prob_make(&h, &p, CONN, B, Sq, Sk, H, D, dt, v.layer_mask_bytes);

    /* the direct side: own copies of the masks, laid out as the session's */
    uint32_t *mask[2], *dec = malloc(v.layer_mask_bytes);
    size_t obytes = p.bytes[3];
    void *o_ref = malloc(obytes);
    float *lse_ref = malloc(p.bytes[4]);
    uint32_t *got = malloc(v.layer_mask_bytes);
    for (int l = 0; l < layers; l++) {
        mask[l] = malloc(v.layer_mask_bytes);
        memset(mask[l], 0xff, v.layer_mask_bytes);
    }
    tu_rng rng;
    tu_rng_init(&rng, 77 + (uint64_t)dt);
    int64_t ntot = p.B * (p.Sq + 2 * p.Sk) * p.H * p.D;
    double *base = malloc((size_t)ntot * sizeof *base), *dir = malloc((size_t)ntot * sizeof *dir);
    for (int64_t i = 0; i < ntot; i++) {
        base[i] = tu_rng_normal(&rng) * (i < p.B * p.Sq * p.H * p.D ? 1.5 : 1.0);
        dir[i] = tu_rng_normal(&rng);
    }
    uint64_t tiles_total = 0, tiles_computed = 0;
    for (int step = 0; step < steps; step++) {
        drift(&p, base, dir, step, 0.02);
        for (int l = 0; l < layers; l++) {
            eng_attn_req r;
            prob_req(&p, &r, sid, (uint32_t)l, (uint32_t)step);
            r.n_must_do = 1;
            r.must_do[0] = (la_range){0, 16};
            /* A per-call override at tau = +inf: each row then keeps only its first visited
             * tile and the must-do tile, so the next step must skip whatever the data. */
            int override = (step == 3 && l == 1);
            if (override) {
                r.has_threshold = 1;
                r.threshold = INFINITY;
            }
            call c;
            run_ok(&h, &r, &c);

            la_attn_params d;
            memset(&d, 0, sizeof d);
            tu_params(&d, prob_ptr(&p, 0), prob_ptr(&p, 1), prob_ptr(&p, 2), o_ref, lse_ref,
                      mask[l], B, Sq, Sk, H, D, dt, (int32_t)v.bm, (int32_t)v.bn);
            d.mask_stride[2] = v.n_k_words;
            d.mask_stride[1] = (int64_t)v.n_k_words * v.n_q_tiles;
            d.mask_stride[0] = d.mask_stride[1] * H;
            d.mode = LA_MODE_SKIP;
            d.step = step;
            d.tau = override ? INFINITY : sched[step < 3 ? step : 2];
            d.must_do = r.must_do;
            d.n_must_do = 1;
            d.threads = 1;
            int64_t tc = 0;
            d.ret_tiles_computed = &tc;
            ck_assert_int_eq(la_ref_attn_fwd(&d), 0);
            ck_assert_msg(memcmp(o_ref, prob_ptr(&p, 3), obytes) == 0,
                          "step %d layer %d: O differs from the direct call", step, l);
            ck_assert_msg(memcmp(lse_ref, prob_ptr(&p, 4), p.bytes[4]) == 0,
                          "step %d layer %d: LSE differs", step, l);
            size_t gl = 0;
            uint64_t total = 0;
            eng_error err = {{0}};
            ck_assert_int_eq(eng_mask_read(h.e, UID, sid, (uint32_t)l, 0, 0, got,
                                           v.layer_mask_bytes, &gl, &total, &err),
                             0);
            ck_assert_uint_eq(gl, v.layer_mask_bytes);
            ck_assert_msg(memcmp(got, mask[l], v.layer_mask_bytes) == 0,
                          "step %d layer %d: mask differs", step, l);
            ck_assert_int_eq((int64_t)c.res.tiles_computed, tc);
            tiles_total += c.res.tiles_total;
            tiles_computed += c.res.tiles_computed;
        }
    }
    /* skipping happened, and the figures add up */
    ck_assert_uint_lt(tiles_computed, tiles_total);
    eng_session_stats st;
    double live[2];
    eng_error err = {{0}};
    ck_assert_int_eq(eng_session_info(h.e, UID, sid, live, 2, &st, &err), 0);
    ck_assert_uint_eq(st.calls, (uint64_t)(steps * layers));
    ck_assert_uint_eq(st.tiles_total, tiles_total);
    ck_assert_uint_eq(st.tiles_computed, tiles_computed);
    for (int l = 0; l < layers; l++) {
        /* live fraction over the session's full geometry (B+1 rows, larger Sq/Sk) */
        uint64_t nk = (uint64_t)la_tiles(Sk + 70, (int32_t)v.bn), live_bits = 0;
        uint64_t rows = (uint64_t)(B + 1) * H * v.n_q_tiles;
        for (uint64_t rr = 0; rr < rows; rr++)
            for (uint64_t n = 0; n < nk; n++)
                live_bits += (mask[l][rr * v.n_k_words + n / 32] >> (n % 32)) & 1u;
        double want = (double)live_bits / (double)(rows * nk);
        ck_assert_double_eq_tol(live[l], want, 1e-12);
    }
    ck_assert_double_lt(live[1], 1.0); /* layer 1 ran at threshold +1 on step 3 */

    /* dry run: decisions equal a direct dry run, the session's mask is untouched */
    {
        eng_attn_req r;
        prob_req(&p, &r, sid, 0, steps);
        r.dry_run = 1;
        r.has_decisions = 1;
        r.decisions.buffer_id = p.s.id;
        r.decisions.offset = p.off[5];
        r.decisions.dtype = LA_DTYPE_U32;
        r.has_threshold = 1;
        r.threshold = 0.5f;
        memset(prob_ptr(&p, 5), 0, v.layer_mask_bytes);
        call c;
        run_ok(&h, &r, &c);
        la_attn_params d;
        memset(&d, 0, sizeof d);
        tu_params(&d, prob_ptr(&p, 0), prob_ptr(&p, 1), prob_ptr(&p, 2), o_ref, lse_ref, mask[0], B,
                  Sq, Sk, H, D, dt, (int32_t)v.bm, (int32_t)v.bn);
        d.mask_stride[2] = v.n_k_words;
        d.mask_stride[1] = (int64_t)v.n_k_words * v.n_q_tiles;
        d.mask_stride[0] = d.mask_stride[1] * H;
        d.mode = LA_MODE_SKIP;
        d.step = steps;
        d.tau = 0.5f;
        /* rows outside this call's geometry are left as they were: start both at 0 */
        memset(dec, 0, v.layer_mask_bytes);
        d.decisions = dec;
        ck_assert_int_eq(la_ref_attn_fwd(&d), 0);
        ck_assert_msg(memcmp(dec, prob_ptr(&p, 5), v.layer_mask_bytes) == 0, "decisions differ");
        size_t gl;
        uint64_t total;
        ck_assert_int_eq(
            eng_mask_read(h.e, UID, sid, 0, 0, 0, got, v.layer_mask_bytes, &gl, &total, &err), 0);
        ck_assert_msg(memcmp(got, mask[0], v.layer_mask_bytes) == 0, "dry run changed the mask");
    }
    /* reset: all ones again */
    ck_assert_int_eq(eng_session_reset(h.e, UID, sid, &err), 0);
    ck_assert_int_eq(eng_session_info(h.e, UID, sid, live, 2, &st, &err), 0);
    ck_assert_double_eq(live[0], 1.0);
    ck_assert_double_eq(live[1], 1.0);

    for (int l = 0; l < layers; l++)
        free(mask[l]);
    free(dec);
    free(o_ref);
    free(lse_ref);
    free(got);
    free(base);
    free(dir);
    shm_drop(&p.s);
    h_close(&h);
}

START_TEST(multi_step_f32) { multi_step(LA_DTYPE_F32, 2, 150, 200, 2, 64); }
END_TEST
START_TEST(multi_step_bf16) { multi_step(LA_DTYPE_BF16, 1, 130, 100, 3, 128); }
END_TEST

/* One q-tile per slice (B2 H2: 2 q-tiles of which one partial, 8 slices per call). */
START_TEST(multi_step_f32_qtile_slices)
{
    g_slice = 1;
    multi_step(LA_DTYPE_F32, 2, 150, 200, 2, 64);
}
END_TEST

/* Two heads per slice of three (the last slice of each batch row has one). */
START_TEST(multi_step_bf16_head_slices)
{
    g_slice = 2ull * 2 * 130 * 100 * 128;
    multi_step(LA_DTYPE_BF16, 2, 130, 100, 3, 128);
}
END_TEST

/* Ring attention: each (layer, kv shard) has its own mask; live fraction averages the shards. */
START_TEST(kv_shards)
{
    harness h;
    h_open(&h, NULL, g_slice);
    eng_session_spec sp = spec_make("ring", 2, 2, 64, LA_DTYPE_F32, 256, 512, 1);
    sp.kv_shards = 2;
    sp.threshold = INFINITY;
    eng_session_view v;
    uint64_t sid = open_ok(&h, UID, CONN, &sp, &v);
    ck_assert_uint_eq(v.mask_bytes, 4 * v.layer_mask_bytes);
    prob p;
    prob_make(&h, &p, CONN, 1, 256, 512, 2, 64, LA_DTYPE_F32, 0);
    tu_rng rng;
    tu_rng_init(&rng, 21);
    prob_fill(&p, &rng, 2.0);
    eng_attn_req r;
    prob_req(&p, &r, sid, 1, 0);
    r.kv_shard = 1;
    call c;
    run_ok(&h, &r, &c);
    uint32_t *mask = malloc(v.layer_mask_bytes), *got = malloc(v.layer_mask_bytes);
    memset(mask, 0xff, v.layer_mask_bytes);
    void *o = malloc(p.bytes[3]);
    la_attn_params d;
    tu_params(&d, prob_ptr(&p, 0), prob_ptr(&p, 1), prob_ptr(&p, 2), o, NULL, mask, 1, 256, 512, 2,
              64, LA_DTYPE_F32, (int32_t)v.bm, (int32_t)v.bn);
    d.mode = LA_MODE_SKIP;
    d.tau = INFINITY;
    ck_assert_int_eq(la_ref_attn_fwd(&d), 0);
    eng_error err = {{0}};
    size_t gl;
    uint64_t total;
    for (uint32_t l = 0; l < 2; l++)
        for (uint32_t k = 0; k < 2; k++) {
            ck_assert_int_eq(
                eng_mask_read(h.e, UID, sid, l, k, 0, got, v.layer_mask_bytes, &gl, &total, &err),
                0);
            if (l == 1 && k == 1)
                ck_assert_msg(!memcmp(got, mask, v.layer_mask_bytes), "shard 1 mask differs");
            else
                for (size_t i = 0; i < v.layer_mask_bytes / 4; i++)
                    ck_assert_uint_eq(got[i], 0xffffffffu);
        }
    /* tau = +inf: each row keeps only its first visited tile (must-do none): 1 of 8 */
    double live[2];
    eng_session_stats st;
    ck_assert_int_eq(eng_session_info(h.e, UID, sid, live, 2, &st, &err), 0);
    ck_assert_double_eq(live[0], 1.0);
    ck_assert_double_eq_tol(live[1], (1.0 + 1.0 / 8) / 2, 1e-12);
    ck_assert_uint_eq(c.res.tiles_computed, c.res.tiles_total); /* the first call computes all */
    /* partial reads */
    ck_assert_int_eq(eng_mask_read(h.e, UID, sid, 1, 1, 4, got, 8, &gl, &total, &err), 0);
    ck_assert_uint_eq(gl, 8);
    ck_assert_uint_eq(got[0], mask[1]);
    ck_assert_int_eq(eng_mask_read(h.e, UID, sid, 1, 1, total - 4, got, 64, &gl, &total, &err), 0);
    ck_assert_uint_eq(gl, 4);
    free(mask);
    free(got);
    free(o);
    shm_drop(&p.s);
    h_close(&h);
}
END_TEST

/* Ring attention with carried row maxima through the engine: the keys cut into P shards of a
 * ring session (kv_shards = P), each shard called with the same row_max tensor (in place, in
 * its own buffer, K/V as strided views of one buffer) in the visiting order of the step,
 * decide bit for bit what one call over all keys decides in a session of one shard, compute
 * as many tiles and end with the same row maxima. Three steps, both directions. */
static void row_max_ring(void)
{
    enum { B = 2, SQ = 200, H = 2, D = 64, P = 3 };
    harness h;
    h_open(&h, NULL, g_slice);
    eng_session_spec one = spec_make("whole", 1, H, D, LA_DTYPE_F32, SQ, 0, B);
    eng_session_view v1, vr;
    one.max_seq_k = 512;
    uint64_t s1 = open_ok(&h, UID, CONN, &one, &v1);
    const int L = 2 * (int)v1.bn, SK = P * L, nkl = L / (int)v1.bn;
    eng_session_spec ring = spec_make("ring", 1, H, D, LA_DTYPE_F32, SQ, (uint32_t)L, B);
    ring.kv_shards = P;
    uint64_t sr = open_ok(&h, UID, CONN, &ring, &vr);
    ck_assert_int_le(SK, 512);
    prob p;
    prob_make(&h, &p, CONN, B, SQ, SK, H, D, LA_DTYPE_F32, 0);
    tu_rng rng;
    tu_rng_init(&rng, 31);
    prob_fill(&p, &rng, 2.0);
    /* two k-tiles of three weak, so that tiles get skipped */
    float *kf = prob_ptr(&p, 1);
    for (int64_t j = 0; j < (int64_t)B * SK; j++)
        if ((j % SK) / (int)v1.bn % 3)
            for (int i = 0; i < H * D; i++)
                kf[j * H * D + i] *= 0.1f;
    shm rm;
    const size_t nr = (size_t)B * H * SQ;
    ck_assert_int_eq(shm_make(&h, UID, CONN, 2 * nr * 4, &rm), 0);
    float *r1 = rm.p, *r2 = r1 + nr;
    uint32_t *m1 = malloc(v1.layer_mask_bytes), *ms = malloc(vr.layer_mask_bytes);
    eng_error err = {{0}};
    for (uint32_t step = 0; step < 3; step++) {
        for (size_t i = 0; i < 2 * nr; i++)
            r1[i] = -INFINITY;
        eng_attn_req r;
        prob_req(&p, &r, s1, 0, step);
        r.has_row_max = 1;
        tensor(&r.row_max, rm.id, 0, LA_DTYPE_F32, B, H, SQ, 0);
        call c;
        run_ok(&h, &r, &c);
        uint64_t single_tiles = c.res.tiles_computed, shard_tiles = 0;
        for (int jj = 0; jj < P; jj++) {
            const int j = step % 2 ? jj : P - 1 - jj; /* descending on even steps */
            prob_req(&p, &r, sr, 0, step);
            r.kv_shard = (uint32_t)j;
            for (int t = 1; t <= 2; t++) {
                eng_tensor *x = t == 1 ? &r.k : &r.v;
                tensor(x, p.s.id, p.off[t] + (uint64_t)j * L * H * D * 4, LA_DTYPE_F32, B, L, H, D);
                x->has_strides = 1;
                x->strides[0] = (int64_t)SK * H * D, x->strides[1] = H * D, x->strides[2] = D;
                x->strides[3] = 1;
            }
            r.has_row_max = 1;
            tensor(&r.row_max, rm.id, nr * 4, LA_DTYPE_F32, B, H, SQ, 0);
            run_ok(&h, &r, &c);
            shard_tiles += c.res.tiles_computed;
        }
        ck_assert_uint_eq(shard_tiles, single_tiles);
        ck_assert_msg(!memcmp(r1, r2, nr * 4), "step %u: row maxima differ", step);
        size_t gl;
        uint64_t total;
        ck_assert_int_eq(eng_mask_read(h.e, UID, s1, 0, 0, 0, m1, v1.layer_mask_bytes, &gl, &total,
                                       &err), 0);
        int live = 0;
        for (int j = 0; j < P; j++) {
            ck_assert_int_eq(eng_mask_read(h.e, UID, sr, 0, (uint32_t)j, 0, ms, vr.layer_mask_bytes,
                                           &gl, &total, &err), 0);
            for (size_t row = 0; row < (size_t)B * H * v1.n_q_tiles; row++)
                for (int n = 0; n < nkl; n++) {
                    const int gn = j * nkl + n;
                    int a = (m1[row * v1.n_k_words + gn / 32] >> (gn % 32)) & 1;
                    int b = (ms[row * vr.n_k_words + n / 32] >> (n % 32)) & 1;
                    ck_assert_msg(a == b, "step %u row %zu tile %d: single %d, shard %d", step, row,
                                  gn, a, b);
                    live += a;
                }
        }
        if (step > 0)
            ck_assert_msg(live < (int)(B * H * v1.n_q_tiles) * P * nkl, "nothing skipped");
    }
    free(m1);
    free(ms);
    shm_drop(&rm);
    shm_drop(&p.s);
    h_close(&h);
}

START_TEST(row_max_ring_shards) { row_max_ring(); }
END_TEST

/* The same with one q-tile per CPU slice: row_max offsets follow the slices. */
START_TEST(row_max_ring_shards_slices)
{
    g_slice = 1;
    row_max_ring();
}
END_TEST

/* Generations restart dense: a call whose step is below the layer's last step sets that layer's
 * masks (every batch row, head and kv shard) to all ones first. Step 0 after step 3 computes
 * every tile and gives the outputs, LSE and mask of a fresh session bit for bit; the restart
 * is counted once per layer, and other layers and equal steps do not restart. */
START_TEST(step_backwards_restarts)
{
    harness h;
    h_open(&h, NULL, g_slice);
    eng_session_spec sp = spec_make("gen", 2, 2, 64, LA_DTYPE_F32, 200, 300, 2);
    sp.kv_shards = 2;
    sp.threshold = INFINITY; /* after a call each row keeps one tile: stale masks show at once */
    eng_session_view v;
    uint64_t sid = open_ok(&h, UID, CONN, &sp, &v);
    sp.key = "fresh";
    uint64_t fresh = open_ok(&h, UID, CONN, &sp, NULL);
    prob p;
    prob_make(&h, &p, CONN, 2, 200, 300, 2, 64, LA_DTYPE_F32, 0);
    tu_rng rng;
    tu_rng_init(&rng, 33);
    prob_fill(&p, &rng, 2.0);
    eng_attn_req r;
    call c;
    for (uint32_t step = 0; step < 4; step++)
        for (uint32_t layer = 0; layer < 2; layer++)
            for (uint32_t shard = 0; shard < 2; shard++) {
                prob_req(&p, &r, sid, layer, step);
                r.kv_shard = shard;
                run_ok(&h, &r, &c);
                if (step > 0)
                    ck_assert_uint_lt(c.res.tiles_computed, c.res.tiles_total);
            }
    eng_error err = {{0}};
    eng_session_stats st;
    ck_assert_int_eq(eng_session_info(h.e, UID, sid, NULL, 0, &st, &err), 0);
    ck_assert_uint_eq(st.restarts, 0);

    /* The fresh session's step 0 on layer 0, shard 1: the reference. */
    prob_req(&p, &r, fresh, 0, 0);
    r.kv_shard = 1;
    run_ok(&h, &r, &c);
    ck_assert_uint_eq(c.res.tiles_computed, c.res.tiles_total);
    void *o_want = malloc(p.bytes[3]), *lse_want = malloc(p.bytes[4]);
    uint32_t *m_want = malloc(v.layer_mask_bytes), *m_got = malloc(v.layer_mask_bytes);
    memcpy(o_want, prob_ptr(&p, 3), p.bytes[3]);
    memcpy(lse_want, prob_ptr(&p, 4), p.bytes[4]);
    size_t gl;
    uint64_t total;
    ck_assert_int_eq(
        eng_mask_read(h.e, UID, fresh, 0, 1, 0, m_want, v.layer_mask_bytes, &gl, &total, &err), 0);

    /* Step 0 again on layer 0, shard 0: the layer starts over. */
    memset(prob_ptr(&p, 3), 0, p.bytes[3]);
    prob_req(&p, &r, sid, 0, 0);
    run_ok(&h, &r, &c);
    ck_assert_uint_eq(c.res.tiles_computed, c.res.tiles_total);
    ck_assert_int_eq(eng_session_info(h.e, UID, sid, NULL, 0, &st, &err), 0);
    ck_assert_uint_eq(st.restarts, 1);
    /* Shard 1 of the same layer at the same step: its mask was reset too; it is no second
     * restart. */
    memset(prob_ptr(&p, 3), 0, p.bytes[3]);
    memset(prob_ptr(&p, 4), 0, p.bytes[4]);
    r.kv_shard = 1;
    run_ok(&h, &r, &c);
    ck_assert_uint_eq(c.res.tiles_computed, c.res.tiles_total);
    ck_assert_msg(!memcmp(prob_ptr(&p, 3), o_want, p.bytes[3]), "O differs from a fresh session");
    ck_assert_msg(!memcmp(prob_ptr(&p, 4), lse_want, p.bytes[4]),
                  "LSE differs from a fresh session");
    ck_assert_int_eq(
        eng_mask_read(h.e, UID, sid, 0, 1, 0, m_got, v.layer_mask_bytes, &gl, &total, &err), 0);
    ck_assert_msg(!memcmp(m_got, m_want, v.layer_mask_bytes), "mask differs from a fresh session");
    /* The same step once more (a second pass, e.g. guidance): no restart, the kept tiles only. */
    r.kv_shard = 0;
    run_ok(&h, &r, &c);
    ck_assert_uint_lt(c.res.tiles_computed, c.res.tiles_total);
    /* Layer 1 went on from step 3 untouched: step 4 still skips. */
    prob_req(&p, &r, sid, 1, 4);
    run_ok(&h, &r, &c);
    ck_assert_uint_lt(c.res.tiles_computed, c.res.tiles_total);
    ck_assert_int_eq(eng_session_info(h.e, UID, sid, NULL, 0, &st, &err), 0);
    ck_assert_uint_eq(st.restarts, 1);
    ck_assert_int_eq(stat_get(&h, "layer_restarts"), 1);
    /* A reset forgets the steps: step 0 after it is no restart. */
    ck_assert_int_eq(eng_session_reset(h.e, UID, sid, &err), 0);
    prob_req(&p, &r, sid, 1, 0);
    run_ok(&h, &r, &c);
    ck_assert_uint_eq(c.res.tiles_computed, c.res.tiles_total);
    ck_assert_int_eq(eng_session_info(h.e, UID, sid, NULL, 0, &st, &err), 0);
    ck_assert_uint_eq(st.restarts, 1);
    free(o_want);
    free(lse_want);
    free(m_want);
    free(m_got);
    shm_drop(&p.s);
    h_close(&h);
}
END_TEST

/* Calls submitted back to back (steps x layers, nothing awaited in between) give the same
 * outputs and masks as the same calls made one after the other: calls on one layer's mask
 * run in submission order, other layers overtake them. */
START_TEST(pipelined_steps)
{
    harness h;
    h_open(&h, NULL, g_slice);
    enum { L = 2, STEPS = 6, B = 1, S = 200, H = 2, D = 64 };
    eng_session_spec sp = spec_make("pipe", L, H, D, LA_DTYPE_F32, S, S, B);
    sp.threshold = 0.0f;
    eng_session_view v;
    uint64_t sid = open_ok(&h, UID, CONN, &sp, &v);
    size_t tb = (size_t)B * S * H * D * 4, lb = (size_t)B * H * S * 4;
    shm m;
    ck_assert_int_eq(shm_make(&h, UID, CONN, 3 * tb + (size_t)L * STEPS * (tb + lb), &m), 0);
    tu_rng rng;
    tu_rng_init(&rng, 99);
    tu_fill(&rng, m.p, LA_DTYPE_F32, 3 * (int64_t)B * S * H * D, 1.0);
    call c[L * STEPS];
    eng_error err = {{0}};
    for (int st = 0; st < STEPS; st++)
        for (int l = 0; l < L; l++) {
            int i = st * L + l;
            eng_attn_req r;
            memset(&r, 0, sizeof r);
            r.session_id = sid;
            r.layer = (uint32_t)l;
            r.step = (uint32_t)st;
            tensor(&r.q, m.id, 0, LA_DTYPE_F32, B, S, H, D);
            tensor(&r.k, m.id, tb, LA_DTYPE_F32, B, S, H, D);
            tensor(&r.v, m.id, 2 * tb, LA_DTYPE_F32, B, S, H, D);
            tensor(&r.o, m.id, 3 * tb + (size_t)i * (tb + lb), LA_DTYPE_F32, B, S, H, D);
            tensor(&r.lse, m.id, 3 * tb + (size_t)i * (tb + lb) + tb, LA_DTYPE_F32, B, H, S, 0);
            r.has_lse = 1;
            ck_assert_int_eq(h_submit(&h, UID, CONN, &r, &c[i], &err), 0);
        }
    h_wait(&h, L * STEPS);
    uint32_t *mask = malloc(v.layer_mask_bytes), *got = malloc(v.layer_mask_bytes);
    void *o = malloc(tb);
    float *lse = malloc(lb);
    char *base = m.p;
    for (int l = 0; l < L; l++) {
        memset(mask, 0xff, v.layer_mask_bytes);
        for (int st = 0; st < STEPS; st++) {
            int i = st * L + l;
            ck_assert_int_eq(c[i].status, 0);
            la_attn_params d;
            tu_params(&d, base, base + tb, base + 2 * tb, o, lse, mask, B, S, S, H, D, LA_DTYPE_F32,
                      (int32_t)v.bm, (int32_t)v.bn);
            d.mode = LA_MODE_SKIP;
            d.tau = 0.0f;
            d.step = st;
            ck_assert_int_eq(la_ref_attn_fwd(&d), 0);
            ck_assert_msg(!memcmp(o, base + 3 * tb + (size_t)i * (tb + lb), tb),
                          "step %d layer %d: O differs", st, l);
            ck_assert_msg(!memcmp(lse, base + 3 * tb + (size_t)i * (tb + lb) + tb, lb),
                          "step %d layer %d: LSE differs", st, l);
        }
        size_t gl;
        uint64_t total;
        ck_assert_int_eq(eng_mask_read(h.e, UID, sid, (uint32_t)l, 0, 0, got, v.layer_mask_bytes,
                                       &gl, &total, &err),
                         0);
        ck_assert_msg(!memcmp(got, mask, v.layer_mask_bytes), "layer %d: mask differs", l);
    }
    free(mask);
    free(got);
    free(o);
    free(lse);
    shm_drop(&m);
    h_close(&h);
}
END_TEST

/* ---- teardown with jobs in flight ---------------------------------------------------- */

START_TEST(close_session_in_flight)
{
    harness h;
    h_open(&h, NULL, g_slice);
    eng_error err = {{0}};
    eng_session_spec sp = spec_make("busy", 1, 4, 64, LA_DTYPE_F32, 512, 512, 1);
    eng_session_view v;
    uint64_t sid = open_ok(&h, UID, CONN, &sp, &v);
    prob p;
    prob_make(&h, &p, CONN, 1, 512, 512, 4, 64, LA_DTYPE_F32, 0);
    tu_rng rng;
    tu_rng_init(&rng, 5);
    prob_fill(&p, &rng, 1.0);
    eng_attn_req r;
    prob_req(&p, &r, sid, 0, 0);
    call c[3];
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(h_submit(&h, UID, CONN, &r, &c[i], &err), 0);
    /* reset with jobs in flight swaps in a fresh mask set */
    ck_assert_int_eq(eng_session_reset(h.e, UID, sid, &err), 0);
    ck_assert_int_eq(stat_get(&h, "mask_bytes"), 2 * (int64_t)v.mask_bytes);
    ck_assert_int_eq(eng_session_close(h.e, UID, sid, &err), 0);
    ck_assert_int_eq(eng_session_info(h.e, UID, sid, NULL, 0, NULL, &err), LA_ENOENT);
    ck_assert_int_eq(h_submit(&h, UID, CONN, &r, &c[0], &err), LA_ENOENT);
    ck_assert_int_eq(eng_idle(h.e), 0);
    h_wait(&h, 3);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(c[i].status, 0);
    ck_assert_int_eq(eng_idle(h.e), 1);
    ck_assert_int_eq(stat_get(&h, "mask_bytes"), 0);
    ck_assert_int_eq(stat_get(&h, "sessions"), 0);
    shm_drop(&p.s);
    h_close(&h);
}
END_TEST

START_TEST(conn_closed_in_flight)
{
    harness h;
    h_open(&h, NULL, g_slice);
    eng_error err = {{0}};
    eng_session_spec sp = spec_make("gone", 1, 4, 64, LA_DTYPE_F32, 512, 512, 1);
    uint64_t sid = open_ok(&h, UID, CONN, &sp, NULL);
    prob p;
    prob_make(&h, &p, CONN, 1, 512, 512, 4, 64, LA_DTYPE_F32, 0);
    tu_rng rng;
    tu_rng_init(&rng, 6);
    prob_fill(&p, &rng, 1.0);
    float *o = prob_ptr(&p, 3);
    for (int i = 0; i < 512 * 4 * 64; i++)
        o[i] = NAN;
    eng_attn_req r;
    prob_req(&p, &r, sid, 0, 0);
    call c[2];
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(h_submit(&h, UID, CONN, &r, &c[i], &err), 0);
    eng_conn_closed(h.e, CONN);
    /* the registration is gone at once; the mapping stays until the jobs finished */
    ck_assert_int_eq(stat_get(&h, "buffers"), 0);
    ck_assert_int_eq(h_submit(&h, UID, CONN, &r, &c[0], &err), LA_ENOENT);
    h_wait(&h, 2);
    /* Both are told; the queued one was cancelled at once, the running one finished or
     * stopped between slices. */
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(c[i].status, LA_ECLOSED);
    (void)o;
    /* the session survives, detached */
    ck_assert_int_eq(stat_get(&h, "sessions_detached"), 1);
    shm_drop(&p.s);
    h_close(&h);
}
END_TEST

START_TEST(free_with_jobs_queued)
{
    harness h;
    h_open(&h, NULL, g_slice);
    eng_error err = {{0}};
    eng_session_spec sp = spec_make("q", 1, 4, 64, LA_DTYPE_F32, 512, 512, 1);
    uint64_t sid = open_ok(&h, UID, CONN, &sp, NULL);
    prob p;
    prob_make(&h, &p, CONN, 1, 512, 512, 4, 64, LA_DTYPE_F32, 0);
    tu_rng rng;
    tu_rng_init(&rng, 7);
    prob_fill(&p, &rng, 1.0);
    eng_attn_req r;
    prob_req(&p, &r, sid, 0, 0);
    call c[8];
    for (int i = 0; i < 8; i++)
        ck_assert_int_eq(h_submit(&h, UID, CONN, &r, &c[i], &err), 0);
    eng_shutdown(h.e);
    ck_assert_int_eq(h_submit(&h, UID, CONN, &r, &c[0], &err), LA_ESHUTDOWN);
    eng_free(h.e);
    for (int i = 0; i < 8; i++) {
        ck_assert_int_eq(c[i].ran, 1);
        ck_assert_msg(c[i].status == 0 || c[i].status == LA_ESHUTDOWN, "job %d: %d", i,
                      c[i].status);
    }
    close(h.pipe[0]);
    close(h.pipe[1]);
    shm_drop(&p.s);
}
END_TEST

START_TEST(devices_and_stats)
{
    harness h;
    h_open(&h, NULL, g_slice);
    eng_device_info dev[4];
    size_t n = eng_devices(h.e, dev, 4);
    ck_assert_uint_eq(n, 1);
    ck_assert_str_eq(dev[0].uuid, "cpu");
    ck_assert_str_eq(eng_backends(h.e), "cpu");
    ck_assert_int_eq(eng_fatal(h.e), 0);
    ck_assert_int_eq(eng_idle(h.e), 1);
    eng_session_spec sp = spec_make("listed", 4, 2, 64, LA_DTYPE_F32, 64, 64, 1);
    open_ok(&h, UID, CONN, &sp, NULL);
    ck_assert_int_eq(stat_get(&h, "sessions_opened"), 1);
    h_close(&h);
    /* a backend that does not exist */
    eng_config cfg;
    eng_config_default(&cfg);
    cfg.backend = "tpu";
    eng *e = NULL;
    eng_error err = {{0}};
    ck_assert_int_eq(eng_new(&cfg, &e, &err), LA_EINVAL);
    eng_free(NULL);
    if (!tu_has_gpu()) {
        /* cuda asked for where there is none: refused; auto falls back to the CPU */
        cfg.backend = "cuda";
        ck_assert_int_eq(eng_new(&cfg, &e, &err), LA_ENODEV);
        ck_assert_msg(strstr(err.msg, "cuda"), "%s", err.msg);
        cfg.backend = "auto";
        cfg.cpu_threads = 1;
        ck_assert_int_eq(eng_new(&cfg, &e, &err), 0);
        ck_assert_str_eq(eng_backends(e), "cpu");
        eng_session_spec sp2 = spec_make("auto", 1, 2, 64, LA_DTYPE_BF16, 64, 64, 1);
        sp2.device = "auto";
        eng_session_view v;
        ck_assert_int_eq(eng_session_open(e, UID, CONN, &sp2, &v, &err), 0);
        ck_assert_str_eq(v.device, "cpu");
        sp2.key = "gpu";
        sp2.device = "cuda";
        ck_assert_int_eq(eng_session_open(e, UID, CONN, &sp2, &v, &err), LA_ENODEV);
        eng_free(e);
    }
}
END_TEST

/* ---- GPU: the cuda backend end to end through CUDA IPC (skipped without a GPU) ------------ */

#ifdef LA_HAVE_CUDA
#include <cuda_runtime_api.h>
#include <sys/wait.h>

static void write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t k = write(fd, c, n);
        if (k <= 0)
            _exit(3);
        c += k, n -= (size_t)k;
    }
}
static int read_all(int fd, void *p, size_t n)
{
    char *c = p;
    while (n) {
        ssize_t k = read(fd, c, n);
        if (k <= 0)
            return -1;
        c += k, n -= (size_t)k;
    }
    return 0;
}

enum { G_B = 1, G_S = 300, G_H = 2, G_D = 64, G_STEPS = 3 };
#define G_N ((size_t)G_B * G_S * G_H * G_D)
#define G_T (G_N * 2)                                         /* one bf16 tensor */
#define G_L ((size_t)G_B * G_H * G_S * 4)                     /* lse */
#define G_OFF(i) ((size_t)(i) * ((G_T + 255) & ~(size_t)255)) /* q k v o, then lse */

typedef struct g_export {
    uint8_t mem[64], ev[64];
    char uuid[64];
    uint64_t size;
    int ok;
} g_export;

/* The client process: owns the GPU memory, exports it, reads O back after the daemon's event. */
static void g_exporter(int in, int out)
{
    g_export x;
    memset(&x, 0, sizeof x);
    uint16_t *host = malloc(3 * G_T);
    if (read_all(in, host, 3 * G_T))
        _exit(2);
    void *blk = NULL;
    cudaStream_t st;
    cudaEvent_t ev;
    struct cudaDeviceProp prop;
    x.size = G_OFF(4) + G_L;
    x.ok =
        cudaSetDevice(0) == cudaSuccess && cudaGetDeviceProperties(&prop, 0) == cudaSuccess &&
        cudaMalloc(&blk, x.size) == cudaSuccess &&
        cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) == cudaSuccess &&
        cudaMemcpyAsync((char *)blk + G_OFF(0), host, G_T, cudaMemcpyHostToDevice, st) == 0 &&
        cudaMemcpyAsync((char *)blk + G_OFF(1), host + G_N, G_T, cudaMemcpyHostToDevice, st) == 0 &&
        cudaMemcpyAsync((char *)blk + G_OFF(2), host + 2 * G_N, G_T, cudaMemcpyHostToDevice, st) ==
            0 &&
        cudaEventCreateWithFlags(&ev, cudaEventDisableTiming | cudaEventInterprocess) == 0 &&
        cudaEventRecord(ev, st) == cudaSuccess &&
        cudaIpcGetMemHandle((cudaIpcMemHandle_t *)x.mem, blk) == cudaSuccess &&
        cudaIpcGetEventHandle((cudaIpcEventHandle_t *)x.ev, ev) == cudaSuccess;
    if (x.ok) {
        const unsigned char *b = (const unsigned char *)prop.uuid.bytes;
        snprintf(x.uuid, sizeof x.uuid,
                 "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                 b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
                 b[14], b[15]);
    }
    write_all(out, &x, sizeof x);
    if (!x.ok)
        _exit(1);
    /* The daemon's completion event of the last call; then O and LSE go back. */
    uint8_t done[64];
    if (read_all(in, done, 64))
        _exit(2);
    cudaEvent_t dev;
    char *back = malloc(G_T + G_L);
    int ok =
        cudaIpcOpenEventHandle(&dev, *(cudaIpcEventHandle_t *)done) == cudaSuccess &&
        cudaStreamWaitEvent(st, dev, 0) == cudaSuccess &&
        cudaMemcpyAsync(back, (char *)blk + G_OFF(3), G_T, cudaMemcpyDeviceToHost, st) == 0 &&
        cudaMemcpyAsync(back + G_T, (char *)blk + G_OFF(4), G_L, cudaMemcpyDeviceToHost, st) == 0 &&
        cudaStreamSynchronize(st) == cudaSuccess;
    write_all(out, &ok, sizeof ok);
    write_all(out, back, G_T + G_L);
    /* Free only after the daemon side closed its import. */
    char bye;
    if (read_all(in, &bye, 1) == 0)
        cudaFree(blk);
    _exit(0);
}
#endif

START_TEST(gpu_ipc_end_to_end)
{
#ifndef LA_HAVE_CUDA
    ck_abort_msg("built without CUDA: this case cannot run on a GPU machine (build with nvcc)");
#else
    int to_child[2], from_child[2];
    ck_assert_int_eq(pipe(to_child), 0);
    ck_assert_int_eq(pipe(from_child), 0);
    pid_t pid = fork(); /* before this process touches CUDA */
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        close(to_child[1]);
        close(from_child[0]);
        g_exporter(to_child[0], from_child[1]);
    }
    close(to_child[0]);
    close(from_child[1]);
    tu_rng rng;
    tu_rng_init(&rng, 1234);
    uint16_t *host = malloc(3 * G_T);
    tu_fill(&rng, host, LA_DTYPE_BF16, (int64_t)G_N, 2.0);
    tu_fill(&rng, host + G_N, LA_DTYPE_BF16, (int64_t)G_N, 2.0);
    tu_fill(&rng, host + 2 * G_N, LA_DTYPE_BF16, (int64_t)G_N, 1.0);
    write_all(to_child[1], host, 3 * G_T);
    g_export x;
    ck_assert_int_eq(read_all(from_child[0], &x, sizeof x), 0);
    ck_assert_msg(x.ok, "the exporter process could not set up its GPU memory");

    harness h;
    eng_config cfg;
    eng_config_default(&cfg);
    cfg.backend = "cuda";
    h_open_cfg(&h, &cfg);
    eng_error err = {{0}};
    ck_assert_str_eq(eng_backends(h.e), "cpu,cuda");
    uint64_t bid, real;
    int rc = eng_buffer_add_cuda_ipc(h.e, UID, CONN, x.mem, 64, x.uuid, x.size, &bid, &real, &err);
    ck_assert_msg(rc == 0, "IPC import: %d %s", rc, err.msg);
    ck_assert_uint_ge(real, x.size);
    uint64_t bad;
    ck_assert_int_eq(
        eng_buffer_add_cuda_ipc(h.e, UID, CONN, x.mem, 64, x.uuid, real + 1, &bad, &real, &err),
        LA_ERANGE);

    eng_session_spec sp = spec_make("gpu", 1, G_H, G_D, LA_DTYPE_BF16, G_S, G_S, G_B);
    sp.device = x.uuid;
    sp.threshold = -2.0f;
    eng_session_view v;
    uint64_t sid = open_ok(&h, UID, CONN, &sp, &v);
    ck_assert_str_eq(v.device, x.uuid);

    uint32_t *mask = malloc(v.layer_mask_bytes), *got = malloc(v.layer_mask_bytes);
    memset(mask, 0xff, v.layer_mask_bytes);
    uint16_t *o_ref = malloc(G_T);
    float *lse_ref = malloc(G_L);
    call c[G_STEPS];
    for (int st = 0; st < G_STEPS; st++) {
        eng_attn_req r;
        memset(&r, 0, sizeof r);
        r.session_id = sid;
        r.step = (uint32_t)st;
        tensor(&r.q, bid, G_OFF(0), LA_DTYPE_BF16, G_B, G_S, G_H, G_D);
        tensor(&r.k, bid, G_OFF(1), LA_DTYPE_BF16, G_B, G_S, G_H, G_D);
        tensor(&r.v, bid, G_OFF(2), LA_DTYPE_BF16, G_B, G_S, G_H, G_D);
        tensor(&r.o, bid, G_OFF(3), LA_DTYPE_BF16, G_B, G_S, G_H, G_D);
        tensor(&r.lse, bid, G_OFF(4), LA_DTYPE_F32, G_B, G_H, G_S, 0);
        r.has_lse = 1;
        if (st == 0) {
            r.has_wait_event = 1;
            memcpy(r.wait_event, x.ev, 64);
        }
        ck_assert_int_eq(h_submit(&h, UID, CONN, &r, &c[st], &err), 0);
    }
    h_wait(&h, G_STEPS);
    int64_t tiles_ref = 0;
    for (int st = 0; st < G_STEPS; st++) {
        ck_assert_msg(c[st].status == 0, "step %d: status %d", st, c[st].status);
        ck_assert_int_eq(c[st].res.has_done_event, 1);
        la_attn_params d;
        tu_params(&d, host, host + G_N, host + 2 * G_N, o_ref, lse_ref, mask, G_B, G_S, G_S, G_H,
                  G_D, LA_DTYPE_BF16, (int32_t)v.bm, (int32_t)v.bn);
        d.mode = LA_MODE_SKIP;
        d.tau = -2.0f;
        d.step = st;
        int64_t tc = 0;
        d.ret_tiles_computed = &tc;
        ck_assert_int_eq(la_ref_attn_fwd(&d), 0);
        tiles_ref = tc;
    }
    /* The mask copy on the host is refreshed by the worker after each call. */
    size_t gl;
    uint64_t total;
    ck_assert_int_eq(
        eng_mask_read(h.e, UID, sid, 0, 0, 0, got, v.layer_mask_bytes, &gl, &total, &err), 0);
    int diff = 0;
    for (size_t i = 0; i < v.layer_mask_bytes / 4; i++)
        diff += __builtin_popcount(got[i] ^ mask[i]);
    ck_assert_msg(diff <= 2, "%d mask bits differ from the CPU reference (ties allowed: 2)", diff);
    ck_assert_msg(llabs((long long)c[G_STEPS - 1].res.tiles_computed - tiles_ref) <= 2,
                  "tiles computed %llu, reference %lld",
                  (unsigned long long)c[G_STEPS - 1].res.tiles_computed, (long long)tiles_ref);

    /* O and LSE of the last call, read by the client after the daemon's event. */
    write_all(to_child[1], c[G_STEPS - 1].res.done_event, 64);
    int ok = 0;
    char *back = malloc(G_T + G_L);
    ck_assert_int_eq(read_all(from_child[0], &ok, sizeof ok), 0);
    ck_assert_int_eq(read_all(from_child[0], back, G_T + G_L), 0);
    ck_assert_msg(ok, "the exporter could not read O back");
    double *a = malloc(G_N * sizeof *a), *b = malloc(G_N * sizeof *b);
    for (size_t i = 0; i < G_N; i++) {
        a[i] = tu_get(o_ref, LA_DTYPE_BF16, (int64_t)i);
        b[i] = tu_get(back, LA_DTYPE_BF16, (int64_t)i);
    }
    double e_o = tu_rel_l2(a, b, (int64_t)G_N);
    ck_assert_msg(e_o <= 1e-2, "O relative L2 error %g against the CPU reference", e_o);
    for (size_t i = 0; i < G_L / 4; i++) {
        a[i] = lse_ref[i];
        b[i] = ((float *)(back + G_T))[i];
    }
    double e_l = tu_rel_l2(a, b, (int64_t)(G_L / 4));
    ck_assert_msg(e_l <= 1e-3, "LSE relative L2 error %g", e_l);

    eng_free(h.e); /* closes the import before the exporter frees its memory */
    char bye = 1;
    write_all(to_child[1], &bye, 1);
    int status = 0;
    waitpid(pid, &status, 0);
    ck_assert_int_eq(WEXITSTATUS(status), 0);
    free(host), free(mask), free(got), free(o_ref), free(lse_ref), free(back), free(a), free(b);
#endif
}
END_TEST

int main(void)
{
    tu_seed();
    Suite *s = suite_create("engine");
    TCase *tc = tcase_create("sessions");
    tcase_set_timeout(tc, 20);
    tcase_add_test(tc, session_open_attach_close);
    tcase_add_test(tc, session_limits);
    tcase_add_test(tc, mask_cap_lru);
    tcase_add_test(tc, grace_and_attach);
    tcase_add_test(tc, idle_ttl);
    tcase_add_test(tc, devices_and_stats);
    suite_add_tcase(s, tc);
    tc = tcase_create("validation");
    tcase_set_timeout(tc, 20);
    tcase_add_test(tc, attn_validation);
    tcase_add_test(tc, buffer_limits);
    suite_add_tcase(s, tc);
    tc = tcase_create("numbers");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, multi_step_f32);
    tcase_add_test(tc, multi_step_bf16);
    tcase_add_test(tc, multi_step_f32_qtile_slices);
    tcase_add_test(tc, multi_step_bf16_head_slices);
    tcase_add_test(tc, pipelined_steps);
    tcase_add_test(tc, kv_shards);
    tcase_add_test(tc, row_max_ring_shards);
    tcase_add_test(tc, row_max_ring_shards_slices);
    tcase_add_test(tc, step_backwards_restarts);
    suite_add_tcase(s, tc);
    tc = tcase_create("teardown");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, close_session_in_flight);
    tcase_add_test(tc, conn_closed_in_flight);
    tcase_add_test(tc, free_with_jobs_queued);
    suite_add_tcase(s, tc);
    tc = tu_gpu_tcase(s, "gpu", 60);
    tu_gpu_test(tc, gpu_ipc_end_to_end);
    return tu_run_suite(s);
}
