/*
 * frame.h — private: framing of liteattn messages on a Unix stream socket, shared by the
 * daemon and the client library.
 *
 * A frame is a 4-byte little-endian length followed by that many bytes of one protobuf-c
 * message. File descriptors travel as SCM_RIGHTS ancillary data with the first byte of the
 * frame that uses them; the reader queues them in arrival order and the frame's handler takes
 * them (frame_take_fd). Errors are LA_E* codes from liteattn.h.
 */
#ifndef FRAME_H
#define FRAME_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <protobuf-c/protobuf-c.h>

#define FRAME_HDR 4u
#define FRAME_DEFAULT_MAX (1u << 20) /* 1 MiB */
#define FRAME_MAX_FDS 8              /* queued, unclaimed fds per connection */

typedef struct frame_reader {
    uint8_t *buf; /* received bytes not yet consumed */
    size_t len, cap;
    size_t head;        /* start of the unconsumed part of buf */
    uint32_t max_frame; /* payload limit */
    uint32_t cur_len;   /* payload length of the frame returned by frame_next */
    int fds[FRAME_MAX_FDS];
    int n_fds;
} frame_reader;

void frame_reader_init(frame_reader *f, uint32_t max_frame);
/* Frees the buffer and closes every queued fd. */
void frame_reader_free(frame_reader *f);

/* One recvmsg() on a non-blocking socket, appending bytes and queueing fds. Returns the
 * number of bytes read (> 0), 0 at end of file, LA_EAGAIN when nothing is there yet,
 * LA_EPROTO when ancillary data was truncated or more than FRAME_MAX_FDS fds are queued
 * (the received fds are closed), LA_ENOMEM, or LA_EIO. */
ssize_t frame_recv(frame_reader *f, int sock);

/* The next complete frame: returns 1 and points *ret_data and *ret_len at its payload (valid until
 * frame_consume or frame_recv), 0 if none is complete yet, LA_EPROTO if the next
 * frame announces a payload larger than max_frame. */
int frame_next(frame_reader *f, const uint8_t **ret_data, uint32_t *ret_len);
/* The next complete frame decoded as a message of desc (alloc NULL: the default allocator);
 * *ret_len is its payload length. Returns 1 with *ret_msg (the caller frees it with
 * protobuf_c_message_free_unpacked and the same allocator), 0 when no frame is complete yet,
 * LA_ELIMIT when the next frame announces more than max_frame (*ret_len: what it announced;
 * nothing consumed), or LA_EPROTO when the frame does not decode (consumed). */
int frame_next_msg(frame_reader *f, const ProtobufCMessageDescriptor *desc,
                   ProtobufCAllocator *alloc, ProtobufCMessage **ret_msg, uint32_t *ret_len);
/* Drops the frame returned by the last successful frame_next. */
void frame_consume(frame_reader *f);
/* Oldest queued fd (the caller owns it), or -1 when none is queued. */
int frame_take_fd(frame_reader *f);

/* Packs msg behind its length prefix into a new malloc'd buffer. Returns 0, LA_ENOMEM, or
 * LA_ELIMIT when the payload would exceed max_frame. */
int frame_pack(const ProtobufCMessage *msg, uint32_t max_frame, uint8_t **ret_buf, size_t *ret_len);

/* One sendmsg() of buf[0..len) carrying fd (when fd >= 0) as SCM_RIGHTS. Returns the bytes
 * written (> 0), LA_EAGAIN, LA_ECLOSED (EPIPE/ECONNRESET) or LA_EIO. MSG_NOSIGNAL is used. */
ssize_t frame_send(int sock, const uint8_t *buf, size_t len, int fd);

#endif /* FRAME_H */
