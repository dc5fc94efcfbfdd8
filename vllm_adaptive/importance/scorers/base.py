"""The scorer interface: ``score(obs) -> one number per block, higher = keep``.

A scorer sees one :class:`Observation` per (request, release layer, step):
what that layer's attention saw of the request. It returns a score per
block of the observation (``obs.block_index``: logical block indices), and
says how scores combine

* ``across_layers``: over the release layers (and tensor-parallel ranks,
  which hold different heads) of one step: ``Reduce.MAX`` or ``Reduce.SUM``;
* ``across_steps``: with the block's earlier score, in the scheduler's
  ``ScoreStore``: ``Reduce.MAX``, ``SUM`` (accumulate) or ``LAST`` (replace)

(``importance/rules.py``: one ``combine()`` serves both sides).

``needs`` names the observation fields it reads, so the worker gathers keys
only for scorers that read them. A scorer whose score depends on the block
index alone (``scheduler_side``) is asked by the scheduler's manager
directly and never runs in the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_adaptive.importance.rules import Reduce


@dataclass
class Observation:
    req_id: str
    layer_idx: int
    block_size: int
    scale: float
    positions: torch.Tensor  # [T] positions of this step's tokens
    values: torch.Tensor | None = None  # [T, num_kv_heads * head_size] this step's values
    query: torch.Tensor | None = None  # [Q, num_heads, head_size] observation queries (the step's last rows)
    keys: torch.Tensor | None = None  # [num_kv_heads, L, head_size] keys of the held blocks, in order
    block_index: torch.Tensor | None = None  # [n] logical index of each held block (L = tokens in them)


class Scorer:
    name: ClassVar[str]
    across_layers: ClassVar[Reduce] = Reduce.MAX
    across_steps: ClassVar[Reduce] = Reduce.LAST
    needs: ClassVar[frozenset[str]] = frozenset()
    scheduler_side: ClassVar[bool] = False
    #: For worker scorers that score this step's tokens (the controller): the
    #: one layer they run in; None = every release layer.
    layer: int | None = None

    def score(self, obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
        """(logical block indices [n], scores [n]); higher = keep."""
        raise NotImplementedError

    def forget(self, req_id: str) -> None:
        """Drop per-request state (finished, aborted or preempted)."""


def per_block_max(values: torch.Tensor, positions: torch.Tensor, block_size: int):
    """Token scores -> (block indices, max score per block)."""
    blk = torch.div(positions, block_size, rounding_mode="floor")
    idx, inv = torch.unique(blk, return_inverse=True)
    out = torch.full((len(idx),), float("-inf"))
    out = out.scatter_reduce(0, inv, values.float(), reduce="amax")
    return idx, out


def gqa_logits(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """query [Q, H, D], keys [Hkv, L, D] -> logits [H, Q, L] (fp32)."""
    h, hkv = query.shape[1], keys.shape[0]
    k = keys.float().repeat_interleave(h // hkv, dim=0)
    return torch.einsum("qhd,hld->hql", query.float(), k) * scale
