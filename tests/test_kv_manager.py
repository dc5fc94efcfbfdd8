"""SparsePatternManager driven through allocate / free / preempt sequences.

The manager runs on a real vLLM BlockPool; after every operation its
invariants are checked, the pool's free count is reconciled with what the
requests hold, and every block a kernel may read in the next step is checked
to be allocated.
"""

from __future__ import annotations

import random

import pytest
import torch
from vllm.v1.core.block_pool import BlockPool

from vllm_adaptive.kv import register_kv_specs
from vllm_adaptive.kv.managers import SparsePatternManager
from vllm_adaptive.kv.specs import SparsePatternSpec
from vllm_adaptive.sparse_pattern import SparsePattern, cdiv

PATTERNS = {
    "sink_window": SparsePattern(sink=8, window=40),
    "window_only": SparsePattern(window=33),
    "strided": SparsePattern(sink=4, block=16, local_blocks=2, vert_stride=3),
}


def make_spec(pattern: SparsePattern, bs: int, chunk: int = 64, in_step_free: bool = True):
    return SparsePatternSpec(
        block_size=bs, num_kv_heads=1, head_size=8, dtype=torch.float32,
        sink=pattern.sink, window=pattern.window, pattern_block=pattern.block,
        local_blocks=pattern.local_blocks, vert_stride=pattern.vert_stride,
        chunk_tokens=chunk, in_step_free=in_step_free,
    )


def make_manager(pattern: SparsePattern, bs: int, num_blocks: int, chunk: int = 64,
                 in_step_free: bool = True):
    spec = make_spec(pattern, bs, chunk, in_step_free)
    pool = BlockPool(num_blocks, enable_caching=False, hash_block_size=bs)
    mgr = SparsePatternManager(
        spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0,
        scheduler_block_size=bs,
    )
    return mgr, pool


def step(mgr, req: str, ctx: int, n_new: int) -> bool:
    """One scheduler step for ``req``: free, then allocate slots up to ctx+n_new.
    Returns False (and allocates nothing) if the pool is too small."""
    mgr.remove_skipped_blocks(req, ctx)
    n = ctx + n_new
    need = mgr.get_num_blocks_to_allocate(req, n, [], ctx, ctx, n)
    if need > mgr.block_pool.get_num_free_blocks():
        return False
    got = mgr.allocate_new_blocks(req, n, n)
    assert len(got) == need
    return True


def check(mgr, pool, reqs: dict[str, int]) -> None:
    mgr.check_invariants()
    held = sum(mgr.num_held_blocks(r) for r in mgr.req_to_blocks)
    # block 0 is the null block and never free
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1 - held


def readable_blocks_allocated(mgr, req: str, ctx: int, n: int) -> None:
    """Every cached block a query of the step ctx..n may read is real."""
    bs, pat = mgr.block_size, mgr.pattern
    blocks = mgr.req_to_blocks[req]
    for b in range(cdiv(ctx, bs)):
        if pat.block_needed(b, bs, ctx, n):
            assert not blocks[b].is_null, (req, b, ctx, n)


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("bs", [8, 16])
@pytest.mark.parametrize("in_step_free", [True, False])
def test_prefill_then_decode_holds_only_the_pattern(name, bs, in_step_free):
    pat = PATTERNS[name]
    mgr, pool = make_manager(pat, bs, 400, in_step_free=in_step_free)
    ctx = 0
    for n_new in [64, 64, 50] + [1] * 90:  # chunked prefill, then decode
        mgr.remove_skipped_blocks("a", ctx)
        assert step(mgr, "a", ctx, n_new)
        readable_blocks_allocated(mgr, "a", ctx, ctx + n_new)
        ctx += n_new
        check(mgr, pool, {"a": ctx})
        mgr.remove_skipped_blocks("a", ctx)
        # after freeing, exactly the blocks live at ctx are held
        assert mgr.num_held_blocks("a") == pat.steady_blocks(bs, ctx)
        assert mgr.num_held_blocks("a") <= mgr.kv_cache_spec.max_blocks_held(10**6)
    assert mgr.num_held_blocks("a") < cdiv(ctx, bs)  # memory really dropped
    mgr.free("a")
    check(mgr, pool, {})
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_blocks_dead_within_a_chunk_are_never_allocated():
    pat = SparsePattern(sink=8, window=16)
    mgr, pool = make_manager(pat, 8, 100)
    assert step(mgr, "a", 0, 200)  # one long chunk: 25 block indices
    blocks = mgr.req_to_blocks["a"]
    real = [b for b, blk in enumerate(blocks) if not blk.is_null]
    # the sink block and the blocks holding tokens 185..199 (window 16 at 200)
    assert real == [0, 23, 24]
    check(mgr, pool, {"a": 200})


@pytest.mark.parametrize("in_step_free", [True, False])
def test_random_sequences_with_preempt_and_abort(in_step_free):
    rng = random.Random(0)
    for name, pat in PATTERNS.items():
        mgr, pool = make_manager(pat, 8, 120, in_step_free=in_step_free)
        ctxs: dict[str, int] = {}
        for it in range(600):
            op = rng.random()
            if op < 0.1 and len(ctxs) < 6:
                ctxs[f"r{it}"] = 0
            elif op < 0.15 and ctxs:  # abort or finish
                req = rng.choice(sorted(ctxs))
                mgr.free(req)
                del ctxs[req]
            elif op < 0.2 and ctxs:  # preempt: free everything, recompute later
                req = rng.choice(sorted(ctxs))
                mgr.free(req)
                ctxs[req] = 0
            elif ctxs:
                req = rng.choice(sorted(ctxs))
                n_new = rng.choice([1, 1, 1, 7, 30, 64])
                if step(mgr, req, ctxs[req], n_new):
                    readable_blocks_allocated(mgr, req, ctxs[req], ctxs[req] + n_new)
                    ctxs[req] += n_new
                    mgr.remove_skipped_blocks(req, ctxs[req])
            check(mgr, pool, ctxs)
        for req in list(ctxs):
            mgr.free(req)
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1, name


def test_without_in_step_freeing_the_chunk_is_held_until_the_next_step():
    """For kernels that read every key from the cache (vLLM's CPU kernel)."""
    pat = SparsePattern(sink=8, window=16)
    mgr, pool = make_manager(pat, 8, 100, in_step_free=False)
    assert step(mgr, "a", 0, 200)
    assert all(not b.is_null for b in mgr.req_to_blocks["a"])  # 25 real blocks
    check(mgr, pool, {"a": 200})
    mgr.remove_skipped_blocks("a", 200)
    held = [b for b, blk in enumerate(mgr.req_to_blocks["a"]) if not blk.is_null]
    assert held == [0, 23, 24]
    check(mgr, pool, {"a": 200})


def test_more_long_requests_fit_than_with_full_attention():
    """Same pool: full attention fits 2 requests of 512 tokens, the pattern many."""
    bs, length = 16, 512
    pat = PATTERNS["sink_window"]
    mgr, pool = make_manager(pat, bs, 2 * cdiv(length, bs) + 1)
    admitted = 0
    for r in range(20):
        ok = True
        ctx = 0
        while ctx < length and ok:
            ok = step(mgr, f"r{r}", ctx, min(64, length - ctx))
            ctx += 64
        if not ok:
            mgr.free(f"r{r}")
            break
        mgr.remove_skipped_blocks(f"r{r}", length)
        admitted += 1
    check(mgr, pool, {})
    # the pool's 2 * cdiv(length, bs) usable blocks hold that many // steady
    # finished requests; the last one admitted also needs its prefill peak
    # (at most one more request's worth): one fewer
    assert admitted >= 2 * (cdiv(length, bs) // pat.steady_blocks(bs, length)) - 1
    assert admitted > 2


def test_admission_gate_counts_the_peak_not_the_whole_sequence():
    pat = PATTERNS["sink_window"]
    mgr, _ = make_manager(pat, 8, 100, chunk=64)
    n = 4000
    peak = mgr.get_num_blocks_to_allocate("x", n, [], 0, 0, n, apply_admission_cap=True)
    assert peak == mgr.kv_cache_spec.max_blocks_held(n) < cdiv(n, 8)


def test_no_prefix_cache_hits_and_registration():
    register_kv_specs()
    register_kv_specs()  # idempotent
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    mgr, pool = make_manager(PATTERNS["strided"], 16, 10)
    assert KVCacheSpecRegistry.get_manager_class(mgr.kv_cache_spec) is SparsePatternManager
    hits, n = SparsePatternManager.find_longest_cache_hit(
        [], 512, [0, 1], pool, mgr.kv_cache_spec, False, 16
    )
    assert n == 0 and hits == ([], [])


def test_two_patterns_never_share_a_kv_cache_group():
    """vLLM puts the layers it deems of one type into one KV-cache group, with
    one manager: a model whose layers are all sparse, of two patterns, must get
    a group per pattern (one manager would free the other pattern's blocks)."""
    register_kv_specs()
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    strided, window = make_spec(PATTERNS["strided"], 16), make_spec(PATTERNS["sink_window"], 16)
    assert UniformTypeKVCacheSpecs.from_specs({"l0": strided, "l1": window}) is None
    other_chunk = make_spec(PATTERNS["strided"], 16, chunk=32)
    assert UniformTypeKVCacheSpecs.from_specs({"l0": strided, "l1": other_chunk}) is not None


def test_check_invariants_catches_a_leak():
    mgr, _ = make_manager(PATTERNS["window_only"], 8, 100)
    assert step(mgr, "a", 0, 64)
    ctx = 64
    for _ in range(40):
        assert step(mgr, "a", ctx, 1)
        ctx += 1
    mgr.check_invariants()
    mgr._cursor["a"] = 10**6  # pretend everything was scanned: nothing more is freed
    mgr.remove_skipped_blocks("a", ctx + 200)
    with pytest.raises(AssertionError, match="dead at"):
        mgr.check_invariants()
