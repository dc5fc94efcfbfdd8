"""The throughput that KV capacity buys: N requests of L prompt tokens and T
new tokens each, all submitted at once to an engine with a fixed KV space, run
to completion; requests per second end to end, with vLLM's preemption count
and the most requests it ran at once.

    python benchmarks/served.py --maps CPU_ATTN kivi4 --requests 32 --prompt-tokens 4096 \\
        --max-tokens 64 --kv-bytes 1073741824

The issue's setting is 32 x 4K + 64 in 1 GiB; on a slow CPU the same ratios
(requests per KV space) hold with shorter prompts in a proportionally smaller
KV space (``--prompt-tokens 512 --kv-bytes 134217728``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from common import RESULTS, add_child_args, meta, resolve_map, run_child, run_subprocess, start_engine, write_doc


def run_one(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    m = spec["map"]
    llm, start_s = start_engine(
        m, kv_cache_memory_bytes=spec["kv_bytes"], max_num_batched_tokens=spec["chunk"],
        max_model_len=spec["prompt_tokens"] + spec["max_tokens"] + 16, disable_log_stats=False,
        max_num_seqs=spec["requests"], enable_prefix_caching=False,
    )
    engine = llm.llm_engine
    rng = random.Random(spec["seed"])
    sp = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    t0 = time.perf_counter()
    for i in range(spec["requests"]):
        ids = [rng.randrange(100, 40000) for _ in range(spec["prompt_tokens"])]
        engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=ids), sp)
    done, max_running, steps = 0, 0, 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        done += sum(o.finished for o in outs)
        g = {x.name: getattr(x, "value", 0) for x in llm.get_metrics()}
        max_running = max(max_running, int(g.get("vllm:num_requests_running", 0)))
    wall = time.perf_counter() - t0
    g = {x.name: getattr(x, "value", 0) for x in llm.get_metrics()}
    cc = engine.vllm_config.cache_config
    return {"map": m["name"], "requests": spec["requests"], "finished": done,
            "prompt_tokens": spec["prompt_tokens"], "max_tokens": spec["max_tokens"],
            "kv_bytes": spec["kv_bytes"], "num_gpu_blocks": cc.num_gpu_blocks,
            "kv_cache_max_concurrency": cc.kv_cache_max_concurrency,
            "wall_s": round(wall, 1), "req_per_s": done / wall, "steps": steps,
            "max_running": max_running, "preemptions": int(g.get("vllm:num_preemptions", 0)),
            "start_s": round(start_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--maps", nargs="+", default=["CPU_ATTN", "kivi4"])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-bytes", type=int, default=1 << 30)
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "served.json"))
    add_child_args(ap, sequential=False)
    ns = ap.parse_args()
    if run_child(ns, run_one):
        return
    rows = []
    for name in ns.maps:
        spec = dict(map=resolve_map(name), requests=ns.requests, prompt_tokens=ns.prompt_tokens,
                    max_tokens=ns.max_tokens, kv_bytes=ns.kv_bytes, chunk=ns.chunk, seed=ns.seed)
        rows.append(run_subprocess(__file__, spec))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["req_per_s"]
    lines = ["| config | KV blocks | most running | preemptions | wall (s) | req/s | vs first |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['map']} | {r['num_gpu_blocks']} | {r['max_running']} | {r['preemptions']} "
                     f"| {r['wall_s']} | {r['req_per_s']:.3f} | {r['req_per_s'] / base:.2f}x |")
    write_doc(ns.out, {"meta": meta(sys.argv), "rows": rows})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
