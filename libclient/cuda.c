/* cuda.c — registering device memory by pointer: the CUDA driver is loaded at run time
 * (dlopen of libcuda.so.1, no link dependency), the pointer's whole allocation is found and
 * its legacy IPC handle sent with the device's UUID. Blocks are cached per client by base. */
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
