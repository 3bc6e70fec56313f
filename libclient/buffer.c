/* buffer.c — memory the daemon reads and writes: sealed memfd host buffers passed by
 * SCM_RIGHTS, caller fds, CUDA IPC handles and VMM allocation fds; unregistering. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

static void buffer_release(la_buffer *b)
{
    if (b->map && munmap(b->map, (size_t)b->size) < 0)
        cl_log(1, "liteattn: munmap of buffer %llu failed: %s", (unsigned long long)b->id,
               strerror(errno));
    free(b->alloc_base);
    free(b->alloc_ids);
    free(b);
}

void cl_buffers_free_all(la_client *c) { list_drain(&c->buffers, la_buffer, link, buffer_release); }

/* Sends one BufferRegister (lock held); *ret_reply (a BufferReply) is the caller's to free. */
static int send_register(la_client *c, Liteattn__BufferRegister *br, int fd,
                         Liteattn__Reply **ret_reply)
{
    Liteattn__Request req = cl_req_body(LITEATTN__REQUEST__BODY_BUFFER_REGISTER, br);
    return cl_call(c, &req, fd, LITEATTN__REPLY__BODY_BUFFER, ret_reply);
}

/* Sends BufferRegister (lock held). */
static int do_register(la_client *c, Liteattn__BufferRegister *br, int fd, uint64_t *ret_id)
{
    Liteattn__Reply *r;
    int rc = send_register(c, br, fd, &r);
    if (rc < 0)
        return rc;
    *ret_id = r->buffer->buffer_id;
    liteattn__reply__free_unpacked(r, NULL);
    return 0;
}

/* Maps fd (owned by the caller), registers it and creates the la_buffer. */
static int register_shm(la_client *c, int fd, size_t size, la_buffer **ret_buffer)
{
    void *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        return cl_fail(errno == ENOMEM ? LA_ENOMEM : LA_EIO, "mmap of %zu bytes: %s", size,
                       strerror(errno));
    la_buffer *b = calloc(1, sizeof(*b));
    if (!b) {
        munmap(map, size);
        return cl_fail(LA_ENOMEM, NULL);
    }
    b->client = c;
    b->size = size;
    b->map = map;
    b->refs = 1;
    b->access = LA_ACCESS_RW;
    Liteattn__BufferRegister br = LITEATTN__BUFFER_REGISTER__INIT;
    br.kind = LITEATTN__BUFFER_KIND__BUFFER_SHM;
    br.size = size;
    pthread_mutex_lock(&c->lock);
    int rc = do_register(c, &br, fd, &b->id);
    if (rc == 0)
        list_append(&c->buffers, &b->link);
    pthread_mutex_unlock(&c->lock);
    if (rc < 0) {
        buffer_release(b);
        return rc;
    }
    *ret_buffer = b;
    return 0;
}

LA_API int la_buffer_new_host(la_client *c, size_t size, la_buffer **ret_buffer)
{
    if (!c || !ret_buffer)
        return cl_fail(LA_EINVAL, "la_buffer_new_host: NULL argument");
    if (size == 0 || size > (size_t)INT64_MAX)
        return cl_fail(LA_EINVAL, "buffer size %zu is zero or too large", size);
    int fd = memfd_create("liteattn", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return cl_fail(LA_EIO, "memfd_create: %s", strerror(errno));
    if (ftruncate(fd, (off_t)size) < 0) {
        int e = errno;
        close(fd);
        return cl_fail(e == ENOSPC || e == ENOMEM || e == EFBIG ? LA_ENOMEM : LA_EIO,
                       "ftruncate memfd to %zu bytes: %s", size, strerror(e));
    }
    /* The daemon maps it too: neither side may change its size afterwards. */
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        int e = errno;
        close(fd);
        return cl_fail(LA_EIO, "sealing the memfd: %s", strerror(e));
    }
    int rc = register_shm(c, fd, size, ret_buffer);
    close(fd); /* the mapping and the daemon's copy keep the memory */
    return rc;
}

LA_API int la_buffer_register_fd(la_client *c, int fd, size_t size, la_buffer **ret_buffer)
{
    if (!c || !ret_buffer || fd < 0)
        return cl_fail(LA_EINVAL, "la_buffer_register_fd: bad argument");
    if (size == 0 || size > (size_t)INT64_MAX)
        return cl_fail(LA_EINVAL, "buffer size %zu is zero or too large", size);
    struct stat st;
    if (fstat(fd, &st) < 0)
        return cl_fail(LA_EINVAL, "fstat of fd %d: %s", fd, strerror(errno));
    if (st.st_size < 0 || (uint64_t)st.st_size < size)
        return cl_fail(LA_EINVAL, "fd %d holds %lld bytes, fewer than the %zu asked", fd,
                       (long long)st.st_size, size);
    /* The daemon maps the fd and refuses one that could shrink under it. Seals belong to
     * the file, so this also binds the caller's fd; an fd already sealed that way, or one
     * that cannot be sealed (the daemon then refuses it, saying why), is left as it is. */
    (void)fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK);
    int dfd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dfd < 0)
        return cl_fail(LA_EIO, "dup of fd %d: %s", fd, strerror(errno));
    int rc = register_shm(c, dfd, size, ret_buffer);
    close(dfd);
    return rc;
}

int cl_uuid_normalise(const char *in, char out[48])
{
    if (!in)
        return LA_EINVAL;
    if (!strncmp(in, "GPU-", 4) || !strncmp(in, "gpu-", 4))
        in += 4;
    char hex[33];
    int n = 0;
    for (const char *p = in; *p; p++) {
        if (*p == '-')
            continue;
        if (!isxdigit((unsigned char)*p) || n == 32)
            return LA_EINVAL;
        hex[n++] = (char)tolower((unsigned char)*p);
    }
    if (n != 32)
        return LA_EINVAL;
    hex[32] = 0;
    snprintf(out, 48, "GPU-%.8s-%.4s-%.4s-%.4s-%.12s", hex, hex + 8, hex + 12, hex + 16, hex + 20);
    return 0;
}

/* Whether the daemon announced a device with this (normalised) UUID. Unknown when it sent
 * no device list: then the daemon decides. */
static int daemon_has_device(la_client *c, const char *uuid)
{
    const char *devs = la_client_property(c, "devices");
    if (!devs || !*devs)
        return 1;
    const char *p = devs;
    while (*p) {
        const char *eol = strchr(p, '\n');
        size_t len = eol ? (size_t)(eol - p) : strlen(p);
        const char *sp = memchr(p, ' ', len);
        size_t ulen = sp ? (size_t)(sp - p) : len;
        char a[48];
        if (ulen < sizeof(a)) {
            memcpy(a, p, ulen);
            a[ulen] = 0;
            char na[48];
            if (cl_uuid_normalise(a, na) == 0 && !strcmp(na, uuid))
                return 1;
        }
        if (!eol)
            break;
        p = eol + 1;
    }
    return 0;
}

/* A new la_buffer of size bytes on the daemon's GPU uuid (refused when the daemon has none such),
 * not yet registered. */
static int cuda_buffer_new(la_client *c, const char *uuid, uint64_t size, la_buffer **ret)
{
    if (!daemon_has_device(c, uuid))
        return cl_fail(LA_ENODEV, "the daemon has no GPU %s (its devices: %s)", uuid,
                       la_client_property(c, "devices"));
    la_buffer *b = calloc(1, sizeof(*b));
    if (!b)
        return cl_fail(LA_ENOMEM, NULL);
    b->client = c;
    b->size = size;
    b->refs = 1;
    b->is_cuda = 1;
    *ret = b;
    return 0;
}

int cl_buffer_register_ipc(la_client *c, const void *handle, const char *uuid, uint64_t size,
                           uint64_t cuda_base, la_buffer **ret_buffer)
{
    la_buffer *b;
    int rc = cuda_buffer_new(c, uuid, size, &b);
    if (rc < 0)
        return rc;
    b->access = LA_ACCESS_RW;
    b->cuda_base = cuda_base;
    memcpy(b->ipc_handle, handle, 64);
    Liteattn__BufferRegister br = LITEATTN__BUFFER_REGISTER__INIT;
    br.kind = LITEATTN__BUFFER_KIND__BUFFER_CUDA_IPC;
    br.size = size;
    br.has_ipc_handle = 1;
    br.ipc_handle.data = (uint8_t *)handle;
    br.ipc_handle.len = 64;
    br.device_uuid = (char *)uuid;
    /* Caller holds the lock. */
    rc = do_register(c, &br, -1, &b->id);
    if (rc < 0) {
        free(b);
        return rc;
    }
    list_append(&c->buffers, &b->link);
    *ret_buffer = b;
    return 0;
}

/* The caller's GPU UUID, normalised into uuid: 0, or LA_EINVAL (error set) when it is none. */
static int device_uuid_arg(const char *device_uuid, char uuid[48])
{
    if (cl_uuid_normalise(device_uuid, uuid) < 0)
        return cl_fail(LA_EINVAL,
                       "\"%s\" is not a GPU UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-"
                       "xxxxxxxxxxxx or 32 hex digits)",
                       device_uuid);
    return 0;
}

LA_API int la_buffer_register_cuda_ipc(la_client *c, const void *handle, size_t handle_len,
                                       const char *device_uuid, uint64_t size,
                                       la_buffer **ret_buffer)
{
    if (!c || !handle || !device_uuid || !ret_buffer)
        return cl_fail(LA_EINVAL, "la_buffer_register_cuda_ipc: NULL argument");
    if (handle_len != 64)
        return cl_fail(LA_EINVAL, "a CUDA IPC handle has 64 bytes, not %zu", handle_len);
    if (size == 0)
        return cl_fail(LA_EINVAL, "buffer size is zero");
    char uuid[48];
    int rc = device_uuid_arg(device_uuid, uuid);
    if (rc)
        return rc;
    pthread_mutex_lock(&c->lock);
    rc = cl_buffer_register_ipc(c, handle, uuid, size, 0, ret_buffer);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

/* Sends one VMM BufferRegister (lock held) and checks what the daemon says is still pending. */
static int vmm_frame(la_client *c, Liteattn__BufferRegister *br, int fd, uint32_t want_pending,
                     uint64_t *ret_id, unsigned *ret_access)
{
    Liteattn__Reply *r;
    int rc = send_register(c, br, fd, &r);
    if (rc < 0)
        return rc;
    const Liteattn__BufferReply *bp = r->buffer;
    uint32_t pending = bp->has_vmm_pending ? bp->vmm_pending : 0;
    *ret_id = bp->buffer_id;
    if (ret_access)
        *ret_access = bp->has_access ? bp->access : LA_ACCESS_RW;
    liteattn__reply__free_unpacked(r, NULL);
    if (pending != want_pending)
        return cl_fail(LA_EPROTO, "the daemon expects %u more VMM allocations, not %u", pending,
                       want_pending);
    return 0;
}

/* Asks the daemon to drop buffer id (lock held): the failed VMM build's and
 * la_buffer_unregister's request. */
static int unregister_call(la_client *c, uint64_t id)
{
    Liteattn__BufferUnregister bu = LITEATTN__BUFFER_UNREGISTER__INIT;
    bu.buffer_id = id;
    Liteattn__Request req = cl_req_body(LITEATTN__REQUEST__BODY_BUFFER_UNREGISTER, &bu);
    Liteattn__Reply *r;
    int rc = cl_call(c, &req, -1, LITEATTN__REPLY__BODY_ACK, &r);
    if (rc == 0)
        liteattn__reply__free_unpacked(r, NULL);
    return rc;
}

int cl_buffer_register_vmm(la_client *c, const int *fds, const uint64_t *sizes, size_t n,
                           uint64_t offset, uint64_t size, const char *uuid, unsigned access,
                           la_buffer **ret_buffer)
{
    la_buffer *b;
    int rc = cuda_buffer_new(c, uuid, size, &b);
    if (rc < 0)
        return rc;
    b->is_vmm = 1;
    b->n_allocs = (uint32_t)n;
    Liteattn__BufferRegister br = LITEATTN__BUFFER_REGISTER__INIT;
    br.kind = LITEATTN__BUFFER_KIND__BUFFER_VMM;
    br.size = size;
    br.device_uuid = (char *)uuid;
    br.n_vmm_alloc_sizes = n;
    br.vmm_alloc_sizes = (uint64_t *)sizes;
    br.has_vmm_offset = 1;
    br.vmm_offset = offset;
    br.has_access = 1;
    br.access = access;
    rc = vmm_frame(c, &br, fds[0], (uint32_t)(n - 1), &b->id, &b->access);
    for (size_t i = 1; rc == 0 && i < n; i++) {
        Liteattn__BufferRegister ap = LITEATTN__BUFFER_REGISTER__INIT;
        ap.kind = LITEATTN__BUFFER_KIND__BUFFER_VMM;
        ap.size = sizes[i];
        ap.has_vmm_append = 1;
        ap.vmm_append = b->id;
        uint64_t id = 0;
        rc = vmm_frame(c, &ap, fds[i], (uint32_t)(n - 1 - i), &id, NULL);
        if (rc == 0 && id != b->id)
            rc = cl_fail(LA_EPROTO, "the daemon answered a VMM append to buffer %llu for %llu",
                         (unsigned long long)b->id, (unsigned long long)id);
    }
    if (rc < 0) {
        /* A failed append removed the buffer on the daemon; a half-built one is of no use. */
        if (b->id && !c->closed) {
            char keep[CL_ERRMSG_MAX];
            snprintf(keep, sizeof keep, "%s", la_last_error_message());
            unregister_call(c, b->id);
            cl_fail(rc, "%s", keep);
        }
        free(b);
        return rc;
    }
    list_append(&c->buffers, &b->link);
    *ret_buffer = b;
    return 0;
}

LA_API int la_buffer_register_vmm_fd(la_client *c, const int *fds, const uint64_t *alloc_sizes,
                                     size_t n_allocs, uint64_t offset, uint64_t size,
                                     const char *device_uuid, unsigned access,
                                     la_buffer **ret_buffer)
{
    if (!c || !fds || !alloc_sizes || !device_uuid || !ret_buffer)
        return cl_fail(LA_EINVAL, "la_buffer_register_vmm_fd: NULL argument");
    if (n_allocs < 1 || n_allocs > LA_MAX_VMM_ALLOCS)
        return cl_fail(LA_EINVAL, "%zu VMM allocations (1..%d)", n_allocs, LA_MAX_VMM_ALLOCS);
    uint64_t total = 0;
    for (size_t i = 0; i < n_allocs; i++) {
        if (fds[i] < 0)
            return cl_fail(LA_EINVAL, "fd %d of allocation %zu", fds[i], i);
        if (alloc_sizes[i] == 0 || __builtin_add_overflow(total, alloc_sizes[i], &total))
            return cl_fail(LA_EINVAL, "allocation %zu has size %llu", i,
                           (unsigned long long)alloc_sizes[i]);
    }
    if (size == 0 || offset > total || size > total - offset)
        return cl_fail(LA_ERANGE, "bytes [%llu, +%llu) are not inside the %llu bytes of the "
                                  "allocations",
                       (unsigned long long)offset, (unsigned long long)size,
                       (unsigned long long)total);
    if (access < 1 || access > LA_ACCESS_RW)
        return cl_fail(LA_EINVAL, "access %u is not LA_ACCESS_READ, _WRITE or _RW", access);
    char uuid[48];
    int rc = device_uuid_arg(device_uuid, uuid);
    if (rc)
        return rc;
    pthread_mutex_lock(&c->lock);
    rc = cl_buffer_register_vmm(c, fds, alloc_sizes, n_allocs, offset, size, uuid, access,
                                    ret_buffer);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

LA_API void *la_buffer_host_ptr(const la_buffer *b) { return b ? b->map : NULL; }
LA_API uint64_t la_buffer_size(const la_buffer *b) { return b ? b->size : 0; }
LA_API uint64_t la_buffer_id(const la_buffer *b) { return b ? b->id : 0; }

LA_API int la_buffer_unregister(la_buffer *b)
{
    if (!b)
        return 0;
    la_client *c = b->client;
    pthread_mutex_lock(&c->lock);
    if (--b->refs > 0) {
        pthread_mutex_unlock(&c->lock);
        return 0;
    }
    int rc = c->closed ? 0 : unregister_call(c, b->id);
    /* The daemon keeps its own mapping until its in-flight work is done; ours can go now. */
    list_remove(&b->link);
    buffer_release(b);
    pthread_mutex_unlock(&c->lock);
    return rc;
}
