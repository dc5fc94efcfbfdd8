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

    def views(self, kv_cache: torch.Tensor, geometry=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(key cache, value cache), each ``[num_blocks, num_kv_heads, block_size, head_size]``."""
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


def clear_started_blocks(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, min_slot: int = 0) -> None:
    """Zero every page whose first slot this step writes (slots below
    ``min_slot`` excepted: the null block's). For kernels that read whole
    pages and mask the unwritten slots only by their scores (vLLM's CPU
    attention: a zero probability times a NaN value is NaN), when a block may
    arrive holding another format's bytes (``Geometry.foreign_pages``). A
    block's first slot is always written before its others (a request fills
    its blocks in order; prefix-cache hits are whole blocks), so every page
    such a kernel reads was cleared when its owner started it."""
    bs = kv_cache.shape[2]
    starts = slot_mapping[(slot_mapping % bs == 0) & (slot_mapping >= min_slot)]
    if starts.numel():
        kv_cache[torch.div(starts, bs, rounding_mode="floor")] = 0
