/*
 * rawproto.h — private to tests/check_{load,faults,security}.c: the wire protocol spoken by
 * hand (no libliteattn), for requests the library would refuse to send or that must name
 * another connection's or user's objects. Blocking sockets; static functions only.
 *
 *     int fd = raw_connect(sock_path);          // connect + Hello, -1 on failure
 *     Liteattn__Reply *r = raw_call(fd, &req);  // send one Request, read one Reply (NULL: closed)
 *     int code = raw_code(r);                   // 0 for a non-error reply, else Error.code
 *     liteattn__reply__free_unpacked(r, NULL);
 */
#ifndef LA_TESTS_RAWPROTO_H
#define LA_TESTS_RAWPROTO_H

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "frame.h"
#include "liteattn.h"
#include "liteattn.pb-c.h"

static __attribute__((unused)) int raw_socket(const char *path)
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

/* Sends req (and fd as SCM_RIGHTS with its first byte when fd >= 0). 0 or -1. */
static __attribute__((unused)) int raw_send(int sock, const Liteattn__Request *req, int fd)
{
    uint8_t *buf;
    size_t len;
    if (frame_pack(&req->base, 0, &buf, &len) < 0)
        return -1;
    size_t off = 0;
    while (off < len) {
        ssize_t n;
        do {
            struct pollfd p = {.fd = sock, .events = POLLOUT};
            poll(&p, 1, 1000);
            n = frame_send(sock, buf + off, len - off, off == 0 ? fd : -1);
        } while (n == LA_EAGAIN);
        if (n <= 0) {
            free(buf);
            return -1;
        }
        off += (size_t)n;
    }
    free(buf);
    return 0;
}

static __attribute__((unused)) int raw_read_all(int sock, void *p, size_t n, int timeout_ms)
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

/* The next Reply on sock (NULL when the connection closed, timed out or sent garbage). */
static __attribute__((unused)) Liteattn__Reply *raw_recv(int sock, int timeout_ms)
{
    uint8_t h[4];
    if (raw_read_all(sock, h, 4, timeout_ms) < 0)
        return NULL;
    uint32_t n = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 24;
    if (n > FRAME_DEFAULT_MAX)
        return NULL;
    uint8_t *b = malloc(n ? n : 1);
    if (!b)
        return NULL;
    if (raw_read_all(sock, b, n, timeout_ms) < 0) {
        free(b);
        return NULL;
    }
    Liteattn__Reply *r = liteattn__reply__unpack(NULL, n, b);
    free(b);
    return r;
}

static __attribute__((unused)) Liteattn__Reply *raw_call_fd(int sock, Liteattn__Request *req, int fd)
{
    if (raw_send(sock, req, fd) < 0)
        return NULL;
    return raw_recv(sock, 20000);
}

static __attribute__((unused)) Liteattn__Reply *raw_call(int sock, Liteattn__Request *req)
{
    return raw_call_fd(sock, req, -1);
}

static __attribute__((unused)) int raw_code(const Liteattn__Reply *r)
{
    if (!r)
        return LA_ECLOSED;
    return r->body_case == LITEATTN__REPLY__BODY_ERROR ? r->error->code : 0;
}

/* Sends req, reads its reply, returns raw_code and frees the reply. */
static __attribute__((unused)) int raw_rc(int sock, Liteattn__Request *req)
{
    Liteattn__Reply *r = raw_call(sock, req);
    int code = raw_code(r);
    if (r)
        liteattn__reply__free_unpacked(r, NULL);
    return code;
}

/* Connects and says Hello. Returns the socket, or -1 (also when the daemon refused). */
static __attribute__((unused)) int raw_connect(const char *path)
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
static __attribute__((unused)) int raw_memfd(size_t size)
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
static __attribute__((unused)) int64_t raw_register(int sock, int fd, uint64_t size)
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
static __attribute__((unused)) int64_t raw_session_open(int sock, const char *key, uint32_t layers, uint32_t heads,
                                uint32_t seq)
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

/* An Attention request on (session, layer 0) with q/k/v/o [1, S, H, 64] f32 at offsets
 * 0, 1, 2, 3 x (S*H*64*4) of buffer buf. The caller sends it (raw_rc). */
typedef struct raw_attn {
    Liteattn__Attention a;
    Liteattn__TensorRef t[4];
    int64_t shape[4];
    Liteattn__Request req;
} raw_attn;

static __attribute__((unused)) void raw_attn_init(raw_attn *x, uint64_t session, uint64_t buf, int64_t S, int64_t H)
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
static __attribute__((unused)) int raw_session_ref(int sock, int which, uint64_t session)
{
    Liteattn__SessionRef s = LITEATTN__SESSION_REF__INIT;
    s.session_id = session;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 4;
    q.body_case = (Liteattn__Request__BodyCase)which;
    q.session_reset = &s; /* one union: every SessionRef body aliases it */
    return raw_rc(sock, &q);
}

static __attribute__((unused)) int raw_mask_read(int sock, uint64_t session)
{
    Liteattn__MaskRead m = LITEATTN__MASK_READ__INIT;
    m.session_id = session;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 5;
    q.body_case = LITEATTN__REQUEST__BODY_MASK_READ;
    q.mask_read = &m;
    return raw_rc(sock, &q);
}

static __attribute__((unused)) int raw_attach(int sock, const char *key)
{
    Liteattn__SessionAttach a = LITEATTN__SESSION_ATTACH__INIT;
    a.key = (char *)key;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 6;
    q.body_case = LITEATTN__REQUEST__BODY_SESSION_ATTACH;
    q.session_attach = &a;
    return raw_rc(sock, &q);
}

static __attribute__((unused)) int raw_ping(int sock)
{
    Liteattn__Ping p = LITEATTN__PING__INIT;
    Liteattn__Request q = LITEATTN__REQUEST__INIT;
    q.id = 7;
    q.body_case = LITEATTN__REQUEST__BODY_PING;
    q.ping = &p;
    return raw_rc(sock, &q);
}

/* Number of sessions the caller's SessionList shows, or the error code. */
static __attribute__((unused)) int raw_list_count(int sock)
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

static __attribute__((unused)) int proc_fd_count(pid_t pid)
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

static __attribute__((unused)) long proc_rss_kib(pid_t pid)
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

#endif /* LA_TESTS_RAWPROTO_H */
