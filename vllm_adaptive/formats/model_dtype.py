"""``model_dtype``: K and V stored unquantized, in the model's dtype.

vLLM hands each layer ``kv_cache`` of logical shape ``[num_blocks,
num_kv_heads, block_size, 2 * head_size]`` (LBHNC, the only layout the backend
declares). As CPU_ATTN does, each (block, head) page is read as
``2 * block_size`` rows of ``head_size``: the first ``block_size`` rows hold K,
the rest V. Both halves come back as strided views ``[num_blocks,
num_kv_heads, block_size, head_size]``. vLLM's CPU ops pack the K half in
their own ISA layout inside the same bytes; the plugin's torch and Triton
kernels read it plainly. A layer keeps one runner for the whole run, so the
two never meet.
"""

from __future__ import annotations

import torch

from vllm_adaptive.formats.base import KVFormat


class ModelDtypeFormat(KVFormat):
    name = "model_dtype"

    def bytes_per_token(self, num_kv_heads: int, head_size: int, dtype: torch.dtype) -> int:
        return 2 * num_kv_heads * head_size * torch.empty((), dtype=dtype).element_size()

    def split(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_kv_cache(kv_cache)


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if kv_cache.dim() != 4 or kv_cache.shape[-1] % 2:
        raise ValueError(
            "kv_cache: expected [num_blocks, num_kv_heads, block_size, 2 * head_size], "
            f"got shape {tuple(kv_cache.shape)}"
        )
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    pages = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, two_d // 2)
    return pages[:, :, :block_size], pages[:, :, block_size:]
