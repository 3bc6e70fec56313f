/*
 * testutil_daemon.h — private to tests/: start liteattnd on a temporary socket, connect to it,
 * stop it; and the Check fixture that gives each case a daemon of its own (PipeWire's pwtest
 * does the same).
 *
 *     td_daemon d;
 *     const char *args[] = {"--max-inflight", "4", NULL};
 *     ck_assert_int_eq(td_start(&d, args), 0);
 *     ... la_connect(d.socket, ...) or td_connect(&d) for a raw socket ...
 *     ck_assert_int_eq(td_stop(&d), 0);   // SIGTERM, exit status 0 expected
 *
 * or, for every case of a test case (the daemon is td_fx):
 *
 *     TD_FIXTURE(small_up, "--max-sessions", "2");
 *     tcase_add_checked_fixture(tc, small_up, td_fx_down);
 *
 * The daemon is $BUILD/liteattnd ($BUILD default "build", relative to the repository root, where
 * `make check` runs the tests), started with
 *     --socket <dir>/liteattn.sock --config <dir>/liteattnd.conf (empty unless the case writes
 *     it, so that /etc/liteattn/liteattnd.conf is ignored) --backend cpu --threads 2
 *     --log-level debug
 * followed by the caller's arguments (later flags win). <dir> is a fresh mkdtemp directory under
 * $TMPDIR (default /tmp), mode 0755 so that a test may connect as another user (then also pass
 * "--socket-mode", "0666"). The daemon's stderr goes to <dir>/liteattnd.log; td_stop prints it
 * when the exit status is not 0 (or always with LA_TEST_VERBOSE=1) and removes <dir> with
 * whatever the case put there. The daemon gets SIGKILL if the process that started it dies
 * (PR_SET_PDEATHSIG), so a failing Check case in fork mode leaves no daemon behind. The
 * systemd variables of the test's environment (LISTEN_*, NOTIFY_SOCKET, WATCHDOG_*) and
 * LITEATTN_SOCKET do not reach the daemon; a td_opts.child hook may set its own.
 */
#ifndef LA_TESTUTIL_DAEMON_H
#define LA_TESTUTIL_DAEMON_H

#include <sys/types.h>

typedef struct td_daemon {
    pid_t pid;        /* 0 when not running (after td_stop / td_wait / td_kill) */
    char dir[80];     /* the temporary directory */
    char socket[108]; /* <dir>/liteattn.sock: pass it to la_connect */
    char log[128];    /* <dir>/liteattnd.log: the daemon's stderr */
    char conf[128];   /* <dir>/liteattnd.conf: the --config file, empty unless a case writes it */
    int status;       /* the exit status td_wait saw (as it returns it), -1 before */
} td_daemon;

/* How td_spawn starts the daemon, beyond the defaults above. */
typedef struct td_opts {
    const char *const *args; /* extra arguments, NULL-terminated; NULL: none */
    /* Runs in the daemon's process just before exec, after stderr went to the log and the
     * environment was cleaned: for resource limits, inherited fds, environment variables. */
    void (*child)(const td_daemon *d, void *data);
    void *data;
    int no_wait; /* 1: return once forked (the caller waits for what it needs, e.g. READY=1) */
} td_opts;

/* The program the tests run: $BUILD/liteattnd. */
const char *td_exe(void);

/* td_dir, then td_spawn with extra_args (NULL-terminated, may be NULL), waiting up to 10 s
 * until a connect() to its socket succeeds. Returns 0, or -1 after printing why (and the
 * daemon's log) to stderr; d is then cleaned up. */
int td_start(td_daemon *d, const char *const *extra_args);

/* Only the temporary directory of a daemon (d's paths set, the empty config file written), for
 * a case that prepares files or sockets there before td_spawn. 0, or -1 after printing why. */
int td_dir(td_daemon *d);

/* Starts the daemon in d's directory: one from td_dir, or the one of a daemon that exited or
 * was killed (a restart on the same socket). Unless o->no_wait, waits as td_start does. 0, or
 * -1 after printing why (and the log); the directory stays (td_stop removes it). */
int td_spawn(td_daemon *d, const td_opts *o);

/* A new blocking connection to the daemon's socket (no Hello sent), or -1. */
int td_connect(const td_daemon *d);

/* Waits up to timeout_ms for the daemon to exit (without signalling it). Returns its exit
 * status (0..255), 128 + the signal number if a signal killed it, or -1 when it is still
 * running after timeout_ms. */
int td_wait(td_daemon *d, int timeout_ms);

/* SIGKILL, then the status as td_wait (128 + 9). The directory stays, for td_spawn again. */
int td_kill(td_daemon *d);

/* Sends SIGTERM and waits up to 10 s (then SIGKILL). Returns the exit status as td_wait (-1
 * when it had to be killed), prints the log if that is not 0, removes the directory. Safe to
 * call after td_wait: it then only cleans up and returns the status td_wait saw (and prints the
 * log only with LA_TEST_VERBOSE=1, since the caller checked that status itself). */
int td_stop(td_daemon *d);

/* The daemon's log (its stderr) on stderr, between two marker lines. */
void td_print_log(const td_daemon *d);

/* ---- the Check fixture: a daemon per case ------------------------------------------------ */

/* The daemon of the running case, when its test case has a td fixture. A checked fixture runs
 * in the case's own process, so no two cases share a daemon, a session count or a log. */
extern td_daemon td_fx;

/* Starts td_fx with the default arguments plus args (may be NULL), or fails the case. */
void td_fx_start(const char *const *args);
/* Setup: td_fx with the default arguments. */
void td_fx_up(void);
/* Teardown: stops td_fx and fails the case unless it exits with status 0 on SIGTERM (it
 * crashed, hung or failed during the case). A case that stopped td_fx itself (td_stop) leaves
 * nothing to do; one that collected its exit with td_wait gets that status asserted. */
void td_fx_down(void);
/* TD_FIXTURE(name, "--flag", "value", ...) defines the setup function name: td_fx with those
 * arguments after the defaults. */
#define TD_FIXTURE(name, ...)                                         \
    static void name(void)                                            \
    {                                                                 \
        static const char *const name##_args[] = {__VA_ARGS__, NULL}; \
        td_fx_start(name##_args);                                     \
    }

#endif /* LA_TESTUTIL_DAEMON_H */
