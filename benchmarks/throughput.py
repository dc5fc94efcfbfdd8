"""Prefill and decode tokens/s of ADAPTIVE layer maps against stock CPU_ATTN, same run.

Question: what does routing attention through the plugin cost (``full``), and
what do LongGen's sparse layers (``longgen``, ``longgen-strided``, calibrated
maps) gain, at long context with a batch?

For each context length L and configuration, one engine (own process, bf16)
gets a batch of B prompts of exactly L distinct random token ids, max_tokens
N+1, all added at once and driven step by step (LLMEngine.step):

  prefill tok/s = B*L / (time until every request has its first token)
     (chunked prefill: early requests' first decode tokens ride along in
     those steps, a few tokens against B*L)
  decode tok/s  = B * steps / elapsed, between the step where every request
     has its first token and the step where the first request finishes:
     each of those steps decodes exactly one token for all B requests

Prefix caching is off in every configuration (sparse layers cannot use it).
A warm-up request of 16 tokens runs first.

Usage:
  python benchmarks/throughput.py --lengths 8000 --batch 8 --decode-tokens 64 \
      --configs stock full longgen
Writes benchmarks/results/throughput.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from common import (RESULTS, add_child_args, engine_kwargs, meta, resolve_map, run_child, run_subprocess,
                    write_doc)


def config_map(config: str) -> dict:
    """``stock`` = CPU_ATTN; anything else is an ``adaptive_attention`` value
    (a preset name or a path to a JSON file holding one; common.resolve_map)."""
    stock = {"stock": "CPU_ATTN", "stock-fp8": "CPU_ATTN-fp8"}
    return resolve_map(stock.get(config, config))


def run_one(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    L, B, N = spec["length"], spec["batch"], spec["decode_tokens"]
    llm = LLM(**engine_kwargs(
        config_map(spec["config"]), dtype=spec["dtype"], max_model_len=min(8192, L + N + 16),
        max_num_seqs=B, max_num_batched_tokens=spec["chunk"], enable_prefix_caching=False,
        enforce_eager=False,
    ))
    import random

    rng = random.Random(spec["length"])
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 40000) for _ in range(L)]) for _ in range(B)]

    llm.generate([TokensPrompt(prompt_token_ids=list(range(100, 116)))],
                 SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up

    engine = llm.llm_engine
    sp = SamplingParams(temperature=0, max_tokens=N + 1, ignore_eos=True)
    t_add = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"d{i}", prompt, sp)
    produced: dict[str, int] = {}
    t_all_started = steps = None
    t_first_done = None
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            produced[o.request_id] = len(o.outputs[0].token_ids)
        if t_all_started is None:
            if len(produced) == B and min(produced.values()) >= 1:
                t_all_started, steps, start_tokens = now, 0, dict(produced)
        elif t_first_done is None:
            steps += 1
            if any(o.finished for o in outs):
                t_first_done = now
                decoded = {r: produced[r] - start_tokens[r] for r in produced}
    if t_first_done is None or len(set(decoded.values())) != 1:
        raise RuntimeError(f"decode window not clean: {decoded if t_first_done else 'none'}")
    p = t_all_started - t_add
    cache = engine.vllm_config.cache_config
    return {
        **spec, "prefill_s": p, "decode_steps": steps, "decode_window_s": t_first_done - t_all_started,
        "prefill_tok_s": B * L / p, "decode_tok_s": B * steps / (t_first_done - t_all_started),
        "kv_cache_tokens": cache.num_gpu_blocks * cache.block_size,
        "loadavg_1m_at_end": os.getloadavg()[0],
        "kv_cache_max_concurrency": getattr(cache, "kv_cache_max_concurrency", None),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunk", type=int, default=4096, help="max_num_batched_tokens")
    ap.add_argument("--configs", nargs="+", default=["stock", "full", "longgen"],
                    help="'stock' (CPU_ATTN) or adaptive_attention values / JSON paths")
    ap.add_argument("--out", default=str(RESULTS / "throughput.json"))
    add_child_args(ap, sequential=False)
    ns = ap.parse_args()
    if run_child(ns, run_one):
        return
    rows = []
    for L in ns.lengths:
        for config in ns.configs:
            spec = dict(config=config, length=L, batch=ns.batch, decode_tokens=ns.decode_tokens,
                        dtype=ns.dtype, chunk=ns.chunk)
            rows.append(run_subprocess(__file__, spec))
            print(json.dumps(rows[-1]), flush=True)
    doc_meta = {**meta(sys.argv), "kv_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE")}
    write_doc(ns.out, {"meta": doc_meta, "rows": rows})
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| context | batch | config | prefill tok/s | decode tok/s | prefill vs stock | decode vs stock |",
             "|---|---|---|---|---|---|---|"]
    stock = {r["length"]: r for r in rows if r["config"] == "stock"}
    for r in rows:
        s = stock.get(r["length"])
        pr = f"{r['prefill_tok_s'] / s['prefill_tok_s']:.2f}x" if s else "-"
        dr = f"{r['decode_tok_s'] / s['decode_tok_s']:.2f}x" if s else "-"
        lines.append(f"| {r['length']} | {r['batch']} | {r['config']} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.1f} | {pr} | {dr} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
