"""The ADAPTIVE attention backend: capabilities, a builder and an impl that
delegate to each layer's runner.

What a layer does is decided once, in its ``LayerPlan`` (``plan.py``: pattern
x KV format x kernel path -> a runner from ``runners/``). The builder (one per
KV-cache group) checks that its layers share one runner and calls the
runner's ``plan`` once per step; the impl (one per layer) calls its runner's
``write`` and ``attend``. Start-up validation is ``startup.py``.

Capabilities are data (class attributes below), so the selector can say why
ADAPTIVE does not fit a model instead of failing inside a kernel.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from vllm_adaptive import BACKEND_NAME
from vllm_adaptive.metadata import AdaptiveMetadata
from vllm_adaptive.plan import plan_for
from vllm_adaptive.runners import Geometry, Runner


class AdaptiveBackend(AttentionBackend):
    # KV is written by do_kv_cache_update before forward runs.
    forward_includes_kv_cache_update: bool = False

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]
    supported_attn_types: ClassVar[tuple[str, ...]] = (AttentionType.DECODER,)
    # vLLM's CPU ops need multiples of 32 (else a slower ISA); the Triton
    # kernels need a power of two >= 16.
    cpu_block_sizes: ClassVar[list[int | MultipleOf]] = [MultipleOf(32)]
    cuda_block_sizes: ClassVar[list[int | MultipleOf]] = [16, 32, 64, 128]
    head_sizes: ClassVar[list[int]] = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["AdaptiveImpl"]:
        return AdaptiveImpl

    @staticmethod
    def get_builder_cls() -> type["AdaptiveMetadataBuilder"]:
        return AdaptiveMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        if current_platform.is_cpu():
            return list(AdaptiveBackend.cpu_block_sizes)
        return list(AdaptiveBackend.cuda_block_sizes)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(cls.head_sizes)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type in cls.supported_attn_types

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False


class AdaptiveMetadataBuilder(AttentionMetadataBuilder[AdaptiveMetadata]):
    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from vllm.v1.attention.backends.utils import get_num_attention_heads_from_layers

        model_plan = plan_for(vllm_config)
        plans = [model_plan.for_layer_name(n) for n in layer_names]
        runs = {(p.runner, p.params) for p in plans}
        if len(runs) != 1:
            raise ValueError(
                f"{BACKEND_NAME}: one KV-cache group must run one runner and one set of kind parameters, but "
                + "; ".join(f"layer {p.layer_idx}: {p.runner.describe()} {p.params}" for p in plans)
            )
        if model_plan.block_size % kv_cache_spec.block_size:
            raise ValueError(
                f"{BACKEND_NAME}: the kernel block size {kv_cache_spec.block_size} of "
                f"{layer_names[0]}'s group does not divide the block size "
                f"{model_plan.block_size} its layer plan was resolved for"
            )
        ((runner_cls, params),) = runs
        geometry = Geometry(
            num_heads=get_num_attention_heads_from_layers(vllm_config, layer_names)
            or vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config),
            num_kv_heads=kv_cache_spec.num_kv_heads,
            head_size=kv_cache_spec.head_size,
            dtype=vllm_config.model_config.dtype,
            kv_cache_dtype=vllm_config.cache_config.cache_dtype,
            block_size=kv_cache_spec.block_size,
            null_slot_end=model_plan.null_slot_end,
            kv_params=plans[0].kv_params,
        )
        self.runner: Runner = runner_cls(geometry, params)
        if runner_cls.decodes_first:
            self._init_reorder_batch_threshold(1)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> AdaptiveMetadata:
        cm = common_attn_metadata
        if isinstance(cm.causal, torch.Tensor) or not cm.causal:
            raise ValueError(f"{BACKEND_NAME} supports causal decoder attention only")
        md = AdaptiveMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc,
            seq_lens=cm.seq_lens,
            query_start_loc_cpu=cm.query_start_loc_cpu,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            seq_lens_cpu=cm.seq_lens.cpu() if self.runner.host_lengths else None,
            common=cm,
        )
        md.step = self.runner.plan(md)
        return md


class AdaptiveImpl(AttentionImpl[AdaptiveMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        unsupported = {
            "alibi_slopes": alibi_slopes,
            "sliding_window": sliding_window,
            "logits_soft_cap": logits_soft_cap or None,
            "sinks": sinks,
        }
        for name, value in unsupported.items():
            if value is not None:
                raise ValueError(f"{BACKEND_NAME} does not support {name} (got {value!r})")
        if attn_type != AttentionType.DECODER:
            raise ValueError(f"{BACKEND_NAME} supports decoder attention only, got {attn_type}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.vllm_config = get_current_vllm_config()
        self.runner: Runner | None = None

    def _runner(self, layer, kv_cache: torch.Tensor) -> Runner:
        """The layer's runner, built at its first call (the impl is built
        without its layer's name, and the page size is the cache's)."""
        if self.runner is None:
            model_plan = plan_for(self.vllm_config)
            lp = model_plan.for_layer_name(layer.layer_name)
            geometry = Geometry(
                num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_size=self.head_size, dtype=self.vllm_config.model_config.dtype,
                kv_cache_dtype=self.kv_cache_dtype, block_size=kv_cache.shape[2],
                null_slot_end=model_plan.null_slot_end,
                kv_params=lp.kv_params, foreign_pages=model_plan.mixes_kv_formats,
            )
            self.runner = lp.runner(geometry, lp.params)
            self.runner.layer_name, self.runner.layer_idx = layer.layer_name, lp.layer_idx
        return self.runner

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2 * head_size]
        slot_mapping: torch.Tensor,  # [num_tokens]
    ) -> None:
        # md is None in profiling / warm-up runs
        self._runner(layer, kv_cache).write(key, value, kv_cache, slot_mapping, _step_metadata(layer.layer_name))

    def forward(
        self,
        layer,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2 * head_size]
        attn_metadata: AdaptiveMetadata | None,
        output: torch.Tensor,  # [num_tokens, num_heads, head_size]
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{BACKEND_NAME}: fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        n = attn_metadata.num_actual_tokens
        self._runner(layer, kv_cache).attend(
            query[:n], key[:n], value[:n], kv_cache, attn_metadata, self.scale, output[:n]
        )
        return output


def _step_metadata(layer_name: str) -> AdaptiveMetadata | None:
    """The layer's metadata of the running step, from vLLM's forward context."""
    from vllm.forward_context import get_forward_context

    attn_metadata = get_forward_context().attn_metadata
    if attn_metadata is None:
        return None
    if not isinstance(attn_metadata, dict):
        raise NotImplementedError(f"{BACKEND_NAME}: micro-batched attention metadata")
    return attn_metadata.get(layer_name)
