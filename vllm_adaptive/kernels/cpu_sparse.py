"""Block-aligned sparse layers on vLLM's own CPU attention kernel.

vLLM's CPU kernel (``cpu_attention_with_kv_cache``, AVX-512/AMX, ISA-packed
cache) is many times faster on CPU than anything torch offers, but it only
does causal attention over a request's block table. When readability changes
only at cache-block boundaries (``SparsePattern.block_aligned``: sinks and
pattern blocks made of whole cache blocks, no token window), the queries of
one pattern block ``g`` all read the same whole cache blocks: the sink blocks,
the vertical-stride blocks before the local span, and the local span up to
the last query. So each (request, pattern block) becomes one *pseudo request*
whose block table lists exactly those blocks in position order; its queries
are the last tokens of the pseudo sequence, and the kernel's causal mask is
then exactly the pattern. Blocks outside the pattern are never in a pseudo
block table, so a freed block is never read.

Every key is read from the cache, so these groups keep a real block for every
token of the step (``SparsePatternSpec.in_step_free = False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_adaptive.kernels.batch import requests
from vllm_adaptive.kernels.torch_sparse import needed_blocks
from vllm_adaptive.sparse_pattern import SparsePattern


@dataclass
class PseudoBatch:
    query_start_loc: torch.Tensor  # [P + 1] int32, rows of the step's queries
    seq_lens: torch.Tensor  # [P] int32, pseudo sequence lengths
    block_table: torch.Tensor  # [P, width] int32, physical blocks


def plan_pseudo_requests(
    pattern: SparsePattern,
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] (CPU)
    seq_lens: torch.Tensor,  # [num_reqs] (CPU)
    block_size: int,
) -> PseudoBatch:
    if not pattern.block_aligned(block_size):
        raise ValueError(
            f"pattern ({pattern.describe()}) is not aligned to cache block size "
            f"{block_size}: it cannot run on vLLM's CPU kernel"
        )
    g_size = pattern.block
    starts: list[int] = []
    pseudo_lens: list[int] = []
    rows: list[list[int]] = []
    for r, q0, _, ctx, seq_len in requests(query_start_loc, seq_lens):
        table = block_table[r]
        lo = ctx
        while lo < seq_len:
            hi = min(seq_len, (lo // g_size + 1) * g_size)
            # every key up to the last query is in the cache (written first)
            blocks = needed_blocks(pattern, block_size, lo, hi, hi)
            starts.append(q0 + lo - ctx)
            pseudo_lens.append((len(blocks) - 1) * block_size + (hi - 1) % block_size + 1)
            rows.append(table[blocks].tolist())
            lo = hi
    width = max((len(b) for b in rows), default=1)
    bt = torch.zeros(len(rows), width, dtype=torch.int32)
    for i, b in enumerate(rows):
        bt[i, : len(b)] = torch.tensor(b, dtype=torch.int32)
    return PseudoBatch(
        query_start_loc=torch.tensor(starts + [int(query_start_loc[-1])], dtype=torch.int32),
        seq_lens=torch.tensor(pseudo_lens, dtype=torch.int32),
        block_table=bt,
    )
