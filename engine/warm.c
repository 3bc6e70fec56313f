/*
 * warm.c — the session side of the warm start (docs/SKIP-SEMANTICS.md, "Warm start across
 * generations"): a session's warm options, its seed from the store (warmstore.c) when it
 * opens, and its deposits: the regions captured at the settled step, or its masks when it is
 * freed. The seed itself travels to the backends in be_job.seed_* (guard.c plans it).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_priv.h"
#include "escape.h"

#define WARM_DEFAULT_GENERATIONS 4
#define WARM_DEFAULT_MARGIN 1
#define WARM_DEFAULT_DENSE_STEPS 1
#define GUARD_DEFAULT_BUDGET 0.05f

static ws_geom geom_of(const sess *s)
{
    return (ws_geom){s->layers,    s->kv_shards, s->batch, s->heads, s->n_q_tiles,
                     s->n_k_tiles, s->n_k_words, s->bm,    s->bn};
}

/* The guardrail's options: every N (0: off), sample, budget. */
static int guard_options(sess *s, const eng_session_spec *spec, eng_error *err)
{
    if (!spec->guard_every) {
        if (spec->guard_sample || spec->guard_budget != 0.0f) {
            eng_errf(err, "session '%s': guard sample or budget given without guard every N "
                          "steps (N = 0 leaves the guardrail off)",
                     s->key_esc);
            return LA_EINVAL;
        }
        return 0;
    }
    if (spec->guard_every > INT32_MAX) {
        eng_errf(err, "session '%s': guard every %u steps out of range", s->key_esc,
                 spec->guard_every);
        return LA_EINVAL;
    }
    uint32_t sample = spec->guard_sample ? spec->guard_sample : 1;
    if (sample > LA_GUARD_MAX_SAMPLE) {
        eng_errf(err, "session '%s': guard sample of %u q-tiles (at most %d)", s->key_esc,
                 sample, LA_GUARD_MAX_SAMPLE);
        return LA_EINVAL;
    }
    float budget = spec->guard_budget != 0.0f ? spec->guard_budget : GUARD_DEFAULT_BUDGET;
    if (!(budget > 0.0f && budget <= 1.0f)) {
        eng_errf(err,
                 "session '%s': guard budget %g is not a fraction of a row's probability "
                 "mass in (0, 1]",
                 s->key_esc, (double)budget);
        return LA_EINVAL;
    }
    s->guard_every = spec->guard_every;
    s->guard_sample = sample;
    s->guard_budget = budget;
    return 0;
}

int sess_warm_open(eng *e, sess *s, const eng_session_spec *spec, uint32_t **ret_seed,
                   char *status, size_t status_len, eng_error *err)
{
    int rc;
    *ret_seed = NULL;
    status[0] = 0;
    if ((rc = guard_options(s, spec, err)) < 0)
        return rc;
    if (!spec->warm_key) {
        if (spec->has_warm_step || spec->has_warm_generations || spec->has_warm_margin ||
            spec->has_warm_dense_steps) {
            eng_errf(err, "session '%s': warm-start options without a warm key", s->key_esc);
            return LA_EINVAL;
        }
        return 0;
    }
    size_t n = strlen(spec->warm_key);
    char ek[ESC_MAX(ENG_KEY_MAX)];
    if (n == 0 || n > ENG_KEY_MAX) {
        eng_errf(err, "session '%s': warm key must be 1..%d bytes (got %zu)", s->key_esc,
                 ENG_KEY_MAX, n);
        return LA_EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)spec->warm_key[i];
        if (c < 0x20 || c == 0x7f) {
            eng_errf(err, "session '%s': warm key '%s' holds control byte 0x%02x", s->key_esc,
                     esc_str(ek, sizeof ek, spec->warm_key), c);
            return LA_EINVAL;
        }
    }
    uint32_t max_gen = e->cfg.limits.warm_max_generations;
    uint32_t gens = spec->has_warm_generations ? spec->warm_generations : WARM_DEFAULT_GENERATIONS;
    if (!spec->has_warm_generations && gens > max_gen)
        gens = max_gen;
    if (gens < 1 || gens > max_gen) {
        eng_errf(err, "session '%s': warm start from %u generations (1..%u, the daemon's "
                      "warm_max_generations)",
                 s->key_esc, gens, max_gen);
        return LA_EINVAL;
    }
    uint32_t margin = spec->has_warm_margin ? spec->warm_margin : WARM_DEFAULT_MARGIN;
    if (margin > WS_MAX_MARGIN) {
        eng_errf(err, "session '%s': warm margin of %u tiles (at most %d)", s->key_esc, margin,
                 WS_MAX_MARGIN);
        return LA_EINVAL;
    }
    if ((spec->has_warm_step && spec->warm_step > INT32_MAX) ||
        (spec->has_warm_dense_steps && spec->warm_dense_steps > INT32_MAX)) {
        eng_errf(err, "session '%s': warm step or dense steps out of range (steps count from 0 "
                      "to 2^31 - 1)",
                 s->key_esc);
        return LA_EINVAL;
    }
    s->has_warm = 1;
    memcpy(s->warm_key, spec->warm_key, n + 1);
    s->has_warm_step = spec->has_warm_step;
    s->warm_step = spec->warm_step;
    s->warm_dense_steps =
        spec->has_warm_dense_steps ? spec->warm_dense_steps : WARM_DEFAULT_DENSE_STEPS;
    uint32_t *seed = malloc(s->mask_bytes);
    if (!seed) {
        eng_errf(err, "out of memory");
        return LA_ENOMEM;
    }
    ws_geom g = geom_of(s);
    int used = ws_seed(e->warm, s->uid, s->warm_key, &g, gens, margin, seed, status, status_len);
    if (used <= 0) {
        free(seed);
        return 0;
    }
    s->warm_used = (uint32_t)used;
    *ret_seed = seed;
    return 0;
}

static void deposit(eng *e, sess *s, const void *masks)
{
    ws_geom g = geom_of(s);
    int rc = ws_deposit(e->warm, s->uid, s->warm_key, &g, masks);
    if (rc == 0) {
        s->stats.warm_deposits++;
    } else if (rc != LA_ELIMIT) {
        char name[SESS_NAME_MAX];
        sess_name(s, name, sizeof name);
        eng_logf(e, LOG_WARN, "%s: its masks were not kept for warm starts: %s", name,
                 codes_strerror(rc));
    }
}

/* (layer, shard) regions without a call in this generation (a kv shard a pipeline never
 * uses, e.g. no second guidance branch) are stored all ones: they seed nothing. */
static void ones_for_unused(const sess *s, uint8_t *gen, const uint8_t *have)
{
    for (uint32_t r = 0; r < s->layers * s->kv_shards; r++)
        if (!have[r])
            memset(gen + (uint64_t)r * s->layer_mask_bytes, 0xff, s->layer_mask_bytes);
}

void sess_warm_captured(eng *e, sess *s, uint32_t region)
{
    if (!s->captured || s->captured[region])
        return;
    s->captured[region] = 1;
    s->n_captured++;
    uint32_t n = s->layers * s->kv_shards;
    for (uint32_t r = 0; r < n; r++)
        if (!s->captured[r] && !s->region_fresh[r])
            return; /* a region this generation uses has not reached the step yet */
    uint8_t *gen = (uint8_t *)s->masks->mask->host + s->capture_off;
    ones_for_unused(s, gen, s->captured);
    deposit(e, s, gen);
    memset(s->captured, 0, n);
    s->n_captured = 0;
}

void sess_warm_close(eng *e, sess *s)
{
    if (!s->has_warm || s->has_warm_step || !s->masks || !e->warm)
        return;
    uint32_t n = s->layers * s->kv_shards, used = 0;
    uint8_t *have = malloc(n);
    uint8_t *gen = malloc(s->mask_bytes);
    if (have && gen) {
        for (uint32_t r = 0; r < n; r++) {
            have[r] = !s->region_fresh[r] && atomic_load(&s->masks->ready[r]);
            used += have[r];
        }
        if (used) { /* a generation without any call settled nothing */
            memcpy(gen, s->masks->mask->host, s->mask_bytes);
            ones_for_unused(s, gen, have);
            deposit(e, s, gen);
        }
    }
    free(have);
    free(gen);
}

void sess_warm_restart(sess *s, uint32_t layer)
{
    for (uint32_t k = 0; k < s->kv_shards; k++) {
        size_t r = (size_t)layer * s->kv_shards + k;
        if (s->seed_due)
            s->seed_due[r] = s->warm_used > 0;
        if (s->captured && s->captured[r]) {
            s->captured[r] = 0;
            s->n_captured--;
        }
    }
}

void sess_warm_reset(sess *s)
{
    size_t n = (size_t)s->layers * s->kv_shards;
    if (s->seed_due)
        memset(s->seed_due, s->warm_used > 0, n);
    if (s->captured)
        memset(s->captured, 0, n);
    s->n_captured = 0;
}

/* ---- the store, for the Stats, WarmList and WarmDrop requests ------------------------------ */

typedef struct list_ctx {
    void (*fn)(void *data, const eng_warm_entry *w);
    void *data;
} list_ctx;

static void list_one(void *data, const ws_entry_info *in)
{
    list_ctx *c = data;
    eng_warm_entry w;
    memset(&w, 0, sizeof w);
    w.uid = in->uid;
    w.key = in->key;
    w.layers = in->geom.layers;
    w.kv_shards = in->geom.kv_shards;
    w.batch = in->geom.batch;
    w.heads = in->geom.heads;
    w.n_q_tiles = in->geom.n_q_tiles;
    w.n_k_tiles = in->geom.n_k_tiles;
    w.bm = in->geom.bm;
    w.bn = in->geom.bn;
    w.generations = in->generations;
    w.bytes = in->bytes;
    w.deposited_ago_ms = in->deposited_ago_ms;
    w.seeds = in->seeds;
    w.persisted = in->persisted;
    c->fn(c->data, &w);
}

void eng_warm_list(eng *e, uint32_t uid, void (*fn)(void *data, const eng_warm_entry *w),
                   void *data)
{
    list_ctx c = {fn, data};
    ws_list(e->warm, uid, list_one, &c);
}

int eng_warm_drop(eng *e, uint32_t uid, const char *key, uint64_t *ret_count, eng_error *err)
{
    if (key && (!key[0] || strlen(key) > ENG_KEY_MAX)) {
        eng_errf(err, "warm key must be 1..%d bytes (got %zu)", ENG_KEY_MAX, strlen(key));
        return LA_EINVAL;
    }
    uint64_t n = ws_drop(e->warm, uid, key);
    if (ret_count)
        *ret_count = n;
    return 0;
}

void eng_warm_flush(eng *e) { ws_flush(e->warm); }
