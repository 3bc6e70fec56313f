"""liteattn.diffusers(parallel=...) on a tiny random-weight Wan transformer split by diffusers'
own context parallelism, over 2 and 4 gloo ranks on this machine (one process per rank, a file
rendezvous, sockets on the loopback interface only), against one process:
  - at threshold -inf, Ulysses, ring (both orders) and the hybrid give the unsplit model's
    output (relative L2 <= 1e-4) with every self-attention call through liteattn;
  - skipping (threshold +inf, 3 steps: after the dense first step each row keeps the first tile
    it visited, the sharpest test of the carried row maxima, as a ring shard's first tile keeps
    only when no earlier shard was seen): Ulysses' masks are one process's masks of its heads
    bit for bit, the ring's and the hybrid's in the global order one process's tiles bit for bit
    (the sequence splits into whole tiles), and their outputs equal one process's with liteattn.
diffusers' enable_parallelism() builds its device from the accelerator count, which is 0 with a
CPU-only torch; the ranks set the same ParallelConfig up by hand on a CPU mesh (cp_on_cpu).
Skipped without torch, torch.distributed or diffusers.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
pytest.importorskip("diffusers")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
try:
    from diffusers.models._modeling_parallel import ContextParallelConfig  # noqa: F401
except ImportError:
    pytest.skip("this diffusers has no context parallelism", allow_module_level=True)

from rankproc import wait_ranks  # noqa: E402
from wan import tiny_wan  # noqa: E402

HERE = os.path.abspath(__file__)
TIMESTEPS = (900.0, 800.0, 700.0)
# (name, world, ring degree, ulysses degree, threshold, parallel=)
RUNS = [("ulysses_exact", 2, 1, 2, -float("inf"), "auto"),
        ("ring_exact", 2, 2, 1, -float("inf"), "auto"),
        ("ulysses", 2, 1, 2, float("inf"), "auto"),
        ("ring", 2, 2, 1, float("inf"), "auto"),
        ("ring_global", 2, 2, 1, float("inf"), {"ring_order": "global"}),
        ("hybrid_exact", 4, 2, 2, -float("inf"), "auto"),
        ("hybrid_global", 4, 2, 2, float("inf"), {"ring_order": "global"})]


def inputs():
    """Latents [1, 4, 4, 16, 16]: 4 x 8 x 8 = 256 tokens after patching (2 tiles of 128 rows,
    4 of 64 keys on the CPU backend), 12 text tokens."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 4, 16, 16, generator=g), torch.randn(1, 12, 32, generator=g)


def forward(model, x, text, t):
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=text,
                     return_dict=False)[0]


def cp_on_cpu(model, ring, ulysses):
    """What transformer.enable_parallelism(config=ContextParallelConfig(...)) does, on a CPU
    device mesh: the config on the model and its processors, and the split/gather hooks."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh
    cp = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses)
    cfg = ParallelConfig(context_parallel_config=cp)
    mesh = init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    cfg.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = cfg
    for mod in model.modules():
        p = getattr(mod, "processor", None)
        if p is not None and hasattr(p, "_parallel_config"):
            p._parallel_config = cfg
    apply_context_parallel(model, cp, model._cp_plan)
    return cp


# ---- the rank's side (this file run as a script) --------------------------------------------

def rank_main(world, rank, init, socket, outdir):
    import liteattn.diffusers as ld
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    x, text = inputs()
    saved = {}
    for name, w, r, u, tau, par in RUNS:
        if w != world:
            continue
        model = tiny_wan()
        cp = cp_on_cpu(model, r, u)
        ld.apply(model, threshold=tau, socket=socket, parallel=par, log_steps=False)
        st = model._liteattn_state
        for step, t in enumerate(TIMESTEPS):
            saved["%s/%d/out" % (name, step)] = forward(model, x, text, t).numpy()
            s = st.pctx.session
            for layer in range(2):
                for slot in range(r):      # branch 0's slots: the K/V shards
                    saved["%s/%d/mask%d_%d" % (name, step, layer, slot)] = s.mask(
                        layer, kv_shard=slot)
        saved["%s/calls" % name] = np.array([st.lite_calls, st.dense_calls])
        saved["%s/index" % name] = np.array([cp._ring_local_rank, cp._ulysses_local_rank])
        ld.remove(model)
    np.savez(os.path.join(outdir, "rank%d.npz" % rank), **saved)
    dist.barrier()
    dist.destroy_process_group()


# ---- the test side ----------------------------------------------------------------------------

def start_ranks(world, socket, tmp):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1")
    init = "file://" + os.path.join(tmp, "rendezvous")
    pkg = os.path.dirname(os.path.dirname(HERE))
    env["PYTHONPATH"] = os.pathsep.join([pkg, os.path.dirname(HERE)] +
                                        [p for p in [env.get("PYTHONPATH")] if p])
    procs = [subprocess.Popen([sys.executable, HERE, str(world), str(r), init, socket, tmp],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    wait_ranks(procs, 150)
    return [dict(np.load(os.path.join(tmp, "rank%d.npz" % r))) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request, daemon):
    with tempfile.TemporaryDirectory(prefix="liteattn-dsp-") as tmp:
        yield request.param, start_ranks(request.param, daemon.socket, tmp)


@pytest.fixture(scope="module")
def single(daemon):
    """One process: the unsplit model's outputs, and with liteattn at threshold +inf its outputs
    and masks per step."""
    import liteattn.diffusers as ld
    x, text = inputs()
    model = tiny_wan()
    dense = [forward(model, x, text, t).numpy() for t in TIMESTEPS]
    ld.apply(model, threshold=float("inf"), socket=daemon.socket, log_steps=False)
    st, lite = model._liteattn_state, []
    for t in TIMESTEPS:
        out = forward(model, x, text, t).numpy()
        lite.append((out, [st.session.mask(layer, kv_shard=0) for layer in range(2)]))
    tiles = st.session.tile_sizes
    ld.remove(model)
    return dense, lite, tiles


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def bits(mask, nq, nk):
    n = np.arange(nk)
    return ((mask[:, :, :nq, n // 32] >> (n % 32).astype(np.uint32)) & 1).astype(bool)


def test_exact_at_minus_inf(ranks, single):
    world, saved = ranks
    dense = single[0]
    for name, w, r, u, tau, _ in RUNS:
        if w != world or tau != -float("inf"):
            continue
        for rk, z in enumerate(saved):
            lite, dense_calls = (int(c) for c in z["%s/calls" % name])
            assert lite == 2 * len(TIMESTEPS) and dense_calls == 0, \
                "%s rank %d: %d calls through liteattn, %d dense" % (name, rk, lite, dense_calls)
            for step in range(len(TIMESTEPS)):
                e = rel(z["%s/%d/out" % (name, step)], dense[step])
                assert e <= 1e-4, "%s rank %d step %d: relative L2 %g" % (name, rk, step, e)


def test_skipping_equals_one_process(ranks, single):
    world, saved = ranks
    _, lite, (BM, BN) = single
    S, H = 256, 2
    for name, w, r, u, tau, par in RUNS:
        if w != world or tau == -float("inf"):
            continue
        exact = u > 1 and r == 1 or par != "auto"   # Ulysses, or the global order
        for z in saved:
            ri, ui = (int(i) for i in z["%s/index" % name])
            heads = slice(ui * H // u, (ui + 1) * H // u)
            rows, keys = S // r, S // r
            nq, nk = rows // BM, keys // BN
            for step in range(len(TIMESTEPS)):
                out = z["%s/%d/out" % (name, step)]
                assert np.isfinite(out).all()
                if not exact:
                    continue
                assert rel(out, lite[step][0]) <= 1e-4, "%s step %d: output differs from " \
                    "one process's" % (name, step)
                for layer in range(2):
                    whole = bits(lite[step][1][layer], S // BM, S // BN)
                    for src in range(r):
                        got = bits(z["%s/%d/mask%d_%d" % (name, step, layer, src)], nq, nk)
                        want = whole[:, heads, ri * nq:(ri + 1) * nq, src * nk:(src + 1) * nk]
                        assert np.array_equal(got, want), \
                            "%s step %d layer %d (ring %d, ulysses %d) shard %d: masks differ" \
                            % (name, step, layer, ri, ui, src)
    # the threshold made something skip, or the equalities prove little
    assert not bits(lite[-1][1][0], S // BM, S // BN).all()


if __name__ == "__main__":
    sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]
    rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
