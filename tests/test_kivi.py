"""KIVI quantized KV (formats/kivi.py, kernels/kivi.py): exact pack/unpack on
representable values, the write (groups completing mid-chunk, residual pages,
partially filled residual, value channel groups) and attention from packed
pages against a reference run on the dequantized cache with this step's own
tokens in full precision, over ragged multi-step schedules with GQA; the
Hadamard rotation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_adaptive.formats.kivi import KiviLayout, KiviParams
from vllm_adaptive.kernels import kivi
from vllm_adaptive.sparse_pattern import SparsePattern


@given(bits=st.sampled_from([8, 4, 2]), d=st.sampled_from([4, 8, 16, 64]),
       seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_pack_unpack_roundtrip(bits, d, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (3, 5, d), generator=g, dtype=torch.uint8)
    packed = kivi.pack(codes, bits)
    assert packed.shape[-1] == d * bits // 8
    assert torch.equal(kivi.unpack(packed, bits), codes)
    # attention's bit planes are the channel slices
    p = 8 // bits
    for s, plane in enumerate(kivi.planes(packed, bits)):
        assert torch.equal(plane, codes[..., s * d // p : (s + 1) * d // p])


@given(bits=st.sampled_from([8, 4, 2]), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_quantize_exact_on_representable_values(bits, seed):
    """x = code * s + m with float16 s, m and codes spanning 0..qmax comes back exactly."""
    g = torch.Generator().manual_seed(seed)
    qmax = (1 << bits) - 1
    codes = torch.randint(0, qmax + 1, (6, 16), generator=g)
    codes[0], codes[1] = 0, qmax  # the group's min and max are attained
    s = (torch.rand(1, 16, generator=g) * 0.5 + 0.01).half().float()
    m = (torch.randn(1, 16, generator=g) * 3).half().float()
    x = codes.float() * s + m
    c, scale, mn = kivi.quantize(x, bits, dim=0)
    assert torch.equal(kivi.dequantize(c, scale, mn), x)
    assert torch.equal(c.long(), codes)


def _error_bound(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    rng = x.amax(dim, keepdim=True) - x.amin(dim, keepdim=True)
    return rng / ((1 << bits) - 1) * 0.5 + 1e-2 * rng + 1e-3


class Paged:
    """A multi-request paged KIVI cache driven step by step like vLLM does."""

    def __init__(self, layout: KiviLayout, lengths, num_kv_heads, dtype, seed=0):
        self.layout, self.dtype, self.h = layout, dtype, num_kv_heads
        bs = layout.block_size
        g = torch.Generator().manual_seed(seed)
        width = max(math.ceil(n / bs) for n in lengths) + layout.residual_pages
        nb = 1 + width * len(lengths)
        ids = 1 + torch.randperm(nb - 1, generator=g)
        self.block_table = ids[: width * len(lengths)].reshape(len(lengths), width).int()
        c = layout.token_bytes // layout.itemsize
        self.kv_cache = torch.full((nb, num_kv_heads, bs, c), float("nan"), dtype=dtype)
        d = layout.head_size
        self.keys = [torch.randn(n, num_kv_heads, d, generator=g) * 2 for n in lengths]
        for k in self.keys:  # an outlier channel, as real keys have
            k[..., 3] += 8.0
        self.values = [torch.randn(n, num_kv_heads, d, generator=g) for n in lengths]
        self.done = [0] * len(lengths)

    def step(self, chunks: dict[int, int]):
        """Write ``chunks[r]`` new tokens of each request; returns the step's
        (query_start_loc, seq_lens)."""
        keys, vals, qsl, lens = [], [], [0], []
        for r in range(len(self.keys)):
            n = chunks.get(r, 0)
            a = self.done[r]
            keys.append(self.keys[r][a : a + n])
            vals.append(self.values[r][a : a + n])
            qsl.append(qsl[-1] + n)
            lens.append(a + n)
            self.done[r] += n
        n_tok = qsl[-1]
        # keys / values as strided views of one fused projection, plus padding rows
        kv = torch.zeros(n_tok + 3, 2, self.h, self.layout.head_size, dtype=self.dtype)
        kv[:n_tok, 0] = torch.cat(keys).to(self.dtype)
        kv[:n_tok, 1] = torch.cat(vals).to(self.dtype)
        k, v = kv[:, 0], kv[:, 1]
        self.last_k, self.last_v = k[:n_tok], v[:n_tok]  # this step's fresh tokens
        qsl_t, lens_t = torch.tensor(qsl, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)
        plan = kivi.plan_write(self.layout, self.block_table, qsl_t, lens_t, n_tok)
        self.write(plan, k[:n_tok], v[:n_tok])
        return qsl_t, lens_t

    def write(self, plan: kivi.WritePlan, k: torch.Tensor, v: torch.Tensor) -> None:
        kivi.write(self.layout, self.layout.views(self.kv_cache), plan, k, v)


def _reference(paged, query, qsl, lens, scale, pattern):
    views = paged.layout.views(paged.kv_cache)
    out = torch.zeros(query.shape, dtype=torch.float32)
    for r in range(len(lens)):
        q0, q1, L = int(qsl[r]), int(qsl[r + 1]), int(lens[r])
        if q1 == q0:
            continue
        k, v = kivi.dequantized_kv(paged.layout, views, paged.block_table[r], L)
        # this step's own tokens in full precision (KIVI's prefill)
        k[:, L - (q1 - q0):] = paged.last_k[q0:q1].float().transpose(0, 1)
        v[:, L - (q1 - q0):] = paged.last_v[q0:q1].float().transpose(0, 1)
        qpos = torch.arange(L - (q1 - q0), L)
        kpos = torch.arange(L)
        vis = kpos[None] <= qpos[:, None]
        if pattern is not None:
            vis &= pattern.visible(qpos[:, None], kpos[None])
        o = torch.nn.functional.scaled_dot_product_attention(
            query[q0:q1].float().transpose(0, 1), k, v, attn_mask=vis, scale=scale,
            enable_gqa=True,
        )
        out[q0:q1] = o.transpose(0, 1)
    return out


SCHEDULES = {
    # (lengths, steps): ragged prompts in chunks that end mid-group and
    # mid-residual, then decodes across group / block boundaries
    "ragged": ([70, 33, 1, 129], [{0: 50, 1: 33, 2: 1, 3: 7}, {0: 20, 3: 100}, {3: 22}]
               + [{0: 0}] * 0),
    "decode": ([40, 64], [{0: 37, 1: 60}] + [{0: 1, 1: 1}] * 4),
}


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("bs,group,residual,vgroup", [(32, 32, 32, 16), (32, 8, 16, 4), (16, 4, 16, 8)])
@pytest.mark.parametrize("pattern", [None, SparsePattern(sink=8, window=16, block=8, local_blocks=0, vert_stride=0)],
                         ids=["dense", "sink_window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_and_attend_match_dequantized_reference(bits, bs, group, residual, vgroup, pattern, dtype):
    lengths = [70, 33, 1, 129, 40]
    steps = [
        {0: 50, 1: 33, 2: 1, 3: 7, 4: 37},  # chunks ending mid-group / mid-residual
        {0: 19, 3: 100, 4: 1},  # a group completing mid-chunk, one decode
        {0: 1, 3: 22, 4: 1},  # decodes crossing group / residual / block ends
        {4: 1},
    ]
    layout = KiviLayout.of(KiviParams(bits, group, residual, vgroup), bs, 16, dtype)
    assert layout.check() is None
    h_kv, h_q = 2, 4  # GQA
    paged = Paged(layout, lengths, h_kv, dtype, seed=bits * 7 + bs)
    scale = 16 ** -0.5
    g = torch.Generator().manual_seed(1)
    for chunk in steps:
        qsl, lens = paged.step(chunk)
        query = (torch.randn(int(qsl[-1]), h_q, 16, generator=g)).to(dtype)
        out = torch.zeros(query.shape, dtype=dtype)
        kivi.attention(layout, layout.views(paged.kv_cache), query, paged.block_table, qsl, lens,
                       scale, out, pattern=pattern, q_tile=24, key=paged.last_k, value=paged.last_v)
        ref = _reference(paged, query, qsl, lens, scale, pattern)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    # what the cache holds: the residual's keys and values exact, the rest
    # within the quantization error of its group
    views = layout.views(paged.kv_cache)
    for r, n in enumerate(lengths):
        k, v = kivi.dequantized_kv(layout, views, paged.block_table[r], n)
        true_k = paged.keys[r].to(dtype).float().transpose(0, 1)
        true_v = paged.values[r].to(dtype).float().transpose(0, 1)
        e = n // residual * residual
        assert torch.equal(k[:, e:], true_k[:, e:]), "residual keys must be stored exactly"
        assert torch.equal(v[:, e:], true_v[:, e:]), "residual values must be stored exactly"
        for g0 in range(0, e, group):
            blk = true_k[:, g0 : g0 + group]
            assert (k[:, g0 : g0 + group] - blk).abs().le(_error_bound(blk, bits, 1)).all()
        tv = true_v[:, :e].reshape(h_kv, e, 16 // vgroup, vgroup)
        err = (v[:, :e].reshape(tv.shape) - tv).abs()
        assert err.le(_error_bound(tv, bits, -1)).all()


def test_layout_sizes_and_checks():
    lay = KiviLayout.of(KiviParams(4), 128, 64, torch.bfloat16)  # KIVI's defaults: g32, vg32, R = block
    assert (lay.group, lay.value_group, lay.residual) == (32, 32, 128)
    # 32 + 32 code bytes, 2 x 4 value-scale bytes, 4*64/32 key-scale bytes per token
    assert lay.token_bytes == 80
    assert lay.bytes_per_token(3) * 128 == 3 * lay.page_bytes
    # 128 bf16 keys + values of 64 channels = 32 KiB over 10240-byte pages (40 tokens each)
    assert lay.residual_tokens_per_page == 40 and lay.residual_pages == 4
    old = KiviLayout.of(KiviParams(4, 128, None, 64), 128, 64, torch.bfloat16)  # the coarse format
    assert old.token_bytes == 70
    assert KiviLayout.of(KiviParams(4, 48), 128, 64, torch.bfloat16).check().startswith("group_size 48")
    assert "residual" in KiviLayout.of(KiviParams(4, 32, 48), 128, 64, torch.bfloat16).check()
    assert "value_group 48" in KiviLayout.of(KiviParams(4, 32, None, 48), 128, 64, torch.bfloat16).check()
    assert "power-of-two" in KiviLayout.of(KiviParams(4, rotation="kv"), 128, 48, torch.bfloat16).check()
    # defaults shrink to a small block / head
    small = KiviLayout.of(KiviParams(4), 16, 16, torch.float32)
    assert (small.group, small.value_group) == (16, 16)


def test_hadamard_is_orthonormal_and_its_own_inverse():
    h = kivi.hadamard(64, "cpu")
    torch.testing.assert_close(h @ h, torch.eye(64), atol=1e-6, rtol=0)
    x = torch.randn(5, 3, 64)
    torch.testing.assert_close(kivi.rotate(kivi.rotate(x)), x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="power of two"):
        kivi.hadamard(48, "cpu")


@pytest.mark.parametrize("rotation", ["v", "kv"])
def test_rotation_spreads_outliers_and_attention_undoes_it(rotation):
    """Values with one outlier channel: per-token int2 error drops after the
    rotation; and attention over rotated keys / values with the query rotated
    alike, its output rotated back, equals attention on the originals when
    every token is read in full precision (one prefill step) and stays within
    the quantization error over packed pages (a decode after it)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(256, 64, generator=g)
    v[:, 7] += 20.0
    for x in (v, kivi.rotate(v)):
        c, s, m = kivi.quantize(x, 2, dim=-1)
        err = (kivi.dequantize(c, s, m) - x).pow(2).mean()
        if x is v:
            plain = err
    assert err < plain / 4, (float(err), float(plain))

    layout = KiviLayout.of(KiviParams(4, 8, 16, 8, rotation), 16, 64, torch.float32)
    paged = Paged(layout, [70], 1, torch.float32, seed=2)
    true_k, true_v = paged.keys[0].clone(), paged.values[0].clone()
    rot_k = rotation == "kv"
    if rot_k:
        paged.keys[0] = kivi.rotate(paged.keys[0])
    paged.values[0] = kivi.rotate(paged.values[0])
    q = torch.randn(70, 2, 64, generator=g)
    for lo, hi in ((0, 69), (69, 70)):
        qsl, lens = paged.step({0: hi - lo})
        out = torch.zeros(hi - lo, 2, 64)
        kivi.attention(layout, layout.views(paged.kv_cache), kivi.rotate(q[lo:hi]) if rot_k else q[lo:hi],
                       paged.block_table, qsl, lens, 0.125, out, key=paged.last_k, value=paged.last_v)
        out = kivi.rotate(out)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1), true_k[:hi].transpose(0, 1), true_v[:hi].transpose(0, 1),
            attn_mask=torch.arange(hi)[None] <= torch.arange(lo, hi)[:, None], scale=0.125,
            enable_gqa=True).transpose(0, 1)
        # one prefill: exact up to fp32 rounding; the decode reads 64 packed
        # int4 tokens: bounded by the values' quantization step (range / 15)
        tol = 1e-4 if lo == 0 else float(true_v.amax() - true_v.amin()) / 15
        torch.testing.assert_close(out, want, atol=tol, rtol=0)
