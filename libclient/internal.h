/*
 * internal.h — private to libclient: the client object, the request/reply machinery shared by
 * the files of the library, and the thread-local error detail. Not installed, not API.
 *
 * Locking: one mutex per la_client guards everything reachable from it (pending requests,
 * calls, buffers, sessions, the framer). Only one thread at a time sleeps in poll() on the
 * socket (c->reading); the others wait on c->cond, which is broadcast whenever a reply has
 * been dispatched or the poller leaves. Bytes are read and replies dispatched with the lock
 * held, so a reply for any thread's request is handled by whichever thread reads it.
 */
#ifndef LA_CLIENT_INTERNAL_H
#define LA_CLIENT_INTERNAL_H

#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "frame.h"
#include "list.h"
#include "liteattn.h"
#include "liteattn.pb-c.h"

#define CL_HELLO_TIMEOUT_MS 10000
#define CL_ERRMSG_MAX 512

/* One request waiting for its reply. Synchronous callers keep it on their stack; attention
 * calls embed it in their la_call. */
typedef struct cl_pend {
    uint64_t id;
    list_node link; /* the client's outstanding requests */
    int done;
    int status;                 /* 0 or LA_E* once done */
    Liteattn__Reply *reply;     /* successful reply (owned; sync callers free it) */
    char errmsg[CL_ERRMSG_MAX]; /* the daemon's message for an error reply */
    struct la_call *call;       /* non-NULL for attention calls */
} cl_pend;

typedef struct cl_prop {
    char *name, *value;
} cl_prop;

struct la_call {
    la_client *client;
    cl_pend pend;
    la_done_fn cb;
    void *user;
    int orphan; /* la_call_free()d while in flight: freed when the reply arrives */
    uint64_t tiles_total, tiles_computed, compute_ns, queue_ns;
    int has_done_event;
    uint8_t done_event[64];
    int row_max;    /* sent with carried row maxima: the reply must say they were written */
    list_node link; /* the client's live calls */
    /* Fast path (fastpath.c): enqueued with doorbell slot `slot` rung at `value`. */
    int fast;
    int internal; /* enqueued without a caller's handle: its error is deferred */
    uint32_t slot, value;
    uint32_t layer, step;
    uint64_t seq;               /* order of enqueueing on the client */
    struct la_session *session; /* NULL once the session handle is gone */
};

struct la_buffer {
    la_client *client;
    uint64_t id;
    uint64_t size;
    void *map; /* host buffers: the mapping (size bytes) */
    int refs;
    uint64_t cuda_base; /* CUDA buffers registered through a pointer: the block base, or the
                         * first VMM allocation's address, else 0 */
    int is_cuda;
    uint8_t ipc_handle[64]; /* CUDA: the handle it was registered with (cache key with base) */
    unsigned access;        /* LA_ACCESS_* the daemon enforces */
    /* VMM: the allocations mapped, and (registered through a pointer) where each lay in this
     * process and its CU_POINTER_ATTRIBUTE_BUFFER_ID then (or, bit 63 set, the handle mapped
     * there, where the driver gives no id), to tell a stale registration. */
    int is_vmm;
    uint32_t n_allocs;
    uint64_t *alloc_base, *alloc_ids;
    uint64_t cuda_id; /* CUDA IPC through a pointer: the block's buffer id (0 unknown) */
    list_node link;   /* the client's buffers */
};

/* The first error of a fast-path call enqueued without a handle, until it is reported. */
typedef struct cl_deferred {
    int code; /* 0: none */
    uint64_t seq;
    char msg[CL_ERRMSG_MAX];
} cl_deferred;

/* Figures of a session's (or client's) fast-path calls whose replies arrived. */
typedef struct cl_fast_counts {
    uint64_t calls, failed, tiles_total, tiles_computed, compute_ns, queue_ns;
    uint32_t inflight;
} cl_fast_counts;

struct la_session {
    la_client *client;
    uint64_t id;
    uint32_t bm, bn, n_q_tiles, n_k_words;
    uint64_t mask_bytes, layer_mask_bytes;
    uint32_t layers, heads, head_dim, max_seq_q, max_seq_k, batch, kv_shards;
    int dtype;
    char device[64]; /* where it computes: "cpu" or a GPU UUID */
    uint32_t warm_generations;
    char key[256], warm_key[256], warm_status[256];
    list_node link; /* the client's sessions */
    cl_fast_counts fast;
    cl_deferred deferred;
};

typedef struct cl_doorbell cl_doorbell; /* fastpath.c */

struct la_client {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int fd;
    frame_reader fr;
    uint64_t next_id;
    int closed;  /* 0, or the error every later request gets (LA_ECLOSED...) */
    int garbled; /* the daemon sent an oversized or undecodable frame */
    int reading; /* a thread is in poll() on fd */
    uint32_t max_frame;
    uint32_t max_inflight;
    uint32_t n_pending;
    uint64_t completions; /* attention calls completed so far (la_client_process) */
    list_node pending;    /* cl_pend.link, outstanding requests */
    cl_prop *props;
    size_t n_props;
    list_node calls;    /* la_call.link */
    list_node buffers;  /* la_buffer.link */
    list_node sessions; /* la_session.link */
    /* Fast path (fastpath.c). */
    cl_doorbell *db;
    uint64_t fast_seq;
    uint32_t fast_inflight;
    cl_deferred deferred; /* of calls whose session handle is gone */
};

/* ---- errors.c ---- */
/* Stores the detail for la_last_error_message() and returns code. fmt NULL: la_strerror. */
int cl_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void cl_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A Request whose body (body_case) is the message body points at. As in the daemon's
 * send_reply, the oneof's members are pointers in one union, so storing through one of them
 * sets the body. */
static inline Liteattn__Request cl_req_body(Liteattn__Request__BodyCase body_case, void *body)
{
    Liteattn__Request req = LITEATTN__REQUEST__INIT;
    req.body_case = body_case;
    req.hello = body;
    return req;
}

/* ---- client.c (lock held for all of these) ---- */
/* Assigns an id, packs and sends req (with fd when >= 0) and links p as pending. */
int cl_send(la_client *c, Liteattn__Request *req, int fd, cl_pend *p);
/* Waits until p is done (timeout_ms -1: forever). Unlinks p on timeout/closure. */
int cl_wait(la_client *c, cl_pend *p, int timeout_ms);
/* Sends req and waits for its reply: on success *ret_reply is the reply of body case want
 * (the caller frees it with liteattn__reply__free_unpacked). */
int cl_call(la_client *c, Liteattn__Request *req, int fd, int want, Liteattn__Reply **ret_reply);
/* cl_call without an fd, taking and releasing the client's lock around it. */
int cl_request(la_client *c, Liteattn__Request *req, int want, Liteattn__Reply **ret_reply);
/* Waits until fewer than max_inflight requests are outstanding. */
int cl_wait_room(la_client *c, int timeout_ms);
/* Polls and dispatches until cond(arg) holds, the client closes or the timeout passes. */
int cl_wait_cond(la_client *c, int (*cond)(la_client *, void *), void *arg, int timeout_ms);
/* Removes p from the pending list (no-op when absent). */
void cl_unlink_pending(la_client *c, cl_pend *p);

/* ---- attn.c ---- */
/* Dispatch of an attention reply (or failure) to its call; runs the callback. */
void cl_call_complete(la_client *c, struct la_call *call, int status, Liteattn__Reply *reply);
void cl_calls_free_all(la_client *c);

/* ---- buffer.c ---- */
void cl_buffers_free_all(la_client *c);
int cl_buffer_register_ipc(la_client *c, const void *handle, const char *uuid, uint64_t size,
                           uint64_t cuda_base, la_buffer **ret_buffer);
/* Registers n VMM allocation fds (lock held; the caller keeps the fds): one BufferRegister per
 * allocation. On success *ret_buffer is linked with is_vmm set, its pointer facts unset. */
int cl_buffer_register_vmm(la_client *c, const int *fds, const uint64_t *sizes, size_t n,
                           uint64_t offset, uint64_t size, const char *uuid, unsigned access,
                           la_buffer **ret_buffer);
/* Normalises a GPU UUID ("GPU-..." or 32 hex digits) to "GPU-8-4-4-4-12" lower case. */
int cl_uuid_normalise(const char *in, char out[48]);

/* ---- session.c ---- */
void cl_sessions_free_all(la_client *c);

/* ---- fastpath.c (lock held) ---- */
/* A fast call's reply (or the connection's end) arrived, with status: its slot, counters and
 * deferred error. Called by cl_call_complete before the callback. */
void cl_fast_complete(la_client *c, struct la_call *call, int status);
/* Opens the doorbell when needed, takes a slot and rings it: on the CPU session from the host,
 * on a GPU session by enqueueing the ring and the wait for done on stream. */
int cl_fast_begin(la_client *c, la_session *s, void *stream, uint32_t *ret_slot,
                  uint32_t *ret_value);
/* The call of (slot, value) was not sent: the slot's stream is released (status) and the slot
 * free again. */
void cl_fast_undo(la_client *c, uint32_t slot, uint32_t value, int status);
/* Waits until c is under its in-flight limit with a doorbell slot free (the slots can be
 * fewer than the calls the daemon allows in flight). */
int cl_fast_wait_room(la_client *c);
/* Reports (and clears) s's deferred error: its code, or 0. */
int cl_fast_deferred(la_session *s);
/* Waits until s's enqueued calls have their replies (in program order before what follows:
 * mask reads, info, reset); their errors stay deferred. */
void cl_fast_drain(la_session *s);
/* Session s's handle goes away: its calls forget it, its deferred error moves to the client. */
void cl_fast_session_gone(la_client *c, la_session *s);
/* The connection is gone or being closed: every fast call's stream is released (done written
 * from the host) and the doorbell unmapped. */
void cl_fast_free(la_client *c);

/* ---- cuda.c (the fast path's driver calls) ---- */
/* 0 when the CUDA driver has the fast path's entry points; else the reason in why. */
int cl_cuda_fast_ready(char *why, size_t len);
/* Pins [p, p + len) for every GPU (portable, mapped) in the context of stream; the context
 * and the device address come back. */
int cl_cuda_host_register(void *p, size_t len, void *stream, void **ret_ctx,
                          uint64_t *ret_dev_addr);
/* Waits for the GPU work of ctx (no stream may still read p), then unpins p. */
void cl_cuda_host_unregister(void *p, void *ctx);
/* Enqueues on stream: write value to ready_addr (after the stream's earlier work), then wait
 * until done_addr holds value or later (cyclic >=). */
int cl_cuda_ring_and_wait(void *stream, uint64_t ready_addr, uint64_t done_addr, uint32_t value);

/* ---- figures by name (la_call_stat, la_session_stat, la_session_counter) ---- */
#include <string.h>
/* The index of name in names[0..n), or -1. */
static inline int cl_name_index(const char *const *names, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(name, names[i]))
            return (int)i;
    return -1;
}

/* ---- conversions ---- */
static inline int64_t cl_now_ns(void);

#include <time.h>
static inline int64_t cl_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#endif /* LA_CLIENT_INTERNAL_H */
