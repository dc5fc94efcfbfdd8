"""LongGen sparse layers on the torch path (``kernels/torch_sparse.py``).

The plan (which cache slots and fresh rows each query tile reads, and the
batched decode gather) depends only on positions, so it is made once per step
for the whole KV-cache group. Tokens whose slot is in the null block are not
stored: no later query reads them, and this step's queries take them from the
fresh K/V.
"""

from __future__ import annotations

from vllm_adaptive.kernels import torch_paged
from vllm_adaptive.kernels.torch_sparse import plan_sparse, run_sparse
from vllm_adaptive.runner import Runner


class SparseTorch(Runner):
    family, kv_format, path = "sparse", "model_dtype", "torch"
    devices = ("cpu", "cuda")
    in_step_free = True
    host_lengths = True

    def plan(self, md):
        return plan_sparse(
            self.params, md.block_table, md.query_start_loc_cpu, md.seq_lens_cpu,
            self.geometry.block_size,
        )

    def write(self, key, value, kv_cache, slot_mapping, md) -> None:
        torch_paged.write_kv_cache(
            key, value, *self.format.views(kv_cache, self.geometry), slot_mapping,
            min_slot=self.geometry.null_slot_end,
        )

    def attend(self, query, key, value, kv_cache, md, scale, out) -> None:
        run_sparse(md.step, query, key, value, *self.format.views(kv_cache, self.geometry), scale, out)
