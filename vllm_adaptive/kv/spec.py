"""``SparsePatternSpec``: the KV cache of a LongGen sparse layer.

A sparse layer (``sink_window`` / ``strided``) only ever reads the keys of its
:class:`~vllm_adaptive.pattern.SparsePattern`, so its KV-cache group frees every
block no future query can read (``kv/manager.py``). The spec carries the
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

from dataclasses import dataclass

from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_adaptive.pattern import SparsePattern


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

    @property
    def pattern(self) -> SparsePattern:
        return SparsePattern(
            sink=self.sink,
            window=self.window,
            block=self.pattern_block,
            local_blocks=self.local_blocks,
            vert_stride=self.vert_stride,
        )

    def max_blocks_held(self, max_model_len: int) -> int:
        return self.pattern.max_held_blocks(
            self.block_size, max_model_len, self.chunk_tokens or max_model_len,
            self.in_step_free,
        )

    def max_memory_usage_bytes(self, vllm_config) -> int:
        max_model_len = vllm_config.model_config.max_model_len
        return self.max_blocks_held(max_model_len) * self.page_size_bytes

    @classmethod
    def from_attention_spec(
        cls, spec: AttentionSpec, pattern: SparsePattern, chunk_tokens: int,
        in_step_free: bool = True,
    ) -> "SparsePatternSpec":
        return cls(
            block_size=spec.block_size,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            head_size_v=spec.head_size_v,
            dtype=spec.dtype,
            kv_quant_mode=spec.kv_quant_mode,
            page_size_padded=spec.page_size_padded,
            sink=pattern.sink,
            window=pattern.window,
            pattern_block=pattern.block,
            local_blocks=pattern.local_blocks,
            vert_stride=pattern.vert_stride,
            chunk_tokens=chunk_tokens,
            in_step_free=in_step_free,
        )


_REGISTERED = False


def register_kv_specs() -> None:
    """Register the spec and its manager with vLLM (idempotent, any process).

    vLLM's built-ins are registered first: the registry fills itself lazily
    only while empty, so registering ours into an empty registry would hide
    them. EngineCore's later ``register_all_kvcache_specs`` call re-registers
    the built-ins and leaves ours in place.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_adaptive.kv.manager import SparsePatternManager

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(SparsePatternSpec, SparsePatternManager)
    _REGISTERED = True
