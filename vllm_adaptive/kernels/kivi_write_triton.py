"""Triton quantize-on-write for KIVI's packed paged KV (``formats/kivi.py``);
attention from the pages is ``kivi_attention_triton``, whose docstring gives
the planar channel order the codes are packed in.

:func:`kivi_write`: one launch, one program per (item, KV head), items being:
a group of ``group`` tokens of a completed segment (keys: per-channel
quantize over the group's tokens; values: per-token quantize over each
channel group; tokens taken from ``cat(new, old residual)`` through
``plan.seg_src``), or a residual token copy (key and value). The old
residual tokens are gathered with torch first (their pages may be the
blocks this step fills); all the kernel's writes are then disjoint, so their
order does not matter. Arithmetic is that of ``kernels.kivi.quantize`` step
by step in float32 with IEEE-rounded division (``div_rn``) and
round-half-to-even (``triton_common.minmax_scale`` / ``minmax_codes``), so
codes and scales are bit-identical to the torch path.
"""

from __future__ import annotations

import torch

from vllm_adaptive.formats.kivi import KiviLayout
from vllm_adaptive.kernels import _triton
from vllm_adaptive.kernels._triton import tl
from vllm_adaptive.kernels.kivi import WritePlan
from vllm_adaptive.kernels.triton_common import minmax_codes, minmax_scale


@_triton.helper
def _group_rows(fresh_ptr, stride_tok, stride_head, old_ptr, old_off, src, h, chan, new, ld_new, ld_old, res_ptr):
    """A segment group's keys or values as float32 [G_PAD, DP]: this step's
    rows from the fresh tensor (rounded to the residual's dtype, ``res_ptr``'s,
    as stored), earlier rows from the residual copy (``old_off``)."""
    res_dt = res_ptr.dtype.element_ty
    return tl.where(
        new[:, None],
        tl.load(fresh_ptr + src[:, None] * stride_tok + h * stride_head + chan[None, :],
                mask=ld_new, other=0.0).to(res_dt).to(tl.float32),
        tl.load(old_ptr + old_off, mask=ld_old, other=0.0).to(tl.float32),
    )


def _kivi_write_kernel(
    pages_ptr,  # [num_blocks, H, page_bytes] uint8
    res_ptr,  # the same cache in the model dtype (residual tokens)
    key_ptr,  # [num_tokens, H, D]
    value_ptr,  # [num_tokens, H, D]
    old_k_ptr,  # [n_old, H, D] old residual keys (model dtype)
    old_v_ptr,  # [n_old, H, D] old residual values
    seg_src_ptr,  # [n_seg, RESIDUAL] rows of cat(new, old)
    seg_block_ptr, seg_row_ptr,  # [n_seg]
    res_rows_ptr, res_page_ptr, res_row_ptr,  # [n_res]
    n_seg_groups,
    n_tok,
    stride_k_tok, stride_k_head,
    stride_v_tok, stride_v_head,
    stride_old_tok, stride_old_head,  # old_k and old_v alike
    stride_pg_blk, stride_pg_head,
    stride_res_blk, stride_res_head,
    HEAD_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    CC: tl.constexpr,
    CC_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    RESIDUAL: tl.constexpr,
    V_GROUP: tl.constexpr,  # channels per value scale
    NVG: tl.constexpr,  # value scales per token
    V_CODES_OFF: tl.constexpr,
    V_SCALE_OFF: tl.constexpr,
    K_SCALE_OFF: tl.constexpr,
):
    P: tl.constexpr = 8 // BITS
    DP: tl.constexpr = P * CC_PAD
    QMAX: tl.constexpr = (1 << BITS) - 1
    GPS: tl.constexpr = RESIDUAL // GROUP  # groups per segment

    item = tl.program_id(0)
    h = tl.program_id(1)
    x = tl.arange(0, DP)
    xj = x % CC_PAD
    x_ok = xj < CC
    chan = (x // CC_PAD) * CC + xj
    jb = tl.arange(0, CC_PAD)
    jb_ok = jb < CC
    shifts = tl.arange(0, P) * BITS
    res_dt = res_ptr.dtype.element_ty
    if item < n_seg_groups:
        # ---- one group of a completed segment: keys per channel over the
        # group's tokens, values per token over channel groups
        n = item // GPS
        kg = item % GPS
        t = tl.arange(0, G_PAD)
        t_ok = t < GROUP
        src = tl.load(seg_src_ptr + n * RESIDUAL + kg * GROUP + t, mask=t_ok, other=0).to(tl.int64)
        new = src < n_tok
        ld = t_ok[:, None] & x_ok[None, :]
        old = tl.where(new, 0, src - n_tok)
        ld_new = ld & new[:, None]
        ld_old = ld & (~new)[:, None]
        old_off = old[:, None] * stride_old_tok + h * stride_old_head + chan[None, :]
        xk = _group_rows(key_ptr, stride_k_tok, stride_k_head, old_k_ptr, old_off, src, h, chan,
                         new, ld_new, ld_old, res_ptr)  # [G_PAD, DP]
        mn = tl.min(tl.where(ld, xk, float("inf")), axis=0)  # [DP]
        mx = tl.max(tl.where(ld, xk, float("-inf")), axis=0)
        mn16, sc16 = minmax_scale(tl.where(x_ok, mn, 0.0), tl.where(x_ok, mx, 0.0), QMAX)  # [DP]
        code = tl.where(ld, minmax_codes(xk, mn16[None, :], sc16[None, :], QMAX), 0)
        packed = tl.sum(tl.reshape(code, [G_PAD, P, CC_PAD]) << shifts[None, :, None], axis=1)
        blk = tl.load(seg_block_ptr + n).to(tl.int64)
        row0 = tl.load(seg_row_ptr + n).to(tl.int64) + kg * GROUP
        base = pages_ptr + blk * stride_pg_blk + h * stride_pg_head
        tl.store(base + (row0 + t)[:, None] * CC + jb[None, :], packed.to(tl.uint8),
                 mask=t_ok[:, None] & jb_ok[None, :])
        ks_ptr = (base + K_SCALE_OFF).to(tl.pointer_type(tl.float16)) + row0 // GROUP * (2 * HEAD_SIZE)
        tl.store(ks_ptr + chan, sc16, mask=x_ok)
        tl.store(ks_ptr + HEAD_SIZE + chan, mn16, mask=x_ok)

        xv = _group_rows(value_ptr, stride_v_tok, stride_v_head, old_v_ptr, old_off, src, h, chan,
                         new, ld_new, ld_old, res_ptr)  # [G_PAD, DP]
        vgrp = chan // V_GROUP  # [DP]
        vs_ptr = (base + V_SCALE_OFF).to(tl.pointer_type(tl.float16)) + (row0 + t) * (2 * NVG)
        vmn16 = tl.zeros([G_PAD, DP], dtype=tl.float16)
        vsc16 = tl.zeros([G_PAD, DP], dtype=tl.float16)
        for gi in tl.static_range(NVG):
            in_g = ld & (vgrp == gi)[None, :]
            gmn = tl.min(tl.where(in_g, xv, float("inf")), axis=1)  # [G_PAD]
            gmx = tl.max(tl.where(in_g, xv, float("-inf")), axis=1)
            gmn16, gsc16 = minmax_scale(tl.where(t_ok, gmn, 0.0), tl.where(t_ok, gmx, 0.0), QMAX)
            tl.store(vs_ptr + gi * 2, gsc16, mask=t_ok)
            tl.store(vs_ptr + gi * 2 + 1, gmn16, mask=t_ok)
            vmn16 = tl.where((vgrp == gi)[None, :], gmn16[:, None], vmn16)
            vsc16 = tl.where((vgrp == gi)[None, :], gsc16[:, None], vsc16)
        vcode = tl.where(ld, minmax_codes(xv, vmn16, vsc16, QMAX), 0)
        vpacked = tl.sum(tl.reshape(vcode, [G_PAD, P, CC_PAD]) << shifts[None, :, None], axis=1)
        tl.store(base + V_CODES_OFF + (row0 + t)[:, None] * CC + jb[None, :], vpacked.to(tl.uint8),
                 mask=t_ok[:, None] & jb_ok[None, :])
    else:
        # ---- a token of an open segment -> its residual page row (key, value)
        i = item - n_seg_groups
        r = tl.load(res_rows_ptr + i).to(tl.int64)
        page = tl.load(res_page_ptr + i).to(tl.int64)
        rr = tl.load(res_row_ptr + i).to(tl.int64)
        dst = res_ptr + page * stride_res_blk + h * stride_res_head + rr * (2 * HEAD_SIZE) + chan
        kv = tl.load(key_ptr + r * stride_k_tok + h * stride_k_head + chan, mask=x_ok, other=0.0)
        tl.store(dst, kv.to(res_dt), mask=x_ok)
        vv = tl.load(value_ptr + r * stride_v_tok + h * stride_v_head + chan, mask=x_ok, other=0.0)
        tl.store(dst + HEAD_SIZE, vv.to(res_dt), mask=x_ok)


def kivi_write(
    layout: KiviLayout,
    kv_cache: torch.Tensor,  # [num_blocks, H, block_size, C] model dtype
    plan: WritePlan,
    key: torch.Tensor,  # [num_tokens, H, D]
    value: torch.Tensor,  # [num_tokens, H, D]
) -> None:
    """``kernels.kivi.write`` in one Triton launch; bit-identical pages."""
    why = layout.check()
    if why:
        raise ValueError(why)
    n_tok, H, D = key.shape
    if D != layout.head_size:
        raise ValueError(f"key head size {D} != layout head size {layout.head_size}")
    pages = layout.pages(kv_cache)
    n_seg = plan.seg_src.shape[0]
    n_res = plan.res_rows.numel()
    if n_seg and plan.old_page.numel():
        # before anything is written: these pages may be the blocks this step fills
        old = layout.views(kv_cache).residual[plan.old_page, :, plan.old_row]  # [n_old, H, 2, D]
    else:
        old = key.new_empty((1, H, 2, D), dtype=kv_cache.dtype)
    old_k, old_v = old[:, :, 0], old[:, :, 1]
    n_seg_groups = n_seg * (layout.residual // layout.group)
    n_items = n_seg_groups + n_res
    if n_items == 0:
        return
    cc = layout.code_cols
    cc_pad = _triton.next_pow2(cc)
    kernel = _triton.jit(_kivi_write_kernel)
    kernel[(n_items, H)](
        pages, kv_cache, key, value, old_k, old_v,
        plan.seg_src, plan.seg_block, plan.seg_row,
        plan.res_rows, plan.res_page, plan.res_row,
        n_seg_groups, n_tok,
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        old_k.stride(0), old_k.stride(1),
        pages.stride(0), pages.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        HEAD_SIZE=D, BITS=layout.bits, CC=cc, CC_PAD=cc_pad,
        BLOCK_SIZE=layout.block_size, GROUP=layout.group, G_PAD=_triton.next_pow2(layout.group),
        RESIDUAL=layout.residual, V_GROUP=layout.value_group, NVG=layout.v_groups,
        V_CODES_OFF=layout.v_codes_off, V_SCALE_OFF=layout.v_scale_off, K_SCALE_OFF=layout.k_scale_off,
    )
