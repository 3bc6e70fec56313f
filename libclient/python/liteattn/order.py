"""Token orders for tile-sparse attention over video tokens.

A LiteAttention tile is a run of consecutive tokens (BM queries, BN keys). Video DiTs lay their
tokens out frame by frame, row by row ((t, h, w) order), so a tile is a few full-width rows of
one frame, and its rows attend to different places. Attention does not depend on the order of
its tokens (position embeddings such as RoPE travel with them), so the same call in another
order computes the same output; an order in which a tile is a compact brick of the video (a
3D Z-order curve) makes more tiles negligible for all of their rows, so more of them are
skipped at the same threshold and quality (bench/quality/RESULTS.md, 2026-12-03).

A permutation here is an integer array perm of length T*H*W: position i of the new order holds
the token at (t, h, w)-order index perm[i]. LiteAttention(token_order=perm) applies it to each
call (gathers Q, K, V into the new order and scatters O back); a model that can lay its tokens
out in the new order once, between patch embedding and head, saves those copies.
"""
import numpy as np

ORDERS = ("raster", "zorder", "morton:PATTERN", "blocks:bt,bh,bw")


def _coords(grid):
    T, H, W = (int(x) for x in grid)
    if T <= 0 or H <= 0 or W <= 0:
        raise ValueError("token grid %r: three positive sizes (frames, height, width)" % (grid,))
    idx = np.arange(T * H * W, dtype=np.int64)
    return (T, H, W), idx // (H * W), (idx // W) % H, idx % W


def zorder(grid):
    """The 3D Z-order (Morton) curve over a (T, H, W) token grid: the bits of t, h and w
    interleaved, w lowest. Where the sides are powers of two every aligned run of 2^k tokens
    is a brick (128 tokens: 4 x 4 x 8); other sides work too, less compactly."""
    (T, H, W), t, h, w = _coords(grid)
    key = np.zeros(T * H * W, dtype=np.int64)
    for b in range(max(T, H, W).bit_length()):
        key |= (((w >> b) & 1) << (3 * b)) | (((h >> b) & 1) << (3 * b + 1)) | \
            (((t >> b) & 1) << (3 * b + 2))
    return np.argsort(key, kind="stable")


def morton(grid, pattern):
    """A Morton curve whose bits are taken from the axes in `pattern`, lowest bit first,
    cycling: "wht" is zorder() (w, h, t, w, h, t, ...); "thw" puts the time axis lowest, so
    that an aligned run of 128 tokens is an 8 x 4 x 4 brick (t, h, w), and "tthw" gives time
    twice the bits (16 x 4 x 2). An axis whose bits are used up (its side is reached) is
    passed over, so every pattern orders the whole grid."""
    (T, H, W), t, h, w = _coords(grid)
    pat = str(pattern)
    if not pat or set(pat) - set("thw"):
        raise ValueError("morton pattern %r: letters t, h and w, lowest bit first" % (pattern,))
    coord = {"t": t, "h": h, "w": w}
    left = {"t": (T - 1).bit_length(), "h": (H - 1).bit_length(), "w": (W - 1).bit_length()}
    for a in "thw":
        if left[a] and a not in pat:
            raise ValueError("morton pattern %r: no bits for axis %s (side %d)" % (
                pattern, a, {"t": T, "h": H, "w": W}[a]))
    used = {"t": 0, "h": 0, "w": 0}
    key = np.zeros(T * H * W, dtype=np.int64)
    bit, i = 0, 0
    while any(left[a] > used[a] for a in "thw"):
        a = pat[i % len(pat)]
        i += 1
        if used[a] < left[a]:
            key |= ((coord[a] >> used[a]) & 1) << bit
            used[a] += 1
            bit += 1
    return np.argsort(key, kind="stable")


def blocks(grid, brick):
    """Bricks of bt x bh x bw tokens, in (t, h, w) order of bricks, (t, h, w) inside each."""
    (T, H, W), t, h, w = _coords(grid)
    bt, bh, bw = (int(x) for x in brick)
    if not (bt > 0 and bh > 0 and bw > 0 and T % bt == 0 and H % bh == 0 and W % bw == 0):
        raise ValueError("bricks %r: positive sizes dividing the grid %dx%dx%d" % (
            tuple(brick), T, H, W))
    b = ((t // bt) * (H // bh) + h // bh) * (W // bw) + w // bw
    inner = ((t % bt) * bh + h % bh) * bw + w % bw
    return np.argsort(b * (bt * bh * bw) + inner, kind="stable")


def check_name(name):
    """name, if it names an order token_order() knows ("raster", "zorder", "morton:PATTERN",
    "blocks:bt,bh,bw" with positive sizes), else ValueError. Whether a brick divides a grid is
    known only with the grid."""
    if name in (None, "", "raster", "zorder"):
        return name
    if isinstance(name, str) and name.startswith("morton:"):
        pat = name[len("morton:"):]
        if pat and not set(pat) - set("thw"):
            return name
        raise ValueError("token order %r: morton:PATTERN with letters t, h and w" % name)
    if isinstance(name, str) and name.startswith("blocks:"):
        parts = name[len("blocks:"):].split(",")
        if len(parts) == 3 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
            return name
        raise ValueError("token order %r: want blocks:bt,bh,bw (positive sizes)" % name)
    raise ValueError("token order %r: one of %s" % (name, ", ".join(ORDERS)))


def token_order(grid, name):
    """The permutation of order `name` ("raster": None, "zorder", "morton:PATTERN",
    "blocks:bt,bh,bw")."""
    check_name(name)
    if name in (None, "", "raster"):
        _coords(grid)
        return None
    if name == "zorder":
        return zorder(grid)
    if name.startswith("morton:"):
        return morton(grid, name[len("morton:"):])
    return blocks(grid, [int(p) for p in name[len("blocks:"):].split(",")])


def inverse(perm):
    """inv with inv[perm[i]] = i."""
    perm = np.asarray(perm, dtype=np.int64)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=np.int64)
    return inv


def check(perm):
    """perm as an int64 array, if it is a permutation of 0..n-1 (else ValueError)."""
    p = np.asarray(perm, dtype=np.int64).reshape(-1)
    if p.size == 0 or not np.array_equal(np.sort(p), np.arange(p.size)):
        raise ValueError("token order: not a permutation of 0..%d" % (p.size - 1))
    return p
