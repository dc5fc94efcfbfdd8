"""Runners, one per implemented (pattern family, KV format, kernel path); the
``RUNNERS`` table is the only place that lists them.

Adding one: a ``Runner`` subclass in its own file (``plan`` / ``write`` /
``attend``, its capabilities as class attributes), listed here, and a row in
``tests/test_runners.py`` runs it against the reference with poisoned pages.
"""

from __future__ import annotations

from vllm_adaptive.metadata import StepPlan
from vllm_adaptive.release.runner import ReleaseTorch
from vllm_adaptive.runner import Geometry, Runner
from vllm_adaptive.runners.dense_torch import DenseTorch
from vllm_adaptive.runners.dense_triton import DenseTriton
from vllm_adaptive.runners.dense_vllm_cpu import DenseVllmCpu
from vllm_adaptive.runners.kivi_torch import DenseKiviTorch, SparseKiviTorch
from vllm_adaptive.runners.kivi_triton import DenseKiviTriton, SparseKiviTriton
from vllm_adaptive.runners.sparse_torch import SparseTorch
from vllm_adaptive.runners.sparse_triton import SparseTriton
from vllm_adaptive.runners.sparse_vllm_cpu import SparseVllmCpu

RUNNERS: dict[tuple[str, str, str], type[Runner]] = {
    (r.family, r.kv_format, r.path): r
    for r in (
        DenseVllmCpu, DenseTorch, DenseTriton, SparseVllmCpu, SparseTorch, SparseTriton,
        DenseKiviTorch, SparseKiviTorch, DenseKiviTriton, SparseKiviTriton, ReleaseTorch,
    )
}

#: What ``kernels: auto`` tries, in order, per device type.
AUTO_PATHS: dict[str, tuple[str, ...]] = {"cpu": ("vllm_cpu", "torch"), "cuda": ("triton", "torch")}

__all__ = ["AUTO_PATHS", "RUNNERS", "Geometry", "Runner", "StepPlan"]
