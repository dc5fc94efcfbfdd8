"""``ReleaseBudgetSpec``: the KV-cache spec of an ADORE release layer (any
process: the worker builds it, the scheduler's manager reads it)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_adaptive.sparse_pattern import cdiv


@dataclass(frozen=True, kw_only=True)
class ReleaseBudgetSpec(AttentionSpec):
    """The KV cache of an ADORE release layer (``release/kind.py``): each
    request holds at most ``budget_blocks`` blocks after each removal, plus
    the blocks of one step's tokens (``chunk_tokens``) until the next.

    Like ``SparsePatternSpec`` it subclasses ``AttentionSpec`` directly (an
    evicting spec must not look prefix-closed to the hybrid coordinator) and
    is its own grouping type. ``scorer`` and ``rebuild`` ride along so that
    the scheduler-side manager needs nothing but its spec; ``host_blocks`` is
    the host tier's size (blocks of this group's layers).
    """

    budget_blocks: int = 0
    sink_blocks: int = 1
    recent_blocks: int = 0
    rebuild: int = 0
    host_blocks: int = 0
    scorer: str = "recent"
    chunk_tokens: int = 0

    def max_blocks_held(self, max_model_len: int) -> int:
        all_blocks = cdiv(max_model_len, self.block_size)
        step = cdiv(self.chunk_tokens or max_model_len, self.block_size)
        return min(all_blocks, self.budget_blocks + step)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return self.max_blocks_held(vllm_config.model_config.max_model_len) * self.page_size_bytes

    @classmethod
    def from_attention_spec(cls, spec: AttentionSpec, params, chunk_tokens: int) -> "ReleaseBudgetSpec":
        page = {f.name: getattr(spec, f.name) for f in fields(AttentionSpec) if f.init}
        budget, sink, recent = params.blocks(spec.block_size)
        return cls(
            **page, budget_blocks=budget, sink_blocks=sink, recent_blocks=recent,
            rebuild=params.rebuild, host_blocks=params.host_tokens // spec.block_size,
            scorer=params.scorer, chunk_tokens=chunk_tokens,
        )
