"""Worker side of importance: what a step's release layers report upward.

The release runner (``release/runner.py``) calls
:meth:`WorkerImportance.observe` once per layer and step with what the
layer's attention saw. Per request (rows keyed by the connector's
``req_of``) it

* runs the scorer (``importance/scorers``) and merges its block scores over
  the step's layers with the scorer's ``across_layers`` rule
  (``importance/rules.py``);
* when the request has blocks in the host tier and rebuild is on, computes
  the Quest bound of the step's last query for its held blocks (key min/max
  of the gathered keys) and its host blocks (min/max kept at copy-out),
  maximum over heads and layers.

The observation queries are the step's last rows of each request (the
decode row, or the last ``OBS_ROWS`` of a prefill chunk); keys are gathered
only when a scorer or the bound reads them. ``take`` hands the step's
numbers to the connector's worker half and starts the next step afresh.
"""

from __future__ import annotations

import torch

from vllm.distributed import tensor_model_parallel_all_gather

from vllm_adaptive.importance.rules import Reduce, merge_into
from vllm_adaptive.importance.scorers import Observation, make_scorer
from vllm_adaptive.importance.scorers.quest import bound, key_minmax

#: Query rows of a prefill chunk that observe (SnapKV's observation window).
OBS_ROWS = 16


class WorkerImportance:
    def __init__(self, params, tensor_parallel_size: int = 1) -> None:
        self.params = params
        self.scorer = make_scorer(params.scorer, params.controller)
        self.rebuild = params.rebuild > 0
        self.scores: dict[str, dict[int, float]] = {}
        self.bounds: dict[str, dict[int, float]] = {}
        self.tp = tensor_parallel_size

    def forget(self, req_id: str) -> None:
        self.scorer.forget(req_id)

    def take(self):
        scores, bounds = self.scores, self.bounds
        self.scores, self.bounds = {}, {}
        return scores, bounds

    def _values(self, value: torch.Tensor) -> torch.Tensor:
        v = value.reshape(value.shape[0], -1)
        if self.tp > 1:  # the controller reads every KV head: gather the shards
            v = tensor_model_parallel_all_gather(v.contiguous(), dim=-1)
        return v

    def observe(self, layer_name: str, layer_idx: int, step, query, value, key_cache,
                scale: float, host_minmax) -> None:
        scorer = self.scorer
        runs_scorer = not scorer.scheduler_side and (scorer.layer is None or scorer.layer == layer_idx)
        if not runs_scorer and not self.rebuild:
            return
        bs = step.block_size
        for row in step.rows:
            if row.req_id is None:
                continue
            want_bound = self.rebuild and bool(row.host)
            if not runs_scorer and not want_bound:
                continue
            obs = Observation(row.req_id, layer_idx, bs, scale,
                              positions=torch.arange(row.context_len, row.seq_len))
            needs = scorer.needs if runs_scorer else frozenset()
            if "values" in needs:
                obs.values = self._values(value[row.q0:row.q1])
            if "keys" in needs or want_bound:
                obs.keys = step.gather_keys(key_cache, row)
                obs.block_index = row.live
                obs.query = query[max(row.q0, row.q1 - OBS_ROWS):row.q1]
            if runs_scorer:
                idx, s = scorer.score(obs)
                merge_into(self.scores, {row.req_id: dict(zip(idx.tolist(), s.tolist()))},
                           scorer.across_layers)
            if want_bound:
                q = obs.query[-1]
                kmin, kmax = key_minmax(obs.keys, bs)
                held = bound(q, kmin, kmax, scale)
                hidx = [i for i, _ in row.host]
                hmin, hmax = host_minmax(layer_name, [s for _, s in row.host])
                host = bound(q, hmin, hmax, scale)
                b = dict(zip(row.live.tolist(), held.tolist()))
                b.update(zip(hidx, host.tolist()))
                merge_into(self.bounds, {row.req_id: b}, Reduce.MAX)
