"""Arguments the Python side can judge by itself are refused there, with a message that names
the argument and what was wrong (issue 15): a list as q, layer -1 or 0.5, schedule="bogus",
reversed or out-of-range must-do ranges."""
import numpy as np
import pytest

import liteattn


def geo(**kw):
    a = dict(layers=2, heads=2, head_dim=64, dtype="float32", max_seq_q=256, batch=1)
    a.update(kw)
    return a


@pytest.fixture
def session(client):
    s = client.open_session("args", **geo())
    yield s
    s.close()


@pytest.fixture
def qkv(rng):
    return [rng.standard_normal((1, 100, 2, 64)).astype(np.float32) for _ in range(3)]


def test_list_as_q_names_q(session, qkv):
    q, k, v = qkv
    with pytest.raises(liteattn.InvalidArgument) as ei:
        session.attention(0, 0, q.tolist(), k, v)
    msg = str(ei.value)
    assert "q is a list" in msg and "NumPy array or a torch tensor" in msg, msg
    with pytest.raises(liteattn.InvalidArgument, match="v is a tuple"):
        session.attention(0, 0, q, k, tuple(v))


@pytest.mark.parametrize("layer", [-1, 2, 4294967295])
def test_layer_out_of_range_is_named(session, qkv, layer):
    with pytest.raises(liteattn.OutOfRange) as ei:
        session.attention(layer, 0, *qkv)
    msg = ei.value.message
    assert msg.startswith("layer %d out of range" % layer) and "2 layers (0..1)" in msg, msg
    assert "4294967295" not in msg or layer == 4294967295
    with pytest.raises(liteattn.OutOfRange, match="layer %d out of range" % layer):
        session.mask(layer)


@pytest.mark.parametrize("layer", [0.5, 1.0, "0", None, True])
def test_layer_must_be_an_integer(session, qkv, layer):
    with pytest.raises(liteattn.InvalidArgument) as ei:
        session.attention(layer, 0, *qkv)
    assert "layer must be an integer, got %r" % (layer,) in str(ei.value)
    with pytest.raises(liteattn.InvalidArgument, match="layer must be an integer"):
        session.mask(layer)


def test_numpy_integers_are_integers(session, qkv):
    out = session.attention(np.int64(1), np.uint32(0), *qkv)
    assert out.shape == qkv[0].shape
    assert session.mask(np.int32(1)).shape == session.mask_shape


def test_step_and_kv_shard(session, qkv):
    with pytest.raises(liteattn.OutOfRange, match="step -1 is negative"):
        session.attention(0, -1, *qkv)
    with pytest.raises(liteattn.InvalidArgument, match="step must be an integer, got 1.5"):
        session.attention(0, 1.5, *qkv)
    with pytest.raises(liteattn.OutOfRange, match="kv_shard 1 out of range"):
        session.attention(0, 0, *qkv, kv_shard=1)


def test_schedule_bogus(client):
    with pytest.raises(liteattn.InvalidArgument) as ei:
        client.open_session("sched", **geo(schedule="bogus"))
    msg = str(ei.value)
    assert "schedule must be a sequence of per-step thresholds" in msg and "'bogus'" in msg, msg
    assert "could not convert" not in msg
    with pytest.raises(liteattn.InvalidArgument, match=r"schedule\[1\] must be a number, got 'x'"):
        client.open_session("sched", **geo(schedule=[-3.0, "x"]))
    with pytest.raises(liteattn.InvalidArgument, match="threshold must be a number"):
        client.open_session("sched", **geo(threshold="-3"))
    with pytest.raises(liteattn.InvalidArgument, match="layers must be an integer, got 1.5"):
        client.open_session("sched", **geo(layers=1.5))
    # none of the refused opens left a session behind
    assert [r["key"] for r in client.sessions() if r["key"] == "sched"] == []
    s = client.open_session("sched", **geo(schedule=(-3.0, np.float32(-4.0))))
    s.close()


@pytest.mark.parametrize("ranges, cls, text", [
    ([(50, 10)], liteattn.InvalidArgument, "must_do range (50, 10) is reversed"),
    ([50, 10], liteattn.InvalidArgument, "must_do range (50, 10) is reversed"),
    ([(-5, 10)], liteattn.OutOfRange, "must_do range (-5, 10) starts below key 0"),
    ([(0, 101)], liteattn.OutOfRange, "must_do range (0, 101) ends past the 100 keys"),
    ([(0, 10), (90, 200)], liteattn.OutOfRange, "must_do range (90, 200) ends past"),
    ([(0.5, 10)], liteattn.InvalidArgument, "must_do range start must be an integer"),
    ("0,10", liteattn.InvalidArgument, "must_do must be a list of (start, end) key ranges"),
    ([(1, 2, 3)], liteattn.InvalidArgument, "each range is a (start, end) pair"),
])
def test_bad_must_do(session, qkv, ranges, cls, text):
    with pytest.raises(cls) as ei:
        session.attention(0, 0, *qkv, must_do=ranges)
    assert text in str(ei.value), str(ei.value)


def test_bad_must_skip_is_named_must_skip(session, qkv):
    with pytest.raises(liteattn.InvalidArgument, match=r"must_skip range \(9, 3\) is reversed"):
        session.attention(0, 0, *qkv, must_skip=[(9, 3)])


def test_good_ranges_still_accepted(session, qkv):
    # whole key range, an empty range, and a range ending exactly at S
    out = session.attention(0, 0, *qkv, must_do=[(0, 100)], must_skip=[(40, 40)])
    assert np.isfinite(out).all()
    out = session.attention(0, 1, *qkv, must_do=[0, 10, 90, 100])
    assert np.isfinite(out).all()
    # the connection and the session survived every refusal in this module
    assert session.info()["calls"] == 2


def test_refusals_are_made_before_the_daemon_is_asked(client, qkv):
    s = client.open_session("args-local", **geo())
    for bad in (dict(layer=-1), dict(layer=0.5), dict(must_do=[(5, 1)])):
        kw = dict(layer=0, must_do=())
        kw.update(bad)
        with pytest.raises(liteattn.Error):
            s.attention(kw["layer"], 0, *qkv, must_do=kw["must_do"])
    assert s.info()["calls"] == 0
    s.close()


def test_session_dtype_is_a_name(client):
    for name, want in (("bf16", "bfloat16"), ("float32", "float32"), (np.float32, "float32")):
        s = client.open_session("dtype-" + want, **geo(dtype=name))
        assert s.dtype == want and want in repr(s)
        s.close()


def test_mixed_dtypes_are_named(session, qkv):
    q, k, v = qkv
    with pytest.raises(liteattn.InvalidArgument,
                       match="q, k and v must have one dtype; got q float32, k float32, v float16"):
        session.attention(0, 0, q, k, v.astype(np.float16))
