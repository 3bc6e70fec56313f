"""LiteAttention(token_order=...): the calls run in another order of the tokens (liteattn.order)
and answer in the caller's. NumPy arrays through the CPU backend daemon; the mask bits and
outputs are checked against the float64 reference run on the permuted tokens."""
import numpy as np
import pytest

import liteattn
from liteattn import order
from refimpl import clustered_qkv, ref_attention, rel_l2


def test_orders():
    grid = (4, 8, 8)
    z = order.zorder(grid)
    assert sorted(z.tolist()) == list(range(256))
    t, h, w = z // 64, (z // 8) % 8, z % 8
    # every aligned run of 64 is a 4 x 4 x 4 brick, of 8 a 2 x 2 x 2 one
    for n, side in ((8, 2), (64, 4)):
        for a in range(0, 256, n):
            for c in (t, h, w):
                assert c[a:a + n].max() - c[a:a + n].min() + 1 == side
    b = order.blocks(grid, (2, 4, 4))
    assert b[:5].tolist() == [0, 1, 2, 3, 8]
    assert order.token_order(grid, "raster") is None
    assert (order.token_order(grid, "blocks:2,4,4") == b).all()
    assert (order.inverse(z)[z] == np.arange(256)).all()
    for bad in ("blocks:3,4,4", "blocks:2,4", "hilbert"):
        with pytest.raises(ValueError):
            order.token_order(grid, bad)
    with pytest.raises(ValueError):
        order.zorder((0, 4, 4))
    # morton: the axes' bits in the pattern's order, lowest first
    assert (order.morton(grid, "wht") == z).all()
    m = order.token_order(grid, "morton:thw")
    t, h, w = m // 64, (m // 8) % 8, m % 8
    assert [int(t[1]), int(h[1]), int(w[1])] == [1, 0, 0]   # time first
    for a in range(0, 256, 32):   # 5 bits t, h, w, t, h: 4 x 4 x 2 bricks
        assert [int(c[a:a + 32].max() - c[a:a + 32].min() + 1) for c in (t, h, w)] == [4, 4, 2]
    tt = order.morton(grid, "tthw")   # t exhausted after 2 bits: then h, w, h, w, ...
    t2 = tt // 64
    assert [int(t2[a:a + 4].max() - t2[a:a + 4].min() + 1) for a in (0, 4, 252)] == [4, 4, 4]
    odd = order.morton((5, 3, 7), "thw")
    assert sorted(odd.tolist()) == list(range(105))
    for bad in ("morton:", "morton:thx", "morton:th"):
        with pytest.raises(ValueError):
            order.token_order(grid, bad)
    with pytest.raises(ValueError):
        order.check([0, 2, 2])


def test_module_follows_the_reference_in_the_new_order(daemon, rng):
    B, S, H, D = 1, 512, 2, 64
    perm = order.zorder((8, 8, 8))
    # tokens clustered in runs of the Z-order, so scattered in the caller's order
    inv = order.inverse(perm)
    qn, kn, vn = (x[:, inv] for x in clustered_qkv(rng, B, S, S, H, D, 64, 64))
    ctx = liteattn.Context(socket=daemon.socket)
    a = liteattn.LiteAttention(threshold=-3.0, context=ctx, token_order=perm)
    plain = liteattn.LiteAttention(threshold=-3.0, context=ctx)
    ctx.new_generation()
    BM = BN = None
    mask = None
    for step in range(3):
        out, lse = a(qn, kn, vn, return_softmax_lse=True)
        assert out.shape == qn.shape and lse.shape == (B, H, S)
        if BM is None:
            BM, BN = ctx.session.tile_sizes
            nQ, nK = -(-S // BM), -(-S // BN)
            mask = np.full((B, H, nQ, (nK + 31) // 32), 0xffffffff, dtype=np.uint32)
            mask &= np.uint32((1 << nK) - 1) if nK < 32 else np.uint32(0xffffffff)
        want, wlse, mask = ref_attention(qn[:, perm], kn[:, perm], vn[:, perm], mask, BM=BM,
                                         BN=BN, tau=-3.0, step=step)[:3]
        assert rel_l2(out, want[:, inv]) < 1e-5, (step, rel_l2(out, want[:, inv]))
        assert np.abs(lse - wlse[:, :, inv]).max() < 1e-4
        got = np.asarray(a.mask())
        assert got.shape == mask.shape and np.array_equal(got, mask), step
        plain(qn, kn, vn)   # the same calls in the caller's order
    # in its own order the structure lines up with the tiles: more of them skipped
    assert a.live_fraction < plain.live_fraction
    ctx.end_generation()
    ctx.close()


def test_errors(daemon, rng):
    ctx = liteattn.Context(socket=daemon.socket)
    qn, kn, vn = clustered_qkv(rng, 1, 128, 128, 1, 64, 64, 64)
    a = liteattn.LiteAttention(threshold=-3.0, context=ctx, token_order=np.arange(256)[::-1])
    with pytest.raises(liteattn.InvalidArgument, match="256 tokens"):
        a(qn, kn, vn)
    a.set_token_order(order.zorder((2, 8, 8)))
    with pytest.raises(liteattn.InvalidArgument, match="must-do"):
        a(qn, kn, vn, must_do_list=[0, 16])
    with pytest.raises(liteattn.InvalidArgument, match="permutation"):
        liteattn.LiteAttention(context=ctx, token_order=[0, 1, 1])
    a.set_token_order(None)
    out = a(qn, kn, vn)
    assert out.shape == qn.shape
    ctx.close()


def test_torch_tensors(daemon, rng):
    torch = pytest.importorskip("torch")
    perm = order.zorder((4, 8, 8))
    qn, kn, vn = clustered_qkv(rng, 2, 256, 256, 2, 64, 64, 64)
    ctx = liteattn.Context(socket=daemon.socket)
    a = liteattn.LiteAttention(threshold=-3.0, context=ctx, token_order=torch.from_numpy(perm))
    b = liteattn.LiteAttention(threshold=-3.0, context=ctx, token_order=perm)
    ctx.new_generation()
    for step in range(2):
        out, lse = a(*(torch.from_numpy(x) for x in (qn, kn, vn)), return_softmax_lse=True)
        want, wlse = b(qn, kn, vn, return_softmax_lse=True)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 256, 2, 64)
        assert np.array_equal(out.numpy(), want) and np.array_equal(lse.numpy(), wlse)
    assert np.array_equal(np.asarray(a.mask()), np.asarray(b.mask()))
    ctx.close()
