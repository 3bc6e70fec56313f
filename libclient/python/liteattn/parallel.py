"""Sequence parallelism: liteattn inside torch.distributed (Ulysses, ring, both).

Each rank holds one shard of the sequence, q, k, v of shape [B, S/W, H, D], and calls one of

    out = ulysses_attention(q, k, v, group, layer=i, step=t)          # all-to-all over heads
    out = ring_attention(q, k, v, group, layer=i, step=t)             # K/V shards round a ring
    out = hybrid_attention(q, k, v, (ulysses_group, ring_group), layer=i, step=t)

in place of the attention of one layer; out is this rank's shard of the output, [B, S/W, H, D]
(with return_lse=True also lse [B, H, S/W], float32, natural log). Every rank talks to the
daemon of its own host through a Context (one daemon session per rank and generation; its
masks belong to that rank). Only torch.distributed collectives move data: all_to_all_single for
Ulysses, isend/irecv for the ring (gloo on CPU, NCCL on GPU).

Sequence order. Shard i of the global sequence is held by the rank of index i in the group (for
the hybrid: index ring_rank * ulysses_degree + ulysses_rank). All shards have the same length
(pad the sequence and give the padding as a must-skip range if it does not divide).

must_do / must_skip are half-open key ranges in GLOBAL token positions (or the reference's flat
descending list); each daemon call receives them translated to its own keys.

Masks. The mask key of a call is (layer, slot) with slot = branch * ring_degree + kv_shard
(see docs/PARALLEL.md): Ulysses has one slot per branch, ring and hybrid one per K/V shard and
branch. Context.mask(layer, kv_shard, branch) reads one.

Ring skipping. The ring's daemon calls carry row maxima from hop to hop (SKIP-SEMANTICS
"Carried row maxima"; Context(carry_max=True), the default), so a K/V shard's votes compare
against every shard already visited, not against its own maximum alone. Two visiting orders:
ring_order="ring" (default: own shard first, then the one before, ..., K/V passed round the
ring with isend/irecv under the compute) and "global" (the shards in the single process's
direction for the step, each broadcast by its owner, the next one in flight under the compute):
with shards that are whole tiles the global order skips exactly the tiles one process skips.
"""
import itertools
import math
import os
import threading

from .errors import InvalidArgument
from .module import _ContextBase, convert_must_list

__all__ = ["Context", "default_context", "ulysses_attention", "ring_attention",
           "hybrid_attention", "hybrid_groups", "shard_index", "SequenceParallelAttention",
           "merge_partials"]

_keys = itertools.count()


def _dist():
    import torch.distributed as dist
    return dist


def _torch():
    import torch
    return torch


# ---- the per-rank session -------------------------------------------------------------------

class Context(_ContextBase):
    """One per model and rank: the daemon client and the current generation's session.

    session_kwargs go to Client.open_session (threshold, schedule, mode, direction, device,
    profile, and sizes: max_seq_q, max_seq_k, batch). layers: how many layers the session
    holds (default: the number of SequenceParallelAttention instances registered, at least 1;
    give it when you call the functions with your own layer indices). max_branches: how many
    passes per step get their own masks (classifier-free guidance: 2).
    carry_max: ring and hybrid calls carry row maxima from K/V shard to K/V shard (default
    True; False: each shard's votes see its own maximum only, as before). ring_order: "ring"
    (default, own shard first, K/V passed round the ring) or "global" (the single process's
    shard order, K/V broadcast; the same skips as one process on tile-aligned shards).
    """

    def __init__(self, socket=None, *, layers=None, max_branches=1, carry_max=True,
                 ring_order="ring", **session_kwargs):
        super().__init__(socket, session_kwargs)
        self.layers = layers
        self.max_branches = int(max_branches)
        if self.max_branches < 1:
            raise InvalidArgument("max_branches must be at least 1")
        self.carry_max = bool(carry_max)
        self.ring_order = _check_order(ring_order)
        self._geometry = None     # (heads, head_dim, dtype, ring_degree) the session has
        self._modules = []

    @property
    def ring_degree(self):
        """Number of K/V shards per branch in the session's slot layout (None before it)."""
        return None if self._geometry is None else self._geometry[3]

    def register(self, module):
        with self._lock:
            self._modules.append(module)
            return len(self._modules) - 1

    def new_generation(self):
        """Closes the current session; the next call opens a fresh one (all masks dense) and
        the step counters of registered modules start at 0."""
        with self._lock:
            self.end_generation()
            self._generation += 1
            for m in self._modules:
                m._step, m._last_branch = 0, None

    def end_generation(self):
        with self._lock:
            s, self._session, self._geometry = self._session, None, None
            if s is not None and not s.closed:
                try:
                    s.close()
                except Exception:
                    pass

    def slot(self, kv_shard=0, branch=0):
        ring = self.ring_degree or 1
        if not 0 <= kv_shard < ring or not 0 <= branch < self.max_branches:
            raise InvalidArgument("kv_shard %d / branch %d out of range (%d shards, %d branches)"
                                  % (kv_shard, branch, ring, self.max_branches))
        return branch * ring + kv_shard

    def mask(self, layer, kv_shard=0, branch=0):
        """This rank's packed live mask of (layer, kv_shard, branch) (see Session.mask)."""
        if self._session is None:
            return None
        return self._session.mask(layer, kv_shard=self.slot(kv_shard, branch))

    def _session_for(self, q, k, ring_degree):
        """The session for local calls with q [B, Sq, h, D], k [B, Sk, h, D] (h: the heads this
        rank computes) and ring_degree K/V shards; opened at the first call."""
        B, Sq, H, D = (int(x) for x in q.shape)
        Sk = int(k.shape[1])
        geom = (H, D, str(q.dtype), int(ring_degree))
        with self._lock:
            if self._session is None:
                kw = dict(self.session_kwargs)
                layers = self.layers or max(1, len(self._modules))
                dtype = str(q.dtype).replace("torch.", "")
                rank = _dist().get_rank() if _dist().is_initialized() else 0
                key = "liteattn-sp-r%d-%d-%d-%d-%d" % (rank, os.getpid(), id(self),
                                                       self._generation, next(_keys))
                self._session = self.client.open_session_for(
                    q, key, layers=layers, heads=H, head_dim=D, dtype=dtype,
                    max_seq_q=kw.pop("max_seq_q", Sq), max_seq_k=kw.pop("max_seq_k", Sk),
                    batch=kw.pop("batch", B), kv_shards=self.max_branches * int(ring_degree),
                    **kw)
                self._geometry = geom
            elif self._geometry != geom:
                raise InvalidArgument(
                    "this generation's session was opened for (heads %d, head dim %d, %s, "
                    "ring degree %d) per rank; a call with (%d, %d, %s, %d) needs a new "
                    "generation or another Context" % (self._geometry + geom))
            return self._session


_default = None
_default_lock = threading.Lock()


def default_context():
    """The context the functions use unless given one (separate from liteattn's module
    context: its sessions have the slot layout of the parallel schemes)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Context()
        return _default


# ---- groups and positions -------------------------------------------------------------------

_NO_GROUP = object()   # "no communication": one call (Ulysses' local attention)


def _size_rank(group):
    dist = _dist()
    if group is _NO_GROUP or (group is None and not dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _global(group, group_rank):
    dist = _dist()
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _hybrid_pair(groups):
    """(ulysses_group, ring_group) from a tuple or a 2D DeviceMesh with dims named 'ulysses'
    and 'ring'."""
    if hasattr(groups, "get_group"):
        names = tuple(getattr(groups, "mesh_dim_names", None) or ())
        if "ulysses" not in names or "ring" not in names:
            raise InvalidArgument("a DeviceMesh for hybrid_attention needs dims named "
                                  "'ulysses' and 'ring' (got %s)" % (names,))
        return groups.get_group("ulysses"), groups.get_group("ring")
    try:
        ug, rg = groups
    except (TypeError, ValueError):
        raise InvalidArgument("hybrid_attention takes (ulysses_group, ring_group) or a 2D "
                              "DeviceMesh") from None
    return ug, rg


def hybrid_groups(ulysses_degree, ring_degree, ranks=None):
    """Builds the groups of a Ulysses x ring layout over `ranks` (default: the whole world,
    whose size must be ulysses_degree * ring_degree) and returns this rank's
    (ulysses_group, ring_group). Rank i of the list holds sequence shard i; its Ulysses
    group is the u consecutive ranks of its ring chunk, its ring group the ranks of the same
    Ulysses index. Every rank must call it (new_group is collective)."""
    dist = _dist()
    u, r = int(ulysses_degree), int(ring_degree)
    ranks = list(range(dist.get_world_size())) if ranks is None else list(ranks)
    if u < 1 or r < 1 or u * r != len(ranks):
        raise InvalidArgument("ulysses_degree %d x ring_degree %d != %d ranks"
                              % (u, r, len(ranks)))
    me = dist.get_rank()
    mine_u = mine_r = None
    for c in range(r):
        g = dist.new_group([ranks[c * u + p] for p in range(u)])
        if me in ranks[c * u:(c + 1) * u]:
            mine_u = g
    for p in range(u):
        members = [ranks[c * u + p] for c in range(r)]
        g = dist.new_group(members)
        if me in members:
            mine_r = g
    return mine_u, mine_r


def shard_index(scheme, group=None):
    """(index, count): which shard of the global sequence this rank holds under `scheme`
    ('ulysses', 'ring', or 'hybrid' with group = (ulysses_group, ring_group) or a mesh)."""
    if scheme == "hybrid":
        ug, rg = _hybrid_pair(group)
        u, pu = _size_rank(ug)
        r, pr = _size_rank(rg)
        return pr * u + pu, u * r
    if scheme not in ("ulysses", "ring"):
        raise InvalidArgument("scheme %r: use 'ulysses', 'ring' or 'hybrid'" % (scheme,))
    n, i = _size_rank(group)
    return i, n


def _check_order(order):
    if order not in ("ring", "global"):
        raise InvalidArgument("ring_order %r: use 'ring' (own shard first) or 'global' (the "
                              "single process's shard order)" % (order,))
    return order


def _descending(ctx, step):
    """Whether the daemon visits k-tiles in descending order at this step (the session's
    direction; alternate: descending on even steps)."""
    d = ctx.session_kwargs.get("direction")
    if d in ("ascending", "descending"):
        return d == "descending"
    return step % 2 == 0


def _local_ranges(ranges, offset, length):
    """Global half-open key ranges -> the ranges of keys [offset, offset + length), shifted."""
    out = []
    for a, b in ranges:
        a, b = max(int(a) - offset, 0), min(int(b) - offset, length)
        if a < b:
            out.append((a, b))
    return tuple(out)


def _covered(ranges, length):
    """True when the half-open ranges cover [0, length)."""
    end = 0
    for a, b in sorted(ranges):
        if a > end:
            return False
        end = max(end, b)
    return end >= length


# ---- Ulysses: sequence shards <-> head groups -----------------------------------------------

def _seq_to_heads(x, group, P):
    """[N, B, Sl, H, D] sequence shards on P ranks -> [N, B, P*Sl, H/P, D]: the whole sequence
    of this rank's head group (group rank p keeps heads [p*H/P, (p+1)*H/P))."""
    torch = _torch()
    N, B, Sl, H, D = x.shape
    send = x.reshape(N, B, Sl, P, H // P, D).permute(3, 0, 1, 2, 4, 5).contiguous()
    recv = torch.empty_like(send)
    _dist().all_to_all_single(recv, send, group=group)
    # recv[p]: shard p of the sequence, our heads
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(N, B, P * Sl, H // P, D)


def _heads_to_seq(o, group, P):
    """[B, P*Sl, H/P, D] (our heads, whole sequence) -> [B, Sl, H, D] (our shard, all heads)."""
    torch = _torch()
    B, S, Hp, D = o.shape
    Sl = S // P
    send = o.reshape(B, P, Sl, Hp, D).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    _dist().all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, Sl, P * Hp, D)


def _lse_heads_to_seq(lse, group, P):
    """[B, H/P, P*Sl] -> [B, H, Sl]."""
    torch = _torch()
    B, Hp, S = lse.shape
    Sl = S // P
    send = lse.reshape(B, Hp, P, Sl).permute(2, 0, 1, 3).contiguous()
    recv = torch.empty_like(send)
    _dist().all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3).reshape(B, P * Hp, Sl)


def _scatter_heads(q, k, v, group, P):
    H = int(q.shape[2])
    if H % P:
        raise InvalidArgument("Ulysses over %d ranks needs a head count divisible by %d; "
                              "got %d heads" % (P, P, H))
    torch = _torch()
    if q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype:
        x = _seq_to_heads(torch.stack((q, k, v)), group, P)
        return x[0], x[1], x[2]
    qq = _seq_to_heads(q.unsqueeze(0), group, P)[0]
    kv = _seq_to_heads(torch.stack((k, v)), group, P)
    return qq, kv[0], kv[1]


# ---- merging partial results by LSE ---------------------------------------------------------

def merge_partials(acc, part):
    """Merges two partial attention results over disjoint key sets, (o [B, Sq, H, D],
    lse [B, H, Sq]) each, in float32: lse = log(e^lse1 + e^lse2), o = sum of o_i e^(lse_i - lse).
    A part with lse = -inf (no keys) contributes nothing. Either may be None."""
    torch = _torch()
    if part is None:
        return acc
    if acc is None:      # rows without keys: o = 0 whatever the call wrote there
        lse0 = part[1].float()
        return (torch.where(torch.isneginf(lse0).transpose(1, 2).unsqueeze(-1),
                            torch.zeros((), dtype=torch.float32, device=lse0.device),
                            part[0].float()), lse0)
    (o1, l1), (o2, l2) = acc, part
    o2, l2 = o2.float(), l2.float()
    lse = torch.logaddexp(l1, l2)
    dead = torch.isneginf(lse)
    safe = torch.where(dead, torch.zeros_like(lse), lse)
    w1 = torch.where(dead | torch.isneginf(l1), torch.zeros_like(lse), torch.exp(l1 - safe))
    w2 = torch.where(dead | torch.isneginf(l2), torch.zeros_like(lse), torch.exp(l2 - safe))
    w1 = w1.transpose(1, 2).unsqueeze(-1)     # [B, Sq, H, 1]
    w2 = w2.transpose(1, 2).unsqueeze(-1)
    zero = torch.zeros((), dtype=torch.float32, device=o1.device)
    o = torch.where(w1 > 0, o1 * w1, zero) + torch.where(w2 > 0, o2 * w2, zero)
    return o, lse


# ---- the ring core (ring degree 1: one call) ------------------------------------------------

def _ring(q, k, v, group, ctx, layer, step, threshold, mode, must_do, must_skip, scale, branch,
          need_lse, carry_max=None, ring_order=None):
    """Attention of local queries q over the K/V shards of `group`, shard index = group rank,
    each of k's length. Returns (o in q's dtype, lse float32 or None)."""
    torch = _torch()
    dist = _dist()
    P, me = _size_rank(group)
    s = ctx._session_for(q, k, P)
    Lk = int(k.shape[1])
    if not 0 <= branch < ctx.max_branches:
        raise InvalidArgument("branch %d: this context keeps %d branch(es) (max_branches)"
                              % (branch, ctx.max_branches))
    carry = ctx.carry_max if carry_max is None else bool(carry_max)
    order = ctx.ring_order if ring_order is None else _check_order(ring_order)
    # Carried row maxima [B, H, Sq], raw-score units: -inf before the first hop, then every
    # hop's call reads and updates them in place (SKIP-SEMANTICS "Carried row maxima").
    rmax = (torch.full((q.shape[0], q.shape[2], q.shape[1]), -math.inf, dtype=torch.float32,
                       device=q.device) if carry and P > 1 else None)

    def call(kk, vv, src, lse):
        off = src * Lk
        mdo = _local_ranges(must_do, off, Lk)
        msk = _local_ranges(must_skip, off, Lk)
        if msk and not mdo and _covered(msk, Lk):
            return None        # every key of this shard is must-skip: nothing to compute
        return s.attention(layer, step, q, kk, vv, threshold=threshold, mode=mode,
                           must_do=mdo, must_skip=msk, scale=scale,
                           kv_shard=branch * P + src, return_lse=lse, row_max=rmax)

    if P == 1:
        res = call(k, v, 0, need_lse)
        if res is None:
            o = torch.zeros_like(q)
            lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), -math.inf,
                             dtype=torch.float32, device=q.device)
            return o, (lse if need_lse else None)
        return res if need_lse else (res, None)

    kv = torch.stack((k, v)).contiguous()     # one message per hop: [2, B, Lk, H, D]
    if order == "global":
        return _ring_global(q, kv, group, P, me, call, _descending(ctx, step))
    nxt, prv = _global(group, (me + 1) % P), _global(group, (me - 1) % P)
    acc = None
    for j in range(P):
        src = (me - j) % P
        reqs, recv = [], None
        if j < P - 1:      # pass our current shard on while we compute with it
            recv = torch.empty_like(kv)
            # one batch, so that NCCL pairs the send and the receive (P = 2: same peer)
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, nxt, group),
                                           dist.P2POp(dist.irecv, recv, prv, group)])
        part = call(kv[0], kv[1], src, True)
        acc = merge_partials(acc, part)
        for r in reqs:
            r.wait()
        if recv is not None:
            kv = recv
    return _ring_result(acc, q)


def _ring_result(acc, q):
    """The ring's (O, LSE): the merged partials, O in q's dtype; with no partial at all, O zero
    and LSE -inf (no key was visited)."""
    torch = _torch()
    if acc is None:
        acc = (torch.zeros(q.shape, dtype=torch.float32, device=q.device),
               torch.full((q.shape[0], q.shape[2], q.shape[1]), -math.inf,
                          dtype=torch.float32, device=q.device))
    return acc[0].to(q.dtype), acc[1]


def _ring_global(q, kv, group, P, me, call, descending):
    """The ring in the single process's shard order: shard src is broadcast by its owner (the
    next one in flight while this one is computed), so every rank visits the shards in the
    same order, the order of one process's k-tiles."""
    torch = _torch()
    dist = _dist()
    srcs = list(range(P - 1, -1, -1)) if descending else list(range(P))
    spare = []        # receive buffers not in use (two at most)

    def issue(src):
        buf = kv if src == me else (spare.pop() if spare else torch.empty_like(kv))
        return buf, dist.broadcast(buf, _global(group, src), group=group, async_op=True)

    acc = None
    pending = issue(srcs[0])
    for i, src in enumerate(srcs):
        buf, work = pending
        work.wait()
        if i + 1 < P:
            pending = issue(srcs[i + 1])
        acc = merge_partials(acc, call(buf[0], buf[1], src, True))
        if buf is not kv:
            spare.append(buf)
    return _ring_result(acc, q)


def _prepare(q, k, v, groups, must_do, must_skip, context):
    ctx = context or default_context()
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise InvalidArgument("%s has shape %s; expected 4 dims (B, S/W, H, D)"
                                  % (name, tuple(x.shape)))
    if ctx.session is None:     # first call of a generation: all shards alike?
        for g in groups:
            _check_alike(q, k, g)
    return convert_must_list(must_do), convert_must_list(must_skip), ctx


def _check_alike(q, k, group):
    """Every rank of the group has the same q and k shapes (an all_gather of 8 numbers), so
    that unequal shards fail with a message on every rank instead of hanging a collective."""
    P, _ = _size_rank(group)
    if P == 1:
        return
    torch = _torch()
    mine = torch.tensor([int(d) for d in tuple(q.shape) + tuple(k.shape)], dtype=torch.int64,
                        device=q.device)
    every = [torch.empty_like(mine) for _ in range(P)]
    _dist().all_gather(every, mine, group=group)
    shapes = {tuple(int(d) for d in t.tolist()) for t in every}
    if len(shapes) > 1:
        raise InvalidArgument("the ranks' shards differ (q and k shapes %s): every rank needs "
                              "the same shard length; pad the sequence and give the padding "
                              "as a must_skip range" % sorted(shapes))


def ulysses_attention(q, k, v, group=None, *, layer=0, step=0, context=None, threshold=None,
                      mode=None, must_do=(), must_skip=(), scale=None, branch=0,
                      return_lse=False):
    """Ulysses sequence parallelism: an all-to-all turns this rank's sequence shard of all
    heads into the whole sequence of H/P heads, one daemon call computes them (mask key
    (layer, branch): the masks are those of a single-process call, for this rank's heads),
    and a second all-to-all brings the output back to the shard. q, k, v: [B, S/P, H, D];
    returns out [B, S/P, H, D] or (out, lse [B, H, S/P])."""
    must_do, must_skip, ctx = _prepare(q, k, v, (group,), must_do, must_skip, context)
    P, _ = _size_rank(group)
    if P == 1:
        return _result(*_ring(q, k, v, _NO_GROUP, ctx, layer, step, threshold, mode, must_do,
                              must_skip, scale, branch, return_lse), return_lse)
    qh, kh, vh = _scatter_heads(q, k, v, group, P)
    o, lse = _ring(qh, kh, vh, _NO_GROUP, ctx, layer, step, threshold, mode, must_do, must_skip,
                   scale, branch, return_lse)
    out = _heads_to_seq(o, group, P)
    return _result(out, _lse_heads_to_seq(lse, group, P) if return_lse else None, return_lse)


def ring_attention(q, k, v, group=None, *, layer=0, step=0, context=None, threshold=None,
                   mode=None, must_do=(), must_skip=(), scale=None, branch=0,
                   return_lse=False, carry_max=None, ring_order=None):
    """Ring attention: the K/V shards travel round the group (isend/irecv); each rank calls
    the daemon once per K/V shard with its own queries (mask key (layer, branch * P + shard):
    one mask per K/V shard) and merges the partial outputs by their LSE in float32. The calls
    carry row maxima from shard to shard (carry_max, default the context's: True), in the
    ring's order (own shard first) or with ring_order="global" in the single process's order
    (K/V broadcast by their owners instead of passed on).
    q, k, v: [B, S/P, H, D]; returns out [B, S/P, H, D] or (out, lse [B, H, S/P])."""
    must_do, must_skip, ctx = _prepare(q, k, v, (group,), must_do, must_skip, context)
    o, lse = _ring(q, k, v, group, ctx, layer, step, threshold, mode, must_do, must_skip,
                   scale, branch, True, carry_max, ring_order)
    return _result(o, lse, return_lse)


def hybrid_attention(q, k, v, groups, *, layer=0, step=0, context=None, threshold=None,
                     mode=None, must_do=(), must_skip=(), scale=None, branch=0,
                     return_lse=False, carry_max=None, ring_order=None):
    """Ulysses inside each ring chunk, ring across the chunks (USP): groups is
    (ulysses_group, ring_group) as hybrid_groups() builds them, or a 2D DeviceMesh with dims
    'ring' and 'ulysses'. Shard index of this rank = ring_rank * u + ulysses_rank.
    carry_max / ring_order: as ring_attention, for the ring across the chunks.
    q, k, v: [B, S/(u*r), H, D], H divisible by u."""
    ug, rg = _hybrid_pair(groups)
    must_do, must_skip, ctx = _prepare(q, k, v, (ug, rg), must_do, must_skip, context)
    u, _ = _size_rank(ug)
    if u > 1:
        q, k, v = _scatter_heads(q, k, v, ug, u)
    o, lse = _ring(q, k, v, rg, ctx, layer, step, threshold, mode, must_do, must_skip, scale,
                   branch, True, carry_max, ring_order)
    if u > 1:
        o = _heads_to_seq(o, ug, u)
        lse = _lse_heads_to_seq(lse, ug, u) if return_lse else None
    return _result(o, lse, return_lse)


def _result(o, lse, return_lse):
    return (o, lse) if return_lse else o


# ---- the drop-in module ---------------------------------------------------------------------

_SCHEMES = {"ulysses": ulysses_attention, "ring": ring_attention, "hybrid": hybrid_attention}


class SequenceParallelAttention:
    """One per attention layer, like liteattn.LiteAttention, on a sequence shard:
    attn(q, k, v, scale=None, return_softmax_lse=False, must_do_list=None,
    must_skip_list=None, branch=0). Each call with branch 0 advances this layer's step (the
    other branches of a step reuse it). must-do/must-skip lists are in global positions."""

    def __init__(self, scheme="ulysses", group=None, *, threshold=None, context=None,
                 enable_skipping=True):
        if scheme not in _SCHEMES:
            raise InvalidArgument("scheme %r: use 'ulysses', 'ring' or 'hybrid'" % (scheme,))
        if scheme == "hybrid":
            _hybrid_pair(group)
        self.scheme = scheme
        self.group = group
        self.context = context or default_context()
        self.layer = self.context.register(self)
        self.threshold = None if threshold is None else float(threshold)
        self.enable_skipping = bool(enable_skipping)
        self._step = 0
        self._last_branch = None

    def __repr__(self):
        return "SequenceParallelAttention(%s, layer=%d, threshold=%s)" % (
            self.scheme, self.layer, self.threshold)

    @property
    def step(self):
        return self._step

    def __call__(self, q, k, v, scale=None, return_softmax_lse=False, must_do_list=None,
                 must_skip_list=None, branch=0):
        if branch == 0 and self._last_branch is not None:
            self._step += 1
        self._last_branch = branch
        return _SCHEMES[self.scheme](
            q, k, v, self.group, layer=self.layer, step=self._step, context=self.context,
            threshold=self.threshold, mode=None if self.enable_skipping else "dense",
            must_do=must_do_list, must_skip=must_skip_list, scale=scale, branch=branch,
            return_lse=bool(return_softmax_lse))

    def mask(self, kv_shard=0, branch=0):
        return self.context.mask(self.layer, kv_shard, branch)
