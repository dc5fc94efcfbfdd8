"""Every runner (``vllm_adaptive.runners.RUNNERS``) against the reference, one table.

Each case is written into the layer's cache *through the runner's own write*
(vLLM's ISA-packed writer for the vllm_cpu runners, the plugin's writers for
the others) and attended through its ``plan`` + ``attend``, exactly as the
backend drives it; the answer is dense masked attention in float32 over the
true keys (``reference._masked_heads``), computed without any cache. Pages
a request does not own, and (sparse) pages a KV manager may have freed or
never allocated, are the NaN null block; ``in_step_free`` runners must also
skip storing tokens whose block is the null block. Triton runners run under
``TRITON_INTERPRET=1`` on CPU. Adding a runner adds it here automatically.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_adaptive import reference as ref
from vllm_adaptive.metadata import AdaptiveMetadata
from vllm_adaptive.sparse_pattern import SparsePattern
from vllm_adaptive.runners import RUNNERS, Geometry

from paged_cases import NULL_PAGE, paged_case
from tolerances import attention_atol

PATTERNS = {
    "dense": [None],
    "sparse": [
        SparsePattern(sink=32, block=32, local_blocks=2, vert_stride=3),  # block-aligned
        SparsePattern(sink=64, block=32, local_blocks=3),  # LongGen's block sink + window
        SparsePattern(block=64, local_blocks=1, vert_stride=2),  # pattern block of 2 pages
        SparsePattern(sink=5, window=40),  # token window (not block-aligned)
    ],
}
# decode rows first, then a chunk behind a context, a whole prompt, a one-token prompt
SEQ_LENS, QUERY_LENS = [129, 300, 333, 77, 1], [1, 1, 100, 77, 1]
BS = 32
DTYPES = (torch.float32, torch.bfloat16)
# Without a GPU, Triton kernels run in the interpreter (~10 s a case): the
# kernel code is the same for both dtypes (only its loads and stores change),
# so there each sparse pattern runs in one dtype, alternating; dense in both.
INTERPRETED = not torch.cuda.is_available()


def _cases():
    for (family, fmt, path), runner in sorted(RUNNERS.items()):
        if fmt != "model_dtype":
            continue  # quantized formats: tests/test_kivi*.py, against the dequantized cache
        if family == "release":
            continue  # tables from the connector: tests/test_release_runner.py
        for k, pattern in enumerate(PATTERNS[family]):
            for dtype in DTYPES:
                if path == "triton" and INTERPRETED and pattern is not None and dtype != DTYPES[k % 2]:
                    continue
                yield pytest.param(
                    runner, pattern, dtype,
                    id=f"{family}-{fmt}-{path}-{pattern.describe() if pattern else 'full'}-"
                       f"{str(dtype).replace('torch.', '')}",
                )


def _common(case) -> SimpleNamespace:
    """What vLLM's split_decodes_and_prefills reads of CommonAttentionMetadata."""
    qsl = case.query_start_loc
    return SimpleNamespace(
        max_query_len=int((qsl[1:] - qsl[:-1]).max()), num_reqs=qsl.shape[0] - 1,
        num_actual_tokens=int(qsl[-1]), query_start_loc_cpu=qsl,
    )


@pytest.mark.parametrize("runner_cls,pattern,dtype", list(_cases()))
def test_runner_matches_reference_with_poisoned_pages(triton_interpret, runner_cls, pattern, dtype):
    if runner_cls.path == "vllm_cpu":
        pytest.importorskip("vllm._custom_ops")
    if runner_cls.unsupported(pattern, BS):
        pytest.skip(f"{runner_cls.describe()}: {runner_cls.unsupported(pattern, BS)}")
    hq, hk, d = 9, 3, 64
    sparse = pattern is not None
    case = paged_case(SEQ_LENS, QUERY_LENS, hq, hk, d, BS, dtype, seed=3, pattern=pattern,
                      free=sparse, in_step_free=sparse and runner_cls.in_step_free)
    # The true keys of every position: the random cache contents before this
    # step (context), this step's fresh rows after it.
    # Keys of freed blocks are invisible to every query of the step: zeros.
    def cached(cache, r, p):
        blk = int(case.block_table[r, p // BS])
        return torch.zeros_like(cache[0, :, 0]) if blk == NULL_PAGE else cache[blk, :, p % BS]

    true_k, true_v = [], []
    for r, ctx, s, q0 in case.requests():
        true_k.append(torch.stack([cached(case.key_cache, r, p) for p in range(ctx)]
                                  + list(case.key[q0:q0 + s - ctx])).float())
        true_v.append(torch.stack([cached(case.value_cache, r, p) for p in range(ctx)]
                                  + list(case.value[q0:q0 + s - ctx])).float())

    # A layer cache of NaN everywhere, written only through the runner: the
    # request's own blocks too, past the tokens written. vLLM hands a block
    # back with whatever its last owner left, and a block freed by a KIVI
    # layer (packed bytes, ``formats/kivi.py``) is reused by a model_dtype
    # layer sharing the same tensor (one layer of each KV-cache group per
    # tensor): its unwritten slots may hold NaN patterns.
    kv_cache = torch.full_like(case.kv_pages, float("nan"))
    geometry = Geometry(num_heads=hq, num_kv_heads=hk, head_size=d, dtype=dtype,
                        kv_cache_dtype="auto", block_size=BS, null_slot_end=BS, foreign_pages=True)
    runner = runner_cls(geometry, pattern)
    ctx_rows, ctx_slots = [], []
    for r, ctx, s, _ in case.requests():
        for p in range(ctx):
            if int(case.block_table[r, p // BS]) != NULL_PAGE:  # freed blocks are gone
                ctx_rows.append((r, p))
                ctx_slots.append(case.slot(r, p))
    if ctx_rows:
        k_ctx = torch.stack([true_k[r][p] for r, p in ctx_rows]).to(dtype)
        v_ctx = torch.stack([true_v[r][p] for r, p in ctx_rows]).to(dtype)
        runner.write(k_ctx, v_ctx, kv_cache, torch.tensor(ctx_slots), None)
    runner.write(case.key, case.value, kv_cache, case.step_slots(), None)
    if runner_cls.in_step_free:
        assert torch.isnan(kv_cache[NULL_PAGE]).all(), "a token of the null block was stored"

    md = AdaptiveMetadata(
        num_actual_tokens=case.query.shape[0], max_query_len=max(QUERY_LENS),
        max_seq_len=max(SEQ_LENS), query_start_loc=case.query_start_loc,
        seq_lens=case.seq_lens, query_start_loc_cpu=case.query_start_loc,
        block_table=case.block_table, slot_mapping=case.step_slots(), common=_common(case),
        # as the builder does: a host copy only for runners that declare they need it
        seq_lens_cpu=case.seq_lens if runner_cls.host_lengths else None,
    )
    md.step = runner.plan(md)
    out = torch.full_like(case.query, float("nan"))
    runner.attend(case.query, case.key, case.value, kv_cache, md, 0.125, out)

    want = torch.zeros_like(case.query)
    for r, ctx, s, q0 in case.requests():
        q_pos, k_pos = torch.arange(ctx, s)[:, None], torch.arange(s)[None, :]
        visible = pattern.visible(q_pos, k_pos) if sparse else k_pos <= q_pos
        ref._masked_heads(case.query[q0:q0 + s - ctx], true_k[r], true_v[r], visible, 0.125,
                          want[q0:q0 + s - ctx])
    assert torch.isfinite(out).all()
    # derived from float32 / bf16 rounding bounds (tests/tolerances.py)
    atol = attention_atol(dtype, case.query, torch.cat(true_k), torch.cat(true_v), max(SEQ_LENS), 0.125)
    torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=0)


def test_every_family_has_a_runner_on_every_path():
    """The table is complete for what this release implements (a missing
    combination fails at start-up, see test_plan.py)."""
    assert {(f, p) for f, fmt, p in RUNNERS if fmt == "model_dtype"} == {
        (f, p) for f in ("dense", "sparse") for p in ("vllm_cpu", "torch", "triton")
    } | {("release", "torch")}  # release: the torch path only (its scorers read the keys)
    # kivi: vLLM's CPU ops cannot read its pages; torch everywhere, Triton on CUDA
    assert {(f, p) for f, fmt, p in RUNNERS if fmt == "kivi"} >= {
        (f, p) for f in ("dense", "sparse") for p in ("torch", "triton")
    }
