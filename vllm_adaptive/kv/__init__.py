"""KV-cache specs and managers for the plugin's layer kinds (see spec.py)."""

from vllm_adaptive.kv.spec import SparsePatternSpec, register_kv_specs

__all__ = ["SparsePatternSpec", "register_kv_specs"]
