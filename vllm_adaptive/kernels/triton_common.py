"""Device functions shared by the Triton kernels, each written once.

- :func:`find_request`: which request owns a query tile (``paged_prefill``,
  ``sparse_prefill``, the KIVI attention kernel);
- :func:`pattern_visible`, :func:`local_span_start`, :func:`next_visited_tile`:
  the LongGen pattern (``SparsePattern.visible``'s terms) and the walk that
  visits only the key tiles a query tile can read (``sparse_prefill``,
  ``sparse_decode``, KIVI attention on sparse layers);
- :func:`softmax_step`: one online-softmax step (FlashAttention-2) of every
  attention kernel;
- :func:`round_half_even`, :func:`minmax_scale`, :func:`minmax_codes`:
  ``kernels.kivi.quantize`` step by step (the KIVI write's per-token values
  and per-channel keys).

The split-KV partials' store and merge live with their layout in ``split_kv``.

These are plain functions marked ``_triton.helper``; ``_triton.jit`` binds
them to the kernel's mode (compiled or interpreted) when it jits a kernel,
so this module imports without triton's compiler. Arguments in capitals are
``tl.constexpr``; the rest are scalars or tiles whose shapes broadcast.
"""

from __future__ import annotations

from vllm_adaptive.kernels._triton import helper, tl


@helper
def find_request(cu_qtiles_ptr, tile, num_reqs):
    """The request owning query tile ``tile``: binary search over
    ``cu_qtiles_ptr`` (``[num_reqs + 1]`` cumulative query tiles per request).
    ``num_reqs`` for a surplus program (launch grids are upper bounds)."""
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_qtiles_ptr + mid + 1) <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo


# ------------------------------------------------------------- sparse pattern


@helper
def pattern_visible(
    qp, kp,  # query / key positions, broadcastable ([M, 1] and [1, N], say)
    SINK: tl.constexpr,  # pattern terms, 0 = off (sparse_pattern.SparsePattern)
    WINDOW: tl.constexpr,
    PBLOCK: tl.constexpr,  # the pattern's block, not the cache page
    LOCAL_BLOCKS: tl.constexpr,
    VERT_STRIDE: tl.constexpr,
):
    """Whether the query at ``qp`` reads the key at ``kp``: the terms of
    ``SparsePattern.visible``, and causal."""
    visible = kp < SINK
    if WINDOW > 0:
        visible = visible | (qp - kp < WINDOW)
    if LOCAL_BLOCKS > 0:
        visible = visible | (qp // PBLOCK - kp // PBLOCK < LOCAL_BLOCKS)
    if VERT_STRIDE > 0:
        visible = visible | ((kp // PBLOCK + 1) % VERT_STRIDE == 0)
    return visible & (kp <= qp)


@helper
def local_span_start(pos, WINDOW: tl.constexpr, PBLOCK: tl.constexpr, LOCAL_BLOCKS: tl.constexpr):
    """The lowest key (``>= 0``) the window / local-block terms let the query
    at ``pos`` read; later queries reach no lower, so for a tile of queries
    from ``pos`` on, the keys from here up are the local span."""
    lo_key = pos
    if WINDOW > 0:
        lo_key = tl.minimum(lo_key, pos - (WINDOW - 1))
    if LOCAL_BLOCKS > 0:
        lo_key = tl.minimum(lo_key, (pos // PBLOCK - (LOCAL_BLOCKS - 1)) * PBLOCK)
    return tl.maximum(lo_key, 0)


@helper
def next_visited_tile(
    t,  # key tile index (keys t * TILE .. t * TILE + TILE - 1)
    lo_tile,  # first tile of the local span (local_span_start(..) // TILE)
    TILE: tl.constexpr,  # keys per tile: a cache page, or a KIVI key tile
    SINK: tl.constexpr,
    PBLOCK: tl.constexpr,
    VERT_STRIDE: tl.constexpr,
):
    """``t`` if a query of the tile may read a key of key tile ``t``, else the
    next tile that may: below the local span only tiles holding a sink token
    or a vertical-stride block's token count, and the jump lands on the next
    vertical-stride block or on ``lo_tile``, whichever comes first."""
    skip = (t < lo_tile) & (t * TILE >= SINK)
    if VERT_STRIDE > 0:
        blk = t * TILE // PBLOCK
        blk = blk + (VERT_STRIDE - 1) - blk % VERT_STRIDE  # next (blk + 1) % S == 0
        nxt = tl.minimum(tl.maximum(t, blk * PBLOCK // TILE), lo_tile)
    else:
        nxt = lo_tile
    return tl.where(skip, nxt, t)


# ------------------------------------------------------------- online softmax


@helper
def softmax_step(s, visible, m_i, l_i):
    """One online-softmax step over a tile of scores ``s`` ``[M, N]`` (fp32)
    with mask ``visible`` (broadcast to ``[M, N]``) and running max / sum
    ``m_i``, ``l_i`` ``[M]``. Returns ``(p, alpha, m_new, l_new)``; the caller
    sets ``acc = acc * alpha[:, None] + p @ v``.

    Masked scores take a finite -1e30, not -inf, so a row with nothing visible
    (an empty split) stays NaN-free; their probabilities are zeroed
    explicitly."""
    s = tl.where(visible, s, -1.0e30)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.where(visible, tl.exp(s - m_new[:, None]), 0.0)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


# ------------------------------------------------------------------ quantizer


@helper
def round_half_even(y):
    """``torch.round``: to the nearest integer, ties to even (fp32)."""
    f = tl.floor(y)
    d = y - f
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + (f - 2.0 * tl.floor(f * 0.5))))


@helper
def minmax_scale(mn, mx, QMAX: tl.constexpr):
    """Stored float16 ``(min, scale)`` of a group with fp32 ``mn`` / ``mx``
    (masked lanes set to anything finite by the caller): ``scale = (mx -
    min16) / QMAX`` divided with IEEE rounding, as ``kernels.kivi.quantize``."""
    mn16 = mn.to(tl.float16)
    sc16 = tl.math.div_rn(mx - mn16.to(tl.float32), QMAX * 1.0 + tl.zeros_like(mx)).to(tl.float16)
    return mn16, sc16


@helper
def minmax_codes(x, mn16, sc16, QMAX: tl.constexpr):
    """int32 codes of ``x`` (fp32) under the stored ``mn16`` / ``sc16``
    (broadcast to ``x``): ``round((x - min) / scale)`` clamped to
    ``0 .. QMAX``, a zero scale dividing by 1; bit-identical to
    ``kernels.kivi.quantize``."""
    sc = sc16.to(tl.float32)
    safe = tl.where(sc > 0, sc, 1.0)
    y = tl.math.div_rn(x - mn16.to(tl.float32), safe + tl.zeros_like(x))
    return tl.minimum(tl.maximum(round_half_even(y), 0.0), QMAX * 1.0).to(tl.int32)
