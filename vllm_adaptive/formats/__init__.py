"""KV formats, one per file; ``FORMATS`` is the one table of them.

``model_dtype`` (the model's own dtype) and ``kivi`` (KIVI-style
int8/int4/int2 with a full-precision key residual). Adding one: a ``KVFormat`` subclass in its own file,
listed here, plus runners registered for it.
"""

from __future__ import annotations

from vllm_adaptive.formats.base import KVFormat
from vllm_adaptive.formats.kivi import KiviFormat
from vllm_adaptive.formats.model_dtype import ModelDtypeFormat, split_kv_cache

FORMATS: dict[str, KVFormat] = {f.name: f for f in (ModelDtypeFormat(), KiviFormat())}
DEFAULT_FORMAT = "model_dtype"

__all__ = ["DEFAULT_FORMAT", "FORMATS", "KVFormat", "split_kv_cache"]
