"""``ScoreStore`` (scheduler side): the scores and rebuild bounds per
(request, logical block) that the release managers of one engine read.

The scheduler-side connector (``release/scheduler_side.py``) fills it after
every step from what the workers reported: scores combine with the block's
earlier score by the scorer's ``across_steps`` rule (``importance/rules.py``),
bounds replace the previous step's (they are the latest queries' view).
"""

from __future__ import annotations

from vllm_adaptive.importance.rules import Reduce, ScoreMap, merge_into


class ScoreStore:
    def __init__(self) -> None:
        self.scores: ScoreMap = {}
        self.bounds: ScoreMap = {}

    def score(self, req: str, i: int) -> float | None:
        return self.scores.get(req, {}).get(i)

    def bound(self, req: str, i: int) -> float | None:
        return self.bounds.get(req, {}).get(i)

    def update(self, scores: ScoreMap, across_steps: Reduce, bounds: ScoreMap | None = None) -> None:
        """Merge one step's worker scores with ``across_steps``; replace the bounds."""
        merge_into(self.scores, scores, across_steps)
        if bounds is not None:
            self.bounds = {req: dict(per_block) for req, per_block in bounds.items()}

    def drop(self, req: str) -> None:
        self.scores.pop(req, None)
        self.bounds.pop(req, None)
