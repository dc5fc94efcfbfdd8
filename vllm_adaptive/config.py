"""AdaptiveConfig: the ``adaptive_attention`` key of a model's HF config.

The key is either a preset name (``"full"``) or a dict. A dict may name a
``preset`` to start from and override it key by key. The config is validated
once, at engine start-up (see ``patches/platform_config.py``), and resolved
into a per-layer table (:class:`LayerPlan` per decoder layer) that the backend
indexes by layer number. Every error names the key, what is allowed and what
was given, so a typo fails before the first request instead of in the middle of
serving.

Layer kinds are data: ``LAYER_KINDS`` lists those this release implements.
Later kinds (LongGen ``sink_window`` / ``strided``, quantized and
importance-scored layers) slot into the same table.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

CONFIG_KEY = "adaptive_attention"

#: Layer kinds this release implements. ``full``: ordinary causal attention
#: over every cached token of the request.
LAYER_KINDS: tuple[str, ...] = ("full",)

#: Which kernels run attention.
#:   auto      vLLM's own CPU ops for full layers on CPU, Triton on CUDA.
#:   vllm_cpu  vLLM's CPU attention ops (ISA-packed cache), CPU only.
#:   torch     the plugin's torch path (plain cache layout), any device.
#:   triton    the plugin's Triton kernels, CUDA only.
KERNELS: tuple[str, ...] = ("auto", "vllm_cpu", "torch", "triton")

PRESETS: dict[str, dict[str, Any]] = {
    # No compression: every layer keeps full attention. Outputs must equal
    # stock vLLM's.
    "full": {"default_kind": "full"},
}

_DEFAULTS: dict[str, Any] = {
    "preset": None,
    "default_kind": "full",
    "layer_kinds": None,
    "kernels": "auto",
}


class AdaptiveConfigError(ValueError):
    """A bad ``adaptive_attention`` value. Always names the offending key."""


def _err(key: str, allowed: str, got: Any) -> AdaptiveConfigError:
    return AdaptiveConfigError(
        f"{CONFIG_KEY}.{key}: expected {allowed}, got {got!r}"
    )


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer does. Resolved once, looked up per forward."""

    layer_idx: int
    kind: str


@dataclass(frozen=True)
class AdaptiveConfig:
    preset: str | None
    default_kind: str
    layer_kinds: tuple[str, ...] | None
    kernels: str
    num_layers: int
    layers: tuple[LayerPlan, ...] = field(repr=False)

    def plan(self, layer_idx: int) -> LayerPlan:
        if not 0 <= layer_idx < self.num_layers:
            raise IndexError(
                f"layer {layer_idx} out of range for a {self.num_layers}-layer "
                f"{CONFIG_KEY} table"
            )
        return self.layers[layer_idx]

    @property
    def all_full(self) -> bool:
        return all(p.kind == "full" for p in self.layers)

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for p in self.layers:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        parts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        name = self.preset or "custom"
        return f"{CONFIG_KEY}={name}: {self.num_layers} layers ({parts}), kernels={self.kernels}"


def _check_kind(key: str, value: Any) -> str:
    if not isinstance(value, str) or value not in LAYER_KINDS:
        raise _err(key, f"one of {list(LAYER_KINDS)}", value)
    return value


def parse_config(raw: Any, num_layers: int) -> AdaptiveConfig:
    """Validate ``raw`` (a preset name, a dict or None) for a model of
    ``num_layers`` decoder layers. None means preset ``full``."""
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if raw is None:
        raw = "full"
    if isinstance(raw, str):
        raw = {"preset": raw}
    if not isinstance(raw, Mapping):
        raise AdaptiveConfigError(
            f"{CONFIG_KEY}: expected a preset name (one of {sorted(PRESETS)}) "
            f"or a dict, got {type(raw).__name__} {raw!r}"
        )
    unknown = sorted(set(raw) - set(_DEFAULTS))
    if unknown:
        raise AdaptiveConfigError(
            f"{CONFIG_KEY}: unknown key(s) {unknown}; allowed keys are "
            f"{sorted(_DEFAULTS)}"
        )
    merged = copy.deepcopy(_DEFAULTS)
    preset = raw.get("preset")
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise _err("preset", f"one of {sorted(PRESETS)}", preset)
        merged.update(copy.deepcopy(PRESETS[preset]))
    merged.update({k: v for k, v in raw.items() if k != "preset"})
    merged["preset"] = preset

    default_kind = _check_kind("default_kind", merged["default_kind"])

    kernels = merged["kernels"]
    if not isinstance(kernels, str) or kernels not in KERNELS:
        raise _err("kernels", f"one of {list(KERNELS)}", kernels)

    layer_kinds = merged["layer_kinds"]
    if layer_kinds is not None:
        if not isinstance(layer_kinds, (list, tuple)):
            raise _err(
                "layer_kinds", f"a list of {num_layers} layer kinds", layer_kinds
            )
        if len(layer_kinds) != num_layers:
            raise AdaptiveConfigError(
                f"{CONFIG_KEY}.layer_kinds: expected {num_layers} entries (one per "
                f"decoder layer of this model), got {len(layer_kinds)}"
            )
        layer_kinds = tuple(
            _check_kind(f"layer_kinds[{i}]", k) for i, k in enumerate(layer_kinds)
        )
        kinds = layer_kinds
    else:
        kinds = (default_kind,) * num_layers

    return AdaptiveConfig(
        preset=preset,
        default_kind=default_kind,
        layer_kinds=layer_kinds,
        kernels=kernels,
        num_layers=num_layers,
        layers=tuple(LayerPlan(i, k) for i, k in enumerate(kinds)),
    )


def check_kernels_for_device(cfg: AdaptiveConfig, device_type: str) -> None:
    """Reject kernel choices the device cannot run (start-up, not mid-serving)."""
    if cfg.kernels == "vllm_cpu" and device_type != "cpu":
        raise _err("kernels", "'vllm_cpu' only on the CPU platform", cfg.kernels)
    if cfg.kernels == "triton" and device_type != "cuda":
        raise _err("kernels", "'triton' only on CUDA", cfg.kernels)


def num_layers_of(hf_config: Any) -> int:
    text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()
    n = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ValueError(
            f"{CONFIG_KEY}: cannot find num_hidden_layers in the model config "
            f"({type(hf_config).__name__})"
        )
    return n


def raw_from_hf_config(hf_config: Any) -> Any:
    return getattr(hf_config, CONFIG_KEY, None)


def from_hf_config(hf_config: Any) -> AdaptiveConfig:
    return parse_config(raw_from_hf_config(hf_config), num_layers_of(hf_config))


def resolve_for(vllm_config: Any) -> AdaptiveConfig:
    """The config for an engine. Parsing is cheap, so nothing is cached."""
    return from_hf_config(vllm_config.model_config.hf_config)
