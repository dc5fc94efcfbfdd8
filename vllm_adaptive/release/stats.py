"""Release statistics (scheduler side): what each release group's manager
counted, and the JSON file that benchmarks and tests read
(``$VLLM_ADAPTIVE_RELEASE_STATS``, rewritten when the figures change)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

#: Where the scheduler writes release statistics (JSON), when set.
STATS_ENV = "VLLM_ADAPTIVE_RELEASE_STATS"


@dataclass
class ReleaseStats:
    released: int = 0  # blocks released (to the host tier or dropped)
    dropped: int = 0  # released with no free host slot: gone for good
    rebuilt: int = 0  # blocks brought back from the host tier
    rebuild_steps: int = 0  # (request, step) pairs in which a rebuild fired
    host_peak: int = 0  # most host slots in use at once
    peak_after_release: int = 0  # most blocks one request held right after a removal
    peak_held: int = 0  # most blocks one request held at any time (budget + one step)
    per_request_rebuilt: dict[str, int] = field(default_factory=dict)


def release_stats(managers: dict) -> dict[str, Any]:
    """Per release group (key: group index as a string): the manager's counts,
    its budget and the blocks of one prefill chunk."""
    out = {}
    for g, mgr in managers.items():
        st = asdict(mgr.stats)
        st["rebuilt_requests"] = len(st.pop("per_request_rebuilt"))
        st["budget_blocks"] = mgr.spec.budget_blocks
        st["chunk_blocks"] = -(-mgr.spec.chunk_tokens // mgr.spec.block_size)
        out[str(g)] = st
    return out


class StatsFile:
    """Writes the statistics to ``$VLLM_ADAPTIVE_RELEASE_STATS`` when they change."""

    def __init__(self) -> None:
        self.path = os.environ.get(STATS_ENV)
        self._last: dict | None = None

    def write(self, stats: dict[str, Any]) -> None:
        if not self.path or stats == self._last:
            return
        self._last = stats
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, self.path)
