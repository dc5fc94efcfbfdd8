"""Greedy agreement of ADAPTIVE with stock CPU_ATTN, same run, same prompts.

Question: how closely do the plugin's kernel paths track stock vLLM at a given
dtype? Runs the engine-test prompt set (8 ragged prompts, chunked prefill
forced) once per configuration, each engine in its own process, and reports,
per configuration, the share of prompts whose 64 greedy tokens equal stock's
and the mean length of the common prefix. A second stock run is the noise
floor: batched runs are not bit-reproducible in bf16.

Usage: python benchmarks/agreement.py --dtype bfloat16
Writes benchmarks/results/agreement_<dtype>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import run_engine  # noqa: E402
from test_engine import BASE  # noqa: E402


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ns = ap.parse_args()
    configs = {
        # noise floor: the same stock configuration again (batch composition
        # depends on when requests reach EngineCore)
        "CPU_ATTN (second run)": dict(backend="CPU_ATTN"),
        "ADAPTIVE kernels=auto (vllm_cpu)": dict(backend="ADAPTIVE"),
        "ADAPTIVE kernels=torch": dict(backend="ADAPTIVE", adaptive_attention={"preset": "full", "kernels": "torch"}),
    }
    stock = run_engine({**BASE, "backend": "CPU_ATTN", "dtype": ns.dtype})
    rows = []
    for name, spec in configs.items():
        got = run_engine({**BASE, **spec, "dtype": ns.dtype})
        prefixes = [common_prefix(a, b) for a, b in zip(got["token_ids"], stock["token_ids"])]
        total = sum(len(t) for t in stock["token_ids"])
        rows.append({
            "config": name, "dtype": ns.dtype, "prompts": len(prefixes),
            "identical_prompts": sum(p == len(t) for p, t in zip(prefixes, stock["token_ids"])),
            "mean_common_prefix": sum(prefixes) / len(prefixes),
            "matching_tokens_before_first_divergence": f"{sum(prefixes)}/{total}",
        })
    out = HERE / "results" / f"agreement_{ns.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompt_lens": stock["prompt_lens"], "rows": rows}, indent=1))
    print("| config | dtype | identical / prompts | mean common prefix (of 64) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['dtype']} | {r['identical_prompts']}/{r['prompts']} | {r['mean_common_prefix']:.1f} |")


if __name__ == "__main__":
    main()
