/* testutil_daemon.c — start and stop liteattnd for tests (see testutil_daemon.h). */
#include "testutil_daemon.h"

#include <check.h>
#include <dirent.h>
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

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

const char *td_exe(void)
{
    static char exe[256];
    const char *build = getenv("BUILD");
    snprintf(exe, sizeof(exe), "%s/liteattnd", build && *build ? build : "build");
    return exe;
}

void td_print_log(const td_daemon *d)
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

/* The directory and everything in it (the daemon's files and what the case added; no
 * subdirectories are made there). */
static void remove_dir(td_daemon *d)
{
    if (!d->dir[0])
        return;
    DIR *dir = opendir(d->dir);
    if (dir) {
        for (struct dirent *e; (e = readdir(dir)) != NULL;)
            if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
                unlinkat(dirfd(dir), e->d_name, 0);
        closedir(dir);
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
        return d->status;
    long long end = now_ms() + timeout_ms;
    for (;;) {
        int st;
        pid_t r = waitpid(d->pid, &st, WNOHANG);
        if (r == d->pid) {
            d->pid = 0;
            return d->status = decode_status(st);
        }
        if (r < 0 && errno != EINTR) {
            d->pid = 0;
            return d->status = -1;
        }
        if (now_ms() >= end)
            return -1;
        usleep(5000);
    }
}

int td_kill(td_daemon *d)
{
    if (d->pid > 0)
        kill(d->pid, SIGKILL);
    return td_wait(d, 5000);
}

int td_dir(td_daemon *d)
{
    memset(d, 0, sizeof(*d));
    d->status = -1;
    const char *tmp = getenv("TMPDIR");
    snprintf(d->dir, sizeof(d->dir), "%s/la-test.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(d->dir)) {
        fprintf(stderr, "td_dir: mkdtemp %s: %s\n", d->dir, strerror(errno));
        d->dir[0] = 0;
        return -1;
    }
    chmod(d->dir, 0755);
    snprintf(d->socket, sizeof(d->socket), "%s/liteattn.sock", d->dir);
    snprintf(d->log, sizeof(d->log), "%s/liteattnd.log", d->dir);
    snprintf(d->conf, sizeof(d->conf), "%s/liteattnd.conf", d->dir);
    int cf = open(d->conf, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (cf >= 0)
        close(cf);
    return 0;
}

/* The daemon's process: stderr to the log, a clean environment, the hook, exec. */
static void exec_daemon(const td_daemon *d, const td_opts *o, pid_t parent)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(127);
    int lf = open(d->log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (lf >= 0) {
        dup2(lf, STDERR_FILENO);
        close(lf);
    }
    /* The test's own service-manager variables must not reach the daemon. */
    const char *env[] = {"LISTEN_FDS",    "LISTEN_PID",   "LISTEN_FDNAMES",  "NOTIFY_SOCKET",
                         "WATCHDOG_USEC", "WATCHDOG_PID", "LITEATTN_SOCKET", "JOURNAL_STREAM"};
    for (size_t i = 0; i < sizeof(env) / sizeof(env[0]); i++)
        unsetenv(env[i]);
    signal(SIGPIPE, SIG_DFL);
    if (o && o->child)
        o->child(d, o->data);

    const char *argv[64];
    int n = 0;
    argv[n++] = td_exe();
    argv[n++] = "--socket";
    argv[n++] = d->socket;
    argv[n++] = "--config";
    argv[n++] = d->conf;
    argv[n++] = "--backend";
    argv[n++] = "cpu";
    argv[n++] = "--threads";
    argv[n++] = "2";
    argv[n++] = "--log-level";
    argv[n++] = "debug";
    for (int i = 0; o && o->args && o->args[i] && n < 63; i++)
        argv[n++] = o->args[i];
    argv[n] = NULL;
    execv(argv[0], (char *const *)argv);
    _exit(127);
}

int td_spawn(td_daemon *d, const td_opts *o)
{
    if (access(td_exe(), X_OK) != 0) {
        fprintf(stderr, "td_spawn: %s is not there (run make first)\n", td_exe());
        return -1;
    }
    d->status = -1;
    pid_t parent = getpid();
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "td_spawn: fork: %s\n", strerror(errno));
        return -1;
    }
    if (pid == 0)
        exec_daemon(d, o, parent);
    d->pid = pid;
    if (o && o->no_wait)
        return 0;

    long long end = now_ms() + 10000;
    for (;;) {
        int fd = td_connect(d);
        if (fd >= 0) {
            close(fd);
            return 0;
        }
        int st = td_wait(d, 0);
        if (st >= 0) {
            fprintf(stderr, "td_spawn: liteattnd exited with status %d before listening\n", st);
            break;
        }
        if (now_ms() >= end) {
            fprintf(stderr, "td_spawn: liteattnd did not answer on %s within 10 s\n", d->socket);
            td_kill(d);
            break;
        }
        usleep(5000);
    }
    td_print_log(d);
    return -1;
}

int td_start(td_daemon *d, const char *const *extra_args)
{
    if (td_dir(d) < 0)
        return -1;
    td_opts o = {.args = extra_args};
    if (td_spawn(d, &o) == 0)
        return 0;
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
            td_kill(d);
            st = -1;
        }
    } else
        st = d->status;
    const char *v = getenv("LA_TEST_VERBOSE");
    if ((st != 0 && !waited) || (v && strcmp(v, "1") == 0)) {
        if (st != 0)
            fprintf(stderr, "td_stop: liteattnd exit status %d\n", st);
        td_print_log(d);
    }
    remove_dir(d);
    return st;
}

/* ---- the Check fixture --------------------------------------------------------------------- */

td_daemon td_fx;

void td_fx_start(const char *const *args)
{
    ck_assert_msg(td_start(&td_fx, args) == 0, "liteattnd did not start (see above)");
}

void td_fx_up(void) { td_fx_start(NULL); }

void td_fx_down(void)
{
    if (td_fx.pid <= 0 && !td_fx.dir[0])
        return; /* the case stopped it and checked the status itself */
    int st = td_stop(&td_fx);
    ck_assert_msg(st == 0, "liteattnd exit status %d at the end of the case (log above)", st);
}
