"""Full attention on the torch path (any device; ``kernels/torch_paged.py``)."""

from __future__ import annotations

from vllm_adaptive.kernels import torch_paged
from vllm_adaptive.runner import Runner


class DenseTorch(Runner):
    family, kv_format, path = "dense", "model_dtype", "torch"
    devices = ("cpu", "cuda")

    def write(self, key, value, kv_cache, slot_mapping, md) -> None:
        torch_paged.write_kv_cache(key, value, *self.format.views(kv_cache, self.geometry), slot_mapping)

    def attend(self, query, key, value, kv_cache, md, scale, out) -> None:
        key_cache, value_cache = self.format.views(kv_cache, self.geometry)
        torch_paged.paged_attention(
            query, key_cache, value_cache, md.block_table, md.query_start_loc, md.seq_lens,
            scale, out=out,
        )
