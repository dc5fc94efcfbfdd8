"""Launcher-side validation for the block-sparse (LongGen) kernels.

Adds to ``checks.check_paged_attention`` what the sparse launchers need on top
of the dense ones: this step's fresh ``key``/``value`` rows, one dtype for
query, fresh keys and cache, a power-of-two page size and a
:class:`~vllm_adaptive.sparse_pattern.SparsePattern`. Shapes and dtypes only: no
device synchronisation.
"""

from __future__ import annotations

import torch

from vllm_adaptive.kernels.checks import check_paged_attention
from vllm_adaptive.sparse_pattern import SparsePattern


def check_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    pattern: SparsePattern,
    out: torch.Tensor | None,
) -> None:
    """Raise ``ValueError`` naming the first bad argument."""
    check_paged_attention(
        query, key_cache, value_cache, block_table, query_start_loc, seq_lens, out
    )
    if not isinstance(pattern, SparsePattern):
        raise ValueError(f"pattern: expected a SparsePattern, got {type(pattern).__name__}")
    want = (query.shape[0], key_cache.shape[1], key_cache.shape[3])
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(
                f"{name}: expected a tensor [num_tokens, num_kv_heads, head_size], "
                f"got {type(t).__name__}"
            )
        if tuple(t.shape) != want:
            raise ValueError(
                f"{name}: expected shape {want} [num_tokens, num_kv_heads, head_size] "
                f"(like query and key_cache), got {tuple(t.shape)}"
            )
        if t.dtype != query.dtype:
            raise ValueError(f"{name}: expected dtype {query.dtype} (query's), got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected unit stride on head_size, got {t.stride()}")
        if t.device != query.device:
            raise ValueError(f"{name}: expected device {query.device} (query's), got {t.device}")
    if key_cache.dtype != query.dtype:
        raise ValueError(
            f"key_cache: expected dtype {query.dtype} (query's), got {key_cache.dtype}"
        )
    block_size = key_cache.shape[2]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(
            f"key_cache.shape[2] (block_size): expected a power of two >= 16, got {block_size}"
        )
