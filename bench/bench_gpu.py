#!/usr/bin/env python3
"""bench_gpu.py — the CUDA kernels of kernels/ (issue 4) against PyTorch SDPA, in one process.

Loads build/libla_kernels.so through ctypes (la_attn_fwd_cuda_variant, la_cuda_tile_sizes) and,
with torch bf16 tensors in the [B, S, H, D] layout:
  1. correctness on small shapes against torch SDPA on float32 upcasts (O and LSE);
  2. dense timings: our kernel with skipping compiled out, the skipping build in mode DENSE, in
     mode SKIP at tau=-inf (nothing skipped, mask written), and torch SDPA cuDNN and flash;
  3. fixed random masks with 75/50/25/10% live tiles (mode SKIP, tau=-inf keeps them fixed):
     time against the live fraction, as a ratio to our dense time;
  4. a 20-step drifting run at tau=-3 on peaked, slowly drifting data: live fraction, time per
     step, relative L2 error against dense SDPA.
Prints a short table last; writes everything to $OUT/bench_gpu.json when OUT is set.

Usage: bench_gpu.py [--lib build/libla_kernels.so] [--quick]
"""
import argparse
import ctypes as C
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# ---- the one mirror of kernels/la_attn.h (la_attn_params) and liteattn.h enums -------------
LA_DTYPE_F16, LA_DTYPE_BF16 = 1, 2
LA_MODE_DENSE, LA_MODE_OBSERVE, LA_MODE_SKIP = 1, 2, 3
LA_DIR_ALTERNATE, LA_DIR_ASCENDING, LA_DIR_DESCENDING = 0, 1, 2
VARIANT_AUTO, VARIANT_SKIP, VARIANT_DENSE_ONLY = 0, 1, 2
VARIANT_PORTABLE = 4  # OR-ed: the portable (sm80) family, as on compute capability 8.0
VARIANT_ONE_CTA = 8   # OR-ed: the Hopper family with one CTA per q-tile, not its persistent grid


class LaAttnParams(C.Structure):
    _fields_ = [
        ("q", C.c_void_p), ("k", C.c_void_p), ("v", C.c_void_p), ("o", C.c_void_p),
        ("q_stride", C.c_int64 * 4), ("k_stride", C.c_int64 * 4),
        ("v_stride", C.c_int64 * 4), ("o_stride", C.c_int64 * 4),
        ("lse", C.c_void_p), ("lse_stride", C.c_int64 * 3),
        ("row_max", C.c_void_p), ("row_max_stride", C.c_int64 * 3),
        ("B", C.c_int32), ("Sq", C.c_int32), ("Sk", C.c_int32), ("H", C.c_int32), ("D", C.c_int32),
        ("dtype", C.c_int),
        ("scale", C.c_float), ("tau", C.c_float), ("mode", C.c_int), ("step", C.c_int32),
        ("direction", C.c_int),
        ("must_do", C.c_void_p), ("n_must_do", C.c_int32),
        ("must_skip", C.c_void_p), ("n_must_skip", C.c_int32),
        ("mask", C.c_void_p), ("mask_stride", C.c_int64 * 3), ("decisions", C.c_void_p),
        ("BM", C.c_int32), ("BN", C.c_int32), ("threads", C.c_int32),
        ("ret_tiles_computed", C.c_void_p),
    ]


# sizeof / offsetof on x86-64 (gcc), checked once here so that a change of la_attn.h is caught.
assert C.sizeof(LaAttnParams) == 368, C.sizeof(LaAttnParams)
assert LaAttnParams.B.offset == 224 and LaAttnParams.must_do.offset == 272
assert LaAttnParams.mask.offset == 304 and LaAttnParams.ret_tiles_computed.offset == 360


class Kernels:
    def __init__(self, path):
        self.lib = C.CDLL(path)
        self.lib.la_attn_fwd_cuda_variant.argtypes = [C.POINTER(LaAttnParams), C.c_int, C.c_void_p]
        self.lib.la_attn_fwd_cuda_variant.restype = C.c_int
        self.lib.la_cuda_tile_sizes.argtypes = [C.c_int, C.c_int, C.c_int,
                                                C.POINTER(C.c_int32), C.POINTER(C.c_int32)]
        self.lib.la_cuda_tile_sizes.restype = C.c_int
        self.lib.la_cuda_variant_name.argtypes = [C.c_int, C.c_int, C.c_int]
        self.lib.la_cuda_variant_name.restype = C.c_char_p
        maj, mino = torch.cuda.get_device_capability()
        self.cc = 10 * maj + mino

    def tiles(self, D, dtype, cc=None):
        bm, bn = C.c_int32(), C.c_int32()
        rc = self.lib.la_cuda_tile_sizes(D, dtype, cc or self.cc, C.byref(bm), C.byref(bn))
        assert rc == 0, rc
        return bm.value, bn.value

    def name(self, D, dtype, cc=None):
        return self.lib.la_cuda_variant_name(D, dtype, cc or self.cc).decode()


def la_dtype(t):
    return {torch.bfloat16: LA_DTYPE_BF16, torch.float16: LA_DTYPE_F16}[t]


class Call:
    """One attention problem: q, k, v, o [B, S, H, D] (any strides, d contiguous), lse, mask."""

    def __init__(self, K, q, k, v, lse=True, portable=False):
        self.K = K
        self.flag = VARIANT_PORTABLE if portable else 0
        B, Sq, H, D = q.shape
        Sk = k.shape[1]
        self.q, self.k, self.v = q, k, v
        self.o = torch.empty_like(q)
        self.lse = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32) if lse else None
        self.BM, self.BN = K.tiles(D, la_dtype(q.dtype), 80 if portable else None)
        self.kernel = K.name(D, la_dtype(q.dtype), 80 if portable else None)
        self.nQ, self.nK = -(-Sq // self.BM), -(-Sk // self.BN)
        self.W = -(-self.nK // 32)
        self.mask = torch.empty(B, H, self.nQ, self.W, device=q.device, dtype=torch.int32)
        self.set_mask_ones()
        self.counter = torch.zeros(1, device=q.device, dtype=torch.int64)
        # carried row maxima (SKIP-SEMANTICS "Carried row maxima"), used by run(row_max=True)
        self.rmax = torch.full((B, H, Sq), -math.inf, device=q.device, dtype=torch.float32)
        p = LaAttnParams()
        p.q, p.k, p.v, p.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), self.o.data_ptr()
        for name, t in (("q_stride", q), ("k_stride", k), ("v_stride", v), ("o_stride", self.o)):
            getattr(p, name)[:] = list(t.stride())
        if lse:
            p.lse = self.lse.data_ptr()
            p.lse_stride[:] = list(self.lse.stride())
        p.B, p.Sq, p.Sk, p.H, p.D = B, Sq, Sk, H, D
        p.dtype = la_dtype(q.dtype)
        p.scale = 1.0 / math.sqrt(D)
        p.tau = -math.inf
        p.mode = LA_MODE_DENSE
        p.direction = LA_DIR_ALTERNATE
        p.mask = self.mask.data_ptr()
        p.mask_stride[:] = list(self.mask.stride()[:3])
        p.BM, p.BN = self.BM, self.BN
        p.ret_tiles_computed = self.counter.data_ptr()
        self.p = p
        self.total_tiles = B * H * self.nQ * self.nK

    def set_mask_ones(self):
        self.set_mask_bits(torch.ones(*self.mask.shape[:3], self.nK, dtype=torch.bool,
                                      device=self.mask.device))

    def set_mask_bits(self, bits):
        """bits: bool [B, H, nQ, nK] -> packed words."""
        B, H, nQ, nK = bits.shape
        pad = self.W * 32 - nK
        b = F.pad(bits.to(torch.int64), (0, pad)).view(B, H, nQ, self.W, 32)
        w = (b << torch.arange(32, device=bits.device, dtype=torch.int64)).sum(-1)
        w = torch.where(w >= 2**31, w - 2**32, w)
        self.mask.copy_(w.to(torch.int32))

    def run(self, mode=LA_MODE_DENSE, tau=-math.inf, step=0, variant=VARIANT_AUTO, row_max=False):
        self.p.mode, self.p.tau, self.p.step = mode, tau, step
        if row_max:   # read and written in place: the votes start from these maxima
            self.p.row_max = self.rmax.data_ptr()
            self.p.row_max_stride[:] = list(self.rmax.stride())
        else:
            self.p.row_max = None
        rc = self.K.lib.la_attn_fwd_cuda_variant(C.byref(self.p), variant | self.flag,
                                                 C.c_void_p(torch.cuda.current_stream().cuda_stream))
        if rc != 0:
            raise RuntimeError(f"la_attn_fwd_cuda_variant: cudaError {rc}")
        return self.o


def load_fa3():
    """FlashAttention-3 and the reference LiteAttention kernel from a build of the public
    LiteAttention code (its hopper/ folder, installed with pip --target FA3_PATH; never part of
    this repository). Returns {name: fn(q, k, v)}, empty when FA3_PATH is unset or fails."""
    path = os.environ.get("FA3_PATH")
    if not path:
        return {}
    sys.path.insert(0, path)
    try:
        from lite_attention import LiteAttention  # noqa: E402
        from lite_attention._internal.flash_attn_interface import flash_attn_func  # noqa: E402
    except Exception as e:  # noqa: BLE001
        print(f"  FA3 not loaded from {path}: {e}")
        return {}

    def fa3(q, k, v):
        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    ref = LiteAttention(enable_skipping=True, threshold=-1000.0)
    return {"fa3": fa3, "ref_liteattn_skip_-1000": lambda q, k, v: ref(q, k, v)}


def sdpa(q, k, v, backend):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2)).transpose(1, 2)


def time_ms(fn, reps=10, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts), ts


def time_interleaved(fns, reps=10, warmup=2):
    """Median ms per name; each round times every function once, in an order shuffled per
    round (seeded). On the H200 a kernel runs up to 15% faster right after a long, cooler one
    (our dense kernel: 30.6 ms after torch flash, 34.5-35.9 ms alternating with our own sparse
    runs, 2026-12-01): with a fixed order every name always had the same predecessor."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    ts = {n: [] for n in fns}
    order = random.Random(12345)
    for _ in range(reps):
        names = list(fns)
        order.shuffle(names)
        for n in names:
            fn = fns[n]
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts[n].append(a.elapsed_time(b))
    return {n: statistics.median(v) for n, v in ts.items()}


def rel_l2(x, ref):
    x, ref = x.float(), ref.float()
    return ((x - ref).norm() / ref.norm()).item()


def tflops(B, H, Sq, Sk, D, ms):
    return 4.0 * B * H * Sq * Sk * D / (ms * 1e-3) / 1e12


# ---- 1. correctness --------------------------------------------------------------------------
def check_correctness(K, res):
    torch.manual_seed(int(time.time()))
    rows = []
    for (B, Sq, Sk, H, D, dt) in [(2, 1000, 777, 4, 128, torch.bfloat16), (2, 1000, 777, 4, 64, torch.bfloat16),
                                  (1, 555, 1203, 3, 128, torch.float16), (1, 555, 1203, 3, 64, torch.float16)]:
        q = torch.randn(B, Sq, H, D, device="cuda", dtype=dt)
        k = torch.randn(B, Sk, H, D, device="cuda", dtype=dt)
        v = torch.randn(B, Sk, H, D, device="cuda", dtype=dt)
        ref = sdpa(q.float(), k.float(), v.float(), SDPBackend.MATH)
        s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(D)
        lse_ref = torch.logsumexp(s, dim=-1)
        errs = {}
        for name, mode, var, call in (
                ("dense_only", LA_MODE_DENSE, VARIANT_DENSE_ONLY, Call(K, q, k, v)),
                ("skip_build_dense", LA_MODE_DENSE, VARIANT_SKIP, Call(K, q, k, v)),
                ("skip_tau_-inf", LA_MODE_SKIP, VARIANT_AUTO, Call(K, q, k, v)),
                ("portable_dense", LA_MODE_DENSE, VARIANT_DENSE_ONLY, Call(K, q, k, v, portable=True)),
                ("portable_skip", LA_MODE_SKIP, VARIANT_AUTO, Call(K, q, k, v, portable=True))):
            call.o.fill_(float("nan"))
            call.lse.fill_(float("nan"))
            call.run(mode, -math.inf, 0, var)
            torch.cuda.synchronize()
            e = rel_l2(call.o, ref)
            le = (call.lse - lse_ref).abs().max().item()
            errs[name] = (e, le)
            ok = e <= 1e-2 and le <= 1e-2 and not torch.isnan(call.o).any().item()
            rows.append(dict(shape=f"B{B} Sq{Sq} Sk{Sk} H{H} D{D} {str(dt)[6:]}", variant=f"{name}:{call.kernel}",
                             rel_l2=e, lse_max_abs=le, ok=ok))
        fl = sdpa(q, k, v, SDPBackend.FLASH_ATTENTION) if dt in (torch.bfloat16, torch.float16) else None
        rows.append(dict(shape=f"B{B} Sq{Sq} Sk{Sk} H{H} D{D} {str(dt)[6:]}", variant="torch_flash",
                         rel_l2=rel_l2(fl, ref), lse_max_abs=float("nan"), ok=True))
    res["correctness"] = rows
    for r in rows:
        print(f"  correctness {r['shape']:<32} {r['variant']:<34} relL2 {r['rel_l2']:.2e} "
              f"lse {r['lse_max_abs']:.2e} {'ok' if r['ok'] else 'FAIL'}")
    return all(r["ok"] for r in rows)


# ---- 2./3. dense and fixed-mask timings ------------------------------------------------------
def bench_shape(K, res, B, H, S, D, reps):
    torch.manual_seed(0)
    dt = torch.bfloat16
    q = torch.randn(B, S, H, D, device="cuda", dtype=dt)
    k = torch.randn(B, S, H, D, device="cuda", dtype=dt)
    v = torch.randn(B, S, H, D, device="cuda", dtype=dt)
    call = Call(K, q, k, v, lse=False)
    callp = Call(K, q, k, v, lse=False, portable=True)
    key = f"B{B} H{H} S{S} D{D}"
    out = {"kernel": call.kernel, "tiles": f"{call.BM}x{call.BN}",
           "portable_tiles": f"{callp.BM}x{callp.BN}"}
    print(f"  {key}: {call.kernel} BMxBN {call.BM}x{call.BN}; portable {callp.kernel} {callp.BM}x{callp.BN}")
    n = 8192
    ga, gb = (torch.randn(n, n, device="cuda", dtype=dt) for _ in range(2))

    # Interleaved rounds (every variant once per round, median per variant), so that clock and
    # temperature drift during the run hits all variants alike.
    fns = {
        "gemm_bf16_8192": lambda: torch.mm(ga, gb),
        "torch_cudnn": lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION),
        "torch_flash": lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION),
        "ours_dense_only": lambda: call.run(LA_MODE_DENSE, -math.inf, 0, VARIANT_DENSE_ONLY),
        "ours_skipbuild_mode_dense": lambda: call.run(LA_MODE_DENSE, -math.inf, 0, VARIANT_SKIP),
        "ours_skip_tau_-inf": lambda: call.run(LA_MODE_SKIP, -math.inf, 0, VARIANT_AUTO),
        "ours_dense_only_1cta": lambda: call.run(LA_MODE_DENSE, -math.inf, 0, VARIANT_DENSE_ONLY | VARIANT_ONE_CTA),
        "ours_skip_tau_-inf_1cta": lambda: call.run(LA_MODE_SKIP, -math.inf, 0, VARIANT_ONE_CTA),
        "ours_skip_tau_-1000": lambda: call.run(LA_MODE_SKIP, -1000.0, 1, VARIANT_AUTO),
        # the same with carried row maxima (one load and one store per row, one max per vote)
        "ours_skip_tau_-1000_rowmax": lambda: call.run(LA_MODE_SKIP, -1000.0, 1, VARIANT_AUTO,
                                                       row_max=True),
        "portable_dense_only": lambda: callp.run(LA_MODE_DENSE, -math.inf, 0, VARIANT_DENSE_ONLY),
    }
    for name, fn in load_fa3().items():
        fns[name] = (lambda fn=fn: fn(q, k, v))
    call.set_mask_ones()
    for name, ms in time_interleaved(fns, reps).items():
        fl = 2.0 * n ** 3 / (ms * 1e-3) / 1e12 if name.startswith("gemm") else tflops(B, H, S, S, D, ms)
        out[name] = dict(ms=ms, tflops=fl)
        print(f"  {key:<20} {name:<26} {ms:8.3f} ms {out[name]['tflops']:7.1f} TFLOP/s", flush=True)
    del ga, gb
    call.counter.zero_()
    call.run(LA_MODE_SKIP, -1000.0, 0)
    torch.cuda.synchronize()
    assert call.counter.item() == call.total_tiles, "tau=-1000 skipped tiles"
    # sanity: the big shape's output against flash
    call.run(LA_MODE_DENSE, -math.inf, 0, VARIANT_DENSE_ONLY)
    out["rel_l2_vs_flash"] = rel_l2(call.o, sdpa(q, k, v, SDPBackend.FLASH_ATTENTION))
    print(f"  {key:<20} rel L2 vs flash {out['rel_l2_vs_flash']:.2e}")
    sparse = []
    for kind in ("uniform", "skewed"):
        for f in (0.75, 0.5, 0.25, 0.10, 0.05):
            g = torch.Generator(device="cuda").manual_seed(1)
            r = torch.rand(B, H, call.nQ, call.nK, device="cuda", generator=g)
            if kind == "uniform":
                bits = r < f
            else:  # the last quarter of the q-tiles fully live, the others at f/4
                bits = r < f / 4
                bits[:, :, call.nQ - call.nQ // 4:, :] = True
            call.set_mask_bits(bits)
            live = bits.float().mean().item()
            call.counter.zero_()
            for step in (0, 1):  # both directions
                call.run(LA_MODE_SKIP, -math.inf, step)
            torch.cuda.synchronize()
            got = call.counter.item()
            if got != 2 * bits.sum().item():
                print(f"  !! fixed mask changed: {got} tiles computed, expected {2 * bits.sum().item()}")
            tm = time_interleaved({"dense": lambda: call.run(LA_MODE_DENSE, -math.inf, 0, VARIANT_DENSE_ONLY),
                                   "sparse": lambda: call.run(LA_MODE_SKIP, -math.inf, 0),
                                   "sparse_1cta": lambda: call.run(LA_MODE_SKIP, -math.inf, 0, VARIANT_ONE_CTA)},
                                  reps)
            ms, dense_ms = tm["sparse"], tm["dense"]
            sparse.append(dict(kind=kind, target=f, live=live, ms=ms, dense_ms=dense_ms, ratio=ms / dense_ms,
                               target_ratio=live + 0.02, ratio_1cta=tm["sparse_1cta"] / dense_ms))
            print(f"  {key:<20} {kind} mask live {live:.3f}      {ms:8.3f} ms  ratio {ms / dense_ms:.3f} "
                  f"(target <= {live + 0.02:.3f}; one CTA per q-tile {tm['sparse_1cta'] / dense_ms:.3f})",
                  flush=True)
    out["sparse"] = sparse
    res.setdefault("shapes", {})[key] = out
    del q, k, v, call
    torch.cuda.empty_cache()


# ---- 4. drifting run ---------------------------------------------------------------------------
def drifting(K, res, B, H, S, D, steps, tau=-3.0):
    """Peaked attention with slow drift: tokens of a 'video' of frames; each query's content is
    close to a few regions of keys (cluster centroids, per-token noise), and every step moves
    Q, K, V a little."""
    torch.manual_seed(2)
    dt = torch.bfloat16
    nc = 24
    blk_tokens = 256
    cent = torch.randn(H, nc, D, device="cuda")
    # cluster of each token: blocks of 96 tokens, shuffled block order, shared by q and k
    blk = torch.randperm(-(-S // blk_tokens), device="cuda") % nc
    cl = blk.repeat_interleave(blk_tokens)[:S]
    amp = 1.0

    def make(noise):
        x = amp * cent[:, cl, :].permute(1, 0, 2) + noise  # [S, H, D]
        return x.unsqueeze(0).expand(B, S, H, D)

    nq = torch.randn(S, H, D, device="cuda")
    nk = torch.randn(S, H, D, device="cuda")
    vv = torch.randn(B, S, H, D, device="cuda")
    q = make(nq).to(dt).contiguous()
    k = make(nk).to(dt).contiguous()
    v = vv.to(dt)
    call = Call(K, q, k, v, lse=False)
    call.set_mask_ones()
    rows = []
    for step in range(steps):
        # drift
        nq += 0.03 * torch.randn_like(nq)
        nk += 0.03 * torch.randn_like(nk)
        vv += 0.03 * torch.randn_like(vv)
        q.copy_(make(nq))
        k.copy_(make(nk))
        v.copy_(vv)
        call.counter.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        call.run(LA_MODE_SKIP, tau, step)
        b.record()
        b.synchronize()
        ms = a.elapsed_time(b)
        live = call.counter.item() / call.total_tiles
        dense = sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)
        err = rel_l2(call.o, dense)
        rows.append(dict(step=step, live=live, ms=ms, rel_l2=err))
        print(f"  drift B{B} H{H} S{S} D{D} tau {tau} step {step:2d}: live {live:.3f} "
              f"{ms:8.3f} ms relL2 vs flash {err:.2e}", flush=True)
    res.setdefault("drift", {})[f"B{B} H{H} S{S} D{D}"] = rows
    del q, k, v, call
    torch.cuda.empty_cache()
    return rows


def guard_cost(K, res, B, H, S, D, live, samples, reps):
    """The guardrail's dense samples (docs/SKIP-SEMANTICS.md, engine/guard_cuda.c) against the
    call they check: a skip call over a fixed random mask with `live` of its tiles live, and
    for each sample count n the samples as the backend runs them (their Q rows gathered, then
    one LSE-only call in mode dense on them), as one LSE-only call in mode skip at tau -inf
    over a mask whose n sampled q-tiles per (b, h) are dense and the others empty, and as the
    backend ran them before 2026-12-03 (n dense calls of one q-tile each, one after another).
    Interleaved rounds; each as a fraction of the checked call."""
    torch.manual_seed(1)
    dt = torch.bfloat16
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dt) for _ in range(3))
    call = Call(K, q, k, v, lse=True)
    gen = torch.Generator(device="cuda").manual_seed(2)
    bits = torch.rand(B, H, call.nQ, call.nK, generator=gen, device="cuda") < live
    call.set_mask_bits(bits)
    key = f"B{B} H{H} S{S} D{D}"
    fns = {"call": lambda: call.run(LA_MODE_SKIP, -math.inf, 0, VARIANT_AUTO)}
    keep = []
    for n in samples:
        n = min(n, call.nQ)
        step = call.nQ // n
        tiles = [j * step for j in range(n)]
        one = Call(K, q, k, v, lse=True)
        one.p.o = None   # LSE only
        sb = torch.zeros(B, H, call.nQ, call.nK, dtype=torch.bool, device="cuda")
        sb[:, :, tiles] = True
        one.set_mask_bits(sb)
        fns[f"masked, {n} q-tiles"] = lambda one=one: one.run(LA_MODE_SKIP, -math.inf, 0,
                                                             VARIANT_AUTO)
        rows = torch.cat([torch.arange(m * call.BM, min((m + 1) * call.BM, S), device="cuda")
                          for m in tiles])
        qs = torch.empty(B, len(rows), H, D, device="cuda", dtype=dt)
        gathered = Call(K, qs, k, v, lse=True)
        gathered.p.o = None
        fns[f"gathered, {n} q-tiles"] = lambda qs=qs, rows=rows, g=gathered: (
            torch.index_select(q, 1, rows, out=qs), g.run(LA_MODE_DENSE))
        keep.append(gathered)
        serial = []
        for m in tiles:
            r0 = m * call.BM
            serial.append(Call(K, q[:, r0:r0 + call.BM], k, v, lse=True))
        fns[f"serial, {n} q-tiles"] = lambda serial=serial: [c.run(LA_MODE_DENSE) for c in serial]
        keep += [one, serial]
    t = time_interleaved(fns, reps)
    base = t["call"]
    out = {"kernel": call.kernel, "live": live, "call_ms": base,
           "rows": {n: {"ms": ms, "fraction": ms / base} for n, ms in t.items() if n != "call"}}
    res.setdefault("guard", {})[key] = out
    print(f"  guard {key} live {live:.2f} ({call.kernel}): call {base:.3f} ms; " + "; ".join(
        f"{n} {ms:.3f} ms ({100 * ms / base:.1f}%)" for n, ms in t.items() if n != "call"),
        flush=True)


def order_cost(K, res, B, H, S, D, reps):
    """What running a call in another token order adds (LiteAttention(token_order=...) and
    liteattn.diffusers.apply(token_order=...)): Q, K and V gathered into the order and O
    gathered back (index_select along the sequence, as both do), against the dense call of our
    kernel on the same shape. Interleaved rounds."""
    torch.manual_seed(3)
    dt = torch.bfloat16
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dt) for _ in range(3))
    perm = torch.randperm(S, device="cuda")
    inv = torch.argsort(perm)
    call = Call(K, q, k, v, lse=False)
    t = time_interleaved({
        "call": lambda: call.run(LA_MODE_DENSE, -math.inf, 0, VARIANT_DENSE_ONLY),
        "gathers": lambda: [x.index_select(1, perm) for x in (q, k, v)] + [
            call.o.index_select(1, inv)],
    }, reps)
    key = f"B{B} H{H} S{S} D{D}"
    res.setdefault("order", {})[key] = {"call_ms": t["call"], "gathers_ms": t["gathers"]}
    print(f"  order {key}: dense call {t['call']:.3f} ms; 3 gathers + 1 scatter "
          f"{t['gathers']:.3f} ms ({100 * t['gathers'] / t['call']:.1f}%)", flush=True)


def sweep(libs, shapes, reps):
    """Tile-shape variants (builds of the same kernels with other LA_HD*_NW/MT/BN): dense and
    skip-at-tau=-inf time of each, interleaved with torch flash, per shape.
    Caveat (seen on the H100): each library carries its own static cudart; in every library but
    the first one loaded, kernels that need more than 48 KB of dynamic shared memory fail to
    launch (cudaErrorInvalidValue from the opt-in). Such variants must run one per process."""
    Ks = {os.path.basename(l): Kernels(os.path.abspath(l)) for l in libs}
    for (B, H, S, D) in shapes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)
        fns = {"torch_flash": lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)}
        calls = {}
        for name, K in Ks.items():
            c = Call(K, q, k, v, lse=False)
            try:
                c.run(LA_MODE_DENSE, -math.inf, 0, VARIANT_DENSE_ONLY)
            except RuntimeError as e:
                print(f"  sweep {name}: {e}")
                continue
            calls[name] = c
            e = rel_l2(c.o, ref)
            print(f"  sweep {name} BMxBN {c.BM}x{c.BN} relL2 vs flash {e:.2e}", flush=True)
            fns[name + ":dense"] = (lambda c=c: c.run(LA_MODE_DENSE, -math.inf, 0, VARIANT_DENSE_ONLY))
            fns[name + ":skip-inf"] = (lambda c=c: c.run(LA_MODE_SKIP, -math.inf, 0))
            fns[name + ":skip-1000"] = (lambda c=c: c.run(LA_MODE_SKIP, -1000.0, 0))
        for n, ms in time_interleaved(fns, reps).items():
            print(f"  sweep B{B} H{H} S{S} D{D} {n:<40} {ms:8.3f} ms {tflops(B, H, S, S, D, ms):7.1f} TFLOP/s",
                  flush=True)
        del q, k, v, ref, calls, fns
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default="build/libla_kernels.so")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    ap.add_argument("--skip-drift", action="store_true")
    ap.add_argument("--sweep", nargs="*", help="only time these kernel libraries against each other")
    ap.add_argument("--guard", action="store_true",
                    help="only the guardrail's samples against the call they check (Wan2.1 "
                         "and the toy DiT's shapes, 60%% of the tiles live), and the copies of "
                         "a token order against a dense call")
    ap.add_argument("--order-only", action="store_true",
                    help="with --guard: only the token order's copies")
    args = ap.parse_args()
    if args.guard:
        K = Kernels(os.path.abspath(args.lib))
        res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        print(f"GPU {res['gpu']}, torch {res['torch']}", flush=True)
        for (B, H, S, D) in ([(1, 8, 8192, 128)] if args.quick else
                             [(1, 40, 32760, 128), (4, 3, 32768, 128), (1, 24, 17550, 64)]):
            if not args.order_only:
                guard_cost(K, res, B, H, S, D, 0.6, (1, 4, 16), 3 if args.quick else 10)
            order_cost(K, res, B, H, S, D, 3 if args.quick else 10)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "bench_guard.json"), "w") as f:
                json.dump(res, f, indent=1)
        return 0
    if args.sweep:
        sweep(args.sweep, [(1, 40, 32760, 128), (1, 24, 17550, 64)], 5 if args.quick else 10)
        return 0
    K = Kernels(os.path.abspath(args.lib))
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        res["commit"] = os.environ.get("LA_COMMIT") or subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
            text=True).stdout.strip()  # "-dirty": the tree differs from that commit
    except OSError:
        res["commit"] = "?"
    print(f"GPU {res['gpu']}, torch {res['torch']}, commit {res['commit']}", flush=True)
    ok = check_correctness(K, res)
    reps = 3 if args.quick else 10
    shapes = [(1, 40, 32760, 128), (1, 24, 17550, 64)]
    if args.quick:
        shapes = [(1, 8, 8192, 128), (1, 8, 8192, 64)]
    for (B, H, S, D) in shapes:
        bench_shape(K, res, B, H, S, D, reps)
    if not args.skip_drift:
        for (B, H, S, D) in shapes:
            drifting(K, res, B, H, S, D, 20 if not args.quick else 5)

    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_gpu.json"), "w") as f:
            json.dump(res, f, indent=1)

    # ---- the table ----
    print(f"\n== {res['gpu']} · {res['date']} · commit {res['commit']} · correctness "
          f"{'ok' if ok else 'FAILED'}")
    print(f"{'shape':<22}{'what':<28}{'ms':>9}{'TFLOP/s':>9}")
    for key, out in res.get("shapes", {}).items():
        print(f"{key:<22}kernel {out['kernel']} {out['tiles']}, portable {out['portable_tiles']}")
        for name in ("gemm_bf16_8192", "fa3", "ref_liteattn_skip_-1000", "torch_cudnn", "torch_flash", "ours_dense_only",
                     "ours_skipbuild_mode_dense", "ours_skip_tau_-inf", "ours_skip_tau_-1000",
                     "ours_skip_tau_-1000_rowmax", "ours_dense_only_1cta", "ours_skip_tau_-inf_1cta",
                     "portable_dense_only"):
            if name in out:
                print(f"{key:<22}{name:<28}{out[name]['ms']:9.3f}{out[name]['tflops']:9.1f}")
        d = out["ours_dense_only"]["ms"]
        print(f"{key:<22}{'skip overhead at tau=-inf':<28}{100 * (out['ours_skip_tau_-inf']['ms'] / d - 1):8.2f}%"
              f"  (target <= 1%)  dense vs flash {out['ours_dense_only']['tflops'] / out['torch_flash']['tflops']:.2f}x")
        print(f"{key:<22}{'overhead tau=-1000 (votes)':<28}{100 * (out['ours_skip_tau_-1000']['ms'] / d - 1):8.2f}%")
        if "fa3" in out:
            print(f"{key:<22}{'ours dense / FA3':<28}{out['ours_dense_only']['tflops'] / out['fa3']['tflops']:8.3f}x"
                  f"   ours skip(-1000) / reference kernel "
                  f"{out['ours_skip_tau_-1000']['tflops'] / out['ref_liteattn_skip_-1000']['tflops']:.3f}x (target >= 1.1)")
        for s in out["sparse"]:
            print(f"{key:<22}{'%s live %.3f' % (s['kind'], s['live']):<28}{s['ms']:9.3f}  ratio {s['ratio']:.3f} "
                  f"(target <= {s['target_ratio']:.3f}; one CTA per q-tile {s['ratio_1cta']:.3f})")
    for key, rows in res.get("drift", {}).items():
        lv = statistics.mean(r["live"] for r in rows[1:]) if len(rows) > 1 else rows[0]["live"]
        ms = statistics.mean(r["ms"] for r in rows[1:]) if len(rows) > 1 else rows[0]["ms"]
        print(f"{key:<22}{'drift tau=-3, steps 1..':<28}{ms:9.3f}  live {lv:.3f}  last relL2 "
              f"{rows[-1]['rel_l2']:.2e}  max relL2 {max(r['rel_l2'] for r in rows):.2e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
