/*
 * engine.h — private: the transport-free core of liteattnd.
 *
 * The engine owns the session store (skip masks), the buffer registry (shared memory and CUDA
 * IPC imports), the backends (cpu, cuda) and their worker threads. It knows nothing of
 * sockets, libuv or protobuf: the server (server.c, conn.c, dispatch.c) translates frames into
 * these calls, and tests and benchmarks drive it directly.
 *
 * Threading: every eng_* function is called from one thread (the loop thread), except
 * eng_new's notify callback, which workers call. Compute runs on worker threads. When a job
 * finishes, the worker queues its completion and calls cfg.notify(cfg.notify_data) (the server
 * maps it to uv_async_send); the loop thread then calls eng_process_completions(), which runs
 * the jobs' done callbacks on the loop thread, draining the whole queue.
 *
 * Ownership: sessions belong to a Unix uid; buffers belong to a connection (conn_id) and its
 * uid. Every call names the caller (uid, conn_id); objects of another uid are reported as
 * LA_ENOENT (their existence is not revealed), except that uid 0 may list and read all.
 *
 * Errors: functions return 0 or a negative LA_E* code (liteattn.h) and, on error, write a
 * human message naming the object into err (when err is not NULL).
 */
#ifndef LA_ENGINE_H
#define LA_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "la_attn.h"
#include "codes.h"
#include "logsink.h"

#define ENG_KEY_MAX 255
#define ENG_ERR_MAX 256

typedef struct eng eng;

typedef struct eng_error {
    char msg[ENG_ERR_MAX];
} eng_error;

typedef struct eng_limits {
    uint32_t max_buffers_per_conn;      /* default 256 */
    uint64_t max_buffer_bytes_per_conn; /* shm + ipc + vmm bytes registered, default 64 GiB */
    /* Buffers (each a mapping of the daemon) of one user, of all users (0: half of
     * vm.max_map_count, read at start). Defaults 2048 and 0. */
    uint32_t max_buffers_per_user;
    uint64_t max_buffers_total;
    uint32_t max_sessions_per_user;   /* default 64 */
    uint64_t max_mask_bytes_per_user; /* default 4 GiB */
    uint64_t mask_memory_cap;         /* all users, 0 = none; room is made by evicting detached
                                        * sessions (session.c make_room) */
    uint32_t max_inflight_per_conn;   /* default 64; the server enforces, the engine reports */
    uint32_t session_grace_s;         /* detached session kept this long, default 300 */
    uint32_t session_ttl_s;           /* idle session freed after this, default 3600 */
    /* Compute, in multiply-adds counted from a call's shapes (2 * B * H * Sq * Sk * D, whatever
     * its strides): the most one call may cost, and the most one user may have queued or
     * running at once. 0 = no limit. Defaults 2^47 (a Wan-sized call, B1 H40 S75600 D128,
     * is 2^45.7) and 2^53 (64 such calls). */
    uint64_t max_call_cost;
    uint64_t max_queued_cost_per_user;
    /* The warm-start store (SKIP-SEMANTICS "Warm start across generations"): mask bytes of
     * earlier generations one user's entries may hold (default 256 MiB; the least recently
     * used key's oldest generation goes first) and generations kept per key (default 8, at
     * most 64). */
    uint64_t warm_store_bytes_per_user;
    uint32_t warm_max_generations;
    /* Fast path (eng_doorbell_add): slots of one connection's doorbell at most (default
     * 4096), and how long a launched GPU call may wait for its doorbell before the daemon
     * releases it and fails it with LA_ETIMEDOUT (default 60 s). */
    uint32_t max_doorbell_slots;
    uint32_t doorbell_timeout_s;
} eng_limits;

typedef struct eng_config {
    const char *backend;     /* "auto" (cuda if a GPU is usable, else cpu), "cpu", "cuda" */
    int cpu_threads;         /* threads of the CPU backend's pool, <= 0: number of cores */
    uint64_t cpu_slice_macs; /* CPU calls run in slices of about this many multiply-adds (0:
                              * the backend's default); fairness and cancellation act between
                              * slices */
    eng_limits limits;
    void (*notify)(void *data); /* called from worker threads when a completion is queued */
    void *notify_data;
    /* Log sink (the daemon's logger); level 0 error .. 3 debug. May be NULL. */
    logsink_fn log;
    void *log_data;
    /* Folder where the warm-start store persists (one subfolder per uid); NULL or "": kept in
     * memory only. */
    const char *warm_state_dir;
} eng_config;

/* Fills cfg with the defaults above (backend "auto"). */
void eng_config_default(eng_config *cfg);

/* Creates the engine and initialises the backends (a CUDA context per usable GPU when the
 * backend is cuda/auto). Errors: LA_ENODEV ("cuda" asked but no usable GPU), LA_ENOMEM. */
int eng_new(const eng_config *cfg, eng **ret_engine, eng_error *err);
/* Waits for running jobs, runs their callbacks with LA_ESHUTDOWN if still queued, frees all. */
void eng_free(eng *e);

/* Backends and devices for the Hello reply. */
typedef struct eng_device_info {
    char uuid[64];   /* "GPU-..." or "cpu" */
    char backend[8]; /* "cpu" / "cuda" */
    char name[96];
    uint64_t memory_bytes;
    uint32_t compute_capability;
    int mps;           /* the context is an MPS client: 1, 0, or -1 unknown / not a GPU */
    uint32_t sm_count; /* SMs the context may use, 0 unknown */
    int fastpath;      /* calls on it may name a doorbell slot (be_ops.fastpath) */
} eng_device_info;
size_t eng_devices(const eng *e, eng_device_info *out, size_t max);
/* Comma-separated backend names, e.g. "cpu" or "cpu,cuda". */
const char *eng_backends(const eng *e);

/* ---- sessions ----------------------------------------------------------------------------- */

typedef struct eng_session_spec {
    const char *key; /* 1..ENG_KEY_MAX bytes */
    uint32_t layers, heads, head_dim;
    la_dtype dtype;
    uint32_t max_seq_q, max_seq_k; /* max_seq_k 0: = max_seq_q */
    uint32_t batch, kv_shards;     /* 0: 1 */
    float threshold;               /* default -3 */
    const float *schedule;         /* per-step thresholds, may be NULL */
    size_t n_schedule;
    la_mode mode; /* default LA_MODE_SKIP; never LA_MODE_SESSION */
    la_direction direction;
    const char *device; /* NULL, "", "auto", "cpu", "cuda" or a GPU UUID (< 64 bytes) */
    /* Warm start (SKIP-SEMANTICS "Warm start across generations"). warm_key NULL: none. The
     * options take their defaults when their has_ flag is 0: the settled step (default: the
     * masks at close), generations combined (4), margin in tiles (1), dense first steps (1). */
    const char *warm_key;
    int has_warm_step, has_warm_generations, has_warm_margin, has_warm_dense_steps;
    uint32_t warm_step, warm_generations, warm_margin, warm_dense_steps;
    /* Online quality guardrail (SKIP-SEMANTICS "Online quality guardrail"): checked every
     * guard_every steps (0: off), guard_sample q-tiles (0: 1), budget of lost probability mass
     * per row (0: 0.05). */
    uint32_t guard_every, guard_sample;
    float guard_budget;
} eng_session_spec;

#define ENG_WARM_STATUS_MAX 192

typedef struct eng_session_view {
    uint64_t id;
    uint32_t bm, bn;
    uint32_t n_q_tiles, n_k_words;
    uint64_t layer_mask_bytes; /* one layer, one shard */
    uint64_t mask_bytes;       /* all */
    uint32_t layers, heads, head_dim, max_seq_q, max_seq_k, batch, kv_shards;
    la_dtype dtype;
    char device[64];
    uint32_t warm_generations;             /* generations the seed combines, 0: cold */
    char warm_status[ENG_WARM_STATUS_MAX]; /* "" without a warm key, else what happened */
} eng_session_view;

int eng_session_open(eng *e, uint32_t uid, uint64_t conn_id, const eng_session_spec *spec,
                     eng_session_view *ret_view, eng_error *err);
int eng_session_attach(eng *e, uint32_t uid, uint64_t conn_id, const char *key,
                       eng_session_view *ret_view, eng_error *err);
int eng_session_reset(eng *e, uint32_t uid, uint64_t session_id, eng_error *err);
/* Closing a session with calls in flight marks it; it is freed when they finish. */
int eng_session_close(eng *e, uint32_t uid, uint64_t session_id, eng_error *err);

typedef struct eng_session_stats {
    uint64_t calls, tiles_total, tiles_computed;
    uint64_t restarts; /* layers started over: a call's step was below the layer's last step */
    /* Warm start: the session's warm key ("" for none), generations its seed combines (0:
     * cold), generations it deposited so far. */
    char warm_key[ENG_KEY_MAX + 1];
    uint32_t warm_generations;
    uint64_t warm_deposits;
    /* Guardrail: calls checked, q-tile rows compared, rows restored, tiles the dense samples
     * computed. */
    uint64_t guard_checks, guard_rows, guard_restored, guard_tiles;
} eng_session_stats;
/* live[0..n) gets the live fraction of each layer (n may exceed layers; the rest untouched). */
int eng_session_info(eng *e, uint32_t uid, uint64_t session_id, double *live, size_t n,
                     eng_session_stats *ret_stats, eng_error *err);

typedef struct eng_session_summary {
    uint64_t id;
    char key[ENG_KEY_MAX + 1];
    uint32_t uid, layers, heads, head_dim, batch, bm, bn;
    uint64_t mask_bytes, calls, restarts, idle_ms;
    double live_fraction;
    int attached;
    char device[64];
    char warm_key[ENG_KEY_MAX + 1];
    uint32_t warm_generations;
    uint64_t guard_checks, guard_restored;
    const double *layer_live; /* [layers], valid during the callback */
} eng_session_summary;
/* Calls fn for each session uid may see (uid 0: all). */
void eng_session_list(eng *e, uint32_t uid, void (*fn)(void *data, const eng_session_summary *s),
                      void *data);

/* ---- the warm-start store ----------------------------------------------------------------- */

typedef struct eng_warm_entry {
    uint32_t uid;
    const char *key; /* valid during the callback */
    uint32_t layers, kv_shards, batch, heads, n_q_tiles, n_k_tiles, bm, bn;
    uint32_t generations;
    uint64_t bytes; /* counted against the user's warm_store_bytes_per_user */
    uint64_t deposited_ago_ms, seeds;
    int persisted;
} eng_warm_entry;
/* Calls fn for each stored entry uid may see (its own; uid 0: every user's). */
void eng_warm_list(eng *e, uint32_t uid, void (*fn)(void *data, const eng_warm_entry *w),
                   void *data);
/* Removes uid's entries of key (NULL: all of uid's) and their files; *ret_count how many. */
int eng_warm_drop(eng *e, uint32_t uid, const char *key, uint64_t *ret_count, eng_error *err);
/* Waits until the store's files are written (tests; eng_free does it too). */
void eng_warm_flush(eng *e);

/* Copies up to len bytes of (layer, kv_shard)'s mask from byte offset into dst. */
int eng_mask_read(eng *e, uint32_t uid, uint64_t session_id, uint32_t layer, uint32_t kv_shard,
                  uint64_t offset, void *dst, size_t len, size_t *ret_len, uint64_t *ret_total,
                  eng_error *err);

/* ---- buffers ------------------------------------------------------------------------------ */

/* Takes ownership of fd (closed on error too). Maps it; size must not exceed the fd's size. */
int eng_buffer_add_shm(eng *e, uint32_t uid, uint64_t conn_id, int fd, uint64_t size,
                       uint64_t *ret_id, eng_error *err);
/* handle: cudaIpcMemHandle_t bytes (len 64); device_uuid names the GPU. */
int eng_buffer_add_cuda_ipc(eng *e, uint32_t uid, uint64_t conn_id, const void *handle, size_t len,
                            const char *device_uuid, uint64_t size, uint64_t *ret_id,
                            uint64_t *ret_size, eng_error *err);
/* VMM buffers: physical allocations of cuMemCreate, exported as POSIX fds by the client and
 * mapped here side by side in the order listed (GPU memory; the cuda backend only). */
typedef struct eng_vmm_spec {
    const char *device_uuid;    /* the GPU the allocations live on (< 64 bytes) */
    const uint64_t *alloc_sizes; /* sizes of the allocations, 1..LA_MAX_VMM_ALLOCS of them */
    size_t n_allocs;
    uint64_t offset, size; /* the buffer: bytes [offset, offset + size) of the mapped range */
    unsigned access;       /* LA_ACCESS_* bits, not 0 */
} eng_vmm_spec;

/* What a registration produced (BufferReply). */
typedef struct eng_buffer_info {
    uint64_t id, size;
    uint32_t pending;     /* VMM: allocations still to come; the buffer is usable at 0 */
    unsigned access;      /* LA_ACCESS_* */
    uint64_t granularity; /* VMM: the allocation granularity the sizes were checked against */
} eng_buffer_info;

/* Takes ownership of fd (closed on error too): the first allocation of a VMM buffer; the others
 * follow with eng_buffer_vmm_append. Errors: LA_EINVAL (sizes, access, a device UUID or fd that
 * is not what it should be: a socket, pipe, directory or shared-memory file is refused before
 * CUDA sees it), LA_ERANGE (the buffer's bytes lie outside the allocations, or an allocation is
 * smaller than listed), LA_ENODEV (no cuda backend, no such GPU, the allocation lives on another
 * GPU), LA_ENOTSUP (the driver cannot import it), LA_ELIMIT, LA_ENOMEM, LA_ESHUTDOWN. */
int eng_buffer_add_vmm(eng *e, uint32_t uid, uint64_t conn_id, int fd, const eng_vmm_spec *spec,
                       eng_buffer_info *ret_info, eng_error *err);
/* Takes ownership of fd: the next allocation (alloc_size bytes, as listed) of VMM buffer
 * buffer_id. Any error except LA_ENOENT (no such buffer) removes the buffer. */
int eng_buffer_vmm_append(eng *e, uint64_t conn_id, uint64_t buffer_id, int fd,
                          uint64_t alloc_size, eng_buffer_info *ret_info, eng_error *err);
/* Restricts a registered buffer to access (LA_ACCESS_* bits): calls whose outputs lie in a
 * buffer without LA_ACCESS_WRITE, or inputs in one without LA_ACCESS_READ, get LA_EPERM. */
int eng_buffer_set_access(eng *e, uint64_t conn_id, uint64_t buffer_id, unsigned access,
                          eng_error *err);

/* Releases the buffer; the mapping goes away once in-flight jobs using it have finished. */
int eng_buffer_remove(eng *e, uint64_t conn_id, uint64_t buffer_id, eng_error *err);

/* ---- the fast path's doorbell ---------------------------------------------------------- */

/* Takes ownership of fd (closed on error too): the connection's doorbell of slots slots
 * (backend.h be_doorbell_slot: a sealed memfd of at least 16 * slots bytes), mapped until the
 * connection closed and no job uses it. One per connection. Errors: LA_EINVAL (bad fd, size,
 * seals, slot count beyond max_doorbell_slots), LA_EEXIST (the connection has one),
 * LA_ENOMEM, LA_ESHUTDOWN. */
int eng_doorbell_add(eng *e, uint32_t uid, uint64_t conn_id, int fd, uint32_t slots,
                     eng_error *err);
/* A call naming (slot, value) was refused before eng_attn_submit (the server's in-flight
 * limit, a request it could not translate): writes the slot's status (code) and done words,
 * when the connection has a doorbell with that slot. */
void eng_doorbell_refuse(eng *e, uint64_t conn_id, uint32_t slot, uint32_t value, int code);

/* The connection went away: its queued jobs are cancelled at once (LA_ECLOSED; running CPU
 * calls stop before their next k-tile), its buffers are released (after their in-flight work), its
 * running jobs still complete but their callbacks are told (user data stays valid until
 * then: the server keeps the conn until all its callbacks ran), and it drops its reference
 * on the sessions it opened or attached: a session whose last connection left becomes
 * detached and is freed after the grace period unless attached again. */
void eng_conn_closed(eng *e, uint64_t conn_id);

/* Frees sessions past their grace period or TTL. Call about once a second. */
void eng_tick(eng *e);

/* ---- attention ---------------------------------------------------------------------------- */

typedef struct eng_tensor {
    uint64_t buffer_id;
    uint64_t offset; /* bytes */
    la_dtype dtype;
    int ndim; /* 4 for q/k/v/o, 3 for lse and row_max, 0 for decisions */
    int64_t shape[4];
    int64_t strides[4]; /* elements */
    int has_strides;    /* 0: contiguous row-major */
} eng_tensor;

typedef struct eng_attn_req {
    uint64_t session_id;
    uint32_t layer, step, kv_shard;
    eng_tensor q, k, v, o, lse, decisions;
    int has_lse, has_decisions;
    /* Carried row maxima [B, H, Sq] f32, read and written (SKIP-SEMANTICS "Carried row
     * maxima"). */
    eng_tensor row_max;
    int has_row_max;
    float scale; /* 0: 1/sqrt(D) */
    int has_threshold;
    float threshold;
    la_mode mode; /* LA_MODE_SESSION: the session's */
    la_range must_do[LA_MAX_RANGES];
    int n_must_do;
    la_range must_skip[LA_MAX_RANGES];
    int n_must_skip;
    int dry_run;
    int has_wait_event;
    uint8_t wait_event[64];
    /* Fast path: wait for slot doorbell_slot of the connection's doorbell to be rung
     * (ready >= doorbell_value) and write its status and done words when the call is over. */
    int has_doorbell;
    uint32_t doorbell_slot, doorbell_value;
} eng_attn_req;

typedef struct eng_attn_result {
    uint64_t tiles_total, tiles_computed;
    uint64_t compute_ns, queue_ns;
    int has_done_event;
    uint8_t done_event[64];
} eng_attn_result;

typedef void (*eng_done_fn)(void *user, int status, const eng_attn_result *res,
                            const char *message);

/* Validates everything (session and ownership, layer/shard/step, shapes against the session's
 * geometry, dtypes, every tensor's byte extent inside its buffer with overflow-safe arithmetic,
 * ranges; the kernel-level rules through la_attn_check) and queues the job on its backend. On
 * success done() runs later on the loop thread (from eng_process_completions) exactly once; on
 * error it never runs. A call naming a doorbell slot gets that slot's status and done words
 * written whatever happens (on error here at once, with the error code), so that the client's
 * stream never waits for a call that will not run; only a slot that does not exist (no
 * doorbell, index out of range) cannot be written.
 * Errors: LA_ENOENT, LA_EINVAL, LA_ERANGE, LA_EPERM (an output in a buffer registered
 * read-only, an input in a write-only one), LA_ENOTSUP (also: a doorbell call on a device
 * without the fast path), LA_ESHUTDOWN, LA_ELIMIT (the call's cost exceeds max_call_cost, or
 * the user's queued work would exceed max_queued_cost_per_user; the message names the
 * limit). */
int eng_attn_submit(eng *e, uint32_t uid, uint64_t conn_id, const eng_attn_req *req,
                    eng_done_fn done, void *user, eng_error *err);

/* Loop thread: runs the done callbacks of every finished job. Returns how many ran. */
int eng_process_completions(eng *e);

/* Stops accepting jobs and cancels the queued ones at once (LA_ESHUTDOWN; CPU calls already
 * running stop before their next k-tile); eng_idle() is then true once every job has completed and
 * its callback ran. */
void eng_shutdown(eng *e);
int eng_idle(const eng *e);

/* Counters for the Stats reply (calls, errors, tiles, sessions, buffers, bytes, evictions...). */
void eng_stats(const eng *e, void (*fn)(void *data, const char *name, int64_t value), void *data);

/* A sticky GPU error poisoned a context: the server must fail everyone and exit non-zero. */
int eng_fatal(const eng *e);

#endif /* LA_ENGINE_H */
