/* cuda.c — the CUDA driver, loaded at run time (dlopen of libcuda.so.1, no link dependency):
 * registering device memory by pointer (the pointer's whole allocation is found and its legacy
 * IPC handle sent with the device's UUID; blocks are cached per client by base), and the fast
 * path's stream memory operations on the doorbell (cl_cuda_* for fastpath.c). */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

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

enum {
    LCU_SUCCESS = 0,
    LCU_ATTR_CONTEXT = 1,
    LCU_ATTR_MEMORY_TYPE = 2,
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
};

#ifdef LA_HAVE_CUDA
/* With the toolkit present, check the values above against the real header. */
#include <cuda.h>
_Static_assert((int)LCU_ATTR_CONTEXT == (int)CU_POINTER_ATTRIBUTE_CONTEXT, "attr");
_Static_assert((int)LCU_ATTR_MEMORY_TYPE == (int)CU_POINTER_ATTRIBUTE_MEMORY_TYPE, "attr");
_Static_assert((int)LCU_ATTR_IS_MANAGED == (int)CU_POINTER_ATTRIBUTE_IS_MANAGED, "attr");
_Static_assert((int)LCU_ATTR_DEVICE_ORDINAL == (int)CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, "attr");
_Static_assert((int)LCU_ATTR_IS_LEGACY_CUDA_IPC_CAPABLE ==
                   (int)CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
               "attr");
_Static_assert((int)LCU_MEMORYTYPE_DEVICE == (int)CU_MEMORYTYPE_DEVICE, "memtype");
_Static_assert((int)LCU_MEMHOSTREGISTER_PORTABLE == (int)CU_MEMHOSTREGISTER_PORTABLE, "flag");
_Static_assert((int)LCU_MEMHOSTREGISTER_DEVICEMAP == (int)CU_MEMHOSTREGISTER_DEVICEMAP, "flag");
_Static_assert((int)LCU_STREAM_WAIT_VALUE_GEQ == (int)CU_STREAM_WAIT_VALUE_GEQ, "flag");
_Static_assert((int)LCU_STREAM_WRITE_VALUE_DEFAULT == (int)CU_STREAM_WRITE_VALUE_DEFAULT, "flag");
_Static_assert((int)LCU_DEV_ATTR_HOST_POINTER_FOR_REGISTERED_MEM ==
                   (int)CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM,
               "attr");
_Static_assert((int)LCU_ERROR_HOST_MEMORY_ALREADY_REGISTERED ==
                   (int)CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED,
               "error");
_Static_assert(sizeof(lcu_ipc_mem_handle) == sizeof(CUipcMemHandle), "ipc handle");
_Static_assert(sizeof(lcu_uuid) == sizeof(CUuuid), "uuid");
_Static_assert(sizeof(lcu_devptr) == sizeof(CUdeviceptr), "devptr");
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

static const char *const VMM_HINT =
    "memory from cuMemCreate (e.g. PyTorch expandable_segments) cannot be shared by legacy "
    "CUDA IPC; set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False";

LA_API int la_buffer_register_cuda(la_client *c, const void *dev_ptr, la_buffer **ret_buffer,
                                   uint64_t *ret_offset)
{
    if (!c || !dev_ptr || !ret_buffer)
        return cl_fail(LA_EINVAL, "la_buffer_register_cuda: NULL argument");
    pthread_once(&cu_once, cu_load);
    if (cu.status)
        return cl_fail(cu.status, "%s", cu.why);

    lcu_devptr ptr = (lcu_devptr)(uintptr_t)dev_ptr;
    unsigned int memtype = 0;
    lcu_result r = cu.PointerGetAttribute(&memtype, LCU_ATTR_MEMORY_TYPE, ptr);
    if (r != LCU_SUCCESS)
        return cl_fail(LA_EINVAL, "%p is not CUDA memory (cuPointerGetAttribute: %s)", dev_ptr,
                       cu_err(r));
    if (memtype != LCU_MEMORYTYPE_DEVICE)
        return cl_fail(LA_ENOTSUP,
                       "%p is not device memory (memory type %u): only cudaMalloc "
                       "memory can be shared",
                       dev_ptr, memtype);
    unsigned int managed = 0;
    if (cu.PointerGetAttribute(&managed, LCU_ATTR_IS_MANAGED, ptr) == LCU_SUCCESS && managed)
        return cl_fail(LA_ENOTSUP,
                       "%p is managed (cudaMallocManaged) memory, which CUDA IPC "
                       "cannot share",
                       dev_ptr);
    unsigned int ipc_ok = 1;
    if (cu.PointerGetAttribute(&ipc_ok, LCU_ATTR_IS_LEGACY_CUDA_IPC_CAPABLE, ptr) == LCU_SUCCESS &&
        !ipc_ok)
        return cl_fail(LA_ENOTSUP, "%s", VMM_HINT);
    lcu_ctx ctx = NULL;
    r = cu.PointerGetAttribute(&ctx, LCU_ATTR_CONTEXT, ptr);
    if (r != LCU_SUCCESS || !ctx)
        return cl_fail(LA_EINVAL, "no CUDA context for %p: %s", dev_ptr, cu_err(r));
    int ordinal = -1;
    r = cu.PointerGetAttribute(&ordinal, LCU_ATTR_DEVICE_ORDINAL, ptr);
    if (r != LCU_SUCCESS)
        return cl_fail(LA_EINVAL, "no device for %p: %s", dev_ptr, cu_err(r));

    r = cu.CtxPushCurrent(ctx);
    if (r != LCU_SUCCESS)
        return cl_fail(LA_EDEVICE, "cuCtxPushCurrent: %s", cu_err(r));
    lcu_devptr base = 0;
    size_t size = 0;
    lcu_ipc_mem_handle h;
    memset(&h, 0, sizeof(h));
    lcu_device dev = 0;
    lcu_uuid uuid;
    int rc = 0;
    r = cu.MemGetAddressRange(&base, &size, ptr);
    if (r != LCU_SUCCESS)
        rc = cl_fail(LA_EINVAL, "cuMemGetAddressRange(%p): %s", dev_ptr, cu_err(r));
    if (rc == 0 && (r = cu.IpcGetMemHandle(&h, base)) != LCU_SUCCESS)
        rc = cl_fail(LA_ENOTSUP, "cuIpcGetMemHandle: %s; %s", cu_err(r), VMM_HINT);
    if (rc == 0 && (r = cu.DeviceGet(&dev, ordinal)) != LCU_SUCCESS)
        rc = cl_fail(LA_EDEVICE, "cuDeviceGet(%d): %s", ordinal, cu_err(r));
    if (rc == 0 && (r = cu.DeviceGetUuid(&uuid, dev)) != LCU_SUCCESS)
        rc = cl_fail(LA_EDEVICE, "cuDeviceGetUuid: %s", cu_err(r));
    lcu_ctx popped;
    cu.CtxPopCurrent(&popped);
    if (rc < 0)
        return rc;

    char ustr[48];
    const unsigned char *u = (const unsigned char *)uuid.bytes;
    snprintf(ustr, sizeof(ustr),
             "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1],
             u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14],
             u[15]);

    pthread_mutex_lock(&c->lock);
    /* Same block already registered on this client: same buffer, one more reference. The
     * handle is compared too, so that a block freed and reallocated at the same address is
     * registered anew. */
    la_buffer *b;
    list_for_each_entry (b, &c->buffers, la_buffer, link) {
        if (b->is_cuda && b->cuda_base == base && b->size == size &&
            !memcmp(b->ipc_handle, h.reserved, 64)) {
            b->refs++;
            pthread_mutex_unlock(&c->lock);
            *ret_buffer = b;
            if (ret_offset)
                *ret_offset = ptr - base;
            return 0;
        }
    }
    rc = cl_buffer_register_ipc(c, h.reserved, ustr, size, base, &b);
    pthread_mutex_unlock(&c->lock);
    if (rc < 0)
        return rc;
    *ret_buffer = b;
    if (ret_offset)
        *ret_offset = ptr - base;
    return 0;
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
