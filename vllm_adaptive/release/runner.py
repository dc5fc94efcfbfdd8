"""ADORE release layers on the torch path (any device; worker side).

A release layer attends to every block its request still holds. The
scheduler's manager (``release/manager.py``) releases blocks in place, which
vLLM's worker block table (append-only) does not see, so the step's true
table comes from the connector's metadata (``release/messages.py``:
``tables``, keyed by the request's first block), which the worker half of
the connector binds to the step plan (``ReleaseStep.bind``) before the
forward pass. A step plan without it refuses to run: vLLM's own table would
be stale. The step plan compacts each
request's table to the blocks it holds: released blocks are never gathered,
so nothing a kernel reads can come from a block another request now owns.
Since only whole blocks before the recent window are released, the held
tokens, in order, are a contiguous sequence whose end is the step's queries:
ordinary causal paged attention (``kernels/torch_paged.py``) runs on the
compacted table with compacted lengths (rotary positions are already in the
cached keys).

After attending, the layer reports to the worker's importance state
(``release/importance.py``, bound with the tables): scorer observations and
rebuild bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_adaptive.kernels import torch_paged
from vllm_adaptive.kernels.batch import requests
from vllm_adaptive.kv.specs import NULL_BLOCK_ID
from vllm_adaptive.metadata import StepPlan
from vllm_adaptive.runner import Runner
from vllm_adaptive.sparse_pattern import cdiv


@dataclass
class Row:
    index: int
    q0: int
    q1: int
    context_len: int
    seq_len: int
    req_id: str | None
    ids: list[int]  # held physical blocks, in order
    live: torch.Tensor  # [n] logical index of each held block
    host: list[tuple[int, int]] = field(default_factory=list)  # (index, host slot)


class ReleaseStep(StepPlan):
    """The step's compacted tables. The builder makes it from vLLM's metadata;
    the connector's worker half binds the step's true tables to it
    (``bind``) before the forward pass."""

    def __init__(self, md, block_size: int) -> None:
        self.md = md
        self.block_size = block_size
        self.rows: list[Row] | None = None
        self.table: torch.Tensor | None = None
        self.seq_lens: torch.Tensor | None = None
        self.importance: Any = None  # release/importance.WorkerImportance
        self.host_minmax: Callable | None = None  # release/host_tier.HostPages.minmax

    def bind(self, meta, importance=None, host_minmax: Callable | None = None) -> None:
        """Compact the tables with the connector's ``AdoreMeta`` of this step
        (once per step: the layers of a group share the plan)."""
        if self.rows is not None:
            return
        self.importance, self.host_minmax = importance, host_minmax
        md, bs = self.md, self.block_size
        bt = md.block_table
        first_col = bt[:, 0].tolist()
        rows: list[Row] = []
        for r, q0, q1, ctx, seq_len in requests(md.query_start_loc_cpu, md.seq_lens_cpu):
            n = cdiv(seq_len, bs)
            first = first_col[r]
            table = meta.tables.get(first)
            ids = list(table[:n]) if table is not None else bt[r, :n].tolist()
            if len(ids) < n:
                raise RuntimeError(f"release layer: request row {r} has {len(ids)} blocks for {seq_len} tokens")
            live = [j for j, b in enumerate(ids) if b != NULL_BLOCK_ID]
            if live and live[-1] != n - 1:
                raise RuntimeError(f"release layer: request row {r}'s last block was released")
            rows.append(Row(
                r, q0, q1, ctx, seq_len,
                req_id=meta.req_of.get(first),
                ids=[ids[j] for j in live], live=torch.tensor(live, dtype=torch.long),
                host=list(meta.host_of.get(first, ())),
            ))
        width = max((len(x.ids) for x in rows), default=1)
        table = torch.zeros((bt.shape[0], max(width, 1)), dtype=bt.dtype)
        seq_lens = md.seq_lens_cpu.clone()
        for x in rows:
            table[x.index, :len(x.ids)] = torch.tensor(x.ids, dtype=bt.dtype)
            seq_lens[x.index] = x.seq_len - (cdiv(x.seq_len, bs) - len(x.ids)) * bs
        self.rows = rows
        self.table = table.to(bt.device)
        self.seq_lens = seq_lens.to(md.seq_lens.device)

    def gather_keys(self, key_cache: torch.Tensor, row: Row) -> torch.Tensor:
        """[num_kv_heads, held tokens, head_size] keys of the row's held blocks."""
        length = int(self.seq_lens[row.index])
        blocks = torch.tensor(row.ids, device=key_cache.device)
        pages = key_cache.index_select(0, blocks)  # [n, Hkv, bs, D]
        return pages.transpose(0, 1).reshape(pages.shape[1], -1, pages.shape[3])[:, :length]


class ReleaseTorch(Runner):
    family, kv_format, path = "release", "model_dtype", "torch"
    devices = ("cpu", "cuda")
    host_lengths = True
    layer_name: str = ""
    layer_idx: int = -1

    def plan(self, md):
        return ReleaseStep(md, self.geometry.block_size)

    def write(self, key, value, kv_cache, slot_mapping, md) -> None:
        torch_paged.write_kv_cache(
            key, value, *self.format.views(kv_cache, self.geometry), slot_mapping,
            min_slot=self.geometry.null_slot_end,
        )

    def attend(self, query, key, value, kv_cache, md, scale, out) -> None:
        step: ReleaseStep = md.step
        if step.rows is None:
            raise RuntimeError(
                f"release layer {self.layer_name or self.layer_idx}: this step's block tables were "
                "never bound (release layers need the AdoreConnector, which the start-up adds; "
                "vLLM's own block table is stale once a block is released)"
            )
        key_cache, value_cache = self.format.views(kv_cache, self.geometry)
        torch_paged.paged_attention(
            query, key_cache, value_cache, step.table, md.query_start_loc, step.seq_lens,
            scale, out=out,
        )
        if step.importance is not None:
            step.importance.observe(self.layer_name, self.layer_idx, step, query, value,
                                    key_cache, scale, step.host_minmax)
