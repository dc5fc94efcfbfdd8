"""The ADAPTIVE attention backend: capabilities, metadata builder, impl.

Every layer of the model runs through this backend; what a layer does is its
``LayerPlan`` (``config.py``), and which kernels run it is a *kernel path*:

    vllm_cpu   vLLM's own CPU ops (``cpu_attn_reshape_and_cache`` +
               ``cpu_attention_with_kv_cache``) on their ISA-packed page.
               Default for full layers on CPU: stock speed, stock numerics.
    torch      ``kernels/torch_paged.py`` on the plugin's plain page layout.
    triton     ``kernels/{cache_write,paged_prefill,paged_decode}.py``, CUDA.

All layers share one physical page shape (vLLM's LBHNC ``[num_blocks,
num_kv_heads, block_size, 2 * head_size]``); each path reads the page it wrote,
and a layer never changes path during a run.

Capabilities are data (class attributes below), so the selector can say why
ADAPTIVE does not fit a model instead of failing inside a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config, get_layers_from_vllm_config
from vllm.logger import init_logger
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
from vllm_adaptive.config import (
    CONFIG_KEY,
    AdaptiveConfig,
    check_kernels_for_device,
    from_hf_config,
    raw_from_hf_config,
    resolve_for,
)
from vllm_adaptive.kv_layout import split_kv_cache

# Under the "vllm" logger so vLLM's handler and log level apply to our lines.
logger = init_logger("vllm.adaptive")


def kernel_path(cfg: AdaptiveConfig, kind: str, device_type: str) -> str:
    """Which kernels run a layer of ``kind`` (see module docstring)."""
    if cfg.kernels != "auto":
        return cfg.kernels
    if device_type == "cuda":
        return "triton"
    return "vllm_cpu" if kind == "full" else "torch"


def _layer_kind(cfg: AdaptiveConfig, layer_name: str) -> str:
    from vllm.model_executor.models.utils import extract_layer_index

    return cfg.plan(extract_layer_index(layer_name)).kind


class AdaptiveBackend(AttentionBackend):
    # KV is written by do_kv_cache_update before forward runs.
    forward_includes_kv_cache_update: bool = False

    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
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


def check_selectable(attn_selector_config) -> None:
    """Raise, with the backend's reasons, if ADAPTIVE cannot serve this layer."""
    reasons = AdaptiveBackend.validate_configuration(
        device_capability=None, **attn_selector_config._asdict()
    )
    if reasons:
        raise ValueError(
            f"attention backend {BACKEND_NAME} cannot serve this model: "
            + "; ".join(reasons)
            + f" ({attn_selector_config!r})"
        )


def _is_ours(backend) -> bool:
    return backend is not None and getattr(backend, "name", None) == BACKEND_NAME


def validate_vllm_config(vllm_config: VllmConfig) -> None:
    """Start-up check (see patches/platform_config.py). Raises ValueError."""
    model_config = vllm_config.model_config
    if model_config is None:
        return
    attn = vllm_config.attention_config
    ours = _is_ours(attn.backend) or any(_is_ours(b) for b in attn.backend_per_kind.values())
    hf_config = model_config.hf_config
    raw = raw_from_hf_config(hf_config)
    if raw is not None and not ours:
        if attn.backend is None and not attn.backend_per_kind:
            from vllm.v1.attention.backends.registry import AttentionBackendEnum

            attn.backend = AttentionBackendEnum[BACKEND_NAME]
            ours = True
            logger.info(
                "The model config carries %r: selecting attention backend %s.",
                CONFIG_KEY, BACKEND_NAME,
            )
        else:
            raise ValueError(
                f"the model config sets {CONFIG_KEY}={raw!r}, which only attention "
                f"backend {BACKEND_NAME} implements, but the attention backend is "
                f"{attn.backend.name if attn.backend else attn.backend_per_kind}; "
                f"pass --attention-backend {BACKEND_NAME} or drop the key"
            )
    if not ours:
        return
    cfg = from_hf_config(hf_config)
    check_kernels_for_device(cfg, current_platform.device_type)
    if raw is None:
        logger.info("No %r in the model config: using preset 'full'.", CONFIG_KEY)
    logger.info("%s", cfg.summary())


@dataclass
class AdaptiveMetadata:
    """Per-step metadata shared by the layers of one KV-cache group.

    Per request r (lengths as in ``vllm_adaptive.reference``)::

        seq_lens[r]   = context_len + query_len   (tokens in cache after this step)
        query_len     = query_start_loc[r + 1] - query_start_loc[r]
        context_len   = seq_lens[r] - query_len   (already cached before this step)
    """

    num_actual_tokens: int  # tokens in this step, padding excluded
    max_query_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    max_seq_len: int
    seq_lens: torch.Tensor  # [num_reqs] int32
    block_table: torch.Tensor  # [num_reqs, max_blocks_per_req] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = padding
    causal: bool = True
    # Only for layers on the vllm_cpu path.
    cpu_scheduler_metadata: torch.Tensor | None = None


class AdaptiveMetadataBuilder(AttentionMetadataBuilder[AdaptiveMetadata]):
    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.vllm_config = vllm_config
        cfg = resolve_for(vllm_config)
        device_type = current_platform.device_type
        paths = {kernel_path(cfg, _layer_kind(cfg, n), device_type) for n in layer_names}
        self.needs_cpu_scheduler = "vllm_cpu" in paths
        self.isa = None
        if self.needs_cpu_scheduler:
            self._init_cpu_ops(kv_cache_spec, layer_names, vllm_config)

    def _init_cpu_ops(self, spec: AttentionSpec, layer_names, vllm_config) -> None:
        from vllm.model_executor.layers.attention import Attention
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
        from vllm.v1.attention.backends.utils import get_num_attention_heads_from_layers

        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_size
        self.num_heads = get_num_attention_heads_from_layers(
            vllm_config, layer_names
        ) or vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        self.dtype = vllm_config.model_config.dtype
        self.kv_cache_dtype = vllm_config.cache_config.cache_dtype
        self.isa = _get_attn_isa(self.dtype, spec.block_size, self.head_dim, self.kv_cache_dtype)
        # cpu_attn_reshape_and_cache reads the ISA from the layer, as CPU_ATTN does.
        for layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).values():
            layer.isa = self.isa

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> AdaptiveMetadata:
        cm = common_attn_metadata
        if isinstance(cm.causal, torch.Tensor) or not cm.causal:
            raise ValueError(f"{BACKEND_NAME} supports causal decoder attention only")
        sched = None
        if self.needs_cpu_scheduler:
            from vllm import _custom_ops as ops
            from vllm import envs

            sched = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=cm.num_reqs,
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                seq_lens=cm.seq_lens,
                dtype=self.dtype,
                query_start_loc=cm.query_start_loc,
                causal=True,
                sliding_window_size=-1,
                isa=self.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                dynamic_causal=None,
                kv_cache_dtype=self.kv_cache_dtype,
            )
        return AdaptiveMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            query_start_loc=cm.query_start_loc,
            max_seq_len=cm.max_seq_len,
            seq_lens=cm.seq_lens,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            cpu_scheduler_metadata=sched,
        )


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
        self.cfg = resolve_for(get_current_vllm_config())
        self.device_type = current_platform.device_type
        self._path: str | None = None

    def _path_for(self, layer) -> str:
        if self._path is None:
            kind = _layer_kind(self.cfg, layer.layer_name)
            self._path = kernel_path(self.cfg, kind, self.device_type)
        return self._path

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2 * head_size]
        slot_mapping: torch.Tensor,  # [num_tokens]
    ) -> None:
        path = self._path_for(layer)
        key_cache, value_cache = split_kv_cache(kv_cache)
        if path == "vllm_cpu":
            from vllm import _custom_ops as ops

            ops.cpu_attn_reshape_and_cache(
                key, value, key_cache, value_cache, slot_mapping, layer.isa,
                k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                kv_cache_dtype=self.kv_cache_dtype,
            )
        elif path == "torch":
            from vllm_adaptive.kernels.torch_paged import write_kv_cache

            write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
        else:
            from vllm_adaptive.kernels.cache_write import write_kv_cache

            write_kv_cache(key, value, key_cache, value_cache, slot_mapping)

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
        md = attn_metadata
        n = md.num_actual_tokens
        q = query[:n]
        out = output[:n]
        path = self._path_for(layer)
        key_cache, value_cache = split_kv_cache(kv_cache)
        if path == "vllm_cpu":
            from vllm import _custom_ops as ops

            ops.cpu_attention_with_kv_cache(
                query=q, key_cache=key_cache, value_cache=value_cache, output=out,
                query_start_loc=md.query_start_loc, seq_lens=md.seq_lens,
                scale=self.scale, causal=True, alibi_slopes=None, sliding_window=-1,
                block_table=md.block_table, softcap=0,
                scheduler_metadata=md.cpu_scheduler_metadata, s_aux=None,
                dynamic_causal=None, k_scale=layer._k_scale_float,
                v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype,
            )
        elif path == "torch":
            from vllm_adaptive.kernels.torch_paged import paged_attention

            paged_attention(
                q, key_cache, value_cache, md.block_table, md.query_start_loc,
                md.seq_lens, self.scale, out=out,
            )
        elif md.max_query_len == 1:
            from vllm_adaptive.kernels.paged_decode import paged_decode

            paged_decode(
                q, key_cache, value_cache, md.block_table, md.query_start_loc,
                md.seq_lens, self.scale, out=out,
            )
        else:
            from vllm_adaptive.kernels.paged_prefill import paged_prefill

            paged_prefill(
                q, key_cache, value_cache, md.block_table, md.query_start_loc,
                md.seq_lens, self.scale, out=out,
            )
        return output
