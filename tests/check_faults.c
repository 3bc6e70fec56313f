/*
 * check_faults.c — what the daemon survives (CPU backend; each case starts its own daemon):
 *   - clients killed with SIGKILL at random points: half-way through a BufferRegister frame
 *     whose fd already arrived, in the middle of attention calls, with requests pipelined and
 *     never read; the daemon keeps serving and its fd count comes back exactly;
 *   - SIGTERM under load: every call is answered (success, or LA_ESHUTDOWN / LA_ECLOSED), no
 *     client hangs, exit status 0;
 *   - the daemon killed (SIGKILL) and restarted on the same socket while clients run: they get
 *     LA_ECLOSED / LA_ECONN, reconnect, open their session again and it starts dense;
 *   - exhausted limits (sessions, mask bytes, buffers, buffer bytes, connections per user)
 *     and shared memory the daemon cannot map (a memfd smaller than claimed, a huge claim, an
 *     fd that cannot be sealed): errors, never a crash;
 *   - a daemon under RLIMIT_AS: a session or buffer too large for its address space gets
 *     LA_ENOMEM (or LA_ELIMIT), and the daemon goes on (skipped under a sanitizer, whose shadow
 *     memory needs terabytes of address space).
 * A full disk does not concern the daemon: it writes no file (the log goes to stderr, i.e. the
 * journal), only creates its socket and lock file at start. Each case has a daemon of its own
 * (a checked td fixture, or td_dir/td_spawn where it needs a resource limit).
 */
#include <check.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "la_attn.h"
#include "liteattn.h"
#include "rawproto.h"
#include "testutil.h"
#include "testutil_daemon.h"
#include "testutil_proc.h"

/* Shared between a case and the client processes it forks (tu_shared_new). */
typedef struct shared {
    int stop;
    tu_failures fail;
    long ok_calls, failed_calls, reconnects;
} shared;

#define SFAIL(sh, ...) tu_fail(&(sh)->fail, __VA_ARGS__)

/* A client's session, buffer and call description, [1, S, 2, 64] f32 q/k/v/o. */
typedef struct job {
    la_client *c;
    la_session *s;
    la_buffer *b;
    la_attn *a;
    int S;
} job;

static int job_open(job *j, const char *sock, const char *key, int S)
{
    memset(j, 0, sizeof *j);
    j->S = S;
    int rc = la_connect(sock, "check_faults", &j->c);
    if (rc)
        return rc;
    la_session_config *cfg;
    la_session_config_new(&cfg);
    la_session_config_set_geometry(cfg, 1, 2, 64, LA_DTYPE_F32, (uint32_t)S, 0, 1, 1);
    rc = la_session_open(j->c, key, cfg, &j->s);
    la_session_config_free(cfg);
    if (rc)
        return rc;
    size_t t = (size_t)S * 2 * 64 * 4;
    if ((rc = la_buffer_new_host(j->c, 4 * t, &j->b)))
        return rc;
    tu_rng r;
    tu_rng_init(&r, (uint64_t)S);
    tu_fill(&r, la_buffer_host_ptr(j->b), LA_DTYPE_F32, (int64_t)(3 * t / 4), 1.0);
    la_attn_new(&j->a);
    int64_t sh[4] = {1, S, 2, 64};
    for (int i = 0; i < 4; i++)
        la_attn_set_tensor(j->a, (la_tensor_role)i, j->b, (uint64_t)i * t, LA_DTYPE_F32, 4, sh,
                           NULL);
    return 0;
}

static void job_close(job *j)
{
    la_attn_free(j->a);
    if (j->b)
        la_buffer_unregister(j->b);
    if (j->s)
        la_session_close(j->s);
    la_disconnect(j->c);
    memset(j, 0, sizeof *j);
}

/* Waits until pid's fd count is want (up to timeout_ms); returns the last count. */
static int wait_fds(pid_t pid, int want, int timeout_ms)
{
    double end = tu_now_s() + timeout_ms / 1000.0;
    int n;
    while ((n = proc_fd_count(pid)) != want && tu_now_s() < end)
        usleep(10000);
    return n;
}

/* ---- clients killed at random points ------------------------------------------------------ */

enum { K_REGISTER, K_MID_ATTENTION, K_PIPELINED, K_KINDS };

static void victim(const char *sock, int kind, int idx)
{
    char key[32];
    snprintf(key, sizeof key, "victim-%d", idx);
    if (kind == K_REGISTER) {
        /* Half a BufferRegister frame; its fd rides on the first byte, so the daemon holds the
         * fd in its frame reader when we die. */
        int fd = raw_connect(sock);
        if (fd < 0)
            _exit(1);
        int m = raw_memfd(1 << 16);
        Liteattn__BufferRegister br = LITEATTN__BUFFER_REGISTER__INIT;
        br.kind = LITEATTN__BUFFER_KIND__BUFFER_SHM;
        br.size = 1 << 16;
        Liteattn__Request q = LITEATTN__REQUEST__INIT;
        q.id = 9;
        q.body_case = LITEATTN__REQUEST__BODY_BUFFER_REGISTER;
        q.buffer_register = &br;
        uint8_t *buf;
        size_t len;
        raw_pack(&q, &buf, &len);
        raw_send_bytes(fd, buf, len - 2, m); /* the frame cut short, the fd with it */
        for (;;)
            pause();
    }
    job j;
    if (job_open(&j, sock, key, kind == K_MID_ATTENTION ? 1024 : 256) != 0)
        _exit(1);
    if (kind == K_MID_ATTENTION) {
        for (;;)
            la_attn_run(j.s, j.a, NULL);
    }
    /* Pipelined: as many calls as the daemon takes, never reading a reply. */
    for (int i = 0;; i++) {
        la_call *c;
        if (la_attn_submit(j.s, j.a, NULL, NULL, &c) != 0)
            for (;;)
                pause();
    }
}

TD_FIXTURE(grace0_up, "--session-grace", "0", "--log-level", "warn")

START_TEST(test_clients_killed)
{
    td_daemon *d = &td_fx;
    tu_rng r;
    tu_rng_init(&r, 77);
    /* Warm-up (first connection's allocations), then the baseline. */
    int w = raw_connect(d->socket);
    ck_assert_int_ge(w, 0);
    close(w);
    usleep(100000);
    int fd0 = proc_fd_count(d->pid);

    for (int round = 0; round < 24; round++) {
        int kind = round % K_KINDS;
        pid_t pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            victim(d->socket, kind, round);
            _exit(0);
        }
        /* A random point: 5 to 120 ms into its life. */
        usleep((useconds_t)(5000 + tu_rng_u64(&r) % 115000));
        kill(pid, SIGKILL);
        int st;
        waitpid(pid, &st, 0);
        ck_assert_msg(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL,
                      "victim %d (kind %d) ended by itself with %d", round, kind, st);
        /* The daemon still serves. */
        int fd = raw_connect(d->socket);
        ck_assert_msg(fd >= 0, "daemon no longer answers after victim %d", round);
        ck_assert_int_eq(raw_ping(fd), 0);
        close(fd);
    }
    /* Everything of the victims goes: fds at once (their jobs finish first), sessions at the
     * next tick (grace 0). */
    int fd1 = wait_fds(d->pid, fd0, 10000);
    ck_assert_msg(fd1 == fd0, "daemon fds %d before the victims, %d after", fd0, fd1);
    int raw = raw_connect(d->socket);
    ck_assert_int_ge(raw, 0);
    int n = -1;
    for (int i = 0; i < 50 && (n = raw_list_count(raw)) != 0; i++)
        usleep(100000);
    ck_assert_int_eq(n, 0);
    close(raw);
}
END_TEST

/* ---- SIGTERM under load ------------------------------------------------------------------- */

static void loader(const char *sock, int idx, shared *sh)
{
    char key[32];
    snprintf(key, sizeof key, "term-%d", idx);
    job j;
    int rc = job_open(&j, sock, key, 256);
    if (rc) {
        SFAIL(sh, "loader %d: open: %s", idx, la_strerror(rc));
        _exit(0);
    }
    for (;;) {
        la_call *c[4];
        int n = 0;
        for (int i = 0; i < 4; i++) {
            rc = la_attn_submit(j.s, j.a, NULL, NULL, &c[n]);
            if (rc == 0)
                n++;
            else if (rc != LA_ECLOSED && rc != LA_ESHUTDOWN)
                SFAIL(sh, "loader %d: submit: %s", idx, la_strerror(rc));
        }
        int closed = n == 0;
        for (int i = 0; i < n; i++) {
            rc = la_call_wait(c[i], 20000);
            if (rc == 0)
                __sync_fetch_and_add(&sh->ok_calls, 1);
            else if (rc == LA_ESHUTDOWN || rc == LA_ECLOSED) {
                __sync_fetch_and_add(&sh->failed_calls, 1);
                closed = 1;
            } else
                SFAIL(sh, "loader %d: call ended with %s", idx, la_err_name(rc));
            la_call_free(c[i]);
        }
        if (closed)
            break;
    }
    _exit(0);
}

/* n client processes fn(socket, i, sh) against td_fx, each dying with the case. */
static void spawn_clients(int n, pid_t *pids, void (*fn)(const char *, int, shared *), shared *sh)
{
    for (int i = 0; i < n; i++) {
        pids[i] = fork();
        ck_assert_int_ge(pids[i], 0);
        if (pids[i] == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            fn(td_fx.socket, i, sh);
            _exit(0);
        }
    }
}

START_TEST(test_sigterm_under_load)
{
    shared *sh = tu_shared_new(sizeof *sh);
    pid_t pids[8];
    spawn_clients(8, pids, loader, sh);
    usleep(400000);
    long before = sh->ok_calls;
    int st = td_stop(&td_fx); /* SIGTERM, then the exit status (checked below) */
    for (int i = 0; i < 8; i++) {
        int cst;
        ck_assert_int_eq(waitpid(pids[i], &cst, 0), pids[i]);
    }
    printf("sigterm under load: %ld calls done before SIGTERM, %ld in all, %ld answered with "
           "LA_ESHUTDOWN/LA_ECLOSED\n",
           before, sh->ok_calls, sh->failed_calls);
    tu_assert_no_failures(&sh->fail);
    ck_assert_int_gt(before, 0);
    ck_assert_int_eq(st, 0);
}
END_TEST

/* ---- SIGKILL and restart ------------------------------------------------------------------ */

/* The daemon of the restart case, with its log level (LA_FAULTS_DEBUG=1: debug). */
static const char *restart_args[] = {"--log-level", "warn", NULL};

static void restart_up(void)
{
    if (getenv("LA_FAULTS_DEBUG"))
        restart_args[1] = "debug";
    td_fx_start(restart_args);
}

static void survivor(const char *sock, int idx, shared *sh)
{
    char key[32];
    snprintf(key, sizeof key, "surv-%d", idx);
    job j;
    memset(&j, 0, sizeof j);
    int have = 0, reconnected = 0, after = 0;
    double give_up = tu_now_s() + 30;
    while (!sh->stop || after < 5) {
        if (tu_now_s() > give_up) {
            SFAIL(sh, "survivor %d: no progress for 30 s (reconnected %d, calls after %d)", idx,
                  reconnected, after);
            break;
        }
        if (!have) {
            int rc = job_open(&j, sock, key, 128);
            if (rc == LA_ECONN || rc == LA_ECLOSED) {
                if (j.c)
                    la_disconnect(j.c);
                memset(&j, 0, sizeof j);
                usleep(20000);
                continue;
            }
            if (rc) {
                SFAIL(sh, "survivor %d: open after reconnect: %s (%s)", idx, la_strerror(rc),
                      la_last_error_message());
                break;
            }
            have = 1;
            if (reconnected) {
                /* A session opened again on the new daemon starts dense: all ones. */
                double live = 0;
                uint64_t calls = 1;
                if (la_session_info(j.s, &live, 1, &calls) != 0 || live != 1.0 || calls != 0)
                    SFAIL(sh, "survivor %d: reopened session not fresh (live %g, calls %llu)", idx,
                          live, (unsigned long long)calls);
            }
        }
        int rc = la_attn_run(j.s, j.a, NULL);
        if (rc == 0) {
            __sync_fetch_and_add(&sh->ok_calls, 1);
            if (reconnected)
                after++;
            continue;
        }
        if (rc == LA_ECLOSED || rc == LA_ECONN) {
            __sync_fetch_and_add(&sh->failed_calls, 1);
            job_close(&j); /* the handles; the daemon is gone */
            have = 0;
            if (!reconnected)
                __sync_fetch_and_add(&sh->reconnects, 1);
            reconnected = 1;
            continue;
        }
        SFAIL(sh, "survivor %d: call failed with %s (%s)", idx, la_err_name(rc),
              la_last_error_message());
        break;
    }
    if (have)
        job_close(&j);
    _exit(0);
}

START_TEST(test_kill_and_restart)
{
    shared *sh = tu_shared_new(sizeof *sh);
    enum { N = 4 };
    pid_t pids[N];
    spawn_clients(N, pids, survivor, sh);
    usleep(300000);
    long before = sh->ok_calls;
    ck_assert_int_eq(td_kill(&td_fx), 128 + SIGKILL);
    usleep(200000); /* clients see the socket gone (LA_ECONN) for a while */
    td_opts again = {.args = restart_args};
    ck_assert_msg(td_spawn(&td_fx, &again) == 0, "the daemon did not start again on %s",
                  td_fx.socket);
    sh->stop = 1;
    for (int i = 0; i < N; i++)
        ck_assert_int_eq(waitpid(pids[i], NULL, 0), pids[i]);
    printf("kill and restart: %ld calls before the kill, %ld in all, %ld failed with "
           "LA_ECLOSED/LA_ECONN, %ld clients reconnected\n",
           before, sh->ok_calls, sh->failed_calls, sh->reconnects);
    tu_assert_no_failures(&sh->fail);
    ck_assert_int_gt(before, 0);
    ck_assert_int_eq(sh->reconnects, N);
    /* td_fx_down: the restarted daemon exits 0 on SIGTERM */
}
END_TEST

/* ---- exhausted limits, shared memory that cannot be mapped -------------------------------- */

TD_FIXTURE(limits_up, "--max-sessions", "3", "--max-mask-bytes", "64K", "--max-buffers", "2",
           "--max-buffer-bytes", "1M", "--max-connections-per-user", "3")

START_TEST(test_limits_and_bad_shm)
{
    const td_daemon *d = &td_fx;
    int fd = raw_connect(d->socket);
    ck_assert_int_ge(fd, 0);

    /* Sessions: 3 fit, the 4th does not; mask bytes: one of 1 MiB of masks does not. */
    ck_assert_int_gt(raw_session_open(fd, "a", 1, 2, 256), 0);
    ck_assert_int_gt(raw_session_open(fd, "b", 1, 2, 256), 0);
    ck_assert_int_eq(raw_session_open(fd, "huge", 64, 16, 8192), LA_ELIMIT);
    ck_assert_int_gt(raw_session_open(fd, "c", 1, 2, 256), 0);
    ck_assert_int_eq(raw_session_open(fd, "d", 1, 2, 256), LA_ELIMIT);

    /* Buffers: 2 fit, a 3rd does not; bytes: 2 MiB do not fit a 1 MiB budget. */
    int m = raw_memfd(1 << 16);
    ck_assert_int_eq(raw_register(fd, m, 2u << 20), LA_EINVAL); /* claims more than the fd */
    close(m);
    m = raw_memfd(2u << 20);
    ck_assert_int_eq(raw_register(fd, m, 2u << 20), LA_ELIMIT);
    close(m);
    m = raw_memfd(4096);
    ck_assert_int_eq(raw_register(fd, m, (uint64_t)1 << 62), LA_EINVAL); /* a huge claim */
    ck_assert_int_eq(raw_register(fd, m, 0), LA_EINVAL);
    ck_assert_int_gt(raw_register(fd, m, 4096), 0);
    ck_assert_int_gt(raw_register(fd, m, 4096), 0);
    ck_assert_int_eq(raw_register(fd, m, 4096), LA_ELIMIT);
    close(m);

    /* fds that cannot be sealed against shrinking: a memfd without MFD_ALLOW_SEALING, a file. */
    int fd2 = raw_connect(d->socket);
    ck_assert_int_ge(fd2, 0);
    m = memfd_create("nosealing", MFD_CLOEXEC);
    ck_assert_int_eq(ftruncate(m, 4096), 0);
    ck_assert_int_eq(raw_register(fd2, m, 4096), LA_EINVAL);
    close(m);
    char tmpf[] = "/tmp/la-faults-file-XXXXXX";
    m = mkstemp(tmpf);
    ck_assert_int_eq(ftruncate(m, 4096), 0);
    unlink(tmpf);
    ck_assert_int_eq(raw_register(fd2, m, 4096), LA_EINVAL);
    close(m);
    /* A pipe is not a regular file. */
    int pp[2];
    ck_assert_int_eq(pipe(pp), 0);
    ck_assert_int_eq(raw_register(fd2, pp[0], 4096), LA_EINVAL);
    close(pp[0]);
    close(pp[1]);

    /* Connections per user: the 4th gets one Error frame (LA_ELIMIT) and is closed. */
    int fd3 = raw_connect(d->socket);
    ck_assert_int_ge(fd3, 0);
    int fd4 = raw_socket(d->socket);
    ck_assert_int_ge(fd4, 0);
    Liteattn__Reply *r = raw_recv(fd4, 5000);
    ck_assert_int_eq(raw_code(r), LA_ELIMIT);
    liteattn__reply__free_unpacked(r, NULL);
    ck_assert_ptr_null(raw_recv(fd4, 5000));
    close(fd4);

    /* Still serving everyone. */
    ck_assert_int_eq(raw_ping(fd), 0);
    ck_assert_int_eq(raw_ping(fd2), 0);
    ck_assert_int_eq(raw_ping(fd3), 0);
    close(fd), close(fd2), close(fd3);
}
END_TEST

/* ---- a daemon whose address space is limited ---------------------------------------------- */

static void limit_address_space(const td_daemon *d, void *data)
{
    struct rlimit rl = {1u << 30, 1u << 30}; /* 1 GiB of address space */
    setrlimit(RLIMIT_AS, &rl);
}

START_TEST(test_rlimit_as)
{
    if (getenv("LA_TEST_SANITIZER")) {
        printf("rlimit_as: skipped under a sanitizer (its shadow memory needs more address "
               "space than the limit)\n");
        return;
    }
    td_daemon d;
    ck_assert_int_eq(td_dir(&d), 0);
    const char *args[] = {
        "--max-mask-bytes", "64G", "--max-buffer-bytes", "64G", "--log-level", "warn", NULL};
    td_opts o = {.args = args, .child = limit_address_space};
    ck_assert_msg(td_spawn(&d, &o) == 0, "liteattnd under RLIMIT_AS did not start");
    int fd = raw_connect(d.socket);
    ck_assert_int_ge(fd, 0);
    /* 2 to 4 GiB of masks (64 layers x 32 heads x 2^18 queries and keys: 64 MiB per layer
     * with 64-row tiles). */
    int64_t rc = raw_session_open(fd, "too-big", 64, 32, 1u << 18);
    ck_assert_msg(rc == LA_ENOMEM || rc == LA_ELIMIT, "huge session: %lld", (long long)rc);
    /* A 2 GiB shared-memory buffer (sparse memfd): mapping it fails. */
    int m = raw_memfd((size_t)2 << 30);
    ck_assert_int_ge(m, 0);
    int64_t b = raw_register(fd, m, (uint64_t)2 << 30);
    close(m);
    ck_assert_msg(b == LA_ENOMEM || b == LA_ELIMIT || b == LA_EIO, "huge buffer: %lld",
                  (long long)b);
    printf("rlimit_as: 2-4 GiB session -> %s, 2 GiB buffer -> %s\n", la_err_name((int)rc),
           la_err_name((int)b));
    /* Small things still work. */
    ck_assert_int_gt(raw_session_open(fd, "small", 1, 2, 256), 0);
    ck_assert_int_eq(raw_ping(fd), 0);
    close(fd);
    int st = td_stop(&d);
    ck_assert_msg(st == 0, "daemon under RLIMIT_AS: exit %d", st);
}
END_TEST

static void add_tcase(Suite *s, const char *name, void (*up)(void), const TTest *test)
{
    TCase *tc = tcase_create(name);
    tcase_set_timeout(tc, 120);
    if (up)
        tcase_add_checked_fixture(tc, up, td_fx_down);
    tcase_add_test(tc, test);
    suite_add_tcase(s, tc);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    Suite *s = suite_create("faults");
    add_tcase(s, "clients_killed", grace0_up, test_clients_killed);
    add_tcase(s, "sigterm_under_load", td_fx_up, test_sigterm_under_load);
    add_tcase(s, "kill_and_restart", restart_up, test_kill_and_restart);
    add_tcase(s, "limits_and_bad_shm", limits_up, test_limits_and_bad_shm);
    add_tcase(s, "rlimit_as", NULL, test_rlimit_as); /* its own daemon, under a limit */
    return tu_run_suite(s);
}
