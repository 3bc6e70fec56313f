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

struct la_session {
    la_client *client;
    uint64_t id;
    uint32_t bm, bn, n_q_tiles, n_k_words;
    uint64_t mask_bytes, layer_mask_bytes;
    uint32_t layers, heads, head_dim, max_seq_q, max_seq_k, batch, kv_shards;
    int dtype;
    list_node link; /* the client's sessions */
};

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
};

/* ---- errors.c ---- */
/* Stores the detail for la_last_error_message() and returns code. fmt NULL: la_strerror. */
int cl_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void cl_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

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
