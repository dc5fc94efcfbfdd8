"""KIVI quantized KV (``formats/kivi.py``) on the torch path, full and sparse
layers (``kernels/kivi.py``). vLLM's CPU attention ops cannot read this page
layout, so on CPU these are what ``kernels: auto`` picks for ``kivi`` layers.
The Triton runners (``runners/kivi_triton.py``) share this plan.

The write plan (which segments complete, where residual keys go) depends only
on positions and block tables, so the builder makes it once per step for the
group (``plan``). Attention reads every key from the cache, the step's own
keys included (``in_step_free = False``: sparse layers keep a real block for
every new index until the next step frees the dead ones).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_adaptive.kernels import kivi
from vllm_adaptive.runner import Runner, StepPlan


@dataclass
class KiviStep(StepPlan):
    write: kivi.WritePlan


class KiviTorch(Runner):
    kv_format, path = "kivi", "torch"
    devices = ("cpu", "cuda")
    host_lengths = True

    def __init__(self, geometry, params) -> None:
        super().__init__(geometry, params)
        self.layout = self.format.layout(geometry)  # formats.kivi.KiviLayout

    def plan(self, md):
        return KiviStep(kivi.plan_write(
            self.layout, md.block_table, md.query_start_loc_cpu, md.seq_lens_cpu,
            md.slot_mapping, md.num_actual_tokens,
        ))

    def write(self, key, value, kv_cache, slot_mapping, md) -> None:
        if md is None:  # profiling / warm-up: the write plan needs the step's tables
            return
        n = md.num_actual_tokens
        kivi.write(self.layout, self.layout.views(kv_cache), md.step.write, key[:n], value[:n])

    def attend(self, query, key, value, kv_cache, md, scale, out) -> None:
        kivi.attention(
            self.layout, self.layout.views(kv_cache), query, md.block_table,
            md.query_start_loc_cpu, md.seq_lens_cpu, scale, out, pattern=self.params,
        )


class DenseKiviTorch(KiviTorch):
    family = "dense"


class SparseKiviTorch(KiviTorch):
    family = "sparse"
