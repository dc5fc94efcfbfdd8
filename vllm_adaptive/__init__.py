"""vllm-adaptive: the ADAPTIVE attention backend for vLLM.

``register()`` is the ``vllm.general_plugins`` entry point. It is idempotent
and cheap, and it also runs on ``import vllm_adaptive`` because
``LLM(attention_backend="ADAPTIVE")`` parses the backend name before vLLM loads
its plugins (docs/VLLM_NOTES.md, trap 3).
"""

from __future__ import annotations

import threading

__version__ = "0.1.0"
BACKEND_NAME = "ADAPTIVE"
BACKEND_CLASS = "vllm_adaptive.backend.AdaptiveBackend"

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register the ADAPTIVE backend and apply the recorded patches (once)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        from vllm.v1.attention.backends.registry import (
            AttentionBackendEnum,
            register_backend,
        )

        from vllm_adaptive import patches

        if BACKEND_NAME not in AttentionBackendEnum.__members__:
            register_backend(BACKEND_NAME, BACKEND_CLASS)
        patches.apply_all()
        from vllm_adaptive.kv import register_kv_specs

        register_kv_specs()
        from vllm_adaptive.metrics import install_collector

        install_collector()
        _registered = True


def restore_backend_member(name: str):
    """Unpickle target for the dynamic enum member (docs/VLLM_NOTES.md, trap 1).

    EngineCore, mp workers and Ray actors unpickle the VllmConfig before
    vLLM loads plugins; the member's ``__reduce_ex__`` points here, so the
    fresh process registers the backend before the member is looked up.
    """
    register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[name]


try:  # registering needs vLLM; the kernels and config do not.
    import vllm  # noqa: F401
except ImportError:  # pragma: no cover
    pass
else:
    register()
