"""liteattn.parallel on the CPU backend: Ulysses, ring and hybrid over 2 and 4 gloo ranks on
this machine (one process per rank, a file rendezvous, sockets on the loopback interface only),
all ranks talking to the module's daemon.

Each world size runs once per module (a fixture starts this file as a script, one process per
rank; the ranks save their output shards, LSE and every mask slot per step); the tests then
compare, in this process:
  - with one process's attention on the whole sequence through the same daemon (fp32, relative
    L2 <= 1e-5): Ulysses at every step, masks bit for bit (its heads); ring and hybrid at the
    dense first step;
  - ring and hybrid at the skipping steps with the float64 reference of SKIP-SEMANTICS.md run
    per (rank, K/V shard) from the rank's own mask before the step, with the row maxima carried
    from hop to hop in the rank's visiting order (or none, carry_max=False), merged by LSE in
    float64;
  - ring and hybrid in the global order (4 ranks, tile-aligned shards): masks, tile counts
    and outputs equal to one process's at every step (the carried maxima make the shard calls
    decide what one call decides);
  - must-do ranges given in global positions: the tiles holding them stay live in the right
    (rank, K/V shard) masks.
Skipped without torch (or torch.distributed).
"""
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from rankproc import wait_ranks  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# ---- the scenarios: what the ranks run and what the tests check ---------------------------
# Shapes are small: the CI machine has two cores and every rank is a Python process.
WORLDS = {
    2: dict(B=2, S=400, H=4, D=64, seed=11),     # shards of 200 keys: partial tiles
    4: dict(B=1, S=1024, H=4, D=64, seed=12),    # shards of 256 keys: aligned tiles
}
STEPS = 3
MUST_DO = {2: [(0, 16)], 4: [(500, 530), (1000, 1024)]}   # global key positions
# must-skip acts on whole tiles; this range is one whole k-tile in both the single-process
# and the ring layout of 4 ranks (tile boundaries agree there), so results agree too
MUST_SKIP = {2: [], 4: [(832, 896)]}
SKIP_SHARD = [(700, 1024)]      # 4 ranks: all of shard 3 (768..1023) and part of shard 2


def runs(world):
    """(name, scheme, tau, must_do, must_skip, options) per world size; options go to the
    scheme's function (carry_max, ring_order)."""
    md, ms = MUST_DO[world], MUST_SKIP[world]
    out = [("ulysses", "ulysses", -3.0, md, ms, {}),
           ("ring", "ring", -3.0, md, ms, {}),
           ("ring_nocarry", "ring", -3.0, md, ms, {"carry_max": False}),
           ("ring_global", "ring", -3.0, md, ms, {"ring_order": "global"})]
    if world == 4:
        out += [("hybrid", "hybrid", -3.0, md, ms, {}),
                ("hybrid_global", "hybrid", -3.0, md, ms, {"ring_order": "global"})]
    else:   # tau = +inf: after step 0 only the first tile visited and must-do tiles stay
        out += [("ulysses_inf", "ulysses", math.inf, md, (), {}),
                ("ring_inf", "ring", math.inf, md, (), {})]
    return out


def visit_order(opts, P, me, step):
    """The K/V shards a ring rank visits, in order: its own first and then the one before
    (ring order), or the single process's direction for the step (global order)."""
    if opts.get("ring_order") == "global":
        return list(range(P - 1, -1, -1)) if step % 2 == 0 else list(range(P))
    return [(me - j) % P for j in range(P)]


def data(world, BM=128, BN=64):
    from refimpl import clustered_qkv
    c = WORLDS[world]
    rng = np.random.default_rng(c["seed"])
    return clustered_qkv(rng, c["B"], c["S"], c["S"], c["H"], c["D"], BM, BN)


def layout(scheme, world, index):
    """(head slice, query row range, [(kv shard, key range)]) the daemon calls of the rank
    holding shard `index` cover: Ulysses 1 x world, ring world x 1, hybrid 2 x 2."""
    c = WORLDS[world]
    S, H = c["S"], c["H"]
    u = {"ulysses": world, "ring": 1, "hybrid": 2}[scheme]
    r = world // u
    chunk = S // r
    ci, ui = index // u, index % u
    heads = slice(ui * H // u, (ui + 1) * H // u)
    return heads, (ci * chunk, (ci + 1) * chunk), [(j, (j * chunk, (j + 1) * chunk))
                                                    for j in range(r)]


# ---- the rank's side (this file run as a script) --------------------------------------------

def rank_main(world, rank, init, socket, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from liteattn import parallel
    hyb = parallel.hybrid_groups(2, world // 2) if world == 4 else None
    q, k, v = (torch.from_numpy(x) for x in data(world))
    saved = {}
    for name, scheme, tau, mdo, msk, opts in runs(world):
        group = hyb if scheme == "hybrid" else None
        idx, n = parallel.shard_index(scheme, group)
        assert n == world
        Sl = q.shape[1] // n
        qs, ks, vs = (x[:, idx * Sl:(idx + 1) * Sl].contiguous() for x in (q, k, v))
        fn = {"ulysses": parallel.ulysses_attention, "ring": parallel.ring_attention,
              "hybrid": parallel.hybrid_attention}[scheme]
        ctx = parallel.Context(socket, layers=1, threshold=tau)
        for step in range(STEPS):
            out, lse = fn(qs, ks, vs, group, layer=0, step=step, context=ctx, must_do=mdo,
                          must_skip=msk, return_lse=True, **opts)
            assert out.shape == qs.shape and out.dtype == qs.dtype
            assert lse.shape == (qs.shape[0], qs.shape[2], Sl) and lse.dtype == torch.float32
            saved["%s/%d/out" % (name, step)] = out.numpy()
            saved["%s/%d/lse" % (name, step)] = lse.numpy()
            for slot in range(ctx.session.kv_shards):
                saved["%s/%d/mask%d" % (name, step, slot)] = ctx.session.mask(0, kv_shard=slot)
        st = ctx.session.stats
        saved["%s/tiles" % name] = np.array([st["tiles_computed"], st["tiles_total"]])
        saved["%s/index" % name] = np.array(idx)
        ctx.close()
    if world == 4:   # the hybrid over a 2D DeviceMesh: the same calls as over the groups
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
        idx, n = parallel.shard_index("hybrid", mesh)
        assert (idx, n) == parallel.shard_index("hybrid", hyb)
        Sl = q.shape[1] // n
        qs, ks, vs = (x[:, idx * Sl:(idx + 1) * Sl].contiguous() for x in (q, k, v))
        ctx = parallel.Context(socket, layers=1, threshold=-3.0)
        out = parallel.hybrid_attention(qs, ks, vs, mesh, context=ctx, must_do=MUST_DO[world],
                                        must_skip=MUST_SKIP[world])
        saved["mesh/0/out"] = out.numpy()
        saved["mesh/index"] = np.array(idx)
        ctx.close()
        # a ring hop whose keys are all must-skip is not sent to the daemon at all
        idx, n = parallel.shard_index("ring")
        qs, ks, vs = (x[:, idx * Sl:(idx + 1) * Sl].contiguous() for x in (q, k, v))
        ctx = parallel.Context(socket, layers=1, threshold=-3.0)
        out, lse = parallel.ring_attention(qs, ks, vs, context=ctx, must_skip=SKIP_SHARD,
                                           return_lse=True)
        saved["skipshard/0/out"] = out.numpy()
        saved["skipshard/0/lse"] = lse.numpy()
        saved["skipshard/calls"] = np.array(ctx.session.stats["calls"])
        saved["skipshard/index"] = np.array(idx)
        ctx.close()
    if world == 2:   # unequal shards are refused on every rank, nothing hangs
        from liteattn import InvalidArgument
        Sl = q.shape[1] // 2
        qs, ks, vs = (x[:, rank * Sl:(rank + 1) * Sl - rank].contiguous() for x in (q, k, v))
        for fn in (parallel.ring_attention, parallel.ulysses_attention):
            ctx = parallel.Context(socket, layers=1)
            with pytest.raises(InvalidArgument, match="shards differ"):
                fn(qs, ks, vs, context=ctx)
            ctx.close()
        saved["unequal/index"] = np.array(rank)
        saved["unequal/refused"] = np.array(1)
    if world == 2:   # the module form, with a second (CFG) branch between the steps
        idx, n = parallel.shard_index("ring")
        Sl = q.shape[1] // n
        qs, ks, vs = (x[:, idx * Sl:(idx + 1) * Sl].contiguous() for x in (q, k, v))
        ctx = parallel.Context(socket, max_branches=2, threshold=-3.0)
        attn = parallel.SequenceParallelAttention("ring", context=ctx)
        for step in range(STEPS):
            out, lse = attn(qs, ks, vs, return_softmax_lse=True, must_do_list=MUST_DO[world])
            attn(-qs, ks, vs, branch=1)
            assert attn.step == step
            saved["module/%d/out" % step] = out.numpy()
            saved["module/%d/lse" % step] = lse.numpy()
            for j in range(n):
                for b in range(2):
                    saved["module/%d/mask%d" % (step, b * n + j)] = attn.mask(j, branch=b)
                    assert np.array_equal(attn.mask(j, branch=b),
                                          ctx.session.mask(0, kv_shard=b * n + j))
        saved["module/index"] = np.array(idx)
        ctx.new_generation()
        assert attn.step == 0 and ctx.session is None
        ctx.close()
    np.savez(os.path.join(outdir, "rank%d.npz" % rank), **saved)
    dist.barrier()
    dist.destroy_process_group()


# ---- the test side ----------------------------------------------------------------------------

class Ranks:
    """The saved results of one world size, by run, step, rank index (= shard index)."""

    def __init__(self, world, files, seconds):
        self.world, self.seconds = world, seconds
        self.by_index = {}
        for f in files:
            z = dict(np.load(f))
            extra = ["module", "unequal"] if world == 2 else ["mesh", "skipshard"]
            for name in [r[0] for r in runs(world)] + extra:
                self.by_index.setdefault(name, {})[int(z["%s/index" % name])] = z

    def get(self, name, index, step, what):
        return self.by_index[name][index]["%s/%d/%s" % (name, step, what)]

    def full_out(self, name, step):
        """Output [B, S, H, D] and LSE [B, H, S] assembled from the shards in global order."""
        idx = range(self.world)
        return (np.concatenate([self.get(name, i, step, "out") for i in idx], axis=1),
                np.concatenate([self.get(name, i, step, "lse") for i in idx], axis=2))

    def tiles(self, name):
        t = sum(self.by_index[name][i]["%s/tiles" % name] for i in range(self.world))
        return int(t[0]), int(t[1])


def start_ranks(world, daemon, tmp):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1")
    init = "file://" + os.path.join(tmp, "rendezvous")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(world), str(r),
                               init, daemon.socket, tmp], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(world)]
    t0 = time.monotonic()
    wait_ranks(procs, 90)
    seconds = time.monotonic() - t0
    return Ranks(world, [os.path.join(tmp, "rank%d.npz" % r) for r in range(world)], seconds)


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request, daemon):
    with tempfile.TemporaryDirectory(prefix="liteattn-sp-") as tmp:
        yield start_ranks(request.param, daemon, tmp)


@pytest.fixture(scope="module")
def single_cache(daemon):
    return {}


def single(client_socket, cache, world, name, tau, mdo, msk):
    """One process, whole sequence, same daemon: [(out, lse, mask)] per step."""
    key = (world, name)
    if key in cache:
        return cache[key]
    import liteattn
    q, k, v = data(world)
    c = WORLDS[world]
    with liteattn.Client(client_socket) as cl:
        s = cl.open_session("sp-single-%d-%s" % (world, name), layers=1, heads=c["H"],
                            head_dim=c["D"], dtype="float32", max_seq_q=c["S"], batch=c["B"],
                            threshold=tau)
        res = []
        for step in range(STEPS):
            o, l = s.attention(0, step, q, k, v, must_do=mdo, must_skip=msk, return_lse=True)
            res.append((o, l, s.mask(0), s.tile_sizes))
        cache[key] = res
        res_stats = s.stats["tiles_computed"], s.stats["tiles_total"]
        cache[key + ("tiles",)] = res_stats
        s.close()
    return res


def _run(world, name):
    return [r for r in runs(world) if r[0] == name][0]


def _local(ranges, off, n):
    return [(max(a - off, 0), min(b - off, n)) for a, b in ranges if min(b - off, n) >
            max(a - off, 0)]


def _bits(mask, nQ, nK):
    """Packed [B, H, nQm, nW] -> bool [B, H, nQ, nK]."""
    words = mask[:, :, :nQ, :]
    n = np.arange(nK)
    return ((words[..., n // 32] >> (n % 32).astype(np.uint32)) & 1).astype(bool)


def check_emulated(rk, world, name, scheme, tau, mdo, msk, opts, BM, BN):
    """Every (rank, K/V shard) call against the float64 reference from the rank's own mask
    before the step, in the rank's visiting order with the row maxima carried from call to
    call (unless carry_max=False); outputs merged by LSE in float64 against the rank's output."""
    from refimpl import ref_attention, rel_l2
    q, k, v = data(world)
    for idx in range(world):
        heads, (q0, q1), shards = layout(scheme, world, idx)
        P = len(shards)
        u = world // P
        for step in range(STEPS):
            parts = []
            rmax = None
            if P > 1 and opts.get("carry_max", True):
                rmax = np.full((q.shape[0], heads.stop - heads.start, q1 - q0), -np.inf)
            for j in visit_order(opts, P, idx // u, step):
                k0, k1 = shards[j][1]
                got = rk.get(name, idx, step, "mask%d" % j)
                before = (np.full_like(got, 0xFFFFFFFF) if step == 0
                          else rk.get(name, idx, step - 1, "mask%d" % j))
                o, lse, want = ref_attention(
                    q[:, q0:q1, heads], k[:, k0:k1, heads], v[:, k0:k1, heads], before, BM=BM,
                    BN=BN, tau=tau, step=step, must_do=_local(mdo, k0, k1 - k0),
                    must_skip=_local(msk, k0, k1 - k0), row_max=rmax)
                nQ, nK = -(-(q1 - q0) // BM), -(-(k1 - k0) // BN)
                diff = int((_bits(got, nQ, nK) != _bits(want, nQ, nK)).sum())
                assert diff == 0, "%s rank %d shard %d step %d: %d mask bits differ from " \
                    "the reference" % (name, idx, j, step, diff)
                parts.append((o, lse))
            lse = np.logaddexp.reduce(np.stack([p[1] for p in parts]), axis=0)
            o = sum(p[0] * np.exp(p[1] - lse).transpose(0, 2, 1)[..., None] for p in parts)
            # the rank's output shard holds all heads of its rows after Ulysses' way back;
            # compare the block this unit computed, picked out of the assembled output
            full_o, full_l = rk.full_out(name, step)
            e = rel_l2(full_o[:, q0:q1, heads], o)
            assert e <= 1e-5, "%s unit %d step %d: relative L2 %g" % (name, idx, step, e)
            el = float(np.abs(full_l[:, heads, q0:q1] - lse).max())
            assert el <= 1e-4, "%s unit %d step %d: |lse - ref| %g" % (name, idx, step, el)
        assert P == (1 if scheme == "ulysses" else world // (2 if scheme == "hybrid" else 1))


def test_ulysses_equals_single_process(ranks, daemon, single_cache):
    from refimpl import rel_l2
    w = ranks.world
    for name in ("ulysses", "ulysses_inf") if w == 2 else ("ulysses",):
        _, scheme, tau, mdo, msk, _ = _run(w, name)
        ref = single(daemon.socket, single_cache, w, name, tau, mdo, msk)
        H = WORLDS[w]["H"]
        for step, (o, l, m, _) in enumerate(ref):
            go, gl = ranks.full_out(name, step)
            assert rel_l2(go, o) <= 1e-5, "%s step %d: relative L2 %g" % (name, step,
                                                                         rel_l2(go, o))
            assert np.abs(gl - l).max() <= 1e-4
            for idx in range(w):
                heads = slice(idx * H // w, (idx + 1) * H // w)
                got = ranks.get(name, idx, step, "mask0")
                assert got.shape == m[:, heads].shape
                assert np.array_equal(got, m[:, heads]), \
                    "%s step %d rank %d: mask differs from the single-process one (%d words)" \
                    % (name, step, idx, int((got != m[:, heads]).sum()))


def test_dense_step_equals_single_process(ranks, daemon, single_cache):
    """At the first step every mask is all ones: ring and hybrid compute exact attention."""
    from refimpl import rel_l2
    for name, scheme, tau, mdo, msk, _ in runs(ranks.world):
        if scheme == "ulysses":
            continue
        o, l, _, _ = single(daemon.socket, single_cache, ranks.world, name, tau, mdo, msk)[0]
        go, gl = ranks.full_out(name, 0)
        e = rel_l2(go, o)
        assert e <= 1e-5, "%s dense step: relative L2 %g" % (name, e)
        assert np.abs(gl - l).max() <= 1e-4


def test_against_reference_per_shard(ranks, daemon, single_cache):
    for name, scheme, tau, mdo, msk, opts in runs(ranks.world):
        if name == "ulysses_inf":
            continue      # the same calls as ulysses, checked against one process
        BM, BN = single(daemon.socket, single_cache, ranks.world, name, tau, mdo, msk)[0][3]
        check_emulated(ranks, ranks.world, name, scheme, tau, mdo, msk, opts, BM, BN)


def test_must_do_in_global_positions(ranks, daemon, single_cache):
    """The k-tiles holding a global must-do range stay live in every row of the mask of the
    (rank, K/V shard) that holds those keys, and nowhere else are tiles forced: with
    tau = +inf the live tiles after step 0 are the first one visited plus the must-do ones."""
    for name, scheme, tau, mdo, msk, _ in runs(ranks.world):
        BM, BN = single(daemon.socket, single_cache, ranks.world, name, tau, mdo, msk)[0][3]
        check_must_do(ranks, name, scheme, tau, mdo, BM, BN)


def check_must_do(ranks, name, scheme, tau, mdo, BM, BN):
    for idx in range(ranks.world):
        _, (q0, q1), shards = layout(scheme, ranks.world, idx)
        nQ = -(-(q1 - q0) // BM)
        for step in range(STEPS):
            for j, (k0, k1) in shards:
                nK = -(-(k1 - k0) // BN)
                live = _bits(ranks.get(name, idx, step, "mask%d" % j), nQ, nK)
                forced = np.zeros(nK, dtype=bool)
                for a, b in _local(mdo, k0, k1 - k0):
                    forced[a // BN:(b - 1) // BN + 1] = True
                assert live[..., forced].all(), \
                    "%s rank %d shard %d step %d: a must-do tile was skipped" % (
                        name, idx, j, step)
                if math.isinf(tau) and tau > 0 and step > 0:
                    per_row = live.sum(axis=-1)
                    assert (per_row <= forced.sum() + 1).all(), \
                        "%s rank %d shard %d: more than first + must-do tiles live" % (
                            name, idx, j)


def test_module_and_branches(ranks):
    """SequenceParallelAttention steps like the functions (branch 0 calls advance the step);
    a second branch between the steps has its own mask slots and leaves branch 0's alone:
    branch 0 matches the functional ring run bit for bit."""
    if ranks.world != 2:
        pytest.skip("run with 2 ranks")
    for idx in range(2):
        for step in range(STEPS):
            for what in ("out", "lse", "mask0", "mask1"):
                assert np.array_equal(ranks.get("module", idx, step, what),
                                      ranks.get("ring", idx, step, what)), \
                    "rank %d step %d: module %s differs from ring_attention's" % (
                        idx, step, what)
        last = STEPS - 1
        b0 = np.stack([ranks.get("module", idx, last, "mask%d" % j) for j in (0, 1)])
        b1 = np.stack([ranks.get("module", idx, last, "mask%d" % j) for j in (2, 3)])
        assert not np.array_equal(b0, b1), "branch 1 (other queries) got branch 0's masks"


def test_hybrid_over_a_device_mesh_and_unequal_shards(ranks):
    """4 ranks: the hybrid over a 2D DeviceMesh ("ring", "ulysses") makes the same calls as
    over hybrid_groups(2, 2). 2 ranks: shards of different lengths raise InvalidArgument on
    every rank (checked inside the ranks) instead of hanging a collective."""
    if ranks.world == 4:
        for idx in range(4):
            assert np.array_equal(ranks.get("mesh", idx, 0, "out"),
                                  ranks.get("hybrid", idx, 0, "out"))
    else:
        for idx in range(2):
            assert int(ranks.by_index["unequal"][idx]["unequal/refused"]) == 1


def test_must_skip_whole_shard(ranks, daemon, single_cache):
    """4 ranks, must-skip over all of shard 3: the ranks make 3 daemon calls, not 4, and the
    output equals one process's with the same global must-skip range."""
    from refimpl import rel_l2
    if ranks.world != 4:
        pytest.skip("run with 4 ranks")
    o, l, _, _ = single(daemon.socket, single_cache, 4, "skipshard", -3.0, (), SKIP_SHARD)[0]
    for idx in range(4):
        assert int(ranks.by_index["skipshard"][idx]["skipshard/calls"]) == 3
    go, gl = ranks.full_out("skipshard", 0)
    assert rel_l2(go, o) <= 1e-5
    assert np.abs(gl - l).max() <= 1e-4


def test_merge_partials_and_ranges():
    """LSE merging in float32 against float64 (a part with no keys, lse = -inf, contributes
    nothing; two empty parts stay empty, without NaN), and the global-to-local ranges."""
    from liteattn import parallel
    rng = np.random.default_rng(5)
    B, Sq, H, D = 2, 33, 3, 8
    parts = [(rng.standard_normal((B, Sq, H, D)), rng.standard_normal((B, H, Sq)) * 5)
             for _ in range(3)]
    parts[1][1][:, :, :7] = -np.inf        # rows 0..6 had no keys in part 1
    acc = None
    for o, l in parts:
        acc = parallel.merge_partials(acc, (torch.from_numpy(o).float(),
                                            torch.from_numpy(l).float()))
    lse = np.logaddexp.reduce(np.stack([p[1] for p in parts]), axis=0)
    want = sum(np.where(np.isneginf(p[1]), 0, np.exp(p[1] - lse)).transpose(0, 2, 1)[..., None]
               * p[0] for p in parts)
    assert acc[0].dtype == torch.float32
    assert np.abs(acc[1].numpy() - lse).max() < 1e-5
    assert np.linalg.norm(acc[0].numpy() - want) / np.linalg.norm(want) < 1e-6
    empty = (torch.full((B, Sq, H, D), float("nan")), torch.full((B, H, Sq), -math.inf))
    o, l = parallel.merge_partials(None, empty)
    assert torch.isneginf(l).all() and (o == 0).all()
    o, l = parallel.merge_partials((o, l), empty)
    assert torch.isneginf(l).all() and (o == 0).all()
    assert parallel.merge_partials(acc, None) is acc
    assert parallel._local_ranges([(0, 16), (500, 530), (1000, 1024)], 512, 256) == ((0, 18),)
    assert parallel._local_ranges([(500, 530)], 256, 256) == ((244, 256),)
    assert parallel._covered([(0, 10), (5, 64)], 64) and not parallel._covered([(0, 10),
                                                                             (11, 64)], 64)


def test_ring_global_order_equals_single_process(ranks, daemon, single_cache):
    """4 ranks, shards of whole tiles: ring and hybrid with the carried row maxima in the
    global order skip exactly the tiles one process skips (every mask bit of every step, the
    tile counts) and their outputs equal one process's (relative L2 <= 1e-5, the float64
    reference of the single process checks those in test_against_reference_per_shard and
    test_numpy)."""
    from refimpl import ref_attention, rel_l2
    if ranks.world != 4:
        pytest.skip("run with 4 ranks (the 2-rank shards of 200 keys straddle tiles)")
    w = ranks.world
    q, k, v = data(w)
    for name in ("ring_global", "hybrid_global"):
        _, scheme, tau, mdo, msk, _ = _run(w, name)
        ref = single(daemon.socket, single_cache, w, name, tau, mdo, msk)
        BM, BN = ref[0][3]
        for idx in range(w):
            heads, (q0, q1), shards = layout(scheme, w, idx)
            assert (q1 - q0) % BM == 0 and (shards[0][1][1] - shards[0][1][0]) % BN == 0
            nQl, nKl = (q1 - q0) // BM, (shards[0][1][1] - shards[0][1][0]) // BN
            for step in range(STEPS):
                whole = _bits(ref[step][2], -(-q.shape[1] // BM), -(-k.shape[1] // BN))
                for j, (k0, k1) in shards:
                    got = _bits(ranks.get(name, idx, step, "mask%d" % j), nQl, nKl)
                    want = whole[:, heads, q0 // BM:q0 // BM + nQl, k0 // BN:k0 // BN + nKl]
                    diff = int((got != want).sum())
                    assert diff == 0, "%s rank %d shard %d step %d: %d tiles decided unlike " \
                        "one process" % (name, idx, j, step, diff)
        for step in range(STEPS):
            go, gl = ranks.full_out(name, step)
            o, l = ref[step][0], ref[step][1]
            assert rel_l2(go, o) <= 1e-5, "%s step %d: relative L2 %g against one process" % (
                name, step, rel_l2(go, o))
            assert np.abs(gl - l).max() <= 1e-4
            # and against float64 attention over the tiles one process computed
            before = (np.full_like(ref[0][2], 0xFFFFFFFF) if step == 0 else ref[step - 1][2])
            o64, _, _ = ref_attention(q, k, v, before, BM=BM, BN=BN, tau=tau, step=step,
                                      must_do=mdo, must_skip=msk)
            assert rel_l2(go, o64) <= 1e-5
        single_tiles = single_cache[(w, name, "tiles")]
        assert ranks.tiles(name) == single_tiles, "%s: tiles %s, one process %s" % (
            name, ranks.tiles(name), single_tiles)


def test_ring_skip_gap(ranks, daemon, single_cache, capsys):
    """Skipping of the ring variants against one process, over the 3 steps (the dense first
    step included): without carried maxima the votes compare against one shard's maximum and
    skip less; carried in the ring order they skip more (own shard first is a deterministic
    order, not the single process's); in the global order exactly as much (4 ranks, aligned
    tiles; 2 ranks: shards straddle tiles). Printed, and bounded so that a ring that skips
    nothing, or carried maxima that skip less than none, fail."""
    w = ranks.world
    _, scheme, tau, mdo, msk, _ = _run(w, "ring")
    single(daemon.socket, single_cache, w, "ring", tau, mdo, msk)
    sc, st = single_cache[(w, "ring", "tiles")]
    frac = {n: 1 - c / t for n, (c, t) in
            ((n, ranks.tiles(n)) for n in ("ring_nocarry", "ring", "ring_global"))}
    with capsys.disabled():
        print("\n[%d ranks] tiles skipped over %d steps: single process %.1f%%, ring without "
              "carried maxima %.1f%%, ring order %.1f%%, global order %.1f%% (ranks ran %.1f s)"
              % (w, STEPS, 100 * (1 - sc / st), 100 * frac["ring_nocarry"], 100 * frac["ring"],
                 100 * frac["ring_global"], ranks.seconds))
    assert 0 < frac["ring_nocarry"] <= 1 - sc / st
    assert frac["ring"] >= frac["ring_nocarry"] and frac["ring_global"] > frac["ring_nocarry"]
    if w == 4:
        assert ranks.tiles("ring_global") == (sc, st)


if __name__ == "__main__":
    sys.path[:0] = [HERE, os.path.dirname(HERE)]
    rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
