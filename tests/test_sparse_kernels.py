"""Block-sparse (LongGen) Triton kernels against the dense masked reference.

Triton runs under TRITON_INTERPRET=1 here (no GPU), so shapes stay small and
the grids are covered by a rotation of (GQA, block size, dtype) over the
patterns instead of their full product. Every case is built adversarially
(``make_sparse_case``): K/V caches are strided views of one page tensor,
``key``/``value`` are strided views of a fused projection, pages are shuffled,
and every cache slot at a position >= context_len (the kernels must take those
keys from ``key``/``value``) and every unused table entry hold NaN.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from vllm_adaptive import reference as ref
from vllm_adaptive.kernels.sparse_decode import sparse_decode
from vllm_adaptive.kernels.sparse_prefill import sparse_prefill
from vllm_adaptive.sparse_pattern import SparsePattern

from paged_cases import paged_case
from conftest import on_device

# On a GPU host the Triton launchers run compiled on CUDA copies (conftest.on_device)
sparse_decode = on_device(sparse_decode)
sparse_prefill = on_device(sparse_prefill)

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
SCALE = 0.2
NAN = float("nan")

PATTERNS = {
    # sink_window: sink inside the first page / one token into the second
    "sw-4-40": SparsePattern(sink=4, window=40),
    "sw-17-20": SparsePattern(sink=17, window=20),
    # strided: pattern blocks equal to / smaller than / larger than a page
    "st-16x2/3": SparsePattern(block=16, local_blocks=2, vert_stride=3),
    "st-s8-8x3/5": SparsePattern(sink=8, block=8, local_blocks=3, vert_stride=5),
    "st-64x1/2": SparsePattern(block=64, local_blocks=1, vert_stride=2),
}
# (seq_lens, query_lens)
MIXED = ([1, 17, 129, 300], [1, 17, 129, 23])  # 1-token prompt, whole prompts, chunk
CHUNKS = ([300, 129, 17], [40, 1, 9])  # chunks behind a context, one decode
DECODE = ([1, 17, 129, 300], [1, 1, 1, 1])
GQA = [(9, 3), (8, 2), (5, 1)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The references run thousands of tiny torch ops, which intra-op threads
    only slow down (several times over on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rotate(
    patterns: list[str], shift: int = 0
) -> list[tuple[str, tuple[int, int], int, torch.dtype]]:
    """(pattern, heads, block_size, dtype) with the last three cycling; five
    patterns reach every GQA ratio, block size and dtype."""
    return [
        (name, GQA[i % 3], (16, 32)[i % 2], DTYPES[(i // 2) % 2])
        for i, name in enumerate(patterns, start=shift)
    ]


def case_id(v: object) -> str:
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v).replace("torch.", "")


def make_sparse_case(seq_lens, query_lens, num_heads, num_kv_heads, block_size,
                     dtype=torch.float32, head_size=32, seed=0) -> dict[str, torch.Tensor]:
    """Launcher kwargs (query .. seq_lens); cache slots of this step's
    positions hold NaN (those keys exist only in ``key``/``value``)."""
    return paged_case(seq_lens, query_lens, num_heads, num_kv_heads, head_size, block_size,
                      dtype, seed=seed, nan_step_slots=True).kwargs()


def assert_matches_ref(got: torch.Tensor, case: dict, pattern: SparsePattern) -> None:
    want = ref.sparse_attention_ref(**case, scale=SCALE, pattern=pattern)
    assert got.dtype == case["query"].dtype
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[got.dtype], rtol=0)


# ---------------------------------------------------------------- reference


PREFILL_CASES = [("mixed", *c) for c in rotate(list(PATTERNS))] + [
    ("chunks", *c) for c in rotate(list(PATTERNS), shift=1)
]


@pytest.mark.parametrize("grid,name,heads,block_size,dtype", PREFILL_CASES, ids=case_id)
def test_prefill_matches_reference(triton_interpret, grid, name, heads, block_size, dtype):
    lens = MIXED if grid == "mixed" else CHUNKS
    case = make_sparse_case(*lens, *heads, block_size, dtype)
    out = sparse_prefill(**case, scale=SCALE, pattern=PATTERNS[name])
    assert_matches_ref(out, case, PATTERNS[name])


@pytest.mark.parametrize("name,heads,block_size,dtype", rotate(list(PATTERNS)), ids=case_id)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_matches_reference(triton_interpret, name, heads, block_size, dtype, num_splits):
    case = make_sparse_case(*DECODE, *heads, block_size, dtype, seed=num_splits)
    pattern = PATTERNS[name]
    assert_matches_ref(sparse_decode(**case, scale=SCALE, pattern=pattern, num_splits=num_splits),
                       case, pattern)
    if num_splits == 1:  # the prefill kernel serves decode rows of mixed batches
        assert_matches_ref(sparse_prefill(**case, scale=SCALE, pattern=pattern), case, pattern)


def test_empty_requests_and_padding_rows_untouched(triton_interpret):
    """A request with query_len 0 (nothing scheduled) and a padding row past
    query_start_loc[-1] (vLLM pads num_tokens) get no output."""
    case = make_sparse_case([40, 33, 70], [1, 1, 0], 4, 2, 16)
    for name in ("query", "key", "value"):
        case[name] = torch.cat([case[name], torch.randn_like(case[name][:1])])
    pattern = PATTERNS["sw-4-40"]
    want = ref.sparse_attention_ref(**case, scale=SCALE, pattern=pattern)
    for kernel, kwargs in ((sparse_decode, {"num_splits": 2}), (sparse_prefill, {})):
        out = torch.full_like(case["query"], 7.0)
        kernel(**case, scale=SCALE, pattern=pattern, out=out, **kwargs)
        torch.testing.assert_close(out[:2], want[:2], atol=TOL[torch.float32], rtol=0)
        assert (out[2] == 7.0).all()


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("heads,block_size", [((9, 3), 16), ((5, 1), 32)], ids=case_id)
def test_full_window_is_dense_causal(triton_interpret, heads, block_size):
    """window >= seq_len, sink 0: exactly causal attention over the cache
    once this step's keys are written into it."""
    lens = ([1, 17, 129, 300], [1, 9, 20, 2])
    case = make_sparse_case(*lens, *heads, block_size)
    pattern = SparsePattern(window=max(lens[0]))
    got = sparse_prefill(**case, scale=SCALE, pattern=pattern)
    decode_case = make_sparse_case(*DECODE, *heads, block_size, seed=1)
    got_decode = sparse_decode(**decode_case, scale=SCALE, pattern=pattern, num_splits=4)
    for c, out in ((case, got), (decode_case, got_decode)):
        bt, qsl, sl = c["block_table"], c["query_start_loc"], c["seq_lens"]
        slots = [
            int(bt[r, pos // block_size]) * block_size + pos % block_size
            for r in range(sl.shape[0])
            for pos in range(int(sl[r]) - int(qsl[r + 1] - qsl[r]), int(sl[r]))
        ]
        ref.write_kv_cache_ref(c["key"], c["value"], c["key_cache"], c["value_cache"],
                               torch.tensor(slots))
        want = ref.paged_attention_ref(c["query"], c["key_cache"], c["value_cache"], bt, qsl,
                                       sl, SCALE)
        torch.testing.assert_close(out, want, atol=TOL[torch.float32], rtol=0)


def poison_freed_blocks(case: dict, pattern: SparsePattern) -> int:
    """NaN in every cache page no query of the step needs; returns their count."""
    bs = case["key_cache"].shape[2]
    qsl, table = case["query_start_loc"], case["block_table"]
    freed = 0
    for r, seq_len in enumerate(case["seq_lens"].tolist()):
        ctx = seq_len - int(qsl[r + 1] - qsl[r])
        for b in range(math.ceil(ctx / bs)):
            if not pattern.block_needed(b, bs, ctx, seq_len):
                case["key_cache"][int(table[r, b])] = NAN
                case["value_cache"][int(table[r, b])] = NAN
                freed += 1
    return freed




@pytest.mark.parametrize(
    "name,block_size",
    [("sw-17-20", 16), ("st-16x2/3", 32), ("st-s8-8x3/5", 16), ("st-64x1/2", 16)],
    ids=case_id,
)
@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_freed_blocks_never_read(triton_interpret, kind, name, block_size):
    """block_size consecutive lengths put the first query of a tile at every
    offset within a page, so each edge of the visited page range (lowest
    window / local key, sink, vertical blocks) falls on a page boundary
    somewhere: a range a page short misses keys (reference mismatch), a page
    long reads a freed page (NaN)."""
    pattern = PATTERNS[name]
    seq_lens = list(range(97, 97 + block_size))
    if kind == "prefill":
        run = sparse_prefill
        query_lens = [1 + i % 5 for i in range(block_size)]
    else:
        run = functools.partial(sparse_decode, num_splits=1)
        query_lens = [1] * block_size
    case = make_sparse_case(seq_lens, query_lens, 2, 1, block_size)
    clean = run(**case, scale=SCALE, pattern=pattern)
    assert poison_freed_blocks(case, pattern) > 0
    got = run(**case, scale=SCALE, pattern=pattern)
    torch.testing.assert_close(got, clean, atol=0, rtol=0)
    assert_matches_ref(got, case, pattern)


# ---------------------------------------------------------------- launchers


BAD_INPUTS = [
    (lambda a: a.update(pattern={"window": 8}), "pattern"),
    (lambda a: a.update(key=a["key"][:, :1]), "key"),
    (lambda a: a.update(value=a["value"].double()), "value"),
    (lambda a: a.update(query=a["query"][:, :5]), "num_heads"),
    (lambda a: a.update(key_cache=a["key_cache"][:, :, :8], value_cache=a["value_cache"][:, :, :8]),
     "block_size"),
    (lambda a: a.update(block_table=a["block_table"].float()), "block_table"),
]


@pytest.mark.parametrize("mutate,needle", BAD_INPUTS, ids=[n for _, n in BAD_INPUTS])
@pytest.mark.parametrize("fn", [sparse_prefill, sparse_decode])
def test_launchers_reject_bad_input(fn, mutate, needle):
    args = make_sparse_case([17, 5], [1, 1], 6, 2, 16)
    args.update(scale=SCALE, pattern=PATTERNS["sw-4-40"])
    mutate(args)
    with pytest.raises(ValueError, match=needle):
        fn(**args)


def test_decode_rejects_bad_num_splits():
    args = make_sparse_case([17], [1], 2, 1, 16)
    with pytest.raises(ValueError, match="num_splits"):
        sparse_decode(**args, scale=SCALE, pattern=PATTERNS["sw-4-40"], num_splits=3)
