"""ADORE release layers inside a real vLLM engine on the embedded model.

* Until a request outgrows its budget nothing is released, and the release
  layers give the same greedy tokens (float32) as full attention on the same
  torch kernel.
* Memory really goes back: long prompts make the scheduler release blocks
  (statistics from the scheduler's connector); right after each removal no
  request holds more than its budget, never more than budget + one step; a
  KV pool too small for the batch without release serves it with no
  preemption.
* Preemption: a pool too small even for the budgets preempts and recomputes
  requests; every request completes and the short ones give the same tokens.
* Capacity in vLLM's own accounting: max_model_len / (budget + one step).
* The shipped GRU controller serves (preset ``adore``), and rebuild fires.
"""

from __future__ import annotations

import pytest

from conftest import run_engine
from vllm_adaptive.text import SAMPLE_PROMPTS, warehouse_prompt as long_prompt

pytestmark = pytest.mark.engine

SHORT = list(SAMPLE_PROMPTS[:5])
LONG = [long_prompt(110, 5, "48213"), long_prompt(90, 60, "77105")]
BUDGET = 1024
RELEASE = {"preset": "adore", "release": {"scorer": "recent", "budget": BUDGET, "sink": 32,
                                          "recent": 64, "prefill_chunk": 64, "rebuild": 0}}
BASE = dict(backend="ADAPTIVE", dtype="float32", block_size=32, max_model_len=2048,
            max_tokens=24, max_num_batched_tokens=64, long_prefill_token_threshold=64,
            release_stats=True, metrics=True)

_cache: dict[str, dict] = {}


def result(name: str, **spec) -> dict:
    if name not in _cache:
        _cache[name] = run_engine({**BASE, **spec})
    return _cache[name]


def full() -> dict:
    return result("full", prompts=SHORT + LONG, adaptive_attention={"preset": "full", "kernels": "torch"})


def release() -> dict:
    return result("release", prompts=SHORT + LONG, adaptive_attention=RELEASE)


def test_no_release_below_the_budget_is_full_attention():
    a, b = full(), release()
    assert b["prompt_lens"][len(SHORT):] == [p for p in a["prompt_lens"][len(SHORT):]]
    assert max(b["prompt_lens"][:len(SHORT)]) + 24 < BUDGET
    assert max(b["prompt_lens"][len(SHORT):]) > BUDGET + 200
    for i in range(len(SHORT)):
        assert a["token_ids"][i] == b["token_ids"][i], f"short prompt {i}"


def test_blocks_are_released_and_the_budget_holds():
    st = release()["release"]
    assert st is not None, "no statistics from the scheduler's connector"
    (g,) = st.values()  # one release group (every layer)
    assert g["released"] > 0 and g["dropped"] == 0
    assert g["peak_after_release"] <= g["budget_blocks"]
    assert g["peak_held"] <= g["budget_blocks"] + g["chunk_blocks"]
    assert g["peak_held"] < 2048 // 32  # never the whole sequence


def test_capacity_in_vllms_accounting():
    a, b = full(), release()
    step = 64 // 32
    want = (2048 // 32) / (BUDGET // 32 + step)
    assert b["kv_cache_max_concurrency"] / a["kv_cache_max_concurrency"] == pytest.approx(want, rel=0.02)


def test_small_pool_serves_the_batch_without_preemption():
    # 4 long requests of 1.3-1.6K tokens: 186 blocks of 32 tokens would not
    # fit in 160 blocks; 4 x (32 + 2) = 136 do
    page = 32 * 30 * 2 * 3 * 64 * 4  # tokens x layers x (K, V) x kv heads x head size x fp32
    r = result("small_pool", prompts=LONG * 2, adaptive_attention=RELEASE,
               kv_cache_memory_bytes=160 * page, max_num_seqs=4)
    assert r["num_gpu_blocks"] <= 162
    assert r["metrics"]["vllm:num_preemptions"] == 0
    assert r["release"]["0"]["released"] > 0
    assert all(len(t) == 24 for t in r["token_ids"])


def test_preemption_recomputes_and_completes():
    # Release groups admit by their budget, which they keep, so they never
    # outgrow an admission; LongGen's full layers (longgen-adore) grow with
    # the sequence, and a pool that admits two long requests by their prompts
    # runs out while they decode 400 tokens: vLLM preempts one (its release
    # blocks and host slots go back) and recomputes it. Every request
    # completes; the short ones (never released) give full attention's
    # tokens, and each long prompt (there twice) gives the same tokens in
    # both copies, preempted or not.
    page = 32 * 30 * 2 * 3 * 64 * 4
    spec = {**RELEASE, "preset": "longgen-adore", "kernels": "torch"}
    r = result("preempt", prompts=SHORT + LONG * 2, adaptive_attention=spec,
               kv_cache_memory_bytes=82 * page, max_num_seqs=8, max_tokens=400)
    assert r["num_gpu_blocks"] == 246
    assert r["metrics"]["vllm:num_preemptions"] > 0
    assert all(len(t) == 400 for t in r["token_ids"])
    assert sum(g["released"] for g in r["release"].values()) > 0
    ref = full()
    for i in range(len(SHORT)):
        assert r["token_ids"][i][:24] == ref["token_ids"][i], f"short prompt {i}"
    n = len(SHORT)
    for i in range(len(LONG)):
        a, b = r["token_ids"][n + i], r["token_ids"][n + len(LONG) + i]
        assert a[:100] == b[:100], f"long prompt {i}: copies diverge at token {_diverge(a, b)}"


def _diverge(x, y) -> int:
    return next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), -1)


def test_shipped_controller_serves_and_rebuild_fires():
    spec = {"preset": "adore", "release": {"budget": 512, "sink": 32, "recent": 64,
                                           "prefill_chunk": 64, "rebuild": 2}}
    r = result("gru", prompts=LONG + SHORT[:2], adaptive_attention=spec)
    st = r["release"]["0"]
    assert st["released"] > 0
    assert st["rebuilt"] > 0 and st["rebuild_steps"] > 0
    assert "Paris" in r["texts"][len(LONG) + 1]
