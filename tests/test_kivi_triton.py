"""Triton KIVI kernels (kernels/kivi_write_triton.py, kivi_attention_triton.py)
against the torch path (kernels/kivi.py): the write byte for byte on the
pages, attention from the packed pages against ``kivi.attention`` and the
dequantized-cache reference.

Triton runs under TRITON_INTERPRET=1 on machines without a GPU (conftest sets
it), so shapes stay small; with a GPU the same tests run the compiled kernels
on CUDA copies (bf16 dots there, hence the bf16 tolerance). The schedules are test_kivi's: ragged prompts in chunks
ending mid-group / mid-residual, a group completing mid-chunk, decodes
crossing group / residual / block ends, GQA, a sink_window pattern.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from vllm_adaptive.formats.kivi import KiviLayout, KiviParams  # noqa: E402
from vllm_adaptive.kernels import kivi  # noqa: E402
from vllm_adaptive.kernels.kivi_attention_triton import kivi_paged_attention  # noqa: E402
from vllm_adaptive.kernels.kivi_write_triton import kivi_write  # noqa: E402
from vllm_adaptive.sparse_pattern import SparsePattern  # noqa: E402

from test_kivi import Paged, _reference  # noqa: E402  (cache driver, dequantized reference)

# The torch path and the reference run on CPU; the Triton kernels on the GPU
# when there is one (compiled), else on CPU under the interpreter.
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dev(plan: kivi.WritePlan) -> kivi.WritePlan:
    return dataclasses.replace(plan, **{f.name: getattr(plan, f.name).to(DEV)
                                        for f in dataclasses.fields(plan)})


LENGTHS = [70, 33, 1, 129, 40]
STEPS = [
    {0: 50, 1: 33, 2: 1, 3: 7, 4: 37},  # chunks ending mid-group / mid-residual
    {0: 19, 3: 100, 4: 1},  # a group completing mid-chunk, one decode
    {0: 1, 3: 22, 4: 1},  # decodes crossing group / residual / block ends
    {4: 1},
]
SINK_WINDOW = SparsePattern(sink=8, window=16, block=8, local_blocks=0, vert_stride=0)


class Twin(Paged):
    """test_kivi's ``Paged`` in two copies: ``kv_cache`` written by the torch
    ``kivi.write``, ``kv_triton`` by ``kivi_write_triton.kivi_write``."""

    def __init__(self, layout: KiviLayout, lengths, num_kv_heads, dtype, seed=0):
        super().__init__(layout, lengths, num_kv_heads, dtype, seed)
        self.kv_triton = self.kv_cache.clone().to(DEV)

    def write(self, plan, k, v) -> None:
        super().write(plan, k, v)
        kivi_write(self.layout, self.kv_triton, _dev(plan), k.to(DEV), v.to(DEV))


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    ua, ub = a.cpu().view(torch.uint8), b.cpu().view(torch.uint8)
    diff = (ua != ub).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} page bytes differ, first at {diff[:4].tolist()}"


WRITE_CFGS = [(32, 32, 32, 16, 8), (32, 8, 16, 32, 16), (16, 4, 16, 16, 16)]  # bs, G, R, D, value group


# Interpreter time: each bits value and each config once here, the other
# diagonal of bits x config in the fp32 test below; every attention test
# byte-checks the write too, on further pairs.
@pytest.mark.parametrize("bits,bs,group,residual,d,vgroup", [(8, *WRITE_CFGS[0]), (4, *WRITE_CFGS[1]),
                                                             (2, *WRITE_CFGS[2])])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_write_bit_identical_to_torch(triton_interpret, bits, bs, group, residual, d, vgroup, dtype):
    layout = KiviLayout.of(KiviParams(bits, group, residual, vgroup), bs, d, dtype)
    twin = Twin(layout, LENGTHS, 2, dtype, seed=bits * 7 + bs)
    for chunk in STEPS:
        twin.step(chunk)
        _bytes_equal(twin.kv_triton, twin.kv_cache)


@pytest.mark.parametrize("bits,cfg", [(8, WRITE_CFGS[1]), (4, WRITE_CFGS[2]), (2, WRITE_CFGS[0])])
def test_write_bit_identical_to_torch_fp32(triton_interpret, bits, cfg):
    test_write_bit_identical_to_torch(None, bits, *cfg, torch.float32)


def _attend(layout, twin, query, qsl, lens, scale, pattern, **kw):
    out = torch.full(query.shape, float("nan"), dtype=query.dtype, device=DEV)
    kivi_paged_attention(layout, twin.kv_triton, query.to(DEV), twin.block_table.to(DEV),
                         qsl.to(DEV), lens.to(DEV), scale, out, pattern=pattern,
                         key=twin.last_k.to(DEV), value=twin.last_v.to(DEV), **kw)
    return out.cpu()


CASES = [
    # bits, (bs, group, residual, value group), head size, pattern, dtype. Each
    # bits value; keys of a tile in one group and gathered per token, each
    # dense and sparse; one and several value groups; both block sizes and
    # dtypes (block size 16 with gathered keys: decode tests).
    (8, (32, 32, 32, 16), 16, None, torch.float32),
    (4, (32, 8, 16, 8), 32, None, torch.float32),
    (2, (32, 8, 16, 16), 32, SINK_WINDOW, torch.bfloat16),
    (8, (16, 16, 16, 4), 16, SINK_WINDOW, torch.bfloat16),
]


@pytest.mark.parametrize("bits,cfg,d,pattern,dtype", CASES,
                         ids=[f"int{c[0]}-bs{c[1][0]}g{c[1][1]}r{c[1][2]}vg{c[1][3]}-d{c[2]}-"
                              f"{'sw' if c[3] else 'dense'}-{str(c[4])[6:]}" for c in CASES])
def test_attention_matches_torch_path(triton_interpret, bits, cfg, d, pattern, dtype):
    bs, group, residual, vgroup = cfg
    layout = KiviLayout.of(KiviParams(bits, group, residual, vgroup), bs, d, dtype)
    h_kv, h_q = 2, 4  # GQA 2
    twin = Twin(layout, LENGTHS, h_kv, dtype, seed=bits * 7 + bs)
    scale = d ** -0.5
    g = torch.Generator().manual_seed(1)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for chunk in STEPS:
        qsl, lens = twin.step(chunk)
        _bytes_equal(twin.kv_triton, twin.kv_cache)
        query = torch.randn(int(qsl[-1]) + 2, h_q, d, generator=g).to(dtype)  # 2 padding rows
        n = int(qsl[-1])
        got = _attend(layout, twin, query, qsl, lens, scale, pattern, block_q=8)
        want = torch.zeros(query.shape, dtype=dtype)
        kivi.attention(layout, layout.views(twin.kv_cache), query, twin.block_table, qsl, lens,
                       scale, want, pattern=pattern, key=twin.last_k, value=twin.last_v)
        torch.testing.assert_close(got[:n].float(), want[:n].float(), atol=tol, rtol=tol)
        ref = _reference(twin, query[:n], qsl, lens, scale, pattern)
        torch.testing.assert_close(got[:n].float(), ref, atol=tol, rtol=tol)
        assert got[n:].isnan().all(), "padding rows must not be written"


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("bits,pattern", [(4, None), (2, SINK_WINDOW)], ids=["int4-dense", "int2-sw"])
def test_decode_split_kv(triton_interpret, num_splits, bits, pattern):
    """Decode steps (one query per request) with split-KV partials merged."""
    dtype = torch.float32
    layout = KiviLayout.of(KiviParams(bits, 8, 16), 16, 32, dtype)
    lengths = [73, 18, 4, 51]
    twin = Twin(layout, lengths, 1, dtype, seed=3)
    twin.step({0: 70, 1: 15, 2: 1, 3: 48})
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        qsl, lens = twin.step({r: 1 for r in range(len(lengths))})
        query = torch.randn(len(lengths), 2, 32, generator=g)  # GQA 2 over one KV head
        got = _attend(layout, twin, query, qsl, lens, 0.2, pattern, num_splits=num_splits)
        ref = _reference(twin, query, qsl, lens, 0.2, pattern)
        torch.testing.assert_close(got.float(), ref, atol=1e-4, rtol=1e-4)


def test_stale_bytes_are_masked(triton_interpret):
    """inf / NaN scales in slots past seq_len and in unwritten residual rows
    of the pages a request reads do not reach the output."""
    dtype = torch.float32
    layout = KiviLayout.of(KiviParams(4, 8, 16), 16, 16, dtype)
    twin = Twin(layout, [37], 1, dtype, seed=5)
    qsl, lens = twin.step({0: 37})
    pages = layout.pages(twin.kv_triton)
    blk = int(twin.block_table[0, 2])
    vs = pages[blk, 0, layout.v_scale_off : layout.k_scale_off].view(torch.float16).view(16, -1)
    vs[5:] = float("inf")  # slots 37.. of block 2
    query = torch.randn(37, 1, 16)
    got = _attend(layout, twin, query, qsl, lens, 0.25, None)
    ref = _reference(twin, query, qsl, lens, 0.25, None)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 2])
def test_odd_shapes(triton_interpret, bits):
    """Block size 8 (no tl.dot: broadcast-and-sum path) and a head size whose
    code bytes per token are not a power of two (padded planes)."""
    dtype = torch.float32
    layout = KiviLayout.of(KiviParams(bits, 4, 8), 8, 24, dtype)
    twin = Twin(layout, [21, 9], 1, dtype, seed=11)
    g = torch.Generator().manual_seed(4)
    for chunk in [{0: 13, 1: 6}, {0: 6, 1: 3}, {0: 1}, {0: 1}]:
        qsl, lens = twin.step(chunk)
        _bytes_equal(twin.kv_triton, twin.kv_cache)
        query = torch.randn(int(qsl[-1]), 3, 24, generator=g)  # GQA 3 (padded to 4)
        if DEV.type == "cuda":
            # compiled, this path was wrong (benchmarks/gpu_debug_kivi.py): refused
            with pytest.raises(ValueError, match="at least 16"):
                _attend(layout, twin, query, qsl, lens, 0.3, None)
            continue
        got = _attend(layout, twin, query, qsl, lens, 0.3, SINK_WINDOW if bits == 2 else None)
        ref = _reference(twin, query, qsl, lens, 0.3, SINK_WINDOW if bits == 2 else None)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
