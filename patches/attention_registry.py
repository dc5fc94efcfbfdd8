"""Pickle the dynamic ADAPTIVE enum member by name, not by value.

``register_backend("ADAPTIVE", path)`` adds a member to
``AttentionBackendEnum`` at run time. Enum members pickle as
``(AttentionBackendEnum, (value,))``, and EngineCore, mp workers and Ray actors
unpickle the VllmConfig before vLLM loads plugins, so the lookup fails with
"not a valid AttentionBackendEnum" (docs/VLLM_NOTES.md, trap 1). The member gets an
instance-level ``__reduce_ex__`` that points at
``vllm_adaptive.restore_backend_member``, which registers the plugin in the
fresh process and returns the member.
"""

from __future__ import annotations

from vllm_adaptive.patches import PatchRecord

RECORD = PatchRecord(
    area="attention backend registry",
    targets=(
        "vllm.v1.attention.backends.registry.AttentionBackendEnum",
        "vllm.v1.attention.backends.registry.register_backend",
    ),
    why="a dynamically registered member cannot be unpickled in a process that has "
    "not loaded plugins yet (EngineCore, mp workers, Ray actors)",
    how="instance attribute __reduce_ex__ on the ADAPTIVE member only; the enum class "
    "and every other member are untouched",
    upstream="none filed yet; vLLM's own register_backend docs assume in-process use",
    delete_when="vLLM pickles registered backends by name or loads general plugins "
    "before unpickling the engine config",
)


def _reduce(name: str):
    from vllm_adaptive import restore_backend_member

    def __reduce_ex__(protocol):  # noqa: N807
        return (restore_backend_member, (name,))

    return __reduce_ex__


def apply() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_adaptive import BACKEND_NAME

    member = AttentionBackendEnum[BACKEND_NAME]
    if "__reduce_ex__" not in vars(member):
        member.__reduce_ex__ = _reduce(BACKEND_NAME)
