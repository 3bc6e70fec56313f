/* client.c — one connection to liteattnd: connect and Hello, sending requests, reading and
 * dispatching replies (pipelined, matched by id), waiting, ping, disconnect. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"

#define DEFAULT_MAX_INFLIGHT 64u

LA_API int la_default_socket_path(char *buf, size_t len)
{
    if (!buf || len == 0)
        return cl_fail(LA_EINVAL, "la_default_socket_path: no buffer");
    const char *s = getenv("LITEATTN_SOCKET");
    const char *x = getenv("XDG_RUNTIME_DIR");
    char tmp[4096];
    int n;
    struct stat st;
    if (s && *s)
        n = snprintf(tmp, sizeof(tmp), "%s", s);
    else if (x && *x && (n = snprintf(tmp, sizeof(tmp), "%s/liteattn.sock", x)) > 0 &&
             (size_t)n < sizeof(tmp) && stat(tmp, &st) == 0 && S_ISSOCK(st.st_mode))
        ; /* a per-user daemon listens in the user's runtime directory */
    else
        /* Login shells set XDG_RUNTIME_DIR; without a per-user daemon there, the system
         * service's socket is the one meant. */
        n = snprintf(tmp, sizeof(tmp), "/run/liteattn/liteattn.sock");
    if (n < 0 || (size_t)n >= len || (size_t)n >= sizeof(tmp))
        return cl_fail(LA_EINVAL, "socket path needs %d bytes, the buffer has %zu", n + 1, len);
    memcpy(buf, tmp, (size_t)n + 1);
    return 0;
}

/* ---- closing and dispatch ------------------------------------------------------------------ */

/* The connection is gone (EOF, protocol error, failed send): every pending request fails. */
static void client_closed(la_client *c, int err)
{
    if (c->closed)
        return;
    c->closed = err;
    cl_log(1, "liteattn: connection to the daemon closed (%s)", la_strerror(err));
    list_node gone;
    list_take(&gone, &c->pending);
    c->n_pending = 0;
    cl_pend *p;
    list_for_each_entry (p, &gone, cl_pend, link) {
        list_remove(&p->link);
        if (p->call) {
            cl_call_complete(c, p->call, err, NULL);
        } else {
            p->done = 1;
            p->status = err;
            snprintf(p->errmsg, sizeof(p->errmsg), "connection to the daemon closed");
        }
    }
    pthread_cond_broadcast(&c->cond);
}

void cl_unlink_pending(la_client *c, cl_pend *p)
{
    if (!list_linked(&p->link))
        return;
    list_remove(&p->link);
    c->n_pending--;
}

static void dispatch(la_client *c, Liteattn__Reply *r)
{
    cl_pend *p;
    list_find_entry(p, &c->pending, cl_pend, link, p->id == r->id);
    if (p)
        cl_unlink_pending(c, p);
    else {
        /* A request whose waiter gave up (timeout): nobody wants it. */
        cl_log(3, "liteattn: reply to request %llu that nobody waits for",
               (unsigned long long)r->id);
        liteattn__reply__free_unpacked(r, NULL);
        return;
    }
    if (p->call) {
        cl_call_complete(c, p->call, 0, r);
        return;
    }
    if (r->body_case == LITEATTN__REPLY__BODY_ERROR) {
        int code = r->error->code;
        if (code >= 0 || code < -1000)
            code = LA_EPROTO;
        p->status = code;
        snprintf(p->errmsg, sizeof(p->errmsg), "%s",
                 r->error->message && *r->error->message ? r->error->message : la_strerror(code));
        liteattn__reply__free_unpacked(r, NULL);
    } else {
        p->status = 0;
        p->reply = r;
    }
    p->done = 1;
}

/* Reads everything the socket has and dispatches every complete reply (lock held). */
static int pump(la_client *c)
{
    int n_dispatched = 0;
    while (!c->closed) {
        ssize_t n = frame_recv(&c->fr, c->fd);
        if (n == LA_EAGAIN)
            break;
        if (n == 0) {
            client_closed(c, LA_ECLOSED);
            break;
        }
        if (n < 0) {
            cl_log(0, "liteattn: reading from the daemon failed: %s", la_strerror((int)n));
            client_closed(c, LA_ECLOSED);
            break;
        }
        for (;;) {
            ProtobufCMessage *m;
            uint32_t len;
            int rc = frame_next_msg(&c->fr, &liteattn__reply__descriptor, NULL, &m, &len);
            if (rc == 0)
                break;
            /* Fds are never sent to clients; drop any that came. */
            for (int fd; (fd = frame_take_fd(&c->fr)) >= 0;)
                close(fd);
            if (rc < 0) {
                if (rc == LA_ELIMIT)
                    cl_log(0, "liteattn: the daemon sent a frame over the %u-byte limit",
                           c->fr.max_frame);
                else
                    cl_log(0, "liteattn: undecodable reply from the daemon");
                c->garbled = 1;
                client_closed(c, LA_ECLOSED);
                break;
            }
            dispatch(c, (Liteattn__Reply *)m);
            n_dispatched++;
        }
    }
    if (n_dispatched)
        pthread_cond_broadcast(&c->cond);
    return n_dispatched;
}

int cl_wait_cond(la_client *c, int (*cond)(la_client *, void *), void *arg, int timeout_ms)
{
    int64_t deadline = timeout_ms < 0 ? -1 : cl_now_ns() + (int64_t)timeout_ms * 1000000;
    for (;;) {
        if (cond(c, arg))
            return 0;
        if (c->closed)
            return c->closed;
        int left_ms = -1;
        if (deadline >= 0) {
            int64_t left = deadline - cl_now_ns();
            if (left <= 0)
                return LA_ETIMEDOUT;
            left_ms = (int)((left + 999999) / 1000000);
        }
        if (c->reading) {
            /* Another thread sleeps in poll(); it broadcasts after dispatching. */
            if (deadline < 0) {
                pthread_cond_wait(&c->cond, &c->lock);
            } else {
                struct timespec ts = {.tv_sec = deadline / 1000000000,
                                      .tv_nsec = deadline % 1000000000};
                pthread_cond_timedwait(&c->cond, &c->lock, &ts);
            }
            continue;
        }
        c->reading = 1;
        pthread_mutex_unlock(&c->lock);
        struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
        int prc = poll(&pfd, 1, left_ms);
        int perr = errno;
        pthread_mutex_lock(&c->lock);
        c->reading = 0;
        if (prc < 0 && perr != EINTR) {
            client_closed(c, LA_EIO);
        } else if (prc > 0) {
            pump(c);
        }
        pthread_cond_broadcast(&c->cond);
    }
}

static int pend_done(la_client *c, void *arg)
{
    (void)c;
    return ((cl_pend *)arg)->done;
}

int cl_wait(la_client *c, cl_pend *p, int timeout_ms)
{
    int rc = cl_wait_cond(c, pend_done, p, timeout_ms);
    if (p->done)
        return p->status;
    cl_unlink_pending(c, p);
    return rc;
}

static int has_room(la_client *c, void *arg)
{
    (void)arg;
    return c->n_pending < c->max_inflight;
}

int cl_wait_room(la_client *c, int timeout_ms)
{
    if (c->closed)
        return c->closed;
    if (has_room(c, NULL))
        return 0;
    return cl_wait_cond(c, has_room, NULL, timeout_ms);
}

/* Writes the whole frame; while the socket is full, reads replies so that neither side can
 * block the other. */
static int send_all(la_client *c, const uint8_t *buf, size_t len, int fd)
{
    size_t off = 0;
    while (off < len) {
        ssize_t n = frame_send(c->fd, buf + off, len - off, fd);
        if (n > 0) {
            off += (size_t)n;
            fd = -1; /* the fd travelled with the first byte */
            continue;
        }
        if (n == LA_EAGAIN) {
            struct pollfd pfd = {.fd = c->fd, .events = POLLOUT | POLLIN};
            if (poll(&pfd, 1, 1000) > 0 && (pfd.revents & POLLIN))
                pump(c);
            if (c->closed)
                return c->closed;
            continue;
        }
        client_closed(c, LA_ECLOSED);
        return LA_ECLOSED;
    }
    return 0;
}

int cl_send(la_client *c, Liteattn__Request *req, int fd, cl_pend *p)
{
    if (c->closed)
        return cl_fail(c->closed, "connection to the daemon closed");
    req->id = c->next_id++;
    uint8_t *buf;
    size_t len;
    int rc = frame_pack(&req->base, c->max_frame, &buf, &len);
    if (rc < 0)
        return cl_fail(rc,
                       rc == LA_ELIMIT ? "request larger than the daemon's frame limit (%u bytes)"
                                       : "out of memory packing a request",
                       c->max_frame);
    memset(p, 0, offsetof(cl_pend, call));
    list_init(&p->link);
    p->id = req->id;
    /* Linked only once the whole frame is out: the daemon cannot answer a partial frame, and a
     * failed send must not complete p (an attention call's callback never fires on error). */
    rc = send_all(c, buf, len, fd);
    free(buf);
    if (rc < 0)
        return cl_fail(rc, "sending to the daemon failed: connection closed");
    list_append(&c->pending, &p->link);
    c->n_pending++;
    return 0;
}

static int call_timeout(la_client *c, Liteattn__Request *req, int fd, int want,
                        Liteattn__Reply **ret_reply, int timeout_ms)
{
    int rc = cl_wait_room(c, timeout_ms);
    if (rc < 0)
        return cl_fail(rc, rc == LA_ECLOSED ? "connection to the daemon closed" : NULL);
    cl_pend p;
    p.call = NULL;
    rc = cl_send(c, req, fd, &p);
    if (rc < 0)
        return rc;
    rc = cl_wait(c, &p, timeout_ms);
    if (rc < 0) {
        if (p.done && p.errmsg[0])
            return cl_fail(rc, "%s", p.errmsg);
        if (rc == LA_ETIMEDOUT)
            return cl_fail(rc, "no reply from the daemon within %d ms", timeout_ms);
        return cl_fail(rc, rc == LA_ECLOSED ? "connection to the daemon closed" : NULL);
    }
    if ((int)p.reply->body_case != want) {
        liteattn__reply__free_unpacked(p.reply, NULL);
        return cl_fail(LA_EPROTO, "the daemon answered with reply type %d, expected %d",
                       (int)p.reply->body_case, want);
    }
    *ret_reply = p.reply;
    return 0;
}

int cl_request(la_client *c, Liteattn__Request *req, int want, Liteattn__Reply **ret_reply)
{
    pthread_mutex_lock(&c->lock);
    int rc = cl_call(c, req, -1, want, ret_reply);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

int cl_call(la_client *c, Liteattn__Request *req, int fd, int want, Liteattn__Reply **ret_reply)
{
    return call_timeout(c, req, fd, want, ret_reply, -1);
}

/* ---- connect ------------------------------------------------------------------------------- */

static int add_prop(la_client *c, const char *name, const char *value)
{
    cl_prop *np = realloc(c->props, (c->n_props + 1) * sizeof(*np));
    if (!np)
        return LA_ENOMEM;
    c->props = np;
    np[c->n_props].name = strdup(name);
    np[c->n_props].value = strdup(value ? value : "");
    if (!np[c->n_props].name || !np[c->n_props].value) {
        free(np[c->n_props].name);
        free(np[c->n_props].value);
        return LA_ENOMEM;
    }
    c->n_props++;
    return 0;
}

static int add_prop_u64(la_client *c, const char *name, uint64_t v)
{
    char buf[32];
    snprintf(buf, sizeof(buf), "%llu", (unsigned long long)v);
    return add_prop(c, name, buf);
}

/* Appends s to a growing string; returns 0 or LA_ENOMEM. */
static int append(char **str, size_t *len, const char *s)
{
    size_t n = strlen(s);
    char *ns = realloc(*str, *len + n + 1);
    if (!ns)
        return LA_ENOMEM;
    memcpy(ns + *len, s, n + 1);
    *str = ns;
    *len += n;
    return 0;
}

/* Adds the property name: the n strings of v joined by commas (a NULL one as ""); returns 0 or
 * LA_ENOMEM. */
static int add_prop_list(la_client *c, const char *name, char *const *v, size_t n)
{
    char *s = NULL;
    size_t len = 0;
    int rc = append(&s, &len, "");
    for (size_t i = 0; i < n; i++) {
        if (i)
            rc |= append(&s, &len, ",");
        rc |= append(&s, &len, v[i] ? v[i] : "");
    }
    if (s)
        rc |= add_prop(c, name, s);
    free(s);
    return rc;
}

static int store_hello(la_client *c, const Liteattn__HelloReply *h)
{
    int rc = 0;
    char buf[64];
    rc |= add_prop(c, "daemon.version", h->daemon_version ? h->daemon_version : "");
    snprintf(buf, sizeof(buf), "%u.%u", h->major, h->minor);
    rc |= add_prop(c, "protocol", buf);

    rc |= add_prop_list(c, "backends", h->backends, h->n_backends);

    char *s = NULL;
    size_t len = 0;
    rc |= append(&s, &len, "");
    for (size_t i = 0; i < h->n_devices; i++) {
        const Liteattn__Device *d = h->devices[i];
        if (i)
            rc |= append(&s, &len, "\n");
        rc |= append(&s, &len, d->uuid ? d->uuid : "?");
        rc |= append(&s, &len, " ");
        rc |= append(&s, &len, d->backend ? d->backend : "?");
        rc |= append(&s, &len, " ");
        rc |= append(&s, &len, d->name ? d->name : "");
    }
    if (s)
        rc |= add_prop(c, "devices", s);
    free(s);

    rc |= add_prop_list(c, "fastpath.devices", h->doorbell_devices, h->n_doorbell_devices);

    /* MPS: one line per device, in the order of "devices". */
    s = NULL;
    len = 0;
    rc |= append(&s, &len, "");
    for (size_t i = 0; i < h->n_devices; i++) {
        const Liteattn__Device *d = h->devices[i];
        char line[160];
        snprintf(line, sizeof(line), "%s%s %s %u", i ? "\n" : "", d->uuid ? d->uuid : "?",
                 !d->has_mps ? "unknown" : d->mps ? "on" : "off",
                 d->has_sm_count ? d->sm_count : 0);
        rc |= append(&s, &len, line);
    }
    if (s)
        rc |= add_prop(c, "mps", s);
    free(s);
    if (h->mps_pipe_directory)
        rc |= add_prop(c, "mps.pipe_directory", h->mps_pipe_directory);
    if (h->has_mps_control)
        rc |= add_prop(c, "mps.control", h->mps_control ? "yes" : "no");

    const Liteattn__Limits *l = h->limits;
    if (l) {
        /* Every limit the daemon sent becomes "limit.<field>", whatever the minor version. */
        const ProtobufCMessageDescriptor *d = &liteattn__limits__descriptor;
        for (unsigned i = 0; i < d->n_fields; i++) {
            const ProtobufCFieldDescriptor *f = &d->fields[i];
            const char *base = (const char *)l;
            if (f->label != PROTOBUF_C_LABEL_OPTIONAL ||
                !*(const protobuf_c_boolean *)(base + f->quantifier_offset))
                continue;
            uint64_t v;
            if (f->type == PROTOBUF_C_TYPE_UINT32)
                v = *(const uint32_t *)(base + f->offset);
            else if (f->type == PROTOBUF_C_TYPE_UINT64)
                v = *(const uint64_t *)(base + f->offset);
            else
                continue;
            char name[80];
            snprintf(name, sizeof(name), "limit.%s", f->name);
            rc |= add_prop_u64(c, name, v);
        }
        if (l->has_max_frame && l->max_frame >= 4096) {
            c->max_frame = l->max_frame;
            c->fr.max_frame = l->max_frame;
        }
        if (l->has_max_inflight && l->max_inflight > 0)
            c->max_inflight = l->max_inflight;
    }
    return rc ? LA_ENOMEM : 0;
}

static void client_free(la_client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    frame_reader_free(&c->fr);
    for (size_t i = 0; i < c->n_props; i++) {
        free(c->props[i].name);
        free(c->props[i].value);
    }
    free(c->props);
    pthread_cond_destroy(&c->cond);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

LA_API int la_connect(const char *socket_path, const char *client_name, la_client **ret_client)
{
    if (!ret_client)
        return cl_fail(LA_EINVAL, "la_connect: ret_client is NULL");
    char def[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];
    if (!socket_path) {
        int rc = la_default_socket_path(def, sizeof(def));
        if (rc < 0)
            return cl_fail(LA_EINVAL, "the default socket path is too long for a Unix socket");
        socket_path = def;
    }
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (!*socket_path || strlen(socket_path) >= sizeof(sa.sun_path))
        return cl_fail(LA_EINVAL, "socket path \"%s\" is empty or too long", socket_path);
    strcpy(sa.sun_path, socket_path);

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return cl_fail(LA_ECONN, "socket: %s", strerror(errno));
    int rc;
    do
        rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
    while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        int e = errno;
        close(fd);
        return cl_fail(LA_ECONN, "cannot connect to %s: %s", socket_path, strerror(e));
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        int e = errno;
        close(fd);
        return cl_fail(LA_ECONN, "fcntl: %s", strerror(e));
    }

    la_client *c = calloc(1, sizeof(*c));
    if (!c) {
        close(fd);
        return cl_fail(LA_ENOMEM, NULL);
    }
    list_init(&c->pending);
    list_init(&c->calls);
    list_init(&c->buffers);
    list_init(&c->sessions);
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    /* Recursive: a completion callback may free its la_call (or another one). */
    pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&c->lock, &ma);
    pthread_mutexattr_destroy(&ma);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cond, &ca);
    pthread_condattr_destroy(&ca);
    c->fd = fd;
    frame_reader_init(&c->fr, FRAME_DEFAULT_MAX);
    c->next_id = 1;
    c->max_frame = FRAME_DEFAULT_MAX;
    c->max_inflight = DEFAULT_MAX_INFLIGHT;

    Liteattn__Hello hello = LITEATTN__HELLO__INIT;
    hello.major = LA_PROTOCOL_MAJOR;
    hello.minor = LA_PROTOCOL_MINOR;
    hello.client_name = (char *)(client_name ? client_name : "libliteattn");
    Liteattn__Request req = cl_req_body(LITEATTN__REQUEST__BODY_HELLO, &hello);
    Liteattn__Reply *r = NULL;
    pthread_mutex_lock(&c->lock);
    rc = call_timeout(c, &req, -1, LITEATTN__REPLY__BODY_HELLO, &r, CL_HELLO_TIMEOUT_MS);
    if (rc == 0 && r->hello->major != LA_PROTOCOL_MAJOR)
        rc = cl_fail(LA_EVERSION, "the daemon speaks protocol %u.%u, this library %d.%d",
                     r->hello->major, r->hello->minor, LA_PROTOCOL_MAJOR, LA_PROTOCOL_MINOR);
    if (rc == 0 && store_hello(c, r->hello) < 0)
        rc = cl_fail(LA_ENOMEM, NULL);
    pthread_mutex_unlock(&c->lock);
    if (r)
        liteattn__reply__free_unpacked(r, NULL);
    if (rc < 0) {
        /* Closed without an answer: the daemon went away (killed, restarting) between accept
         * and Hello; a reconnect loop must see that as "cannot connect". Garbage instead of a
         * reply is a protocol error. */
        if (rc == LA_ECLOSED && c->garbled)
            rc = cl_fail(LA_EPROTO, "the daemon at %s sent garbage in answer to Hello (%s)",
                         socket_path, la_last_error_message());
        else if (rc == LA_ECLOSED)
            rc = cl_fail(LA_ECONN, "the daemon at %s closed the connection during Hello (%s)",
                         socket_path, la_last_error_message());
        client_free(c);
        return rc;
    }
    *ret_client = c;
    return 0;
}

LA_API void la_disconnect(la_client *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->lock);
    cl_fast_free(c);
    cl_calls_free_all(c);
    cl_sessions_free_all(c);
    cl_buffers_free_all(c);
    /* Pending synchronous requests can only belong to threads still inside this client,
     * which the caller must not have. */
    list_init(&c->pending);
    pthread_mutex_unlock(&c->lock);
    client_free(c);
}

LA_API const char *la_client_property(const la_client *c, const char *name)
{
    if (!c || !name)
        return NULL;
    /* Properties are written once during la_connect and never change: no lock needed. */
    for (size_t i = 0; i < c->n_props; i++)
        if (strcmp(c->props[i].name, name) == 0)
            return c->props[i].value;
    return NULL;
}

LA_API int la_ping(la_client *c, uint64_t *ret_rtt_ns)
{
    if (!c)
        return cl_fail(LA_EINVAL, "la_ping: no client");
    Liteattn__Ping ping = LITEATTN__PING__INIT;
    Liteattn__Request req = cl_req_body(LITEATTN__REQUEST__BODY_PING, &ping);
    Liteattn__Reply *r;
    pthread_mutex_lock(&c->lock);
    int64_t t0 = cl_now_ns();
    ping.has_payload = 1;
    ping.payload = (uint64_t)t0;
    int rc = cl_call(c, &req, -1, LITEATTN__REPLY__BODY_PONG, &r);
    int64_t t1 = cl_now_ns();
    pthread_mutex_unlock(&c->lock);
    if (rc < 0)
        return rc;
    liteattn__reply__free_unpacked(r, NULL);
    if (ret_rtt_ns)
        *ret_rtt_ns = (uint64_t)(t1 - t0);
    return 0;
}

static int completed_since(la_client *c, void *arg) { return c->completions > *(uint64_t *)arg; }

LA_API int la_client_process(la_client *c, int timeout_ms)
{
    if (!c)
        return cl_fail(LA_EINVAL, "la_client_process: no client");
    pthread_mutex_lock(&c->lock);
    uint64_t start = c->completions;
    if (!c->closed && !c->reading)
        pump(c);
    int rc = 0;
    if (c->completions == start && timeout_ms != 0 && !c->closed)
        rc = cl_wait_cond(c, completed_since, &start, timeout_ms);
    int n = (int)(c->completions - start);
    int closed = c->closed;
    pthread_mutex_unlock(&c->lock);
    if (n > 0)
        return n;
    if (closed)
        return cl_fail(closed, "connection to the daemon closed");
    if (rc < 0 && rc != LA_ETIMEDOUT)
        return cl_fail(rc, NULL);
    return 0;
}
