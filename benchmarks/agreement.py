"""Greedy agreement of ADAPTIVE with stock CPU_ATTN, same run, same prompts.

Question: how closely do the plugin's kernel paths track stock vLLM at a given
dtype? Runs the engine tests' prompt set (``vllm_adaptive.text.SAMPLE_PROMPTS``:
8 ragged prompts, chunked prefill forced by a 128-token step budget, block
size 32, the settings of tests/test_engine.py) once per configuration, each
engine in its own process, and reports, per configuration, the share of
prompts whose 64 greedy tokens equal stock's and the mean length of the
common prefix. A second stock run is the noise floor: batched runs are not
bit-reproducible in bf16.

Usage: python benchmarks/agreement.py --dtype bfloat16
Writes benchmarks/results/agreement_<dtype>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse

from common import RESULTS, add_child_args, engine_kwargs, run_child, run_subprocess, write_doc

CONFIGS = {
    "CPU_ATTN": None,
    # noise floor: the same stock configuration again (batch composition
    # depends on when requests reach EngineCore)
    "CPU_ATTN (second run)": None,
    "ADAPTIVE kernels=auto (vllm_cpu)": "full",
    "ADAPTIVE kernels=torch": {"preset": "full", "kernels": "torch"},
}


def run_one(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_adaptive.text import SAMPLE_PROMPTS

    amap = spec["adaptive_attention"]
    m = {"backend": "CPU_ATTN" if amap is None else "ADAPTIVE", "adaptive_attention": amap}
    llm = LLM(**engine_kwargs(m, dtype=spec["dtype"], max_model_len=4096, block_size=32,
                              enable_chunked_prefill=True, max_num_batched_tokens=128,
                              max_num_seqs=16))
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    outs = llm.generate(list(SAMPLE_PROMPTS), sp, use_tqdm=False)
    return {"token_ids": [list(o.outputs[0].token_ids) for o in outs],
            "prompt_lens": [len(o.prompt_token_ids) for o in outs]}


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
    add_child_args(ap, sequential=False)
    ns = ap.parse_args()
    if run_child(ns, run_one):
        return
    runs = {name: run_subprocess(__file__, {"adaptive_attention": amap, "dtype": ns.dtype})
            for name, amap in CONFIGS.items()}
    stock = runs.pop("CPU_ATTN")
    rows = []
    for name, got in runs.items():
        prefixes = [common_prefix(a, b) for a, b in zip(got["token_ids"], stock["token_ids"])]
        total = sum(len(t) for t in stock["token_ids"])
        rows.append({
            "config": name, "dtype": ns.dtype, "prompts": len(prefixes),
            "identical_prompts": sum(p == len(t) for p, t in zip(prefixes, stock["token_ids"])),
            "mean_common_prefix": sum(prefixes) / len(prefixes),
            "matching_tokens_before_first_divergence": f"{sum(prefixes)}/{total}",
        })
    write_doc(str(RESULTS / f"agreement_{ns.dtype}.json"), {"prompt_lens": stock["prompt_lens"], "rows": rows})
    print("| config | dtype | identical / prompts | mean common prefix (of 64) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['dtype']} | {r['identical_prompts']}/{r['prompts']} | {r['mean_common_prefix']:.1f} |")


if __name__ == "__main__":
    main()
