"""Attention structure of the toy DiT: the numbers real video DiTs show (mass within the
query's own frame, a stripe at the same spatial position fading with frame distance, spatial
locality, sink keys) and how many (row, key tile) pairs liteattn's rule could drop.

measure(model, clips, labels, t) runs one forward pass at noise level t with a recording
attention and returns, per layer (averaged over heads, clips and sampled query rows):
  same_frame      softmax mass on keys of the query's own latent frame (uniform: 1/T)
  local           mass on keys within +-2 tokens in h and w in the same frame (uniform: 25/S)
  stripe[d]       mean weight on the keys at the query's (h, w) at frame distance d, in units
                  of the uniform weight 1/S (d = 0 is the query's own token)
  frame_rest[d]   mean weight on the other keys of the frames at distance d, same units
  sink_top1pct    share of the mass that the 1% most attended keys receive (column sums)
  sink_max        the most attended key's column mean, in units of 1/S
  entropy         row entropy / log(S) (1 = uniform)
  tile_drop[tau]  share of (row, 128-key tile) pairs whose best score lies more than -tau
                  (log2 units) under the row's best score: what a perfect running max drops
"""
import math

import torch

TILE = 128
TAUS = (-10.0, -6.0, -3.0)


class _Recorder:
    def __init__(self, cfg, n_query, gen):
        self.cfg = cfg
        self.n_query = n_query
        self.gen = gen
        self.layers = {}
        T, H, W = cfg.grid
        S = T * H * W
        idx = torch.arange(S)
        self.ft, self.fh, self.fw = idx // (H * W), (idx // W) % H, idx % W

    def __call__(self, layer, q, k, v):
        with torch.autocast(q.device.type, enabled=False):
            self._record(layer, q, k)
        import torch.nn.functional as F
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2)).transpose(1, 2)

    def _record(self, layer, q, k):
        import torch.nn.functional as F
        cfg = self.cfg
        B, S, Hh, D = q.shape
        T, H, W = cfg.grid
        dev = q.device
        qi = torch.randperm(S, generator=self.gen)[:min(self.n_query, S)].to(dev)
        ft, fh, fw = (a.to(dev) for a in (self.ft, self.fh, self.fw))
        qs = q[:, qi].float().transpose(1, 2)              # (B, H, n, D)
        ks = k.float().transpose(1, 2)                     # (B, H, S, D)
        logits = qs @ ks.transpose(-1, -2) / math.sqrt(D)  # (B, H, n, S)
        p = logits.softmax(-1)
        same_t = ft[qi][:, None] == ft[None, :]            # (n, S)
        dt = (ft[qi][:, None] - ft[None, :]).abs()
        same_pos = (fh[qi][:, None] == fh[None, :]) & (fw[qi][:, None] == fw[None, :])
        near = same_t & ((fh[qi][:, None] - fh[None, :]).abs() <= 2) & \
            ((fw[qi][:, None] - fw[None, :]).abs() <= 2)
        r = {}
        r["same_frame"] = (p * same_t).sum(-1).mean().item()
        r["local"] = (p * near).sum(-1).mean().item()
        stripe, rest = [], []
        for d in range(T):
            m = (dt == d) & same_pos
            cnt = m.sum(-1).clamp_min(1)
            stripe.append(((p * m).sum(-1) / cnt * S).mean().item())
            mo = (dt == d) & ~same_pos
            cnto = mo.sum(-1).clamp_min(1)
            rest.append(((p * mo).sum(-1) / cnto * S).mean().item())
        r["stripe"] = stripe
        r["frame_rest"] = rest
        col = p.mean(2)                                    # (B, H, S)
        top = max(1, S // 100)
        r["sink_top1pct"] = col.topk(top, dim=-1).values.sum(-1).mean().item() / \
            col.sum(-1).mean().item()
        r["sink_max"] = (col.max(-1).values * S).mean().item()
        ent = -(p * (p.clamp_min(1e-30)).log()).sum(-1)
        r["entropy"] = (ent / math.log(S)).mean().item()
        nK = -(-S // TILE)
        pad = nK * TILE - S
        lg = F.pad(logits, (0, pad), value=-float("inf")) if pad else logits
        tmax = lg.view(B, Hh, -1, nK, TILE).amax(-1)       # (B, H, n, nK)
        rmax = logits.amax(-1, keepdim=True)
        gap = (tmax - rmax) * math.log2(math.e)            # log2 units, <= 0
        r["tile_drop"] = {str(tau): (gap <= tau).float().mean().item() for tau in TAUS}
        # One query's attention map (the middle token of the middle frame), head 0, clip 0.
        qc = (T // 2) * H * W + (H // 2) * W + W // 2
        lc = (q[0, qc, 0].float() @ k[0, :, 0].float().T) / math.sqrt(D)
        r["map"] = lc.softmax(-1).view(T, H, W).cpu()
        self.layers[layer] = r


@torch.no_grad()
def measure(model, clips, labels, t=0.5, n_query=256, seed=0, dtype=torch.bfloat16):
    """{layer: metrics} at noise level t (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    rec = _Recorder(model.cfg, n_query, gen)
    dev = clips.device
    noise = torch.randn(clips.shape, generator=torch.Generator(device=dev).manual_seed(seed),
                        device=dev)
    tt = torch.full((clips.shape[0],), float(t), device=dev)
    xt = (1 - t) * clips + t * noise
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        model(xt.to(dtype), tt, labels, attn=rec)
    return rec.layers


def summary(layers):
    """Means over layers of the scalar metrics, plus the stripe profiles averaged."""
    keys = ("same_frame", "local", "sink_top1pct", "sink_max", "entropy")
    n = len(layers)
    out = {k: sum(layers[i][k] for i in layers) / n for k in keys}
    T = len(next(iter(layers.values()))["stripe"])
    out["stripe"] = [sum(layers[i]["stripe"][d] for i in layers) / n for d in range(T)]
    out["frame_rest"] = [sum(layers[i]["frame_rest"][d] for i in layers) / n for d in range(T)]
    out["tile_drop"] = {k: sum(layers[i]["tile_drop"][k] for i in layers) / n
                        for k in next(iter(layers.values()))["tile_drop"]}
    return out


def strip_maps(layers):
    """Numbers only (drop the attention maps) for JSON."""
    return {str(i): {k: v for k, v in r.items() if k != "map"} for i, r in layers.items()}


def _label(ax, xlabel, ylabel, title):
    """The axis labels (ylabel None: none), the title and a small legend of one panel."""
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def figure(trained, control, path, uniform_frame):
    """PNG: per-layer same-frame and local mass, stripe profiles, and one query's attention
    map (middle layer) for the trained model and the random-weights control."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L = len(trained)
    fig = plt.figure(figsize=(15, 8.5))
    ax = fig.add_subplot(2, 3, 1)
    xs = list(range(L))
    for name, lay, st in (("trained", trained, "-o"), ("random weights", control, "--s")):
        ax.plot(xs, [lay[i]["same_frame"] for i in xs], st, label=name + ": same frame")
        ax.plot(xs, [lay[i]["local"] for i in xs], st, label=name + ": 5x5 neighbourhood",
                alpha=0.7)
    ax.axhline(uniform_frame, color="grey", lw=0.8, ls=":", label="uniform, same frame")
    _label(ax, "layer", "softmax mass", "mass near the query")
    ax = fig.add_subplot(2, 3, 2)
    for name, lay, st in (("trained", trained, "-"), ("random", control, "--")):
        s = summary(lay)
        ax.semilogy(range(len(s["stripe"])), s["stripe"], st + "o", label=name + ": same (h, w)")
        ax.semilogy(range(len(s["frame_rest"])), s["frame_rest"], st + "x",
                    label=name + ": rest of that frame")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    _label(ax, "frame distance", "weight per key / uniform",
           "stripe at the same position (mean over layers)")
    ax = fig.add_subplot(2, 3, 3)
    for name, lay, st in (("trained", trained, "-o"), ("random", control, "--s")):
        ax.plot(xs, [lay[i]["sink_top1pct"] for i in xs], st, label=name + ": top-1% keys' share")
        ax.plot(xs, [lay[i]["entropy"] for i in xs], st, alpha=0.6, label=name + ": entropy/log S")
    _label(ax, "layer", None, "sinks and entropy")
    mid = L // 2
    for j, (name, lay) in enumerate((("trained", trained), ("random weights", control))):
        ax = fig.add_subplot(2, 3, 4 + j)
        m = lay[mid]["map"]
        T = m.shape[0]
        strip = torch.cat([m[i] for i in range(T)], dim=1)
        ax.imshow(strip.clamp_min(1e-8).log10().numpy(), cmap="magma", aspect="equal")
        ax.set_title("%s, layer %d: one query (centre of frame %d), log10 weight, frames 0..%d"
                     % (name, mid, T // 2, T - 1), fontsize=8)
        ax.set_yticks([])
        ax.set_xticks([])
    ax = fig.add_subplot(2, 3, 6)
    for name, lay, st in (("trained", trained, "-o"), ("random", control, "--s")):
        for tau in lay[0]["tile_drop"]:
            ax.plot(xs, [lay[i]["tile_drop"][tau] for i in xs], st,
                    label="%s, tau %s" % (name, tau))
    _label(ax, "layer", "share of (row, tile) pairs", "tiles under the row max by more than -tau")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
