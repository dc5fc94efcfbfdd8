"""Every preset through vLLM's Ray executor: TP=3 and PP=2 against one process.

Greedy float32 tokens of the same prompts (three short, two of ~1.5K tokens
with a code to retrieve), per preset: one process, then Ray with tensor
parallelism 3, then Ray with pipeline parallelism 2 (each in a fresh process,
joining the Ray cluster at ``RAY_ADDRESS``, or starting a local one).
Reports, per preset and layout, whether the engine started, how many prompts
gave the same tokens as one process (and the first differing position), and
for release presets the blocks released. Release presets use budget 512 so
the long prompts release blocks.

    ray start --head --port 6390 --resources '{"vllm_cpu": 3}'   # RAY_AUTH_MODE=disabled on loopback
    RAY_ADDRESS=127.0.0.1:6390 python benchmarks/ray_presets.py

Results: ``benchmarks/results/ray_presets.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vllm_adaptive.text import warehouse_prompt

from common import RESULTS, add_child_args, meta, run_child, run_subprocess, start_engine, release_stats, write_doc

PRESETS = ["full", "longgen", "longgen-strided", "kivi8", "kivi4", "kivi2", "longgen-kivi4", "adore",
           "longgen-adore"]
SMALL_RELEASE = {"budget": 512, "sink": 64, "recent": 128, "prefill_chunk": 128}
LAYOUTS = {"single": {}, "tp3": {"tensor_parallel_size": 3}, "pp2": {"pipeline_parallel_size": 2}}
PROMPTS = ["Hello", "The capital of France is", "Write a short poem about the sea.",
           warehouse_prompt(110, 5, "48213"), warehouse_prompt(90, 60, "77105")]


def amap_of(preset: str):
    return {"preset": preset, "release": SMALL_RELEASE} if "adore" in preset else preset


def run_one(spec: dict) -> dict:
    from vllm import SamplingParams

    m = {"name": spec["preset"], "backend": "ADAPTIVE", "adaptive_attention": amap_of(spec["preset"])}
    kw = dict(dtype="float32", max_model_len=2048, block_size=32, max_num_batched_tokens=128,
              long_prefill_token_threshold=128, kv_cache_memory_bytes=512 * 2**20, **LAYOUTS[spec["layout"]])
    if spec["layout"] != "single":
        kw["distributed_executor_backend"] = "ray"
    llm, start_s = start_engine(m, **kw)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    st = release_stats()
    return {"token_ids": [list(o.outputs[0].token_ids) for o in outs], "texts": [o.outputs[0].text for o in outs],
            "start_s": round(start_s, 1),
            "released": sum(g["released"] for g in st.values()) if st else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--out", default=str(RESULTS / "ray_presets.json"))
    add_child_args(ap, sequential=False)
    ns = ap.parse_args()
    if run_child(ns, run_one):
        return
    env = dict(os.environ)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    rows = []
    for preset in ns.presets:
        single = run_subprocess(__file__, {"preset": preset, "layout": "single"}, env=env)
        for layout in ("tp3", "pp2"):
            try:
                r = run_subprocess(__file__, {"preset": preset, "layout": layout}, env=env)
            except SystemExit as e:  # the engine failed: record it, go on
                rows.append({"preset": preset, "layout": layout, "error": str(e)[-2000:]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            first_diff = []
            for a, b in zip(single["token_ids"], r["token_ids"]):
                first_diff.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None))
            row = {"preset": preset, "layout": layout, "same_prompts": sum(d is None for d in first_diff),
                   "of": len(first_diff), "first_diff": first_diff, "released_single": single["released"],
                   "released": r["released"], "texts_single": single["texts"][3:], "texts": r["texts"][3:]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_doc(ns.out, {"meta": meta([sys.executable, *sys.argv]), "rows": rows})
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<15} {r['layout']}: FAILED")
            continue
        print(f"{r['preset']:<15} {r['layout']}: {r['same_prompts']}/{r['of']} same tokens, first diff "
              f"{r['first_diff']}, released {r['released']} (single {r['released_single']})")


if __name__ == "__main__":
    main()
