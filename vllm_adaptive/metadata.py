"""``AdaptiveMetadata``: what one step looks like to one KV-cache group.

Lengths, per request r (the same everywhere in the plugin; the references in
``reference.py`` use them too)::

    |<------------------- seq_len ------------------->|
    |<------- context_len ------->|<--- query_len --->|
     tokens already in the cache    tokens of this step

    query_len   = query_start_loc[r + 1] - query_start_loc[r]
    seq_len     = seq_lens[r]            (tokens in the request after this step)
    context_len = seq_len - query_len    (tokens cached before this step)

    query token i of r sits at position context_len + i; block_table[r, j]
    holds positions j * block_size .. (j + 1) * block_size - 1.

A sparse group's cache holds only what its pattern keeps: block-table entries
of freed blocks point at the null block, and ``in_step_free`` runners take
the step's own keys (positions >= context_len) from the fresh K/V rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm.v1.attention.backend import CommonAttentionMetadata


class StepPlan:
    """Base of the per-step plans runners make in ``Runner.plan`` and put into
    ``AdaptiveMetadata.step`` (one per KV-cache group and step)."""


@dataclass
class AdaptiveMetadata:
    num_actual_tokens: int  # tokens in this step, padding excluded
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, device
    seq_lens: torch.Tensor  # [num_reqs] int32, device
    query_start_loc_cpu: torch.Tensor  # [num_reqs + 1] int32, host copy for planning
    block_table: torch.Tensor  # [num_reqs, max_blocks_per_req] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = padding
    # [num_reqs] int32 host copy, only for runners with host_lengths
    seq_lens_cpu: torch.Tensor | None = None
    # vLLM's CommonAttentionMetadata of the step (for vLLM's own helpers,
    # e.g. split_decodes_and_prefills)
    common: "CommonAttentionMetadata | None" = None
    # The group's runner's per-step plan (``Runner.plan``), made once per
    # step in the builder and read by every layer of the group.
    step: StepPlan | None = None
