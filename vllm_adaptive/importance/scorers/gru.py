"""``gru``: ADORE's controller (``importance/controller.py``). It runs in one
layer (the one it was trained on), over the step's value rows of each
request, carrying its GRU state across steps; a block's score is the
highest of its tokens' ``sigma_i``."""

from __future__ import annotations

import torch

from vllm_adaptive.importance.controller import load_controller
from vllm_adaptive.importance.rules import Reduce
from vllm_adaptive.importance.scorers.base import Observation, Scorer, per_block_max


class GRUScorer(Scorer):
    name = "gru"
    across_layers = Reduce.MAX
    across_steps = Reduce.MAX
    needs = frozenset({"values"})

    def __init__(self, controller_path: str | None = None) -> None:
        self.controller = load_controller(controller_path)
        self.layer = self.controller.layer
        self._state: dict[str, tuple[int, torch.Tensor]] = {}  # req -> (next position, GRU state)

    def score(self, obs: Observation):
        pos = obs.positions
        first = int(pos[0])
        nxt, h = self._state.get(obs.req_id, (0, None))
        if first == 0 or first != nxt:
            # a new request, or one recomputed from the start after preemption;
            # a gap (never expected: no prefix hits on release layers) restarts too
            h = None
        sigma, h = self.controller.step(obs.values, pos, h)
        self._state[obs.req_id] = (int(pos[-1]) + 1, h)
        return per_block_max(sigma, pos, obs.block_size)

    def forget(self, req_id: str) -> None:
        self._state.pop(req_id, None)
