"""Triton block-sparse paged attention for LongGen sparse layers (decode).

One query token per request (query_len 1; a request with query_len 0 is
skipped), split-KV as in ``paged_decode``: pass 1 computes a partial (max,
sum, weighted V) per (request, KV head, split), pass 2 merges the splits. The
GQA group's query heads share each K/V page load.

Pages visited are those of ``sparse_prefill`` for a one-query tile at
position ``p = context_len``: the local span ``lo_page .. p // block_size``
(``lo_page`` holds the lowest key the window / local-block terms let ``p``
read) and, below it, only pages holding a sink or a vertical-stride token,
reached by jumping from one to the next. The splits share that walk out
round-robin (the n-th visited page goes to split ``n % NUM_SPLITS``), so they
stay balanced however the pattern clusters its pages, and only the owner
loads a page. Freed pages (``SparsePattern.block_needed`` false) are never
loaded.

Keys ``j < context_len`` come from the paged cache; the query's own key
(``j = context_len``) comes from this step's fresh ``key``/``value`` row, never
from the cache. Layout and length conventions: ``vllm_adaptive.reference``
(see ``sparse_attention_ref``, which this kernel matches).
"""

from __future__ import annotations

import torch

from vllm_adaptive.kernels import _triton, split_kv
from vllm_adaptive.kernels._triton import tl
from vllm_adaptive.kernels.sparse_checks import check_sparse_attention
from vllm_adaptive.kernels.split_kv import store_partials
from vllm_adaptive.kernels.triton_common import (
    local_span_start,
    next_visited_tile,
    pattern_visible,
    softmax_step,
)
from vllm_adaptive.sparse_pattern import SparsePattern


def _sparse_decode_split_kernel(
    m_part_ptr,  # [num_reqs, num_heads, NUM_SPLITS] fp32
    l_part_ptr,  # [num_reqs, num_heads, NUM_SPLITS] fp32
    acc_part_ptr,  # [num_reqs, num_heads, NUM_SPLITS, HEAD_PAD] fp32
    q_ptr,  # [num_tokens, num_heads, head_size]
    k_ptr,  # [num_tokens, num_kv_heads, head_size] this step's keys (strided)
    v_ptr,  # [num_tokens, num_kv_heads, head_size] this step's values (strided)
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_size] (strided)
    v_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_size] (strided)
    block_table_ptr,  # [num_reqs, max_blocks_per_req]
    query_start_loc_ptr,  # [num_reqs + 1]
    seq_lens_ptr,  # [num_reqs]
    num_heads,
    scale,
    stride_q_tok, stride_q_head,
    stride_kn_tok, stride_kn_head,
    stride_vn_tok, stride_vn_head,
    stride_k_blk, stride_k_head, stride_k_tok,
    stride_v_blk, stride_v_head, stride_v_tok,
    stride_bt,
    SINK: tl.constexpr,  # pattern terms, 0 = off (sparse_pattern.SparsePattern)
    WINDOW: tl.constexpr,
    PBLOCK: tl.constexpr,  # the pattern's block, not the cache page
    LOCAL_BLOCKS: tl.constexpr,
    VERT_STRIDE: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # cache page size
    NUM_SPLITS: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    g = tl.arange(0, GROUP_PAD)  # [GROUP_PAD]
    g_ok = g < QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + g
    d = tl.arange(0, HEAD_PAD)  # [HEAD_PAD]
    d_ok = d < HEAD_SIZE
    m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], dtype=tl.float32)

    # int32 scalars throughout, whatever the index dtypes: the page loop
    # carries them.
    tok = tl.load(query_start_loc_ptr + req).to(tl.int32)
    query_len = tl.load(query_start_loc_ptr + req + 1).to(tl.int32) - tok
    if query_len > 0:
        pos = tl.load(seq_lens_ptr + req).to(tl.int32) - 1  # = context_len
        q = tl.load(
            q_ptr + tok * stride_q_tok + head[:, None] * stride_q_head + d[None, :],
            mask=g_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(tl.float32)  # [GROUP_PAD, HEAD_PAD]
        k_new = tl.load(k_ptr + tok * stride_kn_tok + kv_head * stride_kn_head + d,
                        mask=d_ok, other=0.0).to(tl.float32)  # [HEAD_PAD]
        v_new = tl.load(v_ptr + tok * stride_vn_tok + kv_head * stride_vn_head + d,
                        mask=d_ok, other=0.0).to(tl.float32)  # [HEAD_PAD]

        hi_page = pos // BLOCK_SIZE
        lo_page = local_span_start(pos, WINDOW, PBLOCK, LOCAL_BLOCKS) // BLOCK_SIZE

        offs_n = tl.arange(0, BLOCK_SIZE)  # [BLOCK_SIZE]
        k_base = kv_head * stride_k_head + offs_n[:, None] * stride_k_tok + d[None, :]
        v_base = kv_head * stride_v_head + offs_n[:, None] * stride_v_tok + d[None, :]
        pg = tl.zeros([], dtype=tl.int32)
        n = tl.zeros([], dtype=tl.int32)  # ordinal of the page among those visited
        while pg <= hi_page:
            # Below the local span only sink and vertical-stride pages count
            # (a jump lands at most on lo_page, which is <= hi_page).
            pg = next_visited_tile(pg, lo_page, BLOCK_SIZE, SINK, PBLOCK, VERT_STRIDE)

            if n % NUM_SPLITS == split:
                k_pos = pg * BLOCK_SIZE + offs_n  # [BLOCK_SIZE]
                k = tl.zeros([BLOCK_SIZE, HEAD_PAD], dtype=tl.float32)
                v = tl.zeros([BLOCK_SIZE, HEAD_PAD], dtype=tl.float32)
                if pg * BLOCK_SIZE < pos:  # cached keys
                    page = tl.load(block_table_ptr + req * stride_bt + pg).to(tl.int64)
                    cached = (k_pos < pos)[:, None] & d_ok[None, :]
                    k = tl.load(k_cache_ptr + page * stride_k_blk + k_base,
                                mask=cached, other=0.0).to(tl.float32)  # [BLOCK_SIZE, HEAD_PAD]
                    v = tl.load(v_cache_ptr + page * stride_v_blk + v_base,
                                mask=cached, other=0.0).to(tl.float32)  # [BLOCK_SIZE, HEAD_PAD]
                own = (k_pos == pos)[:, None]
                k = tl.where(own, k_new[None, :], k)
                v = tl.where(own, v_new[None, :], v)

                s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK_SIZE]
                visible = pattern_visible(pos, k_pos[None, :], SINK, WINDOW, PBLOCK, LOCAL_BLOCKS,
                                          VERT_STRIDE) & g_ok[:, None]  # [GROUP_PAD, BLOCK_SIZE]
                p, alpha, m_i, l_i = softmax_step(s, visible, m_i, l_i)
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            n += 1
            pg += 1

    store_partials(m_part_ptr, l_part_ptr, acc_part_ptr, req, head, split, num_heads,
                   m_i, l_i, acc, g_ok, HEAD_PAD, NUM_SPLITS)


def sparse_decode(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size] this step's keys
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size] this step's values
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req]
    query_start_loc: torch.Tensor,  # [num_reqs + 1], every query_len 0 or 1
    seq_lens: torch.Tensor,  # [num_reqs]
    scale: float,
    pattern: SparsePattern,
    out: torch.Tensor | None = None,
    num_splits: int = 8,
) -> torch.Tensor:
    """Sparse attention for decode steps; equals
    ``reference.sparse_attention_ref`` when every query_len is 0 or 1 (not
    checked: that would need a device sync). Rows of ``out`` that belong to
    no request are left untouched.

    Cache pages that no query of this step needs
    (``pattern.block_needed`` false) may be freed: their ``block_table``
    entries are never followed. ``num_splits`` (a power of two) is the
    split-KV factor.
    """
    check_sparse_attention(
        query, key, value, key_cache, value_cache, block_table, query_start_loc,
        seq_lens, pattern, out,
    )
    split_kv.check_num_splits(num_splits)
    if out is None:
        out = torch.empty_like(query)
    num_reqs = seq_lens.shape[0]
    if num_reqs == 0:
        return out
    _, num_heads, head_size = query.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    parts = split_kv.partials(num_reqs, num_heads, num_splits, head_size, query.device)
    split_kernel = _triton.jit(_sparse_decode_split_kernel)
    split_kernel[(num_reqs, num_kv_heads, num_splits)](
        *parts, query, key, value, key_cache, value_cache, block_table,
        query_start_loc, seq_lens, num_heads, float(scale),
        query.stride(0), query.stride(1),
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0),
        SINK=pattern.sink, WINDOW=pattern.window, PBLOCK=max(1, pattern.block),
        LOCAL_BLOCKS=pattern.local_blocks, VERT_STRIDE=pattern.vert_stride,
        QUERIES_PER_KV=group, GROUP_PAD=_triton.next_pow2(group), HEAD_SIZE=head_size,
        HEAD_PAD=split_kv.head_pad(head_size), BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
    )
    split_kv.merge(out, parts, query_start_loc)
    return out
