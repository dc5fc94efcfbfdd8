"""The requests of a step, in the length conventions of
``vllm_adaptive/metadata.py`` (context_len + query_len = seq_len)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch


class Request(NamedTuple):
    index: int  # r: row of block_table and seq_lens
    q0: int  # query rows q0 .. q1 - 1
    q1: int
    context_len: int  # tokens cached before this step
    seq_len: int  # tokens after this step

    @property
    def query_len(self) -> int:
        return self.q1 - self.q0


def requests(query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> Iterator[Request]:
    """Every request with at least one query row (one host sync for the batch)."""
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for r, seq_len in enumerate(lens):
        q0, q1 = qsl[r], qsl[r + 1]
        if q1 > q0:
            yield Request(r, q0, q1, seq_len - (q1 - q0), seq_len)
