"""Split-KV (flash-decoding) partials and their merge, shared by the dense
and block-sparse decode kernels.

A decode kernel cuts each (request, KV head)'s pages into ``NUM_SPLITS``
segments and stores, per (request, query head, split), a partial running max
``m``, sum ``l`` and weighted value sum ``acc``; the merge kernel combines the
splits into one output row per request. A request with query_len 0 gets no
output row, and a split that saw no key (``m = -1e30, l = 0``) weighs 0.

The partials' layout is written once, in two device functions that every
split-KV kernel calls (the KIVI attention kernel too, with its own rows and
lanes): :func:`store_partials` and :func:`merge_partials`.
"""

from __future__ import annotations

import torch

from vllm_adaptive.kernels import _triton
from vllm_adaptive.kernels._triton import helper, tl


@helper
def store_partials(
    m_part_ptr,  # [num_rows, num_heads, NUM_SPLITS] fp32
    l_part_ptr,  # [num_rows, num_heads, NUM_SPLITS] fp32
    acc_part_ptr,  # [num_rows, num_heads, NUM_SPLITS, LANES] fp32
    row,  # request (or token) of each stored row: a scalar or [R]
    head,  # [R] query heads
    split,
    num_heads,
    m_i,  # [R] running max
    l_i,  # [R] running sum
    acc,  # [R, LANES] weighted value sum
    row_ok,  # [R] rows to store
    LANES: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Store one split's partial (max, sum, weighted V) of rows ``(row, head)``."""
    part = (row * num_heads + head) * NUM_SPLITS + split  # [R]
    tl.store(m_part_ptr + part, m_i, mask=row_ok)
    tl.store(l_part_ptr + part, l_i, mask=row_ok)
    tl.store(acc_part_ptr + part[:, None] * LANES + tl.arange(0, LANES)[None, :], acc,
             mask=row_ok[:, None])


@helper
def merge_partials(
    m_part_ptr, l_part_ptr, acc_part_ptr,  # see store_partials
    row,  # scalar
    head,  # scalar
    num_heads,
    LANES: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """The attention output ``[LANES]`` (fp32) of row ``(row, head)``: every
    split's partial rescaled to the common max, summed, divided by the sum."""
    sp = tl.arange(0, NUM_SPLITS)
    base = (row * num_heads + head) * NUM_SPLITS
    m = tl.load(m_part_ptr + base + sp)  # [NUM_SPLITS]
    l = tl.load(l_part_ptr + base + sp)
    acc = tl.load(acc_part_ptr + (base + sp)[:, None] * LANES + tl.arange(0, LANES)[None, :])
    m_max = tl.max(m, axis=0)
    w = tl.exp(m - m_max)  # empty splits: m = -1e30, l = 0 -> weight 0
    l_tot = tl.sum(l * w, axis=0)
    return tl.sum(acc * w[:, None], axis=0) / tl.where(l_tot > 0, l_tot, 1.0)


def _merge_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size]
    m_part_ptr,  # [num_reqs, num_heads, NUM_SPLITS] fp32
    l_part_ptr,  # [num_reqs, num_heads, NUM_SPLITS] fp32
    acc_part_ptr,  # [num_reqs, num_heads, NUM_SPLITS, HEAD_PAD] fp32
    query_start_loc_ptr,  # [num_reqs + 1]
    num_heads,
    stride_o_tok, stride_o_head,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    tok = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) > tok:  # no output row otherwise
        d = tl.arange(0, HEAD_PAD)
        o = merge_partials(m_part_ptr, l_part_ptr, acc_part_ptr, req, head, num_heads,
                           HEAD_PAD, NUM_SPLITS)
        tl.store(
            out_ptr + tok * stride_o_tok + head * stride_o_head + d,
            o.to(out_ptr.dtype.element_ty), mask=d < HEAD_SIZE,
        )


def check_num_splits(num_splits: int) -> None:
    if not isinstance(num_splits, int) or num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits: expected a power of two >= 1, got {num_splits}")


def head_pad(head_size: int) -> int:
    """Padded head size of the partials (a power of two, at least 16)."""
    return max(16, _triton.next_pow2(head_size))


def partials(
    num_reqs: int, num_heads: int, num_splits: int, head_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (m, l, acc) buffers; every entry is written by the split kernel."""
    m = torch.empty(num_reqs, num_heads, num_splits, dtype=torch.float32, device=device)
    acc = torch.empty(
        num_reqs, num_heads, num_splits, head_pad(head_size), dtype=torch.float32, device=device
    )
    return m, torch.empty_like(m), acc


def merge(
    out: torch.Tensor,  # [num_tokens, num_heads, head_size]
    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    query_start_loc: torch.Tensor,  # [num_reqs + 1]
) -> None:
    m, l, acc = parts
    num_reqs, num_heads, num_splits = m.shape
    kernel = _triton.jit(_merge_kernel)
    kernel[(num_reqs, num_heads)](
        out, m, l, acc, query_start_loc, num_heads,
        out.stride(0), out.stride(1),
        HEAD_SIZE=out.shape[2], HEAD_PAD=acc.shape[3], NUM_SPLITS=num_splits,
    )
