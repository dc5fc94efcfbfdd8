"""Triton block-sparse paged attention for LongGen sparse layers (prefill).

Same tiling as ``paged_prefill``: one program per (query tile, KV head), a
tile being BLOCK_Q consecutive query tokens of one request times the GROUP_PAD
query heads of one KV head (GQA), with an online softmax over key pages of
``block_size`` tokens. What differs is which pages a tile visits and where
their keys come from.

Pages visited. For a tile whose queries sit at positions ``P0 .. P1`` the
pattern (``vllm_adaptive.sparse_pattern``) splits the keys ``j <= P1`` into

- the local span: ``j >= lo_key``, the lowest key the window / local-block
  terms let ``P0`` read (later queries reach no lower): pages
  ``lo_page .. P1 // block_size``, all visited;
- below ``lo_page``: only pages holding a sink token (``j < sink``) or a token
  of a vertical-stride block (``(j // block + 1) % vert_stride == 0``).

One loop walks the pages in order and, below ``lo_page``, jumps straight to
the next page holding a sink or vertical-stride token, so a tile costs the
pages its pattern reads, not ``seq_len``. Every visited page is one that
``SparsePattern.block_needed`` keeps, so freed pages are never loaded, and
the visibility predicate masks the tokens of a visited page that a query may
not read.

Keys of position ``j < context_len`` come from the paged cache through
``block_table``; keys ``j >= context_len`` come from this step's fresh
``key``/``value`` rows (``query_start_loc[r] + j - context_len``), never from
the cache, whose pages for them may not exist. A page that holds no cached
token does not even read its ``block_table`` entry.

Layout and length conventions: ``vllm_adaptive.reference`` (see
``sparse_attention_ref``, which this kernel matches).
"""

from __future__ import annotations

import torch

from vllm_adaptive.kernels import _triton
from vllm_adaptive.kernels._triton import tl
from vllm_adaptive.kernels.sparse_checks import check_sparse_attention
from vllm_adaptive.kernels.triton_common import (
    find_request,
    local_span_start,
    next_visited_tile,
    pattern_visible,
    softmax_step,
)
from vllm_adaptive.sparse_pattern import SparsePattern


def _sparse_prefill_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size]
    q_ptr,  # [num_tokens, num_heads, head_size]
    k_ptr,  # [num_tokens, num_kv_heads, head_size] this step's keys (strided)
    v_ptr,  # [num_tokens, num_kv_heads, head_size] this step's values (strided)
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_size] (strided)
    v_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_size] (strided)
    block_table_ptr,  # [num_reqs, max_blocks_per_req]
    query_start_loc_ptr,  # [num_reqs + 1]
    seq_lens_ptr,  # [num_reqs]
    cu_qtiles_ptr,  # [num_reqs + 1], cumulative query tiles per request
    num_reqs,
    scale,
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
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
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,  # BLOCK_Q * GROUP_PAD
    FP32_DOT: tl.constexpr,  # exact fp32 dots (fp32 inputs, or bf16 under the interpreter)
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)

    req = find_request(cu_qtiles_ptr, tile, num_reqs)
    if req < num_reqs:
        # int32 scalars throughout, whatever the index dtypes: the page loop
        # carries them.
        q_start = tl.load(query_start_loc_ptr + req).to(tl.int32)
        query_len = tl.load(query_start_loc_ptr + req + 1).to(tl.int32) - q_start
        seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
        context_len = seq_len - query_len
        local_tile = tile - tl.load(cu_qtiles_ptr + req).to(tl.int32)

        rows = tl.arange(0, BLOCK_M)  # [BLOCK_M]
        q_idx = local_tile * BLOCK_Q + rows // GROUP_PAD
        g = rows % GROUP_PAD
        row_ok = (q_idx < query_len) & (g < QUERIES_PER_KV)
        head = kv_head * QUERIES_PER_KV + g
        d = tl.arange(0, HEAD_PAD)  # [HEAD_PAD]
        d_ok = d < HEAD_SIZE

        tok = (q_start + q_idx)[:, None]
        qd_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + tok * stride_q_tok + head[:, None] * stride_q_head + d[None, :],
                    mask=qd_ok, other=0.0)  # [BLOCK_M, HEAD_PAD]
        q_pos = context_len + q_idx  # [BLOCK_M]

        # The tile's queries sit at first_pos .. last_pos.
        first_pos = context_len + local_tile * BLOCK_Q
        last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
        hi_page = last_pos // BLOCK_SIZE
        lo_page = local_span_start(first_pos, WINDOW, PBLOCK, LOCAL_BLOCKS) // BLOCK_SIZE

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
        offs_n = tl.arange(0, BLOCK_SIZE)  # [BLOCK_SIZE]
        k_base = kv_head * stride_k_head + offs_n[None, :] * stride_k_tok + d[:, None]
        v_base = kv_head * stride_v_head + offs_n[:, None] * stride_v_tok + d[None, :]
        pg = tl.zeros([], dtype=tl.int32)
        while pg <= hi_page:
            # Below the local span only sink and vertical-stride pages count
            # (a jump lands at most on lo_page, which is <= hi_page).
            pg = next_visited_tile(pg, lo_page, BLOCK_SIZE, SINK, PBLOCK, VERT_STRIDE)

            page_start = pg * BLOCK_SIZE
            k_pos = page_start + offs_n  # [BLOCK_SIZE]
            k = tl.zeros([HEAD_PAD, BLOCK_SIZE], dtype=k_cache_ptr.dtype.element_ty)  # K^T
            v = tl.zeros([BLOCK_SIZE, HEAD_PAD], dtype=v_cache_ptr.dtype.element_ty)
            if page_start < context_len:  # cached keys
                page = tl.load(block_table_ptr + req * stride_bt + pg).to(tl.int64)
                cached = k_pos < context_len
                k = tl.load(k_cache_ptr + page * stride_k_blk + k_base,
                            mask=d_ok[:, None] & cached[None, :], other=0.0)
                v = tl.load(v_cache_ptr + page * stride_v_blk + v_base,
                            mask=cached[:, None] & d_ok[None, :], other=0.0)
            if page_start + BLOCK_SIZE > context_len:  # this step's keys
                fresh = (k_pos >= context_len) & (k_pos < seq_len)
                row = q_start + k_pos - context_len  # negative where not fresh (masked)
                k_new = tl.load(
                    k_ptr + row[None, :] * stride_kn_tok + kv_head * stride_kn_head + d[:, None],
                    mask=d_ok[:, None] & fresh[None, :], other=0.0,
                )
                v_new = tl.load(
                    v_ptr + row[:, None] * stride_vn_tok + kv_head * stride_vn_head + d[None, :],
                    mask=fresh[:, None] & d_ok[None, :], other=0.0,
                )
                k = tl.where(fresh[None, :], k_new, k)
                v = tl.where(fresh[:, None], v_new, v)

            if FP32_DOT:
                s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, k)
            s = s * scale  # [BLOCK_M, BLOCK_SIZE]

            visible = pattern_visible(q_pos[:, None], k_pos[None, :], SINK, WINDOW, PBLOCK,
                                      LOCAL_BLOCKS, VERT_STRIDE) & row_ok[:, None]
            p, alpha, m_i, l_i = softmax_step(s, visible, m_i, l_i)
            if FP32_DOT:
                pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            pg += 1

        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(out_ptr + tok * stride_o_tok + head[:, None] * stride_o_head + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=qd_ok)


def sparse_prefill(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size] this step's keys
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size] this step's values
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req]
    query_start_loc: torch.Tensor,  # [num_reqs + 1]
    seq_lens: torch.Tensor,  # [num_reqs]
    scale: float,
    pattern: SparsePattern,
    out: torch.Tensor | None = None,
    block_q: int | None = None,
) -> torch.Tensor:
    """Attention of every query over the keys ``pattern`` lets it read, for
    any mix of query lengths; equals ``reference.sparse_attention_ref``.

    Cache pages that no query of this step needs
    (``pattern.block_needed`` false) may be freed: their ``block_table``
    entries are never followed. ``block_q`` (query tokens per tile) is
    rounded so that a tile has at least 16 rows.
    """
    check_sparse_attention(
        query, key, value, key_cache, value_cache, block_table, query_start_loc,
        seq_lens, pattern, out,
    )
    if out is None:
        out = torch.empty_like(query)
    num_tokens, num_heads, head_size = query.shape
    num_reqs = seq_lens.shape[0]
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    group_pad = _triton.next_pow2(group)
    if block_q is None:
        block_q = max(1, 64 // group_pad)
    block_m = max(16, _triton.next_pow2(block_q) * group_pad)
    block_q = block_m // group_pad
    if num_reqs == 0 or num_tokens == 0:
        return out

    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    cu_qtiles = torch.zeros(num_reqs + 1, dtype=torch.int32, device=query.device)
    torch.cumsum((q_lens + block_q - 1) // block_q, 0, out=cu_qtiles[1:])
    # Upper bound on tiles without a device sync; surplus programs exit.
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    kernel = _triton.jit(_sparse_prefill_kernel)
    kernel[grid](
        out, query, key, value, key_cache, value_cache, block_table, query_start_loc,
        seq_lens, cu_qtiles, num_reqs, float(scale),
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0),
        SINK=pattern.sink, WINDOW=pattern.window, PBLOCK=max(1, pattern.block),
        LOCAL_BLOCKS=pattern.local_blocks, VERT_STRIDE=pattern.vert_stride,
        QUERIES_PER_KV=group, GROUP_PAD=group_pad,
        HEAD_SIZE=head_size, HEAD_PAD=max(16, _triton.next_pow2(head_size)),
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_M=block_m,
        # Triton 3.9's interpreter computes bf16 tl.dot wrongly, so under it
        # bf16 operands are rounded to bf16 as on the GPU and then multiplied
        # in fp32 (see paged_prefill).
        FP32_DOT=query.dtype == torch.float32
        or (query.dtype == torch.bfloat16 and _triton.interpreting()),
    )
    return out
