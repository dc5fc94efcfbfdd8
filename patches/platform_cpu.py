"""Let the CPU platform honour the ADAPTIVE backend.

``CpuPlatform.get_attn_backend_cls`` replaces any backend but CPU_ATTN with
CPU_ATTN ("Cannot use ... on CPU"), and a platform plugin is skipped when
``VLLM_TARGET_DEVICE=cpu`` (docs/VLLM_NOTES.md, trap 2). The wrap answers for ADAPTIVE
only, after the backend's own ``validate_configuration`` (so an unsupported
head size or dtype fails at start-up with the reasons), and delegates every
other call to the original.
"""

from __future__ import annotations

from vllm_adaptive.patches import PatchRecord

RECORD = PatchRecord(
    area="CPU platform backend selection",
    targets=("vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls",),
    why="the CPU platform silently swaps any selected backend for CPU_ATTN",
    how="classmethod wrap: ADAPTIVE is validated and returned, anything else goes to "
    "the original",
    upstream="none filed yet; CUDA's platform already honours registered backends",
    delete_when="CpuPlatform.get_attn_backend_cls honours registered custom backends",
)


def apply() -> None:
    from vllm.platforms.cpu import CpuPlatform

    from vllm_adaptive.patches import wrap

    def make(original):
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            from vllm_adaptive import BACKEND_NAME

            if selected_backend is not None and selected_backend.name == BACKEND_NAME:
                from vllm_adaptive.backend import AdaptiveBackend
                from vllm_adaptive.startup import check_selectable, logger

                check_selectable(attn_selector_config)
                logger.info_once("Using %s attention backend on CPU.", BACKEND_NAME)
                return f"{AdaptiveBackend.__module__}.{AdaptiveBackend.__qualname__}"
            return original(cls, selected_backend, attn_selector_config, num_heads)

        return get_attn_backend_cls

    wrap(CpuPlatform, "get_attn_backend_cls", make, classmethod_=True)
