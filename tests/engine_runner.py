"""Run offline engine configurations and print each result as JSON.

Usage: python tests/engine_runner.py '{"backend": "ADAPTIVE", ...}'
       python tests/engine_runner.py @specs.json      (a spec or a list of specs)

Kept out of the pytest process so that vLLM's process-wide state (torch
threads and CPU affinity, the distributed group, the KV cache memory) never
leaks into the tests, and memory goes back when the process ends.

A list of specs runs one engine after the other in this one process: the
~10 s vLLM import is paid once, not per configuration. ``in_process`` runs
vLLM's EngineCore inside this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
no second vLLM import, and every request of a ``generate`` call reaches the
scheduler before the first step, so batches are composed the same way every
run (with the multiprocess client they arrive asynchronously, and in bf16
the batch composition alone has flipped a near-tied greedy token). The
multiprocess boundary itself (a spawned EngineCore unpickling ADAPTIVE
before plugins load) is tested by tests/test_registration.py and every
serving test.

Each spec prints one line ``RESULT {json}``, in order; a spec that fails
prints ``RESULT {"error": ...}`` and the next one still runs.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
import traceback

_DISTRIBUTED = ("tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend")


def main() -> None:
    arg = sys.argv[1]
    if arg.startswith("@"):
        with open(arg[1:]) as f:
            arg = f.read()
    specs = json.loads(arg)
    base_env = dict(os.environ)
    for spec in [specs] if isinstance(specs, dict) else specs:
        os.environ.clear()
        os.environ.update(base_env)
        try:
            result = run(spec)
        except Exception:  # noqa: BLE001 - reported to the test, the next spec still runs
            result = {"error": traceback.format_exc()[-6000:]}
        print("RESULT " + json.dumps(result), flush=True)
        times = {k: round(v, 1) for k, v in result.items() if k.endswith("_s")}
        print(f"engine_runner: {_shown_spec(spec)} {times}", file=sys.stderr, flush=True)
        _cleanup()


def _shown_spec(spec: dict) -> str:
    return json.dumps({k: v for k, v in spec.items() if k not in ("prompts", "score", "phases")})


def _sampling(spec: dict, phase: dict):
    """Greedy sampling parameters; ``max_tokens`` may be a list, one per prompt."""
    from vllm import SamplingParams

    n = phase.get("max_tokens", spec.get("max_tokens", 64))
    logprobs = phase.get("logprobs", spec.get("logprobs"))
    one = lambda k: SamplingParams(temperature=0, max_tokens=k, ignore_eos=True, logprobs=logprobs)  # noqa: E731
    return [one(k) for k in n] if isinstance(n, list) else one(n)


def run(spec: dict) -> dict:
    if spec.get("in_process") and not any(k in spec for k in _DISTRIBUTED):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from vllm_adaptive.model import default_model_path

    kwargs = dict(
        model=str(default_model_path()),
        dtype=spec.get("dtype", "float32"),
        max_model_len=spec.get("max_model_len", 4096),
        block_size=spec.get("block_size", 32),
        enable_chunked_prefill=True,
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 256),
        max_num_seqs=spec.get("max_num_seqs", 16),
        enforce_eager=spec.get("enforce_eager", True),
        seed=0,
    )
    for key in _DISTRIBUTED:
        if key in spec:
            kwargs[key] = spec[key]
    if spec.get("metrics"):
        kwargs["disable_log_stats"] = False
    if "kv_cache_memory_bytes" in spec:
        # vLLM's CPU platform lets this legacy variable override the argument
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        kwargs["kv_cache_memory_bytes"] = spec["kv_cache_memory_bytes"]
    if spec.get("backend"):
        kwargs["attention_backend"] = spec["backend"]
    if "adaptive_attention" in spec:
        kwargs["hf_overrides"] = {"adaptive_attention": spec["adaptive_attention"]}
    stats_path = None
    if spec.get("release_stats"):
        from vllm_adaptive.release.stats import STATS_ENV

        stats_path = os.path.join(tempfile.mkdtemp(), "release.json")
        os.environ[STATS_ENV] = stats_path
    if "long_prefill_token_threshold" in spec:
        kwargs["long_prefill_token_threshold"] = spec["long_prefill_token_threshold"]
    t0 = time.time()
    llm = LLM(**kwargs)
    start_s = time.time() - t0
    result = {"start_s": start_s, "backends": _backend_names(llm)}
    # the spec's own prompts are the first phase; "phases" run after it on
    # the same engine (results under "phases", in order)
    phases = [spec] if "prompts" in spec else []
    phases += spec.get("phases", [])
    outs = []
    t0 = time.time()
    for phase in phases:
        outs.append(_generate(llm, spec, phase))
    result["generate_s"] = time.time() - t0
    if "prompts" in spec:
        result.update(outs.pop(0))
    if outs:
        result["phases"] = outs
    if "score" in spec:
        # teacher-forced: the logprob every prompt position gives the token
        # that follows it (prefill only; the same ids for every configuration),
        # one request at a time (never preempted, however small the pool)
        t0 = time.time()
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
        result["score"] = [_prompt_logprobs(llm.generate([p], params, use_tqdm=False)[0])
                           for p in _inputs(spec["score"])]
        result["score_s"] = time.time() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    metrics = {}
    if spec.get("metrics"):
        for m in llm.get_metrics():
            if m.name in ("vllm:num_preemptions", "vllm:prompt_tokens",
                          "vllm:prefix_cache_hits", "vllm:prefix_cache_queries"):
                metrics[m.name] = getattr(m, "value", None)
    release = None
    if stats_path and os.path.exists(stats_path):
        with open(stats_path) as f:
            release = json.load(f)
    result.update({
        "rank_decisions": _rank_decisions(llm) if spec.get("rank_decisions") else None,
        "release": release,
        "metrics": metrics,
        "num_gpu_blocks": cache.num_gpu_blocks,
        "kv_cache_size_tokens": getattr(cache, "kv_cache_size_tokens", None),
        "kv_cache_max_concurrency": getattr(cache, "kv_cache_max_concurrency", None),
        "enable_prefix_caching": cache.enable_prefix_caching,
    })
    llm.llm_engine.engine_core.shutdown()
    return result


def _inputs(prompts: list) -> list:
    """Text prompts as they are; lists of ints as token ids."""
    return [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]


def _generate(llm, spec: dict, phase: dict) -> dict:
    params = _sampling(spec, phase)
    prompts = _inputs(phase["prompts"])
    if phase.get("sequential", spec.get("sequential")):
        # one request per step batch: every request runs alone
        each = params if isinstance(params, list) else [params] * len(prompts)
        outs = [llm.generate([p], k, use_tqdm=False)[0] for p, k in zip(prompts, each)]
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    res = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "prompt_lens": [len(o.prompt_token_ids) for o in outs],
        "texts": [o.outputs[0].text for o in outs],
    }
    if phase.get("logprobs", spec.get("logprobs")):
        # per generated token: [[token id, logprob], ...] best first
        res["logprobs"] = [[sorted(([t, lp.logprob] for t, lp in step.items()), key=lambda x: -x[1])
                            for step in o.outputs[0].logprobs] for o in outs]
    return res


def _prompt_logprobs(out) -> list:
    """Per prompt position 1..n-1: [logprob of the actual token, argmax id]."""
    rows = []
    for tid, step in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        top = min(step.items(), key=lambda kv: kv[1].rank)[0]
        rows.append([step[tid].logprob, top])
    return rows


def _cleanup() -> None:
    """Give the next engine of this process a clean distributed state and memory."""
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:  # noqa: BLE001 - best effort; the process ends soon
        pass
    gc.collect()


def _rank_decisions(llm) -> list:
    """Every worker rank's digest of the release decisions it applied."""

    def digest(worker):
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        return get_kv_transfer_group().decision_digest() if has_kv_transfer_group() else None

    return llm.collective_rpc(digest)


def _backend_names(llm) -> list[str]:
    """Attention backend class of each layer, read inside the worker."""

    def names(worker):
        from vllm.model_executor.layers.attention import Attention

        model = worker.model_runner.model
        return sorted({m.attn_backend.get_name() for m in model.modules() if isinstance(m, Attention)})

    try:
        return llm.collective_rpc(names)[0]
    except Exception as e:  # noqa: BLE001 - diagnostic only
        return [f"unknown: {e!r}"]


if __name__ == "__main__":
    main()
