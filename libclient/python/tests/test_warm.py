"""Warm start and the quality guardrail from Python (NumPy, CPU backend): Session.warm, the
derived warm keys of the drop-in module, Client.warm_store / warm_drop, the guardrail's
statistics in info() and the per-layer live fractions of Client.sessions(). The engine-level
semantics are checked against float64 in tests/check_warm.c; here the Python surface."""
import math

import numpy as np
import pytest

import liteattn

B, S, H, D = 1, 1024, 2, 64


def structured(seed, step=0, amp=2.0):
    """Q, K with positional structure (attention peaked near the diagonal, as with RoPE), a
    per-seed noise, V random: (B, S, H, D) float32."""
    rng = np.random.default_rng(1000)
    phase = rng.uniform(0, 2 * math.pi, size=(H, D // 2))
    w = 2 * math.pi / (8.0 * 1.28 ** np.arange(D // 2))
    s = np.arange(S)[:, None, None]
    ang = w[None, None, :] * s + phase[None, :, :]              # (S, H, D/2)
    base = np.empty((S, H, D))
    base[..., 0::2] = amp * np.cos(ang)
    base[..., 1::2] = amp * np.sin(ang)
    g = np.random.default_rng(seed)
    d = np.random.default_rng(seed + 77)
    q = base + 0.35 * g.standard_normal(base.shape) + 0.01 * step * d.standard_normal(base.shape)
    k = base + 0.35 * g.standard_normal(base.shape) + 0.01 * step * d.standard_normal(base.shape)
    v = g.standard_normal(base.shape)
    return tuple(x[None].astype(np.float32) for x in (q, k, v))


def generation(client, key, seed, steps=4, layers=2, **kw):
    s = client.open_session(key, layers=layers, heads=H, head_dim=D, dtype="float32",
                            max_seq_q=S, threshold=-3.0, **kw)
    per_step = []
    for step in range(steps):
        q, k, v = structured(seed, step)
        comp = 0
        for layer in range(layers):
            s.attention(layer, step, q, k, v)
            comp += s.last_call["tiles_computed"]
        per_step.append(comp)
    return s, per_step


def test_session_warm_cold_then_warm(client):
    client.warm_drop()
    s, cold = generation(client, "py-warm-1", 1, warm_key="py-model", warm_dense_steps=0)
    assert s.warm["key"] == "py-model" and s.warm["generations"] == 0
    assert s.warm["status"].startswith("cold:")
    assert cold[0] == 2 * B * H * 8 * 16          # all tiles at step 0
    s.close()
    store = client.warm_store()
    assert [(e["key"], e["generations"]) for e in store] == [("py-model", 1)]
    assert store[0]["n_q_tiles"] == 8 and store[0]["n_k_tiles"] == 16
    s, warm = generation(client, "py-warm-2", 2, warm_key="py-model", warm_dense_steps=0)
    assert s.warm["generations"] == 1 and "seeded from 1 generation" in s.warm["status"]
    assert warm[0] < cold[0]
    info = s.info()
    assert info["warm"]["generations"] == 1 and info["warm_deposits"] == 0
    rows = [r for r in client.sessions() if r["key"] == "py-warm-2"]
    assert rows and rows[0]["warm_key"] == "py-model" and rows[0]["warm_generations"] == 1
    assert len(rows[0]["layer_live"]) == 2
    assert rows[0]["layer_live"] == pytest.approx(info["live_fraction"], abs=1e-3)
    s.close()
    assert client.warm_store()[0]["generations"] == 2
    assert client.warm_drop("py-model") == 1
    assert client.warm_store() == []


def test_warm_options_checked(client):
    with pytest.raises(liteattn.InvalidArgument):
        client.open_session("bad", layers=1, heads=H, head_dim=D, dtype="float32",
                            max_seq_q=S, warm_margin=2)               # no warm key
    with pytest.raises(liteattn.InvalidArgument) as e:
        client.open_session("bad", layers=1, heads=H, head_dim=D, dtype="float32",
                            max_seq_q=S, warm_key="k", warm_generations=100)
    assert "warm_max_generations" in str(e.value)
    with pytest.raises(liteattn.InvalidArgument) as e:
        client.open_session("bad", layers=1, heads=H, head_dim=D, dtype="float32",
                            max_seq_q=S, guard_every=1, guard_budget=2.0)
    assert "budget" in str(e.value)


def test_guard_counts_and_restores(client):
    s = client.open_session("py-guard", layers=1, heads=H, head_dim=D, dtype="float32",
                            max_seq_q=S, threshold=0.0, guard_every=1, guard_sample=8,
                            guard_budget=0.02)
    for step in range(3):
        q, k, v = structured(3, step)
        s.attention(0, step, q, k, v)
    info = s.info()
    assert info["guard_checks"] == 2                       # steps 1 and 2 (step 0: all ones)
    assert info["guard_rows"] == 2 * B * H * 8
    assert info["guard_restored"] > 0
    assert info["guard_tiles"] == info["guard_rows"] * 16
    assert s.stat("guard_restored") == info["guard_restored"]
    rows = [r for r in client.sessions() if r["key"] == "py-guard"]
    assert rows[0]["guard_restored"] == info["guard_restored"]
    s.close()
    quiet = client.open_session("py-quiet", layers=1, heads=H, head_dim=D, dtype="float32",
                                max_seq_q=S, threshold=-10.0, guard_every=1, guard_sample=8)
    for step in range(4):
        q, k, v = structured(3, step)
        quiet.attention(0, step, q, k, v)
    info = quiet.info()
    assert info["guard_checks"] == 3 and info["guard_restored"] == 0
    assert quiet.stats["tiles_computed"] < quiet.stats["tiles_total"]
    quiet.close()


def test_module_derives_a_warm_key(daemon):
    ctx = liteattn.Context(socket=daemon.socket, model="py-module-test")
    mods = [liteattn.LiteAttention(threshold=-3.0, context=ctx) for _ in range(2)]
    keys, gens = [], []
    for seed in (5, 6):
        ctx.new_generation(steps=3)
        for step in range(3):
            q, k, v = structured(seed, step)
            for m in mods:
                m(q, k, v)
        keys.append(ctx.session.warm["key"])
        gens.append(ctx.session.warm["generations"])
    ctx.end_generation()
    assert keys[0] == keys[1]
    assert keys[0] == liteattn.warm_key("py-module-test", layers=2, batch=B, seq_q=S, seq_k=S,
                                        heads=H, head_dim=D, dtype="float32", steps=3,
                                        extra="tau-3")
    assert gens == [0, 1]
    # Another threshold is another key: masks of tau -3 never seed a generation at -inf.
    for m in mods:
        m.set_threshold(-math.inf)
    ctx.new_generation(steps=3)
    q, k, v = structured(7)
    out = mods[0](q, k, v)
    assert ctx.session.warm["generations"] == 0 and "tau-inf" in ctx.session.warm["key"]
    assert out.shape == q.shape
    ctx.close()
    off = liteattn.Context(socket=daemon.socket, model="py-module-test", warm=False)
    m = liteattn.LiteAttention(threshold=-3.0, context=off)
    off.new_generation(steps=3)
    m(q, k, v)
    assert off.session.warm["key"] is None
    off.close()
    with pytest.raises(liteattn.InvalidArgument):
        liteattn.Context(warm=3)


def test_warm_key_is_bounded():
    k = liteattn.warm_key("x" * 1000, layers=40, batch=1, seq_q=75600, seq_k=75600, heads=40,
                          head_dim=128, dtype="bfloat16", steps=50, extra="y" * 300)
    assert len(k.encode()) <= 255
    assert k == liteattn.warm_key("x" * 1000, layers=40, batch=1, seq_q=75600, seq_k=75600,
                                  heads=40, head_dim=128, dtype="bfloat16", steps=50,
                                  extra="y" * 300)
    assert liteattn.threshold_tag(-3) == "tau-3"
    assert liteattn.threshold_tag(schedule=[-3, -3]) == "tau-3"
    assert liteattn.threshold_tag(schedule=[-6, -3]).startswith("tau~")
