"""What the LongGen sparse kinds share: a ``SparsePatternSpec`` KV cache whose
manager frees the blocks no later query reads, and the check that the pattern
frees anything at the engine's length."""

from __future__ import annotations

from vllm_adaptive.errors import AdaptiveConfigError
from vllm_adaptive.sparse_pattern import SparsePattern
from vllm_adaptive.layer_kind import LayerKind
from vllm_adaptive.kv.specs import SparsePatternSpec


class SparseKind(LayerKind):
    family = "sparse"
    frees_blocks = True

    def check_engine(self, pattern: SparsePattern, block_size: int, max_model_len: int) -> None:
        reach = pattern.sink + pattern.key_span() + 1
        if reach >= max_model_len:
            raise AdaptiveConfigError(
                f"adaptive_attention.{self.name}: the pattern ({pattern.describe()}) reaches "
                f"{reach} tokens back, not less than max_model_len={max_model_len}, "
                f"so it would free nothing; shrink it or use kind 'full'"
            )

    def kv_spec(self, spec, pattern: SparsePattern, *, chunk_tokens: int, in_step_free: bool):
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        if type(spec) is not FullAttentionSpec:
            raise ValueError(
                f"adaptive_attention: a {self.name} layer needs a plain full-attention "
                f"layer to make sparse, but vLLM built a {type(spec).__name__} for it"
            )
        return SparsePatternSpec.from_attention_spec(
            spec, pattern, chunk_tokens=chunk_tokens, in_step_free=in_step_free
        )
