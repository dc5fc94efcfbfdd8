"""``strided``: LongGen's block-sparse variant (the pattern of vLLM's former
``blocksparse`` backend): the last ``local_blocks`` blocks of ``block`` tokens,
every ``vert_stride``-th block before them (0: none), and the first ``sink``
tokens. The default is aligned to cache blocks of up to 128 tokens (vLLM's CPU
default), so that on CPU these layers run on vLLM's own attention kernel.
"""

from __future__ import annotations

from typing import Any

from vllm_adaptive.errors import config_error
from vllm_adaptive.sparse_pattern import SparsePattern
from vllm_adaptive.kinds.sparse import SparseKind


class StridedKind(SparseKind):
    name = "strided"
    defaults = {"sink": 128, "block": 128, "local_blocks": 4, "vert_stride": 8}

    def parse(self, value: Any) -> SparsePattern:
        v = self._int_keys(value, {"block": 1, "local_blocks": 1})
        if v["vert_stride"] == 1:  # every block: that is full attention
            raise config_error("strided.vert_stride", "0 (off) or an int >= 2", 1)
        return SparsePattern(**v)

    def check_engine(self, pattern: SparsePattern, block_size: int, max_model_len: int) -> None:
        if pattern.block % block_size:
            raise config_error(
                "strided.block", f"a multiple of the KV cache block size ({block_size})",
                pattern.block,
            )
        super().check_engine(pattern, block_size, max_model_len)
