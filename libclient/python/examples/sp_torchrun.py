#!/usr/bin/env python3
"""Sequence-parallel attention through liteattn under torchrun: every rank holds one shard of
the sequence and talks to the daemon of its host.

    build/liteattnd --socket /tmp/la.sock --foreground &        # one daemon per host
    LITEATTN_SOCKET=/tmp/la.sock torchrun --nproc-per-node 4 --master-addr 127.0.0.1 \\
        libclient/python/examples/sp_torchrun.py --scheme hybrid --ulysses 2

--scheme ulysses | ring | hybrid (--ulysses U: Ulysses degree, the rest is the ring).
--device cpu (gloo, float32, the daemon's CPU backend) or cuda (NCCL, bfloat16, one GPU per
local rank). Runs --steps denoising steps on fixed random inputs with block structure, then
gathers the output on rank 0 and compares it with dense PyTorch attention on the whole
sequence (the first step is dense and exact; later ones skip tiles).
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from liteattn import parallel  # noqa: E402


def inputs(S, H, D, dtype, device):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, H, D, generator=g)
    centers = centers / centers.norm(dim=-1, keepdim=True) * 4.0 * D ** 0.25
    tile = (torch.arange(S) // 128) % 3
    q = torch.randn(1, S, H, D, generator=g) * 0.5 + centers[tile]
    k = torch.randn(1, S, H, D, generator=g) * 0.5 + centers[tile]
    v = torch.randn(1, S, H, D, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", choices=("ulysses", "ring", "hybrid"), default="ring")
    ap.add_argument("--ulysses", type=int, default=2, help="Ulysses degree (hybrid)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=-3.0)
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="default: float32 on cpu, bfloat16 on cuda")
    args = ap.parse_args()

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        dist.init_process_group("gloo")
        device, dtype = torch.device("cpu"), torch.float32
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    world, rank = dist.get_world_size(), dist.get_rank()

    if args.scheme == "hybrid":
        group = parallel.hybrid_groups(args.ulysses, world // args.ulysses)
    else:
        group = None                         # the whole world
    attend = {"ulysses": parallel.ulysses_attention, "ring": parallel.ring_attention,
              "hybrid": parallel.hybrid_attention}[args.scheme]
    index, count = parallel.shard_index(args.scheme, group)
    assert (index, count) == (rank, world)
    q, k, v = inputs(args.seq, args.heads, args.head_dim, dtype, device)
    L = args.seq // count
    qs, ks, vs = (x[:, index * L:(index + 1) * L].contiguous() for x in (q, k, v))

    ctx = parallel.Context(layers=1, threshold=args.threshold)     # $LITEATTN_SOCKET
    for step in range(args.steps):
        before = dict(ctx.session.stats) if ctx.session is not None else None
        out = attend(qs, ks, vs, group, layer=0, step=step, context=ctx,
                     must_do=[(0, 64)])      # e.g. register tokens, in global positions
        st = {n: ctx.session.stats[n] - (before[n] if before else 0)
              for n in ("tiles_computed", "tiles_total")}
        shards = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(shards, out.contiguous())
        if rank == 0:
            full = torch.cat(shards, dim=1).float()     # rank i holds shard i here
            ref = torch.nn.functional.scaled_dot_product_attention(
                *(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
            err = ((full - ref).norm() / ref.norm()).item()
            print("step %d: relative L2 against dense %.2e; rank 0 computed %d of %d tiles"
                  % (step, err, st["tiles_computed"], st["tiles_total"]), flush=True)
    ctx.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
