"""Launcher-side input validation shared by the torch and Triton paths.

Each check raises ``ValueError`` naming the argument, what was expected and
what was given (FlashInfer's ``check_shape_dtype_device`` habit). These run
once per launch on shapes and dtypes only: no device synchronisation.
"""

from __future__ import annotations

import torch

INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(name: str, expected: str, got: object) -> ValueError:
    return ValueError(f"{name}: expected {expected}, got {got}")


def _check_rank(name: str, t: torch.Tensor, rank: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise _fail(name, f"a tensor {what}", type(t).__name__)
    if t.dim() != rank:
        raise _fail(name, f"{rank}-d {what}", f"shape {tuple(t.shape)}")


def _check_index(name: str, t: torch.Tensor, rank: int, what: str) -> None:
    _check_rank(name, t, rank, what)
    if t.dtype not in INDEX_DTYPES:
        raise _fail(name, "int32 or int64", t.dtype)


def _check_same_device(named: dict[str, torch.Tensor]) -> None:
    devices = {n: t.device for n, t in named.items() if t is not None}
    first = next(iter(devices.values()))
    for n, d in devices.items():
        if d != first:
            raise _fail(n, f"device {first} (like the other inputs)", d)


def check_caches(
    key_cache: torch.Tensor, value_cache: torch.Tensor, num_kv_heads: int | None
) -> None:
    what = "[num_blocks, num_kv_heads, block_size, head_size]"
    _check_rank("key_cache", key_cache, 4, what)
    _check_rank("value_cache", value_cache, 4, what)
    if key_cache.shape != value_cache.shape:
        raise _fail("value_cache", f"shape {tuple(key_cache.shape)}", tuple(value_cache.shape))
    if key_cache.dtype != value_cache.dtype:
        raise _fail("value_cache", f"dtype {key_cache.dtype}", value_cache.dtype)
    if num_kv_heads is not None and key_cache.shape[1] != num_kv_heads:
        raise _fail("key_cache.shape[1] (num_kv_heads)", num_kv_heads, key_cache.shape[1])
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise _fail("key_cache/value_cache", "unit stride on head_size", key_cache.stride())


def check_kv_cache_write(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    what = "[num_tokens, num_kv_heads, head_size]"
    _check_rank("key", key, 3, what)
    _check_rank("value", value, 3, what)
    check_caches(key_cache, value_cache, key.shape[1])
    _check_index("slot_mapping", slot_mapping, 1, "[num_tokens]")
    if key.shape != value.shape:
        raise _fail("value", f"shape {tuple(key.shape)}", tuple(value.shape))
    if key.shape[2] != key_cache.shape[3]:
        raise _fail("key.shape[2] (head_size)", key_cache.shape[3], key.shape[2])
    if slot_mapping.shape[0] > key.shape[0]:
        raise _fail(
            "slot_mapping", f"at most {key.shape[0]} entries (num_tokens)", slot_mapping.shape[0]
        )
    _check_same_device(
        dict(key=key, value=value, key_cache=key_cache, value_cache=value_cache,
             slot_mapping=slot_mapping)
    )


def check_paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor | None,
) -> None:
    _check_rank("query", query, 3, "[num_tokens, num_heads, head_size]")
    check_caches(key_cache, value_cache, None)
    num_heads, head_size = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[1]
    if head_size != key_cache.shape[3]:
        raise _fail("query.shape[2] (head_size)", f"{key_cache.shape[3]} as in key_cache", head_size)
    if num_heads % num_kv_heads:
        raise _fail("query.shape[1] (num_heads)", f"a multiple of num_kv_heads={num_kv_heads}", num_heads)
    _check_index("block_table", block_table, 2, "[num_reqs, max_blocks_per_req]")
    _check_index("query_start_loc", query_start_loc, 1, "[num_reqs + 1]")
    _check_index("seq_lens", seq_lens, 1, "[num_reqs]")
    num_reqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_reqs + 1:
        raise _fail("query_start_loc", f"{num_reqs + 1} entries (num_reqs + 1)", query_start_loc.shape[0])
    if block_table.shape[0] < num_reqs:
        raise _fail("block_table", f"at least {num_reqs} rows (num_reqs)", block_table.shape[0])
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise _fail("query", "float16, bfloat16 or float32", query.dtype)
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype):
        raise _fail("out", f"{tuple(query.shape)} {query.dtype}", f"{tuple(out.shape)} {out.dtype}")
    _check_same_device(
        dict(query=query, key_cache=key_cache, value_cache=value_cache,
             block_table=block_table, query_start_loc=query_start_loc,
             seq_lens=seq_lens, out=out)
    )
