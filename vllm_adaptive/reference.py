"""Slow, obviously-right torch references. Every kernel is tested against these.

Paged KV layout used by the plugin's own kernels (torch path and Triton):

    key_cache    [num_blocks, num_kv_heads, block_size, head_size]
    value_cache  [num_blocks, num_kv_heads, block_size, head_size]

(strided views of vLLM's per-layer page ``[num_blocks, num_kv_heads, block_size,
2 * head_size]``: the first ``block_size * head_size`` elements of each
(block, head) page are K, the next ones V; see ``formats/model_dtype.py``).

Lengths, per request r (fixed once here; the same as ``vllm_adaptive/metadata.py``)::

    |<------------------- seq_len ------------------->|
    |<------- context_len ------->|<--- query_len --->|
     tokens already in the cache    tokens of this step (their KV is written
                                    to the cache before attention runs)

    query token i sits at position context_len + i and attends to key
    positions 0 .. context_len + i (causal).

``query_start_loc[r] : query_start_loc[r + 1]`` are request r's rows of
``query``; ``block_table[r, j]`` holds positions ``j*block_size ..
(j+1)*block_size - 1`` of request r.
"""

from __future__ import annotations

import torch

from vllm_adaptive.kernels.batch import requests


def write_kv_cache_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens], -1 = padding, skip
) -> None:
    block_size = key_cache.shape[2]
    for t in range(slot_mapping.shape[0]):
        slot = int(slot_mapping[t])
        if slot < 0:
            continue
        blk, off = divmod(slot, block_size)
        key_cache[blk, :, off, :] = key[t]
        value_cache[blk, :, off, :] = value[t]


def gather_request_kv(
    cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    block_table_row: torch.Tensor,  # [max_blocks_per_req]
    seq_len: int,
) -> torch.Tensor:  # [seq_len, num_kv_heads, head_size]
    block_size = cache.shape[2]
    rows = []
    for pos in range(seq_len):
        blk = int(block_table_row[pos // block_size])
        rows.append(cache[blk, :, pos % block_size, :])
    return torch.stack(rows, dim=0)


def _masked_heads(q, k, v, visible, scale, out) -> None:
    """out[:, h] = softmax(q[:, h] k^T * scale, masked to ``visible``) v, per
    query head h on KV head h // group, in float32."""
    group = q.shape[1] // k.shape[1]
    for h in range(q.shape[1]):
        scores = (q[:, h].float() @ k[:, h // group].T) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        out[:, h] = (torch.softmax(scores, dim=-1) @ v[:, h // group]).to(out.dtype)


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req]
    query_start_loc: torch.Tensor,  # [num_reqs + 1]
    seq_lens: torch.Tensor,  # [num_reqs]
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_size], query's dtype
    """Causal paged attention, one request and one head at a time, in float32."""
    num_heads = query.shape[1]
    num_kv_heads = key_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    out = torch.zeros_like(query)
    for r, q0, q1, context_len, seq_len in requests(query_start_loc, seq_lens):
        query_len = q1 - q0
        k = gather_request_kv(key_cache, block_table[r], seq_len).float()
        v = gather_request_kv(value_cache, block_table[r], seq_len).float()
        q_pos = context_len + torch.arange(query_len)
        k_pos = torch.arange(seq_len)
        visible = k_pos[None, :] <= q_pos[:, None]  # [query_len, seq_len]
        _masked_heads(query[q0:q1], k, v, visible, scale, out[q0:q1])
    return out


# --------------------------------------------------------------------------
# LongGen sparse layers (pattern.py). Two sources of keys per request:
#
#   positions 0 .. context_len-1       the paged cache, through block_table;
#                                      a block no query of this step needs
#                                      may have been freed (null) and must
#                                      not be read
#   positions context_len .. seq_len-1 this step's fresh ``key``/``value``
#                                      rows (query_start_loc), which are only
#                                      partly written to the cache: tokens no
#                                      later query can read go nowhere
# --------------------------------------------------------------------------


def sparse_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size] this step's keys
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req]
    query_start_loc: torch.Tensor,  # [num_reqs + 1]
    seq_lens: torch.Tensor,  # [num_reqs]
    scale: float,
    pattern,  # vllm_adaptive.sparse_pattern.SparsePattern
) -> torch.Tensor:
    """Dense masked attention in float32 over the pattern's keys."""
    num_kv_heads = key_cache.shape[1]
    block_size = key_cache.shape[2]
    head_size = query.shape[2]
    out = torch.zeros_like(query)
    for r, q0, q1, ctx, seq_len in requests(query_start_loc, seq_lens):
        k = torch.zeros(seq_len, num_kv_heads, head_size)
        v = torch.zeros(seq_len, num_kv_heads, head_size)
        for pos in range(ctx):
            b = pos // block_size
            if not pattern.block_needed(b, block_size, ctx, seq_len):
                continue  # possibly freed: never read
            blk = int(block_table[r, b])
            k[pos] = key_cache[blk, :, pos % block_size].float()
            v[pos] = value_cache[blk, :, pos % block_size].float()
        k[ctx:] = key[q0:q1].float()
        v[ctx:] = value[q0:q1].float()
        q_pos = torch.arange(ctx, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        visible = pattern.visible(q_pos, k_pos)
        _masked_heads(query[q0:q1], k, v, visible, scale, out[q0:q1])
    return out

