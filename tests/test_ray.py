"""vLLM's Ray executor with ADAPTIVE layers, on a local Ray cluster.

The fixture starts one cluster for the module the way a user does (``ray
start --head`` with the ``vllm_cpu`` resource that ``patches/platform_ray.py``
asks for) and the engines join it through ``RAY_ADDRESS``. Each layout serves
the same greedy prompts in float32 once in a single process and once through
Ray; at every generated token the logprobs of the single process's two best
tokens must agree within ``LOGPROB_TOL``, and the tokens may part only on a
near tie (``vllm_adaptive.loadgen.follows``).

Every Ray engine start costs minutes on a 2-core machine, so each layout runs
ONE engine whose per-layer map mixes every runner family, instead of one
engine per preset (``benchmarks/ray_presets.py`` runs the whole preset x
{TP=3, PP=2} matrix by hand):

===========  =======================  ==========================
layer kind   TP=3 (``MAP_TP``)        PP=2 (``MAP_PP``)
===========  =======================  ==========================
full         kivi8, torch             model_dtype, vLLM CPU ops
sink_window  kivi8, torch             model_dtype, vLLM CPU ops
strided      -                        model_dtype, vLLM CPU ops
release      GRU scorer, rebuild off  GRU scorer, rebuild on
===========  =======================  ==========================

Tensor parallelism 3 is the smallest that splits the embedded model's heads
(9 query / 3 KV heads: the size must divide 3); pipeline parallelism 2 puts
layers 0-14 and 15-29 on two ranks, so every kind runs on both stages and
the GRU controller's layer (2) on the first only. The two long prompts
(~300 tokens) outgrow the sparse layers' windows and the release budget, so
blocks are freed and released; the short ones decode from a single block.
Release layers must have released blocks and every rank must have applied
the same decisions (a digest of every step's connector metadata).

Tensor parallelism sums the row-parallel projections across ranks, and every
rank splits its GEMMs over its own threads, so hidden states differ from one
process in the last float32 bits. Logprobs move by that much, and greedy
tokens part where the two best were closer; other discrete decisions taken
on a near tie move more: an int4 KIVI code on a rounding
boundary (hence int8 here, and one prompt per step: batch timing moves those
bits too; ``kivi4`` differed on one long prompt) or a rebuild swap whose two
Quest bounds are within rounding (``adore`` at TP=3 once released 219 blocks
against 220 and answered one long prompt differently; all ranks applied
identical decisions). So under TP the release layers run without rebuild and
must release exactly as one process; the PP engine runs rebuild too (the same
logprobs), but vLLM keeps one batch per stage in flight, so scores reach the
scheduler a batch later and the release counts may differ from one process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_engine, run_engines
from vllm_adaptive.loadgen import follows, largest_difference
from vllm_adaptive.serving import free_port
from vllm_adaptive.text import SAMPLE_PROMPTS, warehouse_prompt as long_prompt

pytestmark = [pytest.mark.engine, pytest.mark.ray]

# two short prompts, two of ~300 tokens (past every window and the budget below)
PROMPTS = list(SAMPLE_PROMPTS[:2]) + [long_prompt(20, 5, "48213"), long_prompt(18, 12, "77105")]
PATTERNS = {"sink_window": {"sink": 32, "window": 64, "block": 32},
            "strided": {"sink": 32, "block": 32, "local_blocks": 2, "vert_stride": 4},
            "kivi": {"bits": 8}}
# budget 192: the smallest at block 32 with this sink and recent (+ the block
# being filled + one scored block), so the long prompts release blocks
RELEASE = {"budget": 192, "sink": 32, "recent": 64, "prefill_chunk": 64}
# layer 2 is a release layer in both: the shipped GRU controller reads layer 2's values
MAP_TP = {"layer_kinds": ["full", "sink_window", "release", "full", "sink_window"] * 6, **PATTERNS,
          "kv_format": {"full": "kivi", "sink_window": "kivi"},
          "release": {**RELEASE, "rebuild": 0}}  # rebuild off under TP: see the module docstring
MAP_PP = {"layer_kinds": ["full", "strided", "release", "sink_window", "release"] * 6, **PATTERNS,
          "release": RELEASE}
LAYOUTS = {
    # name: (adaptive_attention, parallel layout)
    "tp3": (MAP_TP, {"tensor_parallel_size": 3}),
    "pp2": (MAP_PP, {"pipeline_parallel_size": 2}),
}
# one prompt per generate call: which requests share a step depends on when
# they reach the EngineCore process, and that moves the last float32 bits of
# the keys; a KIVI code on a rounding boundary then flips (kivi2 in one process
# answered differently in identical runs, the same in every in-process run)
BASE = dict(backend="ADAPTIVE", dtype="float32", block_size=32, max_model_len=512, max_tokens=8,
            max_num_batched_tokens=128, kv_cache_memory_bytes=64 * 2**20, rank_decisions=True,
            release_stats=True, sequential=True, logprobs=2, prompts=PROMPTS)
# How far a logprob may move between one process and Ray. Measured over these
# 32 tokens: 0.039 at TP=3 (the float32 difference flips int8 KIVI codes on a
# rounding boundary), 0.046 at PP=2 (release timing shifted by a batch), 0.005
# at TP=3 with model-dtype full layers; 3x the largest. A rank that attends
# with the wrong heads, layers or blocks moves them by far more.
LOGPROB_TOL = 0.15


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


# a loopback test cluster without Ray's token authentication (users of a
# shared cluster keep it on: docs/RAY.md)
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A one-node Ray cluster started as the README tells users to, offering
    three CPU ranks, shared by the module's engines. ``--block`` keeps ``ray
    start`` in the foreground: stopping that one process stops this cluster
    only (``ray stop`` would stop every Ray cluster of the machine's user)."""
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    log = temp / "ray_start.log"
    with open(log, "w") as out:
        head = subprocess.Popen([_ray_bin(), "start", "--head", f"--port={port}", "--num-cpus=2",
                                 "--resources", '{"vllm_cpu": 3}', "--include-dashboard=false",
                                 f"--temp-dir={temp}", "--disable-usage-stats", "--block"],
                                stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, **RAY_ENV))
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()  # ray drains, then stops the processes it started
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def singles():
    """Every layout's map in one process, one after the other (one subprocess)."""
    return run_engines({name: {**BASE, "adaptive_attention": cfg} for name, (cfg, _) in LAYOUTS.items()})


def through_ray(name: str, address: str) -> dict:
    cfg, layout = LAYOUTS[name]
    spec = {**BASE, "adaptive_attention": cfg, **layout, "distributed_executor_backend": "ray"}
    return run_engine(spec, env_extra={"RAY_ADDRESS": address, **RAY_ENV})


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ray_equals_single_process(name, singles, ray_address):
    single, ray = singles[name], through_ray(name, ray_address)
    assert ray["backends"] == ["ADAPTIVE"]
    for i, (a, b) in enumerate(zip(single["logprobs"], ray["logprobs"], strict=True)):
        problem = follows(a, b, LOGPROB_TOL)
        assert problem is None, f"{name}: prompt {i}: {problem}\n{single['texts'][i]!r}\n{ray['texts'][i]!r}"
    largest = max(largest_difference(a, b) for a, b in zip(single["logprobs"], ray["logprobs"]))
    print(f"{name}: largest logprob difference {largest:.2e}, same tokens "
          f"{single['token_ids'] == ray['token_ids']}, release {ray['release']} (alone {single['release']})")
    world = LAYOUTS[name][1]
    ranks = ray["rank_decisions"]
    assert len(ranks) == world.get("tensor_parallel_size", 1) * world.get("pipeline_parallel_size", 1)
    # release layers: blocks were released, and every rank applied the same decisions
    assert sum(g["released"] for g in ray["release"].values()) > 0, ray["release"]
    assert all(r is not None and r["tables"] > 0 for r in ranks), ranks
    assert len({r["digest"] for r in ranks}) == 1, f"ranks applied different release decisions: {ranks}"
    # with PP vLLM keeps a batch per stage in flight, so scores reach the scheduler
    # a batch later and release timing may differ (docs/RAY.md); under TP the
    # decisions are the single process's, as long as the tokens (contexts) are
    if "pipeline_parallel_size" not in world and single["token_ids"] == ray["token_ids"]:
        assert ray["release"] == single["release"], "Ray released differently from the single process"


def test_cluster_without_cpu_ranks_is_refused(ray_address):
    """TP=3 x PP=2 needs six ``vllm_cpu`` ranks; the cluster offers three:
    a clear error at start-up, not a placement group waiting forever."""
    spec = {**BASE, "adaptive_attention": "full", "tensor_parallel_size": 3, "pipeline_parallel_size": 2,
            "distributed_executor_backend": "ray", "prompts": ["hi"], "rank_decisions": False,
            "release_stats": False}
    with pytest.raises(AssertionError) as e:
        run_engine(spec, timeout=300, env_extra={"RAY_ADDRESS": ray_address, **RAY_ENV})
    assert "offers 3 'vllm_cpu' resources but" in str(e.value) and "needs 6" in str(e.value)
