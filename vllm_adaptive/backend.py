"""The ADAPTIVE attention backend: capabilities, metadata builder, impl.

Every layer of the model runs through this backend; what a layer does is its
``LayerPlan`` (``config.py``), and which kernels run it is a *kernel path*:

    vllm_cpu   vLLM's own CPU ops (``cpu_attn_reshape_and_cache`` +
               ``cpu_attention_with_kv_cache``) on their ISA-packed page.
               Default for full layers on CPU: stock speed, stock numerics.
    torch      ``kernels/torch_paged.py`` on the plugin's plain page layout.
    triton     ``kernels/{cache_write,paged_prefill,paged_decode}.py``, CUDA.

LongGen sparse layers (``sink_window`` / ``strided``) run on the torch path on
CPU (``kernels/torch_sparse.py``) and on ``kernels/sparse_{prefill,decode}.py``
on CUDA. Their KV-cache groups use ``kv.SparsePatternSpec`` (given to them by
``patches/attention_spec.py``), whose manager frees blocks outside the
pattern; their cache write happens inside ``forward`` so that it can skip the
tokens no later query reads (their block is the null block), and attention
takes this step's keys from the fresh ``key``/``value`` tensors.

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
from vllm_adaptive.kv import SparsePatternSpec
from vllm_adaptive.kv_layout import split_kv_cache
from vllm_adaptive.pattern import SparsePattern

# Under the "vllm" logger so vLLM's handler and log level apply to our lines.
logger = init_logger("vllm.adaptive")


def kernel_path(cfg: AdaptiveConfig, kind: str, device_type: str, block_size: int) -> str:
    """Which kernels run a layer of ``kind`` (see module docstring). On CPU a
    sparse layer whose pattern is aligned to the cache blocks runs on vLLM's
    own kernel (kernels/cpu_sparse.py), any other on the torch path."""
    if cfg.kernels != "auto":
        return cfg.kernels
    if device_type == "cuda":
        return "triton"
    pattern = cfg.pattern(kind)
    if pattern is None or pattern.block_aligned(block_size):
        return "vllm_cpu"
    return "torch"


def sparse_spec_for_layer(layer_name: str, spec, vllm_config: VllmConfig):
    """The KV-cache spec of an ADAPTIVE layer: ``spec`` for full layers, a
    ``SparsePatternSpec`` of the same page shape for sparse ones."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_adaptive.kv import register_kv_specs

    cfg = resolve_for(vllm_config)
    kind = _layer_kind(cfg, layer_name)
    pattern = cfg.pattern(kind)
    if pattern is None:
        return spec
    if type(spec) is not FullAttentionSpec:
        raise ValueError(
            f"{BACKEND_NAME}: layer {layer_name} is sparse in {CONFIG_KEY} but vLLM "
            f"built a {type(spec).__name__} for it (only plain full attention "
            "layers can be made sparse)"
        )
    register_kv_specs()
    path = kernel_path(cfg, kind, current_platform.device_type, spec.block_size)
    return SparsePatternSpec.from_attention_spec(
        spec, pattern, chunk_tokens=vllm_config.max_in_flight_tokens,
        # vLLM's CPU kernel reads every key from the cache
        in_step_free=path != "vllm_cpu",
    )


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
    if cfg.sparse_kinds_used:
        _check_sparse_engine(cfg, vllm_config)
    logger.info("%s", cfg.summary())


def _check_sparse_engine(cfg: AdaptiveConfig, vllm_config: VllmConfig) -> None:
    """Engine features sparse (block-freeing) layers cannot serve, refused at
    start-up; prefix caching is switched off, with the reason logged."""
    kinds = ", ".join(cfg.sparse_kinds_used)
    if vllm_config.speculative_config is not None:
        raise ValueError(
            f"{CONFIG_KEY}: sparse layers ({kinds}) do not support speculative "
            "decoding (rejected draft tokens would need freed blocks back)"
        )
    if vllm_config.kv_transfer_config is not None:
        raise ValueError(
            f"{CONFIG_KEY}: sparse layers ({kinds}) do not support KV transfer "
            "connectors (their block tables hold freed, null blocks)"
        )
    if vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        raise ValueError(
            f"{CONFIG_KEY}: sparse layers ({kinds}) need vLLM's hybrid KV cache "
            "manager, which frees their blocks; drop --disable-hybrid-kv-cache-manager"
        )
    cache = vllm_config.cache_config
    if cache.enable_prefix_caching:
        cache.enable_prefix_caching = False
        logger.info(
            "%s: prefix caching switched off: sparse layers (%s) free the KV "
            "blocks outside their pattern, so a cached prefix cannot be reused.",
            BACKEND_NAME, kinds,
        )


def finalize_vllm_config(vllm_config: VllmConfig) -> None:
    """Checks that need the platform's final block size (after the original
    ``check_and_update_config``; see patches/platform_config.py)."""
    model_config = vllm_config.model_config
    if model_config is None or not _is_ours(vllm_config.attention_config.backend):
        return
    cfg = from_hf_config(model_config.hf_config)
    if cfg.sparse_kinds_used:
        from vllm_adaptive.config import check_against_engine

        block_size = vllm_config.cache_config.block_size
        check_against_engine(cfg, block_size, model_config.max_model_len)
        if cfg.kernels == "vllm_cpu":
            for kind in cfg.sparse_kinds_used:
                if not cfg.patterns[kind].block_aligned(block_size):
                    raise ValueError(
                        f"{CONFIG_KEY}.kernels: 'vllm_cpu' runs sparse layers only when "
                        f"their pattern is aligned to the cache block size ({block_size}: "
                        f"no window, sink and block multiples of it); {kind} is "
                        f"{cfg.patterns[kind].describe()}. Use 'auto' or 'torch'"
                    )


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
    # Only for sparse groups: the pattern, and the end of the null block's
    # slots (tokens mapped below it are not stored: see kv/manager.py).
    pattern: SparsePattern | None = None
    null_slot_end: int = 0
    # Torch path: which keys each query reads, planned once per step and
    # shared by the group's layers (kernels/torch_sparse.py).
    sparse_plan: object | None = None
    # vllm_cpu path of block-aligned sparse layers (kernels/cpu_sparse.py).
    pseudo: object | None = None


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
        paths = {
            kernel_path(cfg, _layer_kind(cfg, n), device_type, kv_cache_spec.block_size)
            for n in layer_names
        }
        self.needs_cpu_scheduler = "vllm_cpu" in paths
        self.pattern = None
        self.null_slot_end = 0
        self.plan_on_cpu = False
        self.pseudo = False
        if isinstance(kv_cache_spec, SparsePatternSpec):
            self.pattern = kv_cache_spec.pattern
            # The manager's null block is block 0; with kernel-block splitting
            # it spans the first manager-block's worth of slots.
            self.null_slot_end = vllm_config.cache_config.block_size
            self.kernel_block_size = kv_cache_spec.block_size
            self.plan_on_cpu = "torch" in paths
            # vllm_cpu path: pseudo requests over compacted block tables
            self.pseudo = "vllm_cpu" in paths
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
        pseudo = None
        query_start_loc, seq_lens = cm.query_start_loc, cm.seq_lens
        if self.pseudo:
            from vllm_adaptive.kernels.cpu_sparse import plan_pseudo_requests

            pseudo = plan_pseudo_requests(
                self.pattern, cm.block_table_tensor, cm.query_start_loc_cpu,
                cm.seq_lens.cpu(), self.kernel_block_size,
            )
            query_start_loc, seq_lens = pseudo.query_start_loc, pseudo.seq_lens
        if self.needs_cpu_scheduler:
            from vllm import _custom_ops as ops
            from vllm import envs

            sched = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=seq_lens.shape[0],
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                seq_lens=seq_lens,
                dtype=self.dtype,
                query_start_loc=query_start_loc,
                causal=True,
                sliding_window_size=-1,
                isa=self.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                dynamic_causal=None,
                kv_cache_dtype=self.kv_cache_dtype,
            )
        plan = None
        if self.plan_on_cpu:
            from vllm_adaptive.kernels.torch_sparse import plan_sparse

            plan = plan_sparse(
                self.pattern, cm.block_table_tensor, cm.query_start_loc_cpu,
                cm.seq_lens.cpu(), self.kernel_block_size,
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
            pattern=self.pattern,
            null_slot_end=self.null_slot_end,
            sparse_plan=plan,
            pseudo=pseudo,
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
        self._sparse: bool | None = None

    def _path_for(self, layer, kv_cache: torch.Tensor) -> str:
        if self._path is None:
            kind = _layer_kind(self.cfg, layer.layer_name)
            block_size = kv_cache.shape[2]
            self._path = kernel_path(self.cfg, kind, self.device_type, block_size)
            # sparse layers that skip dead tokens' writes (not vllm_cpu's)
            self._sparse = self.cfg.pattern(kind) is not None and self._path != "vllm_cpu"
        return self._path

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2 * head_size]
        slot_mapping: torch.Tensor,  # [num_tokens]
    ) -> None:
        path = self._path_for(layer, kv_cache)
        if self._sparse:
            return  # written in forward, which knows which tokens to keep
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
        path = self._path_for(layer, kv_cache)
        key_cache, value_cache = split_kv_cache(kv_cache)
        if self._sparse:
            self._forward_sparse(path, q, key[:n], value[:n], key_cache, value_cache, md, out)
            return output
        if path == "vllm_cpu":
            from vllm import _custom_ops as ops

            # block-aligned sparse layers: pseudo requests (kernels/cpu_sparse.py)
            batch = md.pseudo if md.pseudo is not None else md
            ops.cpu_attention_with_kv_cache(
                query=q, key_cache=key_cache, value_cache=value_cache, output=out,
                query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens,
                scale=self.scale, causal=True, alibi_slopes=None, sliding_window=-1,
                block_table=batch.block_table, softcap=0,
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

    def _forward_sparse(self, path, q, key, value, key_cache, value_cache, md, out) -> None:
        pattern = md.pattern
        if pattern is None:
            raise RuntimeError(
                f"{BACKEND_NAME}: a sparse layer got metadata of a full-attention "
                "KV-cache group (is patches/attention_spec.py applied?)"
            )
        slots = md.slot_mapping[: md.num_actual_tokens]
        if path == "triton":
            from vllm_adaptive.kernels.cache_write import write_kv_cache
            from vllm_adaptive.kernels.sparse_decode import sparse_decode
            from vllm_adaptive.kernels.sparse_prefill import sparse_prefill

            live = torch.where(slots >= md.null_slot_end, slots, torch.full_like(slots, -1))
            write_kv_cache(key, value, key_cache, value_cache, live)
            attend = sparse_decode if md.max_query_len == 1 else sparse_prefill
        else:
            from vllm_adaptive.kernels.torch_sparse import run_sparse, write_live_kv

            write_live_kv(key, value, key_cache, value_cache, slots, md.null_slot_end)
            run_sparse(md.sparse_plan, q, key, value, key_cache, value_cache, self.scale, out)
            return
        attend(
            q, key, value, key_cache, value_cache, md.block_table,
            md.query_start_loc, md.seq_lens, self.scale, pattern, out=out,
        )
