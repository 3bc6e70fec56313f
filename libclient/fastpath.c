/* fastpath.c — asynchronous calls ordered on the GPU (docs/FASTPATH.md): the connection's
 * doorbell (a sealed memfd of 16-byte slots the daemon maps too), its slots, the ring and wait
 * enqueued on the caller's CUDA stream, the calls' deferred errors and figures, syncing.
 *
 * A slot belongs to one call from la_attn_enqueue until its reply arrived; its value goes up by
 * one for every call (never 0), so a stream that reaches its wait late still passes (cyclic >=)
 * and a stale ready word never satisfies a later call. A slot whose call the daemon released
 * after its doorbell timeout is retired: the caller's stream may still write its ready word. */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

/* The wire layout of a slot (DoorbellRegister in proto/liteattn.proto). */
typedef struct cl_slot {
    _Atomic uint32_t ready;
    _Atomic uint32_t done;
    _Atomic int32_t status;
    uint32_t reserved;
} cl_slot;
_Static_assert(sizeof(cl_slot) == 16, "a doorbell slot is 16 bytes on the wire");

enum { SLOT_FREE, SLOT_BUSY, SLOT_RETIRED };

struct cl_doorbell {
    cl_slot *slots;
    size_t map_len;
    uint32_t n_slots;
    uint32_t *value; /* [n_slots] the last value rung */
    uint8_t *state;  /* [n_slots] SLOT_* */
    uint32_t *free_stack;
    uint32_t n_free, n_retired;
    int cuda;       /* registered with CUDA (cl_cuda_host_register) */
    void *cuda_ctx; /* the context it was registered in */
    uint64_t dev_addr;
};

/* The slot count asked of the daemon: one per call the client may have in flight. */
static uint32_t wanted_slots(const la_client *c)
{
    uint32_t n = c->max_inflight ? c->max_inflight : 64;
    const char *lim = la_client_property(c, "limit.max_doorbell_slots");
    if (lim) {
        unsigned long v = strtoul(lim, NULL, 10);
        if (v > 0 && v < n)
            n = (uint32_t)v;
    }
    return n;
}

static void doorbell_free(cl_doorbell *db)
{
    if (!db)
        return;
    if (db->cuda)
        cl_cuda_host_unregister(db->slots, db->cuda_ctx);
    if (db->slots)
        munmap(db->slots, db->map_len);
    free(db->value);
    free(db->state);
    free(db->free_stack);
    free(db);
}

/* Creates the doorbell and registers it with the daemon (one round trip). Lock held. */
static int doorbell_open(la_client *c)
{
    uint32_t n = wanted_slots(c);
    long page = sysconf(_SC_PAGESIZE);
    size_t pg = page > 0 ? (size_t)page : 4096;
    size_t len = ((size_t)n * sizeof(cl_slot) + pg - 1) / pg * pg;
    cl_doorbell *db = calloc(1, sizeof(*db));
    if (!db)
        return cl_fail(LA_ENOMEM, NULL);
    db->n_slots = n;
    db->value = calloc(n, sizeof(*db->value));
    db->state = calloc(n, sizeof(*db->state));
    db->free_stack = malloc(n * sizeof(*db->free_stack));
    if (!db->value || !db->state || !db->free_stack) {
        doorbell_free(db);
        return cl_fail(LA_ENOMEM, NULL);
    }
    for (uint32_t i = 0; i < n; i++)
        db->free_stack[i] = n - 1 - i;
    db->n_free = n;
    int fd = memfd_create("liteattn-doorbell", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) {
        doorbell_free(db);
        return cl_fail(LA_EIO, "memfd_create for the doorbell: %s", strerror(errno));
    }
    void *map = MAP_FAILED;
    if (ftruncate(fd, (off_t)len) != 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0 ||
        (map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
        int e = errno;
        close(fd);
        doorbell_free(db);
        return cl_fail(LA_EIO, "creating the doorbell (%zu bytes): %s", len, strerror(e));
    }
    db->slots = map;
    db->map_len = len;
    Liteattn__DoorbellRegister dr = LITEATTN__DOORBELL_REGISTER__INIT;
    dr.slots = n;
    Liteattn__Request req = cl_req_body(LITEATTN__REQUEST__BODY_DOORBELL_REGISTER, &dr);
    Liteattn__Reply *r = NULL;
    int rc = cl_call(c, &req, fd, LITEATTN__REPLY__BODY_DOORBELL, &r);
    close(fd); /* the daemon has its own; the mapping stays */
    if (rc < 0) {
        doorbell_free(db);
        if (rc == LA_ENOTSUP)
            return cl_fail(rc, "the daemon has no fast path (an older liteattnd): %s",
                           la_last_error_message());
        return rc;
    }
    liteattn__reply__free_unpacked(r, NULL);
    c->db = db;
    return 0;
}

/* dev is in the daemon's list of devices that take doorbell calls. */
static int daemon_takes(const la_client *c, const char *dev)
{
    const char *list = la_client_property(c, "fastpath.devices");
    size_t n = strlen(dev);
    for (const char *p = list; p && *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (n && len == n && !strncasecmp(p, dev, n))
            return 1;
        p = e ? e + 1 : p + len;
    }
    return 0;
}

/* Whether s's calls can be enqueued (see la_session_fastpath); the reason goes to
 * la_last_error_message(). */
static int fast_check(const la_session *s)
{
    const la_client *c = s->client;
    if (!s->device[0])
        return cl_fail(LA_ENOTSUP, "the daemon did not say where the session computes (an "
                                   "older liteattnd)");
    if (!daemon_takes(c, s->device))
        return cl_fail(
            LA_ENOTSUP, "the daemon takes no fast-path calls on %s (it takes them on: %s)",
            s->device,
            la_client_property(c, "fastpath.devices") && *la_client_property(c, "fastpath.devices")
                ? la_client_property(c, "fastpath.devices")
                : "none");
    if (strcmp(s->device, "cpu") != 0) {
        char why[192];
        int rc = cl_cuda_fast_ready(why, sizeof(why));
        if (rc < 0)
            return cl_fail(LA_ENOTSUP, "%s", why);
    }
    return 0;
}

LA_API int la_session_fastpath(const la_session *s)
{
    if (!s)
        return cl_fail(LA_EINVAL, "la_session_fastpath: no session");
    return fast_check(s);
}

/* Room for one more call: under the in-flight limit, and a doorbell slot free (or none made
 * yet, or every one retired: cl_fast_begin then says so). */
static int room(la_client *c, void *arg)
{
    (void)arg;
    const cl_doorbell *db = c->db;
    return c->n_pending < c->max_inflight &&
           (!db || db->n_free > 0 || db->n_retired == db->n_slots);
}

int cl_fast_wait_room(la_client *c)
{
    if (room(c, NULL))
        return 0;
    int rc = cl_wait_cond(c, room, NULL, -1);
    return rc < 0 ? cl_fail(rc, "connection to the daemon closed") : 0;
}

int cl_fast_begin(la_client *c, la_session *s, void *stream, uint32_t *ret_slot,
                  uint32_t *ret_value)
{
    int rc = fast_check(s);
    if (rc < 0)
        return rc;
    int on_cpu = strcmp(s->device, "cpu") == 0;
    if (!c->db && (rc = doorbell_open(c)) < 0)
        return rc;
    cl_doorbell *db = c->db;
    if (!on_cpu && !db->cuda) {
        rc = cl_cuda_host_register(db->slots, db->map_len, stream, &db->cuda_ctx, &db->dev_addr);
        if (rc < 0)
            return rc;
        db->cuda = 1;
    }
    /* The caller waited for a free slot (cl_fast_wait_room), unless the doorbell is new. */
    if (db->n_free == 0 && db->n_retired < db->n_slots && (rc = cl_fast_wait_room(c)) < 0)
        return rc;
    if (db->n_free == 0)
        return cl_fail(LA_ELIMIT, "every doorbell slot (%u) was retired after timeouts: reconnect",
                       db->n_slots);
    uint32_t slot = db->free_stack[--db->n_free];
    uint32_t v = db->value[slot] + 1;
    if (v == 0)
        v = 1; /* 0 is the fresh slot's word */
    /* Spent even if the enqueueing below fails half-way: a ready word written by a failed
     * attempt must never satisfy a later call of the slot. */
    db->value[slot] = v;
    if (on_cpu) {
        /* No stream: the inputs are in host memory already. */
        atomic_store_explicit(&db->slots[slot].ready, v, memory_order_release);
    } else {
        uint64_t base = db->dev_addr + (uint64_t)slot * sizeof(cl_slot);
        rc = cl_cuda_ring_and_wait(stream, base, base + offsetof(cl_slot, done), v);
        if (rc < 0) {
            db->free_stack[db->n_free++] = slot;
            return rc;
        }
    }
    db->state[slot] = SLOT_BUSY;
    *ret_slot = slot;
    *ret_value = v;
    return 0;
}

/* The slot's call is over for this side with status: its stream goes on (done written from
 * here too: the daemon may never write it, e.g. when the connection died). */
static void release_slot(cl_doorbell *db, uint32_t slot, uint32_t value, int status)
{
    if (status < 0) {
        atomic_store_explicit(&db->slots[slot].status, status, memory_order_relaxed);
        uint32_t cur = atomic_load_explicit(&db->slots[slot].done, memory_order_relaxed);
        if (!((int32_t)(cur - value) >= 0))
            atomic_store_explicit(&db->slots[slot].done, value, memory_order_release);
    }
}

void cl_fast_undo(la_client *c, uint32_t slot, uint32_t value, int status)
{
    cl_doorbell *db = c->db;
    release_slot(db, slot, value, status);
    db->state[slot] = SLOT_FREE;
    db->free_stack[db->n_free++] = slot;
}

void cl_fast_complete(la_client *c, la_call *call, int status)
{
    cl_doorbell *db = c->db;
    if (db && call->slot < db->n_slots && db->state[call->slot] == SLOT_BUSY) {
        release_slot(db, call->slot, call->value, status);
        if (status == LA_ETIMEDOUT) {
            /* The daemon gave up waiting: the caller's stream may write this ready word
             * still, so the slot is not used again. */
            db->state[call->slot] = SLOT_RETIRED;
            db->n_retired++;
        } else {
            db->state[call->slot] = SLOT_FREE;
            db->free_stack[db->n_free++] = call->slot;
        }
    }
    if (c->fast_inflight)
        c->fast_inflight--;
    la_session *s = call->session;
    if (s) {
        cl_fast_counts *f = &s->fast;
        if (f->inflight)
            f->inflight--;
        if (status < 0) {
            f->failed++;
        } else {
            f->calls++;
            f->tiles_total += call->tiles_total;
            f->tiles_computed += call->tiles_computed;
            f->compute_ns += call->compute_ns;
            f->queue_ns += call->queue_ns;
        }
    }
    if (call->internal && status < 0) {
        cl_deferred *d = s ? &s->deferred : &c->deferred;
        if (!d->code) {
            d->code = status;
            d->seq = call->seq;
            snprintf(d->msg, sizeof(d->msg),
                     "an asynchronous call (layer %u, step %u) failed: %.440s", call->layer,
                     call->step, call->pend.errmsg[0] ? call->pend.errmsg : la_strerror(status));
        }
    }
}

void cl_fast_session_gone(la_client *c, la_session *s)
{
    la_call *call;
    list_for_each_entry (call, &c->calls, la_call, link)
        if (call->session == s)
            call->session = NULL;
    if (s->deferred.code && (!c->deferred.code || s->deferred.seq < c->deferred.seq))
        c->deferred = s->deferred;
}

void cl_fast_free(la_client *c)
{
    cl_doorbell *db = c->db;
    if (!db)
        return;
    /* Calls still in flight: their streams go on now (their results are undefined). */
    la_call *call;
    list_for_each_entry (call, &c->calls, la_call, link)
        if (call->fast && !call->pend.done && call->slot < db->n_slots)
            release_slot(db, call->slot, call->value, LA_ECLOSED);
    doorbell_free(db);
    c->db = NULL;
}

/* The first deferred error of d (and clears it): returns its code, or 0. */
static int report(cl_deferred *d)
{
    if (!d->code)
        return 0;
    int code = cl_fail(d->code, "%s", d->msg);
    d->code = 0;
    return code;
}

int cl_fast_deferred(la_session *s) { return report(&s->deferred); }

static int session_idle(la_client *c, void *arg)
{
    (void)c;
    return ((la_session *)arg)->fast.inflight == 0;
}

static int client_idle(la_client *c, void *arg)
{
    (void)arg;
    return c->fast_inflight == 0;
}

void cl_fast_drain(la_session *s)
{
    if (s->fast.inflight)
        cl_wait_cond(s->client, session_idle, s, -1);
}

/* Waits for cond (the lock held); the timeout or closure as an error. */
static int wait_idle(la_client *c, int (*cond)(la_client *, void *), void *arg, int timeout_ms)
{
    int rc = cl_wait_cond(c, cond, arg, timeout_ms);
    if (rc == LA_ETIMEDOUT)
        return cl_fail(rc, "asynchronous calls still in flight after %d ms", timeout_ms);
    if (rc < 0 && !cond(c, arg))
        return cl_fail(rc, "connection to the daemon closed");
    return 0;
}

LA_API int la_session_sync(la_session *s, int timeout_ms)
{
    if (!s)
        return cl_fail(LA_EINVAL, "la_session_sync: no session");
    la_client *c = s->client;
    pthread_mutex_lock(&c->lock);
    int rc = wait_idle(c, session_idle, s, timeout_ms);
    int d = report(&s->deferred);
    if (d)
        rc = d;
    pthread_mutex_unlock(&c->lock);
    return rc;
}

LA_API int la_client_sync(la_client *c, int timeout_ms)
{
    if (!c)
        return cl_fail(LA_EINVAL, "la_client_sync: no client");
    pthread_mutex_lock(&c->lock);
    int rc = wait_idle(c, client_idle, NULL, timeout_ms);
    /* The earliest deferred error of the client's calls, wherever it is kept. */
    cl_deferred *first = c->deferred.code ? &c->deferred : NULL;
    la_session *s;
    list_for_each_entry (s, &c->sessions, la_session, link)
        if (s->deferred.code && (!first || s->deferred.seq < first->seq))
            first = &s->deferred;
    if (first)
        rc = report(first);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

LA_API int la_session_counter(const la_session *s, const char *name, int64_t *ret_value)
{
    if (!s || !name)
        return cl_fail(LA_EINVAL, "la_session_counter: NULL argument");
    static const char *const names[] = {"calls",          "failed",     "inflight", "tiles_total",
                                        "tiles_computed", "compute_ns", "queue_ns"};
    int i = cl_name_index(names, sizeof(names) / sizeof(names[0]), name);
    if (i < 0)
        return cl_fail(LA_ENOENT, "no session counter \"%s\"", name);
    la_client *c = s->client;
    pthread_mutex_lock(&c->lock);
    const cl_fast_counts *f = &s->fast;
    const uint64_t values[] = {f->calls,          f->failed,     f->inflight, f->tiles_total,
                               f->tiles_computed, f->compute_ns, f->queue_ns};
    pthread_mutex_unlock(&c->lock);
    if (ret_value)
        *ret_value = (int64_t)values[i];
    return 0;
}
