/*
 * buffers.c — the buffer registry: shared-memory fds mapped into the daemon, CUDA IPC
 * allocations and VMM allocations (cuMemCreate, by fd) imported through the cuda backend, each
 * owned by one connection.
 *
 * A buffer is refcounted: the registry holds one reference while it is registered, every job
 * in flight that reads or writes it holds one more. Unregistering (or the connection closing)
 * only drops the registry's reference; the mapping or import goes away with the last one, so a
 * job never computes on memory that was unmapped under it.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine_priv.h"

static void buf_destroy(eng *e, buf *b)
{
    if (b->kind == BUF_SHM && b->ptr) {
        if (munmap(b->ptr, (size_t)b->map_len) != 0)
            eng_logf(e, LOG_WARN, "buffer %llu: munmap failed: %s", (unsigned long long)b->id,
                     strerror(errno));
    } else if ((b->kind == BUF_CUDA || b->kind == BUF_VMM) && b->imp && b->be &&
               b->be->ops->buffer_release) {
        b->be->ops->buffer_release(b->be, b->imp);
    }
    b->ptr = NULL;
    b->imp = NULL;
    free(b->alloc_sizes);
    free(b);
}

void buf_unref(eng *e, buf *b)
{
    if (!b)
        return;
    if (--b->refs > 0)
        return;
    buf_destroy(e, b);
}

buf *buf_get(eng *e, uint64_t conn_id, uint64_t id)
{
    buf *b;
    list_find_entry(b, &e->buffers, buf, link, b->id == id);
    return b && b->conn_id == conn_id ? b : NULL;
}

/* The bytes a buffer keeps alive: its mapping (a VMM buffer pins all of its allocations,
 * whatever part of them it names), else its size. */
static uint64_t buf_bytes(const buf *b) { return b->map_len > b->size ? b->map_len : b->size; }

uint64_t buf_count(const eng *e, uint64_t *ret_bytes)
{
    uint64_t n = 0, bytes = 0;
    const buf *b;
    list_for_each_entry (b, &e->buffers, buf, link) {
        n++;
        bytes += buf_bytes(b);
    }
    if (ret_bytes)
        *ret_bytes = bytes;
    return n;
}

/* Checks the connection's buffer count and bytes against the limits for one more of size. */
static int conn_limits(eng *e, uint32_t uid, uint64_t conn_id, uint64_t size, eng_error *err)
{
    uint64_t n = 0, bytes = 0, n_user = 0, n_all = 0;
    const buf *b;
    list_for_each_entry (b, &e->buffers, buf, link) {
        n_all++;
        n_user += b->uid == uid;
        if (b->conn_id == conn_id) {
            n++;
            bytes += buf_bytes(b);
        }
    }
    /* Every buffer is a mapping of the daemon: per user and in all, they stay well under
     * vm.max_map_count, so that no user can leave the others unable to connect. */
    const eng_limits *lu = &e->cfg.limits;
    if (lu->max_buffers_per_user && n_user + 1 > lu->max_buffers_per_user) {
        eng_errf(err,
                 "conn %llu: uid %u has %llu buffers registered, the max_buffers_per_user "
                 "limit",
                 (unsigned long long)conn_id, uid, (unsigned long long)n_user);
        return LA_ELIMIT;
    }
    if (e->max_buffers_total && n_all + 1 > e->max_buffers_total) {
        eng_errf(err, "conn %llu: the daemon holds %llu buffers, its max_buffers_total limit",
                 (unsigned long long)conn_id, (unsigned long long)n_all);
        return LA_ELIMIT;
    }
    const eng_limits *l = &e->cfg.limits;
    if (l->max_buffers_per_conn && n + 1 > l->max_buffers_per_conn) {
        eng_errf(err, "conn %llu: buffer limit reached (%llu buffers registered, limit %u)",
                 (unsigned long long)conn_id, (unsigned long long)n, l->max_buffers_per_conn);
        return LA_ELIMIT;
    }
    if (l->max_buffer_bytes_per_conn &&
        (size > l->max_buffer_bytes_per_conn || bytes > l->max_buffer_bytes_per_conn - size)) {
        eng_errf(err,
                 "conn %llu: a buffer of %llu bytes exceeds the connection's limit (%llu of "
                 "%llu bytes registered)",
                 (unsigned long long)conn_id, (unsigned long long)size, (unsigned long long)bytes,
                 (unsigned long long)l->max_buffer_bytes_per_conn);
        return LA_ELIMIT;
    }
    return 0;
}

/* A new registered buffer of conn_id (the registry's reference), or NULL when out of memory. */
static buf *buf_add(eng *e, uint32_t uid, uint64_t conn_id, int kind, void *ptr, uint64_t size)
{
    buf *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    b->id = ++e->next_buffer_id;
    b->uid = uid;
    b->conn_id = conn_id;
    b->kind = kind;
    b->ptr = ptr;
    b->size = size;
    b->access = LA_ACCESS_RW;
    b->refs = 1;
    b->registered = 1;
    list_append(&e->buffers, &b->link);
    e->n_buffers_added++;
    return b;
}

/* A buffer's size is 1..2^63-1 bytes (offsets and extents are checked in int64 arithmetic). */
static int size_check(uint64_t conn_id, uint64_t size, eng_error *err)
{
    if (size == 0 || size > (uint64_t)INT64_MAX) {
        eng_errf(err, "conn %llu: buffer size %llu is not in 1..2^63-1",
                 (unsigned long long)conn_id, (unsigned long long)size);
        return LA_EINVAL;
    }
    return 0;
}

int eng_buffer_add_shm(eng *e, uint32_t uid, uint64_t conn_id, int fd, uint64_t size,
                       uint64_t *ret_id, eng_error *err)
{
    int rc;
    if (fd < 0) {
        eng_errf(err, "conn %llu: shared-memory buffer without a file descriptor",
                 (unsigned long long)conn_id);
        return LA_EINVAL;
    }
    if (e->shutting_down) {
        eng_errf(err, "the daemon is shutting down");
        rc = LA_ESHUTDOWN;
        goto fail;
    }
    if ((rc = size_check(conn_id, size, err)) < 0)
        goto fail;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        eng_errf(err, "conn %llu: fstat of the buffer's fd failed: %s", (unsigned long long)conn_id,
                 strerror(errno));
        rc = LA_EIO;
        goto fail;
    }
    if (!S_ISREG(st.st_mode) || st.st_size <= 0 || size > (uint64_t)st.st_size) {
        eng_errf(err, "conn %llu: buffer of %llu bytes, but its fd holds %lld bytes%s",
                 (unsigned long long)conn_id, (unsigned long long)size, (long long)st.st_size,
                 S_ISREG(st.st_mode) ? "" : " (not a regular file)");
        rc = LA_EINVAL;
        goto fail;
    }
    /* A file the client can still shrink would turn our accesses past its new end into
     * SIGBUS in the daemon: require F_SEAL_SHRINK (adding it ourselves where the memfd
     * allows sealing). */
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
        if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
            eng_errf(err,
                     "conn %llu: the buffer's fd cannot be sealed against shrinking "
                     "(F_SEAL_SHRINK): pass a memfd created with MFD_ALLOW_SEALING",
                     (unsigned long long)conn_id);
            rc = LA_EINVAL;
            goto fail;
        }
    }
    if ((rc = conn_limits(e, uid, conn_id, size, err)) < 0)
        goto fail;
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        eng_errf(err, "conn %llu: cannot map a buffer of %llu bytes: %s",
                 (unsigned long long)conn_id, (unsigned long long)size, strerror(errno));
        rc = errno == ENOMEM ? LA_ENOMEM : LA_EIO;
        goto fail;
    }
    close(fd);
    buf *b = buf_add(e, uid, conn_id, BUF_SHM, p, size);
    if (!b) {
        munmap(p, (size_t)size);
        eng_errf(err, "out of memory");
        return LA_ENOMEM;
    }
    b->map_len = size;
    *ret_id = b->id;
    return 0;
fail:
    close(fd);
    return rc;
}

int eng_buffer_add_cuda_ipc(eng *e, uint32_t uid, uint64_t conn_id, const void *handle, size_t len,
                            const char *device_uuid, uint64_t size, uint64_t *ret_id,
                            uint64_t *ret_size, eng_error *err)
{
    int rc;
    if (e->shutting_down) {
        eng_errf(err, "the daemon is shutting down");
        return LA_ESHUTDOWN;
    }
    if (!handle || len != 64) {
        eng_errf(err, "conn %llu: CUDA IPC handle of %zu bytes (must be 64)",
                 (unsigned long long)conn_id, handle ? len : (size_t)0);
        return LA_EINVAL;
    }
    size_t ul = device_uuid ? strlen(device_uuid) : 0;
    if (ul == 0 || ul >= 64) {
        eng_errf(err, "conn %llu: device UUID of %zu bytes (must be 1..63)",
                 (unsigned long long)conn_id, ul);
        return LA_EINVAL;
    }
    if ((rc = size_check(conn_id, size, err)) < 0)
        return rc;
    if (!e->cuda || !e->cuda->ops->buffer_import) {
        eng_errf(err, "conn %llu: CUDA IPC buffer, but the daemon has no cuda backend",
                 (unsigned long long)conn_id);
        return LA_ENODEV;
    }
    if ((rc = conn_limits(e, uid, conn_id, size, err)) < 0)
        return rc;
    be_import *imp = NULL;
    void *ptr = NULL;
    uint64_t real = 0;
    int dev = 0;
    char msg[BE_MSG_MAX] = "";
    rc = e->cuda->ops->buffer_import(e->cuda, handle, len, device_uuid ? device_uuid : "", size,
                                     &imp, &ptr, &real, &dev, msg, sizeof msg);
    if (rc < 0) {
        eng_errf(err, "conn %llu: CUDA IPC buffer on %s: %s", (unsigned long long)conn_id,
                 device_uuid && device_uuid[0] ? device_uuid : "(no device)",
                 msg[0] ? msg : codes_strerror(rc));
        return rc;
    }
    buf *b = buf_add(e, uid, conn_id, BUF_CUDA, ptr, size);
    if (!b) {
        e->cuda->ops->buffer_release(e->cuda, imp);
        eng_errf(err, "out of memory");
        return LA_ENOMEM;
    }
    b->be = e->cuda;
    b->imp = imp;
    b->dev = dev;
    *ret_id = b->id;
    if (ret_size)
        *ret_size = real;
    return 0;
}

/* ---- VMM ---------------------------------------------------------------------------------- */

/* Refuses what cannot be an exported CUDA allocation before the driver sees it: a socket, a
 * pipe, a directory, or a shared-memory file (what BUFFER_SHM takes). The driver's own fds are
 * not named here (their type is the driver's business); it refuses the rest itself. */
static int vmm_fd_check(uint64_t conn_id, int fd, eng_error *err)
{
    struct stat st;
    if (fstat(fd, &st) != 0) {
        eng_errf(err, "conn %llu: fstat of the VMM allocation's fd failed: %s",
                 (unsigned long long)conn_id, strerror(errno));
        return LA_EINVAL;
    }
    const char *what = S_ISSOCK(st.st_mode)  ? "a socket"
                       : S_ISFIFO(st.st_mode) ? "a pipe"
                       : S_ISDIR(st.st_mode)  ? "a directory"
                       : (S_ISREG(st.st_mode) && fcntl(fd, F_GET_SEALS) >= 0)
                           ? "shared memory (a memfd: register it as a host buffer)"
                           : NULL;
    if (what) {
        eng_errf(err,
                 "conn %llu: the VMM allocation's fd is %s, not a CUDA allocation exported by "
                 "cuMemExportToShareableHandle (POSIX file descriptor)",
                 (unsigned long long)conn_id, what);
        return LA_EINVAL;
    }
    return 0;
}

static void vmm_info(const buf *b, eng_buffer_info *ret)
{
    if (!ret)
        return;
    ret->id = b->id;
    ret->size = b->size;
    ret->pending = b->pending;
    ret->access = b->access;
    ret->granularity = b->granularity;
}

int eng_buffer_add_vmm(eng *e, uint32_t uid, uint64_t conn_id, int fd, const eng_vmm_spec *sp,
                       eng_buffer_info *ret_info, eng_error *err)
{
    int rc;
    unsigned long long cid = (unsigned long long)conn_id;
    if (fd < 0) {
        eng_errf(err, "conn %llu: VMM buffer without a file descriptor", cid);
        return LA_EINVAL;
    }
    if (e->shutting_down) {
        eng_errf(err, "the daemon is shutting down");
        rc = LA_ESHUTDOWN;
        goto fail;
    }
    if (!sp || sp->n_allocs < 1 || sp->n_allocs > LA_MAX_VMM_ALLOCS) {
        eng_errf(err, "conn %llu: a VMM buffer of %zu allocations (must be 1..%d)", cid,
                 sp ? sp->n_allocs : (size_t)0, LA_MAX_VMM_ALLOCS);
        rc = LA_EINVAL;
        goto fail;
    }
    uint64_t total = 0;
    for (size_t i = 0; i < sp->n_allocs; i++) {
        if (sp->alloc_sizes[i] == 0 || __builtin_add_overflow(total, sp->alloc_sizes[i], &total) ||
            total > (uint64_t)INT64_MAX) {
            eng_errf(err,
                     "conn %llu: VMM allocation %zu of %zu has size %llu (sizes are 1..2^63-1 "
                     "bytes, together too)",
                     cid, i, sp->n_allocs, (unsigned long long)sp->alloc_sizes[i]);
            rc = LA_EINVAL;
            goto fail;
        }
    }
    if ((rc = size_check(conn_id, sp->size, err)) < 0)
        goto fail;
    if (sp->offset > total || sp->size > total - sp->offset) {
        eng_errf(err,
                 "conn %llu: VMM buffer of bytes [%llu, +%llu) outside the %llu bytes of its %zu "
                 "allocation(s)",
                 cid, (unsigned long long)sp->offset, (unsigned long long)sp->size,
                 (unsigned long long)total, sp->n_allocs);
        rc = LA_ERANGE;
        goto fail;
    }
    if (sp->access < 1 || sp->access > LA_ACCESS_RW) {
        eng_errf(err, "conn %llu: access %u is not a set of LA_ACCESS_READ (1), LA_ACCESS_WRITE (2)",
                 cid, sp->access);
        rc = LA_EINVAL;
        goto fail;
    }
    size_t ul = sp->device_uuid ? strlen(sp->device_uuid) : 0;
    if (ul == 0 || ul >= 64) {
        eng_errf(err, "conn %llu: device UUID of %zu bytes (must be 1..63)", cid, ul);
        rc = LA_EINVAL;
        goto fail;
    }
    if ((rc = vmm_fd_check(conn_id, fd, err)) < 0)
        goto fail;
    if (!e->cuda || !e->cuda->ops->vmm_import) {
        eng_errf(err,
                 "conn %llu: VMM buffer (GPU memory), but the daemon has no cuda backend: the "
                 "cpu backend computes on host memory only (register a host buffer)",
                 cid);
        rc = LA_ENODEV;
        goto fail;
    }
    /* The whole of every allocation stays alive while imported: charge all of it. */
    if ((rc = conn_limits(e, uid, conn_id, total, err)) < 0)
        goto fail;
    uint64_t *sizes = malloc(sp->n_allocs * sizeof *sizes);
    if (!sizes) {
        eng_errf(err, "out of memory");
        rc = LA_ENOMEM;
        goto fail;
    }
    memcpy(sizes, sp->alloc_sizes, sp->n_allocs * sizeof *sizes);
    be_vmm_req r = {.uuid = sp->device_uuid, .alloc_sizes = sizes, .n_allocs = sp->n_allocs,
                    .offset = sp->offset, .size = sp->size, .access = sp->access};
    be_import *imp = NULL;
    void *ptr = NULL;
    int dev = 0;
    uint64_t gran = 0;
    char msg[BE_MSG_MAX] = "";
    rc = e->cuda->ops->vmm_import(e->cuda, &r, fd, &imp, &ptr, &dev, &gran, msg, sizeof msg);
    close(fd);
    fd = -1;
    if (rc < 0) {
        free(sizes);
        eng_errf(err, "conn %llu: VMM buffer on %s: %s", cid, sp->device_uuid,
                 msg[0] ? msg : codes_strerror(rc));
        return rc;
    }
    buf *b = buf_add(e, uid, conn_id, BUF_VMM, ptr, sp->size);
    if (!b) {
        e->cuda->ops->buffer_release(e->cuda, imp);
        free(sizes);
        eng_errf(err, "out of memory");
        return LA_ENOMEM;
    }
    b->be = e->cuda;
    b->imp = imp;
    b->dev = dev;
    b->access = sp->access;
    b->alloc_sizes = sizes;
    b->n_allocs = (uint32_t)sp->n_allocs;
    b->pending = (uint32_t)sp->n_allocs - 1;
    b->granularity = gran;
    b->map_len = total;
    vmm_info(b, ret_info);
    return 0;
fail:
    if (fd >= 0)
        close(fd);
    return rc;
}

static void buf_release_registration(eng *e, buf *b);

int eng_buffer_vmm_append(eng *e, uint64_t conn_id, uint64_t buffer_id, int fd,
                          uint64_t alloc_size, eng_buffer_info *ret_info, eng_error *err)
{
    unsigned long long cid = (unsigned long long)conn_id, bid = (unsigned long long)buffer_id;
    int rc;
    buf *b = buf_get(e, conn_id, buffer_id);
    if (!b) {
        eng_errf(err, "conn %llu: no buffer %llu to append a VMM allocation to", cid, bid);
        if (fd >= 0)
            close(fd);
        return LA_ENOENT;
    }
    if (fd < 0) {
        eng_errf(err, "conn %llu: VMM allocation for buffer %llu without a file descriptor", cid,
                 bid);
        rc = LA_EINVAL;
        goto fail;
    }
    if (e->shutting_down) {
        eng_errf(err, "the daemon is shutting down");
        rc = LA_ESHUTDOWN;
        goto fail;
    }
    if (b->kind != BUF_VMM) {
        eng_errf(err, "conn %llu: buffer %llu is not a VMM buffer; only VMM buffers take more "
                      "allocations",
                 cid, bid);
        rc = LA_EINVAL;
        goto fail;
    }
    if (b->pending == 0) {
        eng_errf(err, "conn %llu: VMM buffer %llu already has all of its %u allocation(s)", cid,
                 bid, b->n_allocs);
        rc = LA_EINVAL;
        goto fail;
    }
    uint32_t idx = b->n_allocs - b->pending;
    if (alloc_size != b->alloc_sizes[idx]) {
        eng_errf(err,
                 "conn %llu: VMM allocation %u of buffer %llu has %llu bytes, but its first frame "
                 "listed %llu",
                 cid, idx, bid, (unsigned long long)alloc_size,
                 (unsigned long long)b->alloc_sizes[idx]);
        rc = LA_EINVAL;
        goto fail;
    }
    if ((rc = vmm_fd_check(conn_id, fd, err)) < 0)
        goto fail;
    char msg[BE_MSG_MAX] = "";
    rc = b->be->ops->vmm_append(b->be, b->imp, fd, alloc_size, msg, sizeof msg);
    if (rc < 0) {
        eng_errf(err, "conn %llu: VMM allocation %u of buffer %llu: %s", cid, idx, bid,
                 msg[0] ? msg : codes_strerror(rc));
        goto fail;
    }
    close(fd);
    b->pending--;
    vmm_info(b, ret_info);
    return 0;
fail:
    if (fd >= 0)
        close(fd);
    /* A buffer that cannot be completed is of no use: it goes, and the message says so. */
    size_t n = strlen(err ? err->msg : "");
    if (err && n + 40 < sizeof err->msg)
        snprintf(err->msg + n, sizeof err->msg - n, "; buffer %llu was removed", bid);
    buf_release_registration(e, b);
    return rc;
}

int eng_buffer_set_access(eng *e, uint64_t conn_id, uint64_t buffer_id, unsigned access,
                          eng_error *err)
{
    buf *b = buf_get(e, conn_id, buffer_id);
    if (!b) {
        eng_errf(err, "conn %llu: no buffer %llu", (unsigned long long)conn_id,
                 (unsigned long long)buffer_id);
        return LA_ENOENT;
    }
    if (access < 1 || access > LA_ACCESS_RW) {
        eng_errf(err, "conn %llu: access %u is not a set of LA_ACCESS_READ (1), LA_ACCESS_WRITE (2)",
                 (unsigned long long)conn_id, access);
        return LA_EINVAL;
    }
    b->access = access;
    return 0;
}

static void buf_release_registration(eng *e, buf *b)
{
    list_remove(&b->link);
    b->registered = 0;
    e->n_buffers_removed++;
    buf_unref(e, b);
}

int eng_buffer_remove(eng *e, uint64_t conn_id, uint64_t buffer_id, eng_error *err)
{
    buf *b = buf_get(e, conn_id, buffer_id);
    if (!b) {
        eng_errf(err, "conn %llu: no buffer %llu", (unsigned long long)conn_id,
                 (unsigned long long)buffer_id);
        return LA_ENOENT;
    }
    buf_release_registration(e, b);
    return 0;
}

void buf_conn_closed(eng *e, uint64_t conn_id)
{
    buf *b;
    list_for_each_entry (b, &e->buffers, buf, link)
        if (b->conn_id == conn_id)
            buf_release_registration(e, b);
}

void buf_free_all(eng *e)
{
    while (!list_empty(&e->buffers))
        buf_release_registration(e, list_first_entry(&e->buffers, buf, link));
}
