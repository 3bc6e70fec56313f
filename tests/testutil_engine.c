/* testutil_engine.c — the engine driven in-process (see testutil_engine.h). */
#include "testutil_engine.h"

#include <check.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "testutil_proc.h"

static void notify_pipe(void *data)
{
    harness *h = data;
    char c = 1;
    ssize_t n = write(h->pipe[1], &c, 1);
    (void)n;
}

void h_open_cfg(harness *h, eng_config *cfg)
{
    memset(h, 0, sizeof *h);
    ck_assert_int_eq(pipe2(h->pipe, O_NONBLOCK | O_CLOEXEC), 0);
    cfg->notify = notify_pipe;
    cfg->notify_data = h;
    eng_error err = {{0}};
    int rc = eng_new(cfg, &h->e, &err);
    ck_assert_msg(rc == 0, "eng_new(%s): %d %s", cfg->backend, rc, err.msg);
}

void h_open(harness *h, const eng_limits *lim, uint64_t slice)
{
    eng_config cfg;
    eng_config_default(&cfg);
    cfg.backend = "cpu";
    cfg.cpu_threads = 2;
    cfg.cpu_slice_macs = slice;
    if (lim)
        cfg.limits = *lim;
    h_open_cfg(h, &cfg);
}

void h_close(harness *h)
{
    eng_free(h->e);
    close(h->pipe[0]);
    close(h->pipe[1]);
}

int h_pump(harness *h, int n, int ms)
{
    int target = h->done_calls + n;
    double end = tu_now_s() + ms / 1000.0;
    while (h->done_calls < target && tu_now_s() < end) {
        struct pollfd pfd = {.fd = h->pipe[0], .events = POLLIN};
        poll(&pfd, 1, 5);
        char buf[64];
        while (read(h->pipe[0], buf, sizeof buf) > 0) {
        }
        eng_process_completions(h->e);
    }
    return h->done_calls >= target;
}

void h_wait(harness *h, int n)
{
    int target = h->done_calls + n;
    h_pump(h, n, 20000);
    ck_assert_int_eq(h->done_calls, target);
}

void h_done(void *user, int status, const eng_attn_result *res, const char *msg)
{
    (void)msg;
    call *c = user;
    c->ran++;
    c->status = status;
    if (res)
        c->res = *res;
    c->t_done = tu_now_s();
    c->h->done_calls++;
}

int h_submit(harness *h, uint32_t uid, uint64_t conn, const eng_attn_req *r, call *c,
             eng_error *err)
{
    memset(c, 0, sizeof *c);
    c->h = h;
    return eng_attn_submit(h->e, uid, conn, r, h_done, c, err);
}

int shm_make(harness *h, uint32_t uid, uint64_t conn, size_t size, shm *s)
{
    s->size = size;
    s->fd = memfd_create("liteattn-test", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    ck_assert_int_ge(s->fd, 0);
    ck_assert_int_eq(ftruncate(s->fd, (off_t)size), 0);
    s->p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd, 0);
    ck_assert_ptr_ne(s->p, MAP_FAILED);
    eng_error err = {{0}};
    return eng_buffer_add_shm(h->e, uid, conn, dup(s->fd), size, &s->id, &err);
}

void shm_drop(shm *s)
{
    munmap(s->p, s->size);
    close(s->fd);
}
