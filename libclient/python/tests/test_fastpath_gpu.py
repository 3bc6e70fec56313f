"""GPU: the fast path of torch CUDA tensors (calls ordered on the current torch stream by the
doorbell, not waited for) against torch's scaled_dot_product_attention and against the
synchronous path. Run with
    python3 -m pytest libclient/python/tests -m gpu
Skipped without torch, without a CUDA device, or when the daemon has no CUDA backend."""
import math

import pytest
from cudatorch import F, daemon_backend, rel, torch  # noqa: F401 (daemon_backend: a fixture)

import liteattn

pytestmark = pytest.mark.gpu


@pytest.fixture
def fclient(cclient):
    if not cclient.fact("fastpath.devices"):
        pytest.fail("the daemon's CUDA backend takes no fast-path calls: see its log")
    return cclient


def sdpa(q, k, v):
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(qf, kf, vf).transpose(1, 2)


def test_enqueued_layers_vs_sdpa(fclient):
    """Eight layers enqueued back to back, inputs produced on the stream just before each call
    and outputs consumed right after it, all without a synchronisation: the doorbell orders
    them on the GPU."""
    torch.manual_seed(0)
    B, S, H, D, L = 1, 1536, 8, 128, 8
    s = fclient.open_session("fast-sdpa", layers=L, heads=H, head_dim=D, dtype="bfloat16",
                             max_seq_q=S, threshold=-math.inf, device="cuda")
    ok, why = s.fastpath_status()
    assert ok, why
    base = [torch.randn(3, B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
    outs, sums = [], []
    for step in range(2):
        for layer in range(L):
            q, k, v = (x * (1.0 + 0.01 * step) for x in base[layer])  # made on the stream now
            out = s.attention(layer, step, q, k, v)
            sums.append(out.float().sum())  # read on the stream right away
            outs.append((out, q, k, v))
    torch.cuda.synchronize()
    s.sync()
    for out, q, k, v in outs:
        assert rel(out, sdpa(q, k, v)) < 1e-2
    for (out, _, _, _), total in zip(outs, sums):
        assert torch.isclose(total, out.float().sum(), rtol=1e-3, atol=1e-2)
    st = s.stats
    assert st["calls"] == 2 * L and st["failed"] == 0
    assert st["tiles_computed"] == st["tiles_total"] > 0
    s.close()


def test_fast_equals_sync(fclient):
    """Skipping at tau = -3 over steps: the fast path and the synchronous path compute the
    same outputs and masks (the same kernel on the same inputs and masks)."""
    torch.manual_seed(1)
    S, H, D = 2048, 4, 64
    fast = fclient.open_session("fast-eq-a", layers=2, heads=H, head_dim=D, dtype="bfloat16",
                                max_seq_q=S, threshold=-3.0, device="cuda")
    slow = fclient.open_session("fast-eq-b", layers=2, heads=H, head_dim=D, dtype="bfloat16",
                                max_seq_q=S, threshold=-3.0, device="cuda")
    centres = torch.randn(8, H, D, device="cuda") * 2.0
    tok = torch.arange(S, device="cuda") * 8 // S
    for step in range(4):
        for layer in range(2):
            q = (centres[tok] + 0.3 * torch.randn(S, H, D, device="cuda")).unsqueeze(0)
            k = (centres[tok] + 0.3 * torch.randn(S, H, D, device="cuda")).unsqueeze(0)
            v = torch.randn(1, S, H, D, device="cuda")
            q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
            a = fast.attention(layer, step, q, k, v)
            b = slow.attention(layer, step, q, k, v, fastpath=False)
            assert torch.equal(a, b), (step, layer)
    for layer in range(2):
        assert (fast.mask(layer) == slow.mask(layer)).all()
    assert fast.stats["tiles_computed"] < fast.stats["tiles_total"]
    assert fast.stats["tiles_computed"] == slow.stats["tiles_computed"]
    fast.close()
    slow.close()


def test_error_mid_pipeline(fclient):
    """A call the daemon refuses (float16 tensors on a bfloat16 session) in the middle of a
    pipeline: its error is raised once, by a later call or by sync(); the stream never hangs;
    the calls that were made are right."""
    torch.manual_seed(2)
    B, S, H, D, L = 1, 1024, 4, 128, 8
    s = fclient.open_session("fast-err", layers=L, heads=H, head_dim=D, dtype="bfloat16",
                             max_seq_q=S, threshold=-math.inf, device="cuda")
    made, raised = [], []
    for layer in range(L):
        dt = torch.float16 if layer == 3 else torch.bfloat16
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dt) for _ in range(3))
        try:
            out = s.attention(layer, 0, q, k, v)
            if layer != 3:
                made.append((out, q, k, v))
        except liteattn.InvalidArgument as e:
            raised.append(str(e))
    try:
        s.sync()
    except liteattn.InvalidArgument as e:
        raised.append(str(e))
    torch.cuda.synchronize()  # returns: the failed call's done slot was written
    assert len(raised) == 1, raised
    assert "layer 3" in raised[0] and "dtype" in raised[0], raised[0]
    assert len(made) >= L - 2  # at most one later call was not made (it reported the error)
    for out, q, k, v in made:
        assert rel(out, sdpa(q, k, v)) < 1e-2
    assert s.stats["failed"] == 1
    s.sync()  # reported once
    s.close()


def test_opt_out(daemon, fclient):
    c = liteattn.Client(daemon.socket, fastpath=False)
    s = c.open_session("fast-off", layers=1, heads=2, head_dim=64, dtype="bfloat16",
                       max_seq_q=256, threshold=-math.inf, device="cuda")
    q = torch.randn(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16)
    out = s.attention(0, 0, q, q, q)
    assert s.last_call.get("tiles_total", 0) > 0  # a synchronous call has its figures at once
    assert rel(out, sdpa(q, q, q)) < 1e-2
    s.close()
    c.close()
    with pytest.raises(liteattn.InvalidArgument):
        liteattn.Client(daemon.socket, fastpath="yes")
