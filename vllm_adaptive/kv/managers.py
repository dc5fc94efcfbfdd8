"""``SparsePatternManager``: frees the blocks a sparse layer will never read.

vLLM's scheduler drives a ``SingleTypeKVCacheManager`` per KV-cache group:

  remove_skipped_blocks(req, n)     before each allocation, n = tokens whose
                                    KV is computed and committed
  get_num_blocks_to_allocate(req, N) / allocate_new_blocks(req, N)
                                    give the request slots up to N tokens
  free(req)                         finish, abort and preemption

A block index ``b`` of a request is *live at n* when one of its tokens ``j < n``
is visible to some query ``p >= n`` (``SparsePattern.block_live``). Liveness
only ever switches off, so:

* ``remove_skipped_blocks`` frees every block dead at ``n`` (its entry becomes
  the null block). Dead blocks other than permanent ones (sinks, vertical
  stride) form a prefix, so a per-request cursor makes this O(1) amortised.
* ``allocate_new_blocks`` gives a real block only to new indices that are live
  at the *end* of the step (N). The others get the null block: their tokens
  are read only by queries of this same step, which take them from the step's
  fresh K/V (the kernels' second key source, ``reference.sparse_attention_ref``),
  and the worker skips writing them. This is what bounds a layer's holding by
  pattern + one chunk's live tail instead of pattern + whole prefill chunk.
  Groups whose kernel reads every key from the cache (vLLM's CPU attention,
  ``spec.in_step_free = False``) get a real block for every new index
  instead; the dead ones go back at the next ``remove_skipped_blocks``.

Prefix caching: no hits, ever (``find_longest_cache_hit``); the backend also
switches prefix caching off at start-up with a log line.
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, SingleTypeKVCacheManager

from vllm_adaptive.kv.specs import NULL_BLOCK_ID, SparsePatternSpec
from vllm_adaptive.metrics import counters
from vllm_adaptive.sparse_pattern import cdiv


class SparsePatternManager(SingleTypeKVCacheManager):
    def __init__(self, kv_cache_spec: SparsePatternSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.pattern = kv_cache_spec.pattern
        self._kind = "strided" if self.pattern.vert_stride else "sink_window"  # metrics label
        if self._null_block.block_id != NULL_BLOCK_ID:
            raise RuntimeError(
                f"vLLM's null block has id {self._null_block.block_id}, not "
                f"{NULL_BLOCK_ID}: the sparse runners would store tokens the manager "
                "dropped (vllm_adaptive.kv.specs.NULL_BLOCK_ID)"
            )
        if self.dcp_world_size != 1:
            raise ValueError("sparse pattern layers do not support decode context parallel")
        # Per request: blocks below the cursor are freed or permanent.
        self._cursor: dict[str, int] = {}
        # Per request: tokens the last allocation covered / the last removal saw.
        self._allocated_to: dict[str, int] = {}
        self._removed_at: dict[str, int] = {}

    # ------------------------------------------------------------- admission
    def _new_live(self, start: int, num_tokens: int) -> list[bool]:
        # Indices past the tokens' blocks are the KV format's residual blocks
        # (``spec.residual_blocks``), always real.
        bs = self.block_size
        n = cdiv(num_tokens, bs)
        end = n + self.kv_cache_spec.residual_blocks if num_tokens else 0
        if not self.kv_cache_spec.in_step_free:
            return [True] * max(0, end - start)
        return [
            b >= n or self.pattern.block_live(b, bs, num_tokens)
            for b in range(start, end)
        ]

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        if new_computed_blocks:
            raise AssertionError("sparse pattern layers never report prefix-cache hits")
        blocks = self.req_to_blocks.get(request_id, ())
        if apply_admission_cap:
            # Whole-sequence admission gate: the most this request will ever hold.
            spec = self.kv_cache_spec
            assert isinstance(spec, SparsePatternSpec)
            peak = min(cdiv(num_tokens, self.block_size) + spec.residual_blocks,
                       spec.max_blocks_held(num_tokens))
            held = sum(not blk.is_null for blk in blocks)
            return max(0, peak - held)
        return sum(self._new_live(len(blocks), num_tokens))

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        req_blocks = self.req_to_blocks[request_id]
        live = self._new_live(len(req_blocks), num_tokens)
        new_blocks = self.block_pool.get_new_blocks(sum(live)) if any(live) else []
        it = iter(new_blocks)
        req_blocks.extend(next(it) if is_live else self._null_block for is_live in live)
        if self._record_new_block_ids:
            self.new_block_ids.extend(b.block_id for b in new_blocks)
        self._allocated_to[request_id] = max(num_tokens, self._allocated_to.get(request_id, 0))
        return new_blocks

    # --------------------------------------------------------------- freeing
    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        blocks = self.req_to_blocks.get(request_id)
        n = processed_computed_tokens
        self._removed_at[request_id] = max(n, self._removed_at.get(request_id, 0))
        if not blocks:
            return
        bs, pat = self.block_size, self.pattern
        b = self._cursor.get(request_id, 0)
        freed: list[KVCacheBlock] = []
        while b < len(blocks) and b * bs < n:
            lo = b * bs
            if not pat.block_live(b, bs, n):
                if not blocks[b].is_null:
                    freed.append(blocks[b])
                    blocks[b] = self._null_block
            elif not pat.is_permanent(lo, lo + bs - 1):
                break  # window / local blocks: this one and all later are live
            b += 1
        self._cursor[request_id] = b
        if freed:
            self.block_pool.free_blocks(freed)
            counters().add(self._kind, "freed", len(freed))

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return 0  # remove_skipped_blocks is overridden; nothing is a prefix

    def pop_blocks_for_free(self, request_id: str) -> list[KVCacheBlock]:
        self._cursor.pop(request_id, None)
        self._allocated_to.pop(request_id, None)
        self._removed_at.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    # ---------------------------------------------------------- prefix cache
    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool,
        kv_cache_spec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        return tuple([] for _ in kv_cache_group_ids), 0

    def cache_blocks(self, request, num_tokens: int) -> None:
        return None

    # ------------------------------------------------------------ invariants
    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping broke a rule:

        * a block index live at the end of the last allocation is a real block;
        * every real block is live at the last removal (dead ones were freed);
        * no real block is held twice, and each has a reference;
        * a request has exactly ``cdiv(allocated_to, block_size)`` entries.
        """
        bs, pat = self.block_size, self.pattern
        seen: dict[int, str] = {}
        for req, blocks in self.req_to_blocks.items():
            n_alloc = self._allocated_to.get(req, 0)
            n_removed = self._removed_at.get(req, 0)
            n_res = self.kv_cache_spec.residual_blocks if n_alloc else 0
            if len(blocks) != cdiv(n_alloc, bs) + n_res:
                raise AssertionError(
                    f"{req}: {len(blocks)} entries for {n_alloc} tokens (block size {bs}, "
                    f"{n_res} residual blocks)"
                )
            for b, blk in enumerate(blocks):
                if blk.is_null:
                    if b >= cdiv(n_alloc, bs) or pat.block_live(b, bs, n_alloc):
                        raise AssertionError(f"{req}: block {b} is live at {n_alloc} but null")
                    continue
                if b * bs < n_removed and not pat.block_live(b, bs, n_removed):
                    raise AssertionError(
                        f"{req}: block {b} (id {blk.block_id}) is dead at {n_removed} "
                        "but still held"
                    )
                if blk.ref_cnt < 1:
                    raise AssertionError(f"{req}: block {blk.block_id} held with ref_cnt 0")
                if blk.block_id in seen:
                    raise AssertionError(
                        f"block {blk.block_id} held by {seen[blk.block_id]} and {req}"
                    )
                seen[blk.block_id] = req

    def num_held_blocks(self, request_id: str) -> int:
        return sum(not b.is_null for b in self.req_to_blocks.get(request_id, ()))


class ResidualFullManager(FullAttentionManager):
    """vLLM's full-attention manager, plus ``spec.residual_blocks`` blocks per
    request beyond its tokens' (a packed KV format's full-precision residual,
    ``formats/kivi.py``). They are allocated with the request's first tokens
    and move along as it grows: they are simply the next block-table entries,
    so admission, capacity and preemption see them like any other block."""

    def _extra(self, num_tokens: int) -> int:
        return self.kv_cache_spec.residual_blocks * self.block_size if num_tokens else 0

    def get_num_blocks_to_allocate(self, request_id, num_tokens, *args, **kwargs) -> int:
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens + self._extra(num_tokens), *args, **kwargs
        )

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        extra = self._extra(num_tokens)
        return super().allocate_new_blocks(request_id, num_tokens + extra, num_tokens_main_model + extra)
