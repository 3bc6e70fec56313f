/*
 * dispatch.h — private: what a request means. Validates each decoded Request beyond what
 * protobuf-c checks (string lengths, repeated counts, shapes, enum ranges), calls the engine
 * and sends the Reply. Attention requests are submitted to the engine and answered from its
 * done callback.
 */
#ifndef LA_DAEMON_DISPATCH_H
#define LA_DAEMON_DISPATCH_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "conn.h"
#include "engine.h"

#define DISP_MASK_REPLY_MAX (512u * 1024) /* bytes of mask in one MaskReply */
#define DISP_LIST_MAX 2000                /* sessions in one SessionListReply */

typedef void (*disp_stat_fn)(void *data, const char *name, int64_t value);

/* What dispatch works with; the server owns it. */
typedef struct disp {
    eng *eng;
    const cfg *cfg; /* the limits a Hello reply announces */
    /* Adds the server's own counters to a Stats reply (may be NULL). */
    void (*server_stats)(void *data, disp_stat_fn fn, void *fn_data);
    void *server_data;
} disp;

/* The request hook of conn_hooks (data: a disp): handles one request of c and answers it
 * (attention: from the engine's done callback). Returns CONN_REQ_*; why (for the log) is
 * written when the result is not CONN_REQ_OK. */
int disp_request(void *data, conn *c, const Liteattn__Request *req, char *why, size_t whylen);

#endif /* LA_DAEMON_DISPATCH_H */
