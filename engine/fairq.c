/* fairq.c — per-user, then per-flow start-time fair queuing of backend jobs (see fairq.h). */
#include "fairq.h"

#include <stdlib.h>

#include "list.h"

typedef struct fq_flow {
    struct fq_flow *next;
    fq_user *user;
    uint64_t id;
    uint64_t vt;         /* service received, in multiply-adds (virtual time) */
    be_job *head, *tail; /* queued, chained by be_next */
    int running;         /* picked and not yet requeued or done */
} fq_flow;

struct fq_user {
    fq_user *next;
    uint32_t uid;
    uint64_t vt;
    uint64_t fclock; /* virtual time of this user's flow served last */
    fq_flow *flows;
    int queued, running;
};

static uint64_t sat_add(uint64_t a, uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }
static uint64_t max64(uint64_t a, uint64_t b) { return a > b ? a : b; }

void fq_init(fq *q)
{
    q->users = NULL;
    q->vclock = 0;
    q->queued = 0;
}

int fq_push(fq *q, be_job *j)
{
    fq_user *u = q->users;
    while (u && u->uid != j->uid)
        u = u->next;
    if (!u) {
        u = calloc(1, sizeof *u);
        if (!u)
            return LA_ENOMEM;
        u->uid = j->uid;
        u->vt = q->vclock;
        u->next = q->users;
        q->users = u;
    }
    fq_flow *f = u->flows;
    while (f && f->id != j->flow_id)
        f = f->next;
    if (!f) {
        f = calloc(1, sizeof *f);
        if (!f) {
            if (!u->flows) {
                fq_user **pp = &q->users;
                while (*pp != u)
                    pp = &(*pp)->next;
                *pp = u->next;
                free(u);
            }
            return LA_ENOMEM;
        }
        f->id = j->flow_id;
        f->user = u;
        f->vt = u->fclock;
        f->next = u->flows;
        u->flows = f;
    }
    /* An idle user or flow earns no credit: it starts at the clock of the last one served. */
    if (u->queued == 0 && u->running == 0)
        u->vt = max64(u->vt, q->vclock);
    if (!f->head && !f->running)
        f->vt = max64(f->vt, u->fclock);
    j->fq_flow = f;
    slist_append(f->head, f->tail, j, be_next);
    u->queued++;
    q->queued++;
    return 0;
}

/* Frees f (and its user) when they hold nothing any more. */
static void gc(fq *q, fq_flow *f)
{
    fq_user *u = f->user;
    if (!f->head && !f->running) {
        fq_flow **pp = &u->flows;
        while (*pp != f)
            pp = &(*pp)->next;
        *pp = f->next;
        free(f);
    }
    if (!u->flows) {
        fq_user **pp = &q->users;
        while (*pp != u)
            pp = &(*pp)->next;
        *pp = u->next;
        free(u);
    }
}

/* The first job of f that may run now (and its predecessor), or NULL. */
static be_job *runnable(fq_flow *f, int (*blocked)(void *, const be_job *), void *ctx,
                        int head_only, be_job **ret_prev)
{
    be_job *prev = NULL;
    for (be_job *j = f->head; j; prev = j, j = j->be_next) {
        /* A job never overtakes an earlier one of its flow on the same mask: each call reads
         * the mask the previous one wrote. */
        int behind = 0;
        for (be_job *k = f->head; k != j && !behind; k = k->be_next)
            behind = j->p.mask && k->p.mask == j->p.mask;
        if (!behind && (!blocked || !blocked(ctx, j))) {
            *ret_prev = prev;
            return j;
        }
        if (head_only)
            break;
    }
    return NULL;
}

be_job *fq_pick(fq *q, int (*blocked)(void *ctx, const be_job *j), void *ctx, int head_only)
{
    fq_flow *best = NULL;
    be_job *best_job = NULL, *best_prev = NULL;
    fq_user *best_user = NULL;
    for (fq_user *u = q->users; u; u = u->next) {
        if (!u->queued || (best_user && u->vt >= best_user->vt))
            continue;
        fq_flow *uf = NULL;
        be_job *uj = NULL, *up = NULL;
        for (fq_flow *f = u->flows; f; f = f->next) {
            if (!f->head || (uf && f->vt >= uf->vt))
                continue;
            be_job *prev, *j = runnable(f, blocked, ctx, head_only, &prev);
            if (j)
                uf = f, uj = j, up = prev;
        }
        if (uf)
            best_user = u, best = uf, best_job = uj, best_prev = up;
    }
    if (!best)
        return NULL;
    if (best_prev)
        best_prev->be_next = best_job->be_next;
    else
        best->head = best_job->be_next;
    if (best->tail == best_job)
        best->tail = best_prev;
    best_job->be_next = NULL;
    best->running++;
    best_user->queued--;
    best_user->running++;
    q->queued--;
    q->vclock = max64(q->vclock, best_user->vt);
    best_user->fclock = max64(best_user->fclock, best->vt);
    return best_job;
}

void fq_charge(fq *q, be_job *j, uint64_t cost)
{
    (void)q;
    fq_flow *f = j->fq_flow;
    f->vt = sat_add(f->vt, cost);
    f->user->vt = sat_add(f->user->vt, cost);
}

void fq_requeue(fq *q, be_job *j)
{
    fq_flow *f = j->fq_flow;
    j->be_next = f->head;
    f->head = j;
    if (!f->tail)
        f->tail = j;
    f->running--;
    f->user->running--;
    f->user->queued++;
    q->queued++;
}

void fq_done(fq *q, be_job *j)
{
    fq_flow *f = j->fq_flow;
    j->fq_flow = NULL;
    f->running--;
    f->user->running--;
    gc(q, f);
}

be_job *fq_take(fq *q, uint64_t conn_id, int all)
{
    be_job *out = NULL, **tail = &out;
    fq_user *u = q->users;
    while (u) {
        fq_user *unext = u->next;
        fq_flow *f = u->flows;
        while (f) {
            fq_flow *fnext = f->next;
            be_job *prev = NULL, *j = f->head;
            while (j) {
                be_job *next = j->be_next;
                if (all || j->conn_id == conn_id) {
                    if (prev)
                        prev->be_next = next;
                    else
                        f->head = next;
                    if (f->tail == j)
                        f->tail = prev;
                    j->be_next = NULL;
                    j->fq_flow = NULL;
                    *tail = j;
                    tail = &j->be_next;
                    u->queued--;
                    q->queued--;
                } else {
                    prev = j;
                }
                j = next;
            }
            gc(q, f); /* may free u when this was its last flow */
            f = fnext;
        }
        u = unext;
    }
    return out;
}
