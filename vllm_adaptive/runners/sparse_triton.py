"""LongGen sparse layers on the plugin's Triton block-sparse kernels (CUDA;
tested under ``TRITON_INTERPRET=1``): they visit only the pattern's pages and
take this step's keys from the fresh K/V, so tokens in the null block are not
stored. Decode rows and prefill rows are split as in ``dense_triton``."""

from __future__ import annotations

import torch

from vllm_adaptive.kernels import cache_write
from vllm_adaptive.kernels.sparse_decode import sparse_decode
from vllm_adaptive.kernels.sparse_prefill import sparse_prefill
from vllm_adaptive.runner import Runner
from vllm_adaptive.runners.dense_triton import DecodeSplit, split_decodes


class SparseTriton(Runner):
    family, kv_format, path = "sparse", "model_dtype", "triton"
    devices = ("cuda",)
    in_step_free = True
    decodes_first = True

    def plan(self, md) -> DecodeSplit:
        return split_decodes(md)

    def write(self, key, value, kv_cache, slot_mapping, md) -> None:
        live = torch.where(
            slot_mapping >= self.geometry.null_slot_end, slot_mapping,
            torch.full_like(slot_mapping, -1),
        )
        cache_write.write_kv_cache(key, value, *self.format.views(kv_cache, self.geometry), live)

    def attend(self, query, key, value, kv_cache, md, scale, out) -> None:
        kc, vc = self.format.views(kv_cache, self.geometry)
        s: DecodeSplit = md.step
        d, dt = s.num_decodes, s.num_decode_tokens
        bt, qsl, sl, pat = md.block_table, md.query_start_loc, md.seq_lens, self.params
        if d:
            sparse_decode(
                query[:dt], key[:dt], value[:dt], kc, vc, bt[:d], qsl[: d + 1], sl[:d], scale,
                pat, out=out[:dt],
            )
        if d < s.num_reqs:
            sparse_prefill(query, key, value, kc, vc, bt[d:], qsl[d:], sl[d:], scale, pat, out=out)
