#!/usr/bin/env python3
"""Trains the toy video DiT (toydit.py) on clips made on the fly (data.py) and writes, to
--out: the fp16 checkpoint in shards (toydit-00.pt, ...), train.json (config, command, loss
curve, held-out loss of the untrained and trained model, attention-structure numbers against
the random-weights control), samples.png (50-step Euler + CFG samples beside real clips of the
same labels), attention.png and loss.png.

GPU (the committed checkpoint):  python3 bench/quality/train.py --out DIR --time-budget 270
CPU smoke (tiny config):         python3 bench/quality/train.py --smoke --out DIR
"""
import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import data as D  # noqa: E402
import structure  # noqa: E402
import toydit as M  # noqa: E402


def log(*a):
    print("[%7.1fs]" % (time.perf_counter() - T0), *a, flush=True)


T0 = time.perf_counter()


def heldout_set(maker, n, seed, device):
    """Fixed held-out clips (labels cycled), noise and noise levels (8 logit-normal
    quantiles, each clip at all 8)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    labels = torch.arange(n, device=device) % D.NUM_CLASSES
    clips, labels = maker.make(n, gen, labels)
    noise = torch.randn(clips.shape, generator=gen, device=device)
    q = (torch.arange(8, dtype=torch.float64) + 0.5) / 8
    ts = torch.sigmoid(math.sqrt(2) * torch.erfinv(2 * q - 1)).float().to(device)
    return clips, labels, noise, ts


@torch.no_grad()
def heldout_loss(model, hs, batch, attn=None, dtype=torch.bfloat16):
    clips, labels, noise, ts = hs
    tot, cnt = 0.0, 0
    for t in ts:
        for i in range(0, clips.shape[0], batch):
            x0, e, y = clips[i:i + batch], noise[i:i + batch], labels[i:i + batch]
            tt = t.expand(x0.shape[0])
            xt = (1 - t) * x0 + t * e
            with torch.autocast(x0.device.type, dtype=dtype, enabled=dtype != torch.float32):
                v = model(xt.to(dtype), tt, y, attn=attn).float()
            tot += ((v - (e - x0)) ** 2).mean().item() * x0.shape[0]
            cnt += x0.shape[0]
    return tot / cnt


def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(rows, path, frames_idx, scale=2):
    """rows: list of (C, F, S, S) clips in [-1, 1]; one row per clip, chosen frames."""
    from PIL import Image
    S = rows[0].shape[-1]
    pad = 2
    W = len(frames_idx) * (S + pad) + pad
    H = len(rows) * (S + pad) + pad
    canvas = torch.full((3, H, W), 255, dtype=torch.uint8)
    for r, clip in enumerate(rows):
        c8 = to_uint8(clip.float().cpu())
        for j, f in enumerate(frames_idx):
            y0, x0 = pad + r * (S + pad), pad + j * (S + pad)
            canvas[:, y0:y0 + S, x0:x0 + S] = c8[:, f]
    img = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    img = img.resize((W * scale, H * scale), Image.NEAREST)
    img.save(path)


def plot_loss(curve, path, untrained, trained):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    st = [c[0] for c in curve]
    ax.semilogy(st, [c[1] for c in curve], label="training loss (mean of 10 steps)")
    ax.axhline(untrained, color="r", ls="--", label="held-out, untrained %.3f" % untrained)
    ax.axhline(trained, color="g", ls="--", label="held-out, trained %.3f" % trained)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny config, 2 steps, CPU is fine")
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: from the budget)")
    ap.add_argument("--time-budget", type=float, default=270.0,
                    help="seconds of training when --steps is 0: the step count is fixed "
                         "from the speed of steps 5-25 and recorded")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--init", metavar="PREFIX",
                    help="start from this checkpoint's weights (e.g. bench/quality/checkpoint/"
                         "toydit) instead of a random init: a fine-tune, for example at longer "
                         "clips (--frames); the random-weights control stays a fresh init")
    ap.add_argument("--frames", type=int, default=0,
                    help="frames per clip (0: the config's, 16); the model has no "
                         "length-dependent weights (3D RoPE), so a checkpoint trained at 16 "
                         "frames can be fine-tuned at 32")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = M.Config(**M.SMOKE) if args.smoke else M.Config()
    init_meta = None
    if args.init:
        _, init_meta = M.load_sharded(args.init)
        cfg = M.Config.from_dict(init_meta["config"])
    if args.frames:
        if args.frames % cfg.patch[0]:
            ap.error("--frames %d is not a multiple of the temporal patch %d"
                     % (args.frames, cfg.patch[0]))
        cfg.frames = args.frames
    dtype = torch.bfloat16
    bank = 16 if args.smoke else 512
    maker = D.ClipMaker(cfg.frames, cfg.size, bank_size=bank, tex_size=64 if args.smoke else 128,
                        seed=args.seed, device=dev)
    log("device", dev, torch.cuda.get_device_name() if dev.type == "cuda" else "",
        "torch", torch.__version__, "texture sources:", maker.sources)
    model = M.ToyDiT(cfg).to(dev)
    control = M.ToyDiT(cfg).to(dev)
    control.load_state_dict(model.state_dict())     # the random-weights control: the init
    if args.init:
        init_model, _ = M.load_sharded(args.init)
        model.load_state_dict(init_model.state_dict())
        del init_model
        log("weights from %s (%s steps, %d frames)" % (args.init, init_meta.get("steps"),
                                                        init_meta["config"]["frames"]))
    control.eval()
    log("model: %.2fM params, %d tokens/clip, grid %s, head dim %d, %d heads, depth %d"
        % (model.num_params() / 1e6, cfg.tokens, cfg.grid, cfg.head_dim, cfg.heads, cfg.depth))
    n_held = 8 if args.smoke else 48
    hs = heldout_set(maker, n_held, 1234, dev)
    eb = 4 if args.smoke else 16
    loss_untrained = heldout_loss(control, hs, eb, dtype=dtype)
    log("held-out loss, untrained: %.4f" % loss_untrained)
    loss_init = None
    if args.init:
        loss_init = heldout_loss(model, hs, eb, dtype=dtype)
        log("held-out loss, starting weights (%d frames): %.4f" % (cfg.frames, loss_init))
    # attention structure of the control
    probe = hs[0][:4], hs[1][:4]
    nq = 64 if args.smoke else 256
    st_control = structure.measure(control, probe[0], probe[1], 0.5, nq, seed=7, dtype=dtype)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99),
                            weight_decay=0.01, fused=dev.type == "cuda")
    ema = M.ToyDiT(cfg).to(dev)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
    steps = 2 if args.smoke else args.steps
    total = steps if steps else 10 ** 9
    curve, acc = [], []
    t_train = time.perf_counter()
    t_mark = None
    step = 0
    while step < total:
        if not steps and step == 5:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_mark = time.perf_counter()
        if not steps and step == 25:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per = (time.perf_counter() - t_mark) / 20
            total = int((args.time_budget - (time.perf_counter() - t_train)) / per) + 25
            log("%.3f s/step: training for %d steps" % (per, total))
        warm = min(1.0, (step + 1) / args.warmup)
        frac = step / max(1, total if total < 10 ** 9 else 2000)
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.no_grad():
            x0, y = maker.make(args.batch, gen)
            drop = torch.rand(args.batch, generator=gen, device=dev) < 0.1
            y = torch.where(drop, torch.full_like(y, D.NULL_CLASS), y)
            t = M.sample_t(args.batch, gen, dev)
            e = torch.randn(x0.shape, generator=gen, device=dev)
            tb = t.view(-1, 1, 1, 1, 1)
            xt = (1 - tb) * x0 + tb * e
        with torch.autocast(dev.type, dtype=dtype):
            v = model(xt.to(dtype), t, y)
        loss = ((v.float() - (e - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            dcy = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - dcy)
        acc.append(loss.detach())
        step += 1
        if step % 10 == 0 or step == total:
            m = torch.stack(acc).mean().item()
            acc = []
            curve.append((step, m))
            if step % 100 == 0 or step == total or args.smoke:
                log("step %d/%d loss %.4f lr %.2e" % (step, total, m, lr))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t_train
    log("trained %d steps in %.1f s" % (step, train_s))
    model.eval()
    loss_raw = heldout_loss(model, hs, eb, dtype=dtype)
    loss_ema = heldout_loss(ema, hs, eb, dtype=dtype)
    log("held-out loss: raw %.4f, EMA %.4f (untrained %.4f)" % (loss_raw, loss_ema,
                                                               loss_untrained))
    final, which = (ema, "ema") if loss_ema <= loss_raw else (model, "raw")
    # Attention structure: trained against the random-weights control.
    st_trained = structure.measure(final, probe[0], probe[1], 0.5, nq, seed=7, dtype=dtype)
    sm_t, sm_c = structure.summary(st_trained), structure.summary(st_control)
    log("attention, trained: same-frame %.3f local %.3f stripe %s sinks(top1%%) %.3f "
        "entropy %.3f tile_drop %s" % (sm_t["same_frame"], sm_t["local"],
                                       [round(x, 1) for x in sm_t["stripe"]],
                                       sm_t["sink_top1pct"], sm_t["entropy"], sm_t["tile_drop"]))
    log("attention, random: same-frame %.3f local %.3f stripe %s sinks(top1%%) %.3f "
        "entropy %.3f tile_drop %s" % (sm_c["same_frame"], sm_c["local"],
                                       [round(x, 1) for x in sm_c["stripe"]],
                                       sm_c["sink_top1pct"], sm_c["entropy"], sm_c["tile_drop"]))
    try:
        structure.figure(st_trained, st_control, os.path.join(args.out, "attention.png"),
                         1.0 / cfg.grid[0])
    except ImportError as e:
        log("no attention figure (%s)" % e)
    # Samples: 50 Euler steps with CFG from fixed noise, beside real clips of the same labels.
    sgen = torch.Generator(device=dev).manual_seed(4321)
    labels = torch.tensor([0, 2, 3, 5, 7, 8, 10, 11], device=dev)[:4 if args.smoke else 8]
    noise = torch.randn((labels.shape[0], cfg.channels, cfg.frames, cfg.size, cfg.size),
                        generator=sgen, device=dev)
    nsteps = 2 if args.smoke else 50
    t_s = time.perf_counter()
    xs = M.sample(final, noise, labels, steps=nsteps, cfg_scale=args.cfg_scale, dtype=dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    sample_s = time.perf_counter() - t_s
    real, _ = maker.make(labels.shape[0], torch.Generator(device=dev).manual_seed(99), labels)
    rows = []
    for i in range(labels.shape[0]):
        rows += [real[i], xs[i]]
    fidx = list(range(0, cfg.frames, max(1, cfg.frames // 8)))
    try:
        save_grid(rows, os.path.join(args.out, "samples.png"), fidx)
    except ImportError as e:
        log("no sample grid (%s)" % e)
    try:
        plot_loss(curve, os.path.join(args.out, "loss.png"), loss_untrained,
                  min(loss_raw, loss_ema))
    except ImportError as e:
        log("no loss plot (%s)" % e)
    meta = {
        "config": cfg.to_dict(), "params": model.num_params(), "tokens": cfg.tokens,
        "command": "python3 bench/quality/train.py " + " ".join(sys.argv[1:]),
        "args": vars(args), "steps": step,
        "init": None if init_meta is None else {
            "from": args.init, "steps": init_meta.get("steps"),
            "config": init_meta["config"], "command": init_meta.get("command"),
            "heldout": init_meta.get("heldout"), "train_seconds": init_meta.get("train_seconds"),
            "init": init_meta.get("init")},          # the stages before it, nested
        "train_seconds": train_s, "weights": which,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": str(torch.__version__), "texture_sources": maker.sources,
        "heldout": {"clips": n_held, "seed": 1234, "noise_levels": hs[3].tolist(),
                    "untrained": loss_untrained, "trained_raw": loss_raw,
                    "trained_ema": loss_ema, "starting_weights": loss_init},
        "loss_curve": curve, "sample_seconds_50_steps_cfg": sample_s,
        "sample_labels": labels.tolist(), "cfg_scale": args.cfg_scale,
        "attention": {"noise_level": 0.5, "query_rows_per_layer": nq,
                      "trained": structure.strip_maps(st_trained),
                      "random": structure.strip_maps(st_control),
                      "trained_mean": sm_t, "random_mean": sm_c},
    }
    paths = M.save_sharded(final, os.path.join(args.out, "toydit"), meta)
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump(meta, f, indent=1)
    log("wrote", ", ".join(os.path.basename(p) for p in paths), "train.json")
    print("train: %d steps, held-out loss %.4f -> %.4f, same-frame mass %.3f (random %.3f)"
          % (step, loss_untrained, min(loss_raw, loss_ema), sm_t["same_frame"],
             sm_c["same_frame"]))


if __name__ == "__main__":
    main()
