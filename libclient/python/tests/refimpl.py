"""An independent float64 NumPy reference of docs/SKIP-SEMANTICS.md, for the tests.

ref_attention() takes the live mask of (session, layer) as it was before the call and returns
(out, lse, new_mask): out [B, Sq, H, D], lse [B, H, Sq] (natural log), new_mask shaped like
the input mask (bits of tiles past this call's nK and rows past its nQ unchanged). With
row_max (float [B, H, Sq], carried row maxima) the votes compare against max(row_max, the
running maximum) and row_max is updated in place to max(row_max, the row maxima), as the daemon
does (SKIP-SEMANTICS "Carried row maxima").
"""
import math

import numpy as np

LOG2E = 1.0 / math.log(2.0)


def tile_flags(Sk, BN, must_do, must_skip):
    """(must_do_tile[nK], must_skip_only_tile[nK]) as bool arrays."""
    nK = -(-Sk // BN)
    do_key = np.zeros(Sk, dtype=bool)
    skip_key = np.zeros(Sk, dtype=bool)
    for a, b in must_do:
        do_key[max(a, 0):max(min(b, Sk), 0)] = True
    for a, b in must_skip:
        skip_key[max(a, 0):max(min(b, Sk), 0)] = True
    mdo = np.zeros(nK, dtype=bool)
    mskip = np.zeros(nK, dtype=bool)
    for n in range(nK):
        sl = slice(n * BN, min((n + 1) * BN, Sk))
        mdo[n] = do_key[sl].any()
        mskip[n] = skip_key[sl].all() and not do_key[sl].any()
    return mdo, mskip


def get_bit(row, n):
    return (int(row[n // 32]) >> (n % 32)) & 1


def ref_attention(q, k, v, mask, *, BM, BN, tau, mode="skip", step=0, direction="alternate",
                  scale=None, must_do=(), must_skip=(), row_max=None):
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    nQ = -(-Sq // BM)
    nK = -(-Sk // BN)
    mdo, mskip = tile_flags(Sk, BN, must_do, must_skip)
    if direction == "alternate":
        descending = step % 2 == 0
    else:
        descending = direction == "descending"
    out = np.zeros((B, Sq, H, D))
    lse = np.zeros((B, H, Sq))
    new_mask = mask.copy()
    for b in range(B):
        for h in range(H):
            s_all = q[b, :, h, :] @ k[b, :, h, :].T  # raw scores [Sq, Sk]
            for m in range(nQ):
                r0, r1 = m * BM, min((m + 1) * BM, Sq)
                row = mask[b, h, m]
                if mode == "dense":
                    eff = [not mskip[n] for n in range(nK)]
                elif mode == "observe":
                    eff = [not mskip[n] for n in range(nK)]
                else:
                    eff = [(get_bit(row, n) or mdo[n]) and not mskip[n] for n in range(nK)]
                order = [n for n in range(nK) if eff[n]]
                if descending:
                    order = order[::-1]
                s = s_all[r0:r1]
                run_max = np.full(r1 - r0, -np.inf)
                carried = np.full(r1 - r0, -np.inf)
                if row_max is not None:
                    carried = np.nan_to_num(np.asarray(row_max[b, h, r0:r1], dtype=np.float64),
                                            nan=-np.inf, posinf=np.inf, neginf=-np.inf)
                keep = np.zeros(nK, dtype=bool)
                visited = np.zeros(nK, dtype=bool)
                cols = []
                for idx, n in enumerate(order):
                    c0, c1 = n * BN, min((n + 1) * BN, Sk)
                    t = s[:, c0:c1].max(axis=1)
                    ref = np.maximum(run_max, carried)
                    with np.errstate(invalid="ignore"):
                        votes = np.where(np.isneginf(ref), True,
                                         (t - ref) * scale * LOG2E > tau)
                    keep[n] = votes.any() or mdo[n]
                    visited[n] = True
                    run_max = np.maximum(run_max, t)
                    cols.append(np.arange(c0, c1))
                if cols:
                    cols = np.concatenate(cols)
                    z = s[:, cols] * scale
                    zmax = z.max(axis=1, keepdims=True)
                    p = np.exp(z - zmax)
                    den = p.sum(axis=1, keepdims=True)
                    out[b, r0:r1, h, :] = (p @ v[b, cols, h, :]) / den
                    lse[b, h, r0:r1] = (zmax + np.log(den))[:, 0]
                else:       # the row visits no tile: O = 0, LSE = -inf
                    lse[b, h, r0:r1] = -np.inf
                if row_max is not None:
                    row_max[b, h, r0:r1] = np.maximum(carried, run_max)
                if mode == "dense":
                    continue
                new_row = row.copy()
                for n in range(nK):
                    w, bit = n // 32, np.uint32(1 << (n % 32))
                    if mode == "skip":
                        if visited[n]:
                            val = keep[n]
                        else:
                            continue  # not visited: stays as it was
                    else:  # observe
                        if not visited[n]:
                            continue
                        val = bool(get_bit(row, n)) and keep[n]
                    if val:
                        new_row[w] |= bit
                    else:
                        new_row[w] &= ~bit
                nw = -(-nK // 32)
                for n in range(nK, nw * 32):   # bits past nK in the used words: written 0
                    new_row[n // 32] &= ~np.uint32(1 << (n % 32))
                new_mask[b, h, m] = new_row
    return out, lse, new_mask


def live_bits(mask, nQ, nK):
    """Number of set bits in the valid part [.., :nQ, tiles < nK] of a packed mask."""
    total = 0
    for n in range(nK):
        total += int(((mask[:, :, :nQ, n // 32] >> np.uint32(n % 32)) & 1).sum())
    return total


def rel_l2(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def clustered_qkv(rng, B, Sq, Sk, H, D, BM, BN, clusters=3, strength=4.0, dtype=np.float32):
    """Data whose attention is block-structured: q-tile m attends mostly to k-tiles of the same
    cluster (m % clusters == n % clusters), so some tiles are negligible and get skipped."""
    centers = rng.standard_normal((clusters, H, D))
    centers /= np.linalg.norm(centers, axis=-1, keepdims=True)
    centers *= strength * D ** 0.25
    qc = (np.arange(Sq) // BM) % clusters
    kc = (np.arange(Sk) // BN) % clusters
    q = rng.standard_normal((B, Sq, H, D)) * 0.5 + centers[qc][None]
    k = rng.standard_normal((B, Sk, H, D)) * 0.5 + centers[kc][None]
    v = rng.standard_normal((B, Sk, H, D))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)
