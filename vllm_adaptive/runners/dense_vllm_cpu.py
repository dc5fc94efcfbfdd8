"""Full attention on vLLM's own CPU ops (``cpu_attn_reshape_and_cache`` +
``cpu_attention_with_kv_cache``, AVX-512/AMX, ISA-packed key pages): stock
speed and stock numerics. The ISA is chosen here, from the group's dtype,
block size and head size, exactly as CPU_ATTN chooses it; nothing is stored
on vLLM's layer objects."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_adaptive.formats.model_dtype import clear_started_blocks
from vllm_adaptive.runner import Runner, StepPlan


@dataclass
class CpuStep(StepPlan):
    """The batch vLLM's CPU kernel runs (the step's requests, or pseudo requests)."""

    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, width] int32
    scheduler_metadata: torch.Tensor


class DenseVllmCpu(Runner):
    family, kv_format, path = "dense", "model_dtype", "vllm_cpu"
    devices = ("cpu",)

    def __init__(self, geometry, params) -> None:
        super().__init__(geometry, params)
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        g = geometry
        self.isa = _get_attn_isa(g.dtype, g.block_size, g.head_size, g.kv_cache_dtype)

    def plan(self, md) -> CpuStep:
        return self._schedule(md.query_start_loc, md.seq_lens, md.block_table)

    def _schedule(self, query_start_loc, seq_lens, block_table) -> CpuStep:
        from vllm import _custom_ops as ops
        from vllm import envs

        g = self.geometry
        sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.shape[0], num_heads=g.num_heads, num_kv_heads=g.num_kv_heads,
            head_dim=g.head_size, seq_lens=seq_lens, dtype=g.dtype,
            query_start_loc=query_start_loc, causal=True, sliding_window_size=-1,
            isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None,
            kv_cache_dtype=g.kv_cache_dtype,
        )
        return CpuStep(query_start_loc, seq_lens, block_table, sched)

    def write(self, key, value, kv_cache, slot_mapping, md) -> None:
        from vllm import _custom_ops as ops

        if self.geometry.foreign_pages:
            clear_started_blocks(kv_cache, slot_mapping, self.geometry.null_slot_end)
        key_cache, value_cache = self.format.views(kv_cache, self.geometry)
        ops.cpu_attn_reshape_and_cache(
            key, value, key_cache, value_cache, slot_mapping, self.isa,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype=self.geometry.kv_cache_dtype,
        )

    def attend(self, query, key, value, kv_cache, md, scale, out) -> None:
        from vllm import _custom_ops as ops

        key_cache, value_cache = self.format.views(kv_cache, self.geometry)
        step: CpuStep = md.step
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=step.query_start_loc, seq_lens=step.seq_lens, scale=scale,
            causal=True, alibi_slopes=None, sliding_window=-1, block_table=step.block_table,
            softcap=0, scheduler_metadata=step.scheduler_metadata, s_aux=None,
            dynamic_causal=None, k_scale=1.0, v_scale=1.0,
            kv_cache_dtype=self.geometry.kv_cache_dtype,
        )
