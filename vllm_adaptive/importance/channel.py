"""The channel between the workers and the scheduler: a KV connector.

Why a KV connector (``../shared/DESIGN.md`` section 3): vLLM's
``ModelRunnerOutput`` has no free field, but the connector's worker metadata
(``build_connector_worker_meta``) is gathered from every TP/PP rank, merged
with ``aggregate`` and handed to the scheduler-side connector
(``update_connector_output``) after every step; the scheduler's connector
reaches the KV managers (``bind_kv_cache_manager``), and its metadata
(``build_connector_meta``) reaches every worker before the next forward
pass. Nothing else is patched. The alternative, a fixed budget evicted
inside each worker, needs no channel but never returns memory to the shared
pool and lets TP ranks disagree.

Down (scheduler -> workers, :class:`AdoreMeta`, every step):

* ``copies_out`` / ``copies_in`` per release group: block -> host slot and
  host slot -> block. The worker runs them in ``bind_connector_metadata``,
  which the model runner calls before the forward pass in every mode (vLLM
  calls ``start_load_kv`` *after* the forward launch unless a step has a
  synchronous external load); copy-outs first, so a block released and
  reused in the same step is saved before it is overwritten.
* ``req_of``: first block id -> request id, for every scheduled request of
  every release group (block 0, a sink block, is never released; physical
  ids are unique across groups). The release runners key their rows by it.
* ``tables``: first block id -> the request's block ids, for requests whose
  table changed in place (released entries are the null block, rebuilt ones
  a new block); the worker's own block table is append-only and stale there.
* ``host_of``: first block id -> (block index, host slot) in the host tier,
  for the query-aware rebuild bound.
* ``finished``: requests finished or preempted (per-request scorer state dropped).

Up (workers -> scheduler, :class:`AdoreWorkerMeta`): this step's block
scores and rebuild bounds per request (``importance/worker.py``). Ranks
aggregate with the scorer's ``across_layers`` rule (ranks hold different
heads). The scheduler merges scores into the shared ``ScoreStore`` with the
scorer's ``across_steps`` rule; bounds replace the previous step's.

The connector is added by the backend's start-up check when a release layer
is configured (``kv_connector_module_path``, no registration needed); it
subclasses ``SupportsHMA`` or vLLM would switch the hybrid manager off and
nothing would be freed. It reports no external hits, sends nothing, and
never delays freeing a finished request's blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)

from vllm_adaptive.formats import split_kv_cache

CONNECTOR_NAME = "AdoreConnector"
#: Where the scheduler writes release statistics (JSON), when set.
STATS_ENV = "VLLM_ADAPTIVE_RELEASE_STATS"
MODULE_PATH = __name__

_CURRENT_WORKER: "AdoreConnector | None" = None


def current_worker() -> "AdoreConnector | None":
    """This process's worker-side connector, if the engine has one."""
    return _CURRENT_WORKER


@dataclass
class AdoreMeta(KVConnectorMetadata):
    copies_out: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    copies_in: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    req_of: dict[int, str] = field(default_factory=dict)
    tables: dict[int, list[int]] = field(default_factory=dict)
    host_of: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)


@dataclass
class AdoreWorkerMeta(KVConnectorWorkerMetadata):
    scores: dict[str, dict[int, float]] = field(default_factory=dict)
    bounds: dict[str, dict[int, float]] = field(default_factory=dict)
    across_layers: str = "max"

    def aggregate(self, other: "AdoreWorkerMeta") -> "AdoreWorkerMeta":
        merge(self.scores, other.scores, self.across_layers)
        merge(self.bounds, other.bounds, "max")
        return self


def merge(into: dict[str, dict[int, float]], new: dict[str, dict[int, float]], how: str) -> None:
    for req, per_block in new.items():
        mine = into.setdefault(req, {})
        for i, s in per_block.items():
            old = mine.get(i)
            mine[i] = s if old is None else (old + s if how == "sum" else max(old, s))


def release_params(vllm_config):
    from vllm_adaptive.plan import plan_for

    plans = [p for p in plan_for(vllm_config).layers if p.kind == "release"]
    return plans[0].pattern if plans else None


class AdoreConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        from vllm_adaptive.importance.scorers import SCORERS
        from vllm_adaptive.kv.specs import ReleaseBudgetSpec

        self.params = release_params(vllm_config)
        if self.params is None:
            raise ValueError(f"{CONNECTOR_NAME} serves ADAPTIVE release layers; the model has none")
        self.scorer_cls = SCORERS[self.params.scorer]
        self.groups: dict[int, list[str]] = {}
        if kv_cache_config is not None:
            for g, group in enumerate(kv_cache_config.kv_cache_groups):
                if isinstance(group.kv_cache_spec, ReleaseBudgetSpec):
                    self.groups[g] = list(group.layer_names)
        if role == KVConnectorRole.WORKER:
            from vllm_adaptive.importance.worker import WorkerImportance

            global _CURRENT_WORKER
            _CURRENT_WORKER = self
            self.importance = WorkerImportance(self.params, vllm_config)
            self.kv_caches: dict[str, torch.Tensor] = {}
            self.host: dict[str, torch.Tensor] = {}  # layer -> [host_blocks, *page]
            self.host_kmin: dict[str, torch.Tensor] = {}  # layer -> [host_blocks, Hkv, D]
            self.host_kmax: dict[str, torch.Tensor] = {}
            self.copies = {"out": 0, "in": 0}
            # running digest of every decision this rank applied (tests compare
            # it across TP/PP ranks: they must execute the same releases)
            self.decisions = hashlib.sha256()
            self.tables_applied = 0
        else:
            from vllm_adaptive.kv.release import ScoreStore

            self.store = ScoreStore()
            self.managers: dict[int, Any] = {}
            self._last_stats: dict | None = None

    # ================================================================ scheduler
    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        from vllm_adaptive.kv.release import ReleaseManager

        for g, mgr in enumerate(kv_cache_manager.coordinator.single_type_managers):
            if isinstance(mgr, ReleaseManager):
                mgr.store = self.store
                self.managers[g] = mgr

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output) -> AdoreMeta:
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
        self._report()
        return meta

    def _report(self) -> None:
        """Release statistics to ``$VLLM_ADAPTIVE_RELEASE_STATS`` (a JSON file,
        rewritten when they change; benchmarks and tests read it)."""
        path = os.environ.get(STATS_ENV)
        if not path:
            return
        stats = self.release_stats()
        if stats != self._last_stats:
            self._last_stats = stats
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(stats, f)
            os.replace(tmp, path)

    def update_connector_output(self, connector_output) -> None:
        wm = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(wm, AdoreWorkerMeta):
            self.store.update(wm.scores, self.scorer_cls.across_steps, bounds=wm.bounds)

    def request_finished(self, request, block_ids):
        return False, None

    def request_finished_all_groups(self, request, block_ids):
        return False, None

    def release_stats(self) -> dict[str, Any]:
        out = {}
        for g, mgr in self.managers.items():
            st = asdict(mgr.stats)
            st["rebuilt_requests"] = len(st.pop("per_request_rebuilt"))
            st["budget_blocks"] = mgr.spec.budget_blocks
            st["chunk_blocks"] = -(-mgr.spec.chunk_tokens // mgr.spec.block_size)
            out[str(g)] = st
        return out

    def shutdown(self) -> None:
        if self.role == KVConnectorRole.SCHEDULER and self.managers:
            from vllm.logger import init_logger

            init_logger("vllm.adaptive").info("ADAPTIVE release statistics: %s", self.release_stats())

    # ================================================================== worker
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = kv_caches

    def _host_of(self, layer: str) -> torch.Tensor:
        if layer not in self.host:
            cache = self.kv_caches[layer]
            n = self.params.host_tokens // cache.shape[2]
            pin = cache.is_cuda
            # untouched pages of a CPU tensor cost no memory until written
            self.host[layer] = torch.empty((n, *cache.shape[1:]), dtype=cache.dtype, pin_memory=pin)
            hkv, d = cache.shape[1], cache.shape[3] // 2
            self.host_kmin[layer] = torch.zeros((n, hkv, d), dtype=torch.float32)
            self.host_kmax[layer] = torch.zeros((n, hkv, d), dtype=torch.float32)
        return self.host[layer]

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        meta = connector_metadata
        assert isinstance(meta, AdoreMeta)
        for req in meta.finished:
            self.importance.forget(req)
        self.decisions.update(repr((sorted(meta.copies_out.items()), sorted(meta.copies_in.items()),
                                    sorted(meta.req_of.items()), sorted(meta.tables.items()),
                                    sorted(meta.host_of.items()))).encode())
        self.tables_applied += len(meta.tables)
        for g, layers in self.groups.items():
            out, into = meta.copies_out.get(g, ()), meta.copies_in.get(g, ())
            if not out and not into:
                continue
            for layer in layers:
                cache, host = self.kv_caches[layer], self._host_of(layer)
                if out:
                    blocks = torch.tensor([b for b, _ in out], device=cache.device)
                    slots = torch.tensor([s for _, s in out])
                    pages = cache.index_select(0, blocks)
                    host[slots] = pages.to(host.device, non_blocking=False)
                    keys = split_kv_cache(pages)[0].float()  # the model_dtype page layout
                    self.host_kmin[layer][slots] = keys.amin(2).cpu()
                    self.host_kmax[layer][slots] = keys.amax(2).cpu()
                if into:
                    slots = torch.tensor([s for s, _ in into])
                    blocks = torch.tensor([b for _, b in into], device=cache.device)
                    cache[blocks] = host[slots].to(cache.device)
            self.copies["out"] += len(out)
            self.copies["in"] += len(into)

    def decision_digest(self) -> dict[str, Any]:
        """What this rank applied: a digest of every step's decisions, and counts."""
        return {"digest": self.decisions.hexdigest(), "tables": self.tables_applied, **self.copies}

    def host_minmax(self, layer: str, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor(slots)
        return self.host_kmin[layer][idx], self.host_kmax[layer][idx]

    def current_meta(self) -> AdoreMeta | None:
        return self._connector_metadata if isinstance(self._connector_metadata, AdoreMeta) else None

    def start_load_kv(self, forward_context, **kwargs) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def build_connector_worker_meta(self) -> AdoreWorkerMeta | None:
        scores, bounds = self.importance.take()
        # sent even when empty: the scheduler replaces last step's bounds
        return AdoreWorkerMeta(scores, bounds, self.scorer_cls.across_layers)
