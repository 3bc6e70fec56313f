/*
 * warmstore.h — private to the engine: the warm-start store (docs/SKIP-SEMANTICS.md, "Warm
 * start across generations"). Settled masks of earlier generations, per Unix user, keyed by
 * (warm key, geometry), bounded in bytes per user (the least recently used key's oldest
 * generation goes first), optionally persisted under a state directory (one file per entry,
 * <dir>/<uid>/<hash>.lawarm, written by a writer thread through a temporary file and a rename,
 * checked on load).
 *
 * Threading: every ws_* function is called from the engine's loop thread. Generations are
 * immutable once deposited and refcounted, so the writer thread reads them without a copy.
 * Errors: 0 or a negative LA_E* code; messages go to the log sink (a library module never
 * prints).
 */
#ifndef LA_WARMSTORE_H
#define LA_WARMSTORE_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"
#include "logsink.h"

typedef struct ws ws;

/* What makes stored masks usable by a session: its tiling of every (layer, kv shard). */
typedef struct ws_geom {
    uint32_t layers, kv_shards, batch, heads, n_q_tiles, n_k_tiles, n_k_words, bm, bn;
} ws_geom;

/* Bytes of one (layer, shard) region and of one generation (every region), 0 on overflow. */
uint64_t ws_region_bytes(const ws_geom *g);
uint64_t ws_generation_bytes(const ws_geom *g);

typedef struct ws_config {
    uint64_t bytes_per_user;  /* mask bytes one user's entries may hold (> 0) */
    uint32_t max_generations; /* kept per entry (1..WS_MAX_GENERATIONS) */
    const char *state_dir;    /* NULL or "": no persistence */
    logsink_fn log;
    void *log_data;
} ws_config;

#define WS_MAX_GENERATIONS 64
#define WS_MAX_MARGIN 16

/* Creates the store and, with a state directory, loads what it holds (files that fail a
 * check are refused with a log line and left alone). An unusable state directory is logged
 * and persistence is off; only LA_ENOMEM fails. */
int ws_new(const ws_config *cfg, ws **ret_store);
/* Waits for the writer, frees everything. NULL is allowed. */
void ws_free(ws *w);
/* Waits until every queued file write or removal is done. */
void ws_flush(ws *w);

/* Adds one generation (masks: ws_generation_bytes(g) bytes, copied) for (uid, key, g), evicting
 * the user's least recently used generations to stay under the limit. Errors: LA_ELIMIT (one
 * generation is larger than the user's limit), LA_ENOMEM, LA_EINVAL. */
int ws_deposit(ws *w, uint32_t uid, const char *key, const ws_geom *g, const void *masks);

/* The seed for a session of uid with (key, g): the OR of the `generations` most recent stored
 * generations, widened by `margin` tiles along q and k, written into out (ws_generation_bytes
 * bytes). Returns the number of generations used (0: none; out untouched) and a sentence for
 * the open reply in status. */
int ws_seed(ws *w, uint32_t uid, const char *key, const ws_geom *g, uint32_t generations,
            uint32_t margin, uint32_t *out, char *status, size_t status_len);

typedef struct ws_entry_info {
    uint32_t uid;
    const char *key;
    ws_geom geom;
    uint32_t generations;
    uint64_t bytes;
    uint64_t deposited_ago_ms; /* since the newest generation was deposited (wall clock) */
    uint64_t seeds;            /* sessions seeded from it since the daemon started */
    int persisted;             /* its file is written (or queued) */
} ws_entry_info;
/* Calls fn for each entry of uid (uid 0: every user's), least recently used first. */
void ws_list(ws *w, uint32_t uid, void (*fn)(void *data, const ws_entry_info *e), void *data);
/* Removes uid's entries named key (every geometry; key NULL: all of uid's) and their files.
 * Returns how many entries went. */
uint64_t ws_drop(ws *w, uint32_t uid, const char *key);

/* Counters for the engine's Stats reply. */
void ws_stats(const ws *w, void (*fn)(void *data, const char *name, int64_t value), void *data);

#endif /* LA_WARMSTORE_H */
