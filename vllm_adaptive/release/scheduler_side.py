"""The connector's scheduler half (EngineCore process): binds the release
groups' managers to one shared :class:`ScoreStore`, sends each step's
decisions down (:class:`AdoreMeta`) and merges what the workers sent up."""

from __future__ import annotations

from typing import Any

from vllm_adaptive.importance.scorers import SCORERS
from vllm_adaptive.release.kind import ReleaseParams
from vllm_adaptive.release.manager import ReleaseManager
from vllm_adaptive.release.messages import AdoreMeta, AdoreWorkerMeta
from vllm_adaptive.release.scores import ScoreStore
from vllm_adaptive.release.stats import StatsFile, release_stats


class ReleaseScheduler:
    def __init__(self, params: ReleaseParams) -> None:
        self.across_steps = SCORERS[params.scorer].across_steps
        self.store = ScoreStore()
        self.managers: dict[int, ReleaseManager] = {}  # KV-cache group -> manager
        self.stats_file = StatsFile()

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        for g, mgr in enumerate(kv_cache_manager.coordinator.single_type_managers):
            if isinstance(mgr, ReleaseManager):
                mgr.store = self.store
                self.managers[g] = mgr

    def build_meta(self, scheduler_output) -> AdoreMeta:
        meta = AdoreMeta()
        for g, mgr in self.managers.items():
            meta.copies_out[g], meta.copies_in[g] = mgr.take_copies()
            for req in scheduler_output.num_scheduled_tokens:
                first = mgr.first_block_id(req)
                if first is None:
                    continue
                meta.req_of[first] = req
                if (table := mgr.table_of(req)) is not None:
                    meta.tables[first] = table
                if host := mgr.host_blocks_of(req):
                    meta.host_of[first] = host
        meta.finished = set(scheduler_output.finished_req_ids) | set(
            scheduler_output.preempted_req_ids or ()
        )
        self.stats_file.write(self.stats())
        return meta

    def update(self, worker_meta: AdoreWorkerMeta | None) -> None:
        if worker_meta is not None:
            self.store.update(worker_meta.scores, self.across_steps, bounds=worker_meta.bounds)

    def stats(self) -> dict[str, Any]:
        return release_stats(self.managers)
