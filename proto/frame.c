/* frame.c — length-prefixed protobuf frames with SCM_RIGHTS fds (see frame.h). */
#include "frame.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "codes.h"

void frame_reader_init(frame_reader *f, uint32_t max_frame)
{
    memset(f, 0, sizeof(*f));
    f->max_frame = max_frame ? max_frame : FRAME_DEFAULT_MAX;
}

void frame_reader_free(frame_reader *f)
{
    if (!f)
        return;
    free(f->buf);
    f->buf = NULL;
    f->len = f->cap = f->head = 0;
    for (int i = 0; i < f->n_fds; i++)
        close(f->fds[i]);
    f->n_fds = 0;
}

static int reserve(frame_reader *f, size_t want)
{
    /* Compact first: consumed bytes at the front are dead. */
    if (f->head > 0) {
        memmove(f->buf, f->buf + f->head, f->len - f->head);
        f->len -= f->head;
        f->head = 0;
    }
    if (f->cap - f->len >= want)
        return 0;
    size_t cap = f->cap ? f->cap : 4096;
    while (cap - f->len < want)
        cap *= 2;
    uint8_t *nb = realloc(f->buf, cap);
    if (!nb)
        return LA_ENOMEM;
    f->buf = nb;
    f->cap = cap;
    return 0;
}

/* One non-blocking sendmsg (out 1) or recvmsg (out 0), retried on EINTR: the bytes moved,
 * LA_EAGAIN, LA_ECLOSED when the peer is gone (ECONNRESET; EPIPE on a send) or LA_EIO. */
static ssize_t sock_msg(int sock, struct msghdr *msg, int out)
{
    ssize_t n;
    do
        n = out ? sendmsg(sock, msg, MSG_NOSIGNAL | MSG_DONTWAIT)
                : recvmsg(sock, msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n >= 0)
        return n;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return LA_EAGAIN;
    if (errno == ECONNRESET || (out && errno == EPIPE))
        return LA_ECLOSED;
    return LA_EIO;
}

ssize_t frame_recv(frame_reader *f, int sock)
{
    /* Read at most what completes the current frame plus a little, so that a frame announced
     * too large is refused before we buffer it. */
    size_t want = 64 * 1024;
    int rc = reserve(f, want);
    if (rc < 0)
        return rc;

    union {
        char buf[CMSG_SPACE(sizeof(int) * FRAME_MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {.iov_base = f->buf + f->len, .iov_len = f->cap - f->len};
    struct msghdr msg = {.msg_iov = &iov,
                         .msg_iovlen = 1,
                         .msg_control = ctl.buf,
                         .msg_controllen = sizeof(ctl.buf)};
    ssize_t n = sock_msg(sock, &msg, 0);
    if (n < 0)
        return n == LA_ECLOSED ? 0 : n; /* a reset ends the stream as EOF does */

    int bad = (msg.msg_flags & MSG_CTRUNC) != 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int nfd = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *fds = (int *)CMSG_DATA(c);
        for (int i = 0; i < nfd; i++) {
            int fd;
            memcpy(&fd, &fds[i], sizeof(fd));
            if (f->n_fds < FRAME_MAX_FDS)
                f->fds[f->n_fds++] = fd;
            else {
                close(fd);
                bad = 1;
            }
        }
    }
    f->len += (size_t)n;
    if (bad)
        return LA_EPROTO;
    return n;
}

static uint32_t get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int frame_next(frame_reader *f, const uint8_t **ret_data, uint32_t *ret_len)
{
    size_t avail = f->len - f->head;
    if (avail < FRAME_HDR)
        return 0;
    uint32_t n = get_le32(f->buf + f->head);
    if (n > f->max_frame)
        return LA_EPROTO;
    if (avail - FRAME_HDR < n)
        return 0;
    f->cur_len = n;
    *ret_data = f->buf + f->head + FRAME_HDR;
    *ret_len = n;
    return 1;
}

int frame_next_msg(frame_reader *f, const ProtobufCMessageDescriptor *desc,
                   ProtobufCAllocator *alloc, ProtobufCMessage **ret_msg, uint32_t *ret_len)
{
    const uint8_t *data;
    uint32_t len;
    int rc = frame_next(f, &data, &len);
    if (rc == 0)
        return 0;
    if (rc < 0) {
        *ret_len = get_le32(f->buf + f->head);
        return LA_ELIMIT;
    }
    *ret_len = len;
    ProtobufCMessage *m = protobuf_c_message_unpack(desc, alloc, len, data);
    frame_consume(f);
    if (!m)
        return LA_EPROTO;
    *ret_msg = m;
    return 1;
}

void frame_consume(frame_reader *f)
{
    f->head += FRAME_HDR + f->cur_len;
    f->cur_len = 0;
    if (f->head == f->len)
        f->head = f->len = 0;
}

int frame_take_fd(frame_reader *f)
{
    if (f->n_fds == 0)
        return -1;
    int fd = f->fds[0];
    memmove(f->fds, f->fds + 1, sizeof(int) * (size_t)(f->n_fds - 1));
    f->n_fds--;
    return fd;
}

int frame_pack(const ProtobufCMessage *msg, uint32_t max_frame, uint8_t **ret_buf, size_t *ret_len)
{
    size_t n = protobuf_c_message_get_packed_size(msg);
    if (n > (max_frame ? max_frame : FRAME_DEFAULT_MAX))
        return LA_ELIMIT;
    uint8_t *buf = malloc(FRAME_HDR + n);
    if (!buf)
        return LA_ENOMEM;
    buf[0] = (uint8_t)n;
    buf[1] = (uint8_t)(n >> 8);
    buf[2] = (uint8_t)(n >> 16);
    buf[3] = (uint8_t)(n >> 24);
    protobuf_c_message_pack(msg, buf + FRAME_HDR);
    *ret_buf = buf;
    *ret_len = FRAME_HDR + n;
    return 0;
}

ssize_t frame_send(int sock, const uint8_t *buf, size_t len, int fd)
{
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        memset(&ctl, 0, sizeof(ctl));
        msg.msg_control = ctl.buf;
        msg.msg_controllen = sizeof(ctl.buf);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    return sock_msg(sock, &msg, 1);
}

/* ---- strings with a NUL inside ------------------------------------------------------------ */

static int wire_varint(const uint8_t **p, const uint8_t *end, uint64_t *ret)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *ret = v;
            return 0;
        }
    }
    return -1;
}

int frame_nul_in_string(const ProtobufCMessageDescriptor *d, const uint8_t *data, size_t len,
                        const char **ret_field)
{
    const uint8_t *p = data, *end = data + len;
    while (p < end) {
        uint64_t tag, n;
        if (wire_varint(&p, end, &tag) < 0)
            return 0;
        switch (tag & 7) {
        case 0:
            if (wire_varint(&p, end, &n) < 0)
                return 0;
            break;
        case 1:
            if (end - p < 8)
                return 0;
            p += 8;
            break;
        case 5:
            if (end - p < 4)
                return 0;
            p += 4;
            break;
        case 2: {
            if (wire_varint(&p, end, &n) < 0 || n > (uint64_t)(end - p))
                return 0;
            const ProtobufCFieldDescriptor *f =
                tag >> 3 <= UINT32_MAX
                    ? protobuf_c_message_descriptor_get_field(d, (unsigned)(tag >> 3))
                    : NULL;
            if (f && f->type == PROTOBUF_C_TYPE_STRING && memchr(p, 0, (size_t)n)) {
                if (ret_field)
                    *ret_field = f->name;
                return 1;
            }
            /* No message type of the protocol is recursive: the depth is the schema's. */
            if (f && f->type == PROTOBUF_C_TYPE_MESSAGE &&
                frame_nul_in_string(f->descriptor, p, (size_t)n, ret_field))
                return 1;
            p += n;
            break;
        }
        default: /* groups: not in the protocol; unpack has judged the rest */ return 0;
        }
    }
    return 0;
}
