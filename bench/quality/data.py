"""Synthetic video clips made on the fly (no downloads), batched on the model's device.

A clip is T frames of S x S RGB in [-1, 1]: a natural-like texture seen through a camera that
stays, pans or zooms, with 1-3 sprites (discs and squares, flat or textured) that move and
bounce off the frame's edges and occlude one another in a fixed depth order.

Label = motion * 3 + (sprites - 1): motion 0 static, 1 pan, 2 zoom in, 3 zoom out; 12 classes.
Label 12 is the "no label" class used for classifier-free guidance.

Textures: crops of the images that installed packages bundle (scikit-image's `data` module,
scikit-learn's sample images) where those packages are present, mixed with procedural
fractal-noise (1/f) colour textures; with neither package present, procedural textures only.
`texture_bank` reports which sources it used.
"""
import math

import torch
import torch.nn.functional as F

NUM_CLASSES = 12
NULL_CLASS = 12
MOTIONS = ("static", "pan", "zoom-in", "zoom-out")


def _bundled_images():
    """(name, HxWx3 uint8 numpy array) of colour/grey images bundled by installed packages."""
    out = []
    try:
        import skimage.data as skd
        for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                     "camera", "brick", "grass", "gravel", "moon"):
            fn = getattr(skd, name, None)
            if fn is None:
                continue
            try:
                img = fn()
            except Exception:   # not bundled in this version (would need a download)
                continue
            out.append(("skimage." + name, img))
    except Exception:
        pass
    try:
        from sklearn.datasets import load_sample_images
        d = load_sample_images()
        for name, img in zip(d.filenames, d.images):
            out.append(("sklearn." + name.split("/")[-1], img))
    except Exception:
        pass
    return out


def _fractal_textures(n, size, gen):
    """n procedural colour textures (n, 3, size, size) in [0, 1]: 1/f^beta noise per channel,
    mixed by a random colour matrix, with a random contrast curve."""
    fy = torch.fft.fftfreq(size).view(-1, 1)
    fx = torch.fft.rfftfreq(size).view(1, -1)
    f = torch.sqrt(fy * fy + fx * fx)
    f[0, 0] = 1.0
    texs = []
    for _ in range(n):
        beta = 1.4 + 1.4 * torch.rand((), generator=gen).item()
        amp = f.pow(-beta)
        amp[0, 0] = 0.0
        ph = torch.rand((3, size, size // 2 + 1), generator=gen) * 2 * math.pi
        spec = amp * torch.polar(torch.ones_like(ph), ph)
        x = torch.fft.irfft2(spec, s=(size, size))
        x = (x - x.mean(dim=(1, 2), keepdim=True)) / (x.std(dim=(1, 2), keepdim=True) + 1e-6)
        mix = torch.randn((3, 3), generator=gen) * 0.35 + torch.eye(3) * 0.5
        x = torch.einsum("ij,jhw->ihw", mix, x)
        base = torch.rand((3, 1, 1), generator=gen)
        x = torch.sigmoid(x * (0.8 + torch.rand((), generator=gen).item()) + (base - 0.5) * 3)
        texs.append(x)
    return torch.stack(texs)


def texture_bank(n, size=128, seed=0, device="cpu", use_images=True):
    """(bank (n, 3, size, size) float in [0, 1] on device, list of source names)."""
    gen = torch.Generator().manual_seed(seed)
    imgs = _bundled_images() if use_images else []
    texs, sources = [], []
    n_img = n // 2 if imgs else 0
    if n_img:
        per = -(-n_img // len(imgs))
        for name, img in imgs:
            t = torch.tensor(img).float() / 255.0     # a copy: some bundled arrays are read-only
            if t.ndim == 2:
                t = t.unsqueeze(-1).expand(-1, -1, 3)
            t = t[..., :3].permute(2, 0, 1)
            h, w = t.shape[1:]
            grey = (t.std(dim=0).mean() < 0.02).item()
            for _ in range(per):
                c = int(min(h, w) * (0.35 + 0.45 * torch.rand((), generator=gen).item()))
                y0 = int(torch.randint(0, h - c + 1, (), generator=gen))
                x0 = int(torch.randint(0, w - c + 1, (), generator=gen))
                crop = t[:, y0:y0 + c, x0:x0 + c].unsqueeze(0)
                crop = F.interpolate(crop, size=(size, size), mode="bilinear",
                                     antialias=True, align_corners=False)[0]
                if grey:   # tint grey images
                    crop = crop * (0.4 + 0.6 * torch.rand((3, 1, 1), generator=gen))
                if torch.rand((), generator=gen).item() < 0.5:
                    crop = crop.flip(-1)
                texs.append(crop.clamp(0, 1))
            sources.append(name)
        texs = texs[:n_img]
    n_proc = n - len(texs)
    if n_proc:
        texs += list(_fractal_textures(n_proc, size, gen))
        sources.append("procedural-fractal-noise x%d" % n_proc)
    bank = torch.stack(texs)
    perm = torch.randperm(n, generator=gen)
    return bank[perm].contiguous().to(device), sources


def _bounce(x, lim):
    """Positions x (unfolded) reflected into [-lim, lim] (a triangle wave)."""
    u = torch.remainder(x + lim, 4 * lim)
    return torch.where(u <= 2 * lim, u, 4 * lim - u) - lim


class ClipMaker:
    """make(batch, gen) -> (clips (B, 3, T, S, S) in [-1, 1], labels (B,) long)."""

    def __init__(self, frames=16, size=64, bank_size=512, tex_size=128, seed=0, device="cpu",
                 use_images=True):
        self.frames, self.size, self.device = frames, size, torch.device(device)
        self.bank, self.sources = texture_bank(bank_size, tex_size, seed, self.device,
                                               use_images)
        lin = torch.linspace(-1 + 1 / size, 1 - 1 / size, size, device=self.device)
        self.gy, self.gx = torch.meshgrid(lin, lin, indexing="ij")

    def make(self, batch, gen, labels=None):
        dev, T, S = self.device, self.frames, self.size
        B = batch

        def rand(*shape):
            return torch.rand(shape, generator=gen, device=dev)
        if labels is None:
            labels = torch.randint(0, NUM_CLASSES, (B,), generator=gen, device=dev)
        labels = labels.to(dev)
        motion = labels // 3
        count = labels % 3 + 1
        t = torch.arange(T, device=dev, dtype=torch.float32).view(1, T) / max(1, T - 1)

        # Camera: crop half-size s (in the texture's [-1, 1] coords) and centre c over time.
        s0 = 0.45 + 0.25 * rand(B, 1)
        ratio = 0.55 + 0.2 * rand(B, 1)
        s = torch.where(motion.view(B, 1) == 2, s0 * ratio.pow(t), s0)
        s = torch.where(motion.view(B, 1) == 3, (s0 * ratio) * ratio.pow(-t), s)
        ang = rand(B, 1) * 2 * math.pi
        speed = (0.35 + 0.4 * rand(B, 1)) * (motion.view(B, 1) == 1)
        c0 = (rand(B, 2) * 2 - 1) * 0.3
        cx = c0[:, :1] + speed * torch.cos(ang) * (t - 0.5)
        cy = c0[:, 1:] + speed * torch.sin(ang) * (t - 0.5)
        theta = torch.zeros(B, T, 2, 3, device=dev)
        theta[..., 0, 0] = s
        theta[..., 1, 1] = s
        theta[..., 0, 2] = cx
        theta[..., 1, 2] = cy
        tex = torch.randint(0, self.bank.shape[0], (B,), generator=gen, device=dev)
        src = self.bank[tex].unsqueeze(1).expand(-1, T, -1, -1, -1).reshape(
            B * T, 3, *self.bank.shape[2:])
        grid = F.affine_grid(theta.view(B * T, 2, 3), (B * T, 3, S, S), align_corners=False)
        frames = F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection",
                               align_corners=False).view(B, T, 3, S, S)
        # Sprites, back to front.
        for j in range(3):
            present = (count > j).float().view(B, 1, 1, 1)
            r = 0.14 + 0.2 * rand(B, 1)
            lim = 1 - r
            p0 = (rand(B, 2) * 2 - 1) * lim
            va = rand(B, 1) * 2 * math.pi
            vm = 0.6 + 1.2 * rand(B, 1)                     # clip-long travel, unfolded
            steps = t * vm
            px = _bounce(p0[:, :1] + torch.cos(va) * steps, lim)   # (B, T)
            py = _bounce(p0[:, 1:] + torch.sin(va) * steps, lim)
            dx = self.gx.view(1, 1, S, S) - px.view(B, T, 1, 1)
            dy = self.gy.view(1, 1, S, S) - py.view(B, T, 1, 1)
            square = (rand(B, 1) < 0.4).view(B, 1, 1, 1)
            d = torch.where(square, torch.maximum(dx.abs(), dy.abs()),
                            torch.sqrt(dx * dx + dy * dy))
            edge = 1.5 / S
            alpha = ((r.view(B, 1, 1, 1) - d) / edge + 0.5).clamp(0, 1) * present
            colour = rand(B, 3)
            colour = colour / colour.max(dim=1, keepdim=True).values.clamp_min(1e-3)
            fill = colour.view(B, 1, 3, 1, 1).expand(B, T, 3, S, S)
            textured = (rand(B, 1) < 0.5).view(B, 1, 1, 1, 1)
            ti = torch.randint(0, self.bank.shape[0], (B,), generator=gen, device=dev)
            # Textured fill: the texture moves with the sprite.
            sg = torch.stack([dx / (2 * r.view(B, 1, 1, 1)), dy / (2 * r.view(B, 1, 1, 1))],
                             dim=-1).view(B * T, S, S, 2)
            tsrc = self.bank[ti].unsqueeze(1).expand(-1, T, -1, -1, -1).reshape(
                B * T, 3, *self.bank.shape[2:])
            tf = F.grid_sample(tsrc, sg, mode="bilinear", padding_mode="reflection",
                               align_corners=False).view(B, T, 3, S, S)
            fill = torch.where(textured, tf * (0.5 + 0.5 * colour.view(B, 1, 3, 1, 1)), fill)
            a = alpha.unsqueeze(2)
            frames = frames * (1 - a) + fill * a
        clips = frames.permute(0, 2, 1, 3, 4).contiguous() * 2 - 1
        return clips, labels
