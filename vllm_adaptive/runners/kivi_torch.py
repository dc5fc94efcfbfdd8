"""KIVI quantized KV (``formats/kivi.py``) on the torch path, full and sparse
layers (``kernels/kivi.py``). vLLM's CPU attention ops cannot read this page
layout, so on CPU these are what ``kernels: auto`` picks for ``kivi`` layers.

The write plan (which segments complete, where residual keys go) depends only
on positions and block tables, so the builder makes it once per step for the
group (``plan``). Attention reads every key from the cache, the step's own
keys included (``in_step_free = False``: sparse layers keep a real block for
every new index until the next step frees the dead ones).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_adaptive.formats.kivi import KiviLayout, KiviParams
from vllm_adaptive.kernels import kivi
from vllm_adaptive.runners.base import Runner, StepPlan


@dataclass
class KiviStep(StepPlan):
    write: kivi.WritePlan


class KiviTorch(Runner):
    kv_format, path = "kivi", "torch"
    devices = ("cpu", "cuda")
    host_lengths = True
    write_needs_metadata = True

    def __init__(self, geometry, pattern) -> None:
        super().__init__(geometry, pattern)
        params = geometry.kv_params or KiviParams()
        self.layout = KiviLayout.of(params, geometry.block_size, geometry.head_size, geometry.dtype)
        why = self.layout.check()
        if why:
            raise ValueError(f"adaptive_attention.kivi: {why}")

    def plan(self, md):
        return KiviStep(kivi.plan_write(
            self.layout, md.block_table, md.query_start_loc_cpu, md.seq_lens_cpu,
            md.slot_mapping, md.num_actual_tokens,
        ))

    def write(self, key, value, kv_cache, slot_mapping, md=None) -> None:
        n = md.num_actual_tokens
        kivi.write(self.layout, self.layout.views(kv_cache), md.step.write, key[:n], value[:n])

    def attend(self, query, key, value, kv_cache, md, scale, out) -> None:
        kivi.attention(
            self.layout, self.layout.views(kv_cache), query, md.block_table,
            md.query_start_loc_cpu, md.seq_lens_cpu, scale, out, pattern=self.pattern,
        )


class DenseKiviTorch(KiviTorch):
    family = "dense"


class SparseKiviTorch(KiviTorch):
    family = "sparse"


class KiviTriton(KiviTorch):
    """The same plan; the write and attention in Triton (``kernels/kivi_triton.py``)."""

    path = "triton"
    devices = ("cuda",)

    @classmethod
    def unsupported(cls, pattern, block_size):
        if block_size < 16 or block_size & (block_size - 1):
            return f"block size {block_size}: the kivi Triton kernels need a power of two >= 16"
        return None

    def write(self, key, value, kv_cache, slot_mapping, md=None) -> None:
        from vllm_adaptive.kernels.kivi_triton import kivi_write

        n = md.num_actual_tokens
        kivi_write(self.layout, kv_cache, md.step.write, key[:n], value[:n])

    def attend(self, query, key, value, kv_cache, md, scale, out) -> None:
        from vllm_adaptive.kernels.kivi_triton import kivi_paged_attention

        kivi_paged_attention(
            self.layout, kv_cache, query, md.block_table, md.query_start_loc, md.seq_lens,
            scale, out, pattern=self.pattern, max_query_len=md.max_query_len,
        )


class DenseKiviTriton(KiviTriton):
    family = "dense"


class SparseKiviTriton(KiviTriton):
    family = "sparse"
