/*
 * engine_priv.h — private to the engine files (engine.c, session.c, buffers.c): the structures
 * behind the eng handle. Everything here is touched by the loop thread only, except the
 * completion queue (done_lock) and the be_job part of a job while a backend runs it.
 */
#ifndef LA_ENGINE_PRIV_H
#define LA_ENGINE_PRIV_H

#include <pthread.h>
#include <stdarg.h>

#include "backend.h"
#include "engine.h"
#include "list.h"
#include "logsink.h"
#include "users.h"
#include "warmstore.h"

/* A session's masks (every layer and shard, one backend allocation), refcounted: the session
 * holds one reference, every job in flight on it one more. A reset while jobs are in flight
 * swaps in a fresh set, so the running jobs keep writing into the old one. */
typedef struct eng_mset {
    be_backend *be;
    be_mask *mask;
    uint64_t bytes;
    int refs;
    /* Per (layer, shard) region, [layers * kv_shards]: set to all ones yet (by the worker of
     * its first call; 0 reads as all ones) and its live bits (from the workers' counts), so
     * that info, list and reset are O(layers) on the loop thread. */
    atomic_uchar *ready;
    uint64_t *live;
    uint32_t n_regions;
    uint64_t region_bits; /* valid bits of one region: the live count of all ones */
} eng_mset;

typedef struct sess {
    list_node link; /* the engine's sessions, least recently used first */
    uint64_t id;
    uint32_t uid;
    char key[ENG_KEY_MAX + 1];
    char key_esc[4 * ENG_KEY_MAX + 1]; /* printable (escape.h), for logs and messages */
    uint32_t layers, heads, head_dim, max_seq_q, max_seq_k, batch, kv_shards;
    la_dtype dtype;
    float threshold;
    float *schedule;
    size_t n_schedule;
    la_mode mode;
    la_direction direction;
    be_backend *be;
    int dev;
    char device[64];
    uint32_t bm, bn, n_q_tiles, n_k_tiles, n_k_words;
    uint64_t layer_mask_bytes, mask_bytes;
    eng_mset *masks;
    uint64_t *conns; /* the connections that opened or attached it, one entry each */
    uint32_t n_conns, cap_conns;
    int attached; /* n_conns > 0: detached only when the last of them left */
    uint64_t detached_ms, last_used_ms;
    uint32_t inflight;
    int refs;   /* the store's (while linked) + one per job in flight */
    int linked; /* in the engine's list (not closed, evicted or expired) */
    eng_session_stats stats;
    /* Generations restart dense: the last step of each layer (-1: none yet), and per
     * (layer, kv shard) whether its next call must set its mask to all ones first. */
    int64_t *last_step;   /* [layers] */
    uint8_t *restart_due; /* [layers * kv_shards] */
    int restart_logged;
    /* Per (layer, shard): no call since the generation began (the mask is all ones). */
    uint8_t *region_fresh; /* [layers * kv_shards] */
    /* The mask allocation holds, after the masks: the warm seed (seed_off, mask_bytes), the
     * warm capture (capture_off, mask_bytes) and the guardrail's held-row bitmaps (held_off,
     * held_region_bytes per region). */
    uint64_t alloc_bytes, seed_off, held_off, held_region_bytes;
    /* Warm start (warm.c). */
    int has_warm;
    char warm_key[ENG_KEY_MAX + 1];
    int has_warm_step;
    uint32_t warm_step, warm_dense_steps;
    uint32_t warm_used;    /* generations the seed combines, 0: cold */
    /* The seed (mask_bytes, warm_used > 0), kept for mask sets made later (a reset with
     * calls in flight): handed to mask_alloc, never copied out of a host view, which the
     * cuda backend may not have made yet. */
    uint32_t *seed;
    uint8_t *seed_due;     /* [regions]: the seed is still to be ANDed in this generation */
    uint8_t *captured;     /* [regions]: captured at warm_step in this generation */
    uint32_t n_captured;
    uint64_t capture_off;  /* warm_step: the generation being captured, in the mask
                            * allocation's host view (mask_bytes), written by the backends */
    /* Guardrail (guard.c): every N steps (0: off), sample, budget. */
    uint32_t guard_every, guard_sample;
    float guard_budget;
} sess;

enum { BUF_SHM = 1, BUF_CUDA = 2, BUF_VMM = 3 };

typedef struct buf {
    list_node link; /* the engine's buffers */
    uint64_t id;
    uint32_t uid;
    uint64_t conn_id;
    int kind;
    void *ptr;        /* host mapping (shm), device pointer of the allocation base (cuda) or of
                       * the buffer's first byte (vmm) */
    uint64_t size;    /* bytes usable */
    uint64_t map_len; /* shm: bytes mapped */
    be_backend *be;   /* cuda, vmm */
    be_import *imp;
    int dev;
    unsigned access;  /* LA_ACCESS_* */
    /* vmm: the allocations' sizes as listed, and how many have not been mapped yet */
    uint64_t *alloc_sizes;
    uint32_t n_allocs, pending;
    uint64_t granularity;
    int refs; /* the registry's (while registered) + one per job in flight */
    int registered;
} buf;

/* A connection's doorbell (fast path), refcounted like a buffer: the registry's reference
 * while the connection lives, one per job in flight. */
typedef struct eng_doorbell {
    be_doorbell bd; /* first: the backend's unmap callback hands back &bd */
    list_node link; /* the engine's doorbells, while registered */
    uint64_t conn_id;
    uint32_t uid;
    int refs;
    be_backend *cuda; /* the backend that releases it (NULL: unmap at once) */
} eng_doorbell;

/* One attention call between eng_attn_submit and its done callback. */
typedef struct eng_job {
    be_job bj;           /* first: the backend hands back &bj */
    list_node link;      /* the engine's jobs in flight (loop thread only) */
    list_node done_link; /* the completion queue (under done_lock) */
    eng *e;
    sess *s;
    eng_mset *mset;
    buf *bufs[7]; /* one per tensor of the call (engine.c N_TREF) */
    int n_bufs;
    eng_doorbell *db;
    uint64_t conn_id;
    int conn_closed;
    uint64_t tiles_total;
    struct eng_user *owner; /* charged j->bj.cost of queued work until done */
    eng_done_fn done;
    void *user;
} eng_job;

typedef struct eng_user {
    uid_node node; /* in the engine's users */
    uint32_t sessions;
    uint64_t mask_bytes;
    uint64_t queued_cost; /* multiply-adds of its calls queued or running */
    uint64_t plan_bytes;  /* make_room's scratch */
} eng_user;

struct eng {
    eng_config cfg;
    be_backend *cpu, *cuda;
    char backends[16];

    list_node sessions; /* sess.link, least recently used first */
    uint64_t next_session_id;
    list_node users;            /* eng_user.link */
    uint64_t mask_bytes_live;   /* every mask set still allocated */
    uint64_t max_buffers_total; /* limits.max_buffers_total, or from vm.max_map_count */

    list_node buffers; /* buf.link, registered ones */
    uint64_t next_buffer_id;
    list_node doorbells; /* eng_doorbell.link, registered ones */

    list_node jobs; /* eng_job.link, in flight */
    uint64_t inflight;
    int shutting_down;

    pthread_mutex_t done_lock;
    list_node done; /* eng_job.done_link, finished, for the loop thread */

    /* counters */
    uint64_t n_calls, n_call_errors, n_completed, n_failed, n_tiles_total, n_tiles_computed;
    uint64_t n_sessions_opened, n_sessions_closed, n_evicted, n_expired, n_detached_freed;
    uint64_t n_buffers_added, n_buffers_removed, n_restarts;
    uint64_t n_guard_checks, n_guard_rows, n_guard_restored, n_guard_tiles, n_warm_starts;
    ws *warm; /* the warm-start store */
    uint64_t n_fast_calls, n_fast_timeouts, n_doorbells;
    uint64_t compute_ns, queue_ns; /* over finished calls: computing, waiting for a worker */
};

/* engine.c */
void eng_errf(eng_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void eng_logf(eng *e, int level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
uint64_t eng_now_ms(void);
/* "layer -1 (4294967295 as unsigned) out of range: layers count from 0 to 3": an index that
 * came from a negative number says so. count > 0. */
eng_error eng_index_error(const char *what, uint32_t index, uint32_t count);

/* session.c */
/* sess_name's buffer: "session <id> (key '<escaped key>')". */
#define SESS_NAME_MAX (4 * ENG_KEY_MAX + 64)
/* The user's record (created when create is set; NULL on ENOMEM or when absent). */
eng_user *sess_user(eng *e, uint32_t uid, int create);
sess *sess_find(eng *e, uint64_t id);
/* The session id if uid may use it (owner), or NULL with err set (LA_ENOENT). */
sess *sess_get(eng *e, uint32_t uid, uint64_t id, int allow_root, eng_error *err);
void sess_touch(eng *e, sess *s);
void sess_unref(eng *e, sess *s);
void sess_unlink(eng *e, sess *s);
void mset_unref(eng *e, eng_mset *m);
void sess_free_all(eng *e);
void sess_conn_closed(eng *e, uint64_t conn_id);
void sess_tick(eng *e);
void sess_name(const sess *s, char *out, size_t len);

/* warm.c: the session side of the warm start. */
/* Options of spec checked, the seed looked up (before the masks are allocated: it decides
 * the allocation's size); *ret_seed (malloc'ed, s->mask_bytes) or NULL for a cold start. */
int sess_warm_open(eng *e, sess *s, const eng_session_spec *spec, uint32_t **ret_seed,
                   char *status, size_t status_len, eng_error *err);
/* A finished call captured its region (warm_step): deposits once every region is in. */
void sess_warm_captured(eng *e, sess *s, uint32_t region);
/* The session is being freed: without a warm step, its masks now are its generation. */
void sess_warm_close(eng *e, sess *s);
/* A layer starts a new generation (restart) / every layer does (reset). */
void sess_warm_restart(sess *s, uint32_t layer);
void sess_warm_reset(sess *s);

/* guard.c: what a call does about the seed, the guardrail and the capture (its be_job's
 * fields), and the mode it runs in (a warm session's dense first steps). fresh: the region's
 * mask is all ones before this call; restart: the call starts its layer over (the session's
 * warm state is updated for it only once the call is queued). */
void sess_plan_call(const sess *s, const eng_attn_req *req, int fresh, int restart, la_mode *mode,
                    be_job *bj);

/* buffers.c */
buf *buf_get(eng *e, uint64_t conn_id, uint64_t id);
void buf_unref(eng *e, buf *b);
void buf_conn_closed(eng *e, uint64_t conn_id);
void buf_free_all(eng *e);
uint64_t buf_count(const eng *e, uint64_t *ret_bytes);

/* doorbell.c */
eng_doorbell *db_get(eng *e, uint64_t conn_id);
void db_unref(eng *e, eng_doorbell *d);
void db_conn_closed(eng *e, uint64_t conn_id);
void db_free_all(eng *e);
uint64_t db_count(const eng *e);
/* Writes slot's status, then (release) its done word = value: the call is over. */
void db_finish(be_doorbell *bd, uint32_t slot, uint32_t value, int status);

#endif /* LA_ENGINE_PRIV_H */
