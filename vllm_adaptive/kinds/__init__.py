"""Layer kinds, one per file; ``KINDS`` is the one table of them.

A kind (``layer_kind.LayerKind``) is what a decoder layer does with its keys:
``full``, the LongGen sparse patterns ``sink_window`` and ``strided``, and
``release`` (ADORE, which lives with the rest of release in ``release/``).
Adding a kind: a ``LayerKind`` subclass in its own file, listed here. If its
family is new, it also needs runners (``vllm_adaptive/runners``).
"""

from __future__ import annotations

from vllm_adaptive.layer_kind import LayerKind
from vllm_adaptive.kinds.full import FullKind
from vllm_adaptive.kinds.sink_window import SinkWindowKind
from vllm_adaptive.kinds.strided import StridedKind
from vllm_adaptive.release.kind import ReleaseKind

KINDS: dict[str, LayerKind] = {k.name: k for k in (FullKind(), SinkWindowKind(), StridedKind(), ReleaseKind())}

__all__ = ["KINDS", "LayerKind"]
