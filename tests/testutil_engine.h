/*
 * testutil_engine.h — private to tests/: the engine (engine/engine.h) driven in-process, as
 * check_engine and check_fair do: an engine whose notify writes to a pipe, the loop that runs
 * its completions, calls that record how they ended, shared-memory buffers mapped here.
 *
 *     harness h;
 *     h_open(&h, NULL, 0);                          // CPU backend, 2 threads, default limits
 *     shm s;
 *     ck_assert_int_eq(shm_make(&h, UID, CONN, 1 << 20, &s), 0);
 *     call c;
 *     ck_assert_int_eq(h_submit(&h, UID, CONN, &req, &c, &err), 0);
 *     h_wait(&h, 1);                                // c.ran == 1, c.status, c.res
 *     h_close(&h);
 *     shm_drop(&s);
 */
#ifndef LA_TESTUTIL_ENGINE_H
#define LA_TESTUTIL_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"

typedef struct harness {
    eng *e;
    int pipe[2]; /* the engine's notify writes a byte to pipe[1] */
    int done_calls;
} harness;

/* The CPU backend with 2 threads, CPU slices of slice multiply-adds (0: the default) and the
 * limits lim (NULL: the defaults); fails the case when eng_new does. */
void h_open(harness *h, const eng_limits *lim, uint64_t slice);
/* The engine of cfg, its notify replaced by the harness's. */
void h_open_cfg(harness *h, eng_config *cfg);
/* Frees the engine (which ends its jobs first) and the pipe. */
void h_close(harness *h);
/* Runs completions until n more done callbacks ran or ms passed; 1 when they ran. */
int h_pump(harness *h, int n, int ms);
/* h_pump for up to 20 s; fails the case unless the n callbacks ran. */
void h_wait(harness *h, int n);

/* How an attention call ended: ran counts done callbacks (1 exactly, once it ended). */
typedef struct call {
    harness *h;
    int status, ran;
    eng_attn_result res;
    double t_done; /* tu_now_s() when the callback ran */
} call;

/* The done callback of a call (user: the call, whose h is set). */
void h_done(void *user, int status, const eng_attn_result *res, const char *msg);
/* Submits r for (uid, conn) with c (cleared here) as its record; eng_attn_submit's result. */
int h_submit(harness *h, uint32_t uid, uint64_t conn, const eng_attn_req *r, call *c,
             eng_error *err);

/* A sealable memfd of size bytes mapped here at p; the engine gets a dup as buffer id. */
typedef struct shm {
    int fd;
    void *p;
    size_t size;
    uint64_t id;
} shm;

/* Makes s and registers it for (uid, conn): eng_buffer_add_shm's result (s is mapped either
 * way: shm_drop it). */
int shm_make(harness *h, uint32_t uid, uint64_t conn, size_t size, shm *s);
void shm_drop(shm *s);

#endif /* LA_TESTUTIL_ENGINE_H */
