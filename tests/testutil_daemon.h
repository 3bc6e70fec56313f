/*
 * testutil_daemon.h — private to tests/: start liteattnd on a temporary socket, connect to it,
 * stop it. Each test case starts its own daemon (PipeWire's pwtest does the same).
 *
 *     td_daemon d;
 *     const char *args[] = {"--max-inflight", "4", NULL};
 *     ck_assert_int_eq(td_start(&d, args), 0);
 *     ... la_connect(d.socket, ...) or td_connect(&d) for a raw socket ...
 *     ck_assert_int_eq(td_stop(&d), 0);   // SIGTERM, exit status 0 expected
 *
 * The daemon is $BUILD/liteattnd ($BUILD default "build", relative to the repository root, where
 * `make check` runs the tests), started with
 *     --socket <dir>/liteattn.sock --config <dir>/liteattnd.conf (empty, so that
 *     /etc/liteattn/liteattnd.conf is ignored) --backend cpu --threads 2 --log-level debug
 * followed by the caller's arguments (later flags win). <dir> is a fresh mkdtemp directory under
 * $TMPDIR (default /tmp), mode 0755 so that a test may connect as another user (then also pass
 * "--socket-mode", "0666"). The daemon's stderr goes to <dir>/liteattnd.log; td_stop prints it
 * when the exit status is not 0 (or always with LA_TEST_VERBOSE=1) and removes <dir>.
 * The daemon gets SIGKILL if the process that started it dies (PR_SET_PDEATHSIG), so a failing
 * Check case in fork mode leaves no daemon behind.
 */
#ifndef LA_TESTUTIL_DAEMON_H
#define LA_TESTUTIL_DAEMON_H

#include <sys/types.h>

typedef struct td_daemon {
    pid_t pid;        /* 0 when not running (after td_stop / td_wait) */
    char dir[80];     /* the temporary directory */
    char socket[108]; /* <dir>/liteattn.sock: pass it to la_connect */
    char log[128];    /* <dir>/liteattnd.log: the daemon's stderr */
} td_daemon;

/* Starts the daemon with the default arguments above plus extra_args (NULL-terminated, may be
 * NULL) and waits up to 10 s until a connect() to its socket succeeds. Returns 0, or -1 after
 * printing why (and the daemon's log) to stderr; d is then cleaned up. */
int td_start(td_daemon *d, const char *const *extra_args);

/* A new blocking connection to the daemon's socket (no Hello sent), or -1. */
int td_connect(const td_daemon *d);

/* Waits up to timeout_ms for the daemon to exit (without signalling it). Returns its exit
 * status (0..255), 128 + the signal number if a signal killed it, or -1 when it is still
 * running after timeout_ms. */
int td_wait(td_daemon *d, int timeout_ms);

/* Sends SIGTERM and waits up to 10 s (then SIGKILL). Returns the exit status as td_wait (-1
 * when it had to be killed), prints the log if that is not 0, removes the directory. Safe to
 * call after td_wait: it then only cleans up and returns the status td_wait saw (and prints the
 * log only with LA_TEST_VERBOSE=1, since the caller checked that status itself). */
int td_stop(td_daemon *d);

#endif /* LA_TESTUTIL_DAEMON_H */
