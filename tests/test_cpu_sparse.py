"""Block-aligned sparse layers through vLLM's own CPU attention kernel
(compacted pseudo requests, kernels/cpu_sparse.py) against the dense masked
reference. Blocks the pattern does not need hold NaN in the packed cache."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_adaptive import reference as ref
from vllm_adaptive.kernels.cpu_sparse import plan_pseudo_requests
from vllm_adaptive.pattern import SparsePattern

ops = pytest.importorskip("vllm._custom_ops")


def run_vllm_cpu(q, kc, vc, pb, scale, dtype, bs):
    from vllm import envs
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, bs, q.shape[2], "auto")
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=pb.seq_lens.shape[0], num_heads=q.shape[1], num_kv_heads=kc.shape[1],
        head_dim=q.shape[2], seq_lens=pb.seq_lens, dtype=dtype,
        query_start_loc=pb.query_start_loc, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype="auto",
    )
    out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=kc, value_cache=vc, output=out,
        query_start_loc=pb.query_start_loc, seq_lens=pb.seq_lens, scale=scale, causal=True,
        alibi_slopes=None, sliding_window=-1, block_table=pb.block_table, softcap=0,
        scheduler_metadata=sched, s_aux=None, dynamic_causal=None, k_scale=1.0, v_scale=1.0,
        kv_cache_dtype="auto",
    )
    return out, isa


@pytest.mark.parametrize("pat", [
    SparsePattern(sink=32, block=32, local_blocks=2, vert_stride=3),
    SparsePattern(block=64, local_blocks=1, vert_stride=2),
    SparsePattern(sink=64, block=32, local_blocks=3),
], ids=lambda p: p.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pseudo_requests_match_reference(pat, dtype):
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    bs, hq, hk, d = 32, 9, 3, 64
    seq_lens, query_lens = [1, 40, 300, 517, 700], [1, 40, 1, 130, 64]
    g = torch.Generator().manual_seed(0)
    pages = [math.ceil(s / bs) for s in seq_lens]
    nb = sum(pages) + 2
    ids = torch.randperm(nb - 1, generator=g) + 1
    bt = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
    used = 0
    for r, p in enumerate(pages):
        bt[r, :p] = ids[used:used + p].int()
        used += p
    qsl = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(query_lens).cumsum(0)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    isa = _get_attn_isa(dtype, bs, d, "auto")
    kc = torch.zeros(nb, hk, bs, d, dtype=dtype)
    vc = torch.zeros(nb, hk, bs, d, dtype=dtype)
    plain_k, plain_v = torch.zeros_like(kc), torch.zeros_like(vc)
    # every position of every request goes through vLLM's packed cache writer
    total = sum(seq_lens)
    k_all = torch.randn(total, hk, d, generator=g).to(dtype)
    v_all = torch.randn(total, hk, d, generator=g).to(dtype)
    slots = torch.tensor([int(bt[r, p // bs]) * bs + p % bs
                          for r, s in enumerate(seq_lens) for p in range(s)])
    ops.cpu_attn_reshape_and_cache(k_all, v_all, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    ref.write_kv_cache_ref(k_all, v_all, plain_k, plain_v, slots)
    # this step's keys: the last query_len positions of each request
    offs = torch.tensor([0] + seq_lens).cumsum(0)
    step = torch.cat([torch.arange(offs[r + 1] - ql, offs[r + 1]) for r, ql in enumerate(query_lens)])
    q = torch.randn(int(qsl[-1]), hq, d, generator=g).to(dtype)
    pb = plan_pseudo_requests(pat, bt, qsl, sl, bs)
    for r, s in enumerate(seq_lens):  # poison every block no query of the step needs
        ctx = s - query_lens[r]
        for b in range(pages[r]):
            if not pat.block_needed(b, bs, ctx, s):
                kc[bt[r, b]] = float("nan")
                vc[bt[r, b]] = float("nan")
    got, _ = run_vllm_cpu(q, kc, vc, pb, 0.125, dtype, bs)
    want = ref.sparse_attention_ref(q, k_all[step], v_all[step], plain_k, plain_v, bt, qsl, sl,
                                    0.125, pat)
    assert torch.isfinite(got).all()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=0)


def test_rejects_unaligned_pattern():
    with pytest.raises(ValueError, match="not aligned to cache block size 32"):
        plan_pseudo_requests(SparsePattern(sink=16, window=64), torch.zeros(1, 4, dtype=torch.int32),
                             torch.tensor([0, 1]), torch.tensor([1]), 32)
