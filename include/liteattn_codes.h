/*
 * liteattn_codes.h — the values every part of liteattn shares: the protocol version, the error
 * codes (one X-macro table) and the enumerations that travel on the wire. It is the bottom of
 * the include graph: kernels, proto, the engine, the daemon and the client library include it,
 * and it includes nothing. Installed beside liteattn.h, which includes it; part of the public
 * API through liteattn.h (the values never change).
 */
#ifndef LITEATTN_CODES_H
#define LITEATTN_CODES_H

/* Version of liteattn (the library and the daemon). */
#define LA_VERSION_MAJOR 0
#define LA_VERSION_MINOR 1
#define LA_VERSION_PATCH 0
#define LA_VERSION_STRING "0.1.0"

/* Wire protocol version spoken by this library (Hello). A daemon with another major refuses. */
#define LA_PROTOCOL_MAJOR 1
#define LA_PROTOCOL_MINOR 0

/* ---------------------------------------------------------------------------------------- */
/* Errors. One table; la_strerror() and la_err_name() are generated from it. The same codes
 * travel on the wire in error replies. Codes are never renumbered. */
#define LA_ERRNO_MAP(X)                               \
    X(EINVAL, -1, "invalid argument")                 \
    X(ENOMEM, -2, "out of memory")                    \
    X(ENOTSUP, -3, "not supported")                   \
    X(ENOENT, -4, "no such session or buffer")        \
    X(EEXIST, -5, "already exists")                   \
    X(EPERM, -6, "permission denied")                 \
    X(ELIMIT, -7, "resource limit reached")           \
    X(EBUSY, -8, "too many requests in flight")       \
    X(ERANGE, -9, "tensor extent outside its buffer") \
    X(EPROTO, -10, "protocol error")                  \
    X(EVERSION, -11, "unsupported protocol version")  \
    X(ECONN, -12, "cannot connect to the daemon")     \
    X(ECLOSED, -13, "connection closed")              \
    X(ETIMEDOUT, -14, "timed out")                    \
    X(EAGAIN, -15, "not finished yet")                \
    X(EDEVICE, -16, "GPU error")                      \
    X(ENODEV, -17, "no such device or backend")       \
    X(ESHUTDOWN, -18, "daemon is shutting down")      \
    X(EIO, -19, "input/output error")                 \
    X(EINTERNAL, -20, "internal error")

enum {
    LA_OK = 0,
#define LA_ERRNO_ENUM_(name, val, msg) LA_##name = (val),
    LA_ERRNO_MAP(LA_ERRNO_ENUM_)
#undef LA_ERRNO_ENUM_
};

/* ---------------------------------------------------------------------------------------- */
/* Enumerations shared with the daemon and the kernels (values travel on the wire). */

typedef enum la_dtype {
    LA_DTYPE_F32 = 0, /* CPU backend only */
    LA_DTYPE_F16 = 1,
    LA_DTYPE_BF16 = 2,
    LA_DTYPE_U32 = 3 /* only for the DECISIONS tensor (packed masks) */
} la_dtype;

typedef enum la_mode {
    LA_MODE_SESSION = 0, /* in a call: use the session's mode */
    LA_MODE_DENSE = 1,   /* compute everything, leave the mask as it is */
    LA_MODE_OBSERVE = 2, /* compute everything, AND the decisions into the mask */
    LA_MODE_SKIP = 3     /* compute live tiles only, write the decisions */
} la_mode;

typedef enum la_direction {
    LA_DIR_ALTERNATE = 0, /* descending k-tiles on even steps, ascending on odd ones */
    LA_DIR_ASCENDING = 1,
    LA_DIR_DESCENDING = 2
} la_direction;

typedef enum la_tensor_role {
    LA_TENSOR_Q = 0,        /* [B, Sq, H, D] */
    LA_TENSOR_K = 1,        /* [B, Sk, H, D] */
    LA_TENSOR_V = 2,        /* [B, Sk, H, D] */
    LA_TENSOR_O = 3,        /* [B, Sq, H, D], dtype of Q */
    LA_TENSOR_LSE = 4,       /* optional [B, H, Sq] f32, natural log */
    LA_TENSOR_DECISIONS = 5, /* dry run: [B, H, nQ, ceil(nK/32)] u32, the would-be mask */
    LA_TENSOR_ROW_MAX = 6    /* optional [B, H, Sq] f32, carried row maxima, read and written */
} la_tensor_role;

/* ---------------------------------------------------------------------------------------- */
/* Limits of one call and one session, the same for the client, the wire and every backend. */

/* Most must-do / must-skip ranges per attention call (each a half-open key range). */
#define LA_MAX_RANGES 64
/* Most steps of a per-step threshold schedule. */
#define LA_MAX_SCHEDULE 10000

/* How the daemon may touch a registered buffer (bits; BufferRegister.access on the wire). Q, K
 * and V need READ, O, LSE and DECISIONS need WRITE. VMM buffers are mapped in the daemon with
 * these page protections (read-only where WRITE is absent); other kinds are checked by the
 * daemon only. */
typedef enum la_access {
    LA_ACCESS_READ = 1,
    LA_ACCESS_WRITE = 2,
    LA_ACCESS_RW = 3
} la_access;

/* Most physical allocations (cuMemCreate) one VMM buffer maps side by side. */
#define LA_MAX_VMM_ALLOCS 1024

#endif /* LITEATTN_CODES_H */
