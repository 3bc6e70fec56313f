"""Client and Session: the core API over libliteattn (ctypes).

Host arrays (NumPy, torch CPU tensors) travel through one shared-memory staging buffer per
session (a sealed memfd the library maps and the daemon maps too): the inputs are copied in,
the output copied out, and the buffer is reused from call to call, grown when a call needs
more. torch CUDA tensors travel without copies, registered once per client and named by
(buffer, byte offset, shape, strides): blocks of the default caching allocator (cudaMalloc) by
CUDA IPC, memory of the expandable_segments allocator (cuMemCreate) by the POSIX fds of the
physical allocations a tensor's storage spans (la_buffer_register_cuda_range). Memory neither
way can share (expandable segments created without exportable handles) is copied through a
CUDA staging area of ordinary device memory, with a one-time warning that says how to avoid it.

CUDA tensors take the fast path by default (docs/FASTPATH.md): the call is ordered on the
current torch stream on the GPU (la_attn_enqueue) and returns at once, like a kernel launch;
its errors are raised by a later call or by sync(). fastpath=False (per client, per call, or
LITEATTN_FASTPATH=0) takes the synchronous path (IPC events, the reply waited for).

Over 900 lines on purpose: a Session is made only by its Client and calls through the
Client's library handle, lock, CUDA registrations and staging area, so the two classes stay
in one module with the argument helpers both use.
"""
import ctypes
import math
import numbers
import operator
import os
import threading
import warnings
import weakref

from . import _lib
from ._arrays import (_STAGING_WARNED, StagingWarning, _align, _CudaBlock, _CudaStage,
                      _cuda_driver, _is_torch, _np, _numpy_dtype_code, _prod, _storage_span,
                      _torch, _torch_dtype_code, _Unshareable, device_of,
                      expandable_segments_enabled)
from .errors import (ConnectionClosed, InvalidArgument, NoDevice, NotFound, NotSupported,
                     OutOfRange, check, from_code)

__all__ = ["Client", "Session", "DTYPES", "MODES", "StagingWarning", "warm_key",
           "threshold_tag"]

DTYPES = {
    "float32": _lib.DTYPE_F32, "f32": _lib.DTYPE_F32, "fp32": _lib.DTYPE_F32,
    "float16": _lib.DTYPE_F16, "f16": _lib.DTYPE_F16, "fp16": _lib.DTYPE_F16,
    "half": _lib.DTYPE_F16,
    "bfloat16": _lib.DTYPE_BF16, "bf16": _lib.DTYPE_BF16,
}
_DTYPE_NAME = {_lib.DTYPE_F32: "float32", _lib.DTYPE_F16: "float16", _lib.DTYPE_BF16: "bfloat16"}
_DTYPE_SIZE = {_lib.DTYPE_F32: 4, _lib.DTYPE_F16: 2, _lib.DTYPE_BF16: 2}
MODES = {None: _lib.MODE_SESSION, "session": _lib.MODE_SESSION, "dense": _lib.MODE_DENSE,
         "observe": _lib.MODE_OBSERVE, "skip": _lib.MODE_SKIP}
_DIRECTIONS = {None: None, "alternate": _lib.DIR_ALTERNATE, "ascending": _lib.DIR_ASCENDING,
               "descending": _lib.DIR_DESCENDING}

def _dtype_code(dtype):
    if isinstance(dtype, int):
        if dtype in _DTYPE_NAME:
            return dtype
        raise InvalidArgument("unknown dtype code %r" % (dtype,))
    name = str(dtype)
    for prefix in ("torch.", "<class 'numpy.", "numpy."):
        if name.startswith(prefix):
            name = name[len(prefix):].rstrip("'>")
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise InvalidArgument("dtype %r: use float32 (CPU backend only), float16 or bfloat16"
                              % (dtype,)) from None


def _mode_code(mode):
    try:
        return MODES[mode]
    except (KeyError, TypeError):
        raise InvalidArgument("mode %r: use 'dense', 'observe' or 'skip'" % (mode,)) from None


def _index(value, what):
    """value as a Python int, or InvalidArgument naming `what` (no silent truncation of 0.5,
    no bool, no string)."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # int, NumPy integers, 0-d integer tensors
        except TypeError:
            pass
    raise InvalidArgument("%s must be an integer, got %r (%s)"
                          % (what, value, type(value).__name__))


def _number(value, what):
    """value as a Python float, or InvalidArgument naming `what`."""
    if not isinstance(value, (bool, str, bytes)) and (isinstance(value, numbers.Real)
                                                       or hasattr(value, "__float__")):
        try:
            return float(value)           # also NumPy scalars and 0-d tensors
        except (TypeError, ValueError):
            pass
    raise InvalidArgument("%s must be a number, got %r (%s)"
                          % (what, value, type(value).__name__))


def _ranges(pairs, what, n_keys=None):
    """[(start, end), ...] -> (int64 array, n). Also accepts a flat [s0, e0, s1, e1, ...].
    Each range is half-open, 0 <= start <= end (<= n_keys when given)."""
    if pairs is None:
        return None, 0
    if isinstance(pairs, (str, bytes)):
        raise InvalidArgument("%s must be a list of (start, end) key ranges, got %r"
                              % (what, pairs))
    seq = list(pairs)
    ranges = []
    if seq and not hasattr(seq[0], "__len__"):
        if len(seq) % 2:
            raise InvalidArgument("%s: a flat list needs an even number of values" % what)
        ranges = [(seq[i], seq[i + 1]) for i in range(0, len(seq), 2)]
    else:
        for p in seq:
            if isinstance(p, (str, bytes)) or len(p) != 2:
                raise InvalidArgument("%s: each range is a (start, end) pair, got %r"
                                      % (what, p))
            ranges.append((p[0], p[1]))
    flat = []
    for start, end in ranges:
        a = _index(start, "%s range start" % what)
        b = _index(end, "%s range end" % what)
        if a > b:
            raise InvalidArgument("%s range (%d, %d) is reversed: ranges are half-open "
                                  "(start, end) with start <= end" % (what, a, b))
        if a < 0:
            raise OutOfRange("%s range (%d, %d) starts below key 0" % (what, a, b))
        if n_keys is not None and b > n_keys:
            raise OutOfRange("%s range (%d, %d) ends past the %d keys of this call (k has "
                             "S = %d: ranges lie in [0, %d])" % (what, a, b, n_keys, n_keys,
                                                                  n_keys))
        flat += [a, b]
    if not flat:
        return None, 0
    arr = (ctypes.c_int64 * len(flat))(*flat)
    return arr, len(flat) // 2


def _i64(seq):
    return (ctypes.c_int64 * len(seq))(*[int(x) for x in seq])


def threshold_tag(threshold=None, schedule=None, per_layer=None, profile=None):
    """A short text naming the skipping thresholds, for warm keys: masks settled under one
    threshold are no seed for a generation under another (at -inf, none should be skipped).
    The same in every process (a hash of the values, never Python's hash())."""
    import hashlib
    if profile is not None:
        from .calibrate import load_profile
        pr = load_profile(profile)
        flat = list(pr.schedule) + [x for row in (pr.layers or []) for x in row]
        return "profile~" + hashlib.sha1(",".join("%g" % v for v in flat).encode()) \
            .hexdigest()[:10]
    vals = []
    if schedule:
        vals = [float(x) for x in schedule]
    elif per_layer:
        vals = [float(x) for x in per_layer]
    elif threshold is not None:
        vals = [float(threshold)]
    if len(set(vals)) == 1:
        return "tau%g" % vals[0]
    if not vals:
        return "tau?"
    return "tau~" + hashlib.sha1(",".join("%g" % v for v in vals).encode()).hexdigest()[:10]


def warm_key(model, *, layers, batch, seq_q, seq_k, heads, head_dim, dtype, steps=None,
             extra=None):
    """The warm-start key the Python module and the diffusers integration derive: the model's
    name, its attention geometry, the step count and what extra adds (they add the thresholds,
    threshold_tag), e.g. "liteattn:toydit-10M:L8:B2:S8192x8192:H3:D128:bfloat16:steps50:
    tau-3". Generations with equal keys share warm-start masks (the daemon also checks the tile
    geometry). At most 255 bytes (a long model name is shortened with a hash of it)."""
    import hashlib
    name = "".join(c if 0x20 < ord(c) < 0x7f else "_" for c in str(model or "model"))
    if len(name) > 120:
        name = name[:100] + "~" + hashlib.sha1(name.encode()).hexdigest()[:12]
    parts = ["liteattn", name, "L%d" % int(layers), "B%d" % int(batch),
             "S%dx%d" % (int(seq_q), int(seq_k)), "H%d" % int(heads), "D%d" % int(head_dim),
             _DTYPE_NAME.get(_dtype_code(dtype), str(dtype))]
    if steps is not None:
        parts.append("steps%d" % int(steps))
    if extra:
        parts.append(str(extra))
    key = ":".join(parts)
    if len(key.encode()) > 255:
        key = key[:230] + "~" + hashlib.sha1(key.encode()).hexdigest()[:16]
    return key


def _fastpath_default(fastpath):
    """The client's default: the argument, else $LITEATTN_FASTPATH (0/off/false/no: off)."""
    if fastpath is None:
        env = os.environ.get("LITEATTN_FASTPATH", "").strip().lower()
        return env not in ("0", "off", "false", "no")
    if not isinstance(fastpath, bool):
        raise InvalidArgument("fastpath must be True, False or None, got %r" % (fastpath,))
    return fastpath


def _timeout_ms(timeout):
    """Seconds (None: forever) as the library's milliseconds (-1: forever)."""
    if timeout is None:
        return -1
    t = _number(timeout, "timeout")
    if t < 0:
        raise InvalidArgument("timeout must be >= 0 seconds or None, got %r" % (timeout,))
    return int(min(t * 1000.0, 2 ** 31 - 1))


# ---- Client ----------------------------------------------------------------------------------

class _Closable:
    """`with x: ...` closes x (x.close()) when the block ends, also by an exception."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Client(_Closable):
    """One connection to liteattnd.

    socket: the daemon's socket path; None takes $LITEATTN_SOCKET, else
    $XDG_RUNTIME_DIR/liteattn.sock if a socket exists there, else /run/liteattn/liteattn.sock.
    Use as a context manager, or call close(). Closing detaches the sessions opened through
    it (the daemon keeps them for its grace period, so another client may attach()).
    fastpath: whether calls on CUDA tensors take the fast path (ordered on the current torch
    stream, not waited for); None takes $LITEATTN_FASTPATH (default on). Session.attention's
    fastpath argument overrides it per call.
    """

    def __init__(self, socket=None, name=None, fastpath=None):
        self._lib = _lib.get()
        self.fastpath = _fastpath_default(fastpath)
        self._fast_warned = False
        self._h = None
        self._lock = threading.RLock()
        self._sessions = weakref.WeakSet()
        self._cuda_blocks = {}  # cudaMalloc blocks: allocation id (or base) -> _CudaBlock
        self._vmm_blocks = {}   # VMM registrations: buffer handle -> _CudaBlock
        self._stages = {}       # device -> _CudaStage
        # How CUDA tensors went to the daemon, per tensor of a call: "ipc" (cudaMalloc block),
        # "vmm" (cuMemCreate allocations by fd), "staged" (copied through the staging area).
        self.cuda_paths = {"ipc": 0, "vmm": 0, "staged": 0}
        path = os.fspath(socket) if socket is not None else None
        h = ctypes.c_void_p()
        check(self._lib.la_connect(path.encode() if path else None,
                                   (name or "liteattn-python").encode(), ctypes.byref(h)))
        self._h = h
        self.socket = path or self.default_socket_path()

    @staticmethod
    def default_socket_path():
        buf = ctypes.create_string_buffer(4096)
        check(_lib.get().la_default_socket_path(buf, len(buf)))
        return buf.value.decode()

    def _handle(self):
        if self._h is None:
            raise ConnectionClosed("this client is closed (Client.close() was called)")
        return self._h

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def close(self):
        """Disconnects. Sessions are detached (not closed); registered buffers released.
        Fast-path calls still in flight are finished first (their replies waited for); the
        first error of one is raised once the client is closed."""
        with self._lock:
            if self._h is None:
                return
            rc = self._lib.la_client_sync(self._h, -1)
            err = from_code(rc) if rc < 0 and rc != _lib.LA_ECLOSED else None
            for s in list(self._sessions):
                s._drop(detach=True)
            for blk in list(self._cuda_blocks.values()) + list(self._vmm_blocks.values()):
                self._lib.la_buffer_unregister(blk.handle)
            self._cuda_blocks.clear()
            self._vmm_blocks.clear()
            self._lib.la_disconnect(self._h)
            for st in self._stages.values():
                if st.done is not None:
                    st.done.synchronize()
                st.release()
            self._stages.clear()
            self._h = None
        if err is not None:
            raise err

    @property
    def closed(self):
        return self._h is None

    # -- facts --
    def fact(self, name):
        """A fact from the daemon's Hello reply (see la_client_property), or None."""
        v = self._lib.la_client_property(self._handle(), name.encode())
        return None if v is None else v.decode()

    @property
    def backends(self):
        v = self.fact("backends") or ""
        return [b for b in v.split(",") if b]

    def sync(self, timeout=None):
        """Waits (up to timeout seconds; None: forever) for the replies of every fast-path
        call of this client and raises the first error of one, if any (it is then cleared).
        The GPU itself is not waited for: torch.cuda.synchronize() does that."""
        check(self._lib.la_client_sync(self._handle(), _timeout_ms(timeout)))

    def ping(self):
        """Round-trip time of one Ping, in seconds."""
        ns = ctypes.c_uint64()
        check(self._lib.la_ping(self._handle(), ctypes.byref(ns)))
        return ns.value / 1e9

    def _table(self, fn):
        t = ctypes.c_void_p()
        check(fn(self._handle(), ctypes.byref(t)))
        try:
            L = self._lib
            cols = [_lib.text(L.la_table_col_name(t, j)) for j in range(L.la_table_cols(t))]
            rows = []
            for i in range(L.la_table_rows(t)):
                rows.append({c: _lib.text(L.la_table_text(t, i, j)) for j, c in enumerate(cols)})
            return rows
        finally:
            self._lib.la_table_free(t)

    def stats(self):
        """Daemon counters as {name: int}."""
        out = {}
        for r in self._table(self._lib.la_stats):
            try:
                out[r["name"]] = int(r["value"])
            except ValueError:
                out[r["name"]] = r["value"]
        return out

    # la_sessions columns that stay text; "attached" is a flag, every other column a number.
    _SESSION_TEXT = ("key", "device", "warm_key")

    def sessions(self):
        """Sessions this user may see, one dict per session with la_sessions' columns: "key",
        "device" and "warm_key" as text, "attached" as a bool, "live_fraction" as a float,
        "layer_live" as a list of per-layer live fractions, the counts (id, uid, layers,
        heads, head_dim, batch, bm, bn, mask_bytes, calls, idle_s, warm_generations,
        guard_checks, guard_restored) as ints."""
        rows = self._table(self._lib.la_sessions)
        for r in rows:
            for name, value in r.items():
                if name in self._SESSION_TEXT:
                    continue
                if name == "attached":
                    r[name] = value not in ("", "0")
                    continue
                if name == "layer_live":
                    r[name] = [float(x) for x in value.split(",") if x]
                    continue
                r[name] = _parse_number(value)
        return rows

    def warm_store(self):
        """The warm-start store of this user (root: every user's): one dict per (warm key,
        geometry) with la_warm_list's columns ("key" text, "persisted" a bool, the rest
        ints: uid, layers, kv_shards, batch, heads, n_q_tiles, n_k_tiles, bm, bn,
        generations, bytes, age_s, seeds)."""
        rows = self._table(self._lib.la_warm_list)
        for r in rows:
            for name, value in r.items():
                if name == "key":
                    continue
                r[name] = value not in ("", "0") if name == "persisted" else _parse_number(value)
        return rows

    def warm_drop(self, key=None):
        """Forgets this user's stored masks of warm key `key` (None: every key of this user),
        on disk too. Returns the number of entries removed."""
        n = ctypes.c_uint64()
        check(self._lib.la_warm_drop(self._handle(), None if key is None else str(key).encode(),
                                     ctypes.byref(n)))
        return n.value

    # -- sessions --
    def open_session(self, key, *, layers, heads, head_dim, dtype, max_seq_q, max_seq_k=None,
                     batch=1, kv_shards=1, threshold=-3.0, mode="skip", schedule=None,
                     direction=None, device=None, profile=None, warm_key=None, warm_step=None,
                     warm_generations=None, warm_margin=None, warm_dense_steps=None,
                     guard_every=0, guard_sample=None, guard_budget=None):
        """Opens a generation session (all masks start all ones: the first step is dense).

        dtype: "float32" (CPU backend only), "float16" or "bfloat16" (also numpy/torch dtypes).
        threshold: tau in log2 units (-inf skips nothing). schedule: per-step thresholds
        (step s uses schedule[min(s, len-1)]). mode: "skip", "observe" or "dense".
        direction: None/"alternate", "ascending", "descending". device: "auto" (default),
        "cpu", "cuda" or a GPU UUID. profile: a calibrated profile (liteattn-calibrate's JSON
        file, a dict or a liteattn.calibrate.Profile): its per-step schedule unless schedule is
        given, and its per-layer thresholds for calls that name no threshold.

        Warm start (docs/SKIP-SEMANTICS.md): with warm_key the masks start from those earlier
        generations of this user left under that key (name the model, resolution and step
        count in it) and this generation's are kept for later ones. warm_step: the step whose
        masks are kept (None: those at close); warm_generations: how many stored ones the
        seed ORs (None: 4); warm_margin: tiles it is widened by (None: 1); warm_dense_steps:
        first steps computed densely (None: 1). Session.warm tells what happened.

        Quality guardrail: guard_every=N checks every N-th step by computing guard_sample
        q-tiles (None: 1) densely; rows that lost more than guard_budget (None: 0.05) of their
        probability mass are restored to dense for the rest of the generation (info() counts
        them).
        """
        if profile is not None:
            from .calibrate import load_profile
            profile = load_profile(profile)
            schedule = profile.schedule if schedule is None else schedule
        dcode = _dtype_code(dtype)
        geometry = [_index(v, n) for v, n in (
            (layers, "layers"), (heads, "heads"), (head_dim, "head_dim"),
            (max_seq_q, "max_seq_q"), (max_seq_k or 0, "max_seq_k"), (batch or 1, "batch"),
            (kv_shards or 1, "kv_shards"))]
        for v, n in zip(geometry, ("layers", "heads", "head_dim", "max_seq_q", "max_seq_k",
                                   "batch", "kv_shards")):
            if v < 0:
                raise InvalidArgument("%s must not be negative, got %d" % (n, v))
        threshold = _number(threshold, "threshold")
        if schedule is not None:
            if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__len__"):
                raise InvalidArgument("schedule must be a sequence of per-step thresholds "
                                      "(numbers), got %r" % (schedule,))
            schedule = [_number(x, "schedule[%d]" % i) for i, x in enumerate(schedule)]
        L = self._lib
        cfg = ctypes.c_void_p()
        check(L.la_session_config_new(ctypes.byref(cfg)))
        try:
            nl, nh, hd, sq, sk, nb, ns = geometry
            check(L.la_session_config_set_geometry(cfg, nl, nh, hd, dcode, sq, sk, nb, ns))
            check(L.la_session_config_set_threshold(cfg, threshold))
            if schedule:
                arr = (ctypes.c_float * len(schedule))(*schedule)
                check(L.la_session_config_set_schedule(cfg, arr, len(schedule)))
            m = _mode_code(mode)
            if m == _lib.MODE_SESSION:
                raise InvalidArgument("a session's mode is 'skip', 'observe' or 'dense'")
            check(L.la_session_config_set_mode(cfg, m))
            if direction is not None:
                if direction not in _DIRECTIONS:
                    raise InvalidArgument("direction %r: use 'alternate', 'ascending' or "
                                          "'descending'" % (direction,))
                check(L.la_session_config_set_direction(cfg, _DIRECTIONS[direction]))
            if device is not None:
                check(L.la_session_config_set_device(cfg, str(device).encode()))
            if warm_key is not None:
                opts = []
                for v, n in ((warm_step, "warm_step"), (warm_generations, "warm_generations"),
                             (warm_margin, "warm_margin"), (warm_dense_steps, "warm_dense_steps")):
                    if v is None:
                        opts.append(_lib.WARM_DEFAULT)
                        continue
                    v = _index(v, n)
                    if not 0 <= v < _lib.WARM_DEFAULT:
                        raise OutOfRange("%s %d out of range (0 .. 2^32 - 2)" % (n, v))
                    opts.append(v)
                check(L.la_session_config_set_warm_start(cfg, str(warm_key).encode(), *opts))
            elif any(v is not None for v in (warm_step, warm_generations, warm_margin,
                                             warm_dense_steps)):
                raise InvalidArgument("warm_step, warm_generations, warm_margin and "
                                      "warm_dense_steps need a warm_key")
            every = _index(guard_every or 0, "guard_every")
            sample = _index(guard_sample or 0, "guard_sample")
            budget = 0.0 if guard_budget is None else _number(guard_budget, "guard_budget")
            if every < 0 or sample < 0 or every >= 1 << 32 or sample >= 1 << 32:
                raise OutOfRange("guard_every and guard_sample must be 0 .. 2^32 - 1")
            if every or sample or budget:
                check(L.la_session_config_set_guard(cfg, every, sample, budget))
            h = ctypes.c_void_p()
            check(L.la_session_open(self._handle(), str(key).encode(), cfg, ctypes.byref(h)))
        finally:
            L.la_session_config_free(cfg)
        s = Session(self, h, str(key))
        s.profile = profile
        self._sessions.add(s)
        return s

    def open_session_for(self, x, key, **kw):
        """open_session on the device of array x (device_of(x)) unless kw names a device; a
        GPU UUID the daemon does not know falls back to "cuda"."""
        if kw.get("device") is not None:
            return self.open_session(key, **kw)
        dev = device_of(x)
        try:
            return self.open_session(key, device=dev, **kw)
        except NoDevice:
            if dev in ("cpu", "cuda"):
                raise
            return self.open_session(key, device="cuda", **kw)

    def attach(self, key):
        """Attaches to an open session of the same Unix user (e.g. after a reconnect)."""
        h = ctypes.c_void_p()
        check(self._lib.la_session_attach(self._handle(), str(key).encode(), ctypes.byref(h)))
        s = Session(self, h, str(key))
        self._sessions.add(s)
        return s

    attach_session = attach

    # -- CUDA buffers --
    def _cuda_tensor_ref(self, t, pinned, access=_lib.ACCESS_RW, count=True):
        """(buffer handle, byte offset) of a CUDA tensor; registers its memory once: the
        cudaMalloc block, or the VMM allocations its storage spans (mapped with access by the
        daemon). Raises _Unshareable when neither way can share it. count: add the tensor to
        cuda_paths (not for the staging area's own copies)."""
        ptr = t.data_ptr()
        paths = self.cuda_paths if count else {"ipc": 0, "vmm": 0}
        drv = _cuda_driver()
        alloc_id = drv.buffer_id(ptr)
        with self._lock:
            if alloc_id is not None:
                blk = self._cuda_blocks.get(alloc_id)
                if blk is not None and blk.base <= ptr < blk.base + blk.size:
                    pinned.add(alloc_id)
                    paths["ipc"] += 1
                    return blk.handle, ptr - blk.base
            else:  # no driver access: find by address range
                for k, blk in self._cuda_blocks.items():
                    if blk.base <= ptr < blk.base + blk.size:
                        pinned.add(k)
                        paths["ipc"] += 1
                        return blk.handle, ptr - blk.base
            start, nbytes = _storage_span(t)
            for k, blk in self._vmm_blocks.items():
                if (blk.base <= start and start + nbytes <= blk.base + blk.size
                        and blk.access & access == access
                        and (k in pinned or self._lib.la_buffer_cuda_valid(blk.handle) == 1)):
                    pinned.add(k)
                    paths["vmm"] += 1
                    return blk.handle, ptr - blk.base
            self._evict_stale_cuda(pinned)
            h = ctypes.c_void_p()
            off = ctypes.c_uint64()

            def register():
                return self._lib.la_buffer_register_cuda_range(
                    self._handle(), ctypes.c_void_p(start), nbytes, access, ctypes.byref(h),
                    ctypes.byref(off))
            rc = register()
            if rc == _lib.LA_ELIMIT and (self._cuda_blocks or self._vmm_blocks):
                self._evict_stale_cuda(pinned, everything=True)
                rc = register()
            if rc == _lib.LA_ENOTSUP:
                raise _Unshareable(from_code(rc).message)
            check(rc)
            base = start - off.value
            size = self._lib.la_buffer_size(h)
            if drv.is_vmm(start):
                if h.value in self._vmm_blocks:  # found by the library: drop its extra reference
                    self._lib.la_buffer_unregister(h)
                    h = self._vmm_blocks[h.value].handle
                else:
                    self._vmm_blocks[h.value] = _CudaBlock(h, base, size, None, access)
                pinned.add(h.value)
                paths["vmm"] += 1
                return h, ptr - base
            key = alloc_id if alloc_id is not None else base
            old = self._cuda_blocks.get(key)
            if old is not None and old.handle.value == h.value:
                self._lib.la_buffer_unregister(h)
            else:
                self._cuda_blocks[key] = _CudaBlock(h, base, size, alloc_id)
            pinned.add(key)
            paths["ipc"] += 1
            return self._cuda_blocks[key].handle, ptr - base

    def _cuda_stage(self, device):
        st = self._stages.get(device)
        if st is None:
            st = self._stages[device] = _CudaStage(device)
        return st

    def _evict_stale_cuda(self, pinned, everything=False):
        """Unregisters blocks the caching allocator has freed (their allocation id changed,
        or, for VMM registrations, an allocation was unmapped or replaced) or, with
        everything=True, every block not used by the call being prepared."""
        drv = _cuda_driver()
        for k, blk in list(self._cuda_blocks.items()):
            if k in pinned:
                continue
            stale = everything
            if not stale and blk.alloc_id is not None:
                stale = drv.buffer_id(blk.base) != blk.alloc_id
            if stale:
                self._lib.la_buffer_unregister(blk.handle)
                del self._cuda_blocks[k]
        for k, blk in list(self._vmm_blocks.items()):
            if k in pinned:
                continue
            if everything or self._lib.la_buffer_cuda_valid(blk.handle) != 1:
                self._lib.la_buffer_unregister(blk.handle)
                del self._vmm_blocks[k]

    def release_cuda_buffers(self):
        """Unregisters every cached CUDA block (call after torch.cuda.empty_cache() when the
        CUDA driver library could not be loaded to detect freed blocks by itself)."""
        with self._lock:
            self._evict_stale_cuda(set(), everything=True)


# ---- Session ---------------------------------------------------------------------------------

class Session(_Closable):
    """One generation: the skip masks of every layer, held by the daemon."""

    _FACTS = ("id", "layers", "heads", "head_dim", "dtype", "max_seq_q", "max_seq_k", "batch",
              "kv_shards", "bm", "bn", "mask_bytes", "layer_mask_bytes", "n_q_tiles",
              "n_k_words", "warm_generations")

    def __init__(self, client, handle, key):
        self.client = client
        self._lib = client._lib
        self._h = handle
        self.key = key
        self._lock = threading.Lock()
        self._stage = None  # (buffer handle, size, host address)
        self.facts = {}
        for name in self._FACTS:
            v = ctypes.c_int64()
            if self._lib.la_session_get(handle, name.encode(), ctypes.byref(v)) == 0:
                self.facts[name] = v.value
        self.id = self.facts.get("id")
        self.layers = self.facts["layers"]
        self.heads = self.facts["heads"]
        self.head_dim = self.facts["head_dim"]
        self.dtype_code = self.facts["dtype"]
        self.dtype = _DTYPE_NAME.get(self.dtype_code, str(self.dtype_code))
        self.max_seq_q = self.facts["max_seq_q"]
        self.max_seq_k = self.facts["max_seq_k"]
        self.batch = self.facts["batch"]
        self.kv_shards = self.facts["kv_shards"]
        self.tile_sizes = (self.facts["bm"], self.facts["bn"])
        self.n_q_tiles = self.facts.get("n_q_tiles") or -(-self.max_seq_q // self.tile_sizes[0])
        self.n_k_words = self.facts.get("n_k_words") or \
            -(-(-(-self.max_seq_k // self.tile_sizes[1])) // 32)
        # Counters of the synchronous calls made through this handle (stats adds the fast ones).
        self._sync_stats = {"calls": 0, "tiles_total": 0, "tiles_computed": 0,
                            "compute_ns": 0, "queue_ns": 0}
        self.last_call = {}
        self._fast = None  # None: not asked yet; else (ok, reason)
        self.profile = None   # set by open_session(profile=...): per-layer thresholds
        text = self._lib.la_session_text
        self.warm = {"key": _lib.text(text(handle, b"warm_key")) or None,
                     "generations": self.facts.get("warm_generations", 0),
                     "status": _lib.text(text(handle, b"warm_status"))}

    def __repr__(self):
        return "<liteattn.Session %r id=%s layers=%d heads=%d head_dim=%d %s tiles=%s>" % (
            self.key, self.id, self.layers, self.heads, self.head_dim, self.dtype,
            self.tile_sizes)

    def __del__(self):
        # Garbage collection only lets go of this handle: the session stays open on the daemon
        # for the other handles (another client's attach()) and for a later attach(); only an
        # explicit close() closes it.
        try:
            self._drop(detach=True)
        except Exception:
            pass

    @property
    def closed(self):
        return self._h is None

    def _check_layer(self, layer, kv_shard=0):
        layer = _index(layer, "layer")
        if not 0 <= layer < self.layers:
            raise OutOfRange("layer %d out of range: session %r has %d layer%s (0..%d)"
                             % (layer, self.key, self.layers, "" if self.layers == 1 else "s",
                                self.layers - 1))
        kv_shard = _index(kv_shard, "kv_shard")
        if not 0 <= kv_shard < self.kv_shards:
            raise OutOfRange("kv_shard %d out of range: session %r has %d kv shard%s (0..%d)"
                             % (kv_shard, self.key, self.kv_shards,
                                "" if self.kv_shards == 1 else "s", self.kv_shards - 1))
        return layer, kv_shard

    def _handle(self):
        if self._h is None:
            raise NotFound("session %r: this handle is closed or detached" % self.key)
        return self._h

    def _drop(self, detach):
        with self._lock:
            if self._h is None:
                return 0
            h, self._h = self._h, None
            if self._stage is not None and not self.client.closed:
                self._lib.la_buffer_unregister(self._stage[0])
            self._stage = None
            if self.client.closed:
                return 0
            if detach:
                self._lib.la_session_detach(h)
                return 0
            return self._lib.la_session_close(h)

    def close(self):
        """Closes the session on the daemon (its masks are freed)."""
        rc = self._drop(detach=False)
        check(rc)

    def detach(self):
        """Frees this handle but leaves the session open on the daemon (attach it later)."""
        self._drop(detach=True)

    @property
    def stats(self):
        """Counters of the calls made through this handle: "calls", "tiles_total",
        "tiles_computed", "compute_ns", "queue_ns"; fast-path calls count once their reply
        arrived (sync() waits for them), and "failed" counts fast-path calls that failed."""
        st = dict(self._sync_stats)
        st["failed"] = 0
        if self._h is None:
            return st
        v = ctypes.c_int64()
        for name in ("calls", "tiles_total", "tiles_computed", "compute_ns", "queue_ns",
                     "failed"):
            if self._lib.la_session_counter(self._h, name.encode(), ctypes.byref(v)) == 0:
                st[name] += v.value
        return st

    def sync(self, timeout=None):
        """Waits (up to timeout seconds; None: forever) for the replies of this session's
        fast-path calls and raises the first error of one, if any (it is then cleared)."""
        check(self._lib.la_session_sync(self._handle(), _timeout_ms(timeout)))

    def fastpath_status(self):
        """(True, "") when this session's CUDA calls can take the fast path, else (False,
        the reason: the daemon's devices, this process's CUDA driver)."""
        if self._fast is None:
            rc = self._lib.la_session_fastpath(self._handle())
            why = "" if rc == 0 else _lib.text(self._lib.la_last_error_message())
            self._fast = (rc == 0, why)
        return self._fast

    def reset(self):
        """Every mask back to all ones: the next call of each layer is dense."""
        check(self._lib.la_session_reset(self._handle()))

    _DAEMON_STATS = ("restarts", "warm_deposits", "guard_checks", "guard_rows", "guard_restored",
                     "guard_tiles")

    def info(self):
        """{'live_fraction': [per layer], 'calls': daemon's count, plus this handle's counters
        'tiles_total', 'tiles_computed', 'compute_s'; 'warm' (see Session.warm); the daemon's
        'restarts', 'warm_deposits' and the guardrail's 'guard_checks', 'guard_rows',
        'guard_restored', 'guard_tiles' (see la_session_stat)}."""
        n = self.layers
        live = (ctypes.c_double * n)()
        calls = ctypes.c_uint64()
        h = self._handle()
        check(self._lib.la_session_info(h, live, n, ctypes.byref(calls)))
        out = {"live_fraction": list(live), "calls": calls.value,
               "tiles_total": self.stats["tiles_total"],
               "tiles_computed": self.stats["tiles_computed"],
               "compute_s": self.stats["compute_ns"] / 1e9, "warm": dict(self.warm)}
        for name in self._DAEMON_STATS:
            out[name] = self.stat(name)
        return out

    def stat(self, name):
        """One statistic of the session from the daemon (la_session_stat): calls, tiles_total,
        tiles_computed, tiles_skipped, restarts, warm_generations, warm_deposits,
        guard_checks, guard_rows, guard_restored, guard_tiles."""
        v = ctypes.c_int64()
        check(self._lib.la_session_stat(self._handle(), str(name).encode(), ctypes.byref(v)))
        return v.value

    @property
    def mask_shape(self):
        return (self.batch, self.heads, self.n_q_tiles, self.n_k_words)

    def mask(self, layer, kv_shard=0):
        """The packed live mask of (layer, kv_shard): uint32 [B, H, nQ, ceil(nK/32)], bit n%32
        of word n/32 is k-tile n, 1 = computed (docs/SKIP-SEMANTICS.md)."""
        layer, kv_shard = self._check_layer(layer, kv_shard)
        np = _np()
        arr = np.zeros(self.mask_shape, dtype=np.uint32)
        need = self.facts.get("layer_mask_bytes", arr.nbytes)
        if need > arr.nbytes:
            arr = np.zeros(need // 4, dtype=np.uint32)
        check(self._lib.la_session_read_mask(self._handle(), layer, kv_shard,
                                             arr.ctypes.data, arr.nbytes))
        return arr.reshape(self.mask_shape) if arr.ndim == 1 else arr

    # -- attention --
    def attention(self, layer, step, q, k, v, *, threshold=None, mode=None, must_do=(),
                  must_skip=(), scale=None, kv_shard=0, return_lse=False, dry_run=False,
                  out=None, row_max=None, fastpath=None):
        """One attention call of `layer` at denoising `step`.

        q: [B, Sq, H, D], k, v: [B, Sk, H, D] as NumPy arrays, torch CPU tensors (both through
        shared memory) or torch CUDA tensors (by CUDA IPC, no copy; the last dim must be
        contiguous, other strides are passed as they are). Returns out ([B, Sq, H, D], same
        kind and dtype as q) or (out, lse) with return_lse (lse: [B, H, Sq] float32, natural
        log). With dry_run the session's mask is left alone and the would-be mask is appended
        to the result: (out, decisions) or (out, lse, decisions), decisions a NumPy uint32
        array shaped like mask(). must_do / must_skip: half-open key ranges [(start, end)].
        threshold/mode override the session's for this call only.

        row_max: carried row maxima for ring attention (docs/SKIP-SEMANTICS.md "Carried row
        maxima"), a float32 array or tensor [B, H, Sq] of q's kind (a CUDA tensor on q's
        device for CUDA inputs), read and updated in place: the skip votes compare against
        max(row_max, the call's running maximum), and the call leaves max(row_max, its own row
        maxima of the raw scores q.k) in it. Start it at -inf for the first K/V shard and pass
        the same one to the next shards' calls. out and lse do not depend on it. A call with
        row_max is synchronous (the daemon's reply confirms it carried the maxima).

        CUDA tensors take the fast path unless fastpath=False (or the client's default is
        off): the call is ordered on torch.cuda.current_stream() and this returns at once,
        out being written on the GPU before anything later on that stream runs. An error of
        such a call is raised by a later attention() of this session or by sync(). Without
        the fast path (the daemon or the CUDA driver lacks it: a RuntimeWarning says why once,
        or fastpath=True raises NotSupported), and for dry runs, the call is synchronous.
        """
        h = self._handle()
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise InvalidArgument(
                    "%s is a %s; pass a NumPy array or a torch tensor of shape (B, S, H, D) "
                    "(e.g. numpy.asarray(%s, dtype=numpy.float32))"
                    % (name, type(x).__name__, name))
        layer, kv_shard = self._check_layer(layer, kv_shard)
        step = _index(step, "step")
        if step < 0:
            raise OutOfRange("step %d is negative: denoising steps count from 0" % step)
        if threshold is not None:
            threshold = _number(threshold, "threshold")
        if scale is not None:
            scale = _number(scale, "scale")
        if threshold is None and self.profile is not None and self.profile.layers:
            threshold = self.profile.threshold(layer, step)
        kinds = {_kind(x) for x in (q, k, v)}
        if len(kinds) != 1:
            raise InvalidArgument("q, k and v must all be NumPy arrays, all CPU tensors or "
                                  "all CUDA tensors")
        kind = kinds.pop()
        for name, x in (("q", q), ("k", k), ("v", v)):
            if len(x.shape) != 4:
                raise InvalidArgument("%s has shape %s; expected 4 dims (B, S, H, D)"
                                      % (name, tuple(x.shape)))
        if row_max is not None:
            _check_row_max(row_max, q, kind)
        L = self._lib
        a = ctypes.c_void_p()
        check(L.la_attn_new(ctypes.byref(a)))
        try:
            check(L.la_attn_set_position(a, layer, step, kv_shard))
            if scale is not None:
                check(L.la_attn_set_scale(a, scale))
            if threshold is not None:
                check(L.la_attn_set_threshold(a, threshold))
            check(L.la_attn_set_mode(a, _mode_code(mode)))
            n_keys = int(k.shape[1])
            arr, n = _ranges(must_do, "must_do", n_keys)
            if n:
                check(L.la_attn_set_must_do(a, arr, n))
            arr, n = _ranges(must_skip, "must_skip", n_keys)
            if n:
                check(L.la_attn_set_must_skip(a, arr, n))
            if dry_run:
                check(L.la_attn_set_dry_run(a, 1))
            if kind == "cuda":
                fast = self.client.fastpath if fastpath is None else bool(fastpath)
                if row_max is not None and fastpath:
                    raise InvalidArgument("row_max calls are synchronous: the daemon's reply "
                                          "confirms that it carried the maxima; leave "
                                          "fastpath unset or False")
                if fast and (dry_run or row_max is not None or not self._fast_usable(fastpath)):
                    fast = False
                res = self._run_cuda(h, a, q, k, v, return_lse, dry_run, out, row_max, fast)
            else:
                with self._lock:
                    res = self._run_host(h, a, kind, q, k, v, return_lse, dry_run, out,
                                         row_max)
        finally:
            L.la_attn_free(a)
        return res

    def _run_call(self, h, a, then=None):
        """Runs a on session h (la_attn_run): then(call) if given, and the call counted in
        self.stats (_account); the call handle is freed either way, an error raised."""
        L = self._lib
        call = ctypes.c_void_p()
        rc = L.la_attn_run(h, a, ctypes.byref(call))
        if rc < 0:
            err = from_code(rc)
            L.la_call_free(call)
            raise err
        try:
            if then is not None:
                then(call)
            self._account(call)
        finally:
            L.la_call_free(call)

    def _fast_usable(self, asked):
        """Whether the fast path is there; asked=True makes its absence an error, else it is
        said once per client with a RuntimeWarning."""
        ok, why = self.fastpath_status()
        if ok:
            return True
        if asked:
            raise NotSupported("the fast path is not available: %s" % why)
        if not self.client._fast_warned:
            self.client._fast_warned = True
            warnings.warn("liteattn: CUDA calls wait for the daemon's reply (no fast path: %s)"
                          % why, RuntimeWarning, stacklevel=3)
        return False

    def _account(self, call):
        st = {}
        for name in ("tiles_total", "tiles_computed", "compute_ns", "queue_ns"):
            v = ctypes.c_int64()
            if self._lib.la_call_stat(call, name.encode(), ctypes.byref(v)) == 0:
                st[name] = v.value
                self._sync_stats[name] += v.value
        self._sync_stats["calls"] += 1
        self.last_call = st

    def _ensure_stage(self, nbytes):
        if self._stage is not None and self._stage[1] >= nbytes:
            return self._stage
        if self._stage is not None:
            self._lib.la_buffer_unregister(self._stage[0])
            self._stage = None
        size = max(1 << 20, 1 << max(0, math.ceil(math.log2(nbytes))))
        if size > 2 * nbytes and size > (64 << 20):
            size = _align(nbytes + nbytes // 8)
        b = ctypes.c_void_p()
        check(self._lib.la_buffer_new_host(self.client._handle(), size, ctypes.byref(b)))
        ptr = self._lib.la_buffer_host_ptr(b)
        self._stage = (b, size, ptr)
        return self._stage

    def _run_host(self, h, a, kind, q, k, v, return_lse, dry_run, out, row_max=None):
        np = _np()
        L = self._lib
        if kind == "numpy":
            q, k, v = (np.asarray(x) for x in (q, k, v))
            codes = [_numpy_dtype_code(x, self.dtype_code) for x in (q, k, v)]
        else:
            codes = [_torch_dtype_code(x) for x in (q, k, v)]
        dcode = _one_dtype(codes)
        es = _DTYPE_SIZE[dcode]
        B, Sq, H, D = (int(x) for x in q.shape)
        qshape = (B, Sq, H, D)
        lse_shape = (B, H, Sq)
        sizes = [es * _prod(x.shape) for x in (q, k, v)] + [es * _prod(qshape)]
        sizes.append(4 * _prod(lse_shape) if return_lse else 0)
        dec_bytes = self.facts.get("layer_mask_bytes", 4 * _prod(self.mask_shape))
        sizes.append(dec_bytes if dry_run else 0)
        sizes.append(4 * _prod(lse_shape) if row_max is not None else 0)
        offs = []
        total = 0
        for s in sizes:
            offs.append(total)
            total += _align(s)
        buf, size, ptr = self._ensure_stage(total)
        raw = (ctypes.c_char * size).from_address(ptr)
        if kind == "numpy":
            ndt = q.dtype
            views = [np.ndarray(x.shape, dtype=ndt, buffer=raw, offset=o)
                     for x, o in zip((q, k, v), offs)]
            for view, x in zip(views, (q, k, v)):
                view[...] = x
            del views
        else:
            torch = _torch()
            for x, o in zip((q, k, v), offs):
                torch.frombuffer(raw, dtype=x.dtype, count=x.numel(), offset=o) \
                    .view(tuple(x.shape)).copy_(x)
        for role, x, o in ((_lib.T_Q, q, offs[0]), (_lib.T_K, k, offs[1]),
                           (_lib.T_V, v, offs[2]), (_lib.T_O, None, offs[3])):
            shape = qshape if x is None else tuple(int(d) for d in x.shape)
            check(L.la_attn_set_tensor(a, role, buf, o, dcode, 4, _i64(shape), None))
        if return_lse:
            check(L.la_attn_set_tensor(a, _lib.T_LSE, buf, offs[4], _lib.DTYPE_F32, 3,
                                       _i64(lse_shape), None))
        if dry_run:
            check(L.la_attn_set_tensor(a, _lib.T_DECISIONS, buf, offs[5], _lib.DTYPE_U32, 0,
                                       None, None))
        if row_max is not None:
            rview = np.ndarray(lse_shape, dtype=np.float32, buffer=raw, offset=offs[6])
            rview[...] = (np.asarray(row_max) if kind == "numpy"
                          else row_max.detach().numpy())
            del rview
            check(L.la_attn_set_tensor(a, _lib.T_ROW_MAX, buf, offs[6], _lib.DTYPE_F32, 3,
                                       _i64(lse_shape), None))
        self._run_call(h, a)
        if row_max is not None:     # updated in place, as on the GPU
            rview = np.ndarray(lse_shape, dtype=np.float32, buffer=raw, offset=offs[6])
            if kind == "numpy":
                row_max[...] = rview
            else:
                row_max.copy_(_torch().from_numpy(rview.copy()))
            del rview
        # Copy the results out of the staging buffer.
        if kind == "numpy":
            o_view = np.ndarray(qshape, dtype=q.dtype, buffer=raw, offset=offs[3])
            if out is None:
                out = o_view.copy()
            else:
                if tuple(out.shape) != qshape:
                    raise InvalidArgument("out has shape %s; expected %s"
                                          % (tuple(out.shape), qshape))
                out[...] = o_view
            del o_view
            lse = (np.ndarray(lse_shape, dtype=np.float32, buffer=raw, offset=offs[4]).copy()
                   if return_lse else None)
        else:
            torch = _torch()
            o_view = torch.frombuffer(raw, dtype=q.dtype, count=_prod(qshape),
                                      offset=offs[3]).view(qshape)
            if out is None:
                out = o_view.clone()
            else:
                out.copy_(o_view)
            del o_view
            lse = (torch.frombuffer(raw, dtype=torch.float32, count=_prod(lse_shape),
                                    offset=offs[4]).view(lse_shape).clone()
                   if return_lse else None)
        dec = None
        if dry_run:
            dec = np.frombuffer(raw, dtype=np.uint32, count=dec_bytes // 4,
                                offset=offs[5]).copy()
            if dec.size == _prod(self.mask_shape):
                dec = dec.reshape(self.mask_shape)
        del raw
        return _result(out, lse, dec, return_lse, dry_run)

    def _run_cuda(self, h, a, q, k, v, return_lse, dry_run, out, row_max=None, fast=False):
        torch = _torch()
        L = self._lib
        dev = q.device
        for name, x in (("k", k), ("v", v)):
            if x.device != dev:
                raise InvalidArgument("%s is on %s, q on %s" % (name, x.device, dev))
        dcode = _one_dtype([_torch_dtype_code(x) for x in (q, k, v)])
        B, Sq, H, D = (int(x) for x in q.shape)
        qshape = (B, Sq, H, D)
        if out is None:
            out = torch.empty(qshape, dtype=q.dtype, device=dev)
        elif tuple(out.shape) != qshape or out.dtype != q.dtype or out.device != dev:
            raise InvalidArgument("out must be a %s tensor of shape %s on %s"
                                  % (q.dtype, qshape, dev))
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=dev) if return_lse else None
        dec = None
        if dry_run:
            nb = self.facts.get("layer_mask_bytes", 4 * _prod(self.mask_shape))
            dec = torch.empty((nb // 4,), dtype=torch.int32, device=dev)
        pinned = set()
        client = self.client
        R, RW = _lib.ACCESS_READ, _lib.ACCESS_RW
        tensors = [(_lib.T_Q, q, R, dcode), (_lib.T_K, k, R, dcode), (_lib.T_V, v, R, dcode),
                   (_lib.T_O, out, RW, dcode)]
        for _, x, _, _ in tensors:
            if x.stride(-1) != 1 and x.shape[-1] != 1:
                raise InvalidArgument("the last dim (D) of every tensor must be contiguous "
                                      "(stride 1); got strides %s" % (tuple(x.stride()),))
            if x.numel() == 0:
                raise InvalidArgument("empty tensor")
        if lse is not None:
            tensors.append((_lib.T_LSE, lse, RW, _lib.DTYPE_F32))
        if dec is not None:
            tensors.append((_lib.T_DECISIONS, dec, RW, _lib.DTYPE_U32))
        if row_max is not None:     # read and written in place
            tensors.append((_lib.T_ROW_MAX, row_max, RW, _lib.DTYPE_F32))
        stream = torch.cuda.current_stream(dev)
        refs, unshared = [], []
        for role, x, acc, code in tensors:
            try:
                refs.append((role, x, code) + client._cuda_tensor_ref(x, pinned, acc))
            except _Unshareable as e:
                unshared.append((role, x, acc, code, str(e)))
        stage, copy_out, ran, locked = None, [], False, False
        try:
            if unshared:
                # Memory the daemon cannot map: through the client's staging area, its lock
                # held until the copies out are queued (one call at a time uses it).
                client._lock.acquire()
                locked = True
                stage = client._cuda_stage(dev)
                _warn_staging(unshared[0][4])
                if stage.done is not None:
                    stream.wait_event(stage.done)
                views = stage.views([(tuple(x.shape), x.dtype) for _, x, _, _, _ in unshared])
                for (role, x, acc, code, _), y in zip(unshared, views):
                    if acc == R or role == _lib.T_ROW_MAX:   # row_max is read, then written
                        y.copy_(x)
                    if acc != R:
                        copy_out.append((x, y))
                    refs.append((role, y, code) + client._cuda_tensor_ref(y, pinned, acc,
                                                                          count=False))
                client.cuda_paths["staged"] += len(unshared)
            for role, x, code, buf, off in refs:
                if role == _lib.T_DECISIONS:
                    check(L.la_attn_set_tensor(a, role, buf, off, code, 0, None, None))
                else:
                    check(L.la_attn_set_tensor(a, role, buf, off, code, x.dim(), _i64(x.shape),
                                               _i64(x.stride())))
            if fast:
                # Ordered on the GPU: the ring after what the stream has (Q/K/V), the wait for
                # done before what comes next (the staged copies out included). No reply is
                # waited for; freed inputs are reused only by later work on this stream.
                check(L.la_attn_enqueue(h, a, ctypes.c_void_p(stream.cuda_stream), None))
                self.last_call = {}
                ran = True
            else:
                ev = torch.cuda.Event(enable_timing=False, blocking=False, interprocess=True)
                ev.record(stream)
                handle = ev.ipc_handle()
                check(L.la_attn_set_wait_event(a, handle, len(handle)))

                def wait_on_gpu(call):
                    done = ctypes.create_string_buffer(64)
                    if L.la_call_done_event(call, done, 64) == 0:
                        # The kernel may still run: our stream waits for it on the GPU.
                        torch.cuda.Event.from_ipc_handle(dev, done.raw).wait(stream)

                self._run_call(h, a, wait_on_gpu)
                ran = True
                del ev
        finally:
            if stage is not None:
                for x, y in copy_out if ran else ():
                    x.copy_(y)
                stage.done = torch.cuda.Event()
                stage.done.record(stream)
            if locked:
                client._lock.release()
        if dec is not None:
            dec = dec.cpu().numpy().view("uint32")
            if dec.size == _prod(self.mask_shape):
                dec = dec.reshape(self.mask_shape)
        return _result(out, lse, dec, return_lse, dry_run)


def _check_row_max(row_max, q, kind):
    """row_max must be float32 [B, H, Sq] of q's kind (and device), writable in place."""
    B, Sq, H = (int(q.shape[0]), int(q.shape[1]), int(q.shape[2]))
    want = (B, H, Sq)
    if _kind(row_max) != kind or (kind == "cuda" and row_max.device != q.device):
        raise InvalidArgument("row_max must be of q's kind (%s%s); got %s"
                              % (kind, " on %s" % q.device if kind == "cuda" else "",
                                 type(row_max).__name__))
    if tuple(int(d) for d in row_max.shape) != want:
        raise InvalidArgument("row_max has shape %s; expected [B, H, Sq] = %s"
                              % (tuple(row_max.shape), want))
    if str(row_max.dtype) not in ("float32", "torch.float32"):
        raise InvalidArgument("row_max must be float32, not %s" % (row_max.dtype,))
    if kind == "numpy" and not row_max.flags.writeable:
        raise InvalidArgument("row_max is read-only; it is updated in place")


def _warn_staging(why):
    """Once per process and reason: CUDA tensors are being copied, and how to avoid it."""
    if why in _STAGING_WARNED:
        return
    _STAGING_WARNED.add(why)
    warnings.warn(
        "liteattn: copying CUDA tensors through a staging area, because the daemon cannot map "
        "their memory: %s. The copies cost time on every call; see docs/ALLOCATORS.md for the "
        "allocator settings that share memory without copies." % why,
        StagingWarning, stacklevel=4)


def _result(out, lse, dec, return_lse, dry_run):
    res = (out,)
    if return_lse:
        res += (lse,)
    if dry_run:
        res += (dec,)
    return res[0] if len(res) == 1 else res


def _one_dtype(codes):
    """The dtype code shared by q, k and v, or InvalidArgument naming theirs."""
    if len(set(codes)) != 1:
        raise InvalidArgument("q, k and v must have one dtype; got q %s, k %s, v %s"
                              % tuple(_DTYPE_NAME.get(c, str(c)) for c in codes))
    return codes[0]


def _parse_number(text):
    """A table cell as an int or float (text that is neither stays text)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _kind(x):
    if _is_torch(x):
        return "cuda" if x.is_cuda else "torch"
    return "numpy"
