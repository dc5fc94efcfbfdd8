"""Perplexity of LongGen layer maps on long real text, computed by vLLM.

Question: how much language-modelling quality does a hybrid layer map lose,
and where in the context? Sparse layers only drop keys once a query is more
than its local blocks away from them (preset ``longgen``: the sink block + the
last 6 blocks of 128 tokens, so every key is still read up to position 895;
``longgen-strided``: sink + the last 4 blocks + every 8th block, first keys
dropped from position 512), so the loss should show at late positions.

Method: ``--windows`` consecutive, non-overlapping slices of ``--tokens``
tokens of the held-out ``eval`` split of :mod:`vllm_adaptive.text` (Python
reference documentation prose, never used by ``vllm-adaptive calibrate``, which
reads ``calib``). Each map runs every window as one prompt of one ``generate``
batch with ``SamplingParams(max_tokens=1, prompt_logprobs=0)`` in its own
engine process (bfloat16, max_model_len 8192, eager, 1 GiB KV cache): vLLM
returns the log-probability of each actual prompt token given the tokens
before it. The first token of each window has none and is skipped. Reported
per map: PPL = exp(mean NLL) over all scored positions, over positions
p > 2048 (0-based index of the predicted token; there every sparse layer
hides most of the context), per position bucket, and per window.

Maps (``--maps``): as in passkey.py (preset name, ``CPU_ATTN``, or a
calibration JSON, optionally ``name=path``).

Usage:
  python benchmarks/perplexity.py --maps full longgen longgen-strided \\
      benchmarks/results/calibrated_sink_window.json benchmarks/results/calibrated_strided.json
Writes benchmarks/results/perplexity.json (after every map) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from common import (DEFAULT_MAPS, RESULTS, add_child_args, full_layers_of, generate, meta,
                     resolve_map, run_child, run_subprocess, start_engine, write_doc)

TAIL_FROM = 2048  # positions p > TAIL_FROM form the "tail"
# [lo, hi) position ranges (832 was sink + window of an earlier longgen preset;
# kept so that results stay comparable)
BUCKETS = [(1, 832), (832, 2049), (2049, 4096), (4096, 6144), (6144, 8192)]


def run_one(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    m = spec["map"]
    llm, start_s = start_engine(m, kv_cache_memory_bytes=spec["kv_bytes"],
                                max_num_batched_tokens=spec["chunk"])
    windows = spec["windows"]
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    t0 = time.time()
    prompts = [TokensPrompt(prompt_token_ids=w) for w in windows]
    outs = generate(llm, prompts, sp, spec.get("sequential", False))
    gen_s = time.time() - t0
    nll = []  # per window: NLL of positions 1..L-1
    for w, o in zip(windows, outs):
        assert list(o.prompt_token_ids) == w
        lp = o.prompt_logprobs
        assert lp[0] is None and len(lp) == len(w)
        nll.append([-lp[p][w[p]].logprob for p in range(1, len(w))])
    cc = llm.llm_engine.vllm_config.cache_config
    return {"map": m["name"], "start_s": round(start_s, 1), "generate_s": round(gen_s, 1),
            "block_size": cc.block_size, "kv_cache_memory_bytes": cc.kv_cache_memory_bytes,
            "nll": nll}


def ppl(values: list[float]) -> float:
    return math.exp(sum(values) / len(values)) if values else float("nan")


def summarize(nll: list[list[float]]) -> dict:
    # nll[w][i] is the NLL of the token at position p = i + 1
    def at(lo, hi):
        return [x for row in nll for i, x in enumerate(row) if lo <= i + 1 < hi]

    return {
        "ppl": ppl([x for row in nll for x in row]),
        "ppl_tail": ppl(at(TAIL_FROM + 1, 1 << 30)),
        "tail_positions": len(at(TAIL_FROM + 1, 1 << 30)),
        "positions": sum(len(r) for r in nll),
        "buckets": {f"{lo}-{hi - 1}": ppl(at(lo, hi)) for lo, hi in BUCKETS},
        "per_window": [ppl(r) for r in nll],
        # PPL per 512-position bin (bin k: positions [512k, 512k + 512))
        "ppl_by_512": [ppl(at(max(1, lo), lo + 512)) for lo in range(0, max(map(len, nll)) + 1, 512)],
    }


def table(results: list[dict]) -> str:
    # the reference: stock vLLM (CPU_ATTN) when it ran, else ADAPTIVE full
    ref = next((r for r in results if r["map"] == "CPU_ATTN"), None) or next(
        (r for r in results if r["map"] == "full"), None)
    name = ref["map"] if ref else "full"
    bks = list(results[0]["summary"]["buckets"])
    out = [f"| map | full layers | PPL | vs {name} | PPL p>2048 | vs {name} (p>2048) | "
           + " | ".join(f"pos {b}" for b in bks) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(bks)]
    for r in results:
        s, fl = r["summary"], r["full_layers"]
        fl_s = "all (stock)" if fl is None else ("all" if len(fl) == 30 else ",".join(map(str, fl)))
        rel_all = f"{s['ppl'] / ref['summary']['ppl']:.3f}x" if ref else "-"
        rel = f"{s['ppl_tail'] / ref['summary']['ppl_tail']:.3f}x" if ref else "-"
        out.append(f"| {r['map']} | {fl_s} | {s['ppl']:.3f} | {rel_all} | {s['ppl_tail']:.3f} | {rel} | "
                   + " | ".join(f"{s['buckets'][b]:.3f}" for b in bks) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--maps", nargs="+", default=DEFAULT_MAPS)
    ap.add_argument("--tokens", type=int, default=7500, help="tokens per window")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--kv-bytes", type=int, default=1 << 30)
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--out", default=str(RESULTS / "perplexity.json"))
    add_child_args(ap)
    ns = ap.parse_args()
    if run_child(ns, run_one):
        return
    from transformers import AutoTokenizer

    from vllm_adaptive.model import default_model_path
    from vllm_adaptive.text import available_tokens, real_text, source_description

    tok = AutoTokenizer.from_pretrained(default_model_path())
    have = available_tokens("eval", tok)
    if ns.windows * ns.tokens > have:
        sys.exit(f"the eval split holds {have} tokens, {ns.windows} x {ns.tokens} were asked for")
    ids = real_text("eval", ns.windows * ns.tokens, tok)
    windows = [ids[i * ns.tokens:(i + 1) * ns.tokens] for i in range(ns.windows)]
    results = []
    doc = {"meta": {**meta(sys.argv), "text": source_description(), "split": "eval",
                    "split_tokens": have, "tokens_per_window": ns.tokens, "windows": ns.windows,
                    "tail_from": TAIL_FROM, "dtype": "bfloat16",
                    "kv_cache_memory_bytes": ns.kv_bytes, "max_num_batched_tokens": ns.chunk,
                    "sequential": ns.sequential},
           "maps": results}
    for m in (resolve_map(a) for a in ns.maps):
        res = run_subprocess(__file__, {"map": m, "windows": windows, "kv_bytes": ns.kv_bytes,
                                        "chunk": ns.chunk, "sequential": ns.sequential})
        res.update(adaptive_attention=m["adaptive_attention"], source=m["source"],
                   full_layers=full_layers_of(m["adaptive_attention"]),
                   summary=summarize(res.pop("nll")))
        results.append(res)
        s = res["summary"]
        print(f"{m['name']}: PPL {s['ppl']:.3f}, p>{TAIL_FROM} {s['ppl_tail']:.3f} "
              f"(engine start {res['start_s']} s, generate {res['generate_s']} s)", flush=True)
        write_doc(ns.out, doc)  # after every map: a failed map loses only itself
    print(table(results))


if __name__ == "__main__":
    main()
