/*
 * check_vmm.c — BUFFER_VMM (cuMemCreate allocations passed by POSIX fd) and buffer access
 * without a GPU: the protocol and every error path a client can reach through the CPU backend,
 * which refuses GPU memory (it computes on host memory; copying device memory for every call
 * would turn a GPU session into a slow CPU one). What is checked before the driver sees a
 * request (sizes, offsets, access, device UUID, the kind of fd, appends) is checked here; the
 * import itself is tests/check_gpu_daemon.c's. After every bad input the connection's fds are
 * all closed and the daemon still answers a Ping. Also: the MPS facts of the Hello reply and
 * `liteattnctl status`.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "liteattn.h"
#include "liteattn.pb-c.h"
#include "rawproto.h"
#include "runner.h"
#include "testutil_daemon.h"

static td_daemon d;

static void daemon_up(void) { ck_assert_int_eq(td_start(&d, NULL), 0); }
static void daemon_down(void) { ck_assert_int_eq(td_stop(&d), 0); }

/* The daemon's count of connections, from a Stats request on s (-1 if absent). */
static int64_t n_connections(int s)
{
    Liteattn__Stats st = LITEATTN__STATS__INIT;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 5;
    q.body_case = LITEATTN__REQUEST__BODY_STATS;
    q.stats = &st;
    Liteattn__Reply *r = raw_call(s, &q);
    int64_t n = -1;
    if (r && r->body_case == LITEATTN__REPLY__BODY_STATS)
        for (size_t i = 0; i < r->stats->n_stats; i++)
            if (!strcmp(r->stats->stats[i]->name, "server.connections"))
                n = r->stats->stats[i]->value;
    if (r)
        liteattn__reply__free_unpacked(r, NULL);
    return n;
}

/* A raw connection, once the daemon holds no other (the connection td_start probed with may
 * still be open for a moment; its fd would count in the callers' fd baselines). */
static int connect_raw(void)
{
    int s = raw_connect(d.socket);
    ck_assert_msg(s >= 0, "connect to %s: %s", d.socket, strerror(errno));
    for (int i = 0; i < 200 && n_connections(s) > 1; i++)
        usleep(10000);
    return s;
}

/* The daemon's open fds settle at want (it closes what a failed request brought). */
static void fds_settle(int want)
{
    int n = -1;
    for (int i = 0; i < 200 && (n = proc_fd_count(d.pid)) != want; i++)
        usleep(10000);
    ck_assert_int_eq(n, want);
}

/* The daemon's open fds once they hold still for 100 ms: a count read right after a connect may
 * still include an fd the daemon is about to close (seen under load). */
static int fds_steady(void)
{
    int n = proc_fd_count(d.pid);
    for (int i = 0; i < 50; i++) {
        usleep(100000);
        int m = proc_fd_count(d.pid);
        if (m == n)
            break;
        n = m;
    }
    return n;
}

/* A first VMM frame. */
typedef struct vmm_req {
    Liteattn__BufferRegister br;
    Liteattn__Request req;
    uint64_t sizes[4];
} vmm_req;

static void vmm_init(vmm_req *v, uint64_t size, size_t n_allocs, uint64_t alloc_size)
{
    liteattn__buffer_register__init(&v->br);
    v->br.kind = LITEATTN__BUFFER_KIND__BUFFER_VMM;
    v->br.size = size;
    v->br.device_uuid = "GPU-00000000-1111-2222-3333-444444444444";
    for (size_t i = 0; i < 4; i++)
        v->sizes[i] = alloc_size;
    v->br.n_vmm_alloc_sizes = n_allocs;
    v->br.vmm_alloc_sizes = v->sizes;
    liteattn__request__init(&v->req);
    v->req.id = 7;
    v->req.body_case = LITEATTN__REQUEST__BODY_BUFFER_REGISTER;
    v->req.buffer_register = &v->br;
}

/* Sends req with fd, expects error code want whose message contains needle. */
static void expect_err(int sock, Liteattn__Request *req, int fd, int want, const char *needle)
{
    Liteattn__Reply *r = raw_call_fd(sock, req, fd);
    ck_assert_ptr_nonnull(r);
    int code = raw_code(r);
    const char *msg = r->body_case == LITEATTN__REPLY__BODY_ERROR && r->error->message
                          ? r->error->message
                          : "";
    ck_assert_msg(code == want, "code %d (%s), want %d; message: %s", code, la_err_name(code),
                  want, msg);
    ck_assert_msg(!needle || strstr(msg, needle), "message \"%s\" lacks \"%s\"", msg, needle);
    liteattn__reply__free_unpacked(r, NULL);
}

static int dev_null(void)
{
    int fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    ck_assert_int_ge(fd, 0);
    return fd;
}

/* The CPU backend refuses VMM buffers, after the request itself was found sound. */
START_TEST(test_cpu_backend_refuses_vmm)
{
    int s = connect_raw(), base = fds_steady();
    vmm_req v;
    vmm_init(&v, 2u << 20, 1, 2u << 20);
    int fd = dev_null();
    expect_err(s, &v.req, fd, LA_ENODEV, "no cuda backend");
    close(fd);
    /* Several allocations, an offset: still refused for the same reason. */
    vmm_init(&v, 3u << 20, 3, 2u << 20);
    v.br.has_vmm_offset = 1;
    v.br.vmm_offset = 1u << 20;
    fd = dev_null();
    expect_err(s, &v.req, fd, LA_ENODEV, "host memory only");
    close(fd);
    fds_settle(base);
    ck_assert_int_eq(raw_ping(s), 0);
    close(s);
}
END_TEST

/* Sizes, offsets, access and device are checked before anything else. */
START_TEST(test_bad_requests)
{
    int s = connect_raw(), base = fds_steady();
    vmm_req v;
    struct {
        const char *what;
        uint64_t size;
        size_t n;
        uint64_t alloc, offset;
        int access; /* -1: absent */
        const char *uuid;
        int want;
        const char *needle;
    } cases[] = {
        {"no allocations", 4096, 0, 2u << 20, 0, -1, NULL, LA_EINVAL, "0 allocations"},
        {"an empty allocation", 4096, 1, 0, 0, -1, NULL, LA_EINVAL, "has size 0"},
        {"size 0", 0, 1, 2u << 20, 0, -1, NULL, LA_EINVAL, "buffer size 0"},
        {"past the end", 4u << 20, 1, 2u << 20, 0, -1, NULL, LA_ERANGE, "outside"},
        {"offset past the end", 4096, 2, 2u << 20, 4u << 20, -1, NULL, LA_ERANGE, "outside"},
        {"offset + size overflow", 4096, 1, 2u << 20, UINT64_MAX - 100, -1, NULL, LA_ERANGE,
         "outside"},
        {"sizes overflow", 4096, 2, UINT64_MAX / 2 + 1, 0, -1, NULL, LA_EINVAL, "2^63"},
        {"access 0", 4096, 1, 2u << 20, 0, 0, NULL, LA_EINVAL, "access 0"},
        {"access 4", 4096, 1, 2u << 20, 0, 4, NULL, LA_EINVAL, "access 4"},
        {"no device", 4096, 1, 2u << 20, 0, -1, "", LA_EINVAL, "device UUID of 0 bytes"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        vmm_init(&v, cases[i].size, cases[i].n, cases[i].alloc);
        if (cases[i].offset) {
            v.br.has_vmm_offset = 1;
            v.br.vmm_offset = cases[i].offset;
        }
        if (cases[i].access >= 0) {
            v.br.has_access = 1;
            v.br.access = (uint32_t)cases[i].access;
        }
        if (cases[i].uuid)
            v.br.device_uuid = (char *)cases[i].uuid;
        int fd = dev_null();
        expect_err(s, &v.req, fd, cases[i].want, cases[i].needle);
        close(fd);
        ck_assert_msg(raw_ping(s) == 0, "%s: the connection went away", cases[i].what);
    }
    /* More allocations than LA_MAX_VMM_ALLOCS. */
    uint64_t *many = calloc(LA_MAX_VMM_ALLOCS + 1, sizeof *many);
    for (int i = 0; i <= LA_MAX_VMM_ALLOCS; i++)
        many[i] = 2u << 20;
    vmm_init(&v, 4096, 1, 2u << 20);
    v.br.n_vmm_alloc_sizes = LA_MAX_VMM_ALLOCS + 1;
    v.br.vmm_alloc_sizes = many;
    int fd = dev_null();
    expect_err(s, &v.req, fd, LA_EINVAL, "must be 1..1024");
    close(fd);
    free(many);
    fds_settle(base);
    ck_assert_int_eq(raw_ping(s), 0);
    close(s);
}
END_TEST

/* fds that cannot be an exported CUDA allocation are named and refused. */
START_TEST(test_garbage_fds)
{
    int s = connect_raw(), base = fds_steady();
    vmm_req v;
    vmm_init(&v, 4096, 1, 2u << 20);
    int p[2];
    ck_assert_int_eq(pipe(p), 0);
    expect_err(s, &v.req, p[0], LA_EINVAL, "is a pipe");
    close(p[0]);
    close(p[1]);
    int sp[2];
    ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sp), 0);
    expect_err(s, &v.req, sp[0], LA_EINVAL, "is a socket");
    close(sp[0]);
    close(sp[1]);
    int m = raw_memfd(2u << 20);
    ck_assert_int_ge(m, 0);
    expect_err(s, &v.req, m, LA_EINVAL, "shared memory");
    close(m);
    int dir = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    ck_assert_int_ge(dir, 0);
    expect_err(s, &v.req, dir, LA_EINVAL, "is a directory");
    close(dir);
    fds_settle(base);
    ck_assert_int_eq(raw_ping(s), 0);
    close(s);
}
END_TEST

/* A VMM frame without its fd: an error that says so, then the connection closes (its fds can
 * no longer be matched to frames); the daemon serves everyone else. */
START_TEST(test_missing_fd)
{
    int s = connect_raw();
    vmm_req v;
    vmm_init(&v, 4096, 1, 2u << 20);
    Liteattn__Reply *r = raw_call(s, &v.req);
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(raw_code(r), LA_EPROTO);
    ck_assert_ptr_nonnull(strstr(r->error->message, "without a file descriptor"));
    liteattn__reply__free_unpacked(r, NULL);
    ck_assert_int_eq(raw_eof(s, 2000), 1);
    close(s);
    /* The same for an append. */
    s = connect_raw();
    Liteattn__BufferRegister ap = LITEATTN__BUFFER_REGISTER__INIT;
    ap.kind = LITEATTN__BUFFER_KIND__BUFFER_VMM;
    ap.size = 2u << 20;
    ap.has_vmm_append = 1;
    ap.vmm_append = 1;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 8;
    q.body_case = LITEATTN__REQUEST__BODY_BUFFER_REGISTER;
    q.buffer_register = &ap;
    ck_assert_int_eq(raw_rc(s, &q), LA_EPROTO);
    ck_assert_int_eq(raw_eof(s, 2000), 1);
    close(s);
    s = connect_raw();
    ck_assert_int_eq(raw_ping(s), 0);
    close(s);
}
END_TEST

/* Appends: to nothing, to a buffer that is not VMM (which removes it), with first-frame fields. */
START_TEST(test_bad_appends)
{
    int s = connect_raw(), base = fds_steady();
    Liteattn__BufferRegister ap = LITEATTN__BUFFER_REGISTER__INIT;
    ap.kind = LITEATTN__BUFFER_KIND__BUFFER_VMM;
    ap.size = 2u << 20;
    ap.has_vmm_append = 1;
    ap.vmm_append = 999;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 9;
    q.body_case = LITEATTN__REQUEST__BODY_BUFFER_REGISTER;
    q.buffer_register = &ap;
    int fd = dev_null();
    expect_err(s, &q, fd, LA_ENOENT, "no buffer 999");
    close(fd);

    int mfd = raw_memfd(4096);
    int64_t shm = raw_register(s, mfd, 4096);
    close(mfd);
    ck_assert_int_gt(shm, 0);
    ap.vmm_append = (uint64_t)shm;
    uint64_t sizes[1] = {2u << 20};
    ap.n_vmm_alloc_sizes = 1;
    ap.vmm_alloc_sizes = sizes;
    fd = dev_null();
    expect_err(s, &q, fd, LA_EINVAL, "carries only the allocation's size and fd");
    close(fd);
    ap.n_vmm_alloc_sizes = 0;
    ap.vmm_alloc_sizes = NULL;
    fd = dev_null();
    expect_err(s, &q, fd, LA_EINVAL, "is not a VMM buffer");
    close(fd);
    /* The failed append removed the buffer. */
    fd = dev_null();
    expect_err(s, &q, fd, LA_ENOENT, NULL);
    close(fd);
    fds_settle(base);
    ck_assert_int_eq(raw_ping(s), 0);
    close(s);
}
END_TEST

/* Buffer access on a host buffer: a read-only buffer cannot hold O, a write-only one not Q. */
START_TEST(test_access)
{
    int s = connect_raw();
    const int64_t S = 64, H = 2;
    const uint64_t tb = (uint64_t)(S * H * 64 * 4);
    int64_t sess = raw_session_open(s, "access", 1, (uint32_t)H, (uint32_t)S);
    ck_assert_int_gt(sess, 0);
    int64_t ids[3];
    unsigned access[3] = {LA_ACCESS_READ, LA_ACCESS_WRITE, LA_ACCESS_RW};
    for (int i = 0; i < 3; i++) {
        int mfd = raw_memfd(4 * tb);
        Liteattn__BufferRegister br = LITEATTN__BUFFER_REGISTER__INIT;
        br.kind = LITEATTN__BUFFER_KIND__BUFFER_SHM;
        br.size = 4 * tb;
        br.has_access = 1;
        br.access = access[i];
        Liteattn__Request q = LITEATTN__REQUEST__INIT;
        q.id = 10;
        q.body_case = LITEATTN__REQUEST__BODY_BUFFER_REGISTER;
        q.buffer_register = &br;
        Liteattn__Reply *r = raw_call_fd(s, &q, mfd);
        close(mfd);
        ck_assert_int_eq(raw_code(r), 0);
        ck_assert_int_eq(r->buffer->has_access, 1);
        ck_assert_uint_eq(r->buffer->access, access[i]);
        ids[i] = (int64_t)r->buffer->buffer_id;
        liteattn__reply__free_unpacked(r, NULL);
    }
    raw_attn x;
    raw_attn_init(&x, (uint64_t)sess, (uint64_t)ids[0], S, H); /* all in the read-only one */
    Liteattn__Reply *r = raw_call(s, &x.req);
    ck_assert_int_eq(raw_code(r), LA_EPERM);
    ck_assert_ptr_nonnull(strstr(r->error->message, "read-only"));
    ck_assert_ptr_nonnull(strstr(r->error->message, "o is in buffer"));
    liteattn__reply__free_unpacked(r, NULL);
    raw_attn_init(&x, (uint64_t)sess, (uint64_t)ids[1], S, H); /* all in the write-only one */
    r = raw_call(s, &x.req);
    ck_assert_int_eq(raw_code(r), LA_EPERM);
    ck_assert_ptr_nonnull(strstr(r->error->message, "q is in buffer"));
    liteattn__reply__free_unpacked(r, NULL);
    /* Inputs from the read-only buffer, O into the write-only one: allowed. */
    raw_attn_init(&x, (uint64_t)sess, (uint64_t)ids[0], S, H);
    x.t[3].buffer_id = (uint64_t)ids[1];
    ck_assert_int_eq(raw_rc(s, &x.req), 0);
    raw_attn_init(&x, (uint64_t)sess, (uint64_t)ids[2], S, H);
    ck_assert_int_eq(raw_rc(s, &x.req), 0);
    /* A bad access value closes the fd it came with and keeps the connection. */
    int base = fds_steady();
    int mfd = raw_memfd(4096);
    Liteattn__BufferRegister br = LITEATTN__BUFFER_REGISTER__INIT;
    br.kind = LITEATTN__BUFFER_KIND__BUFFER_SHM;
    br.size = 4096;
    br.has_access = 1;
    br.access = 7;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 11;
    q.body_case = LITEATTN__REQUEST__BODY_BUFFER_REGISTER;
    q.buffer_register = &br;
    expect_err(s, &q, mfd, LA_EINVAL, "access 7");
    close(mfd);
    fds_settle(base);
    ck_assert_int_eq(raw_ping(s), 0);
    close(s);
}
END_TEST

/* The library's side: argument checks, and the CPU daemon's refusal with its message. */
START_TEST(test_library)
{
    la_client *c;
    ck_assert_int_eq(la_connect(d.socket, "check_vmm", &c), 0);
    la_buffer *b = NULL;
    int fd = dev_null();
    uint64_t sz = 2u << 20;
    const char *uuid = "GPU-00000000-1111-2222-3333-444444444444";
    /* The CPU daemon announces no such GPU: refused before sending. */
    ck_assert_int_eq(la_buffer_register_vmm_fd(c, &fd, &sz, 1, 0, sz, uuid, LA_ACCESS_RW, &b),
                     LA_ENODEV);
    ck_assert_ptr_nonnull(strstr(la_last_error_message(), "has no GPU"));
    ck_assert_int_eq(la_buffer_register_vmm_fd(c, &fd, &sz, 1, 0, sz, "nope", LA_ACCESS_RW, &b),
                     LA_EINVAL);
    ck_assert_int_eq(la_buffer_register_vmm_fd(c, &fd, &sz, 0, 0, sz, uuid, LA_ACCESS_RW, &b),
                     LA_EINVAL);
    ck_assert_int_eq(la_buffer_register_vmm_fd(c, &fd, &sz, 1, 4096, sz, uuid, LA_ACCESS_RW, &b),
                     LA_ERANGE);
    ck_assert_int_eq(la_buffer_register_vmm_fd(c, &fd, &sz, 1, 0, sz, uuid, 0, &b), LA_EINVAL);
    int bad = -1;
    ck_assert_int_eq(la_buffer_register_vmm_fd(c, &bad, &sz, 1, 0, sz, uuid, LA_ACCESS_RW, &b),
                     LA_EINVAL);
    ck_assert_int_eq(la_buffer_register_vmm_fd(c, NULL, &sz, 1, 0, sz, uuid, LA_ACCESS_RW, &b),
                     LA_EINVAL);
    ck_assert_ptr_null(b);
    close(fd);
    int x = 0;
    uint64_t off;
    ck_assert_int_eq(la_buffer_register_cuda_range(c, NULL, 16, LA_ACCESS_RW, &b, &off),
                     LA_EINVAL);
    ck_assert_int_eq(la_buffer_register_cuda_range(c, &x, 0, LA_ACCESS_RW, &b, &off), LA_EINVAL);
    ck_assert_int_eq(la_buffer_register_cuda_range(c, &x, 4, 9, &b, &off), LA_EINVAL);
    ck_assert_int_eq(la_buffer_cuda_valid(NULL), LA_EINVAL);
    la_buffer *h;
    ck_assert_int_eq(la_buffer_new_host(c, 4096, &h), 0);
    ck_assert_int_eq(la_buffer_cuda_valid(h), LA_ENOTSUP);
    ck_assert_int_eq(la_buffer_unregister(h), 0);
    la_disconnect(c);
}
END_TEST

/* The Hello reply's MPS facts: the pipe directory the daemon's driver uses and whether a
 * control socket is there; no GPU, so no device says on or off. */
START_TEST(test_mps_facts)
{
    char dir[] = "/tmp/la-mps-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    setenv("CUDA_MPS_PIPE_DIRECTORY", dir, 1);
    td_daemon dd;
    ck_assert_int_eq(td_start(&dd, NULL), 0);
    la_client *c;
    ck_assert_int_eq(la_connect(dd.socket, "check_vmm", &c), 0);
    ck_assert_str_eq(la_client_property(c, "mps.pipe_directory"), dir);
    ck_assert_str_eq(la_client_property(c, "mps.control"), "no");
    ck_assert_str_eq(la_client_property(c, "mps"), "cpu unknown 0");
    la_disconnect(c);
    /* A control socket appears (what nvidia-cuda-mps-control -d creates). */
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s/control", dir);
    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    ck_assert_int_eq(bind(ls, (struct sockaddr *)&a, sizeof a), 0);
    ck_assert_int_eq(la_connect(dd.socket, "check_vmm", &c), 0);
    ck_assert_str_eq(la_client_property(c, "mps.control"), "yes");
    la_disconnect(c);
    /* liteattnctl says so. */
    const char *b = getenv("BUILD");
    char cmd[512];
    snprintf(cmd, sizeof cmd, "%s/liteattnctl --socket %s status", b && *b ? b : "build",
             dd.socket);
    FILE *f = popen(cmd, "r");
    ck_assert_ptr_nonnull(f);
    char line[512];
    int seen = 0;
    while (fgets(line, sizeof line, f))
        seen |= !strncmp(line, "mps ", 4) && strstr(line, "no GPU backend");
    ck_assert_int_eq(pclose(f), 0);
    ck_assert_msg(seen, "liteattnctl status printed no mps line");
    snprintf(cmd, sizeof cmd, "%s/liteattnctl --socket %s --json status", b && *b ? b : "build",
             dd.socket);
    f = popen(cmd, "r");
    ck_assert_ptr_nonnull(f);
    char out[4096] = "";
    size_t n = fread(out, 1, sizeof out - 1, f);
    out[n] = 0;
    ck_assert_int_eq(pclose(f), 0);
    ck_assert_msg(strstr(out, "\"mps\": {\"pipe_directory\": \"") && strstr(out, "\"control\": true"),
                  "JSON status: %s", out);
    ck_assert_int_eq(td_stop(&dd), 0);
    close(ls);
    unlink(a.sun_path);
    rmdir(dir);
    unsetenv("CUDA_MPS_PIPE_DIRECTORY");
}
END_TEST

int main(void)
{
    Suite *s = suite_create("vmm");
    TCase *tc = tcase_create("protocol");
    tcase_set_timeout(tc, 30);
    tcase_add_checked_fixture(tc, daemon_up, daemon_down);
    tcase_add_test(tc, test_cpu_backend_refuses_vmm);
    tcase_add_test(tc, test_bad_requests);
    tcase_add_test(tc, test_garbage_fds);
    tcase_add_test(tc, test_missing_fd);
    tcase_add_test(tc, test_bad_appends);
    tcase_add_test(tc, test_access);
    tcase_add_test(tc, test_library);
    suite_add_tcase(s, tc);
    tc = tcase_create("mps");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_mps_facts);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
