"""The plugin's configuration error: every message names the key
(``adaptive_attention.<key>``), what is allowed and what was given."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CONFIG_KEY = "adaptive_attention"


class AdaptiveConfigError(ValueError):
    """A bad ``adaptive_attention`` value. Always names the offending key."""


def config_error(key: str, allowed: str, got: Any) -> AdaptiveConfigError:
    return AdaptiveConfigError(f"{CONFIG_KEY}.{key}: expected {allowed}, got {got!r}")


def merged_sub_dict(key: str, defaults: dict[str, Any], value: Any) -> dict[str, Any]:
    """A sub-dict of ``adaptive_attention`` (a layer kind's or a KV format's):
    ``value``, which may hold only ``defaults``' keys, merged over them."""
    keys = list(defaults)
    if not isinstance(value, Mapping):
        raise config_error(key, f"a dict with keys {keys}", value)
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise AdaptiveConfigError(f"{CONFIG_KEY}.{key}: unknown key(s) {unknown}; allowed keys are {keys}")
    return {**defaults, **value}
