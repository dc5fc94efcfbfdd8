"""Validate ``adaptive_attention`` when the engine config is built.

The per-layer attention map comes from the model's HF config, which vLLM does
not know about. The only hook that runs once, in the user's process, on the
finished config and before any engine process starts is the platform's
``check_and_update_config`` (called from ``VllmConfig.__post_init__``). The
wrap parses the map (bad keys raise ``ValueError`` naming the key), selects
ADAPTIVE when a checkpoint carries the key and no backend was chosen, refuses
a key that another explicitly chosen backend would silently ignore, then calls
the original; checks that need the platform's final block size run after it.
"""

from __future__ import annotations

from vllm_adaptive.patches import PatchRecord

RECORD = PatchRecord(
    area="platform config check",
    targets=(
        "vllm.platforms.interface.Platform.check_and_update_config",
        "vllm.platforms.cpu.CpuPlatform.check_and_update_config",
        "vllm.platforms.cuda.CudaPlatformBase.check_and_update_config",
    ),
    why="bad adaptive_attention values must fail at start-up, in the user's process, "
    "not inside a worker or mid-serving",
    how="classmethod wrap on the current platform's class: validate, call the "
    "original, then check what needs its final block size",
    upstream="none; vLLM has no hook for plugin-owned model-config keys",
    delete_when="vLLM offers a config-validation hook for general plugins",
)


def apply() -> None:
    from vllm.platforms import current_platform

    from vllm_adaptive.patches import wrap

    def make(original):
        def check_and_update_config(cls, vllm_config):
            from vllm_adaptive.startup import finalize_vllm_config, validate_vllm_config

            validate_vllm_config(vllm_config)
            result = original(cls, vllm_config)
            finalize_vllm_config(vllm_config)
            return result

        return check_and_update_config

    wrap(type(current_platform), "check_and_update_config", make, classmethod_=True)
