"""Every monkeypatch of vLLM, one module per patched upstream area.

Each module defines ``RECORD`` (a :class:`PatchRecord`) and ``apply()``.
``apply_all()`` applies them once; ``python -m vllm_adaptive.patches``
prints the index, generated from the records (never kept by hand).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

MODULES = ("attention_registry", "platform_cpu", "platform_config", "attention_spec", "platform_ray",
           "block_pool_audit", "pipeline_cpu")


@dataclass(frozen=True)
class PatchRecord:
    area: str
    targets: tuple[str, ...]  # dotted upstream symbols this replaces or wraps
    why: str
    how: str
    upstream: str
    delete_when: str


_MARK = "_vllm_adaptive_wrapped"


def wrap(owner: type, name: str, make, *, classmethod_: bool = False) -> None:
    """Replace ``owner.name`` by ``make(original)`` once (idempotent: a marked
    wrapper is left alone). ``original`` is the plain function of a
    classmethod; the wrapper keeps it as ``__wrapped__``."""
    func = getattr(owner, name)
    if getattr(func, _MARK, False):
        return
    original = func.__func__ if classmethod_ else func
    wrapper = make(original)
    setattr(wrapper, _MARK, True)
    wrapper.__wrapped__ = original
    setattr(owner, name, classmethod(wrapper) if classmethod_ else wrapper)


def _modules():
    return [importlib.import_module(f"{__name__}.{m}") for m in MODULES]


def records() -> list[PatchRecord]:
    return [m.RECORD for m in _modules()]


def apply_all() -> None:
    for m in _modules():
        m.apply()


def index_markdown() -> str:
    lines = ["| area | targets | why | delete when |", "|---|---|---|---|"]
    for r in records():
        targets = "<br>".join(f"`{t}`" for t in r.targets)
        lines.append(f"| {r.area} | {targets} | {r.why} | {r.delete_when} |")
    return "\n".join(lines)
