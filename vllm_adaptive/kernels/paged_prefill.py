"""Triton paged attention for prefill (and mixed prefill/decode batches).

One program per (query tile, KV head). A query tile is BLOCK_Q consecutive
query tokens of one request times the GROUP_PAD query heads that share the KV
head (GQA), so K/V pages are loaded once per group. Keys are visited one
KV-cache page at a time with an online softmax (FlashAttention-2). The tile
stops at the last key position its last query token may see, so the pages of
the causal future are never loaded, and keys beyond ``seq_len`` are masked at
load time (never read as garbage). Layout and length conventions:
``vllm_adaptive.reference``.
"""

from __future__ import annotations

import torch

from vllm_adaptive.kernels import _triton
from vllm_adaptive.kernels._triton import tl
from vllm_adaptive.kernels.checks import check_paged_attention
from vllm_adaptive.kernels.triton_common import find_request, softmax_step


def _paged_prefill_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size]
    q_ptr,  # [num_tokens, num_heads, head_size]
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
    stride_k_blk, stride_k_head, stride_k_tok,
    stride_v_blk, stride_v_head, stride_v_tok,
    stride_bt,
    QUERIES_PER_KV: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,  # BLOCK_Q * GROUP_PAD
    FP32_DOT: tl.constexpr,  # exact fp32 dots (fp32 inputs, or bf16 under the interpreter)
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)

    req = find_request(cu_qtiles_ptr, tile, num_reqs)
    if req < num_reqs:
        q_start = tl.load(query_start_loc_ptr + req)
        query_len = tl.load(query_start_loc_ptr + req + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + req)
        context_len = seq_len - query_len
        local_tile = tile - tl.load(cu_qtiles_ptr + req)

        rows = tl.arange(0, BLOCK_M)  # [BLOCK_M]
        q_idx = local_tile * BLOCK_Q + rows // GROUP_PAD
        g = rows % GROUP_PAD
        row_ok = (q_idx < query_len) & (g < QUERIES_PER_KV)
        head = kv_head * QUERIES_PER_KV + g
        d = tl.arange(0, HEAD_PAD)  # [HEAD_PAD]
        d_ok = d < HEAD_SIZE

        q_offs = (q_start + q_idx)[:, None] * stride_q_tok + head[:, None] * stride_q_head + d[None, :]
        q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, HEAD_PAD]
        q_pos = context_len + q_idx  # [BLOCK_M]

        # Keys this tile can see end at its last query token's position.
        last_pos = tl.minimum(context_len + (local_tile + 1) * BLOCK_Q, seq_len)
        num_pages = tl.cdiv(last_pos, BLOCK_SIZE)

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
        offs_n = tl.arange(0, BLOCK_SIZE)  # [BLOCK_SIZE]
        for j in range(0, num_pages):
            page = tl.load(block_table_ptr + req * stride_bt + j).to(tl.int64)
            k_pos = j * BLOCK_SIZE + offs_n
            k_ok = k_pos < seq_len
            k = tl.load(
                k_cache_ptr + page * stride_k_blk + kv_head * stride_k_head
                + offs_n[None, :] * stride_k_tok + d[:, None],
                mask=d_ok[:, None] & k_ok[None, :], other=0.0,
            )  # [HEAD_PAD, BLOCK_SIZE]
            if FP32_DOT:
                s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, k)
            s = s * scale  # [BLOCK_M, BLOCK_SIZE]
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :] & row_ok[:, None]
            p, alpha, m_i, l_i = softmax_step(s, visible, m_i, l_i)
            v = tl.load(
                v_cache_ptr + page * stride_v_blk + kv_head * stride_v_head
                + offs_n[:, None] * stride_v_tok + d[None, :],
                mask=k_ok[:, None] & d_ok[None, :], other=0.0,
            )  # [BLOCK_SIZE, HEAD_PAD]
            if FP32_DOT:
                pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv

        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        o_offs = (q_start + q_idx)[:, None] * stride_o_tok + head[:, None] * stride_o_head + d[None, :]
        tl.store(out_ptr + o_offs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_prefill(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req]
    query_start_loc: torch.Tensor,  # [num_reqs + 1]
    seq_lens: torch.Tensor,  # [num_reqs]
    scale: float,
    out: torch.Tensor | None = None,
    block_q: int | None = None,
) -> torch.Tensor:
    """Causal paged attention for any mix of query lengths."""
    check_paged_attention(
        query, key_cache, value_cache, block_table, query_start_loc, seq_lens, out
    )
    block_size = key_cache.shape[2]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(
            f"key_cache.shape[2] (block_size): expected a power of two >= 16, got {block_size}"
        )
    if out is None:
        out = torch.empty_like(query)
    num_tokens, num_heads, head_size = query.shape
    num_reqs = seq_lens.shape[0]
    num_kv_heads = key_cache.shape[1]
    group = num_heads // num_kv_heads
    group_pad = _triton.next_pow2(group)
    if block_q is None:
        block_q = max(1, 64 // group_pad)
    block_m = max(16, block_q * group_pad)
    block_q = block_m // group_pad

    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    cu_qtiles = torch.zeros(num_reqs + 1, dtype=torch.int32, device=query.device)
    torch.cumsum((q_lens + block_q - 1) // block_q, 0, out=cu_qtiles[1:])
    # Upper bound on tiles without a device sync; surplus programs exit.
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    kernel = _triton.jit(_paged_prefill_kernel)
    kernel[grid](
        out, query, key_cache, value_cache, block_table, query_start_loc, seq_lens,
        cu_qtiles, num_reqs, float(scale),
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0),
        QUERIES_PER_KV=group, GROUP_PAD=group_pad,
        HEAD_SIZE=head_size, HEAD_PAD=max(16, _triton.next_pow2(head_size)),
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_M=block_m,
        # Triton 3.9's interpreter computes bf16 tl.dot wrongly (seen: errors
        # of 1e10 on a 16x16 product), so under it bf16 operands are rounded
        # to bf16 as on the GPU and then multiplied in fp32.
        FP32_DOT=query.dtype == torch.float32
        or (query.dtype == torch.bfloat16 and _triton.interpreting()),
    )
    return out

