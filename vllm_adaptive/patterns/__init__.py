"""Attention patterns, one kind per file; ``KINDS`` is the one table of them.

Adding a kind: a ``PatternKind`` subclass in its own file, listed here. If its
family is new, it also needs runners (``vllm_adaptive/runners``).
"""

from __future__ import annotations

from vllm_adaptive.patterns.base import PatternKind
from vllm_adaptive.patterns.full import FullKind
from vllm_adaptive.patterns.release import ReleaseKind
from vllm_adaptive.patterns.sink_window import SinkWindowKind
from vllm_adaptive.patterns.strided import StridedKind

KINDS: dict[str, PatternKind] = {k.name: k for k in (FullKind(), SinkWindowKind(), StridedKind(), ReleaseKind())}

__all__ = ["KINDS", "PatternKind"]
