"""SparsePattern: the predicate, block liveness and block needs, brute-forced."""

from __future__ import annotations

import random

import pytest
import torch

from vllm_adaptive.sparse_pattern import SparsePattern, cdiv


def random_patterns(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        if rng.random() < 0.5:
            yield SparsePattern(sink=rng.choice([0, 3, 8, 16]), window=rng.randint(1, 40))
        else:
            yield SparsePattern(
                sink=rng.choice([0, 5]), block=rng.choice([4, 8]),
                local_blocks=rng.randint(1, 3), vert_stride=rng.choice([0, 2, 3]),
            )


def test_visible_matches_scalar_definition():
    for pat in random_patterns(40):
        L = 70
        vis = pat.visible(torch.arange(L)[:, None], torch.arange(L)[None, :])
        for p in range(L):
            for j in range(L):
                want = j <= p and (
                    j < pat.sink
                    or (pat.window and p - j < pat.window)
                    or (pat.local_blocks and p // pat.block - j // pat.block < pat.local_blocks)
                    or (pat.vert_stride and (j // pat.block + 1) % pat.vert_stride == 0)
                )
                assert bool(vis[p, j]) == bool(want) == pat.visible_one(p, j)


def test_block_live_means_some_future_query_reads_it():
    for pat in random_patterns(60, seed=1):
        bs, L = random.Random(str(pat)).choice([4, 8, 16]), 90
        for n in range(1, L):
            for b in range(cdiv(n, bs)):
                lo, hi = b * bs, min(b * bs + bs, n)
                future = any(
                    pat.visible_one(p, j) for p in [*range(n, L), 10**6] for j in range(lo, hi)
                )
                assert pat.block_live(b, bs, n) == future, (pat, bs, n, b)


def test_block_needed_is_exact_for_a_step():
    for pat in random_patterns(30, seed=2):
        bs, L = 8, 80
        vis = pat.visible(torch.arange(L)[:, None], torch.arange(L)[None, :])
        for q_lo in range(0, L, 3):
            for q_hi in range(q_lo + 1, min(L, q_lo + 25) + 1, 4):
                for b in range(cdiv(q_hi, bs)):
                    want = bool(vis[q_lo:q_hi, b * bs:b * bs + bs].any())
                    assert pat.block_needed(b, bs, q_lo, q_hi) == want, (pat, q_lo, q_hi, b)


@pytest.mark.parametrize("in_step_free", [True, False])
def test_held_bound_covers_a_simulated_request(in_step_free):
    """max_held_blocks bounds live(ctx) + the step's new blocks, every step."""
    for pat in random_patterns(20, seed=3):
        bs, max_len, chunk = 8, 400, 48
        ctx, peak = 0, 0
        while ctx < max_len:
            n = min(ctx + (chunk if ctx < 200 else 1), max_len)
            held = sum(pat.block_live(b, bs, ctx) for b in range(cdiv(ctx, bs)))
            new = sum(in_step_free is False or pat.block_live(b, bs, n)
                      for b in range(cdiv(ctx, bs), cdiv(n, bs)))
            peak = max(peak, held + new)
            ctx = n
        assert peak <= pat.max_held_blocks(bs, max_len, chunk, in_step_free), pat


@pytest.mark.parametrize("kwargs,needle", [
    ({"window": 0}, "must see itself"),
    ({"window": -1}, "window must be an int >= 0"),
    ({"local_blocks": 2, "window": 0}, "need block > 0"),
])
def test_bad_patterns_rejected(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SparsePattern(**kwargs)
