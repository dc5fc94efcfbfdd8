"""Every monkeypatch of vLLM, one module per patched upstream area.

Each module defines ``RECORD`` (a :class:`PatchRecord`) and ``apply()``.
``apply_all()`` applies them once; ``python -m vllm_adaptive.patches``
prints the index, generated from the records (never kept by hand).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

MODULES = ("attention_registry", "platform_cpu", "platform_config", "attention_spec")


@dataclass(frozen=True)
class PatchRecord:
    area: str
    targets: tuple[str, ...]  # dotted upstream symbols this replaces or wraps
    why: str
    how: str
    upstream: str
    delete_when: str


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
