/* probe.c — does the CUDA driver work under (an emulation of) liteattnd.service's sandbox?
 *
 * Without systemd as PID 1 the unit cannot be run as such; this program applies the parts of it
 * that could break the driver, one by one or together, and then does what liteattnd does with
 * CUDA. It needs only libc and the driver's libcuda.so.1 (dlopen), no CUDA toolkit. Run it as
 * root (to drop privileges and set up mounts): ./run.sh. allow.h is generated from systemd's
 * own filter sets (see run.sh).
 *
 * Options: --user (drop to uid/gid 65534, no groups), --nnp (PR_SET_NO_NEW_PRIVS),
 * --seccomp (allow list = @system-service minus @privileged, else EPERM),
 * --af-unix (socket() families other than AF_UNIX -> EAFNOSUPPORT), --mdwe (W+X / exec
 * mappings -> EPERM, like MemoryDenyWriteExecute=), --ro-sys (new mount ns, /sys and
 * /proc/sys read-only), --hidepid (fresh /proc with hidepid=invisible).
 * Then: cuInit, context, alloc, PTX JIT load + launch, IPC mem + event handle opened in a
 * sandboxed child. Prints each step. */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "allow.h"

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext, *CUmodule, *CUfunction, *CUevent, *CUstream;
typedef unsigned long long CUdeviceptr;
typedef struct { char reserved[64]; } CUipcMemHandle, CUipcEventHandle;

static CUresult (*cuInit)(unsigned);
static CUresult (*cuDeviceGet)(CUdevice *, int);
static CUresult (*cuDeviceGetName)(char *, int, CUdevice);
static CUresult (*cuCtxCreate)(CUcontext *, unsigned, CUdevice);
static CUresult (*cuMemAlloc)(CUdeviceptr *, size_t);
static CUresult (*cuMemsetD32)(CUdeviceptr, unsigned, size_t);
static CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t);
static CUresult (*cuModuleLoadData)(CUmodule *, const void *);
static CUresult (*cuModuleGetFunction)(CUfunction *, CUmodule, const char *);
static CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                                  unsigned, unsigned, CUstream, void **, void **);
static CUresult (*cuCtxSynchronize)(void);
static CUresult (*cuIpcGetMemHandle)(CUipcMemHandle *, CUdeviceptr);
static CUresult (*cuIpcOpenMemHandle)(CUdeviceptr *, CUipcMemHandle, unsigned);
static CUresult (*cuIpcCloseMemHandle)(CUdeviceptr);
static CUresult (*cuEventCreate)(CUevent *, unsigned);
static CUresult (*cuEventRecord)(CUevent, CUstream);
static CUresult (*cuIpcGetEventHandle)(CUipcEventHandle *, CUevent);
static CUresult (*cuIpcOpenEventHandle)(CUevent *, CUipcEventHandle);
static CUresult (*cuStreamWaitEvent)(CUstream, CUevent, unsigned);
static CUresult (*cuGetErrorName)(CUresult, const char **);

static const char *ptx =
    ".version 7.0\n.target sm_80\n.address_size 64\n"
    ".visible .entry add1(.param .u64 p, .param .u32 n)\n{\n"
    " .reg .u64 %rd<4>; .reg .u32 %r<6>; .reg .pred %p;\n"
    " ld.param.u64 %rd1, [p]; ld.param.u32 %r1, [n];\n"
    " mov.u32 %r2, %tid.x; mov.u32 %r3, %ctaid.x; mov.u32 %r4, %ntid.x;\n"
    " mad.lo.u32 %r2, %r3, %r4, %r2; setp.ge.u32 %p, %r2, %r1; @%p ret;\n"
    " cvta.to.global.u64 %rd1, %rd1; mul.wide.u32 %rd2, %r2, 4; add.u64 %rd3, %rd1, %rd2;\n"
    " ld.global.u32 %r5, [%rd3]; add.u32 %r5, %r5, 1; st.global.u32 [%rd3], %r5;\n ret;\n}\n";

static int fails;
static const char *ename(CUresult r)
{
    const char *n = "?";
    if (cuGetErrorName)
        cuGetErrorName(r, &n);
    return n;
}
#define CK(what, call)                                                                      \
    do {                                                                                    \
        CUresult r_ = (call);                                                               \
        printf("  %-28s %s\n", what, r_ ? ename(r_) : "ok");                                \
        if (r_) {                                                                           \
            fails++;                                                                        \
            return 1;                                                                       \
        }                                                                                   \
    } while (0)

#define LD(f, name)                                                                         \
    do {                                                                                    \
        *(void **)&f = dlsym(h, name);                                                      \
        if (!f) {                                                                           \
            printf("dlsym %s failed\n", name);                                              \
            exit(2);                                                                        \
        }                                                                                   \
    } while (0)

static void load(void)
{
    void *h = dlopen("libcuda.so.1", RTLD_NOW);
    if (!h) {
        printf("dlopen libcuda.so.1: %s\n", dlerror());
        exit(2);
    }
    LD(cuInit, "cuInit");
    LD(cuDeviceGet, "cuDeviceGet");
    LD(cuDeviceGetName, "cuDeviceGetName");
    LD(cuCtxCreate, "cuCtxCreate_v2");
    LD(cuMemAlloc, "cuMemAlloc_v2");
    LD(cuMemsetD32, "cuMemsetD32_v2");
    LD(cuMemcpyDtoH, "cuMemcpyDtoH_v2");
    LD(cuModuleLoadData, "cuModuleLoadData");
    LD(cuModuleGetFunction, "cuModuleGetFunction");
    LD(cuLaunchKernel, "cuLaunchKernel");
    LD(cuCtxSynchronize, "cuCtxSynchronize");
    LD(cuIpcGetMemHandle, "cuIpcGetMemHandle");
    LD(cuIpcOpenMemHandle, "cuIpcOpenMemHandle_v2");
    LD(cuIpcCloseMemHandle, "cuIpcCloseMemHandle");
    LD(cuEventCreate, "cuEventCreate");
    LD(cuEventRecord, "cuEventRecord");
    LD(cuIpcGetEventHandle, "cuIpcGetEventHandle");
    LD(cuIpcOpenEventHandle, "cuIpcOpenEventHandle");
    LD(cuStreamWaitEvent, "cuStreamWaitEvent");
    LD(cuGetErrorName, "cuGetErrorName");
}

#define ALLOW BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)

static void install_filter(int seccomp, int afunix, int mdwe)
{
    struct sock_filter f[1024];
    int n = 0;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    if (afunix) {
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_socket, 0, 4);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0]));
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AF_UNIX, 1, 0);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EAFNOSUPPORT);
        f[n++] = (struct sock_filter)ALLOW;
    }
    if (mdwe) {
        /* mmap: PROT_WRITE|PROT_EXEC both set -> EPERM */
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mmap, 0, 5);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[2]));
        f[n++] = (struct sock_filter)BPF_STMT(BPF_ALU | BPF_AND | BPF_K, PROT_WRITE | PROT_EXEC);
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PROT_WRITE | PROT_EXEC, 0, 1);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mprotect, 1, 0);
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_pkey_mprotect, 0, 5);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[2]));
        f[n++] = (struct sock_filter)BPF_STMT(BPF_ALU | BPF_AND | BPF_K, PROT_EXEC);
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PROT_EXEC, 0, 1);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    }
    if (seccomp) {
        int k = (int)(sizeof allow_nrs / sizeof allow_nrs[0]);
        for (int i = 0; i < k; i++) {
            f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)allow_nrs[i], 0, 1);
            f[n++] = (struct sock_filter)ALLOW;
        }
        f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM);
    }
    f[n++] = (struct sock_filter)ALLOW;
    struct sock_fprog prog = {.len = (unsigned short)n, .filter = f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
        perror("seccomp");
        exit(2);
    }
}

static void list_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    char p[300], t[300];
    printf("  open device fds:");
    while (d && (e = readdir(d))) {
        snprintf(p, sizeof p, "/proc/self/fd/%s", e->d_name);
        ssize_t k = readlink(p, t, sizeof t - 1);
        if (k > 0) {
            t[k] = 0;
            if (!strncmp(t, "/dev/", 5) && !strstr(p, "/fd/0") )
                printf(" %s", t);
        }
    }
    printf("\n");
    if (d)
        closedir(d);
}

static int child_import(int rfd)
{
    CUipcMemHandle mh;
    CUipcEventHandle eh;
    if (read(rfd, &mh, sizeof mh) != sizeof mh || read(rfd, &eh, sizeof eh) != sizeof eh)
        return 1;
    printf(" child (importer):\n");
    CUdevice dev;
    CUcontext ctx;
    CUdeviceptr p;
    CUevent ev;
    CK("cuInit", cuInit(0));
    CK("cuDeviceGet", cuDeviceGet(&dev, 0));
    CK("cuCtxCreate", cuCtxCreate(&ctx, 0, dev));
    CK("cuIpcOpenMemHandle", cuIpcOpenMemHandle(&p, mh, 1));
    CK("cuIpcOpenEventHandle", cuIpcOpenEventHandle(&ev, eh));
    CK("cuStreamWaitEvent", cuStreamWaitEvent(NULL, ev, 0));
    unsigned v[4];
    CK("cuMemcpyDtoH (imported)", cuMemcpyDtoH(v, p, sizeof v));
    printf("  imported value %u (expect 8)\n", v[0]);
    if (v[0] != 8)
        fails++;
    CK("cuIpcCloseMemHandle", cuIpcCloseMemHandle(p));
    return fails ? 1 : 0;
}

static int run(void)
{
    int pfd[2];
    if (pipe(pfd))
        return 1;
    pid_t kid = fork(); /* before CUDA init in either process */
    if (kid == 0) {
        close(pfd[1]);
        _exit(child_import(pfd[0]));
    }
    close(pfd[0]);
    CUdevice dev;
    CUcontext ctx;
    char name[128];
    CK("cuInit", cuInit(0));
    CK("cuDeviceGet", cuDeviceGet(&dev, 0));
    CK("cuDeviceGetName", cuDeviceGetName(name, sizeof name, dev));
    printf("  device: %s\n", name);
    CK("cuCtxCreate", cuCtxCreate(&ctx, 0, dev));
    list_fds();
    CUdeviceptr p;
    CK("cuMemAlloc 64 MiB", cuMemAlloc(&p, 64 << 20));
    CK("cuMemsetD32", cuMemsetD32(p, 7, 16 << 20));
    CUmodule m;
    CUfunction fn;
    CK("cuModuleLoadData (PTX JIT)", cuModuleLoadData(&m, ptx));
    CK("cuModuleGetFunction", cuModuleGetFunction(&fn, m, "add1"));
    unsigned nn = 1024;
    void *args[] = {&p, &nn};
    CK("cuLaunchKernel", cuLaunchKernel(fn, 4, 1, 1, 256, 1, 1, 0, NULL, args, NULL));
    CK("cuCtxSynchronize", cuCtxSynchronize());
    unsigned v[4];
    CK("cuMemcpyDtoH", cuMemcpyDtoH(v, p, sizeof v));
    printf("  value %u (expect 8)\n", v[0]);
    CUevent ev;
    CUipcMemHandle mh;
    CUipcEventHandle eh;
    CK("cuEventCreate (interprocess)", cuEventCreate(&ev, 0x2 | 0x4));
    CK("cuEventRecord", cuEventRecord(ev, NULL));
    CK("cuIpcGetMemHandle", cuIpcGetMemHandle(&mh, p));
    CK("cuIpcGetEventHandle", cuIpcGetEventHandle(&eh, ev));
    if (write(pfd[1], &mh, sizeof mh) != sizeof mh || write(pfd[1], &eh, sizeof eh) != sizeof eh)
        return 1;
    int st;
    waitpid(kid, &st, 0);
    printf("  child exit %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st));
    if (!WIFEXITED(st) || WEXITSTATUS(st))
        fails++;
    return 0;
}

int main(int argc, char **argv)
{
    int user = 0, nnp = 0, sc = 0, af = 0, mdwe = 0, rosys = 0, hidepid = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--user")) user = 1;
        else if (!strcmp(argv[i], "--nnp")) nnp = 1;
        else if (!strcmp(argv[i], "--seccomp")) sc = 1;
        else if (!strcmp(argv[i], "--af-unix")) af = 1;
        else if (!strcmp(argv[i], "--mdwe")) mdwe = 1;
        else if (!strcmp(argv[i], "--ro-sys")) rosys = 1;
        else if (!strcmp(argv[i], "--hidepid")) hidepid = 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("== probe:%s%s%s%s%s%s%s\n", user ? " user" : "", nnp ? " nnp" : "", sc ? " seccomp" : "",
           af ? " af-unix" : "", mdwe ? " mdwe" : "", rosys ? " ro-sys" : "", hidepid ? " hidepid" : "");
    if (rosys || hidepid) {
        if (unshare(CLONE_NEWNS) || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)) {
            perror("  unshare/mount private");
            return 3;
        }
        if (rosys) {
            if (mount("/proc/sys", "/proc/sys", NULL, MS_BIND | MS_REC, NULL) ||
                mount(NULL, "/proc/sys", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL))
                perror("  ro /proc/sys");
            if (mount("/sys", "/sys", NULL, MS_BIND | MS_REC, NULL) ||
                mount(NULL, "/sys", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL))
                perror("  ro /sys");
        }
        if (hidepid && mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                             "hidepid=invisible"))
            perror("  proc hidepid=invisible");
    }
    load();
    if (user) {
        if (setgroups(0, NULL) || setgid(65534) || setuid(65534)) {
            perror("  drop to 65534");
            return 3;
        }
    }
    if (nnp && !sc && !af && !mdwe)
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    if (sc || af || mdwe)
        install_filter(sc, af, mdwe);
    /* The filter is real: show what it refuses. (ptrace is outside @system-service; only
     * tried under the filter, since PTRACE_TRACEME succeeding would confuse the parent.) */
    if (sc) {
        errno = 0;
        long pr = syscall(SYS_ptrace, 0 /* PTRACE_TRACEME */, 0, 0, 0);
        printf("  sanity ptrace(TRACEME): %s\n", pr == 0 ? "allowed" : strerror(errno));
    }
    int s4 = socket(AF_INET, SOCK_STREAM, 0);
    printf("  sanity socket(AF_INET): %s\n", s4 >= 0 ? "allowed" : strerror(errno));
    void *wx = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    printf("  sanity mmap(W|X): %s\n", wx != MAP_FAILED ? "allowed" : strerror(errno));
    int wr = open("/proc/sys/kernel/core_pattern", O_WRONLY);
    printf("  sanity open /proc/sys rw: %s\n", wr >= 0 ? "allowed" : strerror(errno));
    FILE *pf = fopen("/proc/driver/nvidia/version", "r");
    printf("  /proc/driver/nvidia/version readable: %s\n", pf ? "yes" : strerror(errno));
    DIR *pd = opendir("/proc/1");
    printf("  /proc/1 visible: %s\n", pd ? "yes" : strerror(errno));
    run();
    printf("== result: %s (%d failures)\n", fails ? "FAIL" : "ok", fails);
    return fails ? 1 : 0;
}
