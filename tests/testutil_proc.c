/* testutil_proc.c — child processes of a case (see testutil_proc.h). */
#include "testutil_proc.h"

#include <errno.h>
#include <grp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

void *tu_shared_new(size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    ck_assert_msg(p != MAP_FAILED, "mmap of %zu shared bytes: %s", size, strerror(errno));
    memset(p, 0, size);
    return p;
}

void tu_shared_free(void *p, size_t size)
{
    if (p)
        munmap(p, size);
}

void tu_fail(tu_failures *f, const char *fmt, ...)
{
    if (__sync_fetch_and_add(&f->n, 1) != 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f->first, sizeof(f->first), fmt, ap);
    va_end(ap);
}

int tu_not_root(void)
{
    if (geteuid() == 0)
        return 0;
    printf("%s: not root (euid %d): the case switches uids; passing with nothing checked\n",
           program_invocation_short_name, (int)geteuid());
    return 1;
}

void tu_become(uid_t uid)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (setgroups(0, NULL) < 0 || setgid(uid) < 0 || setuid(uid) < 0)
        _exit(99);
}

pid_t tu_fork_as(uid_t uid, void (*fn)(void *), void *data)
{
    fflush(stdout);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        tu_become(uid);
        fn(data);
        _exit(0);
    }
    return pid;
}

int tu_wait_child(pid_t pid)
{
    int st;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

int tu_run_as(uid_t uid, void (*fn)(void *), void *data)
{
    return tu_wait_child(tu_fork_as(uid, fn, data));
}

double tu_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int tu_env_int(const char *name, int dflt)
{
    const char *e = getenv(name);
    return e && *e ? atoi(e) : dflt;
}
