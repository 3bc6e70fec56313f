"""torch CPU tensors (through shared memory) and the LiteAttention drop-in module. Skipped
where torch is not installed."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import liteattn  # noqa: E402
from refimpl import clustered_qkv, ref_attention, rel_l2  # noqa: E402


def test_cpu_tensors_match_reference(client, rng):
    s = client.open_session("torch-cpu", layers=1, heads=2, head_dim=64, dtype=torch.float32,
                            max_seq_q=2048, threshold=-3.0)
    BM, BN = s.tile_sizes
    S = 3 * max(BM, BN) + 1
    qn, kn, vn = clustered_qkv(rng, 1, S, S, 2, 64, BM, BN)
    for step in range(3):
        before = s.mask(0)
        q, k, v = (torch.from_numpy(x) for x in (qn, kn, vn))
        out, lse = s.attention(0, step, q, k, v, return_lse=True)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert tuple(lse.shape) == (1, 2, S)
        want, want_lse, want_mask = ref_attention(qn, kn, vn, before, BM=BM, BN=BN, tau=-3.0,
                                                  step=step)
        assert rel_l2(out.numpy(), want) < 1e-5
        assert np.abs(lse.numpy() - want_lse).max() < 1e-4
        nq, nw = -(-S // BM), -(-(-(-S // BN)) // 32)
        assert (s.mask(0)[:, :, :nq, :nw] == want_mask[:, :, :nq, :nw]).all()
    s.close()


def test_cpu_bf16_and_strided(client, rng):
    s = client.open_session("torch-bf16", layers=1, heads=2, head_dim=64, dtype="bfloat16",
                            max_seq_q=512, threshold=-math.inf)
    base = torch.randn(1, 2, 300, 64, dtype=torch.bfloat16)
    q = base.transpose(1, 2)              # (B, S, H, D) view with non-contiguous strides
    k = torch.randn(1, 300, 2, 64, dtype=torch.bfloat16)
    v = torch.randn(1, 300, 2, 64, dtype=torch.bfloat16)
    out = s.attention(0, 0, q, k, v)
    assert out.dtype == torch.bfloat16
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().transpose(1, 2),
        v.float().transpose(1, 2)).transpose(1, 2)
    assert rel_l2(out.float().numpy(), ref.numpy()) < 1e-2
    s.close()


def test_drop_in_module(daemon, rng):
    ctx = liteattn.Context(socket=daemon.socket)
    layers = [liteattn.LiteAttention(threshold=-3.0, context=ctx) for _ in range(3)]
    assert [a.layer for a in layers] == [0, 1, 2]
    ctx.new_generation()
    qn, kn, vn = clustered_qkv(rng, 1, 700, 700, 2, 64, 128, 128)
    q, k, v = (torch.from_numpy(x) for x in (qn, kn, vn))
    for step in range(3):
        for a in layers[:2]:
            out, lse = a(q, k, v, return_softmax_lse=True)
            assert out.shape == q.shape and lse.shape == (1, 2, 700)
    s = ctx.session
    assert s.layers == 3 and layers[0].step == 3 and layers[2].step == 0
    BM, BN = s.tile_sizes
    assert layers[0].live_fraction < 1.0 or BN >= 700
    assert layers[2].live_fraction == pytest.approx(1.0)
    # enable_skip_optimization(False): dense, exact, the mask kept
    m = layers[0].mask().copy()
    layers[0].enable_skip_optimization(False)
    out = layers[0](q, k, v)
    dense = ref_attention(qn, kn, vn, m, BM=BM, BN=BN, tau=-3.0, mode="dense")[0]
    assert rel_l2(out.numpy(), dense) < 1e-5
    assert (layers[0].mask() == m).all()
    layers[0].enable_skip_optimization(True)
    # reset_skip_state: this layer's next call is dense and revives its mask, others untouched
    m1 = layers[1].mask().copy()
    layers[0].reset_skip_state()
    out = layers[0](q, k, v)
    assert rel_l2(out.numpy(), dense) < 1e-5
    nq, nk = -(-700 // BM), -(-700 // BN)
    lm = layers[0].mask()
    for n in range(nk):
        assert ((lm[:, :, :nq, n // 32] >> np.uint32(n % 32)) & 1).all()
    assert (layers[1].mask() == m1).all()
    # set_threshold(-inf): nothing more is skipped from here on
    layers[1].set_threshold(-math.inf)
    before = layers[1].mask().copy()
    layers[1](q, k, v)
    assert (layers[1].mask()[:, :, :nq] == before[:, :, :nq]).all()
    # a new generation: fresh session, steps from 0
    ctx.new_generation()
    assert ctx.session is None and layers[0].step == 0
    layers[0](q, k, v)
    assert ctx.session.info()["calls"] == 1
    ctx.close()


def test_must_do_list_formats():
    conv = liteattn.convert_must_list
    assert conv([99, 49]) == ((50, 100),)              # reference: hi inclusive > lo exclusive
    assert conv([99, 49, 20, -1]) == ((50, 100), (0, 21))
    assert conv([(0, 10), (20, 30)]) == ((0, 10), (20, 30))
    assert conv([0, 10]) == ((0, 10),)
    assert conv(None) == ()


def test_drop_in_must_do(daemon, rng):
    ctx = liteattn.Context(socket=daemon.socket)
    a = liteattn.LiteAttention(threshold=math.inf, context=ctx)
    qn, kn, vn = (rng.standard_normal((1, 600, 2, 64)).astype(np.float32) for _ in range(3))
    q, k, v = (torch.from_numpy(x) for x in (qn, kn, vn))
    a(q, k, v, must_do_list=[9, -1])                    # keys 0..9 always computed
    BM, BN = ctx.session.tile_sizes
    m = a.mask()
    assert ((m[:, :, :-(-600 // BM), 0] & 1) == 1).all()
    ctx.close()


def test_scalar_tensors_as_layer_step_threshold(client, rng):
    # 0-d tensors are the integers and numbers they hold; a 0-d float tensor is no layer index
    s = client.open_session("torch-scalars", layers=2, heads=2, head_dim=64, dtype="float32",
                            max_seq_q=256, threshold=torch.tensor(-3.0))
    q, k, v = (torch.randn(1, 100, 2, 64) for _ in range(3))
    out = s.attention(torch.tensor(1), torch.tensor(0), q, k, v, threshold=torch.tensor(-4.0))
    assert tuple(out.shape) == (1, 100, 2, 64)
    with pytest.raises(liteattn.InvalidArgument, match="layer must be an integer"):
        s.attention(torch.tensor(0.5), 0, q, k, v)
    s.close()
