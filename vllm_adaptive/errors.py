"""The plugin's configuration error: every message names the key
(``adaptive_attention.<key>``), what is allowed and what was given."""

from __future__ import annotations

from typing import Any

CONFIG_KEY = "adaptive_attention"


class AdaptiveConfigError(ValueError):
    """A bad ``adaptive_attention`` value. Always names the offending key."""


def config_error(key: str, allowed: str, got: Any) -> AdaptiveConfigError:
    return AdaptiveConfigError(f"{CONFIG_KEY}.{key}: expected {allowed}, got {got!r}")
