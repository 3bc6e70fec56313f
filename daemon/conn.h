/*
 * conn.h — private: one client connection of liteattnd: bytes, fds, frames, limits.
 *
 * The socket is watched with a uv_poll_t; recvmsg/sendmsg are ours (proto/frame.h), so that
 * fds travel as SCM_RIGHTS and the bytes on the wire are exactly the frames (uv_pipe's ipc
 * mode would add its own).
 *
 * Flow control: when max_inflight attention requests are in flight the socket is no longer
 * read (no UV_READABLE) until one finishes; requests beyond the limit that had already been
 * read (they came in the same recvmsg) are answered with LA_EBUSY. Replies wait in an
 * outbound queue; a client that lets it grow past max_outbound_bytes is disconnected (a client
 * must read its replies).
 *
 * Errors of the framing or the protocol (oversized frame, undecodable bytes, truncated
 * ancillary data, an fd without a BufferRegister, a BufferRegister(SHM) without an fd) close
 * the connection at once; everything it holds is released (eng_conn_closed).
 *
 * Lifetime: conn_close() starts closing the handles; the memory is freed once both handles'
 * close callbacks and the done callbacks of all its engine jobs have run (refcount).
 */
#ifndef LA_DAEMON_CONN_H
#define LA_DAEMON_CONN_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "frame.h"
#include "liteattn.pb-c.h"
#include "server.h"

typedef struct conn_out conn_out;
typedef struct disp_job disp_job;

struct conn {
    srv *srv;
    conn *prev, *next;
    uint64_t id;
    int fd;
    uint32_t uid, gid;
    int32_t pid;
    char client_name[64];

    uv_poll_t poll;
    uv_timer_t timer;     /* Hello timeout, then the linger limit of conn_close_after_flush */
    unsigned events;      /* what poll watches now */

    la_framer fr;
    conn_out *out_head, *out_tail;
    size_t out_bytes;

    uint32_t inflight;    /* attention jobs submitted, done callback not yet run */
    disp_job *jobs;       /* those jobs, for failing them all on a fatal error */

    size_t alloc_used, alloc_cap; /* protobuf-c unpack budget */

    int refs;
    int hello_done;
    int paused;           /* inflight limit reached: not reading */
    int lingering;        /* a final reply is being flushed, then the connection closes */
    int closing;
};

/* Log prefix naming a connection: "conn 7 (uid 1000)". */
#define CONN_FMT "conn %llu (uid %u)"
#define CONN_ARGS(c) (unsigned long long)(c)->id, (unsigned)(c)->uid

/* Takes ownership of fd (closed on error). Starts reading and the Hello timer. */
int conn_new(srv *s, int fd, uint32_t uid, uint32_t gid, int32_t pid, conn **ret_conn);
/* Closes now (queued replies are dropped) and releases the engine's resources of the conn. */
void conn_close(conn *c);
/* Stops reading; closes once the queued replies are written (or after a few seconds). */
void conn_close_after_flush(conn *c);

void conn_ref(conn *c);
void conn_unref(conn *c);

/* Queues a reply (written as soon as the socket takes it). Returns 0 or LA_E*; on a dead or
 * too slow client the connection is closed (and logged) here. */
int conn_send(conn *c, const Liteattn__Reply *r);
/* Error reply; message NULL: la_strerror(code). */
int conn_send_error(conn *c, uint64_t id, int code, const char *message);

/* Writes the queued replies, waiting up to timeout_ms for the socket (only on the way out
 * after a fatal error, when the loop no longer runs). */
void conn_flush_final(conn *c, int timeout_ms);

/* Re-evaluates what to watch (after pause/resume, queue changes, shutdown). */
void conn_update_poll(conn *c);
/* A job finished: resume reading if the connection was paused. */
void conn_job_finished(conn *c);

#endif /* LA_DAEMON_CONN_H */
