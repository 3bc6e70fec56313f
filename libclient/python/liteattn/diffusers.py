"""diffusers integration: LiteAttention for the video self-attention of a pipeline.

    import liteattn.diffusers
    pipe = WanPipeline.from_pretrained(...).to("cuda")
    liteattn.diffusers.apply(pipe, threshold=-3.0)      # installs the processors
    video = pipe(prompt, num_inference_steps=50).frames  # one liteattn session per pipe(...)
    liteattn.diffusers.remove(pipe)                      # original processors back

What goes through liteattn: the self-attention of the video tokens (Wan's and LTX-Video's
`attn1`; in HunyuanVideo's joint [video; text] attention the video query rows, with the text
keys as a must-do range so that they are always computed, while the text query rows stay on
the original, dense path; its text padding mask becomes a cut of the keys). Cross-attention
(text, image context) and any call with another attention mask, dropout or a causal flag stay
on the original processor, dense.

Sequence parallelism (parallel=, default "auto"): on a transformer split by diffusers' own
context parallelism (`transformer.enable_parallelism(config=ContextParallelConfig(
ring_degree=r, ulysses_degree=u))`, launched with torchrun, one process per GPU), Wan's and
LTX's self-attention calls arrive as sequence shards with the parallel config; liteattn then
computes them with liteattn.parallel over that config's own process groups: Ulysses (u > 1,
r = 1), ring (r > 1, u = 1) or the hybrid (both), each rank talking to the daemon of its host
with its own session (masks per rank; slot = branch * r + K/V shard, see docs/PARALLEL.md).
parallel=False leaves those calls to diffusers (dense); parallel=dict(ring_order="global",
carry_max=...) passes options to the ring; parallel=dict(scheme=..., group=...) names the
scheme and its group(s) for a transformer whose sequence was split by other code (every plain
self-attention call is then a shard). HunyuanVideo's joint calls under context parallelism and
diffusers' "anything" modes (unequal shards) stay dense.

Supported processors: WanAttnProcessor (Wan2.1/2.2, incl. the deprecated WanAttnProcessor2_0
alias, also transformer_2 of Wan2.2), LTXVideoAttnProcessor and HunyuanVideoAttnProcessor2_0.
Not supported, apply() raises liteattn.NotSupported: CogVideoX (its processor calls
F.scaled_dot_product_attention over joint text+video tokens directly, with nothing to hook).

Steps and branches: a denoising step is recognised by the transformer's `timestep` argument
changing; calls with the same timestep are classifier-free-guidance branches (cond, uncond) and
get separate masks (kv shard index = branch, max_branches of them). Batched CFG (cond and uncond
as batch rows of one call) gets separate mask rows per batch row. apply() also works on a bare
transformer (no pipeline): a new generation then begins when the timestep goes up again, or
when you call new_generation(model).

Warm start (on by default, apply(..., warm=False) turns it off): each generation's session
names a warm key made of the model's name (its `_name_or_path`, else the transformer's class),
the attention geometry and num_inference_steps (liteattn.warm_key), so a generation starts
from the masks earlier generations of this user left under the same key instead of all ones,
after one dense step; warm="my key" names the key, warm_step=/warm_generations=/warm_margin=/
warm_dense_steps= tune it. guard_every=/guard_sample=/guard_budget= turn on the daemon's
quality guardrail. The summary says whether the generation started warm.

Logging (logger "liteattn.diffusers", INFO): per step the fraction of tiles computed, at the
end a summary with the live fraction and the attention time saved (estimated from the
backend's compute time and the tiles skipped).
"""
import contextvars
import functools
import itertools
import logging
import os
import sys
import threading
import time

try:
    import torch  # noqa: F401  (needed by every processor; imported here to fail early)
except ImportError as _e:
    raise ImportError(
        "liteattn.diffusers needs PyTorch (torch>=2.1) and diffusers (>=0.35), and this Python "
        "(%s) has no torch: install them, e.g. `pip install torch diffusers` in a virtual "
        "environment (the NumPy API, `import liteattn`, works without them)" % sys.executable,
        name="torch") from _e

from . import order as _order
from .client import Client, threshold_tag, warm_key
from .errors import InvalidArgument, NotSupported

log = logging.getLogger("liteattn.diffusers")

__all__ = ["apply", "remove", "new_generation", "LiteAttnProcessor"]

_SUPPORTED = ("WanAttnProcessor", "WanAttnProcessor2_0", "LTXVideoAttnProcessor",
              "LTXVideoAttentionProcessor2_0", "HunyuanVideoAttnProcessor2_0")
# Joint attention over [video tokens; text tokens] (text at the end).
_JOINT_TAIL = ("HunyuanVideoAttnProcessor2_0",)
_UNSUPPORTED = {
    "CogVideoXAttnProcessor2_0": "CogVideoX's processor calls F.scaled_dot_product_attention "
                                 "over joint text+video tokens directly",
    "FusedCogVideoXAttnProcessor2_0": "CogVideoX (fused projections)",
}

_current = contextvars.ContextVar("liteattn_diffusers_layer", default=None)
_patch_lock = threading.Lock()
_patched = {}   # python module name -> [original dispatch_attention_fn, refcount]
_keys = itertools.count()


class LiteAttnProcessor:
    """Wraps a diffusers attention processor: while it runs, its dispatch_attention_fn call
    goes through liteattn (when the call is plain self-attention)."""

    def __init__(self, orig, state, layer):
        self.__dict__.update(orig=orig, state=state, layer=layer)

    def __getattr__(self, name):
        return getattr(self.__dict__["orig"], name)

    def __setattr__(self, name, value):
        if name in ("orig", "state", "layer"):
            self.__dict__[name] = value
        else:
            setattr(self.__dict__["orig"], name, value)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        text_len = 0
        if encoder_hidden_states is not None:
            if type(self.orig).__name__ not in _JOINT_TAIL:
                return self.orig(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
            text_len = int(encoder_hidden_states.shape[1])
        tok = _current.set((self.state, self.layer, text_len))
        try:
            return self.orig(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            _current.reset(tok)


_proc_classes = {}


def _make_processor(orig, state, layer):
    """A LiteAttnProcessor whose __call__ shows the signature of orig's (diffusers' legacy
    Attention drops keyword arguments the processor's signature does not name)."""
    oc = type(orig)
    cls = _proc_classes.get(oc)
    if cls is None:
        base_call = LiteAttnProcessor.__call__

        @functools.wraps(oc.__call__)
        def __call__(self, *args, **kwargs):
            return base_call(self, *args, **kwargs)
        cls = type("LiteAttnProcessor", (LiteAttnProcessor,),
                   {"__call__": __call__, "__module__": __name__, "__doc__": LiteAttnProcessor.__doc__})
        _proc_classes[oc] = cls
    return cls(orig, state, layer)


def _make_dispatch(orig):
    def dispatch_attention_fn(query, key, value, *args, **kwargs):
        cur = _current.get()
        if cur is not None and cur[2] and not args:
            out = _joint_tail(orig, cur, query, key, value, kwargs)
            if out is not None:
                return out
            cur[0].dense_calls += 1
            cur = None
        if cur is not None:
            state, layer, _ = cur
            plain = (not args and kwargs.get("attn_mask") is None
                     and not kwargs.get("dropout_p") and not kwargs.get("is_causal")
                     and not kwargs.get("enable_gqa")
                     and not kwargs.get("attention_kwargs")
                     and query.shape[1] == key.shape[1] and query.dim() == 4)
            sp = state.sequence_parallel(kwargs.get("parallel_config")) if plain else None
            if plain and sp is not False:
                if sp:
                    out = state.attend_sharded(layer, query, key, value, kwargs.get("scale"), sp)
                else:
                    out = state.attend(layer, query, key, value, kwargs.get("scale"))
                if out is not None:
                    return out
            state.dense_calls += 1
        return orig(query, key, value, *args, **kwargs)
    dispatch_attention_fn._liteattn_orig = orig
    return dispatch_attention_fn


def _key_prefix_length(state, mask, B, N):
    """Length L when the attention mask is a key-padding mask keeping keys [0, L) of every
    query row and batch row (HunyuanVideo's text padding), else None. Cached per mask object
    (one per transformer forward), as reading it syncs with the GPU."""
    cached = state.mask_cache
    if cached is not None and cached[0] is mask:
        return cached[1]
    L = None
    import torch
    m = mask
    if m.dtype == torch.bool and m.dim() == 4 and m.shape[0] == B and m.shape[-1] == N \
            and m.shape[1] == 1:
        rows = m[:, 0]
        if rows.shape[0] == B and (rows == rows[:, :1]).all().item():
            keep = rows[:, 0]                                   # [B, N]
            counts = keep.sum(dim=1)
            L0 = int(counts[0].item())
            if (counts == L0).all().item() and bool(keep[:, :L0].all().item()):
                L = L0
    state.mask_cache = (mask, L)
    return L


def _joint_tail(orig, cur, q, k, v, kwargs):
    """[video; text] joint attention: video query rows through liteattn with the text keys as
    a must-do range, text query rows dense; a key-padding mask is applied by cutting the keys.
    Returns None when the call cannot go this way (it then runs dense)."""
    state, layer, text_len = cur
    if (kwargs.get("dropout_p") or kwargs.get("is_causal") or kwargs.get("enable_gqa")
            or kwargs.get("parallel_config") is not None or kwargs.get("attention_kwargs")
            or q.dim() != 4 or q.shape[1] != k.shape[1] or state.parallel_spec is not None):
        return None
    B, S = int(q.shape[0]), int(q.shape[1])
    Sv = S - text_len
    if Sv <= 0:
        return None
    mask = kwargs.get("attn_mask")
    L = S
    if mask is not None:
        L = _key_prefix_length(state, mask, B, S)
        if L is None or L < Sv:
            state._warn_once("mask", "liteattn: an attention mask that is not a common key "
                             "prefix: those calls run dense")
            return None
    k, v = k[:, :L], v[:, :L]
    state.max_k_hint = S          # the uncond pass may keep more text keys than the cond one
    out_v = state.attend(layer, q[:, :Sv], k, v, kwargs.get("scale"),
                         must_do=((Sv, L),) if L > Sv else ())
    if out_v is None:
        return None
    rest = {n: kwargs[n] for n in ("scale", "backend") if n in kwargs}
    out_t = orig(q[:, Sv:], k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **rest)
    import torch
    return torch.cat([out_v, out_t.to(out_v.dtype)], dim=1)


def _patch_module(modname):
    with _patch_lock:
        ent = _patched.get(modname)
        if ent is not None:
            ent[1] += 1
            return
        mod = sys.modules[modname]
        orig = getattr(mod, "dispatch_attention_fn", None)
        if orig is None:
            raise NotSupported("%s has no dispatch_attention_fn to route through liteattn"
                               % modname)
        mod.dispatch_attention_fn = _make_dispatch(orig)
        _patched[modname] = [orig, 1]


def _unpatch_module(modname):
    with _patch_lock:
        ent = _patched.get(modname)
        if ent is None:
            return
        ent[1] -= 1
        if ent[1] == 0:
            sys.modules[modname].dispatch_attention_fn = ent[0]
            del _patched[modname]


_SCHEMES = ("ulysses", "ring", "hybrid")


def _parallel_option(parallel):
    """apply()'s parallel= as (mode "auto" | "off", ring options, explicit (scheme, group) or
    None)."""
    if parallel is None or parallel is False or parallel == "off":
        return "off", {}, None
    if parallel is True or parallel == "auto":
        return "auto", {}, None
    if isinstance(parallel, (tuple, list)):
        if len(parallel) != 2 or parallel[0] not in _SCHEMES:
            raise InvalidArgument("parallel=(scheme, group) takes a scheme of %s and its group"
                                  % (_SCHEMES,))
        return "auto", {}, (parallel[0], parallel[1])
    if isinstance(parallel, dict):
        opts = dict(parallel)
        unknown = set(opts) - {"scheme", "group", "ring_order", "carry_max"}
        if unknown:
            raise InvalidArgument("parallel= options: scheme, group, ring_order, carry_max; "
                                  "not %s" % sorted(unknown))
        scheme, group = opts.pop("scheme", None), opts.pop("group", None)
        if "ring_order" in opts:
            from .parallel import _check_order
            _check_order(opts["ring_order"])
        spec = None
        if scheme is not None:
            if scheme not in _SCHEMES:
                raise InvalidArgument("parallel scheme %r: use one of %s" % (scheme, _SCHEMES))
            spec = (scheme, group)
        return "auto", opts, spec
    raise InvalidArgument("parallel=%r: use 'auto', False, a dict or (scheme, group)"
                          % (parallel,))


def _scheme_of(parallel_config):
    """(scheme, group) of diffusers' ParallelConfig (or ContextParallelConfig) once set up, or
    False for what liteattn does not serve. diffusers shards the sequence over its flattened
    ("ring", "ulysses") mesh, index ring_rank * ulysses_degree + ulysses_rank: the hybrid's
    layout in liteattn.parallel."""
    cp = getattr(parallel_config, "context_parallel_config", parallel_config)
    if cp is None or not hasattr(cp, "ring_degree") or getattr(cp, "_mesh", None) is None:
        return False
    if getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False):
        return False
    r, u = int(cp.ring_degree), int(cp.ulysses_degree)
    if r > 1 and u > 1:
        return "hybrid", (cp._ulysses_mesh.get_group(), cp._ring_mesh.get_group())
    if r > 1:
        return "ring", cp._ring_mesh.get_group()
    return "ulysses", cp._ulysses_mesh.get_group()


def _timestep_position(module):
    import inspect
    try:
        names = list(inspect.signature(module.forward).parameters)
        return names.index("timestep")
    except (TypeError, ValueError):
        return 1


def _timestep_value(module, args, kwargs):
    t = kwargs.get("timestep")
    if t is None:
        pos = _timestep_position(module)
        if len(args) > pos:
            t = args[pos]
    if t is None:
        return None
    try:
        if hasattr(t, "flatten"):
            return float(t.flatten()[0].item())
        return float(t)
    except Exception:
        return None


class _State:
    """One apply(): the processors, the client, the current generation's session."""

    def __init__(self, pipe, transformers, threshold, socket, schedule, mode, max_branches,
                 log_steps, session_options, parallel="auto", warm=True, token_order=None):
        self.pipe = pipe
        self.token_order = token_order   # an order's name (liteattn.order), or None
        self.grid = None                 # the token grid of the running transformer call
        self.perms = {}                  # (grid, device) -> (perm, inverse) index tensors
        self.parallel_mode, self.parallel_opts, self.parallel_spec = _parallel_option(parallel)
        self.pctx = None          # liteattn.parallel.Context, for sharded calls
        self._sp_cache = {}       # id(diffusers parallel config) -> (config, (scheme, group))
        self.transformers = transformers
        self.threshold = threshold
        self.socket = socket
        self.schedule = schedule
        self.mode = mode
        self.max_branches = max_branches
        self.log_steps = log_steps
        self.session_options = session_options
        self.client = None
        self.session = None
        self.layers = []          # (attention module, original processor)
        self.modules = set()      # python modules patched
        self.hooks = []
        self.orig_class = None
        self.lock = threading.RLock()
        self.in_pipe_call = False
        self._reset_counters()
        self.generations = 0
        self.warned = set()
        self.mask_cache = None
        self.max_k_hint = 0
        self.warm = warm
        self.model_name = _model_name(pipe, transformers)
        self.steps = None   # num_inference_steps of the running pipe(...) call

    def _reset_counters(self):
        self.step = 0
        self.branch = 0
        self.last_t = None
        self.passes_this_step = 0
        self.dense_calls = 0
        self.lite_calls = 0
        self.ordered_calls = 0   # of lite_calls, those run in token_order
        self.t0 = time.perf_counter()
        self.step_tiles = (0, 0)

    # -- generation --
    def begin_generation(self):
        with self.lock:
            self.end_generation()
            self._reset_counters()
            self.generations += 1

    def end_generation(self):
        with self.lock:
            s, self.session = self.session, None
            if s is None and self.pctx is not None:
                s = self.pctx.session       # the sequence-parallel calls' session
            if s is None:
                return
            try:
                s.sync()  # the fast path's last replies: the figures, and their errors
            except Exception:
                try:
                    s.close()
                except Exception:
                    pass
                raise
            try:
                info = s.info()
                st = s.stats
                total, comp = st["tiles_total"], st["tiles_computed"]
                frac = comp / total if total else 1.0
                lf = info["live_fraction"]
                live = sum(lf) / max(1, len(lf))
                t_attn = st["compute_ns"] / 1e9
                saved = t_attn * (total / comp - 1.0) if comp else 0.0
                log.info("liteattn: generation done: %d steps, %d attention calls through "
                         "liteattn (%d dense elsewhere), %.1f%% of tiles computed, live "
                         "fraction at the end %.3f, attention compute %.2f s, about %.2f s "
                         "saved against dense (%.1f s wall); %s; guardrail restored %d rows",
                         self.step + 1, st["calls"], self.dense_calls, 100.0 * frac, live,
                         t_attn, saved, time.perf_counter() - self.t0,
                         s.warm["status"] or "no warm start", info.get("guard_restored", 0))
                self.last_summary = dict(steps=self.step + 1, calls=st["calls"],
                                         dense_calls=self.dense_calls, tiles_total=total,
                                         tiles_computed=comp, computed_fraction=frac,
                                         live_fraction=lf, compute_s=t_attn, saved_s=saved,
                                         warm=dict(s.warm),
                                         guard_checks=info.get("guard_checks", 0),
                                         guard_restored=info.get("guard_restored", 0),
                                         token_order=self.token_order,
                                         ordered_calls=self.ordered_calls)
            except Exception as e:  # never fail the user's generation over a summary
                log.debug("liteattn: summary failed: %s", e)
            try:
                if self.pctx is not None and s is self.pctx.session:
                    self.pctx.end_generation()
                else:
                    s.close()
            except Exception:
                pass

    def _log_step(self):
        s = self.session
        if s is None and self.pctx is not None:
            s = self.pctx.session
        if s is None or not self.log_steps:
            return
        total, comp = s.stats["tiles_total"], s.stats["tiles_computed"]
        t0, c0 = self.step_tiles
        if total > t0:
            log.info("liteattn: step %d: %.1f%% of attention tiles computed", self.step,
                     100.0 * (comp - c0) / (total - t0))
        self.step_tiles = (total, comp)

    # -- transformer forward hook: steps and branches --
    def on_forward(self, module, args, kwargs):
        with self.lock:
            self.mask_cache = None
            t = _timestep_value(module, args, kwargs)
            if self.last_t is None:
                self.passes_this_step = 0
            elif t is None or t != self.last_t:
                if (not self.in_pipe_call and t is not None and self.last_t is not None
                        and t > self.last_t):
                    self.begin_generation()   # bare transformer: timesteps went up again
                else:
                    self._log_step()
                    self.step += 1
                    self.passes_this_step = 0
            self.branch = self.passes_this_step
            self.passes_this_step += 1
            self.last_t = t
            if self.token_order is not None:
                self.grid = _token_grid(module, args, kwargs)
        return None

    # -- the attention itself --
    def _open(self, q, k):
        B, S, H, D = (int(x) for x in q.shape)
        if self.client is None or self.client.closed:
            self.client = Client(self.socket)
        key = "diffusers-%d-%d-%d" % (os.getpid(), next(_keys), self.generations)
        dtype = str(q.dtype).replace("torch.", "")
        opts = dict(self.session_options)
        sq = opts.pop("max_seq_q", S)
        sk = opts.pop("max_seq_k", max(int(k.shape[1]), self.max_k_hint))
        nb = opts.pop("batch", B)
        if self.warm and "warm_key" not in opts:
            opts["warm_key"] = self.warm if isinstance(self.warm, str) else warm_key(
                self.model_name, layers=len(self.layers), batch=nb, seq_q=sq, seq_k=sk,
                heads=H, head_dim=D, dtype=dtype, steps=self.steps,
                extra="branches%d:%s%s" % (self.max_branches, threshold_tag(
                    self.threshold, self.schedule, profile=opts.get("profile")),
                    ":order=%s" % self.token_order if self.token_order else ""))
        self.session = self.client.open_session_for(
            q, key, layers=len(self.layers), heads=H, head_dim=D, dtype=dtype,
            max_seq_q=sq, max_seq_k=sk, batch=nb, kv_shards=self.max_branches,
            threshold=self.threshold, schedule=self.schedule, mode=self.mode, **opts)
        log.debug("liteattn: opened %r", self.session)

    def _warn_once(self, what, msg, *a):
        if what not in self.warned:
            self.warned.add(what)
            log.warning(msg, *a)

    # -- sequence parallelism --
    def sequence_parallel(self, parallel_config):
        """How a plain self-attention call runs: None (on this rank alone), (scheme, group)
        (a sequence shard: through liteattn.parallel), or False (leave it to diffusers)."""
        if self.parallel_spec is not None:
            return self.parallel_spec
        if parallel_config is None:
            return None
        if self.parallel_mode == "off":
            return False
        hit = self._sp_cache.get(id(parallel_config))
        if hit is not None and hit[0] is parallel_config:
            return hit[1]
        sp = _scheme_of(parallel_config)
        if sp is False:
            self._warn_once("cp", "liteattn: diffusers' context parallelism in a mode liteattn "
                            "does not serve (unequal shards, or no context-parallel config): "
                            "those calls run dense")
        self._sp_cache[id(parallel_config)] = (parallel_config, sp)
        return sp

    def attend_sharded(self, layer, q, k, v, scale, sp, must_do=()):
        """A sequence shard's self-attention through liteattn.parallel (sp: (scheme, group));
        None: run it dense (the same answer on every rank)."""
        from . import parallel
        if self.token_order is not None:
            self._warn_once("order-sp", "liteattn: token_order=%r does not combine with sequence "
                            "parallelism; the sharded calls keep the model's order",
                            self.token_order)
        with self.lock:
            step, branch = self.step, self.branch
        if branch >= self.max_branches:
            self._warn_once("branch", "liteattn: more than %d transformer passes per step; "
                            "the extra passes run dense (apply(..., max_branches=N))",
                            self.max_branches)
            return None
        with self.lock:
            if self.pctx is None:
                opts = dict(self.session_options)
                self.pctx = parallel.Context(
                    self.socket, layers=len(self.layers), max_branches=self.max_branches,
                    threshold=self.threshold, schedule=self.schedule, mode=self.mode,
                    **self.parallel_opts, **opts)
            ctx = self.pctx
        scheme, group = sp
        fn = {"ulysses": parallel.ulysses_attention, "ring": parallel.ring_attention,
              "hybrid": parallel.hybrid_attention}[scheme]
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = fn(q, k, v, group, layer=layer, step=step, context=ctx, scale=scale,
                 branch=branch, must_do=must_do)
        self.lite_calls += 1
        return out

    def attend(self, layer, q, k, v, scale, must_do=()):
        with self.lock:
            if self.session is None:
                self._open(q, k)
            s = self.session
            step, branch = self.step, self.branch
        B, S = int(q.shape[0]), int(q.shape[1])
        if branch >= s.kv_shards:
            self._warn_once("branch", "liteattn: more than %d transformer passes per step; "
                            "the extra passes run dense (apply(..., max_branches=N))",
                            s.kv_shards)
            return None
        if B > s.batch or S > s.max_seq_q or int(k.shape[1]) > s.max_seq_k:
            self._warn_once("size", "liteattn: a call of batch %d, length %d exceeds the "
                            "session's (%d, %d); it runs dense", B, S, s.batch, s.max_seq_q)
            return None
        order = self._order_for(q, k, must_do)
        if order is not None:   # gathered copies, contiguous
            perm, inv = order
            q, k, v = (x.index_select(1, perm) for x in (q, k, v))
        elif q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = s.attention(layer, step, q, k, v, kv_shard=branch, scale=scale, must_do=must_do)
        self.lite_calls += 1
        if order is not None:
            self.ordered_calls += 1
            out = out.index_select(1, order[1])
        return out

    def _order_for(self, q, k, must_do):
        """(perm, inverse) on q's device when this call runs in token_order, else None."""
        if self.token_order is None:
            return None
        with self.lock:
            grid = self.grid
        S = int(q.shape[1])
        if grid is None or S != grid[0] * grid[1] * grid[2] or int(k.shape[1]) != S or must_do:
            self._warn_once("order-grid", "liteattn: a self-attention call of %d tokens is not "
                            "the video token grid %s (or has must-do keys); such calls keep the "
                            "model's order (token_order=%r)", S,
                            "x".join(map(str, grid)) if grid else "(unknown)", self.token_order)
            return None
        key = (grid, str(q.device))
        hit = self.perms.get(key)
        if hit is None:
            import torch
            try:
                p = _order.token_order(grid, self.token_order)
            except ValueError as e:
                raise InvalidArgument("token_order: %s" % e) from None
            inv = _order.inverse(p)   # p is not None: "raster" is never stored
            hit = self.perms[key] = (torch.from_numpy(p).to(q.device),
                                     torch.from_numpy(inv).to(q.device))
        return hit


def _token_grid(module, args, kwargs):
    """The video token grid (frames, height, width after patching) of a transformer call:
    from a 5-D hidden_states (B, C, F, H, W) and the config's patch size (Wan: (1, 2, 2);
    HunyuanVideo: patch_size, patch_size_t), or from LTX-Video's num_frames, height and width
    (the latent's sides, its tokens already patched by the config's patch sizes). None when
    neither is there."""
    cfg = getattr(module, "config", None)
    hs = kwargs.get("hidden_states", args[0] if args else None)
    shape = getattr(hs, "shape", None)
    if shape is None:
        return None
    p = getattr(cfg, "patch_size", None)
    pt = getattr(cfg, "patch_size_t", None) or 1
    if isinstance(p, (tuple, list)) and len(p) == 3:
        pt, ph, pw = (int(x) for x in p)
    elif isinstance(p, int):
        ph = pw = p
    else:
        ph = pw = 1
    if len(shape) == 5:
        f, h, w = (int(x) for x in shape[2:])
    elif len(shape) == 3 and all(kwargs.get(n) for n in ("num_frames", "height", "width")):
        f, h, w = (int(kwargs[n]) for n in ("num_frames", "height", "width"))   # LTX-Video
    else:
        return None
    if min(pt, ph, pw) < 1 or f % pt or h % ph or w % pw:
        return None
    return (f // pt, h // ph, w // pw)


def _model_name(pipe, transformers):
    """The name a warm key carries: the pipeline's or transformer's _name_or_path (the hub id or
    folder it was loaded from), else the transformer's class name."""
    for obj in [pipe] + list(transformers):
        cfg = getattr(obj, "config", None)
        name = getattr(cfg, "_name_or_path", None) if cfg is not None else None
        if not name and isinstance(cfg, dict):
            name = cfg.get("_name_or_path")
        if name:
            return str(name)
    return type(transformers[0]).__name__ if transformers else type(pipe).__name__


def _default_steps(cls):
    import inspect
    try:
        p = inspect.signature(cls.__call__).parameters.get("num_inference_steps")
        if p is not None and isinstance(p.default, int):
            return p.default
    except (TypeError, ValueError):
        pass
    return None


def _transformers_of(pipe):
    import torch
    if isinstance(pipe, torch.nn.Module):
        return [pipe]
    ts = [getattr(pipe, n, None) for n in ("transformer", "transformer_2")]
    ts = [t for t in ts if t is not None]
    if not ts:
        raise InvalidArgument("%s has no transformer" % type(pipe).__name__)
    return ts


def _self_attention_modules(transformer):
    """(name, module) of every attention module whose processor liteattn can serve."""
    found, unsupported = [], set()
    for name, mod in transformer.named_modules():
        proc = getattr(mod, "processor", None)
        if proc is None or not callable(proc):
            continue
        cls = type(proc).__name__
        if cls in _UNSUPPORTED:
            unsupported.add(cls)
            continue
        if cls not in _SUPPORTED:
            continue
        if getattr(mod, "is_cross_attention", False) or name.endswith("attn2"):
            continue
        found.append((name, mod))
    if not found:
        why = "; ".join("%s (%s)" % (c, _UNSUPPORTED[c]) for c in sorted(unsupported))
        raise NotSupported(
            "liteattn.diffusers: no supported self-attention processor in %s%s. Supported: "
            "Wan (WanAttnProcessor), LTX-Video (LTXVideoAttnProcessor) and HunyuanVideo "
            "(HunyuanVideoAttnProcessor2_0)."
            % (type(transformer).__name__, (": " + why) if why else ""))
    return found


def _set_processor(mod, proc):
    if hasattr(mod, "set_processor"):
        mod.set_processor(proc)
    else:
        mod.processor = proc


def apply(pipe, threshold=-3.0, *, socket=None, schedule=None, mode="skip", max_branches=2,
          log_steps=True, profile=None, parallel="auto", warm=True, token_order=None,
          **session_options):
    """Routes the video self-attention of `pipe` (a diffusers pipeline, or a transformer model)
    through liteattn. threshold: tau in log2 units (-inf: exact, nothing skipped); schedule:
    per-step thresholds; mode: "skip", "observe" or "dense"; max_branches: transformer passes
    per step with separate masks (2 covers classifier-free guidance as two passes);
    socket: the daemon's socket (None: default). Extra keywords go to open_session (max_seq_q,
    batch, device, direction; warm_step, warm_generations, warm_margin, warm_dense_steps;
    guard_every, guard_sample, guard_budget). profile: a calibrated profile
    (liteattn-calibrate's file): its per-step schedule and per-layer thresholds.
    parallel: sequence parallelism (see the module's help). "auto" (default): calls that come
    with diffusers' context-parallel config go through liteattn.parallel over its groups;
    False: they stay on diffusers' own attention; a dict: as "auto" with ring options
    (ring_order "ring" or "global", carry_max), or with scheme ("ulysses", "ring", "hybrid")
    and group (a process group, or (ulysses_group, ring_group) / a 2D DeviceMesh for the
    hybrid) for a transformer split by other code; a tuple (scheme, group) likewise. Every rank
    must apply() alike. warm: True (the default: a warm key from the model's name, geometry,
    step count and thresholds), False (every generation starts from all ones) or a warm key of
    your own. token_order: run each video self-attention call in another order of its tokens
    (liteattn.order: "zorder", "morton:PATTERN" such as "morton:ttthw", "blocks:bt,bh,bw"; None
    or "raster": the model's own), so that a tile is a compact brick of the video and more
    tiles are skipped at the same threshold; the token grid (frames, height, width after
    patching) is read from each transformer call (Wan, LTX-Video); calls whose tokens are not
    that grid (HunyuanVideo's joint text tokens) or that are sequence shards keep the model's
    order. Returns pipe."""
    if not isinstance(warm, (bool, str)):
        raise InvalidArgument("warm must be True, False or a warm key (str), got %r" % (warm,))
    try:
        _order.check_name(token_order)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    if profile is not None:
        session_options["profile"] = profile
    if getattr(pipe, "_liteattn_state", None) is not None:
        raise InvalidArgument("liteattn is already applied to this pipeline; remove() first")
    transformers = _transformers_of(pipe)
    state = _State(pipe, transformers, threshold, socket, schedule, mode, max_branches,
                   log_steps, session_options, parallel, warm=warm,
                   token_order=None if token_order in (None, "", "raster") else token_order)
    found = []
    for t in transformers:
        found += _self_attention_modules(t)
    try:
        for i, (name, mod) in enumerate(found):
            orig = mod.processor
            modname = type(orig).__module__
            _patch_module(modname)
            state.modules.add(modname)
            state.layers.append((mod, orig))
            _set_processor(mod, _make_processor(orig, state, i))
        for t in transformers:
            state.hooks.append(t.register_forward_pre_hook(state.on_forward, with_kwargs=True))
    except Exception:
        _undo(state)
        raise
    import torch
    if not isinstance(pipe, torch.nn.Module):
        orig_cls = type(pipe)

        def __call__(self, *args, **kwargs):
            st = self.__dict__.get("_liteattn_state")
            if st is None:
                return orig_cls.__call__(self, *args, **kwargs)
            st.begin_generation()
            st.steps = kwargs.get("num_inference_steps", _default_steps(orig_cls))
            st.in_pipe_call = True
            try:
                return orig_cls.__call__(self, *args, **kwargs)
            finally:
                st.in_pipe_call = False
                st.end_generation()

        sub = type(orig_cls.__name__, (orig_cls,), {"__call__": __call__,
                                                    "__module__": orig_cls.__module__})
        pipe.__class__ = sub
        state.orig_class = orig_cls
    object.__setattr__(pipe, "_liteattn_state", state)
    log.info("liteattn: %d self-attention layers of %s go through liteattn (threshold %g)",
             len(found), ", ".join(type(t).__name__ for t in transformers), threshold)
    return pipe


def _undo(state):
    for mod, orig in state.layers:
        _set_processor(mod, orig)
    state.layers = []
    for modname in state.modules:
        _unpatch_module(modname)
    state.modules = set()
    for h in state.hooks:
        h.remove()
    state.hooks = []


def new_generation(pipe):
    """Begins a new generation (fresh masks) for a pipeline or transformer given to apply();
    pipe(...) calls do this by themselves."""
    st = getattr(pipe, "_liteattn_state", None)
    if st is None:
        raise InvalidArgument("liteattn is not applied to this object")
    st.begin_generation()


def summary(pipe):
    """The last generation's summary dict (steps, calls, computed_fraction, live_fraction,
    compute_s, saved_s, warm, guard_checks, guard_restored, token_order, ordered_calls), or
    None."""
    st = getattr(pipe, "_liteattn_state", None)
    return getattr(st, "last_summary", None) if st is not None else None


def remove(pipe):
    """Restores the original processors and closes the session and the connection."""
    st = getattr(pipe, "_liteattn_state", None)
    if st is None:
        return pipe
    st.end_generation()
    _undo(st)
    if st.orig_class is not None:
        pipe.__class__ = st.orig_class
    if st.client is not None:
        st.client.close()
    if st.pctx is not None:
        st.pctx.close()
    try:
        object.__delattr__(pipe, "_liteattn_state")
    except AttributeError:
        pass
    return pipe
