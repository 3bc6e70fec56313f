/*
 * conn.h — private: one client connection of liteattnd: bytes, fds, frames, limits.
 *
 * The socket is watched with a uv_poll_t; recvmsg/sendmsg are ours (proto/frame.h), so that
 * fds travel as SCM_RIGHTS and the bytes on the wire are exactly the frames (uv_pipe's ipc
 * mode would add its own).
 *
 * Fairness: one wake-up handles at most 32 frames of a connection (conn.c's
 * FRAMES_PER_WAKEUP); the rest of what was read waits, with reading paused, and goes on in
 * later loop iterations (a uv_idle_t), so that a client pipelining thousands of requests in
 * one write takes turns with the others instead of holding the loop.
 *
 * Flow control: when max_inflight attention requests are in flight the socket is no longer
 * read (no UV_READABLE) until one finishes; requests beyond the limit that had already been
 * read (they came in the same recvmsg) are answered with LA_EBUSY. Replies wait in an
 * outbound queue; a client that lets it grow past max_outbound_bytes is disconnected (a client
 * must read its replies).
 *
 * Per user (conn_user, summed over its connections): more than max_outbound_bytes_per_user of
 * unread replies closes the connection that queues the next one; more than max_fds_per_user
 * fds received and not yet claimed answers LA_ELIMIT (naming the limit), closes the fds and
 * the connection that brought the last ones. So one user's many connections cannot take the
 * daemon's memory or descriptors from another.
 *
 * Errors of the framing or the protocol (oversized frame, undecodable bytes, truncated
 * ancillary data, an fd without a BufferRegister, a BufferRegister(SHM) without an fd) close
 * the connection at once; everything it holds is released (eng_conn_closed).
 *
 * Lifetime: conn_close() starts closing the handles; the memory is freed once both handles'
 * close callbacks have run and every job in flight has ended (refcount).
 *
 * Layering: conn knows bytes, fds, frames and its own jobs in flight; it never calls the server
 * or dispatch. What a request means, and what closing releases elsewhere, it hands to the
 * hooks its owner gave to conn_new (PipeWire's connection.c and protocol-native.c).
 */
#ifndef LA_DAEMON_CONN_H
#define LA_DAEMON_CONN_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "frame.h"
#include "list.h"
#include "liteattn.pb-c.h"

typedef struct conn conn;
typedef struct conn_out conn_out;

/* What the request hook answers. */
enum {
    CONN_REQ_OK = 0,
    CONN_REQ_CLOSE = 1, /* an error reply was queued: close once it is written (why says) */
    CONN_REQ_FAIL = 2,  /* protocol error: close now (why says) */
};

typedef struct conn_hooks {
    /* A decoded request of c; returns CONN_REQ_*, and writes why (for the log) otherwise. */
    int (*request)(void *data, conn *c, const Liteattn__Request *req, char *why, size_t whylen);
    /* c began closing: release what it holds elsewhere and forget it (c stays valid until
     * its jobs ended). */
    void (*closed)(void *data, conn *c);
    /* c's queued replies have all been written. */
    void (*drained)(void *data, conn *c);
    void *data;
} conn_hooks;

typedef struct conn_limits {
    uint32_t max_frame;    /* bytes of one request */
    uint32_t max_inflight; /* jobs in flight before reading pauses */
    uint32_t hello_timeout_s;
    uint64_t max_outbound_bytes; /* queued replies before the client is dropped */
    /* Over all connections of one user (conn_user), 0 = no limit: */
    uint64_t max_outbound_bytes_per_user; /* queued replies before the connection queueing
                                           * one more is dropped */
    uint32_t max_fds_per_user;            /* received fds not yet claimed by a BufferRegister */
} conn_limits;

/* What every connection of one Unix user holds, summed (the owner keeps one per uid and
 * hands it to conn_set_user; a connection without one counts alone). */
typedef struct conn_user {
    uint64_t out_bytes; /* replies queued and not yet written */
    uint32_t fds;       /* fds received and not yet claimed */
} conn_user;

/* Counted by every connection of one owner. */
#define CONN_ERROR_CODES 32 /* error replies are counted by -code, below this */
typedef struct conn_counters {
    uint64_t frames_in, frames_out, bytes_in, bytes_out, protocol_errors;
    uint64_t bytes_released; /* reply and read buffers freed (the owner trims the heap) */
    uint64_t
        errors[CONN_ERROR_CODES]; /* error replies sent, by -code (LA_E* of liteattn_codes.h) */
} conn_counters;

/* A request in flight (e.g. an attention job): embedded in the caller's own object. */
typedef struct conn_job {
    list_node link; /* the connection's jobs */
    uint64_t req_id;
    int answered; /* conn_fail_inflight already answered it */
} conn_job;

struct conn {
    list_node link; /* the owner's list of connections (conn itself never touches it) */
    void *user;     /* the owner's, e.g. the dispatcher */
    uint64_t id;
    int fd;
    uint32_t uid, gid;
    int32_t pid;
    char client_name[64];

    conn_hooks hooks;
    conn_limits lim;
    conn_counters *ctr;

    uv_poll_t poll;
    uv_timer_t timer; /* Hello timeout, then the linger limit of conn_close_after_flush */
    uv_idle_t idle;   /* runs while backlog: the frames left over from an earlier wake-up */
    unsigned events;  /* what poll watches now */

    frame_reader fr;
    list_node out; /* conn_out, oldest first */
    size_t out_bytes;

    list_node jobs; /* conn_job in flight */
    uint32_t inflight;

    size_t alloc_used, alloc_cap; /* protobuf-c unpack budget */

    conn_user own, *acct; /* acct: the user's sums (own until conn_set_user) */
    uint32_t fds_counted; /* this connection's share of acct->fds */

    int refs;
    int hello_done;
    int partial_timer; /* the timer runs for a frame begun after Hello (frame timeout) */
    int paused;        /* inflight limit reached: not reading */
    int backlog;       /* complete frames wait beyond the per-wake-up budget: not reading */
    int quiesced;      /* shutting down: no more requests are read */
    int lingering;     /* a final reply is being flushed, then the connection closes */
    int closing;
};

/* Log prefix naming a connection: "conn 7 (uid 1000)". */
#define CONN_FMT "conn %llu (uid %u)"
#define CONN_ARGS(c) (unsigned long long)(c)->id, (unsigned)(c)->uid

/* Takes ownership of fd (closed on error). Starts reading and the Hello timer. ctr must
 * outlive the connection. */
int conn_new(uv_loop_t *loop, uint64_t id, int fd, uint32_t uid, uint32_t gid, int32_t pid,
             const conn_limits *lim, conn_counters *ctr, const conn_hooks *hooks, conn **ret_conn);
/* c's holdings count in u (shared by the user's connections) from now on; call right after
 * conn_new. */
void conn_set_user(conn *c, conn_user *u);
/* Closes now (queued replies are dropped); hooks.closed runs. */
void conn_close(conn *c);
/* Stops reading; closes once the queued replies are written (or after a few seconds). */
void conn_close_after_flush(conn *c);
/* Shutdown: reads no more requests; queued replies and jobs in flight still finish. */
void conn_quiesce(conn *c);
/* The Hello was accepted: stops the Hello timer. */
void conn_hello_done(conn *c);

void conn_ref(conn *c);
void conn_unref(conn *c);

/* Queues a reply (written as soon as the socket takes it). Returns 0 or LA_E*; on a dead or
 * too slow client the connection is closed (and logged) here. */
int conn_send(conn *c, const Liteattn__Reply *r);
/* Error reply; message NULL: the code's own message. */
int conn_send_error(conn *c, uint64_t id, int code, const char *message);
/* Replies are queued and not yet written. */
static inline int conn_has_output(const conn *c) { return !list_empty(&c->out); }

/* Writes the queued replies, waiting up to timeout_ms for the socket (only on the way out
 * after a fatal error, when the loop no longer runs). */
void conn_flush_final(conn *c, int timeout_ms);

/* Request req_id goes in flight as j: counted, c referenced until conn_job_end, and reading
 * pauses at the in-flight limit. */
void conn_job_begin(conn *c, conn_job *j, uint64_t req_id);
/* j is over: unlinked, counted down, reading resumes; drops j's reference (may free c, so
 * call it last). */
void conn_job_end(conn *c, conn_job *j);
/* Answers every job of c still in flight with Error(code, message); their own answers are
 * then skipped (j->answered). */
void conn_fail_inflight(conn *c, int code, const char *message);

#endif /* LA_DAEMON_CONN_H */
