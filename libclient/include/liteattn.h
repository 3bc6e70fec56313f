/*
 * liteattn.h — the whole public API of libliteattn, the client of the liteattn daemon.
 *
 * What is not in this file is not API. Every name carries the prefix la_ (macros LA_).
 *
 * Conventions
 * - Functions return int: 0 on success or a negative LA_E* code (la_strerror() names it).
 *   Output parameters are named ret_* and are written only on success.
 * - Objects are opaque. Constructors are _new/_open/_connect; destructors accept NULL.
 * - A la_client is one connection to liteattnd. All functions taking a la_client (or an object
 *   made through it) may be called from several threads: the client serialises them with its
 *   own lock. Completion callbacks run on whichever thread is inside la_call_wait(),
 *   la_client_process() or a synchronous call of the same client at the time; they must not
 *   call back into the same client.
 * - The human-readable detail of the last error on the calling thread (the daemon's message
 *   when it answered with an error) is available through la_last_error_message().
 * - The library never prints and never exits; messages go to the log callback (la_set_log).
 */
#ifndef LITEATTN_H
#define LITEATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define LA_API __attribute__((visibility("default")))
#else
#define LA_API
#endif

#include "liteattn_codes.h" /* protocol version, error codes, enumerations */

/* ---------------------------------------------------------------------------------------- */
/* Errors (the codes are in liteattn_codes.h). */
/* "invalid argument" for LA_EINVAL; "unknown error" for codes outside the table. */
LA_API const char *la_strerror(int err);
/* "LA_EINVAL" for LA_EINVAL; "LA_OK" for 0; "LA_UNKNOWN" otherwise. */
LA_API const char *la_err_name(int err);
/* Detail of the last failed call on this thread ("" if none). Valid until the next call. */
LA_API const char *la_last_error_message(void);

/* ---------------------------------------------------------------------------------------- */
/* Logging. The library reports rare events (a dropped connection, a failed unmap) here.
 * level: 0 error, 1 warning, 2 info, 3 debug. fn == NULL silences it (the default). */
typedef void (*la_log_fn)(void *user, int level, const char *message);
LA_API void la_set_log(la_log_fn fn, void *user);

/* "0.1.0" — the library's version. */
LA_API const char *la_version(void);

/* ---------------------------------------------------------------------------------------- */
/* Connection. */

typedef struct la_client la_client;

/* Writes the socket path a client uses when it is given none: $LITEATTN_SOCKET if set, else
 * $XDG_RUNTIME_DIR/liteattn.sock if a socket exists there (a per-user daemon), else the system
 * service's /run/liteattn/liteattn.sock.
 * Errors: LA_EINVAL (NULL or too small buffer). */
LA_API int la_default_socket_path(char *buf, size_t len);

/* Connects to the daemon at socket_path (NULL: la_default_socket_path()) and performs the
 * Hello handshake, naming this client client_name (NULL: "libliteattn").
 * Errors: LA_ECONN (nothing listens there, or the daemon closed the connection before
 * answering Hello, e.g. while it restarts), LA_EVERSION (daemon speaks another major version),
 * LA_EPROTO, LA_ENOMEM, LA_ETIMEDOUT (no answer to Hello within 10 s). */
LA_API int la_connect(const char *socket_path, const char *client_name, la_client **ret_client);

/* Closes the connection. Sessions, buffers and calls made through it must be freed first or are
 * freed here (handles become invalid). The daemon keeps open sessions for its grace period.
 * Calls of la_attn_enqueue still in flight are released (their streams go on at once, their
 * outputs undefined: la_client_sync first to finish them); when the fast path was used on a
 * GPU, this waits for the GPU work of that CUDA context before the doorbell is unpinned. */
LA_API void la_disconnect(la_client *c);

/* Facts the daemon sent in its Hello reply, as text; NULL for an unknown name. Names:
 * "daemon.version", "protocol" ("1.0"), "backends" (comma-separated, e.g. "cpu,cuda"),
 * "devices" (one line per device: "<uuid> <backend> <name>"), "mps" (one line per device, in
 * the same order: "<uuid> on|off|unknown <SMs the daemon's context may use, 0 unknown>": "on"
 * when the daemon's CUDA context is an NVIDIA MPS client, CUDA's own answer),
 * "mps.pipe_directory" (where the daemon's driver looks for the MPS control daemon),
 * "mps.control" ("yes" when a control daemon's socket is there, "no"), "fastpath.devices"
 * (comma-separated: the devices, "cpu" or GPU UUIDs, that take la_attn_enqueue calls; "" for
 * none), "limit.max_frame", "limit.max_inflight", "limit.max_buffers", "limit.max_sessions",
 * "limit.max_mask_bytes", "limit.max_connections", "limit.session_grace_s",
 * "limit.session_ttl_s", "limit.doorbell_timeout_ms", "limit.max_doorbell_slots" (limits only
 * when the daemon sent them). The string lives as long as the client. */
LA_API const char *la_client_property(const la_client *c, const char *name);

/* Round trip of one Ping. Errors: LA_ECLOSED, LA_EPROTO. */
LA_API int la_ping(la_client *c, uint64_t *ret_rtt_ns);

/* Reads whatever replies have arrived, waiting up to timeout_ms (0: do not wait, -1: forever)
 * for at least one, and runs the completion callbacks of finished calls. Returns the number of
 * calls completed (>= 0) or an error (LA_ECLOSED when the daemon went away). */
LA_API int la_client_process(la_client *c, int timeout_ms);

/* ---------------------------------------------------------------------------------------- */
/* Tables: small results with named columns (stats, session listings). */

typedef struct la_table la_table;
LA_API size_t la_table_rows(const la_table *t);
LA_API size_t la_table_cols(const la_table *t);
LA_API const char *la_table_col_name(const la_table *t, size_t col);
/* Cell as text; NULL when out of range. */
LA_API const char *la_table_text(const la_table *t, size_t row, size_t col);
/* Cell of the named column parsed as an integer. Errors: LA_ENOENT (no such column or row),
 * LA_EINVAL (not an integer). */
LA_API int la_table_int(const la_table *t, size_t row, const char *col, int64_t *ret_value);
LA_API void la_table_free(la_table *t);

/* Daemon counters: columns "name", "value". */
LA_API int la_stats(la_client *c, la_table **ret_table);
/* Sessions visible to this user (root sees all): columns "id", "key", "uid", "layers",
 * "heads", "head_dim", "batch", "bm", "bn", "mask_bytes", "calls", "restarts",
 * "live_fraction", "attached", "idle_s", "device", then "warm_key" ("" when the session did
 * not ask for a warm start), "warm_generations" (generations its seed combines, 0: it started
 * cold), "guard_checks", "guard_restored" (see la_session_stat) and "layer_live" (the live
 * fraction of each layer, comma-separated). */
LA_API int la_sessions(la_client *c, la_table **ret_table);

/* The warm-start store (la_session_config_set_warm_start) of this user (root: of every user):
 * one row per (warm key, geometry), columns "key", "uid", "layers", "kv_shards", "batch",
 * "heads", "n_q_tiles", "n_k_tiles", "bm", "bn", "generations" (stored), "bytes" (counted
 * against the daemon's warm_store_bytes per user), "age_s" (since the newest generation was
 * stored), "seeds" (sessions seeded from it since the daemon started), "persisted" (1 when
 * it is kept on disk). */
LA_API int la_warm_list(la_client *c, la_table **ret_table);
/* Forgets this user's stored masks of warm key (every geometry; NULL: all of this user's
 * keys), on disk too; *ret_dropped (may be NULL) gets the number of entries removed. */
LA_API int la_warm_drop(la_client *c, const char *key, uint64_t *ret_dropped);

/* ---------------------------------------------------------------------------------------- */
/* Buffers: memory the daemon reads Q/K/V from and writes O/LSE into. Tensors are named by
 * (buffer, byte offset, shape, strides). */

typedef struct la_buffer la_buffer;

/* Creates a sealed shared-memory block (memfd) of size bytes, maps it here and registers it
 * with the daemon (the fd travels by SCM_RIGHTS). Errors: LA_EINVAL (size 0), LA_ENOMEM,
 * LA_ELIMIT (buffer count or byte limit of the connection), LA_EIO. */
LA_API int la_buffer_new_host(la_client *c, size_t size, la_buffer **ret_buffer);

/* Registers a caller's shared-memory fd of size bytes; the library dups and maps it. The fd
 * must be a memfd made with MFD_ALLOW_SEALING: the library adds F_SEAL_SHRINK to it (the
 * daemon refuses memory that could shrink under its mapping, so POSIX shm is refused).
 * Errors as la_buffer_new_host, plus LA_EINVAL when fd is smaller than size or unsealable. */
LA_API int la_buffer_register_fd(la_client *c, int fd, size_t size, la_buffer **ret_buffer);

/* Registers the CUDA allocation that contains dev_ptr and writes the byte offset of dev_ptr
 * inside it: for cudaMalloc memory the whole block (by its legacy IPC handle), for cuMemCreate
 * (VMM) memory the one physical allocation mapped there (by its POSIX fd). The library finds
 * base and size with the CUDA driver, loaded at run time. The same block registered twice on one
 * client returns the same buffer with a new reference. Equivalent to
 * la_buffer_register_cuda_range(c, dev_ptr, 1, LA_ACCESS_RW, ...). Errors: LA_ENODEV (no CUDA
 * driver, or the daemon has no such GPU), LA_ENOTSUP (memory neither way can share: managed
 * memory, or VMM memory not created exportable as a POSIX fd), LA_ELIMIT. */
LA_API int la_buffer_register_cuda(la_client *c, const void *dev_ptr, la_buffer **ret_buffer,
                                   uint64_t *ret_offset);

/* Registers device memory covering the size bytes at dev_ptr, whatever allocated it, and
 * writes the byte offset of dev_ptr inside the buffer:
 *   - cudaMalloc memory (PyTorch's default allocator): the whole block, by its legacy IPC
 *     handle; the range must lie inside one block; access is not enforced by page protection
 *     (the daemon still refuses calls that would break it).
 *   - cuMemCreate (VMM) memory, e.g. PyTorch with expandable_segments:True: every physical
 *     allocation the range touches (each exported as a POSIX fd, sent by SCM_RIGHTS; at most
 *     LA_MAX_VMM_ALLOCS), which the daemon maps side by side with access as page protection
 *     (LA_ACCESS_READ: read-only, for Q/K/V; LA_ACCESS_RW for O, LSE, DECISIONS). The buffer
 *     spans those whole allocations.
 * A range inside one this client registered already (same allocations, still mapped there, at
 * least the access asked) returns that buffer with a new reference; la_buffer_cuda_valid()
 * tells when a registration went stale because the memory was freed. Errors: LA_EINVAL (not
 * CUDA memory, size 0, a gap in the range), LA_ERANGE (cudaMalloc memory: the range runs past
 * its block), LA_ENOTSUP (managed memory; VMM memory created without the POSIX fd handle type,
 * e.g. PyTorch with TORCH_CUDA_EXPANDABLE_SEGMENTS_IPC=0, or with fabric handles only),
 * LA_ENODEV, LA_ELIMIT. */
LA_API int la_buffer_register_cuda_range(la_client *c, const void *dev_ptr, uint64_t size,
                                         unsigned access, la_buffer **ret_buffer,
                                         uint64_t *ret_offset);

/* Registers VMM allocations the caller exported (cuMemExportToShareableHandle with
 * CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR): fds[i] is allocation i of alloc_sizes[i] bytes (a
 * multiple of the GPU's VMM granularity), the daemon maps them side by side in this order on the
 * GPU device_uuid, and the buffer is bytes [offset, offset + size) of that range, mapped with
 * access (LA_ACCESS_*). The fds stay the caller's (the daemon gets its own copies).
 * Errors: LA_EINVAL (an fd that is not an exported CUDA allocation, sizes not multiples of the
 * granularity, bad access or UUID), LA_ERANGE (the range is not inside the allocations, or an
 * allocation is smaller than listed), LA_ENODEV (no such GPU, or the daemon has no cuda
 * backend), LA_ENOTSUP, LA_ELIMIT. */
LA_API int la_buffer_register_vmm_fd(la_client *c, const int *fds, const uint64_t *alloc_sizes,
                                     size_t n_allocs, uint64_t offset, uint64_t size,
                                     const char *device_uuid, unsigned access,
                                     la_buffer **ret_buffer);

/* For a buffer registered through a device pointer: 1 while every allocation it registered is
 * still mapped where it was (the same allocation), 0 once the memory was freed or replaced
 * (unregister it: the daemon's import keeps the old memory alive). Errors: LA_EINVAL (NULL),
 * LA_ENOTSUP (not registered through a pointer), LA_ENODEV (no CUDA driver). */
LA_API int la_buffer_cuda_valid(const la_buffer *b);

/* Registers a CUDA IPC memory handle (cudaIpcMemHandle_t bytes, handle_len must be 64) of an
 * allocation of size bytes on the GPU with UUID device_uuid ("GPU-xxxxxxxx-..." or 32 hex
 * digits). Errors: LA_EINVAL, LA_ENODEV, LA_ERANGE (size larger than the real allocation). */
LA_API int la_buffer_register_cuda_ipc(la_client *c, const void *handle, size_t handle_len,
                                       const char *device_uuid, uint64_t size,
                                       la_buffer **ret_buffer);

/* Host address of a host buffer (NULL for CUDA buffers), its size, and its id on the daemon. */
LA_API void *la_buffer_host_ptr(const la_buffer *b);
LA_API uint64_t la_buffer_size(const la_buffer *b);
LA_API uint64_t la_buffer_id(const la_buffer *b);

/* Drops one reference; the last one unregisters the buffer on the daemon (which releases it
 * once in-flight work using it has finished) and unmaps it here. NULL is allowed. */
LA_API int la_buffer_unregister(la_buffer *b);

/* ---------------------------------------------------------------------------------------- */
/* Sessions: one generation, holding the skip masks of every layer. */

typedef struct la_session_config la_session_config;
typedef struct la_session la_session;

LA_API int la_session_config_new(la_session_config **ret_config);
LA_API void la_session_config_free(la_session_config *cfg);
/* Required. max_seq_k == 0 means max_seq_q; batch, kv_shards == 0 mean 1. */
LA_API int la_session_config_set_geometry(la_session_config *cfg, uint32_t layers, uint32_t heads,
                                          uint32_t head_dim, la_dtype dtype, uint32_t max_seq_q,
                                          uint32_t max_seq_k, uint32_t batch, uint32_t kv_shards);
/* Threshold tau in log2 units (default -3). -INFINITY skips nothing. */
LA_API int la_session_config_set_threshold(la_session_config *cfg, float tau);
/* Per-step thresholds: step s uses tau[min(s, n-1)]. n == 0 clears the schedule. */
LA_API int la_session_config_set_schedule(la_session_config *cfg, const float *tau, size_t n);
/* Default mode of calls (LA_MODE_SKIP unless set). */
LA_API int la_session_config_set_mode(la_session_config *cfg, la_mode mode);
LA_API int la_session_config_set_direction(la_session_config *cfg, la_direction dir);
/* Where the session computes: "auto" (default: the GPU of its buffers if any, else cpu),
 * "cpu", "cuda", or a GPU UUID. */
LA_API int la_session_config_set_device(la_session_config *cfg, const char *device);

/* Warm start across generations (docs/SKIP-SEMANTICS.md): the session's masks start from the
 * settled masks that earlier generations of this Unix user deposited under warm key `key`
 * (at most 255 printable bytes; name the model, resolution and step count in it) instead of
 * all ones, and this generation's masks are deposited for later ones. The store is the
 * daemon's, per user, bounded in bytes; sessions of other users never see it. key NULL turns
 * the warm start off (the default). Options (LA_WARM_DEFAULT for the default):
 *   step         the step whose settled masks are deposited, once every layer's call at that
 *                step finished (default: the masks when the session is closed);
 *   generations  how many of the latest stored generations the seed ORs (default 4, at most
 *                the daemon's warm_max_generations);
 *   margin       tiles the seed is widened by along q and k (default 1, at most 16);
 *   dense_steps  first steps computed densely (their decisions still recorded) before the
 *                seed is applied (default 1; 0 applies it at step 0).
 * The daemon judges the values when the session opens (LA_EINVAL names the one refused). */
#define LA_WARM_DEFAULT UINT32_MAX
LA_API int la_session_config_set_warm_start(la_session_config *cfg, const char *key,
                                            uint32_t step, uint32_t generations, uint32_t margin,
                                            uint32_t dense_steps);
/* Online quality guardrail (docs/SKIP-SEMANTICS.md): every `every` steps (0: off, the
 * default) the daemon computes `sample` q-tiles of each (batch row, head) densely (0: 1, at
 * most 64) and compares them with the sparse call; a q-tile whose rows lost more than
 * `budget` of their probability mass (0: 0.05) has its mask row restored to all ones for the
 * rest of the generation. la_session_stat "guard_*" counts what it did. */
LA_API int la_session_config_set_guard(la_session_config *cfg, uint32_t every, uint32_t sample,
                                       float budget);

/* Opens a new session under key (at most 255 bytes; unique per user). Masks start all ones
 * (or from the warm seed, la_session_config_set_warm_start).
 * Errors: LA_EEXIST (key in use: attach instead), LA_ENOTSUP (head dim/dtype the chosen
 * backend lacks), LA_ELIMIT (sessions or mask bytes of this user), LA_EINVAL. */
LA_API int la_session_open(la_client *c, const char *key, const la_session_config *cfg,
                           la_session **ret_session);
/* Attaches to an open session of the same Unix user (e.g. after a reconnect).
 * Errors: LA_ENOENT (no such session, or it belongs to another user). */
LA_API int la_session_attach(la_client *c, const char *key, la_session **ret_session);

/* Integer facts about the session: "id", "layers", "heads", "head_dim", "dtype",
 * "max_seq_q", "max_seq_k", "batch", "kv_shards", "bm", "bn", "mask_bytes" (all layers),
 * "layer_mask_bytes" (one layer, one kv shard), "n_q_tiles", "n_k_words",
 * "warm_generations" (generations the warm seed combines; 0: the session started cold).
 * Errors: LA_ENOENT for an unknown name. */
LA_API int la_session_get(const la_session *s, const char *name, int64_t *ret_value);
/* Text facts: "key", "warm_key" ("" without a warm start), "warm_status" (what the warm start
 * did, e.g. "warm: seeded from 3 generations of warm key '...' (OR, margin 1 tile)" or
 * "cold: no stored masks for warm key '...'"; "" without one). NULL for an unknown name. The
 * string lives as long as the handle. */
LA_API const char *la_session_text(const la_session *s, const char *name);

/* Live-tile fraction of each layer (averaged over kv shards) into live[0..n) (n >= layers
 * fills all) and the number of attention calls so far. Either output may be NULL. */
LA_API int la_session_info(la_session *s, double *ret_live, size_t n, uint64_t *ret_calls);

/* One statistic of the session, fetched from the daemon: "calls", "tiles_total",
 * "tiles_computed", "tiles_skipped" (over all calls so far), "restarts" (layers started over
 * because a call's step was lower than the layer's last step: each such layer's mask was set
 * to all ones first, so the first step of every generation is dense), "warm_generations",
 * "warm_deposits" (generations this session deposited for later warm starts),
 * "guard_checks" (calls the guardrail checked), "guard_rows" (q-tile rows it compared),
 * "guard_restored" (rows it restored), "guard_tiles" (tiles its dense samples computed,
 * beside "tiles_computed").
 * Errors: LA_ENOENT (unknown name, or the session is gone), LA_ECLOSED. */
LA_API int la_session_stat(la_session *s, const char *name, int64_t *ret_value);

/* Copies the packed live mask of (layer, kv_shard): [batch, heads, n_q_tiles, n_k_words]
 * uint32, bit n%32 of word n/32 = k-tile n, 1 = compute. len must be >= layer_mask_bytes. */
LA_API int la_session_read_mask(la_session *s, uint32_t layer, uint32_t kv_shard, void *dst,
                                size_t len);

/* Resets every mask to all ones (the next call is dense). */
LA_API int la_session_reset(la_session *s);
/* Closes the session on the daemon and frees the handle. NULL is allowed. */
LA_API int la_session_close(la_session *s);
/* Frees the handle but leaves the session open on the daemon, to be attached later. */
LA_API void la_session_detach(la_session *s);

/* ---------------------------------------------------------------------------------------- */
/* Attention calls. A la_attn describes one call; it can be reused and changed between calls.
 * NaN in the inputs propagates as in PyTorch's scaled_dot_product_attention, over the tiles
 * actually computed: a query row with a NaN score gets O and LSE NaN; a NaN in V reaches its
 * column of O. A call whose step is lower than its layer's last step starts the layer over
 * (all tiles live), see la_session_stat "restarts". */

typedef struct la_attn la_attn;
typedef struct la_call la_call;

LA_API int la_attn_new(la_attn **ret_attn);
LA_API void la_attn_free(la_attn *a);

/* Names a tensor: byte_offset into buf, ndim sizes and strides in elements (strides NULL:
 * contiguous, row-major). Q/K/V/O take 4 dims (B, S, H, D), LSE 3 (B, H, Sq). DECISIONS takes
 * no shape (ndim 0): it has the session's mask layout for one layer. Passing buf NULL removes
 * an optional tensor (LSE, DECISIONS, ROW_MAX). Errors: LA_EINVAL (wrong ndim or role).
 *
 * ROW_MAX, 3 dims (B, H, Sq) f32, is read and written in place: carried row maxima for ring
 * attention (docs/SKIP-SEMANTICS.md "Carried row maxima"). The call's skip votes compare each
 * tile against max(ROW_MAX, the call's running maximum) instead of the running maximum alone,
 * and the call ends by writing max(ROW_MAX, its own row maxima, in raw score units q.k) back.
 * Fill it with -INFINITY before the first K/V shard of a query shard and hand the same tensor
 * to the calls of the next shards: their votes then see every shard already done. O and LSE do
 * not depend on it. A daemon that predates it fails the call with LA_ENOTSUP (la_call_wait). */
LA_API int la_attn_set_tensor(la_attn *a, la_tensor_role role, const la_buffer *buf,
                              uint64_t byte_offset, la_dtype dtype, int ndim, const int64_t *shape,
                              const int64_t *strides);
LA_API int la_attn_set_position(la_attn *a, uint32_t layer, uint32_t step, uint32_t kv_shard);
/* Softmax scale; 0 (default) means 1/sqrt(D). */
LA_API int la_attn_set_scale(la_attn *a, float scale);
/* Threshold for this call only, overriding the session's; NAN clears the override. */
LA_API int la_attn_set_threshold(la_attn *a, float tau);
LA_API int la_attn_set_mode(la_attn *a, la_mode mode);
/* Half-open key ranges [pairs[2i], pairs[2i+1]); n == 0 clears. At most 64 ranges each. */
LA_API int la_attn_set_must_do(la_attn *a, const int64_t *pairs, size_t n);
LA_API int la_attn_set_must_skip(la_attn *a, const int64_t *pairs, size_t n);
/* Dry run: the decisions go to the DECISIONS tensor, the session's mask is left alone. */
LA_API int la_attn_set_dry_run(la_attn *a, int on);
/* CUDA: the daemon's stream waits on this interprocess event (cudaIpcEventHandle_t bytes,
 * len 64) before it reads Q/K/V. len 0 clears. */
LA_API int la_attn_set_wait_event(la_attn *a, const void *ipc_event_handle, size_t len);

/* Called once when a submitted call finishes (status 0 or a negative error). */
typedef void (*la_done_fn)(la_call *call, int status, void *user);

/* Sends the call and returns at once. cb may be NULL (then poll or wait). The la_call belongs
 * to the caller (la_call_free), also after the callback ran. If this returns an error the
 * callback never fires. Errors: LA_EBUSY (too many calls in flight on this client), LA_EINVAL,
 * LA_ECLOSED. */
LA_API int la_attn_submit(la_session *s, const la_attn *a, la_done_fn cb, void *user,
                          la_call **ret_call);
/* Submits and waits. ret_call may be NULL; otherwise it receives the finished call. */
LA_API int la_attn_run(la_session *s, const la_attn *a, la_call **ret_call);

/* Waits up to timeout_ms (-1 forever) for the call. Returns its status, or LA_ETIMEDOUT. */
LA_API int la_call_wait(la_call *call, int timeout_ms);
/* The status if finished, LA_EAGAIN if not (does not read the socket). */
LA_API int la_call_status(const la_call *call);
/* Figures of a finished call: "tiles_total", "tiles_computed" (tiles actually computed),
 * "compute_ns" (backend time), "queue_ns" (time waiting for a worker).
 * Errors: LA_EAGAIN (not finished), LA_ENOENT (unknown name). */
LA_API int la_call_stat(const la_call *call, const char *name, int64_t *ret_value);
/* CUDA: the interprocess event (64 bytes) the daemon recorded after the kernel; the caller's
 * stream may wait on it instead of on the reply. Errors: LA_ENOENT (CPU backend). */
LA_API int la_call_done_event(const la_call *call, void *ret_handle, size_t len);
/* Frees a call. A call still in flight is detached: its callback no longer fires. */
LA_API void la_call_free(la_call *call);

/* ---------------------------------------------------------------------------------------- */
/* Asynchronous calls ordered on the GPU: the fast path (docs/FASTPATH.md).
 *
 * la_attn_enqueue() makes one socket write and returns; no host round trip lies on the GPU's
 * critical path. On a CUDA session it enqueues on cuda_stream, after the work already there
 * (which produces Q/K/V): a write of "inputs ready" into a doorbell slot that the daemon's
 * stream waits on, and a wait for that slot's "done", which the daemon's stream writes right
 * after the kernel. Work enqueued on cuda_stream afterwards therefore sees O and LSE, as if the
 * kernel had been launched on cuda_stream itself. The daemon's reply (errors, figures) comes
 * back later and is read by any later call into the client.
 *
 * The doorbell is host memory both processes map (a sealed memfd, pinned for the GPU by each),
 * made on the first call (one extra round trip). A failed call still writes its done slot, so
 * the stream never hangs on it: its output is then undefined, and the error is reported by the
 * call's la_call (ret_call) or, for calls made with ret_call NULL, by the next la_attn_enqueue
 * on the same session (which then returns that error and makes no call) or la_session_sync /
 * la_client_sync. A launched call whose doorbell is never written (the process died, or its
 * stream hangs) is released by the daemon after "limit.doorbell_timeout_ms" and fails with
 * LA_ETIMEDOUT.
 *
 * Buffers and memory: the tensors are read and written by the daemon between the ring and the
 * done on cuda_stream, so memory freed after la_attn_enqueue returns (a temporary of PyTorch's
 * caching allocator, reused by later work on the same stream) is safe, as with a kernel of this
 * process. Using the memory from another stream needs that stream to wait for cuda_stream.
 *
 * On a session of the CPU backend cuda_stream must be NULL: the library rings the slot from the
 * host before it sends the call, and the outputs are there once the call completed
 * (la_call_wait, la_session_sync). */

/* 0 when la_attn_enqueue can be used on s: the daemon takes fast-path calls on the session's
 * device ("fastpath.devices") and, for a GPU, this process's CUDA driver has stream memory
 * operations (cuStreamWaitValue32_v2; drivers of CUDA 11.7 and later). Otherwise LA_ENOTSUP
 * with the reason in la_last_error_message(); la_attn_run and the IPC events still work. */
LA_API int la_session_fastpath(const la_session *s);

/* Sends the call of a on s, ordered on cuda_stream (a CUstream / cudaStream_t of the session's
 * GPU; NULL: the legacy default stream of the current context; NULL for CPU sessions), and
 * returns without waiting for the daemon. While the client has "limit.max_inflight" requests
 * in flight it first waits for a reply. ret_call may be NULL (the library frees the call when
 * its reply arrives; its error is deferred as above); otherwise *ret_call behaves as a call of
 * la_attn_submit (la_call_wait, la_call_stat, la_call_free), and its error is reported there
 * only. Errors: those of la_attn_submit, plus the deferred error of an earlier call of s (this
 * call is then not made), LA_ENOTSUP (see la_session_fastpath), LA_EDEVICE (enqueueing on the
 * stream failed: nothing was sent), LA_ELIMIT (every doorbell slot was retired after
 * timeouts: reconnect). */
LA_API int la_attn_enqueue(la_session *s, const la_attn *a, void *cuda_stream, la_call **ret_call);

/* Waits up to timeout_ms (-1: forever) until every la_attn_enqueue call of s has its reply,
 * then reports (and clears) the first deferred error of s: 0 or its code, the message in
 * la_last_error_message(). LA_ETIMEDOUT when calls are still in flight (the GPU may not have
 * reached them yet: this does not wait for the GPU, only for the daemon's replies). */
LA_API int la_session_sync(la_session *s, int timeout_ms);

/* The same for every session of c, and for calls whose session handle is gone: the earliest
 * deferred error is reported. */
LA_API int la_client_sync(la_client *c, int timeout_ms);

/* la_session_info, la_session_stat, la_session_read_mask and la_session_reset first wait for
 * the replies of s's enqueued calls, so that they see (or reset after) every call made before
 * them; the calls' errors stay deferred. */

/* Figures of s's la_attn_enqueue calls whose replies arrived (this handle only): "calls"
 * (succeeded), "failed", "inflight" (sent, no reply yet), "tiles_total", "tiles_computed",
 * "compute_ns", "queue_ns" (sums over the calls that succeeded). Errors: LA_ENOENT. */
LA_API int la_session_counter(const la_session *s, const char *name, int64_t *ret_value);

#ifdef __cplusplus
}
#endif
#endif /* LITEATTN_H */
