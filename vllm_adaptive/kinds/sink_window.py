"""``sink_window``: the first ``sink`` tokens + the last ``window`` tokens.

``block`` > 1 makes the window block-granular, as in LongGen's block-sparse
kernels (arXiv 2410.01485): the queries of one ``block``-token block all read
the last ``window / block`` blocks, which on CPU runs on vLLM's own kernel.
``block`` = 1 is the token-exact window. The default is sized for an
8K-context model (SmolLM2): LongGen keeps a window of a few percent of the
context.
"""

from __future__ import annotations

from typing import Any

from vllm_adaptive.errors import config_error
from vllm_adaptive.sparse_pattern import SparsePattern
from vllm_adaptive.kinds.sparse import SparseKind


class SinkWindowKind(SparseKind):
    name = "sink_window"
    defaults = {"sink": 128, "window": 768, "block": 128}

    def parse(self, value: Any) -> SparsePattern:
        v = self._int_keys(value, {"window": 1, "block": 1})
        sink, window, block = v["sink"], v["window"], v["block"]
        if block == 1:
            return SparsePattern(sink=sink, window=window)
        if window % block:
            raise config_error(
                "sink_window.window",
                f"a multiple of sink_window.block ({block}; or block 1 for a token window)",
                window,
            )
        return SparsePattern(sink=sink, block=block, local_blocks=window // block)
