/* table.c — small named-column results (stats, session listings) and the requests that
 * produce them. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct la_table {
    size_t rows, cols, cap_rows;
    char **names; /* cols */
    char **cells; /* rows * cols */
};

static la_table *table_new(const char *const *names, size_t cols)
{
    la_table *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->cols = cols;
    t->names = calloc(cols, sizeof(char *));
    if (!t->names) {
        free(t);
        return NULL;
    }
    for (size_t i = 0; i < cols; i++) {
        t->names[i] = strdup(names[i]);
        if (!t->names[i]) {
            la_table_free(t);
            return NULL;
        }
    }
    return t;
}

/* Appends a row of cols cells (copied). */
static int table_add(la_table *t, char *const *cells)
{
    if (t->rows == t->cap_rows) {
        size_t cap = t->cap_rows ? t->cap_rows * 2 : 16;
        char **nc = realloc(t->cells, cap * t->cols * sizeof(char *));
        if (!nc)
            return LA_ENOMEM;
        t->cells = nc;
        t->cap_rows = cap;
    }
    char **row = t->cells + t->rows * t->cols;
    for (size_t i = 0; i < t->cols; i++) {
        row[i] = strdup(cells[i] ? cells[i] : "");
        if (!row[i]) {
            for (size_t j = 0; j < i; j++)
                free(row[j]);
            return LA_ENOMEM;
        }
    }
    t->rows++;
    return 0;
}

LA_API void la_table_free(la_table *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->rows * t->cols; i++)
        free(t->cells[i]);
    free(t->cells);
    if (t->names)
        for (size_t i = 0; i < t->cols; i++)
            free(t->names[i]);
    free(t->names);
    free(t);
}

LA_API size_t la_table_rows(const la_table *t) { return t ? t->rows : 0; }
LA_API size_t la_table_cols(const la_table *t) { return t ? t->cols : 0; }

LA_API const char *la_table_col_name(const la_table *t, size_t col)
{
    return t && col < t->cols ? t->names[col] : NULL;
}

LA_API const char *la_table_text(const la_table *t, size_t row, size_t col)
{
    if (!t || row >= t->rows || col >= t->cols)
        return NULL;
    return t->cells[row * t->cols + col];
}

LA_API int la_table_int(const la_table *t, size_t row, const char *col, int64_t *ret_value)
{
    if (!t || !col)
        return cl_fail(LA_EINVAL, "la_table_int: NULL argument");
    size_t c;
    for (c = 0; c < t->cols; c++)
        if (strcmp(t->names[c], col) == 0)
            break;
    if (c == t->cols)
        return cl_fail(LA_ENOENT, "no column \"%s\"", col);
    if (row >= t->rows)
        return cl_fail(LA_ENOENT, "no row %zu (the table has %zu)", row, t->rows);
    const char *s = t->cells[row * t->cols + c];
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end)
        return cl_fail(LA_EINVAL, "column \"%s\" row %zu is \"%s\", not an integer", col, row, s);
    if (ret_value)
        *ret_value = v;
    return 0;
}

static int fill_stats(la_table *t, const Liteattn__Reply *r)
{
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < r->stats->n_stats; i++) {
        char v[32];
        snprintf(v, sizeof(v), "%" PRId64, r->stats->stats[i]->value);
        char *cells[2] = {r->stats->stats[i]->name, v};
        rc = table_add(t, cells);
    }
    return rc;
}

/* Writes the n whole numbers v into the cells b, in decimal. */
static void cells_u64(char (*b)[32], const uint64_t *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        snprintf(b[i], sizeof(b[i]), "%" PRIu64, v[i]);
}

static int fill_sessions(la_table *t, const Liteattn__Reply *r)
{
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < r->session_list->n_sessions; i++) {
        const Liteattn__SessionSummary *s = r->session_list->sessions[i];
        /* b[10] is the live fraction; the other cells are whole numbers. */
        const uint64_t v[14] = {s->id,    s->uid, s->layers, s->heads,      s->head_dim,
                                s->batch, s->bm,  s->bn,     s->mask_bytes, s->calls,
                                0,        s->attached ? 1 : 0, s->idle_ms / 1000, s->restarts};
        char b[14][32];
        cells_u64(b, v, 14);
        snprintf(b[10], sizeof(b[10]), "%.4f", s->live_fraction);
        const uint64_t wv[3] = {s->warm_generations, s->guard_checks, s->guard_restored};
        char w[3][32];
        cells_u64(w, wv, 3);
        /* Per-layer live fractions, "0.812,0.640,...". */
        size_t cap = s->n_layer_live_fraction * 8 + 1, n = 0;
        char *ll = malloc(cap);
        if (!ll)
            return LA_ENOMEM;
        ll[0] = 0;
        for (size_t l = 0; l < s->n_layer_live_fraction && n + 8 < cap; l++)
            n += (size_t)snprintf(ll + n, cap - n, "%s%.3f", l ? "," : "",
                                  s->layer_live_fraction[l]);
        char *cells[21] = {b[0], s->key, b[1], b[2],  b[3],  b[4],  b[5],  b[6],
                           b[7], b[8],   b[9], b[13], b[10], b[11], b[12], s->device,
                           s->warm_key ? s->warm_key : (char *)"", w[0], w[1], w[2], ll};
        rc = table_add(t, cells);
        free(ll);
    }
    return rc;
}

/* A listing: its request (a message without fields), its reply and columns, and fill, which
 * adds the rows of a reply. */
typedef struct table_kind {
    const char *fn; /* the public function, for messages */
    int request, reply;
    const char *const *names;
    size_t n_cols;
    int (*fill)(la_table *t, const Liteattn__Reply *r);
} table_kind;

static const char *const stats_cols[] = {"name", "value"};
static const table_kind stats_kind = {
    "la_stats", LITEATTN__REQUEST__BODY_STATS, LITEATTN__REPLY__BODY_STATS, stats_cols, 2,
    fill_stats};

/* The first 16 keep their places; the warm-start and guardrail columns were added after. */
static const char *const session_cols[] = {
    "id",         "key",      "uid",           "layers",           "heads",
    "head_dim",   "batch",    "bm",            "bn",               "mask_bytes",
    "calls",      "restarts", "live_fraction", "attached",         "idle_s",
    "device",     "warm_key", "warm_generations", "guard_checks", "guard_restored",
    "layer_live"};
static const table_kind sessions_kind = {"la_sessions",
                                         LITEATTN__REQUEST__BODY_SESSION_LIST,
                                         LITEATTN__REPLY__BODY_SESSION_LIST,
                                         session_cols,
                                         21,
                                         fill_sessions};

static int fill_warm(la_table *t, const Liteattn__Reply *r);
static const char *const warm_cols[] = {"key",   "uid",         "layers", "kv_shards", "batch",
                                        "heads", "n_q_tiles",   "n_k_tiles", "bm",     "bn",
                                        "generations", "bytes", "age_s",  "seeds",     "persisted"};
static const table_kind warm_kind = {"la_warm_list",
                                     LITEATTN__REQUEST__BODY_WARM_LIST,
                                     LITEATTN__REPLY__BODY_WARM_LIST,
                                     warm_cols,
                                     15,
                                     fill_warm};

/* The request of k, its reply as a new table. */
static int table_query(la_client *c, const table_kind *k, la_table **ret_table)
{
    if (!c || !ret_table)
        return cl_fail(LA_EINVAL, "%s: NULL argument", k->fn);
    Liteattn__Stats st = LITEATTN__STATS__INIT;
    Liteattn__SessionList sl = LITEATTN__SESSION_LIST__INIT;
    Liteattn__WarmList wl = LITEATTN__WARM_LIST__INIT;
    void *body = &sl;
    if (k->request == LITEATTN__REQUEST__BODY_STATS)
        body = &st;
    else if (k->request == LITEATTN__REQUEST__BODY_WARM_LIST)
        body = &wl;
    Liteattn__Request req = cl_req_body(k->request, body);
    Liteattn__Reply *r;
    int rc = cl_request(c, &req, k->reply, &r);
    if (rc < 0)
        return rc;
    la_table *t = table_new(k->names, k->n_cols);
    rc = t ? k->fill(t, r) : LA_ENOMEM;
    liteattn__reply__free_unpacked(r, NULL);
    if (rc < 0) {
        la_table_free(t);
        return cl_fail(rc, NULL);
    }
    *ret_table = t;
    return 0;
}

LA_API int la_stats(la_client *c, la_table **ret_table)
{
    return table_query(c, &stats_kind, ret_table);
}

LA_API int la_sessions(la_client *c, la_table **ret_table)
{
    return table_query(c, &sessions_kind, ret_table);
}

static int fill_warm(la_table *t, const Liteattn__Reply *r)
{
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < r->warm_list->n_entries; i++) {
        const Liteattn__WarmEntry *e = r->warm_list->entries[i];
        const uint64_t v[14] = {e->uid,   e->layers, e->kv_shards, e->batch,
                                e->heads, e->n_q_tiles, e->n_k_tiles, e->bm, e->bn,
                                e->generations, e->bytes, e->deposited_ago_ms / 1000,
                                e->seeds, e->persisted ? 1 : 0};
        char b[14][32];
        cells_u64(b, v, 14);
        char *cells[15] = {e->key ? e->key : (char *)"", b[0], b[1], b[2], b[3], b[4], b[5],
                           b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13]};
        rc = table_add(t, cells);
    }
    return rc;
}

LA_API int la_warm_list(la_client *c, la_table **ret_table)
{
    return table_query(c, &warm_kind, ret_table);
}

LA_API int la_warm_drop(la_client *c, const char *key, uint64_t *ret_dropped)
{
    if (!c)
        return cl_fail(LA_EINVAL, "la_warm_drop: NULL client");
    Liteattn__WarmDrop wd = LITEATTN__WARM_DROP__INIT;
    wd.key = (char *)key;
    Liteattn__Request req = cl_req_body(LITEATTN__REQUEST__BODY_WARM_DROP, &wd);
    Liteattn__Reply *r;
    int rc = cl_request(c, &req, LITEATTN__REPLY__BODY_WARM_DROP, &r);
    if (rc < 0)
        return rc;
    if (ret_dropped)
        *ret_dropped = r->warm_drop->dropped;
    liteattn__reply__free_unpacked(r, NULL);
    return 0;
}
