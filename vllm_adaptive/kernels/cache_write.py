"""Triton KV-cache write: scatter this step's K/V rows into their pages.

One program per token; a negative slot (padding) writes nothing. Pure data
movement, so tests compare with ``atol=0``.
"""

from __future__ import annotations

import torch

from vllm_adaptive.kernels import _triton
from vllm_adaptive.kernels._triton import tl
from vllm_adaptive.kernels.checks import check_kv_cache_write


def _cache_write_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_size]
    value_ptr,  # [num_tokens, num_kv_heads, head_size]
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_size] (strided)
    v_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_size] (strided)
    slot_mapping_ptr,  # [num_tokens]
    stride_key_tok, stride_key_head,
    stride_value_tok, stride_value_head,
    stride_k_blk, stride_k_head, stride_k_tok,
    stride_v_blk, stride_v_head, stride_v_tok,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        h = tl.arange(0, HEADS_PAD)
        d = tl.arange(0, HEAD_PAD)
        mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_SIZE)[None, :]
        k = tl.load(key_ptr + tok * stride_key_tok + h[:, None] * stride_key_head + d[None, :], mask=mask)
        v = tl.load(value_ptr + tok * stride_value_tok + h[:, None] * stride_value_head + d[None, :], mask=mask)
        tl.store(
            k_cache_ptr + blk * stride_k_blk + h[:, None] * stride_k_head + off * stride_k_tok + d[None, :],
            k.to(k_cache_ptr.dtype.element_ty), mask=mask,
        )
        tl.store(
            v_cache_ptr + blk * stride_v_blk + h[:, None] * stride_v_head + off * stride_v_tok + d[None, :],
            v.to(v_cache_ptr.dtype.element_ty), mask=mask,
        )


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens], -1 = padding
) -> None:
    check_kv_cache_write(key, value, key_cache, value_cache, slot_mapping)
    n = slot_mapping.shape[0]
    if n == 0:
        return
    num_kv_heads, block_size, head_size = key_cache.shape[1:]
    kernel = _triton.jit(_cache_write_kernel)
    kernel[(n,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=_triton.next_pow2(num_kv_heads),
        HEAD_SIZE=head_size, HEAD_PAD=_triton.next_pow2(head_size), BLOCK_SIZE=block_size,
    )
