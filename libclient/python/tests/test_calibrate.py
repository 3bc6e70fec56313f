"""Calibrated profiles (liteattn.calibrate): the file format, and sessions and LiteAttention
using a profile's per-step and per-layer thresholds (CPU backend, NumPy). The calibration
itself needs torch and a model: bench/quality/run.py --smoke runs it in make check."""
import itertools
import json
import math

import numpy as np
import pytest

import liteattn
from liteattn.calibrate import Profile, load_profile
from refimpl import clustered_qkv, live_bits

_keys = itertools.count()


def test_profile_roundtrip(tmp_path):
    p = Profile([-math.inf, -3.0], layers=[[-math.inf, -6.0], [0.0, -1.0]], model="m",
                resolution="16x64x64", steps=2, target=0.01)
    path = tmp_path / "p.json"
    p.save(str(path))
    d = json.loads(path.read_text())
    assert d["schedule"][0] is None and d["format"] == "liteattn-profile/1"
    q = load_profile(str(path), model="m", resolution="16x64x64", steps=2)
    assert q.schedule == [-math.inf, -3.0]
    assert q.threshold(0, 0) == -math.inf and q.threshold(1, 1) == -1.0
    assert q.threshold(1, 7) == -1.0          # past the end: the last entry
    assert q.threshold(5, 1) == -3.0          # a layer the profile lacks: the schedule
    with pytest.raises(ValueError):
        load_profile(str(path), steps=50)
    with pytest.raises(ValueError):
        load_profile({"format": "other"})


def test_session_and_module_use_profile(client):
    B, S, H, D = 1, 512, 2, 64
    prof = {"format": "liteattn-profile/1", "model": "t", "resolution": "x", "steps": 2,
            "schedule": [None, None], "layers": [[None, None], [0.0, 0.0]]}
    s = client.open_session("cal-%d" % next(_keys), layers=2, heads=H, head_dim=D,
                            dtype="float32", max_seq_q=S, threshold=0.0, profile=prof)
    BM, BN = s.tile_sizes
    rng = np.random.default_rng(3)
    q, k, v = clustered_qkv(rng, B, S, S, H, D, BM, BN)
    for step in range(2):
        for layer in range(2):
            s.attention(layer, step, q, k, v)
    nQ, nK = -(-S // BM), -(-S // BN)
    full = B * H * nQ * nK
    assert live_bits(s.mask(0), nQ, nK) == full     # layer 0: -inf, nothing skipped
    assert live_bits(s.mask(1), nQ, nK) < full      # layer 1: tau 0 skips
    s.close()
    # The drop-in module with the same profile: the same split between the layers.
    ctx = liteattn.Context(socket=client.socket)
    mods = [liteattn.LiteAttention(threshold=0.0, context=ctx, profile=prof) for _ in range(2)]
    ctx.new_generation()
    for step in range(2):
        for m in mods:
            m(q, k, v)
    assert live_bits(mods[0].mask(), nQ, nK) == full
    assert live_bits(mods[1].mask(), nQ, nK) < full
    ctx.close()
