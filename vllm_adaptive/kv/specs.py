"""``SparsePatternSpec``: the KV cache of a LongGen sparse layer.

A sparse layer (``sink_window`` / ``strided``) only ever reads the keys of its
:class:`~vllm_adaptive.sparse_pattern.SparsePattern`, so its KV-cache group frees every
block no future query can read (``kv/managers.py``). The spec carries the
pattern (so manager and kernels compute the same predicate) and the per-step
token budget that bounds a request's peak holding.

It subclasses ``AttentionSpec`` directly, not ``FullAttentionSpec`` (the hybrid
coordinator treats those as prefix-closed) nor ``SlidingWindowSpec`` (vLLM
promotes those to full attention when the hybrid manager is off, and several
connectors special-case them). It is registered with vLLM's
``KVCacheSpecRegistry`` as its own grouping type, so sparse layers with equal
patterns form their own KV-cache groups next to the full-attention group.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from vllm_adaptive.sparse_pattern import SparsePattern


#: The null block's id. vLLM's ``BlockPool`` takes its null block first from a
#: free queue of ids 0..n-1; every ``SparsePatternManager`` checks this when it
#: is built (start-up), and the workers' sparse runners skip writing slots of
#: ``[0, block_size)``, where the manager points the tokens it does not keep.
NULL_BLOCK_ID = 0

_PATTERN_FIELDS = ("sink", "window", "block", "local_blocks", "vert_stride")
# the spec's name for a pattern field (AttentionSpec already has block_size)
_SPEC_FIELD = {"block": "pattern_block"}


@dataclass(frozen=True, kw_only=True)
class SparsePatternSpec(AttentionSpec):
    sink: int = 0
    window: int = 0
    pattern_block: int = 0
    local_blocks: int = 0
    vert_stride: int = 0
    # Most tokens one request computes in one step (vLLM's
    # ``max_in_flight_tokens``): bounds the blocks held during a prefill chunk.
    chunk_tokens: int = 0
    # Whether blocks dead at the end of a step are left unallocated (their
    # tokens then live only in the step's fresh K/V). False for kernels that
    # read every key from the cache (vLLM's CPU attention).
    in_step_free: bool = True
    # Blocks each request holds beyond its tokens' (a packed KV format's
    # full-precision residual, ``formats/kivi.py``); 0 for ``model_dtype``.
    residual_blocks: int = 0

    @property
    def pattern(self) -> SparsePattern:
        return SparsePattern(**{f: getattr(self, _SPEC_FIELD.get(f, f)) for f in _PATTERN_FIELDS})

    def max_blocks_held(self, max_model_len: int) -> int:
        return self.pattern.max_held_blocks(
            self.block_size, max_model_len, self.chunk_tokens or max_model_len,
            self.in_step_free,
        ) + self.residual_blocks

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        return super().max_num_blocks_per_req(vllm_config, max_len) + self.residual_blocks

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        """Whether vLLM may put all these layers in one KV-cache group (one
        manager, one block table): only layers that free the same blocks, as
        vLLM asks of sliding windows (one size). Without this, a model whose
        layers are all sparse but of two patterns (``strided`` +
        ``sink_window``) became one group freeing by the first layer's pattern."""
        return all(
            isinstance(s, SparsePatternSpec) and s.pattern == self.pattern
            and s.residual_blocks == self.residual_blocks and s.in_step_free == self.in_step_free
            for s in kv_cache_specs.values()
        )

    def max_memory_usage_bytes(self, vllm_config) -> int:
        max_model_len = vllm_config.model_config.max_model_len
        return self.max_blocks_held(max_model_len) * self.page_size_bytes

    @classmethod
    def from_attention_spec(
        cls, spec: AttentionSpec, pattern: SparsePattern, chunk_tokens: int,
        in_step_free: bool = True,
    ) -> "SparsePatternSpec":
        page = {f.name: getattr(spec, f.name) for f in fields(AttentionSpec) if f.init}
        pat = {_SPEC_FIELD.get(f, f): getattr(pattern, f) for f in _PATTERN_FIELDS}
        return cls(**page, **pat, chunk_tokens=chunk_tokens, in_step_free=in_step_free)


@dataclass(frozen=True, kw_only=True)
class ResidualFullSpec(FullAttentionSpec):
    """A full-attention layer whose KV format keeps a per-request residual in
    ``residual_blocks`` extra blocks (``formats/kivi.py``). A
    ``FullAttentionSpec`` in every other respect (prefix caching included);
    its manager (``kv/managers.py``) adds the residual blocks to every
    allocation, and the worker's block table is that much wider."""

    residual_blocks: int = 0

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return super().max_memory_usage_bytes(vllm_config) + self.residual_blocks * self.page_size_bytes

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        return super().max_num_blocks_per_req(vllm_config, max_len) + self.residual_blocks

    @classmethod
    def merge(cls, specs):
        merged = super().merge(specs)
        widths = {s.residual_blocks for s in specs}
        if len(widths) != 1:
            raise ValueError(f"layers of one KV-cache group hold different residual blocks: {sorted(widths)}")
        return cls(**{f.name: getattr(merged, f.name) for f in fields(FullAttentionSpec) if f.init},
                   residual_blocks=widths.pop())


def with_residual_blocks(spec, residual_blocks: int):
    """``spec`` holding ``residual_blocks`` extra blocks per request."""
    if isinstance(spec, SparsePatternSpec):
        return replace(spec, residual_blocks=residual_blocks)
    if type(spec) is FullAttentionSpec:
        page = {f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec) if f.init}
        return ResidualFullSpec(**page, residual_blocks=residual_blocks)
    raise TypeError(f"no residual-block variant of {type(spec).__name__}")
