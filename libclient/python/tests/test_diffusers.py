"""liteattn.diffusers on a tiny random-weight Wan transformer: apply, remove, and equality with
the untouched model at threshold=-inf. Skipped where torch or diffusers is missing."""
import logging
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import liteattn  # noqa: E402
import liteattn.diffusers as ld  # noqa: E402
from wan import tiny_wan  # noqa: E402


def inputs(B=1, T=3, H=16, W=20):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, T, H, W, generator=g)
    text = torch.randn(B, 12, 32, generator=g)
    return x, text


def run(model, x, text, t):
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([t] * x.shape[0]),
                     encoder_hidden_states=text, return_dict=False)[0]


def test_apply_remove_exact_at_minus_inf(daemon, caplog):
    model = tiny_wan()
    x, text = inputs()
    ref = [run(model, x, text, t) for t in (900.0, 800.0, 700.0)]
    procs = dict(model.attn_processors)
    caplog.set_level(logging.INFO, logger="liteattn.diffusers")
    ld.apply(model, threshold=-math.inf, socket=daemon.socket)
    names = {k for k, p in model.attn_processors.items()
             if isinstance(p, ld.LiteAttnProcessor)}
    assert names == {k for k in procs if ".attn1." in k}          # self-attention only
    got = [run(model, x, text, t) for t in (900.0, 800.0, 700.0)]
    st = model._liteattn_state
    assert st.lite_calls == 2 * 3 and st.step == 2
    sess = st.session
    assert sess.layers == 2 and sess.kv_shards == 2
    for a, b in zip(got, ref):
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-4, err
    ld.new_generation(model)
    summary = ld.summary(model)
    assert summary["calls"] == 6 and summary["computed_fraction"] == pytest.approx(1.0)
    assert any("generation done" in r.message for r in caplog.records)
    ld.remove(model)
    assert {k: type(p) for k, p in model.attn_processors.items()} == \
        {k: type(p) for k, p in procs.items()}
    again = run(model, x, text, 900.0)
    assert torch.equal(again, ref[0])


def test_skipping_cfg_branches(daemon):
    model = tiny_wan()
    x, text = inputs(H=16, W=24)
    ld.apply(model, threshold=0.0, socket=daemon.socket)
    outs = []
    for t in (900.0, 800.0, 700.0, 600.0):
        outs.append(run(model, x, text, t))     # cond
        run(model, x, text * 0, t)              # uncond: same timestep -> branch 1
    st = model._liteattn_state
    s = st.session
    assert st.step == 3 and s.info()["calls"] == 16
    m0, m1 = s.mask(0, kv_shard=0), s.mask(0, kv_shard=1)
    assert m0.shape == m1.shape
    assert s.stats["tiles_computed"] <= s.stats["tiles_total"]
    assert all(torch.isfinite(o).all() for o in outs)
    # timestep going up again begins a new generation by itself (bare transformer)
    run(model, x, text, 900.0)
    assert st.session is not s and st.step == 0
    ld.remove(model)


def test_token_order_exact_at_minus_inf(daemon):
    """apply(token_order=...) runs each self-attention call in Z-order over the token grid it
    reads from the transformer call ((4, 16, 16) latents, patch (1, 2, 2): a 4 x 8 x 8 grid)
    and answers in the model's order: equal to the untouched model at threshold -inf."""
    model = tiny_wan()
    x, text = inputs(T=4, H=16, W=16)
    ref = [run(model, x, text, t) for t in (900.0, 800.0, 700.0)]
    with pytest.raises(liteattn.InvalidArgument, match="morton"):
        ld.apply(model, token_order="morton:xyz", socket=daemon.socket)
    ld.apply(model, threshold=-math.inf, socket=daemon.socket, token_order="zorder")
    got = [run(model, x, text, t) for t in (900.0, 800.0, 700.0)]
    st = model._liteattn_state
    assert st.grid == (4, 8, 8) and st.lite_calls == 6 and st.ordered_calls == 6
    for a, b in zip(got, ref):
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-4, err
    ld.new_generation(model)
    sm = ld.summary(model)
    assert sm["token_order"] == "zorder" and sm["ordered_calls"] == 6
    ld.remove(model)


def test_token_grid_of_a_call():
    class Cfg:
        patch_size = (1, 2, 2)

    class Wan:
        config = Cfg()

    class LtxCfg:
        patch_size, patch_size_t = 1, 1

    class Ltx:
        config = LtxCfg()

    assert ld._token_grid(Wan(), (torch.zeros(1, 4, 3, 16, 20),), {}) == (3, 8, 10)
    assert ld._token_grid(Wan(), (), {"hidden_states": torch.zeros(1, 4, 3, 15, 20)}) is None
    assert ld._token_grid(Ltx(), (torch.zeros(1, 96, 8),),
                          {"num_frames": 2, "height": 3, "width": 4}) == (2, 3, 4)
    assert ld._token_grid(Ltx(), (torch.zeros(1, 96, 8),), {}) is None


def test_unsupported_model_is_refused():
    from torch import nn

    class NoAttn(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(liteattn.NotSupported):
        ld.apply(NoAttn(), socket="/nonexistent")


def test_wan_pipeline_cfg_two_passes(daemon):
    pytest.importorskip("transformers")        # WanPipeline imports it
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tiny_wan(),
                       scheduler=FlowMatchEulerDiscreteScheduler())
    g = torch.Generator().manual_seed(2)
    emb, neg = torch.randn(1, 12, 32, generator=g), torch.randn(1, 12, 32, generator=g)

    def gen():
        return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=48, width=48,
                    num_frames=5, num_inference_steps=3, guidance_scale=5.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    ref = gen()
    ld.apply(pipe, threshold=-math.inf, socket=daemon.socket)
    st = pipe._liteattn_state
    seen = []
    orig_attend = st.attend

    def attend(layer, q, k, v, scale):
        seen.append((st.step, st.branch, layer))
        return orig_attend(layer, q, k, v, scale)
    st.attend = attend
    got = gen()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    # 3 steps x (cond, uncond) x 2 layers, each pass on its own masks (kv shard = branch)
    assert sorted(set(seen)) == [(s, b, l) for s in range(3) for b in range(2) for l in range(2)]
    assert st.session is None                      # closed at the end of pipe(...)
    summ = ld.summary(pipe)
    assert summ["steps"] == 3 and summ["calls"] == 12
    seen.clear()
    gen()                                          # a second call: a fresh session, step 0 again
    assert seen[0][:2] == (0, 0) and st.generations == 2
    ld.remove(pipe)
    assert type(pipe) is WanPipeline
    assert ((gen() - ref).norm() / ref.norm()).item() < 1e-6


def test_ltx_video_exact_at_minus_inf(daemon):
    from diffusers import LTXVideoTransformer3DModel
    torch.manual_seed(0)
    m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2,
                                   attention_head_dim=64, cross_attention_dim=128, num_layers=2,
                                   caption_channels=32).eval()
    F, H, W = 3, 8, 8
    x, text, mask = torch.randn(1, F * H * W, 8), torch.randn(1, 10, 32), torch.ones(1, 10)

    def run(t):   # timestep passed positionally (third argument of LTX's forward)
        with torch.no_grad():
            return m(x, text, torch.tensor([t]), mask, num_frames=F, height=H, width=W,
                     return_dict=False)[0]
    ref = [run(t) for t in (900.0, 800.0)]
    ld.apply(m, threshold=-math.inf, socket=daemon.socket)
    got = [run(t) for t in (900.0, 800.0)]
    st = m._liteattn_state
    assert st.lite_calls == 4 and st.dense_calls == 0 and st.step == 1
    ld.remove(m)
    for a, b in zip(got, ref):
        assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_cogvideox_refused():
    from diffusers import CogVideoXTransformer3DModel
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=64, in_channels=4,
                                    out_channels=4, time_embed_dim=32, text_embed_dim=32,
                                    num_layers=1, sample_width=8, sample_height=8,
                                    sample_frames=5)
    with pytest.raises(liteattn.NotSupported) as ei:
        ld.apply(m, socket="/nonexistent")
    assert "CogVideoX" in str(ei.value)
    assert all(not isinstance(p, ld.LiteAttnProcessor) for p in m.attn_processors.values())


def test_batched_cfg_rows(daemon):
    model = tiny_wan()
    x, text = inputs(B=2)                    # cond and uncond as two batch rows of one call
    ref = [run(model, x, text, t) for t in (900.0, 800.0)]
    ld.apply(model, threshold=-math.inf, socket=daemon.socket)
    got = [run(model, x, text, t) for t in (900.0, 800.0)]
    s = model._liteattn_state.session
    assert s.batch == 2 and s.mask(0).shape[0] == 2   # one mask row per batch row
    assert model._liteattn_state.branch == 0
    ld.remove(model)
    for a, b in zip(got, ref):
        assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_hunyuan_video_joint_with_text_padding(daemon):
    from diffusers import HunyuanVideoTransformer3DModel
    torch.manual_seed(0)
    m = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
        text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(16, 24, 24)).eval()
    x, text, pooled = torch.randn(1, 4, 3, 16, 16), torch.randn(1, 20, 32), torch.randn(1, 16)
    emask = torch.ones(1, 20, dtype=torch.long)
    emask[:, 13:] = 0                                  # 7 padded text tokens

    def run(t):
        with torch.no_grad():
            return m(x, torch.tensor([t]), text, emask, pooled,
                     guidance=torch.tensor([3000.0]), return_dict=False)[0]
    ref = [run(t) for t in (900.0, 800.0)]
    ld.apply(m, threshold=-math.inf, socket=daemon.socket)
    got = [run(t) for t in (900.0, 800.0)]
    st = m._liteattn_state
    assert st.lite_calls == 4 and st.dense_calls == 0
    s = st.session
    assert s.max_seq_q == 3 * 8 * 8 and s.max_seq_k == 3 * 8 * 8 + 20
    ld.remove(m)
    for a, b in zip(got, ref):
        assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_warm_start_across_generations(daemon):
    """apply() names a warm key (model, geometry, thresholds): the second generation of the
    same model starts from the first one's masks; warm=False leaves it cold."""
    model = tiny_wan()
    x, text = inputs(H=16, W=24)
    ld.apply(model, threshold=-2.5, socket=daemon.socket)
    st = model._liteattn_state
    warm = []
    for _ in range(2):
        ld.new_generation(model)
        for t in (900.0, 800.0, 700.0):
            run(model, x, text, t)
        warm.append(dict(st.session.warm))
    ld.new_generation(model)
    assert warm[0]["key"] == warm[1]["key"]
    assert "WanTransformer3DModel" in warm[0]["key"] or "liteattn:" in warm[0]["key"]
    assert "tau-2.5" in warm[0]["key"] and "branches2" in warm[0]["key"]
    assert warm[0]["generations"] == 0 and warm[1]["generations"] == 1
    assert ld.summary(model)["warm"]["generations"] == 1
    ld.remove(model)
    ld.apply(model, threshold=-2.5, socket=daemon.socket, warm=False)
    run(model, x, text, 900.0)
    assert model._liteattn_state.session.warm["key"] is None
    ld.remove(model)
