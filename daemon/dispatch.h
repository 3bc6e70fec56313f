/*
 * dispatch.h — private: what a request means. Validates each decoded Request beyond what
 * protobuf-c checks (string lengths, repeated counts, shapes, enum ranges), calls the engine
 * and sends the Reply. Attention requests are submitted to the engine and answered from its
 * done callback.
 */
#ifndef LA_DAEMON_DISPATCH_H
#define LA_DAEMON_DISPATCH_H

#include <stddef.h>

#include "conn.h"

#define DISP_MASK_REPLY_MAX (512u * 1024) /* bytes of mask in one MaskReply */
#define DISP_KEY_MAX 255
#define DISP_SCHEDULE_MAX 10000
#define DISP_RANGES_MAX 64
#define DISP_LIST_MAX 2000 /* sessions in one SessionListReply */

enum {
    DISP_OK = 0,
    DISP_CLOSE = 1, /* an error reply was queued: close once it is written (why says) */
    DISP_FAIL = 2,  /* protocol error: close now (why says) */
};

/* Handles one request of c. why (for the log) is written when the result is not DISP_OK. */
int disp_request(conn *c, const Liteattn__Request *req, char *why, size_t whylen);

/* Answers every attention request of c still in flight with Error(code, message); their done
 * callbacks will not reply again. */
void disp_fail_inflight(conn *c, int code, const char *message);

#endif /* LA_DAEMON_DISPATCH_H */
