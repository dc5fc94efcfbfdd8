"""``KVFormat``: how a layer's KV page stores its tokens.

A format owns the bytes one token costs per KV head (scales included, once
there are any) and how a page of vLLM's per-layer cache tensor is viewed as
keys and values. Runners are registered per format (``runners/__init__.py``),
so a new format is one file here plus the runners that read it.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class KVFormat:
    #: The value users write in ``adaptive_attention.kv_format``.
    name: ClassVar[str]

    def bytes_per_token(self, num_kv_heads: int, head_size: int, dtype: torch.dtype) -> int:
        """KV bytes one token costs in one layer."""
        raise NotImplementedError

    def split(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(key view, value view) of a layer's cache tensor; nothing copied."""
        raise NotImplementedError

    def customize_spec(self, spec):
        """The layer's KV-cache spec with this format's page size."""
        return spec
