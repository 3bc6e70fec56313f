#!/usr/bin/env python3
"""How much less ring attention skips than one process on the same inputs (CPU backend).

    python3 libclient/python/examples/ring_skip_gap.py                 # starts build/liteattnd
    python3 libclient/python/examples/ring_skip_gap.py --ranks 2 --taus=-3,-6 --json out.json

For two kinds of inputs ("blocks": attention clustered by tile, as in the tests; "video":
tokens on a frames x height x width grid whose queries and keys carry smooth 3D positional
features, so that attention is local in space and time) and each threshold, over --steps
denoising steps on the same inputs:
  single   one process, the whole sequence, one liteattn session;
  ring     liteattn.parallel.ring_attention over --ranks gloo processes (127.0.0.1 only).
and three ring variants, all through the daemon:
  ring                    ring_attention(carry_max=False): each shard's votes against its own
                          maximum only (liteattn before carried row maxima);
  ring+M0 (ring order)    ring_attention(): row maxima carried from hop to hop (SKIP-SEMANTICS
                          "Carried row maxima"), own shard first, then the one before, ...;
  ring+M0 (global order)  ring_attention(ring_order="global"): carried, the shards visited in
                          the single process's direction for the step.
A NumPy emulation of SKIP-SEMANTICS.md (float64 tile maxima) replays all four and must
reproduce the daemon's tile counts (printed: exact, or how many differ). Reports the share of
tiles skipped per step and over the run.
"""
import argparse
import json
import math
import os
import signal
import socket as pysocket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO, "libclient", "python"))

import numpy as np  # noqa: E402

LOG2E = 1.0 / math.log(2.0)


# ---- inputs ----------------------------------------------------------------------------------

def make_inputs(kind, S, H, D, seed):
    """q, k, v float32 [1, S, H, D]."""
    rng = np.random.default_rng(seed)
    if kind == "blocks":
        centers = rng.standard_normal((3, H, D))
        centers /= np.linalg.norm(centers, axis=-1, keepdims=True)
        centers *= 4.0 * D ** 0.25
        c = (np.arange(S) // 128) % 3
        q = rng.standard_normal((1, S, H, D)) * 0.5 + centers[c][None]
        k = rng.standard_normal((1, S, H, D)) * 0.5 + centers[(np.arange(S) // 64) % 3][None]
    elif kind == "video":
        side = int(round((S / 4) ** 0.5))
        if 4 * side * side != S:
            raise SystemExit("--seq must be 4 * n^2 for the video inputs")
        f, y, x = np.meshgrid(np.arange(4), np.arange(side), np.arange(side), indexing="ij")
        pos = np.stack([f.ravel(), y.ravel(), x.ravel()], axis=1).astype(np.float64)
        per_axis = D // 6
        feats = []
        for a, length in enumerate((4, side, side)):
            w = np.pi * np.arange(1, per_axis + 1) / (2.0 * length)
            feats += [np.cos(pos[:, a:a + 1] * w), np.sin(pos[:, a:a + 1] * w)]
        e = np.concatenate(feats, axis=1)
        e = np.pad(e, ((0, 0), (0, D - e.shape[1])))
        amp = np.linspace(2.4, 1.6, H)[None, :, None]
        q = amp * e[:, None, :] + 0.3 * rng.standard_normal((S, H, D))
        k = amp * e[:, None, :] + 0.3 * rng.standard_normal((S, H, D))
        q, k = q[None], k[None]
    else:
        raise SystemExit("unknown inputs %r" % kind)
    v = rng.standard_normal((1, S, H, D))
    return q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)


# ---- the NumPy emulation of the decisions ----------------------------------------------------

def tile_max(q, k, BN):
    """Raw-score maxima per (query row, k-tile): [Sq, nK] from q [Sq, D], k [Sk, D]."""
    s = q.astype(np.float64) @ k.astype(np.float64).T
    Sk = k.shape[0]
    nK = -(-Sk // BN)
    s = np.pad(s, ((0, 0), (0, nK * BN - Sk)), constant_values=-np.inf)
    return s.reshape(s.shape[0], nK, BN).max(axis=2)


def decide(T, live, BM, descending, tau, scale, M0):
    """One call (mode skip, no must-do/skip) on tile maxima T [Sq, nK] with live [nQ, nK]:
    returns (new live, tiles computed, row maxima [Sq])."""
    Sq, nK = T.shape
    new = live.copy()
    run_all = M0.copy()
    computed = 0
    for m in range(live.shape[0]):
        r0, r1 = m * BM, min((m + 1) * BM, Sq)
        order = np.nonzero(live[m])[0]
        if descending:
            order = order[::-1]
        run = run_all[r0:r1]
        for n in order:
            t = T[r0:r1, n]
            with np.errstate(invalid="ignore"):
                votes = np.where(np.isneginf(run), True, (t - run) * scale * LOG2E > tau)
            new[m, n] = bool(votes.any())
            np.maximum(run, t, out=run)
        computed += len(order)
    return new, computed, run_all


def emulate(q, k, P, BM, BN, tau, steps):
    """Tiles computed per step: {'single', 'ring', 'ring+M0 (ring order)',
    'ring+M0 (global order)'} -> [per step], and tiles per step in all."""
    B, S, H, D = q.shape
    scale = 1.0 / math.sqrt(D)
    L = S // P
    nQ, nK = -(-S // BM), -(-S // BN)
    nQl, nKl = -(-L // BM), -(-L // BN)
    res = {name: [0] * steps for name in ("single", "ring", "ring+M0 (ring order)",
                                          "ring+M0 (global order)")}
    for h in range(H):
        T = tile_max(q[0, :, h], k[0, :, h], BN)
        live = np.ones((nQ, nK), dtype=bool)
        for step in range(steps):
            live, c, _ = decide(T, live, BM, step % 2 == 0, tau, scale,
                                np.full(S, -np.inf))
            res["single"][step] += c
        for variant in ("ring", "ring+M0 (ring order)", "ring+M0 (global order)"):
            for me in range(P):
                rows = slice(me * L, (me + 1) * L)
                lives = [np.ones((nQl, nKl), dtype=bool) for _ in range(P)]
                for step in range(steps):
                    if variant == "ring+M0 (global order)":
                        order = list(range(P))[::-1] if step % 2 == 0 else list(range(P))
                    else:
                        order = [(me - j) % P for j in range(P)]
                    M0 = np.full(L, -np.inf)
                    for src in order:
                        Tl = T[rows, src * nKl:(src + 1) * nKl]
                        start = M0 if variant != "ring" else np.full(L, -np.inf)
                        lives[src], c, rowmax = decide(Tl, lives[src], BM, step % 2 == 0, tau,
                                                       scale, start)
                        M0 = np.maximum(M0, rowmax)
                        res[variant][step] += c
    return res, B * H * nQ * nK


# ---- the daemon runs ---------------------------------------------------------------------------

RING_VARIANTS = (("ring", {"carry_max": False}), ("ring+M0 (ring order)", {}),
                 ("ring+M0 (global order)", {"ring_order": "global"}))

def start_daemon(path):
    d = tempfile.mkdtemp(prefix="liteattn-gap-")
    sock = os.path.join(d, "la.sock")
    log = open(os.path.join(d, "daemon.log"), "wb")
    p = subprocess.Popen([path, "--socket", sock, "--backend", "cpu", "--foreground"],
                         stdout=log, stderr=subprocess.STDOUT)
    for _ in range(500):
        if p.poll() is not None:
            break
        s = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        try:
            s.connect(sock)
            return p, sock
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    sys.exit("liteattnd did not start:\n" + open(os.path.join(d, "daemon.log")).read())


def run_single(sock, q, k, v, tau, steps):
    import liteattn
    B, S, H, D = q.shape
    with liteattn.Client(sock) as c:
        s = c.open_session("gap-single-%d" % os.getpid(), layers=1, heads=H, head_dim=D,
                           dtype="float32", max_seq_q=S, threshold=tau)
        per = []
        for step in range(steps):
            s.attention(0, step, q, k, v)
            per.append(s.last_call["tiles_computed"])
        tiles = s.tile_sizes
        s.close()
    return per, tiles


def rank_main(rank, args, outdir):
    import torch
    import torch.distributed as dist
    from liteattn import parallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(outdir, "rv"),
                            rank=rank, world_size=args.ranks)
    out = {}
    for kind in args.inputs.split(","):
        q, k, v = (torch.from_numpy(x) for x in make_inputs(kind, args.seq, args.heads,
                                                            args.head_dim, args.seed))
        L = args.seq // args.ranks
        qs, ks, vs = (x[:, rank * L:(rank + 1) * L].contiguous() for x in (q, k, v))
        for tau in args.tau_list:
            for variant, opts in RING_VARIANTS:
                ctx = parallel.Context(args.socket, layers=1, threshold=tau, **opts)
                per = []
                for step in range(args.steps):
                    before = ctx.session.stats["tiles_computed"] if ctx.session else 0
                    parallel.ring_attention(qs, ks, vs, layer=0, step=step, context=ctx)
                    per.append(ctx.session.stats["tiles_computed"] - before)
                out["%s/%g/%s" % (kind, tau, variant)] = per
                ctx.close()
    with open(os.path.join(outdir, "rank%d.json" % rank), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def run_ring(args):
    tmp = tempfile.mkdtemp(prefix="liteattn-gap-ranks-")
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--rank-of", tmp] + sys.argv[1:] + \
          ["--socket", args.socket]
    procs = [subprocess.Popen(cmd + ["--rank", str(r)], env=env) for r in range(args.ranks)]
    rcs = [p.wait() for p in procs]
    if any(rcs):
        sys.exit("a rank failed: %s" % rcs)
    total = {}
    for r in range(args.ranks):
        with open(os.path.join(tmp, "rank%d.json" % r)) as f:
            for key, per in json.load(f).items():
                acc = total.setdefault(key, [0] * len(per))
                for i, x in enumerate(per):
                    acc[i] += x
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--taus", default="-3,-6")
    ap.add_argument("--inputs", default="blocks,video")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--socket", help="a running daemon's socket (default: start one)")
    ap.add_argument("--daemon", default=os.path.join(REPO, "build", "liteattnd"))
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rank-of", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.tau_list = [float(t) for t in args.taus.split(",")]
    if args.rank is not None:
        return rank_main(args.rank, args, args.rank_of)
    daemon = None
    if args.socket is None:
        daemon, args.socket = start_daemon(args.daemon)
    try:
        ring = run_ring(args)
        rows = []
        for kind in args.inputs.split(","):
            q, k, v = make_inputs(kind, args.seq, args.heads, args.head_dim, args.seed)
            for tau in args.tau_list:
                single, (BM, BN) = run_single(args.socket, q, k, v, tau, args.steps)
                if (args.seq // args.ranks) % max(BM, BN):
                    sys.exit("--seq / --ranks must be a multiple of the tiles (%d, %d)"
                             % (BM, BN))
                emu, total = emulate(q, k, args.ranks, BM, BN, tau, args.steps)
                got = {"single": single}
                for variant, _ in RING_VARIANTS:
                    got[variant] = ring["%s/%g/%s" % (kind, tau, variant)]
                check = {n: sum(abs(a - b) for a, b in zip(got[n], emu[n])) for n in got}
                row = {"inputs": kind, "tau": tau, "tiles_per_step": total,
                       "daemon": got, "emulated": emu, "emulation_differs_by_tiles": check}
                rows.append(row)
                print("\n%s, tau %g: %d tiles per step (S %d, %d heads, tiles %dx%d, %d ranks)"
                      % (kind, tau, total, args.seq, args.heads, BM, BN, args.ranks))
                print("  %-24s %s   over the run" % ("skipped per step", " ".join(
                    "%6d" % s for s in range(args.steps))))
                for name, per in list(got.items()) + [(n, emu[n]) for n in emu
                                                      if n not in got]:
                    src = "daemon" if name in got else "emulated"
                    print("  %-24s %s   %5.1f%%  (%s%s)" % (
                        name, " ".join("%5.1f%%" % (100 - 100.0 * c / total) for c in per),
                        100 - 100.0 * sum(per) / (total * args.steps), src,
                        "" if name not in check else
                        ", emulation exact" if check[name] == 0 else
                        ", emulation differs by %d tiles" % check[name]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait()


if __name__ == "__main__":
    main()
