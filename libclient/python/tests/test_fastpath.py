"""The fast path's Python surface that needs no GPU (issue 10): the client's default and its
validation, the daemon's fast-path devices, sync() and its timeout argument, the counters of
Session.stats. The fast path itself (CUDA tensors ordered on a stream) is test_fastpath_gpu.py;
its protocol through the CPU backend is tests/check_fastpath.c."""
import numpy as np
import pytest

import liteattn
from liteattn.client import _fastpath_default


def test_default_and_validation(daemon, monkeypatch):
    monkeypatch.delenv("LITEATTN_FASTPATH", raising=False)
    assert _fastpath_default(None) is True
    for off in ("0", "off", "False", "no"):
        monkeypatch.setenv("LITEATTN_FASTPATH", off)
        assert _fastpath_default(None) is False
    monkeypatch.setenv("LITEATTN_FASTPATH", "1")
    assert _fastpath_default(None) is True
    assert _fastpath_default(False) is False
    with pytest.raises(liteattn.InvalidArgument):
        liteattn.Client(daemon.socket, fastpath="yes")
    with liteattn.Client(daemon.socket, fastpath=False) as c:
        assert c.fastpath is False


def test_cpu_session_facts_and_sync(client, rng):
    assert "cpu" in client.fact("fastpath.devices").split(",")
    assert int(client.fact("limit.doorbell_timeout_ms")) > 0
    assert int(client.fact("limit.max_doorbell_slots")) > 0
    s = client.open_session("fast-facts", layers=1, heads=2, head_dim=64, dtype="float32",
                            max_seq_q=128)
    assert s.fastpath_status() == (True, "")
    q, k, v = (rng.standard_normal((1, 128, 2, 64)).astype(np.float32) for _ in range(3))
    out = s.attention(0, 0, q, k, v)   # host arrays: the synchronous path
    assert out.shape == q.shape and np.isfinite(out).all()
    s.sync()                           # nothing in flight: returns at once
    s.sync(timeout=0.5)
    client.sync(0)
    with pytest.raises(liteattn.InvalidArgument):
        s.sync(timeout=-1)
    with pytest.raises(liteattn.InvalidArgument):
        client.sync(timeout="soon")
    st = s.stats
    assert st["calls"] == 1 and st["failed"] == 0 and st["tiles_total"] > 0
    assert s.info()["tiles_total"] == st["tiles_total"]
    s.close()
    assert s.stats["calls"] == 1       # a closed handle keeps its synchronous figures
