/*
 * warmstore.c — the warm-start store (warmstore.h): entries per user in LRU order, the seed
 * (OR of recent generations, widened), and persistence.
 *
 * Bytes of a user: the mask bytes of its generations plus a fixed overhead per entry and per
 * generation (so that many tiny entries cannot hold unbounded memory). A deposit that brings
 * the user over its limit evicts the oldest generation of the least recently used entry (an
 * entry is used when it is deposited into or seeds a session) until it fits; an entry without
 * generations goes, with its file.
 *
 * Files (little-endian): header {magic "LAWARM01", u32 version, u32 uid, u32 key_len,
 * u32 n_generations, u32 geometry[9], u64 generation_bytes, u64 file_bytes}, the key, then per
 * generation {u64 deposited_unix_ms, generation_bytes of masks}, then u64 FNV-1a 64 of every
 * byte before it. The writer thread writes <name>.tmp.<pid>.<seq> (O_EXCL, mode 0600), fsyncs
 * it, renames it over <name> and fsyncs the folder, so a reader sees the old file or the new
 * one. At start every file is checked (regular file owned by the daemon's user, under the
 * folder of the uid it names, expected name, sizes, checksum, geometry, key); one that fails is
 * refused with a log line and left where it is. Temporary files of an earlier run are removed.
 *
 * Over 900 lines on purpose: the store in memory, the writer thread and the loader share the
 * users, entries and byte accounting under the store's one lock, and the file format is
 * written and checked side by side.
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "codes.h"
#include "escape.h"
#include "list.h"
#include "users.h"
#include "warmstore.h"

#define MAGIC "LAWARM01"
#define FILE_VERSION 1u
#define HEADER_BYTES (8 + 4 * 4 + 9 * 4 + 8 + 8)
#define ENTRY_OVERHEAD 512u
#define GEN_OVERHEAD 64u
#define SUFFIX ".lawarm"

typedef struct ws_gen {
    atomic_int refs;
    uint64_t deposited_unix_ms;
    uint64_t bytes;
    uint8_t data[];
} ws_gen;

typedef struct ws_entry {
    list_node link; /* the user's entries, least recently used first */
    uint32_t uid;
    char key[ENG_KEY_MAX + 1];
    char key_esc[4 * ENG_KEY_MAX + 1];
    ws_geom geom;
    uint64_t gen_bytes;
    ws_gen *gens[WS_MAX_GENERATIONS]; /* newest first */
    uint32_t n_gens;
    uint64_t seeds;
    char name[40]; /* file name inside the uid's folder */
    int persisted;
} ws_entry;

typedef struct ws_user {
    uid_node node; /* in the store's users */
    uint64_t bytes;
    list_node entries;
} ws_user;

typedef struct ws_op {
    struct ws_op *next;
    int remove; /* 1: unlink path; 0: write the entry image */
    char dir[PATH_MAX];
    char path[PATH_MAX];
    uint8_t header[HEADER_BYTES + ENG_KEY_MAX];
    size_t header_len;
    ws_gen *gens[WS_MAX_GENERATIONS];
    uint32_t n_gens;
    uint64_t gen_bytes;
} ws_op;

struct ws {
    ws_config cfg;
    char dir[PATH_MAX];
    int persist;
    list_node users;
    uint64_t seq;

    pthread_t writer;
    int writer_started;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    ws_op *head, *tail;
    int busy, stopping;

    uint64_t n_deposits, n_deposits_refused, n_seeds, n_evicted, n_files_loaded,
        n_files_refused;
    atomic_uint_fast64_t n_write_errors, n_files_written;
};

#define logw(w, level, ...) logsink_printf((w)->cfg.log, (w)->cfg.log_data, level, __VA_ARGS__)

/* ---- small helpers --------------------------------------------------------------------------- */

static uint64_t unix_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t fnv_step(uint64_t h, const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 1099511628211ull;
    }
    return h;
}
#define FNV_INIT 14695981039346656037ull

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t)p[i] << (8 * i);
    return v;
}
static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

uint64_t ws_region_bytes(const ws_geom *g)
{
    uint64_t r;
    if (__builtin_mul_overflow((uint64_t)g->batch, (uint64_t)g->heads, &r) ||
        __builtin_mul_overflow(r, (uint64_t)g->n_q_tiles, &r) ||
        __builtin_mul_overflow(r, (uint64_t)g->n_k_words * 4u, &r))
        return 0;
    return r;
}

uint64_t ws_generation_bytes(const ws_geom *g)
{
    uint64_t r = ws_region_bytes(g);
    if (__builtin_mul_overflow(r, (uint64_t)g->layers, &r) ||
        __builtin_mul_overflow(r, (uint64_t)g->kv_shards, &r))
        return 0;
    return r;
}

static int geom_ok(const ws_geom *g)
{
    return g->layers && g->kv_shards && g->batch && g->heads && g->n_q_tiles && g->n_k_tiles &&
           g->bm && g->bn && g->n_k_words == (g->n_k_tiles + 31) / 32 &&
           ws_generation_bytes(g) != 0;
}

static int geom_eq(const ws_geom *a, const ws_geom *b)
{
    return a->layers == b->layers && a->kv_shards == b->kv_shards && a->batch == b->batch &&
           a->heads == b->heads && a->n_q_tiles == b->n_q_tiles && a->n_k_tiles == b->n_k_tiles &&
           a->n_k_words == b->n_k_words && a->bm == b->bm && a->bn == b->bn;
}

static void geom_words(const ws_geom *g, uint32_t out[9])
{
    uint32_t v[9] = {g->layers,    g->kv_shards, g->batch, g->heads, g->n_q_tiles,
                     g->n_k_tiles, g->n_k_words, g->bm,    g->bn};
    memcpy(out, v, sizeof v);
}

static int key_ok(const char *key, size_t n)
{
    if (n == 0 || n > ENG_KEY_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)key[i];
        if (c < 0x20 || c == 0x7f)
            return 0;
    }
    return 1;
}

/* "<16 hex of FNV(key)><8 hex of FNV(geometry)>.lawarm" */
static void file_name(const char *key, const ws_geom *g, char out[40])
{
    uint32_t gw[9];
    geom_words(g, gw);
    uint64_t hk = fnv_step(FNV_INIT, key, strlen(key));
    uint64_t hg = fnv_step(FNV_INIT, gw, sizeof gw);
    snprintf(out, 40, "%016llx%08x" SUFFIX, (unsigned long long)hk, (unsigned)(hg & 0xffffffffu));
}

static void gen_unref(ws_gen *g)
{
    if (g && atomic_fetch_sub(&g->refs, 1) == 1)
        free(g);
}

static ws_user *user_get(ws *w, uint32_t uid, int create)
{
    ws_user *u = uid_get(&w->users, uid, sizeof *u, create);
    if (u && !u->entries.next) /* just made */
        list_init(&u->entries);
    return u;
}

static uint64_t entry_cost(const ws_entry *e)
{
    return ENTRY_OVERHEAD + (uint64_t)e->n_gens * (e->gen_bytes + GEN_OVERHEAD);
}

/* ---- the writer ---------------------------------------------------------------------------- */

static void op_free(ws_op *op)
{
    for (uint32_t i = 0; i < op->n_gens; i++)
        gen_unref(op->gens[i]);
    free(op);
}

static int write_all(int fd, const void *p, size_t n)
{
    const uint8_t *b = p;
    while (n) {
        ssize_t k = write(fd, b, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

static void fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

static void do_op(ws *w, ws_op *op, uint64_t seq)
{
    if (op->remove) {
        if (unlink(op->path) < 0 && errno != ENOENT) {
            atomic_fetch_add(&w->n_write_errors, 1);
            logw(w, LOG_WARN, "warm store: cannot remove %s: %s", op->path, strerror(errno));
        } else {
            fsync_dir(op->dir);
        }
        return;
    }
    if (mkdir(op->dir, 0700) < 0 && errno != EEXIST) {
        atomic_fetch_add(&w->n_write_errors, 1);
        logw(w, LOG_WARN, "warm store: cannot create %s: %s", op->dir, strerror(errno));
        return;
    }
    char tmp[PATH_MAX + 64];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld.%llu", op->path, (long)getpid(),
             (unsigned long long)seq);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        atomic_fetch_add(&w->n_write_errors, 1);
        logw(w, LOG_WARN, "warm store: cannot write %s: %s", tmp, strerror(errno));
        return;
    }
    uint64_t h = fnv_step(FNV_INIT, op->header, op->header_len);
    int rc = write_all(fd, op->header, op->header_len);
    for (uint32_t i = 0; rc == 0 && i < op->n_gens; i++) {
        uint8_t ms[8];
        put64(ms, op->gens[i]->deposited_unix_ms);
        h = fnv_step(h, ms, 8);
        h = fnv_step(h, op->gens[i]->data, op->gen_bytes);
        rc = write_all(fd, ms, 8);
        if (rc == 0)
            rc = write_all(fd, op->gens[i]->data, op->gen_bytes);
    }
    uint8_t sum[8];
    put64(sum, h);
    if (rc == 0)
        rc = write_all(fd, sum, 8);
    if (rc == 0 && fsync(fd) < 0)
        rc = -1;
    int e = errno;
    close(fd);
    if (rc == 0 && rename(tmp, op->path) < 0) {
        rc = -1;
        e = errno;
    }
    if (rc < 0) {
        unlink(tmp);
        atomic_fetch_add(&w->n_write_errors, 1);
        logw(w, LOG_WARN, "warm store: writing %s failed: %s", op->path, strerror(e));
        return;
    }
    fsync_dir(op->dir);
    atomic_fetch_add(&w->n_files_written, 1);
}

static void *writer_main(void *arg)
{
    ws *w = arg;
    uint64_t seq = 0;
    pthread_mutex_lock(&w->lock);
    for (;;) {
        ws_op *op = w->head;
        if (!op) {
            w->busy = 0;
            pthread_cond_broadcast(&w->cond);
            if (w->stopping)
                break;
            pthread_cond_wait(&w->cond, &w->lock);
            continue;
        }
        w->head = op->next;
        if (!w->head)
            w->tail = NULL;
        w->busy = 1;
        pthread_mutex_unlock(&w->lock);
        do_op(w, op, ++seq);
        op_free(op);
        pthread_mutex_lock(&w->lock);
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

static void queue_op(ws *w, ws_op *op)
{
    pthread_mutex_lock(&w->lock);
    slist_append(w->head, w->tail, op, next);
    w->busy = 1;
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

static ws_op *op_new(ws *w, uint32_t uid, const char *name)
{
    ws_op *op = calloc(1, sizeof *op);
    if (!op)
        return NULL;
    if (snprintf(op->dir, sizeof op->dir, "%s/%u", w->dir, uid) >= (int)sizeof op->dir ||
        snprintf(op->path, sizeof op->path, "%s/%u/%s", w->dir, uid, name) >=
            (int)sizeof op->path) {
        free(op);
        return NULL;
    }
    return op;
}

/* Queues the entry's current image (or its removal when it has no generation). */
static void persist_entry(ws *w, ws_entry *e)
{
    if (!w->persist)
        return;
    ws_op *op = op_new(w, e->uid, e->name);
    if (!op) {
        logw(w, LOG_WARN, "warm store: out of memory writing the entry of key '%s'", e->key_esc);
        return;
    }
    if (e->n_gens == 0) {
        op->remove = 1;
        e->persisted = 0;
        queue_op(w, op);
        return;
    }
    size_t kl = strlen(e->key);
    uint8_t *p = op->header;
    memcpy(p, MAGIC, 8);
    put32(p + 8, FILE_VERSION);
    put32(p + 12, e->uid);
    put32(p + 16, (uint32_t)kl);
    put32(p + 20, e->n_gens);
    uint32_t gw[9];
    geom_words(&e->geom, gw);
    for (int i = 0; i < 9; i++)
        put32(p + 24 + 4 * i, gw[i]);
    put64(p + 60, e->gen_bytes);
    uint64_t file_bytes = HEADER_BYTES + kl + (uint64_t)e->n_gens * (8 + e->gen_bytes) + 8;
    put64(p + 68, file_bytes);
    memcpy(p + HEADER_BYTES, e->key, kl);
    op->header_len = HEADER_BYTES + kl;
    op->gen_bytes = e->gen_bytes;
    for (uint32_t i = 0; i < e->n_gens; i++) {
        atomic_fetch_add(&e->gens[i]->refs, 1);
        op->gens[op->n_gens++] = e->gens[i];
    }
    e->persisted = 1;
    queue_op(w, op);
}

void ws_flush(ws *w)
{
    if (!w || !w->writer_started)
        return;
    pthread_mutex_lock(&w->lock);
    while (w->busy || w->head)
        pthread_cond_wait(&w->cond, &w->lock);
    pthread_mutex_unlock(&w->lock);
}

/* ---- entries ------------------------------------------------------------------------------- */

static void entry_free(ws_entry *e)
{
    for (uint32_t i = 0; i < e->n_gens; i++)
        gen_unref(e->gens[i]);
    free(e);
}

static void entry_remove(ws *w, ws_user *u, ws_entry *e)
{
    u->bytes -= entry_cost(e);
    list_remove(&e->link);
    for (uint32_t i = 0; i < e->n_gens; i++)
        gen_unref(e->gens[i]);
    e->n_gens = 0;
    if (e->persisted)
        persist_entry(w, e); /* the removal of its file */
    free(e);
}

/* Drops the oldest generation of u's least recently used entries until u fits the limit;
 * the entries that lost a generation but kept some are rewritten. */
static void evict(ws *w, ws_user *u)
{
    ws_entry *dirty[64];
    size_t n_dirty = 0;
    while (u->bytes > w->cfg.bytes_per_user && !list_empty(&u->entries)) {
        ws_entry *e = list_first_entry(&u->entries, ws_entry, link);
        w->n_evicted++;
        if (e->n_gens <= 1) {
            logw(w, LOG_DEBUG, "warm store: uid %u: key '%s' evicted (store limit %llu bytes)",
                 u->node.uid, e->key_esc, (unsigned long long)w->cfg.bytes_per_user);
            for (size_t i = 0; i < n_dirty; i++)
                if (dirty[i] == e)
                    dirty[i] = dirty[--n_dirty];
            entry_remove(w, u, e);
            continue;
        }
        gen_unref(e->gens[--e->n_gens]);
        u->bytes -= e->gen_bytes + GEN_OVERHEAD;
        size_t i = 0;
        while (i < n_dirty && dirty[i] != e)
            i++;
        if (i == n_dirty && n_dirty < 64)
            dirty[n_dirty++] = e;
        else if (i == n_dirty)
            persist_entry(w, e);
    }
    for (size_t i = 0; i < n_dirty; i++)
        persist_entry(w, dirty[i]);
}

static ws_entry *entry_find(ws_user *u, const char *key, const ws_geom *g)
{
    ws_entry *e;
    list_find_entry(e, &u->entries, ws_entry, link, !strcmp(e->key, key) && geom_eq(&e->geom, g));
    return e;
}

static ws_entry *entry_new(uint32_t uid, const char *key, const ws_geom *g)
{
    ws_entry *e = calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->uid = uid;
    snprintf(e->key, sizeof e->key, "%s", key);
    esc_str(e->key_esc, sizeof e->key_esc, key);
    e->geom = *g;
    e->gen_bytes = ws_generation_bytes(g);
    file_name(key, g, e->name);
    return e;
}

int ws_deposit(ws *w, uint32_t uid, const char *key, const ws_geom *g, const void *masks)
{
    if (!key || !key_ok(key, strlen(key)) || !geom_ok(g) || !masks)
        return LA_EINVAL;
    uint64_t gb = ws_generation_bytes(g);
    ws_user *u = user_get(w, uid, 1);
    if (!u)
        return LA_ENOMEM;
    ws_entry *e = entry_find(u, key, g);
    uint64_t need = gb + GEN_OVERHEAD + (e ? 0 : ENTRY_OVERHEAD);
    if (gb > UINT64_MAX - 2 * ENTRY_OVERHEAD || need > w->cfg.bytes_per_user) {
        w->n_deposits_refused++;
        char ek[ESC_MAX(ENG_KEY_MAX)];
        logw(w, LOG_INFO,
             "warm store: uid %u: a generation of key '%s' needs %llu bytes, more than the "
             "store's limit of %llu bytes per user: not kept",
             uid, esc_str(ek, sizeof ek, key), (unsigned long long)need,
             (unsigned long long)w->cfg.bytes_per_user);
        return LA_ELIMIT;
    }
    ws_gen *gen = malloc(sizeof *gen + gb);
    if (!gen)
        return LA_ENOMEM;
    atomic_init(&gen->refs, 1);
    gen->deposited_unix_ms = unix_ms();
    gen->bytes = gb;
    memcpy(gen->data, masks, gb);
    if (!e) {
        e = entry_new(uid, key, g);
        if (!e) {
            free(gen);
            return LA_ENOMEM;
        }
        list_append(&u->entries, &e->link);
        u->bytes += ENTRY_OVERHEAD;
    } else {
        list_move_tail(&u->entries, &e->link);
    }
    if (e->n_gens == w->cfg.max_generations) {
        gen_unref(e->gens[--e->n_gens]);
        u->bytes -= gb + GEN_OVERHEAD;
    }
    memmove(e->gens + 1, e->gens, e->n_gens * sizeof e->gens[0]);
    e->gens[0] = gen;
    e->n_gens++;
    u->bytes += gb + GEN_OVERHEAD;
    w->n_deposits++;
    /* The entry just used is the most recent one: eviction takes it last, and only older
     * generations of it (need <= the limit). */
    evict(w, u);
    persist_entry(w, e);
    return 0;
}

/* ---- the seed ------------------------------------------------------------------------------ */

/* Row of `words` words widened by margin bits both ways; bits >= k_tiles cleared. tmp: words. */
static void widen_row(uint32_t *row, uint32_t *tmp, uint32_t words, uint32_t k_tiles,
                      uint32_t margin)
{
    memcpy(tmp, row, words * 4u);
    for (uint32_t s = 1; s <= margin; s++)
        for (uint32_t i = 0; i < words; i++) {
            uint32_t up = tmp[i] << s, down = tmp[i] >> s;
            if (i > 0)
                up |= tmp[i - 1] >> (32 - s);
            if (i + 1 < words)
                down |= tmp[i + 1] << (32 - s);
            row[i] |= up | down;
        }
    uint32_t rem = k_tiles % 32;
    if (rem)
        row[k_tiles / 32] &= (1u << rem) - 1u;
    for (uint32_t i = (k_tiles + 31) / 32; i < words; i++)
        row[i] = 0;
}

int ws_seed(ws *w, uint32_t uid, const char *key, const ws_geom *g, uint32_t generations,
            uint32_t margin, uint32_t *out, char *status, size_t status_len)
{
    char ek[ESC_MAX(ENG_KEY_MAX)];
    esc_str(ek, sizeof ek, key ? key : "");
    ws_user *u = user_get(w, uid, 0);
    ws_entry *e = u && key ? entry_find(u, key, g) : NULL;
    if (!e) {
        int other = 0;
        ws_entry *o;
        if (u && key)
            list_for_each_entry (o, &u->entries, ws_entry, link)
                other |= !strcmp(o->key, key);
        snprintf(status, status_len,
                 other ? "cold: the stored masks of warm key '%s' have another geometry "
                         "(layers, shards, batch, heads or tiles)"
                       : "cold: no stored masks for warm key '%s'",
                 ek);
        return 0;
    }
    uint32_t n = generations < e->n_gens ? generations : e->n_gens;
    if (n == 0) {
        snprintf(status, status_len, "cold: warm start asked for 0 generations");
        return 0;
    }
    uint64_t gb = e->gen_bytes, nw = gb / 4;
    memcpy(out, e->gens[0]->data, gb);
    for (uint32_t k = 1; k < n; k++) {
        const uint32_t *src = (const uint32_t *)(const void *)e->gens[k]->data;
        for (uint64_t i = 0; i < nw; i++)
            out[i] |= src[i];
    }
    if (margin > WS_MAX_MARGIN)
        margin = WS_MAX_MARGIN;
    if (margin) {
        const uint32_t words = g->n_k_words, nq = g->n_q_tiles;
        uint32_t *tmp = malloc((size_t)(nq + 1) * words * 4u);
        if (tmp) {
            uint32_t *block = tmp + words; /* one (b, h): nq rows, widened along k */
            uint64_t blocks = gb / 4 / ((uint64_t)nq * words);
            for (uint64_t bl = 0; bl < blocks; bl++) {
                uint32_t *base = out + bl * nq * words;
                for (uint32_t m = 0; m < nq; m++)
                    widen_row(base + (size_t)m * words, tmp, words, g->n_k_tiles, margin);
                memcpy(block, base, (size_t)nq * words * 4u);
                for (uint32_t m = 0; m < nq; m++) {
                    uint32_t lo = m > margin ? m - margin : 0;
                    uint32_t hi = m + margin < nq ? m + margin : nq - 1;
                    uint32_t *dst = base + (size_t)m * words;
                    for (uint32_t r = lo; r <= hi; r++)
                        for (uint32_t i = 0; i < words; i++)
                            dst[i] |= block[(size_t)r * words + i];
                }
            }
            free(tmp);
        } else {
            /* Without memory for the widening the seed would be narrower than asked: all ones
             * (a cold start) is the safe answer. */
            memset(out, 0xff, gb);
            snprintf(status, status_len, "cold: out of memory widening the seed");
            return 0;
        }
    }
    e->seeds++;
    w->n_seeds++;
    list_move_tail(&u->entries, &e->link);
    snprintf(status, status_len,
             "warm: seeded from %u generation%s of warm key '%s' (OR, margin %u tile%s)", n,
             n == 1 ? "" : "s", ek, margin, margin == 1 ? "" : "s");
    return (int)n;
}

/* ---- listing, dropping, counters --------------------------------------------------------------- */

void ws_list(ws *w, uint32_t uid, void (*fn)(void *data, const ws_entry_info *e), void *data)
{
    uint64_t now = unix_ms();
    ws_user *u;
    list_for_each_entry (u, &w->users, ws_user, node.link) {
        if (uid != 0 && u->node.uid != uid)
            continue;
        ws_entry *e;
        list_for_each_entry (e, &u->entries, ws_entry, link) {
            ws_entry_info in;
            memset(&in, 0, sizeof in);
            in.uid = e->uid;
            in.key = e->key;
            in.geom = e->geom;
            in.generations = e->n_gens;
            in.bytes = entry_cost(e);
            uint64_t t = e->n_gens ? e->gens[0]->deposited_unix_ms : now;
            in.deposited_ago_ms = now > t ? now - t : 0;
            in.seeds = e->seeds;
            in.persisted = e->persisted;
            fn(data, &in);
        }
    }
}

uint64_t ws_drop(ws *w, uint32_t uid, const char *key)
{
    ws_user *u = user_get(w, uid, 0);
    if (!u)
        return 0;
    uint64_t n = 0;
    ws_entry *e;
    list_for_each_entry (e, &u->entries, ws_entry, link)
        if (!key || !strcmp(e->key, key)) {
            entry_remove(w, u, e);
            n++;
        }
    return n;
}

void ws_stats(const ws *w, void (*fn)(void *data, const char *name, int64_t value), void *data)
{
    uint64_t bytes = 0, entries = 0, gens = 0;
    const ws_user *u;
    list_for_each_entry (u, &w->users, ws_user, node.link) {
        bytes += u->bytes;
        const ws_entry *e;
        list_for_each_entry (e, &u->entries, ws_entry, link) {
            entries++;
            gens += e->n_gens;
        }
    }
#define STAT(name, v) fn(data, name, (int64_t)(v))
    STAT("warm_entries", entries);
    STAT("warm_generations", gens);
    STAT("warm_bytes", bytes);
    STAT("warm_deposits", w->n_deposits);
    STAT("warm_deposits_refused", w->n_deposits_refused);
    STAT("warm_seeds", w->n_seeds);
    STAT("warm_evicted", w->n_evicted);
    STAT("warm_files_loaded", w->n_files_loaded);
    STAT("warm_files_refused", w->n_files_refused);
    STAT("warm_files_written", atomic_load(&w->n_files_written));
    STAT("warm_write_errors", atomic_load(&w->n_write_errors));
#undef STAT
}

/* ---- loading ------------------------------------------------------------------------------- */

static void refuse(ws *w, const char *path, const char *why)
{
    w->n_files_refused++;
    logw(w, LOG_WARN, "warm store: %s refused: %s (left in place, not used)", path, why);
}

/* Reads and checks one file of uid's folder; adds its entry. */
static void load_file(ws *w, uint32_t uid, const char *dir, const char *name)
{
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path)
        return refuse(w, name, "path too long");
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return refuse(w, path, errno == ELOOP ? "a symbolic link" : strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return refuse(w, path, "not a regular file");
    }
    if (st.st_uid != geteuid()) {
        close(fd);
        return refuse(w, path, "owned by another user than the daemon's");
    }
    uint64_t size = (uint64_t)st.st_size;
    if (size < HEADER_BYTES + 1 + 8 + 8 + 4 ||
        size > w->cfg.bytes_per_user + HEADER_BYTES + ENG_KEY_MAX + 8 * (WS_MAX_GENERATIONS + 1)) {
        close(fd);
        return refuse(w, path, size < HEADER_BYTES ? "truncated (shorter than its header)"
                                                   : "size outside what one user may store");
    }
    uint8_t *b = malloc(size);
    if (!b) {
        close(fd);
        return refuse(w, path, "out of memory");
    }
    uint64_t got = 0;
    while (got < size) {
        ssize_t k = read(fd, b + got, size - got);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            break;
        got += (uint64_t)k;
    }
    close(fd);
    const char *why = NULL;
    ws_geom g;
    uint32_t kl = 0, ng = 0;
    uint64_t gb = 0;
    char key[ENG_KEY_MAX + 1];
    if (got != size)
        why = "short read";
    else if (memcmp(b, MAGIC, 8))
        why = "not a liteattn warm-store file (bad magic)";
    else if (get32(b + 8) != FILE_VERSION)
        why = "unknown version";
    else if (get32(b + 12) != uid)
        why = "written for another uid than its folder's";
    if (!why) {
        kl = get32(b + 16);
        ng = get32(b + 20);
        uint32_t gw[9];
        for (int i = 0; i < 9; i++)
            gw[i] = get32(b + 24 + 4 * i);
        g = (ws_geom){gw[0], gw[1], gw[2], gw[3], gw[4], gw[5], gw[6], gw[7], gw[8]};
        gb = get64(b + 60);
        if (get64(b + 68) != size)
            why = "truncated or extended (its size differs from the size it records)";
        else if (kl == 0 || kl > ENG_KEY_MAX || !key_ok((const char *)b + HEADER_BYTES, kl))
            why = "bad key";
        else if (!geom_ok(&g) || ws_generation_bytes(&g) != gb)
            why = "bad geometry";
        else if (ng == 0 || ng > WS_MAX_GENERATIONS)
            why = "bad generation count";
        else if ((uint64_t)HEADER_BYTES + kl + (uint64_t)ng * (8 + gb) + 8 != size)
            why = "sizes do not add up";
        else if (fnv_step(FNV_INIT, b, size - 8) != get64(b + size - 8))
            why = "checksum mismatch (corrupt)";
    }
    if (!why) {
        memcpy(key, b + HEADER_BYTES, kl);
        key[kl] = 0;
        char expect[40];
        file_name(key, &g, expect);
        if (strcmp(expect, name))
            why = "its name does not match its key and geometry";
    }
    ws_user *u = NULL;
    if (!why && !(u = user_get(w, uid, 1)))
        why = "out of memory";
    if (!why && entry_find(u, key, &g))
        why = "a second file for the same key and geometry";
    ws_entry *e = NULL;
    if (!why && !(e = entry_new(uid, key, &g)))
        why = "out of memory";
    if (why) {
        free(b);
        return refuse(w, path, why);
    }
    const uint8_t *p = b + HEADER_BYTES + kl;
    uint32_t keep = ng < w->cfg.max_generations ? ng : w->cfg.max_generations;
    for (uint32_t i = 0; i < keep; i++, p += 8 + gb) {
        ws_gen *gen = malloc(sizeof *gen + gb);
        if (!gen)
            break;
        atomic_init(&gen->refs, 1);
        gen->deposited_unix_ms = get64(p);
        gen->bytes = gb;
        memcpy(gen->data, p + 8, gb);
        e->gens[e->n_gens++] = gen;
    }
    free(b);
    if (e->n_gens == 0) {
        entry_free(e);
        return refuse(w, path, "out of memory");
    }
    e->persisted = 1;
    /* Least recently deposited first, so that eviction takes the oldest. */
    uint64_t t = e->gens[0]->deposited_unix_ms;
    ws_entry *o;
    list_node *at = &u->entries;
    list_for_each_entry (o, &u->entries, ws_entry, link)
        if (o->n_gens && o->gens[0]->deposited_unix_ms > t) {
            at = &o->link;
            break;
        }
    list_insert_before(at, &e->link);
    u->bytes += entry_cost(e);
    w->n_files_loaded++;
    if (keep < ng)
        persist_entry(w, e);
}

static int all_digits(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (!isdigit((unsigned char)*s))
            return 0;
    return 1;
}

/* The next name in folder d (at path dir) but "." and "..", with its path in path; NULL at
 * the end. A name whose path does not fit is passed over. */
static const char *next_entry(DIR *d, const char *dir, char path[PATH_MAX])
{
    struct dirent *de;
    while ((de = readdir(d))) {
        const char *n = de->d_name;
        if (!strcmp(n, ".") || !strcmp(n, ".."))
            continue;
        if (snprintf(path, PATH_MAX, "%s/%s", dir, n) < PATH_MAX)
            return n;
    }
    return NULL;
}

static void load_uid_dir(ws *w, uint32_t uid, const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) {
        w->n_files_refused++;
        logw(w, LOG_WARN, "warm store: cannot read %s: %s", dir, strerror(errno));
        return;
    }
    const char *n;
    char path[PATH_MAX];
    while ((n = next_entry(d, dir, path))) {
        if (strstr(n, SUFFIX ".tmp.")) { /* a write an earlier run did not finish */
            if (unlink(path) == 0)
                logw(w, LOG_INFO, "warm store: removed the unfinished write %s", path);
            continue;
        }
        size_t len = strlen(n), sl = strlen(SUFFIX);
        if (len <= sl || strcmp(n + len - sl, SUFFIX)) {
            refuse(w, path, "not a warm-store file name");
            continue;
        }
        load_file(w, uid, dir, n);
    }
    closedir(d);
}

static void load_all(ws *w)
{
    DIR *d = opendir(w->dir);
    if (!d)
        return;
    const char *n;
    char path[PATH_MAX];
    while ((n = next_entry(d, w->dir, path))) {
        struct stat st;
        unsigned long long uid = 0;
        if (all_digits(n)) {
            errno = 0;
            uid = strtoull(n, NULL, 10);
        }
        if (!all_digits(n) || errno || uid > UINT32_MAX) {
            refuse(w, path, "not a uid folder");
            continue;
        }
        if (lstat(path, &st) < 0 || !S_ISDIR(st.st_mode)) {
            refuse(w, path, "not a folder (a symbolic link or a file)");
            continue;
        }
        if (st.st_uid != geteuid()) {
            refuse(w, path, "owned by another user than the daemon's");
            continue;
        }
        load_uid_dir(w, (uint32_t)uid, path);
    }
    closedir(d);
    ws_user *u;
    list_for_each_entry (u, &w->users, ws_user, node.link)
        evict(w, u);
}

/* The state folder: created (0700) when absent; must be a folder of the daemon's user. */
static int open_dir(ws *w, const char *dir)
{
    if (strlen(dir) >= sizeof w->dir - 80) {
        logw(w, LOG_ERROR, "warm store: state folder path too long; persistence off");
        return -1;
    }
    snprintf(w->dir, sizeof w->dir, "%s", dir);
    if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
        logw(w, LOG_ERROR, "warm store: cannot create %s: %s; persistence off", dir,
             strerror(errno));
        return -1;
    }
    struct stat st;
    if (lstat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
        logw(w, LOG_ERROR, "warm store: %s is not a folder; persistence off", dir);
        return -1;
    }
    if (st.st_uid != geteuid()) {
        logw(w, LOG_ERROR,
             "warm store: %s belongs to uid %u, not to the daemon's uid %u; persistence off",
             dir, (unsigned)st.st_uid, (unsigned)geteuid());
        return -1;
    }
    if (access(dir, R_OK | W_OK | X_OK) < 0) {
        logw(w, LOG_ERROR, "warm store: %s: %s; persistence off", dir, strerror(errno));
        return -1;
    }
    return 0;
}

int ws_new(const ws_config *cfg, ws **ret_store)
{
    ws *w = calloc(1, sizeof *w);
    if (!w)
        return LA_ENOMEM;
    w->cfg = *cfg;
    if (w->cfg.max_generations < 1)
        w->cfg.max_generations = 1;
    if (w->cfg.max_generations > WS_MAX_GENERATIONS)
        w->cfg.max_generations = WS_MAX_GENERATIONS;
    w->cfg.state_dir = NULL; /* the caller's string need not outlive this */
    list_init(&w->users);
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->cond, NULL);
    atomic_init(&w->n_write_errors, 0);
    atomic_init(&w->n_files_written, 0);
    if (cfg->state_dir && cfg->state_dir[0] && open_dir(w, cfg->state_dir) == 0) {
        if (pthread_create(&w->writer, NULL, writer_main, w) != 0) {
            logw(w, LOG_ERROR, "warm store: cannot start the writer thread; persistence off");
        } else {
            w->writer_started = 1;
            w->persist = 1;
            load_all(w);
            if (w->n_files_loaded || w->n_files_refused)
                logw(w, LOG_INFO, "warm store: %s: %llu entries loaded, %llu files refused",
                     w->dir, (unsigned long long)w->n_files_loaded,
                     (unsigned long long)w->n_files_refused);
        }
    }
    *ret_store = w;
    return 0;
}

void ws_free(ws *w)
{
    if (!w)
        return;
    if (w->writer_started) {
        pthread_mutex_lock(&w->lock);
        w->stopping = 1;
        pthread_cond_broadcast(&w->cond);
        pthread_mutex_unlock(&w->lock);
        pthread_join(w->writer, NULL);
    }
    while (w->head) {
        ws_op *op = w->head;
        w->head = op->next;
        op_free(op);
    }
    while (!list_empty(&w->users)) {
        ws_user *u = list_first_entry(&w->users, ws_user, node.link);
        while (!list_empty(&u->entries)) {
            ws_entry *e = list_first_entry(&u->entries, ws_entry, link);
            list_remove(&e->link);
            entry_free(e);
        }
        list_remove(&u->node.link);
        free(u);
    }
    pthread_mutex_destroy(&w->lock);
    pthread_cond_destroy(&w->cond);
    free(w);
}
