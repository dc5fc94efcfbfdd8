"""AdaptiveConfig: the ``adaptive_attention`` key of a model's HF config.

The key is either a preset name (``"full"``) or a dict. A dict may name a
``preset`` to start from and override it key by key. The config is validated
once, at engine start-up (see ``patches/platform_config.py``), and resolved
into a per-layer table (:class:`LayerPlan` per decoder layer) that the backend
indexes by layer number. Every error names the key, what is allowed and what
was given, so a typo fails before the first request instead of in the middle of
serving.

Layer kinds are data: ``LAYER_KINDS`` lists those this release implements.
``full`` keeps every token; the LongGen kinds ``sink_window`` and ``strided``
read (and keep) only the tokens of their :class:`~vllm_adaptive.pattern.SparsePattern`.
Which layers stay full is ``full_layers`` (indices, or ``"middle_third"``,
LongGen's placement); ``vllm-adaptive calibrate`` measures a better one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

from vllm_adaptive.pattern import SparsePattern

CONFIG_KEY = "adaptive_attention"

#: Layer kinds this release implements. ``full``: ordinary causal attention
#: over every cached token of the request.
LAYER_KINDS: tuple[str, ...] = ("full", "sink_window", "strided")
SPARSE_KINDS: tuple[str, ...] = ("sink_window", "strided")

#: Allowed keys of each sparse kind's sub-dict, and their pattern fields.
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "sink_window": ("sink", "window", "block"),
    "strided": ("sink", "block", "local_blocks", "vert_stride"),
}

#: Which kernels run attention.
#:   auto      vLLM's own CPU ops for full layers on CPU, Triton on CUDA.
#:   vllm_cpu  vLLM's CPU attention ops (ISA-packed cache), CPU only.
#:   torch     the plugin's torch path (plain cache layout), any device.
#:   triton    the plugin's Triton kernels, CUDA only.
KERNELS: tuple[str, ...] = ("auto", "vllm_cpu", "torch", "triton")

# Pattern sizes are tokens. The defaults are sized for an 8K-context model
# (SmolLM2): LongGen's own runs keep a window of a few percent of the context.
# ``block`` > 1 makes the window block-granular, as in LongGen's block-sparse
# kernels: the queries of one ``block``-token block all read the same keys
# (the last window/block blocks), which on CPU runs on vLLM's own kernel.
# block = 1 is the token-exact window (the torch path on CPU).
_SINK_WINDOW = {"sink": 128, "window": 768, "block": 128}
# Block-aligned for cache blocks of up to 128 tokens (vLLM's CPU default), so
# that on CPU these layers run on vLLM's own attention kernel.
_STRIDED = {"sink": 128, "block": 128, "local_blocks": 4, "vert_stride": 8}

#: Each sparse kind's default sub-dict (presets and users override key by key).
KIND_DEFAULTS: dict[str, dict[str, int]] = {"sink_window": _SINK_WINDOW, "strided": _STRIDED}

PRESETS: dict[str, dict[str, Any]] = {
    # No compression: every layer keeps full attention. Outputs must equal
    # stock vLLM's.
    "full": {"default_kind": "full"},
    # LongGen: the middle third of the stack full, the rest sink + window.
    "longgen": {"default_kind": "sink_window", "full_layers": "middle_third"},
    # LongGen's block-sparse variant: local blocks + every 8th block.
    "longgen-strided": {"default_kind": "strided", "full_layers": "middle_third"},
}

_DEFAULTS: dict[str, Any] = {
    "preset": None,
    "default_kind": "full",
    "full_layers": None,
    "layer_kinds": None,
    "kernels": "auto",
    "sink_window": dict(_SINK_WINDOW),
    "strided": dict(_STRIDED),
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
    patterns: Mapping[str, SparsePattern] = field(default_factory=dict, repr=False)

    def pattern(self, kind: str) -> SparsePattern | None:
        """The sparse pattern of a layer kind; None for ``full``."""
        return self.patterns.get(kind)

    @property
    def sparse_kinds_used(self) -> tuple[str, ...]:
        return tuple(sorted({p.kind for p in self.layers if p.kind in SPARSE_KINDS}))

    @property
    def full_layer_indices(self) -> tuple[int, ...]:
        return tuple(p.layer_idx for p in self.layers if p.kind == "full")

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
        pats = "".join(
            f", {k}({self.patterns[k].describe()})" for k in self.sparse_kinds_used
        )
        full = ""
        if self.sparse_kinds_used:
            full = f", full layers {list(self.full_layer_indices)}"
        return (
            f"{CONFIG_KEY}={name}: {self.num_layers} layers ({parts}){full}{pats}, "
            f"kernels={self.kernels}"
        )


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
    for k, v in raw.items():
        if k == "preset":
            continue
        if k in KIND_KEYS and isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = {**merged[k], **v}  # pattern sub-dicts merge key by key
        else:
            merged[k] = v
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
        full = _full_layers(merged["full_layers"], num_layers)
        kinds = tuple("full" if i in full else default_kind for i in range(num_layers))

    patterns = {
        kind: _pattern(kind, merged[kind]) for kind in SPARSE_KINDS
    }
    return AdaptiveConfig(
        preset=preset,
        default_kind=default_kind,
        layer_kinds=layer_kinds,
        kernels=kernels,
        num_layers=num_layers,
        layers=tuple(LayerPlan(i, k) for i, k in enumerate(kinds)),
        patterns=patterns,
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
        raise _err("full_layers", allowed, value)
    for i, v in enumerate(value):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < num_layers:
            raise _err(f"full_layers[{i}]", f"a layer index in [0, {num_layers})", v)
    if len(set(value)) != len(value):
        raise _err("full_layers", "distinct layer indices", value)
    return frozenset(value)


def _pattern(kind: str, value: Any) -> SparsePattern:
    keys = KIND_KEYS[kind]
    if not isinstance(value, Mapping):
        raise _err(kind, f"a dict with keys {list(keys)}", value)
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise AdaptiveConfigError(
            f"{CONFIG_KEY}.{kind}: unknown key(s) {unknown}; allowed keys are {list(keys)}"
        )
    merged = {**KIND_DEFAULTS[kind], **value}
    for k in keys:
        v = merged[k]
        minimum = 1 if k in ("window", "block", "local_blocks") else 0
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise _err(f"{kind}.{k}", f"an int >= {minimum}", v)
        if k == "vert_stride" and v == 1:  # every block: that is full attention
            raise _err(f"{kind}.{k}", "0 (off) or an int >= 2", v)
    if kind == "sink_window":
        sink, window, block = merged["sink"], merged["window"], merged["block"]
        if block == 1:
            return SparsePattern(sink=sink, window=window)
        if window % block:
            raise _err(
                "sink_window.window",
                f"a multiple of sink_window.block ({block}; or block 1 for a token window)",
                window,
            )
        return SparsePattern(sink=sink, block=block, local_blocks=window // block)
    return SparsePattern(**{k: merged[k] for k in keys})


def check_against_engine(cfg: AdaptiveConfig, block_size: int, max_model_len: int) -> None:
    """Checks that need the engine's block size and length (start-up)."""
    for kind in cfg.sparse_kinds_used:
        pat = cfg.patterns[kind]
        if kind == "strided" and pat.block % block_size:
            raise _err(
                "strided.block",
                f"a multiple of the KV cache block size ({block_size})",
                pat.block,
            )
        reach = pat.sink + pat.key_span() + 1
        if reach >= max_model_len:
            raise AdaptiveConfigError(
                f"{CONFIG_KEY}.{kind}: the pattern ({pat.describe()}) reaches "
                f"{reach} tokens back, not less than max_model_len={max_model_len}, "
                f"so it would free nothing; shrink it or use kind 'full'"
            )


def check_kernels_for_device(cfg: AdaptiveConfig, device_type: str) -> None:
    """Reject kernel choices the device cannot run (start-up, not mid-serving)."""
    if cfg.kernels == "vllm_cpu" and device_type != "cpu":
        raise _err("kernels", "'vllm_cpu' only on the CPU platform", cfg.kernels)
    if cfg.kernels == "triton" and device_type != "cuda":
        raise _err("kernels", "'triton' only on CUDA", cfg.kernels)
    windowed = [k for k in cfg.sparse_kinds_used if cfg.patterns[k].window]
    if cfg.kernels == "vllm_cpu" and windowed:
        # vLLM's CPU kernel runs block-aligned patterns only (backend.py
        # checks the rest once the block size is known)
        raise _err(
            "kernels",
            f"'auto', 'torch' or 'triton' (vLLM's CPU ops cannot run the token "
            f"window of {windowed})",
            cfg.kernels,
        )


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
