"""GPU: torch CUDA tensors through CUDA IPC (cudaMalloc blocks) and VMM fds (expandable
segments) on the daemon's CUDA backend, compared with
torch.nn.functional.scaled_dot_product_attention. Run with
    python3 -m pytest libclient/python/tests -m gpu
Skipped without torch, without a CUDA device, or when the daemon has no CUDA backend."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from cudatorch import F, daemon_backend, rel, torch  # noqa: F401 (daemon_backend: a fixture)

import liteattn
from refimpl import clustered_qkv, ref_attention

pytestmark = pytest.mark.gpu


def sdpa(q, k, v, scale=None):
    """(B, S, H, D) in, (B, S, H, D) float32 out, and lse (B, H, Sq)."""
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
    sc = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = F.scaled_dot_product_attention(qf, kf, vf, scale=sc).transpose(1, 2)
    lse = torch.logsumexp((qf @ kf.transpose(-1, -2)) * sc, dim=-1)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_ipc_dense_vs_sdpa(cclient, dtype, D):
    torch.manual_seed(0)
    B, Sq, Sk, H = 2, 1000, 1234, 4
    s = cclient.open_session("gpu-dense-%s-%d" % (dtype, D), layers=1, heads=H, head_dim=D,
                             dtype=dtype, max_seq_q=Sq, max_seq_k=Sk, batch=B,
                             threshold=-math.inf, device="cuda")
    q = torch.randn(B, Sq, H, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Sk, H, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Sk, H, D, device="cuda", dtype=dtype)
    for step in range(2):
        out, lse = s.attention(0, step, q, k, v, return_lse=True)
        want, want_lse = sdpa(q, k, v)
        assert out.is_cuda and out.dtype == dtype and out.shape == q.shape
        assert rel(out, want) < 1e-2
        assert (lse - want_lse).abs().max().item() < 2e-2
    m = s.mask(0)
    BM, BN = s.tile_sizes
    nq, nk = -(-Sq // BM), -(-Sk // BN)
    for n in range(nk):
        assert ((m[:, :, :nq, n // 32] >> np.uint32(n % 32)) & 1).all()
    s.close()


def test_strided_views_and_block_cache(cclient):
    torch.manual_seed(1)
    B, S, H, D = 1, 777, 8, 128
    s = cclient.open_session("gpu-strided", layers=1, heads=H, head_dim=D, dtype="bfloat16",
                             max_seq_q=S, threshold=-math.inf, device="cuda")
    # q, k, v as slices of one fused projection (B, S, 3, H, D) and a (B, H, S, D) transpose
    qkv = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out = s.attention(0, 0, q, k, v)
    assert rel(out, sdpa(q, k, v)[0]) < 1e-2
    bhsd = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    qt = bhsd.transpose(1, 2)
    out = s.attention(0, 1, qt, k, v)
    assert rel(out, sdpa(qt, k, v)[0]) < 1e-2
    n_blocks = len(cclient._cuda_blocks)
    for _ in range(5):
        s.attention(0, 2, q, k, v)
    assert len(cclient._cuda_blocks) <= n_blocks + 1  # blocks registered once, then reused
    s.close()


def test_skip_against_reference(cclient):
    """CUDA decisions vs the float64 reference on clustered data (ties may differ: < 1%)."""
    rng = np.random.default_rng(3)
    H, D = 2, 128
    s = cclient.open_session("gpu-skip", layers=1, heads=H, head_dim=D, dtype="bfloat16",
                             max_seq_q=4096, threshold=-3.0, device="cuda")
    BM, BN = s.tile_sizes
    Sq, Sk = 4 * BM + 3, 5 * BN + 7
    qn, kn, vn = clustered_qkv(rng, 1, Sq, Sk, H, D, BM, BN)
    q, k, v = (torch.from_numpy(x).to("cuda", torch.bfloat16) for x in (qn, kn, vn))
    qf, kf, vf = (x.float().cpu().numpy() for x in (q, k, v))
    bad = total = 0
    for step in range(3):
        before = s.mask(0)
        out = s.attention(0, step, q, k, v)
        want, _, want_mask = ref_attention(qf, kf, vf, before, BM=BM, BN=BN, tau=-3.0,
                                           step=step)
        got = s.mask(0)
        nq, nw = -(-Sq // BM), -(-(-(-Sk // BN)) // 32)
        x = np.unpackbits((got[:, :, :nq, :nw] ^ want_mask[:, :, :nq, :nw]).view(np.uint8))
        bad += int(x.sum())
        total += H * nq * -(-Sk // BN)
        err = np.linalg.norm(out.float().cpu().numpy() - want) / np.linalg.norm(want)
        assert err < 2e-2, err
    assert bad <= 0.01 * total, "%d of %d decisions differ" % (bad, total)
    assert s.stats["tiles_computed"] < s.stats["tiles_total"]
    s.close()


def test_row_max_ring_shards_on_cuda(cclient):
    """Carried row maxima on the CUDA backend, row_max a CUDA tensor passed by IPC and updated
    in place: the keys cut into 3 shards of whole tiles, called in the step's visiting order
    with one row_max handed from call to call, decide bit for bit what one call over all keys
    decides, compute as many tiles and end with the same row maxima (the same kernel scores
    the same tiles); the outputs merged by LSE equal the single call's."""
    from liteattn.parallel import merge_partials
    rng = np.random.default_rng(4)
    B, H, D, P = 1, 4, 128, 3
    one = cclient.open_session("gpu-carry-one", layers=1, heads=H, head_dim=D,
                               dtype="bfloat16", max_seq_q=4096, max_seq_k=8192, batch=B,
                               threshold=-3.0, device="cuda")
    BM, BN = one.tile_sizes
    L, Sq = 2 * BN, 3 * BM + 5
    ring = cclient.open_session("gpu-carry-ring", layers=1, heads=H, head_dim=D,
                                dtype="bfloat16", max_seq_q=4096, max_seq_k=L, batch=B,
                                kv_shards=P, threshold=-3.0, device="cuda")
    qn, kn, vn = clustered_qkv(rng, B, Sq, P * L, H, D, BM, BN)
    q, k, v = (torch.from_numpy(x).to("cuda", torch.bfloat16) for x in (qn, kn, vn))
    nq, nkl = -(-Sq // BM), L // BN
    for step in range(3):
        r1 = torch.full((B, H, Sq), -math.inf, device="cuda")
        o1, l1 = one.attention(0, step, q, k, v, row_max=r1, return_lse=True)
        t1 = one.last_call["tiles_computed"]
        r = torch.full((B, H, Sq), -math.inf, device="cuda")
        acc, tiles = None, 0
        for j in (range(P - 1, -1, -1) if step % 2 == 0 else range(P)):
            part = ring.attention(0, step, q, k[:, j * L:(j + 1) * L], v[:, j * L:(j + 1) * L],
                                  kv_shard=j, row_max=r, return_lse=True)
            tiles += ring.last_call["tiles_computed"]
            acc = merge_partials(acc, part)
        torch.cuda.synchronize()
        assert torch.equal(r, r1), "step %d: carried row maxima differ from one call's" % step
        assert tiles == t1
        whole = one.mask(0)
        for j in range(P):
            m = ring.mask(0, kv_shard=j)
            for n in range(nkl):
                g = j * nkl + n
                a = (whole[..., :nq, g // 32] >> np.uint32(g % 32)) & 1
                b = (m[..., :nq, n // 32] >> np.uint32(n % 32)) & 1
                assert np.array_equal(a, b), "step %d tile %d: shard calls decided otherwise" % (
                    step, g)
        assert rel(acc[0], o1) < 1e-2 and (acc[1] - l1).abs().max().item() < 1e-2
    assert one.stats["tiles_computed"] < one.stats["tiles_total"], "nothing skipped"
    one.close()
    ring.close()


def test_drop_in_on_cuda(daemon, cclient):
    ctx = liteattn.Context(socket=daemon.socket)
    layers = [liteattn.LiteAttention(threshold=-math.inf, context=ctx) for _ in range(2)]
    ctx.new_generation()
    q, k, v = (torch.randn(1, 2048, 8, 128, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    for _ in range(3):
        for a in layers:
            out, lse = a(q, k, v, return_softmax_lse=True)
    assert rel(out, sdpa(q, k, v)[0]) < 1e-2
    assert layers[0].step == 3
    ctx.close()


_EXPANDABLE_CODE = r"""
import json, math, os, sys, warnings
import torch, liteattn
from liteattn.client import _cuda_driver
F = torch.nn.functional
c = liteattn.Client(sys.argv[1])
B, S, H, D = 1, 4096, 8, 128
s = c.open_session("expandable-%d" % os.getpid(), layers=1, heads=H, head_dim=D,
                   dtype="bfloat16", max_seq_q=S, threshold=-math.inf, device="cuda")
torch.manual_seed(0)
pad = torch.empty(7 << 20, dtype=torch.uint8, device="cuda")  # the tensors start mid-chunk
qkv = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.bfloat16)  # 24 MiB: chunks straddled
q, k, v = qkv.unbind(2)                                               # views of one storage
mine = torch.empty(B, S, H, D, device="cuda", dtype=torch.bfloat16)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    for step in range(3):
        out, lse = s.attention(0, step, q, k, v, return_lse=True)
    s.attention(0, 3, q, k, v, out=mine)
qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
ref = F.scaled_dot_product_attention(qf, kf, vf).transpose(1, 2)
lse_ref = torch.logsumexp((qf @ kf.transpose(-1, -2)) / math.sqrt(D), dim=-1)
rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
print(json.dumps({
    "vmm_memory": _cuda_driver().is_vmm(q.data_ptr()),
    "err": rel(out, ref), "err_out": rel(mine, ref),
    "lse": (lse - lse_ref).abs().max().item(),
    "paths": c.cuda_paths,
    "warnings": [str(x.message) for x in w if issubclass(x.category, liteattn.StagingWarning)],
}))
s.close()
c.close()
"""


@pytest.mark.parametrize("ipc", ["default", "0"])
def test_expandable_segments_vs_sdpa(daemon, cclient, ipc):
    """PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in a fresh process: the tensors are VMM
    memory and the call matches SDPA, either without copies (the segments' allocations by fd)
    or, where PyTorch made them unexportable (TORCH_CUDA_EXPANDABLE_SEGMENTS_IPC=0), through
    the staging area with a StagingWarning that says why."""
    import json
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True",
               PYTHONPATH=os.pathsep.join(sys.path))
    if ipc != "default":
        env["TORCH_CUDA_EXPANDABLE_SEGMENTS_IPC"] = ipc
    r = subprocess.run([sys.executable, "-c", _EXPANDABLE_CODE, daemon.socket], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(res)
    assert res["vmm_memory"], "expandable_segments:True did not give VMM memory: %s" % res
    assert res["err"] < 1e-2 and res["err_out"] < 1e-2, res
    assert res["lse"] < 2e-2, res
    paths = res["paths"]
    # 3 calls of q, k, v, out, lse and one of q, k, v, out: every tensor went one way.
    assert paths["ipc"] + paths["vmm"] + paths["staged"] == 3 * 5 + 4, paths
    if paths["staged"]:
        assert res["warnings"] and "staging" in res["warnings"][0], res
        assert len(res["warnings"]) == 1, "warned more than once: %s" % res["warnings"]
    else:
        assert paths["vmm"] > 0 and not res["warnings"], res
    if ipc == "default":
        # PyTorch creates its segments exportable by default (POSIX fds where there is no
        # fabric): no copies.
        assert paths["staged"] == 0, res


def test_diffusers_wan_on_cuda(daemon, cclient):
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel
    import liteattn.diffusers as ld
    torch.manual_seed(0)
    m = WanTransformer3DModel(num_attention_heads=4, attention_head_dim=128, in_channels=16,
                              out_channels=16, text_dim=64, freq_dim=64, ffn_dim=256,
                              num_layers=2).to("cuda", torch.bfloat16).eval()
    x = torch.randn(1, 16, 5, 32, 32, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, 16, 64, device="cuda", dtype=torch.bfloat16)

    def run():
        with torch.no_grad():
            return m(hidden_states=x, timestep=torch.tensor([500.0], device="cuda"),
                     encoder_hidden_states=text, return_dict=False)[0]
    ref = run()
    ld.apply(m, threshold=-math.inf, socket=daemon.socket)
    got = run()
    ld.remove(m)
    assert rel(got, ref) < 2e-2
