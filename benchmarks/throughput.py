"""Prefill and decode tokens/s: ADAPTIVE(full) against stock CPU_ATTN, same run.

Question: does routing attention through the plugin cost throughput?
For each context length L and backend, one engine (own process) runs a batch
of B prompts of exactly L tokens (distinct random token ids, so no prefix is
shared between prompts) three times:

  P  max_tokens=1, cold cache   -> prefill tok/s = B*L / P
  C  max_tokens=1, prefix-cached (only the last block is recomputed)
  D  max_tokens=1+N, prefix-cached -> decode tok/s = B*N / (D - C)

Usage:
  python benchmarks/throughput.py --lengths 2048 8192 --batch 8 --decode-tokens 64
Writes benchmarks/results/throughput.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_one(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_adaptive.model import default_model_path

    L, B, N = spec["length"], spec["batch"], spec["decode_tokens"]
    llm = LLM(
        model=str(default_model_path()), attention_backend=spec["backend"],
        dtype=spec["dtype"], max_model_len=min(8192, L + N + 16), max_num_seqs=B,
        max_num_batched_tokens=spec["chunk"], enable_prefix_caching=True, seed=0,
    )
    import random

    rng = random.Random(spec["length"])
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 40000) for _ in range(L)]) for _ in range(B)]

    def timed(max_tokens):
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t, outs

    p, _ = timed(1)
    c, _ = timed(1)
    d, outs = timed(1 + N)
    assert all(len(o.outputs[0].token_ids) == 1 + N for o in outs)
    kv_tokens = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks * llm.llm_engine.vllm_config.cache_config.block_size
    return {
        **spec, "prefill_s": p, "cached_prefill_s": c, "decode_run_s": d,
        "prefill_tok_s": B * L / p, "decode_tok_s": B * N / (d - c),
        "kv_cache_tokens": kv_tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunk", type=int, default=4096, help="max_num_batched_tokens")
    ap.add_argument("--backends", nargs="+", default=["CPU_ATTN", "ADAPTIVE"])
    ap.add_argument("--out", default=str(HERE / "results" / "throughput.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.one:
        print("RESULT " + json.dumps(run_one(json.loads(ns.one))), flush=True)
        return
    rows = []
    for L in ns.lengths:
        for backend in ns.backends:
            spec = dict(backend=backend, length=L, batch=ns.batch, decode_tokens=ns.decode_tokens,
                        dtype=ns.dtype, chunk=ns.chunk)
            out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                                 capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"run failed for {spec}:\n{(out.stdout + out.stderr)[-4000:]}")
            rows.append(json.loads(line[-1][7:]))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "kv_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"), "command": " ".join(sys.argv)}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| context | batch | backend | prefill tok/s | decode tok/s | prefill vs stock | decode vs stock |",
             "|---|---|---|---|---|---|---|"]
    stock = {r["length"]: r for r in rows if r["backend"] == "CPU_ATTN"}
    for r in rows:
        s = stock.get(r["length"])
        pr = f"{r['prefill_tok_s'] / s['prefill_tok_s']:.2f}x" if s else "-"
        dr = f"{r['decode_tok_s'] / s['decode_tok_s']:.2f}x" if s else "-"
        lines.append(f"| {r['length']} | {r['batch']} | {r['backend']} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.1f} | {pr} | {dr} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
