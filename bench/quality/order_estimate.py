#!/usr/bin/env python3
"""How many (q-tile, k-tile) pairs of the toy DiT's attention are negligible for every row of
the q-tile, in each token order (toydit.token_order): what a tile-sparse kernel could skip at
one step if its running maximum were the row's final one.

One forward pass of one clip at noise level --t; for each layer and order, the exact logits
(fp32, on the CPU or GPU), each row's maximum, each (row, k-tile)'s best score, and per
(q-tile, k-tile) the worst row: the pair counts under tau when that gap is below tau (log2
units). Tiles of --bm rows and --bn keys (the sm90 kernel's at head dim 128: 128 x 176).

    python3 bench/quality/order_estimate.py --t 0.9 --orders raster,zorder,blocks:4,4,8

On two CPU cores, about 2 minutes a layer at 32768 tokens for five orders.
"""
import argparse
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.path.join(HERE, "checkpoint", "toydit"))
    ap.add_argument("--t", type=float, default=0.9, help="noise level in [0, 1]")
    ap.add_argument("--orders", default="raster,zorder,blocks:4,4,8,blocks:2,8,8")
    ap.add_argument("--taus", default="-10,-6,-4,-3")
    ap.add_argument("--bm", type=int, default=128)
    ap.add_argument("--bn", type=int, default=176)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--layers", type=int, default=0, help="stop after this many (0: all)")
    args = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("order_estimate: PyTorch is not installed")
        return 0
    sys.path.insert(0, HERE)
    import data as D
    import toydit as M
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = M.load_sharded(args.checkpoint, dev)
    cfg = model.cfg
    S = cfg.tokens
    orders = []
    for part in args.orders.split(","):
        if orders and orders[-1].startswith("blocks:") and orders[-1].count(",") < 2:
            orders[-1] += "," + part
        elif part:
            orders.append(part)
    perms = {}
    for o in orders:
        p = M.token_order(cfg.grid, o)
        perms[o] = (torch.arange(S) if p is None else p).to(dev)
    taus = [float(x) for x in args.taus.split(",")]
    BM, BN = args.bm, args.bn
    nK = -(-S // BN)
    res = {}

    def record(layer, q, k, v):
        if args.layers and layer >= args.layers:
            return M.sdpa_attention(layer, q, k, v)
        t0 = time.time()
        qf = q.float()[0].transpose(0, 1)   # (H, S, D)
        kf = k.float()[0].transpose(0, 1)
        sc = math.log2(math.e) / math.sqrt(qf.shape[-1])
        out = {}
        for o, p in perms.items():
            qp, kp = qf[:, p], kf[:, p]
            cnt, tot = [0] * len(taus), 0
            for r0 in range(0, S, 8 * BM):
                lg = (qp[:, r0:r0 + 8 * BM] @ kp.transpose(-1, -2)) * sc
                rows = lg.shape[1]
                rmax = lg.amax(-1, keepdim=True)
                lg = F.pad(lg, (0, nK * BN - S), value=-math.inf)
                gap = lg.view(lg.shape[0], rows, nK, BN).amax(-1) - rmax
                pad_rows = -rows % BM
                if pad_rows:   # rows past S count as negligible everywhere
                    gap = F.pad(gap, (0, 0, 0, pad_rows), value=-math.inf)
                worst = gap.view(gap.shape[0], -1, BM, nK).amax(2)
                for i, tau in enumerate(taus):
                    cnt[i] += (worst <= tau).sum().item()
                tot += worst.numel()
            out[o] = [c / tot for c in cnt]
        res[layer] = out
        print("layer %d (%.0f s): " % (layer, time.time() - t0) + "; ".join(
            "%s %s" % (o, " ".join("%.3f" % x for x in out[o])) for o in out), flush=True)
        return M.sdpa_attention(layer, q, k, v)

    maker = D.ClipMaker(cfg.frames, cfg.size, device=dev)
    clips, labels = maker.make(1, torch.Generator(device=dev).manual_seed(args.seed))
    noise = torch.randn(clips.shape, generator=torch.Generator(device=dev).manual_seed(9),
                        device=dev)
    xt = (1 - args.t) * clips + args.t * noise
    with torch.no_grad():
        model(xt, torch.full((1,), args.t, device=dev), labels, attn=record)
    n = len(res)
    print("order_estimate: t %g, %d layers, tiles %dx%d, taus %s: mean share of (q-tile, "
          "k-tile) pairs negligible for every row: %s" % (
              args.t, n, BM, BN, args.taus, "; ".join(
                  "%s %s" % (o, " ".join("%.3f" % (sum(res[l][o][i] for l in res) / n)
                                         for i in range(len(taus)))) for o in orders)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
