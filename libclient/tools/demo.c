/*
 * liteattn-demo — a short simulated video-diffusion generation through liteattnd (the data
 * and the table: sim.h; the same generation without a daemon: bench/bench_direct.c).
 *
 * Host buffers in shared memory, or with --device cuda (or auto when the daemon has a GPU)
 * device buffers (CUDA driver loaded at run time) registered by CUDA IPC and ordered with
 * interprocess events; one session for all layers. The error against dense attention comes
 * from a dense-mode call of the same session on the same inputs (mode dense leaves the masks
 * alone).
 */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "la_attn.h"
#include "liteattn.h"
#include "sim.h"

/* ---- CUDA driver, loaded at run time ---------------------------------------------------- */

typedef unsigned long long cu_ptr;
typedef struct {
    char reserved[64];
} cu_ipc_event;
typedef struct {
    char bytes[16];
} cu_uuid;
static struct {
    void *lib;
    int (*Init)(unsigned);
    int (*DeviceGetCount)(int *);
    int (*DeviceGet)(int *, int);
    int (*DeviceGetUuid)(cu_uuid *, int);
    int (*PrimaryCtxRetain)(void **, int);
    int (*CtxSetCurrent)(void *);
    int (*MemAlloc)(cu_ptr *, size_t);
    int (*MemFree)(cu_ptr);
    int (*MemcpyHtoD)(cu_ptr, const void *, size_t);
    int (*MemcpyDtoH)(void *, cu_ptr, size_t);
    int (*EventCreate)(void **, unsigned);
    int (*EventRecord)(void *, void *);
    int (*EventSynchronize)(void *);
    int (*EventDestroy)(void *);
    int (*IpcGetEventHandle)(cu_ipc_event *, void *);
    int (*IpcOpenEventHandle)(void **, cu_ipc_event);
} cu;

static int cu_load(char *why, size_t n)
{
    cu.lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!cu.lib) {
        snprintf(why, n, "no CUDA driver (%s)", dlerror());
        return -1;
    }
#define SYM(f, name)                                        \
    if (!(*(void **)&cu.f = dlsym(cu.lib, name))) {         \
        snprintf(why, n, "the CUDA driver lacks %s", name); \
        return -1;                                          \
    }
    SYM(Init, "cuInit");
    SYM(DeviceGetCount, "cuDeviceGetCount");
    SYM(DeviceGet, "cuDeviceGet");
    if (!(*(void **)&cu.DeviceGetUuid = dlsym(cu.lib, "cuDeviceGetUuid_v2")))
        SYM(DeviceGetUuid, "cuDeviceGetUuid");
    SYM(PrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    SYM(CtxSetCurrent, "cuCtxSetCurrent");
    SYM(MemAlloc, "cuMemAlloc_v2");
    SYM(MemFree, "cuMemFree_v2");
    SYM(MemcpyHtoD, "cuMemcpyHtoD_v2");
    SYM(MemcpyDtoH, "cuMemcpyDtoH_v2");
    SYM(EventCreate, "cuEventCreate");
    SYM(EventRecord, "cuEventRecord");
    SYM(EventSynchronize, "cuEventSynchronize");
    SYM(EventDestroy, "cuEventDestroy_v2");
    SYM(IpcGetEventHandle, "cuIpcGetEventHandle");
    SYM(IpcOpenEventHandle, "cuIpcOpenEventHandle");
#undef SYM
    int r = cu.Init(0);
    if (r) {
        snprintf(why, n, "cuInit failed (error %d)", r);
        return -1;
    }
    return 0;
}

static void uuid_str(const cu_uuid *u, char out[48])
{
    const unsigned char *b = (const unsigned char *)u->bytes;
    snprintf(out, 48, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
             b[14], b[15]);
}

/* Makes current the primary context of the daemon's first CUDA device (matched by UUID,
 * since ordinals differ between processes). Writes its UUID. */
static int cu_pick_device(la_client *c, char uuid_out[48], char *why, size_t n)
{
    const char *devs = la_client_property(c, "devices");
    int count = 0;
    if (cu.DeviceGetCount(&count) || count == 0) {
        snprintf(why, n, "no CUDA device visible to this process");
        return -1;
    }
    for (int i = 0; i < count; i++) {
        int dev;
        cu_uuid u;
        char s[48];
        if (cu.DeviceGet(&dev, i) || cu.DeviceGetUuid(&u, dev))
            continue;
        uuid_str(&u, s);
        if (devs && strstr(devs, s)) {
            void *ctx;
            if (cu.PrimaryCtxRetain(&ctx, dev) || cu.CtxSetCurrent(ctx)) {
                snprintf(why, n, "cannot make a context on %s", s);
                return -1;
            }
            memcpy(uuid_out, s, 48);
            return 0;
        }
    }
    snprintf(why, n, "none of this process's GPUs is one of the daemon's (%s)",
             devs ? devs : "none");
    return -1;
}

/* Waits for a CUDA call's completion event (when the daemon sent one). */
static int wait_done_event(la_call *call)
{
    unsigned char h[64];
    if (la_call_done_event(call, h, sizeof(h)) < 0)
        return 0; /* no event: the reply itself means done */
    cu_ipc_event eh;
    memcpy(eh.reserved, h, 64);
    void *ev;
    int r = cu.IpcOpenEventHandle(&ev, eh);
    if (r) {
        fprintf(stderr, "liteattn-demo: cuIpcOpenEventHandle failed (error %d)\n", r);
        return -1;
    }
    r = cu.EventSynchronize(ev);
    cu.EventDestroy(ev);
    return r ? -1 : 0;
}

static int fail(const char *what, int rc)
{
    fprintf(stderr, "liteattn-demo: %s: %s [%s]\n", what, la_last_error_message(), la_err_name(rc));
    return 1;
}

/* ---- the generation through the daemon ------------------------------------------------- */

/* One run: the connection, the session and, per layer, one buffer of Q, K, V, O, O_dense. */
typedef struct demo {
    const sim_opts *o;
    size_t n, bytes; /* elements and bytes of one [1, S, H, D] tensor */
    la_client *c;
    la_session *s;
    int use_cuda;
    char uuid[48];
    int64_t bm, bn;
    la_buffer **buf;
    uint64_t *base_off;
    cu_ptr *dmem;
    sim_layer *ld;
    sim_row *rows;
    double *dense_t; /* dense step timings: the baseline's (sim.h) */
    int n_dense;
    void *hq, *hk, *hv, *ho, *hr; /* CUDA: host staging */
    void *ready;                  /* CUDA: interprocess event recorded after the uploads */
    unsigned char ready_h[64];
} demo;

/* auto = cuda when the daemon offers it and this process has the driver. */
static int pick_device(demo *d)
{
    const sim_opts *o = d->o;
    const char *backends = la_client_property(d->c, "backends");
    int want_cuda = !strcmp(o->device, "cuda");
    int has_cuda_backend = backends && strstr(backends, "cuda") != NULL;
    char why[256] = "";
    if (want_cuda || (!strcmp(o->device, "auto") && has_cuda_backend)) {
        if (!has_cuda_backend)
            snprintf(why, sizeof(why), "the daemon has no cuda backend (backends: %s)",
                     backends ? backends : "?");
        else if (cu_load(why, sizeof(why)) == 0 &&
                 cu_pick_device(d->c, d->uuid, why, sizeof(why)) == 0)
            d->use_cuda = 1;
        if (!d->use_cuda && want_cuda) {
            fprintf(stderr, "liteattn-demo: --device cuda: %s\n", why);
            return -1;
        }
        if (!d->use_cuda)
            fprintf(stderr, "liteattn-demo: using host buffers: %s\n", why);
    }
    if (d->use_cuda && o->dtype == LA_DTYPE_F32) {
        fprintf(stderr, "liteattn-demo: f32 is CPU-only; use --dtype bf16 or f16 on a GPU\n");
        return -1;
    }
    return 0;
}

static int open_session(demo *d)
{
    const sim_opts *o = d->o;
    la_session_config *cfg = NULL;
    int rc;
    if ((rc = la_session_config_new(&cfg)) < 0 ||
        (rc = la_session_config_set_geometry(cfg, (uint32_t)o->layers, (uint32_t)o->heads,
                                             (uint32_t)o->head_dim, o->dtype, (uint32_t)o->seq, 0,
                                             1, 1)) < 0 ||
        (rc = la_session_config_set_threshold(cfg, o->threshold)) < 0 ||
        (rc = la_session_config_set_device(cfg, d->use_cuda ? d->uuid : "cpu")) < 0) {
        la_session_config_free(cfg);
        return fail("session config", rc);
    }
    char key[64];
    snprintf(key, sizeof(key), "liteattn-demo-%ld", (long)getpid());
    rc = la_session_open(d->c, key, cfg, &d->s);
    la_session_config_free(cfg);
    if (rc < 0)
        return fail("session open", rc);
    la_session_get(d->s, "bm", &d->bm);
    la_session_get(d->s, "bn", &d->bn);
    return 0;
}

/* Per layer: its data and one buffer of 5 tensors (host shared memory or device memory). */
static int setup_buffers(demo *d)
{
    const int L = d->o->layers;
    d->buf = calloc((size_t)L, sizeof(*d->buf));
    d->base_off = calloc((size_t)L, sizeof(*d->base_off));
    d->dmem = calloc((size_t)L, sizeof(*d->dmem));
    d->ld = calloc((size_t)L, sizeof(*d->ld));
    d->rows = calloc((size_t)d->o->steps, sizeof(*d->rows));
    d->dense_t = calloc((size_t)(d->o->dense_runs + d->o->steps), sizeof(*d->dense_t));
    if (!d->buf || !d->base_off || !d->dmem || !d->ld || !d->rows || !d->dense_t) {
        fprintf(stderr, "liteattn-demo: out of memory\n");
        return 1;
    }
    for (int l = 0; l < L; l++) {
        int rc;
        if (sim_layer_init(d->o, &d->ld[l], l) < 0) {
            fprintf(stderr, "liteattn-demo: out of memory\n");
            return 1;
        }
        if (d->use_cuda) {
            int r = cu.MemAlloc(&d->dmem[l], 5 * d->bytes);
            if (r) {
                fprintf(stderr, "liteattn-demo: cuMemAlloc of %zu bytes failed (error %d)\n",
                        5 * d->bytes, r);
                return 1;
            }
            rc = la_buffer_register_cuda(d->c, (const void *)(uintptr_t)d->dmem[l], &d->buf[l],
                                         &d->base_off[l]);
        } else {
            rc = la_buffer_new_host(d->c, 5 * d->bytes, &d->buf[l]);
        }
        if (rc < 0)
            return fail("buffer", rc);
    }
    if (!d->use_cuda)
        return 0;
    d->hq = malloc(d->bytes);
    d->hk = malloc(d->bytes);
    d->hv = malloc(d->bytes);
    d->ho = malloc(d->bytes);
    d->hr = malloc(d->bytes);
    if (!d->hq || !d->hk || !d->hv || !d->ho || !d->hr) {
        fprintf(stderr, "liteattn-demo: out of memory\n");
        return 1;
    }
    cu_ipc_event eh;
    /* CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS */
    if (cu.EventCreate(&d->ready, 0x2 | 0x4) || cu.IpcGetEventHandle(&eh, d->ready)) {
        fprintf(stderr, "liteattn-demo: cannot create an interprocess CUDA event\n");
        return 1;
    }
    memcpy(d->ready_h, eh.reserved, 64);
    return 0;
}

/* Writes layer l's Q/K/V of this step where the daemon reads them. */
static int upload(demo *d, la_attn *a, int l, int step)
{
    if (!d->use_cuda) {
        uint8_t *hp = la_buffer_host_ptr(d->buf[l]);
        sim_generate(d->o, &d->ld[l], l, step, hp, hp + d->bytes, hp + 2 * d->bytes);
        return 0;
    }
    sim_generate(d->o, &d->ld[l], l, step, d->hq, d->hk, d->hv);
    cu_ptr m = d->dmem[l];
    size_t b = d->bytes;
    if (cu.MemcpyHtoD(m, d->hq, b) || cu.MemcpyHtoD(m + b, d->hk, b) ||
        cu.MemcpyHtoD(m + 2 * b, d->hv, b) || cu.EventRecord(d->ready, NULL)) {
        fprintf(stderr, "liteattn-demo: upload to the GPU failed\n");
        return -1;
    }
    la_attn_set_wait_event(a, d->ready_h, 64);
    return 0;
}

/* Runs a and waits for it (on the GPU: for its completion event). */
static int run_call(demo *d, la_attn *a, int64_t *ret_computed, int64_t *ret_total)
{
    la_call *call;
    int rc = la_attn_run(d->s, a, &call);
    if (rc == 0 && d->use_cuda && wait_done_event(call) < 0)
        rc = LA_EDEVICE;
    if (rc < 0)
        return rc;
    if (ret_computed)
        la_call_stat(call, "tiles_computed", ret_computed);
    if (ret_total)
        la_call_stat(call, "tiles_total", ret_total);
    la_call_free(call);
    return 0;
}

/* Adds layer l's error of O against O_dense. */
static int layer_error(demo *d, int l, double *num, double *den)
{
    size_t b = d->bytes;
    if (!d->use_cuda) {
        uint8_t *hp = la_buffer_host_ptr(d->buf[l]);
        sim_err_acc(hp + 3 * b, hp + 4 * b, d->n, d->o->dtype, num, den);
        return 0;
    }
    if (cu.MemcpyDtoH(d->ho, d->dmem[l] + 3 * b, b) ||
        cu.MemcpyDtoH(d->hr, d->dmem[l] + 4 * b, b)) {
        fprintf(stderr, "liteattn-demo: download from the GPU failed\n");
        return -1;
    }
    sim_err_acc(d->ho, d->hr, d->n, d->o->dtype, num, den);
    return 0;
}

/* Layer l's call at step in mode: Q, K, V, then O in slot o_slot (3: O, 4: O_dense) of the
 * layer's five tensors. */
static void set_call(demo *d, la_attn *a, int l, int step, la_mode mode, int o_slot)
{
    const sim_opts *o = d->o;
    int64_t shape[4] = {1, o->seq, o->heads, o->head_dim};
    uint64_t b0 = d->base_off[l], b = d->bytes;
    la_attn_set_tensor(a, LA_TENSOR_Q, d->buf[l], b0, o->dtype, 4, shape, NULL);
    la_attn_set_tensor(a, LA_TENSOR_K, d->buf[l], b0 + b, o->dtype, 4, shape, NULL);
    la_attn_set_tensor(a, LA_TENSOR_V, d->buf[l], b0 + 2 * b, o->dtype, 4, shape, NULL);
    la_attn_set_tensor(a, LA_TENSOR_O, d->buf[l], b0 + (uint64_t)o_slot * b, o->dtype, 4, shape,
                       NULL);
    la_attn_set_position(a, (uint32_t)l, (uint32_t)step, 0);
    la_attn_set_mode(a, mode);
}

/* Layer l's dense call into O_dense (the inputs already uploaded), timed into *ret_s. */
static int dense_call(demo *d, la_attn *a, int l, int step, double *ret_s)
{
    set_call(d, a, l, step, LA_MODE_DENSE, 4);
    double t0 = sim_now_s();
    int rc = run_call(d, a, NULL, NULL);
    *ret_s += sim_now_s() - t0;
    return rc < 0 ? fail("dense attention", rc) : 0;
}

/* The baseline before the generation (sim.h): step 0's inputs in every layer (generating step
 * 0 again later gives the same data), one untimed dense pass, then o->dense_runs timed ones. */
static int dense_baseline(demo *d, la_attn *a)
{
    for (int l = 0; l < d->o->layers; l++)
        if (upload(d, a, l, 0) < 0)
            return 1;
    for (int run = -1; run < d->o->dense_runs; run++) {
        double t = 0;
        for (int l = 0; l < d->o->layers; l++)
            if (dense_call(d, a, l, 0, &t) != 0)
                return 1;
        if (run >= 0)
            d->dense_t[d->n_dense++] = t;
    }
    sim_baseline b = sim_baseline_of(d->dense_t, d->n_dense);
    sim_print_baseline(" before the generation", &b);
    sim_print_columns();
    return 0;
}

/* One denoising step over every layer: the call, then the same inputs in mode dense. */
static int run_step(demo *d, la_attn *a, int step)
{
    double attn = 0, num = 0, den = 0, dense = 0;
    int64_t computed = 0, total = 0;
    for (int l = 0; l < d->o->layers; l++) {
        set_call(d, a, l, step, LA_MODE_SESSION, 3);
        if (upload(d, a, l, step) < 0)
            return 1;
        int64_t tc = 0, tt = 0;
        double t0 = sim_now_s();
        int rc = run_call(d, a, &tc, &tt);
        attn += sim_now_s() - t0;
        if (rc < 0)
            return fail("attention", rc);
        computed += tc;
        total += tt;
        /* Dense reference: same session, same inputs, mode dense (masks untouched); timed,
         * it is also a sample of the baseline. */
        if (dense_call(d, a, l, step, &dense) != 0 || layer_error(d, l, &num, &den) < 0)
            return 1;
    }
    d->rows[step] = (sim_row){total ? (double)computed / (double)total : 1.0, attn,
                              den > 0 ? sqrt(num / den) : 0, dense};
    d->dense_t[d->n_dense++] = dense;
    sim_baseline base = sim_baseline_of(d->dense_t, d->n_dense);
    sim_print_row(step, &d->rows[step], base.median_s);
    return 0;
}

static void demo_free(demo *d)
{
    la_session_close(d->s);
    for (int l = 0; d->buf && l < d->o->layers; l++) {
        la_buffer_unregister(d->buf[l]);
        if (d->use_cuda && d->dmem[l])
            cu.MemFree(d->dmem[l]);
        if (d->ld)
            sim_layer_free(&d->ld[l]);
    }
    if (d->ready)
        cu.EventDestroy(d->ready);
    la_disconnect(d->c);
    free(d->buf);
    free(d->base_off);
    free(d->dmem);
    free(d->ld);
    free(d->rows);
    free(d->dense_t);
    free(d->hq);
    free(d->hk);
    free(d->hv);
    free(d->ho);
    free(d->hr);
}

static int run_daemon(const sim_opts *o)
{
    demo d = {.o = o};
    d.n = (size_t)o->seq * o->heads * o->head_dim;
    d.bytes = d.n * la_dtype_size(o->dtype);
    int rc = la_connect(o->socket, "liteattn-demo", &d.c);
    if (rc == LA_ECONN) {
        fprintf(stderr, "liteattn-demo: %s: is liteattnd running? (or run bench_direct)\n",
                la_last_error_message());
        return 1;
    }
    if (rc < 0)
        return fail("connect", rc);
    int ret = 1;
    la_attn *a = NULL;
    if (pick_device(&d) < 0 || open_session(&d) != 0 || setup_buffers(&d) != 0)
        goto out;
    char path[160];
    snprintf(path, sizeof(path), "through liteattnd (%s, tiles %lldx%lld)",
             d.use_cuda ? d.uuid : "cpu, shared memory", (long long)d.bm, (long long)d.bn);
    sim_print_header(o, path);
    if ((rc = la_attn_new(&a)) < 0) {
        fail("attn", rc);
        goto out;
    }
    double t_start = sim_now_s();
    if (dense_baseline(&d, a) != 0)
        goto out;
    for (int step = 0; step < o->steps; step++)
        if (run_step(&d, a, step) != 0)
            goto out;
    sim_baseline base = sim_baseline_of(d.dense_t, d.n_dense);
    sim_print_summary(o, d.rows, &base, sim_now_s() - t_start);
    ret = 0;
out:
    la_attn_free(a);
    demo_free(&d);
    return ret;
}

int main(int argc, char **argv)
{
    sim_opts o;
    int rc = sim_parse_args(&o, argc, argv, SIM_DEMO);
    if (rc != 0)
        return rc > 0 ? 0 : 2;
    return run_daemon(&o);
}
