"""The NumPy path against the daemon's CPU backend, compared with the float64 reference of
SKIP-SEMANTICS.md in refimpl.py (outputs, LSE and masks), over multi-step sessions."""
import itertools
import math

import numpy as np
import pytest

import liteattn
from refimpl import clustered_qkv, live_bits, ref_attention, rel_l2

_keys = itertools.count()


def open_s(client, **kw):
    args = dict(layers=2, heads=2, head_dim=64, dtype="float32", max_seq_q=300, batch=2,
                threshold=-3.0)
    args.update(kw)
    return client.open_session("np-%d" % next(_keys), **args)


def valid_ones(s, Sq, Sk):
    BM, BN = s.tile_sizes
    return live_bits_of(s, 0, Sq, Sk) == s.batch * s.heads * -(-Sq // BM) * -(-Sk // BN)


def live_bits_of(s, layer, Sq, Sk):
    BM, BN = s.tile_sizes
    return live_bits(s.mask(layer), -(-Sq // BM), -(-Sk // BN))


def compare_masks(got, want, nQ, nK):
    nw = -(-nK // 32)
    got, want = got[:, :, :nQ, :nw], want[:, :, :nQ, :nw]
    diff = int(np.unpackbits((got ^ want).view(np.uint8)).sum())
    assert diff == 0, "%d mask bits differ from the reference" % diff


def check_call(s, layer, step, q, k, v, tol=1e-5, lse_tol=1e-4, **kw):
    """One call through the daemon and the reference from the daemon's own mask before it."""
    BM, BN = s.tile_sizes
    before = s.mask(layer)
    out, lse = s.attention(layer, step, q, k, v, return_lse=True, **kw)
    tau = kw.pop("threshold", None)
    if tau is None:
        tau = s_threshold(s)
    mode = kw.pop("mode", None) or "skip"
    want_o, want_lse, want_mask = ref_attention(q, k, v, before, BM=BM, BN=BN, tau=tau,
                                                mode=mode, step=step, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == np.float32
    e = rel_l2(out, want_o)
    assert e <= tol, "relative L2 error of out %g > %g" % (e, tol)
    el = float(np.max(np.abs(lse - want_lse)))
    assert el <= lse_tol, "max |lse - ref| %g > %g" % (el, lse_tol)
    compare_masks(s.mask(layer), want_mask, -(-q.shape[1] // BM), -(-k.shape[1] // BN))
    return out, lse


def s_threshold(s):
    return getattr(s, "_test_tau", -3.0)


def test_session_facts(client):
    with open_s(client, layers=3, max_seq_q=500, max_seq_k=700, batch=2) as s:
        BM, BN = s.tile_sizes
        assert BM > 0 and BN > 0
        assert (s.layers, s.heads, s.head_dim, s.batch) == (3, 2, 64, 2)
        assert s.dtype == "float32"
        assert s.mask_shape == (2, 2, -(-500 // BM), -(-(-(-700 // BN)) // 32))
        m = s.mask(2)
        assert m.dtype == np.uint32 and m.shape == s.mask_shape
        assert valid_ones(s, 500, 700)
        info = s.info()
        assert info["calls"] == 0 and len(info["live_fraction"]) == 3
        assert all(abs(x - 1.0) < 1e-12 for x in info["live_fraction"])
        assert any(r.get("key") == s.key for r in client.sessions())


def test_dense_at_minus_inf(client, rng):
    s = open_s(client, threshold=-math.inf, max_seq_q=300, max_seq_k=400)
    s._test_tau = -math.inf
    BM, BN = s.tile_sizes
    Sq, Sk = min(300, BM * 2 + 17), min(400, BN * 2 + 5)
    for step in range(3):
        q = rng.standard_normal((2, Sq, 2, 64)).astype(np.float32)
        k = rng.standard_normal((2, Sk, 2, 64)).astype(np.float32)
        v = rng.standard_normal((2, Sk, 2, 64)).astype(np.float32)
        check_call(s, 0, step, q, k, v)
    assert valid_ones(s, Sq, Sk)
    s.close()


@pytest.mark.parametrize("tau", [-3.0, -8.0])
def test_multistep_skip(client, rng, tau):
    s = open_s(client, threshold=tau, max_seq_q=4096, max_seq_k=4096, batch=1)
    s._test_tau = tau
    BM, BN = s.tile_sizes
    Sq, Sk = 4 * BM + 9, 5 * BN + 3
    q0, k0, v0 = clustered_qkv(rng, 1, Sq, Sk, 2, 64, BM, BN)
    live = []
    for step in range(4):
        drift = 0.02 * step
        q = (q0 + drift * rng.standard_normal(q0.shape)).astype(np.float32)
        k = (k0 + drift * rng.standard_normal(k0.shape)).astype(np.float32)
        check_call(s, 1, step, q, k, v0)
        live.append(live_bits_of(s, 1, Sq, Sk))
    assert live == sorted(live, reverse=True), "live tiles grew: %s" % live
    assert live[-1] < s.heads * -(-Sq // BM) * -(-Sk // BN), "nothing was skipped"
    # layer 0 was never called: still all ones
    assert valid_ones(s, Sq, Sk)
    info = s.info()
    assert info["calls"] == 4
    assert info["live_fraction"][0] == pytest.approx(1.0)
    assert info["live_fraction"][1] < 1.0
    assert 0 < s.stats["tiles_computed"] < s.stats["tiles_total"]
    s.close()


def test_plus_inf_keeps_first_visited(client, rng):
    s = open_s(client, threshold=math.inf, max_seq_q=2048, batch=1)
    s._test_tau = math.inf
    BM, BN = s.tile_sizes
    Sq = Sk = 3 * max(BM, BN) + 5
    q, k, v = (rng.standard_normal((1, Sq, 2, 64)).astype(np.float32) for _ in range(3))
    nK = -(-Sk // BN)
    check_call(s, 0, 0, q, k, v)  # even step: descending, the last tile is visited first
    m = s.mask(0)
    for n in range(nK):
        col = (m[:, :, :-(-Sq // BM), n // 32] >> np.uint32(n % 32)) & 1
        assert (col == (1 if n == nK - 1 else 0)).all(), "tile %d" % n
    check_call(s, 0, 1, q, k, v)  # computes exactly that tile
    assert s.last_call.get("tiles_computed", 2 * -(-Sq // BM)) == 2 * -(-Sq // BM)
    s.close()


def test_must_do_and_must_skip(client, rng):
    s = open_s(client, threshold=math.inf, max_seq_q=2048, batch=1)
    s._test_tau = math.inf
    BM, BN = s.tile_sizes
    Sq = Sk = 4 * BN + 7
    q, k, v = clustered_qkv(rng, 1, Sq, Sk, 2, 64, BM, BN)
    check_call(s, 0, 0, q, k, v, must_do=[(0, 3)], must_skip=[(BN, 2 * BN)])
    check_call(s, 0, 1, q, k, v, must_do=[(0, 3), (2 * BN + 1, 2 * BN + 2)])
    check_call(s, 0, 2, q, k, v)
    s.close()


@pytest.mark.parametrize("mode", ["observe", "dense"])
def test_modes(client, rng, mode):
    s = open_s(client, threshold=-2.0, mode=mode, max_seq_q=4096, batch=1)
    s._test_tau = -2.0
    BM, BN = s.tile_sizes
    Sq = Sk = 3 * max(BM, BN) + 1
    q, k, v = clustered_qkv(rng, 1, Sq, Sk, 2, 64, BM, BN)
    for step in range(2):
        check_call(s, 0, step, q, k, v, mode=mode)
    # a per-call mode override: skip on the session's masks
    check_call(s, 0, 2, q, k, v, mode="skip")
    s.close()


def test_threshold_override_and_schedule(client, rng):
    s = open_s(client, threshold=-3.0, schedule=[-math.inf, -1.0], max_seq_q=4096, batch=1)
    BM, BN = s.tile_sizes
    Sq = Sk = 3 * max(BM, BN) + 2
    q, k, v = clustered_qkv(rng, 1, Sq, Sk, 2, 64, BM, BN)
    s._test_tau = -math.inf          # step 0 of the schedule
    check_call(s, 0, 0, q, k, v)
    assert valid_ones(s, Sq, Sk)
    s._test_tau = -1.0               # step 1 and later
    check_call(s, 0, 1, q, k, v)
    check_call(s, 0, 2, q, k, v, threshold=-0.5)   # explicit override wins
    s.close()


def test_dry_run_leaves_mask(client, rng):
    s = open_s(client, threshold=math.inf, max_seq_q=2048, batch=1)
    BM, BN = s.tile_sizes
    Sq = Sk = 3 * BN
    q, k, v = (rng.standard_normal((1, Sq, 2, 64)).astype(np.float32) for _ in range(3))
    before = s.mask(0)
    out, dec = s.attention(0, 0, q, k, v, dry_run=True)
    assert (s.mask(0) == before).all()
    _, _, want = ref_attention(q, k, v, before, BM=BM, BN=BN, tau=math.inf, step=0)
    compare_masks(dec.reshape(s.mask_shape), want, -(-Sq // BM), -(-Sk // BN))
    s.close()


def test_float16_and_bf16(client, rng):
    for dtype in ("float16", "bfloat16"):
        s = open_s(client, dtype=dtype, threshold=-3.0, max_seq_q=1024, batch=1)
        s._test_tau = -3.0
        BM, BN = s.tile_sizes
        Sq = Sk = 2 * max(BM, BN) + 3
        q, k, v = clustered_qkv(rng, 1, Sq, Sk, 2, 64, BM, BN)
        if dtype == "float16":
            q, k, v = (x.astype(np.float16) for x in (q, k, v))
            out = s.attention(0, 0, q, k, v)
            assert out.dtype == np.float16
            want = ref_attention(q, k, v, s.mask(0) * 0 + 0xFFFFFFFF, BM=BM, BN=BN,
                                 tau=-3.0)[0]
            assert rel_l2(out.astype(np.float64), want) < 2e-3
        else:
            qb, kb, vb = (liteattn.float32_to_bf16(x) for x in (q, k, v))
            out = s.attention(0, 0, qb, kb, vb)
            assert out.dtype == np.uint16
            qf, kf, vf = (liteattn.bf16_to_float32(x) for x in (qb, kb, vb))
            want = ref_attention(qf, kf, vf, s.mask(0) * 0 + 0xFFFFFFFF, BM=BM, BN=BN,
                                 tau=-3.0)[0]
            assert rel_l2(liteattn.bf16_to_float32(out), want) < 1e-2
        s.close()


def test_staging_grows_and_out_param(client, rng):
    s = open_s(client, threshold=-math.inf, max_seq_q=4096, batch=1, layers=1)
    s._test_tau = -math.inf
    for S in (16, 1500, 100):
        q, k, v = (rng.standard_normal((1, S, 2, 64)).astype(np.float32) for _ in range(3))
        out = np.empty_like(q)
        r = s.attention(0, 0, q, k, v, mode="dense", out=out)
        assert r is out
        want = ref_attention(q, k, v, s.mask(0), BM=s.tile_sizes[0], BN=s.tile_sizes[1],
                             tau=-math.inf, mode="dense")[0]
        assert rel_l2(out, want) < 1e-5
    # non-contiguous inputs are copied into the staging buffer with their strides resolved
    q = rng.standard_normal((1, 2, 40, 64)).astype(np.float32).transpose(0, 2, 1, 3)
    out = s.attention(0, 1, q, q, q, mode="dense")
    want = ref_attention(q, q, q, s.mask(0), BM=s.tile_sizes[0], BN=s.tile_sizes[1],
                         tau=-math.inf, mode="dense")[0]
    assert rel_l2(out, want) < 1e-5
    s.close()


def test_reset(client, rng):
    s = open_s(client, threshold=math.inf, max_seq_q=1024, batch=1)
    BM, BN = s.tile_sizes
    Sq = Sk = 2 * BN + 1
    q, k, v = (rng.standard_normal((1, Sq, 2, 64)).astype(np.float32) for _ in range(3))
    s.attention(0, 0, q, k, v)
    assert not valid_ones(s, Sq, Sk)
    s.reset()
    assert valid_ones(s, Sq, Sk)
    s.close()


def test_row_max_carried(client, rng):
    """Carried row maxima (SKIP-SEMANTICS "Carried row maxima") through the NumPy path: the keys
    cut into 3 tile-aligned shards, called in the step's visiting order with one row_max array
    handed from call to call (updated in place), decide what one call over all keys decides
    (masks bit for bit, row maxima), each call matching the float64 reference with the same
    R; a bad row_max is refused before anything is sent."""
    B, Sq, H, D, P = 2, 200, 2, 64, 3
    with open_s(client, layers=1, max_seq_q=Sq, max_seq_k=4096, batch=B) as one:
        BM, BN = one.tile_sizes
        L = 2 * BN
        q, k, v = clustered_qkv(rng, B, Sq, P * L, H, D, BM, BN)
        with open_s(client, layers=1, max_seq_q=Sq, max_seq_k=L, batch=B, kv_shards=P) as ring:
            nQ, nKl = -(-Sq // BM), L // BN
            for step in range(3):
                r1 = np.full((B, H, Sq), -np.inf, dtype=np.float32)
                one.attention(0, step, q, k, v, row_max=r1)
                r = np.full((B, H, Sq), -np.inf, dtype=np.float32)
                rf = r.astype(np.float64)
                order = range(P - 1, -1, -1) if step % 2 == 0 else range(P)
                for j in order:
                    ks, vs = k[:, j * L:(j + 1) * L], v[:, j * L:(j + 1) * L]
                    before = ring.mask(0, kv_shard=j)
                    o, lse = ring.attention(0, step, q, ks, vs, kv_shard=j, row_max=r,
                                            return_lse=True)
                    want_o, want_l, want_m = ref_attention(q, ks, vs, before, BM=BM, BN=BN,
                                                           tau=-3.0, step=step, row_max=rf)
                    assert rel_l2(o, want_o) <= 1e-5
                    compare_masks(ring.mask(0, kv_shard=j), want_m, nQ, nKl)
                    fin = np.isfinite(rf)
                    assert np.array_equal(np.isneginf(r), np.isneginf(rf))
                    assert np.abs(r[fin] - rf[fin]).max() <= 1e-4 * (1 + np.abs(rf[fin]).max())
                assert np.array_equal(r, r1), "carried row maxima differ from one call's"
                whole = one.mask(0)
                for j in range(P):
                    for n in range(nKl):
                        g = j * nKl + n
                        a = (whole[..., :nQ, g // 32] >> np.uint32(g % 32)) & 1
                        b = (ring.mask(0, kv_shard=j)[..., :nQ, n // 32] >> np.uint32(n % 32)) & 1
                        assert np.array_equal(a, b), "step %d tile %d differs" % (step, g)
            assert live_bits_of(one, 0, Sq, P * L) < B * H * nQ * P * nKl, "nothing skipped"
        with pytest.raises(liteattn.InvalidArgument, match=r"expected \[B, H, Sq\]"):
            one.attention(0, 3, q, k, v, row_max=np.zeros((B, H, Sq + 1), np.float32))
        with pytest.raises(liteattn.InvalidArgument, match="float32"):
            one.attention(0, 3, q, k, v, row_max=np.zeros((B, H, Sq)))
