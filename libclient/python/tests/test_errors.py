"""Error mapping (codes, names, messages, classes), closed sessions, attach after reconnect."""
import os

import numpy as np
import pytest

import liteattn


def geo(**kw):
    a = dict(layers=2, heads=2, head_dim=64, dtype="float32", max_seq_q=256, batch=1)
    a.update(kw)
    return a


def qkv(rng, S=64, H=2, D=64, B=1):
    return [rng.standard_normal((B, S, H, D)).astype(np.float32) for _ in range(3)]


def test_connect_nowhere(tmp_path):
    with pytest.raises(liteattn.ConnectionFailed) as ei:
        liteattn.Client(str(tmp_path / "nothing.sock"))
    e = ei.value
    assert isinstance(e, liteattn.Error) and isinstance(e, ConnectionError)
    assert e.code == -12 and e.name == "LA_ECONN" and e.message
    assert "LA_ECONN" in str(e)


def test_client_facts(client, daemon):
    assert "cpu" in client.backends
    assert client.fact("protocol") is not None
    assert client.fact("no.such.fact") is None
    assert client.ping() >= 0
    assert isinstance(client.stats(), dict)
    assert liteattn.library_version() == "0.1.0"
    assert os.path.exists(liteattn.library_path())


def test_duplicate_key_and_unknown_attach(client):
    s = client.open_session("dup", **geo())
    with pytest.raises(liteattn.AlreadyExists) as ei:
        client.open_session("dup", **geo())
    assert ei.value.code == -5
    with pytest.raises(liteattn.NotFound) as ei:
        client.attach("no-such-session")
    assert isinstance(ei.value, LookupError) and ei.value.name == "LA_ENOENT"
    s.close()


def test_bad_geometry_at_open(client):
    with pytest.raises((liteattn.InvalidArgument, liteattn.NotSupported)):
        client.open_session("bad-hd", **geo(head_dim=48))
    with pytest.raises(liteattn.InvalidArgument):
        client.open_session("bad-layers", **geo(layers=0))
    with pytest.raises(liteattn.InvalidArgument):
        client.open_session("bad-dtype", **geo(dtype="int8"))
    with pytest.raises(liteattn.InvalidArgument):
        client.open_session("bad-mode", **geo(mode="fast"))


def test_wrong_shapes(client, rng):
    with client.open_session("shapes", **geo()) as s:
        q, k, v = qkv(rng)
        with pytest.raises(liteattn.InvalidArgument) as ei:       # heads differ from session
            s.attention(0, 0, *qkv(rng, H=3))
        assert ei.value.message
        with pytest.raises(liteattn.InvalidArgument):              # head dim
            s.attention(0, 0, *qkv(rng, D=128))
        with pytest.raises((liteattn.InvalidArgument, liteattn.OutOfRange)):  # too long
            s.attention(0, 0, *qkv(rng, S=300))
        with pytest.raises((liteattn.InvalidArgument, liteattn.OutOfRange)):  # batch
            s.attention(0, 0, *qkv(rng, B=2))
        with pytest.raises((liteattn.InvalidArgument, liteattn.OutOfRange)):  # layer
            s.attention(5, 0, q, k, v)
        with pytest.raises((liteattn.InvalidArgument, liteattn.OutOfRange)):  # kv shard
            s.attention(0, 0, q, k, v, kv_shard=3)
        with pytest.raises(liteattn.InvalidArgument):              # k/v lengths differ
            s.attention(0, 0, q, k, v[:, :10])
        with pytest.raises(liteattn.InvalidArgument):              # 3-d input (client side)
            s.attention(0, 0, q[0], k[0], v[0])
        with pytest.raises(liteattn.InvalidArgument):              # dtypes differ
            s.attention(0, 0, q, k, v.astype(np.float16))
        with pytest.raises(liteattn.InvalidArgument):              # float64
            s.attention(0, 0, *(x.astype(np.float64) for x in (q, k, v)))
        with pytest.raises(liteattn.InvalidArgument):              # dtype not the session's
            s.attention(0, 0, *(x.astype(np.float16) for x in (q, k, v)))
        # the connection survives every error above
        out = s.attention(0, 0, q, k, v)
        assert out.shape == q.shape and np.isfinite(out).all()


def test_closed_session(client, daemon, rng):
    s = client.open_session("closing", **geo())
    with liteattn.Client(daemon.socket) as other:
        s2 = other.attach("closing")
        s.close()
        with pytest.raises(liteattn.Error) as ei:                  # our handle: closed
            s.attention(0, 0, *qkv(rng))
        assert ei.value.code == -4
        with pytest.raises(liteattn.NotFound) as ei:               # other handle: daemon says
            s2.attention(0, 0, *qkv(rng))
        assert ei.value.message
        with pytest.raises(liteattn.NotFound):
            s2.mask(0)
        s.close()  # closing twice is harmless


def test_attach_after_reconnect(daemon, rng):
    c1 = liteattn.Client(daemon.socket)
    s = c1.open_session("reattach", **geo(threshold=float("inf")))
    BM, BN = s.tile_sizes
    q, k, v = qkv(rng, S=min(256, 2 * BN + 1))
    s.attention(1, 0, q, k, v)
    mask = s.mask(1)
    c1.close()                       # drops the connection; the session stays for a grace period
    assert s.closed
    with liteattn.Client(daemon.socket) as c2:
        s2 = c2.attach("reattach")
        assert s2.tile_sizes == (BM, BN) and s2.layers == 2
        assert (s2.mask(1) == mask).all()
        assert s2.info()["calls"] == 1
        s2.attention(1, 1, q, k, v)
        s2.close()
    with liteattn.Client(daemon.socket) as c3:
        with pytest.raises(liteattn.NotFound):
            c3.attach("reattach")


def test_closed_client(daemon):
    c = liteattn.Client(daemon.socket)
    c.close()
    with pytest.raises(liteattn.Error):
        c.open_session("x", **geo())


def test_library_not_found_message():
    import subprocess
    import sys
    code = ("import liteattn\n"
            "try:\n    liteattn.Client('/nonexistent')\n"
            "except ImportError as e:\n    print('IMPORTERROR', e)\n")
    env = dict(os.environ, LITEATTN_LIB="/nonexistent/libliteattn.so",
               PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60)
    assert "IMPORTERROR" in r.stdout and "LITEATTN_LIB" in r.stdout, r.stdout + r.stderr


def test_threads_share_a_session(client, rng):
    import threading
    from refimpl import ref_attention, rel_l2
    s = client.open_session("threads", **geo(layers=4, threshold=float("-inf")))
    BM, BN = s.tile_sizes
    data = [qkv(rng, S=200) for _ in range(4)]
    errors = []

    def work(layer):
        try:
            q, k, v = data[layer]
            for step in range(4):
                out = s.attention(layer, step, q, k, v)
                want = ref_attention(q, k, v, s.mask(layer), BM=BM, BN=BN,
                                     tau=float("-inf"), mode="dense")[0]
                assert rel_l2(out, want) < 1e-5
        except Exception as e:  # reported below
            errors.append(e)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert s.info()["calls"] == 16
    s.close()
