"""Triton paged attention for decode: one query token per request, split-KV.

At long context with a small batch, one program per (request, KV head) leaves
most of a GPU idle, so the key range is cut into NUM_SPLITS segments
(flash-decoding): pass 1 computes a partial (max, sum, weighted V) per segment,
pass 2 merges them. The GQA group's query heads share each K/V page load.
Layout and length conventions: ``vllm_adaptive.reference``.
"""

from __future__ import annotations

import torch

from vllm_adaptive.kernels import _triton, split_kv
from vllm_adaptive.kernels._triton import tl
from vllm_adaptive.kernels.checks import check_paged_attention
from vllm_adaptive.kernels.split_kv import store_partials
from vllm_adaptive.kernels.triton_common import softmax_step


def _paged_decode_split_kernel(
    m_part_ptr,  # [num_reqs, num_heads, NUM_SPLITS] fp32
    l_part_ptr,  # [num_reqs, num_heads, NUM_SPLITS] fp32
    acc_part_ptr,  # [num_reqs, num_heads, NUM_SPLITS, HEAD_PAD] fp32
    q_ptr,  # [num_tokens, num_heads, head_size]
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_size] (strided)
    v_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_size] (strided)
    block_table_ptr,  # [num_reqs, max_blocks_per_req]
    query_start_loc_ptr,  # [num_reqs + 1]
    seq_lens_ptr,  # [num_reqs]
    num_heads,
    scale,
    stride_q_tok, stride_q_head,
    stride_k_blk, stride_k_head, stride_k_tok,
    stride_v_blk, stride_v_head, stride_v_tok,
    stride_bt,
    QUERIES_PER_KV: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    tok = tl.load(query_start_loc_ptr + req)
    seq_len = tl.load(seq_lens_ptr + req)
    num_pages = tl.cdiv(seq_len, BLOCK_SIZE)
    pages_per_split = tl.cdiv(num_pages, NUM_SPLITS)
    first = split * pages_per_split
    last = tl.minimum(first + pages_per_split, num_pages)

    g = tl.arange(0, GROUP_PAD)  # [GROUP_PAD]
    g_ok = g < QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + g
    d = tl.arange(0, HEAD_PAD)  # [HEAD_PAD]
    d_ok = d < HEAD_SIZE
    q = tl.load(
        q_ptr + tok * stride_q_tok + head[:, None] * stride_q_head + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :], other=0.0,
    ).to(tl.float32)  # [GROUP_PAD, HEAD_PAD]

    m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_SIZE)
    for j in range(first, last):
        page = tl.load(block_table_ptr + req * stride_bt + j).to(tl.int64)
        k_pos = j * BLOCK_SIZE + offs_n
        k_ok = k_pos < seq_len
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_cache_ptr + page * stride_k_blk + kv_head * stride_k_head
            + offs_n[:, None] * stride_k_tok + d[None, :],
            mask=kv_mask, other=0.0,
        ).to(tl.float32)  # [BLOCK_SIZE, HEAD_PAD]
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK_SIZE]
        v = tl.load(  # before the softmax's reductions, so the load overlaps them
            v_cache_ptr + page * stride_v_blk + kv_head * stride_v_head
            + offs_n[:, None] * stride_v_tok + d[None, :],
            mask=kv_mask, other=0.0,
        ).to(tl.float32)  # [BLOCK_SIZE, HEAD_PAD]
        p, alpha, m_i, l_i = softmax_step(s, k_ok[None, :], m_i, l_i)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)

    store_partials(m_part_ptr, l_part_ptr, acc_part_ptr, req, head, split, num_heads,
                   m_i, l_i, acc, g_ok, HEAD_PAD, NUM_SPLITS)


def paged_decode(
    query: torch.Tensor,  # [num_reqs, num_heads, head_size] (one token per request)
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req]
    query_start_loc: torch.Tensor,  # [num_reqs + 1], every query_len == 1
    seq_lens: torch.Tensor,  # [num_reqs]
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int = 8,
) -> torch.Tensor:
    check_paged_attention(
        query, key_cache, value_cache, block_table, query_start_loc, seq_lens, out
    )
    split_kv.check_num_splits(num_splits)
    num_reqs = seq_lens.shape[0]
    if query.shape[0] < num_reqs:
        raise ValueError(
            f"query: expected one token per request ({num_reqs}), got {query.shape[0]}"
        )
    if out is None:
        out = torch.empty_like(query)
    _, num_heads, head_size = query.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_reqs == 0:
        return out
    parts = split_kv.partials(num_reqs, num_heads, num_splits, head_size, query.device)
    split_kernel = _triton.jit(_paged_decode_split_kernel)
    split_kernel[(num_reqs, num_kv_heads, num_splits)](
        *parts, query, key_cache, value_cache, block_table,
        query_start_loc, seq_lens, num_heads, float(scale),
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0),
        QUERIES_PER_KV=group, GROUP_PAD=_triton.next_pow2(group), HEAD_SIZE=head_size,
        HEAD_PAD=split_kv.head_pad(head_size), BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
    )
    split_kv.merge(out, parts, query_start_loc)
    return out
