"""``AdoreConnector``: the KV connector that is the channel between the
workers and the scheduler for ADORE release layers.

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

vLLM builds this one class once per role. As vLLM's own connectors do, it
only routes: the scheduler half is :class:`~.scheduler_side.ReleaseScheduler`,
the worker half :class:`~.worker_side.ReleaseWorker`; what they exchange is
``messages.py``.

The connector is added by the start-up check when a release layer is
configured (``kv_connector_module_path``, no registration needed); it
subclasses ``SupportsHMA`` or vLLM would switch the hybrid manager off and
nothing would be freed. It reports no external hits, sends nothing, and
never delays freeing a finished request's blocks.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.logger import init_logger

from vllm_adaptive.plan import plan_for
from vllm_adaptive.release.kind import CONNECTOR_MODULE, CONNECTOR_NAME, ReleaseParams
from vllm_adaptive.release.messages import AdoreMeta, AdoreWorkerMeta
from vllm_adaptive.release.scheduler_side import ReleaseScheduler
from vllm_adaptive.release.spec import ReleaseBudgetSpec
from vllm_adaptive.release.worker_side import ReleaseWorker

MODULE_PATH = __name__
# start-up names this module by a constant, so the kind need not import it
assert MODULE_PATH == CONNECTOR_MODULE, (MODULE_PATH, CONNECTOR_MODULE)


def release_params(vllm_config) -> ReleaseParams | None:
    plans = [p for p in plan_for(vllm_config).layers if p.kind == "release"]
    return plans[0].params if plans else None


class AdoreConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        params = release_params(vllm_config)
        if params is None:
            raise ValueError(f"{CONNECTOR_NAME} serves ADAPTIVE release layers; the model has none")
        groups: dict[int, list[str]] = {}
        if kv_cache_config is not None:
            for g, group in enumerate(kv_cache_config.kv_cache_groups):
                if isinstance(group.kv_cache_spec, ReleaseBudgetSpec):
                    groups[g] = list(group.layer_names)
        self.scheduler: ReleaseScheduler | None = None
        self.worker: ReleaseWorker | None = None
        if role == KVConnectorRole.WORKER:
            self.worker = ReleaseWorker(params, vllm_config, groups)
        else:
            self.scheduler = ReleaseScheduler(params)

    # ================================================================ scheduler
    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.scheduler.bind_kv_cache_manager(kv_cache_manager)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output) -> AdoreMeta:
        return self.scheduler.build_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        wm = getattr(connector_output, "kv_connector_worker_meta", None)
        self.scheduler.update(wm if isinstance(wm, AdoreWorkerMeta) else None)

    def request_finished(self, request, block_ids):
        return False, None

    def request_finished_all_groups(self, request, block_ids):
        return False, None

    def release_stats(self) -> dict[str, Any]:
        return self.scheduler.stats()

    def shutdown(self) -> None:
        if self.scheduler is not None and self.scheduler.managers:
            init_logger("vllm.adaptive").info("ADAPTIVE release statistics: %s", self.scheduler.stats())

    # ================================================================== worker
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if not isinstance(connector_metadata, AdoreMeta):
            raise TypeError(f"{CONNECTOR_NAME}: expected AdoreMeta, got {type(connector_metadata).__name__}")
        attn = get_forward_context().attn_metadata if is_forward_context_available() else None
        self.worker.bind(connector_metadata, attn)

    def decision_digest(self) -> dict[str, Any]:
        return self.worker.decision_digest()

    def start_load_kv(self, forward_context, **kwargs) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def build_connector_worker_meta(self) -> AdoreWorkerMeta | None:
        return self.worker.worker_meta()
