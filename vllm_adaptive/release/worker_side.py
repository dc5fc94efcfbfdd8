"""The connector's worker half (every TP/PP rank): runs the scheduler's
copies, hands each step's true block tables to the release layers, and
collects the importance they report.

``bind`` runs in vLLM's ``bind_connector_metadata``, which the model runner
calls inside the step's forward context, after it built the attention
metadata and before the forward pass (in every mode; ``start_load_kv`` would
come *after* the forward launch unless a step has a synchronous load). So
``bind`` can give every release group's step plan its tables explicitly
(``ReleaseStep.bind``); a release runner whose step got none refuses to run.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from vllm_adaptive.release.host_tier import HostPages
from vllm_adaptive.release.importance import WorkerImportance
from vllm_adaptive.release.kind import ReleaseParams
from vllm_adaptive.release.messages import AdoreMeta, AdoreWorkerMeta
from vllm_adaptive.release.runner import ReleaseStep


class ReleaseWorker:
    def __init__(self, params: ReleaseParams, vllm_config, groups: dict[int, list[str]]) -> None:
        self.groups = groups  # release KV-cache group -> its layer names
        self.importance = WorkerImportance(params, vllm_config.parallel_config.tensor_parallel_size)
        self.host = HostPages(params.host_tokens)
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.copies = {"out": 0, "in": 0}
        # running digest of every decision this rank applied (tests compare
        # it across TP/PP ranks: they must execute the same releases)
        self.decisions = hashlib.sha256()
        self.tables_applied = 0

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = kv_caches

    def bind(self, meta: AdoreMeta, attn_metadata: Any) -> None:
        for req in meta.finished:
            self.importance.forget(req)
        self.decisions.update(meta.digest_bytes())
        self.tables_applied += len(meta.tables)
        for g, layers in self.groups.items():
            out, into = meta.copies_out.get(g, ()), meta.copies_in.get(g, ())
            for layer in layers:
                if layer not in self.kv_caches:  # another pipeline stage's layer
                    continue
                cache = self.kv_caches[layer]
                if out:
                    self.host.copy_out(layer, cache, list(out))
                if into:
                    self.host.copy_in(layer, cache, list(into))
            self.copies["out"] += len(out)
            self.copies["in"] += len(into)
        self._bind_steps(meta, attn_metadata)

    def _bind_steps(self, meta: AdoreMeta, attn_metadata: Any) -> None:
        """Each release group's step plan gets the step's tables and sinks."""
        if attn_metadata is None:  # a step without a forward pass
            return
        if not isinstance(attn_metadata, dict):
            raise NotImplementedError("release layers: micro-batched attention metadata")
        for layers in self.groups.values():
            for layer in layers:
                md = attn_metadata.get(layer)
                if md is not None and isinstance(md.step, ReleaseStep):
                    md.step.bind(meta, self.importance, self.host.minmax)

    def worker_meta(self) -> AdoreWorkerMeta:
        scores, bounds = self.importance.take()
        # sent even when empty: the scheduler replaces last step's bounds
        return AdoreWorkerMeta(scores, bounds, self.importance.scorer.across_layers)

    def decision_digest(self) -> dict[str, Any]:
        """What this rank applied: a digest of every step's decisions, and counts."""
        return {"digest": self.decisions.hexdigest(), "tables": self.tables_applied, **self.copies}
