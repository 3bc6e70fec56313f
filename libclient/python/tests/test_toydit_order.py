"""The toy DiT's token orders (bench/quality/toydit.py): permutations of the (t, h, w) grid that
change which tokens share a kernel tile and nothing else. The quality harness runs liteattn
with them (run.py --token-orders); here on the CPU: the model's output is the same in every
order, and the orders are the bricks they claim to be."""
import os
import sys

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "bench", "quality"))
import toydit as M  # noqa: E402


def coords(grid, perm):
    T, H, W = grid
    return perm // (H * W), (perm // W) % H, perm % W


@pytest.mark.parametrize("grid", [(4, 4, 4), (8, 16, 16), (3, 5, 6)])
def test_orders_are_permutations(grid):
    S = grid[0] * grid[1] * grid[2]
    assert M.token_order(grid, "raster") is None
    p = M.token_order(grid, "zorder")
    assert sorted(p.tolist()) == list(range(S))


def test_zorder_runs_are_bricks():
    grid = (8, 8, 8)
    p = M.token_order(grid, "zorder")
    t, h, w = coords(grid, p)
    for n, side in ((8, (2, 2, 2)), (64, (4, 4, 4)), (128, (4, 4, 8))):
        for a in range(0, 512, n):
            sl = slice(a, a + n)
            ext = (t[sl].max() - t[sl].min() + 1, h[sl].max() - h[sl].min() + 1,
                   w[sl].max() - w[sl].min() + 1)
            assert tuple(int(x) for x in ext) == side, (n, a, ext)


def test_blocks_order():
    grid = (4, 8, 8)
    p = M.token_order(grid, "blocks:2,4,4")
    t, h, w = coords(grid, p)
    # the first 32 tokens: the brick t < 2, h < 4, w < 4, in (t, h, w) order inside
    assert (t[:32] < 2).all() and (h[:32] < 4).all() and (w[:32] < 4).all()
    assert p[:5].tolist() == [0, 1, 2, 3, 8]
    # the second brick is the next one along w
    assert (w[32:64] >= 4).all() and (h[32:64] < 4).all()
    for bad in ("blocks:3,4,4", "blocks:0,4,4", "blocks:2,4", "spiral"):
        with pytest.raises(ValueError):
            M.token_order(grid, bad)


def test_model_output_does_not_depend_on_the_order():
    torch.manual_seed(0)
    cfg = M.Config(frames=4, size=16, patch=(1, 2, 2), dim=64, heads=2, depth=2)
    model = M.ToyDiT(cfg).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=0.05)
    x = torch.randn(2, 3, 4, 16, 16)
    t = torch.tensor([0.3, 0.8])
    lab = torch.tensor([1, 5])
    seen = []

    def attn(layer, q, k, v):
        seen.append(q[0, :, 0, 0].clone())
        return M.sdpa_attention(layer, q, k, v)
    with torch.no_grad():
        ref = model(x, t, lab, attn=attn)
        for order in ("zorder", "blocks:2,4,4", "blocks:1,2,8"):
            model.set_token_order(order)
            out = model(x, t, lab, attn=attn)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            # the attention saw the tokens in the new order: its queries permuted
            perm = M.token_order(cfg.grid, order)
            torch.testing.assert_close(seen[-1], seen[cfg.depth - 1][perm])
        model.set_token_order("raster")
        torch.testing.assert_close(model(x, t, lab), ref)
