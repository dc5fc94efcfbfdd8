"""``h2o``: Heavy-Hitter Oracle (Zhang et al. 2023): a block's score is the
attention mass it received, accumulated over steps.

Fast kernels never expose their probabilities, so the worker recomputes
them for the observation queries only: the decode row, or the last
``OBS_ROWS`` query rows of a prefill chunk (SnapKV's observation window);
the mass is summed over heads, those queries and the release layers."""

from __future__ import annotations

import torch

from vllm_adaptive.importance.rules import Reduce
from vllm_adaptive.importance.scorers.base import Observation, Scorer, gqa_logits


class H2OScorer(Scorer):
    name = "h2o"
    across_layers = Reduce.SUM
    across_steps = Reduce.SUM
    needs = frozenset({"query", "keys"})

    def score(self, obs: Observation):
        probs = torch.softmax(gqa_logits(obs.query, obs.keys, obs.scale), dim=-1)  # [H, Q, L]
        mass = probs.sum(dim=(0, 1))  # [L]
        n = len(obs.block_index)
        pad = n * obs.block_size - mass.shape[0]
        mass = torch.nn.functional.pad(mass, (0, pad)).reshape(n, obs.block_size).sum(-1)
        return obs.block_index, mass
