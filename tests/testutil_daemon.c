/* testutil_daemon.c — start and stop liteattnd for tests (see testutil_daemon.h). */
#include "testutil_daemon.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int last_status = -1; /* status seen by td_wait, for td_stop after td_wait */

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void print_log(const td_daemon *d)
{
    FILE *f = fopen(d->log, "r");
    if (!f)
        return;
    fprintf(stderr, "---- liteattnd log (%s) ----\n", d->log);
    char line[1024];
    while (fgets(line, sizeof(line), f))
        fputs(line, stderr);
    fprintf(stderr, "---- end of log ----\n");
    fclose(f);
}

static void remove_dir(td_daemon *d)
{
    if (!d->dir[0])
        return;
    char p[256];
    const char *names[] = {"liteattn.sock", "liteattn.sock.lock", "liteattnd.log",
                           "liteattnd.conf"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        snprintf(p, sizeof(p), "%s/%s", d->dir, names[i]);
        unlink(p);
    }
    rmdir(d->dir);
    d->dir[0] = 0;
}

int td_connect(const td_daemon *d)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", d->socket);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int decode_status(int st)
{
    if (WIFEXITED(st))
        return WEXITSTATUS(st);
    if (WIFSIGNALED(st))
        return 128 + WTERMSIG(st);
    return -1;
}

int td_wait(td_daemon *d, int timeout_ms)
{
    if (d->pid <= 0)
        return last_status;
    long long end = now_ms() + timeout_ms;
    for (;;) {
        int st;
        pid_t r = waitpid(d->pid, &st, WNOHANG);
        if (r == d->pid) {
            d->pid = 0;
            last_status = decode_status(st);
            return last_status;
        }
        if (r < 0 && errno != EINTR) {
            d->pid = 0;
            return last_status = -1;
        }
        if (now_ms() >= end)
            return -1;
        usleep(5000);
    }
}

int td_start(td_daemon *d, const char *const *extra_args)
{
    memset(d, 0, sizeof(*d));
    last_status = -1;
    const char *tmp = getenv("TMPDIR");
    snprintf(d->dir, sizeof(d->dir), "%s/la-test.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(d->dir)) {
        fprintf(stderr, "td_start: mkdtemp %s: %s\n", d->dir, strerror(errno));
        d->dir[0] = 0;
        return -1;
    }
    chmod(d->dir, 0755);
    snprintf(d->socket, sizeof(d->socket), "%s/liteattn.sock", d->dir);
    snprintf(d->log, sizeof(d->log), "%s/liteattnd.log", d->dir);
    char conf[128];
    snprintf(conf, sizeof(conf), "%s/liteattnd.conf", d->dir);
    int cf = open(conf, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (cf >= 0)
        close(cf);

    const char *build = getenv("BUILD");
    char exe[256];
    snprintf(exe, sizeof(exe), "%s/liteattnd", build && *build ? build : "build");
    if (access(exe, X_OK) != 0) {
        fprintf(stderr, "td_start: %s is not there (run make first)\n", exe);
        remove_dir(d);
        return -1;
    }

    const char *argv[64];
    int n = 0;
    argv[n++] = exe;
    argv[n++] = "--socket";
    argv[n++] = d->socket;
    argv[n++] = "--config";
    argv[n++] = conf;
    argv[n++] = "--backend";
    argv[n++] = "cpu";
    argv[n++] = "--threads";
    argv[n++] = "2";
    argv[n++] = "--log-level";
    argv[n++] = "debug";
    for (int i = 0; extra_args && extra_args[i] && n < 63; i++)
        argv[n++] = extra_args[i];
    argv[n] = NULL;

    pid_t parent = getpid();
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "td_start: fork: %s\n", strerror(errno));
        remove_dir(d);
        return -1;
    }
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        int lf = open(d->log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (lf >= 0) {
            dup2(lf, STDERR_FILENO);
            close(lf);
        }
        /* Systemd variables of the test's own environment must not reach the daemon. */
        unsetenv("LISTEN_FDS");
        unsetenv("LISTEN_PID");
        unsetenv("NOTIFY_SOCKET");
        unsetenv("WATCHDOG_USEC");
        signal(SIGPIPE, SIG_DFL);
        execv(exe, (char *const *)argv);
        _exit(127);
    }
    d->pid = pid;

    long long end = now_ms() + 10000;
    for (;;) {
        int fd = td_connect(d);
        if (fd >= 0) {
            close(fd);
            return 0;
        }
        int st = td_wait(d, 0);
        if (st >= 0) {
            fprintf(stderr, "td_start: liteattnd exited with status %d before listening\n", st);
            break;
        }
        if (now_ms() >= end) {
            fprintf(stderr, "td_start: liteattnd did not answer on %s within 10 s\n", d->socket);
            kill(d->pid, SIGKILL);
            td_wait(d, 5000);
            break;
        }
        usleep(5000);
    }
    print_log(d);
    remove_dir(d);
    return -1;
}

int td_stop(td_daemon *d)
{
    int st, waited = d->pid <= 0; /* the caller collected (and checked) the status itself */
    if (d->pid > 0) {
        kill(d->pid, SIGTERM);
        st = td_wait(d, 10000);
        if (st < 0 && d->pid > 0) {
            fprintf(stderr, "td_stop: liteattnd did not exit within 10 s of SIGTERM; killing it\n");
            kill(d->pid, SIGKILL);
            td_wait(d, 5000);
            st = -1;
        }
    } else
        st = last_status;
    const char *v = getenv("LA_TEST_VERBOSE");
    if ((st != 0 && !waited) || (v && strcmp(v, "1") == 0)) {
        if (st != 0)
            fprintf(stderr, "td_stop: liteattnd exit status %d\n", st);
        print_log(d);
    }
    remove_dir(d);
    return st;
}
