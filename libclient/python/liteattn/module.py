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
instance's step counter then restarts at 0.

Warm start (on by default): every generation's session names a warm key derived from the
context's model name, the attention geometry and, when new_generation(steps=N) says it, the
step count (liteattn.warm_key), so its masks start from those of earlier generations of this
user with the same key instead of all ones, after one dense step. Context(warm=False) turns it
off, Context(warm="my key") names the key, warm_step=/warm_generations=/warm_margin=/
warm_dense_steps= tune it, and guard_every=/guard_sample=/guard_budget= turn on the quality
guardrail (all go to Client.open_session).
"""
import logging
import threading
import weakref

from . import _lib
from .client import Client, threshold_tag, warm_key
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
    """Allocates layer indices to LiteAttention instances and holds their session.

    socket: the daemon's socket (None: the default). model: a name for the warm key (default
    "liteattn-module"). warm: True (derive the warm key), False (no warm start) or a key.
    Other keywords go to Client.open_session for every generation."""

    def __init__(self, socket=None, model=None, warm=True, **session_kwargs):
        if not isinstance(warm, (bool, str)):
            raise InvalidArgument("warm must be True, False or a warm key (str), got %r"
                                  % (warm,))
        super().__init__(socket, session_kwargs)
        self.model = model
        self.warm = warm
        self._layers = []   # weakrefs, index = layer
        self._hints = {}

    def register(self, inst):
        with self._lock:
            self._layers.append(weakref.ref(inst))
            return len(self._layers) - 1

    def new_generation(self, **hints):
        """Ends the current generation (its session is closed) and starts a new one. hints
        presize the next session: max_seq_q, max_seq_k, batch, layers, threshold, schedule,
        mode, device; steps (the step count, part of the derived warm key); warm_key and the
        other open_session options."""
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

    def _threshold_tag(self):
        """The thresholds of this context's layers, for the warm key."""
        per_layer = []
        for r in self._layers:
            inst = r()
            if inst is None:
                continue
            if inst.profile is not None:
                return threshold_tag(profile=inst.profile)
            per_layer.append(inst.threshold if inst.enable_skipping else float("-inf"))
        return threshold_tag(per_layer=per_layer)

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
            layers = kw.pop("layers", max(1, len(self._layers)))
            dtype = kw.pop("dtype", dtype)
            sq, sk, nb = kw.pop("max_seq_q", Sq), kw.pop("max_seq_k", Sk), kw.pop("batch", B)
            steps = kw.pop("steps", None)
            if "warm_key" not in kw and self.warm:
                kw["warm_key"] = self.warm if isinstance(self.warm, str) else warm_key(
                    self.model or "liteattn-module", layers=layers, batch=nb, seq_q=sq,
                    seq_k=sk, heads=H, head_dim=D, dtype=dtype, steps=steps,
                    extra=self._threshold_tag())
            elif not self.warm:
                kw.pop("warm_key", None)
                for opt in ("warm_step", "warm_generations", "warm_margin", "warm_dense_steps"):
                    kw.pop(opt, None)
            self._session = self.client.open_session_for(
                q, key, layers=layers, heads=H, head_dim=D, dtype=dtype, max_seq_q=sq,
                max_seq_k=sk, batch=nb, **kw)
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


def _take(x, idx, dim):
    """x's entries along dim in order idx (torch: index_select; NumPy: take)."""
    if hasattr(x, "index_select"):
        return x.index_select(dim, idx)
    import numpy as np
    return np.take(x, idx, axis=dim)


class LiteAttention:
    """One per attention layer. Call as attn(q, k, v, scale=None, return_softmax_lse=False,
    must_do_list=None, must_skip_list=None) with q, k, v of shape (B, S, H, D) (torch tensors,
    CUDA or CPU, or NumPy arrays). Returns out, or (out, lse) with lse (B, H, Sq) float32.
    Each call advances this layer's step.

    token_order: None, or a permutation of the S tokens (liteattn.order, e.g.
    liteattn.order.zorder((frames, height, width)) for video latents in (t, h, w) order): each
    call gathers Q, K, V into that order, so that a tile holds a compact brick of the video,
    and returns O (and LSE) in the caller's order. Self-attention only (Sq = Sk = len); the
    gathers cost three copies of Q/K/V and one of O per call."""

    def __init__(self, threshold=-3.0, enable_skipping=True, context=None, max_batch_size=None,
                 profile=None, token_order=None):
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
        self.set_token_order(token_order)

    def set_token_order(self, perm):
        """Use permutation perm (see the class) from the next call on; None: the caller's."""
        from . import order
        if perm is None:
            self._order = None
        else:
            if hasattr(perm, "detach"):
                perm = perm.detach().cpu().numpy()
            try:
                p = order.check(perm)
            except ValueError as e:
                raise InvalidArgument(str(e)) from None
            self._order = (p, order.inverse(p))
        self._order_on = {}   # device -> (perm, inv) as torch tensors

    def _ordered(self, q, k, v, must_do_list, must_skip_list):
        """(q, k, v, inv) in the token order; inv None without one."""
        if self._order is None:
            return q, k, v, None
        p, inv = self._order
        n = p.size
        if q.shape[1] != n or k.shape[1] != n or v.shape[1] != n:
            raise InvalidArgument(
                "LiteAttention token_order has %d tokens but the call has Sq %d, Sk %d: the "
                "order is for self-attention over exactly those tokens" % (
                    n, q.shape[1], k.shape[1]))
        if must_do_list or must_skip_list:
            raise InvalidArgument("LiteAttention: must-do and must-skip ranges are key ranges "
                                  "in the caller's order; they cannot be combined with "
                                  "token_order")
        if hasattr(q, "is_cuda"):
            import torch
            key = str(q.device)
            if key not in self._order_on:
                self._order_on[key] = (torch.from_numpy(p).to(q.device),
                                       torch.from_numpy(inv).to(q.device))
            tp, tinv = self._order_on[key]
            return (q.index_select(1, tp), k.index_select(1, tp), v.index_select(1, tp), tinv)
        return q[:, p], k[:, p], v[:, p], inv

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
        q, k, v, inv = self._ordered(q, k, v, must_do_list, must_skip_list)
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
        if inv is not None:
            if return_softmax_lse:
                out, lse = res
                return _take(out, inv, 1), _take(lse, inv, 2)
            return _take(res, inv, 1)
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
