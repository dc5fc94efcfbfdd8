"""The README's server under load, one server per code path, on loopback.

100 requests at once (``vllm_adaptive.loadgen.make_requests``): 25 unique prompts from
a few tokens to within 8 tokens of ``max_model_len``, each sent plain,
streamed, abandoned mid-stream or dropped by a client that disconnects; the
KV pool is sized so the scheduler must preempt (``conftest.SERVED``). Then:

* no failed request, and every answered one has exactly its ``max_tokens``
  tokens and the same greedy tokens (float32) as the same prompt served alone
  afterwards, with the same logprobs within ``LOGPROB_TOL`` (per server); they may part
  only on a near tie (``loadgen.follows``), where the batch's summation order
  decides;
* preemption really happened (``vllm:num_preemptions``);
* no leaked or double-freed KV block: once idle, vLLM's KV usage is back to
  0 and the pool audit (``VLLM_ADAPTIVE_AUDIT=1``, ``patches/block_pool_audit.py``)
  counts no double free and no referenced block;
* sparse and release layers report freed blocks in ``/metrics``;
* the server still answers.

The servers, one per runner family: ``longgen`` (vLLM's CPU ops on its full
layers, LongGen's sink + window freeing on the others; a ``full`` server
would run nothing that this one does not), ``kivi8`` (KIVI packed pages) and
``adore`` (release layers), started side by side, each on a core of its own.
test_server.py and test_server_adore.py check the same servers
(``conftest.shared_server``).

KIVI is loaded with ``kivi8``: int4 / int2 codes flip on a rounding
boundary when the batch changes the last float32 bits of a key, and move
logprobs by more than float32 noise (``benchmarks/load.py`` counts the
differing answers for ``kivi4``).

Release layers (``adore``) decide what to keep from the scores seen at each
step, so a request whose context outgrows the budget can legitimately answer
differently when the scheduler cuts its prompt into other chunks (alone vs in
a batch, or recomputed after preemption): for those the test requires a
complete answer and reports how many differ; every request within the budget
must match exactly.
"""

from __future__ import annotations

import pytest
import requests

from conftest import SERVED_MAX_LEN, SERVED_RELEASE_BUDGET
from vllm_adaptive.loadgen import (compare, largest_difference, make_requests, metric, run_load, serve_alone,
                                   wait_idle)

pytestmark = pytest.mark.server

SERVERS = ["longgen", "kivi8", "adore"]
# How far a logprob may move between a request in a batch and alone (and how
# close the two best tokens must be for the answers to part there).
# Model-dtype layers (longgen; adore within its budget, where nothing is
# released): float32 GEMMs summed in another order, measured 4.7e-5 largest
# over the load; 100x that. kivi8: the same float32 difference flips an int8
# code on a rounding boundary, moving a key by one quantization step: measured
# 0.055 here (one CI run) and 0.039 under Ray (test_ray.py); about 3x the
# largest, as test_ray.py. A request reading another's blocks moves them by
# whole units.
LOGPROB_TOL = {"longgen": 5e-3, "adore": 5e-3, "kivi8": 0.15}


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def mix(tokenizer):
    # 100 requests: with 48 the longgen pool (then 1.34 requests of 512 tokens) was never
    # short enough to preempt (measured); 100 preempted on every server
    return make_requests(tokenizer, max_model_len=SERVED_MAX_LEN, n=100, seed=0)


@pytest.fixture(scope="module", params=SERVERS)
def loaded(request, shared_server, mix):
    """The load on one server, then its idle metrics, then each prompt alone."""
    shared_server.start(*SERVERS)  # side by side, the first time
    server = shared_server(request.param)
    answers = run_load(server.base, mix)
    idle = wait_idle(server.base)
    alone = serve_alone(server.base, mix)
    return {"name": server.name, "base": server.base, "answers": answers, "idle": idle, "alone": alone}


def _beyond_budget(mix, tokenizer) -> set[int]:
    return {k for k, (p, m) in mix.uniques.items() if len(tokenizer(p)["input_ids"]) + m > SERVED_RELEASE_BUDGET}


def test_every_answer_complete_and_equal_to_alone(loaded, mix, tokenizer):
    problems = compare(mix, loaded["answers"], loaded["alone"], tie_tol=LOGPROB_TOL[loaded["name"]])
    by_key = {r.idx: r.key for r in mix.requests}
    largest = max((largest_difference(loaded["alone"][by_key[a.idx]].steps, a.steps) for a in loaded["answers"]
                   if a.ok and a.mode in ("plain", "stream")), default=0.0)
    print(f"{loaded['name']}: largest logprob difference from alone {largest:.2e}")
    if loaded["name"] == "adore":
        beyond = _beyond_budget(mix, tokenizer)
        by_idx = {r.idx: r for r in mix.requests}
        differ = [p for p in problems if "!= alone" in p]
        problems = [p for p in problems if "!= alone" not in p
                    or by_idx[int(p.split()[1])].key not in beyond]
        print(f"adore: {len(differ)} answers beyond the budget differ from alone")
    assert not problems, "\n".join(problems[:20])


def test_preempted_and_no_block_leaked_or_double_freed(loaded):
    m = loaded["idle"]
    print(f"{loaded['name']}: {metric(m, 'vllm:num_preemptions_total'):.0f} preemptions")
    assert metric(m, "vllm:num_preemptions_total") > 0, "the KV pool is too large to force preemption"
    assert metric(m, "vllm:kv_cache_usage_perc") == 0.0
    assert metric(m, "vllm_adaptive:kv_pool_double_frees_total") == 0
    assert metric(m, "vllm_adaptive:kv_pool_leaked_blocks") == 0
    assert metric(m, "vllm_adaptive:kv_pool_idle_audits_total") >= 1
    assert metric(m, "vllm_adaptive:kv_pool_blocks") > 0
    assert metric(m, "vllm_adaptive:kv_pool_free_blocks") == metric(m, "vllm_adaptive:kv_pool_blocks")


def test_freed_blocks_and_savings_in_metrics(loaded):
    m, name = loaded["idle"], loaded["name"]
    kind = {"longgen": "sink_window", "adore": "release"}.get(name)
    if kind:
        assert metric(m, "vllm_adaptive:kv_blocks_freed_total", layer_kind=kind) > 0
    if name == "adore":
        assert metric(m, "vllm_adaptive:kv_blocks_released_total", layer_kind="release") > 0
    # every served map stores fewer bytes per token than full attention: sparse layers
    # (sink + window + one chunk < 512 tokens), int8 pages, a 256-token budget
    assert metric(m, "vllm_adaptive:kv_bytes_per_token_saved") > 0
    assert metric(m, "vllm_adaptive:kv_capacity_vs_full") > 1.0
    if name == "longgen":  # its full layers save nothing
        assert metric(m, "vllm_adaptive:kv_bytes_per_token_saved", layer_kind="full") == 0


def test_server_alive_after_load(loaded):
    assert requests.get(loaded["base"] + "/health", timeout=10).status_code == 200
    r = requests.post(loaded["base"] + "/v1/completions", timeout=120,
                      json={"model": "smollm2", "prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
