"""Handles and errors (issue 15): garbage collection only detaches a Session, exceptions are
the specific subclasses, client.sessions() returns numbers as numbers, and liteattn.diffusers
says what it needs when torch is missing."""
import gc
import os
import subprocess
import sys

import numpy as np
import pytest

import liteattn
from conftest import Daemon


def geo(**kw):
    a = dict(layers=1, heads=2, head_dim=64, dtype="float32", max_seq_q=128, batch=1)
    a.update(kw)
    return a


def qkv(rng, S=64):
    return [rng.standard_normal((1, S, 2, 64)).astype(np.float32) for _ in range(3)]


def keys(client):
    return sorted(r["key"] for r in client.sessions())


def test_gc_of_an_attached_handle_only_detaches(client, daemon, rng):
    s = client.open_session("gc-attach", **geo())
    s.attention(0, 0, *qkv(rng))
    with liteattn.Client(daemon.socket) as other:
        other.attach("gc-attach")          # handle dropped at once: garbage
        gc.collect()
        s.attention(0, 1, *qkv(rng))        # the owner's session lives on
        assert "gc-attach" in keys(other)
    s.attention(0, 2, *qkv(rng))
    assert s.info()["calls"] == 3
    s.close()
    assert "gc-attach" not in keys(client)


def test_gc_of_the_owner_handle_only_detaches(client, daemon, rng):
    s = client.open_session("gc-owner", **geo())
    s.attention(0, 0, *qkv(rng))
    del s
    gc.collect()
    assert "gc-owner" in keys(client)
    s2 = client.attach("gc-owner")
    assert s2.info()["calls"] == 1
    s2.close()                              # only close() closes
    assert "gc-owner" not in keys(client)
    with pytest.raises(liteattn.NotFound):
        client.attach("gc-owner")


def test_closed_handles_raise_specific_classes(daemon, rng):
    c = liteattn.Client(daemon.socket)
    s = c.open_session("closed-classes", **geo())
    s.close()
    with pytest.raises(liteattn.NotFound) as ei:
        s.attention(0, 0, *qkv(rng))
    assert type(ei.value) is liteattn.NotFound and ei.value.code == -4
    assert "closed-classes" in ei.value.message
    c.close()
    with pytest.raises(liteattn.ConnectionClosed) as ei:
        c.open_session("after-close", **geo())
    assert type(ei.value) is liteattn.ConnectionClosed and isinstance(ei.value, ConnectionError)
    assert ei.value.code == -13 and ei.value.name == "LA_ECLOSED"
    with pytest.raises(liteattn.ConnectionClosed):
        c.ping()


def test_daemon_gone_raises_connection_closed(daemon, rng):
    d = Daemon("cpu")            # a daemon of its own (the fixture's skips if none is built)
    try:
        c = liteattn.Client(d.socket)
        s = c.open_session("gone", **geo())
    finally:
        d.stop(check=False)
    with pytest.raises(liteattn.ConnectionClosed) as ei:
        s.attention(0, 0, *qkv(rng))
    assert type(ei.value) is liteattn.ConnectionClosed
    c.close()


def test_sessions_numbers_are_numbers(client, rng):
    s = client.open_session("numbers", **geo(layers=2, threshold=float("inf")))
    s.attention(1, 0, *qkv(rng, S=128))
    row, = [r for r in client.sessions() if r["key"] == "numbers"]
    for name in ("id", "uid", "layers", "heads", "head_dim", "batch", "bm", "bn",
                 "mask_bytes", "calls", "idle_s"):
        assert type(row[name]) is int, (name, row[name])
    assert type(row["live_fraction"]) is float and 0.0 <= row["live_fraction"] <= 1.0
    assert row["attached"] is True
    assert row["key"] == "numbers" and isinstance(row["device"], str)
    assert row["layers"] == 2 and row["heads"] == 2 and row["calls"] == 1
    assert row["id"] == s.id and row["mask_bytes"] == s.facts["mask_bytes"]
    s.close()


def test_session_key_that_looks_like_a_number_stays_text(client):
    s = client.open_session("007", **geo())
    row, = [r for r in client.sessions() if r["key"] == "007"]
    assert row["key"] == "007"
    s.close()


def test_diffusers_without_torch_says_what_it_needs():
    # sys.modules["torch"] = None makes `import torch` fail as it does where torch is absent.
    code = ("import sys\nsys.modules['torch'] = None\n"
            "try:\n    import liteattn.diffusers\n"
            "except ImportError as e:\n    print(type(e).__name__, '|', e)\n"
            "else:\n    print('IMPORTED')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60)
    out = r.stdout + r.stderr
    assert out.startswith("ImportError | liteattn.diffusers needs PyTorch"), out
    assert "pip install torch diffusers" in out and "import liteattn" in out, out
