/*
 * ipc_probe — why is the attention kernel slower on memory imported from another process?
 *
 * The same dense attention call (kernels/la_cuda.h, the kernel liteattnd runs) and two memory
 * kernels (bench/probe_kernels.cu: a streaming read of all four tensors, and a dependent chase
 * over 64 KiB pages that exposes translation misses) are timed with CUDA events on Q, K, V, O
 * placed in each kind of memory:
 *
 *   cudaMalloc x1   one cudaMalloc block holding Q, K, V, O (bench_daemon's layout)
 *   cudaMalloc x4   one cudaMalloc block per tensor (PyTorch's default allocator)
 *   VMM x1          one cuMemCreate allocation (POSIX fd handle type), mapped with cuMemMap
 *   VMM chunks      cuMemCreate allocations of --chunk bytes (PyTorch expandable_segments uses
 *                   20 MiB) mapped side by side in one reserved range
 *
 * each in three (VMM: four) ways: allocated by this process ("parent own"), allocated by a second
 * process ("child own": a second process and context, its own memory), and the parent's memory
 * imported by the second process (cudaIpcOpenMemHandle for cudaMalloc blocks, the fds of
 * cuMemExportToShareableHandle for VMM, mapped read-write, or Q/K/V through a second read-only
 * mapping). The second process is forked before CUDA starts and takes commands over a socket
 * pair; fds travel with SCM_RIGHTS. Cases run interleaved over --rounds rounds (so that clock or
 * temperature drift spreads over all of them) and each row reports the median and minimum
 * kernel time, the ratio to "cudaMalloc x1, parent own", and whether O was bit-identical to it.
 * Tensor placement: tensor i starts at shift + i * round_up(tensor bytes, align); every
 * (align, shift) pair of --align/--shift is one table.
 *
 * A "facts" section records what the daemon and client code rely on: VMM granularity, what
 * cuMemGetAddressRange returns inside a chunked mapping, the handle types and legacy-IPC
 * capability cuPointerGetAttribute reports, the device ordinal an imported handle's properties
 * name in the importing process, and whether the contexts run under MPS.
 *
 *   ipc_probe [--batch 1 --heads 40 --seq 32760 --head-dim 128] [--rounds 3] [--iters 5]
 *             [--align 256,2097152] [--shift 0] [--chunk 20971520] [--variants auto,portable]
 *             [--kinds malloc1,malloc4,vmm1,vmmc]
 *
 * Needs one GPU with the VMM APIs (any sm_80+ on Linux). GPU clock and temperature come from
 * NVML when libnvidia-ml.so.1 can be loaded.
 *
 * Over 1000 lines on purpose: one self-contained experiment (two processes, four kinds of
 * memory, the facts) that a reader follows top to bottom; split up, its steps would be read
 * out of order.
 */
#include <dlfcn.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cuda.h> /* driver types only: the driver is reached through cudaGetDriverEntryPoint */
#include <cuda_runtime_api.h>

#include "bench_util.h"
#include "la_attn.h"
#include "la_cuda.h"

cudaError_t probe_read(const void *const *ptrs, const size_t *bytes, int n, int blocks,
                       unsigned long long *sink, cudaStream_t s);
cudaError_t probe_chase(const void *base, size_t bytes, int steps, unsigned long long *out,
                        cudaStream_t s);

#define MAX_ITERS 64
#define MAX_ROUNDS 32
#define MAX_CHUNKS 4096
#define FDS_PER_MSG 200
#define CHASE_STEPS 20000

enum { K_MALLOC1, K_MALLOC4, K_VMM1, K_VMMC, N_KINDS };
static const char *const kind_name[N_KINDS] = {"cudaMalloc x1", "cudaMalloc x4", "VMM x1",
                                               "VMM chunks"};
static const char *const kind_opt[N_KINDS] = {"malloc1", "malloc4", "vmm1", "vmmc"};
enum { H_OWN, H_IMPORT, H_IMPORT_RO, N_HOWS };
enum { T_ATTN_AUTO, T_ATTN_PORTABLE, T_READ, T_CHASE, N_TESTS };

typedef struct cfg {
    int B, H, S, D;
    size_t tb;     /* bytes of one tensor */
    size_t align;  /* tensor i at shift + i * round_up(tb, align) */
    size_t shift;
    size_t stride;
    size_t region; /* bytes from the base to the end of O */
    size_t chunk;  /* VMM chunks: bytes of one allocation */
} cfg;

/* ---- driver API ---------------------------------------------------------------------------- */

static struct {
    CUresult (*MemCreate)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,
                          unsigned long long);
    CUresult (*MemRelease)(CUmemGenericAllocationHandle);
    CUresult (*MemAddressReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*MemAddressFree)(CUdeviceptr, size_t);
    CUresult (*MemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                       unsigned long long);
    CUresult (*MemUnmap)(CUdeviceptr, size_t);
    CUresult (*MemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    CUresult (*MemExportToShareableHandle)(void *, CUmemGenericAllocationHandle,
                                           CUmemAllocationHandleType, unsigned long long);
    CUresult (*MemImportFromShareableHandle)(CUmemGenericAllocationHandle *, void *,
                                             CUmemAllocationHandleType);
    CUresult (*MemGetAllocationGranularity)(size_t *, const CUmemAllocationProp *,
                                            CUmemAllocationGranularity_flags);
    CUresult (*MemGetAllocationPropertiesFromHandle)(CUmemAllocationProp *,
                                                     CUmemGenericAllocationHandle);
    CUresult (*MemRetainAllocationHandle)(CUmemGenericAllocationHandle *, void *);
    CUresult (*MemGetAddressRange)(CUdeviceptr *, size_t *, CUdeviceptr);
    CUresult (*PointerGetAttribute)(void *, CUpointer_attribute, CUdeviceptr);
    CUresult (*GetErrorName)(CUresult, const char **);
} cu;

static const char *who = "parent";

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "ipc_probe (%s): ", who);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static const char *cu_name(CUresult r)
{
    const char *n = NULL;
    if (cu.GetErrorName)
        cu.GetErrorName(r, &n);
    return n ? n : "?";
}

/* Dies unless `call` (of type T) returned ok, naming the call (text) and the error (name(r)). */
#define CHECK(T, ok, name, call, text)     \
    do {                                   \
        T r_ = (call);                     \
        if (r_ != (ok))                    \
            die("%s: %s", text, name(r_)); \
    } while (0)
#define CUDA(call) CHECK(cudaError_t, cudaSuccess, cudaGetErrorString, call, #call)
#define CU(call) CHECK(CUresult, CUDA_SUCCESS, cu_name, call, #call)

static void load_driver(void)
{
    struct {
        const char *name;
        void **slot;
    } t[] = {
        {"cuMemCreate", (void **)&cu.MemCreate},
        {"cuMemRelease", (void **)&cu.MemRelease},
        {"cuMemAddressReserve", (void **)&cu.MemAddressReserve},
        {"cuMemAddressFree", (void **)&cu.MemAddressFree},
        {"cuMemMap", (void **)&cu.MemMap},
        {"cuMemUnmap", (void **)&cu.MemUnmap},
        {"cuMemSetAccess", (void **)&cu.MemSetAccess},
        {"cuMemExportToShareableHandle", (void **)&cu.MemExportToShareableHandle},
        {"cuMemImportFromShareableHandle", (void **)&cu.MemImportFromShareableHandle},
        {"cuMemGetAllocationGranularity", (void **)&cu.MemGetAllocationGranularity},
        {"cuMemGetAllocationPropertiesFromHandle",
         (void **)&cu.MemGetAllocationPropertiesFromHandle},
        {"cuMemRetainAllocationHandle", (void **)&cu.MemRetainAllocationHandle},
        {"cuMemGetAddressRange", (void **)&cu.MemGetAddressRange},
        {"cuPointerGetAttribute", (void **)&cu.PointerGetAttribute},
        {"cuGetErrorName", (void **)&cu.GetErrorName},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        enum cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion(t[i].name, t[i].slot, 12000, cudaEnableDefault,
                                             &q) != cudaSuccess ||
            q != cudaDriverEntryPointSuccess || !*t[i].slot)
            die("the CUDA driver lacks %s", t[i].name);
    }
}

/* ---- NVML (optional): the SM clock and temperature after each case ------------------------ */

static struct {
    void *dev;
    int (*ClockInfo)(void *, int, unsigned *);
    int (*Temperature)(void *, int, unsigned *);
} nv;

static void nvml_open(const char *uuid)
{
    void *h = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h)
        return;
    int (*init)(void) = (int (*)(void))dlsym(h, "nvmlInit_v2");
    int (*by_uuid)(const char *, void **) =
        (int (*)(const char *, void **))dlsym(h, "nvmlDeviceGetHandleByUUID");
    *(void **)&nv.ClockInfo = dlsym(h, "nvmlDeviceGetClockInfo");
    *(void **)&nv.Temperature = dlsym(h, "nvmlDeviceGetTemperature");
    if (!init || !by_uuid || !nv.ClockInfo || !nv.Temperature || init() != 0 ||
        by_uuid(uuid, &nv.dev) != 0)
        nv.dev = NULL;
}

static void nvml_sample(unsigned *mhz, unsigned *temp)
{
    *mhz = *temp = 0;
    if (!nv.dev)
        return;
    nv.ClockInfo(nv.dev, 1 /* NVML_CLOCK_SM */, mhz);
    nv.Temperature(nv.dev, 0 /* NVML_TEMPERATURE_GPU */, temp);
}

/* ---- memory ---------------------------------------------------------------------------------- */

typedef struct mem {
    int kind, how, present;
    uint8_t *t[4]; /* Q, K, V, O */
    /* cudaMalloc kinds (own): the blocks; imported: the IPC mappings */
    void *blk[4];
    int n_blk;
    cudaIpcMemHandle_t ipc[4];
    /* VMM kinds: one reserved range (two when Q/K/V are mapped read-only apart from O) */
    CUdeviceptr va, va_ro;
    size_t va_size;
    CUmemGenericAllocationHandle h[MAX_CHUNKS];
    size_t hsize; /* bytes of each allocation */
    int n_h;
} mem;

static int g_dev;
static size_t g_gran_min, g_gran_rec;

static size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

static CUmemAllocationProp vmm_prop(void) { return bench_vmm_prop(g_dev); }

/* Maps m->h[0..n_h) side by side into a fresh reservation with access flags. */
static CUdeviceptr vmm_map_all(mem *m, CUmemAccess_flags flags)
{
    CUdeviceptr va = 0;
    CU(cu.MemAddressReserve(&va, m->va_size, g_gran_rec, 0, 0));
    for (int i = 0; i < m->n_h; i++)
        CU(cu.MemMap(va + (size_t)i * m->hsize, m->hsize, 0, m->h[i], 0));
    CUmemAccessDesc d;
    memset(&d, 0, sizeof d);
    d.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    d.location.id = g_dev;
    d.flags = flags;
    CU(cu.MemSetAccess(va, m->va_size, &d, 1));
    return va;
}

static void vmm_unmap(CUdeviceptr va, size_t size)
{
    if (!va)
        return;
    CU(cu.MemUnmap(va, size));
    CU(cu.MemAddressFree(va, size));
}

static void set_tensors(mem *m, const cfg *c, uint8_t *base)
{
    for (int i = 0; i < 4; i++)
        m->t[i] = base + c->shift + (size_t)i * c->stride;
}

static void mem_own(mem *m, int kind, const cfg *c)
{
    memset(m, 0, sizeof *m);
    m->kind = kind;
    m->how = H_OWN;
    m->present = 1;
    if (kind == K_MALLOC1) {
        CUDA(cudaMalloc(&m->blk[0], c->region));
        m->n_blk = 1;
        set_tensors(m, c, m->blk[0]);
        CUDA(cudaIpcGetMemHandle(&m->ipc[0], m->blk[0]));
    } else if (kind == K_MALLOC4) {
        for (int i = 0; i < 4; i++) {
            CUDA(cudaMalloc(&m->blk[i], c->shift + c->tb));
            m->t[i] = (uint8_t *)m->blk[i] + c->shift;
            CUDA(cudaIpcGetMemHandle(&m->ipc[i], m->blk[i]));
        }
        m->n_blk = 4;
    } else {
        CUmemAllocationProp p = vmm_prop();
        m->hsize = kind == K_VMM1 ? round_up(c->region, g_gran_min) : c->chunk;
        m->n_h = kind == K_VMM1 ? 1 : (int)(round_up(c->region, m->hsize) / m->hsize);
        if (m->n_h > MAX_CHUNKS)
            die("%d chunks of %zu bytes: more than %d", m->n_h, m->hsize, MAX_CHUNKS);
        m->va_size = m->hsize * (size_t)m->n_h;
        for (int i = 0; i < m->n_h; i++)
            CU(cu.MemCreate(&m->h[i], m->hsize, &p, 0));
        m->va = vmm_map_all(m, CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
        set_tensors(m, c, (uint8_t *)(uintptr_t)m->va);
    }
}

static void mem_free(mem *m)
{
    if (!m->present)
        return;
    for (int i = 0; i < m->n_blk; i++) {
        if (m->how == H_OWN)
            CUDA(cudaFree(m->blk[i]));
        else
            CUDA(cudaIpcCloseMemHandle(m->blk[i]));
    }
    vmm_unmap(m->va, m->va_size);
    vmm_unmap(m->va_ro, m->va_size);
    for (int i = 0; i < m->n_h; i++)
        CU(cu.MemRelease(m->h[i]));
    memset(m, 0, sizeof *m);
}

static uint16_t *g_host[3]; /* Q, K, V in bf16, the same in both processes */

static void host_data(const cfg *c)
{
    size_t n = c->tb / 2;
    for (int t = 0; t < 3; t++) {
        free(g_host[t]);
        g_host[t] = malloc(c->tb);
        if (!g_host[t])
            die("out of host memory");
        uint64_t s = 0x9e3779b97f4a7c15ull * (uint64_t)(t + 1);
        for (size_t i = 0; i < n; i++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            float f = (float)((int)(s >> 40 & 0xffff) - 32768) / 32768.0f;
            uint32_t u;
            memcpy(&u, &f, 4);
            g_host[t][i] = (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
        }
    }
}

static void mem_fill(const mem *m, const cfg *c)
{
    for (int t = 0; t < 3; t++)
        CUDA(cudaMemcpy(m->t[t], g_host[t], c->tb, cudaMemcpyHostToDevice));
    CUDA(cudaMemset(m->t[3], 0, c->tb));
}

/* ---- one case ---------------------------------------------------------------------------- */

typedef struct result {
    int rc;
    char err[200];
    int n;
    float ms[MAX_ITERS];
    uint64_t checksum; /* FNV-1a of O (attention), else 0 */
} result;

static cudaStream_t g_stream;
static cudaEvent_t g_e0, g_e1;
static unsigned long long *g_sink;
static int g_cc, g_sms;
static uint8_t *g_host_o;

static uint64_t fnv(const uint8_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static void run_case(const mem *m, const cfg *c, int test, int iters, result *r)
{
    memset(r, 0, sizeof *r);
    la_attn_params p;
    memset(&p, 0, sizeof p);
    int variant = test == T_ATTN_PORTABLE ? LA_CUDA_VARIANT_PORTABLE : LA_CUDA_VARIANT_AUTO;
    if (test == T_ATTN_AUTO || test == T_ATTN_PORTABLE) {
        int32_t bm, bn;
        if (la_cuda_tile_sizes(c->D, LA_DTYPE_BF16, test == T_ATTN_PORTABLE ? 80 : g_cc, &bm,
                               &bn) < 0) {
            r->rc = -1;
            snprintf(r->err, sizeof r->err, "no kernel for D %d", c->D);
            return;
        }
        bench_bf16_params(&p, m->t[0], m->t[1], m->t[2], m->t[3], c->B, c->S, c->H, c->D,
                          LA_MODE_DENSE);
        p.BM = bm, p.BN = bn;
    }
    for (int i = -1; i < iters; i++) { /* one untimed warm-up */
        cudaError_t e = cudaEventRecord(g_e0, g_stream);
        if (e == cudaSuccess) {
            if (test == T_READ) {
                const void *ptrs[4] = {m->t[0], m->t[1], m->t[2], m->t[3]};
                size_t bytes[4] = {c->tb, c->tb, c->tb, c->tb};
                e = probe_read(ptrs, bytes, 4, g_sms * 4, g_sink, g_stream);
            } else if (test == T_CHASE) {
                e = probe_chase(m->t[0], c->tb, CHASE_STEPS, g_sink, g_stream);
            } else {
                e = la_attn_fwd_cuda_variant(&p, variant, g_stream);
            }
        }
        if (e == cudaSuccess)
            e = cudaEventRecord(g_e1, g_stream);
        if (e == cudaSuccess)
            e = cudaEventSynchronize(g_e1);
        float ms = 0;
        if (e == cudaSuccess)
            e = cudaEventElapsedTime(&ms, g_e0, g_e1);
        if (e != cudaSuccess) {
            r->rc = -1;
            snprintf(r->err, sizeof r->err, "%s", cudaGetErrorString(e));
            return;
        }
        if (i >= 0)
            r->ms[r->n++] = ms;
    }
    if (test == T_ATTN_AUTO || test == T_ATTN_PORTABLE) {
        CUDA(cudaMemcpy(g_host_o, m->t[3], c->tb, cudaMemcpyDeviceToHost));
        r->checksum = fnv(g_host_o, c->tb);
    }
}

/* ---- the two processes' conversation ----------------------------------------------------- */

enum { OP_SETUP = 1, OP_IPC, OP_FDS, OP_IMPORT_VMM, OP_RUN, OP_FACTS, OP_TEARDOWN, OP_QUIT };

typedef struct facts {
    int have;
    int mps;              /* CU_DEVICE_ATTRIBUTE_MPS_ENABLED, -1 unknown */
    int import_location;  /* location.id of an imported handle's properties */
    int import_type_ok;   /* pinned device memory */
    uint64_t import_handle_types;
} facts;

typedef struct msg {
    int op;
    int kind, how, test, iters;
    cfg c;
    cudaIpcMemHandle_t ipc[4];
    int n_fds;   /* fds carried by this message (OP_FDS) */
    size_t hsize; /* OP_IMPORT_VMM: bytes of each allocation; n_h allocations */
    int n_h;
    result res;
    facts f;
} msg;

/* One message's header: an iovec over the message, and `control` bytes of room for fds
 * (none when 0; at most sizeof u.buf, FDS_PER_MSG fds). */
typedef struct msg_io {
    struct iovec iov;
    union {
        char buf[CMSG_SPACE(sizeof(int) * FDS_PER_MSG)];
        struct cmsghdr align;
    } u;
    struct msghdr mh;
} msg_io;

static void msg_io_init(msg_io *io, const msg *m, size_t control)
{
    memset(io, 0, sizeof *io);
    io->iov.iov_base = (void *)m;
    io->iov.iov_len = sizeof *m;
    io->mh.msg_iov = &io->iov;
    io->mh.msg_iovlen = 1;
    if (control) {
        io->mh.msg_control = io->u.buf;
        io->mh.msg_controllen = control;
    }
}

static void send_msg(int sock, const msg *m, const int *fds, int n_fds)
{
    msg_io io;
    msg_io_init(&io, m, n_fds > 0 ? CMSG_SPACE(sizeof(int) * (size_t)n_fds) : 0);
    if (n_fds > 0) {
        struct cmsghdr *cm = CMSG_FIRSTHDR(&io.mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n_fds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)n_fds);
    }
    if (sendmsg(sock, &io.mh, 0) != (ssize_t)sizeof *m)
        die("sendmsg: %s", strerror(errno));
}

/* Receives one message; its fds are appended to fds[*n_fds]. Returns 0, or -1 at EOF. */
static int recv_msg(int sock, msg *m, int *fds, int *n_fds, int max_fds)
{
    msg_io io;
    msg_io_init(&io, m, sizeof io.u.buf);
    ssize_t n = recvmsg(sock, &io.mh, MSG_CMSG_CLOEXEC);
    if (n == 0)
        return -1;
    if (n != (ssize_t)sizeof *m)
        die("recvmsg: %zd bytes (%s)", n, n < 0 ? strerror(errno) : "short");
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&io.mh); cm; cm = CMSG_NXTHDR(&io.mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        int k = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
            if (fds && *n_fds < max_fds)
                fds[(*n_fds)++] = fd;
            else
                close(fd);
        }
    }
    return 0;
}

static void cuda_start(void)
{
    CUDA(cudaSetDevice(0));
    g_dev = 0;
    CUDA(cudaFree(0)); /* the context, now */
    load_driver();
    struct cudaDeviceProp prop;
    CUDA(cudaGetDeviceProperties(&prop, 0));
    g_cc = prop.major * 10 + prop.minor;
    g_sms = prop.multiProcessorCount;
    CUmemAllocationProp p = vmm_prop();
    CU(cu.MemGetAllocationGranularity(&g_gran_min, &p, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    CU(cu.MemGetAllocationGranularity(&g_gran_rec, &p, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
    CUDA(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
    CUDA(cudaEventCreate(&g_e0));
    CUDA(cudaEventCreate(&g_e1));
    CUDA(cudaMalloc((void **)&g_sink, sizeof(unsigned long long) * 4096));
}

static int mps_enabled(void)
{
    int v = -1;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMpsEnabled, 0) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    return v;
}

/* The child: its own memory of every kind, the parent's imported, runs on command. */
static int child_main(int sock)
{
    who = "child";
    cuda_start();
    mem own[N_KINDS], imp[N_KINDS], imp_ro[N_KINDS];
    memset(own, 0, sizeof own);
    memset(imp, 0, sizeof imp);
    memset(imp_ro, 0, sizeof imp_ro);
    static int fds[MAX_CHUNKS];
    int n_fds = 0;
    cfg c;
    memset(&c, 0, sizeof c);
    facts f = {.mps = mps_enabled(), .import_location = -1};
    for (;;) {
        msg m;
        if (recv_msg(sock, &m, fds, &n_fds, MAX_CHUNKS) < 0)
            return 0;
        msg r = {.op = m.op};
        switch (m.op) {
        case OP_SETUP:
            c = m.c;
            host_data(&c);
            free(g_host_o);
            g_host_o = malloc(c.tb);
            if (!g_host_o)
                die("out of host memory");
            for (int k = 0; k < N_KINDS; k++) {
                if (!(m.kind & (1 << k)))
                    continue;
                mem_own(&own[k], k, &c);
                mem_fill(&own[k], &c);
            }
            break;
        case OP_IPC: {
            mem *x = &imp[m.kind];
            memset(x, 0, sizeof *x);
            x->kind = m.kind;
            x->how = H_IMPORT;
            x->present = 1;
            x->n_blk = m.kind == K_MALLOC1 ? 1 : 4;
            for (int i = 0; i < x->n_blk; i++)
                CUDA(cudaIpcOpenMemHandle(&x->blk[i], m.ipc[i], cudaIpcMemLazyEnablePeerAccess));
            if (m.kind == K_MALLOC1)
                set_tensors(x, &c, x->blk[0]);
            else
                for (int i = 0; i < 4; i++)
                    x->t[i] = (uint8_t *)x->blk[i] + c.shift;
            break;
        }
        case OP_FDS: break; /* fds queued above */
        case OP_IMPORT_VMM: {
            if (n_fds != m.n_h)
                die("%d fds for %d allocations", n_fds, m.n_h);
            for (int ro = 0; ro < 2; ro++) {
                mem *x = ro ? &imp_ro[m.kind] : &imp[m.kind];
                memset(x, 0, sizeof *x);
                x->kind = m.kind;
                x->how = ro ? H_IMPORT_RO : H_IMPORT;
                x->present = 1;
                x->hsize = m.hsize;
                x->n_h = m.n_h;
                x->va_size = m.hsize * (size_t)m.n_h;
                for (int i = 0; i < m.n_h; i++)
                    CU(cu.MemImportFromShareableHandle(&x->h[i], (void *)(uintptr_t)fds[i],
                                                       CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR));
                x->va = vmm_map_all(x, CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
                set_tensors(x, &c, (uint8_t *)(uintptr_t)x->va);
                if (ro) { /* Q, K, V through a read-only mapping of the same allocations */
                    x->va_ro = vmm_map_all(x, CU_MEM_ACCESS_FLAGS_PROT_READ);
                    uint8_t *o = x->t[3];
                    set_tensors(x, &c, (uint8_t *)(uintptr_t)x->va_ro);
                    x->t[3] = o;
                }
            }
            if (!f.have) {
                CUmemAllocationProp p;
                memset(&p, 0, sizeof p);
                if (cu.MemGetAllocationPropertiesFromHandle(&p, imp[m.kind].h[0]) ==
                    CUDA_SUCCESS) {
                    f.have = 1;
                    f.import_location = p.location.id;
                    f.import_type_ok = p.type == CU_MEM_ALLOCATION_TYPE_PINNED &&
                                       p.location.type == CU_MEM_LOCATION_TYPE_DEVICE;
                    f.import_handle_types = (uint64_t)p.requestedHandleTypes;
                }
            }
            for (int i = 0; i < n_fds; i++)
                close(fds[i]);
            n_fds = 0;
            break;
        }
        case OP_RUN: {
            const mem *x = m.how == H_OWN ? &own[m.kind] : m.how == H_IMPORT ? &imp[m.kind]
                                                                           : &imp_ro[m.kind];
            if (!x->present) {
                r.res.rc = -1;
                snprintf(r.res.err, sizeof r.res.err, "not set up");
            } else {
                run_case(x, &c, m.test, m.iters, &r.res);
            }
            break;
        }
        case OP_FACTS: r.f = f; break;
        case OP_TEARDOWN:
            for (int k = 0; k < N_KINDS; k++) {
                mem_free(&own[k]);
                mem_free(&imp[k]);
                mem_free(&imp_ro[k]);
            }
            break;
        case OP_QUIT: send_msg(sock, &r, NULL, 0); return 0;
        default: die("unknown op %d", m.op);
        }
        send_msg(sock, &r, NULL, 0);
    }
}

static msg call(int sock, const msg *m, const int *fds, int n_fds)
{
    send_msg(sock, m, fds, n_fds);
    msg r;
    if (recv_msg(sock, &r, NULL, NULL, 0) < 0)
        die("the child process went away");
    return r;
}

/* ---- the parent: orchestration and the tables ------------------------------------------------ */

typedef struct row {
    int kind, how, child;
    int n[N_TESTS];
    float ms[N_TESTS][MAX_ROUNDS * MAX_ITERS];
    uint64_t checksum[N_TESTS];
    int failed[N_TESTS];
    char err[N_TESTS][200];
    unsigned mhz_min, mhz_max, temp_max;
} row;

static int cmp_f(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static float median(float *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_f);
    return n % 2 ? v[n / 2] : 0.5f * (v[n / 2 - 1] + v[n / 2]);
}

static size_t parse_size(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || v < 0)
        die("bad size '%s'", s);
    switch (*end) {
    case 'k': case 'K': v *= 1024; break;
    case 'm': case 'M': v *= 1024 * 1024; break;
    case 'g': case 'G': v *= 1024.0 * 1024 * 1024; break;
    case 0: break;
    default: die("bad size '%s'", s);
    }
    return (size_t)v;
}

static int parse_list(const char *s, size_t *out, int max)
{
    int n = 0;
    char *dup = strdup(s), *save = NULL;
    for (char *t = strtok_r(dup, ",", &save); t && n < max; t = strtok_r(NULL, ",", &save))
        out[n++] = parse_size(t);
    free(dup);
    return n;
}

static const char *how_name(int how, int child)
{
    if (how == H_OWN)
        return child ? "child, own memory" : "parent, own memory";
    if (how == H_IMPORT)
        return "child, imported";
    return "child, imported, q/k/v read-only";
}

static void usage(FILE *f)
{
    fprintf(f, "usage: ipc_probe [--batch B] [--heads H] [--seq S] [--head-dim D] [--rounds R]\n"
               "                 [--iters N] [--align A[,A...]] [--shift S[,S...]] [--chunk BYTES]\n"
               "                 [--variants auto,portable] [--kinds malloc1,malloc4,vmm1,vmmc]\n"
               "sizes take k, M, G suffixes (powers of 1024). Defaults: B1 H40 S32760 D128 bf16,\n"
               "3 rounds of 5 iterations, --align 256,2M --shift 0 --chunk 20M, both variants,\n"
               "all kinds.\n");
}

int main(int argc, char **argv)
{
    cfg c = {.B = 1, .H = 40, .S = 32760, .D = 128, .chunk = 20u << 20};
    int rounds = 3, iters = 5, variants = 3, kinds = 0xf;
    size_t aligns[8] = {256, 2u << 20}, shifts[8] = {0};
    int n_align = 2, n_shift = 1;
    static const struct option opts[] = {
        {"batch", required_argument, 0, 'b'},   {"heads", required_argument, 0, 'H'},
        {"seq", required_argument, 0, 'S'},     {"head-dim", required_argument, 0, 'D'},
        {"rounds", required_argument, 0, 'r'},  {"iters", required_argument, 0, 'n'},
        {"align", required_argument, 0, 'a'},   {"shift", required_argument, 0, 's'},
        {"chunk", required_argument, 0, 'c'},   {"variants", required_argument, 0, 'v'},
        {"kinds", required_argument, 0, 'k'},   {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "b:H:S:D:r:n:a:s:c:v:k:h", opts, NULL)) != -1) {
        switch (o) {
        case 'b': c.B = atoi(optarg); break;
        case 'H': c.H = atoi(optarg); break;
        case 'S': c.S = atoi(optarg); break;
        case 'D': c.D = atoi(optarg); break;
        case 'r': rounds = atoi(optarg); break;
        case 'n': iters = atoi(optarg); break;
        case 'a': n_align = parse_list(optarg, aligns, 8); break;
        case 's': n_shift = parse_list(optarg, shifts, 8); break;
        case 'c': c.chunk = parse_size(optarg); break;
        case 'v':
            variants = (strstr(optarg, "auto") ? 1 : 0) | (strstr(optarg, "portable") ? 2 : 0);
            break;
        case 'k':
            kinds = 0;
            for (int k = 0; k < N_KINDS; k++)
                if (strstr(optarg, kind_opt[k]))
                    kinds |= 1 << k;
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (c.B < 1 || c.H < 1 || c.S < 1 || (c.D != 64 && c.D != 128) || rounds < 1 ||
        rounds > MAX_ROUNDS || iters < 1 || iters > MAX_ITERS || !variants || !kinds ||
        n_align < 1 || n_shift < 1 || c.chunk == 0) {
        usage(stderr);
        return 2;
    }
    for (int i = 0; i < n_align; i++)
        if (aligns[i] < 16 || aligns[i] % 16)
            die("--align %zu: must be a multiple of 16", aligns[i]);
    for (int i = 0; i < n_shift; i++)
        if (shifts[i] % 16)
            die("--shift %zu: must be a multiple of 16 (the kernels copy 16-byte pieces)",
                shifts[i]);
    c.tb = (size_t)c.B * c.S * c.H * c.D * 2;

    /* The second process, before this one touches CUDA. */
    int sp[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) != 0)
        die("socketpair: %s", strerror(errno));
    pid_t child = fork();
    if (child < 0)
        die("fork: %s", strerror(errno));
    if (child == 0) {
        close(sp[0]);
        _exit(child_main(sp[1]));
    }
    close(sp[1]);
    int sock = sp[0];
    cuda_start();
    struct cudaDeviceProp prop;
    CUDA(cudaGetDeviceProperties(&prop, 0));
    char uuid[64];
    const unsigned char *u = (const unsigned char *)prop.uuid.bytes;
    snprintf(uuid, sizeof uuid,
             "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0],
             u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13],
             u[14], u[15]);
    nvml_open(uuid);
    int drv = 0;
    cudaDriverGetVersion(&drv);
    printf("ipc_probe: %s (%s), compute capability %d, %d SMs, CUDA driver %d.%d\n", prop.name,
           uuid, g_cc, g_sms, drv / 1000, drv % 1000 / 10);
    printf("shape B%d H%d S%d D%d bf16, dense, tensors of %zu bytes; %d rounds x %d iterations "
           "per case; VMM granularity %zu (minimum), %zu (recommended); chunks of %zu bytes\n",
           c.B, c.H, c.S, c.D, c.tb, rounds, iters, g_gran_min, g_gran_rec, c.chunk);
    if (c.chunk % g_gran_min)
        die("--chunk %zu is not a multiple of the VMM granularity %zu", c.chunk, g_gran_min);
    g_host_o = malloc(c.tb);
    if (!g_host_o)
        die("out of host memory");

    static row rows[N_KINDS * 4];
    for (int ia = 0; ia < n_align; ia++)
        for (int is = 0; is < n_shift; is++) {
            c.align = aligns[ia];
            c.shift = shifts[is];
            c.stride = round_up(c.tb, c.align);
            c.region = c.shift + 3 * c.stride + c.tb;
            host_data(&c);
            mem own[N_KINDS];
            memset(own, 0, sizeof own);
            for (int k = 0; k < N_KINDS; k++)
                if (kinds & (1 << k)) {
                    mem_own(&own[k], k, &c);
                    mem_fill(&own[k], &c);
                }
            msg m = {.op = OP_SETUP, .kind = kinds, .c = c};
            call(sock, &m, NULL, 0);
            for (int k = 0; k < N_KINDS; k++) {
                if (!(kinds & (1 << k)))
                    continue;
                if (k == K_MALLOC1 || k == K_MALLOC4) {
                    msg x = {.op = OP_IPC, .kind = k};
                    memcpy(x.ipc, own[k].ipc, sizeof x.ipc);
                    call(sock, &x, NULL, 0);
                    continue;
                }
                static int fds[MAX_CHUNKS];
                for (int i = 0; i < own[k].n_h; i++)
                    CU(cu.MemExportToShareableHandle(&fds[i], own[k].h[i],
                                                     CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
                for (int i = 0; i < own[k].n_h; i += FDS_PER_MSG) {
                    int n = own[k].n_h - i < FDS_PER_MSG ? own[k].n_h - i : FDS_PER_MSG;
                    msg x = {.op = OP_FDS, .n_fds = n};
                    call(sock, &x, fds + i, n);
                }
                msg x = {.op = OP_IMPORT_VMM, .kind = k, .hsize = own[k].hsize, .n_h = own[k].n_h};
                call(sock, &x, NULL, 0);
                for (int i = 0; i < own[k].n_h; i++)
                    close(fds[i]);
            }

            int n_rows = 0;
            for (int k = 0; k < N_KINDS; k++) {
                if (!(kinds & (1 << k)))
                    continue;
                int hows[4][2] = {{H_OWN, 0}, {H_OWN, 1}, {H_IMPORT, 1}, {H_IMPORT_RO, 1}};
                int nh = (k == K_VMM1 || k == K_VMMC) ? 4 : 3;
                for (int h = 0; h < nh; h++) {
                    row *w = &rows[n_rows++];
                    memset(w, 0, sizeof *w);
                    w->kind = k, w->how = hows[h][0], w->child = hows[h][1];
                    w->mhz_min = ~0u;
                }
            }
            printf("\n== align %zu, shift %zu: tensors at offsets %zu + i x %zu (%s 2 MiB "
                   "boundaries)\n",
                   c.align, c.shift, c.shift, c.stride,
                   (c.shift % (2u << 20) == 0 && c.stride % (2u << 20) == 0) ? "on" : "off");
            fflush(stdout);
            for (int r = 0; r < rounds; r++)
                for (int t = 0; t < N_TESTS; t++) {
                    if ((t == T_ATTN_AUTO && !(variants & 1)) ||
                        (t == T_ATTN_PORTABLE && !(variants & 2)))
                        continue;
                    for (int i = 0; i < n_rows; i++) {
                        row *w = &rows[i];
                        result res;
                        if (!w->child) {
                            run_case(&own[w->kind], &c, t, iters, &res);
                        } else {
                            msg x = {.op = OP_RUN, .kind = w->kind, .how = w->how, .test = t,
                                     .iters = iters};
                            res = call(sock, &x, NULL, 0).res;
                        }
                        unsigned mhz, temp;
                        nvml_sample(&mhz, &temp);
                        if (mhz && mhz < w->mhz_min)
                            w->mhz_min = mhz;
                        if (mhz > w->mhz_max)
                            w->mhz_max = mhz;
                        if (temp > w->temp_max)
                            w->temp_max = temp;
                        if (res.rc < 0) {
                            w->failed[t] = 1;
                            snprintf(w->err[t], sizeof w->err[t], "%s", res.err);
                            continue;
                        }
                        memcpy(w->ms[t] + w->n[t], res.ms, sizeof(float) * (size_t)res.n);
                        w->n[t] += res.n;
                        w->checksum[t] = res.checksum;
                    }
                }
            /* The table: the reference row is the first one (parent's own first kind). */
            float ref[N_TESTS] = {0};
            for (int t = 0; t < N_TESTS; t++)
                if (rows[0].n[t])
                    ref[t] = median(rows[0].ms[t], rows[0].n[t]);
            printf("%-14s %-34s", "memory", "process");
            if (variants & 1)
                printf(" %22s", "attn (auto) ms med/min");
            if (variants & 2)
                printf(" %22s", "attn (portable) ms");
            printf(" %8s %9s %8s %9s %5s\n", "ratio", "read GB/s", "chase ns", "clock MHz",
                   "O");
            for (int i = 0; i < n_rows; i++) {
                row *w = &rows[i];
                printf("%-14s %-34s", kind_name[w->kind], how_name(w->how, w->child));
                float ratio = 0;
                int o_ok = 1;
                for (int t = T_ATTN_AUTO; t <= T_ATTN_PORTABLE; t++) {
                    if (!(variants & (1 << t)))
                        continue;
                    if (w->failed[t] || !w->n[t]) {
                        printf(" %22s", "failed");
                        o_ok = 0;
                        continue;
                    }
                    float med = median(w->ms[t], w->n[t]);
                    printf(" %13.2f / %6.2f", med, w->ms[t][0]);
                    if (!ratio && ref[t] > 0)
                        ratio = med / ref[t];
                    o_ok &= w->checksum[t] == rows[0].checksum[t];
                }
                printf(" %8.3f", ratio);
                if (w->n[T_READ]) {
                    float med = median(w->ms[T_READ], w->n[T_READ]);
                    printf(" %9.0f", 4.0 * (double)c.tb / (med * 1e-3) / 1e9);
                } else {
                    printf(" %9s", "failed");
                }
                if (w->n[T_CHASE]) {
                    float med = median(w->ms[T_CHASE], w->n[T_CHASE]);
                    printf(" %8.0f", med * 1e6 / CHASE_STEPS);
                } else {
                    printf(" %8s", "failed");
                }
                if (w->mhz_max)
                    printf(" %4u-%-4u", w->mhz_min, w->mhz_max);
                else
                    printf(" %9s", "-");
                printf(" %5s\n", o_ok ? "same" : "DIFF");
                for (int t = 0; t < N_TESTS; t++)
                    if (w->failed[t])
                        printf("    %s: %s\n", t == T_READ ? "read" : t == T_CHASE ? "chase"
                                                                                     : "attn",
                               w->err[t]);
            }
            fflush(stdout);
            msg td = {.op = OP_TEARDOWN};
            call(sock, &td, NULL, 0);
            for (int k = 0; k < N_KINDS; k++)
                mem_free(&own[k]);
        }

    /* Facts the daemon and the client library rely on. */
    printf("\n== facts\n");
    msg fm = {.op = OP_FACTS};
    facts f = call(sock, &fm, NULL, 0).f;
    printf("MPS (CU_DEVICE_ATTRIBUTE_MPS_ENABLED): parent %d, child %d (-1: attribute unknown)\n",
           mps_enabled(), f.mps);
    if (f.have)
        printf("imported VMM handle: properties name device ordinal %d in the importer (its own "
               "ordinal: 0); pinned device memory: %s; requested handle types 0x%llx\n",
               f.import_location, f.import_type_ok ? "yes" : "NO",
               (unsigned long long)f.import_handle_types);
    {
        /* A chunked VMM mapping: what cuMemGetAddressRange and cuPointerGetAttribute say. */
        cfg small = c;
        small.shift = 0;
        small.stride = small.tb = 2 * c.chunk;
        small.region = 3 * small.stride + small.tb;
        mem v;
        mem_own(&v, K_VMMC, &small);
        CUdeviceptr base = 0, inside = v.va + c.chunk + 4096;
        size_t size = 0;
        CUresult r = cu.MemGetAddressRange(&base, &size, inside);
        printf("cuMemGetAddressRange(chunk 1 + 4096) of %d mapped %zu-byte chunks: %s, base = "
               "reservation + %lld, size %zu (%s)\n",
               v.n_h, v.hsize, cu_name(r), (long long)(base - v.va), size,
               r == CUDA_SUCCESS && base == v.va + c.chunk && size == c.chunk
                   ? "the chunk: per-allocation ranges"
                   : "NOT the chunk");
        unsigned long long types = 0;
        unsigned legacy = 2;
        CUresult r1 = cu.PointerGetAttribute(&types, CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES,
                                             inside);
        CUresult r2 =
            cu.PointerGetAttribute(&legacy, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                                   inside);
        unsigned long long id1 = 0, id2 = 0;
        cu.PointerGetAttribute(&id1, CU_POINTER_ATTRIBUTE_BUFFER_ID, v.va + 16);
        cu.PointerGetAttribute(&id2, CU_POINTER_ATTRIBUTE_BUFFER_ID, inside);
        printf("VMM pointer: allowed handle types 0x%llx (%s), legacy IPC capable %u (%s), buffer "
               "ids of chunks 0 and 1: %llu, %llu (%s)\n",
               types, cu_name(r1), legacy, cu_name(r2), id1, id2,
               id1 != id2 ? "per allocation" : "the same");
        CUmemGenericAllocationHandle hh = 0;
        r = cu.MemRetainAllocationHandle(&hh, (void *)(uintptr_t)inside);
        printf("cuMemRetainAllocationHandle(VMM chunk 1): %s%s\n", cu_name(r),
               r == CUDA_SUCCESS && hh == v.h[1] ? " (the chunk's handle)" : "");
        if (r == CUDA_SUCCESS)
            cu.MemRelease(hh);
        mem_free(&v);
        void *blk;
        CUDA(cudaMalloc(&blk, 4u << 20));
        legacy = 2;
        types = 0;
        r1 = cu.PointerGetAttribute(&legacy, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                                    (CUdeviceptr)(uintptr_t)blk);
        r2 = cu.PointerGetAttribute(&types, CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES,
                                    (CUdeviceptr)(uintptr_t)blk);
        r = cu.MemRetainAllocationHandle(&hh, blk);
        printf("cudaMalloc pointer: legacy IPC capable %u (%s), allowed handle types 0x%llx "
               "(%s), cuMemRetainAllocationHandle: %s\n",
               legacy, cu_name(r1), types, cu_name(r2), cu_name(r));
        if (r == CUDA_SUCCESS)
            cu.MemRelease(hh);
        CUDA(cudaFree(blk));
    }
    msg q = {.op = OP_QUIT};
    call(sock, &q, NULL, 0);
    close(sock);
    int st = 0;
    waitpid(child, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        fprintf(stderr, "ipc_probe: the child process failed (status 0x%x)\n", st);
        return 1;
    }
    return 0;
}
