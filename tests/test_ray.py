"""vLLM's Ray executor with ADAPTIVE layers, on a local Ray cluster.

The fixture starts a cluster the way a user does (``ray start --head`` with
the ``vllm_cpu`` resource that ``patches/platform_ray.py`` asks for) and the
engines join it through ``RAY_ADDRESS``. Each case serves the same greedy
batch (short prompts and ~1.5K-token ones, so sparse, quantized and release
layers all act) in float32 once in a single process and once through Ray
with tensor parallelism (TP=3: SmolLM2 has 3 KV heads) or pipeline
parallelism (PP=2); the tokens must be equal. Release presets run with a
small budget so blocks really are released, and every rank must have applied
the same decisions (a digest of every step's connector metadata).

Tensor parallelism sums the row-parallel projections across ranks, and every
rank splits its GEMMs over its own threads, so hidden states differ from one
process in the last float32 bits. Continuous outputs absorb that; discrete
decisions taken on a near tie do not: an int4 KIVI code on a rounding
boundary (hence ``kivi8`` here, and one prompt per step for the KIVI cases:
batch timing moves those bits too; ``kivi4`` differed on one long prompt) or a
rebuild swap whose two Quest bounds are within rounding (``adore`` at TP=3
once released 219 blocks against 220 and answered one long prompt
differently; all ranks applied identical decisions). So under TP the release
case runs the GRU scorer without rebuild and must release exactly as one
process; the PP case runs rebuild too, with the same tokens, but vLLM keeps
one batch per stage in flight, so scores reach the scheduler a batch later
and the release counts may differ from one process. The whole preset x
{TP=3, PP=2} matrix is ``benchmarks/ray_presets.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_engine
from vllm_adaptive.loadgen import free_port
from vllm_adaptive.text import SAMPLE_PROMPTS, warehouse_prompt as long_prompt

pytestmark = [pytest.mark.engine, pytest.mark.ray]

PROMPTS = list(SAMPLE_PROMPTS[:3]) + [long_prompt(110, 5, "48213"), long_prompt(90, 60, "77105")]
SMALL_RELEASE = {"budget": 512, "sink": 64, "recent": 128, "prefill_chunk": 128}
CASES = {
    # name: (adaptive_attention, parallel layout)
    "full-tp3": ("full", {"tensor_parallel_size": 3}),
    "longgen-tp3": ("longgen", {"tensor_parallel_size": 3}),
    "kivi8-tp3": ("kivi8", {"tensor_parallel_size": 3}),
    # rebuild off under TP: see the module docstring
    "adore-tp3": ({"preset": "adore", "release": {**SMALL_RELEASE, "rebuild": 0}}, {"tensor_parallel_size": 3}),
    "longgen-kivi4-pp2": ("longgen-kivi4", {"pipeline_parallel_size": 2}),
    "longgen-adore-pp2": ({"preset": "longgen-adore", "release": SMALL_RELEASE},
                          {"pipeline_parallel_size": 2}),
}
BASE = dict(backend="ADAPTIVE", dtype="float32", block_size=32, max_model_len=2048, max_tokens=16,
            max_num_batched_tokens=128, long_prefill_token_threshold=128, rank_decisions=True,
            release_stats=True, prompts=PROMPTS)


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A one-node Ray cluster started as the README tells users to, offering
    three CPU ranks; stopped (with everything it started) afterwards."""
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    env = dict(os.environ, **RAY_ENV)
    subprocess.run([_ray_bin(), "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--resources", '{"vllm_cpu": 3}', "--include-dashboard=false",
                    f"--temp-dir={temp}", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([_ray_bin(), "stop", "--force"], env=env, capture_output=True, timeout=180)
        shutil.rmtree(temp, ignore_errors=True)


# a loopback test cluster without Ray's token authentication (users of a
# shared cluster keep it on: docs/RAY.md)
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
_cache: dict[str, dict] = {}


def result(name: str, address: str | None) -> dict:
    key = f"{name}:{'ray' if address else 'single'}"
    if key not in _cache:
        cfg, layout = CASES[name]
        spec = {**BASE, "adaptive_attention": cfg}
        if "kivi" in name:
            # one prompt per generate call: which requests share a step
            # depends on when they reach the EngineCore process, and that
            # moves the last float32 bits of the keys; an int4 code on a
            # rounding boundary then flips (kivi2 in one process answered
            # differently in identical runs, the same in every in-process run)
            spec["sequential"] = True
        env = None
        if address:
            spec.update(layout, distributed_executor_backend="ray")
            env = {"RAY_ADDRESS": address, **RAY_ENV}
        _cache[key] = run_engine(spec, env_extra=env)
    return _cache[key]


@pytest.mark.parametrize("name", list(CASES))
def test_ray_equals_single_process(name, ray_address):
    single, ray = result(name, None), result(name, ray_address)
    assert ray["backends"] == ["ADAPTIVE"]
    for i, (a, b) in enumerate(zip(single["token_ids"], ray["token_ids"])):
        assert a == b, f"{name}: prompt {i} differs through Ray:\n{single['texts'][i]!r}\n{ray['texts'][i]!r}"
    ranks = ray["rank_decisions"]
    world = CASES[name][1]
    assert len(ranks) == world.get("tensor_parallel_size", 1) * world.get("pipeline_parallel_size", 1)
    if ray["release"] is None:
        assert all(r is None for r in ranks)
        return
    # release layers: blocks were released, and every rank applied the same decisions
    assert sum(g["released"] for g in ray["release"].values()) > 0, ray["release"]
    if "pipeline_parallel_size" not in world:
        # with PP vLLM keeps a batch per stage in flight, so scores reach the
        # scheduler a batch later and release timing may differ (docs/RAY.md)
        assert ray["release"] == single["release"], "Ray released differently from the single process"
    assert all(r is not None and r["tables"] > 0 for r in ranks), ranks
    assert len({r["digest"] for r in ranks}) == 1, f"ranks applied different release decisions: {ranks}"


def test_cluster_without_cpu_ranks_is_refused(ray_address):
    """TP=3 x PP=2 needs six ``vllm_cpu`` ranks; the cluster offers three:
    a clear error at start-up, not a placement group waiting forever."""
    spec = {**BASE, "adaptive_attention": "full", "tensor_parallel_size": 3,
            "pipeline_parallel_size": 2, "distributed_executor_backend": "ray", "prompts": ["hi"]}
    with pytest.raises(AssertionError) as e:
        run_engine(spec, timeout=300, env_extra={"RAY_ADDRESS": ray_address, **RAY_ENV})
    assert "offers 3 'vllm_cpu' resources but" in str(e.value) and "needs 6" in str(e.value)
