"""Scorers, one small file each (like kvpress's presses); ``SCORERS`` is the
table. Each implements ``Scorer.score(obs) -> (block indices, scores)``,
higher = keep (``base.py``)."""

from __future__ import annotations

from vllm_adaptive.importance.scorers.base import Observation, Scorer
from vllm_adaptive.importance.scorers.gru import GRUScorer
from vllm_adaptive.importance.scorers.h2o import H2OScorer
from vllm_adaptive.importance.scorers.quest import QuestScorer
from vllm_adaptive.importance.scorers.recent import RecentScorer

SCORERS: dict[str, type[Scorer]] = {
    s.name: s for s in (GRUScorer, H2OScorer, RecentScorer, QuestScorer)
}


def make_scorer(name: str, controller: str | None = None) -> Scorer:
    cls = SCORERS[name]
    return cls(controller) if cls is GRUScorer else cls()


__all__ = ["Observation", "SCORERS", "Scorer", "make_scorer"]
