/* conn.c — one client connection: reading frames, decoding, queueing replies (see conn.h). */
#include "conn.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "codes.h"
#include "log.h"

#define LINGER_MS 2000      /* conn_close_after_flush: longest wait for the client to read */
#define RECVS_PER_WAKEUP 16 /* fairness: other clients get their turn after this many reads */
/* Fairness: frames handled per connection per loop iteration; the rest wait in the buffer
 * (reading paused) and are handled by the connection's idle handle on later iterations,
 * between which every other connection's events are polled. */
#define FRAMES_PER_WAKEUP 32

struct conn_out {
    list_node link;
    size_t len, off;
    uint8_t data[];
};

/* ---- protobuf-c allocator charging the connection's budget -------------------------------- */

typedef struct {
    size_t size;
    max_align_t align;
} alloc_hdr;

static void *pb_alloc(void *data, size_t size)
{
    conn *c = data;
    if (size > c->alloc_cap - c->alloc_used || size > SIZE_MAX - sizeof(alloc_hdr))
        return NULL;
    alloc_hdr *h = malloc(sizeof(alloc_hdr) + size);
    if (!h)
        return NULL;
    h->size = size;
    c->alloc_used += size;
    return h + 1;
}

static void pb_free(void *data, void *p)
{
    conn *c = data;
    if (!p)
        return;
    alloc_hdr *h = (alloc_hdr *)p - 1;
    c->alloc_used -= h->size;
    free(h);
}

static void update_poll(conn *c);

/* ---- lifetime ----------------------------------------------------------------------------- */

void conn_ref(conn *c) { c->refs++; }

void conn_unref(conn *c)
{
    if (--c->refs > 0)
        return;
    frame_reader_free(&c->fr);
    free(c);
}

static void on_handle_closed(uv_handle_t *h)
{
    conn *c = h->data;
    if (h == (uv_handle_t *)&c->poll && c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    conn_unref(c);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Frees a reply buffer, counted: the owner gives freed memory back to the system (server.c). */
static void out_free(conn *c, conn_out *o)
{
    c->ctr->bytes_released += sizeof(*o) + o->len;
    free(o);
}

static void drop_outq(conn *c)
{
    conn_out *o;
    list_for_each_entry (o, &c->out, conn_out, link) {
        list_remove(&o->link);
        out_free(c, o);
    }
    c->acct->out_bytes -= c->out_bytes;
    c->out_bytes = 0;
}

/* Brings the user's fd count up to date with what c's reader holds. */
static void sync_fds(conn *c)
{
    c->acct->fds = c->acct->fds - c->fds_counted + (uint32_t)c->fr.n_fds;
    c->fds_counted = (uint32_t)c->fr.n_fds;
}

void conn_set_user(conn *c, conn_user *u)
{
    u->out_bytes += c->out_bytes;
    u->fds += c->fds_counted;
    c->acct->out_bytes -= c->out_bytes;
    c->acct->fds -= c->fds_counted;
    c->acct = u;
}

void conn_close(conn *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    c->paused = c->lingering = 0;
    drop_outq(c);
    /* The queued fds and the read buffer go now, not once the last job in flight ended. */
    c->ctr->bytes_released += c->fr.cap;
    frame_reader_free(&c->fr);
    sync_fds(c);
    uv_timer_stop(&c->timer);
    uv_poll_stop(&c->poll);
    uv_idle_stop(&c->idle);
    c->backlog = 0;
    uv_close((uv_handle_t *)&c->poll, on_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    uv_close((uv_handle_t *)&c->idle, on_handle_closed);
    if (c->hooks.closed)
        c->hooks.closed(c->hooks.data, c);
}

/* Logs a protocol error of c and closes it. */
static void conn_fail(conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void conn_fail(conn *c, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    c->ctr->protocol_errors++;
    log_warn(CONN_FMT ": %s; closing the connection", CONN_ARGS(c), msg);
    conn_close(c);
}

static void on_linger_timeout(uv_timer_t *t)
{
    conn *c = t->data;
    log_info(CONN_FMT ": did not read its last reply within %d ms; closing", CONN_ARGS(c),
             LINGER_MS);
    conn_close(c);
}

void conn_close_after_flush(conn *c)
{
    if (c->closing || c->lingering)
        return;
    if (!conn_has_output(c)) {
        conn_close(c);
        return;
    }
    c->lingering = 1;
    c->partial_timer = 0;
    uv_timer_stop(&c->timer);
    uv_timer_start(&c->timer, on_linger_timeout, LINGER_MS, 0);
    update_poll(c);
}

/* A protocol error the client may still read about: logged and counted, then an Error frame
 * (request id 0) of code with msg, unless code is 0 (the reply before says it), then the close
 * once what is queued is written. */
static void conn_refuse(conn *c, int code, const char *msg)
{
    c->ctr->protocol_errors++;
    log_info(CONN_FMT ": %s; closing the connection", CONN_ARGS(c), msg);
    if (code)
        conn_send_error(c, 0, code, msg);
    if (!c->closing)
        conn_close_after_flush(c);
}

void conn_quiesce(conn *c)
{
    c->quiesced = 1;
    update_poll(c);
}

void conn_hello_done(conn *c)
{
    c->hello_done = 1;
    uv_timer_stop(&c->timer);
}

/* ---- writing ------------------------------------------------------------------------------ */

/* Writes what the socket takes. Returns 0, or LA_ECLOSED when the connection was closed. */
static int flush(conn *c)
{
    conn_out *o;
    list_for_each_entry (o, &c->out, conn_out, link) {
        ssize_t n = frame_send(c->fd, o->data + o->off, o->len - o->off, -1);
        if (n == LA_EAGAIN)
            break;
        if (n < 0) {
            log_debug(CONN_FMT ": send failed (%s); closing", CONN_ARGS(c), codes_strerror((int)n));
            conn_close(c);
            return LA_ECLOSED;
        }
        c->ctr->bytes_out += (uint64_t)n;
        o->off += (size_t)n;
        c->out_bytes -= (size_t)n;
        c->acct->out_bytes -= (uint64_t)n;
        if (o->off < o->len)
            break;
        list_remove(&o->link);
        out_free(c, o);
    }
    if (!conn_has_output(c) && c->lingering) {
        conn_close(c);
        return LA_ECLOSED;
    }
    return 0;
}

void conn_flush_final(conn *c, int timeout_ms)
{
    uint64_t end = now_ms() + (uint64_t)timeout_ms;
    while (!c->closing && conn_has_output(c)) {
        if (flush(c) < 0 || !conn_has_output(c))
            return;
        uint64_t now = now_ms();
        if (now >= end)
            return;
        struct pollfd p = {.fd = c->fd, .events = POLLOUT};
        if (poll(&p, 1, (int)(end - now)) <= 0)
            return;
    }
}

int conn_send(conn *c, const Liteattn__Reply *r)
{
    if (c->closing)
        return LA_ECLOSED;
    uint8_t *buf;
    size_t len;
    /* Replies stay within the default frame limit, which every client accepts. */
    int rc = frame_pack(&r->base, FRAME_DEFAULT_MAX, &buf, &len);
    if (rc == LA_ELIMIT) {
        log_warn(CONN_FMT ": reply to request %llu exceeds %u bytes; sending an error instead",
                 CONN_ARGS(c), (unsigned long long)r->id, FRAME_DEFAULT_MAX);
        Liteattn__Error e = LITEATTN__ERROR__INIT;
        e.code = LA_ELIMIT;
        e.message = (char *)"reply too large for one frame";
        Liteattn__Reply er = LITEATTN__REPLY__INIT;
        er.id = r->id;
        er.body_case = LITEATTN__REPLY__BODY_ERROR;
        er.error = &e;
        rc = frame_pack(&er.base, FRAME_DEFAULT_MAX, &buf, &len);
    }
    if (rc < 0)
        return rc;
    conn_out *o = malloc(sizeof(*o) + len);
    if (!o) {
        free(buf);
        return LA_ENOMEM;
    }
    memcpy(o->data, buf, len);
    free(buf);
    o->len = len;
    o->off = 0;
    int was_empty = !conn_has_output(c);
    list_append(&c->out, &o->link);
    c->out_bytes += len;
    c->acct->out_bytes += len;
    c->ctr->frames_out++;

    if (was_empty && flush(c) < 0)
        return LA_ECLOSED;
    if (c->out_bytes > c->lim.max_outbound_bytes) {
        log_warn(CONN_FMT ": %zu bytes of replies wait unread (limit %llu); closing the slow "
                          "client",
                 CONN_ARGS(c), c->out_bytes, (unsigned long long)c->lim.max_outbound_bytes);
        conn_close(c);
        return LA_ECLOSED;
    }
    uint64_t ucap = c->lim.max_outbound_bytes_per_user;
    if (ucap && c->acct->out_bytes > ucap) {
        log_warn(CONN_FMT ": the user's connections hold %llu bytes of unread replies (limit "
                          "max_outbound_bytes_per_user %llu); closing this one",
                 CONN_ARGS(c), (unsigned long long)c->acct->out_bytes, (unsigned long long)ucap);
        conn_close(c);
        return LA_ECLOSED;
    }
    update_poll(c);
    return 0;
}

int conn_send_error(conn *c, uint64_t id, int code, const char *message)
{
    if (code < 0 && code > -CONN_ERROR_CODES)
        c->ctr->errors[-code]++;
    Liteattn__Error e = LITEATTN__ERROR__INIT;
    e.code = code;
    e.message = (char *)(message && *message ? message : codes_strerror(code));
    Liteattn__Reply r = LITEATTN__REPLY__INIT;
    r.id = id;
    r.body_case = LITEATTN__REPLY__BODY_ERROR;
    r.error = &e;
    return conn_send(c, &r);
}

/* ---- reading ------------------------------------------------------------------------------ */

static void human_size(char *buf, size_t len, uint64_t n)
{
    if (n >= (1u << 20) && n % (1u << 20) == 0)
        snprintf(buf, len, "%llu MiB", (unsigned long long)(n >> 20));
    else if (n >= 4096 && n % 1024 == 0)
        snprintf(buf, len, "%llu KiB", (unsigned long long)(n >> 10));
    else
        snprintf(buf, len, "%llu bytes", (unsigned long long)n);
}

/* Decodes and dispatches complete frames, at most *budget of them (counted down). When the
 * budget runs out with a complete frame left, c->backlog is set (the rest waits for on_idle).
 * Returns 0, or -1 when c was closed. */
static int process_frames(conn *c, int *budget)
{
    ProtobufCAllocator alloc = {pb_alloc, pb_free, c};
    for (;;) {
        ProtobufCMessage *m;
        uint32_t len;
        /* protobuf-c hands a string on cut at a NUL: look at the bytes before they go. */
        const uint8_t *raw;
        const char *field = NULL;
        int next = frame_next(&c->fr, &raw, &len);
        if (next == 1 && *budget <= 0) {
            c->backlog = 1;
            update_poll(c);
            return 0;
        }
        int nul =
            next == 1 && frame_nul_in_string(&liteattn__request__descriptor, raw, len, &field);
        int rc = frame_next_msg(&c->fr, &liteattn__request__descriptor, &alloc, &m, &len);
        if (rc == 0)
            break;
        if (rc == LA_ELIMIT) {
            char a[32], b[32];
            human_size(a, sizeof(a), len);
            human_size(b, sizeof(b), c->fr.max_frame);
            conn_fail(c, "frame of %s exceeds the %s limit", a, b);
            return -1;
        }
        c->ctr->frames_in++;
        (*budget)--;
        if (rc < 0) {
            conn_fail(c, "undecodable request of %u bytes", len);
            return -1;
        }
        Liteattn__Request *req = (Liteattn__Request *)m;
        char why[256] = "";
        if (nul) {
            /* Refused, not cut short: a key "a\0b" must not become "a". */
            uint64_t id = req->id;
            snprintf(why, sizeof(why), "request %llu: string field '%s' holds a NUL byte",
                     (unsigned long long)id, field);
            liteattn__request__free_unpacked(req, &alloc);
            if (conn_send_error(c, id, LA_EINVAL, why) < 0 || c->closing)
                return -1;
            continue;
        }
        rc = c->hooks.request(c->hooks.data, c, req, why, sizeof(why));
        liteattn__request__free_unpacked(req, &alloc);
        sync_fds(c);
        if (c->closing)
            return -1;
        if (rc == CONN_REQ_FAIL) {
            conn_fail(c, "%s", why);
            return -1;
        }
        if (rc == CONN_REQ_CLOSE) {
            conn_refuse(c, 0, why);
            return -1;
        }
    }
    /* fds come with the first byte of the frame that uses them: one still queued when no
     * partial frame is pending was sent with a frame that does not take it. */
    if (c->fr.n_fds > 0 && c->fr.len == c->fr.head) {
        conn_fail(c, "%d file descriptor(s) sent without a BufferRegister or DoorbellRegister",
                  c->fr.n_fds);
        return -1;
    }
    return 0;
}

static void watch_partial(conn *c);

/* The user holds more unclaimed fds than max_fds_per_user: c brought the last ones. */
static void over_fd_budget(conn *c)
{
    char msg[192];
    snprintf(msg, sizeof(msg),
             "%u file descriptors of uid %u wait unclaimed over its connections (limit "
             "max_fds_inflight_per_user %u)",
             (unsigned)c->acct->fds, (unsigned)c->uid, (unsigned)c->lim.max_fds_per_user);
    for (int fd; (fd = frame_take_fd(&c->fr)) >= 0;)
        close(fd);
    sync_fds(c);
    conn_refuse(c, LA_ELIMIT, msg);
}

static void on_readable(conn *c)
{
    int budget = FRAMES_PER_WAKEUP;
    for (int i = 0; i < RECVS_PER_WAKEUP && budget > 0; i++) {
        if (c->closing || c->lingering || c->paused || c->quiesced || c->backlog)
            return;
        ssize_t n = frame_recv(&c->fr, c->fd);
        if (n == LA_EAGAIN)
            return;
        if (n == 0) {
            size_t pending = c->fr.len - c->fr.head;
            if (pending)
                log_info(CONN_FMT ": closed by the client in the middle of a frame (%zu bytes "
                                  "pending)",
                         CONN_ARGS(c), pending);
            else
                log_debug(CONN_FMT ": closed by the client", CONN_ARGS(c));
            conn_close(c);
            return;
        }
        if (n == LA_EPROTO) {
            conn_fail(c, "truncated ancillary data or more than %d file descriptors queued",
                      FRAME_MAX_FDS);
            return;
        }
        if (n < 0) {
            log_info(CONN_FMT ": receive failed (%s); closing", CONN_ARGS(c),
                     codes_strerror((int)n));
            conn_close(c);
            return;
        }
        c->ctr->bytes_in += (uint64_t)n;
        sync_fds(c);
        if (c->lim.max_fds_per_user && c->acct->fds > c->lim.max_fds_per_user) {
            over_fd_budget(c);
            return;
        }
        if (process_frames(c, &budget) < 0)
            return;
        watch_partial(c);
    }
}

/* The frames left over from an earlier wake-up: another FRAMES_PER_WAKEUP of them; reading
 * resumes once none is left. */
static void on_idle(uv_idle_t *h)
{
    conn *c = h->data;
    if (c->closing)
        return;
    int budget = FRAMES_PER_WAKEUP;
    c->backlog = 0;
    if (process_frames(c, &budget) < 0)
        return;
    watch_partial(c);
    update_poll(c);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    conn *c = h->data;
    if (c->closing)
        return;
    if (status < 0) {
        /* libuv reports POLLERR as UV_EBADF; the socket's own error says what happened. A
         * client that closes with replies it has not read resets the connection (ECONNRESET):
         * an ordinary close, not a socket error. */
        int err = 0;
        socklen_t len = sizeof(err);
        if (status == UV_EBADF && getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err == ECONNRESET || err == EPIPE)
            log_debug(CONN_FMT ": closed by the client (%s: it left replies unread)", CONN_ARGS(c),
                      strerror(err));
        else
            log_info(CONN_FMT ": socket error (%s); closing", CONN_ARGS(c),
                     err ? strerror(err) : uv_strerror(status));
        conn_close(c);
        return;
    }
    if (events & UV_WRITABLE) {
        if (flush(c) < 0)
            return;
        update_poll(c);
        if (!conn_has_output(c) && c->hooks.drained)
            c->hooks.drained(c->hooks.data, c);
    }
    if (events & (UV_READABLE | UV_DISCONNECT))
        on_readable(c);
}

static void update_poll(conn *c)
{
    if (c->closing)
        return;
    /* Left-over frames are handled (even at the in-flight limit: those beyond it get LA_EBUSY,
     * as when they come in one read), except once the connection stops taking requests. */
    int work = c->backlog && !c->lingering && !c->quiesced;
    if (work && !uv_is_active((uv_handle_t *)&c->idle))
        uv_idle_start(&c->idle, on_idle);
    else if (!work && uv_is_active((uv_handle_t *)&c->idle))
        uv_idle_stop(&c->idle);
    unsigned ev = 0;
    if (!c->paused && !c->lingering && !c->quiesced && !c->backlog)
        ev |= UV_READABLE;
    if (conn_has_output(c))
        ev |= UV_WRITABLE;
    if (ev == c->events)
        return;
    c->events = ev;
    if (ev)
        uv_poll_start(&c->poll, (int)ev, on_poll);
    else
        uv_poll_stop(&c->poll);
}

/* ---- jobs in flight ----------------------------------------------------------------------- */

void conn_job_begin(conn *c, conn_job *j, uint64_t req_id)
{
    j->req_id = req_id;
    j->answered = 0;
    list_append(&c->jobs, &j->link);
    conn_ref(c);
    if (++c->inflight >= c->lim.max_inflight) {
        c->paused = 1;
        update_poll(c);
    }
}

void conn_job_end(conn *c, conn_job *j)
{
    list_remove(&j->link);
    c->inflight--;
    if (!c->closing && c->paused && c->inflight < c->lim.max_inflight) {
        c->paused = 0;
        update_poll(c);
    }
    conn_unref(c);
}

void conn_fail_inflight(conn *c, int code, const char *message)
{
    conn_job *j;
    list_for_each_entry (j, &c->jobs, conn_job, link) {
        if (j->answered)
            continue;
        j->answered = 1;
        conn_send_error(c, j->req_id, code, message);
        if (c->closing)
            return;
    }
}

/* A frame begun after Hello must be complete within hello_timeout_s: a client that sends part
 * of one and stops would otherwise hold its buffer (up to max_frame) for ever. */
static void on_partial_timeout(uv_timer_t *t)
{
    conn *c = t->data;
    c->partial_timer = 0;
    if (c->closing || c->lingering)
        return;
    char msg[128];
    snprintf(msg, sizeof(msg), "a frame begun %u s ago is still incomplete (%zu bytes)",
             c->lim.hello_timeout_s, c->fr.len - c->fr.head);
    conn_refuse(c, LA_ETIMEDOUT, msg);
}

static void watch_partial(conn *c)
{
    if (!c->hello_done || c->lingering || c->closing)
        return;
    int partial = c->fr.len > c->fr.head;
    if (partial && !c->partial_timer) {
        c->partial_timer = 1;
        uv_timer_start(&c->timer, on_partial_timeout, (uint64_t)c->lim.hello_timeout_s * 1000, 0);
    } else if (!partial && c->partial_timer) {
        c->partial_timer = 0;
        uv_timer_stop(&c->timer);
    }
}

static void on_hello_timeout(uv_timer_t *t)
{
    conn *c = t->data;
    if (c->hello_done)
        return;
    char msg[96];
    snprintf(msg, sizeof(msg), "no Hello within %u s", c->lim.hello_timeout_s);
    conn_refuse(c, LA_ETIMEDOUT, msg);
}

int conn_new(uv_loop_t *loop, uint64_t id, int fd, uint32_t uid, uint32_t gid, int32_t pid,
             const conn_limits *lim, conn_counters *ctr, const conn_hooks *hooks, conn **ret_conn)
{
    conn *c = calloc(1, sizeof(*c));
    if (!c) {
        close(fd);
        return LA_ENOMEM;
    }
    list_init(&c->link);
    list_init(&c->out);
    list_init(&c->jobs);
    c->acct = &c->own;
    c->fd = fd;
    c->id = id;
    c->uid = uid;
    c->gid = gid;
    c->pid = pid;
    c->lim = *lim;
    c->ctr = ctr;
    c->hooks = *hooks;
    frame_reader_init(&c->fr, lim->max_frame);
    /* Decoding expands a frame (a 1-byte varint becomes an 8-byte int64, a small sub-message
     * a struct): 16x the frame limit bounds every legitimate message with room to spare. */
    c->alloc_cap = (size_t)lim->max_frame * 16 + 65536;
    int rc = uv_poll_init(loop, &c->poll, fd);
    if (rc < 0) {
        log_error("conn %llu: cannot watch its socket: %s", (unsigned long long)c->id,
                  uv_strerror(rc));
        close(fd);
        free(c);
        return LA_EIO;
    }
    uv_timer_init(loop, &c->timer);
    uv_idle_init(loop, &c->idle);
    c->poll.data = c->timer.data = c->idle.data = c;
    c->refs = 3; /* the three handles; each close callback drops one */
    uv_timer_start(&c->timer, on_hello_timeout, (uint64_t)lim->hello_timeout_s * 1000, 0);
    update_poll(c);
    *ret_conn = c;
    return 0;
}
