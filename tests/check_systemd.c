/*
 * check_systemd.c — liteattnd's systemd integration, driven without systemd as PID 1.
 *
 * Each case plays the service manager: it binds the listening socket and hands it over as
 * fd 3 (LISTEN_FDS/LISTEN_PID, socket activation), binds the datagram socket named by
 * NOTIFY_SOCKET and reads what the daemon reports there (READY=1, STATUS=, WATCHDOG=1,
 * STOPPING=1), and stops the daemon with SIGTERM. The daemon is the tests' (td_spawn in
 * tests/testutil_daemon.h: $BUILD/liteattnd on the CPU backend, in a temporary directory of
 * the case), with --foreground; clients go through libliteattn.
 *
 * The last case runs `systemd-analyze verify` on packaging/liteattnd.{service,socket} when the
 * tool is installed (it prints a note and passes when it is not).
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "liteattn.h"
#include "runner.h"
#include "testutil_daemon.h"

#define START_TIMEOUT_MS 10000

typedef struct drun {
    td_daemon d;      /* its directory, socket, log, config and pid */
    char notify[128]; /* NOTIFY_SOCKET */
    int notify_fd;
    int listen_fd;             /* >= 0: handed over as fd 3 (socket activation) */
    const char *watchdog_usec; /* WATCHDOG_USEC, or NULL for no watchdog */
    char msgs[65536];          /* every notification line received so far, each ending in '\n' */
    size_t msgs_len;
} drun;

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void dump_log(const drun *r)
{
    td_print_log(&r->d);
    fprintf(stderr, "---- notifications ----\n%.*s--------\n", (int)r->msgs_len, r->msgs);
}

static int unix_socket(int type, const char *path, int do_listen)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int fd = socket(AF_UNIX, type | SOCK_CLOEXEC, 0);
    ck_assert_int_ge(fd, 0);
    ck_assert_uint_lt(strlen(path), sizeof sa.sun_path);
    strcpy(sa.sun_path, path);
    ck_assert_msg(bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "bind %s: %s", path,
                  strerror(errno));
    if (do_listen)
        ck_assert_msg(listen(fd, 16) == 0, "listen: %s", strerror(errno));
    return fd;
}

static void drun_init(drun *r)
{
    memset(r, 0, sizeof *r);
    ck_assert_msg(td_dir(&r->d) == 0, "no temporary directory (see above)");
    snprintf(r->notify, sizeof r->notify, "%s/notify", r->d.dir);
    r->notify_fd = unix_socket(SOCK_DGRAM, r->notify, 0);
    r->listen_fd = -1;
    ck_assert_msg(access(td_exe(), X_OK) == 0, "%s: %s (build it first)", td_exe(),
                  strerror(errno));
}

/* In the daemon's process: what the service manager would pass it. */
static void as_service(const td_daemon *d, void *data)
{
    const drun *r = data;
    dup2(STDERR_FILENO, STDOUT_FILENO);
    char pid_s[32];
    snprintf(pid_s, sizeof pid_s, "%d", (int)getpid());
    if (r->listen_fd >= 0) {
        if (r->listen_fd == 3) {
            if (fcntl(3, F_SETFD, 0) < 0)
                _exit(127);
        } else if (dup2(r->listen_fd, 3) < 0) { /* dup2 clears FD_CLOEXEC on 3 */
            _exit(127);
        }
        setenv("LISTEN_FDS", "1", 1);
        setenv("LISTEN_PID", pid_s, 1);
        setenv("LISTEN_FDNAMES", "liteattnd.socket", 1);
    }
    if (r->watchdog_usec) {
        setenv("WATCHDOG_USEC", r->watchdog_usec, 1);
        setenv("WATCHDOG_PID", pid_s, 1);
    }
    setenv("NOTIFY_SOCKET", r->notify, 1);
}

/* Starts the daemon. listen_fd >= 0: socket activation with that socket as fd 3 (and the
 * daemon is told --socket <dir>/unused.sock, which it must not create). watchdog_usec: value
 * of WATCHDOG_USEC, or NULL for no watchdog. Returns at once (the case waits for READY=1). */
static void drun_start(drun *r, int listen_fd, const char *watchdog_usec)
{
    char unused[160];
    snprintf(unused, sizeof unused, "%s/unused.sock", r->d.dir);
    r->listen_fd = listen_fd;
    r->watchdog_usec = watchdog_usec;
    const char *args[] = {
        "--foreground", "--threads", "1", "--socket", listen_fd >= 0 ? unused : r->d.socket, NULL};
    td_opts o = {.args = args, .child = as_service, .data = r, .no_wait = 1};
    ck_assert_msg(td_spawn(&r->d, &o) == 0, "liteattnd did not start (see above)");
}

static int drun_alive(drun *r) { return td_wait(&r->d, 0) < 0; }

/* Appends one waiting datagram (one or more newline-separated assignments) to r->msgs, each
 * line ending in '\n'. 1 when there was one. */
static int receive_one(drun *r)
{
    char buf[4096];
    ssize_t got = recv(r->notify_fd, buf, sizeof buf, MSG_DONTWAIT);
    if (got <= 0)
        return 0;
    size_t room = sizeof r->msgs - r->msgs_len - 2;
    size_t take = (size_t)got < room ? (size_t)got : room;
    memcpy(r->msgs + r->msgs_len, buf, take);
    r->msgs_len += take;
    if (r->msgs_len && r->msgs[r->msgs_len - 1] != '\n')
        r->msgs[r->msgs_len++] = '\n';
    return 1;
}

/* Reads notifications for up to timeout_ms. Returns 1 as soon as a line equal to `line`
 * (or, when prefix is set, starting with it) has been received, at any time so far. */
static int drun_wait_line(drun *r, const char *line, int prefix, int timeout_ms)
{
    long long deadline = now_ms() + timeout_ms;
    for (;;) {
        /* Scan what we have. */
        size_t n = strlen(line);
        const char *p = r->msgs, *end = r->msgs + r->msgs_len;
        while (p < end) {
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            size_t len = (size_t)(nl - p);
            if ((prefix ? len >= n : len == n) && memcmp(p, line, n) == 0)
                return 1;
            p = nl + 1;
        }
        long long left = deadline - now_ms();
        if (left <= 0)
            return 0;
        struct pollfd pfd = {.fd = r->notify_fd, .events = POLLIN};
        int k = poll(&pfd, 1, left > 100 ? 100 : (int)left);
        if (k > 0) {
            receive_one(r);
        } else if (!drun_alive(r)) {
            /* Drain what it sent before it went, then give up. */
            while (receive_one(r)) {
            }
            deadline = now_ms();
        }
    }
}

static int drun_count(const drun *r, const char *line)
{
    int count = 0;
    size_t n = strlen(line);
    const char *p = r->msgs, *end = r->msgs + r->msgs_len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if ((size_t)(nl - p) == n && memcmp(p, line, n) == 0)
            count++;
        p = nl + 1;
    }
    return count;
}

static void drun_expect_ready(drun *r)
{
    if (!drun_wait_line(r, "READY=1", 0, START_TIMEOUT_MS)) {
        dump_log(r);
        ck_abort_msg("no READY=1 within %d ms (daemon %s)", START_TIMEOUT_MS,
                     drun_alive(r) ? "still running" : "exited");
    }
}

/* SIGTERM: STOPPING=1 must come, then exit status 0. */
static void drun_stop(drun *r)
{
    ck_assert_msg(drun_alive(r), "daemon exited before SIGTERM");
    ck_assert_int_eq(kill(r->d.pid, SIGTERM), 0);
    int stopping = drun_wait_line(r, "STOPPING=1", 0, START_TIMEOUT_MS);
    int st = td_wait(&r->d, START_TIMEOUT_MS);
    if (st < 0) {
        td_kill(&r->d);
        dump_log(r);
        ck_abort_msg("daemon still running %d ms after SIGTERM", START_TIMEOUT_MS);
    }
    if (!stopping || st != 0)
        dump_log(r);
    ck_assert_msg(stopping, "no STOPPING=1 after SIGTERM");
    ck_assert_msg(st < 128, "daemon killed by signal %d", st - 128);
    ck_assert_int_eq(st, 0);
}

/* Kills the daemon if it still runs, removes the directory. */
static void drun_free(drun *r)
{
    if (r->d.pid > 0)
        td_kill(&r->d);
    if (r->notify_fd >= 0)
        close(r->notify_fd);
    td_stop(&r->d);
}

static void ping_through(const char *sock)
{
    la_client *c = NULL;
    int rc = la_connect(sock, "check_systemd", &c);
    ck_assert_msg(rc == 0, "la_connect(%s): %s (%s)", sock, la_err_name(rc),
                  la_last_error_message());
    uint64_t rtt = 0;
    rc = la_ping(c, &rtt);
    ck_assert_msg(rc == 0, "la_ping: %s (%s)", la_err_name(rc), la_last_error_message());
    ck_assert_ptr_nonnull(la_client_property(c, "daemon.version"));
    la_disconnect(c);
}

/* ---------------------------------------------------------------------------------------- */

/* Socket activation: the daemon serves the inherited fd 3, does not bind --socket, and a
 * client that connected before the daemon was ready is answered. */
START_TEST(test_socket_activation)
{
    drun r;
    drun_init(&r);
    int lfd = unix_socket(SOCK_STREAM, r.d.socket, 1);
    drun_start(&r, lfd, NULL);
    close(lfd); /* from now on only the daemon holds the listening socket */

    /* Connect at once, as a client of a socket unit would: the kernel queues us until the
     * daemon accepts. */
    ping_through(r.d.socket);
    drun_expect_ready(&r);
    ping_through(r.d.socket);

    char unused[160];
    struct stat st;
    snprintf(unused, sizeof unused, "%s/unused.sock", r.d.dir);
    ck_assert_msg(stat(unused, &st) != 0, "daemon bound --socket despite LISTEN_FDS=1");

    drun_stop(&r);
    /* The socket belongs to the service manager (liteattnd.socket): it must still be there
     * for the next activation after the daemon exits or is restarted. */
    ck_assert_msg(stat(r.d.socket, &st) == 0 && S_ISSOCK(st.st_mode),
                  "daemon removed the inherited socket %s", r.d.socket);
    drun_free(&r);
}
END_TEST

/* Without activation the daemon binds its own socket, and READY=1 comes only once it
 * listens there: a connect() right after READY=1 must succeed. */
START_TEST(test_ready_after_listen)
{
    drun r;
    drun_init(&r);
    drun_start(&r, -1, NULL);
    drun_expect_ready(&r);

    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strcpy(sa.sun_path, r.d.socket);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ck_assert_int_ge(fd, 0);
    int rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
    if (rc != 0)
        dump_log(&r);
    ck_assert_msg(rc == 0, "connect right after READY=1: %s", strerror(errno));
    close(fd);
    ping_through(r.d.socket);
    drun_stop(&r);
    drun_free(&r);
}
END_TEST

/* The packaged sample config, with every setting uncommented (all at their defaults), is
 * accepted by the daemon. */
START_TEST(test_sample_config)
{
    drun r;
    drun_init(&r);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "sed 's/^#\\([a-z_]* = \\)/\\1/' packaging/liteattnd.conf > %s",
             r.d.conf);
    ck_assert_int_eq(system(cmd), 0);
    snprintf(cmd, sizeof cmd, "grep -c '^[a-z]' %s >/dev/null", r.d.conf);
    ck_assert_msg(system(cmd) == 0, "no settings in packaging/liteattnd.conf");
    drun_start(&r, -1, NULL);
    drun_expect_ready(&r);
    ping_through(r.d.socket);
    drun_stop(&r);
    drun_free(&r);
}
END_TEST

/* STATUS= lines tell the admin what the daemon does (systemctl status). */
START_TEST(test_status_lines)
{
    drun r;
    drun_init(&r);
    drun_start(&r, -1, NULL);
    drun_expect_ready(&r);
    ck_assert_msg(drun_wait_line(&r, "STATUS=", 1, 2000), "no STATUS= line by READY=1");
    ping_through(r.d.socket);
    drun_stop(&r);
    drun_free(&r);
}
END_TEST

/* With WATCHDOG_USEC=2 s and WATCHDOG_PID naming it, the daemon pings at least every second
 * (half the interval, as sd_watchdog_enabled(3) advises), from its event loop. */
START_TEST(test_watchdog_pings)
{
    drun r;
    drun_init(&r);
    drun_start(&r, -1, "2000000");
    drun_expect_ready(&r);
    int before = drun_count(&r, "WATCHDOG=1");
    /* Keep the loop busy with a client meanwhile: pings must not depend on idleness. */
    ping_through(r.d.socket);
    drun_wait_line(&r, "never", 0, 3500);
    int pings = drun_count(&r, "WATCHDOG=1") - before;
    if (pings < 2)
        dump_log(&r);
    ck_assert_msg(pings >= 2, "%d WATCHDOG=1 in 3.5 s with WatchdogSec=2", pings);
    drun_stop(&r);
    drun_free(&r);
}
END_TEST

/* No WATCHDOG_USEC: no watchdog pings (the daemon follows sd_watchdog_enabled). */
START_TEST(test_no_watchdog_without_usec)
{
    drun r;
    drun_init(&r);
    drun_start(&r, -1, NULL);
    drun_expect_ready(&r);
    drun_wait_line(&r, "never", 0, 1500);
    ck_assert_int_eq(drun_count(&r, "WATCHDOG=1"), 0);
    drun_stop(&r);
    drun_free(&r);
}
END_TEST

/* SIGTERM under socket activation with a client connected: STOPPING=1, exit 0. */
START_TEST(test_sigterm_with_client)
{
    drun r;
    drun_init(&r);
    int lfd = unix_socket(SOCK_STREAM, r.d.socket, 1);
    drun_start(&r, lfd, "5000000");
    close(lfd);
    drun_expect_ready(&r);
    la_client *c = NULL;
    ck_assert_int_eq(la_connect(r.d.socket, "check_systemd", &c), 0);
    drun_stop(&r);
    /* The client learns that the daemon went away. */
    uint64_t rtt;
    ck_assert_int_ne(la_ping(c, &rtt), 0);
    la_disconnect(c);
    drun_free(&r);
}
END_TEST

/* `systemd-analyze verify` accepts the units, liteattnd.service with the MPS drop-in, and
 * liteattn-mps.service. ExecStart names the installed /usr/sbin/liteattnd; where that is absent
 * the check runs on a copy naming the built one (and nvidia-cuda-mps-control, absent on hosts
 * without the NVIDIA driver, becomes /bin/true). */
START_TEST(test_units_verify)
{
    const char *units[] = {"packaging/liteattnd.service", "packaging/liteattnd.socket",
                           "packaging/liteattn-mps.service", "packaging/liteattnd-mps.conf"};
    if (system("command -v systemd-analyze >/dev/null 2>&1") != 0) {
        printf("note: systemd-analyze not installed; unit verification skipped\n");
        return;
    }
    for (size_t i = 0; i < 4; i++)
        ck_assert_msg(access(units[i], R_OK) == 0, "%s: %s (run from the source root)", units[i],
                      strerror(errno));
    char dir[] = "/tmp/la-check-units-XXXXXX";
    ck_assert(mkdtemp(dir) != NULL);
    char exe[1024];
    if (access("/usr/sbin/liteattnd", X_OK) == 0) {
        strcpy(exe, "/usr/sbin/liteattnd");
    } else {
        ck_assert_msg(realpath(td_exe(), exe) != NULL, "%s: %s", td_exe(), strerror(errno));
    }
    char cmd[4096];
    const char *mps = access("/usr/bin/nvidia-cuda-mps-control", X_OK) == 0
                          ? "/usr/bin/nvidia-cuda-mps-control"
                          : "/bin/true";
    snprintf(cmd, sizeof cmd,
             "sed 's|^ExecStart=/usr/sbin/liteattnd|ExecStart=%s|' %s > %s/liteattnd.service && "
             "cp %s %s/liteattnd.socket && "
             "sed 's|^ExecStart=/usr/bin/nvidia-cuda-mps-control|ExecStart=%s|' %s > "
             "%s/liteattn-mps.service && "
             "mkdir %s/liteattnd.service.d && cp %s %s/liteattnd.service.d/mps.conf && "
             "out=$(systemd-analyze verify --man=no %s/liteattnd.service %s/liteattnd.socket "
             "%s/liteattn-mps.service 2>&1);"
             " rc=$?; printf '%%s' \"$out\" > %s/out; "
             "[ $rc -eq 0 ] && [ -z \"$out\" ]",
             exe, units[0], dir, units[1], dir, mps, units[2], dir, dir, units[3], dir, dir, dir,
             dir, dir);
    int rc = system(cmd);
    char out[4096] = "";
    char path[128];
    snprintf(path, sizeof path, "%s/out", dir);
    FILE *f = fopen(path, "r");
    if (f) {
        size_t n = fread(out, 1, sizeof out - 1, f);
        out[n] = 0;
        fclose(f);
    }
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
    ck_assert_msg(rc == 0, "systemd-analyze verify complained:\n%s", out);
}
END_TEST

static Suite *systemd_suite(void)
{
    Suite *s = suite_create("systemd");
    TCase *tc = tcase_create("notify");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_socket_activation);
    tcase_add_test(tc, test_ready_after_listen);
    tcase_add_test(tc, test_sample_config);
    tcase_add_test(tc, test_status_lines);
    tcase_add_test(tc, test_watchdog_pings);
    tcase_add_test(tc, test_no_watchdog_without_usec);
    tcase_add_test(tc, test_sigterm_with_client);
    suite_add_tcase(s, tc);
    TCase *tu = tcase_create("units");
    tcase_set_timeout(tu, 60);
    tcase_add_test(tu, test_units_verify);
    suite_add_tcase(s, tu);
    return s;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    return tu_run(systemd_suite()); /* fork mode: Check's default, CK_FORK=no aside */
}
