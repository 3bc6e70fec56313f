/*
 * testutil_proc.h — private to tests/: what a case needs around the processes it forks (the
 * clients of a daemon, users of other uids): memory shared with them, the failures they record
 * for the case to assert on, switching uids, a monotonic clock.
 *
 *     typedef struct shared { tu_failures fail; long calls; } shared;
 *     shared *sh = tu_shared_new(sizeof *sh);
 *     pid_t pid = fork();
 *     if (pid == 0) {                       // a client
 *         TU_CHECK(&sh->fail, rc == 0, "client %d: %s", i, la_err_name(rc));
 *         _exit(0);
 *     }
 *     ... waitpid ...
 *     tu_assert_no_failures(&sh->fail);     // "N failure(s), first: client 3: LA_EIO"
 */
#ifndef LA_TESTUTIL_PROC_H
#define LA_TESTUTIL_PROC_H

#include <check.h>
#include <stddef.h>
#include <sys/types.h>

/* Zeroed memory of size bytes shared with the processes forked after it (MAP_SHARED), or the
 * case fails. */
void *tu_shared_new(size_t size);
void tu_shared_free(void *p, size_t size);

/* Failures recorded by a case's child processes (in tu_shared_new memory): their count and the
 * first one's message. Several processes may record at once. */
typedef struct tu_failures {
    int n;
    char first[256];
} tu_failures;

void tu_fail(tu_failures *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Records a failure with the message when cond is false. */
#define TU_CHECK(f, cond, ...)         \
    do {                               \
        if (!(cond))                   \
            tu_fail((f), __VA_ARGS__); \
    } while (0)
/* Fails the case when anything was recorded. */
#define tu_assert_no_failures(f) \
    ck_assert_msg((f)->n == 0, "%d failure(s), first: %s", (f)->n, (f)->first)

/* 1 when the process is not root and so cannot switch uids: it then prints that the case passes
 * with nothing checked (its cases begin with `if (tu_not_root()) return;`). */
int tu_not_root(void);
/* In a forked child: becomes uid (gid = uid, no supplementary groups) and dies with its
 * parent; _exit(99) when that fails. */
void tu_become(uid_t uid);
/* Forks a child that becomes uid (tu_become) and runs fn(data) (fn returning exits 0); returns
 * its pid. */
pid_t tu_fork_as(uid_t uid, void (*fn)(void *), void *data);
/* Waits for the child pid; its exit status, or 128 + the signal that ended it. */
int tu_wait_child(pid_t pid);
/* tu_fork_as, then tu_wait_child. */
int tu_run_as(uid_t uid, void (*fn)(void *), void *data);

/* Seconds on the monotonic clock. */
double tu_now_s(void);
/* $name as an integer, or dflt when unset or empty. */
int tu_env_int(const char *name, int dflt);

#endif /* LA_TESTUTIL_PROC_H */
