"""KIVI quantized paged KV on the torch path (CPU, or anywhere): quantize and
pack on write, attention straight from the packed pages.

Layout and residual rules: ``vllm_adaptive/formats/kivi.py``. Everything here
is vectorised over tokens, heads and blocks; Python loops run over requests
only (host-side index plans).

**Attention without a dequantized cache.** For each request (each query tile
of a prefill) the kernel gathers only its own blocks' bytes (for sparse
layers, only the pattern's). Planar packing makes bit plane ``s`` the channel
slice ``s*cc .. (s+1)*cc - 1``, so unpacking is a shift and a mask on uint8
and never interleaves.

* Decode (few queries): scales never multiply the codes,

      q . k = sum_c (q_c * s_gc) code_tc + sum_c q_c * m_gc     (keys, per channel)
      sum_t p_t v_t = sum_t (p_t * s_t) code_t + sum_t p_t * m_t  (values, per token)

  so they fold into the small query and probability tensors and each plane's
  codes go straight into a matmul.
* Prefill tiles (many queries): the tile's blocks are dequantized (that
  request's visible blocks only, not the cache) and torch's fused SDPA runs
  on them; per-query folding would cost more than the keys themselves.

The residual keys (model dtype) of the request's open segment replace their
positions' keys. (A byte lookup table was 10x slower on CPU than bit ops.)
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


# ----------------------------------------------------------------- write plan


@dataclass
class WritePlan:
    """Host-built indices of one step's cache write (same for every layer).

    ``seg_*``: segments that complete this step, ``[n_seg, residual]`` token
    sources into ``cat(new keys, old residual keys)``; their block id and
    first row. ``old_*``: where the old residual keys sit (page, row).
    ``res_*``: new tokens of open segments -> (residual page, row)."""

    rows: torch.Tensor  # [n] new-token rows written (slot >= 0)
    slots: torch.Tensor  # [n] their slots
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
    slot_mapping: torch.Tensor,  # [num_tokens]
    num_tokens: int,
) -> WritePlan:
    """Index work on the host, vectorised per request (loops over requests only)."""
    R, bs = layout.residual, layout.block_size
    slots = slot_mapping[:num_tokens].long()
    rows = torch.nonzero(slots >= 0).flatten()
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
    dev = slot_mapping.device

    def cat(k: str, shape=(0,)) -> torch.Tensor:
        xs = parts[k]
        return (torch.cat(xs) if xs else torch.empty(shape, dtype=torch.long)).to(dev)

    return WritePlan(
        rows=rows, slots=slots[rows],
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
    bs, R, G, bits = layout.block_size, layout.residual, layout.group, layout.bits
    n_tok, H, D = key.shape
    # The old residual keys first: their pages are the blocks this step's
    # tokens (values, completed key segments) are about to fill.
    n_seg = plan.seg_src.shape[0]
    old = views.residual[plan.old_page, :, plan.old_row] if n_seg else None  # [n_old, H, D]
    # values: per token, at once
    if plan.rows.numel():
        v = value[plan.rows]
        codes, scale, mn = quantize(v, bits, dim=-1)  # [n, H, D], [n, H, 1]
        blk, off = plan.slots // bs, plan.slots % bs
        views.v_codes[blk, :, off] = pack(codes, bits)
        views.v_scale[blk, :, off] = torch.cat([scale, mn], dim=-1)
    # keys of completed segments: per channel, group by group
    if n_seg:
        src = torch.cat([key.to(old.dtype), old], dim=0)
        seg = src[plan.seg_src]  # [n_seg, R, H, D]
        seg = seg.reshape(n_seg, R // G, G, H, D)
        codes, scale, mn = quantize(seg, bits, dim=2)  # codes [n_seg, R/G, G, H, D]
        tok = plan.seg_row[:, None] + torch.arange(R, device=key.device)[None, :]  # [n_seg, R]
        blk = plan.seg_block[:, None].expand(-1, R)
        packed = pack(codes.reshape(n_seg, R, H, D), bits)  # [n_seg, R, H, cc]
        views.k_codes[blk, :, tok] = packed
        g = plan.seg_row[:, None] // G + torch.arange(R // G, device=key.device)[None, :]
        sm = torch.cat([scale, mn], dim=2)  # [n_seg, R/G, 2, H, D]
        views.k_scale[plan.seg_block[:, None].expand(-1, R // G), :, g] = sm.permute(0, 1, 3, 2, 4)
    if plan.res_rows.numel():
        views.residual[plan.res_page, :, plan.res_row] = key[plan.res_rows].to(views.residual.dtype)


# ------------------------------------------------------------------ attention


def _residual_keys(
    layout: KiviLayout, views: KiviViews, table_row: torch.Tensor, seq_len: int
) -> tuple[int, torch.Tensor | None]:
    """(first position, [H, n, D] keys) of the request's open segment."""
    e = seq_len // layout.residual * layout.residual
    n = seq_len - e
    if n == 0:
        return e, None
    tpp = layout.residual_tokens_per_page
    j = e // layout.block_size
    pages = table_row[j + 1 : j + 1 + -(-n // tpp)].long()
    res = views.residual[pages]  # [np, H, tpp, D]
    h, d = res.shape[1], res.shape[3]
    return e, res.transpose(0, 1).reshape(h, -1, d)[:, :n]


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
) -> torch.Tensor:
    """Attention of one request's queries over the packed keys / values of
    ``blocks`` (plus its residual keys); ``[H_q, Q, D]`` float32."""
    q_end = seq_len if q_end is None else q_end
    bs, G, bits = layout.block_size, layout.group, layout.bits
    Hq, Q, D = q.shape
    phys = table_row[blocks].long()
    Hk = views.k_codes.shape[1]
    grp = Hq // Hk
    nb = phys.numel()
    ng, cc = bs // G, layout.code_cols
    # Planar packing: bit-plane s of the gathered bytes holds channels
    # s*cc .. (s+1)*cc-1, so each plane is one matmul on a channel slice and
    # nothing is interleaved (bit ops on uint8, then one float conversion).
    kb = views.k_codes[phys]  # [nb, Hk, bs, cc] uint8
    ks = views.k_scale[phys].float()  # [nb, Hk, ng, 2, D]
    qf = q.float().reshape(Hk, grp * Q, D)  # [Hk, gQ, D]
    kpos = (blocks[:, None] * bs + torch.arange(bs, device=q.device)[None, :]).reshape(-1)
    qpos = torch.arange(q_end - Q, q_end, device=q.device)
    vis = (kpos[None, :] <= qpos[:, None]) & (kpos < seq_len)[None, :]
    if pattern is not None:
        vis = vis & pattern.visible(qpos[:, None], kpos[None, :])
    e, res = _residual_keys(layout, views, table_row, seq_len)
    if grp * Q * ng > G:
        # Many queries (a prefill tile): dequantize the keys and values of
        # these blocks only (this request's pattern, up to the tile's end)
        # and run torch's fused SDPA, which beats scores-by-hand on CPU.
        k = unpack(kb, bits).float().reshape(nb, Hk, ng, G, D)
        k = k.mul_(ks[:, :, :, None, 0]).add_(ks[:, :, :, None, 1])
        k = k.reshape(nb, Hk, bs, D).transpose(0, 1).reshape(Hk, nb * bs, D)
        if res is not None:
            idx = torch.nonzero((kpos >= e) & (kpos < seq_len)).flatten()
            k[:, idx] = res.float()[:, kpos[idx] - e]
        vs = views.v_scale[phys].float()  # [nb, Hk, bs, 2]
        v = unpack(views.v_codes[phys], bits).float().mul_(vs[..., 0:1]).add_(vs[..., 1:2])
        v = torch.where((kpos < seq_len).reshape(nb, 1, bs, 1), v, 0.0)  # stale slots: no NaN
        v = v.transpose(0, 1).reshape(Hk, nb * bs, D)
        k = torch.where((kpos < seq_len)[None, :, None], k, 0.0)
        out = F.scaled_dot_product_attention(
            q.float(), k, v, attn_mask=vis, scale=scale, enable_gqa=grp > 1
        )
        return out
    else:
        # few queries (decode): the per-channel scales fold into the query
        qs = qf[None, :, None] * ks[:, :, :, None, 0]  # [nb, Hk, ng, gQ, D]
        scores = (qf[None, :, None] * ks[:, :, :, None, 1]).sum(-1, keepdim=True)  # [nb, Hk, ng, gQ, 1]
        for s_, plane in enumerate(planes(kb, bits)):
            kc = plane.float().reshape(nb, Hk, ng, G, cc)
            scores = scores + torch.matmul(qs[..., s_ * cc:(s_ + 1) * cc], kc.transpose(-1, -2))
        scores = scores.permute(1, 3, 0, 2, 4).reshape(Hk, grp * Q, nb * bs)
    if res is not None:
        # the open segment's positions e .. seq_len-1 take full-precision keys
        sel = (kpos >= e) & (kpos < seq_len)
        idx = torch.nonzero(sel).flatten()
        rs = torch.matmul(q.float().reshape(Hk, grp * Q, D), res.float().transpose(-1, -2))
        scores[:, :, idx] = rs[:, :, kpos[idx] - e]
    # where(), not an additive bias: slots past the request's tokens hold
    # stale bytes, whose float16 scales may be inf or NaN
    scores = torch.where(vis, scores.reshape(Hk, grp, Q, -1) * scale, float("-inf"))
    probs = torch.softmax(scores, dim=-1).reshape(Hk, grp * Q, nb * bs)
    # values: out = (p * s_t) @ codes + p @ m_t, one matmul per block
    vs = views.v_scale[phys].float().permute(1, 0, 2, 3).reshape(Hk, nb * bs, 2)
    vs = torch.where((kpos < seq_len)[None, :, None], vs, 0.0)
    ps = (probs * vs[:, None, :, 0]).reshape(Hk, grp * Q, nb, bs).permute(2, 0, 1, 3)  # [nb, Hk, gQ, bs]
    out = torch.cat([torch.matmul(ps, plane.float()).sum(0) for plane in planes(views.v_codes[phys], bits)], -1)
    out = out + torch.matmul(probs, vs[:, :, 1:2])  # [Hk, gQ, D]
    return out.reshape(Hq, Q, D)


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
) -> torch.Tensor:
    """Every request's queries over the packed cache (written first)."""
    bs = layout.block_size
    for req in requests(query_start_loc_cpu, seq_lens_cpu):
        row = block_table[req.index]
        for t0 in range(req.q0, req.q1, q_tile):
            t1 = min(req.q1, t0 + q_tile)
            hi = req.seq_len - (req.q1 - t1)  # keys visible to this tile end at hi
            lo = hi - (t1 - t0)
            blocks = needed_block_indices(pattern, bs, lo, hi, query.device)
            q = query[t0:t1].transpose(0, 1)
            o = attend_request(layout, views, q, row, blocks, req.seq_len, scale, pattern, q_end=hi)
            out[t0:t1] = o.transpose(0, 1).to(out.dtype)
    return out


# ------------------------------------------------------------------ reference


def dequantized_kv(
    layout: KiviLayout, views: KiviViews, table_row: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache holds for one request, dequantized: ``[H, seq_len, D]``
    keys (residual keys in full precision) and values, float32. For tests."""
    bs, G, bits = layout.block_size, layout.group, layout.bits
    n = -(-seq_len // bs)
    phys = table_row[:n].long()
    kc = unpack(views.k_codes[phys], bits).float()  # [n, H, bs, D]
    ks = views.k_scale[phys].float()  # [n, H, ng, 2, D]
    ks = ks.repeat_interleave(G, dim=2)  # [n, H, bs, 2, D]
    k = kc * ks[..., 0, :] + ks[..., 1, :]
    vc = unpack(views.v_codes[phys], bits).float()
    vs = views.v_scale[phys].float()
    v = vc * vs[..., 0:1] + vs[..., 1:2]
    H, D = k.shape[1], k.shape[3]
    k = k.transpose(0, 1).reshape(H, -1, D)[:, :seq_len].clone()
    v = v.transpose(0, 1).reshape(H, -1, D)[:, :seq_len]
    e, res = _residual_keys(layout, views, table_row, seq_len)
    if res is not None:
        k[:, e:seq_len] = res.float()
    return k, v
