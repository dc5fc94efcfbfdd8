"""How two scores of one block combine: the one set of reduction rules.

A block's score is reduced twice (``importance/scorers/base.py``):

* ``across_layers``: over the release layers of one step, and over the
  tensor-parallel ranks (they hold different heads), in the worker-side
  importance state and in the connector's ``aggregate``;
* ``across_steps``: with the block's earlier score, in the scheduler's
  :class:`~vllm_adaptive.release.scores.ScoreStore`.

Both sides call :meth:`Reduce.combine` (through :func:`merge_into`), so a
rule means the same thing everywhere and an unknown rule cannot silently
fall through to another one.
"""

from __future__ import annotations

import enum


class Reduce(enum.Enum):
    MAX = "max"  # keep the larger
    SUM = "sum"  # accumulate
    LAST = "last"  # the newer replaces the older

    def combine(self, old: float | None, new: float) -> float:
        if old is None or self is Reduce.LAST:
            return new
        if self is Reduce.MAX:
            return max(old, new)
        return old + new


ScoreMap = dict[str, dict[int, float]]  # request id -> {logical block index: score}


def merge_into(into: ScoreMap, new: ScoreMap, rule: Reduce) -> ScoreMap:
    """Combine ``new`` into ``into`` block by block with ``rule``; returns ``into``."""
    for req, per_block in new.items():
        mine = into.setdefault(req, {})
        for i, s in per_block.items():
            mine[i] = rule.combine(mine.get(i), s)
    return into
