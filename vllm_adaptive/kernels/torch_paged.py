"""Torch path for the plugin's own paged layout: runs anywhere, used on CPU.

Vectorised over heads and tokens (one SDPA call per request), tested against
``reference.paged_attention_ref``. Layout and length conventions are those of
``vllm_adaptive.reference``. Blocks are gathered through the block table only
up to ``seq_len``, so pages a request does not own are never read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_adaptive.kernels.batch import requests
from vllm_adaptive.kernels.checks import check_kv_cache_write, check_paged_attention


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens], -1 = padding
    min_slot: int = 0,
) -> None:
    """Scatter this step's K/V rows into their pages. Slots below
    ``min_slot`` are not written: padding (-1) always, and for sparse layers
    the null block's slots (tokens no later query reads; ``kv/managers.py``)."""
    check_kv_cache_write(key, value, key_cache, value_cache, slot_mapping)
    n = slot_mapping.shape[0]
    slots = slot_mapping[:n].long()
    keep = slots >= max(min_slot, 0)
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[:n][keep], value[:n][keep]
    else:
        key, value = key[:n], value[:n]
    block_size = key_cache.shape[2]
    blk, off = slots // block_size, slots % block_size
    key_cache[blk, :, off] = key.to(key_cache.dtype)
    value_cache[blk, :, off] = value.to(value_cache.dtype)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, seq_len: int) -> torch.Tensor:
    # cache [num_blocks, H, block_size, D] -> [H, seq_len, D]
    pages = cache.index_select(0, blocks)  # [n, H, block_size, D]
    h, d = pages.shape[1], pages.shape[3]
    return pages.transpose(0, 1).reshape(h, -1, d)[:, :seq_len]


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req]
    query_start_loc: torch.Tensor,  # [num_reqs + 1]
    seq_lens: torch.Tensor,  # [num_reqs]
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_size]
) -> torch.Tensor:
    check_paged_attention(
        query, key_cache, value_cache, block_table, query_start_loc, seq_lens, out
    )
    if out is None:
        out = torch.empty_like(query)
    block_size = key_cache.shape[2]
    num_heads, num_kv_heads = query.shape[1], key_cache.shape[1]
    gqa = num_heads != num_kv_heads
    for r, q0, q1, context_len, seq_len in requests(query_start_loc, seq_lens):
        query_len = q1 - q0
        n_blocks = -(-seq_len // block_size)
        blocks = block_table[r, :n_blocks].long()
        k = _gather(key_cache, blocks, seq_len).to(query.dtype)
        v = _gather(value_cache, blocks, seq_len).to(query.dtype)
        q = query[q0:q1].transpose(0, 1)  # [H, query_len, D]
        if query_len == 1:
            mask, causal = None, False  # the one query sees every key
        elif context_len == 0:
            mask, causal = None, True
        else:
            q_pos = torch.arange(context_len, seq_len)
            mask = torch.arange(seq_len)[None, :] <= q_pos[:, None]
            causal = False
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
        )
        out[q0:q1] = o.transpose(0, 1)
    return out
