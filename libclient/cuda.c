/* cuda.c — the CUDA driver, loaded at run time (dlopen of libcuda.so.1, no link dependency).
 * Registering device memory by pointer: legacy memory (cudaMalloc) goes by its whole block's
 * legacy IPC handle; VMM memory (cuMemCreate, e.g. PyTorch's expandable segments) by the POSIX
 * fds of the allocations that cover the range, which the daemon maps side by side.
 * Registrations are cached per client: a range inside one already registered (same
 * allocations, still mapped where they were) returns that buffer with a new reference. And the
 * fast path's stream memory operations on the doorbell (cl_cuda_* for fastpath.c). */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* The few driver types and constants used, with their ABI values (cuda.h). */
typedef int lcu_result;
typedef unsigned long long lcu_devptr;
typedef int lcu_device;
typedef void *lcu_ctx;
typedef void *lcu_stream;
typedef struct {
    char reserved[64];
} lcu_ipc_mem_handle;
typedef struct {
    char bytes[16];
} lcu_uuid;

/* CUmemAllocationProp's layout (cuda.h): what cuMemGetAllocationPropertiesFromHandle fills. */
typedef struct {
    int type;
    int requested_handle_types;
    struct {
        int type;
        int id;
    } location;
    void *win32_meta;
    unsigned char compression, rdma;
    unsigned short usage;
    unsigned char reserved[4];
} lcu_alloc_prop;
typedef unsigned long long lcu_mem_handle;

enum {
    LCU_SUCCESS = 0,
    LCU_ERROR_INVALID_VALUE = 1,
    LCU_ATTR_CONTEXT = 1,
    LCU_ATTR_MEMORY_TYPE = 2,
    LCU_ATTR_BUFFER_ID = 7,
    LCU_ATTR_IS_MANAGED = 8,
    LCU_ATTR_DEVICE_ORDINAL = 9,
    LCU_ATTR_IS_LEGACY_CUDA_IPC_CAPABLE = 10,
    LCU_MEMORYTYPE_DEVICE = 2,
    LCU_MEMHOSTREGISTER_PORTABLE = 1,
    LCU_MEMHOSTREGISTER_DEVICEMAP = 2,
    LCU_STREAM_WAIT_VALUE_GEQ = 0,
    LCU_STREAM_WRITE_VALUE_DEFAULT = 0,
    LCU_DEV_ATTR_HOST_POINTER_FOR_REGISTERED_MEM = 91,
    LCU_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712,
    LCU_HANDLE_TYPE_POSIX_FD = 1,
    LCU_HANDLE_TYPE_FABRIC = 8,
};

#ifdef LA_HAVE_CUDA
/* With the toolkit present, check the values above against the real header. */
#include <cuda.h>
/* ours is theirs: an enum value, or a type's size. */
#define LCU_SAME(ours, theirs) _Static_assert((int)(ours) == (int)(theirs), #ours " is " #theirs)
#define LCU_SAME_SIZE(ours, theirs) _Static_assert(sizeof(ours) == sizeof(theirs), #ours " size")
LCU_SAME(LCU_ATTR_CONTEXT, CU_POINTER_ATTRIBUTE_CONTEXT);
LCU_SAME(LCU_ATTR_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_MEMORY_TYPE);
LCU_SAME(LCU_ATTR_IS_MANAGED, CU_POINTER_ATTRIBUTE_IS_MANAGED);
LCU_SAME(LCU_ATTR_DEVICE_ORDINAL, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL);
LCU_SAME(LCU_ATTR_IS_LEGACY_CUDA_IPC_CAPABLE, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE);
LCU_SAME(LCU_ATTR_BUFFER_ID, CU_POINTER_ATTRIBUTE_BUFFER_ID);
LCU_SAME(LCU_MEMORYTYPE_DEVICE, CU_MEMORYTYPE_DEVICE);
LCU_SAME(LCU_ERROR_INVALID_VALUE, CUDA_ERROR_INVALID_VALUE);
LCU_SAME(LCU_ERROR_HOST_MEMORY_ALREADY_REGISTERED, CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED);
LCU_SAME(LCU_MEMHOSTREGISTER_PORTABLE, CU_MEMHOSTREGISTER_PORTABLE);
LCU_SAME(LCU_MEMHOSTREGISTER_DEVICEMAP, CU_MEMHOSTREGISTER_DEVICEMAP);
LCU_SAME(LCU_STREAM_WAIT_VALUE_GEQ, CU_STREAM_WAIT_VALUE_GEQ);
LCU_SAME(LCU_STREAM_WRITE_VALUE_DEFAULT, CU_STREAM_WRITE_VALUE_DEFAULT);
LCU_SAME(LCU_DEV_ATTR_HOST_POINTER_FOR_REGISTERED_MEM,
         CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM);
LCU_SAME(LCU_HANDLE_TYPE_POSIX_FD, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
LCU_SAME(LCU_HANDLE_TYPE_FABRIC, CU_MEM_HANDLE_TYPE_FABRIC);
LCU_SAME_SIZE(lcu_ipc_mem_handle, CUipcMemHandle);
LCU_SAME_SIZE(lcu_uuid, CUuuid);
LCU_SAME_SIZE(lcu_devptr, CUdeviceptr);
LCU_SAME_SIZE(lcu_alloc_prop, CUmemAllocationProp);
LCU_SAME_SIZE(lcu_mem_handle, CUmemGenericAllocationHandle);
#endif

static struct {
    int status; /* 0 loaded, else LA_ENODEV */
    char why[256];
    lcu_result (*Init)(unsigned);
    lcu_result (*PointerGetAttribute)(void *, int, lcu_devptr);
    lcu_result (*MemGetAddressRange)(lcu_devptr *, size_t *, lcu_devptr);
    lcu_result (*IpcGetMemHandle)(lcu_ipc_mem_handle *, lcu_devptr);
    lcu_result (*DeviceGet)(lcu_device *, int);
    lcu_result (*DeviceGetUuid)(lcu_uuid *, lcu_device);
    lcu_result (*CtxPushCurrent)(lcu_ctx);
    lcu_result (*CtxPopCurrent)(lcu_ctx *);
    lcu_result (*GetErrorName)(lcu_result, const char **);
    lcu_result (*DevicePrimaryCtxRetain)(lcu_ctx *, lcu_device);
    /* The fast path's (optional: without them la_attn_enqueue says why). */
    lcu_result (*StreamWaitValue32)(lcu_stream, lcu_devptr, uint32_t, unsigned);
    lcu_result (*StreamWriteValue32)(lcu_stream, lcu_devptr, uint32_t, unsigned);
    lcu_result (*MemHostRegister)(void *, size_t, unsigned);
    lcu_result (*MemHostUnregister)(void *);
    lcu_result (*MemHostGetDevicePointer)(lcu_devptr *, void *, unsigned);
    lcu_result (*StreamGetCtx)(lcu_stream, lcu_ctx *);
    lcu_result (*CtxGetCurrent)(lcu_ctx *);
    lcu_result (*CtxGetDevice)(lcu_device *);
    lcu_result (*DeviceGetAttribute)(int *, int, lcu_device);
    lcu_result (*CtxSynchronize)(void);
    char fast_why[160]; /* "" when the fast path's entry points are all there */
    /* VMM (NULL when the driver lacks them: VMM memory is then refused) */
    lcu_result (*MemRetainAllocationHandle)(lcu_mem_handle *, void *);
    lcu_result (*MemGetAllocationPropertiesFromHandle)(lcu_alloc_prop *, lcu_mem_handle);
    lcu_result (*MemExportToShareableHandle)(void *, lcu_mem_handle, int, unsigned long long);
    lcu_result (*MemRelease)(lcu_mem_handle);
} cu;
static pthread_once_t cu_once = PTHREAD_ONCE_INIT;

static void cu_load(void)
{
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        cu.status = LA_ENODEV;
        snprintf(cu.why, sizeof(cu.why), "no CUDA driver: %s", dlerror());
        return;
    }
#define SYM(field, name)                                                    \
    do {                                                                    \
        *(void **)&cu.field = dlsym(h, name);                               \
        if (!cu.field) {                                                    \
            cu.status = LA_ENODEV;                                          \
            snprintf(cu.why, sizeof(cu.why), "CUDA driver lacks %s", name); \
            return;                                                         \
        }                                                                   \
    } while (0)
    SYM(Init, "cuInit");
    SYM(PointerGetAttribute, "cuPointerGetAttribute");
    SYM(MemGetAddressRange, "cuMemGetAddressRange_v2");
    SYM(IpcGetMemHandle, "cuIpcGetMemHandle");
    SYM(DeviceGet, "cuDeviceGet");
    SYM(CtxPushCurrent, "cuCtxPushCurrent_v2");
    SYM(CtxPopCurrent, "cuCtxPopCurrent_v2");
    SYM(GetErrorName, "cuGetErrorName");
    SYM(DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    *(void **)&cu.MemRetainAllocationHandle = dlsym(h, "cuMemRetainAllocationHandle");
    *(void **)&cu.MemGetAllocationPropertiesFromHandle =
        dlsym(h, "cuMemGetAllocationPropertiesFromHandle");
    *(void **)&cu.MemExportToShareableHandle = dlsym(h, "cuMemExportToShareableHandle");
    *(void **)&cu.MemRelease = dlsym(h, "cuMemRelease");
    *(void **)&cu.DeviceGetUuid = dlsym(h, "cuDeviceGetUuid_v2");
    if (!cu.DeviceGetUuid)
        SYM(DeviceGetUuid, "cuDeviceGetUuid");
#undef SYM
    /* The fast path: the _v2 stream memory operations (CUDA 11.7 and later drivers enable
     * them by default; the v1 entry points need a module parameter). */
    static const struct {
        void **fn;
        const char *name;
    } fast[] = {
        {(void **)&cu.StreamWaitValue32, "cuStreamWaitValue32_v2"},
        {(void **)&cu.StreamWriteValue32, "cuStreamWriteValue32_v2"},
        {(void **)&cu.MemHostRegister, "cuMemHostRegister_v2"},
        {(void **)&cu.MemHostUnregister, "cuMemHostUnregister"},
        {(void **)&cu.MemHostGetDevicePointer, "cuMemHostGetDevicePointer_v2"},
        {(void **)&cu.StreamGetCtx, "cuStreamGetCtx"},
        {(void **)&cu.CtxGetCurrent, "cuCtxGetCurrent"},
        {(void **)&cu.CtxGetDevice, "cuCtxGetDevice"},
        {(void **)&cu.DeviceGetAttribute, "cuDeviceGetAttribute"},
        {(void **)&cu.CtxSynchronize, "cuCtxSynchronize"},
    };
    for (size_t i = 0; i < sizeof(fast) / sizeof(fast[0]); i++)
        if (!(*fast[i].fn = dlsym(h, fast[i].name)) && !cu.fast_why[0])
            snprintf(cu.fast_why, sizeof(cu.fast_why),
                     "the CUDA driver lacks %s (a driver older than CUDA 11.7)", fast[i].name);
    lcu_result r = cu.Init(0);
    if (r != LCU_SUCCESS) {
        const char *n = "?";
        cu.GetErrorName(r, &n);
        cu.status = LA_ENODEV;
        snprintf(cu.why, sizeof(cu.why), "cuInit failed: %s", n ? n : "?");
    }
    /* The library stays loaded for the life of the process, like the driver's state. */
}

static const char *cu_err(lcu_result r)
{
    const char *n = NULL;
    if (cu.GetErrorName)
        cu.GetErrorName(r, &n);
    return n ? n : "unknown CUDA error";
}

/* Legacy IPC blocks worth a warning when their size is not a multiple of IPC_PAGE (below). */
enum { IPC_PAGE = 2 << 20, IPC_SLOW_MIN = 64 << 20 };

static const char *const VMM_HINT =
    "memory from cuMemCreate (e.g. PyTorch expandable_segments) can be shared only when it was "
    "created exportable as a POSIX file descriptor (PyTorch: TORCH_CUDA_EXPANDABLE_SEGMENTS_IPC=1; "
    "where it picks fabric handles, also expandable_segments_handle_type:posix_fd in "
    "PYTORCH_CUDA_ALLOC_CONF); else set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False";

/* What a pointer is, from the driver (the CUDA driver loaded). */
typedef struct ptr_info {
    lcu_ctx ctx;
    int ordinal;
    int legacy; /* cudaMalloc memory (legacy CUDA IPC works); else VMM */
} ptr_info;

/* The primary context of device ordinal, retained once per device for the life of the process
 * (a retain per call would leak references; a release could destroy a context the application
 * has not retained itself). */
static lcu_result primary_ctx(int ordinal, lcu_ctx *ret)
{
    enum { MAX_DEVICES = 64 };
    static lcu_ctx ctxs[MAX_DEVICES];
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    if (ordinal < 0 || ordinal >= MAX_DEVICES)
        return LCU_ERROR_INVALID_VALUE;
    lcu_result r = LCU_SUCCESS;
    pthread_mutex_lock(&lock);
    if (!ctxs[ordinal]) {
        lcu_device dev = 0;
        r = cu.DeviceGet(&dev, ordinal);
        if (r == LCU_SUCCESS)
            r = cu.DevicePrimaryCtxRetain(&ctxs[ordinal], dev);
    }
    *ret = ctxs[ordinal];
    pthread_mutex_unlock(&lock);
    return r;
}

static int ptr_info_of(const void *dev_ptr, ptr_info *ret)
{
    lcu_devptr ptr = (lcu_devptr)(uintptr_t)dev_ptr;
    unsigned int memtype = 0;
    lcu_result r = cu.PointerGetAttribute(&memtype, LCU_ATTR_MEMORY_TYPE, ptr);
    if (r != LCU_SUCCESS)
        return cl_fail(LA_EINVAL, "%p is not CUDA memory (cuPointerGetAttribute: %s)", dev_ptr,
                       cu_err(r));
    if (memtype != LCU_MEMORYTYPE_DEVICE)
        return cl_fail(LA_ENOTSUP,
                       "%p is not device memory (memory type %u): only device memory "
                       "(cudaMalloc, cuMemCreate) can be shared",
                       dev_ptr, memtype);
    unsigned int managed = 0;
    if (cu.PointerGetAttribute(&managed, LCU_ATTR_IS_MANAGED, ptr) == LCU_SUCCESS && managed)
        return cl_fail(LA_ENOTSUP,
                       "%p is managed (cudaMallocManaged) memory, which CUDA IPC "
                       "cannot share",
                       dev_ptr);
    /* A bool written by the driver: start from 1 (drivers without the attribute: legacy). */
    unsigned int legacy = 1;
    if (cu.PointerGetAttribute(&legacy, LCU_ATTR_IS_LEGACY_CUDA_IPC_CAPABLE, ptr) != LCU_SUCCESS)
        legacy = 1;
    int ordinal = -1;
    r = cu.PointerGetAttribute(&ordinal, LCU_ATTR_DEVICE_ORDINAL, ptr);
    if (r != LCU_SUCCESS)
        return cl_fail(LA_EINVAL, "no device for %p: %s", dev_ptr, cu_err(r));
    lcu_ctx ctx = NULL;
    r = cu.PointerGetAttribute(&ctx, LCU_ATTR_CONTEXT, ptr);
    if (!legacy && (r != LCU_SUCCESS || !ctx)) {
        /* cuMemCreate memory belongs to no context (the driver reports none, seen on an H200
         * with driver 580): work in the device's primary context, the one the CUDA runtime
         * and PyTorch use. */
        r = primary_ctx(ordinal, &ctx);
    }
    if (r != LCU_SUCCESS || !ctx)
        return cl_fail(LA_EINVAL, "no CUDA context for %p: %s", dev_ptr, cu_err(r));
    ret->ctx = ctx;
    ret->ordinal = ordinal;
    ret->legacy = legacy != 0;
    return 0;
}

/* The UUID of device ordinal as "GPU-..." (context pushed). */
static int device_uuid(int ordinal, char out[48])
{
    lcu_device dev = 0;
    lcu_uuid uuid;
    lcu_result r = cu.DeviceGet(&dev, ordinal);
    if (r != LCU_SUCCESS)
        return cl_fail(LA_EDEVICE, "cuDeviceGet(%d): %s", ordinal, cu_err(r));
    if ((r = cu.DeviceGetUuid(&uuid, dev)) != LCU_SUCCESS)
        return cl_fail(LA_EDEVICE, "cuDeviceGetUuid: %s", cu_err(r));
    const unsigned char *u = (const unsigned char *)uuid.bytes;
    snprintf(out, 48, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12],
             u[13], u[14], u[15]);
    return 0;
}

static uint64_t buffer_id_at(lcu_devptr p)
{
    unsigned long long id = 0;
    if (cu.PointerGetAttribute(&id, LCU_ATTR_BUFFER_ID, p) != LCU_SUCCESS)
        return 0;
    return id;
}

/* 1 when every allocation b registered through a pointer is still mapped where it was (the same
 * allocation: its process-wide buffer id unchanged), else 0. */
static int still_mapped(const la_buffer *b)
{
    if (b->is_vmm) {
        for (uint32_t i = 0; i < b->n_allocs; i++) {
            if (b->alloc_ids[i] >> 63) {
                /* No buffer id from this driver: the handle mapped there (the same value while
                 * the same allocation is mapped; a weaker test, handle values can recur). */
                lcu_mem_handle h = 0;
                if (cu.MemRetainAllocationHandle(&h, (void *)(uintptr_t)b->alloc_base[i]) !=
                    LCU_SUCCESS)
                    return 0;
                cu.MemRelease(h);
                if ((h | 1ull << 63) != b->alloc_ids[i])
                    return 0;
                continue;
            }
            uint64_t id = buffer_id_at(b->alloc_base[i]);
            if (id == 0 || id != b->alloc_ids[i])
                return 0;
        }
        return 1;
    }
    if (b->cuda_id)
        return buffer_id_at(b->cuda_base) == b->cuda_id;
    lcu_ipc_mem_handle h;
    return cu.IpcGetMemHandle(&h, b->cuda_base) == LCU_SUCCESS &&
           !memcmp(h.reserved, b->ipc_handle, 64);
}

/* Legacy memory: the whole block containing ptr by its IPC handle. The range [ptr, ptr + size)
 * must lie inside the block. */
static int register_block(la_client *c, const ptr_info *pi, lcu_devptr ptr, uint64_t size,
                          la_buffer **ret_buffer, uint64_t *ret_offset)
{
    lcu_result r = cu.CtxPushCurrent(pi->ctx);
    if (r != LCU_SUCCESS)
        return cl_fail(LA_EDEVICE, "cuCtxPushCurrent: %s", cu_err(r));
    lcu_devptr base = 0;
    size_t bsize = 0;
    lcu_ipc_mem_handle h;
    memset(&h, 0, sizeof(h));
    char ustr[48];
    int rc = 0;
    r = cu.MemGetAddressRange(&base, &bsize, ptr);
    if (r != LCU_SUCCESS)
        rc = cl_fail(LA_EINVAL, "cuMemGetAddressRange(%p): %s", (void *)(uintptr_t)ptr,
                     cu_err(r));
    if (rc == 0 && (ptr - base > bsize || size > bsize - (ptr - base)))
        rc = cl_fail(LA_ERANGE, "%llu bytes from %p run past the end of its allocation (%zu bytes "
                                "at %p)",
                     (unsigned long long)size, (void *)(uintptr_t)ptr, bsize,
                     (void *)(uintptr_t)base);
    if (rc == 0 && (r = cu.IpcGetMemHandle(&h, base)) != LCU_SUCCESS)
        rc = cl_fail(LA_ENOTSUP, "cuIpcGetMemHandle: %s; %s", cu_err(r), VMM_HINT);
    if (rc == 0)
        rc = device_uuid(pi->ordinal, ustr);
    uint64_t id = rc == 0 ? buffer_id_at(base) : 0;
    lcu_ctx popped;
    cu.CtxPopCurrent(&popped);
    if (rc < 0)
        return rc;

    pthread_mutex_lock(&c->lock);
    /* Same block already registered on this client: same buffer, one more reference. The
     * handle is compared too, so that a block freed and reallocated at the same address is
     * registered anew. */
    la_buffer *b;
    list_for_each_entry (b, &c->buffers, la_buffer, link) {
        if (b->is_cuda && !b->is_vmm && b->cuda_base == base && b->size == bsize &&
            !memcmp(b->ipc_handle, h.reserved, 64)) {
            b->refs++;
            pthread_mutex_unlock(&c->lock);
            *ret_buffer = b;
            if (ret_offset)
                *ret_offset = ptr - base;
            return 0;
        }
    }
    rc = cl_buffer_register_ipc(c, h.reserved, ustr, bsize, base, &b);
    if (rc == 0)
        b->cuda_id = id;
    pthread_mutex_unlock(&c->lock);
    if (rc < 0)
        return rc;
    /* H200, driver 580 (bench/RESULTS.md, 2026-12-03): the daemon's import of a large block
     * whose size is not a multiple of 2 MiB ran the Hopper kernel 1.8x slower than the same
     * data in the owner's memory; blocks of whole 2 MiB (PyTorch's caching allocator rounds
     * large blocks so) ran at full speed. */
    if (bsize >= IPC_SLOW_MIN && bsize % IPC_PAGE)
        cl_log(1, "liteattn: CUDA block of %zu bytes at %p is not a multiple of 2 MiB; the "
                  "daemon's IPC import of such a block can make the kernel up to 1.8x slower: "
                  "allocate whole 2 MiB, or VMM memory (docs/ALLOCATORS.md)",
               bsize, (void *)(uintptr_t)base);
    *ret_buffer = b;
    if (ret_offset)
        *ret_offset = ptr - base;
    return 0;
}

/* A registered VMM buffer of c that covers [ptr, end) with access, still mapped (lock held). */
static la_buffer *find_vmm(la_client *c, lcu_devptr ptr, lcu_devptr end, unsigned access)
{
    la_buffer *b;
    list_for_each_entry (b, &c->buffers, la_buffer, link) {
        if (!b->is_vmm || !b->alloc_base || (b->access & access) != access)
            continue;
        if (ptr < b->cuda_base || end > b->cuda_base + b->size)
            continue;
        if (still_mapped(b))
            return b;
    }
    return NULL;
}

/* VMM memory: the allocations covering [ptr, ptr + size), each exported as a POSIX fd, mapped
 * side by side by the daemon; the buffer is their whole range. */
static int register_vmm(la_client *c, const ptr_info *pi, lcu_devptr ptr, uint64_t size,
                        unsigned access, la_buffer **ret_buffer, uint64_t *ret_offset)
{
    if (!cu.MemRetainAllocationHandle || !cu.MemGetAllocationPropertiesFromHandle ||
        !cu.MemExportToShareableHandle || !cu.MemRelease)
        return cl_fail(LA_ENOTSUP, "%p is not legacy cudaMalloc memory, and the CUDA driver "
                                   "lacks the VMM export API",
                       (void *)(uintptr_t)ptr);
    lcu_devptr end = ptr + size;
    pthread_mutex_lock(&c->lock);
    la_buffer *hit = find_vmm(c, ptr, end, access);
    if (hit) {
        hit->refs++;
        pthread_mutex_unlock(&c->lock);
        *ret_buffer = hit;
        if (ret_offset)
            *ret_offset = ptr - hit->cuda_base;
        return 0;
    }
    pthread_mutex_unlock(&c->lock);

    lcu_result r = cu.CtxPushCurrent(pi->ctx);
    if (r != LCU_SUCCESS)
        return cl_fail(LA_EDEVICE, "cuCtxPushCurrent: %s", cu_err(r));
    uint64_t *bases = calloc(LA_MAX_VMM_ALLOCS, sizeof *bases);
    uint64_t *sizes = calloc(LA_MAX_VMM_ALLOCS, sizeof *sizes);
    uint64_t *ids = calloc(LA_MAX_VMM_ALLOCS, sizeof *ids);
    int *fds = malloc(LA_MAX_VMM_ALLOCS * sizeof *fds);
    size_t n = 0;
    int rc = bases && sizes && ids && fds ? 0 : cl_fail(LA_ENOMEM, NULL);
    char ustr[48];
    if (rc == 0)
        rc = device_uuid(pi->ordinal, ustr);
    /* Walk the allocations: each cuMemMap'ed allocation is its own address range. */
    for (lcu_devptr cur = ptr; rc == 0 && cur < end; n++) {
        if (n == LA_MAX_VMM_ALLOCS) {
            rc = cl_fail(LA_ELIMIT, "%llu bytes at %p span more than %d VMM allocations",
                         (unsigned long long)size, (void *)(uintptr_t)ptr, LA_MAX_VMM_ALLOCS);
            break;
        }
        lcu_devptr base = 0;
        size_t len = 0;
        if ((r = cu.MemGetAddressRange(&base, &len, cur)) != LCU_SUCCESS || len == 0 ||
            base > cur || cur - base >= len || (n > 0 && base != cur)) {
            rc = cl_fail(LA_EINVAL, "%p, inside the range, is not mapped memory (%s)",
                         (void *)(uintptr_t)cur, r == LCU_SUCCESS ? "a gap" : cu_err(r));
            break;
        }
        lcu_mem_handle h = 0;
        if ((r = cu.MemRetainAllocationHandle(&h, (void *)(uintptr_t)base)) != LCU_SUCCESS) {
            rc = cl_fail(LA_ENOTSUP, "%p: neither cudaMalloc nor cuMemCreate memory "
                                     "(cuMemRetainAllocationHandle: %s)",
                         (void *)(uintptr_t)base, cu_err(r));
            break;
        }
        lcu_alloc_prop prop;
        memset(&prop, 0, sizeof prop);
        r = cu.MemGetAllocationPropertiesFromHandle(&prop, h);
        if (r == LCU_SUCCESS && !(prop.requested_handle_types & LCU_HANDLE_TYPE_POSIX_FD)) {
            cu.MemRelease(h);
            rc = cl_fail(LA_ENOTSUP,
                         "the VMM allocation at %p was not created exportable as a POSIX file "
                         "descriptor (its handle types: 0x%x%s): %s",
                         (void *)(uintptr_t)base, (unsigned)prop.requested_handle_types,
                         prop.requested_handle_types & LCU_HANDLE_TYPE_FABRIC
                             ? ", fabric only: multi-node NVLink memory, not supported"
                             : "",
                         VMM_HINT);
            break;
        }
        int fd = -1;
        if (r == LCU_SUCCESS)
            r = cu.MemExportToShareableHandle(&fd, h, LCU_HANDLE_TYPE_POSIX_FD, 0);
        cu.MemRelease(h); /* the mapping keeps the allocation; the fd holds its own reference */
        if (r != LCU_SUCCESS || fd < 0) {
            rc = cl_fail(LA_ENOTSUP, "cannot export the VMM allocation at %p: %s; %s",
                         (void *)(uintptr_t)base, cu_err(r), VMM_HINT);
            break;
        }
        fds[n] = fd;
        bases[n] = base;
        sizes[n] = len;
        ids[n] = buffer_id_at(base);
        if (ids[n] == 0 || ids[n] >> 63)
            ids[n] = h | 1ull << 63; /* the handle's value instead (still_mapped) */
        cur = base + len;
    }
    lcu_ctx popped;
    cu.CtxPopCurrent(&popped);
    if (rc == 0) {
        uint64_t total = bases[n - 1] + sizes[n - 1] - bases[0];
        pthread_mutex_lock(&c->lock);
        la_buffer *b = NULL;
        rc = cl_buffer_register_vmm(c, fds, sizes, n, 0, total, ustr, access, &b);
        if (rc == 0) {
            b->cuda_base = bases[0];
            b->alloc_base = bases;
            b->alloc_ids = ids;
            bases = ids = NULL;
            *ret_buffer = b;
            if (ret_offset)
                *ret_offset = ptr - b->cuda_base;
        }
        pthread_mutex_unlock(&c->lock);
    }
    for (size_t i = 0; i < n; i++)
        close(fds[i]); /* the daemon has its own copies */
    free(fds);
    free(bases);
    free(sizes);
    free(ids);
    return rc;
}

LA_API int la_buffer_register_cuda_range(la_client *c, const void *dev_ptr, uint64_t size,
                                         unsigned access, la_buffer **ret_buffer,
                                         uint64_t *ret_offset)
{
    if (!c || !dev_ptr || !ret_buffer)
        return cl_fail(LA_EINVAL, "la_buffer_register_cuda_range: NULL argument");
    if (size == 0 || (uint64_t)(uintptr_t)dev_ptr > UINT64_MAX - size)
        return cl_fail(LA_EINVAL, "a range of %llu bytes at %p", (unsigned long long)size,
                       dev_ptr);
    if (access < 1 || access > LA_ACCESS_RW)
        return cl_fail(LA_EINVAL, "access %u is not LA_ACCESS_READ, _WRITE or _RW", access);
    pthread_once(&cu_once, cu_load);
    if (cu.status)
        return cl_fail(cu.status, "%s", cu.why);
    ptr_info pi = {0};
    int rc = ptr_info_of(dev_ptr, &pi);
    if (rc < 0)
        return rc;
    lcu_devptr ptr = (lcu_devptr)(uintptr_t)dev_ptr;
    if (pi.legacy)
        return register_block(c, &pi, ptr, size, ret_buffer, ret_offset);
    return register_vmm(c, &pi, ptr, size, access, ret_buffer, ret_offset);
}

LA_API int la_buffer_register_cuda(la_client *c, const void *dev_ptr, la_buffer **ret_buffer,
                                   uint64_t *ret_offset)
{
    return la_buffer_register_cuda_range(c, dev_ptr, 1, LA_ACCESS_RW, ret_buffer, ret_offset);
}

LA_API int la_buffer_cuda_valid(const la_buffer *b)
{
    if (!b)
        return cl_fail(LA_EINVAL, "la_buffer_cuda_valid: NULL buffer");
    if (!b->is_cuda || !b->cuda_base || (b->is_vmm && !b->alloc_base))
        return cl_fail(LA_ENOTSUP, "buffer %llu was not registered through a device pointer",
                       (unsigned long long)b->id);
    pthread_once(&cu_once, cu_load);
    if (cu.status)
        return cl_fail(cu.status, "%s", cu.why);
    return still_mapped(b);
}

/* ---- the fast path (fastpath.c) ----------------------------------------------------------- */

int cl_cuda_fast_ready(char *why, size_t len)
{
    pthread_once(&cu_once, cu_load);
    if (cu.status) {
        snprintf(why, len, "%s", cu.why);
        return cu.status;
    }
    if (cu.fast_why[0]) {
        snprintf(why, len, "%s", cu.fast_why);
        return LA_ENOTSUP;
    }
    return 0;
}

/* Makes ctx current on this thread when it is not; *ret_pushed says whether to pop it. */
static int push_ctx(lcu_ctx ctx, int *ret_pushed)
{
    lcu_ctx cur = NULL;
    if (cu.CtxGetCurrent(&cur) == LCU_SUCCESS && cur == ctx) {
        *ret_pushed = 0;
        return 0;
    }
    lcu_result r = cu.CtxPushCurrent(ctx);
    if (r != LCU_SUCCESS)
        return cl_fail(LA_EDEVICE, "cuCtxPushCurrent: %s", cu_err(r));
    *ret_pushed = 1;
    return 0;
}

static void pop_ctx(int pushed)
{
    lcu_ctx popped;
    if (pushed)
        cu.CtxPopCurrent(&popped);
}

/* The context of stream (NULL: the legacy default stream of the current context). */
static int stream_ctx(void *stream, lcu_ctx *ret_ctx)
{
    lcu_ctx ctx = NULL;
    lcu_result r = cu.StreamGetCtx((lcu_stream)stream, &ctx);
    if (r != LCU_SUCCESS || !ctx)
        return cl_fail(LA_EINVAL,
                       "no CUDA context for stream %p (%s): pass a stream of the session's GPU, "
                       "or make a context current for the default stream",
                       stream, r != LCU_SUCCESS ? cu_err(r) : "none current");
    *ret_ctx = ctx;
    return 0;
}

int cl_cuda_host_register(void *p, size_t len, void *stream, void **ret_ctx, uint64_t *ret_dev_addr)
{
    lcu_ctx ctx;
    int pushed, rc = stream_ctx(stream, &ctx);
    if (rc < 0 || (rc = push_ctx(ctx, &pushed)) < 0)
        return rc;
    lcu_result r =
        cu.MemHostRegister(p, len, LCU_MEMHOSTREGISTER_PORTABLE | LCU_MEMHOSTREGISTER_DEVICEMAP);
    if (r != LCU_SUCCESS) {
        pop_ctx(pushed);
        return cl_fail(r == LCU_ERROR_HOST_MEMORY_ALREADY_REGISTERED ? LA_EINVAL : LA_EDEVICE,
                       "cuMemHostRegister of the doorbell (%zu bytes): %s", len, cu_err(r));
    }
    /* One address for every GPU: portable mapped memory at the host's address where the
     * device allows it, else the address the driver gives this context. */
    lcu_device dev = 0;
    int same = 0;
    lcu_devptr d = (lcu_devptr)(uintptr_t)p;
    if (cu.CtxGetDevice(&dev) != LCU_SUCCESS ||
        cu.DeviceGetAttribute(&same, LCU_DEV_ATTR_HOST_POINTER_FOR_REGISTERED_MEM, dev) !=
            LCU_SUCCESS ||
        !same) {
        r = cu.MemHostGetDevicePointer(&d, p, 0);
        if (r != LCU_SUCCESS) {
            cu.MemHostUnregister(p);
            pop_ctx(pushed);
            return cl_fail(LA_EDEVICE, "cuMemHostGetDevicePointer of the doorbell: %s", cu_err(r));
        }
    }
    pop_ctx(pushed);
    *ret_ctx = ctx;
    *ret_dev_addr = d;
    return 0;
}

void cl_cuda_host_unregister(void *p, void *ctx)
{
    int pushed;
    if (push_ctx((lcu_ctx)ctx, &pushed) < 0)
        return; /* the context is gone (process exit): nothing is pinned any more */
    /* No stream of the context may still be about to read the memory: its waits on done
     * words were released from the host before this, so this returns. */
    cu.CtxSynchronize();
    lcu_result r = cu.MemHostUnregister(p);
    if (r != LCU_SUCCESS)
        cl_log(1, "liteattn: cuMemHostUnregister of the doorbell: %s", cu_err(r));
    pop_ctx(pushed);
}

int cl_cuda_ring_and_wait(void *stream, uint64_t ready_addr, uint64_t done_addr, uint32_t value)
{
    lcu_ctx ctx;
    int pushed, rc = stream_ctx(stream, &ctx);
    if (rc < 0 || (rc = push_ctx(ctx, &pushed)) < 0)
        return rc;
    /* The default write is ordered after the stream's earlier work (a memory barrier): the
     * daemon's kernel sees the Q/K/V the stream produced. */
    lcu_result r = cu.StreamWriteValue32((lcu_stream)stream, ready_addr, value,
                                         LCU_STREAM_WRITE_VALUE_DEFAULT);
    if (r == LCU_SUCCESS)
        r = cu.StreamWaitValue32((lcu_stream)stream, done_addr, value, LCU_STREAM_WAIT_VALUE_GEQ);
    pop_ctx(pushed);
    if (r != LCU_SUCCESS)
        return cl_fail(LA_EDEVICE, "enqueueing the doorbell on stream %p: %s", stream, cu_err(r));
    return 0;
}
