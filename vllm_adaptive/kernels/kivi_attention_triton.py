"""Triton attention straight from KIVI's packed paged KV (``formats/kivi.py``);
the write is ``kivi_write_triton``.

No dequantized cache is materialised: pages are read as bytes
(``KiviLayout.pages``, ``[num_blocks, H_kv, page_bytes]`` uint8) and the
float16 scales / model-dtype residual keys through pointer casts of the same
bytes.

**Channel order.** Codes are packed planar (byte ``j`` of a token holds
channel ``j + s * CC`` in bits ``s * bits ..``, ``CC = D / p``). A tile of
packed bytes ``[N, CC]`` is unpacked in registers into ``[N, p, CC]`` (one
shift per plane) and reshaped to ``[N, p * CC]``: position ``s * CC + j`` *is*
channel ``s * CC + j``, so plane ``s`` fills the contiguous channel range
``s*CC .. (s+1)*CC - 1``, one dot product covers every plane (the sum over
planes is the dot's own reduction), and no byte is loaded twice. When ``CC``
is not a power of two, each plane is padded to ``CC_PAD`` lanes and the query
and output use the same padded-planar order (``chan = s * CC + j``, lanes
``j >= CC`` masked).

**Tiling** (:func:`kivi_paged_attention`): one program per (query tile, KV
head, split). A query tile is ``BLOCK_Q`` consecutive query tokens of one
request times the GQA group's query heads (rows of ``BLOCK_M``), as in
``sparse_prefill``; decode steps use the same kernel with split-KV
(flash-decoding): partials in ``split_kv``'s layout, one row per token, merged
by ``_kivi_merge_kernel``. The program walks the request's keys in tiles of
``TILE_N`` tokens (``TILE_N`` divides the block size, so a tile sits in one
page):

- keys: codes ``*`` per-channel scale ``+`` min of their group (a ``[DP]``
  vector when the tile lies in one group, else a per-token gather), values:
  codes ``*`` scale ``+`` min of their (token, channel group), positions
  ``< f0 = min(e, context_len)`` only (``e = seq_len // R * R``);
- full precision (``kernels/kivi.py``'s rule): positions ``>= context_len``
  (this step's tokens) from the fresh ``key`` / ``value`` tensors, positions
  ``e .. context_len - 1`` (the open segment's older tokens) from the
  residual pages (block-table entry ``e // bs + 1 + i // tpp``, row ``i %
  tpp``, key then value);
- masks: causal, ``pos < seq_len`` and the LongGen pattern's predicate
  (``triton_common.pattern_visible``), all by ``tl.where`` on masked loads:
  slots past the request's tokens hold stale bytes (NaN / inf scales
  possible) and are never used in arithmetic;
- sparse layers: below the pattern's local span only tiles holding a sink or
  vertical-stride token are visited (``triton_common.next_visited_tile``, as
  in ``sparse_prefill``), so pages no query of the tile can read are never
  loaded.

Masked scores are a finite -1e30 (``triton_common.softmax_step``), so an
empty split stays NaN-free.
"""

from __future__ import annotations

import torch

from vllm_adaptive.formats.kivi import KiviLayout
from vllm_adaptive.kernels import _triton
from vllm_adaptive.kernels._triton import tl
from vllm_adaptive.kernels.split_kv import merge_partials, store_partials
from vllm_adaptive.kernels.triton_common import (
    find_request,
    local_span_start,
    next_visited_tile,
    pattern_visible,
    softmax_step,
)
from vllm_adaptive.sparse_pattern import SparsePattern


def _kivi_attn_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size]
    m_part_ptr,  # [num_tokens, num_heads, NUM_SPLITS] fp32 (NUM_SPLITS > 1)
    l_part_ptr,  # [num_tokens, num_heads, NUM_SPLITS] fp32
    acc_part_ptr,  # [num_tokens, num_heads, NUM_SPLITS, DP] fp32, padded-planar order
    q_ptr,  # [num_tokens, num_heads, head_size]
    key_ptr,  # [num_tokens, num_kv_heads, head_size] this step's keys
    value_ptr,  # [num_tokens, num_kv_heads, head_size] this step's values
    pages_ptr,  # [num_blocks, num_kv_heads, page_bytes] uint8 (strided)
    res_ptr,  # the same cache in the model dtype (residual tokens)
    block_table_ptr,  # [num_reqs, width]
    query_start_loc_ptr,  # [num_reqs + 1]
    seq_lens_ptr,  # [num_reqs]
    cu_qtiles_ptr,  # [num_reqs + 1] cumulative query tiles per request
    num_reqs,
    num_heads,
    scale,
    stride_q_tok, stride_q_head,
    stride_k_tok, stride_k_head,
    stride_v_tok, stride_v_head,
    stride_o_tok, stride_o_head,
    stride_pg_blk, stride_pg_head,  # bytes
    stride_res_blk, stride_res_head,  # model-dtype elements
    stride_bt,
    SPARSE: tl.constexpr,
    SINK: tl.constexpr,  # pattern terms, 0 = off (sparse_pattern.SparsePattern)
    WINDOW: tl.constexpr,
    PBLOCK: tl.constexpr,  # the pattern's block, not the cache page
    LOCAL_BLOCKS: tl.constexpr,
    VERT_STRIDE: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    CC: tl.constexpr,  # code bytes per token (head_size * bits / 8)
    CC_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # cache page size (tokens)
    GROUP: tl.constexpr,  # key quantization group (tokens)
    RESIDUAL: tl.constexpr,  # residual segment (tokens)
    TPP: tl.constexpr,  # residual tokens per residual page
    V_GROUP: tl.constexpr,  # channels per value scale
    NVG: tl.constexpr,  # value scales per token
    V_CODES_OFF: tl.constexpr,
    V_SCALE_OFF: tl.constexpr,
    K_SCALE_OFF: tl.constexpr,
    TILE_N: tl.constexpr,  # key tokens per iteration, divides BLOCK_SIZE
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,  # BLOCK_Q * GROUP_PAD
    NUM_SPLITS: tl.constexpr,
    USE_DOT: tl.constexpr,  # tl.dot (every dim >= 16) or broadcast-and-sum
    FP32_DOT: tl.constexpr,  # exact fp32 dots (fp32 model, or the interpreter)
):
    P: tl.constexpr = 8 // BITS
    DP: tl.constexpr = P * CC_PAD
    CODE_MASK: tl.constexpr = (1 << BITS) - 1

    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    req = find_request(cu_qtiles_ptr, tile, num_reqs)
    if req < num_reqs:
        q_start = tl.load(query_start_loc_ptr + req).to(tl.int32)
        query_len = tl.load(query_start_loc_ptr + req + 1).to(tl.int32) - q_start
        seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
        context_len = seq_len - query_len
        local_tile = tile - tl.load(cu_qtiles_ptr + req).to(tl.int32)

        rows = tl.arange(0, BLOCK_M)
        q_idx = local_tile * BLOCK_Q + rows // GROUP_PAD
        g = rows % GROUP_PAD
        row_ok = (q_idx < query_len) & (g < QUERIES_PER_KV)
        head = kv_head * QUERIES_PER_KV + g
        x = tl.arange(0, DP)  # padded-planar lane
        xj = x % CC_PAD
        x_ok = xj < CC
        chan = (x // CC_PAD) * CC + xj  # its channel
        jb = tl.arange(0, CC_PAD)  # byte within a token's codes
        jb_ok = jb < CC
        shifts = tl.arange(0, P) * BITS

        tok = (q_start + q_idx).to(tl.int64)
        qd_ok = row_ok[:, None] & x_ok[None, :]
        q = tl.load(q_ptr + tok[:, None] * stride_q_tok + head[:, None] * stride_q_head
                    + chan[None, :], mask=qd_ok, other=0.0)  # [BLOCK_M, DP]
        q_pos = context_len + q_idx

        first_pos = context_len + local_tile * BLOCK_Q
        last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
        n_tiles = last_pos // TILE_N + 1
        per_split = tl.cdiv(n_tiles, NUM_SPLITS)
        t_first = split * per_split
        t_last = tl.minimum(t_first + per_split, n_tiles)
        lo_tile = 0
        if SPARSE:
            lo_tile = local_span_start(first_pos, WINDOW, PBLOCK, LOCAL_BLOCKS) // TILE_N

        # Open residual segment: positions e .. seq_len - 1; full precision from f0.
        e = seq_len // RESIDUAL * RESIDUAL
        f0 = tl.minimum(e, context_len)
        res_entry = e // BLOCK_SIZE + 1
        bt_row = block_table_ptr + req.to(tl.int64) * stride_bt
        head_off = kv_head.to(tl.int64) * stride_pg_head
        res_head_off = kv_head.to(tl.int64) * stride_res_head

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
        offs_n = tl.arange(0, TILE_N)
        tt = t_first
        while tt < t_last:
            if SPARSE:
                # Below the local span only sink and vertical-stride tiles count.
                tt = next_visited_tile(tt, lo_tile, TILE_N, SINK, PBLOCK, VERT_STRIDE)
            if tt < t_last:
                pos0 = tt * TILE_N
                pos = pos0 + offs_n  # [TILE_N]
                row = pos0 % BLOCK_SIZE + offs_n  # row within the page
                valid = pos < seq_len
                quant = pos < f0  # read from the packed page
                page = tl.load(bt_row + pos0 // BLOCK_SIZE).to(tl.int64)
                base = pages_ptr + page * stride_pg_blk + head_off

                # ---- keys: unpack planes, per-channel scale / min of the group
                kb = tl.load(base + row[:, None] * CC + jb[None, :],
                             mask=quant[:, None] & jb_ok[None, :], other=0).to(tl.int32)
                kc = tl.reshape((kb[:, None, :] >> shifts[None, :, None]) & CODE_MASK,
                                [TILE_N, DP]).to(tl.float32)
                ks_ptr = (base + K_SCALE_OFF).to(tl.pointer_type(tl.float16))
                if GROUP % TILE_N == 0:  # the tile lies in one group
                    gofs = (pos0 % BLOCK_SIZE) // GROUP * (2 * HEAD_SIZE)
                    kq = (pos0 + 0 * chan) < f0  # [DP]: the interpreter rejects scalar masks
                    ksc = tl.load(ks_ptr + gofs + chan, mask=x_ok & kq, other=0.0).to(tl.float32)
                    kmn = tl.load(ks_ptr + gofs + HEAD_SIZE + chan, mask=x_ok & kq,
                                  other=0.0).to(tl.float32)
                    k = kc * ksc[None, :] + kmn[None, :]
                else:
                    gofs = (row // GROUP * (2 * HEAD_SIZE))[:, None] + chan[None, :]
                    kmask = quant[:, None] & x_ok[None, :]
                    ksc = tl.load(ks_ptr + gofs, mask=kmask, other=0.0).to(tl.float32)
                    kmn = tl.load(ks_ptr + gofs + HEAD_SIZE, mask=kmask, other=0.0).to(tl.float32)
                    k = kc * ksc + kmn
                k = tl.where(quant[:, None], k, 0.0)
                # ---- values: codes * scale + min of their (token, channel group)
                vb = tl.load(base + V_CODES_OFF + row[:, None] * CC + jb[None, :],
                             mask=quant[:, None] & jb_ok[None, :], other=0).to(tl.int32)
                vc = tl.reshape((vb[:, None, :] >> shifts[None, :, None]) & CODE_MASK,
                                [TILE_N, DP]).to(tl.float32)
                vs_ptr = (base + V_SCALE_OFF).to(tl.pointer_type(tl.float16))
                vofs = (row * (2 * NVG))[:, None] + ((chan // V_GROUP) * 2)[None, :]
                vmask = quant[:, None] & x_ok[None, :]
                vsc = tl.load(vs_ptr + vofs, mask=vmask, other=0.0).to(tl.float32)
                vmn = tl.load(vs_ptr + vofs + 1, mask=vmask, other=0.0).to(tl.float32)
                v = tl.where(vmask, vc * vsc + vmn, 0.0)
                if (pos0 + TILE_N > f0) & (pos0 < seq_len):
                    # full precision: the open segment's older tokens (residual
                    # pages), this step's tokens (fresh tensors)
                    is_res = (pos >= e) & (pos < context_len) & valid
                    i = tl.where(is_res, pos - e, 0)
                    rpage = tl.load(bt_row + res_entry + i // TPP, mask=is_res, other=0).to(tl.int64)
                    rbase = (res_ptr + rpage[:, None] * stride_res_blk + res_head_off
                             + ((i % TPP) * (2 * HEAD_SIZE))[:, None] + chan[None, :])
                    rmask = is_res[:, None] & x_ok[None, :]
                    k = tl.where(is_res[:, None], tl.load(rbase, mask=rmask, other=0.0).to(tl.float32), k)
                    v = tl.where(is_res[:, None],
                                 tl.load(rbase + HEAD_SIZE, mask=rmask, other=0.0).to(tl.float32), v)
                    is_new = (pos >= context_len) & valid
                    frow = (q_start + tl.where(is_new, pos - context_len, 0)).to(tl.int64)
                    fmask = is_new[:, None] & x_ok[None, :]
                    fk = tl.load(key_ptr + frow[:, None] * stride_k_tok + kv_head * stride_k_head
                                 + chan[None, :], mask=fmask, other=0.0).to(tl.float32)
                    fv = tl.load(value_ptr + frow[:, None] * stride_v_tok + kv_head * stride_v_head
                                 + chan[None, :], mask=fmask, other=0.0).to(tl.float32)
                    k = tl.where(is_new[:, None], fk, k)
                    v = tl.where(is_new[:, None], fv, v)

                if USE_DOT:
                    if FP32_DOT:
                        s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
                    else:
                        s = tl.dot(q, tl.trans(k).to(q.dtype))
                else:
                    s = tl.sum(q.to(tl.float32)[:, None, :] * k[None, :, :], axis=2)
                s = s * scale  # [BLOCK_M, TILE_N]

                kp = pos[None, :]
                qp = q_pos[:, None]
                if SPARSE:
                    visible = pattern_visible(qp, kp, SINK, WINDOW, PBLOCK, LOCAL_BLOCKS, VERT_STRIDE)
                else:
                    visible = kp <= qp
                visible = visible & row_ok[:, None] & valid[None, :]
                p, alpha, m_i, l_i = softmax_step(s, visible, m_i, l_i)

                if USE_DOT:
                    if FP32_DOT:
                        pv = tl.dot(p, v, input_precision="ieee")
                    else:
                        pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
                else:
                    pv = tl.sum(p[:, :, None] * v[None, :, :], axis=1)
                acc = acc * alpha[:, None] + pv
            tt += 1

        if NUM_SPLITS == 1:
            l_safe = tl.where(l_i > 0, l_i, 1.0)
            o = acc / l_safe[:, None]
            tl.store(out_ptr + tok[:, None] * stride_o_tok + head[:, None] * stride_o_head
                     + chan[None, :], o.to(out_ptr.dtype.element_ty), mask=qd_ok)
        else:
            store_partials(m_part_ptr, l_part_ptr, acc_part_ptr, tok, head, split, num_heads,
                           m_i, l_i, acc, row_ok, DP, NUM_SPLITS)


def _kivi_merge_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size]
    m_part_ptr, l_part_ptr, acc_part_ptr,  # see _kivi_attn_kernel (rows are tokens)
    query_start_loc_ptr,
    num_reqs,
    num_heads,
    stride_o_tok, stride_o_head,
    CC: tl.constexpr,
    CC_PAD: tl.constexpr,
    DP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    if tok < tl.load(query_start_loc_ptr + num_reqs):  # padding rows get no output
        x = tl.arange(0, DP)  # padded-planar lane
        xj = x % CC_PAD
        chan = (x // CC_PAD) * CC + xj
        o = merge_partials(m_part_ptr, l_part_ptr, acc_part_ptr, tok.to(tl.int64), head, num_heads,
                           DP, NUM_SPLITS)
        tl.store(out_ptr + tok.to(tl.int64) * stride_o_tok + head * stride_o_head + chan,
                 o.to(out_ptr.dtype.element_ty), mask=xj < CC)


def _tile_n(block_size: int, tile_n: int | None) -> int:
    if tile_n is None:
        tile_n = min(block_size, 64)
    if block_size % tile_n or tile_n & (tile_n - 1):
        raise ValueError(f"tile_n {tile_n} must be a power of two dividing the block size {block_size}")
    return tile_n


def _check(layout: KiviLayout, kv_cache: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
    why = layout.check()
    if why:
        raise ValueError(why)
    if layout.block_size & (layout.block_size - 1):
        raise ValueError(f"block size {layout.block_size} must be a power of two")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")


def default_num_splits(num_reqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Split-KV factor for decode: about two programs per SM."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // max(1, num_reqs * num_kv_heads))
    return max(1, min(32, _triton.next_pow2(want)))


def kivi_paged_attention(
    layout: KiviLayout,
    kv_cache: torch.Tensor,  # [num_blocks, H_kv, block_size, C] model dtype
    query: torch.Tensor,  # [num_tokens, H_q, D]
    block_table: torch.Tensor,  # [num_reqs, width]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] (device)
    seq_lens: torch.Tensor,  # [num_reqs] (device)
    scale: float,
    out: torch.Tensor,  # [num_tokens, H_q, D]
    pattern: SparsePattern | None = None,
    *,
    key: torch.Tensor,  # [num_tokens, H_kv, D] this step's keys (full precision)
    value: torch.Tensor,  # [num_tokens, H_kv, D]
    max_query_len: int | None = None,
    num_splits: int | None = None,
    block_q: int | None = None,
    tile_n: int | None = None,
) -> torch.Tensor:
    """Every request's queries over its packed KIVI pages (written first, as
    ``kernels.kivi.attention`` expects), this step's tokens read from ``key``
    / ``value``; equals that function up to float rounding.
    ``max_query_len`` (host int; computed with one sync if None) picks decode
    tiling and split-KV (``num_splits``, a power of two)."""
    num_tokens, num_heads, head_size = query.shape
    num_reqs = seq_lens.shape[0]
    num_kv_heads = kv_cache.shape[1]
    _check(layout, kv_cache, num_heads, num_kv_heads)
    if head_size != layout.head_size:
        raise ValueError(f"query head size {head_size} != layout head size {layout.head_size}")
    pages = layout.pages(kv_cache)
    if num_reqs == 0 or num_tokens == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    group = num_heads // num_kv_heads
    group_pad = _triton.next_pow2(group)
    if block_q is None:
        block_q = 1 if max_query_len == 1 else max(1, 64 // group_pad)
    block_m = max(16, _triton.next_pow2(block_q) * group_pad)
    block_q = block_m // group_pad
    if num_splits is None:
        num_splits = default_num_splits(num_reqs, num_kv_heads, query.device) if max_query_len == 1 else 1
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits: expected a power of two >= 1, got {num_splits}")
    tn = _tile_n(layout.block_size, tile_n)
    cc = layout.code_cols
    cc_pad = _triton.next_pow2(cc)
    dp = layout.per_byte * cc_pad

    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    cu_qtiles = torch.zeros(num_reqs + 1, dtype=torch.int32, device=query.device)
    torch.cumsum((q_lens + block_q - 1) // block_q, 0, out=cu_qtiles[1:])
    grid = (min(num_tokens, max_query_len * num_reqs) // block_q + num_reqs, num_kv_heads, num_splits)
    if num_splits > 1:
        m = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=query.device)
        l = torch.empty_like(m)
        acc = torch.empty(num_tokens, num_heads, num_splits, dp, dtype=torch.float32, device=query.device)
    else:
        m = l = acc = out  # unused
    interp = _triton.interpreting()
    use_dot = block_m >= 16 and dp >= 16 and tn >= 16
    if not use_dot and not interp:
        # The broadcast-and-sum path (tiles under 16 tokens) gives wrong
        # results compiled on an H200 (decode errors > 1; right under the
        # interpreter; benchmarks/gpu_debug_kivi.py): refused on GPUs.
        raise ValueError(
            f"kivi Triton attention needs key tiles of at least 16 tokens and a head "
            f"size of at least 16 on a GPU (block size {layout.block_size}, tile {tn}, "
            f"head size {head_size})"
        )
    sp = pattern or SparsePattern(window=1)
    kernel = _triton.jit(_kivi_attn_kernel)
    kernel[grid](
        out, m, l, acc, query, key, value, pages, kv_cache, block_table, query_start_loc, seq_lens, cu_qtiles,
        num_reqs, num_heads, float(scale),
        query.stride(0), query.stride(1),
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        out.stride(0), out.stride(1),
        pages.stride(0), pages.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        block_table.stride(0),
        SPARSE=pattern is not None,
        SINK=sp.sink, WINDOW=sp.window, PBLOCK=max(1, sp.block),
        LOCAL_BLOCKS=sp.local_blocks, VERT_STRIDE=sp.vert_stride,
        QUERIES_PER_KV=group, GROUP_PAD=group_pad, HEAD_SIZE=head_size,
        BITS=layout.bits, CC=cc, CC_PAD=cc_pad,
        BLOCK_SIZE=layout.block_size, GROUP=layout.group, RESIDUAL=layout.residual,
        TPP=layout.residual_tokens_per_page, V_GROUP=layout.value_group, NVG=layout.v_groups,
        V_CODES_OFF=layout.v_codes_off, V_SCALE_OFF=layout.v_scale_off, K_SCALE_OFF=layout.k_scale_off,
        TILE_N=tn, BLOCK_Q=block_q, BLOCK_M=block_m, NUM_SPLITS=num_splits,
        USE_DOT=use_dot,
        # Triton's interpreter computes bf16 tl.dot wrongly (see sparse_prefill)
        FP32_DOT=query.dtype == torch.float32 or interp,
    )
    if num_splits > 1:
        merge = _triton.jit(_kivi_merge_kernel)
        merge[(num_tokens, num_heads)](
            out, m, l, acc, query_start_loc, num_reqs, num_heads,
            out.stride(0), out.stride(1),
            CC=cc, CC_PAD=cc_pad, DP=dp, NUM_SPLITS=num_splits,
        )
    return out
