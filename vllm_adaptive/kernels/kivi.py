"""KIVI quantized paged KV on the torch path (CPU, or anywhere): quantize and
pack on write, attention straight from the packed pages.

Layout and residual rules: ``vllm_adaptive/formats/kivi.py``. Everything here
is vectorised over tokens, heads and blocks; Python loops run over requests
only (host-side index plans).

**Which tokens are read in full precision.** Position ``p`` of a request with
``seq_len`` tokens, ``ctx`` of them cached before this step, is read from

* the fresh key / value tensors of this step when ``p >= ctx`` (KIVI's
  prefill attends in full precision; a decode step's own token too);
* the residual pages when ``e <= p < ctx``, ``e = seq_len // R * R`` (the
  open segment's older tokens);
* the packed pages otherwise.

**Attention without a dequantized cache.** For each request (each query tile
of a prefill) the kernel gathers only its own blocks' bytes (for sparse
layers, only the pattern's). Planar packing makes bit plane ``s`` the channel
slice ``s*cc .. (s+1)*cc - 1``, so unpacking is a shift and a mask on uint8
and never interleaves.

* Decode (few queries): the per-channel key scales never multiply the codes,

      q . k = sum_c (q_c * s_gc) code_tc + sum_c q_c * m_gc

  so they fold into the small query tensor and each plane's codes go
  straight into a matmul; values are dequantized per (token, channel group).
* Prefill tiles (many queries): the tile's blocks are dequantized (that
  request's visible blocks only, not the cache) and torch's fused SDPA runs
  on them; per-query folding would cost more than the keys themselves.

(A byte lookup table was 10x slower on CPU than bit ops.)

**Rotation** (``layout.rotation``): :func:`hadamard` / :func:`rotate`; the
runners rotate keys / values before the write and the query / output around
attention (``runners/kivi_torch.py``), so the kernels never know.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_adaptive.formats.kivi import SCALE_DTYPE, KiviLayout, KiviViews
from vllm_adaptive.kernels.batch import requests
from vllm_adaptive.sparse_pattern import SparsePattern

# --------------------------------------------------------------- pack / unpack


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., D]`` uint8 codes < 2**bits -> ``[..., D / p]`` planar bytes."""
    p = 8 // bits
    d = codes.shape[-1]
    planes = codes.reshape(*codes.shape[:-1], p, d // p)
    out = planes[..., 0, :].clone()
    for s in range(1, p):
        out |= planes[..., s, :] << (s * bits)
    return out


def planes(packed: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """The uint8 codes of each bit plane of ``[..., D / p]`` packed bytes:
    plane s holds channels s*cc .. (s+1)*cc - 1 (planar packing)."""
    if bits == 8:
        return [packed]
    mask = (1 << bits) - 1
    return [(packed >> (s * bits)) & mask if s else packed & mask for s in range(8 // bits)]


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., D / p]`` -> ``[..., D]`` uint8 codes."""
    return torch.cat(planes(packed, bits), dim=-1)


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization along ``dim``: (codes uint8, scale,
    min), scale and min float16 with ``dim`` kept (size 1). Codes are computed
    from the stored float16 scale and min, so dequantizing is exact for values
    ``code * scale + min`` whose scale and min are float16 numbers."""
    x = x.float()
    qmax = (1 << bits) - 1
    mn = x.amin(dim=dim, keepdim=True)
    mx = x.amax(dim=dim, keepdim=True)
    mn16 = mn.to(SCALE_DTYPE)
    scale16 = ((mx - mn16.float()) / qmax).to(SCALE_DTYPE)
    scale = scale16.float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - mn16.float()) / safe).clamp_(0, qmax).to(torch.uint8)
    return codes, scale16, mn16


def dequantize(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + mn.float()


_HADAMARD: dict[tuple[int, str], torch.Tensor] = {}


def hadamard(d: int, device) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix ``[d, d]`` float32 (``d`` a
    power of two). Symmetric and its own inverse: ``H @ H = I``."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"Hadamard transform: the size must be a power of two, got {d}")
    key = (d, str(device))
    if key not in _HADAMARD:
        h = torch.ones(1, 1)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = (h / d**0.5).to(device)
    return _HADAMARD[key]


def rotate(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ H`` over the last dim, computed in float32, returned in
    ``out_dtype`` (default ``x``'s). Applying it twice gives ``x`` back up to
    rounding."""
    h = hadamard(x.shape[-1], x.device)
    return torch.matmul(x.float(), h).to(out_dtype or x.dtype)


# ----------------------------------------------------------------- write plan


@dataclass
class WritePlan:
    """Host-built indices of one step's cache write (same for every layer).

    ``seg_*``: segments that complete this step, ``[n_seg, residual]`` token
    sources into ``cat(new tokens, old residual tokens)``; their block id and
    first row. ``old_*``: where the old residual tokens sit (page, row).
    ``res_*``: new tokens of open segments -> (residual page, row)."""

    seg_src: torch.Tensor  # [n_seg, residual] long into cat(new, old)
    seg_block: torch.Tensor  # [n_seg] long physical block
    seg_row: torch.Tensor  # [n_seg] long first row in the block
    old_page: torch.Tensor  # [n_old] long
    old_row: torch.Tensor  # [n_old] long
    res_rows: torch.Tensor  # [n_res] long rows of the new keys
    res_page: torch.Tensor  # [n_res] long
    res_row: torch.Tensor  # [n_res] long


def _residual_loc(
    table_row: torch.Tensor, layout: KiviLayout, seg_start: int, i: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(page, row) of offsets ``i`` into the residual of the segment at ``seg_start``."""
    tpp = layout.residual_tokens_per_page
    return table_row[seg_start // layout.block_size + 1 + i // tpp].long(), i % tpp


def plan_write(
    layout: KiviLayout,
    block_table: torch.Tensor,  # [num_reqs, width]
    query_start_loc_cpu: torch.Tensor,
    seq_lens_cpu: torch.Tensor,
    num_tokens: int,
) -> WritePlan:
    """Index work on the host, vectorised per request (loops over requests only)."""
    R, bs = layout.residual, layout.block_size
    bt_cpu = block_table.cpu()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "seg_src", "seg_block", "seg_row", "old_page", "old_row", "res_rows", "res_page", "res_row")}
    n_old = 0
    for req in requests(query_start_loc_cpu, seq_lens_cpu):
        ctx, L, q0 = req.context_len, req.seq_len, req.q0
        table_row = bt_cpu[req.index]
        a0 = ctx // R * R
        n_seg = (L - a0) // R  # segments this step completes, from a0
        if n_seg:
            t = a0 + torch.arange(n_seg * R).reshape(n_seg, R)
            src = q0 + t - ctx  # this step's rows
            m = ctx - a0  # the first segment's older tokens sit in its residual
            if m:
                page, row = _residual_loc(table_row, layout, a0, torch.arange(m))
                parts["old_page"].append(page)
                parts["old_row"].append(row)
                # appended after the num_tokens new rows
                src[0, :m] = num_tokens + n_old + torch.arange(m)
                n_old += m
            starts = a0 + R * torch.arange(n_seg)
            parts["seg_src"].append(src)
            parts["seg_block"].append(table_row[starts // bs].long())
            parts["seg_row"].append(starts % bs)
        e = a0 + n_seg * R  # the open segment
        t = torch.arange(max(e, ctx), L)
        if t.numel():
            page, row = _residual_loc(table_row, layout, e, t - e)
            parts["res_rows"].append(q0 + t - ctx)
            parts["res_page"].append(page)
            parts["res_row"].append(row)
    dev = block_table.device

    def cat(k: str, shape=(0,)) -> torch.Tensor:
        xs = parts[k]
        return (torch.cat(xs) if xs else torch.empty(shape, dtype=torch.long)).to(dev)

    return WritePlan(
        seg_src=cat("seg_src", (0, R)), seg_block=cat("seg_block"), seg_row=cat("seg_row"),
        old_page=cat("old_page"), old_row=cat("old_row"),
        res_rows=cat("res_rows"), res_page=cat("res_page"), res_row=cat("res_row"),
    )


def write(
    layout: KiviLayout,
    views: KiviViews,
    plan: WritePlan,
    key: torch.Tensor,  # [num_tokens, H, D]
    value: torch.Tensor,  # [num_tokens, H, D]
) -> None:
    R, G, bits = layout.residual, layout.group, layout.bits
    n_tok, H, D = key.shape
    dt = views.residual.dtype
    # The old residual tokens first: their pages are the blocks this step's
    # completed segments are about to fill.
    n_seg = plan.seg_src.shape[0]
    if n_seg:
        old = views.residual[plan.old_page, :, plan.old_row]  # [n_old, H, 2, D]
        tok = plan.seg_row[:, None] + torch.arange(R, device=key.device)[None, :]  # [n_seg, R]
        blk = plan.seg_block[:, None].expand(-1, R)
        # keys of completed segments: per channel, group by group
        seg = torch.cat([key.to(dt), old[:, :, 0]], dim=0)[plan.seg_src]  # [n_seg, R, H, D]
        codes, scale, mn = quantize(seg.reshape(n_seg, R // G, G, H, D), bits, dim=2)
        views.k_codes[blk, :, tok] = pack(codes.reshape(n_seg, R, H, D), bits)  # [n_seg, R, H, cc]
        g = plan.seg_row[:, None] // G + torch.arange(R // G, device=key.device)[None, :]
        sm = torch.cat([scale, mn], dim=2)  # [n_seg, R/G, 2, H, D]
        views.k_scale[plan.seg_block[:, None].expand(-1, R // G), :, g] = sm.permute(0, 1, 3, 2, 4)
        # values of completed segments: per token, channel group by group
        seg = torch.cat([value.to(dt), old[:, :, 1]], dim=0)[plan.seg_src]  # [n_seg, R, H, D]
        codes, scale, mn = quantize(seg.reshape(n_seg, R, H, layout.v_groups, layout.value_group), bits, dim=-1)
        views.v_codes[blk, :, tok] = pack(codes.reshape(n_seg, R, H, D), bits)
        views.v_scale[blk, :, tok] = torch.cat([scale, mn], dim=-1)  # [n_seg, R, H, nvg, 2]
    if plan.res_rows.numel():
        kv = torch.stack([key[plan.res_rows], value[plan.res_rows]], dim=-2)  # [n_res, H, 2, D]
        views.residual[plan.res_page, :, plan.res_row] = kv.to(dt)


# ------------------------------------------------------------------ attention


def _residual(
    layout: KiviLayout, views: KiviViews, table_row: torch.Tensor, seq_len: int
) -> tuple[int, torch.Tensor | None]:
    """(first position e, ``[H, n, 2, D]`` keys / values) of the request's
    open segment, ``n = seq_len - e``; None when it is empty."""
    e = seq_len // layout.residual * layout.residual
    n = seq_len - e
    if n == 0:
        return e, None
    tpp = layout.residual_tokens_per_page
    j = e // layout.block_size
    pages = table_row[j + 1 : j + 1 + -(-n // tpp)].long()
    res = views.residual[pages]  # [np, H, tpp, 2, D]
    h, d = res.shape[1], res.shape[-1]
    return e, res.transpose(0, 1).reshape(h, -1, 2, d)[:, :n]


def full_precision_kv(
    layout: KiviLayout,
    views: KiviViews,
    table_row: torch.Tensor,
    seq_len: int,
    fresh: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """(f0, keys, values ``[H, seq_len - f0, D]`` float32): the positions
    ``f0 .. seq_len - 1`` a request reads in full precision (module
    docstring). ``fresh``: this step's keys and values ``[H, n_new, D]``,
    positions ``seq_len - n_new ..``."""
    e, res = _residual(layout, views, table_row, seq_len)
    ctx = seq_len - (fresh[0].shape[1] if fresh is not None else 0)
    f0 = min(e, ctx)
    ks, vs = [], []
    if res is not None and ctx > e:
        ks.append(res[:, : ctx - e, 0].float())
        vs.append(res[:, : ctx - e, 1].float())
    if fresh is not None:
        ks.append(fresh[0].float())
        vs.append(fresh[1].float())
    if not ks or f0 == seq_len:
        return seq_len, None, None
    return f0, torch.cat(ks, dim=1), torch.cat(vs, dim=1)


def _dequantized_values(layout: KiviLayout, views: KiviViews, phys: torch.Tensor) -> torch.Tensor:
    """``[nb, H, bs, D]`` float32 values of the pages ``phys``."""
    vs = views.v_scale[phys].float()  # [nb, H, bs, nvg, 2]
    nb, h, bs, nvg, _ = vs.shape
    d = layout.head_size
    v = unpack(views.v_codes[phys], layout.bits).float().reshape(nb, h, bs, nvg, d // nvg)
    return v.mul_(vs[..., 0:1]).add_(vs[..., 1:2]).reshape(nb, h, bs, d)


def attend_request(
    layout: KiviLayout,
    views: KiviViews,
    q: torch.Tensor,  # [H_q, Q, D] (query positions ctx .. seq_len - 1)
    table_row: torch.Tensor,  # [width] physical blocks of the request
    blocks: torch.Tensor,  # [nb] long block *indices* to read (ascending)
    seq_len: int,  # tokens the cache holds for the request
    scale: float,
    pattern: SparsePattern | None = None,
    q_end: int | None = None,  # the queries are positions q_end - Q .. q_end - 1
    *,
    full: tuple[int, torch.Tensor | None, torch.Tensor | None],
) -> torch.Tensor:
    """Attention of one request's queries over the packed keys / values of
    ``blocks``, the full-precision positions ``full`` (:func:`full_precision_kv`,
    made once per request) taking their place; ``[H_q, Q, D]`` float32."""
    q_end = seq_len if q_end is None else q_end
    bs, G, bits = layout.block_size, layout.group, layout.bits
    Hq, Q, D = q.shape
    phys = table_row[blocks].long()
    Hk = views.k_codes.shape[1]
    grp = Hq // Hk
    nb = phys.numel()
    ng, cc = bs // G, layout.code_cols
    kb = views.k_codes[phys]  # [nb, Hk, bs, cc] uint8
    ks = views.k_scale[phys].float()  # [nb, Hk, ng, 2, D]
    qf = q.float().reshape(Hk, grp * Q, D)  # [Hk, gQ, D]
    kpos = (blocks[:, None] * bs + torch.arange(bs, device=q.device)[None, :]).reshape(-1)
    qpos = torch.arange(q_end - Q, q_end, device=q.device)
    vis = (kpos[None, :] <= qpos[:, None]) & (kpos < seq_len)[None, :]
    if pattern is not None:
        vis = vis & pattern.visible(qpos[:, None], kpos[None, :])
    f0, fk, fv = full
    packed = (kpos < f0)[None, :, None]  # stale slots / full-precision positions: never read
    full_idx = torch.nonzero((kpos >= f0) & (kpos < seq_len)).flatten()
    full_src = kpos[full_idx] - f0
    # values: dequantized per (token, channel group), full precision where due
    v = _dequantized_values(layout, views, phys).transpose(0, 1).reshape(Hk, nb * bs, D)
    v = torch.where(packed, v, 0.0)
    if fv is not None:
        v[:, full_idx] = fv[:, full_src]
    if grp * Q * ng > G:
        # Many queries (a prefill tile): dequantize the keys of these blocks
        # only (this request's pattern, up to the tile's end) and run torch's
        # fused SDPA, which beats scores-by-hand on CPU.
        k = unpack(kb, bits).float().reshape(nb, Hk, ng, G, D)
        k = k.mul_(ks[:, :, :, None, 0]).add_(ks[:, :, :, None, 1])
        k = torch.where(packed, k.reshape(nb, Hk, bs, D).transpose(0, 1).reshape(Hk, nb * bs, D), 0.0)
        if fk is not None:
            k[:, full_idx] = fk[:, full_src]
        return F.scaled_dot_product_attention(
            q.float(), k, v, attn_mask=vis, scale=scale, enable_gqa=grp > 1
        )
    # few queries (decode): the per-channel scales fold into the query
    qs = qf[None, :, None] * ks[:, :, :, None, 0]  # [nb, Hk, ng, gQ, D]
    scores = (qf[None, :, None] * ks[:, :, :, None, 1]).sum(-1, keepdim=True)  # [nb, Hk, ng, gQ, 1]
    for s_, plane in enumerate(planes(kb, bits)):
        kc = plane.float().reshape(nb, Hk, ng, G, cc)
        scores = scores + torch.matmul(qs[..., s_ * cc:(s_ + 1) * cc], kc.transpose(-1, -2))
    scores = scores.permute(1, 3, 0, 2, 4).reshape(Hk, grp * Q, nb * bs)
    if fk is not None:
        scores[:, :, full_idx] = torch.matmul(qf, fk.transpose(-1, -2))[:, :, full_src]
    # where(), not an additive bias: slots past the request's tokens hold
    # stale bytes, whose float16 scales may be inf or NaN
    scores = torch.where(vis, scores.reshape(Hk, grp, Q, -1) * scale, float("-inf"))
    probs = torch.softmax(scores, dim=-1).reshape(Hk, grp * Q, nb * bs)
    return torch.matmul(probs, v).reshape(Hq, Q, D)


def needed_block_indices(
    pattern: SparsePattern | None, bs: int, ctx: int, seq_len: int, device
) -> torch.Tensor:
    n = -(-seq_len // bs)
    if pattern is None:
        return torch.arange(n, device=device)
    from vllm_adaptive.kernels.torch_sparse import needed_blocks

    return torch.tensor(needed_blocks(pattern, bs, ctx, seq_len, seq_len), dtype=torch.long, device=device)


def attention(
    layout: KiviLayout,
    views: KiviViews,
    query: torch.Tensor,  # [num_tokens, H_q, D]
    block_table: torch.Tensor,
    query_start_loc_cpu: torch.Tensor,
    seq_lens_cpu: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    pattern: SparsePattern | None = None,
    q_tile: int = 512,
    key: torch.Tensor | None = None,  # [num_tokens, H_kv, D] this step's keys (full precision)
    value: torch.Tensor | None = None,  # [num_tokens, H_kv, D]
) -> torch.Tensor:
    """Every request's queries over the packed cache (written first); with
    ``key`` / ``value``, this step's tokens are read from them instead."""
    bs = layout.block_size
    for req in requests(query_start_loc_cpu, seq_lens_cpu):
        row = block_table[req.index]
        fresh = None
        if key is not None:
            fresh = (key[req.q0:req.q1].transpose(0, 1), value[req.q0:req.q1].transpose(0, 1))
        full = full_precision_kv(layout, views, row, req.seq_len, fresh)  # every tile reads it
        for t0 in range(req.q0, req.q1, q_tile):
            t1 = min(req.q1, t0 + q_tile)
            hi = req.seq_len - (req.q1 - t1)  # keys visible to this tile end at hi
            lo = hi - (t1 - t0)
            blocks = needed_block_indices(pattern, bs, lo, hi, query.device)
            q = query[t0:t1].transpose(0, 1)
            o = attend_request(layout, views, q, row, blocks, req.seq_len, scale, pattern, q_end=hi,
                               full=full)
            out[t0:t1] = o.transpose(0, 1).to(out.dtype)
    return out


# ------------------------------------------------------------------ reference


def dequantized_kv(
    layout: KiviLayout, views: KiviViews, table_row: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache holds for one request, dequantized: ``[H, seq_len, D]``
    keys and values (the open segment's in full precision), float32. For tests."""
    bs, G, bits = layout.block_size, layout.group, layout.bits
    n = -(-seq_len // bs)
    phys = table_row[:n].long()
    kc = unpack(views.k_codes[phys], bits).float()  # [n, H, bs, D]
    ks = views.k_scale[phys].float()  # [n, H, ng, 2, D]
    ks = ks.repeat_interleave(G, dim=2)  # [n, H, bs, 2, D]
    k = kc * ks[..., 0, :] + ks[..., 1, :]
    v = _dequantized_values(layout, views, phys)
    H, D = k.shape[1], k.shape[3]
    k = k.transpose(0, 1).reshape(H, -1, D)[:, :seq_len].clone()
    v = v.transpose(0, 1).reshape(H, -1, D)[:, :seq_len].clone()
    e, res = _residual(layout, views, table_row, seq_len)
    if res is not None:
        k[:, e:seq_len] = res[:, :, 0].float()
        v[:, e:seq_len] = res[:, :, 1].float()
    return k, v
