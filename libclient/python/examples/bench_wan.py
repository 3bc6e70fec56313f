#!/usr/bin/env python3
"""Wan2.1-14B-sized diffusers transformer (random weights) over a 10-step denoising loop:
time per step and output with PyTorch SDPA, then through liteattn (apply), on one GPU.

    python3 libclient/python/examples/bench_wan.py            # starts build/liteattnd itself
    python3 libclient/python/examples/bench_wan.py --socket /run/liteattn/liteattn.sock

Configuration (defaults = Wan2.1-14B at 480p, 81 frames): 40 heads x 128, 40 layers, ffn 13824,
latent 16 x 21 x 60 x 104 (patch 1x2x2 -> 32760 video tokens), 512 text tokens, bf16, 10 steps
of a flow-matching Euler loop from the same noise, no CFG unless --cfg. Random weights: the
attention pattern is not a trained model's, so the live fraction says how the mechanism
behaves on this data, not what Wan itself would skip. Prints a table and writes --json.
Takes about 2-4 minutes on an H100 (use --layers 20 to halve it).
"""
import argparse
import json
import logging
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

import torch  # noqa: E402


def start_daemon(path, backend):
    d = tempfile.mkdtemp(prefix="liteattn-bench-")
    sock = os.path.join(d, "liteattn.sock")
    logf = open(os.path.join(d, "daemon.log"), "wb")
    p = subprocess.Popen([path, "--socket", sock, "--backend", backend, "--foreground"],
                         stdout=logf, stderr=subprocess.STDOUT)
    for _ in range(600):
        if p.poll() is not None:
            break
        if os.path.exists(sock):
            s = pysocket.socket(pysocket.AF_UNIX)
            try:
                s.connect(sock)
                s.close()
                return p, sock, d
            except OSError:
                s.close()
        time.sleep(0.05)
    logf.close()
    sys.exit("liteattnd did not start:\n" + open(os.path.join(d, "daemon.log")).read())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", help="a running daemon's socket (default: start build/liteattnd)")
    ap.add_argument("--daemon", default=os.path.join(REPO, "build", "liteattnd"))
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=13824)
    ap.add_argument("--frames", type=int, default=21, help="latent frames (81 video frames)")
    ap.add_argument("--height", type=int, default=60, help="latent height (480 px / 8)")
    ap.add_argument("--width", type=int, default=104, help="latent width (832 px / 8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threshold", type=float, default=-3.0)
    ap.add_argument("--cfg", action="store_true", help="two passes per step (cond, uncond)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--device", default="cuda",
                    help="cuda (bf16), or cpu (float32, with --backend cpu: a smoke test)")
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import liteattn.diffusers as ld
    from diffusers import WanTransformer3DModel

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    assert not cuda or torch.cuda.is_available(), "needs a CUDA GPU (or --device cpu)"
    dt = torch.bfloat16 if cuda else torch.float32

    def sync():
        if cuda:
            torch.cuda.synchronize()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(dt)
    with torch.device(dev):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=args.heads,
            attention_head_dim=args.head_dim, in_channels=16, out_channels=16, text_dim=4096,
            freq_dim=256, ffn_dim=args.ffn, num_layers=args.layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6)
    torch.set_default_dtype(torch.float32)
    # As from_pretrained(torch_dtype=bf16) does: the modules Wan keeps in float32 stay there
    # (the RoPE tables were computed in float32 already).
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, mod in model.named_modules():
        if keep & set(name.split(".")):
            mod.float()
    for name, p in model.named_parameters():
        if keep & set(name.split(".")):
            p.data = p.data.float()
    model = model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print("model: %.2f B parameters, %d layers, %d heads x %d, %d video tokens (built in %.0f s)"
          % (n_params / 1e9, args.layers, args.heads, args.head_dim, tokens,
             time.perf_counter() - t0), flush=True)

    g = torch.Generator(device=dev).manual_seed(1)
    noise = torch.randn(1, 16, args.frames, args.height, args.width, generator=g, device=dev,
                        dtype=dt)
    text = torch.randn(1, 512, 4096, generator=g, device=dev, dtype=dt) * 0.1
    uncond = torch.zeros_like(text)
    sigmas = torch.linspace(1.0, 0.0, args.steps + 1).tolist()

    def generate(label):
        x = noise.clone()
        times = []
        for i in range(args.steps):
            t = torch.tensor([sigmas[i] * 1000.0], device=dev)
            sync()
            a = time.perf_counter()
            with torch.no_grad():
                v = model(hidden_states=x, timestep=t, encoder_hidden_states=text,
                          return_dict=False)[0]
                if args.cfg:
                    vu = model(hidden_states=x, timestep=t, encoder_hidden_states=uncond,
                               return_dict=False)[0]
                    v = vu + 5.0 * (v - vu)
            x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(dt)
            sync()
            times.append(time.perf_counter() - a)
            print("%s step %d: %.3f s" % (label, i, times[-1]), flush=True)
        return x, times

    # warm-up (kernels, allocator) outside the timed runs
    with torch.no_grad():
        model(hidden_states=noise, timestep=torch.tensor([999.0], device=dev),
              encoder_hidden_states=text, return_dict=False)
    sync()

    x_ref, t_ref = generate("sdpa")

    proc = None
    sock = args.socket
    if sock is None:
        proc, sock, _ = start_daemon(args.daemon, args.backend)
    try:
        ld.apply(model, threshold=args.threshold, socket=sock)
        ld.new_generation(model)
        x_la, t_la = generate("liteattn")
        st = model._liteattn_state
        sess = st.session
        info = sess.info()
        stats = dict(sess.stats)
        ld.new_generation(model)      # closes the session, logs the summary
        summary = ld.summary(model)
        ld.remove(model)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
            if rc != 0:
                print("warning: liteattnd exited with status %d" % rc)

    err = ((x_la.float() - x_ref.float()).norm() / x_ref.float().norm()).item()
    frac = stats["tiles_computed"] / max(1, stats["tiles_total"])
    res = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "config": vars(args) | {"tokens": tokens, "params_b": n_params / 1e9},
        "sdpa_step_s": t_ref,
        "liteattn_step_s": t_la,
        "sdpa_mean_s": sum(t_ref[1:]) / max(1, len(t_ref) - 1),
        "liteattn_mean_s": sum(t_la[1:]) / max(1, len(t_la) - 1),
        "liteattn_total_s": sum(t_la),
        "sdpa_total_s": sum(t_ref),
        "tiles_computed_fraction": frac,
        "live_fraction_end_mean": sum(info["live_fraction"]) / len(info["live_fraction"]),
        "live_fraction_end_per_layer": info["live_fraction"],
        "attention_compute_s": stats["compute_ns"] / 1e9,
        "summary": summary,
        "final_latent_rel_l2_vs_sdpa": err,
    }
    print()
    print("device: %s, torch %s" % (res["device"], res["torch"]))
    print("%-6s %12s %12s" % ("step", "sdpa s", "liteattn s"))
    for i, (a, b) in enumerate(zip(t_ref, t_la)):
        print("%-6d %12.3f %12.3f" % (i, a, b))
    print("total  %12.3f %12.3f   (speed-up %.2fx)" % (sum(t_ref), sum(t_la),
                                                      sum(t_ref) / sum(t_la)))
    print("tiles computed over the run: %.1f%%; live fraction at the end: %.3f (mean of layers)"
          % (100 * frac, res["live_fraction_end_mean"]))
    print("final latent vs SDPA run: relative L2 %.3e" % err)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
