"""Passkey retrieval of LongGen layer maps against full attention.

Question: does a hybrid layer map (some layers full, the rest sink+window or
strided, with their out-of-pattern KV blocks freed) still find a 5-digit key
hidden anywhere in a long prompt?

Method: the standard passkey prompt (Mohtashami & Jaggi 2023, as in their
code): a task line ("There is an important info hidden inside a lot of
irrelevant text. ..."), then the filler "The grass is green. The sky is blue.
The sun is yellow. Here we go. There and back again." repeated, with the needle
"The pass key is NNNNN. Remember it. NNNNN is the pass key." on its own line
after the filler repeat nearest to the depth (0 = start, 1 = end), then "What
is the pass key? The pass key is". Lengths are tokens of the whole prompt (at
most the target, within one filler repeat). ``--format plain`` (default) feeds
that text as is; ``--format chat`` renders the model's chat template with the
question as the user turn and "The pass key is" continued as the assistant
turn. Plain was chosen because full attention retrieved 24/25 keys with it
against 20/25 with chat (see RESULTS.md). Keys are random 5-digit numbers from
``random.Random(f"{seed}-{length}-{depth}-{rep}")``, so every map sees the
same prompts. Greedy decoding, 16 new tokens (the model sometimes restates
"the pass key. Remember it." before the digits); a prompt counts as retrieved
when the key's 5 digits occur in the output ("key first": the output starts
with them). Every map runs in its own engine process (bfloat16,
max_model_len 8192, eager, 1 GiB KV cache, max_num_batched_tokens 2048), all
its prompts as one ``generate`` batch, or one prompt per ``generate`` call with
``--sequential``.

Maps (``--maps``): a preset name (``full``, ``longgen``, ``longgen-strided``),
``CPU_ATTN`` (stock vLLM attention, no plugin config), or a JSON file written
by ``vllm-adaptive calibrate`` (its ``adaptive_attention`` key is the map),
optionally named ``name=path``.

Usage:
  python benchmarks/passkey.py --sequential --maps full longgen longgen-strided \\
      benchmarks/results/calibrated_sink_window.json benchmarks/results/calibrated_strided.json
Writes benchmarks/results/passkey.json and prints markdown tables.

The map, engine and child-process helpers live in ``benchmarks/common.py``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from common import (DEFAULT_MAPS, RESULTS, add_child_args, full_layers_of, generate, meta,
                    release_stats, resolve_map, run_child, run_subprocess, start_engine, write_doc)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
# The task description of the original passkey test (Mohtashami & Jaggi, 2023).
PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
            "memorize them. I will quiz you about the important information there.")


# ----------------------------------------------------------------------------- prompts
def build_prompt(tok, length: int, depth: float, key: str, fmt: str, preamble: bool = True) -> list[int]:
    """Token ids of a passkey prompt of at most ``length`` tokens (within one filler repeat)."""
    def render(n: int) -> list[int]:
        k = round(depth * n)
        # the original's layout: one line each for the task, the filler before
        # the needle, the needle, the filler after it and the question
        lines = [" ".join([FILLER] * k), NEEDLE.format(key=key), " ".join([FILLER] * (n - k))]
        lines = [PREAMBLE] * preamble + [l for l in lines if l]
        context = "\n".join(lines)
        if fmt == "plain":
            text = f"{context}\n{QUESTION} {ANSWER_PREFIX}"
            return tok(text, add_special_tokens=False)["input_ids"]
        msgs = [{"role": "user", "content": f"{context}\n{QUESTION}"},
                {"role": "assistant", "content": ANSWER_PREFIX}]
        text = tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    per = len(tok(" " + FILLER, add_special_tokens=False)["input_ids"])
    n = max(1, (length - len(render(0))) // per)
    ids = render(n)
    while len(ids) > length and n > 1:  # land at or just under the target
        n -= 1
        ids = render(n)
    return ids


def make_cases(tok, lengths, depths, reps, seed, fmt, preamble=True) -> list[dict]:
    cases = []
    for L in lengths:
        for d in depths:
            for r in range(reps):
                key = str(random.Random(f"{seed}-{L}-{d}-{r}").randrange(10000, 100000))
                ids = build_prompt(tok, L, d, key, fmt, preamble)
                cases.append({"length": L, "depth": d, "rep": r, "key": key, "prompt_ids": ids})
    return cases


# ----------------------------------------------------------------------------- one engine
def run_one(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    m = spec["map"]
    llm, start_s = start_engine(m, kv_cache_memory_bytes=spec["kv_bytes"],
                                max_num_batched_tokens=spec["chunk"])
    cases = spec["cases"]
    sp = SamplingParams(temperature=0, max_tokens=spec["max_tokens"])
    t0 = time.time()
    prompts = [TokensPrompt(prompt_token_ids=c["prompt_ids"]) for c in cases]
    outs = generate(llm, prompts, sp, spec.get("sequential", False))
    gen_s = time.time() - t0
    rows = []
    for c, o in zip(cases, outs):
        text = o.outputs[0].text
        rows.append({"length": c["length"], "depth": c["depth"], "rep": c["rep"], "key": c["key"],
                     "prompt_tokens": len(o.prompt_token_ids), "output": text,
                     "correct": c["key"] in text,
                     "strict": text.strip().startswith(c["key"])})
    cc = llm.llm_engine.vllm_config.cache_config
    return {"map": m["name"], "start_s": round(start_s, 1), "generate_s": round(gen_s, 1),
            "prompt_tokens_total": sum(r["prompt_tokens"] for r in rows),
            "block_size": cc.block_size, "release": release_stats(), "rows": rows}


# ----------------------------------------------------------------------------- report
def summarize(res: dict, lengths) -> dict:
    by_len = {}
    for L in lengths:
        rs = [r for r in res["rows"] if r["length"] == L]
        by_len[str(L)] = sum(r["correct"] for r in rs) / len(rs)
    rows = res["rows"]
    return {"per_length": by_len, "overall": sum(r["correct"] for r in rows) / len(rows),
            "correct": sum(r["correct"] for r in rows), "total": len(rows),
            "strict_overall": sum(r["strict"] for r in rows) / len(rows)}


def tables(results: list[dict], lengths, depths) -> str:
    out = ["| map | full layers | " + " | ".join(f"{L}" for L in lengths) + " | overall | key first |",
           "|---|---|" + "---|" * len(lengths) + "---|---|"]
    for r in results:
        s = r["summary"]
        fl = r["full_layers"]
        fl_s = "all (stock)" if fl is None else ("all" if len(fl) == 30 else ",".join(map(str, fl)))
        out.append(f"| {r['map']} | {fl_s} | " + " | ".join(f"{s['per_length'][str(L)]:.0%}" for L in lengths)
                   + f" | {s['overall']:.0%} ({s['correct']}/{s['total']}) | {s['strict_overall']:.0%} |")
    out += ["", "Per depth (all lengths):", "",
            "| map | " + " | ".join(f"depth {d}" for d in depths) + " |",
            "|---|" + "---|" * len(depths)]
    for r in results:
        cells = []
        for d in depths:
            rs = [x for x in r["rows"] if x["depth"] == d]
            cells.append(f"{sum(x['correct'] for x in rs)}/{len(rs)}")
        out.append(f"| {r['map']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--maps", nargs="+", default=DEFAULT_MAPS)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 6144, 7680])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--reps", type=int, default=1, help="keys per (length, depth)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=["chat", "plain"], default="plain")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv-bytes", type=int, default=1 << 30)
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--out", default=str(RESULTS / "passkey.json"))
    ap.add_argument("--no-preamble", action="store_true", help="leave out the task description line")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other maps already in --out (same settings required)")
    add_child_args(ap)
    ns = ap.parse_args()
    if run_child(ns, run_one):
        return
    from transformers import AutoTokenizer

    from vllm_adaptive.model import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    cases = make_cases(tok, ns.lengths, ns.depths, ns.reps, ns.seed, ns.format, not ns.no_preamble)
    maps = [resolve_map(a) for a in ns.maps]
    results = []
    for m in maps:
        spec = {"map": m, "cases": cases, "max_tokens": ns.max_tokens, "kv_bytes": ns.kv_bytes,
                "chunk": ns.chunk, "sequential": ns.sequential}
        res = run_subprocess(__file__, spec)
        res["adaptive_attention"] = m["adaptive_attention"]
        res["full_layers"] = full_layers_of(m["adaptive_attention"])
        res["source"] = m["source"]
        res["summary"] = summarize(res, ns.lengths)
        results.append(res)
        print(f"{m['name']}: {res['summary']} (engine start {res['start_s']} s, generate "
              f"{res['generate_s']} s for {res['prompt_tokens_total']} prompt tokens)", flush=True)
        wrong = [f"{r['length']}@{r['depth']}:{r['key']}->{r['output']!r}" for r in res["rows"] if not r["correct"]]
        if wrong:
            print("  misses: " + "; ".join(wrong[:12]), flush=True)
    settings = {"format": ns.format, "preamble": not ns.no_preamble, "lengths": ns.lengths,
                "depths": ns.depths, "reps": ns.reps, "seed": ns.seed, "max_tokens": ns.max_tokens,
                "kv_cache_memory_bytes": ns.kv_bytes, "max_num_batched_tokens": ns.chunk,
                "dtype": "bfloat16", "sequential": ns.sequential}
    results, commands = merge(ns.out, results, settings) if ns.merge else (results, [])
    doc = {"meta": {**meta(sys.argv), "settings": settings, "earlier_commands": commands},
           "maps": results}
    write_doc(ns.out, doc)
    print(tables(results, ns.lengths, ns.depths))


def merge(path: str, new: list[dict], settings: dict) -> tuple[list[dict], list[str]]:
    """``--merge``: keep the other maps of an earlier run with the same settings."""
    if not Path(path).is_file():
        return new, []
    old = json.loads(Path(path).read_text())
    if old["meta"].get("settings") != settings:
        sys.exit(f"--merge: {path} was run with other settings: {old['meta'].get('settings')}")
    names = {r["map"] for r in new}
    kept = [r for r in old["maps"] if r["map"] not in names]
    return kept + new, old["meta"].get("earlier_commands", []) + [old["meta"]["command"]]


if __name__ == "__main__":
    main()
