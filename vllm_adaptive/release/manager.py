"""``ReleaseManager``: holds each request of an ADORE release layer group to
its KV budget, by importance score, and rebuilds released blocks.

It runs in the scheduler, once per KV-cache group, so every tensor-parallel
rank gets the same decision (the workers only execute it). Per request and
logical block index ``i`` it knows the physical block (or the null block once
released), and reads two numbers from the shared :class:`ScoreStore`, which
the scheduler-side connector (``release/scheduler_side.py``) fills from
the workers after every step:

  score(req, i)   the scorer's importance (higher = keep); None = not scored
                  yet (kept; among unscored blocks the oldest goes first)
  bound(req, i)   the query-aware bound of the latest queries (Quest: per
                  head ``sum_d max(q_d kmin_d, q_d kmax_d)``, max over heads
                  and layers), for held blocks and for blocks in the host tier

``remove_skipped_blocks(req, n)`` (vLLM calls it before every allocation,
``n`` = tokens computed) does, in order:

1. **release**: the protected blocks are the first ``sink_blocks``, the last
   ``recent_blocks`` full blocks and every block at or past ``n // bs`` (being
   filled). While the request holds more than ``budget_blocks``, the
   unprotected held block with the lowest score goes: it gets a host-tier slot
   (``release/host_tier.HostSlots``; a copy-out for the worker) if one is
   free, else it is dropped for good,
   and its block returns to vLLM's pool at once.
2. **rebuild** (``rebuild`` = R > 0): while fewer than R blocks came back this
   step and the host block with the highest bound beats the unprotected held
   block with the lowest bound, the two swap: the held one is released (as in
   1) and the host one gets a fresh block (a copy-in for the worker). The
   holding never grows. A rebuilt block is pinned against release by score
   (its score, or for scheduler-side scorers its index, was what released
   it); only a later swap can release it again.

Copies are queued here (``take_copies``) and run by the workers before the
step's forward pass, copy-outs first, so a block released and handed to
another request in the same step is saved before it is overwritten.

Prefix caching is off for these groups (no hits, nothing cached); the
backend logs why at start-up. Preemption and abort go through ``free``,
which drops the request's host slots too.
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager

from vllm_adaptive.importance.scorers import SCORERS
from vllm_adaptive.kv.specs import NULL_BLOCK_ID
from vllm_adaptive.metrics import counters
from vllm_adaptive.release.host_tier import HostSlots
from vllm_adaptive.release.scores import ScoreStore
from vllm_adaptive.release.spec import ReleaseBudgetSpec
from vllm_adaptive.release.stats import ReleaseStats
from vllm_adaptive.sparse_pattern import cdiv


class ReleaseManager(SingleTypeKVCacheManager):
    def __init__(self, kv_cache_spec: ReleaseBudgetSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        if self._null_block.block_id != NULL_BLOCK_ID:
            raise RuntimeError(
                f"vLLM's null block has id {self._null_block.block_id}, not {NULL_BLOCK_ID}: "
                "release runners take null entries for released blocks"
            )
        if self.dcp_world_size != 1:
            raise ValueError("release layers do not support decode context parallel")
        spec = kv_cache_spec
        self.spec = spec
        self.store = ScoreStore()  # replaced by the connector's shared store
        scorer = SCORERS[spec.scorer]
        self._index_scorer = scorer if scorer.scheduler_side else None
        self.stats = ReleaseStats()
        self.host_slots = HostSlots(spec.host_blocks)
        self._host: dict[str, dict[int, int]] = {}  # req -> {block index: host slot}
        self._pinned: dict[str, set[int]] = {}  # rebuilt blocks, pinned against release by score
        self._removed_at: dict[str, int] = {}
        self._allocated_to: dict[str, int] = {}
        self._modified: set[str] = set()  # requests whose table is no longer append-only
        self._copies_out: list[tuple[int, int]] = []  # (block id, host slot)
        self._copies_in: list[tuple[int, int]] = []  # (host slot, block id)
        self._to_rebuild: list[int] = []  # block indices chosen by _choose_rebuilds

    # ---------------------------------------------------------- scheduling
    def get_num_blocks_to_allocate(
        self, request_id: str, num_tokens: int, new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int, num_local_computed_tokens: int, num_tokens_main_model: int,
        apply_admission_cap: bool = False, prefill_end: int = 0,
    ) -> int:
        if new_computed_blocks:
            raise AssertionError("release layers never report prefix-cache hits")
        blocks = self.req_to_blocks.get(request_id, ())
        if apply_admission_cap:
            peak = min(cdiv(num_tokens, self.block_size),
                       self.spec.max_blocks_held(num_tokens))
            held = sum(not b.is_null for b in blocks)
            return max(0, peak - held)
        return max(0, cdiv(num_tokens, self.block_size) - len(blocks))

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        new = super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        self._allocated_to[request_id] = max(num_tokens, self._allocated_to.get(request_id, 0))
        self.stats.peak_held = max(self.stats.peak_held, self.num_held_blocks(request_id))
        return new

    def _protected(self, i: int, n: int) -> bool:
        n_full = n // self.block_size
        return i < self.spec.sink_blocks or i >= n_full - self.spec.recent_blocks

    def _release(self, req: str, blocks: list[KVCacheBlock], i: int, freed: list[KVCacheBlock]) -> None:
        blk = blocks[i]
        blocks[i] = self._null_block
        freed.append(blk)
        self.stats.released += 1
        counters().add("release", "released")
        self._modified.add(req)
        self._pinned.get(req, set()).discard(i)
        slot = self.host_slots.allocate()
        if slot is not None:
            self._host.setdefault(req, {})[i] = slot
            self._copies_out.append((blk.block_id, slot))
            self.stats.host_peak = max(self.stats.host_peak, self.host_slots.in_use)
        else:
            self.stats.dropped += 1
            counters().add("release", "dropped")

    def _score_key(self, req: str, i: int) -> tuple[float, int]:
        """Release order (lowest first). A pinned (rebuilt) block is never
        released by score, whichever scorer, so the pin is checked first."""
        if i in self._pinned.get(req, ()):
            return (float("inf"), i)
        if self._index_scorer is not None:  # scheduler-side (``recent``): no worker scores
            return (self._index_scorer.block_score(i), i)
        s = self.store.score(req, i)
        return (float("inf") if s is None else s, i)

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None,
    ) -> None:
        req, n = request_id, processed_computed_tokens
        self._removed_at[req] = max(n, self._removed_at.get(req, 0))
        blocks = self.req_to_blocks.get(req)
        if not blocks:
            return
        freed: list[KVCacheBlock] = []
        held = [i for i, b in enumerate(blocks) if not b.is_null]
        candidates = [i for i in held if not self._protected(i, n)]
        excess = len(held) - self.spec.budget_blocks
        if excess > 0:
            for i in sorted(candidates, key=lambda i: self._score_key(req, i))[:excess]:
                self._release(req, blocks, i, freed)
            candidates = [i for i in candidates if not blocks[i].is_null]
        if self.spec.rebuild and self._host.get(req):
            self._choose_rebuilds(req, blocks, candidates, freed)
        if freed:
            self.block_pool.free_blocks(freed)
            counters().add("release", "freed", len(freed))
        if self._to_rebuild:
            self._rebuild(req, blocks)
        self.stats.peak_after_release = max(self.stats.peak_after_release, self.num_held_blocks(req))

    def _choose_rebuilds(self, req: str, blocks, candidates: list[int], freed: list[KVCacheBlock]) -> None:
        host = self._host[req]
        bound = self.store.bound
        waiting = sorted(((b, i) for i in host if (b := bound(req, i)) is not None), reverse=True)
        kept = sorted((b, i) for i in candidates if (b := bound(req, i)) is not None)
        swaps: list[tuple[int, int]] = []
        for (hb, hi), (kb, ki) in zip(waiting, kept):
            if len(swaps) >= self.spec.rebuild or hb <= kb:
                break
            swaps.append((hi, ki))
        for hi, ki in swaps:
            self._release(req, blocks, ki, freed)
            self._to_rebuild.append(hi)
        if swaps:
            self.stats.rebuild_steps += 1

    def _rebuild(self, req: str, blocks: list[KVCacheBlock]) -> None:
        """Give each block chosen for rebuild a fresh block. Runs after the
        swaps' releases went back to the pool, so it cannot run short."""
        for i in self._to_rebuild:
            (new,) = self.block_pool.get_new_blocks(1)
            blocks[i] = new
            slot = self._host[req].pop(i)
            self.host_slots.free(slot, after_step=True)
            self._copies_in.append((slot, new.block_id))
            self._pinned.setdefault(req, set()).add(i)
            self.stats.rebuilt += 1
            counters().add("release", "rebuilt")
            self.stats.per_request_rebuilt[req] = self.stats.per_request_rebuilt.get(req, 0) + 1
        self._to_rebuild = []

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return 0

    def pop_blocks_for_free(self, request_id: str) -> list[KVCacheBlock]:
        for slot in self._host.pop(request_id, {}).values():
            self.host_slots.free(slot)
        # a copy-out queued for this request this step is harmless (its slot
        # is free again and nothing reads it); copy-ins target blocks being freed
        self._pinned.pop(request_id, None)
        self._removed_at.pop(request_id, None)
        self._allocated_to.pop(request_id, None)
        self._modified.discard(request_id)
        self.store.drop(request_id)
        return super().pop_blocks_for_free(request_id)

    # ---------------------------------------------------------- the channel
    def take_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """This step's (block -> host slot) and (host slot -> block) copies."""
        out, into = self._copies_out, self._copies_in
        self._copies_out, self._copies_in = [], []
        self.host_slots.end_step()
        return out, into

    def table_of(self, request_id: str) -> list[int] | None:
        """The request's block ids when they differ from what the worker built
        by appending (a release or rebuild happened); None otherwise."""
        if request_id not in self._modified:
            return None
        return [b.block_id for b in self.req_to_blocks[request_id]]

    def first_block_id(self, request_id: str) -> int | None:
        blocks = self.req_to_blocks.get(request_id)
        return blocks[0].block_id if blocks else None

    def host_blocks_of(self, request_id: str) -> list[tuple[int, int]]:
        """(block index, host slot) of the request's blocks in the host tier."""
        return sorted(self._host.get(request_id, {}).items())

    # ---------------------------------------------------------- prefix cache
    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool,
                               kv_cache_spec, drop_eagle_block, alignment_tokens,
                               dcp_world_size=1, pcp_world_size=1):
        return tuple([] for _ in kv_cache_group_ids), 0

    def cache_blocks(self, request, num_tokens: int) -> None:
        return None

    # ---------------------------------------------------------- invariants
    def num_held_blocks(self, request_id: str) -> int:
        return sum(not b.is_null for b in self.req_to_blocks.get(request_id, ()))

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping broke a rule:

        * after its last removal a request holds at most ``budget_blocks``
          blocks, or it had no unprotected block left to release;
        * it has ``cdiv(allocated_to, block_size)`` entries; protected
          entries and the block being filled are real;
        * every null entry is in the host tier or was dropped, and no host
          slot is used twice or also free;
        * no real block is held twice, and each has a reference.
        """
        bs, spec = self.block_size, self.spec
        seen: dict[int, str] = {}
        slots_used: dict[int, tuple[str, int]] = {}
        for req, blocks in self.req_to_blocks.items():
            n_alloc = self._allocated_to.get(req, 0)
            n = self._removed_at.get(req, 0)
            if len(blocks) != cdiv(n_alloc, bs):
                raise AssertionError(f"{req}: {len(blocks)} entries for {n_alloc} tokens (block size {bs})")
            held = [i for i, b in enumerate(blocks) if not b.is_null]
            for i, blk in enumerate(blocks):
                if blk.is_null:
                    if self._protected(i, n):
                        raise AssertionError(f"{req}: protected block {i} was released (n={n})")
                    continue
                if blk.ref_cnt < 1:
                    raise AssertionError(f"{req}: block {blk.block_id} held with ref_cnt 0")
                if blk.block_id in seen:
                    raise AssertionError(f"block {blk.block_id} held by {seen[blk.block_id]} and {req}")
                seen[blk.block_id] = req
            for i, slot in self._host.get(req, {}).items():
                if not blocks[i].is_null:
                    raise AssertionError(f"{req}: block {i} is held and in host slot {slot}")
                if slot in slots_used:
                    raise AssertionError(f"host slot {slot} used by {slots_used[slot]} and {(req, i)}")
                slots_used[slot] = (req, i)
            # the budget after the last removal (blocks allocated since then
            # lie past n // bs and are protected)
            before = [i for i in held if i < cdiv(n, bs)]
            unprotected = [i for i in before if not self._protected(i, n)]
            if len(before) > spec.budget_blocks and unprotected:
                raise AssertionError(
                    f"{req}: holds {len(before)} blocks > budget {spec.budget_blocks} "
                    f"with {len(unprotected)} releasable"
                )
        now, after_step = self.host_slots.free_slots()
        free = set(now) | set(after_step)
        if len(free) != len(now) + len(after_step):
            raise AssertionError("a host slot is free twice")
        if free & set(slots_used):
            raise AssertionError(f"host slots both free and used: {sorted(free & set(slots_used))}")
        if len(free) + len(slots_used) != spec.host_blocks:
            raise AssertionError(
                f"host slots leaked: {len(free)} free + {len(slots_used)} used != {spec.host_blocks}"
            )
