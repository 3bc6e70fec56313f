/*
 * make_corpus.c — writes the seed corpora of the fuzz targets (make fuzz-corpus):
 *   <dir>/dispatch/NN-<name>: flags byte + [le16 len][Request] records (fuzz_dispatch.c)
 *   <dir>/frame/NN-<name>:    4 settings bytes + a stream of length-prefixed frames
 *                             (fuzz_frame.c)
 * One seed per request type, one valid generation (hello, session, buffer, attention calls,
 * info, mask read, list, stats, reset, unregister, close) and a few malformed ones.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "liteattn.h"
#include "liteattn.pb-c.h"

typedef struct {
    uint8_t b[65536];
    size_t n;
} blob;

static void put(blob *o, const void *p, size_t n)
{
    if (o->n + n > sizeof o->b) {
        fprintf(stderr, "make_corpus: seed too large\n");
        exit(1);
    }
    memcpy(o->b + o->n, p, n);
    o->n += n;
}

/* A record of the dispatch format ([le16 len][bytes]) and a frame ([le32 len][bytes]). */
static void add(blob *rec, blob *frm, Liteattn__Request *r)
{
    uint8_t tmp[8192];
    size_t n = liteattn__request__get_packed_size(r);
    if (n > sizeof tmp)
        exit(1);
    liteattn__request__pack(r, tmp);
    uint8_t h2[2] = {(uint8_t)n, (uint8_t)(n >> 8)};
    uint8_t h4[4] = {(uint8_t)n, (uint8_t)(n >> 8), 0, 0};
    put(rec, h2, 2);
    put(rec, tmp, n);
    put(frm, h4, 4);
    put(frm, tmp, n);
}

static const char *root;
static int seq;

static void save(const char *target, const char *name, const blob *b)
{
    char p[512];
    snprintf(p, sizeof p, "%s/%s", root, target);
    mkdir(root, 0755);
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/%s/%02d-%s", root, target, seq, name);
    FILE *f = fopen(p, "wb");
    if (!f || fwrite(b->b, 1, b->n, f) != b->n || fclose(f) != 0) {
        fprintf(stderr, "make_corpus: %s: %s\n", p, strerror(errno));
        exit(1);
    }
}

/* Saves one scenario under both targets. */
static void emit(const char *name, uint8_t flags, uint8_t frame_settings3, Liteattn__Request **rs,
                 size_t n)
{
    static blob rec, frm;
    rec.n = frm.n = 0;
    put(&rec, &flags, 1);
    uint8_t hdr[4] = {0xff, 0x03, (uint8_t)(seq * 37 + 1), frame_settings3}; /* 64 KiB frames */
    put(&frm, hdr, 4);
    for (size_t i = 0; i < n; i++)
        add(&rec, &frm, rs[i]);
    save("dispatch", name, &rec);
    save("frame", name, &frm);
    seq++;
}

#define REQ(var, idv, cas, field, val)               \
    Liteattn__Request var = LITEATTN__REQUEST__INIT; \
    var.id = (idv);                                  \
    var.body_case = LITEATTN__REQUEST__BODY_##cas;   \
    var.field = (val)

static Liteattn__TensorRef tensor(uint64_t buf, uint64_t off, int64_t *shape, size_t nd,
                                  Liteattn__DType dt)
{
    Liteattn__TensorRef t = LITEATTN__TENSOR_REF__INIT;
    t.buffer_id = buf;
    t.has_offset = 1, t.offset = off;
    t.has_dtype = 1, t.dtype = dt;
    t.n_shape = nd;
    t.shape = shape;
    return t;
}

int main(int argc, char **argv)
{
    root = argc > 1 ? argv[1] : "fuzz/corpus";

    Liteattn__Hello hello = LITEATTN__HELLO__INIT;
    hello.major = LA_PROTOCOL_MAJOR, hello.minor = LA_PROTOCOL_MINOR, hello.client_name = "seed";
    Liteattn__Hello bad_hello = LITEATTN__HELLO__INIT;
    bad_hello.major = 7;

    Liteattn__SessionOpen so = LITEATTN__SESSION_OPEN__INIT;
    so.key = "gen";
    so.layers = 2, so.heads = 2, so.head_dim = 64, so.dtype = LITEATTN__DTYPE__DTYPE_F32;
    so.max_seq_q = 64, so.has_max_seq_k = 1, so.max_seq_k = 64;
    so.has_threshold = 1, so.threshold = -3;
    float sched[3] = {-10, -5, -3};
    so.n_schedule = 3, so.schedule = sched;
    Liteattn__SessionOpen so_big = so;
    so_big.key = "big", so_big.max_seq_q = 1u << 30, so_big.has_max_seq_k = 0;
    so_big.n_schedule = 0;

    Liteattn__SessionAttach sa = LITEATTN__SESSION_ATTACH__INIT;
    sa.key = "gen";
    Liteattn__SessionRef sref = LITEATTN__SESSION_REF__INIT;
    sref.session_id = 1;
    Liteattn__SessionList sl = LITEATTN__SESSION_LIST__INIT;
    Liteattn__MaskRead mr = LITEATTN__MASK_READ__INIT;
    mr.session_id = 1, mr.layer = 1, mr.has_length = 1, mr.length = 64;
    Liteattn__BufferRegister br = LITEATTN__BUFFER_REGISTER__INIT;
    br.kind = LITEATTN__BUFFER_KIND__BUFFER_SHM, br.size = 65536;
    Liteattn__BufferRegister br_ipc = LITEATTN__BUFFER_REGISTER__INIT;
    uint8_t handle[64] = {1, 2, 3};
    br_ipc.kind = LITEATTN__BUFFER_KIND__BUFFER_CUDA_IPC, br_ipc.size = 1 << 20;
    br_ipc.has_ipc_handle = 1, br_ipc.ipc_handle.data = handle, br_ipc.ipc_handle.len = 64;
    br_ipc.device_uuid = "GPU-00000000-0000-0000-0000-000000000000";
    Liteattn__BufferUnregister bu = LITEATTN__BUFFER_UNREGISTER__INIT;
    bu.buffer_id = 1;
    Liteattn__Stats st = LITEATTN__STATS__INIT;
    Liteattn__Ping ping = LITEATTN__PING__INIT;
    ping.has_payload = 1, ping.payload = 42;

    /* Attention: B1 Sq32 Sk32 H2 D64 f32 in buffer 1: q, k, v, o at 0, 16K, 32K, 48K. */
    int64_t shp[4] = {1, 32, 2, 64}, lshp[3] = {1, 2, 32};
    Liteattn__TensorRef tq = tensor(1, 0, shp, 4, LITEATTN__DTYPE__DTYPE_F32);
    Liteattn__TensorRef tk = tensor(1, 16384, shp, 4, LITEATTN__DTYPE__DTYPE_F32);
    Liteattn__TensorRef tv = tensor(1, 32768, shp, 4, LITEATTN__DTYPE__DTYPE_F32);
    Liteattn__TensorRef to = tensor(1, 49152, shp, 4, LITEATTN__DTYPE__DTYPE_F32);
    Liteattn__TensorRef tl = tensor(2, 0, lshp, 3, LITEATTN__DTYPE__DTYPE_F32);
    Liteattn__TensorRef tdec = tensor(2, 4096, NULL, 0, LITEATTN__DTYPE__DTYPE_U32);
    Liteattn__Range rng = LITEATTN__RANGE__INIT, *rngs[1] = {&rng};
    rng.start = 0, rng.end = 8;
    Liteattn__Attention at = LITEATTN__ATTENTION__INIT;
    at.session_id = 1, at.layer = 0, at.step = 0;
    at.q = &tq, at.k = &tk, at.v = &tv, at.o = &to;
    at.n_must_do = 1, at.must_do = rngs;
    Liteattn__Attention at1 = at;
    at1.step = 1, at1.lse = &tl, at1.has_mode = 1, at1.mode = LITEATTN__MODE__MODE_OBSERVE;
    Liteattn__Attention at_dry = at;
    at_dry.step = 2, at_dry.has_dry_run = 1, at_dry.dry_run = 1, at_dry.decisions = &tdec;
    Liteattn__TensorRef to_bad = tensor(1, 60000, shp, 4, LITEATTN__DTYPE__DTYPE_F32);
    Liteattn__Attention at_bad = at;
    at_bad.o = &to_bad;
    int64_t strides[4] = {0, 0, 64, 1};
    Liteattn__TensorRef tq_str = tq;
    tq_str.n_strides = 4, tq_str.strides = strides;
    Liteattn__Attention at_str = at;
    at_str.q = &tq_str;
    Liteattn__Attention at_wait = at;
    at_wait.has_wait_event = 1, at_wait.wait_event.data = handle, at_wait.wait_event.len = 64;
    at_wait.has_scale = 1, at_wait.scale = 0.125f;
    at_wait.has_threshold = 1, at_wait.threshold = -1;

    REQ(r_hello, 1, HELLO, hello, &hello);
    REQ(r_badhello, 1, HELLO, hello, &bad_hello);
    REQ(r_open, 2, SESSION_OPEN, session_open, &so);
    REQ(r_openbig, 3, SESSION_OPEN, session_open, &so_big);
    REQ(r_attach, 4, SESSION_ATTACH, session_attach, &sa);
    REQ(r_reset, 5, SESSION_RESET, session_reset, &sref);
    REQ(r_close, 6, SESSION_CLOSE, session_close, &sref);
    REQ(r_info, 7, SESSION_INFO, session_info, &sref);
    REQ(r_list, 8, SESSION_LIST, session_list, &sl);
    REQ(r_mask, 9, MASK_READ, mask_read, &mr);
    REQ(r_reg, 10, BUFFER_REGISTER, buffer_register, &br);
    REQ(r_reg2, 11, BUFFER_REGISTER, buffer_register, &br);
    REQ(r_ipc, 12, BUFFER_REGISTER, buffer_register, &br_ipc);
    REQ(r_unreg, 13, BUFFER_UNREGISTER, buffer_unregister, &bu);
    REQ(r_attn, 14, ATTENTION, attention, &at);
    REQ(r_attn1, 15, ATTENTION, attention, &at1);
    REQ(r_dry, 16, ATTENTION, attention, &at_dry);
    REQ(r_bad, 17, ATTENTION, attention, &at_bad);
    REQ(r_str, 18, ATTENTION, attention, &at_str);
    REQ(r_wait, 19, ATTENTION, attention, &at_wait);
    /* The fast path: a doorbell of 8 slots; calls on slot 1 at value 0 (rung: the harness's
     * memfd is zeros), slot 2 at value 5 (not rung), slot 9 (no such slot). */
    Liteattn__DoorbellRegister dbr = LITEATTN__DOORBELL_REGISTER__INIT;
    dbr.slots = 8;
    Liteattn__Attention at_db = at, at_db_unrung = at, at_db_bad = at;
    at_db.has_doorbell_slot = at_db.has_doorbell_value = 1;
    at_db.doorbell_slot = 1, at_db.doorbell_value = 0;
    at_db_unrung.has_doorbell_slot = at_db_unrung.has_doorbell_value = 1;
    at_db_unrung.doorbell_slot = 2, at_db_unrung.doorbell_value = 5;
    at_db_bad.has_doorbell_slot = at_db_bad.has_doorbell_value = 1;
    at_db_bad.doorbell_slot = 9, at_db_bad.doorbell_value = 1;
    REQ(r_db, 24, DOORBELL_REGISTER, doorbell_register, &dbr);
    REQ(r_attn_db, 25, ATTENTION, attention, &at_db);
    REQ(r_attn_unrung, 26, ATTENTION, attention, &at_db_unrung);
    REQ(r_attn_dbbad, 27, ATTENTION, attention, &at_db_bad);
    REQ(r_stats, 20, STATS, stats, &st);
    REQ(r_ping, 21, PING, ping, &ping);

    /* flags: bit 0 = the harness sends Hello first. */
    Liteattn__Request *gen[] = {&r_open, &r_reg,  &r_reg2,  &r_attn,  &r_attn1, &r_dry,   &r_info,
                                &r_mask, &r_list, &r_stats, &r_reset, &r_attn,  &r_unreg, &r_close};
    emit("generation", 1, 0, gen, sizeof gen / sizeof gen[0]);
    Liteattn__Request *gen_fds[] = {&r_hello, &r_open, &r_reg, &r_reg2, &r_attn, &r_wait};
    emit("hello-and-calls", 0, 3, gen_fds, sizeof gen_fds / sizeof gen_fds[0]);
    Liteattn__Request *pipelined[] = {&r_open, &r_reg,   &r_attn, &r_attn1,
                                      &r_attn, &r_attn1, &r_attn, &r_attn1};
    emit("pipelined-close-in-flight", 1 | 8, 8, pipelined, 8);
    Liteattn__Request *bad[] = {&r_open,    &r_reg, &r_bad,    &r_str,
                                &r_openbig, &r_ipc, &r_attach, &r_hello};
    emit("invalid-calls", 1, 0, bad, sizeof bad / sizeof bad[0]);
    Liteattn__Request *other_uid[] = {&r_info, &r_mask, &r_reset, &r_close, &r_list};
    emit("other-uid", 1 | 2, 0, other_uid, 5);
    Liteattn__Request *before_hello[] = {&r_ping};
    emit("before-hello", 0, 0, before_hello, 1);
    Liteattn__Request *wrong_version[] = {&r_badhello};
    emit("wrong-version", 0, 0, wrong_version, 1);
    Liteattn__Request *each[] = {&r_hello, &r_open,  &r_openbig, &r_attach, &r_reset,
                                 &r_close, &r_info,  &r_list,    &r_mask,   &r_reg,
                                 &r_ipc,   &r_unreg, &r_attn,    &r_stats,  &r_ping};
    const char *names[] = {"hello",
                           "session-open",
                           "session-open-big",
                           "session-attach",
                           "session-reset",
                           "session-close",
                           "session-info",
                           "session-list",
                           "mask-read",
                           "buffer-register",
                           "buffer-register-ipc",
                           "buffer-unregister",
                           "attention-alone",
                           "stats",
                           "ping"};
    for (size_t i = 0; i < sizeof each / sizeof each[0]; i++)
        emit(names[i], 1, 0, &each[i], 1);
    /* The raw stream through conn.c's own framing (flags bit 4), with a memfd (bit 5). */
    {
        static blob raw;
        raw.n = 0;
        uint8_t fl = 1 | 16 | 32;
        put(&raw, &fl, 1);
        Liteattn__Request *raw_rs[] = {&r_open, &r_reg, &r_attn, &r_ping};
        blob dummy;
        for (size_t i = 0; i < 4; i++) {
            dummy.n = 0;
            static blob frm;
            frm.n = 0;
            add(&dummy, &frm, raw_rs[i]);
            put(&raw, frm.b, frm.n);
        }
        uint8_t oversized[8] = {0xff, 0xff, 0xff, 0x00, 1, 2, 3, 4};
        put(&raw, oversized, sizeof oversized);
        save("dispatch", "raw-stream", &raw);
        seq++;
    }
    /* VMM registrations (after the others, so that their numbers stay): a first frame with
     * three allocations, an append, and an append to a buffer that is not VMM. */
    {
        uint64_t sizes[3] = {2u << 20, 2u << 20, 2u << 20};
        Liteattn__BufferRegister vm = LITEATTN__BUFFER_REGISTER__INIT;
        vm.kind = LITEATTN__BUFFER_KIND__BUFFER_VMM, vm.size = 5u << 20;
        vm.device_uuid = "GPU-00000000-0000-0000-0000-000000000000";
        vm.n_vmm_alloc_sizes = 3, vm.vmm_alloc_sizes = sizes;
        vm.has_vmm_offset = 1, vm.vmm_offset = 4096;
        vm.has_access = 1, vm.access = 1;
        Liteattn__BufferRegister va = LITEATTN__BUFFER_REGISTER__INIT;
        va.kind = LITEATTN__BUFFER_KIND__BUFFER_VMM, va.size = 2u << 20;
        va.has_vmm_append = 1, va.vmm_append = 1;
        REQ(r_vmm, 22, BUFFER_REGISTER, buffer_register, &vm);
        REQ(r_vapp, 23, BUFFER_REGISTER, buffer_register, &va);
        Liteattn__Request *vmm[] = {&r_vmm, &r_vapp, &r_reg, &r_vapp, &r_ping};
        emit("buffer-register-vmm", 1, 0, vmm, sizeof vmm / sizeof vmm[0]);
    }
    /* The fast path (issue 10), last so that the earlier seeds keep their numbers. */
    Liteattn__Request *fast[] = {&r_open,    &r_reg,         &r_attn_db, &r_db,
                                 &r_attn_db, &r_attn_unrung, &r_attn_dbbad, &r_db,
                                 &r_attn_db, &r_attn_db};
    emit("doorbell", 1, 0, fast, sizeof fast / sizeof fast[0]);
    emit("doorbell-close-in-flight", 1 | 8, 8, fast, sizeof fast / sizeof fast[0]);
    /* A warm-started session with the guardrail, the store listed and dropped. */
    {
        Liteattn__WarmStart ws = LITEATTN__WARM_START__INIT;
        ws.has_step = 1, ws.step = 1, ws.has_margin = 1, ws.margin = 2;
        ws.has_dense_steps = 1, ws.dense_steps = 0;
        Liteattn__Guard gd = LITEATTN__GUARD__INIT;
        gd.has_every = 1, gd.every = 1, gd.has_sample = 1, gd.sample = 2;
        gd.has_budget = 1, gd.budget = 0.01f;
        Liteattn__SessionOpen sow = so;
        sow.warm_key = "model 64 tokens 3 steps", sow.warm = &ws, sow.guard = &gd;
        Liteattn__SessionOpen sow2 = sow;
        sow2.key = "gen2";
        Liteattn__WarmList wl = LITEATTN__WARM_LIST__INIT;
        Liteattn__WarmDrop wd = LITEATTN__WARM_DROP__INIT;
        wd.key = "model 64 tokens 3 steps";
        Liteattn__WarmDrop wd_all = LITEATTN__WARM_DROP__INIT;
        REQ(r_openw, 30, SESSION_OPEN, session_open, &sow);
        REQ(r_openw2, 31, SESSION_OPEN, session_open, &sow2);
        REQ(r_wlist, 32, WARM_LIST, warm_list, &wl);
        REQ(r_wdrop, 33, WARM_DROP, warm_drop, &wd);
        REQ(r_wdrop_all, 34, WARM_DROP, warm_drop, &wd_all);
        Liteattn__Request *warm[] = {&r_openw, &r_reg,  &r_attn,  &r_attn1, &r_info,
                                     &r_list,  &r_wlist, &r_openw2, &r_wdrop, &r_wdrop_all,
                                     &r_close, &r_wlist};
        emit("warm-and-guard", 1, 0, warm, sizeof warm / sizeof warm[0]);
    }
    printf("make_corpus: %d seeds under %s\n", seq, root);
    return 0;
}
