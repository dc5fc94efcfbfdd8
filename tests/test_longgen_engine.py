"""LongGen sparse layers inside a real vLLM engine on the embedded model.

* Plumbing: a pattern that covers every token of these prompts must give the
  same greedy tokens as full attention (float32), through the sparse spec,
  manager, cache writes and two-source attention.
* Freeing: a small pattern (sink 32 + window 96 tokens, far shorter than the
  long prompt) must give the same tokens however the work is cut: prefill
  chunks of 64 tokens with 32-token blocks, one whole-prompt chunk with
  64-token blocks, and a KV pool so small that requests are preempted and
  recomputed. A kernel that read a freed block, or a token that was not stored
  but later read, changes the output of at least one of these.
* Kernels: block-aligned strided layers on vLLM's CPU kernel (pseudo
  requests) give the same tokens as on the plugin's torch path.
* Batching: the ``longgen`` preset itself (block 128, vLLM's CPU kernel) gives
  the same tokens when long prompts share engine steps as when each runs alone.
* Capacity: the same KV space holds more 4K-token requests with ``longgen``.
"""

from __future__ import annotations

import pytest

from conftest import run_engine
from vllm_adaptive.text import SAMPLE_PROMPTS

pytestmark = pytest.mark.engine

# a fact behind the 32-token sink and far before the end of the prompt
# (outside a 96-token window)
SECRET = ("Here is a list of boxes in a small warehouse, with their colours and "
          "shelves, which a clerk wrote down this morning before opening time. "
          "The secret code is 48213. Keep it in mind. "
          + " ".join(f"Item {i}: a {c} box sits on shelf {i % 7}." for i, c in
                     zip(range(60), ["red", "blue", "green", "brown", "white"] * 12))
          + " Question: what is the secret code? Answer: the secret code is")
BASE = dict(prompts=list(SAMPLE_PROMPTS) + [SECRET], max_tokens=48, max_model_len=4096)
# token-exact window (block 1): the torch path, with in-step freeing
SMALL = {"preset": "longgen", "kernels": "torch", "sink_window": {"sink": 32, "window": 96, "block": 1}}
# block-aligned for 32-token blocks: runs on vLLM's CPU kernel (pseudo requests)
STRIDED = {"preset": "longgen-strided",
           "strided": {"sink": 32, "block": 32, "local_blocks": 2, "vert_stride": 4}}
# every layer sparse: nothing beyond the pattern can reach the output
ALL_SPARSE = {**SMALL, "full_layers": []}
COVER = {"preset": "longgen", "kernels": "torch",
         "sink_window": {"sink": 0, "window": 2048, "block": 1}}

_cache: dict[str, dict] = {}


def result(name: str, **spec) -> dict:
    if name not in _cache:
        _cache[name] = run_engine({**BASE, **spec})
    return _cache[name]


def _same(a: dict, b: dict) -> None:
    assert a["prompt_lens"] == b["prompt_lens"]
    for i, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"])):
        assert x == y, f"prompt {i} diverges at token {next(j for j, (u, v) in enumerate(zip(x, y)) if u != v)}"


def test_covering_pattern_equals_full_attention():
    full = result("full", backend="ADAPTIVE", adaptive_attention={"kernels": "torch"},
                  max_num_batched_tokens=128, block_size=32)
    sparse = result("cover", backend="ADAPTIVE", adaptive_attention=COVER,
                    max_num_batched_tokens=128, block_size=32)
    assert sparse["backends"] == ["ADAPTIVE"]
    assert not sparse["enable_prefix_caching"]
    _same(sparse, full)


def test_small_pattern_is_independent_of_chunking_block_size_and_preemption():
    small = dict(backend="ADAPTIVE", adaptive_attention=SMALL, max_tokens=160, max_model_len=1024)
    chunked = result("small_chunked", **small, max_num_batched_tokens=64, block_size=32)
    whole = result("small_whole", **small, max_num_batched_tokens=2048, block_size=64)
    # 56 blocks of 32 tokens (10 layers per group tensor, fp32 pages): one request
    # of max_model_len fits, the 8 growing requests at once do not
    tight = result("small_tight", **small, max_num_batched_tokens=64, block_size=32,
                   kv_cache_memory_bytes=56 * 10 * 32 * 2 * 3 * 64 * 4, metrics=True)
    _same(whole, chunked)
    _same(tight, chunked)
    assert tight["num_gpu_blocks"] == 56
    assert tight["metrics"]["vllm:num_preemptions"] > 0, tight["metrics"]


def test_sparse_layers_really_drop_tokens():
    full = result("full", backend="ADAPTIVE", adaptive_attention={"kernels": "torch"},
                  max_num_batched_tokens=128, block_size=32)
    sparse = result("all_sparse", backend="ADAPTIVE", adaptive_attention=ALL_SPARSE,
                    max_num_batched_tokens=128, block_size=32)
    # full attention retrieves the code; layers that keep 32 + 96 tokens cannot
    assert "48213" in full["texts"][-1]
    assert "48213" not in sparse["texts"][-1]
    assert sparse["prompt_lens"][-1] > 400
    short = [i for i, n in enumerate(sparse["prompt_lens"]) if n + 48 <= 96]
    assert short
    for i in short:  # prompt + output inside the window: nothing dropped
        assert sparse["token_ids"][i] == full["token_ids"][i], i


def test_strided_on_vllm_cpu_kernel_equals_torch_path():
    cpu = result("strided_cpu", backend="ADAPTIVE", adaptive_attention=STRIDED,
                 max_num_batched_tokens=64, block_size=32)
    torch_path = result("strided_torch", backend="ADAPTIVE",
                        adaptive_attention={**STRIDED, "kernels": "torch"},
                        max_num_batched_tokens=64, block_size=32)
    _same(cpu, torch_path)


def test_longgen_holds_more_requests_in_the_same_kv_space():
    cap = dict(backend="ADAPTIVE", prompts=["Hi"], max_tokens=2, kv_cache_memory_bytes=512 * 2**20,
               block_size=128, max_model_len=8192)
    full = result("cap_full", adaptive_attention="full", **cap)
    sparse = result("cap_longgen", adaptive_attention="longgen", **cap)
    ratio = sparse["kv_cache_max_concurrency"] / full["kv_cache_max_concurrency"]
    assert ratio > 1.8, (full, sparse)


# Three prompts of 2.5K-3.5K tokens: longer than longgen's sink + 6 blocks of
# 128 (its sparse layers drop keys from position 896 on), prefilled in chunks
# of 1024 that share steps when batched.
_COLOURS = ["red", "blue", "green", "brown", "white", "black", "grey"]
LONG = [f"Inventory list {k}, written by clerk number {k}. "
        + " ".join(f"Item {i}: a {_COLOURS[(i + k) % 7]} box sits on shelf {(i * k) % 11}."
                   for i in range(150 + 40 * k))
        + " Question: which shelf holds item 3? Answer: item 3 is on shelf"
        for k in (1, 2, 3)]


def test_longgen_preset_batched_equals_one_at_a_time():
    spec = dict(backend="ADAPTIVE", adaptive_attention="longgen", prompts=LONG, max_tokens=24,
                max_model_len=4096, block_size=128, max_num_batched_tokens=1024)
    batched = result("longgen_batched", **spec)
    alone = result("longgen_alone", **spec, sequential=True)
    assert min(batched["prompt_lens"]) > 2 * 896, batched["prompt_lens"]
    _same(batched, alone)
