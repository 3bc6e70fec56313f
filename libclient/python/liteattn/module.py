"""The drop-in module: LiteAttention, familiar to users of the reference implementation.

    import liteattn
    attn = [liteattn.LiteAttention(threshold=-3.0) for _ in range(num_layers)]  # one per layer
    liteattn.new_generation()          # at the start of every generation (video)
    for step in range(steps):
        ... out = attn[i](q, k, v) ...  # q, k, v: (B, S, H, D); each call advances the step

Every instance gets a layer index from a context (the module-level default one, or one you
make with liteattn.Context(socket=...)); all instances of a context share one daemon session per
generation. The session is opened at the first call of a generation, sized from that call
(heads, head dim, dtype, batch, sequence lengths) unless new_generation() was given sizes.
A generation begins with new_generation() (or `with liteattn.generation(): ...`); each
instance's step counter then restarts at 0 and every mask at all ones.
"""
import logging
import threading
import weakref

from . import _lib
from .client import Client
from .errors import InvalidArgument

log = logging.getLogger("liteattn")

__all__ = ["LiteAttention", "Context", "default_context", "new_generation", "generation"]


def convert_must_list(lst, seq_len=None):
    """Reference-format must-do/must-skip list -> half-open [(start, end)] key ranges.

    Accepts the reference's flat list [hi0, lo0, hi1, lo1, ...] (hi inclusive > lo exclusive,
    descending: keys lo+1 .. hi), a flat list of half-open pairs [start, end, ...] (start < end),
    or a list of (start, end) half-open pairs.
    """
    if lst is None:
        return ()
    seq = list(lst)
    if not seq:
        return ()
    if hasattr(seq[0], "__len__"):
        return tuple((int(a), int(b)) for a, b in seq)
    if len(seq) % 2:
        raise InvalidArgument("must-do/must-skip list needs pairs of token indices")
    out = []
    for i in range(0, len(seq), 2):
        a, b = int(seq[i]), int(seq[i + 1])
        if a > b:   # reference convention: (start inclusive) > (end exclusive), descending
            out.append((b + 1, a + 1))
        else:
            out.append((a, b))
    return tuple(out)


class _ContextBase:
    """What this module's Context and parallel.Context share: the daemon client (connected at
    first use, and again after it closed) and the current generation's session, under one lock.
    A subclass defines end_generation (it closes the session)."""

    def __init__(self, socket, session_kwargs):
        self.socket = socket
        self.session_kwargs = session_kwargs
        self._client = None
        self._session = None
        self._lock = threading.RLock()
        self._generation = 0

    @property
    def client(self):
        if self._client is None or self._client.closed:
            self._client = Client(self.socket)
        return self._client

    @property
    def session(self):
        """The current generation's session (None before its first call)."""
        return self._session

    def close(self):
        self.end_generation()
        if self._client is not None:
            self._client.close()
            self._client = None


class Context(_ContextBase):
    """Allocates layer indices to LiteAttention instances and holds their session."""

    def __init__(self, socket=None, **session_kwargs):
        super().__init__(socket, session_kwargs)
        self._layers = []   # weakrefs, index = layer
        self._hints = {}

    def register(self, inst):
        with self._lock:
            self._layers.append(weakref.ref(inst))
            return len(self._layers) - 1

    def new_generation(self, **hints):
        """Ends the current generation (its session is closed) and starts a new one. hints
        presize the next session: max_seq_q, max_seq_k, batch, layers, threshold, schedule,
        mode, device."""
        with self._lock:
            self.end_generation()
            self._hints = dict(hints)
            self._generation += 1
            for r in self._layers:
                inst = r()
                if inst is not None:
                    inst._step = 0
                    inst._reset_pending = False

    def end_generation(self):
        """Closes the current session, logging a summary."""
        with self._lock:
            s, self._session = self._session, None
            if s is not None and not s.closed:
                try:
                    info = s.info()
                    lf = info["live_fraction"]
                    st = s.stats
                    frac = st["tiles_computed"] / st["tiles_total"] if st["tiles_total"] else 1
                    log.info("liteattn: generation over: %d calls, %.1f%% of tiles computed, "
                             "mean live fraction at the end %.3f", st["calls"], 100 * frac,
                             sum(lf) / max(1, len(lf)))
                except Exception:
                    pass
                try:
                    s.close()
                except Exception:
                    pass

    def _session_for(self, q, k):
        with self._lock:
            if self._session is not None:
                return self._session
            B, Sq, H, D = (int(x) for x in q.shape)
            Sk = int(k.shape[1])
            kw = dict(self.session_kwargs)
            kw.update(self._hints)
            dtype = str(getattr(q, "dtype", "float32"))
            if dtype == "uint16":
                dtype = "bfloat16"
            key = "liteattn-module-%d-%d-%d" % (_pid(), id(self), self._generation)
            self._session = self.client.open_session_for(
                q, key, layers=kw.pop("layers", max(1, len(self._layers))), heads=H, head_dim=D,
                dtype=kw.pop("dtype", dtype), max_seq_q=kw.pop("max_seq_q", Sq),
                max_seq_k=kw.pop("max_seq_k", Sk), batch=kw.pop("batch", B), **kw)
            return self._session


def _pid():
    import os
    return os.getpid()


_default = None
_default_lock = threading.Lock()


def default_context():
    """The module-level context LiteAttention instances use unless given another."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Context()
        return _default


def new_generation(**hints):
    """Starts a new generation in the default context (see Context.new_generation)."""
    default_context().new_generation(**hints)


class generation:
    """`with liteattn.generation(**hints): ...` — a generation in the default (or a given)
    context: begins it on entry, closes its session (with a logged summary) on exit."""

    def __init__(self, context=None, **hints):
        self.context = context or default_context()
        self.hints = hints

    def __enter__(self):
        self.context.new_generation(**self.hints)
        return self.context

    def __exit__(self, *exc):
        self.context.end_generation()


class LiteAttention:
    """One per attention layer. Call as attn(q, k, v, scale=None, return_softmax_lse=False,
    must_do_list=None, must_skip_list=None) with q, k, v of shape (B, S, H, D) (torch tensors,
    CUDA or CPU, or NumPy arrays). Returns out, or (out, lse) with lse (B, H, Sq) float32.
    Each call advances this layer's step."""

    def __init__(self, threshold=-3.0, enable_skipping=True, context=None, max_batch_size=None,
                 profile=None):
        self.context = context or default_context()
        self.layer = self.context.register(self)
        self.threshold = float(threshold)
        self.profile = None   # a calibrated profile: its threshold for (layer, step) per call
        if profile is not None:
            from .calibrate import load_profile
            self.profile = load_profile(profile)
        self.enable_skipping = bool(enable_skipping)
        self._step = 0
        self._reset_pending = False
        self.last_call = {}

    def __repr__(self):
        return "LiteAttention(layer=%d, threshold=%g, enable_skipping=%s)" % (
            self.layer, self.threshold, self.enable_skipping)

    def set_threshold(self, threshold):
        self.threshold = float(threshold)

    def enable_skip_optimization(self, flag=True):
        """Off: every call is dense (mode dense) and the skip state is kept for later."""
        self.enable_skipping = bool(flag)

    def reset_skip_state(self):
        """The next call of this layer is dense and revives every tile of this layer's mask
        (it runs with the whole key range as must-do, so its own decisions start one call
        later than after a fresh session)."""
        self._reset_pending = True
        self._step = 0

    @property
    def step(self):
        return self._step

    def __call__(self, q, k, v, scale=None, return_softmax_lse=False, must_do_list=None,
                 must_skip_list=None):
        ctx = self.context
        if hasattr(q, "is_cuda") and q.shape[-1] and q.stride(-1) != 1:
            q = q.contiguous()
        if hasattr(k, "is_cuda") and k.stride(-1) != 1:
            k = k.contiguous()
        if hasattr(v, "is_cuda") and v.stride(-1) != 1:
            v = v.contiguous()
        s = ctx._session_for(q, k)
        if self.layer >= s.layers:
            raise InvalidArgument(
                "LiteAttention layer %d was created after this generation's session opened "
                "(%d layers): create every instance first, or call liteattn.new_generation()"
                % (self.layer, s.layers))
        must_do = convert_must_list(must_do_list)
        mode = "skip" if self.enable_skipping else "dense"
        if self._reset_pending:
            must_do = ((0, int(k.shape[1])),)
            mode = "skip"
            self._reset_pending = False
        thr = self.threshold if self.profile is None else \
            self.profile.threshold(self.layer, self._step)
        res = s.attention(self.layer, self._step, q, k, v, threshold=thr,
                          mode=mode, must_do=must_do,
                          must_skip=convert_must_list(must_skip_list), scale=scale,
                          return_lse=bool(return_softmax_lse))
        self.last_call = dict(s.last_call)
        self._step += 1
        return res

    @property
    def live_fraction(self):
        s = self.context.session
        if s is None:
            return 1.0
        return s.info()["live_fraction"][self.layer]

    def mask(self):
        """This layer's packed live mask (see Session.mask), or None before the first call."""
        s = self.context.session
        return None if s is None else s.mask(self.layer)


del _lib
