"""``full``: ordinary causal attention over every cached token of the request.

Its layers keep vLLM's own ``FullAttentionSpec`` and manager (prefix caching
included) and run on the ``dense`` runners.
"""

from __future__ import annotations

from vllm_adaptive.layer_kind import LayerKind


class FullKind(LayerKind):
    name = "full"
    family = "dense"
