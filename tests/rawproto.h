/*
 * rawproto.h — private to tests/: the one raw-protocol client of the tests (tests/rawproto.c).
 * It speaks the wire protocol by hand, without libliteattn, for what the library would refuse
 * to send (oversized or malformed frames, stray fds, another connection's or user's objects,
 * requests before Hello) and for pipelining many requests on one socket. Blocking reads with
 * timeouts; replies are read one frame at a time.
 *
 *     int fd = raw_connect(sock_path);          // connect + Hello, -1 on failure
 *     Liteattn__Reply *r = raw_call(fd, &req);  // send one Request, read one Reply (NULL: closed)
 *     int code = raw_code(r);                   // 0 for a non-error reply, else Error.code
 *     liteattn__reply__free_unpacked(r, NULL);
 */
#ifndef LA_TESTS_RAWPROTO_H
#define LA_TESTS_RAWPROTO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "liteattn.h"
#include "liteattn.pb-c.h"

/* Largest frame raw_send packs (tests send frames past the daemon's limit on purpose). */
#define RAW_MAX_FRAME (64u << 20)

/* ---- transport ---- */
/* A connected socket to path (no Hello), or -1. */
int raw_socket(const char *path);
/* Writes all of buf[0..len) (fd, when >= 0, as SCM_RIGHTS with the first byte). 0 or -1. */
int raw_send_bytes(int sock, const void *buf, size_t len, int fd);
/* req as one frame (length prefix + bytes) in a new malloc'd buffer. 0 or -1. */
int raw_pack(const Liteattn__Request *req, uint8_t **ret_buf, size_t *ret_len);
/* Sends req (and fd as SCM_RIGHTS with its first byte when fd >= 0). 0 or -1. */
int raw_send(int sock, const Liteattn__Request *req, int fd);
/* Reads exactly n bytes within timeout_ms per wait. 0 or -1 (closed, timed out). */
int raw_read_all(int sock, void *p, size_t n, int timeout_ms);
/* The next Reply: 1 with *ret_reply set, 0 when the connection closed or nothing came within
 * timeout_ms, -1 when the daemon sent something that is not a Reply (or a frame over the
 * default limit, which the daemon never sends). */
int raw_recv_status(int sock, int timeout_ms, Liteattn__Reply **ret_reply);
/* The next Reply, or NULL (closed, timed out or garbage). */
Liteattn__Reply *raw_recv(int sock, int timeout_ms);
/* 1 when the daemon closes the connection within timeout_ms (what it sends before is read
 * and dropped), else 0. */
int raw_eof(int sock, int timeout_ms);
Liteattn__Reply *raw_call_fd(int sock, Liteattn__Request *req, int fd);
Liteattn__Reply *raw_call(int sock, Liteattn__Request *req);
/* 0 for a non-error reply, Error.code for an error, LA_ECLOSED for NULL. */
int raw_code(const Liteattn__Reply *r);
/* Sends req, reads its reply, returns raw_code and frees the reply. */
int raw_rc(int sock, Liteattn__Request *req);

/* ---- requests ---- */
/* Connects and says Hello. Returns the socket, or -1 (also when the daemon refused). */
int raw_connect(const char *path);
/* A sealed-ready memfd of size bytes (caller closes), or -1. */
int raw_memfd(size_t size);
/* Registers fd as a shared-memory buffer claiming size bytes. Returns the buffer id (> 0) or
 * the error code. */
int64_t raw_register(int sock, int fd, uint64_t size);
/* Opens a session (f32, H heads, D 64, max seq S). Returns its id (> 0) or the error code. */
int64_t raw_session_open(int sock, const char *key, uint32_t layers, uint32_t heads,
                         uint32_t max_seq);
/* An Attention request on (session, layer 0) with q/k/v/o [1, S, H, 64] f32 at offsets
 * 0, 1, 2, 3 x (S*H*64*4) of buffer buf. The caller sends it (raw_rc). */
typedef struct raw_attn {
    Liteattn__Attention a;
    Liteattn__TensorRef t[4];
    int64_t shape[4];
    Liteattn__Request req;
} raw_attn;
void raw_attn_init(raw_attn *x, uint64_t session, uint64_t buf, int64_t S, int64_t H);
/* Small requests by body; each returns the reply's code. */
int raw_session_ref(int sock, int which, uint64_t session);
int raw_mask_read(int sock, uint64_t session);
int raw_attach(int sock, const char *key);
int raw_ping(int sock);
/* Number of sessions the caller's SessionList shows, or the error code. */
int raw_list_count(int sock);

/* ---- /proc figures of a process ---- */
int proc_fd_count(pid_t pid);
long proc_rss_kib(pid_t pid);

#endif /* LA_TESTS_RAWPROTO_H */
