/*
 * check_warm.c — the warm start and the online quality guardrail (docs/SKIP-SEMANTICS.md).
 *
 * The store (engine/warmstore.c) directly: its seed against a bit-by-bit OR and widening, the
 * LRU byte limit and generations per key, entries per user, its files (reload, corrupt,
 * truncated, foreign and stray files refused with a log line). Through the engine on the CPU
 * backend: option checks; warm sessions computing fewer tiles than cold ones from step 0 on
 * the same data, their first call equal to float64 attention over exactly the expected seed
 * and every output within the lost-mass bound of float64 dense attention; the settled-step
 * capture; another uid never seeded; the guardrail restoring exactly the rows whose float64
 * lost mass passes the budget (then dense: equal to float64 dense) and staying quiet at a
 * conservative threshold. Through the daemon with real uids (as root): one user's masks never
 * seed another's session.
 */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "backend.h"
#include "engine.h"
#include "la_guard.h"
#include "liteattn.h"
#include "testutil.h"
#include "testutil_daemon.h"
#include "warmstore.h"

#define UID 1000
#define UID2 1001
#define CONN 1
#define CONN2 2

/* ---- the CPU backend with the CUDA backend's late host view -------------------------------------
 *
 * The CUDA backend's mask_alloc returns with be_mask.host NULL: its service thread pins the view
 * later, before the mask's first call can launch (backend_cuda.c, T_SHADOW). The engine once
 * wrote the warm seed through that NULL view when a seeded session opened, and planned the
 * seed and capture pointers of a call from it: liteattnd died (SIGSEGV) on the H200 in
 * check_gpu_daemon's test_warm_start_and_guard, while the CPU backend, whose view exists at
 * once, passed. This program is linked with -Wl,--wrap=be_cpu_new (tests/module.mk): in the
 * tcase "late view" the real CPU backend's masks hide their host view (NULL) from mask_alloc
 * until the mask's first call is submitted, as the CUDA backend's do until that call may
 * launch; everything else is the real CPU backend. */

int __real_be_cpu_new(int threads, uint64_t slice_macs, be_complete_fn complete,
                      void *complete_data, be_backend **ret, char *msg, size_t msg_len);
int __wrap_be_cpu_new(int threads, uint64_t slice_macs, be_complete_fn complete,
                      void *complete_data, be_backend **ret, char *msg, size_t msg_len);

static int g_late_view;     /* set by the "late view" tcase's fixture (in the forked test) */
static be_ops g_late_ops;   /* the CPU backend's ops, mask_alloc/submit/mask_free wrapped */
static const be_ops *g_cpu; /* the real ones */

static int late_mask_alloc(be_backend *b, int dev, uint64_t bytes, const void *init,
                           uint64_t init_off, uint64_t init_len, be_mask **ret_mask)
{
    int rc = g_cpu->mask_alloc(b, dev, bytes, init, init_off, init_len, ret_mask);
    if (rc == 0) { /* the CPU backend leaves priv unused: the view waits there */
        ck_assert_ptr_null((*ret_mask)->priv);
        (*ret_mask)->priv = (*ret_mask)->host;
        (*ret_mask)->host = NULL;
    }
    return rc;
}

static int late_submit(be_backend *b, be_job *j)
{
    if (j->mask && !j->mask->host) /* "the service thread has made it": the call may run */
        j->mask->host = j->mask->priv;
    return g_cpu->submit(b, j);
}

static void late_mask_free(be_backend *b, be_mask *m)
{
    if (m && !m->host)
        m->host = m->priv;
    if (m)
        m->priv = NULL;
    g_cpu->mask_free(b, m);
}

int __wrap_be_cpu_new(int threads, uint64_t slice_macs, be_complete_fn complete,
                      void *complete_data, be_backend **ret, char *msg, size_t msg_len)
{
    int rc = __real_be_cpu_new(threads, slice_macs, complete, complete_data, ret, msg, msg_len);
    if (rc == 0 && g_late_view) {
        g_cpu = (*ret)->ops;
        g_late_ops = *g_cpu;
        g_late_ops.mask_alloc = late_mask_alloc;
        g_late_ops.submit = late_submit;
        g_late_ops.mask_free = late_mask_free;
        (*ret)->ops = &g_late_ops;
    }
    return rc;
}

static void late_view_on(void) { g_late_view = 1; }

/* ---- a log sink that keeps the lines ---------------------------------------------------------- */

static char g_log[1 << 16];
static size_t g_log_n;

static void sink(void *data, int level, const char *msg)
{
    (void)data;
    (void)level;
    size_t n = strlen(msg);
    if (g_log_n + n + 2 < sizeof g_log) {
        memcpy(g_log + g_log_n, msg, n);
        g_log_n += n;
        g_log[g_log_n++] = '\n';
        g_log[g_log_n] = 0;
    }
}

static void log_clear(void)
{
    g_log_n = 0;
    g_log[0] = 0;
}

/* ---- the store, directly ------------------------------------------------------------------ */

static const ws_geom G = {2, 1, 2, 3, 5, 40, 2, 128, 64}; /* 480 bytes per generation */

static ws *store_new(uint64_t bytes, uint32_t gens, const char *dir)
{
    ws_config c = {.bytes_per_user = bytes, .max_generations = gens, .state_dir = dir,
                   .log = sink};
    ws *w = NULL;
    ck_assert_int_eq(ws_new(&c, &w), 0);
    return w;
}

/* Random bits of density p in every row's first nK bits (the rest 0). */
static void random_gen(tu_rng *r, const ws_geom *g, uint32_t *out, double p)
{
    uint64_t rows = ws_generation_bytes(g) / 4 / g->n_k_words;
    for (uint64_t row = 0; row < rows; row++)
        for (uint32_t w = 0; w < g->n_k_words; w++) {
            uint32_t v = 0;
            for (uint32_t b = 0; b < 32; b++)
                if (w * 32 + b < g->n_k_tiles && tu_rng_uniform(r) < p)
                    v |= 1u << b;
            out[row * g->n_k_words + w] = v;
        }
}

static int bit_at(const ws_geom *g, const uint32_t *m, uint64_t block, int64_t q, int64_t n)
{
    const uint32_t *row = m + (block * g->n_q_tiles + (uint64_t)q) * g->n_k_words;
    return (row[n / 32] >> (n % 32)) & 1;
}

/* The seed by definition: bit (block, m, n) set when any OR-ed bit within Chebyshev distance
 * margin of (m, n) in the same block (layer, shard, b, h) is set. */
static void naive_seed(const ws_geom *g, uint32_t *const *gens, int n_gens, int margin,
                       uint32_t *out)
{
    uint64_t gb = ws_generation_bytes(g), blocks = gb / 4 / ((uint64_t)g->n_q_tiles * g->n_k_words);
    memset(out, 0, gb);
    for (uint64_t bl = 0; bl < blocks; bl++)
        for (int64_t m = 0; m < g->n_q_tiles; m++)
            for (int64_t n = 0; n < g->n_k_tiles; n++) {
                int on = 0;
                for (int k = 0; k < n_gens && !on; k++)
                    for (int64_t dm = -margin; dm <= margin && !on; dm++)
                        for (int64_t dn = -margin; dn <= margin && !on; dn++) {
                            int64_t mm = m + dm, nn = n + dn;
                            if (mm >= 0 && mm < g->n_q_tiles && nn >= 0 && nn < g->n_k_tiles)
                                on = bit_at(g, gens[k], bl, mm, nn);
                        }
                if (on)
                    out[(bl * g->n_q_tiles + (uint64_t)m) * g->n_k_words + n / 32] |= 1u << (n % 32);
            }
}

START_TEST(store_seed_or_widen)
{
    tu_rng r;
    tu_rng_init(&r, 101);
    ws *w = store_new(1 << 20, 8, NULL);
    uint64_t gb = ws_generation_bytes(&G);
    ck_assert_uint_eq(gb, 2u * 1 * 2 * 3 * 5 * 2 * 4);
    uint32_t *gen[3], *got = malloc(gb), *want = malloc(gb);
    char status[ENG_WARM_STATUS_MAX];
    ck_assert_int_eq(ws_seed(w, UID, "toy", &G, 4, 1, got, status, sizeof status), 0);
    ck_assert_msg(strstr(status, "cold: no stored masks"), "%s", status);
    for (int i = 0; i < 3; i++) {
        gen[i] = malloc(gb);
        random_gen(&r, &G, gen[i], 0.15);
        ck_assert_int_eq(ws_deposit(w, UID, "toy", &G, gen[i]), 0);
    }
    uint32_t *newest[3] = {gen[2], gen[1], gen[0]};
    static const int cases[][2] = {{1, 0}, {2, 1}, {3, 2}, {5, 1}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        int n = cases[c][0], margin = cases[c][1], used = n > 3 ? 3 : n;
        memset(got, 0xa5, gb);
        ck_assert_int_eq(ws_seed(w, UID, "toy", &G, (uint32_t)n, (uint32_t)margin, got, status,
                                 sizeof status),
                         used);
        naive_seed(&G, newest, used, margin, want);
        ck_assert_msg(memcmp(got, want, gb) == 0, "seed of %d generations, margin %d differs", n,
                      margin);
        ck_assert_msg(strstr(status, "warm: seeded from"), "%s", status);
    }
    /* Another geometry of the same key seeds nothing, and says why. */
    ws_geom g2 = G;
    g2.n_q_tiles = 6;
    ck_assert_int_eq(ws_seed(w, UID, "toy", &g2, 4, 1, got, status, sizeof status), 0);
    ck_assert_msg(strstr(status, "another geometry"), "%s", status);
    for (int i = 0; i < 3; i++)
        free(gen[i]);
    free(got);
    free(want);
    ws_free(w);
}
END_TEST

typedef struct seen {
    char keys[16][64];
    uint32_t uids[16], gens[16];
    uint64_t bytes;
    int n;
} seen;

static void seen_one(void *data, const ws_entry_info *e)
{
    seen *s = data;
    if (s->n < 16) {
        snprintf(s->keys[s->n], 64, "%s", e->key);
        s->uids[s->n] = e->uid;
        s->gens[s->n] = e->generations;
    }
    s->bytes += e->bytes;
    s->n++;
}

static seen list_of(ws *w, uint32_t uid)
{
    seen s;
    memset(&s, 0, sizeof s);
    ws_list(w, uid, seen_one, &s);
    return s;
}

static int has_key(const seen *s, const char *key, uint32_t uid)
{
    for (int i = 0; i < s->n && i < 16; i++)
        if (!strcmp(s->keys[i], key) && s->uids[i] == uid)
            return (int)s->gens[i];
    return -1;
}

START_TEST(store_lru_byte_limit)
{
    uint64_t gb = ws_generation_bytes(&G);
    /* Each key with one generation costs 512 (entry) + 64 (generation) + gb: room for 3. */
    uint64_t one = 512 + 64 + gb, limit = 3 * one;
    ws *w = store_new(limit, 2, NULL);
    uint32_t *m = calloc(1, gb), *seed = malloc(gb);
    char st[ENG_WARM_STATUS_MAX];
    ck_assert_int_eq(ws_deposit(w, UID, "a", &G, m), 0);
    ck_assert_int_eq(ws_deposit(w, UID, "b", &G, m), 0);
    ck_assert_int_eq(ws_deposit(w, UID, "c", &G, m), 0);
    seen s = list_of(w, UID);
    ck_assert_int_eq(s.n, 3);
    ck_assert_uint_eq(s.bytes, limit);
    /* "a" used by a seed becomes the most recent: "b" is the least recently used now. */
    ck_assert_int_eq(ws_seed(w, UID, "a", &G, 1, 0, seed, st, sizeof st), 1);
    ck_assert_int_eq(ws_deposit(w, UID, "d", &G, m), 0);
    s = list_of(w, UID);
    ck_assert_int_eq(s.n, 3);
    ck_assert_int_eq(has_key(&s, "b", UID), -1);
    ck_assert_int_eq(has_key(&s, "a", UID), 1);
    ck_assert_uint_le(s.bytes, limit);
    /* A second generation of "a" needs gb + 64 more: "c" (now the oldest) goes. */
    ck_assert_int_eq(ws_deposit(w, UID, "a", &G, m), 0);
    s = list_of(w, UID);
    ck_assert_int_eq(has_key(&s, "c", UID), -1);
    ck_assert_int_eq(has_key(&s, "a", UID), 2);
    ck_assert_int_eq(has_key(&s, "d", UID), 1);
    ck_assert_uint_le(s.bytes, limit);
    /* At most 2 generations per key (max_generations), the newest kept. */
    ck_assert_int_eq(ws_deposit(w, UID, "a", &G, m), 0);
    s = list_of(w, UID);
    ck_assert_int_eq(has_key(&s, "a", UID), 2);
    /* A generation larger than the whole limit is refused, nothing else changes. */
    ws_geom big = G;
    big.n_q_tiles = 50;
    uint32_t *bm = calloc(1, ws_generation_bytes(&big));
    log_clear();
    ck_assert_int_eq(ws_deposit(w, UID, "huge", &big, bm), LA_ELIMIT);
    ck_assert_msg(strstr(g_log, "more than the store's limit"), "log: %s", g_log);
    seen s2 = list_of(w, UID);
    ck_assert_int_eq(s2.n, s.n);
    /* Another user has a limit of its own: its deposits evict none of UID's entries. */
    for (int i = 0; i < 5; i++) {
        char k[8];
        snprintf(k, sizeof k, "u2-%d", i);
        ck_assert_int_eq(ws_deposit(w, UID2, k, &G, m), 0);
    }
    seen a = list_of(w, UID), b = list_of(w, UID2), all = list_of(w, 0);
    ck_assert_int_eq(a.n, s.n);
    ck_assert_int_eq(b.n, 3);
    ck_assert_int_eq(all.n, a.n + b.n);
    ck_assert_uint_le(b.bytes, limit);
    /* Never seeded across users, and a drop touches only the caller's. */
    ck_assert_int_eq(ws_seed(w, UID2, "a", &G, 4, 1, seed, st, sizeof st), 0);
    ck_assert_uint_eq(ws_drop(w, UID2, "a"), 0);
    a = list_of(w, UID);
    ck_assert_int_eq(has_key(&a, "a", UID), 2);
    ck_assert_uint_eq(ws_drop(w, UID, NULL), (uint64_t)a.n);
    ck_assert_int_eq(list_of(w, UID).n, 0);
    ck_assert_int_eq(list_of(w, UID2).n, 3);
    free(m);
    free(bm);
    free(seed);
    ws_free(w);
}
END_TEST

/* ---- the store's files --------------------------------------------------------------------- */

static void tmpdir(char *out, size_t len)
{
    snprintf(out, len, "%s/check-warm-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    ck_assert_ptr_nonnull(mkdtemp(out));
}

static void rm_rf(const char *path)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", path);
    ck_assert_int_eq(system(cmd), 0);
}

/* The one file in dir/uid (its path in out), or 0 when there is not exactly one. */
static int the_file(const char *dir, uint32_t uid, char *out, size_t len)
{
    char d[512];
    snprintf(d, sizeof d, "%s/%u", dir, uid);
    DIR *dd = opendir(d);
    if (!dd)
        return 0;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(dd)))
        if (de->d_name[0] != '.')
            n += snprintf(out, len, "%s/%s", d, de->d_name) < (int)len;
    closedir(dd);
    return n == 1;
}

/* A store with two users' entries written to dir; the seeds they give in s1, s2. */
static void write_two(const char *dir, uint32_t *s1, uint32_t *s2)
{
    tu_rng r;
    tu_rng_init(&r, 202);
    uint64_t gb = ws_generation_bytes(&G);
    uint32_t *m = malloc(gb);
    ws *w = store_new(1 << 20, 8, dir);
    char st[ENG_WARM_STATUS_MAX];
    for (int i = 0; i < 2; i++) {
        random_gen(&r, &G, m, 0.2);
        ck_assert_int_eq(ws_deposit(w, UID, "model-x 480p 50 steps", &G, m), 0);
    }
    random_gen(&r, &G, m, 0.2);
    ck_assert_int_eq(ws_deposit(w, UID2, "model-y", &G, m), 0);
    ck_assert_int_eq(ws_seed(w, UID, "model-x 480p 50 steps", &G, 4, 1, s1, st, sizeof st), 2);
    ck_assert_int_eq(ws_seed(w, UID2, "model-y", &G, 4, 1, s2, st, sizeof st), 1);
    ws_flush(w);
    ws_free(w);
    free(m);
}

START_TEST(store_persists)
{
    char dir[256];
    tmpdir(dir, sizeof dir);
    uint64_t gb = ws_generation_bytes(&G);
    uint32_t *s1 = malloc(gb), *s2 = malloc(gb), *t = malloc(gb);
    write_two(dir, s1, s2);
    char f[600];
    ck_assert(the_file(dir, UID, f, sizeof f));
    struct stat st;
    ck_assert_int_eq(stat(f, &st), 0);
    ck_assert_int_eq(st.st_mode & 0777, 0600);
    ck_assert(the_file(dir, UID2, f, sizeof f));
    /* A new store (a daemon restart) seeds exactly as before. */
    log_clear();
    ws *w = store_new(1 << 20, 8, dir);
    seen a = list_of(w, 0);
    ck_assert_int_eq(a.n, 2);
    char status[ENG_WARM_STATUS_MAX];
    ck_assert_int_eq(ws_seed(w, UID, "model-x 480p 50 steps", &G, 4, 1, t, status, sizeof status),
                     2);
    ck_assert(memcmp(t, s1, gb) == 0);
    ck_assert_int_eq(ws_seed(w, UID2, "model-y", &G, 4, 1, t, status, sizeof status), 1);
    ck_assert(memcmp(t, s2, gb) == 0);
    /* Ownership survives too. */
    ck_assert_int_eq(ws_seed(w, UID2, "model-x 480p 50 steps", &G, 4, 1, t, status, sizeof status),
                     0);
    /* Dropping removes the file. */
    ck_assert_uint_eq(ws_drop(w, UID2, "model-y"), 1);
    ws_flush(w);
    ck_assert(!the_file(dir, UID2, f, sizeof f));
    ws_free(w);
    rm_rf(dir);
    free(s1);
    free(s2);
    free(t);
}
END_TEST

/* Damages uid UID's file as `how` says, reloads, and checks the refusal. */
static void damaged(int how, const char *want_log)
{
    char dir[256];
    tmpdir(dir, sizeof dir);
    uint64_t gb = ws_generation_bytes(&G);
    uint32_t *s1 = malloc(gb), *s2 = malloc(gb), *t = malloc(gb);
    write_two(dir, s1, s2);
    char f[600], g[700];
    ck_assert(the_file(dir, UID, f, sizeof f));
    struct stat st;
    ck_assert_int_eq(stat(f, &st), 0);
    int fd;
    switch (how) {
    case 0: /* one byte of the masks flipped */
        fd = open(f, O_RDWR);
        ck_assert_int_ge(fd, 0);
        {
            unsigned char c;
            off_t at = st.st_size / 2;
            ck_assert_int_eq(pread(fd, &c, 1, at), 1);
            c ^= 0x10;
            ck_assert_int_eq(pwrite(fd, &c, 1, at), 1);
        }
        close(fd);
        break;
    case 1: /* truncated */
        ck_assert_int_eq(truncate(f, st.st_size - 100), 0);
        break;
    case 2: /* shorter than a header */
        ck_assert_int_eq(truncate(f, 3), 0);
        break;
    case 3: /* moved into another user's folder: foreign */
        snprintf(g, sizeof g, "%s/%u", dir, 4242u);
        ck_assert_int_eq(mkdir(g, 0700), 0);
        snprintf(g, sizeof g, "%s/%u/%s", dir, 4242u, strrchr(f, '/') + 1);
        ck_assert_int_eq(rename(f, g), 0);
        break;
    case 4: /* not our magic */
        fd = open(f, O_RDWR);
        ck_assert_int_eq(pwrite(fd, "NOTWARM!", 8, 0), 8);
        close(fd);
        break;
    case 5: /* a symbolic link in its place */
        snprintf(g, sizeof g, "%s.real", f);
        ck_assert_int_eq(rename(f, g), 0);
        ck_assert_int_eq(symlink(g, f), 0);
        break;
    }
    /* Also stray files: a foreign name (refused) and an unfinished write (removed). */
    snprintf(g, sizeof g, "%s/%u/notes.txt", dir, UID2);
    FILE *junk = fopen(g, "w");
    ck_assert_ptr_nonnull(junk);
    fputs("hello\n", junk);
    fclose(junk);
    snprintf(g, sizeof g, "%s/%u/0123456789abcdef01234567.lawarm.tmp.1.2", dir, UID2);
    junk = fopen(g, "w");
    ck_assert_ptr_nonnull(junk);
    fclose(junk);
    log_clear();
    ws *w = store_new(1 << 20, 8, dir);
    ck_assert_msg(strstr(g_log, want_log), "case %d: wanted \"%s\" in the log:\n%s", how, want_log,
                  g_log);
    ck_assert_msg(strstr(g_log, "notes.txt refused"), "log:\n%s", g_log);
    ck_assert_msg(strstr(g_log, "removed the unfinished write"), "log:\n%s", g_log);
    ck_assert_int_eq(access(g, F_OK), -1);
    char status[ENG_WARM_STATUS_MAX];
    /* The damaged entry is not used; the other user's is, unchanged. */
    ck_assert_int_eq(ws_seed(w, UID, "model-x 480p 50 steps", &G, 4, 1, t, status, sizeof status),
                     0);
    ck_assert_int_eq(ws_seed(w, UID2, "model-y", &G, 4, 1, t, status, sizeof status), 1);
    ck_assert(memcmp(t, s2, gb) == 0);
    ck_assert_int_eq(ws_seed(w, 4242, "model-x 480p 50 steps", &G, 4, 1, t, status, sizeof status),
                     0);
    /* The store goes on: a new deposit for the damaged key works and is written. */
    ck_assert_int_eq(ws_deposit(w, UID, "model-x 480p 50 steps", &G, s1), 0);
    ws_flush(w);
    ws_free(w);
    rm_rf(dir);
    free(s1);
    free(s2);
    free(t);
}

START_TEST(store_refuses_damaged_files)
{
    static const char *const want[] = {"checksum mismatch", "truncated or extended",
                                       "truncated (shorter than its header)",
                                       "written for another uid",
                                       "bad magic",
                                       "a symbolic link"};
    damaged(_i, want[_i]);
}
END_TEST

/* ---- the engine ---------------------------------------------------------------------------- */

typedef struct harness {
    eng *e;
    int pipe[2];
    int done_calls;
} harness;

static void notify_pipe(void *data)
{
    harness *h = data;
    char c = 1;
    ssize_t n = write(h->pipe[1], &c, 1);
    (void)n;
}

static void h_open(harness *h, const char *state_dir)
{
    memset(h, 0, sizeof *h);
    ck_assert_int_eq(pipe2(h->pipe, O_NONBLOCK | O_CLOEXEC), 0);
    eng_config cfg;
    eng_config_default(&cfg);
    cfg.backend = "cpu";
    cfg.cpu_threads = 2;
    cfg.notify = notify_pipe;
    cfg.notify_data = h;
    cfg.log = sink;
    cfg.warm_state_dir = state_dir;
    eng_error err = {{0}};
    int rc = eng_new(&cfg, &h->e, &err);
    ck_assert_msg(rc == 0, "eng_new: %d %s", rc, err.msg);
}

static void h_close(harness *h)
{
    eng_free(h->e);
    close(h->pipe[0]);
    close(h->pipe[1]);
}

static void h_wait(harness *h, int n)
{
    int target = h->done_calls + n;
    for (int spins = 0; h->done_calls < target && spins < 4000; spins++) {
        struct pollfd pfd = {.fd = h->pipe[0], .events = POLLIN};
        poll(&pfd, 1, 10);
        char buf[64];
        while (read(h->pipe[0], buf, sizeof buf) > 0) {
        }
        eng_process_completions(h->e);
    }
    ck_assert_int_eq(h->done_calls, target);
}

typedef struct call {
    harness *h;
    int status, ran;
    eng_attn_result res;
} call;

static void on_done(void *user, int status, const eng_attn_result *res, const char *msg)
{
    (void)msg;
    call *c = user;
    c->ran++;
    c->status = status;
    c->res = *res;
    c->h->done_calls++;
}

/* The problem: B 1, S 1024, H 2, D 64, f32, in one shm buffer (q, k, v, o, lse). Tiles are
 * 128 x 64: nQ 8, nK 16, one mask word per row. */
enum { B = 1, S = 1024, H = 2, D = 64, NQ = 8, NK = 16, LAYERS = 2 };
#define NQKV ((int64_t)B * S * H * D)

typedef struct prob {
    int fd;
    void *p;
    size_t size;
    uint64_t id;
    float *q, *k, *v, *o, *lse;
} prob;

static void prob_make(harness *h, uint32_t uid, uint64_t conn, prob *p)
{
    memset(p, 0, sizeof *p);
    p->size = (size_t)(4 * NQKV * 4 + B * H * S * 4);
    p->fd = memfd_create("check_warm", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    ck_assert_int_ge(p->fd, 0);
    ck_assert_int_eq(ftruncate(p->fd, (off_t)p->size), 0);
    p->p = mmap(NULL, p->size, PROT_READ | PROT_WRITE, MAP_SHARED, p->fd, 0);
    ck_assert_ptr_ne(p->p, MAP_FAILED);
    p->q = p->p;
    p->k = p->q + NQKV;
    p->v = p->k + NQKV;
    p->o = p->v + NQKV;
    p->lse = p->o + NQKV;
    eng_error err = {{0}};
    ck_assert_int_eq(eng_buffer_add_shm(h->e, uid, conn, dup(p->fd), p->size, &p->id, &err), 0);
}

static void prob_drop(prob *p)
{
    munmap(p->p, p->size);
    close(p->fd);
}

/* The "model": attention with positional structure, as in a video DiT with RoPE. Q and K rows
 * carry a * (cos, sin)(w_f s + phase_{h,f}) over 32 frequencies (periods 8 .. ~2300 tokens), so
 * q_i . k_j = a^2 sum_f cos(w_f (i - j)): peaked near i = j, far keys negligible (a = 2: some
 * 19 doublings below the peak). Each generation adds its own noise (amplitude 0.35: "another
 * prompt and seed") and drifts slowly over the steps; V is the generation's own. */
static void fill_gen(prob *p, uint64_t model, uint64_t gen, int step)
{
    tu_rng m, g, d;
    tu_rng_init(&m, 1000 + model);
    tu_rng_init(&g, 2000 + gen * 7919);
    tu_rng_init(&d, 3000 + gen * 7919);
    double phase[H][D / 2];
    for (int h = 0; h < H; h++)
        for (int f = 0; f < D / 2; f++)
            phase[h][f] = 6.283185307179586 * tu_rng_uniform(&m);
    const double a = 2.0;
    for (int b = 0; b < B; b++)
        for (int s = 0; s < S; s++)
            for (int h = 0; h < H; h++)
                for (int f = 0; f < D / 2; f++) {
                    double w = 6.283185307179586 / (8.0 * pow(1.28, f));
                    double c = a * cos(w * s + phase[h][f]), sn = a * sin(w * s + phase[h][f]);
                    int64_t i = (((int64_t)b * S + s) * H + h) * D + 2 * f;
                    for (int k = 0; k < 2; k++) {
                        double base = k ? sn : c;
                        p->q[i + k] = (float)(base + 0.35 * tu_rng_normal(&g) +
                                              0.01 * step * tu_rng_normal(&d));
                        p->k[i + k] = (float)(base + 0.35 * tu_rng_normal(&g) +
                                              0.01 * step * tu_rng_normal(&d));
                        p->v[i + k] = (float)tu_rng_normal(&g);
                    }
                }
}

static void tensor(eng_tensor *t, uint64_t buf, uint64_t off, la_dtype dt, int ndim)
{
    memset(t, 0, sizeof *t);
    t->buffer_id = buf;
    t->offset = off;
    t->dtype = dt;
    t->ndim = ndim;
    int64_t s4[4] = {B, S, H, D}, s3[3] = {B, H, S};
    memcpy(t->shape, ndim == 4 ? s4 : s3, (size_t)ndim * sizeof(int64_t));
}

static eng_session_spec spec_make(const char *key, float tau)
{
    eng_session_spec sp;
    memset(&sp, 0, sizeof sp);
    sp.key = key;
    sp.layers = LAYERS;
    sp.heads = H;
    sp.head_dim = D;
    sp.dtype = LA_DTYPE_F32;
    sp.max_seq_q = S;
    sp.max_seq_k = S;
    sp.batch = B;
    sp.kv_shards = 1;
    sp.threshold = tau;
    sp.mode = LA_MODE_SKIP;
    sp.device = "cpu";
    return sp;
}

static uint64_t open_ok(harness *h, uint32_t uid, uint64_t conn, const eng_session_spec *sp,
                        eng_session_view *ret)
{
    eng_session_view v;
    eng_error err = {{0}};
    int rc = eng_session_open(h->e, uid, conn, sp, &v, &err);
    ck_assert_msg(rc == 0, "open '%s': %d %s", sp->key, rc, err.msg);
    ck_assert_uint_eq(v.bm, 128);
    ck_assert_uint_eq(v.bn, 64);
    ck_assert_uint_eq(v.n_q_tiles, NQ);
    ck_assert_uint_eq(v.n_k_words, 1);
    if (ret)
        *ret = v;
    return v.id;
}

/* One call (layer, step) of session sid on p, waited for. */
static call run(harness *h, uint32_t uid, uint64_t conn, uint64_t sid, const prob *p,
                uint32_t layer, uint32_t step)
{
    eng_attn_req r;
    memset(&r, 0, sizeof r);
    r.session_id = sid;
    r.layer = layer;
    r.step = step;
    tensor(&r.q, p->id, 0, LA_DTYPE_F32, 4);
    tensor(&r.k, p->id, (uint64_t)NQKV * 4, LA_DTYPE_F32, 4);
    tensor(&r.v, p->id, (uint64_t)NQKV * 8, LA_DTYPE_F32, 4);
    tensor(&r.o, p->id, (uint64_t)NQKV * 12, LA_DTYPE_F32, 4);
    tensor(&r.lse, p->id, (uint64_t)NQKV * 16, LA_DTYPE_F32, 3);
    r.has_lse = 1;
    r.mode = LA_MODE_SESSION;
    call c;
    memset(&c, 0, sizeof c);
    c.h = h;
    eng_error err = {{0}};
    int rc = eng_attn_submit(h->e, uid, conn, &r, on_done, &c, &err);
    ck_assert_msg(rc == 0, "submit: %d %s", rc, err.msg);
    h_wait(h, 1);
    ck_assert_int_eq(c.status, 0);
    return c;
}

/* The layer's mask rows [B][H][NQ] (one word each). */
static void read_mask(harness *h, uint32_t uid, uint64_t sid, uint32_t layer, uint32_t *out)
{
    size_t got = 0;
    uint64_t total = 0;
    eng_error err = {{0}};
    ck_assert_int_eq(eng_mask_read(h->e, uid, sid, layer, 0, 0, out, B * H * NQ * 4, &got, &total,
                                   &err),
                     0);
    ck_assert_uint_eq(got, B * H * NQ * 4);
}

static eng_session_stats stats_of(harness *h, uint32_t uid, uint64_t sid)
{
    eng_session_stats st;
    eng_error err = {{0}};
    ck_assert_int_eq(eng_session_info(h->e, uid, sid, NULL, 0, &st, &err), 0);
    return st;
}

static uint64_t popcount_rows(const uint32_t *m, int n)
{
    uint64_t c = 0;
    for (int i = 0; i < n; i++)
        c += (uint64_t)__builtin_popcount(m[i] & ((1u << NK) - 1));
    return c;
}

/* The float64 reference of a call on p: dense O and LSE, the O and LSE over exactly the tiles
 * of mask (rows [B][H][NQ], one word each), and per row the probability mass outside them. */
typedef struct ref {
    double *o_dense, *lse_dense, *o_sparse, *lse_sparse, *lost;
} ref;

static la_attn_params ref_params(const prob *p)
{
    la_attn_params a;
    memset(&a, 0, sizeof a);
    tu_params(&a, p->q, p->k, p->v, p->o, p->lse, NULL, B, S, S, H, D, LA_DTYPE_F32, 128, 64);
    return a;
}

static ref ref_new(const prob *p, const uint32_t *mask)
{
    ref r;
    r.o_dense = malloc(NQKV * sizeof(double));
    r.o_sparse = malloc(NQKV * sizeof(double));
    r.lse_dense = malloc(B * H * S * sizeof(double));
    r.lse_sparse = malloc(B * H * S * sizeof(double));
    r.lost = malloc(B * H * S * sizeof(double));
    la_attn_params a = ref_params(p);
    naive_attn_f64(&a, NULL, r.o_dense, r.lse_dense);
    uint8_t *comp = malloc(B * H * NQ * NK);
    for (int row = 0; row < B * H * NQ; row++)
        for (int n = 0; n < NK; n++)
            comp[row * NK + n] = (mask[row] >> n) & 1u;
    naive_attn_f64(&a, comp, r.o_sparse, r.lse_sparse);
    for (int i = 0; i < B * H * S; i++)
        r.lost[i] = isinf(r.lse_sparse[i]) ? 1.0 : 1.0 - exp(r.lse_sparse[i] - r.lse_dense[i]);
    free(comp);
    return r;
}

static void ref_free(ref *r)
{
    free(r->o_dense), free(r->o_sparse), free(r->lse_dense), free(r->lse_sparse), free(r->lost);
}

/* The call's output equals float64 attention over the tiles of its mask, and every row is
 * within the lost-mass bound of dense attention: |o - o_dense| <= 2 * lost * max|v|. */
static void check_output(const prob *p, const ref *r, const char *what)
{
    double *got = malloc(NQKV * sizeof(double));
    la_attn_params a = ref_params(p);
    tu_o_f64(&a, got);
    double e = tu_rel_l2(r->o_sparse, got, NQKV);
    ck_assert_msg(e < 1e-5, "%s: O against float64 over its tiles: rel L2 %g", what, e);
    double vmax = 0;
    for (int64_t i = 0; i < NQKV; i++)
        vmax = fmax(vmax, fabs(p->v[i]));
    for (int b = 0; b < B; b++)
        for (int s = 0; s < S; s++)
            for (int h = 0; h < H; h++) {
                double lost = r->lost[(b * H + h) * S + s], worst = 0;
                for (int d = 0; d < D; d++) {
                    int64_t i = (((int64_t)b * S + s) * H + h) * D + d;
                    worst = fmax(worst, fabs(got[i] - r->o_dense[i]));
                }
                ck_assert_msg(worst <= 2 * lost * vmax + 1e-4,
                              "%s: row (b %d, s %d, h %d) is %g from dense, its lost mass %g "
                              "bounds it by %g",
                              what, b, s, h, worst, lost, 2 * lost * vmax);
            }
    free(got);
}

START_TEST(options_refused)
{
    harness h;
    h_open(&h, NULL);
    eng_session_view v;
    eng_error err = {{0}};
    eng_session_spec sp = spec_make("opts", -3);
    sp.has_warm_margin = 1;
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &sp, &v, &err), LA_EINVAL);
    ck_assert_msg(strstr(err.msg, "without a warm key"), "%s", err.msg);
    sp = spec_make("opts", -3);
    sp.warm_key = "";
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &sp, &v, &err), LA_EINVAL);
    sp.warm_key = "bad\nkey";
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &sp, &v, &err), LA_EINVAL);
    ck_assert_msg(strstr(err.msg, "control byte"), "%s", err.msg);
    sp.warm_key = "k";
    sp.has_warm_generations = 1;
    sp.warm_generations = 0;
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &sp, &v, &err), LA_EINVAL);
    sp.warm_generations = 9; /* the default warm_max_generations is 8 */
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &sp, &v, &err), LA_EINVAL);
    ck_assert_msg(strstr(err.msg, "warm_max_generations"), "%s", err.msg);
    sp.has_warm_generations = 0;
    sp.has_warm_margin = 1;
    sp.warm_margin = 17;
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &sp, &v, &err), LA_EINVAL);
    sp = spec_make("opts", -3);
    sp.guard_every = 1;
    sp.guard_sample = 65;
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &sp, &v, &err), LA_EINVAL);
    sp.guard_sample = 1;
    sp.guard_budget = 1.5f;
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &sp, &v, &err), LA_EINVAL);
    ck_assert_msg(strstr(err.msg, "budget"), "%s", err.msg);
    sp.guard_budget = NAN;
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &sp, &v, &err), LA_EINVAL);
    sp.guard_every = 0;
    sp.guard_budget = 0.1f;
    ck_assert_int_eq(eng_session_open(h.e, UID, CONN, &sp, &v, &err), LA_EINVAL);
    ck_assert_msg(strstr(err.msg, "without guard every"), "%s", err.msg);
    /* Nothing was opened by the refusals. */
    sp = spec_make("opts", -3);
    open_ok(&h, UID, CONN, &sp, NULL);
    h_close(&h);
}
END_TEST

START_TEST(guard_sample_rule)
{
    int32_t t[LA_GUARD_MAX_SAMPLE];
    ck_assert_int_eq(la_guard_sample(8, 8, 5, t), 8);
    for (int j = 0; j < 8; j++)
        ck_assert_int_eq(t[j], j);
    /* S' = 3, T = 10 / 3 = 3: m_j = c % 3 + 3 j */
    for (uint32_t c = 0; c < 7; c++) {
        ck_assert_int_eq(la_guard_sample(10, 3, c, t), 3);
        for (int j = 0; j < 3; j++)
            ck_assert_int_eq(t[j], (int32_t)(c % 3) + 3 * j);
    }
    ck_assert_int_eq(la_guard_sample(5, 100, 0, t), 5);
    ck_assert_int_eq(la_guard_sample(1000, 100, 0, t), LA_GUARD_MAX_SAMPLE);
    ck_assert_int_eq(la_guard_sample(0, 1, 0, t), 0);
    ck_assert_int_eq(la_guard_sample(4, 0, 0, t), 0);
}
END_TEST

/* The samples' gathered Q: row j * BM + i of batch b is Q row tiles[j] * BM + i, every head and
 * element, from a strided Q ([B, H, S, D] in memory); rows past Sq are zero. */
START_TEST(guard_gather_q_rows)
{
    enum { GB = 2, GS = 10, GH = 3, GD = 4, GBM = 4, GN = 2 };
    float q[GB * GH * GS * GD], out[GB * GN * GBM * GH * GD];
    const int64_t st[4] = {GH * GS * GD, GD, GS * GD, 1}; /* (b, s, h, d) of [B, H, S, D] */
    for (int i = 0; i < GB * GH * GS * GD; i++)
        q[i] = (float)(i + 1);
    memset(out, 0xa5, sizeof out);
    const int32_t tiles[GN] = {2, 0}; /* tile 2: rows 8, 9 and two past Sq */
    la_guard_gather_q(out, q, st, GB, GS, GH, GD, sizeof(float), GBM, tiles, GN);
    for (int b = 0; b < GB; b++)
        for (int j = 0; j < GN; j++)
            for (int i = 0; i < GBM; i++)
                for (int h = 0; h < GH; h++)
                    for (int d = 0; d < GD; d++) {
                        int r = tiles[j] * GBM + i;
                        float want = r < GS ? q[b * st[0] + r * st[1] + h * st[2] + d] : 0.0f;
                        ck_assert_float_eq(out[(((b * GN + j) * GBM + i) * GH + h) * GD + d],
                                           want);
                    }
}
END_TEST

/* la_guard_compare's rule on hand-made LSEs: a failed sample restores its row; more than half
 * of a head's samples failed restore the whole head (docs/SKIP-SEMANTICS.md, escalation). */
START_TEST(guard_compare_escalates_head)
{
    enum { GB = 1, GH = 3, GBM = 2, GNQ = 5, GSQ = GNQ * GBM };
    float lse[GB * GH * GSQ], dense[GB * GH * 3 * GBM]; /* [B, H, 3 samples * BM] */
    uint32_t held[1] = {0};
    for (int i = 0; i < GB * GH * 3 * GBM; i++)
        dense[i] = 0.0f;
    for (int h = 0; h < GH; h++)
        for (int r = 0; r < GSQ; r++)
            lse[h * GSQ + r] = 0.0f; /* nothing lost */
    la_guard_params gp;
    memset(&gp, 0, sizeof gp);
    gp.lse = lse;
    gp.lse_stride[0] = GH * GSQ, gp.lse_stride[1] = GSQ, gp.lse_stride[2] = 1;
    gp.dense_lse = dense;
    gp.held = held;
    gp.tiles[0] = 0, gp.tiles[1] = 2, gp.tiles[2] = 4;
    gp.n_tiles = 3;
    gp.B = GB, gp.H = GH, gp.Sq = GSQ, gp.BM = GBM, gp.nq = GNQ;
    gp.budget = 0.1f;
    /* head 0: samples 0 and 2 lose 63% (2 of 3: escalates); head 1: sample 4 alone (one row
     * of it) loses 63%; head 2: a loss under the budget. */
    lse[0 * GSQ + 0] = -1.0f;
    lse[0 * GSQ + 2 * GBM + 1] = -1.0f;
    lse[1 * GSQ + 4 * GBM + 1] = -1.0f;
    lse[2 * GSQ + 0] = -0.05f;
    /* rows outside the samples are never read: a loss there changes nothing */
    lse[1 * GSQ + 1 * GBM] = -9.0f;
    /* head 2, sample 1 (q-tile 2), row 0: its dense LSE (at (b H + h) 3 BM + 1 BM + 0) 1 above
     * the call's, 63% lost: that row alone */
    dense[(0 * GH + 2) * 3 * GBM + 1 * GBM + 0] = 1.0f;
    ck_assert_uint_eq(la_guard_compare(&gp), GNQ + 2);
    ck_assert_uint_eq(held[0], ((1u << GNQ) - 1u) | 1u << (GNQ + 4) | 1u << (2 * GNQ + 2));
    ck_assert_uint_eq(la_guard_compare(&gp), 0); /* held already: nothing new */
    /* One sample alone never escalates, even when it fails. */
    held[0] = 0;
    gp.n_tiles = 1;
    dense[(0 * GH + 2) * 3 * GBM + 1 * GBM + 0] = 0.0f;
    gp.held = held;
    ck_assert_uint_eq(la_guard_compare(&gp), 1);
    ck_assert_uint_eq(held[0], 1u);
    ck_assert(!la_guard_escalates(1, 2) && la_guard_escalates(2, 2) && la_guard_escalates(2, 3) &&
              !la_guard_escalates(1, 1) && !la_guard_escalates(32, 64));
}
END_TEST

/* The last masks of a generation of `steps` steps on model 1, generation gen. */
static void cold_generation(harness *h, uint32_t uid, prob *p, uint64_t gen, int steps,
                            const char *key, const char *warm_key, uint32_t *last[LAYERS],
                            uint64_t *ret_computed)
{
    eng_session_spec sp = spec_make(key, -3);
    sp.warm_key = warm_key;
    uint64_t sid = open_ok(h, uid, CONN, &sp, NULL);
    uint64_t comp = 0;
    for (int step = 0; step < steps; step++) {
        fill_gen(p, 1, gen, step);
        for (uint32_t l = 0; l < LAYERS; l++)
            comp += run(h, uid, CONN, sid, p, l, (uint32_t)step).res.tiles_computed;
    }
    for (uint32_t l = 0; last && l < LAYERS; l++)
        read_mask(h, uid, sid, l, last[l]);
    if (ret_computed)
        *ret_computed = comp;
    eng_error err = {{0}};
    ck_assert_int_eq(eng_session_close(h->e, uid, sid, &err), 0);
}

/* The expected seed of one layer from the generations' last masks (margin 1), rows [B][H][NQ]. */
static void expect_seed(uint32_t *const *gens, int n, uint32_t *out)
{
    ws_geom g = {1, 1, B, H, NQ, NK, 1, 128, 64};
    naive_seed(&g, gens, n, 1, out);
}

START_TEST(warm_skips_more_than_cold)
{
    harness h;
    h_open(&h, NULL);
    prob p;
    prob_make(&h, UID, CONN, &p);
    uint32_t g1[LAYERS][B * H * NQ], g2[LAYERS][B * H * NQ];
    uint32_t *l1[LAYERS] = {g1[0], g1[1]}, *l2[LAYERS] = {g2[0], g2[1]};
    /* Two earlier generations (other noise: "other prompts and seeds") deposit at close. */
    cold_generation(&h, UID, &p, 1, 4, "gen-1", "toy-model 1024 4 steps", l1, NULL);
    cold_generation(&h, UID, &p, 2, 4, "gen-2", "toy-model 1024 4 steps", l2, NULL);
    /* The new generation cold, for comparison (no warm key: nothing deposited). */
    uint64_t cold_total = 0;
    uint64_t cold_step[4] = {0};
    {
        eng_session_spec sp = spec_make("cold", -3);
        uint64_t sid = open_ok(&h, UID, CONN, &sp, NULL);
        for (int step = 0; step < 4; step++) {
            fill_gen(&p, 1, 3, step);
            for (uint32_t l = 0; l < LAYERS; l++) {
                call c = run(&h, UID, CONN, sid, &p, l, (uint32_t)step);
                cold_step[step] += c.res.tiles_computed;
            }
        }
        cold_total = cold_step[0] + cold_step[1] + cold_step[2] + cold_step[3];
        eng_error err = {{0}};
        eng_session_close(h.e, UID, sid, &err);
    }
    ck_assert_uint_eq(cold_step[0], (uint64_t)LAYERS * B * H * NQ * NK); /* step 0 is dense */

    /* Warm, seeded from step 0 (no dense steps). */
    eng_session_spec sp = spec_make("warm", -3);
    sp.warm_key = "toy-model 1024 4 steps";
    sp.has_warm_dense_steps = 1;
    sp.warm_dense_steps = 0;
    eng_session_view v;
    uint64_t sid = open_ok(&h, UID, CONN, &sp, &v);
    ck_assert_uint_eq(v.warm_generations, 2);
    ck_assert_msg(strstr(v.warm_status, "seeded from 2 generations"), "%s", v.warm_status);
    uint64_t warm_step[4] = {0};
    for (int step = 0; step < 4; step++) {
        fill_gen(&p, 1, 3, step);
        for (uint32_t l = 0; l < LAYERS; l++) {
            uint32_t used[B * H * NQ];
            if (step == 0) {
                uint32_t *gens[2] = {l2[l], l1[l]};
                expect_seed(gens, 2, used);
            } else {
                read_mask(&h, UID, sid, l, used);
            }
            call c = run(&h, UID, CONN, sid, &p, l, (uint32_t)step);
            warm_step[step] += c.res.tiles_computed;
            ck_assert_uint_eq(c.res.tiles_computed, popcount_rows(used, B * H * NQ));
            char what[64];
            snprintf(what, sizeof what, "warm step %d layer %u", step, l);
            ref r = ref_new(&p, used);
            check_output(&p, &r, what);
            ref_free(&r);
            if (step == 0) { /* the mask after the first call lies inside the seed */
                uint32_t after[B * H * NQ];
                read_mask(&h, UID, sid, l, after);
                for (int i = 0; i < B * H * NQ; i++)
                    ck_assert_uint_eq(after[i] & ~used[i], 0);
            }
        }
    }
    uint64_t warm_total = warm_step[0] + warm_step[1] + warm_step[2] + warm_step[3];
    ck_assert_msg(warm_step[0] < cold_step[0], "step 0: warm %llu, cold %llu tiles",
                  (unsigned long long)warm_step[0], (unsigned long long)cold_step[0]);
    ck_assert_msg(warm_total < cold_total, "generation: warm %llu, cold %llu tiles",
                  (unsigned long long)warm_total, (unsigned long long)cold_total);
    eng_session_stats st = stats_of(&h, UID, sid);
    ck_assert_str_eq(st.warm_key, "toy-model 1024 4 steps");
    ck_assert_uint_eq(st.warm_generations, 2);
    eng_error err = {{0}};
    ck_assert_int_eq(eng_session_close(h.e, UID, sid, &err), 0);

    /* With one dense step: step 0 computes everything (and learns), step 1 computes what the
     * cold session computes, ANDed with the seed. */
    sp.key = "warm-dense-1";
    sp.warm_dense_steps = 1;
    sid = open_ok(&h, UID, CONN, &sp, &v);
    ck_assert_uint_eq(v.warm_generations, 3); /* "warm" deposited too */
    fill_gen(&p, 1, 3, 0);
    uint64_t s0 = 0, s1 = 0;
    for (uint32_t l = 0; l < LAYERS; l++)
        s0 += run(&h, UID, CONN, sid, &p, l, 0).res.tiles_computed;
    ck_assert_uint_eq(s0, cold_step[0]);
    fill_gen(&p, 1, 3, 1);
    for (uint32_t l = 0; l < LAYERS; l++)
        s1 += run(&h, UID, CONN, sid, &p, l, 1).res.tiles_computed;
    ck_assert_msg(s1 <= cold_step[1], "step 1 with a dense first step: warm %llu > cold %llu",
                  (unsigned long long)s1, (unsigned long long)cold_step[1]);
    ck_assert_int_eq(eng_session_close(h.e, UID, sid, &err), 0);
    prob_drop(&p);
    h_close(&h);
}
END_TEST

/* The seed at a restart: a generation that starts over inside a warm session is seeded too. */
START_TEST(warm_restart_reseeds)
{
    harness h;
    h_open(&h, NULL);
    prob p;
    prob_make(&h, UID, CONN, &p);
    uint32_t g1[LAYERS][B * H * NQ];
    uint32_t *l1[LAYERS] = {g1[0], g1[1]};
    cold_generation(&h, UID, &p, 1, 3, "gen-1", "k", l1, NULL);
    eng_session_spec sp = spec_make("warm", -3);
    sp.warm_key = "k";
    sp.has_warm_dense_steps = 1;
    sp.warm_dense_steps = 0;
    uint64_t sid = open_ok(&h, UID, CONN, &sp, NULL);
    uint32_t seed[B * H * NQ], *gens[1] = {l1[0]};
    expect_seed(gens, 1, seed);
    uint64_t first = 0;
    for (int gen = 0; gen < 2; gen++)
        for (int step = 0; step < 3; step++) {
            fill_gen(&p, 1, 5 + (uint64_t)gen, step);
            call c = run(&h, UID, CONN, sid, &p, 0, (uint32_t)step);
            if (step == 0 && gen == 0)
                first = c.res.tiles_computed;
            if (step == 0) { /* both generations start from the seed */
                ck_assert_uint_eq(c.res.tiles_computed, popcount_rows(seed, B * H * NQ));
                uint32_t after[B * H * NQ];
                read_mask(&h, UID, sid, 0, after);
                for (int i = 0; i < B * H * NQ; i++)
                    ck_assert_uint_eq(after[i] & ~seed[i], 0);
            }
        }
    ck_assert_uint_lt(first, (uint64_t)B * H * NQ * NK);
    ck_assert_uint_eq(stats_of(&h, UID, sid).restarts, 1);
    prob_drop(&p);
    h_close(&h);
}
END_TEST

/* A reset while a seeded session's call is in flight gives it a fresh mask set: the seed is
 * in the new set too (the first call after the reset starts from it), though the old set's
 * view is never read for it (the CUDA backend may not have made that view yet). */
START_TEST(warm_reset_in_flight_keeps_seed)
{
    harness h;
    h_open(&h, NULL);
    prob p;
    prob_make(&h, UID, CONN, &p);
    uint32_t g1[LAYERS][B * H * NQ];
    uint32_t *l1[LAYERS] = {g1[0], g1[1]};
    cold_generation(&h, UID, &p, 1, 3, "gen-1", "reset-key", l1, NULL);
    eng_session_spec sp = spec_make("warm", -3);
    sp.warm_key = "reset-key";
    sp.has_warm_dense_steps = 1;
    sp.warm_dense_steps = 0;
    uint64_t sid = open_ok(&h, UID, CONN, &sp, NULL);
    uint32_t seed[B * H * NQ], *gens[1] = {l1[0]};
    expect_seed(gens, 1, seed);
    /* Step 0 of layer 0 submitted, and the session reset before it completes. */
    fill_gen(&p, 1, 7, 0);
    eng_attn_req r;
    memset(&r, 0, sizeof r);
    r.session_id = sid;
    tensor(&r.q, p.id, 0, LA_DTYPE_F32, 4);
    tensor(&r.k, p.id, (uint64_t)NQKV * 4, LA_DTYPE_F32, 4);
    tensor(&r.v, p.id, (uint64_t)NQKV * 8, LA_DTYPE_F32, 4);
    tensor(&r.o, p.id, (uint64_t)NQKV * 12, LA_DTYPE_F32, 4);
    tensor(&r.lse, p.id, (uint64_t)NQKV * 16, LA_DTYPE_F32, 3);
    r.has_lse = 1;
    r.mode = LA_MODE_SESSION;
    call c;
    memset(&c, 0, sizeof c);
    c.h = &h;
    eng_error err = {{0}};
    ck_assert_int_eq(eng_attn_submit(h.e, UID, CONN, &r, on_done, &c, &err), 0);
    ck_assert_int_eq(eng_session_reset(h.e, UID, sid, &err), 0); /* the call holds the old set */
    h_wait(&h, 1);
    ck_assert_int_eq(c.status, 0);
    ck_assert_uint_eq(c.res.tiles_computed, popcount_rows(seed, B * H * NQ));
    /* After the reset, on the fresh set: seeded again, from the same seed. */
    for (uint32_t l = 0; l < LAYERS; l++) {
        uint32_t want[B * H * NQ], *gl[1] = {l1[l]};
        expect_seed(gl, 1, want);
        call d = run(&h, UID, CONN, sid, &p, l, 0);
        ck_assert_uint_eq(d.res.tiles_computed, popcount_rows(want, B * H * NQ));
        uint32_t after[B * H * NQ];
        read_mask(&h, UID, sid, l, after);
        for (int i = 0; i < B * H * NQ; i++)
            ck_assert_uint_eq(after[i] & ~want[i], 0);
        ref rf = ref_new(&p, want);
        check_output(&p, &rf, "after the reset");
        ref_free(&rf);
    }
    ck_assert_int_eq(eng_session_close(h.e, UID, sid, &err), 0);
    prob_drop(&p);
    h_close(&h);
}
END_TEST

/* warm_step: the masks right after every layer's call at that step are the generation. */
START_TEST(warm_settled_step_capture)
{
    harness h;
    h_open(&h, NULL);
    prob p;
    prob_make(&h, UID, CONN, &p);
    eng_session_spec sp = spec_make("capture", -3);
    sp.warm_key = "capture-key";
    sp.has_warm_step = 1;
    sp.warm_step = 2;
    uint64_t sid = open_ok(&h, UID, CONN, &sp, NULL);
    uint32_t at2[LAYERS][B * H * NQ];
    for (int step = 0; step < 5; step++) {
        fill_gen(&p, 1, 1, step);
        for (uint32_t l = 0; l < LAYERS; l++) {
            run(&h, UID, CONN, sid, &p, l, (uint32_t)step);
            if (step == 2)
                read_mask(&h, UID, sid, l, at2[l]);
        }
        ck_assert_uint_eq(stats_of(&h, UID, sid).warm_deposits, step >= 2 ? 1 : 0);
    }
    eng_error err = {{0}};
    ck_assert_int_eq(eng_session_close(h.e, UID, sid, &err), 0);
    /* A session seeded from it alone, margin 0, at tau = -inf in mode observe: its mask after
     * its first call is the seed, which is the captured generation. */
    sp = spec_make("reader", -INFINITY);
    sp.mode = LA_MODE_OBSERVE;
    sp.warm_key = "capture-key";
    sp.has_warm_generations = 1, sp.warm_generations = 1;
    sp.has_warm_margin = 1, sp.warm_margin = 0;
    sp.has_warm_dense_steps = 1, sp.warm_dense_steps = 0;
    sid = open_ok(&h, UID, CONN, &sp, NULL);
    for (uint32_t l = 0; l < LAYERS; l++) {
        run(&h, UID, CONN, sid, &p, l, 0);
        uint32_t got[B * H * NQ];
        read_mask(&h, UID, sid, l, got);
        ck_assert_msg(memcmp(got, at2[l], sizeof got) == 0, "layer %u: stored masks differ", l);
    }
    prob_drop(&p);
    h_close(&h);
}
END_TEST

typedef struct wlist {
    int n;
    char key[64];
    uint32_t uid;
} wlist;

static void wlist_one(void *data, const eng_warm_entry *w)
{
    wlist *l = data;
    if (l->n++ == 0) {
        snprintf(l->key, sizeof l->key, "%s", w->key);
        l->uid = w->uid;
    }
}

START_TEST(warm_never_across_users)
{
    harness h;
    h_open(&h, NULL);
    prob p;
    prob_make(&h, UID, CONN, &p);
    cold_generation(&h, UID, &p, 1, 3, "gen-1", "shared name", NULL, NULL);
    eng_session_spec sp = spec_make("other user", -3);
    sp.warm_key = "shared name";
    eng_session_view v;
    uint64_t sid = open_ok(&h, UID2, CONN2, &sp, &v);
    ck_assert_uint_eq(v.warm_generations, 0);
    ck_assert_msg(strstr(v.warm_status, "cold: no stored masks"), "%s", v.warm_status);
    wlist a = {0}, b = {0}, all = {0};
    eng_warm_list(h.e, UID, wlist_one, &a);
    eng_warm_list(h.e, UID2, wlist_one, &b);
    eng_warm_list(h.e, 0, wlist_one, &all);
    ck_assert_int_eq(a.n, 1);
    ck_assert_str_eq(a.key, "shared name");
    ck_assert_int_eq(b.n, 0);
    ck_assert_int_eq(all.n, 1);
    uint64_t dropped = 9;
    eng_error err = {{0}};
    ck_assert_int_eq(eng_warm_drop(h.e, UID2, "shared name", &dropped, &err), 0);
    ck_assert_uint_eq(dropped, 0);
    a.n = 0;
    eng_warm_list(h.e, UID, wlist_one, &a);
    ck_assert_int_eq(a.n, 1);
    /* The owner is seeded. */
    sp.key = "same user";
    ck_assert_int_eq(eng_session_close(h.e, UID2, sid, &err), 0);
    open_ok(&h, UID, CONN, &sp, &v);
    ck_assert_uint_eq(v.warm_generations, 1);
    prob_drop(&p);
    h_close(&h);
}
END_TEST

/* A kv shard the generation never calls (no second guidance branch) does not hold the deposit
 * back, at close or at the settled step; it is stored all ones. */
START_TEST(warm_deposit_with_unused_shard)
{
    harness h;
    h_open(&h, NULL);
    prob p;
    prob_make(&h, UID, CONN, &p);
    for (int with_step = 0; with_step < 2; with_step++) {
        eng_session_spec sp = spec_make(with_step ? "at-step" : "at-close", -3);
        sp.kv_shards = 2;
        sp.warm_key = with_step ? "two shards, step" : "two shards";
        sp.has_warm_step = with_step;
        sp.warm_step = 1;
        uint64_t sid = open_ok(&h, UID, CONN, &sp, NULL);
        for (int step = 0; step < 3; step++) {
            fill_gen(&p, 1, 1, step);
            for (uint32_t l = 0; l < LAYERS; l++)
                run(&h, UID, CONN, sid, &p, l, (uint32_t)step);
        }
        ck_assert_uint_eq(stats_of(&h, UID, sid).warm_deposits, with_step ? 1 : 0);
        eng_error err = {{0}};
        ck_assert_int_eq(eng_session_close(h.e, UID, sid, &err), 0);
        /* The next session of the key is seeded: shard 0 from the masks, shard 1 all ones. */
        sp.key = with_step ? "at-step-2" : "at-close-2";
        eng_session_view v;
        open_ok(&h, UID, CONN, &sp, &v);
        ck_assert_uint_eq(v.warm_generations, 1);
    }
    prob_drop(&p);
    h_close(&h);
}
END_TEST

/* The engine persists its store: a second engine on the same folder seeds the same way. */
START_TEST(warm_survives_restart)
{
    char dir[256];
    tmpdir(dir, sizeof dir);
    harness h;
    h_open(&h, dir);
    prob p;
    prob_make(&h, UID, CONN, &p);
    cold_generation(&h, UID, &p, 1, 3, "gen-1", "persisted", NULL, NULL);
    prob_drop(&p);
    h_close(&h); /* flushes the writer */
    log_clear();
    h_open(&h, dir);
    ck_assert_msg(strstr(g_log, "1 entries loaded, 0 files refused"), "log: %s", g_log);
    eng_session_spec sp = spec_make("after restart", -3);
    sp.warm_key = "persisted";
    eng_session_view v;
    open_ok(&h, UID, CONN, &sp, &v);
    ck_assert_uint_eq(v.warm_generations, 1);
    h_close(&h);
    rm_rf(dir);
}
END_TEST

/* ---- the guardrail ------------------------------------------------------------------------ */

/* Per q-tile row of the layer (rows [B][H][NQ]): the largest float64 lost mass of its rows. */
static void tile_loss(const ref *r, double *out)
{
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int m = 0; m < NQ; m++) {
                double w = 0;
                for (int i = m * 128; i < (m + 1) * 128 && i < S; i++)
                    w = fmax(w, r->lost[(b * H + h) * S + i]);
                out[(b * H + h) * NQ + m] = w;
            }
}

START_TEST(guard_restores_what_loses_mass)
{
    harness h;
    h_open(&h, NULL);
    prob p;
    prob_make(&h, UID, CONN, &p);
    const float budget = 0.02f;
    eng_session_spec sp = spec_make("aggressive", 0.0f); /* tau = 0: far too aggressive */
    sp.layers = 1;
    sp.guard_every = 1;
    sp.guard_sample = NQ; /* every q-tile */
    sp.guard_budget = budget;
    uint64_t sid = open_ok(&h, UID, CONN, &sp, NULL);
    fill_gen(&p, 1, 1, 0);
    run(&h, UID, CONN, sid, &p, 0, 0);
    eng_session_stats st = stats_of(&h, UID, sid);
    ck_assert_uint_eq(st.guard_checks, 0); /* the first call's mask was all ones */

    uint32_t before[B * H * NQ], after[B * H * NQ];
    read_mask(&h, UID, sid, 0, before);
    fill_gen(&p, 1, 1, 1);
    call c = run(&h, UID, CONN, sid, &p, 0, 1);
    ref r = ref_new(&p, before);
    check_output(&p, &r, "checked call"); /* the check does not change the call's own result */
    double loss[B * H * NQ];
    tile_loss(&r, loss);
    ref_free(&r);
    read_mask(&h, UID, sid, 0, after);
    st = stats_of(&h, UID, sid);
    ck_assert_uint_eq(st.guard_checks, 1);
    ck_assert_uint_eq(st.guard_rows, B * H * NQ);
    ck_assert_uint_eq(st.guard_tiles, (uint64_t)B * H * NQ * NK);
    ck_assert_uint_eq(c.res.tiles_computed, popcount_rows(before, B * H * NQ));
    /* Per head: the rows float64 says lost more than the budget (must), within rounding of
     * it (may); a head where more than half do escalates: all its rows (every q-tile was
     * sampled here). */
    uint64_t must = 0, lo = 0, hi = 0;
    int held[B * H * NQ], esc[B * H];
    for (int hd = 0; hd < B * H; hd++) {
        int must_h = 0, may_h = 0;
        for (int i = hd * NQ; i < (hd + 1) * NQ; i++) {
            held[i] = (after[i] & 0xffffu) == 0xffffu;
            if (loss[i] > budget * 1.001) {
                must_h++;
                ck_assert_msg(held[i], "row %d lost %g > %g but was not restored (mask %08x)", i,
                              loss[i], budget, after[i]);
            } else if (loss[i] > budget * 0.999) {
                may_h++;
            }
        }
        must += (uint64_t)must_h;
        esc[hd] = la_guard_escalates(must_h + may_h, NQ);
        if (la_guard_escalates(must_h, NQ)) {
            for (int i = hd * NQ; i < (hd + 1) * NQ; i++)
                ck_assert_msg(held[i], "head %d escalated (%d of %d rows over budget) but row %d "
                              "is not restored", hd, must_h, NQ, i);
            lo += NQ, hi += NQ;
        } else {
            lo += (uint64_t)must_h, hi += esc[hd] ? NQ : (uint64_t)(must_h + may_h);
        }
    }
    ck_assert_msg(must > 0, "tau = 0 lost no mass above the budget: the case shows nothing");
    ck_assert_msg(st.guard_restored >= lo && st.guard_restored <= hi,
                  "restored %llu rows, float64 says %llu to %llu (escalated heads whole)",
                  (unsigned long long)st.guard_restored, (unsigned long long)lo,
                  (unsigned long long)hi);
    /* Rows under the budget of heads that did not escalate stay as the kernel decided (tau = 0
     * never keeps them all). */
    for (int i = 0; i < B * H * NQ; i++)
        if (loss[i] < budget * 0.999 && !esc[i / NQ])
            ck_assert_msg(!held[i], "row %d lost %g < %g but is all ones", i, loss[i], budget);

    /* The next call computes the restored rows densely: their output is dense attention. */
    fill_gen(&p, 1, 1, 2);
    read_mask(&h, UID, sid, 0, before);
    run(&h, UID, CONN, sid, &p, 0, 2);
    r = ref_new(&p, before);
    check_output(&p, &r, "after the restore");
    for (int i = 0; i < B * H * NQ; i++)
        if (held[i])
            for (int s = (i % NQ) * 128; s < (i % NQ + 1) * 128; s++)
                ck_assert_double_lt(r.lost[((i / NQ) % H) * S + s], 1e-12);
    ref_free(&r);
    read_mask(&h, UID, sid, 0, after);
    for (int i = 0; i < B * H * NQ; i++)
        if (held[i]) /* still restored after a call whose decisions dropped tiles */
            ck_assert_uint_eq(after[i] & 0xffffu, 0xffffu);
    /* A new generation (a restart) forgets them: its first call leaves the mask a fresh
     * session's first call leaves. */
    fill_gen(&p, 1, 2, 0);
    run(&h, UID, CONN, sid, &p, 0, 0);
    read_mask(&h, UID, sid, 0, after);
    ck_assert_uint_eq(stats_of(&h, UID, sid).restarts, 1);
    sp.key = "fresh";
    uint64_t fresh = open_ok(&h, UID, CONN, &sp, NULL);
    run(&h, UID, CONN, fresh, &p, 0, 0);
    read_mask(&h, UID, fresh, 0, before);
    ck_assert_msg(memcmp(after, before, sizeof after) == 0,
                  "restored rows outlived the generation");
    prob_drop(&p);
    h_close(&h);
}
END_TEST

/* With one q-tile sampled per check, only the sampled q-tiles can be restored. */
START_TEST(guard_restores_only_sampled_tiles)
{
    harness h;
    h_open(&h, NULL);
    prob p;
    prob_make(&h, UID, CONN, &p);
    eng_session_spec sp = spec_make("sampled", 0.0f);
    sp.layers = 1;
    sp.guard_every = 2;
    sp.guard_sample = 2;
    sp.guard_budget = 0.02f;
    uint64_t sid = open_ok(&h, UID, CONN, &sp, NULL);
    uint32_t m[B * H * NQ];
    uint64_t checks = 0;
    for (int step = 0; step < 6; step++) {
        fill_gen(&p, 1, 1, step);
        eng_session_stats a = stats_of(&h, UID, sid);
        run(&h, UID, CONN, sid, &p, 0, (uint32_t)step);
        eng_session_stats b = stats_of(&h, UID, sid);
        int checked = step > 0 && step % 2 == 0;
        checks += (uint64_t)checked;
        ck_assert_uint_eq(b.guard_checks, checks);
        if (!checked) {
            ck_assert_uint_eq(b.guard_restored, a.guard_restored);
            continue;
        }
        ck_assert_uint_eq(b.guard_rows - a.guard_rows, B * H * 2);
        int32_t tiles[LA_GUARD_MAX_SAMPLE];
        ck_assert_int_eq(la_guard_sample(NQ, 2, (uint32_t)step / 2, tiles), 2);
        read_mask(&h, UID, sid, 0, m);
        static int ever[B * H * NQ];
        for (int i = 0; i < B * H * NQ; i++) {
            int ones = (m[i] & 0xffffu) == 0xffffu;
            int sampled = i % NQ == tiles[0] || i % NQ == tiles[1];
            if (ones && !ever[i] && !sampled) {
                /* Only an escalated head (both samples failed: more than half of 2) restores
                 * rows it did not sample, and then all of them. */
                int head = i / NQ * NQ;
                for (int r = head; r < head + NQ; r++)
                    ck_assert_msg((m[r] & 0xffffu) == 0xffffu,
                                  "step %d: row %d restored but q-tile %d was not sampled, "
                                  "and its head did not escalate (row %d is not restored)",
                                  step, i, i % NQ, r);
            }
            ever[i] |= ones;
        }
    }
    ck_assert_uint_gt(stats_of(&h, UID, sid).guard_restored, 0);
    prob_drop(&p);
    h_close(&h);
}
END_TEST

START_TEST(guard_quiet_at_sane_threshold)
{
    harness h;
    h_open(&h, NULL);
    prob p;
    prob_make(&h, UID, CONN, &p);
    const float budget = 0.05f;
    eng_session_spec sp = spec_make("sane", -10.0f);
    sp.guard_every = 1;
    sp.guard_sample = NQ;
    sp.guard_budget = budget;
    uint64_t sid = open_ok(&h, UID, CONN, &sp, NULL);
    double worst = 0;
    uint64_t total = 0, computed = 0;
    for (int step = 0; step < 6; step++) {
        fill_gen(&p, 1, 1, step);
        for (uint32_t l = 0; l < LAYERS; l++) {
            uint32_t before[B * H * NQ];
            read_mask(&h, UID, sid, l, before);
            call c = run(&h, UID, CONN, sid, &p, l, (uint32_t)step);
            total += c.res.tiles_total;
            computed += c.res.tiles_computed;
            ref r = ref_new(&p, before);
            for (int i = 0; i < B * H * S; i++)
                worst = fmax(worst, r.lost[i]);
            ref_free(&r);
        }
    }
    eng_session_stats st = stats_of(&h, UID, sid);
    ck_assert_uint_eq(st.guard_checks, 5 * LAYERS);
    ck_assert_uint_lt(computed, total); /* tiles were skipped: the checks looked at something */
    ck_assert_msg(worst < budget, "float64: a row lost %g at tau -10 (budget %g)", worst, budget);
    ck_assert_uint_eq(st.guard_restored, 0);
    prob_drop(&p);
    h_close(&h);
}
END_TEST

/* ---- through the daemon, with real uids ------------------------------------------------------ */

#define UID_A 1234
#define UID_B 1235

static int not_root(void)
{
    if (geteuid() == 0)
        return 0;
    printf("check_warm: not root (euid %d): the daemon ownership case needs to switch uids; "
           "passing with nothing checked (the engine cases check ownership by uid)\n",
           (int)geteuid());
    return 1;
}

/* A generation of 3 steps of one layer through the client library with warm key "shared";
 * exits with 10 + the generations its seed combined, or 1..9 on an error. */
static int child_generation(const char *sock, const char *key)
{
    la_client *c;
    if (la_connect(sock, "check_warm", &c) != 0)
        return 1;
    la_session_config *cfg;
    la_session_config_new(&cfg);
    la_session_config_set_geometry(cfg, 1, H, D, LA_DTYPE_F32, S, S, 1, 1);
    la_session_config_set_device(cfg, "cpu");
    if (la_session_config_set_warm_start(cfg, "shared", LA_WARM_DEFAULT, LA_WARM_DEFAULT,
                                         LA_WARM_DEFAULT, 0) != 0)
        return 2;
    la_session *s;
    if (la_session_open(c, key, cfg, &s) != 0)
        return 3;
    la_session_config_free(cfg);
    int64_t gens = -1;
    la_session_get(s, "warm_generations", &gens);
    const char *status = la_session_text(s, "warm_status");
    if (!status || (gens == 0) != (strncmp(status, "cold:", 5) == 0))
        return 4;
    la_buffer *b;
    if (la_buffer_new_host(c, (size_t)NQKV * 4 * 4, &b) != 0)
        return 5;
    float *base = la_buffer_host_ptr(b);
    prob p = {.q = base, .k = base + NQKV, .v = base + 2 * NQKV, .o = base + 3 * NQKV};
    la_attn *a;
    la_attn_new(&a);
    int64_t shape[4] = {1, S, H, D};
    for (int t = 0; t < 4; t++)
        la_attn_set_tensor(a, (la_tensor_role)t, b, (uint64_t)t * NQKV * 4, LA_DTYPE_F32, 4, shape,
                           NULL);
    for (int step = 0; step < 3; step++) {
        fill_gen(&p, 1, (uint64_t)getuid(), step);
        la_attn_set_position(a, 0, (uint32_t)step, 0);
        if (la_attn_run(s, a, NULL) != 0)
            return 6;
    }
    la_attn_free(a);
    if (la_session_close(s) != 0)
        return 7;
    la_table *t;
    if (la_warm_list(c, &t) != 0)
        return 8;
    /* Only this uid's entries are listed, and this session's is there now. */
    int64_t uid = -1;
    if (la_table_rows(t) != 1 || la_table_int(t, 0, "uid", &uid) != 0 || uid != (int64_t)getuid())
        return 9;
    la_table_free(t);
    la_buffer_unregister(b);
    la_disconnect(c);
    return 10 + (int)gens;
}

static int as_user(uid_t uid, const char *sock, const char *key)
{
    fflush(stdout);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (setgroups(0, NULL) < 0 || setgid(uid) < 0 || setuid(uid) < 0)
            _exit(99);
        _exit(child_generation(sock, key));
    }
    int st;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* The C API and the protocol, as the caller's own uid. */
START_TEST(daemon_warm_c_api)
{
    td_daemon d;
    ck_assert_int_eq(td_start(&d, NULL), 0);
    ck_assert_int_eq(child_generation(d.socket, "c-api-1"), 10);
    ck_assert_int_eq(child_generation(d.socket, "c-api-2"), 11);
    la_client *c;
    ck_assert_int_eq(la_connect(d.socket, "check_warm", &c), 0);
    ck_assert_str_eq(la_client_property(c, "limit.warm_store_bytes"), "268435456");
    ck_assert_str_eq(la_client_property(c, "limit.warm_max_generations"), "8");
    la_session_config *cfg;
    ck_assert_int_eq(la_session_config_new(&cfg), 0);
    ck_assert_int_eq(la_session_config_set_guard(cfg, 1, 2, NAN), LA_EINVAL);
    ck_assert_int_eq(la_session_config_set_geometry(cfg, 1, H, D, LA_DTYPE_F32, S, S, 1, 1), 0);
    ck_assert_int_eq(la_session_config_set_device(cfg, "cpu"), 0);
    ck_assert_int_eq(la_session_config_set_guard(cfg, 2, 3, 0.1f), 0);
    /* the daemon judges the warm options: 100 generations is more than it keeps */
    ck_assert_int_eq(la_session_config_set_warm_start(cfg, "shared", LA_WARM_DEFAULT, 100,
                                                      LA_WARM_DEFAULT, LA_WARM_DEFAULT),
                     0);
    la_session *s;
    ck_assert_int_eq(la_session_open(c, "c-api-3", cfg, &s), LA_EINVAL);
    ck_assert_msg(strstr(la_last_error_message(), "warm_max_generations"), "%s",
                  la_last_error_message());
    ck_assert_int_eq(la_session_config_set_warm_start(cfg, "shared", 5, 2, 1, 1), 0);
    ck_assert_int_eq(la_session_open(c, "c-api-3", cfg, &s), 0);
    la_session_config_free(cfg);
    int64_t v = -1;
    ck_assert_int_eq(la_session_get(s, "warm_generations", &v), 0);
    ck_assert_int_eq(v, 2);
    ck_assert_str_eq(la_session_text(s, "warm_key"), "shared");
    ck_assert_str_eq(la_session_text(s, "key"), "c-api-3");
    ck_assert_msg(strstr(la_session_text(s, "warm_status"), "seeded from 2 generations"), "%s",
                  la_session_text(s, "warm_status"));
    ck_assert_ptr_null(la_session_text(s, "nope"));
    const char *names[] = {"warm_generations", "warm_deposits", "guard_checks", "guard_rows",
                           "guard_restored", "guard_tiles"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        ck_assert_int_eq(la_session_stat(s, names[i], &v), 0);
    ck_assert_int_eq(la_session_stat(s, "guard_nope", &v), LA_ENOENT);
    la_table *t;
    ck_assert_int_eq(la_sessions(c, &t), 0);
    ck_assert_str_eq(la_table_text(t, 0, 16), "shared");
    ck_assert_int_eq(la_table_int(t, 0, "warm_generations", &v), 0);
    ck_assert_int_eq(v, 2);
    la_table_free(t);
    ck_assert_int_eq(la_session_close(s), 0);
    ck_assert_int_eq(la_warm_list(c, &t), 0);
    ck_assert_uint_eq(la_table_rows(t), 1);
    ck_assert_int_eq(la_table_int(t, 0, "generations", &v), 0);
    ck_assert_int_eq(v, 2); /* c-api-3 made no call: it deposited nothing */
    la_table_free(t);
    uint64_t n = 9;
    ck_assert_int_eq(la_warm_drop(c, "other key", &n), 0);
    ck_assert_uint_eq(n, 0);
    ck_assert_int_eq(la_warm_drop(c, NULL, &n), 0);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(la_warm_list(c, &t), 0);
    ck_assert_uint_eq(la_table_rows(t), 0);
    la_table_free(t);
    la_disconnect(c);
    ck_assert_int_eq(td_stop(&d), 0);
}
END_TEST

START_TEST(daemon_never_seeds_another_uid)
{
    if (not_root())
        return;
    td_daemon d;
    const char *args[] = {"--socket-mode", "0666", NULL};
    ck_assert_int_eq(td_start(&d, args), 0);
    ck_assert_int_eq(as_user(UID_A, d.socket, "a-1"), 10);  /* cold, deposits */
    ck_assert_int_eq(as_user(UID_B, d.socket, "b-1"), 10);  /* same warm key: still cold */
    ck_assert_int_eq(as_user(UID_A, d.socket, "a-2"), 11);  /* its own: warm from 1 */
    ck_assert_int_eq(as_user(UID_B, d.socket, "b-2"), 11);  /* its own only */
    /* Root lists every user's entries. */
    la_client *c;
    ck_assert_int_eq(la_connect(d.socket, "check_warm", &c), 0);
    la_table *t;
    ck_assert_int_eq(la_warm_list(c, &t), 0);
    ck_assert_uint_eq(la_table_rows(t), 2);
    int64_t g = 0;
    ck_assert_int_eq(la_table_int(t, 0, "generations", &g), 0);
    ck_assert_int_eq(g, 2);
    la_table_free(t);
    la_disconnect(c);
    ck_assert_int_eq(td_stop(&d), 0);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("warm");
    TCase *tc = tcase_create("store");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, store_seed_or_widen);
    tcase_add_test(tc, store_lru_byte_limit);
    tcase_add_test(tc, store_persists);
    tcase_add_loop_test(tc, store_refuses_damaged_files, 0, 6);
    suite_add_tcase(s, tc);
    tc = tcase_create("engine");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, options_refused);
    tcase_add_test(tc, warm_skips_more_than_cold);
    tcase_add_test(tc, warm_restart_reseeds);
    tcase_add_test(tc, warm_settled_step_capture);
    tcase_add_test(tc, warm_reset_in_flight_keeps_seed);
    tcase_add_test(tc, warm_never_across_users);
    tcase_add_test(tc, warm_deposit_with_unused_shard);
    tcase_add_test(tc, warm_survives_restart);
    suite_add_tcase(s, tc);
    /* The same with the host view made late, as the CUDA backend makes it (see above). */
    tc = tcase_create("late view");
    tcase_set_timeout(tc, 120);
    tcase_add_checked_fixture(tc, late_view_on, NULL);
    tcase_add_test(tc, warm_skips_more_than_cold);
    tcase_add_test(tc, warm_restart_reseeds);
    tcase_add_test(tc, warm_settled_step_capture);
    tcase_add_test(tc, warm_reset_in_flight_keeps_seed);
    tcase_add_test(tc, guard_restores_what_loses_mass);
    suite_add_tcase(s, tc);
    tc = tcase_create("guard");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, guard_sample_rule);
    tcase_add_test(tc, guard_gather_q_rows);
    tcase_add_test(tc, guard_compare_escalates_head);
    tcase_add_test(tc, guard_restores_what_loses_mass);
    tcase_add_test(tc, guard_restores_only_sampled_tiles);
    tcase_add_test(tc, guard_quiet_at_sane_threshold);
    suite_add_tcase(s, tc);
    tc = tcase_create("daemon");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, daemon_warm_c_api);
    tcase_add_test(tc, daemon_never_seeds_another_uid);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
