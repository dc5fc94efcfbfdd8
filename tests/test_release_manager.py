"""ReleaseManager driven through random allocate / release / rebuild /
preempt / abort sequences on a real vLLM BlockPool.

A fake worker mirrors the cache: every block holds the (request, index) it
was written for, and the step's copies (copy-outs first, then copy-ins, as
the connector's worker half runs them) move those labels between the pool and
a host tier. After every step the manager's invariants hold, the pool's free
count matches what the requests hold, every held block carries exactly the
label of its (request, index) (so a rebuilt block got its own content back
and a released block reused by another request was saved before it was
overwritten), and no request holds more than its budget plus one step.
"""

from __future__ import annotations

import random

import pytest
import torch
from vllm.v1.core.block_pool import BlockPool

from vllm_adaptive.importance.rules import Reduce
from vllm_adaptive.kv import register_kv_specs
from vllm_adaptive.release.manager import ReleaseManager
from vllm_adaptive.release.spec import ReleaseBudgetSpec
from vllm_adaptive.sparse_pattern import cdiv

BS = 8


def make(num_blocks=200, budget=6, sink=1, recent=1, rebuild=2, host=30, chunk=24, scorer="gru"):
    register_kv_specs()
    spec = ReleaseBudgetSpec(
        block_size=BS, num_kv_heads=1, head_size=8, dtype=torch.float32,
        budget_blocks=budget, sink_blocks=sink, recent_blocks=recent, rebuild=rebuild,
        host_blocks=host, scorer=scorer, chunk_tokens=chunk,
    )
    pool = BlockPool(num_blocks, enable_caching=False, hash_block_size=BS)
    mgr = ReleaseManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                         scheduler_block_size=BS)
    return mgr, pool


class FakeWorker:
    """Labels per physical block and host slot."""

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[str, int]] = {}
        self.host: dict[int, tuple[str, int]] = {}

    def run(self, mgr, written: dict[str, tuple[int, int]]) -> None:
        out, into = mgr.take_copies()
        for b, slot in out:
            self.host[slot] = self.blocks.get(b)
        for slot, b in into:
            self.blocks[b] = self.host[slot]
        # the forward pass writes each scheduled request's new tokens
        for req, (lo, hi) in written.items():
            blocks = mgr.req_to_blocks[req]
            for i in range(lo // BS, cdiv(hi, BS)):
                assert not blocks[i].is_null, (req, i, "written block is released")
                self.blocks[blocks[i].block_id] = (req, i)


def check(mgr, pool, worker, computed: dict[str, int]) -> None:
    mgr.check_invariants()
    held = sum(mgr.num_held_blocks(r) for r in mgr.req_to_blocks)
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1 - held
    for req, blocks in mgr.req_to_blocks.items():
        for i, blk in enumerate(blocks):
            if not blk.is_null and i * BS < computed.get(req, 0):
                assert worker.blocks.get(blk.block_id) == (req, i), (req, i, blk.block_id)
        assert mgr.num_held_blocks(req) <= mgr.spec.budget_blocks + cdiv(mgr.spec.chunk_tokens, BS)


def decode_to(mgr, worker, upto: int, score_by_index: bool = False):
    """Request "a" grows 8 tokens a step to ``upto``, releasing as it goes
    (worker scores = the block index when ``score_by_index``); returns
    (tokens, released block indices, kept block indices)."""
    n = 0
    while n < upto:
        if score_by_index:
            mgr.store.update({"a": {i: float(i) for i in range(cdiv(n, BS))}}, Reduce.LAST)
        mgr.remove_skipped_blocks("a", n)
        mgr.allocate_new_blocks("a", n + 8, n + 8)
        worker.run(mgr, {"a": (n, n + 8)})
        n += 8
    mgr.remove_skipped_blocks("a", n)
    worker.run(mgr, {})
    blocks = mgr.req_to_blocks["a"]
    return n, [i for i, b in enumerate(blocks) if b.is_null], [i for i, b in enumerate(blocks) if not b.is_null]


def test_release_holds_budget_and_frees_to_pool():
    mgr, pool = make(rebuild=0)
    free0 = pool.get_num_free_blocks()
    worker, n = FakeWorker(), 0
    # prefill 80 tokens (10 blocks) in chunks of 24, scores favour block 3
    while n < 80:
        mgr.store.update({"a": {i: (10.0 if i == 3 else float(i % 2)) for i in range(cdiv(n, BS))}}, Reduce.LAST)
        mgr.remove_skipped_blocks("a", n)
        new = min(24, 80 - n)
        mgr.allocate_new_blocks("a", n + new, n + new)
        worker.run(mgr, {"a": (n, n + new)})
        n += new
        check(mgr, pool, worker, {"a": n})
    mgr.remove_skipped_blocks("a", n)
    held = [i for i, b in enumerate(mgr.req_to_blocks["a"]) if not b.is_null]
    # sink 0, recent 9 (n = 80 fills block 9), the best-scored 3, then the
    # score-1 blocks; the score-0 blocks went, lowest index first on ties
    assert held == [0, 1, 3, 5, 7, 9]
    assert pool.get_num_free_blocks() == free0 - 6
    assert mgr.stats.released == 4 and mgr.stats.dropped == 0


def test_rebuild_swaps_in_the_highest_bound():
    mgr, pool = make(rebuild=1)
    worker = FakeWorker()
    n, released, kept = decode_to(mgr, worker, 80, score_by_index=True)
    assert 2 in released
    # the queries now point at block 2: it comes back, the weakest-bound kept block goes
    bounds = {i: 1.0 for i in kept}
    bounds.update({i: 0.0 for i in released})
    bounds[2] = 5.0
    bounds[kept[1]] = 0.5  # kept[0] is the sink (protected)
    mgr.store.update({}, Reduce.LAST, bounds={"a": bounds})
    mgr.remove_skipped_blocks("a", n)
    worker.run(mgr, {})
    blocks = mgr.req_to_blocks["a"]
    assert not blocks[2].is_null and blocks[kept[1]].is_null
    assert worker.blocks[blocks[2].block_id] == ("a", 2)
    assert mgr.stats.rebuilt == 1
    check(mgr, pool, worker, {"a": n})


def test_a_rebuilt_block_stays_with_a_scheduler_side_scorer():
    """``recent`` scores a block by its index, so the oldest unprotected block
    goes first. A rebuilt block is old by definition: without its pin it
    would be released again at the very next removal, undoing the rebuild."""
    mgr, pool = make(rebuild=1, scorer="recent")
    worker = FakeWorker()
    n, released, kept = decode_to(mgr, worker, 80)
    assert released[:2] == [1, 2]  # oldest first (block 0 is the sink)
    bounds = {i: 1.0 for i in kept} | {i: 0.0 for i in released} | {2: 5.0, kept[-2]: 0.5}
    mgr.store.update({}, Reduce.LAST, bounds={"a": bounds})
    mgr.remove_skipped_blocks("a", n)  # block 2 swaps in for kept[-2]
    worker.run(mgr, {})
    assert not mgr.req_to_blocks["a"][2].is_null and mgr.stats.rebuilt == 1
    mgr.store.update({}, Reduce.LAST, bounds={})  # no new reason to swap
    for _ in range(3):  # the request grows past its budget: releases by score
        mgr.allocate_new_blocks("a", n + 8, n + 8)
        worker.run(mgr, {"a": (n, n + 8)})
        n += 8
        mgr.remove_skipped_blocks("a", n)
        worker.run(mgr, {})
        assert not mgr.req_to_blocks["a"][2].is_null, "the rebuilt block was released by score"
        assert worker.blocks[mgr.req_to_blocks["a"][2].block_id] == ("a", 2)
    assert mgr.stats.released >= 3 + len(released)
    check(mgr, pool, worker, {"a": n})


def test_host_tier_full_drops_blocks():
    mgr, pool = make(rebuild=0, host=2)
    worker, n = FakeWorker(), 0
    while n < 96:
        mgr.remove_skipped_blocks("a", n)
        mgr.allocate_new_blocks("a", n + 8, n + 8)
        worker.run(mgr, {"a": (n, n + 8)})
        n += 8
    assert mgr.stats.released > 2 and mgr.stats.dropped == mgr.stats.released - 2
    check(mgr, pool, worker, {"a": n})


@pytest.mark.parametrize("seed", range(12))
def test_random_sequences(seed):
    rng = random.Random(seed)
    sink, recent = rng.choice([1, 2]), rng.choice([0, 1, 2])
    mgr, pool = make(num_blocks=rng.choice([40, 80, 200]),
                     budget=sink + recent + 2 + rng.choice([0, 2, 4]), sink=sink, recent=recent,
                     rebuild=rng.choice([1, 3]) if seed % 3 else 0, host=rng.choice([0, 5, 40]),
                     scorer=rng.choice(["gru", "recent", "h2o"]))
    worker = FakeWorker()
    computed: dict[str, int] = {}
    target: dict[str, int] = {}
    next_id = 0
    for _ in range(300):
        op = rng.random()
        if op < 0.15 or not computed:
            req = f"r{next_id}"
            next_id += 1
            computed[req], target[req] = 0, rng.randint(1, 200)
        elif op < 0.2:  # abort or preempt: both free everything
            req = rng.choice(list(computed))
            mgr.free(req)
            if rng.random() < 0.5:
                del computed[req], target[req]  # abort
            else:
                computed[req] = 0  # preempted: recomputed from the start
        # worker scores: random token scores (max), random bounds over held + host
        scores, bounds = {}, {}
        for req, n in computed.items():
            if req in mgr.req_to_blocks and n:
                scores[req] = {i: rng.random() for i in range(cdiv(n, BS)) if rng.random() < 0.7}
                idx = range(len(mgr.req_to_blocks[req]))
                bounds[req] = {i: rng.random() for i in idx if rng.random() < 0.8}
        mgr.store.update(scores, rng.choice(list(Reduce)), bounds=bounds)
        # one scheduler step: every request gets a chunk if the pool allows
        written = {}
        for req in list(computed):
            n = computed[req]
            mgr.remove_skipped_blocks(req, n)
            new = min(rng.choice([1, 1, 5, 24]), max(target[req] - n, 1))
            need = mgr.get_num_blocks_to_allocate(req, n + new, [], n, n, n + new)
            if need > pool.get_num_free_blocks():
                continue
            mgr.allocate_new_blocks(req, n + new, n + new)
            written[req] = (n, n + new)
        worker.run(mgr, written)
        for req, (_, hi) in written.items():
            computed[req] = hi
            if hi >= target[req] + rng.randint(0, 40):  # finished
                mgr.free(req)
                del computed[req], target[req]
        check(mgr, pool, worker, computed)
    if mgr.spec.rebuild and mgr.spec.host_blocks >= 5:
        assert mgr.stats.rebuilt > 0  # the sequence exercised rebuild
    for req in list(mgr.req_to_blocks):
        mgr.free(req)
    mgr.take_copies()
    mgr.check_invariants()
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_admission_cap_is_the_budget_plus_a_chunk():
    mgr, _ = make(budget=6, chunk=24)
    assert mgr.get_num_blocks_to_allocate("x", 8000, [], 0, 0, 8000, apply_admission_cap=True) == 6 + 3
    assert mgr.spec.max_blocks_held(8000) == 9
