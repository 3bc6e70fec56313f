/* server.c — the loop, the listener, the wake-ups, systemd and signals (see server.h). */
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include "codes.h"
#include "log.h"

#define fail(err, errlen, ...) errf(err, errlen, LA_EIO, __VA_ARGS__)

uint64_t srv_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* ---- listening socket --------------------------------------------------------------------- */

/* systemd socket activation: fd 3 when LISTEN_FDS names us. Returns 1 adopted, 0 none. */
static int listen_adopt(srv *s, char *err, size_t errlen)
{
    int n = sd_listen_fds(1);
    if (n < 0)
        return fail(err, errlen, "sd_listen_fds: %s", strerror(-n));
    if (n == 0)
        return 0;
    int fd = SD_LISTEN_FDS_START;
    if (sd_is_socket_unix(fd, SOCK_STREAM, 1, NULL, 0) <= 0)
        return fail(err, errlen,
                    "the socket systemd passed (fd %d) is not a listening Unix "
                    "stream socket",
                    fd);
    if (n > 1)
        log_warn("systemd passed %d sockets; using the first", n);
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 || fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
        return fail(err, errlen, "fcntl on the activated socket: %s", strerror(errno));
    s->listen_fd = fd;
    s->activated = 1;
    return 1;
}

static int listen_create(srv *s, char *err, size_t errlen)
{
    const char *path = s->cfg.socket_path;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(sa.sun_path))
        return fail(err, errlen, "socket path %s is too long", path);
    strcpy(sa.sun_path, path);

    /* The directory: create the last component when missing (e.g. /run/liteattn by hand). */
    char dir[sizeof(sa.sun_path)];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        *slash = 0;
        if (mkdir(dir, 0755) < 0 && errno != EEXIST)
            return fail(err, errlen, "cannot create directory %s: %s", dir, strerror(errno));
    }

    /* Single instance: the lock outlives a crashed daemon's stale socket file. */
    char lock[sizeof(sa.sun_path) + 8];
    snprintf(lock, sizeof(lock), "%s.lock", path);
    for (int tries = 0;; tries++) {
        s->lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (s->lock_fd < 0)
            return fail(err, errlen, "cannot open lock file %s: %s", lock, strerror(errno));
        if (flock(s->lock_fd, LOCK_EX | LOCK_NB) < 0)
            return fail(err, errlen, "another liteattnd serves %s (%s is locked)", path, lock);
        /* A daemon that stops cleanly unlinks its lock file while it still holds the lock
         * (srv_free): if the file locked here is no longer the one at the path, it was that
         * daemon's, and holding it would not keep a third one out. Open the path again. */
        struct stat held, named;
        if (fstat(s->lock_fd, &held) == 0 && stat(lock, &named) == 0 &&
            held.st_dev == named.st_dev && held.st_ino == named.st_ino)
            break;
        close(s->lock_fd);
        s->lock_fd = -1;
        if (tries == 10)
            return fail(err, errlen, "lock file %s keeps changing under this daemon", lock);
    }

    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode))
            return fail(err, errlen, "%s exists and is not a socket", path);
        /* Unlink a stale socket only when nothing answers on it. */
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (probe < 0)
            return fail(err, errlen, "socket: %s", strerror(errno));
        int rc = connect(probe, (struct sockaddr *)&sa, sizeof(sa));
        int e = errno;
        close(probe);
        if (rc == 0)
            return fail(err, errlen, "something already answers on %s", path);
        if (e != ECONNREFUSED && e != ENOENT)
            return fail(err, errlen, "cannot probe %s: %s", path, strerror(e));
        if (unlink(path) < 0 && errno != ENOENT)
            return fail(err, errlen, "cannot remove the stale socket %s: %s", path,
                        strerror(errno));
        log_info("removed the stale socket %s", path);
    }

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return fail(err, errlen, "socket: %s", strerror(errno));
    /* No window with looser permissions: the umask shapes the file bind creates. */
    mode_t old = umask((mode_t)(~s->cfg.socket_mode & 0777));
    int rc = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
    int e = errno;
    umask(old);
    if (rc < 0) {
        close(fd);
        return fail(err, errlen, "cannot bind %s: %s", path, strerror(e));
    }
    s->own_socket = 1;
    if (chmod(path, s->cfg.socket_mode) < 0) {
        close(fd);
        return fail(err, errlen, "cannot chmod %s: %s", path, strerror(errno));
    }
    if (listen(fd, 128) < 0) {
        close(fd);
        return fail(err, errlen, "cannot listen on %s: %s", path, strerror(errno));
    }
    s->listen_fd = fd;
    return 0;
}

static uint32_t user_conns(srv *s, uint32_t uid)
{
    uint32_t n = 0;
    conn *c;
    list_for_each_entry (c, &s->conns, conn, link)
        n += c->uid == uid;
    return n;
}

/* Refuses a connection with one Error frame (request id 0), best effort. */
/* At most one line a second for refused connections: a burst of them would flood the log. */
static void log_refused(srv *s, int pid, const char *msg)
{
    uint64_t now = srv_now_ms();
    if (s->refused_log_ms && now - s->refused_log_ms < 1000) {
        s->refused_unlogged++;
        return;
    }
    if (s->refused_unlogged)
        log_warn("refused a connection of pid %d: %s (%u more refused since the last such "
                 "line, not logged)",
                 pid, msg, s->refused_unlogged);
    else
        log_warn("refused a connection of pid %d: %s", pid, msg);
    s->refused_log_ms = now;
    s->refused_unlogged = 0;
}

static void refuse(int fd, int code, const char *msg)
{
    Liteattn__Error e = LITEATTN__ERROR__INIT;
    e.code = code;
    e.message = (char *)msg;
    Liteattn__Reply r = LITEATTN__REPLY__INIT;
    r.body_case = LITEATTN__REPLY__BODY_ERROR;
    r.error = &e;
    uint8_t *buf;
    size_t len;
    if (frame_pack(&r.base, 0, &buf, &len) == 0) {
        frame_send(fd, buf, len, -1);
        free(buf);
    }
    close(fd);
}

static void on_listen(uv_poll_t *h, int status, int events)
{
    srv *s = h->data;
    if (status < 0) {
        log_error("listening socket: %s", uv_strerror(status));
        return;
    }
    for (int i = 0; i < 64 && !s->stopping; i++) {
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if ((errno == EMFILE || errno == ENFILE) && s->reserve_fd >= 0) {
                /* Out of fds: shed this client rather than spin on a readable listener. */
                close(s->reserve_fd);
                fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC);
                if (fd >= 0)
                    close(fd);
                s->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                s->ctr.rejected_connections++;
                log_warn("out of file descriptors: refused a connection");
                return;
            }
            log_error("accept: %s", strerror(errno));
            return;
        }
        struct ucred cr;
        socklen_t cl = sizeof(cr);
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) < 0) {
            log_warn("SO_PEERCRED: %s; refusing the connection", strerror(errno));
            close(fd);
            continue;
        }
        if (user_conns(s, cr.uid) >= s->cfg.max_conns_per_user) {
            char msg[128];
            snprintf(msg, sizeof(msg), "uid %u already has %u connections (the limit)",
                     (unsigned)cr.uid, s->cfg.max_conns_per_user);
            s->ctr.rejected_connections++;
            log_refused(s, (int)cr.pid, msg);
            refuse(fd, LA_ELIMIT, msg);
            continue;
        }
        conn *c;
        if (srv_attach(s, fd, cr.uid, cr.gid, cr.pid, &c) < 0)
            continue;
        s->ctr.connections_total++;
        log_debug(CONN_FMT ": connected (pid %d, gid %u)", CONN_ARGS(c), (int)cr.pid,
                  (unsigned)cr.gid);
    }
}

static void on_listen_closed(uv_handle_t *h)
{
    srv *s = h->data;
    if (s->listen_fd >= 0)
        close(s->listen_fd);
    s->listen_fd = -1;
}

static void stop_listening(srv *s)
{
    if (!s->listen_active)
        return;
    s->listen_active = 0;
    uv_close((uv_handle_t *)&s->listen_poll, on_listen_closed);
    if (s->own_socket) {
        unlink(s->cfg.socket_path);
        s->own_socket = 0;
    }
}

/* ---- systemd ------------------------------------------------------------------------------ */

typedef struct {
    int64_t sessions;
    int found;
} sess_count;

static void count_sessions(void *data, const char *name, int64_t value)
{
    sess_count *k = data;
    if (!k->found && (strcmp(name, "sessions") == 0 || strcmp(name, "sessions_open") == 0 ||
                      strcmp(name, "sessions.open") == 0)) {
        k->sessions = value;
        k->found = 1;
    }
}

static void update_status(srv *s)
{
    char st[128];
    if (s->stopping)
        snprintf(st, sizeof(st), "shutting down, %u clients left", s->n_conns);
    else {
        sess_count k = {0, 0};
        if (s->eng)
            eng_stats(s->eng, count_sessions, &k);
        if (k.found)
            snprintf(st, sizeof(st), "serving %u clients, %lld sessions", s->n_conns,
                     (long long)k.sessions);
        else
            snprintf(st, sizeof(st), "serving %u clients", s->n_conns);
    }
    if (strcmp(st, s->status) != 0) {
        snprintf(s->status, sizeof(s->status), "%s", st);
        sd_notifyf(0, "STATUS=%s", st);
    }
}

/* ---- shutdown ----------------------------------------------------------------------------- */

static void on_server_handle_closed(uv_handle_t *h) { (void)h; }

static void close_everything(srv *s)
{
    if (s->handles_closed)
        return;
    s->handles_closed = 1;
    stop_listening(s);
    while (!list_empty(&s->conns))
        conn_close(list_first_entry(&s->conns, conn, link)); /* unlinks itself */
    uv_close((uv_handle_t *)&s->async, on_server_handle_closed);
    uv_close((uv_handle_t *)&s->tick, on_server_handle_closed);
    uv_close((uv_handle_t *)&s->sig_int, on_server_handle_closed);
    uv_close((uv_handle_t *)&s->sig_term, on_server_handle_closed);
}

void srv_maybe_finish(srv *s)
{
    if (!s->stopping || s->handles_closed || s->fatal)
        return;
    if (!eng_idle(s->eng))
        return;
    conn *c;
    list_for_each_entry (c, &s->conns, conn, link)
        if (conn_has_output(c) && s->drain_ticks <= SRV_FLUSH_GRACE_S)
            return;
    log_info("shutdown: all work done, replies flushed; exiting");
    close_everything(s);
}

static void begin_shutdown(srv *s, const char *why)
{
    if (s->stopping)
        return;
    s->stopping = 1;
    log_info("%s: shutting down (%u clients connected)", why, s->n_conns);
    sd_notify(0, "STOPPING=1");
    stop_listening(s);
    eng_shutdown(s->eng);
    /* Stop reading requests; connections that never said Hello have nothing to wait for. */
    conn *c;
    list_for_each_entry (c, &s->conns, conn, link) {
        if (!c->hello_done)
            conn_close(c);
        else
            conn_quiesce(c);
    }
    update_status(s);
    srv_maybe_finish(s);
}

static void on_signal(uv_signal_t *h, int signum)
{
    srv *s = h->data;
    if (++s->signals > 1) {
        log_warn("%s again: exiting at once", strsignal(signum));
        fflush(stderr);
        _exit(SRV_EXIT_FAIL);
    }
    begin_shutdown(s, strsignal(signum));
}

static void fatal(srv *s)
{
    if (s->fatal)
        return;
    s->fatal = 1;
    unsigned n = 0;
    conn *c;
    list_for_each_entry (c, &s->conns, conn, link) {
        n += c->inflight;
        conn_fail_inflight(c, LA_EDEVICE, "fatal GPU error: the daemon restarts; reconnect");
    }
    log_error("fatal GPU error: failed %u requests in flight; exiting with status %d", n,
              SRV_EXIT_FATAL);
    sd_notifyf(0, "STATUS=fatal GPU error, restarting\nSTOPPING=1");
    stop_listening(s);
    uv_stop(&s->loop);
}

/* ---- memory ------------------------------------------------------------------------------- */

/* Freed memory is not given back to the system by itself: glibc returns only the free top of
 * the heap, and any allocation made later (a connection that arrives while 63 others hold
 * 500 MB of unread replies) pins everything below it, so the daemon's RSS would stay at its
 * peak after they closed. Once SRV_TRIM_BYTES of reply and read buffers have been freed,
 * malloc_trim gives the free pages of every arena back: at once when the rate allows, else
 * at the next tick (at most once a second; one trim of a 500 MB heap takes a few ms). */
static void trim_memory(srv *s)
{
#ifdef __GLIBC__
    uint64_t freed = s->ctr.io.bytes_released - s->trimmed_bytes;
    if (freed < SRV_TRIM_BYTES)
        return;
    uint64_t now = srv_now_ms();
    if (s->trim_ms && now - s->trim_ms < 1000)
        return;
    malloc_trim(0);
    log_debug("gave freed memory back to the system (%llu MiB of buffers freed since the last "
              "time; malloc_trim took %llu ms)",
              (unsigned long long)(freed >> 20), (unsigned long long)(srv_now_ms() - now));
    s->trim_ms = now;
    s->trimmed_bytes = s->ctr.io.bytes_released;
    s->ctr.trims++;
#else
    (void)s;
#endif
}

/* ---- wake-ups ----------------------------------------------------------------------------- */

static void on_async(uv_async_t *h)
{
    srv *s = h->data;
    eng_process_completions(s->eng);
    if (eng_fatal(s->eng)) {
        fatal(s);
        return;
    }
    srv_maybe_finish(s);
}

static void engine_notify(void *data)
{
    srv *s = data;
    uv_async_send(&s->async); /* thread-safe; coalesces */
}

static void on_tick(uv_timer_t *t)
{
    srv *s = t->data;
    if (s->watchdog_usec)
        sd_notify(0, "WATCHDOG=1");
    if (eng_fatal(s->eng)) {
        fatal(s);
        return;
    }
    eng_tick(s->eng);
    trim_memory(s);
    if (s->stopping && eng_idle(s->eng))
        s->drain_ticks++;
    update_status(s);
    srv_maybe_finish(s);
}

/* ---- connections --------------------------------------------------------------------------- */

/* The per-user sums of uid's connections (conn_user), made on first use. */
static srv_user *user_acct(srv *s, uint32_t uid)
{
    if (!s->users.next)
        list_init(&s->users);
    return uid_get(&s->users, uid, sizeof(srv_user), 1);
}

/* Frees u once no connection of its user is left. */
static void user_drop_idle(srv_user *u)
{
    if (u->conns == 0) {
        list_remove(&u->node.link);
        free(u);
    }
}

static void user_release(srv *s, uint32_t uid)
{
    srv_user *u = uid_get(&s->users, uid, sizeof(srv_user), 0);
    if (u) {
        --u->conns;
        user_drop_idle(u);
    }
}

static void on_conn_closed(void *data, conn *c)
{
    srv *s = data;
    if (c->acct != &c->own) {
        c->acct = &c->own; /* what c counted is back to zero (conn_close dropped it) */
        user_release(s, c->uid);
    }
    if (s->eng)
        eng_conn_closed(s->eng, c->id);
    list_remove(&c->link);
    s->n_conns--;
    trim_memory(s);
    srv_maybe_finish(s);
}

static int on_conn_request(void *data, conn *c, const Liteattn__Request *req, char *why,
                           size_t whylen)
{
    srv *s = data;
    return disp_request(&s->disp, c, req, why, whylen);
}

static void on_conn_drained(void *data, conn *c) { srv_maybe_finish(data); }

static void server_stats(void *data, disp_stat_fn fn, void *fn_data)
{
    srv *s = data;
    const srv_counters *k = &s->ctr;
    fn(fn_data, "server.connections", s->n_conns);
    fn(fn_data, "server.connections_total", (int64_t)k->connections_total);
    fn(fn_data, "server.connections_rejected", (int64_t)k->rejected_connections);
    fn(fn_data, "server.frames_in", (int64_t)k->io.frames_in);
    fn(fn_data, "server.frames_out", (int64_t)k->io.frames_out);
    fn(fn_data, "server.bytes_in", (int64_t)k->io.bytes_in);
    fn(fn_data, "server.bytes_out", (int64_t)k->io.bytes_out);
    fn(fn_data, "server.protocol_errors", (int64_t)k->io.protocol_errors);
    fn(fn_data, "server.bytes_released", (int64_t)k->io.bytes_released);
    fn(fn_data, "server.memory_trims", (int64_t)k->trims);
    fn(fn_data, "server.uptime_s", (int64_t)((srv_now_ms() - s->start_ms) / 1000));
    /* Error replies by code, every code (a counter that exists from the start graphs well). */
#define ERROR_STAT_(name, val, msg) \
    fn(fn_data, "server.errors.LA_" #name, (int64_t)k->io.errors[-(val)]);
    LA_ERRNO_MAP(ERROR_STAT_)
#undef ERROR_STAT_
}

void srv_set_engine(srv *s, eng *e)
{
    s->eng = e;
    s->disp.eng = e;
    s->disp.cfg = &s->cfg;
    s->disp.server_stats = server_stats;
    s->disp.server_data = s;
}

int srv_attach(srv *s, int fd, uint32_t uid, uint32_t gid, int32_t pid, conn **ret_conn)
{
    if (!s->conns.next)
        list_init(&s->conns);
    conn_limits lim = {
        .max_frame = s->cfg.max_frame,
        .max_inflight = s->cfg.limits.max_inflight_per_conn,
        .hello_timeout_s = s->cfg.hello_timeout_s,
        .max_outbound_bytes = s->cfg.max_outbound_bytes,
        .max_outbound_bytes_per_user = s->cfg.max_outbound_bytes_per_user,
        .max_fds_per_user = s->cfg.max_fds_per_user,
    };
    conn_hooks hooks = {
        .request = on_conn_request,
        .closed = on_conn_closed,
        .drained = on_conn_drained,
        .data = s,
    };
    srv_user *u = user_acct(s, uid);
    if (!u) {
        close(fd);
        return LA_ENOMEM;
    }
    conn *c;
    int rc = conn_new(&s->loop, ++s->next_conn_id, fd, uid, gid, pid, &lim, &s->ctr.io, &hooks, &c);
    if (rc < 0) {
        user_drop_idle(u);
        return rc;
    }
    u->conns++;
    conn_set_user(c, &u->acct);
    list_append(&s->conns, &c->link);
    s->n_conns++;
    *ret_conn = c;
    return 0;
}

/* ---- lifecycle ---------------------------------------------------------------------------- */

int srv_new(const cfg *c, srv **ret_srv, char *err, size_t errlen)
{
    srv *s = calloc(1, sizeof(*s));
    if (!s)
        return fail(err, errlen, "out of memory");
    s->cfg = *c;
    s->listen_fd = s->lock_fd = -1;
    list_init(&s->conns);
    list_init(&s->users);
    s->start_ms = srv_now_ms();
    s->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    int rc = uv_loop_init(&s->loop);
    if (rc < 0) {
        free(s);
        return fail(err, errlen, "uv_loop_init: %s", uv_strerror(rc));
    }
    uv_async_init(&s->loop, &s->async, on_async);
    uv_timer_init(&s->loop, &s->tick);
    uv_signal_init(&s->loop, &s->sig_int);
    uv_signal_init(&s->loop, &s->sig_term);
    s->async.data = s->tick.data = s->sig_int.data = s->sig_term.data = s;
    uv_signal_start(&s->sig_int, on_signal, SIGINT);
    uv_signal_start(&s->sig_term, on_signal, SIGTERM);

    /* The socket first (a second instance fails before touching any GPU), then the engine. */
    rc = listen_adopt(s, err, errlen);
    if (rc == 0)
        rc = listen_create(s, err, errlen);
    if (rc < 0)
        goto fail;

    eng_config ec;
    eng_config_default(&ec);
    ec.backend = s->cfg.backend;
    ec.cpu_threads = s->cfg.threads;
    ec.limits = c->limits;
    ec.warm_state_dir = c->warm_state_dir[0] ? c->warm_state_dir : NULL;
    /* Every session's stream is a lane of its own (engine/backend_cuda.c); streams beyond the
     * device's hardware queues share them, and a fast-path call waiting for its client would
     * then hold up another session's. 32 is the most CUDA allows (the default is 8). Read when
     * the context is created, so before the engine starts; a value set by the operator wins. */
    setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);
    ec.cpu_slice_macs = c->cpu_slice;
    ec.notify = engine_notify;
    ec.notify_data = s;
    ec.log = log_engine_sink;
    ec.log_data = NULL;
    eng_error ee = {{0}};
    eng *e;
    rc = eng_new(&ec, &e, &ee);
    if (rc < 0) {
        fail(err, errlen, "cannot start the %s backend: %s", c->backend,
             ee.msg[0] ? ee.msg : codes_strerror(rc));
        goto fail;
    }
    srv_set_engine(s, e);

    uv_poll_init(&s->loop, &s->listen_poll, s->listen_fd);
    s->listen_poll.data = s;
    uv_poll_start(&s->listen_poll, UV_READABLE, on_listen);
    s->listen_active = 1;

    uint64_t wd = 0, period = 1000;
    if (sd_watchdog_enabled(0, &wd) > 0 && wd) {
        s->watchdog_usec = wd;
        if (wd / 2000 < period)
            period = wd / 2000 ? wd / 2000 : 1;
    }
    uv_timer_start(&s->tick, on_tick, period, period);

    log_info("liteattnd %s listening on %s (backend %s, protocol %d.%d)", LA_VERSION_STRING,
             s->activated ? "the socket systemd passed" : s->cfg.socket_path, eng_backends(s->eng),
             LA_PROTOCOL_MAJOR, LA_PROTOCOL_MINOR);
    sd_notify(0, "READY=1");
    update_status(s);
    *ret_srv = s;
    return 0;

fail:
    if (s->own_socket)
        unlink(s->cfg.socket_path);
    if (s->listen_fd >= 0)
        close(s->listen_fd);
    if (s->lock_fd >= 0)
        close(s->lock_fd);
    if (s->reserve_fd >= 0)
        close(s->reserve_fd);
    uv_close((uv_handle_t *)&s->async, NULL);
    uv_close((uv_handle_t *)&s->tick, NULL);
    uv_close((uv_handle_t *)&s->sig_int, NULL);
    uv_close((uv_handle_t *)&s->sig_term, NULL);
    uv_run(&s->loop, UV_RUN_DEFAULT);
    uv_loop_close(&s->loop);
    free(s);
    return rc < 0 ? rc : LA_EIO;
}

int srv_run(srv *s)
{
    uv_run(&s->loop, UV_RUN_DEFAULT);
    if (s->fatal) {
        /* Best effort: push the LA_EDEVICE replies out before the process ends. */
        conn *c;
        list_for_each_entry (c, &s->conns, conn, link)
            conn_flush_final(c, 200);
        return SRV_EXIT_FATAL;
    }
    return SRV_EXIT_OK;
}

void srv_free(srv *s)
{
    if (!s)
        return;
    if (s->fatal)
        return; /* the process exits now; a poisoned GPU context is not torn down */
    if (uv_loop_close(&s->loop) != 0)
        log_warn("event loop closed with handles still open");
    eng_free(s->eng);
    s->eng = NULL;
    if (s->lock_fd >= 0) {
        /* A clean exit leaves nothing behind: unlink the lock file while still holding it, so
         * that no daemon starting now can lock the old file (listen_create checks). */
        char lock[sizeof(((struct sockaddr_un *)0)->sun_path) + 8];
        snprintf(lock, sizeof(lock), "%s.lock", s->cfg.socket_path);
        if (unlink(lock) < 0 && errno != ENOENT)
            log_warn("cannot remove the lock file %s: %s", lock, strerror(errno));
        close(s->lock_fd);
    }
    if (s->reserve_fd >= 0)
        close(s->reserve_fd);
    if (s->users.next)
        list_drain(&s->users, srv_user, node.link, free);
    free(s);
}
