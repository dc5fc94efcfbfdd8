"""Pseudo requests for vLLM's CPU kernel (kernels/cpu_sparse.py). The kernel
itself runs against the reference in tests/test_runners.py (runner
sparse/model_dtype/vllm_cpu, NaN in every block the pattern does not need)."""

from __future__ import annotations

import pytest
import torch

from vllm_adaptive.kernels.cpu_sparse import plan_pseudo_requests
from vllm_adaptive.sparse_pattern import SparsePattern


def test_rejects_unaligned_pattern():
    with pytest.raises(ValueError, match="not aligned to cache block size 32"):
        plan_pseudo_requests(SparsePattern(sink=16, window=64), torch.zeros(1, 4, dtype=torch.int32),
                             torch.tensor([0, 1]), torch.tensor([1]), 32)
