"""One builder of random paged-attention cases, shared by every kernel and
runner test.

A case is requests of given ``seq_lens`` / ``query_lens`` (conventions of
``vllm_adaptive/metadata.py``) over a page tensor in vLLM's layout
(``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, split into strided
K/V views). It is adversarial by construction:

- page 0 is the null block and holds NaN; every block-table entry a request
  does not own points at it (``free`` / ``in_step_free`` also point there the
  blocks a sparse KV manager may have freed or never allocated);
- each request owns distinct pages in shuffled order (``high_blocks``: the
  top of a large cache, to catch 32-bit offsets);
- this step's ``query``/``key``/``value`` rows are strided views of one fused
  projection, as vLLM hands them over; ``nan_step_slots`` puts NaN in the
  cache slots of this step's positions (kernels that must take those keys
  from ``key``/``value`` never read them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_adaptive.formats import split_kv_cache
from vllm_adaptive.sparse_pattern import SparsePattern

NAN = float("nan")
NULL_PAGE = 0


@dataclass
class PagedCase:
    query: torch.Tensor  # [num_tokens, num_heads, head_size]
    key: torch.Tensor  # [num_tokens, num_kv_heads, head_size] this step's keys
    value: torch.Tensor
    kv_pages: torch.Tensor  # [num_blocks, num_kv_heads, block_size, 2 * head_size]
    key_cache: torch.Tensor  # views of kv_pages
    value_cache: torch.Tensor
    block_table: torch.Tensor  # [num_reqs, width] int32
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32

    @property
    def block_size(self) -> int:
        return self.key_cache.shape[2]

    def dense(self) -> tuple:
        """(query, key_cache, value_cache, block_table, query_start_loc, seq_lens)."""
        return (self.query, self.key_cache, self.value_cache, self.block_table,
                self.query_start_loc, self.seq_lens)

    def sparse(self) -> tuple:
        """(query, key, value, key_cache, value_cache, block_table, query_start_loc, seq_lens)."""
        return (self.query, self.key, self.value, self.key_cache, self.value_cache,
                self.block_table, self.query_start_loc, self.seq_lens)

    def kwargs(self) -> dict:
        return dict(zip(("query", "key", "value", "key_cache", "value_cache", "block_table",
                         "query_start_loc", "seq_lens"), self.sparse()))

    def requests(self):
        """(r, context_len, seq_len, first query row) per request."""
        qsl, sl = self.query_start_loc.tolist(), self.seq_lens.tolist()
        for r, s in enumerate(sl):
            yield r, s - (qsl[r + 1] - qsl[r]), s, qsl[r]

    def slot(self, r: int, pos: int) -> int:
        bs = self.block_size
        return int(self.block_table[r, pos // bs]) * bs + pos % bs

    def step_slots(self) -> torch.Tensor:
        """Cache slot of every row of this step (the null block's for freed blocks)."""
        return torch.tensor([self.slot(r, p) for r, ctx, s, _ in self.requests()
                             for p in range(ctx, s)], dtype=torch.int64)

    def store_step(self) -> None:
        """Write this step's K/V into the cache (dense kernels read it there)."""
        from vllm_adaptive import reference as ref

        ref.write_kv_cache_ref(self.key, self.value, self.key_cache, self.value_cache,
                               self.step_slots())


def paged_case(
    seq_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    num_blocks: int | None = None,
    high_blocks: bool = False,
    nan_step_slots: bool = False,
    pattern: SparsePattern | None = None,
    free: bool = False,
    in_step_free: bool = False,
) -> PagedCase:
    g = torch.Generator().manual_seed(seed)
    pages = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = num_blocks or sum(pages) + 3
    kv_pages = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_size, generator=g).to(dtype)
    key_cache, value_cache = split_kv_cache(kv_pages)
    kv_pages[NULL_PAGE] = NAN
    ids = torch.randperm(num_blocks - 1, generator=g) + 1
    if high_blocks:
        ids = torch.arange(num_blocks - 1, 0, -1)
    table = torch.full((len(seq_lens), max(pages) + 2), NULL_PAGE, dtype=torch.int32)
    qsl = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(query_lens).cumsum(0)
    used = 0
    for r, (s, ql) in enumerate(zip(seq_lens, query_lens)):
        table[r, :pages[r]] = ids[used:used + pages[r]].int()
        used += pages[r]
        ctx = s - ql
        if nan_step_slots:
            for pos in range(ctx, s):
                blk = int(table[r, pos // block_size])
                key_cache[blk, :, pos % block_size] = NAN
                value_cache[blk, :, pos % block_size] = NAN
        for b in range(pages[r]):
            if free and b * block_size < ctx and not pattern.block_needed(b, block_size, ctx, s):
                table[r, b] = NULL_PAGE  # freed: no query of this step reads it
            elif in_step_free and b * block_size >= ctx and not pattern.block_live(b, block_size, s):
                table[r, b] = NULL_PAGE  # dead within the step: never allocated
    num_tokens = int(qsl[-1])
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_size, generator=g).to(dtype)
    return PagedCase(
        query=qkv[:, :num_heads],
        key=qkv[:, num_heads:num_heads + num_kv_heads],
        value=qkv[:, num_heads + num_kv_heads:],
        kv_pages=kv_pages, key_cache=key_cache, value_cache=value_cache,
        block_table=table, query_start_loc=qsl,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
    )
