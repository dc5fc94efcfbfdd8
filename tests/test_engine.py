"""ADAPTIVE(full) inside a real vLLM engine on the embedded model.

Greedy outputs must be token-for-token identical to stock CPU_ATTN:

* float32 (9 ragged prompts, two spanning many blocks, chunked prefill forced
  by a 128-token step budget, 48 new tokens) on both CPU kernel paths: vLLM's
  CPU ops at block 32 and the plugin's torch path at block 128. Exact, not
  within a tolerance: the paths compute the same attention with a different
  summation order, which moves a logit by ~1e-6 relative in float32, while a
  greedy token flips only where the top two logits are that close.
* bf16, vLLM's CPU ops, block 128: the same ops on the same pages and, with
  the engine in-process, the same batches as stock, so the same bits.

The torch-path engine is selected by the ``adaptive_attention`` key alone
(no backend flag), as a checkpoint that carries it would be. Every
configuration runs once per session (conftest.run_engines).
"""

from __future__ import annotations

import pytest

from conftest import run_engines
from engine_specs import BF16, BF16_FULL, FP32, FP32_TORCH_FULL

pytestmark = pytest.mark.engine

SPECS = {
    "stock_fp32": dict(FP32, backend="CPU_ATTN", block_size=32),
    # no key: preset full, kernels auto (vLLM's CPU ops)
    "adaptive_auto_fp32": dict(FP32, backend="ADAPTIVE", block_size=32),
    # the key alone selects ADAPTIVE
    "adaptive_torch_fp32_bs128": FP32_TORCH_FULL,
    "stock_bf16": dict(BF16, backend="CPU_ATTN"),
    "adaptive_auto_bf16": BF16_FULL,
}


@pytest.fixture(scope="module")
def runs():
    return run_engines(SPECS)


def _assert_identical(got: dict, want: dict) -> None:
    assert got["prompt_lens"] == want["prompt_lens"]
    for i, (a, b) in enumerate(zip(got["token_ids"], want["token_ids"])):
        assert a == b, f"prompt {i} diverges at token {next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)}"


def test_prompt_set_is_awkward(runs):
    stock = runs["stock_fp32"]
    lens = stock["prompt_lens"]
    assert len(lens) >= 8 and len(set(lens)) >= 6  # ragged
    assert max(lens) > 128 * 3  # chunked over several steps, many 32-token blocks
    assert min(lens) < 32  # a prompt shorter than one block
    assert max(lens) + FP32["max_tokens"] <= FP32["max_model_len"]
    assert all(len(t) == FP32["max_tokens"] for t in stock["token_ids"])
    assert stock["backends"] == ["CPU_ATTN"]


@pytest.mark.parametrize("name", ["adaptive_auto_fp32", "adaptive_torch_fp32_bs128"])
def test_full_preset_identical_to_stock_fp32(runs, name):
    got = runs[name]
    assert got["backends"] == ["ADAPTIVE"]
    _assert_identical(got, runs["stock_fp32"])


def test_bf16_vllm_cpu_path_identical_to_stock(runs):
    ours = runs["adaptive_auto_bf16"]
    assert ours["backends"] == ["ADAPTIVE"] and runs["stock_bf16"]["backends"] == ["CPU_ATTN"]
    _assert_identical(ours, runs["stock_bf16"])
    # the same bits, not only the same argmax
    assert ours["logprobs"] == runs["stock_bf16"]["logprobs"]
