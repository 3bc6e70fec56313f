/*
 * fairq.h — private: the fair queue both compute backends take their jobs from.
 *
 * Jobs are grouped by Unix user, and within a user by flow (the session: each session's calls
 * read the mask the previous call wrote, so they stay in submission order). The queue picks
 * the next job in two levels of start-time fair queuing, weighted by cost in multiply-adds:
 * among the users with a runnable job, the one that received the least service so far; within
 * it, the flow that received the least. A user (or flow) that becomes active starts at the
 * virtual time of the last one served, so idling earns no credit and a newcomer waits for at
 * most one job (or, on the CPU, one slice of a job) of each other user. Service is charged by
 * the caller (fq_charge) as work starts: a job that runs in slices is charged slice by slice
 * and goes back to the front of its flow (fq_requeue) between them.
 *
 * Not thread-safe: the backend calls everything under its own lock. Users and flows are
 * allocated on push and freed as soon as they hold no queued and no running job.
 */
#ifndef LA_FAIRQ_H
#define LA_FAIRQ_H

#include <stdint.h>

#include "backend.h"

typedef struct fq_user fq_user;

typedef struct fq {
    fq_user *users;
    uint64_t vclock; /* virtual time of the user served last */
    int queued;      /* jobs in the queue (not running) */
} fq;

void fq_init(fq *q);
/* Queues j (j->uid, j->flow_id, j->cost) at the tail of its flow. LA_ENOMEM. */
int fq_push(fq *q, be_job *j);
/* Picks the next job by the policy above and removes it from the queue (it counts as running
 * for its flow until fq_requeue or fq_done). Within a flow the first job for which blocked()
 * returns 0 is taken (head_only: only the flow's first job may be); blocked may be NULL. NULL
 * when no job is runnable. */
be_job *fq_pick(fq *q, int (*blocked)(void *ctx, const be_job *j), void *ctx, int head_only);
/* Charges cost multiply-adds of service to j's user and flow. */
void fq_charge(fq *q, be_job *j, uint64_t cost);
/* A picked job goes back to the front of its flow (its next slice). */
void fq_requeue(fq *q, be_job *j);
/* A picked job finished (or was cancelled while running). */
void fq_done(fq *q, be_job *j);
/* Removes every queued job of connection conn_id (all: of every connection) and returns them
 * chained by be_next, in queue order per flow. */
be_job *fq_take(fq *q, uint64_t conn_id, int all);

#endif /* LA_FAIRQ_H */
