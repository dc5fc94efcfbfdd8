"""``quest``: the query-aware bound of Quest (Tang et al., ICML 2024).

Per block and KV head the keys' per-channel minimum and maximum bound every
logit a query can give the block: ``sum_d max(q_d kmin_d, q_d kmax_d)``.
A block's score is that bound for the step's last query, the maximum over
heads and release layers, replaced every step. The same bound decides
rebuilds for every scorer (``importance/worker.py``): blocks in the host tier
keep their key minimum / maximum from the moment they were copied out."""

from __future__ import annotations

import torch

from vllm_adaptive.importance.rules import Reduce
from vllm_adaptive.importance.scorers.base import Observation, Scorer


def key_minmax(keys: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [Hkv, L, D] -> per-block (kmin, kmax) [n, Hkv, D]; a partial last
    block uses its tokens only."""
    hkv, length, d = keys.shape
    n = -(-length // block_size)
    pad = n * block_size - length
    k = keys.float()
    lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf")).reshape(hkv, n, block_size, d)
    hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf")).reshape(hkv, n, block_size, d)
    return lo.amin(2).transpose(0, 1), hi.amax(2).transpose(0, 1)


def bound(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, scale: float) -> torch.Tensor:
    """query [H, D] (one row), kmin/kmax [n, Hkv, D] -> [n]: the highest
    logit any key of the block can reach, over heads."""
    h, hkv = query.shape[0], kmin.shape[1]
    q = query.float()[None]  # [1, H, D]
    lo = kmin.repeat_interleave(h // hkv, dim=1)
    hi = kmax.repeat_interleave(h // hkv, dim=1)
    per_head = torch.maximum(q * lo, q * hi).sum(-1) * scale  # [n, H]
    return per_head.amax(-1)


class QuestScorer(Scorer):
    name = "quest"
    across_layers = Reduce.MAX
    across_steps = Reduce.LAST
    needs = frozenset({"query", "keys"})

    def score(self, obs: Observation):
        kmin, kmax = key_minmax(obs.keys, obs.block_size)
        return obs.block_index, bound(obs.query[-1], kmin, kmax, obs.scale)
