/* rawproto.c — the one raw-protocol client of tests/ (see rawproto.h). */
#include "rawproto.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "frame.h"

int raw_socket(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

int raw_send_bytes(int sock, const void *buf, size_t len, int fd)
{
    const uint8_t *b = buf;
    size_t off = 0;
    while (off < len) {
        ssize_t n = frame_send(sock, b + off, len - off, off == 0 ? fd : -1);
        if (n == LA_EAGAIN) {
            struct pollfd p = {.fd = sock, .events = POLLOUT};
            poll(&p, 1, 1000);
            continue;
        }
        if (n <= 0)
            return -1;
        off += (size_t)n;
    }
    return 0;
}

int raw_pack(const Liteattn__Request *req, uint8_t **ret_buf, size_t *ret_len)
{
    return frame_pack(&req->base, RAW_MAX_FRAME, ret_buf, ret_len) < 0 ? -1 : 0;
}

int raw_send(int sock, const Liteattn__Request *req, int fd)
{
    uint8_t *buf;
    size_t len;
    if (raw_pack(req, &buf, &len) < 0)
        return -1;
    int rc = raw_send_bytes(sock, buf, len, fd);
    free(buf);
    return rc;
}

int raw_read_all(int sock, void *p, size_t n, int timeout_ms)
{
    size_t got = 0;
    while (got < n) {
        struct pollfd pf = {.fd = sock, .events = POLLIN};
        int pr = poll(&pf, 1, timeout_ms);
        if (pr <= 0)
            return -1;
        ssize_t r = recv(sock, (char *)p + got, n - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    return 0;
}

int raw_recv_status(int sock, int timeout_ms, Liteattn__Reply **ret_reply)
{
    uint8_t h[4];
    *ret_reply = NULL;
    if (raw_read_all(sock, h, 4, timeout_ms) < 0)
        return 0;
    uint32_t n = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 24;
    if (n > FRAME_DEFAULT_MAX)
        return -1; /* the daemon never sends more than the default limit */
    uint8_t *b = malloc(n ? n : 1);
    if (!b)
        return 0;
    if (raw_read_all(sock, b, n, timeout_ms) < 0) {
        free(b);
        return 0;
    }
    *ret_reply = liteattn__reply__unpack(NULL, n, b);
    free(b);
    return *ret_reply ? 1 : -1;
}

Liteattn__Reply *raw_recv(int sock, int timeout_ms)
{
    Liteattn__Reply *r;
    raw_recv_status(sock, timeout_ms, &r);
    return r;
}

int raw_eof(int sock, int timeout_ms)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &t1);
        int left = timeout_ms -
                   (int)((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000);
        struct pollfd p = {.fd = sock, .events = POLLIN};
        if (left <= 0 || poll(&p, 1, left) <= 0)
            return 0;
        char drop[4096];
        ssize_t n = recv(sock, drop, sizeof(drop), MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
            return 1;
    }
}

Liteattn__Reply *raw_call_fd(int sock, Liteattn__Request *req, int fd)
{
    if (raw_send(sock, req, fd) < 0)
        return NULL;
    return raw_recv(sock, 20000);
}

Liteattn__Reply *raw_call(int sock, Liteattn__Request *req) { return raw_call_fd(sock, req, -1); }

int raw_code(const Liteattn__Reply *r)
{
    if (!r)
        return LA_ECLOSED;
    return r->body_case == LITEATTN__REPLY__BODY_ERROR ? r->error->code : 0;
}

/* Sends req, reads its reply, returns raw_code and frees the reply. */
int raw_rc(int sock, Liteattn__Request *req)
{
    Liteattn__Reply *r = raw_call(sock, req);
    int code = raw_code(r);
    if (r)
        liteattn__reply__free_unpacked(r, NULL);
    return code;
}

/* Connects and says Hello. Returns the socket, or -1 (also when the daemon refused). */
int raw_connect(const char *path)
{
    int fd = raw_socket(path);
    if (fd < 0)
        return -1;
    Liteattn__Hello h = LITEATTN__HELLO__INIT;
    h.major = LA_PROTOCOL_MAJOR;
    h.minor = LA_PROTOCOL_MINOR;
    h.client_name = (char *)"rawproto";
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 1;
    q.body_case = LITEATTN__REQUEST__BODY_HELLO;
    q.hello = &h;
    if (raw_rc(fd, &q) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* A sealed-ready memfd of size bytes (caller closes), or -1. */
int raw_memfd(size_t size)
{
    int fd = memfd_create("raw", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -1;
    if (ftruncate(fd, (off_t)size) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Registers fd as a shared-memory buffer claiming size bytes. Returns the buffer id (> 0) or
 * the error code (< 0). */
int64_t raw_register(int sock, int fd, uint64_t size)
{
    Liteattn__BufferRegister br = LITEATTN__BUFFER_REGISTER__INIT;
    br.kind = LITEATTN__BUFFER_KIND__BUFFER_SHM;
    br.size = size;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 2;
    q.body_case = LITEATTN__REQUEST__BODY_BUFFER_REGISTER;
    q.buffer_register = &br;
    Liteattn__Reply *r = raw_call_fd(sock, &q, fd);
    int64_t ret = raw_code(r);
    if (r && r->body_case == LITEATTN__REPLY__BODY_BUFFER)
        ret = (int64_t)r->buffer->buffer_id;
    if (r)
        liteattn__reply__free_unpacked(r, NULL);
    return ret;
}

/* Opens a session (f32, H heads, D 64, max seq S). Returns its id (> 0) or the error code. */
int64_t raw_session_open(int sock, const char *key, uint32_t layers, uint32_t heads, uint32_t seq)
{
    Liteattn__SessionOpen so = LITEATTN__SESSION_OPEN__INIT;
    so.key = (char *)key;
    so.layers = layers;
    so.heads = heads;
    so.head_dim = 64;
    so.dtype = LITEATTN__DTYPE__DTYPE_F32;
    so.max_seq_q = seq;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 3;
    q.body_case = LITEATTN__REQUEST__BODY_SESSION_OPEN;
    q.session_open = &so;
    Liteattn__Reply *r = raw_call(sock, &q);
    int64_t ret = raw_code(r);
    if (r && r->body_case == LITEATTN__REPLY__BODY_SESSION)
        ret = (int64_t)r->session->session_id;
    if (r)
        liteattn__reply__free_unpacked(r, NULL);
    return ret;
}

void raw_attn_init(raw_attn *x, uint64_t session, uint64_t buf, int64_t S, int64_t H)
{
    liteattn__attention__init(&x->a);
    x->shape[0] = 1, x->shape[1] = S, x->shape[2] = H, x->shape[3] = 64;
    Liteattn__TensorRef **slots[4] = {&x->a.q, &x->a.k, &x->a.v, &x->a.o};
    for (int i = 0; i < 4; i++) {
        liteattn__tensor_ref__init(&x->t[i]);
        x->t[i].buffer_id = buf;
        x->t[i].has_offset = 1;
        x->t[i].offset = (uint64_t)i * (uint64_t)(S * H * 64 * 4);
        x->t[i].has_dtype = 1;
        x->t[i].dtype = LITEATTN__DTYPE__DTYPE_F32;
        x->t[i].n_shape = 4;
        x->t[i].shape = x->shape;
        *slots[i] = &x->t[i];
    }
    x->a.session_id = session;
    liteattn__request__init(&x->req);
    x->req.id = 100;
    x->req.body_case = LITEATTN__REQUEST__BODY_ATTENTION;
    x->req.attention = &x->a;
}

/* Small requests by body. */
int raw_session_ref(int sock, int which, uint64_t session)
{
    Liteattn__SessionRef s = LITEATTN__SESSION_REF__INIT;
    s.session_id = session;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 4;
    q.body_case = (Liteattn__Request__BodyCase)which;
    q.session_reset = &s; /* one union: every SessionRef body aliases it */
    return raw_rc(sock, &q);
}

int raw_mask_read(int sock, uint64_t session)
{
    Liteattn__MaskRead m = LITEATTN__MASK_READ__INIT;
    m.session_id = session;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 5;
    q.body_case = LITEATTN__REQUEST__BODY_MASK_READ;
    q.mask_read = &m;
    return raw_rc(sock, &q);
}

int raw_attach(int sock, const char *key)
{
    Liteattn__SessionAttach a = LITEATTN__SESSION_ATTACH__INIT;
    a.key = (char *)key;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 6;
    q.body_case = LITEATTN__REQUEST__BODY_SESSION_ATTACH;
    q.session_attach = &a;
    return raw_rc(sock, &q);
}

int raw_ping(int sock)
{
    Liteattn__Ping p = LITEATTN__PING__INIT;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 7;
    q.body_case = LITEATTN__REQUEST__BODY_PING;
    q.ping = &p;
    return raw_rc(sock, &q);
}

/* Number of sessions the caller's SessionList shows, or the error code. */
int raw_list_count(int sock)
{
    Liteattn__SessionList l = LITEATTN__SESSION_LIST__INIT;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 8;
    q.body_case = LITEATTN__REQUEST__BODY_SESSION_LIST;
    q.session_list = &l;
    Liteattn__Reply *r = raw_call(sock, &q);
    int ret = raw_code(r);
    if (r && r->body_case == LITEATTN__REPLY__BODY_SESSION_LIST)
        ret = (int)r->session_list->n_sessions;
    if (r)
        liteattn__reply__free_unpacked(r, NULL);
    return ret;
}

/* ---- /proc figures of a process ----------------------------------------------------------- */

int proc_fd_count(pid_t pid)
{
    char p[64];
    snprintf(p, sizeof p, "/proc/%d/fd", (int)pid);
    DIR *d = opendir(p);
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

long proc_rss_kib(pid_t pid)
{
    char p[64], line[256];
    snprintf(p, sizeof p, "/proc/%d/status", (int)pid);
    FILE *f = fopen(p, "r");
    if (!f)
        return -1;
    long kib = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
            break;
    fclose(f);
    return kib;
}
