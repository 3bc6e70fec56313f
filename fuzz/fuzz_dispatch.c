/*
 * fuzz_dispatch.c — libFuzzer target: Request decoding, validation and dispatch of every
 * message type, through the daemon's own connection code, in-process.
 *
 * One server state (libuv loop, small limits) lives for the whole run, with an engine (cpu
 * backend, one worker) per input; each input is one connection: a socketpair whose daemon end goes to
 * conn_new(), exactly as an accepted client. The harness writes the input's requests as frames
 * to the other end, runs the loop until every request was answered and every attention job
 * finished, then closes the connection and frees the engine (each input gets a fresh one, so ids
 * and limits do not depend on earlier inputs).
 *
 * Input: 1 byte of settings, then records [le16 length][Request bytes].
 *   byte 0 bit 0: send a valid Hello first; bits 1-2: the peer's uid (1000, 1001, 0, 1000);
 *          bit 3: leave the connection open at the end of the requests and close it with
 *          attention jobs possibly in flight (the engine's conn-closed path);
 *          bit 4: the rest of the input is not records but the raw byte stream of the
 *          connection (conn.c's own framing: oversized frames, undecodable bytes), written in
 *          pieces of up to 251 bytes; bit 5 with it: a memfd rides on the first piece (an fd
 *          with or without a BufferRegister).
 * A record that decodes as BufferRegister(SHM) gets a sealed memfd of min(size, 1 MiB) bytes
 * (one byte less when bit 8 of the request id is set: a buffer that claims more than its
 * fd holds) sent with its first
 * byte; one of kind VMM gets /dev/null (an fd of no CUDA allocation: the cpu backend refuses it
 * after the request's own checks), or the memfd when bit 8 of the id is set; one that decodes as
 * DoorbellRegister a memfd of its slots (16 bytes each, whole pages, one byte less likewise),
 * whose ready words stay 0. Attention requests whose compute would exceed ~2^24 multiply-adds are left out (they
 * are valid work, just slow: the fuzzer looks for crashes, not for a CPU bill).
 *
 * Checked: no crash or sanitizer report; every reply the daemon writes decodes as a Reply.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "config.h"
#include "conn.h"
#include "dispatch.h"
#include "engine.h"
#include "frame.h"
#include "liteattn.pb-c.h"
#include "log.h"
#include "server.h"

static srv *S;
static uv_async_t wake;

static void on_wake(uv_async_t *h) { eng_process_completions(S->eng); }
static void notify(void *data) { uv_async_send(&wake); }

static void engine_new(void)
{
    eng_config ec;
    eng_config_default(&ec);
    ec.backend = "cpu";
    ec.cpu_threads = 1;
    ec.limits = S->cfg.limits; /* as the daemon's srv_new hands them over */
    ec.notify = notify;
    eng_error ee = {{0}};
    eng *e;
    if (eng_new(&ec, &e, &ee) < 0) {
        fprintf(stderr, "fuzz_dispatch: eng_new: %s\n", ee.msg);
        abort();
    }
    srv_set_engine(S, e);
}

static void setup(void)
{
    char *argv[] = {"fuzz", "--config",           "/dev/null", "--backend",
                    "cpu",  "--threads",          "1",         "--max-mask-bytes",
                    "1M",   "--max-sessions",     "8",         "--max-buffers",
                    "8",    "--max-buffer-bytes", "4M",        "--max-inflight",
                    "4",    "--max-frame",        "64K",       "--max-outbound-bytes",
                    "4M",   "--log-level",        "error",     NULL};
    int argc = (int)(sizeof argv / sizeof argv[0]) - 1;
    S = calloc(1, sizeof *S);
    char err[256];
    if (cfg_parse(&S->cfg, argc, argv, err, sizeof err) != CFG_RUN) {
        fprintf(stderr, "fuzz_dispatch: %s\n", err);
        abort();
    }
    log_init(getenv("FUZZ_LOG") ? LOG_DEBUG : LOG_ERROR);
    S->listen_fd = S->lock_fd = S->reserve_fd = -1;
    list_init(&S->conns);
    uv_loop_init(&S->loop);
    uv_async_init(&S->loop, &wake, on_wake);
}

/* Reads and decodes every reply waiting on fd. */
static void drain(int fd, uint8_t **buf, size_t *len, size_t *cap)
{
    for (;;) {
        if (*cap - *len < 65536) {
            *cap = *cap * 2 + 65536;
            *buf = realloc(*buf, *cap);
            if (!*buf)
                abort();
        }
        ssize_t n = recv(fd, *buf + *len, *cap - *len, MSG_DONTWAIT);
        if (n <= 0)
            break;
        *len += (size_t)n;
    }
    size_t o = 0;
    while (*len - o >= 4) {
        const uint8_t *p = *buf + o;
        uint32_t l =
            (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        if (l > FRAME_DEFAULT_MAX)
            abort(); /* the daemon never sends a frame past the default limit */
        if (*len - o - 4 < l)
            break;
        Liteattn__Reply *r = liteattn__reply__unpack(NULL, l, p + 4);
        if (!r)
            abort(); /* the daemon wrote something its clients cannot decode */
        if (getenv("FUZZ_LOG"))
            fprintf(stderr, "reply %llu: body %d%s%s\n", (unsigned long long)r->id,
                    (int)r->body_case, r->body_case == LITEATTN__REPLY__BODY_ERROR ? " " : "",
                    r->body_case == LITEATTN__REPLY__BODY_ERROR && r->error->message
                        ? r->error->message
                        : "");
        liteattn__reply__free_unpacked(r, NULL);
        o += 4 + (size_t)l;
    }
    memmove(*buf, *buf + o, *len - o);
    *len -= o;
}

static int64_t shape_at(const Liteattn__TensorRef *t, size_t i)
{
    return t && t->n_shape > i && t->shape[i] > 0 ? t->shape[i] : 1;
}

/* Multiply-adds of an attention request, saturating. */
static double attn_cost(const Liteattn__Attention *a)
{
    return (double)shape_at(a->q, 0) * (double)shape_at(a->q, 1) * (double)shape_at(a->q, 2) *
           (double)shape_at(a->q, 3) * (double)shape_at(a->k, 1);
}

static int make_memfd(uint64_t claimed, int shorter)
{
    uint64_t sz = claimed > (1u << 20) ? (1u << 20) : claimed;
    if (shorter && sz > 0)
        sz--;
    int fd = memfd_create("fuzz", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        abort();
    if (sz && ftruncate(fd, (off_t)sz) < 0)
        abort();
    return fd;
}

static void send_all(int fd, const uint8_t *p, size_t n, int pass_fd, int peer)
{
    size_t o = 0;
    uint8_t *rb = NULL;
    size_t rl = 0, rc = 0;
    while (o < n) {
        ssize_t w = frame_send(fd, p + o, n - o, o == 0 ? pass_fd : -1);
        if (w == LA_EAGAIN) {
            /* The daemon side must read first: let the loop run (and drain its replies). */
            uv_run(&S->loop, UV_RUN_NOWAIT);
            drain(peer, &rb, &rl, &rc);
            continue;
        }
        if (w <= 0)
            break; /* the daemon closed the connection */
        o += (size_t)w;
    }
    free(rb);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    if (!S)
        setup();
    engine_new(); /* fresh ids and an empty store: inputs do not depend on each other */
    S->next_conn_id = 0;
    uint8_t flags = data[0];
    static const uint32_t uids[4] = {1000, 1001, 0, 1000};
    uint32_t uid = uids[(flags >> 1) & 3];

    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
        abort();
    conn *c;
    if (srv_attach(S, sv[0], uid, uid, 4242, &c) < 0)
        abort();
    conn_ref(c); /* ours: c stays readable until the end of this input */

    uint8_t *rb = NULL;
    size_t rl = 0, rcap = 0;
    if (flags & 1) {
        Liteattn__Hello h = LITEATTN__HELLO__INIT;
        h.major = LA_PROTOCOL_MAJOR;
        h.minor = LA_PROTOCOL_MINOR;
        h.client_name = "fuzz";
        Liteattn__Request r = LITEATTN__REQUEST__INIT;
        r.id = 1;
        r.body_case = LITEATTN__REQUEST__BODY_HELLO;
        r.hello = &h;
        uint8_t *b;
        size_t n;
        if (frame_pack(&r.base, 0, &b, &n) < 0)
            abort();
        send_all(sv[1], b, n, -1, sv[1]);
        free(b);
    }
    if (flags & 16) {
        int mfd = (flags & 32) ? make_memfd(4096, 0) : -1;
        for (size_t o = 1, piece = 0; o < size && !c->closing; piece++) {
            size_t l = 1 + (o * 7 + piece * 131) % 251;
            if (l > size - o)
                l = size - o;
            send_all(sv[1], data + o, l, piece == 0 ? mfd : -1, sv[1]);
            o += l;
            uv_run(&S->loop, UV_RUN_NOWAIT);
            drain(sv[1], &rb, &rl, &rcap);
        }
        if (mfd >= 0)
            close(mfd);
        size = 0; /* no records */
    }
    for (size_t o = 1; o + 2 <= size && !c->closing;) {
        size_t l = (size_t)data[o] | (size_t)data[o + 1] << 8;
        o += 2;
        if (l > size - o)
            l = size - o;
        const uint8_t *p = data + o;
        o += l;
        int pass_fd = -1;
        Liteattn__Request *r = liteattn__request__unpack(NULL, l, p);
        if (r) {
            int skip = 0;
            if (r->body_case == LITEATTN__REQUEST__BODY_BUFFER_REGISTER &&
                r->buffer_register->kind == LITEATTN__BUFFER_KIND__BUFFER_SHM)
                pass_fd = make_memfd(r->buffer_register->size, (r->id & 0x100) != 0);
            if (r->body_case == LITEATTN__REQUEST__BODY_BUFFER_REGISTER &&
                r->buffer_register->kind == LITEATTN__BUFFER_KIND__BUFFER_VMM)
                pass_fd = (r->id & 0x100) ? make_memfd(4096, 0)
                                          : open("/dev/null", O_RDWR | O_CLOEXEC);
            if (r->body_case == LITEATTN__REQUEST__BODY_DOORBELL_REGISTER)
                pass_fd = make_memfd(((uint64_t)r->doorbell_register->slots * 16 + 4095) &
                                         ~(uint64_t)4095,
                                     (r->id & 0x100) != 0);
            if (r->body_case == LITEATTN__REQUEST__BODY_ATTENTION &&
                attn_cost(r->attention) > (double)(1 << 24))
                skip = 1;
            liteattn__request__free_unpacked(r, NULL);
            if (skip)
                continue;
        }
        uint8_t *fr = malloc(l + 4);
        if (!fr)
            abort();
        fr[0] = (uint8_t)l, fr[1] = (uint8_t)(l >> 8), fr[2] = 0, fr[3] = 0;
        memcpy(fr + 4, p, l);
        send_all(sv[1], fr, l + 4, pass_fd, sv[1]);
        if (pass_fd >= 0)
            close(pass_fd);
        free(fr);
        uv_run(&S->loop, UV_RUN_NOWAIT);
        drain(sv[1], &rb, &rl, &rcap);
    }
    /* Let the daemon read everything and the jobs finish (a paused connection resumes as
     * they do, frames left over from a wake-up are handled on the next iterations), unless
     * the input asks to close with jobs in flight. */
    for (int i = 0; i < 100000 && !c->closing; i++) {
        uv_run(&S->loop, c->inflight ? UV_RUN_ONCE : UV_RUN_NOWAIT);
        drain(sv[1], &rb, &rl, &rcap);
        if ((flags & 8) || (!c->inflight && !c->paused && !c->backlog)) {
            char pending;
            if (recv(sv[0], &pending, 1, MSG_PEEK | MSG_DONTWAIT) > 0)
                continue; /* unread requests */
            break;
        }
    }
    if (!c->closing)
        conn_close(c);
    while (c->refs > 1)
        uv_run(&S->loop, UV_RUN_ONCE);
    uv_run(&S->loop, UV_RUN_NOWAIT);
    drain(sv[1], &rb, &rl, &rcap);
    conn_unref(c);
    close(sv[1]);
    free(rb);

    eng_free(S->eng);
    S->eng = NULL;
    return 0;
}
