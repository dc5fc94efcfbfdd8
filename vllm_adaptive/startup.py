"""Start-up checks: everything that can be refused is refused before the
first request, in the user's process, with the key and the reason.

Called from the recorded patches (``patches/``): ``validate_vllm_config``
before the platform's ``check_and_update_config``, ``finalize_vllm_config``
after it (once the block size is final: that is where the layer plan is
resolved and logged), ``check_selectable`` from the CPU platform's backend
selection, and ``kv_spec_for_layer`` from ``Attention.get_kv_cache_spec``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from vllm.logger import init_logger

from vllm_adaptive import BACKEND_NAME
from vllm_adaptive.backend import AdaptiveBackend
from vllm_adaptive.config import AdaptiveConfig, from_hf_config, num_layers_of, raw_from_hf_config
from vllm_adaptive.errors import CONFIG_KEY
from vllm_adaptive.formats import FORMATS
from vllm_adaptive.kinds import KINDS
from vllm_adaptive.kv import register_kv_specs
from vllm_adaptive.metrics import METRICS_DIR_ENV, publish_static
from vllm_adaptive.plan import plan_for

# Under the "vllm" logger so vLLM's handler and log level apply to our lines.
logger = init_logger("vllm.adaptive")


def check_selectable(attn_selector_config) -> None:
    """Raise, with the backend's reasons, if ADAPTIVE cannot serve this layer."""
    reasons = AdaptiveBackend.validate_configuration(
        device_capability=None, **attn_selector_config._asdict()
    )
    if reasons:
        raise ValueError(
            f"attention backend {BACKEND_NAME} cannot serve this model: "
            + "; ".join(reasons) + f" ({attn_selector_config!r})"
        )


def _is_ours(backend) -> bool:
    return backend is not None and getattr(backend, "name", None) == BACKEND_NAME


def validate_vllm_config(vllm_config: Any) -> None:
    """Parse ``adaptive_attention`` (errors name the key); select ADAPTIVE when
    a checkpoint carries the key and no backend was chosen; refuse the key with
    another explicit backend; refuse engine features block-freeing layers
    cannot serve."""
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
    if raw is None:
        logger.info("No %r in the model config: using preset 'full'.", CONFIG_KEY)
    if cfg.freeing_kinds_used:
        _check_block_freeing_engine(cfg, vllm_config)


def _check_block_freeing_engine(cfg: AdaptiveConfig, vllm_config: Any) -> None:
    kinds = _freeing_layers(cfg)
    if vllm_config.speculative_config is not None:
        raise ValueError(
            f"{CONFIG_KEY}: {kinds} do not support speculative "
            "decoding (rejected draft tokens would need freed blocks back)"
        )
    # kinds that need engine settings set them (release layers: their connector)
    for kind in cfg.kinds_used:
        KINDS[kind].prepare_engine(cfg, vllm_config, logger)
    ktc = vllm_config.kv_transfer_config
    if ktc is not None and ktc.kv_connector not in {KINDS[k].kv_connector for k in cfg.kinds_used}:
        raise ValueError(
            f"{CONFIG_KEY}: {kinds} do not support KV transfer "
            f"connectors such as {ktc.kv_connector!r} (their block tables hold freed, null blocks)"
        )
    if vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        raise ValueError(
            f"{CONFIG_KEY}: {kinds} need vLLM's hybrid KV cache "
            "manager, which frees their blocks; drop --disable-hybrid-kv-cache-manager"
        )
    cache = vllm_config.cache_config
    if cache.enable_prefix_caching:
        cache.enable_prefix_caching = False
        logger.info(
            "%s: prefix caching switched off: %s free KV blocks "
            "(outside their pattern, or beyond their budget), so a cached prefix "
            "cannot be reused.",
            BACKEND_NAME, kinds,
        )


def _freeing_layers(cfg: AdaptiveConfig) -> str:
    """The block-freeing layers by name, for messages: "sparse layers
    (sink_window)", "release layers", or both."""
    sparse = [k for k in cfg.freeing_kinds_used if k != "release"]
    parts = [f"sparse layers ({', '.join(sparse)})"] if sparse else []
    if "release" in cfg.freeing_kinds_used:
        parts.append("release layers")
    return " and ".join(parts)


#: set once the start-up table is logged; processes that inherit it (the
#: engine core of a server) log it again only for another metrics folder
_LOGGED_ENV = "VLLM_ADAPTIVE_PLAN_LOGGED"


def finalize_vllm_config(vllm_config: Any) -> None:
    """Resolve the layer plan with the platform's final block size (raises
    naming the key and the layer) and log it."""
    model_config = vllm_config.model_config
    if model_config is None or not _is_ours(vllm_config.attention_config.backend):
        return
    plan = plan_for(vllm_config)
    key = hashlib.sha1(f"{plan.table()}|{vllm_config.model_config.max_model_len}".encode()).hexdigest()[:12]
    if os.environ.get(_LOGGED_ENV) == f"{os.environ.get(METRICS_DIR_ENV)}:{key}":
        return  # the engine core of a server that already logged and published this plan
    rows, ratio = capacity_rows(vllm_config)
    per_layer = {r["layer"]: f"{r['bytes_per_token']:.0f} ({r['bytes_per_token'] / r['full_bytes_per_token']:.0%} of full)"
                 for r in rows}
    L = vllm_config.model_config.max_model_len
    ours = sum(r["bytes_per_token"] for r in rows) * L
    full = sum(r["full_bytes_per_token"] for r in rows) * L
    logger.info(
        "%s\n%s\nKV per request at max_model_len=%d: %.1f MiB against %.1f MiB with full "
        "attention: %.2fx the KV capacity (before vLLM pads pages; its 'KV cache size' line "
        "below is the count that admits requests)",
        plan.config.summary(), plan.table(extra=(f"KV B/token @{L}", per_layer)),
        L, ours / 2**20, full / 2**20, ratio)
    for r in rows:
        r["kind"], r["kv_format"] = plan.layers[r["layer"]].kind, plan.layers[r["layer"]].kv_format
    publish_static(rows, ratio)
    os.environ[_LOGGED_ENV] = f"{os.environ[METRICS_DIR_ENV]}:{key}"


def capacity_rows(vllm_config: Any) -> tuple[list[dict[str, Any]], float]:
    """Per layer: KV bytes per token at ``max_model_len`` (a request's bound
    divided by the length) with its ADAPTIVE spec and with full attention in
    the model dtype, and the capacity ratio full / ours over all layers."""
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    model = vllm_config.model_config
    full = FullAttentionSpec(
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=model.get_num_kv_heads(vllm_config.parallel_config),
        head_size=model.get_head_size(),
        dtype=kv_cache_dtype_str_to_dtype(vllm_config.cache_config.cache_dtype, model),
    )
    L = model.max_model_len
    full_bpt = full.max_memory_usage_bytes(vllm_config) / L
    rows = []
    for i in range(num_layers_of(model.hf_config)):
        spec = kv_spec_for_layer(f"model.layers.{i}.self_attn.attn", full, vllm_config)
        rows.append({"layer": i, "bytes_per_token": spec.max_memory_usage_bytes(vllm_config) / L,
                     "full_bytes_per_token": full_bpt})
    ratio = sum(r["full_bytes_per_token"] for r in rows) / sum(r["bytes_per_token"] for r in rows)
    return rows, ratio


def kv_spec_for_layer(layer_name: str, spec, vllm_config: Any):
    """The KV-cache spec of an ADAPTIVE layer: its kind's spec, shaped by its
    runner (``in_step_free``) and its KV format."""
    lp = plan_for(vllm_config).for_layer_name(layer_name)
    if lp.frees_blocks or lp.kv_params is not None:
        register_kv_specs()
    chunk = vllm_config.max_in_flight_tokens
    if lp.kind == "release" and vllm_config.scheduler_config.long_prefill_token_threshold:
        # a request computes at most this many tokens per step (when it is
        # not alone: a lone request may take a whole batch, see docs)
        chunk = min(chunk, vllm_config.scheduler_config.long_prefill_token_threshold)
    spec = lp.layer_kind.kv_spec(
        spec, lp.params, chunk_tokens=chunk,
        in_step_free=lp.runner.in_step_free,
    )
    return FORMATS[lp.kv_format].kv_spec(spec, lp.kv_params)
