"""Run one offline engine configuration and print its result as JSON.

Usage: python tests/engine_runner.py '{"backend": "ADAPTIVE", ...}'

Kept out of the pytest process so every configuration gets a fresh vLLM
(EngineCore and worker processes included) and its memory back afterwards.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
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
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend"):
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
        import tempfile

        from vllm_adaptive.importance.channel import STATS_ENV

        stats_path = os.path.join(tempfile.mkdtemp(), "release.json")
        os.environ[STATS_ENV] = stats_path
    if "long_prefill_token_threshold" in spec:
        kwargs["long_prefill_token_threshold"] = spec["long_prefill_token_threshold"]
    t0 = time.time()
    llm = LLM(**kwargs)
    start_s = time.time() - t0
    layer_backends = _backend_names(llm)
    params = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 64), ignore_eos=True)
    if spec.get("sequential"):
        # One request per step batch: rules out timing-dependent batch
        # composition (requests reach EngineCore asynchronously), which in
        # bf16 can change GEMM shapes and so flip near-tied greedy tokens.
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in spec["prompts"]]
    else:
        outs = llm.generate(spec["prompts"], params, use_tqdm=False)
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
    result = {
        "rank_decisions": _rank_decisions(llm) if spec.get("rank_decisions") else None,
        "release": release,
        "metrics": metrics,
        "num_gpu_blocks": cache.num_gpu_blocks,
        "kv_cache_size_tokens": getattr(cache, "kv_cache_size_tokens", None),
        "kv_cache_max_concurrency": getattr(cache, "kv_cache_max_concurrency", None),
        "enable_prefix_caching": cache.enable_prefix_caching,
        "start_s": start_s,
        "backends": layer_backends,
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "prompt_lens": [len(o.prompt_token_ids) for o in outs],
        "texts": [o.outputs[0].text for o in outs],
    }
    print("RESULT " + json.dumps(result), flush=True)


def _rank_decisions(llm) -> list:
    """Every worker rank's digest of the release decisions it applied."""

    def digest(worker):
        from vllm_adaptive.importance.channel import current_worker

        w = current_worker()
        return None if w is None else w.decision_digest()

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
