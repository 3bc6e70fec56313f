"""Threshold calibration: per-step (optionally per-layer) thresholds from one dense reference
generation, and the profile files that sessions, LiteAttention and liteattn.diffusers.apply()
accept.

How it chooses. The model runs one generation with every self-attention call going through a
Calibrator (exact attention, computed with PyTorch, so the trajectory is the dense one). A
threshold used at step s only decides which tiles the calls from step s+1 on skip, so the
choice for step s is made when step s+1's q, k, v are known: for every candidate threshold the
daemon's dry run (decisions written to scratch, the session's masks untouched) gives the mask
that step s would leave behind, and the error of step s+1's attention under that mask is
measured against exact attention (relative L2 of the output over a sample of query rows,
computed here in fp32). Step s takes the largest candidate whose error stays within the target
(per layer, or the smallest such threshold over the layers for one schedule per step); then
step s is run for real in skip mode with that threshold, so the session's masks follow the
chosen profile, and the dry runs of step s+1 start from them. The last step's threshold is
irrelevant (no call follows it) and copies the one before.

Profile (JSON): {"format": "liteattn-profile/1", "model", "resolution", "steps", "target",
"metric", "schedule": [per-step tau], "layers": [[per-step tau] per layer] or null, "stats"};
tau -inf is written as null.

Command line (installed as liteattn-calibrate):

    liteattn-calibrate --run my_model.py:generate --target 0.01 --model my-dit \\
        --resolution 16x64x64 --steps 50 --out profile.json [--per-layer] [--socket S]

where generate(attention, **args) runs one dense generation, calling attention(layer, q, k, v)
(q, k, v: torch tensors (B, S, H, D)) for every self-attention call in layer order, each step
the layers in the same order, and uses what it returns.
"""
import argparse
import importlib
import importlib.util
import json
import math
import os
import sys

__all__ = ["Profile", "load_profile", "Calibrator", "calibrate", "main"]

FORMAT = "liteattn-profile/1"
CANDIDATES = (-math.inf, -16.0, -14.0, -12.0, -10.0, -9.0, -8.0, -7.0, -6.0, -5.0, -4.0,
              -3.0, -2.0, -1.0, 0.0)


def _enc(x):
    return None if x is None or (isinstance(x, float) and math.isinf(x) and x < 0) else float(x)


def _dec(x):
    return -math.inf if x is None else float(x)


class Profile:
    """Thresholds per step (and optionally per layer). threshold(layer, step) is what a call
    uses; steps past the end use the last entry."""

    def __init__(self, schedule, layers=None, model=None, resolution=None, steps=None,
                 target=None, metric="rel_l2", stats=None):
        self.schedule = [float(x) for x in schedule]
        self.layers = [[float(x) for x in row] for row in layers] if layers else None
        self.model, self.resolution = model, resolution
        self.steps = int(steps) if steps is not None else len(self.schedule)
        self.target, self.metric, self.stats = target, metric, stats or {}

    def threshold(self, layer, step):
        if self.layers and 0 <= layer < len(self.layers):
            row = self.layers[layer]
        else:
            row = self.schedule
        return row[min(max(0, int(step)), len(row) - 1)]

    @property
    def key(self):
        return "%s/%s/%s" % (self.model, self.resolution, self.steps)

    def to_dict(self):
        return {"format": FORMAT, "model": self.model, "resolution": self.resolution,
                "steps": self.steps, "target": self.target, "metric": self.metric,
                "schedule": [_enc(x) for x in self.schedule],
                "layers": [[_enc(x) for x in row] for row in self.layers] if self.layers
                else None, "stats": self.stats}

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def __repr__(self):
        return "<liteattn.Profile %s target=%s %s>" % (
            self.key, self.target, "per layer" if self.layers else "per step")


def load_profile(profile, model=None, resolution=None, steps=None):
    """A Profile from a path, a dict (as written by Profile.save) or a Profile. model,
    resolution, steps: when given, they must match the profile's keys (ValueError if not)."""
    if isinstance(profile, Profile):
        p = profile
    else:
        d = profile
        if isinstance(profile, (str, bytes, os.PathLike)):
            with open(profile) as f:
                d = json.load(f)
        if d.get("format") != FORMAT:
            raise ValueError("not a liteattn profile (format %r)" % (d.get("format"),))
        p = Profile([_dec(x) for x in d["schedule"]],
                    [[_dec(x) for x in row] for row in d["layers"]] if d.get("layers") else None,
                    d.get("model"), d.get("resolution"), d.get("steps"), d.get("target"),
                    d.get("metric", "rel_l2"), d.get("stats"))
    for name, want in (("model", model), ("resolution", resolution), ("steps", steps)):
        have = getattr(p, name)
        if want is not None and have is not None and str(have) != str(want):
            raise ValueError("profile %s is for %s %s, not %s" % (p.key, name, have, want))
    return p


def _unpack(words, nK):
    """uint32 mask words (..., W) -> bool (..., nK) (bit n%32 of word n/32)."""
    import numpy as np
    import torch
    w = torch.as_tensor(np.ascontiguousarray(words).view(np.int32))
    bits = torch.arange(32, dtype=torch.int32)
    b = ((w.unsqueeze(-1) >> bits) & 1).bool()
    return b.flatten(-2)[..., :nK]


class Calibrator:
    """attention(layer, q, k, v) -> exact attention (B, S, H, D), and the greedy threshold
    choice described in the module docstring. finish() returns the Profile."""

    def __init__(self, client=None, socket=None, target=0.01, per_layer=False,
                 candidates=CANDIDATES, row_stride=8, model=None, resolution=None,
                 scale=None, device=None, log=None):
        from .client import Client
        self.client = client or Client(socket)
        self._own_client = client is None
        self.target = float(target)
        self.per_layer = bool(per_layer)
        self.candidates = sorted(set(float(c) for c in candidates))
        self.row_stride = max(1, int(row_stride))
        self.model, self.resolution = model, resolution
        self.scale = scale
        self.device = device
        self.log = log or (lambda *a: None)
        self.session = None
        self.step = 0
        self.last_layer = None
        self.cur = {}        # layer -> (q, k, v) of the current step
        self.prev = {}       # layer -> (q, k, v) of the previous step
        self.dec = {}        # layer -> {tau: bool mask (B, H, nQ, nK)} from the previous step
        self.chosen = []     # per step: [tau per layer]
        self.errors = []     # per step: [error of the chosen tau per layer]
        self.live = []       # per step: [live fraction of the mask the chosen tau leaves]

    # -- the attention the model calls --
    def attention(self, layer, q, k, v):
        import torch.nn.functional as F
        if self.last_layer is not None and layer <= self.last_layer:
            self._end_step()
        self.last_layer = layer
        self.cur[layer] = (q.detach().clone(), k.detach().clone(), v.detach().clone())
        sc = {} if self.scale is None else {"scale": self.scale}
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), **sc).transpose(1, 2)

    __call__ = attention

    # -- the greedy choice --
    def _open(self):
        q, k, _ = self.cur[0]
        B, S, H, D = (int(x) for x in q.shape)
        key = "liteattn-calibrate-%d-%d" % (os.getpid(), id(self))
        kw = {} if self.device is None else {"device": self.device}
        self.session = self.client.open_session_for(
            q, key, layers=len(self.cur), heads=H, head_dim=D, dtype=str(q.dtype),
            max_seq_q=S, max_seq_k=int(k.shape[1]), batch=B, threshold=-math.inf, mode="skip",
            **kw)
        self.bm, self.bn = self.session.tile_sizes

    def _errors(self, layer, masks):
        """{tau: relative L2 error} of this step's attention of `layer` under each mask."""
        import torch
        q, k, v = self.cur[layer]
        B, S, H, D = q.shape
        Sk = k.shape[1]
        rows = torch.arange(0, S, self.row_stride, device=q.device)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(D)
        with torch.autocast(q.device.type, enabled=False):
            qs = q[:, rows].float().transpose(1, 2)                    # (B, H, n, D)
            kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)
            logits = (qs @ kf.transpose(-1, -2)) * scale              # (B, H, n, Sk)
            exact = logits.softmax(-1) @ vf
            norm = exact.norm().clamp_min(1e-30)
            qt = rows // self.bm
            kt = torch.arange(Sk, device=q.device) // self.bn
            out, seen = {}, {}
            for tau, m in masks.items():
                sig = m.numpy().tobytes()
                if sig in seen:
                    out[tau] = seen[sig]
                    continue
                mk = m.to(q.device)[:, :, qt][..., kt]                # (B, H, n, Sk)
                lg = logits.masked_fill(~mk, -math.inf)
                o = torch.nan_to_num(lg.softmax(-1)) @ vf
                e = ((o - exact).norm() / norm).item()
                seen[sig] = e
                out[tau] = e
        return out

    def _end_step(self):
        s = self.step
        if self.session is None:
            self._open()
        L = len(self.cur)
        if s >= 1:
            taus = []
            errs = {}
            for layer in range(L):
                errs[layer] = self._errors(layer, self.dec[layer])
                ok = [t for t in self.candidates if errs[layer][t] <= self.target]
                taus.append(max(ok) if ok else self.candidates[0])
            if not self.per_layer:
                taus = [min(taus)] * L
            self.chosen.append(taus)
            self.errors.append([errs[layer][taus[layer]] for layer in range(L)])
            self.live.append([float(self.dec[layer][taus[layer]].float().mean())
                              for layer in range(L)])
            for layer in range(L):   # the real call of step s-1: masks follow the profile
                q, k, v = self.prev[layer]
                self.session.attention(layer, s - 1, q, k, v, threshold=taus[layer],
                                       mode="skip", scale=self.scale)
        nK = -(-int(self.cur[0][1].shape[1]) // self.bn)
        for layer in range(L):       # dry runs of step s: what each candidate would leave
            q, k, v = self.cur[layer]
            d = {}
            for tau in self.candidates:
                _, dec = self.session.attention(layer, s, q, k, v, threshold=tau, mode="skip",
                                                scale=self.scale, dry_run=True)
                d[tau] = _unpack(dec, nK)
            self.dec[layer] = d
        self.prev, self.cur = self.cur, {}
        self.step += 1
        if s >= 1:
            self.log("calibrate: step %d: tau %s, error %.2e, live %.3f" % (
                s - 1, _fmt(self.chosen[-1]), max(self.errors[-1]),
                sum(self.live[-1]) / L))

    def finish(self):
        """Ends the generation and returns the Profile."""
        if self.cur:
            self._end_step()
        steps = self.step
        if self.chosen:
            self.chosen.append(list(self.chosen[-1]))   # the last step: no call follows
        L = len(self.chosen[0]) if self.chosen else 0
        layers = [[self.chosen[s][layer] for s in range(steps)] for layer in range(L)]
        schedule = [min(self.chosen[s]) for s in range(steps)] if L else []
        live = [sum(r) / len(r) for r in self.live]
        stats = {"mean_live_fraction_at_calibration": sum(live) / len(live) if live else 1.0,
                 "max_call_error": max(max(r) for r in self.errors) if self.errors else 0.0,
                 "candidates": [_enc(c) for c in self.candidates],
                 "row_stride": self.row_stride, "tiles": [self.bm, self.bn]
                 if self.session is not None else None}
        if self.session is not None:
            self.session.close()
            self.session = None
        if self._own_client:
            self.client.close()
        return Profile(schedule, layers if self.per_layer else None, self.model,
                       self.resolution, steps, self.target, "rel_l2", stats)


def _fmt(taus):
    u = sorted(set(taus))
    return ("%g" % u[0]) if len(u) == 1 else "%g..%g" % (u[0], u[-1])


def calibrate(generate, target=0.01, per_layer=False, **kw):
    """Runs generate(attention) once through a Calibrator and returns the Profile."""
    cal = Calibrator(target=target, per_layer=per_layer, **kw)
    generate(cal)
    return cal.finish()


def _load_callable(spec):
    if ":" not in spec:
        raise SystemExit("--run wants FILE.py:FUNCTION or MODULE:FUNCTION, got %r" % spec)
    mod, fn = spec.rsplit(":", 1)
    if mod.endswith(".py") or os.sep in mod:
        path = os.path.abspath(mod)
        sys.path.insert(0, os.path.dirname(path))
        sp = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(path))[0], path)
        m = importlib.util.module_from_spec(sp)
        sp.loader.exec_module(m)
    else:
        m = importlib.import_module(mod)
    return getattr(m, fn)


def _value(s):
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="liteattn-calibrate",
        description="Chooses per-step (or per-layer) liteattn thresholds meeting a target "
                    "per-call error from one dense generation; writes a profile (JSON).")
    ap.add_argument("--run", required=True, metavar="FILE.py:FUNC",
                    help="generate(attention, **args): one dense generation")
    ap.add_argument("--arg", action="append", default=[], metavar="K=V",
                    help="keyword arguments for the generate function")
    ap.add_argument("--target", type=float, default=0.01,
                    help="per-call relative L2 error of the attention output (default 0.01)")
    ap.add_argument("--per-layer", action="store_true", help="one schedule per layer")
    ap.add_argument("--model", required=True, help="the profile's model name")
    ap.add_argument("--resolution", required=True, help="the profile's resolution key")
    ap.add_argument("--steps", type=int, help="denoising steps (checked against the run)")
    ap.add_argument("--out", required=True, help="profile file to write")
    ap.add_argument("--socket", help="the daemon's socket (default: liteattn's default)")
    ap.add_argument("--device", help="session device (default: that of the tensors)")
    ap.add_argument("--candidates", help="comma-separated thresholds (default %s)"
                    % ",".join("%g" % c for c in CANDIDATES))
    ap.add_argument("--row-stride", type=int, default=8,
                    help="measure the error on every N-th query row (default 8)")
    args = ap.parse_args(argv)
    gen = _load_callable(args.run)
    kw = dict(a.split("=", 1) for a in args.arg)
    kw = {k: _value(v) for k, v in kw.items()}
    cands = CANDIDATES
    if args.candidates:
        cands = [(-math.inf if c.strip() in ("-inf", "none") else float(c))
                 for c in args.candidates.split(",")]
    cal = Calibrator(socket=args.socket, target=args.target, per_layer=args.per_layer,
                     candidates=cands, row_stride=args.row_stride, model=args.model,
                     resolution=args.resolution, device=args.device,
                     log=lambda m: print(m, file=sys.stderr))
    gen(cal, **kw)
    prof = cal.finish()
    if args.steps is not None and prof.steps != args.steps:
        raise SystemExit("the run made %d steps, not --steps %d" % (prof.steps, args.steps))
    prof.save(args.out)
    print("liteattn-calibrate: %s -> %s (mean live fraction at calibration %.3f)"
          % (prof, args.out, prof.stats["mean_live_fraction_at_calibration"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
