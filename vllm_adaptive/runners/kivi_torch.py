"""KIVI quantized KV (``formats/kivi.py``) on the torch path, full and sparse
layers (``kernels/kivi.py``). vLLM's CPU attention ops cannot read this page
layout, so on CPU these are what ``kernels: auto`` picks for ``kivi`` layers.
The Triton runners (``runners/kivi_triton.py``) share this plan.

The write plan (which segments complete, where residual keys go) depends only
on positions and block tables, so the builder makes it once per step for the
group (``plan``). Attention reads this step's own tokens from the fresh key
/ value tensors (KIVI's full-precision prefill), older ones from the cache;
sparse layers still keep a real block for every new index until the next
step frees the dead ones (``in_step_free = False``), since the write needs
the pages.

Rotation (``kivi.rotation``): keys (``kv``) and values are rotated here
before the write and before attention reads the fresh ones, the query alike
(``kv``), and attention's output is rotated back (``v`` and ``kv``); the
kernels see only rotated tensors (``kernels/kivi.py``: ``rotate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
            self.layout, md.block_table, md.query_start_loc_cpu, md.seq_lens_cpu, md.num_actual_tokens,
        ))

    def rotated(self, query, key, value):
        """(query, key, value) in the rotated basis of ``kivi.rotation``."""
        rot = self.layout.rotation
        if rot == "kv":
            key = kivi.rotate(key)
            query = None if query is None else kivi.rotate(query)
        if rot != "none":
            value = kivi.rotate(value)
        return query, key, value

    def rotated_attention(self, attend, query, key, value, out) -> None:
        """``attend(query, key, value, out)`` in the rotated basis, its output
        rotated back into ``out``."""
        if self.layout.rotation == "none":
            attend(query, key, value, out)
            return
        query, key, value = self.rotated(query, key, value)
        tmp = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        attend(query, key, value, tmp)
        out.copy_(kivi.rotate(tmp, out.dtype))

    def write(self, key, value, kv_cache, slot_mapping, md) -> None:
        if md is None:  # profiling / warm-up: the write plan needs the step's tables
            return
        n = md.num_actual_tokens
        _, key, value = self.rotated(None, key[:n], value[:n])
        self.write_rotated(key, value, kv_cache, md)

    def write_rotated(self, key, value, kv_cache, md) -> None:
        kivi.write(self.layout, self.layout.views(kv_cache), md.step.write, key, value)

    def attend(self, query, key, value, kv_cache, md, scale, out) -> None:
        views = self.layout.views(kv_cache)

        def run(q, k, v, o):
            kivi.attention(
                self.layout, views, q, md.block_table, md.query_start_loc_cpu, md.seq_lens_cpu,
                scale, o, pattern=self.params, key=k, value=v,
            )

        self.rotated_attention(run, query, key, value, out)


class DenseKiviTorch(KiviTorch):
    family = "dense"


class SparseKiviTorch(KiviTorch):
    family = "sparse"
