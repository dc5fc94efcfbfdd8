"""What crosses the process boundary every step (both sides import this).

Down, scheduler -> every worker (:class:`AdoreMeta`, the connector's
metadata, built before the step):

* ``copies_out`` / ``copies_in`` per release group: (block -> host slot) and
  (host slot -> block); the worker runs them before the forward pass,
  copy-outs first.
* ``req_of``: first block id -> request id, for every scheduled request of
  every release group (block 0, a sink block, is never released; physical
  ids are unique across groups). Release runners key their rows by it.
* ``tables``: first block id -> the request's block ids, for requests whose
  table changed in place (released entries are the null block, rebuilt ones
  a new block); the worker's own block table is append-only and stale there.
* ``host_of``: first block id -> (block index, host slot) in the host tier,
  for the query-aware rebuild bound.
* ``finished``: requests finished or preempted (per-request scorer state dropped).

Up, every worker -> scheduler (:class:`AdoreWorkerMeta`, after the step):
this step's block scores and rebuild bounds per request. vLLM gathers one
per TP/PP rank and folds them with ``aggregate``: scores with the scorer's
``across_layers`` rule (ranks hold different heads), bounds with ``MAX``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from vllm_adaptive.importance.rules import Reduce, ScoreMap, merge_into

Moves = list[tuple[int, int]]


@dataclass
class AdoreMeta(KVConnectorMetadata):
    copies_out: dict[int, Moves] = field(default_factory=dict)
    copies_in: dict[int, Moves] = field(default_factory=dict)
    req_of: dict[int, str] = field(default_factory=dict)
    tables: dict[int, list[int]] = field(default_factory=dict)
    host_of: dict[int, Moves] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)

    def digest_bytes(self) -> bytes:
        """The decisions in a canonical order (ranks compare digests of them)."""
        return repr((sorted(self.copies_out.items()), sorted(self.copies_in.items()),
                     sorted(self.req_of.items()), sorted(self.tables.items()),
                     sorted(self.host_of.items()))).encode()


@dataclass
class AdoreWorkerMeta(KVConnectorWorkerMetadata):
    scores: ScoreMap = field(default_factory=dict)
    bounds: ScoreMap = field(default_factory=dict)
    across_layers: Reduce = Reduce.MAX

    def aggregate(self, other: "AdoreWorkerMeta") -> "AdoreWorkerMeta":
        merge_into(self.scores, other.scores, self.across_layers)
        merge_into(self.bounds, other.bounds, Reduce.MAX)
        return self
