"""LongGen sparse layers inside a real vLLM engine on the embedded model.

* Plumbing: a pattern that covers every token of these prompts must give the
  same greedy tokens as full attention (float32), through the sparse spec,
  manager, cache writes and two-source attention.
* Freeing: a small pattern (sink 32 + window 96 tokens, far shorter than the
  long prompts) must give the same tokens however the work is cut: one
  whole-prompt step with 64-token blocks, and 64-token prefill chunks with
  32-token blocks in a KV pool so small that requests are preempted and
  recomputed. A kernel that read a freed block, or a token that was not
  stored but later read, changes the output.
* Kernels: block-aligned strided layers on vLLM's CPU kernel (pseudo
  requests) give the same tokens as on the plugin's torch path.
* Batching: the ``longgen`` preset itself (block 128, vLLM's CPU kernel) gives
  the same tokens when long prompts share engine steps as when each runs alone.
* Capacity: in the same KV bytes vLLM admits as many 4K-token requests as the
  pattern's block bound says, more than with full attention.

Exact comparisons, all in float32: where two configurations attend to the
same keys, they differ only in summation order (~1e-6 relative on a logit),
and a greedy token flips only where the top two logits are that close.
"""

from __future__ import annotations

import pytest

from conftest import run_engines
from engine_specs import FP32, FP32_TORCH_FULL

pytestmark = pytest.mark.engine

BS = 128  # FP32_TORCH_FULL's block size
# token-exact window (block 1): the torch path, with in-step freeing
SMALL = {"preset": "longgen", "kernels": "torch", "sink_window": {"sink": 32, "window": 96, "block": 1}}
# block-aligned for 32-token blocks: runs on vLLM's CPU kernel (pseudo requests)
STRIDED = {"preset": "longgen-strided",
           "strided": {"sink": 32, "block": 32, "local_blocks": 2, "vert_stride": 4}}
# every layer sparse: nothing beyond the pattern can reach the output
ALL_SPARSE = {**SMALL, "full_layers": []}
# covers every position of these prompts (longest prompt + output < 960)
COVER = {"preset": "longgen", "kernels": "torch", "sink_window": {"sink": 0, "window": 960, "block": 1}}

# Three prompts of ~1.2K-1.6K tokens: longer than longgen's sink + 6 blocks of
# 128 (its sparse layers drop keys from position 896 on), prefilled in
# chunks of 512 that share steps when batched.
_COLOURS = ["red", "blue", "green", "brown", "white", "black", "grey"]
LONG = [f"Inventory list {k}, written by clerk number {k}. "
        + " ".join(f"Item {i}: a {_COLOURS[(i + k) % 7]} box sits on shelf {(i * k) % 11}."
                   for i in range(70 + 15 * k))
        + " Question: which shelf holds item 3? Answer: item 3 is on shelf"
        for k in (1, 2, 3)]
LONGGEN_KV = 256 * 2**20
LONGGEN = dict(backend="ADAPTIVE", adaptive_attention="longgen", prompts=LONG, max_tokens=24,
               max_model_len=4096, block_size=BS, max_num_batched_tokens=512,
               kv_cache_memory_bytes=LONGGEN_KV, phases=[dict(prompts=LONG, sequential=True)])

SMALL_RUN = dict(FP32, backend="ADAPTIVE", adaptive_attention=SMALL, max_tokens=160)
# 56 blocks of 32 tokens (10 layers per group tensor, fp32 pages): one request
# of max_model_len (32 blocks in the full layers' group) fits, the 9 growing
# requests at once do not
TIGHT_BLOCKS = 56
SPECS = {
    "full": FP32_TORCH_FULL,
    "cover": dict(FP32_TORCH_FULL, adaptive_attention=COVER),
    "all_sparse": dict(FP32_TORCH_FULL, adaptive_attention=ALL_SPARSE),
    "small_whole": dict(SMALL_RUN, max_num_batched_tokens=2048, block_size=64),
    "small_tight": dict(SMALL_RUN, max_num_batched_tokens=64, block_size=32, metrics=True,
                        kv_cache_memory_bytes=TIGHT_BLOCKS * 10 * 32 * 2 * 3 * 64 * 4),
    "strided_cpu": dict(FP32, backend="ADAPTIVE", adaptive_attention=STRIDED, max_num_batched_tokens=64,
                        block_size=32),
    "strided_torch": dict(FP32, backend="ADAPTIVE", adaptive_attention={**STRIDED, "kernels": "torch"},
                          max_num_batched_tokens=64, block_size=32),
    "longgen": LONGGEN,
}


@pytest.fixture(scope="module")
def runs():
    return run_engines(SPECS)


def _same(a: dict, b: dict) -> None:
    assert a["prompt_lens"] == b["prompt_lens"]
    for i, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"])):
        assert x == y, f"prompt {i} diverges at token {next(j for j, (u, v) in enumerate(zip(x, y)) if u != v)}"


def test_covering_pattern_equals_full_attention(runs):
    sparse = runs["cover"]
    assert sparse["backends"] == ["ADAPTIVE"]
    assert not sparse["enable_prefix_caching"]
    assert max(sparse["prompt_lens"]) + FP32["max_tokens"] <= COVER["sink_window"]["window"]
    _same(sparse, runs["full"])


def test_small_pattern_is_independent_of_chunking_block_size_and_preemption(runs):
    whole, tight = runs["small_whole"], runs["small_tight"]
    assert tight["num_gpu_blocks"] == TIGHT_BLOCKS
    assert tight["metrics"]["vllm:num_preemptions"] > 0, tight["metrics"]
    assert max(whole["prompt_lens"]) > 4 * (32 + 96)  # the pattern drops most of the long prompts
    _same(tight, whole)


def test_sparse_layers_really_drop_tokens(runs):
    full, sparse = runs["full"], runs["all_sparse"]
    # full attention retrieves the code; layers that keep 32 + 96 tokens cannot
    assert "48213" in full["texts"][-1]
    assert "48213" not in sparse["texts"][-1]
    assert sparse["prompt_lens"][-1] > 400
    short = [i for i, n in enumerate(sparse["prompt_lens"]) if n + FP32["max_tokens"] <= 96]
    assert short
    for i in short:  # prompt + output inside the window: nothing dropped
        assert sparse["token_ids"][i] == full["token_ids"][i], i


def test_strided_on_vllm_cpu_kernel_equals_torch_path(runs):
    _same(runs["strided_cpu"], runs["strided_torch"])


def test_longgen_preset_batched_equals_one_at_a_time(runs):
    r = runs["longgen"]
    alone = r["phases"][0]
    assert min(r["prompt_lens"]) > 896 + 2 * BS, r["prompt_lens"]
    _same(r, alone)


def test_longgen_holds_more_requests_in_the_same_kv_space(runs):
    """vLLM sums, per request, the blocks each KV group may hold at
    max_model_len (``get_max_concurrency_for_kv_cache_config``); the three
    groups of 10 layers share one pool. LongGen's sparse groups hold the
    pattern's bound (``SparsePattern.max_held_blocks``, checked against a
    simulated request in test_pattern.py) instead of the whole sequence."""
    from vllm_adaptive.config import parse_config
    from vllm_adaptive.plan import resolve

    r = runs["longgen"]
    L = LONGGEN["max_model_len"]
    sparse = resolve(parse_config("longgen", 30), block_size=BS, device_type="cpu", max_model_len=L).layer(0)
    held = sparse.params.max_held_blocks(BS, L, LONGGEN["max_num_batched_tokens"], sparse.runner.in_step_free)
    page = BS * 2 * 3 * 64 * 4  # tokens x (K, V) x KV heads x head size x fp32, per layer
    assert r["num_gpu_blocks"] == LONGGEN_KV // (10 * page)
    assert r["kv_cache_max_concurrency"] == pytest.approx(r["num_gpu_blocks"] / (L // BS + 2 * held))
    # full attention in the same bytes: one group of 30 layers, L / BS blocks each
    full = (LONGGEN_KV // (30 * page)) / (L // BS)
    assert r["kv_cache_max_concurrency"] > full
