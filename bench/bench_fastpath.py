#!/usr/bin/env python3
"""bench_fastpath.py — a Wan-sized denoising loop through liteattn's Python module (the fast
path: calls ordered on the torch stream by the doorbell) against the same loop calling the
kernel in this process (build/libla_kernels.so through ctypes), both in one run (issue 10:
"total within 2%").

The loop: --steps steps of --layers layers; per layer one attention call of [B, S, H, D] bf16
at tau = -inf (nothing skipped: the time is the kernel's and the path's), mode skip as a session
runs it, the mask of each layer kept by its owner (the daemon's session, or this process for the
direct loop). With --proj, each layer first makes its Q, K and V with three [S, H*D] x [H*D,
H*D] bf16 projections of a hidden state (what a transformer block does), so that the inputs are
produced on the stream right before each call, as in a model. Steps alternate which loop runs
first. Prints the total of each loop, their ratio and the time per call; --json writes them.

The daemon is the one at --socket, or one started here from --daemon (CUDA backend, a fresh
socket). Full size (40 layers x 50 steps x 59 ms) takes about 4 minutes for both loops on an
H200; --quick runs 4 layers x 3 steps.

Usage: bench_fastpath.py [--socket PATH | --daemon build/gpu/liteattnd] [--lib
       build/gpu/libla_kernels.so] [--layers 40] [--steps 50] [--heads 40] [--seq 32760]
       [--head-dim 128] [--proj] [--quick] [--json FILE]
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "libclient", "python"))
from bench_gpu import Kernels, Call, LA_MODE_SKIP  # noqa: E402

import liteattn  # noqa: E402


def start_daemon(binary):
    d = tempfile.mkdtemp(prefix="bench-fastpath-")
    sock = os.path.join(d, "s")
    log = open(os.path.join(d, "daemon.log"), "wb")
    proc = subprocess.Popen([binary, "--socket", sock, "--backend", "cuda", "--log-level",
                             "warn"], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(400):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    else:
        raise SystemExit("liteattnd did not start (see %s)" % log.name)
    return proc, sock


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--socket")
    ap.add_argument("--daemon", default=os.path.join(REPO, "build", "gpu", "liteattnd"))
    ap.add_argument("--lib", default=os.environ.get("LA_KERNELS_LIB") or os.path.join(
        REPO, "build", "gpu", "libla_kernels.so"))
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--seq", type=int, default=32760)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--proj", action="store_true", help="make Q, K, V by projections first")
    ap.add_argument("--quick", action="store_true", help="4 layers x 3 steps")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.quick:
        a.layers, a.steps = 4, 3
    B, S, H, D, L = a.batch, a.seq, a.heads, a.head_dim, a.layers
    dev = torch.device("cuda")
    torch.manual_seed(0)
    proc = None
    sock = a.socket
    if sock is None:
        proc, sock = start_daemon(a.daemon)
    try:
        K = Kernels(a.lib)
        client = liteattn.Client(sock)
        sess = client.open_session("bench-fastpath-%d" % os.getpid(), layers=L, heads=H,
                                   head_dim=D, dtype="bfloat16", max_seq_q=S, batch=B,
                                   threshold=-math.inf, device="cuda")
        ok, why = sess.fastpath_status()
        if not ok:
            raise SystemExit("the fast path is not available: %s" % why)
        hid = H * D
        x = torch.randn(B, S, hid, device=dev, dtype=torch.bfloat16)
        if a.proj:
            w = [torch.randn(hid, hid, device=dev, dtype=torch.bfloat16) / math.sqrt(hid)
                 for _ in range(3)]
        base = [torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3)]

        def inputs():
            if a.proj:
                return [(x @ wi).view(B, S, H, D) for wi in w]
            return base

        # The direct loop's per-layer state: a mask per layer (as the session has), outputs.
        q0, k0, v0 = base
        direct = [Call(K, q0, k0, v0, lse=False) for _ in range(L)]

        def run_direct(step):
            for layer in range(L):
                q, k, v = inputs()
                c = direct[layer]
                p = c.p
                p.q, p.k, p.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
                for name, t in (("q_stride", q), ("k_stride", k), ("v_stride", v)):
                    getattr(p, name)[:] = list(t.stride())
                c.run(mode=LA_MODE_SKIP, tau=-math.inf, step=step)

        def run_daemon(step):
            for layer in range(L):
                q, k, v = inputs()
                sess.attention(layer, step, q, k, v)

        def timed(fn, step):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            e0.record()
            fn(step)
            e1.record()
            e1.synchronize()
            wall = time.perf_counter() - t0
            return e0.elapsed_time(e1) / 1e3, wall

        # Warm-up: registration of the blocks, the daemon's lane, the kernels' first launch.
        run_daemon(0)
        sess.sync()
        run_direct(0)
        torch.cuda.synchronize()
        tot = {"daemon": 0.0, "direct": 0.0}
        wall = {"daemon": 0.0, "direct": 0.0}
        per_step = {"daemon": [], "direct": []}
        for step in range(1, a.steps + 1):
            order = ("daemon", "direct") if step % 2 else ("direct", "daemon")
            for name in order:
                gpu_s, wall_s = timed(run_daemon if name == "daemon" else run_direct, step)
                tot[name] += gpu_s
                wall[name] += wall_s
                per_step[name].append(gpu_s)
            sess.sync()
        calls = L * a.steps
        ratio = tot["daemon"] / tot["direct"]
        print("bench_fastpath: %d layers x %d steps, B%d H%d S%d D%d bf16, tau -inf%s" % (
            L, a.steps, B, H, S, D, ", projections" if a.proj else ""))
        print("%-34s %10s %14s %10s" % ("", "total s", "per call ms", "wall s"))
        for name, label in (("direct", "kernel in this process"),
                            ("daemon", "liteattn Python module (fast)")):
            print("%-34s %10.3f %14.3f %10.3f" % (label, tot[name], 1e3 * tot[name] / calls,
                                                   wall[name]))
        print("through liteattn / in process: %.4f (%+.2f%%; target: within 2%%)" % (
            ratio, 100.0 * (ratio - 1.0)))
        st = sess.stats
        print("session: %d calls, %d failed, %.1f%% of tiles computed" % (
            st["calls"], st["failed"],
            100.0 * st["tiles_computed"] / st["tiles_total"] if st["tiles_total"] else 0.0))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"layers": L, "steps": a.steps, "shape": [B, S, H, D],
                           "proj": a.proj, "total_s": tot, "wall_s": wall, "ratio": ratio,
                           "per_step_s": per_step, "gpu": torch.cuda.get_device_name()},
                          f, indent=1)
        sess.close()
        client.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
