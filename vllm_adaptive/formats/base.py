"""``KVFormat``: how a layer's KV page stores its tokens.

A format owns everything about its pages that does not depend on kernels,
the way a layer kind (``layer_kind.py``) owns its pattern:

* its parameters: the ``adaptive_attention.<key>`` sub-dict (``key``,
  ``defaults``), parsed and validated by ``parse`` (errors name the key),
  described by ``describe``;
* the checks that need the engine's block size and length (``check_engine``);
* the KV-cache spec's page size and any blocks a request holds beyond its
  tokens (``kv_spec``);
* the views of vLLM's per-layer cache tensor that its runners read
  (``views``).

``config.py``, ``plan.py`` and ``startup.py`` ask these through the
``FORMATS`` table and know no format by name; runners are registered per
format (``runners/__init__.py``). A new format is one file here, a row in
``FORMATS``, and runners for it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vllm_adaptive.errors import merged_sub_dict


class KVFormat:
    #: The value users write in ``adaptive_attention.kv_format``.
    name: ClassVar[str]
    #: Its parameters' sub-dict in ``adaptive_attention`` (None: no parameters).
    key: ClassVar[str | None] = None
    #: That sub-dict's keys and defaults.
    defaults: ClassVar[dict[str, Any]] = {}

    def parse(self, value: Any) -> Any:
        """Validate the merged sub-dict; the format's parameters (None without)."""
        return None

    def describe(self, params: Any) -> str:
        return ""

    def check_engine(self, params: Any, block_size: int, max_model_len: int) -> None:
        """Checks that need the engine's final block size and length."""

    def kv_spec(self, spec, params: Any):
        """The layer's KV-cache spec with this format's page size."""
        return spec

    def views(self, kv_cache: torch.Tensor, geometry) -> Any:
        """The views of a layer's cache tensor its runners read; nothing copied.
        ``geometry`` is the runner's ``runner.Geometry`` (block size, head
        size, dtype, this format's parameters)."""
        raise NotImplementedError

    # -------------------------------------------------------------- helpers
    def _merged(self, value: Any) -> dict[str, Any]:
        """``value`` (a dict of this format's keys only) merged over the defaults."""
        return merged_sub_dict(self.key, self.defaults, value)
