"""Give LongGen sparse layers their own KV-cache spec.

``Attention.get_kv_cache_spec`` builds a ``FullAttentionSpec`` for every layer
without a sliding window, and the backend's ``customize_spec`` hook receives
only the spec, not the layer, so it cannot tell a sparse layer from a full one.
The wrap asks the original for its spec and, for a layer served by ADAPTIVE,
returns the spec of the layer's plan (``startup.kv_spec_for_layer``): for a
sparse kind a ``SparsePatternSpec`` with the same page shape. vLLM's hybrid
KV-cache manager then puts those layers into their own groups, managed by
``kv/managers.py``.
"""

from __future__ import annotations

from vllm_adaptive.patches import PatchRecord

RECORD = PatchRecord(
    area="per-layer KV cache spec",
    targets=("vllm.model_executor.layers.attention.attention.Attention.get_kv_cache_spec",),
    why="sparse layers need their own spec (and manager) to free blocks, and the "
    "backend's customize_spec hook does not know which layer it customizes",
    how="method wrap: for ADAPTIVE layers of a sparse kind, replace the returned "
    "FullAttentionSpec by a SparsePatternSpec of the same page shape; all other "
    "layers get the original spec",
    upstream="vllm-project/vllm#42449 plans backend-built specs (AttentionBackend."
    "customize_spec docstring)",
    delete_when="the backend builds the layer's spec itself, with the layer's name",
)


def apply() -> None:
    from vllm.model_executor.layers.attention.attention import Attention

    from vllm_adaptive.patches import wrap

    def make(original):
        def get_kv_cache_spec(self, vllm_config):
            spec = original(self, vllm_config)
            backend = getattr(self, "attn_backend", None)
            if spec is None or backend is None or backend.get_name() != "ADAPTIVE":
                return spec
            from vllm_adaptive.startup import kv_spec_for_layer

            return kv_spec_for_layer(self.layer_name, spec, vllm_config)

        return get_kv_cache_spec

    wrap(Attention, "get_kv_cache_spec", make)
