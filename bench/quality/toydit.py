"""A small video DiT in Wan2.1's image, for measuring what liteattn's skipping does to a
trained model's generations.

As in Wan: a 3D patch embedding (Conv3d), tokens in (t, h, w) order, self-attention with
RMSNorm on q and k (over the whole model width) and 3D RoPE whose rotary pairs are split over
(t, h, w) as d - 4*(d//6), 2*(d//6), 2*(d//6), LayerNorms without affine parameters modulated
by the timestep embedding (AdaLN: shift, scale, gate per block from a shared projection plus a
learned per-block table), a GELU feed-forward, and a modulated output head. Unlike Wan there
is no text cross-attention: a class label embedding is added to the timestep embedding.
Rectified flow: x_t = (1 - t) x_0 + t eps, the model predicts v = eps - x_0.

The attention itself is a callable attn(layer, q, k, v) -> out, q/k/v (B, S, H, D); the
default is PyTorch's SDPA, and the quality harness passes liteattn's module in its place.

Token order: everything but the patch embedding and the output head works token by token, and
attention is the same for any order of its tokens (the RoPE angles travel with them), so the
model may lay the sequence out in another order between the two (set_token_order). Dense
attention does not care; a tile-sparse kernel does, since its tiles are runs of consecutive
tokens: in (t, h, w) order a 128-token tile is four rows of one frame, in a 3D Z-order curve a
4 x 4 x 8 brick of the video, whose rows attend to much the same keys.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    frames: int = 16
    size: int = 64
    channels: int = 3
    patch: tuple = (2, 2, 2)
    dim: int = 384
    heads: int = 3
    depth: int = 8
    mlp_ratio: float = 4.0
    num_classes: int = 12
    freq_dim: int = 256
    rope_theta: float = 10000.0

    @property
    def head_dim(self):
        return self.dim // self.heads

    @property
    def grid(self):
        pt, ph, pw = self.patch
        return (self.frames // pt, self.size // ph, self.size // pw)

    @property
    def tokens(self):
        g = self.grid
        return g[0] * g[1] * g[2]

    def to_dict(self):
        d = asdict(self)
        d["patch"] = list(self.patch)
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["patch"] = tuple(d["patch"])
        return cls(**d)


SMOKE = dict(frames=4, size=16, patch=(1, 2, 2), dim=128, heads=1, depth=2)


def token_order(grid, name):
    """The permutation (S,) that lays out tokens of the (T, H, W) grid in order `name`:
    "raster" (t, h, w; None is returned), "zorder" (3D Morton curve) or "blocks:bt,bh,bw"
    (liteattn.order, which the harness and users share). perm[i] is the raster index of the
    i-th token of the new order."""
    try:
        from liteattn import order as LO
    except ImportError:   # the source checkout's client package, beside bench/
        import os
        import sys
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                        "libclient", "python"))
        from liteattn import order as LO
    p = LO.token_order(grid, name)
    return None if p is None else torch.from_numpy(p)


def sdpa_attention(layer, q, k, v):
    """(B, S, H, D) in and out, PyTorch's scaled_dot_product_attention."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) \
            * self.weight.type_as(x)


def rope_angles(cfg):
    """(S, D/2) rotation angles for the token grid, pairs split over (t, h, w)."""
    d = cfg.head_dim
    parts = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    T, H, W = cfg.grid
    axes = []
    for n, dim in zip((T, H, W), parts):
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        axes.append(torch.outer(torch.arange(n, dtype=torch.float64), inv))   # (n, dim/2)
    at = axes[0].view(T, 1, 1, -1).expand(T, H, W, -1)
    ah = axes[1].view(1, H, 1, -1).expand(T, H, W, -1)
    aw = axes[2].view(1, 1, W, -1).expand(T, H, W, -1)
    return torch.cat([at, ah, aw], dim=-1).reshape(T * H * W, -1).float()


def apply_rope(x, cos, sin):
    """x (B, S, H, D), pairs (2i, 2i+1) rotated; cos/sin (S, D/2)."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    return out.type_as(x)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of t in [0, 1] scaled to [0, 1000] like Wan's timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device,
                                                        dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.norm_q = RMSNorm(d)
        self.norm_k = RMSNorm(d)
        hid = int(d * cfg.mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(d, hid), nn.GELU(approximate="tanh"),
                                 nn.Linear(hid, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d ** 0.5)

    def forward(self, x, e, cos, sin, attn, layer):
        B, S, d = x.shape
        m = (self.modulation.float() + e.float()).chunk(6, dim=1)   # each (B, 1, d)
        h = (self.norm1(x.float()) * (1 + m[1]) + m[0]).type_as(x)
        H = self.heads
        q = self.norm_q(self.q(h)).view(B, S, H, -1)
        k = self.norm_k(self.k(h)).view(B, S, H, -1)
        v = self.v(h).view(B, S, H, -1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attn(layer, q, k, v).reshape(B, S, d)
        x = x + (self.o(y).float() * m[2]).type_as(x)
        h = (self.norm2(x.float()) * (1 + m[4]) + m[3]).type_as(x)
        x = x + (self.ffn(h).float() * m[5]).type_as(x)
        return x


class ToyDiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.channels, d, kernel_size=cfg.patch,
                                         stride=cfg.patch)
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(),
                                            nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.label_embedding = nn.Embedding(cfg.num_classes + 1, d)   # last: no label
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.head_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(d, cfg.channels * math.prod(cfg.patch))
        self.head_modulation = nn.Parameter(torch.randn(1, 2, d) / d ** 0.5)
        ang = rope_angles(cfg)
        self.register_buffer("rope_cos", torch.cos(ang), persistent=False)
        self.register_buffer("rope_sin", torch.sin(ang), persistent=False)
        self.set_token_order("raster")
        self._init()

    def set_token_order(self, name):
        """Lay the tokens out in order `name` between patch embedding and head (token_order);
        the output is the same up to rounding, only the attention calls see another order."""
        perm = token_order(self.cfg.grid, name)
        self.token_order_name = name or "raster"
        self._perm = perm
        self._inv = None if perm is None else torch.argsort(perm)
        self._rope = None
        return self

    def _ordered(self, dev):
        """(perm, inv, cos, sin) on dev for the current token order (the buffers follow
        .to(); the permuted copies are made again when they moved)."""
        if self._perm is None:
            return None, None, self.rope_cos, self.rope_sin
        if self._perm.device != dev:
            self._perm, self._inv = self._perm.to(dev), self._inv.to(dev)
        if self._rope is None or self._rope[0].device != self.rope_cos.device or \
                self._rope[0].dtype != self.rope_cos.dtype:
            p = self._perm.to(self.rope_cos.device)
            self._rope = (self.rope_cos[p], self.rope_sin[p])
        return self._perm, self._inv, self._rope[0], self._rope[1]

    def _init(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.normal_(self.label_embedding.weight, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def patchify(self, x):
        return self.patch_embedding(x).flatten(2).transpose(1, 2)   # (B, S, d)

    def unpatchify(self, y):
        cfg = self.cfg
        B = y.shape[0]
        T, H, W = cfg.grid
        pt, ph, pw = cfg.patch
        y = y.view(B, T, H, W, pt, ph, pw, cfg.channels)
        y = y.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return y.reshape(B, cfg.channels, T * pt, H * ph, W * pw)

    def forward(self, x, t, labels, attn=None):
        """x (B, C, F, S, S), t (B,) in [0, 1], labels (B,) -> v (B, C, F, S, S)."""
        attn = attn or sdpa_attention
        h = self.patchify(x)
        perm, inv, cos, sin = self._ordered(h.device)
        if perm is not None:
            h = h[:, perm]
        e = self.time_embedding(timestep_embedding(t, self.cfg.freq_dim).to(h.dtype))
        e = e + self.label_embedding(labels).to(e.dtype)
        e0 = self.time_projection(e).unflatten(1, (6, -1))
        for i, blk in enumerate(self.blocks):
            h = blk(h, e0, cos, sin, attn, i)
        m = (self.head_modulation.float() + e.float().unsqueeze(1)).chunk(2, dim=1)
        h = (self.head_norm(h.float()) * (1 + m[1]) + m[0]).type_as(h)
        if inv is not None:
            h = h[:, inv]
        return self.unpatchify(self.head(h))


# ---- flow matching ---------------------------------------------------------------------------

def sample_t(n, gen, device):
    """Logit-normal t: sigmoid of a standard normal."""
    return torch.sigmoid(torch.randn(n, generator=gen, device=device))


def sigmas(steps, shift=3.0, device="cpu"):
    """steps + 1 noise levels from 1 to 0, shifted toward noise like Wan's flow shift."""
    s = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def sample(model, noise, labels, steps=50, cfg_scale=5.0, shift=3.0, attn=None,
           on_step=None, dtype=torch.bfloat16, null_class=12):
    """Euler sampling of the rectified flow from noise (t = 1) to data (t = 0). With
    cfg_scale != 1 the conditional and unconditional passes run as one batch of 2B rows.
    on_step(step) is called before each step's forward (e.g. to set per-step state)."""
    x = noise.float()
    sg = sigmas(steps, shift, noise.device)
    B = x.shape[0]
    null = torch.full_like(labels, null_class)
    for i in range(steps):
        if on_step is not None:
            on_step(i)
        t = sg[i].expand(B)
        with torch.autocast(noise.device.type, dtype=dtype, enabled=dtype != torch.float32):
            if cfg_scale != 1.0:
                v = model(torch.cat([x, x]).to(dtype), torch.cat([t, t]),
                          torch.cat([labels, null]), attn=attn).float()
                vc, vu = v.chunk(2)
                v = vu + cfg_scale * (vc - vu)
            else:
                v = model(x.to(dtype), t, labels, attn=attn).float()
        x = x + (sg[i + 1] - sg[i]) * v
    return x


# ---- checkpoints -----------------------------------------------------------------------------

def save_sharded(model, path_prefix, meta, max_bytes=15 << 20):
    """fp16 state dict in shards of at most max_bytes: path_prefix-00.pt, -01.pt, ...; the
    first shard also holds `meta` (config, training record). Returns the shard paths."""
    sd = {k: v.detach().to(torch.float16).cpu().contiguous()
          for k, v in model.state_dict().items()}
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        nb = v.numel() * 2
        if cur and size + nb > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nb
    shards.append(cur)
    paths = []
    for i, sh in enumerate(shards):
        p = "%s-%02d.pt" % (path_prefix, i)
        obj = {"tensors": sh, "shard": i, "shards": len(shards)}
        if i == 0:
            obj["meta"] = meta
        torch.save(obj, p)
        paths.append(p)
    return paths


def load_sharded(path_prefix, device="cpu", dtype=torch.float32):
    """(model, meta) from the shards written by save_sharded."""
    # (the committed checkpoint's meta holds torch's version object)
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
        first = torch.load("%s-00.pt" % path_prefix, map_location="cpu", weights_only=True)
        meta = first["meta"]
        sd = dict(first["tensors"])
        for i in range(1, first["shards"]):
            sd.update(torch.load("%s-%02d.pt" % (path_prefix, i), map_location="cpu",
                                 weights_only=True)["tensors"])
    model = ToyDiT(Config.from_dict(meta["config"]))
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.to(device=device, dtype=dtype).eval(), meta
