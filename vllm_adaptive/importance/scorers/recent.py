"""``recent``: StreamingLLM (Xiao et al. 2023): keep the sink and the newest
blocks. The score is the block index, so the scheduler needs nothing from
the workers."""

from __future__ import annotations


from vllm_adaptive.importance.scorers.base import Observation, Scorer


class RecentScorer(Scorer):
    name = "recent"
    scheduler_side = True

    def score(self, obs: Observation):
        idx = obs.block_index
        return idx, idx.float()

    @staticmethod
    def block_score(i: int) -> float:
        return float(i)
