"""The torch sparse path (CPU) against the dense masked reference.

Blocks that no query of the step needs, and cache pages at or after the
request's context (their keys must come from the fresh K/V), are filled with
NaN: any read of them shows up as a non-finite output. Stale slots inside
needed blocks get huge finite values, which masking must neutralise.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_adaptive import reference as ref
from vllm_adaptive.kernels.torch_paged import write_kv_cache
from vllm_adaptive.kernels.torch_sparse import needed_positions, sparse_attention
from vllm_adaptive.sparse_pattern import SparsePattern

from paged_cases import paged_case

PATTERNS = [
    SparsePattern(sink=5, window=20),
    SparsePattern(window=1),
    SparsePattern(sink=3, block=16, local_blocks=2, vert_stride=3),
    SparsePattern(block=32, local_blocks=1, vert_stride=2),
]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def sparse_case(seq_lens, query_lens, hq, hk, d, bs, pat, dtype=torch.float32, seed=0):
    """(q, k, v, key_cache, value_cache, block_table, query_start_loc, seq_lens)."""
    return paged_case(seq_lens, query_lens, hq, hk, d, bs, dtype, seed=seed).sparse()


def poison_unreadable(kc, vc, bt, qsl, sl, bs, pat):
    """NaN in every block the step must not read (freed, or holding only this
    step's positions); large finite garbage in needed blocks' slots at or past
    the context (stale data a kernel must mask)."""
    for r in range(sl.shape[0]):
        s = int(sl[r])
        ctx = s - int(qsl[r + 1] - qsl[r])
        for b in range(math.ceil(s / bs)):
            if b * bs >= ctx or not pat.block_needed(b, bs, ctx, s):
                kc[bt[r, b]] = float("nan")
                vc[bt[r, b]] = float("nan")
            elif (b + 1) * bs > ctx:
                kc[bt[r, b], :, ctx - b * bs:] = 3e4
                vc[bt[r, b], :, ctx - b * bs:] = -3e4


@pytest.mark.parametrize("pat", PATTERNS, ids=lambda p: p.describe())
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("grid", [
    ([1, 17, 129, 300], [1, 17, 40, 300]),  # decode, chunk behind a context, whole prompts
    ([300, 2011], [1, 200]),
])
def test_matches_reference_and_never_reads_unneeded_blocks(pat, bs, grid):
    q, k, v, kc, vc, bt, qsl, sl = sparse_case(*grid, 9, 3, 32, bs, pat)
    poison_unreadable(kc, vc, bt, qsl, sl, bs, pat)
    want = ref.sparse_attention_ref(q, k, v, kc, vc, bt, qsl, sl, 0.2, pat)
    got = sparse_attention(q, k, v, kc, vc, bt, qsl, sl, 0.2, pat, q_tile=37)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=TOL[q.dtype], rtol=0)


def test_bf16_and_gqa_5_to_1():
    pat = PATTERNS[0]
    q, k, v, kc, vc, bt, qsl, sl = sparse_case([300, 90], [60, 1], 5, 1, 64, 16, pat,
                                                dtype=torch.bfloat16)
    want = ref.sparse_attention_ref(q, k, v, kc, vc, bt, qsl, sl, 0.125, pat)
    got = sparse_attention(q, k, v, kc, vc, bt, qsl, sl, 0.125, pat)
    torch.testing.assert_close(got, want, atol=TOL[torch.bfloat16], rtol=0)


def test_window_covering_the_sequence_is_full_attention():
    pat = SparsePattern(window=4096)
    q, k, v, kc, vc, bt, qsl, sl = sparse_case([1, 17, 129, 300], [1, 17, 40, 300], 8, 2, 32, 16, pat)
    got = sparse_attention(q, k, v, kc, vc, bt, qsl, sl, 0.3, pat)
    # full attention reads everything from the cache: store the fresh keys there
    slots = []
    for r in range(4):
        s, ql = int(sl[r]), int(qsl[r + 1] - qsl[r])
        slots += [int(bt[r, p // 16]) * 16 + p % 16 for p in range(s - ql, s)]
    ref.write_kv_cache_ref(k, v, kc, vc, torch.tensor(slots))
    want = ref.paged_attention_ref(q, kc, vc, bt, qsl, sl, 0.3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_needed_positions_exact():
    for pat in PATTERNS:
        for lo in range(0, 200, 7):
            for hi in range(lo + 1, lo + 50, 5):
                vis = pat.visible(torch.arange(lo, hi)[:, None], torch.arange(hi)[None, :])
                want = torch.nonzero(vis.any(0)).flatten()
                assert torch.equal(needed_positions(pat, lo, hi), want), (pat, lo, hi)


def test_torch_writer_skips_null_block_and_padding():
    kc = torch.zeros(4, 1, 8, 2)
    vc = torch.zeros(4, 1, 8, 2)
    key = torch.arange(1, 9, dtype=torch.float32).reshape(4, 1, 2)
    slots = torch.tensor([3, 8, -1, 31])  # null block, block 1, padding, block 3
    write_kv_cache(key, key, kc, vc, slots, min_slot=8)
    assert kc[0].abs().sum() == 0
    assert torch.equal(kc[1, 0, 0], key[1, 0]) and torch.equal(kc[3, 0, 7], key[3, 0])
    assert kc.abs().sum() == key[1].abs().sum() + key[3].abs().sum()


def test_rejects_bad_key_shape():
    pat = PATTERNS[0]
    q, k, v, kc, vc, bt, qsl, sl = sparse_case([20], [20], 9, 3, 32, 16, pat)
    with pytest.raises(ValueError, match="key"):
        sparse_attention(q, k[:, :1], v, kc, vc, bt, qsl, sl, 0.2, pat)


def test_needed_blocks_equals_block_needed_filter():
    from vllm_adaptive.kernels.torch_sparse import needed_blocks

    for pat in PATTERNS + [SparsePattern(sink=40, window=9)]:
        for bs in (8, 16, 32):
            for ctx in range(1, 300, 13):
                for q_hi in (ctx + 1, ctx + 7, ctx + 60):
                    q_lo = ctx
                    want = [b for b in range(-(-ctx // bs)) if pat.block_needed(b, bs, q_lo, q_hi)]
                    assert needed_blocks(pat, bs, q_lo, q_hi, ctx) == want, (pat, bs, ctx, q_hi)
