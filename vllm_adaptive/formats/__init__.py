"""KV formats, one per file; ``FORMATS`` is the one table of them.

Today only the model's own dtype; KIVI-style int8/int4/int2 arrive as new
formats (issue #8). Adding one: a ``KVFormat`` subclass in its own file,
listed here, plus runners registered for it.
"""

from __future__ import annotations

from vllm_adaptive.formats.base import KVFormat
from vllm_adaptive.formats.model_dtype import ModelDtypeFormat, split_kv_cache

FORMATS: dict[str, KVFormat] = {f.name: f for f in (ModelDtypeFormat(),)}
DEFAULT_FORMAT = "model_dtype"

__all__ = ["DEFAULT_FORMAT", "FORMATS", "KVFormat", "split_kv_cache"]
