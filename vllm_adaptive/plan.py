"""The layer plan: what each decoder layer runs, decided once.

``resolve(cfg, block_size=..., device_type=..., max_model_len=...)`` turns the
user's ``AdaptiveConfig`` into one :class:`LayerPlan` per layer: its pattern
kind (and pattern), its KV format and its kernel path, hence its runner. It
needs the engine's final block size (vLLM's platform fixes it in
``check_and_update_config``) and device, so it runs after that, first in the
user's process at start-up (``startup.finalize_vllm_config``, where a bad
combination fails with the layer and what is missing), then in each worker
from the same config (``plan_for``, cached per process). The KV spec, the
metadata builder and the impl all read it; nothing re-derives a path.

Path choice per layer: an explicit ``kernels`` value must run on the device
and have a runner that accepts the layer's pattern at the block size;
``auto`` takes the first of ``runners.AUTO_PATHS[device]`` that does.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from vllm_adaptive.config import AdaptiveConfig, num_layers_of, parse_config, raw_from_hf_config
from vllm_adaptive.errors import AdaptiveConfigError
from vllm_adaptive.formats import FORMATS
from vllm_adaptive.kv.specs import NULL_BLOCK_ID
from vllm_adaptive.kinds import KINDS, LayerKind
from vllm_adaptive.runners import AUTO_PATHS, RUNNERS, Runner


@dataclass(frozen=True)
class LayerPlan:
    layer_idx: int
    kind: str
    params: Any  # the kind's parameters: a SparsePattern, ReleaseParams, or None (full)
    kv_format: str
    path: str
    runner: type[Runner]
    kv_params: Any = None  # the KV format's parameters (formats/), None for formats without

    @property
    def layer_kind(self) -> LayerKind:
        return KINDS[self.kind]

    @property
    def frees_blocks(self) -> bool:
        return self.layer_kind.frees_blocks


@dataclass(frozen=True)
class ModelPlan:
    config: AdaptiveConfig
    layers: tuple[LayerPlan, ...]
    block_size: int
    device_type: str

    @property
    def null_slot_end(self) -> int:
        """Cache slots below this are the null block's (``kv.specs.NULL_BLOCK_ID``
        = 0, checked by every manager): sparse runners never store tokens there."""
        return (NULL_BLOCK_ID + 1) * self.block_size

    @property
    def mixes_kv_formats(self) -> bool:
        """Whether layers of different KV formats share cache tensors and blocks
        (``runner.Geometry.foreign_pages``)."""
        return len({p.kv_format for p in self.layers}) > 1

    def layer(self, layer_idx: int) -> LayerPlan:
        self.config.kind_of(layer_idx)  # IndexError naming the table
        return self.layers[layer_idx]

    def for_layer_name(self, layer_name: str) -> LayerPlan:
        from vllm.model_executor.models.utils import extract_layer_index

        return self.layer(extract_layer_index(layer_name))

    def table(self, extra: tuple[str, dict[int, str]] | None = None) -> str:
        """One line per distinct (kind, pattern, format, path), with its layers.
        ``extra`` = (column title, value per layer index) adds a column."""
        rows: dict[tuple, list[int]] = {}
        for p in self.layers:
            pat = p.params.describe() if p.params else "-"
            fmt = p.kv_format + (f"({FORMATS[p.kv_format].describe(p.kv_params)})" if p.kv_params else "")
            more = extra[1][p.layer_idx] if extra else ""
            rows.setdefault((p.kind, pat, fmt, p.path, more), []).append(p.layer_idx)
        title = f"{extra[0]:<22} " if extra else ""
        lines = [f"{'kind':<12} {'pattern':<40} {'kv_format':<26} {'path':<9} {title}layers"]
        for (kind, pat, fmt, path, more), idx in rows.items():
            more = f"{more:<22} " if extra else ""
            lines.append(f"{kind:<12} {pat:<40} {fmt:<26} {path:<9} {more}{_ranges(idx)}")
        return "\n".join(lines)


def _ranges(idx: list[int]) -> str:
    out, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def _choose(cfg: AdaptiveConfig, i: int, kind: str, block_size: int, device_type: str) -> tuple[str, type[Runner]]:
    pk = KINDS[kind]
    params, fmt, wanted = cfg.params(kind), cfg.kv_formats[kind], cfg.kernels[kind]
    where = f"layer {i} ({kind}, kv_format {fmt})"
    key = "kernels" if len(set(cfg.kernels.values())) == 1 else f"kernels.{kind}"
    if wanted == "auto":
        reasons = []
        for path in AUTO_PATHS.get(device_type, ("torch",)):
            runner = RUNNERS.get((pk.family, fmt, path))
            why = "no runner" if runner is None else runner.unsupported(params, block_size)
            if why is None:
                return path, runner
            reasons.append(f"{path}: {why}")
        raise AdaptiveConfigError(
            f"adaptive_attention.{key}: no kernel path runs {where} on {device_type}: "
            + "; ".join(reasons)
        )
    runner = RUNNERS.get((pk.family, fmt, wanted))
    if runner is None:
        have = sorted(p for (fam, f, p) in RUNNERS if fam == pk.family and f == fmt)
        raise AdaptiveConfigError(
            f"adaptive_attention.{key}: {where} has no runner for kernel path {wanted!r} "
            f"(implemented for {pk.family} layers in {fmt}: {have})"
        )
    if device_type not in runner.devices:
        raise AdaptiveConfigError(
            f"adaptive_attention.{key}: expected a kernel path that runs on {device_type}, "
            f"got {wanted!r} ({wanted} runs on {', '.join(runner.devices)} only)"
        )
    why = runner.unsupported(params, block_size)
    if why is not None:
        raise AdaptiveConfigError(
            f"adaptive_attention.{key}: {wanted!r} cannot run {where}: {why}. "
            "Use 'auto' or 'torch'"
        )
    return wanted, runner


def resolve(cfg: AdaptiveConfig, *, block_size: int, device_type: str, max_model_len: int) -> ModelPlan:
    """Every layer's plan; raises AdaptiveConfigError naming the key and layer."""
    for kind in cfg.kinds_used:
        KINDS[kind].check_engine(cfg.params(kind), block_size, max_model_len)
        FORMATS[cfg.kv_formats[kind]].check_engine(cfg.kv_params(kind), block_size, max_model_len)
    chosen: dict[str, tuple[str, type[Runner]]] = {}
    layers = []
    for i, kind in enumerate(cfg.kinds):
        if kind not in chosen:  # one decision per kind: a group runs one path
            chosen[kind] = _choose(cfg, i, kind, block_size, device_type)
        path, runner = chosen[kind]
        layers.append(LayerPlan(
            i, kind, cfg.params(kind), cfg.kv_formats[kind], path, runner, cfg.kv_params(kind)
        ))
    return ModelPlan(cfg, tuple(layers), block_size, device_type)


@functools.lru_cache(maxsize=16)
def _resolve_cached(raw_json: str, num_layers: int, block_size: int, device_type: str, max_model_len: int) -> ModelPlan:
    cfg = parse_config(json.loads(raw_json), num_layers)
    return resolve(cfg, block_size=block_size, device_type=device_type, max_model_len=max_model_len)


def plan_for(vllm_config: Any) -> ModelPlan:
    """The engine's plan (parsed and resolved once per process and config)."""
    from vllm.platforms import current_platform

    hf_config = vllm_config.model_config.hf_config
    return _resolve_cached(
        json.dumps(raw_from_hf_config(hf_config), sort_keys=True),
        num_layers_of(hf_config),
        vllm_config.cache_config.block_size,
        current_platform.device_type,
        vllm_config.model_config.max_model_len,
    )


__all__ = ["LayerPlan", "ModelPlan", "plan_for", "resolve"]
