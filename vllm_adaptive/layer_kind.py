"""``LayerKind``: one attention pattern a decoder layer can have.

A kind owns everything about its pattern that does not depend on kernels: its
name, its keys in ``adaptive_attention`` and their defaults, how its sub-dict
is parsed and validated (errors name the key), the checks that need the
engine's block size and length, and the KV-cache spec its layers get. Which
kernels run it is a runner's business (``vllm_adaptive/runners``), found by
the kind's ``family``: kinds of one family share runners (``sink_window`` and
``strided`` are both ``sparse``: two parameter sets of one
:class:`~vllm_adaptive.sparse_pattern.SparsePattern` predicate).
"""

from __future__ import annotations

from typing import Any, ClassVar

from vllm_adaptive.errors import config_error, merged_sub_dict
from vllm_adaptive.sparse_pattern import SparsePattern


class LayerKind:
    #: The value users write in ``layer_kinds`` / ``default_kind``.
    name: ClassVar[str]
    #: Runners are registered per family (``runners/__init__.py``).
    family: ClassVar[str]
    #: This kind's keys in its ``adaptive_attention.<name>`` sub-dict and their
    #: defaults; empty for kinds without parameters.
    defaults: ClassVar[dict[str, int]] = {}
    #: Whether its layers free KV blocks (their KV-cache groups then refuse
    #: prefix caching, speculative decoding and KV connectors at start-up).
    frees_blocks: ClassVar[bool] = False

    def parse(self, value: Any) -> SparsePattern | None:
        """Validate the merged sub-dict; the pattern, or None (full)."""
        return None

    def check_engine(self, pattern: SparsePattern | None, block_size: int, max_model_len: int) -> None:
        """Checks that need the engine's final block size and length."""

    def kv_spec(self, spec, pattern: SparsePattern | None, *, chunk_tokens: int, in_step_free: bool):
        """The KV-cache spec of a layer of this kind, from vLLM's own spec."""
        return spec

    #: The KV connector this kind installs (its ``kv_connector`` name), if any;
    #: block-freeing kinds refuse every other connector.
    kv_connector: ClassVar[str | None] = None

    def prepare_engine(self, cfg: Any, vllm_config: Any, logger: Any) -> None:
        """Engine settings this kind needs, set (or refused, naming the key) in
        the user's process at start-up, before the platform fixes the rest."""

    # -------------------------------------------------------------- helpers
    def _merged(self, value: Any) -> dict[str, Any]:
        """``value`` (a dict of this kind's keys only) merged over the defaults."""
        return merged_sub_dict(self.name, self.defaults, value)

    def _int_keys(self, value: Any, minimums: dict[str, int], keys: Any = None) -> dict[str, Any]:
        """``value`` merged over the defaults, every key (of ``keys``, default
        all) an int >= its minimum."""
        merged = self._merged(value)
        for k in keys or self.defaults:
            v, minimum = merged[k], minimums.get(k, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise config_error(f"{self.name}.{k}", f"an int >= {minimum}", v)
        return merged
