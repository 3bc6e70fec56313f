/*
 * check_security.c — isolation between Unix users and per-user limits, with real uids: the
 * daemon runs as root, the clients are forked children that drop to uid/gid 1234 ("A") and
 * 65534 ("B", nobody). Only meaningful as root; otherwise each case passes with a note.
 *
 *   - the socket the daemon creates has the --socket-mode permissions (default 0660, root's
 *     group here), and a user outside owner and group cannot connect to it;
 *   - B cannot attach to, read the masks of, reset, close, get info on, or list A's session,
 *     nor run a call on it, nor use A's buffer ids in its own calls or unregister them (all
 *     LA_ENOENT: another user's objects do not exist for it); a second connection of A
 *     cannot use the buffers of A's first connection either; A's session is intact after;
 *   - per-user limits: A at its session, mask-byte and connection limits is refused
 *     (LA_ELIMIT) while B is still served.
 * Each case has a daemon of its own (a checked td fixture with the case's options).
 */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "liteattn.h"
#include "rawproto.h"
#include "testutil.h"
#include "testutil_daemon.h"
#include "testutil_proc.h"

#define UID_A 1234
#define UID_B 65534

/* Shared with the clients of a case (tu_shared_new): the socket, A's objects for B to try,
 * the failures both record. */
typedef struct shared {
    char sock[108];
    int64_t a_session, a_buffer;
    tu_failures fail;
} shared;

static shared *shared_new(const td_daemon *d)
{
    shared *sh = tu_shared_new(sizeof *sh);
    snprintf(sh->sock, sizeof sh->sock, "%s", d->socket);
    return sh;
}

#define CHECK(sh, cond, ...) TU_CHECK(&(sh)->fail, cond, __VA_ARGS__)

/* ---- socket permissions ------------------------------------------------------------------- */

static void try_connect(void *data)
{
    shared *sh = data;
    int fd = raw_socket(sh->sock);
    CHECK(sh, fd < 0 && errno == EACCES, "uid %d connected to a 0660 root socket (fd %d, %s)",
          (int)getuid(), fd, strerror(errno));
    if (fd >= 0)
        close(fd);
}

static void assert_socket_mode(const td_daemon *d, unsigned mode)
{
    struct stat st;
    ck_assert_int_eq(stat(d->socket, &st), 0);
    ck_assert(S_ISSOCK(st.st_mode));
    ck_assert_msg((st.st_mode & 0777) == mode, "socket mode %o, want %o", st.st_mode & 0777, mode);
}

/* td_fx with the default --socket-mode 0660. */
START_TEST(test_socket_mode)
{
    if (tu_not_root())
        return;
    assert_socket_mode(&td_fx, 0660);
    shared *sh = shared_new(&td_fx);
    ck_assert_int_eq(tu_run_as(UID_B, try_connect, sh), 0);
    tu_assert_no_failures(&sh->fail);
}
END_TEST

TD_FIXTURE(mode_0600_up, "--socket-mode", "0600")

START_TEST(test_socket_mode_0600)
{
    if (tu_not_root())
        return;
    assert_socket_mode(&td_fx, 0600);
}
END_TEST

/* ---- isolation ---------------------------------------------------------------------------- */

static int a_ctl[2], a_ack[2]; /* parent -> A: go on; A -> parent: ready / result */

static void user_a(void *data)
{
    shared *sh = data;
    const char *sock = sh->sock;
    int fd = raw_connect(sock);
    CHECK(sh, fd >= 0, "A: cannot connect");
    if (fd < 0)
        _exit(1);
    sh->a_session = raw_session_open(fd, "secret", 1, 2, 64);
    int m = raw_memfd(4 * 64 * 2 * 64 * 4);
    sh->a_buffer = raw_register(fd, m, 4 * 64 * 2 * 64 * 4);
    close(m);
    CHECK(sh, sh->a_session > 0 && sh->a_buffer > 0, "A: setup failed (%lld, %lld)",
          (long long)sh->a_session, (long long)sh->a_buffer);
    /* A second connection of A: A's session is its own, the first connection's buffer is not. */
    int fd2 = raw_connect(sock);
    raw_attn x;
    raw_attn_init(&x, (uint64_t)sh->a_session, (uint64_t)sh->a_buffer, 64, 2);
    CHECK(sh, raw_rc(fd2, &x.req) == LA_ENOENT, "A's 2nd connection used the 1st's buffer");
    CHECK(sh, raw_attach(fd2, "secret") == 0, "A cannot attach its own session");
    close(fd2);
    char c = 'r';
    if (write(a_ack[1], &c, 1) != 1 || read(a_ctl[0], &c, 1) != 1)
        _exit(2);
    /* B has tried everything: the session and buffer are intact and usable. */
    CHECK(sh, raw_rc(fd, &x.req) == 0, "A: call on its own session after B failed");
    CHECK(sh,
          raw_session_ref(fd, LITEATTN__REQUEST__BODY_SESSION_INFO, (uint64_t)sh->a_session) == 0,
          "A: info after B");
    CHECK(sh, raw_list_count(fd) == 1, "A: list after B");
    close(fd);
}

static void user_b(void *data)
{
    shared *sh = data;
    const char *sock = sh->sock;
    int fd = raw_connect(sock);
    CHECK(sh, fd >= 0, "B: cannot connect to the 0666 socket");
    if (fd < 0)
        _exit(1);
    uint64_t sid = (uint64_t)sh->a_session;
    int rc;
#define DENIED(expr, what) \
    rc = (expr);           \
    CHECK(sh, rc == LA_ENOENT, "B: %s: got %s, want LA_ENOENT", what, la_err_name(rc))
    DENIED(raw_attach(fd, "secret"), "attach to A's session");
    DENIED(raw_mask_read(fd, sid), "mask read of A's session");
    DENIED(raw_session_ref(fd, LITEATTN__REQUEST__BODY_SESSION_INFO, sid), "info");
    DENIED(raw_session_ref(fd, LITEATTN__REQUEST__BODY_SESSION_RESET, sid), "reset");
    DENIED(raw_session_ref(fd, LITEATTN__REQUEST__BODY_SESSION_CLOSE, sid), "close");
    rc = raw_list_count(fd);
    CHECK(sh, rc == 0, "B: session list shows %d sessions", rc);
    /* A call on A's session with B's own buffer. */
    int m = raw_memfd(4 * 64 * 2 * 64 * 4);
    int64_t bb = raw_register(fd, m, 4 * 64 * 2 * 64 * 4);
    close(m);
    CHECK(sh, bb > 0, "B: register");
    raw_attn x;
    raw_attn_init(&x, sid, (uint64_t)bb, 64, 2);
    DENIED(raw_rc(fd, &x.req), "call on A's session");
    /* B's own session with A's buffer id (ids are small integers: easy to guess). */
    int64_t bs = raw_session_open(fd, "secret", 1, 2, 64); /* same key: another user's */
    CHECK(sh, bs > 0, "B: its own session 'secret': %lld", (long long)bs);
    raw_attn_init(&x, (uint64_t)bs, (uint64_t)sh->a_buffer, 64, 2);
    DENIED(raw_rc(fd, &x.req), "call with A's buffer");
    Liteattn__BufferUnregister bu = LITEATTN__BUFFER_UNREGISTER__INIT;
    bu.buffer_id = (uint64_t)sh->a_buffer;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 50;
    q.body_case = LITEATTN__REQUEST__BODY_BUFFER_UNREGISTER;
    q.buffer_unregister = &bu;
    DENIED(raw_rc(fd, &q), "unregister A's buffer");
    /* B's own call works. */
    raw_attn_init(&x, (uint64_t)bs, (uint64_t)bb, 64, 2);
    CHECK(sh, raw_rc(fd, &x.req) == 0, "B: its own call failed");
    CHECK(sh, raw_list_count(fd) == 1, "B: list of its own");
    close(fd);
#undef DENIED
}

/* A runs a_fn as uid A up to its readiness, then B runs b_fn as uid B to its end, then A goes
 * on to its end; every failure of either fails the case. */
static void a_then_b(shared *sh, void (*a_fn)(void *), void (*b_fn)(void *))
{
    ck_assert_int_eq(pipe(a_ctl), 0);
    ck_assert_int_eq(pipe(a_ack), 0);
    pid_t a = tu_fork_as(UID_A, a_fn, sh);
    char c;
    ck_assert_int_eq(read(a_ack[0], &c, 1), 1);
    tu_assert_no_failures(&sh->fail);
    ck_assert_int_eq(tu_run_as(UID_B, b_fn, sh), 0);
    ck_assert_int_eq(write(a_ctl[1], "g", 1), 1);
    int st = tu_wait_child(a);
    tu_assert_no_failures(&sh->fail);
    ck_assert_msg(st == 0, "A exited with %d", st);
}

TD_FIXTURE(open_up, "--socket-mode", "0666")

START_TEST(test_isolation)
{
    if (tu_not_root())
        return;
    a_then_b(shared_new(&td_fx), user_a, user_b);
}
END_TEST

/* ---- per-user limits ---------------------------------------------------------------------- */

static void hog_a(void *data)
{
    shared *sh = data;
    const char *sock = sh->sock;
    int fd[3];
    for (int i = 0; i < 3; i++) {
        fd[i] = raw_connect(sock);
        CHECK(sh, fd[i] >= 0, "A: connection %d refused below the limit", i);
    }
    /* The 4th connection of A: one Error frame (LA_ELIMIT), then closed. */
    int x = raw_socket(sock);
    Liteattn__Reply *r = raw_recv(x, 5000);
    CHECK(sh, raw_code(r) == LA_ELIMIT, "A: 4th connection not refused (%s)",
          la_err_name(raw_code(r)));
    if (r)
        liteattn__reply__free_unpacked(r, NULL);
    close(x);
    /* Sessions: 2 fit, the 3rd is refused; a session larger than the 64 KiB mask budget too
     * (64 layers x 16 heads x 64 q-tiles x 2 words x 4 B = 512 KiB). */
    CHECK(sh, raw_session_open(fd[0], "a1", 1, 2, 64) > 0, "A: first session");
    CHECK(sh, raw_session_open(fd[1], "a2", 1, 2, 64) > 0, "A: second session");
    CHECK(sh, raw_session_open(fd[2], "a3", 1, 2, 64) == LA_ELIMIT, "A: 3rd session allowed");
    CHECK(sh, raw_session_open(fd[2], "a4", 64, 16, 4096) == LA_ELIMIT,
          "A: a session over its mask bytes allowed");
    /* Stay connected while B tries: the parent reads our readiness, then lets us go. */
    char c = 'r';
    if (write(a_ack[1], &c, 1) != 1 || read(a_ctl[0], &c, 1) != 1)
        _exit(2);
    for (int i = 0; i < 3; i++)
        close(fd[i]);
}

static void served_b(void *data)
{
    shared *sh = data;
    const char *sock = sh->sock;
    int fd[3];
    for (int i = 0; i < 3; i++) {
        fd[i] = raw_connect(sock);
        CHECK(sh, fd[i] >= 0, "B: connection %d refused while A is at its limit", i);
    }
    CHECK(sh, raw_session_open(fd[0], "b1", 1, 2, 64) > 0, "B: session refused (A's limit)");
    CHECK(sh, raw_session_open(fd[1], "b2", 1, 2, 64) > 0, "B: 2nd session refused");
    CHECK(sh, raw_ping(fd[2]) == 0, "B: ping");
    for (int i = 0; i < 3; i++)
        close(fd[i]);
}

TD_FIXTURE(limits_up, "--socket-mode", "0666", "--max-sessions", "2", "--max-connections-per-user",
           "3", "--max-mask-bytes", "64K")

START_TEST(test_per_user_limits)
{
    if (tu_not_root())
        return;
    a_then_b(shared_new(&td_fx), hog_a, served_b);
}
END_TEST

static TCase *add_tcase(Suite *s, const char *name, void (*up)(void), const TTest *test)
{
    TCase *tc = tcase_create(name);
    tcase_set_timeout(tc, 60);
    tcase_add_checked_fixture(tc, up, td_fx_down);
    tcase_add_test(tc, test);
    suite_add_tcase(s, tc);
    return tc;
}

int main(void)
{
    Suite *s = suite_create("security");
    add_tcase(s, "socket_mode", td_fx_up, test_socket_mode);
    add_tcase(s, "socket_mode_0600", mode_0600_up, test_socket_mode_0600);
    add_tcase(s, "isolation", open_up, test_isolation);
    add_tcase(s, "per_user_limits", limits_up, test_per_user_limits);
    return tu_run_suite(s);
}
