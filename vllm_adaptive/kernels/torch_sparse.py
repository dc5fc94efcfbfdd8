"""Torch path for LongGen sparse layers (CPU, or anywhere Triton is not used).

Conventions are those of ``reference.sparse_attention_ref``: keys before the
request's ``context_len`` come from the paged cache, keys of this step from the
fresh ``key``/``value`` rows. Only the positions of the pattern are gathered
(sinks, vertical-stride blocks, and the window / local span of each query
tile), so a block the manager freed is never read and the work per query is
bounded by the pattern, not by the context. Queries are processed in tiles of
``q_tile`` rows; each tile is one SDPA call with a boolean mask. Decode rows
(one query per request) are batched across requests: each gathers its needed
*blocks* (sinks, vertical stride, window span), padded to a common count with
copies of its own first needed block, masked at token granularity, in fp32.

Which keys each query reads depends only on positions, so it is planned once
per step (``plan_sparse``, called by the metadata builder) and reused by every
sparse layer of the KV-cache group (``run_sparse``).

Only blocks the pattern needs are gathered. Inside a needed block, slots past
the request's context are masked; they hold stale or zero-initialised (vLLM
allocates the cache with zeros) finite values, never a freed block's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataclasses import dataclass, field

from vllm_adaptive.kernels.batch import requests
from vllm_adaptive.kernels.checks import check_paged_attention
from vllm_adaptive.sparse_pattern import SparsePattern

Q_TILE = 256


def needed_positions(pattern: SparsePattern, q_lo: int, q_hi: int) -> torch.Tensor:
    """Sorted key positions ``< q_hi`` that some query in ``[q_lo, q_hi)`` may
    read (exact, at token granularity)."""
    parts = []
    if pattern.sink:
        parts.append(torch.arange(min(pattern.sink, q_hi)))
    span_lo = pattern.span_start(q_lo)  # first position of the tile's window / local span
    if pattern.vert_stride:
        g, v = pattern.block, pattern.vert_stride
        n_groups = -(-span_lo // g)  # groups that start before the span
        if n_groups > v - 1:
            starts = torch.arange(v - 1, n_groups, v) * g  # groups with (k + 1) % v == 0
            parts.append((starts[:, None] + torch.arange(g)[None, :]).reshape(-1))
    parts.append(torch.arange(span_lo, q_hi))
    pos = torch.cat(parts)
    pos = pos[pos < q_hi]
    return torch.unique(pos)  # sorted, deduplicated (sink may overlap the span)


def needed_blocks(pattern: SparsePattern, bs: int, q_lo: int, q_hi: int, ctx: int) -> list[int]:
    """Cache block indices (holding positions ``< ctx``) some query in
    ``[q_lo, q_hi)`` reads; equal to filtering ``block_needed`` over all
    blocks, computed from the pattern's terms."""
    n = -(-ctx // bs)
    out: set[int] = set()
    if pattern.sink:
        out.update(range(min(-(-pattern.sink // bs), n)))
    span_lo = pattern.span_start(q_lo)
    out.update(range(span_lo // bs, n))
    if pattern.vert_stride:
        g, v = pattern.block, pattern.vert_stride
        for grp in range(v - 1, -(-min(span_lo, ctx) // g), v):
            out.update(range(grp * g // bs, min(-(-(grp + 1) * g // bs), n)))
    return sorted(out)


@dataclass
class DecodePlan:
    """One query per request, batched: ``rows`` of ``query``; ``ids`` the
    physical cache blocks each reads [n, width]; ``bias`` 0 / -inf per slot."""

    rows: torch.Tensor  # [n] long
    ids: torch.Tensor  # [n, width] long
    bias: torch.Tensor  # [n, 1, width * block_size] float32
    # The slots a row reads, [n, 1, width * block_size, 1]: the others are
    # zeroed after the gather, whatever they hold (a row with no cached key,
    # the padding of a short row, a block's unwritten tail, which may hold
    # another KV format's bytes: ``runner.Geometry.foreign_pages``), since a
    # -inf bias alone leaves 0 * NaN in the weighted sum.
    keep: torch.Tensor | None = None


@dataclass
class TilePlan:
    """Queries ``query[q0:q1]``; keys: cache slots (blk, off), then fresh rows."""

    q0: int
    q1: int
    cache_blk: torch.Tensor  # [k_c] long, physical block of each cached key
    cache_off: torch.Tensor  # [k_c] long
    fresh: torch.Tensor  # [k_f] long, rows of key/value
    mask: torch.Tensor  # [q1 - q0, k_c + k_f] bool, True = attend


@dataclass
class SparsePlan:
    decode: DecodePlan | None = None
    tiles: list[TilePlan] = field(default_factory=list)


def plan_sparse(
    pattern: SparsePattern,
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req]
    query_start_loc: torch.Tensor,  # [num_reqs + 1]
    seq_lens: torch.Tensor,  # [num_reqs]
    block_size: int,
    q_tile: int = Q_TILE,
) -> SparsePlan:
    plan = SparsePlan()
    dec_rows: list[int] = []
    dec_blocks: list[list[int]] = []
    dec_ctx: list[int] = []
    dec_req: list[int] = []
    for r, q0, q1, ctx, seq_len in requests(query_start_loc, seq_lens):
        if q1 - q0 == 1:
            dec_rows.append(q0)
            dec_req.append(r)
            dec_ctx.append(ctx)
            dec_blocks.append(needed_blocks(pattern, block_size, ctx, ctx + 1, ctx))
            continue
        row = block_table[r].long()
        for t0 in range(ctx, seq_len, q_tile):
            t1 = min(t0 + q_tile, seq_len)
            pos = needed_positions(pattern, t0, t1)
            cached = pos[pos < ctx]
            plan.tiles.append(TilePlan(
                q0=q0 + t0 - ctx, q1=q0 + t1 - ctx,
                cache_blk=row[cached // block_size], cache_off=cached % block_size,
                fresh=pos[pos >= ctx] - ctx + q0,
                mask=pattern.visible(torch.arange(t0, t1)[:, None], pos[None, :]),
            ))
    if dec_rows:
        n = len(dec_rows)
        width = max(1, max(len(b) for b in dec_blocks))
        idx = torch.zeros(n, width, dtype=torch.long)
        valid = torch.zeros(n, width, dtype=torch.bool)
        for i, blocks in enumerate(dec_blocks):
            if blocks:
                idx[i, : len(blocks)] = torch.tensor(blocks)
                idx[i, len(blocks):] = blocks[0]
                valid[i, : len(blocks)] = True
        ids = block_table[torch.tensor(dec_req)[:, None], idx].long()
        pos = (idx[:, :, None] * block_size + torch.arange(block_size)).reshape(n, -1)
        ctx_t = torch.tensor(dec_ctx)[:, None]
        keep = valid.repeat_interleave(block_size, dim=1) & (pos < ctx_t) & pattern.visible(ctx_t, pos)
        bias = torch.zeros(n, 1, width * block_size).masked_fill(~keep[:, None, :], float("-inf"))
        plan.decode = DecodePlan(rows=torch.tensor(dec_rows), ids=ids, bias=bias,
                                 keep=keep[:, None, :, None])
    return plan


def run_sparse(
    plan: SparsePlan,
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size] this step's keys
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    gqa = query.shape[1] != key_cache.shape[1]
    for t in plan.tiles:
        k = torch.cat([key_cache[t.cache_blk, :, t.cache_off], key[t.fresh]]).to(query.dtype)
        v = torch.cat([value_cache[t.cache_blk, :, t.cache_off], value[t.fresh]]).to(query.dtype)
        o = F.scaled_dot_product_attention(
            query[t.q0 : t.q1].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=t.mask, scale=scale, enable_gqa=gqa,
        )
        out[t.q0 : t.q1] = o.transpose(0, 1)
    if plan.decode is not None:
        _run_decode(plan.decode, query, key, value, key_cache, value_cache, scale, out)
    return out


def _run_decode(d: DecodePlan, query, key, value, key_cache, value_cache, scale, out) -> None:
    n, width = d.ids.shape
    hk, bs, hd = key_cache.shape[1], key_cache.shape[2], key_cache.shape[3]
    g = query.shape[1] // hk
    # [n, width, Hk, bs, D] -> [n*Hk, width*bs, D], fp32 like the other paths' softmax
    k = key_cache[d.ids].permute(0, 2, 1, 3, 4).reshape(n * hk, width * bs, hd).float()
    v = value_cache[d.ids].permute(0, 2, 1, 3, 4).reshape(n * hk, width * bs, hd).float()
    k.view(n, hk, -1, hd).masked_fill_(~d.keep, 0.0)
    v.view(n, hk, -1, hd).masked_fill_(~d.keep, 0.0)
    q = query[d.rows].reshape(n * hk, g, hd).float()
    k_new = key[d.rows].reshape(n * hk, 1, hd).float()  # the query's own key
    v_new = value[d.rows].reshape(n * hk, 1, hd).float()
    scores = torch.bmm(q, k.transpose(1, 2)).view(n, hk, g, -1) * scale + d.bias[:, :, None, :]
    self_score = (q * k_new).sum(-1).view(n, hk, g, 1) * scale
    probs = torch.softmax(torch.cat([scores, self_score], dim=-1), dim=-1).view(n * hk, g, -1)
    o = torch.bmm(probs[..., :-1], v) + probs[..., -1:] * v_new
    out[d.rows] = o.view(n, hk * g, hd).to(out.dtype)


def sparse_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size] this step's keys
    value: torch.Tensor,
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req]
    query_start_loc: torch.Tensor,  # [num_reqs + 1]
    seq_lens: torch.Tensor,  # [num_reqs]
    scale: float,
    pattern: SparsePattern,
    out: torch.Tensor | None = None,
    q_tile: int = Q_TILE,
) -> torch.Tensor:
    """Plan and run in one call (tests; the backend plans once per step)."""
    check_paged_attention(
        query, key_cache, value_cache, block_table, query_start_loc, seq_lens, out
    )
    if key.shape[0] < query.shape[0] or key.shape[1:] != (key_cache.shape[1], query.shape[2]):
        raise ValueError(
            f"key {tuple(key.shape)} must be [num_tokens >= {query.shape[0]}, "
            f"{key_cache.shape[1]}, {query.shape[2]}]"
        )
    if out is None:
        out = torch.empty_like(query)
    plan = plan_sparse(pattern, block_table, query_start_loc, seq_lens, key_cache.shape[2], q_tile)
    return run_sparse(plan, query, key, value, key_cache, value_cache, scale, out)
