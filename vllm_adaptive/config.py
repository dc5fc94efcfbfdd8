"""AdaptiveConfig: the ``adaptive_attention`` key of a model's HF config.

The key is either a preset name (``"full"``) or a dict. A dict may name a
``preset`` to start from and override it key by key. This module parses and
validates what the *user* said, per layer kind; ``plan.py`` turns it into what
*runs* (a ``LayerPlan`` per layer: pattern x KV format x kernel path), once the
engine's block size and device are known. Every error names the key, what is
allowed and what was given, so a typo fails before the first request instead
of in the middle of serving.

Layer kinds (``patterns/``) and KV formats (``formats/``) are tables: the keys
a kind owns (its sub-dict, e.g. ``sink_window``), its defaults and its
validation live with the kind, not here. Which layers stay full is
``full_layers`` (indices, or ``"middle_third"``, LongGen's placement);
``vllm-adaptive calibrate`` measures a better one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm_adaptive.errors import CONFIG_KEY, AdaptiveConfigError, config_error
from vllm_adaptive.formats import DEFAULT_FORMAT, FORMATS
from vllm_adaptive.kinds import KINDS

__all__ = ["CONFIG_KEY", "AdaptiveConfig", "AdaptiveConfigError", "parse_config"]

#: Layer kinds this release implements (``patterns/``).
LAYER_KINDS: tuple[str, ...] = tuple(KINDS)
#: Kinds whose layers free KV blocks.
FREEING_KINDS: tuple[str, ...] = tuple(k for k, kind in KINDS.items() if kind.frees_blocks)
#: Each parameterised kind's default sub-dict (presets and users override key by key).
KIND_DEFAULTS: dict[str, dict[str, Any]] = {k: dict(v.defaults) for k, v in KINDS.items() if v.defaults}

#: Which kernels run a layer (``runners/``), per kind or for all kinds.
#:   auto      on CPU vLLM's own CPU ops where a runner can use them, else the
#:             torch path; on CUDA the plugin's Triton kernels.
#:   vllm_cpu  vLLM's CPU attention ops (ISA-packed cache), CPU only.
#:   torch     the plugin's torch path (plain cache layout), any device.
#:   triton    the plugin's Triton kernels, CUDA only.
KERNELS: tuple[str, ...] = ("auto", "vllm_cpu", "torch", "triton")

KIVI4 = {"bits": 4, "group_size": 64, "value_group": 64, "residual": 64}

PRESETS: dict[str, dict[str, Any]] = {
    # No compression: every layer keeps full attention. Outputs must equal
    # stock vLLM's.
    "full": {"default_kind": "full"},
    # LongGen: the middle third of the stack full, the rest sink + window.
    "longgen": {"default_kind": "sink_window", "full_layers": "middle_third"},
    # LongGen's block-sparse variant: local blocks + every 8th block.
    "longgen-strided": {"default_kind": "strided", "full_layers": "middle_third"},
    # KIVI-style quantized KV on every layer (formats/kivi.py): keys per
    # channel over groups of tokens, values per token over groups of
    # channels, the newest `residual` tokens' keys and values in full
    # precision, prefill attending to its own chunk in full precision.
    # kivi8 keeps KIVI's own settings (groups of 32, a block of residual);
    # kivi4 / kivi2 use the settings measured best at their capacity
    # (benchmarks/RESULTS.md, "Faithful KIVI"): int4 with groups of 64
    # (3.45x bf16 at 8K, KIVI's 32 / 32 / 128 give 3.01x), int2 with key
    # groups of 16 and the Hadamard rotation of keys and values (perplexity
    # +8% where KIVI's settings give +28%). Their groups need a block size
    # of at least 64 (CPU: 128).
    "kivi8": {"kv_format": "kivi", "kivi": {"bits": 8}},
    "kivi4": {"kv_format": "kivi", "kivi": dict(KIVI4)},
    "kivi2": {"kv_format": "kivi", "kivi": {"bits": 2, "group_size": 16, "value_group": 64, "residual": 64,
                                            "rotation": "kv"}},
    # LongGen's map with every layer's KV in int4 (kivi4's settings).
    "longgen-kivi4": {
        "default_kind": "sink_window", "full_layers": "middle_third",
        "kv_format": "kivi", "kivi": dict(KIVI4),
    },
    # ADORE adaptive token release (patterns/release.py): every layer holds a
    # budget of 1024 tokens, scored by the shipped GRU controller.
    "adore": {"default_kind": "release"},
    # LongGen's full middle third kept; the other layers release layers.
    "longgen-adore": {"default_kind": "release", "full_layers": "middle_third"},
}

#: Each KV format's parameter sub-dict (``formats/``: e.g. ``kivi``) and its defaults.
FORMAT_DEFAULTS: dict[str, dict[str, Any]] = {f.key: dict(f.defaults) for f in FORMATS.values() if f.key}

_DEFAULTS: dict[str, Any] = {
    "preset": None,
    "default_kind": "full",
    "full_layers": None,
    "layer_kinds": None,
    "kernels": "auto",
    "kv_format": DEFAULT_FORMAT,
    **copy.deepcopy(FORMAT_DEFAULTS),
    **copy.deepcopy(KIND_DEFAULTS),
}
#: Top-level keys whose dict value merges key by key over the preset's.
_SUB_DICTS = (*KIND_DEFAULTS, *FORMAT_DEFAULTS)


@dataclass(frozen=True)
class AdaptiveConfig:
    preset: str | None
    default_kind: str
    layer_kinds: tuple[str, ...] | None  # as the user gave it
    num_layers: int
    kinds: tuple[str, ...] = field(repr=False)  # one per decoder layer
    kernels: Mapping[str, str] = field(default_factory=dict)  # per kind
    kv_formats: Mapping[str, str] = field(default_factory=dict)  # per kind
    kind_params: Mapping[str, Any] = field(default_factory=dict, repr=False)  # per kind with parameters
    format_params: Mapping[str, Any] = field(default_factory=dict)  # per KV format with parameters

    def kv_params(self, kind: str) -> Any:
        """The parameters of a kind's KV format (None for formats without)."""
        return self.format_params.get(self.kv_formats[kind])

    def kind_of(self, layer_idx: int) -> str:
        if not 0 <= layer_idx < self.num_layers:
            raise IndexError(
                f"layer {layer_idx} out of range for a {self.num_layers}-layer {CONFIG_KEY} table"
            )
        return self.kinds[layer_idx]

    def params(self, kind: str) -> Any:
        """A layer kind's parameters (its sparse pattern, its release
        parameters); None for ``full``."""
        return self.kind_params.get(kind)

    @property
    def kinds_used(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.kinds)))

    @property
    def freeing_kinds_used(self) -> tuple[str, ...]:
        return tuple(k for k in self.kinds_used if KINDS[k].frees_blocks)

    @property
    def full_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.kinds) if k == "full")

    @property
    def all_full(self) -> bool:
        return all(k == "full" for k in self.kinds)

    def summary(self) -> str:
        counts = ", ".join(f"{self.kinds.count(k)} {k}" for k in self.kinds_used)
        full = f", full layers {list(self.full_layer_indices)}" if self.freeing_kinds_used else ""
        pats = "".join(f", {k}({self.kind_params[k].describe()})" for k in self.freeing_kinds_used)
        kernels = ",".join(sorted({self.kernels[k] for k in self.kinds_used}))
        formats = ",".join(sorted({
            self.kv_formats[k] + (f"({FORMATS[self.kv_formats[k]].describe(p)})" if (p := self.kv_params(k)) else "")
            for k in self.kinds_used
        }))
        return (
            f"{CONFIG_KEY}={self.preset or 'custom'}: {self.num_layers} layers ({counts})"
            f"{full}{pats}, kernels={kernels}, kv_format={formats}"
        )


def _check_kind(key: str, value: Any) -> str:
    if not isinstance(value, str) or value not in KINDS:
        raise config_error(key, f"one of {list(LAYER_KINDS)}", value)
    return value


def _per_kind(key: str, value: Any, allowed: tuple[str, ...], default: str) -> dict[str, str]:
    """A value for every kind, from one string or a ``{kind: value}`` dict."""
    if isinstance(value, str):
        if value not in allowed:
            raise config_error(key, f"one of {list(allowed)}", value)
        return {k: value for k in KINDS}
    if not isinstance(value, Mapping):
        raise config_error(key, f"one of {list(allowed)}, or a dict {{layer kind: value}}", value)
    out = {k: default for k in KINDS}
    for kind, v in value.items():
        _check_kind(f"{key} (a layer kind)", kind)
        if not isinstance(v, str) or v not in allowed:
            raise config_error(f"{key}.{kind}", f"one of {list(allowed)}", v)
        out[kind] = v
    return out


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
            f"{CONFIG_KEY}: unknown key(s) {unknown}; allowed keys are {sorted(_DEFAULTS)}"
        )
    merged = copy.deepcopy(_DEFAULTS)
    preset = raw.get("preset")
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise config_error("preset", f"one of {sorted(PRESETS)}", preset)
        merged.update(copy.deepcopy(PRESETS[preset]))
    for k, v in raw.items():
        if k == "preset":
            continue
        if k in _SUB_DICTS and isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = {**merged[k], **v}  # a kind's sub-dict merges key by key
        else:
            merged[k] = v

    default_kind = _check_kind("default_kind", merged["default_kind"])
    kernels = _per_kind("kernels", merged["kernels"], KERNELS, "auto")
    kv_formats = _per_kind("kv_format", merged["kv_format"], tuple(FORMATS), DEFAULT_FORMAT)

    layer_kinds = merged["layer_kinds"]
    if layer_kinds is not None:
        if not isinstance(layer_kinds, (list, tuple)):
            raise config_error("layer_kinds", f"a list of {num_layers} layer kinds", layer_kinds)
        if len(layer_kinds) != num_layers:
            raise AdaptiveConfigError(
                f"{CONFIG_KEY}.layer_kinds: expected {num_layers} entries (one per "
                f"decoder layer of this model), got {len(layer_kinds)}"
            )
        layer_kinds = tuple(_check_kind(f"layer_kinds[{i}]", k) for i, k in enumerate(layer_kinds))
        kinds = layer_kinds
    else:
        full = _full_layers(merged["full_layers"], num_layers)
        kinds = tuple("full" if i in full else default_kind for i in range(num_layers))

    kind_params = {k: KINDS[k].parse(merged[k]) for k in KIND_DEFAULTS}
    format_params = {f.name: f.parse(merged[f.key]) for f in FORMATS.values() if f.key}
    return AdaptiveConfig(
        preset=preset,
        default_kind=default_kind,
        layer_kinds=layer_kinds,
        num_layers=num_layers,
        kinds=kinds,
        kernels=kernels,
        kv_formats=kv_formats,
        kind_params=kind_params,
        format_params=format_params,
    )


def middle_third(num_layers: int) -> tuple[int, ...]:
    """LongGen's placement: the middle third of the stack keeps full attention."""
    n_full = -(-num_layers // 3)
    start = (num_layers - n_full) // 2
    return tuple(range(start, start + n_full))


def _full_layers(value: Any, num_layers: int) -> frozenset[int]:
    if value is None:
        return frozenset()
    if value == "middle_third":
        return frozenset(middle_third(num_layers))
    allowed = f"'middle_third' or a list of layer indices in [0, {num_layers})"
    if not isinstance(value, (list, tuple)):
        raise config_error("full_layers", allowed, value)
    for i, v in enumerate(value):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < num_layers:
            raise config_error(f"full_layers[{i}]", f"a layer index in [0, {num_layers})", v)
    if len(set(value)) != len(value):
        raise config_error("full_layers", "distinct layer indices", value)
    return frozenset(value)


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
