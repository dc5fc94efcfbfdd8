"""KV-cache specs (``specs.py``) and their managers (``managers.py``) for the
layer kinds that free blocks. ``REGISTRATIONS`` is the one table that pairs
them; specs know nothing of managers.

``register_kv_specs()`` registers the table with vLLM's
``KVCacheSpecRegistry`` (idempotent, any process). vLLM's built-ins are
registered first: the registry fills itself lazily only while empty, so
registering ours into an empty registry would hide them. EngineCore's later
``register_all_kvcache_specs`` call re-registers the built-ins and leaves ours
in place.
"""

from __future__ import annotations

from vllm_adaptive.kv.specs import ResidualFullSpec, SparsePatternSpec
from vllm_adaptive.release.spec import ReleaseBudgetSpec

_REGISTERED = False


def registrations() -> list[tuple[type, type]]:
    """(spec, manager) pairs (managers import vLLM's scheduler-side code)."""
    from vllm_adaptive.kv.managers import ResidualFullManager, SparsePatternManager
    from vllm_adaptive.release.manager import ReleaseManager

    return [
        (SparsePatternSpec, SparsePatternManager), (ResidualFullSpec, ResidualFullManager),
        (ReleaseBudgetSpec, ReleaseManager),
    ]


def register_kv_specs() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    for spec, manager in registrations():
        KVCacheSpecRegistry.register(spec, manager)
    _REGISTERED = True


__all__ = ["ReleaseBudgetSpec", "ResidualFullSpec", "SparsePatternSpec", "register_kv_specs", "registrations"]
