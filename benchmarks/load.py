"""The OpenAI server under load: stock vLLM against ADAPTIVE presets, same run.

For each server (stock CPU_ATTN first, then each preset), on loopback:

1. **Mixed load** (``vllm_adaptive.loadgen``, the load test's mix): 100
   requests at once, 25 unique prompts up to ``max_model_len``, plain /
   streamed / abandoned mid-stream / dropped by the client; then each unique
   prompt served alone. Reports failures, answers that differ from alone,
   latency p50/p99 of the answered requests, wall time, vLLM's preemption
   count, and the blocks ADAPTIVE layers freed / released / rebuilt
   (``/metrics``); the pool audit checks leaks and double frees once idle.
2. **vLLM's own serving benchmark** (``vllm.benchmarks.serve``, random
   dataset): requests/s, TTFT and inter-token latency p50/p99.

    python benchmarks/load.py                       # every server below
    python benchmarks/load.py --servers stock longgen kivi4 adore

The KV pool is fixed (``--kv-bytes``) and small enough that stock vLLM must
preempt under the mix, so what each preset's capacity buys shows as fewer
preemptions. Results: ``benchmarks/results/load.json`` and ``load.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import RESULTS, meta

SERVERS = {
    "stock": None,
    "full": "full",
    # window 256: at a 1024-token context LongGen's default window (768) would keep everything
    "longgen": json.dumps({"preset": "longgen", "sink_window": {"sink": 64, "window": 256, "block": 32}}),
    "kivi4": "kivi4",
    "adore": json.dumps({"preset": "adore", "release": {"budget": 512, "sink": 64, "recent": 128,
                                                        "prefill_chunk": 128}}),
    # stock with the per-request prefill cap that `adore` sets (release.prefill_chunk ->
    # long_prefill_token_threshold): tells the cap's preemptions from the release layers'
    "stock-lp128": None,
}
#: extra server arguments of a server
EXTRA_ARGS = {"stock-lp128": ("--long-prefill-token-threshold", "128")}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def bench_serve(base: str, model_path: str, ns) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    out = Path(tempfile.mkdtemp())
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "vllm", "--base-url", base, "--endpoint", "/v1/completions", "--model", "smollm2",
        "--tokenizer", model_path, "--dataset-name", "random", "--random-input-len", str(ns.bench_input),
        "--random-output-len", str(ns.bench_output), "--num-prompts", str(ns.bench_prompts),
        "--max-concurrency", str(ns.bench_concurrency), "--ignore-eos", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(out), "--result-filename", "r.json",
    ])
    main(args)
    r = json.loads((out / "r.json").read_text())
    keep = ["completed", "failed", "duration", "request_throughput", "output_throughput",
            "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms", "p50_tpot_ms", "p99_tpot_ms"]
    return {k: r.get(k) for k in keep}


def run_server(name: str, preset: str | None, ns, mix, model_path: str, workdir: Path) -> dict:
    from vllm_adaptive.loadgen import compare, metric, run_load, serve_alone, wait_idle
    from vllm_adaptive.serving import served

    env = dict(os.environ)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env["VLLM_ADAPTIVE_AUDIT"] = "1"
    args = ("--dtype", ns.dtype, "--max-model-len", str(ns.max_model_len), "--max-num-seqs", "16",
            "--max-num-batched-tokens", str(ns.chunk), "--block-size", "32",
            "--kv-cache-memory-bytes", str(ns.kv_bytes), "--enforce-eager", *EXTRA_ARGS.get(name, ()))
    log = workdir / f"{name}.log"
    out: dict = {"server": name, "preset": preset or "stock CPU_ATTN", "extra_args": list(EXTRA_ARGS.get(name, ()))}
    with served(preset, args, env, log) as (base, _):
        t0 = time.perf_counter()
        answers = run_load(base, mix)
        out["load_wall_s"] = round(time.perf_counter() - t0, 1)
        idle = wait_idle(base)
        alone = serve_alone(base, mix)
        problems = compare(mix, answers, alone)
        answered = [a for a in answers if a.ok and a.mode in ("plain", "stream")]
        lat = [a.latency_s for a in answered]
        out.update({
            "requests": len(answers), "answered": len(answered),
            "failed": sum(not a.ok for a in answers),
            "differ_from_alone": sum("!= alone" in p for p in problems),
            "other_problems": [p for p in problems if "!= alone" not in p][:5],
            "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "ttft_p50_s": pct([a.ttft_s for a in answered if a.ttft_s is not None], 50),
            "preemptions": metric(idle, "vllm:num_preemptions_total"),
            "kv_usage_idle": metric(idle, "vllm:kv_cache_usage_perc"),
            "double_frees": metric(idle, "vllm_adaptive:kv_pool_double_frees_total"),
            "leaked_blocks": metric(idle, "vllm_adaptive:kv_pool_leaked_blocks"),
            "blocks_freed": metric(idle, "vllm_adaptive:kv_blocks_freed_total"),
            "blocks_released": metric(idle, "vllm_adaptive:kv_blocks_released_total"),
            "blocks_rebuilt": metric(idle, "vllm_adaptive:kv_blocks_rebuilt_total"),
            "capacity_vs_full": metric(idle, "vllm_adaptive:kv_capacity_vs_full"),
        })
        if ns.bench_prompts:
            out["bench_serve"] = bench_serve(base, model_path, ns)
    print(json.dumps(out), flush=True)
    return out


def write_md(rows: list[dict], ns, path: Path) -> None:
    f = lambda v, d=2: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"Command: `python benchmarks/load.py {' '.join(ns.argv)}`", "",
             "| server | answered / failed | differ from alone | latency p50 / p99 (s) | load wall (s) "
             "| preemptions | blocks freed / released / rebuilt | idle KV usage, leaked, double frees |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['server']} | {r['answered']} / {r['failed']} | {r['differ_from_alone']} "
            f"| {f(r['latency_p50_s'])} / {f(r['latency_p99_s'])} | {f(r['load_wall_s'], 1)} "
            f"| {f(r['preemptions'], 0)} | {f(r['blocks_freed'], 0)} / {f(r['blocks_released'], 0)} / "
            f"{f(r['blocks_rebuilt'], 0)} | {f(r['kv_usage_idle'])}, {f(r['leaked_blocks'], 0)}, "
            f"{f(r['double_frees'], 0)} |")
    if any("bench_serve" in r for r in rows):
        lines += ["", f"`vllm.benchmarks.serve`, random dataset, {ns.bench_prompts} prompts x "
                  f"{ns.bench_input} in + {ns.bench_output} out, max concurrency {ns.bench_concurrency}:", "",
                  "| server | completed / failed | req/s | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            b = r.get("bench_serve")
            if b:
                lines.append(f"| {r['server']} | {b['completed']} / {b['failed']} | {f(b['request_throughput'], 3)} "
                             f"| {f(b['output_throughput'], 1)} | {f(b['p50_ttft_ms'], 0)} / {f(b['p99_ttft_ms'], 0)} "
                             f"| {f(b['p50_itl_ms'], 0)} / {f(b['p99_itl_ms'], 0)} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=list(SERVERS))
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-bytes", type=int, default=96 * 2**20)
    p.add_argument("--chunk", type=int, default=256, help="--max-num-batched-tokens")
    # float32: this CPU has no fast bfloat16 GEMMs (bf16 prefill ran at ~50-110 tok/s here)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--bench-prompts", type=int, default=32)
    p.add_argument("--bench-input", type=int, default=256)
    p.add_argument("--bench-output", type=int, default=32)
    p.add_argument("--bench-concurrency", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS / "load.json"))
    ns = p.parse_args()
    ns.argv = sys.argv[1:]
    from transformers import AutoTokenizer

    from vllm_adaptive.loadgen import make_requests
    from vllm_adaptive.model import default_model_path

    model_path = str(default_model_path())
    mix = make_requests(AutoTokenizer.from_pretrained(model_path), max_model_len=ns.max_model_len,
                        n=ns.requests, seed=0)
    workdir = Path(tempfile.mkdtemp(prefix="load-bench-"))
    rows = [run_server(name, SERVERS[name], ns, mix, model_path, workdir) for name in ns.servers]
    Path(ns.out).write_text(json.dumps({"meta": meta(["python", "benchmarks/load.py", *ns.argv]), "args": vars(ns) | {"argv": ns.argv}, "rows": rows},
                                       indent=1, default=str))
    write_md(rows, ns, Path(ns.out).with_suffix(".md"))
    print(Path(ns.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
