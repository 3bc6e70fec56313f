/*
 * fuzz_frame.c — libFuzzer target: the frame reader (proto/frame.h) over arbitrary byte streams
 * split at arbitrary points, with file descriptors riding on some of the pieces.
 *
 * Input: 4 bytes of settings, then the stream.
 *   byte 0-1  max_frame = 16 + (le16 & 0x3fff) * 64 (16 B .. 1 MiB)
 *   byte 2    seed of the split points (xorshift); byte 3 bit 0..2: how often a piece carries
 *             an fd (0: never), bit 3: pieces up to 80 KiB (past the reader's 64 KiB read)
 * The stream is written to a socketpair piece by piece; after each piece the reader reads
 * until EAGAIN and hands out every complete frame, exactly as conn.c does.
 *
 * Checked: the frames equal those of an independent parse of the same stream (same lengths,
 * same bytes, stops at the same oversized header); the reader never returns a frame larger
 * than max_frame; every queued fd is either taken or closed by frame_reader_free (the process's
 * fd count is the same before and after). Each frame is also decoded as a Request; one that
 * decodes must pack, and a re-decode of that must pack to the same bytes.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "frame.h"
#include "liteattn.h"
#include "liteattn.pb-c.h"

static int count_fds(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    while (readdir(d))
        n++;
    closedir(d);
    return n;
}

static void check_request(const uint8_t *p, uint32_t len)
{
    Liteattn__Request *r = liteattn__request__unpack(NULL, len, p);
    if (!r)
        return;
    size_t n = liteattn__request__get_packed_size(r);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf)
        abort();
    size_t w = liteattn__request__pack(r, buf);
    if (w != n)
        abort();
    /* protobuf-c accepts a field number 0 written as a non-minimal varint (0x82 0x00) and keeps
     * it as an unknown field, but packs it minimally (0x02), which it then refuses: a re-decode
     * may fail. When it succeeds, it must mean the same message (a second pack gives the same
     * bytes). */
    Liteattn__Request *r2 = liteattn__request__unpack(NULL, n, buf);
    if (r2) {
        if (r2->id != r->id || r2->body_case != r->body_case ||
            liteattn__request__get_packed_size(r2) != n)
            abort();
        uint8_t *buf2 = malloc(n ? n : 1);
        if (!buf2)
            abort();
        liteattn__request__pack(r2, buf2);
        if (memcmp(buf, buf2, n) != 0)
            abort();
        free(buf2);
        liteattn__request__free_unpacked(r2, NULL);
    }
    liteattn__request__free_unpacked(r, NULL);
    free(buf);
}

static uint32_t xs(uint32_t *s)
{
    uint32_t x = *s ? *s : 0x9e3779b9u;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 4)
        return 0;
    uint32_t max_frame = 16 + ((uint32_t)(data[0] | data[1] << 8) & 0x3fff) * 64;
    uint32_t seed = data[2] * 0x01000193u + 1;
    int fd_every = data[3] & 7, big = data[3] & 8;
    const uint8_t *s = data + 4;
    size_t n = size - 4;

    /* The reference parse: frame i is [off_i, off_i + len_i); bad_at = offset of an oversized
     * header (the reader must stop there), or SIZE_MAX. */
    size_t ref_off[4096], ref_len[4096], n_ref = 0, bad_at = SIZE_MAX;
    for (size_t o = 0; o + 4 <= n && n_ref < 4096;) {
        uint32_t l = (uint32_t)s[o] | (uint32_t)s[o + 1] << 8 | (uint32_t)s[o + 2] << 16 |
                     (uint32_t)s[o + 3] << 24;
        if (l > max_frame) {
            bad_at = o;
            break;
        }
        if (n - o - 4 < l)
            break;
        ref_off[n_ref] = o + 4;
        ref_len[n_ref++] = l;
        o += 4 + (size_t)l;
    }
    if (n_ref == 4096)
        return 0; /* too many tiny frames to keep: not interesting */

    int fds_before = count_fds();
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
        abort();
    int sz = 1 << 21;
    setsockopt(sv[0], SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);

    frame_reader f;
    frame_reader_init(&f, max_frame);
    size_t got = 0, sent = 0, piece_no = 0;
    int failed = 0, sent_fds = 0, taken = 0;
    while (sent < n && !failed) {
        size_t want = 1 + xs(&seed) % (big ? 80000 : 300);
        if (want > n - sent)
            want = n - sent;
        int fd = -1;
        if (fd_every && piece_no % (size_t)(fd_every + 1) == 0)
            fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        piece_no++;
        ssize_t w = frame_send(sv[1], s + sent, want, fd);
        if (fd >= 0)
            close(fd);
        if (w <= 0)
            break; /* socket full: the rest is not delivered */
        if (fd >= 0)
            sent_fds++;
        sent += (size_t)w;
        for (;;) {
            ssize_t r = frame_recv(&f, sv[0]);
            if (r == LA_EAGAIN)
                break;
            if (r == LA_EPROTO) {
                /* More fds queued than allowed: conn.c closes the connection. */
                if (f.n_fds > FRAME_MAX_FDS)
                    abort();
                failed = 1;
                break;
            }
            if (r <= 0)
                abort();
            for (;;) {
                const uint8_t *p;
                uint32_t l;
                int rc = frame_next(&f, &p, &l);
                if (rc == 0)
                    break;
                if (rc < 0) {
                    if (got != n_ref || bad_at == SIZE_MAX)
                        abort();
                    failed = 1;
                    break;
                }
                if (l > max_frame || got >= n_ref || l != ref_len[got] ||
                    memcmp(p, s + ref_off[got], l) != 0)
                    abort();
                check_request(p, l);
                got++;
                frame_consume(&f);
                /* Take an fd now and then, as a BufferRegister would. */
                if (got % 3 == 0) {
                    int t = frame_take_fd(&f);
                    if (t >= 0) {
                        close(t);
                        taken++;
                    }
                }
            }
            if (failed)
                break;
        }
    }
    /* Everything delivered without an error: all frames of the reference were seen. */
    if (!failed && sent == n && got != n_ref)
        abort();
    frame_reader_free(&f);
    close(sv[0]);
    close(sv[1]);
    if (fds_before >= 0 && count_fds() != fds_before)
        abort();
    (void)sent_fds;
    (void)taken;
    return 0;
}
