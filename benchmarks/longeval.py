"""Long-context quality of every preset beside stock vLLM: RULER-style tasks.

Question: at the KV capacity a preset claims, what does it still retrieve,
track and answer, against stock bf16 and stock fp8 KV in the same run?

Method: the six tasks of ``vllm_adaptive/longeval.py`` (single needle,
multi-key needle with distractors, multi-value needle, variable tracking,
frequent words, QA from one of several documents), generated offline from
Python's own reference documentation, at ``--lengths`` (prompt + answer
within each), ``--per-seed`` cases per task, length and seed, for each of
``--seeds``: every map sees the same prompts. Greedy decoding; a case scores
the fraction of its references found in the output (RULER's string match).
Each map runs in its own engine process (``--dtype`` bfloat16,
max_model_len = the longest length, eager, ``--kv-bytes`` of KV cache,
``--chunk`` tokens per step), all prompts as one ``generate`` batch, so
requests run concurrently as a server's would. Capacity is vLLM's own
accounting in that engine (``cache_config.kv_cache_max_concurrency``:
requests of max_model_len the KV cache holds) divided by stock bf16's
(``CPU_ATTN``) in the same run.

With ``--base-url`` the same cases go to an OpenAI-compatible completions
endpoint instead (any server; ``--name`` labels its row; capacity unknown).

Maps (``--maps``): as in passkey.py: a preset name, ``CPU_ATTN`` (stock),
``CPU_ATTN-fp8`` (stock with ``--kv-cache-dtype fp8``, where the CPU runs
it), or a JSON map file, optionally ``name=...``.

Usage:
  python benchmarks/longeval.py --maps CPU_ATTN CPU_ATTN-fp8 full kivi8 kivi4 kivi2 longgen adore
  python benchmarks/longeval.py --base-url http://127.0.0.1:8000/v1 --name my-server
Writes benchmarks/results/longeval.json (``--out``) and a plot beside it,
and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import (RESULTS, add_child_args, cpu_description, meta, release_stats, resolve_map, run_child,
                    run_subprocess, start_engine, write_doc)

from vllm_adaptive import longeval


def _cases(spec: dict) -> list:
    from transformers import AutoTokenizer

    from vllm_adaptive.model import default_model_path

    tok = AutoTokenizer.from_pretrained(spec.get("tokenizer") or default_model_path())
    return longeval.make_cases(tok, spec["tasks"], spec["lengths"], spec["seeds"], spec["per_seed"])


def run_one(spec: dict) -> dict:
    m = spec["map"]
    cases = _cases(spec)
    llm, start_s = start_engine(m, dtype=spec["dtype"], max_model_len=max(spec["lengths"]),
                                kv_cache_memory_bytes=spec["kv_bytes"], max_num_batched_tokens=spec["chunk"])
    t0 = time.time()
    outputs = longeval.run_offline(llm, cases)
    gen_s = time.time() - t0
    cc = llm.llm_engine.vllm_config.cache_config
    return {"map": m["name"], "start_s": round(start_s, 1), "generate_s": round(gen_s, 1),
            "kv_cache_max_concurrency": cc.kv_cache_max_concurrency,
            "kv_cache_size_tokens": cc.kv_cache_size_tokens, "release": release_stats(),
            "outputs": outputs}


def _score(res: dict, cases: list) -> None:
    res["scores"] = [longeval.score(c, o) for c, o in zip(cases, res["outputs"])]
    res["summary"] = longeval.summarize(cases, res["scores"])


def _capacity(r: dict, stock: dict | None) -> float | None:
    """vLLM's accounted capacity against stock bf16 (None when unknown)."""
    cap = r.get("kv_cache_max_concurrency")
    return None if cap is None or stock is None else cap / stock["kv_cache_max_concurrency"]


def _over_tasks(r: dict, tasks, length: int) -> tuple[float, float]:
    """(mean score, mean seed spread) over ``tasks`` at ``length``."""
    cells = [r["summary"][f"{t}@{length}"] for t in tasks]
    return (sum(c["score"] for c in cells) / len(cells), sum(c["seed_std"] for c in cells) / len(cells))


def tables(results: list[dict], tasks, lengths) -> str:
    stock = next((r for r in results if r["map"] == "CPU_ATTN"), None)
    out = []
    for L in lengths:
        out += [f"Context {L} tokens (score %, mean over seeds ± spread of the per-seed means; n per cell: "
                f"{results[0]['summary'][f'{tasks[0]}@{L}']['n']}):", "",
                "| map | capacity | " + " | ".join(tasks) + " | mean |", "|---|---|" + "---|" * (len(tasks) + 1)]
        for r in results:
            cap, rel = r.get("kv_cache_max_concurrency"), _capacity(r, stock)
            cap_s = "?" if cap is None else f"{rel:.2f}x" if rel is not None else f"{cap:.2f} req"
            cells = [r["summary"][f"{t}@{L}"] for t in tasks]
            mean = _over_tasks(r, tasks, L)[0]
            out.append(f"| {r['map']} | {cap_s} | " + " | ".join(f"{c['score']:.1f} ± {c['seed_std']:.1f}"
                                                             for c in cells) + f" | {mean:.1f} |")
        out.append("")
    return "\n".join(out)


def plot(results: list[dict], tasks, lengths, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"no plot ({path}): matplotlib is not installed (pip install -e \".[bench]\")")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    stock = next((r for r in results if r["map"] == "CPU_ATTN"), None)
    for r in results:
        means, errs = zip(*(_over_tasks(r, tasks, L) for L in lengths))
        rel = _capacity(r, stock)
        label = r["map"] if rel is None else f"{r['map']} ({rel:.1f}x capacity)"
        ax.errorbar(lengths, means, yerr=errs, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("mean score over tasks (%)")
    ax.set_ylim(0, 100)
    ax.set_title("RULER-style tasks, SmolLM2-135M: " + ", ".join(tasks), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--maps", nargs="+", default=["CPU_ATTN", "CPU_ATTN-fp8", "full", "kivi8", "kivi4", "kivi2",
                                                  "longgen", "adore"])
    ap.add_argument("--tasks", nargs="+", default=list(longeval.TASKS), choices=longeval.TASKS)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--per-seed", type=int, default=17, help="cases per task, length and seed (17 x 3 seeds = 51)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-bytes", type=int, default=2 << 30)
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--base-url", help="an OpenAI-compatible endpoint (.../v1) instead of offline engines")
    ap.add_argument("--model", default="smollm2", help="the model name the endpoint serves (--base-url)")
    ap.add_argument("--name", default="endpoint", help="the row's name (--base-url)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight (--base-url)")
    ap.add_argument("--tokenizer", help="tokenizer to size prompts with (default: the embedded model)")
    ap.add_argument("--out", default=str(RESULTS / "longeval.json"))
    ap.add_argument("--merge", action="store_true", help="keep the other maps already in --out (same settings)")
    add_child_args(ap, sequential=False)
    ns = ap.parse_args()
    if run_child(ns, run_one):
        return
    settings = {"tasks": ns.tasks, "lengths": ns.lengths, "seeds": ns.seeds, "per_seed": ns.per_seed,
                "dtype": ns.dtype, "kv_bytes": ns.kv_bytes, "chunk": ns.chunk, "tokenizer": ns.tokenizer}
    cases = _cases(settings)
    print(f"{len(cases)} cases, {sum(c.prompt_tokens for c in cases):,} prompt tokens; {cpu_description()}",
          flush=True)
    results = []
    if ns.base_url:
        t0 = time.time()
        outputs = longeval.run_openai(ns.base_url, ns.model, cases, ns.concurrency)
        results.append({"map": ns.name, "source": ns.base_url, "generate_s": round(time.time() - t0, 1),
                        "outputs": outputs})
        _score(results[-1], cases)
    kept = []
    if ns.merge and Path(ns.out).is_file():
        old = json.loads(Path(ns.out).read_text())
        if old["meta"]["settings"] != settings:
            sys.exit(f"--merge: {ns.out} was run with other settings: {old['meta']['settings']}")
        kept = old["maps"]

    def save() -> list[dict]:  # after every map: an hour-long run keeps what it finished
        names = {r["map"] for r in results}
        every = [r for r in kept if r["map"] not in names] + results
        write_doc(ns.out, {"meta": {**meta(sys.argv), "cpu": cpu_description(), "settings": settings},
                           "maps": every})
        return every

    if not ns.base_url:
        for m in (resolve_map(a) for a in ns.maps):
            res = run_subprocess(__file__, {**settings, "map": m})
            res["adaptive_attention"], res["source"] = m["adaptive_attention"], m["source"]
            _score(res, cases)
            results.append(res)
            save()
            print(f"{m['name']}: engine start {res['start_s']} s, generate {res['generate_s']} s", flush=True)
    results = save()
    plot(results, ns.tasks, ns.lengths, str(Path(ns.out).with_suffix(".png")))
    print(cpu_description())
    print(tables(results, ns.tasks, ns.lengths))


if __name__ == "__main__":
    main()
