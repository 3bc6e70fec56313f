#!/usr/bin/env python3
"""The quality harness: dense generations of the toy video DiT (PyTorch SDPA) against the same
generations with the self-attention through liteattn (the drop-in LiteAttention module, a
daemon, CUDA tensors by IPC on a GPU), at fixed thresholds and with profiles calibrated by
liteattn-calibrate, from the same noise and labels.

Per setting: tiles skipped over the generation and per (layer, step), attention time (the
backend's compute time) against liteattn with nothing skipped and against SDPA, PSNR and SSIM
of the final clip against dense, relative L1 of the final latent, and the held-out denoising
loss with skipping on (teacher-forced along the sampling schedule, the masks carried from
step to step as in a generation). Writes results.json, results.md, live.png (live fraction,
layer x step, per setting), pareto.png and the calibrated profiles to --out.

Two features beyond the reference (docs/SKIP-SEMANTICS.md), each against its cold/off twin:
- warm start (--warm-taus): the masks of generations with other noise seeds and labels
  (--warm-seeds, --warm-labels) seed the evaluated generation (OR of --warm-generations,
  widened by --warm-margin tiles, the first --warm-dense-steps steps dense), against the
  cold "tau T" setting: tiles skipped over the generation and in its first steps, PSNR;
- the online quality guardrail (--guard-taus, e.g. an aggressive 0 and a sane -6): the same
  threshold with the guardrail off and on (--guard-every, --guard-sample, --guard-budget):
  PSNR recovered, tiles and attention time it costs, rows it restored.

    python3 bench/quality/run.py --out DIR                  # GPU, the committed checkpoint
    python3 bench/quality/run.py --smoke                    # CPU, tiny random model, 2 steps

The daemon is started from --build (default $LITEATTN_BUILD_DIR, else <repo>/build) with the
CUDA backend when torch sees a GPU, else the CPU backend; --socket uses a running one instead.
The last line printed starts with "quality:".
"""
import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
CKPT = os.path.join(HERE, "checkpoint", "toydit")
T0 = time.perf_counter()


def log(*a):
    print("[%6.1fs]" % (time.perf_counter() - T0), *a, flush=True)


def _paths():
    for p in (HERE, os.path.join(REPO, "libclient", "python")):
        if p not in sys.path:
            sys.path.insert(0, p)


# ---- the model, shared with liteattn-calibrate's --run ------------------------------------

def get_model(checkpoint, smoke, device):
    """The model, cached in the toydit module (shared with copies of this file that
    liteattn-calibrate's --run loads)."""
    import torch
    import toydit as M
    _MODELS = M.__dict__.setdefault("_model_cache", {})
    key = (checkpoint, bool(smoke), str(device))
    if key not in _MODELS:
        if smoke:
            torch.manual_seed(0)
            model = M.ToyDiT(M.Config(**M.SMOKE)).to(device).eval()
            with torch.no_grad():   # an output that depends on attention, sharper scores
                torch.nn.init.normal_(model.head.weight, std=0.05)
                for b in model.blocks:
                    b.norm_q.weight.fill_(3.0)
                    b.norm_k.weight.fill_(3.0)
            meta = {"config": model.cfg.to_dict(), "weights": "random (smoke)"}
        else:
            model, meta = M.load_sharded(checkpoint, device)
        _MODELS[key] = (model, meta)
    return _MODELS[key]


def make_noise(cfg, seeds, device):
    import torch
    out = []
    for s in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(s))
        out.append(torch.randn((cfg.channels, cfg.frames, cfg.size, cfg.size), generator=g))
    return torch.stack(out).to(device)


def calibration_generate(attention, checkpoint=CKPT, smoke=0, seed=100, label=4, steps=50,
                         cfg_scale=5.0, order="raster"):
    """One dense generation of the toy DiT with attention(layer, q, k, v) for every
    self-attention call, its tokens in `order`: the --run target of liteattn-calibrate."""
    import torch
    import toydit as M
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = get_model(checkpoint, smoke, dev)
    noise = make_noise(model.cfg, [seed], dev)
    labels = torch.tensor([int(label)], device=dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model.set_token_order(order)
    try:
        return M.sample(model, noise, labels, steps=int(steps), cfg_scale=float(cfg_scale),
                        attn=lambda layer, q, k, v: attention(layer, q, k, v), dtype=dtype)
    finally:
        model.set_token_order("raster")


# ---- metrics --------------------------------------------------------------------------------

def psnr(a, b):
    """Clips in [-1, 1] -> PSNR (dB) over all frames, on [0, 1]."""
    x, y = (a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2
    mse = ((x - y) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a, b):
    """Mean SSIM (11x11 Gaussian window, sigma 1.5) over frames and channels, on [0, 1]."""
    import torch
    import torch.nn.functional as F
    x = ((a.clamp(-1, 1) + 1) / 2).float()
    y = ((b.clamp(-1, 1) + 1) / 2).float()
    C = x.shape[-4]
    x = x.reshape(-1, C, *x.shape[-3:]).transpose(1, 2).reshape(-1, C, *x.shape[-2:])
    y = y.reshape(-1, C, *y.shape[-3:]).transpose(1, 2).reshape(-1, C, *y.shape[-2:])
    n = min(11, x.shape[-1])
    g = torch.exp(-((torch.arange(n, dtype=torch.float32) - (n - 1) / 2) ** 2) / (2 * 1.5 ** 2))
    g = (g / g.sum()).to(x.device)
    w = (g[:, None] * g[None, :]).expand(C, 1, n, n).contiguous()

    def f(z):
        return F.conv2d(z, w, groups=C)
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return m.mean().item()


# ---- one setting ----------------------------------------------------------------------------

class LiteRecorder:
    """attn(layer, q, k, v) through one LiteAttention per layer; per-call stats kept, each
    call's step counted here (one call per layer and step: guidance is batched).

    refresh R > 0: every R steps (steps R, 2R, ...) each layer's masks start again from all
    ones. Done through the daemon's restart rule (docs/SKIP-SEMANTICS.md, "Generations restart
    dense"): the module's step index is rewound to 0, a step below the layer's last, so the
    daemon sets the layer's masks to all ones before the call and that call votes afresh. R
    must be even (the visiting direction follows the step's parity) and is meant for fixed
    thresholds (a profile would be indexed by the rewound step)."""

    def __init__(self, liteattn, ctx, layers, threshold, profile, timed=True, refresh=0):
        self.mods = [liteattn.LiteAttention(threshold=threshold, context=ctx, profile=profile)
                     for _ in range(layers)]
        self.calls = []
        self.events = []
        self.timed = timed
        self.refresh = int(refresh)
        self.steps = [0] * layers

    def new_generation(self):
        self.calls, self.events = [], []
        self.steps = [0] * len(self.mods)

    def __call__(self, layer, q, k, v):
        m = self.mods[layer]
        step = self.steps[layer]
        self.steps[layer] += 1
        if self.refresh and step and step % self.refresh == 0:
            m._step = 0   # below the layer's last step: the daemon restarts its masks
        ev = None
        if self.timed and q.is_cuda:   # the call's span on the caller's stream, as SdpaTimer
            import torch
            ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev[0].record()
        out = m(q, k, v)
        if ev is not None:
            ev[1].record()
            self.events.append(ev)
        lc = m.last_call
        self.calls.append((layer, step, lc.get("tiles_total", 0),
                           lc.get("tiles_computed", 0), lc.get("compute_ns", 0)))
        return out

    def seconds(self):
        """GPU: the calls' spans on the caller's stream (kernel and daemon path, what a
        synchronous caller waits for), or None on the CPU (then the daemon's compute time)."""
        if not self.events:
            return None
        import torch
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.events) / 1e3


class SdpaTimer:
    """SDPA with the time of each call measured (CUDA events on a GPU, else wall clock)."""

    def __init__(self, cuda):
        self.cuda = cuda
        self.events = []
        self.wall = 0.0

    def __call__(self, layer, q, k, v):
        import torch
        import toydit as M
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = M.sdpa_attention(layer, q, k, v)
            b.record()
            self.events.append((a, b))
            return out
        t = time.perf_counter()
        out = M.sdpa_attention(layer, q, k, v)
        self.wall += time.perf_counter() - t
        return out

    def seconds(self):
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.events) / 1e3
        return self.wall


def per_step_tables(calls, layers, steps):
    tot = [[0] * steps for _ in range(layers)]
    comp = [[0] * steps for _ in range(layers)]
    ns = 0
    for layer, step, t, c, n in calls:
        if 0 <= step < steps:
            tot[layer][step] += t
            comp[layer][step] += c
        ns += n
    live = [[(comp[l][s] / tot[l][s]) if tot[l][s] else 1.0 for s in range(steps)]
            for l in range(layers)]
    T, Cc = sum(map(sum, tot)), sum(map(sum, comp))
    return live, (1 - Cc / T) if T else 0.0, ns / 1e9


def run_setting(name, liteattn, socket, model, noise, labels, hs, args, dtype, threshold=-3.0,
                profile=None, ctx_kwargs=None, seed_gens=(), order="raster", refresh=0):
    """One setting. ctx_kwargs: the Context's options (default warm=False: a cold start);
    seed_gens: (noise, labels) of generations run first in the same context, whose masks a
    warm context deposits for the measured one; order: the model's token order for this
    setting (toydit.token_order); refresh: see LiteRecorder."""
    model.set_token_order(order)
    try:
        return _run_setting(name, liteattn, socket, model, noise, labels, hs, args, dtype,
                            threshold, profile, ctx_kwargs, seed_gens, refresh)
    finally:
        model.set_token_order("raster")


def _run_setting(name, liteattn, socket, model, noise, labels, hs, args, dtype, threshold,
                 profile, ctx_kwargs, seed_gens, refresh):
    import torch
    import toydit as M
    cfg = model.cfg
    ctx = liteattn.Context(socket=socket, **(ctx_kwargs or {"warm": False}))
    rec = LiteRecorder(liteattn, ctx, cfg.depth, threshold, profile, refresh=refresh)
    for n2, l2 in seed_gens:
        ctx.new_generation(steps=args.steps)
        rec.new_generation()
        M.sample(model, n2, l2, steps=args.steps, cfg_scale=args.cfg_scale, attn=rec,
                 dtype=dtype)
        ctx.end_generation()
    rec.new_generation()
    ctx.new_generation(steps=args.steps)
    sync = torch.cuda.synchronize if noise.is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    x = M.sample(model, noise, labels, steps=args.steps, cfg_scale=args.cfg_scale, attn=rec,
                 dtype=dtype)
    sync()
    wall = time.perf_counter() - t
    sess = ctx.session
    info = sess.info() if sess is not None else {}
    extra = {"warm_key": (info.get("warm") or {}).get("key"),
             "warm_generations": (info.get("warm") or {}).get("generations", 0),
             "warm_status": (info.get("warm") or {}).get("status", ""),
             "guard_checks": info.get("guard_checks", 0),
             "guard_rows": info.get("guard_rows", 0),
             "guard_restored": info.get("guard_restored", 0),
             "guard_tiles": info.get("guard_tiles", 0)}
    ctx.end_generation()
    if rec.calls and not any(c[2] for c in rec.calls):
        raise RuntimeError("%s: no call reported its tiles (a fast-path call answers without "
                           "figures): nothing to measure" % name)
    live, skipped, attn_s = per_step_tables(rec.calls, cfg.depth, args.steps)
    compute_s = attn_s          # the daemon's per-call compute time, summed
    span_s = rec.seconds()
    if span_s is not None:
        attn_s = span_s
    first = first_steps_skipped(rec.calls, min(2, args.steps))
    # held-out denoising loss with skipping on, teacher-forced along the schedule
    rec2 = LiteRecorder(liteattn, ctx, cfg.depth, threshold, profile, timed=False,
                        refresh=refresh)
    ctx.new_generation()
    hl = heldout_trajectory_loss(model, hs, args, dtype, rec2)
    ctx.end_generation()
    ctx.close()
    _, hskip, _ = per_step_tables(rec2.calls, cfg.depth, args.steps)
    r = {"name": name, "x": x, "live": live, "skipped": skipped, "attn_s": attn_s,
         "daemon_compute_s": compute_s,
         "wall_s": wall, "heldout_loss": hl, "heldout_skipped": hskip,
         "first_steps_skipped": first}
    r.update(extra)
    return r


def tau_name(tau, order="raster", refresh=0):
    """The name of a fixed-threshold setting."""
    return "tau %g" % tau + ("" if order == "raster" else " " + order) + \
        ("" if not refresh else " refresh %d" % refresh)


def first_steps_skipped(calls, n):
    """Fraction of tiles skipped at each of the first n steps (all layers)."""
    tot, comp = [0] * n, [0] * n
    for layer, step, t, c, _ in calls:
        if 0 <= step < n:
            tot[step] += t
            comp[step] += c
    return [(1 - comp[i] / tot[i]) if tot[i] else 0.0 for i in range(n)]


def heldout_trajectory_loss(model, hs, args, dtype, attn):
    import torch
    import toydit as M
    clips, labels, noise = hs
    sg = M.sigmas(args.steps, args.shift, clips.device)
    tot = 0.0
    with torch.no_grad():
        for i in range(args.steps):
            t = sg[i]
            xt = (1 - t) * clips + t * noise
            with torch.autocast(clips.device.type, dtype=dtype, enabled=dtype != torch.float32):
                v = model(xt.to(dtype), t.expand(clips.shape[0]), labels, attn=attn).float()
            tot += ((v - (noise - clips)) ** 2).mean().item()
    return tot / args.steps


# ---- plots ----------------------------------------------------------------------------------

def plot_live(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rs = [r for r in results if r.get("live") is not None]
    n = len(rs)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    im = None
    for ax, r in zip(axes.flat, rs):
        im = ax.imshow(r["live"], aspect="auto", vmin=0, vmax=1, cmap="viridis",
                       interpolation="nearest")
        ax.set_title("%s: %.0f%% skipped" % (r["name"], 100 * r["skipped"]), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="live fraction (tiles computed)")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_pareto(results, path, cap=60.0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    groups = (("fixed tau", lambda r: r["kind"] == "tau", "o-"),
              ("calibrated, per step", lambda r: r["kind"] == "profile-step", "s--"),
              ("calibrated, per layer", lambda r: r["kind"] == "profile-layer", "^--"),
              ("fixed tau from a later step", lambda r: r["kind"] == "delayed", "v:"),
              ("warm start", lambda r: r["kind"] == "warm", "D:"),
              ("guardrail on", lambda r: r["kind"] == "guard", "X:"),
              ("guardrail off (same tau)", lambda r: r["kind"] == "guard-off", "x:"))
    for ax, xkey, xlabel in ((a1, "time_ratio", "attention time / liteattn dense"),
                             (a2, "skipped", "fraction of tiles skipped")):
        for label, pred, st in groups:
            rs = sorted([r for r in results if pred(r)], key=lambda r: r[xkey])
            if not rs:
                continue
            ax.plot([r[xkey] for r in rs], [min(cap, r["psnr"]) for r in rs], st, label=label)
            for r in rs:
                ax.annotate(r["name"].replace("calibrated ", ""),
                            (r[xkey], min(cap, r["psnr"])), fontsize=7,
                            textcoords="offset points", xytext=(4, 3))
        for r in results:
            if r["kind"] == "dense":
                ax.plot([r[xkey]], [min(cap, r["psnr"])], "k*", ms=12,
                        label="%s (PSNR %s)" % (r["name"], "inf" if math.isinf(r["psnr"])
                                                 else "%.1f" % r["psnr"]))
        ax.axhline(30, color="r", ls=":", lw=1, label="30 dB")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final-clip PSNR vs dense SDPA (dB, capped at %g)" % cap)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    a2.axvline(0.4, color="r", ls=":", lw=1)
    fig.suptitle("toy video DiT, 50 Euler steps with CFG: quality against attention saved")
    fig.tight_layout()
    fig.savefig(path, dpi=85)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------

def start_daemon(build, backend):
    exe = os.path.join(build, "liteattnd")
    if not os.access(exe, os.X_OK):
        return None, None, "no daemon at %s (run make)" % exe
    d = tempfile.mkdtemp(prefix="liteattn-quality-")
    sock = os.path.join(d, "liteattn.sock")
    logf = open(os.path.join(d, "daemon.log"), "wb")
    proc = subprocess.Popen([exe, "--socket", sock, "--backend", backend, "--foreground",
                             "--log-level", "warn"], stdout=logf, stderr=subprocess.STDOUT)
    proc.tmpdir = d
    for _ in range(400):
        if os.path.exists(sock) or proc.poll() is not None:
            break
        time.sleep(0.025)
    time.sleep(0.05)
    if proc.poll() is not None:
        return None, None, "liteattnd exited at start: %s" % open(logf.name).read()[-500:]
    return proc, sock, None


def stop_daemon(proc):
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(proc.tmpdir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny random-weights model, 2 steps, CPU backend (make check)")
    ap.add_argument("--out", help="output folder (default: a temporary one with --smoke, "
                                  "else bench/quality/out)")
    ap.add_argument("--checkpoint", default=CKPT, help="checkpoint prefix (…-00.pt)")
    ap.add_argument("--build", default=os.environ.get("LITEATTN_BUILD_DIR")
                    or os.path.join(REPO, "build"))
    ap.add_argument("--socket", help="use this running daemon instead of starting one")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--taus", default="-10,-6,-3,-1")
    ap.add_argument("--targets-step", default="0.01,0.03",
                    help="per-call error targets of the per-step profiles")
    ap.add_argument("--targets-layer", default="0.01,0.02,0.04",
                    help="per-call error targets of the per-layer profiles")
    ap.add_argument("--seeds", default="11,12", help="noise seeds of the evaluated clips")
    ap.add_argument("--labels", default="1,8", help="their labels")
    ap.add_argument("--calib-seed", type=int, default=100)
    ap.add_argument("--calib-label", type=int, default=4)
    ap.add_argument("--candidates", default="-inf,-12,-10,-8,-6,-5,-4,-3,-2,-1",
                    help="thresholds the calibration chooses from")
    ap.add_argument("--deadline", type=float, default=0,
                    help="seconds: settings not started by then are left out (0: none)")
    ap.add_argument("--delayed", default="",
                    help="fixed thresholds that start deciding late: TAU@STEP,... (the calls "
                         "before STEP keep every tile: their threshold is -inf)")
    ap.add_argument("--warm-taus", default="-6,-3",
                    help="thresholds of the warm-start settings (each against its cold tau)")
    ap.add_argument("--warm-seeds", default="21,22;31,32;41,42",
                    help="noise seeds of the generations that seed the warm start, one "
                         "generation per ';' (as many clips as --seeds)")
    ap.add_argument("--warm-labels", default="2,9;5,10;7,3", help="their labels")
    ap.add_argument("--warm-generations", type=int, default=4)
    ap.add_argument("--warm-margin", type=int, default=1)
    ap.add_argument("--warm-dense-steps", type=int, default=1)
    ap.add_argument("--guard-taus", default="0,-6",
                    help="thresholds run with the guardrail off and on (an aggressive one, a "
                         "sane one)")
    ap.add_argument("--guard-every", type=int, default=1)
    ap.add_argument("--guard-sample", type=int, default=4, help="q-tiles per checked call")
    ap.add_argument("--guard-budget", type=float, default=0.05)
    ap.add_argument("--token-orders", default="raster",
                    help="token orders of the fixed-threshold and calibrated settings, each "
                         "a setting of its own (a profile is calibrated in each order): "
                         "raster, zorder, morton:PATTERN (e.g. morton:thw, time bits lowest), "
                         "blocks:bt,bh,bw (liteattn.order); the first one is also that of "
                         "every other setting. Dense SDPA always runs in raster order")
    ap.add_argument("--refresh", default="0",
                    help="even step counts R: fixed-threshold settings whose masks start again "
                         "from all ones every R steps, each a setting of its own (0: never)")
    args = ap.parse_args()
    # token orders "blocks:..." hold commas: orders are split on "," outside a "blocks:" spec
    args.orders = []
    for part in args.token_orders.split(","):
        if args.orders and args.orders[-1].startswith("blocks:") and \
                args.orders[-1].count(",") < 2:
            args.orders[-1] += "," + part
        elif part:
            args.orders.append(part)
    args.orders = args.orders or ["raster"]
    try:
        args.refreshes = [int(r) for r in args.refresh.split(",") if r] or [0]
    except ValueError as e:
        raise SystemExit("run.py: --refresh: %s" % e)
    if any(r < 0 or r % 2 for r in args.refreshes):
        raise SystemExit("run.py: --refresh: even step counts >= 0 (the visiting direction "
                         "follows the step's parity), not %s" % args.refresh)
    # The figures of every (layer, step) come back with each call on the synchronous path;
    # the fast path (the module's default on CUDA) answers without them (last_call is empty).
    os.environ["LITEATTN_FASTPATH"] = "0"
    try:
        import torch
    except ImportError:
        print("quality: skipped: PyTorch is not installed (README.md, \"Quick start\", says "
              "how to add it in a virtual environment)")
        return 0
    _paths()
    if args.smoke:
        args.steps = 2
        args.targets_step, args.targets_layer = "0.02", "0.02"
        args.taus = "-3"
        args.warm_taus, args.guard_taus = "-3", "0,-3"
        args.warm_seeds, args.warm_labels = "21,22", "2,9"
    try:
        import liteattn
        liteattn.library_path()
        import liteattn.calibrate as LC
    except ImportError as e:
        print("quality: skipped: the liteattn library is not available (%s)" % e)
        return 0
    import data as D
    import toydit as M
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out = args.out or (tempfile.mkdtemp(prefix="quality-smoke-") if args.smoke
                       else os.path.join(HERE, "out"))
    os.makedirs(out, exist_ok=True)
    proc, sock = None, args.socket
    if sock is None:
        proc, sock, why = start_daemon(args.build, "cuda" if dev.type == "cuda" else "cpu")
        if why:
            print("quality: skipped: %s" % why)
            return 0
    try:
        return _main(args, torch, liteattn, LC, D, M, dev, dtype, out, sock)
    finally:
        stop_daemon(proc)
        if args.smoke and not args.out:
            shutil.rmtree(out, ignore_errors=True)


def _main(args, torch, liteattn, LC, D, M, dev, dtype, out, sock):
    model, meta = get_model(args.checkpoint, args.smoke, dev)
    cfg = model.cfg
    for o in args.orders:
        try:
            M.token_order(cfg.grid, o)
        except ValueError as e:
            raise SystemExit("run.py: --token-orders: %s" % e)
    log("model: %.2fM params, %d tokens, %s weights, device %s, daemon %s" % (
        model.num_params() / 1e6, cfg.tokens, meta.get("weights"), dev, sock))
    seeds = [int(s) for s in args.seeds.split(",")]
    labs = [int(s) for s in args.labels.split(",")][:len(seeds)]
    noise = make_noise(cfg, seeds, dev)
    labels = torch.tensor(labs, device=dev)
    maker = D.ClipMaker(cfg.frames, cfg.size, bank_size=16 if args.smoke else 512,
                        tex_size=64 if args.smoke else 128, seed=0, device=dev)
    g = torch.Generator(device=dev).manual_seed(1234)
    hclips, hlabels = maker.make(4, g, torch.arange(4, device=dev) * 3)
    hnoise = torch.randn(hclips.shape, generator=g, device=dev)
    hs = (hclips, hlabels, hnoise)
    # dense reference
    timer = SdpaTimer(dev.type == "cuda")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    xd = M.sample(model, noise, labels, steps=args.steps, cfg_scale=args.cfg_scale,
                  attn=timer, dtype=dtype)
    sync()
    dense_wall = time.perf_counter() - t
    sdpa_s = timer.seconds()
    hl_dense = heldout_trajectory_loss(model, hs, args, dtype, None)
    log("dense SDPA: %.2f s per generation (attention %.3f s), held-out loss %.4f"
        % (dense_wall, sdpa_s, hl_dense))
    results = [{"name": "dense SDPA", "kind": "dense", "x": xd, "live": None, "skipped": 0.0,
                "attn_s": sdpa_s, "wall_s": dense_wall, "heldout_loss": hl_dense,
                "heldout_skipped": 0.0}]
    settings = [("liteattn tau -inf", "tau", -math.inf, None)]
    variants = {}   # setting name -> (token order, refresh)
    for tau in (float(x) for x in args.taus.split(",") if x):
        for order in args.orders:
            for rf in args.refreshes:
                nm = tau_name(tau, order, rf)
                settings.append((nm, "tau", tau, None))
                variants[nm] = (order, rf)
    res_key = "%dx%dx%d" % (cfg.frames, cfg.size, cfg.size)
    name = "toydit-%s" % ("smoke" if args.smoke else "%.0fM" % (model.num_params() / 1e6))
    calib_order = {}   # index into settings of a calibration -> its token order
    for kind, targets in (("profile-step", args.targets_step), ("profile-layer",
                                                                  args.targets_layer)):
        for t in (x for x in targets.split(",") if x):
            for order in args.orders:   # calibrated in each order, from its own calls
                calib_order[len(settings)] = order
                settings.append((None, kind, float(t), None))
    for spec in (x for x in args.delayed.split(",") if x):
        tau_s, _, k_s = spec.partition("@")
        tau, k = float(tau_s), int(k_s or 0)
        if not 0 <= k < args.steps:
            raise SystemExit("run.py: --delayed %s: the first skipping step must be in [0, %d)"
                             % (spec, args.steps))
        # calls before step k decide nothing (tau -inf); from step k on, tau
        sched = [-math.inf] * k + [tau] * (args.steps - k)
        settings.append(("tau %g from step %d" % (tau, k), "delayed", tau,
                         LC.Profile(sched, model=name, resolution=res_key, steps=args.steps)))
    settings += [("warm tau %g" % float(t), "warm", float(t), None)
                 for t in args.warm_taus.split(",") if t]
    for t in (x for x in args.guard_taus.split(",") if x):
        tau = float(t)
        if tau_name(tau, args.orders[0]) not in [nm for nm, _, _, _ in settings]:
            settings.append(("guard off tau %g" % tau, "guard-off", tau, None))
        settings.append(("guard tau %g" % tau, "guard", tau, None))
    seed_gens = []
    for sd, lb in zip(args.warm_seeds.split(";"), args.warm_labels.split(";")):
        ss = [int(x) for x in sd.split(",")][:len(seeds)]
        ll = [int(x) for x in lb.split(",")][:len(ss)]
        seed_gens.append((make_noise(cfg, ss, dev), torch.tensor(ll, device=dev)))
    run_tag = "%d-%d" % (os.getpid(), int(time.time()))
    profiles, left_out = [], []
    for si, (nm, kind, tau, prof) in enumerate(settings):
        if args.deadline and time.perf_counter() - T0 > args.deadline:
            left_out.append(nm or "%s %g" % (kind, tau))
            continue
        if nm is None:   # calibrate, through the liteattn-calibrate command's entry point
            pl = kind == "profile-layer"
            tgt = "%g" % tau
            corder = calib_order[si]
            sfx = "" if corder == args.orders[0] else " " + corder
            nm = "calibrated %s %s%s" % ("layer" if pl else "step", tgt, sfx)
            variants[nm] = (corder, 0)
            path = os.path.join(out, "profile-%s-%s%s.json" % (
                "layer" if pl else "step", tgt, sfx.replace(" ", "-").replace(":", "-")
                .replace(",", "-")))
            argv = ["--run", os.path.join(HERE, "run.py") + ":calibration_generate",
                    "--arg", "smoke=%d" % int(args.smoke), "--arg", "checkpoint=" +
                    args.checkpoint, "--arg", "seed=%d" % args.calib_seed,
                    "--arg", "label=%d" % args.calib_label, "--arg", "steps=%d" % args.steps,
                    "--arg", "cfg_scale=%g" % args.cfg_scale, "--arg",
                    "order=" + corder,
                    "--target", tgt, "--model", name, "--resolution", res_key,
                    "--steps", str(args.steps), "--out", path, "--socket", sock,
                    "--candidates=" + args.candidates]
            if pl:
                argv.append("--per-layer")
            tc = time.perf_counter()
            LC.main(argv)
            prof = LC.load_profile(path, model=name, resolution=res_key, steps=args.steps)
            log("calibrated %s in %.1f s: schedule %s" % (
                nm, time.perf_counter() - tc, " ".join("%g" % x for x in prof.schedule)))
            profiles.append(path)
            tau = -3.0
        ctx_kwargs, pre = None, ()
        if kind == "warm":
            ctx_kwargs = {"warm": "quality:%s:%s:tau%g" % (name, run_tag, tau),
                          "warm_generations": args.warm_generations,
                          "warm_margin": args.warm_margin,
                          "warm_dense_steps": args.warm_dense_steps}
            pre = seed_gens
        elif kind == "guard":
            ctx_kwargs = {"warm": False, "guard_every": args.guard_every,
                          "guard_sample": args.guard_sample, "guard_budget": args.guard_budget}
        order, rf = variants.get(nm, (args.orders[0], 0))
        r = run_setting(nm, liteattn, sock, model, noise, labels, hs, args, dtype,
                        threshold=tau, profile=prof, ctx_kwargs=ctx_kwargs, seed_gens=pre,
                        order=order, refresh=rf)
        r["kind"] = kind
        r["token_order"], r["refresh"] = order, rf
        r["tau"] = None if prof is not None or math.isinf(tau) else tau
        results.append(r)
        log("%-24s skipped %5.1f%%  attention %.4f s  wall %.2f s  held-out %.4f%s" % (
            nm, 100 * r["skipped"], r["attn_s"], r["wall_s"], r["heldout_loss"],
            ("  warm from %d generations" % r["warm_generations"]) if kind == "warm" else
            ("  guardrail: %d checks, %d rows restored" % (r["guard_checks"],
                                                          r["guard_restored"]))
            if kind == "guard" else ""))
    if left_out:
        log("left out (past the deadline): %s" % ", ".join(left_out))
    base = next(r for r in results if r["name"] == "liteattn tau -inf")["attn_s"]
    for r in results:
        r["psnr"] = psnr(r["x"], xd)
        r["ssim"] = ssim(r["x"], xd)
        r["rel_l1"] = ((r["x"] - xd).abs().sum() / xd.abs().sum().clamp_min(1e-12)).item()
        r["time_ratio"] = r["attn_s"] / base if base else float("nan")
        r["vs_sdpa"] = r["attn_s"] / sdpa_s if sdpa_s else float("nan")
        r["psnr_per_clip"] = [psnr(r["x"][i], xd[i]) for i in range(xd.shape[0])]
    try:
        plot_live(results, os.path.join(out, "live.png"))
        plot_pareto(results, os.path.join(out, "pareto.png"))
    except ImportError as e:
        log("no plots (%s)" % e)
    # the best setting meeting 30 dB
    ok = [r for r in results if r["kind"] != "dense" and r["psnr"] >= 30]
    best = max(ok, key=lambda r: r["skipped"]) if ok else None
    met = best is not None and best["skipped"] >= 0.4
    bfix = max([r for r in ok if r["kind"] == "tau"], key=lambda r: r["skipped"], default=None)
    bcal = max([r for r in ok if r["kind"].startswith("profile")], key=lambda r: r["skipped"],
               default=None)
    dev_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    rows = []
    for r in results:
        rows.append({k: r[k] for k in ("name", "kind", "skipped", "psnr", "ssim", "rel_l1",
                                       "heldout_loss", "heldout_skipped", "attn_s",
                                       "time_ratio", "vs_sdpa", "wall_s", "psnr_per_clip")})
        rows[-1]["live_per_layer_step"] = r["live"]
        for k in ("first_steps_skipped", "warm_key", "warm_generations", "warm_status",
                  "guard_checks", "guard_rows", "guard_restored", "guard_tiles", "tau",
                  "daemon_compute_s", "token_order", "refresh"):
            if k in r:
                rows[-1][k] = r[k]
    by_name = {r["name"]: r for r in results}
    warm_cmp, guard_cmp = [], []
    for r in results:
        if r["kind"] == "warm":
            c = by_name.get(tau_name(r["tau"], args.orders[0]))
            warm_cmp.append({"tau": r["tau"], "warm_generations": r["warm_generations"],
                             "warm_skipped": r["skipped"], "warm_psnr": r["psnr"],
                             "warm_first_steps_skipped": r["first_steps_skipped"],
                             "cold_skipped": c["skipped"] if c else None,
                             "cold_psnr": c["psnr"] if c else None,
                             "cold_first_steps_skipped": c["first_steps_skipped"] if c else None,
                             "warm_time_ratio": r["time_ratio"],
                             "cold_time_ratio": c["time_ratio"] if c else None})
        if r["kind"] == "guard":
            c = by_name.get(tau_name(r["tau"], args.orders[0])) or \
                by_name.get("guard off tau %g" % r["tau"])
            guard_cmp.append({"tau": r["tau"], "on_skipped": r["skipped"], "on_psnr": r["psnr"],
                              "off_skipped": c["skipped"] if c else None,
                              "off_psnr": c["psnr"] if c else None,
                              "on_time_ratio": r["time_ratio"],
                              "off_time_ratio": c["time_ratio"] if c else None,
                              "checks": r["guard_checks"], "rows_checked": r["guard_rows"],
                              "rows_restored": r["guard_restored"],
                              "sample_tiles": r["guard_tiles"]})
    summary = {"device": dev_name, "torch": torch.__version__, "model": name,
               "params": model.num_params(), "tokens": cfg.tokens, "steps": args.steps,
               "cfg_scale": args.cfg_scale, "seeds": seeds, "labels": labs,
               "calibration": {"seed": args.calib_seed, "label": args.calib_label},
               "liteattn_tile": None, "sdpa_attention_s": sdpa_s,
               "target_40pct_at_30db_met": met,
               "best_at_30db": best["name"] if best else None,
               "best_fixed_at_30db": bfix["name"] if bfix else None,
               "best_calibrated_at_30db": bcal["name"] if bcal else None,
               "results": rows, "profiles": [os.path.basename(p) for p in profiles],
               "warm_start": {"options": {"generations": args.warm_generations,
                                          "margin": args.warm_margin,
                                          "dense_steps": args.warm_dense_steps,
                                          "seed_generations": len(seed_gens),
                                          "seeds": args.warm_seeds, "labels": args.warm_labels},
                              "vs_cold": warm_cmp},
               "guardrail": {"options": {"every": args.guard_every, "sample": args.guard_sample,
                                         "budget": args.guard_budget},
                             "vs_off": guard_cmp},
               "left_out": left_out,
               "checkpoint_meta": {k: meta.get(k) for k in ("command", "steps",
                                                            "train_seconds", "weights")}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = ["| setting | skipped | PSNR dB | SSIM | rel L1 | held-out loss (skipped) | "
             "attn time / liteattn dense | / SDPA | generation s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append("| %s | %.1f%% | %s | %.4f | %.2e | %.4f (%.0f%%) | %.3f | %.3f | %.2f |" % (
            r["name"], 100 * r["skipped"], "inf" if math.isinf(r["psnr"]) else "%.2f" % r["psnr"],
            r["ssim"], r["rel_l1"], r["heldout_loss"], 100 * r["heldout_skipped"],
            r["time_ratio"], r["vs_sdpa"], r["wall_s"]))
    def db(v):
        return "-" if v is None else "inf" if math.isinf(v) else "%.2f" % v

    def pct(v):
        return "-" if v is None else "%.1f%%" % (100 * v)
    if warm_cmp:
        lines += ["", "Warm start (seeded from %d generations with other seeds and labels; OR of "
                  "%d, margin %d, %d dense first step(s)) against the cold start:" % (
                      len(seed_gens), args.warm_generations, args.warm_margin,
                      args.warm_dense_steps), "",
                  "| tau | skipped cold | skipped warm | first steps skipped cold | warm | "
                  "PSNR cold | PSNR warm | attn time cold | warm |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for w in warm_cmp:
            lines.append("| %g | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                w["tau"], pct(w["cold_skipped"]), pct(w["warm_skipped"]),
                " / ".join(pct(x) for x in (w["cold_first_steps_skipped"] or [])),
                " / ".join(pct(x) for x in w["warm_first_steps_skipped"]), db(w["cold_psnr"]),
                db(w["warm_psnr"]), "-" if w["cold_time_ratio"] is None
                else "%.3f" % w["cold_time_ratio"], "%.3f" % w["warm_time_ratio"]))
    if guard_cmp:
        lines += ["", "Quality guardrail (every %d steps, %d q-tiles, budget %g) against the same "
                  "threshold without it:" % (args.guard_every, args.guard_sample,
                                             args.guard_budget), "",
                  "| tau | skipped off | skipped on | PSNR off | PSNR on | attn time off | on | "
                  "checks | rows restored / checked |", "|---|---|---|---|---|---|---|---|---|"]
        for g in guard_cmp:
            lines.append("| %g | %s | %s | %s | %s | %s | %.3f | %d | %d / %d |" % (
                g["tau"], pct(g["off_skipped"]), pct(g["on_skipped"]), db(g["off_psnr"]),
                db(g["on_psnr"]), "-" if g["off_time_ratio"] is None
                else "%.3f" % g["off_time_ratio"], g["on_time_ratio"], g["checks"],
                g["rows_restored"], g["rows_checked"]))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    tag = "smoke, random weights, %d steps, " % args.steps if args.smoke else ""
    if best is None:
        verdict = "no setting reached 30 dB"
    else:
        verdict = "most skipped at >=30 dB: %s, %.1f%% at %.1f dB" % (
            best["name"], 100 * best["skipped"], best["psnr"])
    print("quality: %s%d settings on %s; %s; target >=40%% skipped at >=30 dB %s"
          % (tag, len(results), dev_name, verdict, "met" if met else "not met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
