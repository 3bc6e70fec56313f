/*
 * check_client.c — libliteattn through a real liteattnd: each case starts its own daemon
 * (CPU backend) on a temporary socket, talks to it through the public API only and compares
 * what comes back with the CPU reference called directly on the same inputs.
 *
 * The daemon binary is $BUILD/liteattnd (BUILD defaults to build), started by tests/testutil_daemon.h.
 */
#include <check.h>
#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <sys/socket.h>
#include <sys/un.h>

#include "frame.h"
#include "la_attn.h"
#include "liteattn.h"
#include "liteattn.pb-c.h"
#include "testutil.h"
#include "testutil_daemon.h"

/* ---- the daemon of a case ------------------------------------------------------------------- */

/* The daemon of each case: tests/testutil_daemon.h (CPU backend, 2 threads, temporary socket). */
typedef td_daemon tdaemon;

static void daemon_start_args(tdaemon *d, const char *const *extra)
{
    ck_assert_msg(td_start(d, extra) == 0, "liteattnd did not start (see above)");
}

static void daemon_start(tdaemon *d) { daemon_start_args(d, NULL); }

/* Stops the daemon and removes its directory; a case that cares checks the status itself. */
static void daemon_stop(tdaemon *d) { td_stop(d); }

/* The fixtures' daemon is td_fx (tests/testutil_daemon.h): one per case (a checked fixture,
 * started in the case's own process), since the cases count sessions, buffers and calls; its
 * exit status 0 is asserted at the end of the case. */

static la_client *connect_ok(const tdaemon *d)
{
    la_client *c = NULL;
    int rc = la_connect(d->socket, "check_client", &c);
    ck_assert_msg(rc == 0, "la_connect: %s (%s)", la_err_name(rc), la_last_error_message());
    return c;
}

#define OK(expr)                                                                                   \
    do {                                                                                           \
        int rc_ = (expr);                                                                          \
        ck_assert_msg(rc_ == 0, "%s = %s (%s)", #expr, la_err_name(rc_), la_last_error_message()); \
    } while (0)

/* ---- a fake daemon, for what a real one never does ------------------------------------------ */

enum fake_mode { FAKE_SILENT, FAKE_MAJOR2, FAKE_GARBAGE, FAKE_ERRORS, FAKE_OLD };

typedef struct fake {
    int lfd;
    enum fake_mode mode;
    char dir[128], sock[192];
    pthread_t th;
} fake;

static void fake_send(int fd, Liteattn__Reply *r)
{
    uint8_t *buf;
    size_t len;
    ck_assert_int_eq(frame_pack(&r->base, 0, &buf, &len), 0);
    ck_assert_int_eq(write(fd, buf, len), (ssize_t)len);
    free(buf);
}

/* Blocking read of one request. */
static Liteattn__Request *fake_recv(int fd)
{
    uint8_t hdr[4];
    if (recv(fd, hdr, 4, MSG_WAITALL) != 4)
        return NULL;
    uint32_t n = hdr[0] | hdr[1] << 8 | hdr[2] << 16 | (uint32_t)hdr[3] << 24;
    uint8_t *b = malloc(n ? n : 1);
    if (n && recv(fd, b, n, MSG_WAITALL) != (ssize_t)n) {
        free(b);
        return NULL;
    }
    Liteattn__Request *r = liteattn__request__unpack(NULL, n, b);
    free(b);
    return r;
}

static void *fake_main(void *arg)
{
    fake *f = arg;
    int fd = accept(f->lfd, NULL, NULL);
    if (fd < 0)
        return NULL;
    Liteattn__Request *req = fake_recv(fd);
    if (!req || f->mode == FAKE_SILENT) {
        if (req)
            liteattn__request__free_unpacked(req, NULL);
        sleep(30); /* say nothing */
        close(fd);
        return NULL;
    }
    Liteattn__Reply r = LITEATTN__REPLY__INIT;
    Liteattn__HelloReply h = LITEATTN__HELLO_REPLY__INIT;
    r.id = req->id;
    liteattn__request__free_unpacked(req, NULL);
    if (f->mode == FAKE_GARBAGE) {
        uint8_t junk[8] = {4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff};
        ck_assert_int_eq(write(fd, junk, sizeof(junk)), (ssize_t)sizeof(junk));
        close(fd);
        return NULL;
    }
    r.body_case = LITEATTN__REPLY__BODY_HELLO;
    r.hello = &h;
    h.major = f->mode == FAKE_MAJOR2 ? 2 : 1;
    h.minor = 0;
    h.daemon_version = "fake";
    fake_send(fd, &r);
    if (f->mode == FAKE_ERRORS) {
        /* First request: answered by an error with a message; a reply to an id nobody asked
         * for comes first and must be ignored. Second request: the connection closes. */
        req = fake_recv(fd);
        ck_assert_ptr_nonnull(req);
        Liteattn__Reply e = LITEATTN__REPLY__INIT;
        Liteattn__Error er = LITEATTN__ERROR__INIT;
        Liteattn__Pong pong = LITEATTN__PONG__INIT;
        e.id = 9999;
        e.body_case = LITEATTN__REPLY__BODY_PONG;
        e.pong = &pong;
        fake_send(fd, &e);
        e.id = req->id;
        e.body_case = LITEATTN__REPLY__BODY_ERROR;
        e.error = &er;
        er.code = LA_EPERM;
        er.message = "fake: not today";
        fake_send(fd, &e);
        liteattn__request__free_unpacked(req, NULL);
        req = fake_recv(fd);
        if (req)
            liteattn__request__free_unpacked(req, NULL);
    }
    if (f->mode == FAKE_OLD) {
        /* A daemon from before Attention.row_max: buffers, a session, and attention replies
         * that never mention row_max, until the client leaves. */
        while ((req = fake_recv(fd)) != NULL) {
            Liteattn__Reply a = LITEATTN__REPLY__INIT;
            Liteattn__BufferReply br = LITEATTN__BUFFER_REPLY__INIT;
            Liteattn__SessionReply sr = LITEATTN__SESSION_REPLY__INIT;
            Liteattn__AttentionReply ar = LITEATTN__ATTENTION_REPLY__INIT;
            Liteattn__Ack ack = LITEATTN__ACK__INIT;
            a.id = req->id;
            switch (req->body_case) {
            case LITEATTN__REQUEST__BODY_BUFFER_REGISTER:
                a.body_case = LITEATTN__REPLY__BODY_BUFFER;
                a.buffer = &br;
                br.buffer_id = 1, br.size = req->buffer_register->size;
                break;
            case LITEATTN__REQUEST__BODY_SESSION_OPEN:
                a.body_case = LITEATTN__REPLY__BODY_SESSION;
                a.session = &sr;
                sr.session_id = 7, sr.bm = 128, sr.bn = 64, sr.mask_bytes = 64;
                break;
            case LITEATTN__REQUEST__BODY_ATTENTION:
                a.body_case = LITEATTN__REPLY__BODY_ATTENTION;
                a.attention = &ar;
                ar.has_tiles_total = ar.has_tiles_computed = 1;
                ar.tiles_total = ar.tiles_computed = 4;
                break;
            default:
                a.body_case = LITEATTN__REPLY__BODY_ACK;
                a.ack = &ack;
                break;
            }
            liteattn__request__free_unpacked(req, NULL);
            fake_send(fd, &a);
        }
    }
    close(fd);
    return NULL;
}

static void fake_start(fake *f, enum fake_mode mode)
{
    f->mode = mode;
    snprintf(f->dir, sizeof(f->dir), "/tmp/la-check-fake-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(f->dir));
    snprintf(f->sock, sizeof(f->sock), "%s/fake.sock", f->dir);
    f->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strcpy(sa.sun_path, f->sock);
    ck_assert_int_eq(bind(f->lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    ck_assert_int_eq(listen(f->lfd, 4), 0);
    ck_assert_int_eq(pthread_create(&f->th, NULL, fake_main, f), 0);
}

static void fake_stop(fake *f)
{
    pthread_cancel(f->th);
    pthread_join(f->th, NULL);
    close(f->lfd);
    unlink(f->sock);
    rmdir(f->dir);
}

START_TEST(test_hello_timeout)
{
    fake f;
    fake_start(&f, FAKE_SILENT);
    la_client *c = NULL;
    double t0 = (double)time(NULL);
    ck_assert_int_eq(la_connect(f.sock, NULL, &c), LA_ETIMEDOUT);
    double dt = (double)time(NULL) - t0;
    ck_assert_msg(dt >= 9 && dt <= 12, "Hello timed out after %.0f s, not 10", dt);
    ck_assert_ptr_null(c);
    fake_stop(&f);
}
END_TEST

START_TEST(test_hello_other_major)
{
    fake f;
    fake_start(&f, FAKE_MAJOR2);
    la_client *c = NULL;
    ck_assert_int_eq(la_connect(f.sock, NULL, &c), LA_EVERSION);
    ck_assert_ptr_nonnull(strstr(la_last_error_message(), "2.0"));
    ck_assert_ptr_null(c);
    fake_stop(&f);
}
END_TEST

START_TEST(test_hello_garbage)
{
    fake f;
    fake_start(&f, FAKE_GARBAGE);
    la_client *c = NULL;
    int rc = la_connect(f.sock, NULL, &c);
    ck_assert_msg(rc == LA_EPROTO, "garbage Hello reply: %s", la_err_name(rc));
    ck_assert_ptr_null(c);
    fake_stop(&f);
}
END_TEST

START_TEST(test_error_reply_and_close)
{
    fake f;
    fake_start(&f, FAKE_ERRORS);
    la_client *c = NULL;
    OK(la_connect(f.sock, NULL, &c));
    ck_assert_str_eq(la_client_property(c, "daemon.version"), "fake");
    la_table *t = NULL;
    ck_assert_int_eq(la_stats(c, &t), LA_EPERM);
    ck_assert_str_eq(la_last_error_message(), "fake: not today");
    ck_assert_ptr_null(t);
    ck_assert_int_eq(la_ping(c, NULL), LA_ECLOSED);
    ck_assert_int_eq(la_ping(c, NULL), LA_ECLOSED);
    la_disconnect(c);
    fake_stop(&f);
}
END_TEST

/* ---- a problem in shared memory ------------------------------------------------------------ */

/* One layer's tensors inside one host buffer: Q, K, V, O, LSE, DECISIONS. */
typedef struct prob {
    int B, Sq, Sk, H, D;
    la_dtype dt;
    size_t es;
    size_t off_q, off_k, off_v, off_o, off_lse, off_dec, size;
    la_buffer *buf;
    uint8_t *base;
    /* the direct reference */
    float *ref_rmax; /* carried row maxima [B, H, Sq] for the reference call, or NULL */
    void *ref_o;
    float *ref_lse;
    uint32_t *ref_mask, *ref_dec;
    size_t mask_words;
    int bm, bn, nq, nw;
} prob;

static size_t align64(size_t x) { return (x + 63) & ~(size_t)63; }

static void prob_init(prob *p, la_client *c, la_session *s, int B, int Sq, int Sk, int H, int D,
                      la_dtype dt)
{
    memset(p, 0, sizeof(*p));
    p->B = B;
    p->Sq = Sq;
    p->Sk = Sk;
    p->H = H;
    p->D = D;
    p->dt = dt;
    p->es = dt == LA_DTYPE_F32 ? 4 : 2;
    int64_t v;
    OK(la_session_get(s, "bm", &v));
    p->bm = (int)v;
    OK(la_session_get(s, "bn", &v));
    p->bn = (int)v;
    OK(la_session_get(s, "n_q_tiles", &v));
    p->nq = (int)v;
    OK(la_session_get(s, "n_k_words", &v));
    p->nw = (int)v;
    ck_assert_int_gt(p->bm, 0);
    ck_assert_int_gt(p->bn, 0);
    ck_assert_int_eq(p->nq, la_tiles(Sq, p->bm));
    ck_assert_int_eq(p->nw, la_mask_words(la_tiles(Sk, p->bn)));
    p->mask_words = (size_t)B * H * p->nq * p->nw;
    OK(la_session_get(s, "layer_mask_bytes", &v));
    ck_assert_int_eq(v, (int64_t)(p->mask_words * 4));

    size_t nq = (size_t)B * Sq * H * D, nk = (size_t)B * Sk * H * D;
    size_t off = 0;
    p->off_q = off;
    off = align64(off + nq * p->es);
    p->off_k = off;
    off = align64(off + nk * p->es);
    p->off_v = off;
    off = align64(off + nk * p->es);
    p->off_o = off;
    off = align64(off + nq * p->es);
    p->off_lse = off;
    off = align64(off + (size_t)B * H * Sq * 4);
    p->off_dec = off;
    off = align64(off + p->mask_words * 4);
    p->size = off;
    OK(la_buffer_new_host(c, p->size, &p->buf));
    p->base = la_buffer_host_ptr(p->buf);
    ck_assert_ptr_nonnull(p->base);
    ck_assert_int_eq(la_buffer_size(p->buf), p->size);
    p->ref_o = calloc(nq, p->es);
    p->ref_lse = calloc((size_t)B * H * Sq, 4);
    p->ref_mask = malloc(p->mask_words * 4);
    p->ref_dec = calloc(p->mask_words, 4);
    ck_assert(p->ref_o && p->ref_lse && p->ref_mask && p->ref_dec);
    /* A new mask is all ones (bits past nK are ignored; compare only bits < nK). */
    memset(p->ref_mask, 0xff, p->mask_words * 4);
}

static void prob_free(prob *p)
{
    OK(la_buffer_unregister(p->buf));
    free(p->ref_o);
    free(p->ref_lse);
    free(p->ref_mask);
    free(p->ref_dec);
}

/* Fresh inputs for a step: a fixed random part (by seed salt) plus a smaller step-dependent
 * one, so that attention drifts slowly. amp > 1.2 adds clustered structure (token i of S in
 * cluster i*4/S; queries and keys of a cluster share a centre), which makes attention peaked
 * so that tau -3 skips the tiles of other clusters. */
static void prob_fill(prob *p, uint64_t salt, int step, double amp)
{
    enum { G = 4 };
    tu_rng r0, r1;
    const int H = p->H, D = p->D;
    tu_rng_init(&r0, salt);
    tu_rng_init(&r1, salt * 1000003u + (uint64_t)step + 1);
    double *centre = malloc(sizeof(double) * G * H * D);
    ck_assert_ptr_nonnull(centre);
    for (int i = 0; i < G * H * D; i++)
        centre[i] = amp > 1.2 ? tu_rng_normal(&r0) : 0.0;
    const double nw = amp > 1.2 ? 0.5 : amp;
    for (int b = 0; b < p->B; b++)
        for (int i = 0; i < p->Sq; i++)
            for (int h = 0; h < H; h++)
                for (int d = 0; d < D; d++) {
                    int64_t e = (((int64_t)b * p->Sq + i) * H + h) * D + d;
                    double c = centre[((i * G / p->Sq) * H + h) * D + d];
                    tu_set(p->base + p->off_q, p->dt, e,
                           c + nw * (tu_rng_normal(&r0) + 0.2 * tu_rng_normal(&r1)));
                }
    for (int b = 0; b < p->B; b++)
        for (int j = 0; j < p->Sk; j++)
            for (int h = 0; h < H; h++)
                for (int d = 0; d < D; d++) {
                    int64_t e = (((int64_t)b * p->Sk + j) * H + h) * D + d;
                    double c = centre[((j * G / p->Sk) * H + h) * D + d];
                    tu_set(p->base + p->off_k, p->dt, e,
                           c + nw * (tu_rng_normal(&r0) + 0.2 * tu_rng_normal(&r1)));
                    tu_set(p->base + p->off_v, p->dt, e,
                           tu_rng_normal(&r0) + 0.2 * tu_rng_normal(&r1));
                }
    free(centre);
}

static void prob_attn(const prob *p, la_attn *a, int with_lse)
{
    int64_t sq[4] = {p->B, p->Sq, p->H, p->D}, sk[4] = {p->B, p->Sk, p->H, p->D};
    int64_t sl[3] = {p->B, p->H, p->Sq};
    OK(la_attn_set_tensor(a, LA_TENSOR_Q, p->buf, p->off_q, p->dt, 4, sq, NULL));
    OK(la_attn_set_tensor(a, LA_TENSOR_K, p->buf, p->off_k, p->dt, 4, sk, NULL));
    OK(la_attn_set_tensor(a, LA_TENSOR_V, p->buf, p->off_v, p->dt, 4, sk, NULL));
    OK(la_attn_set_tensor(a, LA_TENSOR_O, p->buf, p->off_o, p->dt, 4, sq, NULL));
    if (with_lse)
        OK(la_attn_set_tensor(a, LA_TENSOR_LSE, p->buf, p->off_lse, LA_DTYPE_F32, 3, sl, NULL));
    else
        OK(la_attn_set_tensor(a, LA_TENSOR_LSE, NULL, 0, LA_DTYPE_F32, 3, NULL, NULL));
}

/* The reference on the same inputs (read from the shared mapping), with the local mask. */
static void prob_ref(prob *p, int step, float tau, la_mode mode, int dry_run)
{
    la_attn_params a;
    memset(&a, 0, sizeof(a));
    a.q = p->base + p->off_q;
    a.k = p->base + p->off_k;
    a.v = p->base + p->off_v;
    a.o = p->ref_o;
    a.lse = p->ref_lse;
    int64_t hd = (int64_t)p->H * p->D;
    int64_t qs[4] = {(int64_t)p->Sq * hd, hd, p->D, 1}, ks[4] = {(int64_t)p->Sk * hd, hd, p->D, 1};
    memcpy(a.q_stride, qs, sizeof(qs));
    memcpy(a.o_stride, qs, sizeof(qs));
    memcpy(a.k_stride, ks, sizeof(ks));
    memcpy(a.v_stride, ks, sizeof(ks));
    a.lse_stride[0] = (int64_t)p->H * p->Sq;
    a.lse_stride[1] = p->Sq;
    a.lse_stride[2] = 1;
    a.B = p->B;
    a.Sq = p->Sq;
    a.Sk = p->Sk;
    a.H = p->H;
    a.D = p->D;
    a.dtype = p->dt;
    a.scale = 1.0f / sqrtf((float)p->D);
    a.tau = tau;
    a.mode = mode;
    a.step = step;
    a.direction = LA_DIR_ALTERNATE;
    a.mask = p->ref_mask;
    a.mask_stride[0] = (int64_t)p->H * p->nq * p->nw;
    a.mask_stride[1] = (int64_t)p->nq * p->nw;
    a.mask_stride[2] = p->nw;
    a.decisions = dry_run ? p->ref_dec : NULL;
    a.row_max = p->ref_rmax;
    a.row_max_stride[0] = (int64_t)p->H * p->Sq;
    a.row_max_stride[1] = p->Sq;
    a.row_max_stride[2] = 1;
    a.BM = p->bm;
    a.BN = p->bn;
    a.threads = 1;
    int rc = la_ref_attn_fwd(&a);
    ck_assert_msg(rc == 0, "la_ref_attn_fwd: %s", la_err_name(rc));
}

/* Compares masks over the bits n < nK only. */
static void masks_equal(const prob *p, const uint32_t *got, const uint32_t *want, const char *what)
{
    int nk = la_tiles(p->Sk, p->bn);
    for (size_t row = 0; row < p->mask_words / (size_t)p->nw; row++)
        for (int n = 0; n < nk; n++) {
            uint32_t g = got[row * p->nw + n / 32] >> (n % 32) & 1;
            uint32_t w = want[row * p->nw + n / 32] >> (n % 32) & 1;
            ck_assert_msg(g == w, "%s: row %zu tile %d: daemon %u, reference %u", what, row, n, g,
                          w);
        }
}

static int64_t popcount_mask(const prob *p, const uint32_t *m)
{
    int nk = la_tiles(p->Sk, p->bn);
    int64_t c = 0;
    for (size_t row = 0; row < p->mask_words / (size_t)p->nw; row++)
        for (int n = 0; n < nk; n++)
            c += m[row * p->nw + n / 32] >> (n % 32) & 1;
    return c;
}

static void outputs_equal(const prob *p, int with_lse)
{
    size_t nq = (size_t)p->B * p->Sq * p->H * p->D;
    const uint8_t *o = p->base + p->off_o;
    for (size_t i = 0; i < nq; i++) {
        double g = tu_get(o, p->dt, (int64_t)i), w = tu_get(p->ref_o, p->dt, (int64_t)i);
        ck_assert_msg(g == w, "O[%zu]: daemon %.9g, reference %.9g", i, g, w);
    }
    if (!with_lse)
        return;
    const float *l = (const float *)(p->base + p->off_lse);
    for (size_t i = 0; i < (size_t)p->B * p->H * p->Sq; i++)
        ck_assert_msg(l[i] == p->ref_lse[i] || (isinf(l[i]) && isinf(p->ref_lse[i])),
                      "LSE[%zu]: daemon %.9g, reference %.9g", i, l[i], p->ref_lse[i]);
}

static la_session *open_session(la_client *c, const char *key, int L, int H, int D, la_dtype dt,
                                int Sq, int Sk, int B, float tau)
{
    la_session_config *cfg;
    OK(la_session_config_new(&cfg));
    OK(la_session_config_set_geometry(cfg, (uint32_t)L, (uint32_t)H, (uint32_t)D, dt, (uint32_t)Sq,
                                      (uint32_t)Sk, (uint32_t)B, 1));
    OK(la_session_config_set_threshold(cfg, tau));
    OK(la_session_config_set_device(cfg, "cpu"));
    la_session *s = NULL;
    OK(la_session_open(c, key, cfg, &s));
    la_session_config_free(cfg);
    return s;
}

/* A multi-step, multi-layer run: daemon == reference after every call. */
static void run_session_vs_ref(la_client *c, const char *key, la_dtype dt, int L, int steps, int B,
                               int Sq, int Sk, int H, int D, uint64_t salt)
{
    const float tau = -3.0f;
    la_session *s = open_session(c, key, L, H, D, dt, Sq, Sk, B, tau);
    prob *pr = calloc((size_t)L, sizeof(prob));
    ck_assert_ptr_nonnull(pr);
    for (int l = 0; l < L; l++)
        prob_init(&pr[l], c, s, B, Sq, Sk, H, D, dt);
    la_attn *a;
    OK(la_attn_new(&a));
    uint32_t *mask = malloc(pr[0].mask_words * 4);
    int64_t first_live = -1, last_live = -1;
    for (int step = 0; step < steps; step++) {
        for (int l = 0; l < L; l++) {
            prob *p = &pr[l];
            prob_fill(p, salt + (uint64_t)l, step, 1.6);
            prob_attn(p, a, 1);
            OK(la_attn_set_position(a, (uint32_t)l, (uint32_t)step, 0));
            la_call *call;
            OK(la_attn_run(s, a, &call));
            int64_t tt, tc;
            OK(la_call_stat(call, "tiles_total", &tt));
            OK(la_call_stat(call, "tiles_computed", &tc));
            ck_assert_int_eq(tt, (int64_t)B * H * p->nq * la_tiles(Sk, p->bn));
            ck_assert_int_le(tc, tt);
            ck_assert_int_eq(la_call_status(call), 0);
            la_call_free(call);
            prob_ref(p, step, tau, LA_MODE_SKIP, 0);
            outputs_equal(p, 1);
            OK(la_session_read_mask(s, (uint32_t)l, 0, mask, p->mask_words * 4));
            masks_equal(p, mask, p->ref_mask, "mask");
            if (l == 0) {
                int64_t live = popcount_mask(p, mask);
                if (first_live < 0)
                    first_live = live;
                last_live = live;
            }
        }
    }
    /* The data is peaked enough that tau -3 skips something. */
    ck_assert_msg(last_live < (int64_t)pr[0].mask_words / pr[0].nw * la_tiles(Sk, pr[0].bn),
                  "nothing was skipped (live %lld)", (long long)last_live);
    ck_assert_int_le(last_live, first_live);
    double live[64];
    uint64_t calls = 0;
    OK(la_session_info(s, live, 64, &calls));
    ck_assert_int_ge(calls, (uint64_t)(L * steps));
    for (int l = 0; l < L; l++)
        ck_assert(live[l] > 0.0 && live[l] <= 1.0);
    la_attn_free(a);
    free(mask);
    for (int l = 0; l < L; l++)
        prob_free(&pr[l]);
    free(pr);
    OK(la_session_close(s));
}

/* ---- cases --------------------------------------------------------------------------------- */

START_TEST(test_connect_properties)
{
    la_client *c = connect_ok(&td_fx);
    const char *v = la_client_property(c, "daemon.version");
    ck_assert_ptr_nonnull(v);
    ck_assert_str_eq(la_client_property(c, "protocol"), "1.0");
    ck_assert_ptr_nonnull(strstr(la_client_property(c, "backends"), "cpu"));
    ck_assert_ptr_nonnull(la_client_property(c, "devices"));
    ck_assert_int_gt(atoi(la_client_property(c, "limit.max_inflight")), 0);
    ck_assert_int_gt(atoi(la_client_property(c, "limit.max_frame")), 0);
    ck_assert_ptr_null(la_client_property(c, "no.such.thing"));
    ck_assert_ptr_null(la_client_property(NULL, "protocol"));
    ck_assert_str_eq(la_version(), LA_VERSION_STRING);
    la_disconnect(c);
    la_disconnect(NULL);

    /* Nothing listens: LA_ECONN naming the path; ret_client untouched. */
    char path[256];
    snprintf(path, sizeof(path), "%s/nobody.sock", td_fx.dir);
    la_client *c2 = (la_client *)(uintptr_t)0x1;
    ck_assert_int_eq(la_connect(path, NULL, &c2), LA_ECONN);
    ck_assert_ptr_eq(c2, (la_client *)(uintptr_t)0x1);
    ck_assert_ptr_nonnull(strstr(la_last_error_message(), "nobody.sock"));
}
END_TEST

START_TEST(test_ping)
{
    la_client *c = connect_ok(&td_fx);
    for (int i = 0; i < 50; i++) {
        uint64_t rtt = 0;
        OK(la_ping(c, &rtt));
        ck_assert_uint_gt(rtt, 0);
        ck_assert_uint_lt(rtt, 1000000000ull);
    }
    OK(la_ping(c, NULL));
    /* Nothing in flight: la_client_process waits out its timeout and returns 0. */
    ck_assert_int_eq(la_client_process(c, 0), 0);
    ck_assert_int_eq(la_client_process(c, 50), 0);
    la_disconnect(c);
}
END_TEST

START_TEST(test_session_bf16_matches_reference)
{
    la_client *c = connect_ok(&td_fx);
    /* Partial tiles on both axes, Sq != Sk, B > 1, H > 1. */
    run_session_vs_ref(c, "bf16", LA_DTYPE_BF16, 3, 5, 2, 200, 333, 2, 64, 11);
    la_disconnect(c);
}
END_TEST

START_TEST(test_session_f32_matches_reference)
{
    la_client *c = connect_ok(&td_fx);
    run_session_vs_ref(c, "f32", LA_DTYPE_F32, 2, 4, 2, 257, 190, 3, 64, 22);
    la_disconnect(c);
}
END_TEST

typedef struct thread_arg {
    const tdaemon *d;
    const char *key;
    uint64_t salt;
} thread_arg;

static void *client_thread(void *arg)
{
    thread_arg *t = arg;
    la_client *c = connect_ok(t->d);
    run_session_vs_ref(c, t->key, LA_DTYPE_BF16, 2, 4, 1, 192, 192, 2, 64, t->salt);
    la_disconnect(c);
    return NULL;
}

START_TEST(test_two_clients_at_once)
{
    pthread_t th[2];
    thread_arg args[2] = {{&td_fx, "client-a", 101}, {&td_fx, "client-b", 202}};
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(pthread_create(&th[i], NULL, client_thread, &args[i]), 0);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    /* Both sessions were separate: both keys could be opened and were closed again. */
    la_client *c = connect_ok(&td_fx);
    la_table *t;
    OK(la_sessions(c, &t));
    ck_assert_int_eq(la_table_rows(t), 0);
    la_table_free(t);
    la_disconnect(c);
}
END_TEST

START_TEST(test_reattach_after_disconnect)
{
    la_client *c = connect_ok(&td_fx);
    la_session *s = open_session(c, "keep-me", 2, 2, 64, LA_DTYPE_BF16, 256, 256, 1, -3.0f);
    prob p;
    prob_init(&p, c, s, 1, 256, 256, 2, 64, LA_DTYPE_BF16);
    la_attn *a;
    OK(la_attn_new(&a));
    for (int step = 0; step < 3; step++) {
        prob_fill(&p, 77, step, 1.6);
        prob_attn(&p, a, 0);
        OK(la_attn_set_position(a, 1, (uint32_t)step, 0));
        OK(la_attn_run(s, a, NULL));
        prob_ref(&p, step, -3.0f, LA_MODE_SKIP, 0);
    }
    uint32_t *before = malloc(p.mask_words * 4), *after = malloc(p.mask_words * 4);
    OK(la_session_read_mask(s, 1, 0, before, p.mask_words * 4));
    masks_equal(&p, before, p.ref_mask, "before detach");
    int64_t id0;
    OK(la_session_get(s, "id", &id0));
    /* Same key again while it is open: LA_EEXIST. */
    la_session_config *cfg;
    OK(la_session_config_new(&cfg));
    OK(la_session_config_set_geometry(cfg, 2, 2, 64, LA_DTYPE_BF16, 256, 256, 1, 1));
    la_session *dup = NULL;
    ck_assert_int_eq(la_session_open(c, "keep-me", cfg, &dup), LA_EEXIST);
    ck_assert_ptr_null(dup);
    la_session_config_free(cfg);

    la_session_detach(s);
    la_session_detach(NULL);
    la_buffer *keep = p.buf;
    (void)keep;
    la_attn_free(a);
    la_disconnect(c); /* frees p.buf's handle too */

    c = connect_ok(&td_fx);
    la_session *s2;
    OK(la_session_attach(c, "keep-me", &s2));
    int64_t v;
    OK(la_session_get(s2, "id", &v));
    ck_assert_int_eq(v, id0);
    OK(la_session_get(s2, "layers", &v));
    ck_assert_int_eq(v, 2);
    OK(la_session_get(s2, "heads", &v));
    ck_assert_int_eq(v, 2);
    OK(la_session_get(s2, "head_dim", &v));
    ck_assert_int_eq(v, 64);
    ck_assert_int_eq(la_session_get(s2, "colour", &v), LA_ENOENT);
    OK(la_session_read_mask(s2, 1, 0, after, p.mask_words * 4));
    masks_equal(&p, after, before, "after re-attach");
    /* The session goes on from its masks: one more step equals the reference. */
    prob p2;
    prob_init(&p2, c, s2, 1, 256, 256, 2, 64, LA_DTYPE_BF16);
    memcpy(p2.ref_mask, p.ref_mask, p.mask_words * 4);
    OK(la_attn_new(&a));
    prob_fill(&p2, 77, 3, 1.6);
    prob_attn(&p2, a, 1);
    OK(la_attn_set_position(a, 1, 3, 0));
    OK(la_attn_run(s2, a, NULL));
    prob_ref(&p2, 3, -3.0f, LA_MODE_SKIP, 0);
    outputs_equal(&p2, 1);
    la_attn_free(a);
    prob_free(&p2);
    free(p.ref_o);
    free(p.ref_lse);
    free(p.ref_mask);
    free(p.ref_dec);
    OK(la_session_close(s2));
    /* Closed: attaching fails. */
    la_session *s3 = NULL;
    ck_assert_int_eq(la_session_attach(c, "keep-me", &s3), LA_ENOENT);
    ck_assert_ptr_null(s3);
    ck_assert_str_ne(la_last_error_message(), "");
    free(before);
    free(after);
    la_disconnect(c);
}
END_TEST

typedef struct cb_state {
    int fired;
    int status[16];
    la_call *calls[16];
} cb_state;

static cb_state *g_cb;

static void on_done(la_call *call, int status, void *user)
{
    int idx = (int)(intptr_t)user;
    g_cb->status[idx] = status;
    ck_assert_ptr_eq(call, g_cb->calls[idx]);
    g_cb->fired++;
}

static void free_in_callback(la_call *call, int status, void *user)
{
    ck_assert_int_eq(status, 0);
    la_call_free(call);
    *(int *)user = 1;
}

START_TEST(test_async_pipelined)
{
    la_client *c = connect_ok(&td_fx);
    enum { L = 6 };
    la_session *s = open_session(c, "async", L, 2, 64, LA_DTYPE_BF16, 256, 256, 1, -3.0f);
    prob pr[L];
    la_attn *a[L];
    cb_state st;
    memset(&st, 0, sizeof(st));
    g_cb = &st;
    for (int l = 0; l < L; l++) {
        prob_init(&pr[l], c, s, 1, 256, 256, 2, 64, LA_DTYPE_BF16);
        OK(la_attn_new(&a[l]));
    }
    for (int step = 0; step < 2; step++) {
        /* All layers in flight at once, completion by callback through la_client_process. */
        memset(&st, 0, sizeof(st));
        for (int l = 0; l < L; l++) {
            prob_fill(&pr[l], 300 + (uint64_t)l, step, 1.6);
            prob_attn(&pr[l], a[l], 1);
            OK(la_attn_set_position(a[l], (uint32_t)l, (uint32_t)step, 0));
            OK(la_attn_submit(s, a[l], on_done, (void *)(intptr_t)l, &st.calls[l]));
        }
        int guard = 0;
        while (st.fired < L) {
            int n = la_client_process(c, 5000);
            ck_assert_int_ge(n, 0);
            ck_assert_int_lt(++guard, 1000);
        }
        for (int l = 0; l < L; l++) {
            ck_assert_int_eq(st.status[l], 0);
            ck_assert_int_eq(la_call_status(st.calls[l]), 0);
            la_call_free(st.calls[l]);
            prob_ref(&pr[l], step, -3.0f, LA_MODE_SKIP, 0);
            outputs_equal(&pr[l], 1);
        }
    }
    /* No callback: poll with la_call_status, then la_call_wait, pipelined. */
    la_call *calls[L];
    for (int l = 0; l < L; l++) {
        prob_fill(&pr[l], 300 + (uint64_t)l, 2, 1.6);
        prob_attn(&pr[l], a[l], 1);
        OK(la_attn_set_position(a[l], (uint32_t)l, 2, 0));
        OK(la_attn_submit(s, a[l], NULL, NULL, &calls[l]));
        int stt = la_call_status(calls[l]);
        ck_assert(stt == LA_EAGAIN || stt == 0);
    }
    int64_t v;
    for (int l = L - 1; l >= 0; l--) {
        ck_assert_int_eq(la_call_wait(calls[l], 10000), 0);
        OK(la_call_stat(calls[l], "compute_ns", &v));
        ck_assert_int_ge(v, 0);
        ck_assert_int_eq(la_call_stat(calls[l], "bogus", &v), LA_ENOENT);
        unsigned char ev[64];
        ck_assert_int_eq(la_call_done_event(calls[l], ev, sizeof(ev)), LA_ENOENT);
        la_call_free(calls[l]);
        prob_ref(&pr[l], 2, -3.0f, LA_MODE_SKIP, 0);
        outputs_equal(&pr[l], 1);
    }
    /* A callback may free its own call. */
    static int freed_in_cb;
    freed_in_cb = 0;
    la_call *self;
    OK(la_attn_submit(s, a[1], free_in_callback, &freed_in_cb, &self));
    while (!freed_in_cb)
        ck_assert_int_ge(la_client_process(c, 5000), 0);
    /* A call freed while in flight never calls back; the client stays usable. */
    memset(&st, 0, sizeof(st));
    la_call *gone;
    OK(la_attn_submit(s, a[0], on_done, (void *)(intptr_t)0, &gone));
    la_call_free(gone);
    OK(la_ping(c, NULL));
    la_client_process(c, 200);
    ck_assert_int_eq(st.fired, 0);
    for (int l = 0; l < L; l++) {
        la_attn_free(a[l]);
        prob_free(&pr[l]);
    }
    OK(la_session_close(s));
    la_disconnect(c);
}
END_TEST

START_TEST(test_busy_beyond_max_inflight)
{
    tdaemon d;
    const char *extra[] = {"--max-inflight", "2", NULL};
    daemon_start_args(&d, extra);
    la_client *c = connect_ok(&d);
    ck_assert_str_eq(la_client_property(c, "limit.max_inflight"), "2");
    la_session *s = open_session(c, "busy", 3, 4, 64, LA_DTYPE_F32, 1024, 1024, 1, -3.0f);
    prob pr[3];
    la_attn *a;
    OK(la_attn_new(&a));
    la_call *calls[3];
    for (int l = 0; l < 3; l++)
        prob_init(&pr[l], c, s, 1, 1024, 1024, 4, 64, LA_DTYPE_F32);
    for (int l = 0; l < 2; l++) {
        prob_fill(&pr[l], 5, 0, 1.0);
        prob_attn(&pr[l], a, 0);
        OK(la_attn_set_position(a, (uint32_t)l, 0, 0));
        OK(la_attn_submit(s, a, NULL, NULL, &calls[l]));
    }
    prob_attn(&pr[2], a, 0);
    OK(la_attn_set_position(a, 2, 0, 0));
    calls[2] = NULL;
    int rc = la_attn_submit(s, a, NULL, NULL, &calls[2]);
    if (rc == 0) {
        /* Both finished already (a fast machine): then the third was legitimately free. */
        ck_assert_int_eq(
            la_call_status(calls[0]) != LA_EAGAIN || la_call_status(calls[1]) != LA_EAGAIN, 1);
        la_call_wait(calls[2], -1);
        la_call_free(calls[2]);
    } else {
        ck_assert_int_eq(rc, LA_EBUSY);
        ck_assert_ptr_null(calls[2]);
    }
    for (int l = 0; l < 2; l++) {
        ck_assert_int_eq(la_call_wait(calls[l], -1), 0);
        la_call_free(calls[l]);
    }
    /* Room again. */
    OK(la_attn_run(s, a, NULL));
    la_attn_free(a);
    for (int l = 0; l < 3; l++)
        prob_free(&pr[l]);
    OK(la_session_close(s));
    la_disconnect(c);
    daemon_stop(&d);
}
END_TEST

START_TEST(test_error_mapping)
{
    la_client *c = connect_ok(&td_fx);
    la_session *s = NULL;
    ck_assert_int_eq(la_session_attach(c, "no-such-session", &s), LA_ENOENT);
    ck_assert_ptr_null(s);
    ck_assert_str_ne(la_last_error_message(), "");

    s = open_session(c, "errors", 2, 2, 64, LA_DTYPE_BF16, 128, 128, 1, -3.0f);
    prob p;
    prob_init(&p, c, s, 1, 128, 128, 2, 64, LA_DTYPE_BF16);
    prob_fill(&p, 9, 0, 1.0);
    la_attn *a;
    OK(la_attn_new(&a));
    prob_attn(&p, a, 0);

    /* Layer out of range. */
    OK(la_attn_set_position(a, 7, 0, 0));
    la_call *call = (la_call *)(uintptr_t)0x1;
    int rc = la_attn_run(s, a, &call);
    ck_assert_msg(rc == LA_EINVAL || rc == LA_ERANGE, "layer 7: %s", la_err_name(rc));
    ck_assert_str_ne(la_last_error_message(), "");
    /* Layer -1 (a negative index cast to uint32_t) is named as such, not as 4294967295. */
    OK(la_attn_set_position(a, (uint32_t)-1, 0, 0));
    ck_assert_int_eq(la_attn_run(s, a, NULL), LA_EINVAL);
    ck_assert_msg(strstr(la_last_error_message(),
                         "layer -1 (4294967295 as unsigned) out of range: layers count from 0 "
                         "to 1"),
                  "layer -1: %s", la_last_error_message());
    OK(la_attn_set_position(a, 0, 0, 0));

    /* A sequence length of 0 names the tensor and the dimension. */
    int64_t s0[4] = {1, 0, 2, 64};
    ck_assert_int_eq(la_attn_set_tensor(a, LA_TENSOR_Q, p.buf, p.off_q, LA_DTYPE_BF16, 4, s0, NULL),
                     LA_EINVAL);
    ck_assert_msg(strstr(la_last_error_message(), "q: dimension 1 (Sq) is 0"), "S = 0: %s",
                  la_last_error_message());
    ck_assert_int_eq(la_attn_set_tensor(a, LA_TENSOR_V, p.buf, p.off_v, LA_DTYPE_BF16, 4, s0, NULL),
                     LA_EINVAL);
    ck_assert_msg(strstr(la_last_error_message(), "v: dimension 1 (Sk) is 0"), "S = 0: %s",
                  la_last_error_message());

    /* Reversed and out-of-range key ranges are refused, naming the range. */
    int64_t reversed[2] = {20, 10}, outside[2] = {0, 129}, negative[2] = {-1, 5};
    OK(la_attn_set_must_do(a, reversed, 1));
    ck_assert_int_eq(la_attn_run(s, a, NULL), LA_EINVAL);
    ck_assert_msg(strstr(la_last_error_message(), "must-do range 0 [20, 10) is reversed"), "%s",
                  la_last_error_message());
    OK(la_attn_set_must_do(a, NULL, 0));
    OK(la_attn_set_must_skip(a, outside, 1));
    ck_assert_int_eq(la_attn_run(s, a, NULL), LA_EINVAL);
    ck_assert_msg(strstr(la_last_error_message(),
                         "must-skip range 0 [0, 129) lies outside the call's keys [0, 128)"),
                  "%s", la_last_error_message());
    OK(la_attn_set_must_skip(a, negative, 1));
    ck_assert_int_eq(la_attn_run(s, a, NULL), LA_EINVAL);
    ck_assert_msg(strstr(la_last_error_message(), "must-skip range 0 [-1, 5) lies outside"), "%s",
                  la_last_error_message());
    OK(la_attn_set_must_skip(a, NULL, 0));

    /* Heads that do not match the session. */
    int64_t bad[4] = {1, 128, 3, 64};
    OK(la_attn_set_tensor(a, LA_TENSOR_Q, p.buf, p.off_q, LA_DTYPE_BF16, 4, bad, NULL));
    rc = la_attn_run(s, a, NULL);
    ck_assert_msg(rc == LA_EINVAL, "wrong heads: %s (%s)", la_err_name(rc),
                  la_last_error_message());
    ck_assert_str_ne(la_last_error_message(), "");
    prob_attn(&p, a, 0);

    /* O past the end of its buffer. */
    int64_t shape[4] = {1, 128, 2, 64};
    OK(la_attn_set_tensor(a, LA_TENSOR_O, p.buf, p.size - 64, LA_DTYPE_BF16, 4, shape, NULL));
    rc = la_attn_run(s, a, NULL);
    ck_assert_msg(rc == LA_ERANGE, "O past the buffer: %s (%s)", la_err_name(rc),
                  la_last_error_message());
    ck_assert_str_ne(la_last_error_message(), "");
    /* An offset near 2^64 must not wrap around. */
    OK(la_attn_set_tensor(a, LA_TENSOR_O, p.buf, UINT64_MAX - 16, LA_DTYPE_BF16, 4, shape, NULL));
    rc = la_attn_run(s, a, NULL);
    ck_assert_msg(rc == LA_ERANGE || rc == LA_EINVAL, "huge offset: %s", la_err_name(rc));
    prob_attn(&p, a, 0);

    /* Client-side checks. */
    ck_assert_int_eq(la_attn_set_tensor(a, LA_TENSOR_Q, p.buf, 0, LA_DTYPE_BF16, 3, shape, NULL),
                     LA_EINVAL);
    ck_assert_int_eq(la_attn_set_tensor(a, LA_TENSOR_Q, NULL, 0, LA_DTYPE_BF16, 4, shape, NULL),
                     LA_EINVAL);
    ck_assert_int_eq(la_attn_set_dry_run(a, 1), 0);
    ck_assert_int_eq(la_attn_run(s, a, NULL), LA_EINVAL); /* dry run without DECISIONS */
    OK(la_attn_set_dry_run(a, 0));
    la_attn *empty;
    OK(la_attn_new(&empty));
    ck_assert_int_eq(la_attn_run(s, empty, NULL), LA_EINVAL);
    la_attn_free(empty);
    la_attn_free(NULL);

    /* Unsupported head dim. */
    la_session_config *cfg;
    OK(la_session_config_new(&cfg));
    OK(la_session_config_set_geometry(cfg, 1, 1, 48, LA_DTYPE_BF16, 64, 0, 0, 0));
    la_session *s2 = NULL;
    rc = la_session_open(c, "hd48", cfg, &s2);
    ck_assert_msg(rc == LA_ENOTSUP || rc == LA_EINVAL, "head dim 48: %s", la_err_name(rc));
    ck_assert_ptr_null(s2);
    /* The dtype by name, and what the backend has. */
    OK(la_session_config_set_geometry(cfg, 1, 1, 100, LA_DTYPE_BF16, 64, 0, 0, 0));
    OK(la_session_config_set_device(cfg, "cpu"));
    ck_assert_int_eq(la_session_open(c, "hd100", cfg, &s2), LA_ENOTSUP);
    ck_assert_msg(strstr(la_last_error_message(), "no kernel for head dim 100 in bfloat16 (it "
                                                  "has head dims 64, 96, 128, 256)"),
                  "head dim 100: %s", la_last_error_message());
    ck_assert_int_eq(la_session_config_set_geometry(cfg, 0, 1, 64, LA_DTYPE_BF16, 64, 0, 0, 0),
                     LA_EINVAL);
    la_session_config_free(cfg);
    la_session_config_free(NULL);

    /* After all that the connection is healthy and the call works. */
    OK(la_ping(c, NULL));
    OK(la_attn_run(s, a, NULL));
    prob_ref(&p, 0, -3.0f, LA_MODE_SKIP, 0);
    outputs_equal(&p, 0);
    la_attn_free(a);
    prob_free(&p);
    OK(la_session_close(s));
    ck_assert_int_eq(la_session_close(NULL), 0);
    la_disconnect(c);
}
END_TEST

START_TEST(test_dry_run_leaves_mask)
{
    la_client *c = connect_ok(&td_fx);
    la_session *s = open_session(c, "dry", 1, 2, 64, LA_DTYPE_BF16, 300, 300, 2, -3.0f);
    prob p;
    prob_init(&p, c, s, 2, 300, 300, 2, 64, LA_DTYPE_BF16);
    la_attn *a;
    OK(la_attn_new(&a));
    prob_fill(&p, 41, 0, 1.6);
    prob_attn(&p, a, 0);
    OK(la_attn_set_position(a, 0, 0, 0));
    OK(la_attn_run(s, a, NULL));
    prob_ref(&p, 0, -3.0f, LA_MODE_SKIP, 0);
    uint32_t *m0 = malloc(p.mask_words * 4), *m1 = malloc(p.mask_words * 4);
    OK(la_session_read_mask(s, 0, 0, m0, p.mask_words * 4));
    masks_equal(&p, m0, p.ref_mask, "after step 0");

    /* Dry run at a stricter threshold: decisions filled, mask unchanged. */
    prob_fill(&p, 41, 1, 1.6);
    OK(la_attn_set_tensor(a, LA_TENSOR_DECISIONS, p.buf, p.off_dec, LA_DTYPE_U32, 0, NULL, NULL));
    OK(la_attn_set_dry_run(a, 1));
    OK(la_attn_set_threshold(a, -1.0f));
    OK(la_attn_set_position(a, 0, 1, 0));
    memset(p.base + p.off_dec, 0xa5, p.mask_words * 4);
    OK(la_attn_run(s, a, NULL));
    prob_ref(&p, 1, -1.0f, LA_MODE_SKIP, 1);
    outputs_equal(&p, 0);
    OK(la_session_read_mask(s, 0, 0, m1, p.mask_words * 4));
    masks_equal(&p, m1, m0, "mask after the dry run");
    masks_equal(&p, (const uint32_t *)(p.base + p.off_dec), p.ref_dec, "decisions");
    ck_assert_int_le(popcount_mask(&p, p.ref_dec), popcount_mask(&p, m0));

    /* Reset: all ones again. */
    OK(la_session_reset(s));
    OK(la_session_read_mask(s, 0, 0, m1, p.mask_words * 4));
    ck_assert_int_eq(popcount_mask(&p, m1), (int64_t)(p.mask_words / p.nw) * la_tiles(p.Sk, p.bn));
    ck_assert_int_eq(la_session_read_mask(s, 0, 0, m1, p.mask_words * 4 - 4), LA_EINVAL);
    free(m0);
    free(m1);
    la_attn_free(a);
    prob_free(&p);
    OK(la_session_close(s));
    la_disconnect(c);
}
END_TEST

/* Carried row maxima through the daemon: a ROW_MAX tensor in its own host buffer, read and
 * written in place. Step 0 starts from -inf and gets the row maxima back; the next steps start
 * from the previous step's raised by about 2 log2 units (as earlier K/V shards of a ring would
 * raise them), over the same inputs drifting. Every
 * step the daemon's O, LSE, mask and row maxima equal the reference's bit for bit, and the
 * votes did see R: the masks differ from those of a session without it. */
START_TEST(test_row_max_matches_reference)
{
    la_client *c = connect_ok(&td_fx);
    la_session *s = open_session(c, "carry", 1, 2, 64, LA_DTYPE_BF16, 300, 300, 2, -3.0f);
    la_session *s0 = open_session(c, "plain", 1, 2, 64, LA_DTYPE_BF16, 300, 300, 2, -3.0f);
    prob p;
    prob_init(&p, c, s, 2, 300, 300, 2, 64, LA_DTYPE_BF16);
    const size_t nr = (size_t)2 * 2 * 300;
    la_buffer *rb;
    OK(la_buffer_new_host(c, nr * 4, &rb));
    float *r = la_buffer_host_ptr(rb);
    p.ref_rmax = malloc(nr * 4);
    for (size_t i = 0; i < nr; i++)
        r[i] = p.ref_rmax[i] = -INFINITY;
    la_attn *a;
    OK(la_attn_new(&a));
    const int64_t rs[3] = {2, 2, 300}, bad[4] = {2, 2, 300, 1};
    ck_assert_int_eq(la_attn_set_tensor(a, LA_TENSOR_ROW_MAX, rb, 0, LA_DTYPE_F32, 4, bad, NULL),
                     LA_EINVAL);
    ck_assert_msg(strstr(la_last_error_message(), "row_max takes 3 dimensions [B, H, Sq]"), "%s",
                  la_last_error_message());
    uint32_t *mask = malloc(p.mask_words * 4), *m0 = malloc(p.mask_words * 4);
    int differ = 0;
    for (int step = 0; step < 3; step++) {
        /* after step 0, R as a ring's earlier shards would raise it: about 2 log2 units above
         * this query shard's own maxima */
        for (size_t i = 0; step > 0 && i < nr; i++)
            r[i] = p.ref_rmax[i] = r[i] + 12.0f;
        prob_fill(&p, 43, step, 1.6);
        prob_attn(&p, a, 1);
        OK(la_attn_set_position(a, 0, (uint32_t)step, 0));
        OK(la_attn_set_tensor(a, LA_TENSOR_ROW_MAX, NULL, 0, LA_DTYPE_F32, 3, NULL, NULL));
        OK(la_attn_run(s0, a, NULL)); /* the same call without R, in the other session */
        OK(la_session_read_mask(s0, 0, 0, m0, p.mask_words * 4));
        OK(la_attn_set_tensor(a, LA_TENSOR_ROW_MAX, rb, 0, LA_DTYPE_F32, 3, rs, NULL));
        OK(la_attn_run(s, a, NULL));
        prob_ref(&p, step, -3.0f, LA_MODE_SKIP, 0);
        outputs_equal(&p, 1);
        OK(la_session_read_mask(s, 0, 0, mask, p.mask_words * 4));
        masks_equal(&p, mask, p.ref_mask, "mask with row_max");
        for (size_t i = 0; i < nr; i++) {
            ck_assert_msg(memcmp(&r[i], &p.ref_rmax[i], 4) == 0,
                          "step %d: row_max[%zu] daemon %.9g, reference %.9g", step, i, r[i],
                          p.ref_rmax[i]);
            ck_assert_msg(isfinite(r[i]), "step %d: row_max[%zu] = %g", step, i, r[i]);
        }
        if (step > 0)
            for (size_t i = 0; i < p.mask_words; i++)
                differ += mask[i] != m0[i];
    }
    ck_assert_msg(differ > 0, "the carried row maxima changed no decision");
    free(mask);
    free(m0);
    free(p.ref_rmax);
    p.ref_rmax = NULL;
    la_attn_free(a);
    OK(la_buffer_unregister(rb));
    prob_free(&p);
    OK(la_session_close(s));
    OK(la_session_close(s0));
    la_disconnect(c);
}
END_TEST

/* A daemon from before Attention.row_max computes the call without it and does not say it
 * carried them: the client reports LA_ENOTSUP instead of leaving the caller with unchanged
 * maxima it believes updated. Calls without ROW_MAX are unaffected. */
START_TEST(test_row_max_old_daemon)
{
    fake f;
    fake_start(&f, FAKE_OLD);
    la_client *c = NULL;
    OK(la_connect(f.sock, NULL, &c));
    la_session *s = open_session(c, "old", 1, 1, 64, LA_DTYPE_F32, 64, 64, 1, -3.0f);
    la_buffer *b;
    OK(la_buffer_new_host(c, 1 << 16, &b));
    la_attn *a;
    OK(la_attn_new(&a));
    const int64_t t4[4] = {1, 64, 1, 64}, t3[3] = {1, 1, 64};
    OK(la_attn_set_tensor(a, LA_TENSOR_Q, b, 0, LA_DTYPE_F32, 4, t4, NULL));
    OK(la_attn_set_tensor(a, LA_TENSOR_K, b, 16384, LA_DTYPE_F32, 4, t4, NULL));
    OK(la_attn_set_tensor(a, LA_TENSOR_V, b, 32768, LA_DTYPE_F32, 4, t4, NULL));
    OK(la_attn_set_tensor(a, LA_TENSOR_O, b, 49152, LA_DTYPE_F32, 4, t4, NULL));
    OK(la_attn_run(s, a, NULL));
    OK(la_attn_set_tensor(a, LA_TENSOR_ROW_MAX, b, 65536 - 256, LA_DTYPE_F32, 3, t3, NULL));
    ck_assert_int_eq(la_attn_run(s, a, NULL), LA_ENOTSUP);
    ck_assert_msg(strstr(la_last_error_message(), "does not carry row maxima"), "%s",
                  la_last_error_message());
    la_attn_free(a);
    la_buffer_unregister(b);
    la_session_close(s);
    la_disconnect(c);
    fake_stop(&f);
}
END_TEST

static ssize_t col_of(const la_table *t, const char *name)
{
    for (size_t i = 0; i < la_table_cols(t); i++)
        if (!strcmp(la_table_col_name(t, i), name))
            return (ssize_t)i;
    return -1;
}

START_TEST(test_tables)
{
    la_client *c = connect_ok(&td_fx);
    la_session *s = open_session(c, "tabled", 3, 2, 64, LA_DTYPE_BF16, 128, 128, 1, -3.0f);
    prob p;
    prob_init(&p, c, s, 1, 128, 128, 2, 64, LA_DTYPE_BF16);
    prob_fill(&p, 1, 0, 1.0);
    la_attn *a;
    OK(la_attn_new(&a));
    prob_attn(&p, a, 0);
    OK(la_attn_run(s, a, NULL));
    /* Step 2, then step 0 again: layer 0 starts over (a new generation), counted once. */
    OK(la_attn_set_position(a, 0, 2, 0));
    OK(la_attn_run(s, a, NULL));
    OK(la_attn_set_position(a, 0, 0, 0));
    OK(la_attn_run(s, a, NULL));
    la_attn_free(a);
    int64_t calls, restarts, total, computed, skipped;
    OK(la_session_stat(s, "calls", &calls));
    OK(la_session_stat(s, "restarts", &restarts));
    OK(la_session_stat(s, "tiles_total", &total));
    OK(la_session_stat(s, "tiles_computed", &computed));
    OK(la_session_stat(s, "tiles_skipped", &skipped));
    ck_assert_int_eq(calls, 3);
    ck_assert_int_eq(restarts, 1);
    ck_assert_int_eq(total, 3 * 2 * 2); /* 1 x 2 heads x 1 q-tile x 2 k-tiles, 3 calls */
    ck_assert_int_eq(skipped, total - computed);
    ck_assert_int_eq(la_session_stat(s, "bogus", &calls), LA_ENOENT);
    ck_assert_int_eq(calls, 3);

    la_table *t;
    OK(la_stats(c, &t));
    ck_assert_int_eq(la_table_cols(t), 2);
    ck_assert_str_eq(la_table_col_name(t, 0), "name");
    ck_assert_str_eq(la_table_col_name(t, 1), "value");
    ck_assert_ptr_null(la_table_col_name(t, 2));
    ck_assert_int_gt(la_table_rows(t), 0);
    int found = 0;
    for (size_t r = 0; r < la_table_rows(t); r++) {
        int64_t v;
        OK(la_table_int(t, r, "value", &v));
        if (!strcmp(la_table_text(t, r, 0), "calls")) {
            ck_assert_int_ge(v, 1);
            found = 1;
        }
    }
    ck_assert_msg(found, "no \"calls\" counter");
    ck_assert_ptr_null(la_table_text(t, la_table_rows(t), 0));
    int64_t v;
    ck_assert_int_eq(la_table_int(t, 0, "nope", &v), LA_ENOENT);
    ck_assert_int_eq(la_table_int(t, la_table_rows(t), "value", &v), LA_ENOENT);
    ck_assert_int_eq(la_table_int(t, 0, "name", &v), LA_EINVAL);
    la_table_free(t);
    la_table_free(NULL);

    OK(la_sessions(c, &t));
    ck_assert_int_eq(la_table_rows(t), 1);
    ck_assert_int_eq(la_table_cols(t), 21);
    /* The first 16 columns keep their places; the warm-start and guardrail ones follow. */
    const char *cols[] = {
        "id",         "key",      "uid",           "layers",           "heads",
        "head_dim",   "batch",    "bm",            "bn",               "mask_bytes",
        "calls",      "restarts", "live_fraction", "attached",         "idle_s",
        "device",     "warm_key", "warm_generations", "guard_checks", "guard_restored",
        "layer_live"};
    for (size_t i = 0; i < 21; i++)
        ck_assert_msg(col_of(t, cols[i]) == (ssize_t)i, "column %s at %zd", cols[i],
                      col_of(t, cols[i]));
    ck_assert_str_eq(la_table_text(t, 0, (size_t)col_of(t, "warm_key")), "");
    OK(la_table_int(t, 0, "warm_generations", &v));
    ck_assert_int_eq(v, 0);
    OK(la_table_int(t, 0, "guard_restored", &v));
    ck_assert_int_eq(v, 0);
    {
        /* one live fraction per layer, each in [0, 1] */
        const char *ll = la_table_text(t, 0, (size_t)col_of(t, "layer_live"));
        int n = 0;
        for (const char *at = ll; at && *at; n++) {
            char *end;
            double f = strtod(at, &end);
            ck_assert_msg(end != at && f >= 0 && f <= 1, "layer_live \"%s\"", ll);
            at = *end == ',' ? end + 1 : end;
        }
        ck_assert_int_eq(n, 3);
    }
    ck_assert_str_eq(la_table_text(t, 0, (size_t)col_of(t, "key")), "tabled");
    OK(la_table_int(t, 0, "layers", &v));
    ck_assert_int_eq(v, 3);
    OK(la_table_int(t, 0, "calls", &v));
    ck_assert_int_eq(v, 3);
    OK(la_table_int(t, 0, "restarts", &v));
    ck_assert_int_eq(v, 1);
    OK(la_table_int(t, 0, "uid", &v));
    ck_assert_int_eq(v, (int64_t)getuid());
    OK(la_table_int(t, 0, "attached", &v));
    ck_assert_int_eq(v, 1);
    int64_t id;
    OK(la_session_get(s, "id", &id));
    OK(la_table_int(t, 0, "id", &v));
    ck_assert_int_eq(v, id);
    la_table_free(t);
    prob_free(&p);
    OK(la_session_close(s));
    la_disconnect(c);
}
END_TEST

START_TEST(test_register_fd)
{
    la_client *c = connect_ok(&td_fx);
    int fd = memfd_create("t", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(ftruncate(fd, 8192), 0);
    la_buffer *b = NULL;
    ck_assert_int_eq(la_buffer_register_fd(c, fd, 16384, &b), LA_EINVAL);
    ck_assert_ptr_null(b);
    OK(la_buffer_register_fd(c, fd, 8192, &b));
    ck_assert_int_eq(la_buffer_size(b), 8192);
    ck_assert_int_gt(la_buffer_id(b), 0);
    /* Our fd is still ours; writes through the library's mapping show in it. */
    ((char *)la_buffer_host_ptr(b))[100] = 42;
    char x = 0;
    ck_assert_int_eq(pread(fd, &x, 1, 100), 1);
    ck_assert_int_eq(x, 42);
    close(fd);
    OK(la_buffer_unregister(b));
    OK(la_buffer_unregister(NULL));
    ck_assert_int_eq(la_buffer_new_host(c, 0, &b), LA_EINVAL);

    /* CUDA: without a driver LA_ENODEV; bad IPC arguments LA_EINVAL. */
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    uint64_t off;
    int dummy;
    int rc = la_buffer_register_cuda(c, &dummy, &b, &off);
    if (!h)
        ck_assert_int_eq(rc, LA_ENODEV);
    else
        ck_assert_int_ne(rc, 0); /* host memory is never CUDA device memory */
    unsigned char handle[64] = {0};
    ck_assert_int_eq(la_buffer_register_cuda_ipc(c, handle, 63,
                                                 "GPU-00000000-0000-0000-0000-"
                                                 "000000000000",
                                                 4096, &b),
                     LA_EINVAL);
    ck_assert_int_eq(la_buffer_register_cuda_ipc(c, handle, 64, "not-a-uuid", 4096, &b), LA_EINVAL);
    /* The CPU daemon has no such GPU. */
    ck_assert_int_eq(
        la_buffer_register_cuda_ipc(c, handle, 64, "0123456789abcdef0123456789ABCDEF", 4096, &b),
        LA_ENODEV);
    OK(la_ping(c, NULL));
    la_disconnect(c);
}
END_TEST

START_TEST(test_daemon_gone)
{
    la_client *c = connect_ok(&td_fx);
    la_session *s = open_session(c, "doomed", 1, 8, 128, LA_DTYPE_F32, 2048, 2048, 1, -3.0f);
    prob p;
    prob_init(&p, c, s, 1, 2048, 2048, 8, 128, LA_DTYPE_F32);
    la_attn *a;
    OK(la_attn_new(&a));
    prob_attn(&p, a, 0);
    static int fired, fired_status;
    fired = 0;
    fired_status = 0;
    la_call *call;
    OK(la_attn_submit(s, a, NULL, NULL, &call));
    ck_assert_int_eq(td_kill(&td_fx), 128 + SIGKILL);
    td_stop(&td_fx); /* killed on purpose: only the directory is left for the fixture's stop */
    int rc = la_call_wait(call, 10000);
    /* Either it finished before the kill, or the connection closed under it. */
    ck_assert_msg(rc == 0 || rc == LA_ECLOSED, "wait: %s", la_err_name(rc));
    la_call_free(call);
    ck_assert_int_eq(la_ping(c, NULL), LA_ECLOSED);
    ck_assert_int_eq(la_attn_submit(s, a, NULL, NULL, &call), LA_ECLOSED);
    ck_assert_int_eq(la_client_process(c, 0), LA_ECLOSED);
    (void)fired;
    (void)fired_status;
    la_attn_free(a);
    la_buffer_unregister(p.buf); /* closed: only the local mapping goes */
    free(p.ref_o);
    free(p.ref_lse);
    free(p.ref_mask);
    free(p.ref_dec);
    la_session_detach(s);
    la_disconnect(c);
}
END_TEST

START_TEST(test_default_socket_path)
{
    char buf[256];
    setenv("LITEATTN_SOCKET", "/tmp/x/la.sock", 1);
    setenv("XDG_RUNTIME_DIR", "/run/user/1000", 1);
    OK(la_default_socket_path(buf, sizeof(buf)));
    ck_assert_str_eq(buf, "/tmp/x/la.sock");
    unsetenv("LITEATTN_SOCKET");
    /* No socket in XDG_RUNTIME_DIR: the system service's path. */
    char dir[] = "/tmp/la-xdg-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    setenv("XDG_RUNTIME_DIR", dir, 1);
    OK(la_default_socket_path(buf, sizeof(buf)));
    ck_assert_str_eq(buf, "/run/liteattn/liteattn.sock");
    /* A per-user daemon's socket there wins. */
    char path[300];
    snprintf(path, sizeof(path), "%s/liteattn.sock", dir);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strcpy(sa.sun_path, path);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    OK(la_default_socket_path(buf, sizeof(buf)));
    ck_assert_str_eq(buf, path);
    close(fd);
    unlink(path);
    rmdir(dir);
    unsetenv("XDG_RUNTIME_DIR");
    OK(la_default_socket_path(buf, sizeof(buf)));
    ck_assert_str_eq(buf, "/run/liteattn/liteattn.sock");
    strcpy(buf, "unchanged");
    ck_assert_int_eq(la_default_socket_path(buf, 5), LA_EINVAL);
    ck_assert_int_eq(la_default_socket_path(NULL, 100), LA_EINVAL);
}
END_TEST

START_TEST(test_error_names)
{
    int n = 0;
#define X_(name, val, msg)                           \
    ck_assert_str_eq(la_strerror(val), msg);         \
    ck_assert_str_eq(la_err_name(val), "LA_" #name); \
    ck_assert_int_eq(LA_##name, val);                \
    n++;
    LA_ERRNO_MAP(X_)
#undef X_
    ck_assert_int_eq(n, 20);
    ck_assert_str_eq(la_err_name(0), "LA_OK");
    ck_assert_str_eq(la_err_name(-999), "LA_UNKNOWN");
    ck_assert_str_eq(la_err_name(5), "LA_UNKNOWN");
    ck_assert_str_eq(la_strerror(-999), "unknown error");
    ck_assert_str_eq(la_strerror(LA_EINVAL), "invalid argument");
}
END_TEST

START_TEST(test_exports_only_la)
{
    const char *b = getenv("BUILD");
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "nm -D --defined-only %s/libliteattn.so 2>&1",
             b && *b ? b : "build");
    FILE *f = popen(cmd, "r");
    ck_assert_ptr_nonnull(f);
    char line[512];
    int n = 0, found_connect = 0;
    while (fgets(line, sizeof(line), f)) {
        char addr[64], type[8], name[400];
        if (sscanf(line, "%63s %7s %399s", addr, type, name) != 3)
            continue;
        if (!strcmp(type, "A")) /* the version node LITEATTN_0 */
            continue;
        char *at = strchr(name, '@');
        if (at)
            *at = 0;
        ck_assert_msg(!strncmp(name, "la_", 3), "libliteattn.so exports %s", name);
        ck_assert_msg(strncmp(name, "la_frame", 8), "libliteattn.so exports %s", name);
        if (!strcmp(name, "la_connect"))
            found_connect = 1;
        n++;
    }
    int st = pclose(f);
    ck_assert_int_eq(st, 0);
    ck_assert_int_gt(n, 50);
    ck_assert(found_connect);
}
END_TEST

START_TEST(test_config_and_attn_setters)
{
    la_session_config *cfg;
    OK(la_session_config_new(&cfg));
    float sched[3] = {-10, -5, -3};
    OK(la_session_config_set_schedule(cfg, sched, 3));
    OK(la_session_config_set_schedule(cfg, NULL, 0));
    ck_assert_int_eq(la_session_config_set_schedule(cfg, NULL, 2), LA_EINVAL);
    OK(la_session_config_set_mode(cfg, LA_MODE_OBSERVE));
    ck_assert_int_eq(la_session_config_set_mode(cfg, LA_MODE_SESSION), LA_EINVAL);
    OK(la_session_config_set_direction(cfg, LA_DIR_DESCENDING));
    ck_assert_int_eq(la_session_config_set_direction(cfg, (la_direction)9), LA_EINVAL);
    OK(la_session_config_set_threshold(cfg, -INFINITY));
    ck_assert_int_eq(la_session_config_set_threshold(cfg, NAN), LA_EINVAL);
    ck_assert_int_eq(la_session_config_set_device(cfg, ""), LA_EINVAL);
    la_session_config_free(cfg);

    la_attn *a;
    OK(la_attn_new(&a));
    int64_t pairs[4] = {0, 10, 20, 30};
    OK(la_attn_set_must_do(a, pairs, 2));
    OK(la_attn_set_must_skip(a, pairs, 1));
    OK(la_attn_set_must_do(a, NULL, 0));
    int64_t many[2 * 65] = {0};
    ck_assert_int_eq(la_attn_set_must_do(a, many, 65), LA_EINVAL);
    OK(la_attn_set_scale(a, 0.125f));
    ck_assert_int_eq(la_attn_set_scale(a, -1.0f), LA_EINVAL);
    OK(la_attn_set_threshold(a, NAN));
    OK(la_attn_set_mode(a, LA_MODE_OBSERVE));
    ck_assert_int_eq(la_attn_set_mode(a, (la_mode)7), LA_EINVAL);
    unsigned char ev[64] = {1};
    OK(la_attn_set_wait_event(a, ev, 64));
    ck_assert_int_eq(la_attn_set_wait_event(a, ev, 32), LA_EINVAL);
    OK(la_attn_set_wait_event(a, NULL, 0));
    la_attn_free(a);
}
END_TEST

/* Must-do and must-skip ranges travel to the daemon and act as in the reference. */
START_TEST(test_ranges_match_reference)
{
    la_client *c = connect_ok(&td_fx);
    la_session *s = open_session(c, "ranges", 1, 2, 64, LA_DTYPE_BF16, 256, 320, 1, 0.0f);
    prob p;
    prob_init(&p, c, s, 1, 256, 320, 2, 64, LA_DTYPE_BF16);
    la_attn *a;
    OK(la_attn_new(&a));
    int64_t must_do[2] = {0, 20}, must_skip[2] = {300, 320};
    OK(la_attn_set_must_do(a, must_do, 1));
    OK(la_attn_set_must_skip(a, must_skip, 1));
    la_range rd = {0, 20}, rs = {300, 320};
    for (int step = 0; step < 3; step++) {
        prob_fill(&p, 55, step, 1.6);
        prob_attn(&p, a, 1);
        OK(la_attn_set_position(a, 0, (uint32_t)step, 0));
        OK(la_attn_run(s, a, NULL));
        la_attn_params ap;
        (void)ap;
        /* prob_ref with the same ranges. */
        la_attn_params q;
        memset(&q, 0, sizeof(q));
        int64_t hd = (int64_t)p.H * p.D;
        q.q = p.base + p.off_q;
        q.k = p.base + p.off_k;
        q.v = p.base + p.off_v;
        q.o = p.ref_o;
        q.lse = p.ref_lse;
        int64_t qs[4] = {(int64_t)p.Sq * hd, hd, p.D, 1}, ks[4] = {(int64_t)p.Sk * hd, hd, p.D, 1};
        memcpy(q.q_stride, qs, sizeof(qs));
        memcpy(q.o_stride, qs, sizeof(qs));
        memcpy(q.k_stride, ks, sizeof(ks));
        memcpy(q.v_stride, ks, sizeof(ks));
        q.lse_stride[0] = (int64_t)p.H * p.Sq;
        q.lse_stride[1] = p.Sq;
        q.lse_stride[2] = 1;
        q.B = p.B;
        q.Sq = p.Sq;
        q.Sk = p.Sk;
        q.H = p.H;
        q.D = p.D;
        q.dtype = p.dt;
        q.scale = 1.0f / sqrtf((float)p.D);
        q.tau = 0.0f;
        q.mode = LA_MODE_SKIP;
        q.step = step;
        q.direction = LA_DIR_ALTERNATE;
        q.must_do = &rd;
        q.n_must_do = 1;
        q.must_skip = &rs;
        q.n_must_skip = 1;
        q.mask = p.ref_mask;
        q.mask_stride[0] = (int64_t)p.H * p.nq * p.nw;
        q.mask_stride[1] = (int64_t)p.nq * p.nw;
        q.mask_stride[2] = p.nw;
        q.BM = p.bm;
        q.BN = p.bn;
        q.threads = 1;
        ck_assert_int_eq(la_ref_attn_fwd(&q), 0);
        outputs_equal(&p, 1);
        uint32_t *m = malloc(p.mask_words * 4);
        OK(la_session_read_mask(s, 0, 0, m, p.mask_words * 4));
        masks_equal(&p, m, p.ref_mask, "mask with ranges");
        free(m);
    }
    la_attn_free(a);
    prob_free(&p);
    OK(la_session_close(s));
    la_disconnect(c);
}
END_TEST

typedef struct shared_arg {
    la_client *c;
    la_session *s;
    prob *p;
    int n;
    int failures;
} shared_arg;

static void *pinger(void *arg)
{
    shared_arg *a = arg;
    for (int i = 0; i < a->n; i++)
        if (la_ping(a->c, NULL) != 0)
            a->failures++;
    return NULL;
}

static void *runner(void *arg)
{
    shared_arg *a = arg;
    la_attn *at;
    if (la_attn_new(&at) != 0)
        return NULL;
    for (int i = 0; i < a->n; i++) {
        prob_attn(a->p, at, 0);
        la_attn_set_position(at, 0, 0, 0);
        la_attn_set_mode(at, LA_MODE_DENSE);
        la_call *call;
        if (la_attn_submit(a->s, at, NULL, NULL, &call) != 0) {
            a->failures++;
            continue;
        }
        if (la_call_wait(call, 20000) != 0)
            a->failures++;
        la_call_free(call);
    }
    la_attn_free(at);
    return NULL;
}

/* One client used by three threads at once: replies of one thread's requests are read and
 * dispatched by whichever thread is polling, and everybody gets theirs. */
START_TEST(test_threads_share_client)
{
    la_client *c = connect_ok(&td_fx);
    la_session *s = open_session(c, "shared", 1, 2, 64, LA_DTYPE_BF16, 128, 128, 1, -3.0f);
    prob p;
    prob_init(&p, c, s, 1, 128, 128, 2, 64, LA_DTYPE_BF16);
    prob_fill(&p, 3, 0, 1.0);
    shared_arg args[3] = {{c, s, &p, 300, 0}, {c, s, &p, 40, 0}, {c, s, &p, 300, 0}};
    pthread_t th[3];
    ck_assert_int_eq(pthread_create(&th[0], NULL, pinger, &args[0]), 0);
    ck_assert_int_eq(pthread_create(&th[1], NULL, runner, &args[1]), 0);
    ck_assert_int_eq(pthread_create(&th[2], NULL, pinger, &args[2]), 0);
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(args[i].failures, 0);
    prob_ref(&p, 0, -3.0f, LA_MODE_DENSE, 0);
    outputs_equal(&p, 0);
    prob_free(&p);
    OK(la_session_close(s));
    la_disconnect(c);
}
END_TEST

/* ---- liteattnctl ---------------------------------------------------------------------------- */

/* Runs $BUILD/liteattnctl --socket <d's socket> args; its stdout goes into out (NUL-terminated,
 * truncated to len - 1). Returns the exit status. */
static int run_ctl(const tdaemon *d, const char *args, char *out, size_t len)
{
    const char *build = getenv("BUILD");
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "%s/liteattnctl --socket '%s' %s", build && *build ? build : "build",
             d->socket, args);
    FILE *f = popen(cmd, "r");
    ck_assert_msg(f != NULL, "popen %s: %s", cmd, strerror(errno));
    size_t n = 0, r;
    while (n + 1 < len && (r = fread(out + n, 1, len - 1 - n, f)) > 0)
        n += r;
    out[n] = 0;
    char sink[4096];
    while (fread(sink, 1, sizeof(sink), f) > 0) {
    }
    int st = pclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
}

/* The devices line says "cpu: CPU reference (N threads)", not "cpu cpu CPU reference". */
START_TEST(test_ctl_status_devices)
{
    tdaemon d;
    daemon_start(&d);
    static char out[8192];
    ck_assert_int_eq(run_ctl(&d, "status", out, sizeof(out)), 0);
    const char *line = strstr(out, "\ndevices ");
    ck_assert_msg(line != NULL, "no devices line in:\n%s", out);
    ck_assert_msg(!strncmp(line + 1, "devices    cpu: CPU reference (2 threads)\n", 42),
                  "devices line: %.60s", line + 1);
    ck_assert_msg(!strstr(out, "cpu cpu"), "status:\n%s", out);
    daemon_stop(&d);
}
END_TEST

/* Checks one exposition in the Prometheus text format (0.0.4) line by line: HELP/TYPE before
 * the samples of their family, each family declared once and contiguous, metric and label names
 * well formed, label values quoted with only \\ \" \n escapes, values that parse, no
 * timestamps. Returns the number of samples. */
static int prom_check(const char *text)
{
    char families[256][96];
    int n_fam = 0, samples = 0, lineno = 0;
    const char *cur = NULL; /* family of the last TYPE line */
    for (const char *p = text; *p; lineno++) {
        const char *eol = strchr(p, '\n');
        ck_assert_msg(eol != NULL, "line %d does not end with a newline", lineno);
        char line[1024];
        size_t n = (size_t)(eol - p);
        ck_assert_msg(n < sizeof(line), "line %d too long", lineno);
        memcpy(line, p, n);
        line[n] = 0;
        p = eol + 1;
        if (!strncmp(line, "# HELP ", 7) || !strncmp(line, "# TYPE ", 7)) {
            char name[96], rest[512] = "";
            ck_assert_msg(sscanf(line + 7, "%95s %511[^\n]", name, rest) >= 1, "line %d: %s",
                          lineno, line);
            if (line[2] == 'T') {
                ck_assert_msg(!strcmp(rest, "counter") || !strcmp(rest, "gauge") ||
                                  !strcmp(rest, "untyped"),
                              "line %d: type %s", lineno, rest);
                for (int i = 0; i < n_fam; i++)
                    ck_assert_msg(strcmp(families[i], name), "family %s declared twice", name);
                ck_assert_int_lt(n_fam, 256);
                snprintf(families[n_fam], sizeof(families[0]), "%s", name);
                cur = families[n_fam++];
            }
            continue;
        }
        ck_assert_msg(line[0] != '#' && line[0] != 0, "line %d: %s", lineno, line);
        /* name{label="value",...} value */
        const char *q = line;
        ck_assert_msg(isalpha((unsigned char)*q) || *q == '_' || *q == ':', "line %d: %s", lineno,
                      line);
        while (isalnum((unsigned char)*q) || *q == '_' || *q == ':')
            q++;
        ck_assert_msg(cur && (size_t)(q - line) == strlen(cur) && !strncmp(line, cur, strlen(cur)),
                      "line %d: sample %s outside its family (last TYPE %s)", lineno, line,
                      cur ? cur : "none");
        if (*q == '{') {
            q++;
            while (*q != '}') {
                ck_assert_msg(isalpha((unsigned char)*q) || *q == '_', "line %d: label in %s",
                              lineno, line);
                while (isalnum((unsigned char)*q) || *q == '_')
                    q++;
                ck_assert_msg(q[0] == '=' && q[1] == '"', "line %d: %s", lineno, line);
                for (q += 2; *q != '"'; q++) {
                    ck_assert_msg(*q && (unsigned char)*q >= 0x20, "line %d: label value in %s",
                                  lineno, line);
                    if (*q == '\\') {
                        q++;
                        ck_assert_msg(*q == '\\' || *q == '"' || *q == 'n', "line %d: escape in %s",
                                      lineno, line);
                    }
                }
                q++;
                if (*q == ',')
                    q++;
                else
                    ck_assert_msg(*q == '}', "line %d: %s", lineno, line);
            }
            q++;
        }
        ck_assert_msg(*q == ' ', "line %d: no space before the value: %s", lineno, line);
        char *end;
        errno = 0;
        strtod(q + 1, &end);
        ck_assert_msg(end != q + 1 && *end == 0 && !errno, "line %d: value in %s", lineno, line);
        samples++;
    }
    return samples;
}

/* The value of the first sample of family name whose line contains label (NULL: any). */
static double prom_value(const char *text, const char *name, const char *label)
{
    size_t n = strlen(name);
    for (const char *p = text; *p;) {
        const char *eol = strchr(p, '\n');
        if (!strncmp(p, name, n) && (p[n] == ' ' || p[n] == '{')) {
            const char *sp = eol;
            while (sp > p && sp[-1] != ' ')
                sp--;
            char line[1024];
            snprintf(line, sizeof(line), "%.*s", (int)(eol - p), p);
            if (!label || strstr(line, label))
                return strtod(sp, NULL);
        }
        p = eol + 1;
    }
    ck_abort_msg("no sample %s%s%s", name, label ? " with " : "", label ? label : "");
    return 0;
}

/* liteattnctl metrics: a valid exposition with the counters, error codes, per-session and
 * per-user gauges; liteattn_up 0 (and exit 1) once the daemon is gone. */
START_TEST(test_ctl_metrics)
{
    tdaemon d;
    daemon_start(&d);
    la_client *c = connect_ok(&d);
    la_session *s = open_session(c, "metrics", 2, 2, 64, LA_DTYPE_BF16, 128, 128, 1, -3.0f);
    prob p;
    prob_init(&p, c, s, 1, 128, 128, 2, 64, LA_DTYPE_BF16);
    prob_fill(&p, 3, 0, 1.0);
    la_attn *a;
    OK(la_attn_new(&a));
    prob_attn(&p, a, 0);
    OK(la_attn_run(s, a, NULL));
    OK(la_attn_set_position(a, 0, 1, 0));
    OK(la_attn_run(s, a, NULL));
    OK(la_attn_set_position(a, 7, 0, 0));
    ck_assert_int_eq(la_attn_run(s, a, NULL), LA_EINVAL);
    la_attn_free(a);

    static char out[65536];
    ck_assert_int_eq(run_ctl(&d, "metrics", out, sizeof(out)), 0);
    ck_assert_int_gt(prom_check(out), 40);
    ck_assert_double_eq(prom_value(out, "liteattn_up", NULL), 1);
    ck_assert_double_eq(prom_value(out, "liteattn_calls_total", NULL), 3);
    ck_assert_double_eq(prom_value(out, "liteattn_calls_refused_total", NULL), 1);
    ck_assert_double_eq(prom_value(out, "liteattn_errors_total", "code=\"LA_EINVAL\""), 1);
    ck_assert_double_eq(prom_value(out, "liteattn_errors_total", "code=\"LA_ENOENT\""), 0);
    double total = prom_value(out, "liteattn_tiles_total", NULL);
    ck_assert_double_eq(total, 2 * 2 * 2); /* 2 calls x 2 heads x 1 q-tile x 2 k-tiles */
    ck_assert_double_eq(prom_value(out, "liteattn_tiles_computed_total", NULL) +
                            prom_value(out, "liteattn_tiles_skipped_total", NULL),
                        total);
    ck_assert_double_gt(prom_value(out, "liteattn_attention_seconds_total", NULL), 0);
    ck_assert_double_eq(prom_value(out, "liteattn_session_calls_total", "key=\"metrics\""), 2);
    ck_assert_double_eq(prom_value(out, "liteattn_session_attached", "key=\"metrics\""), 1);
    double live = prom_value(out, "liteattn_session_live_fraction", "key=\"metrics\"");
    ck_assert(live > 0 && live <= 1);
    char uid[32];
    snprintf(uid, sizeof(uid), "uid=\"%u\"", (unsigned)getuid());
    ck_assert_double_eq(prom_value(out, "liteattn_user_sessions", uid), 1);
    ck_assert_double_gt(prom_value(out, "liteattn_user_mask_bytes", uid), 0);
    ck_assert_int_eq(run_ctl(&d, "--json metrics 2>/dev/null", out, sizeof(out)), 2);

    prob_free(&p);
    OK(la_session_close(s));
    la_disconnect(c);
    daemon_stop(&d);
    ck_assert_int_eq(run_ctl(&d, "metrics 2>/dev/null", out, sizeof(out)), 1);
    ck_assert_int_eq(prom_check(out), 1);
    ck_assert_double_eq(prom_value(out, "liteattn_up", NULL), 0);
}
END_TEST

static Suite *client_suite(void)
{
    Suite *s = suite_create("client");
    TCase *local = tcase_create("local");
    tcase_set_timeout(local, 10);
    tcase_add_test(local, test_default_socket_path);
    tcase_add_test(local, test_error_names);
    tcase_add_test(local, test_exports_only_la);
    tcase_add_test(local, test_config_and_attn_setters);
    suite_add_tcase(s, local);

    TCase *conn = tcase_create("connection");
    tcase_set_timeout(conn, 30);
    tcase_add_checked_fixture(conn, td_fx_up, td_fx_down);
    tcase_add_test(conn, test_connect_properties);
    tcase_add_test(conn, test_ping);
    tcase_add_test(conn, test_register_fd);
    tcase_add_test(conn, test_tables);
    tcase_add_test(conn, test_daemon_gone);
    suite_add_tcase(s, conn);

    TCase *ctl = tcase_create("liteattnctl"); /* each case starts and stops its own daemon */
    tcase_set_timeout(ctl, 30);
    tcase_add_test(ctl, test_ctl_status_devices);
    tcase_add_test(ctl, test_ctl_metrics);
    suite_add_tcase(s, ctl);

    TCase *fk = tcase_create("fake_daemon");
    tcase_set_timeout(fk, 30);
    tcase_add_test(fk, test_hello_timeout);
    tcase_add_test(fk, test_hello_other_major);
    tcase_add_test(fk, test_hello_garbage);
    tcase_add_test(fk, test_error_reply_and_close);
    tcase_add_test(fk, test_row_max_old_daemon);
    suite_add_tcase(s, fk);

    TCase *sess = tcase_create("sessions");
    tcase_set_timeout(sess, 90);
    tcase_add_checked_fixture(sess, td_fx_up, td_fx_down);
    tcase_add_test(sess, test_session_bf16_matches_reference);
    tcase_add_test(sess, test_session_f32_matches_reference);
    tcase_add_test(sess, test_two_clients_at_once);
    tcase_add_test(sess, test_reattach_after_disconnect);
    tcase_add_test(sess, test_async_pipelined);
    tcase_add_test(sess, test_error_mapping);
    tcase_add_test(sess, test_dry_run_leaves_mask);
    tcase_add_test(sess, test_row_max_matches_reference);
    tcase_add_test(sess, test_ranges_match_reference);
    tcase_add_test(sess, test_threads_share_client);
    suite_add_tcase(s, sess);

    TCase *own = tcase_create("sessions_own_daemon");
    tcase_set_timeout(own, 90);
    tcase_add_test(own, test_busy_beyond_max_inflight);
    suite_add_tcase(s, own);
    return s;
}

int main(void)
{
    /* A daemon killed under us must not kill the test with SIGPIPE (the library uses
     * MSG_NOSIGNAL; this guards the test's own writes). */
    signal(SIGPIPE, SIG_IGN);
    return tu_run_suite(client_suite());
}
