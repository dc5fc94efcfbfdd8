"""KV-cache capacity of LongGen layer maps at 8K context: vLLM's accounting and measured.

Question: in the same KV-cache memory, how many 8K-token requests does a
hybrid layer map hold at once, compared with full attention? (Issue #3's
target for ``longgen``: at least 2.3x full at 8K.)

Method, per map, each engine in its own process (bfloat16, max_model_len 8192,
eager, default block size):

(a) Accounting. An engine with ``--kv-bytes`` of KV cache (default 1 GiB;
    ``VLLM_CPU_KVCACHE_SPACE``, in GiB, wins when set, as it does inside vLLM)
    reports ``cache_config.num_gpu_blocks``, ``.block_size``,
    ``.kv_cache_size_tokens`` and ``.kv_cache_max_concurrency`` (vLLM's "KV
    cache size: N tokens, Maximum concurrency for 8,192 tokens per request:
    X", which sums every KV-cache group's worst-case blocks per request; for a
    sparse group that is the pattern's bound ``SparsePattern.max_held_blocks``).

(b) Measured. An engine with ``--measure-kv-bytes`` of KV cache (default 1
    GiB, the same as (a); ``VLLM_CPU_KVCACHE_SPACE`` is removed from this
    engine's environment) gets ``--requests`` requests (16) of
    ``--prompt-tokens`` distinct random token ids (8,000) with
    ``max_tokens=--max-tokens`` (192, so that no request finishes first) and
    ``ignore_eos=True``, all added at once with ``LLMEngine.add_request``. The
    engine is stepped; after every step the Prometheus gauges
    ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
    ``vllm:kv_cache_usage_perc`` and the counter ``vllm:num_preemptions`` are
    read (``LLMEngine.get_metrics``, ``disable_log_stats=False``), and a
    request counts as decoding once it has produced a token. The run stops
    when every running request is decoding (so the step's token budget is
    free) and requests still wait, for ``--settle-steps`` (3) steps in a row:
    then only KV space holds them back, and the running count is the number of
    8K requests that this KV space really holds at once. (It also stops if all
    requests got in, or one finished: both are reported as not KV-bound.)
    vLLM admits a request only when its whole-sequence peak fits in the free
    blocks (``scheduler_reserve_full_isl``, default on; for a sparse group the
    peak is ``SparsePatternSpec.max_blocks_held``), and requests that already
    hold their prompt hold only what the manager kept (sparse groups: the
    pattern's blocks).

Maps (``--maps``): as in passkey.py (preset name, ``CPU_ATTN``, or a
calibration JSON, optionally ``name=path``). ``--measure`` names the maps that
also get (b) (default: full and longgen; ``all`` for every map).

Usage:
  python benchmarks/capacity.py --maps CPU_ATTN full longgen longgen-strided \\
      benchmarks/results/calibrated_sink_window.json benchmarks/results/calibrated_strided.json \\
      --measure all
Writes benchmarks/results/capacity.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

from common import (DEFAULT_MAPS, RESULTS, add_child_args, full_layers_of, meta, resolve_map,
                     run_child, run_subprocess, start_engine, write_doc)

GREP = ("KV cache size", "Maximum concurrency", "KV cache on node", "prefix caching", "GPU KV cache")


def _metrics(engine) -> dict:
    got = {}
    for m in engine.get_metrics():
        if m.name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                      "vllm:kv_cache_usage_perc", "vllm:num_preemptions"):
            got[m.name] = got.get(m.name, 0) + getattr(m, "value", 0)
    return got


def run_one(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    m = spec["map"]
    kw = dict(kv_cache_memory_bytes=spec["kv_bytes"], max_num_batched_tokens=spec["chunk"])
    if spec["mode"] == "measure":
        kw["disable_log_stats"] = False
    llm, start_s = start_engine(m, **kw)
    cc = llm.llm_engine.vllm_config.cache_config
    res = {"map": m["name"], "mode": spec["mode"], "start_s": round(start_s, 1),
           "kv_cache_memory_bytes": cc.kv_cache_memory_bytes, "num_gpu_blocks": cc.num_gpu_blocks,
           "block_size": cc.block_size, "kv_cache_size_tokens": cc.kv_cache_size_tokens,
           "kv_cache_max_concurrency": cc.kv_cache_max_concurrency,
           "enable_prefix_caching": cc.enable_prefix_caching, "max_num_batched_tokens": spec["chunk"],
           "max_model_len": llm.llm_engine.vllm_config.model_config.max_model_len}
    if spec["mode"] != "measure":
        return res

    engine = llm.llm_engine
    rng = random.Random(spec["seed"])
    n, L = spec["requests"], spec["prompt_tokens"]
    sp = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    t0 = time.time()
    for i in range(n):
        ids = [rng.randrange(100, 40000) for _ in range(L)]
        engine.add_request(f"req-{i}", TokensPrompt(prompt_token_ids=ids), sp)
    timeline, finished, decoding = [], {}, set()
    stop, settled = "", 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = len(out.outputs[0].token_ids)
                decoding.discard(out.request_id)
            elif out.outputs and out.outputs[0].token_ids:
                decoding.add(out.request_id)
        g = _metrics(engine)
        s = {"t": round(time.time() - t0, 2),
             "running": int(g.get("vllm:num_requests_running", 0)),
             "waiting": int(g.get("vllm:num_requests_waiting", 0)),
             "decoding": len(decoding),
             "kv_usage": round(float(g.get("vllm:kv_cache_usage_perc", 0.0)), 4),
             "preemptions": int(g.get("vllm:num_preemptions", 0)),
             "finished": len(finished)}
        timeline.append(s)
        if finished:
            stop = "a request finished before the cache filled (raise --max-tokens)"
            break
        # Every running request has finished its prompt, so the token budget is
        # free: a request still waiting is held back by KV space alone.
        if s["running"] and s["running"] == s["decoding"]:
            # every request has produced a token (the gauges alone can say
            # "nothing waiting" before all requests have reached the engine)
            if len(decoding) == n:
                stop = "every request admitted (capacity is at least --requests)"
                break
            settled += 1
            if settled >= spec["settle_steps"]:
                stop = "KV-bound: requests wait while every running request decodes"
                break
        else:
            settled = 0
    wall = time.time() - t0
    last = timeline[-1]
    res.update(
        requests=n, prompt_tokens=L, max_tokens=spec["max_tokens"], wall_s=round(wall, 1),
        stop=stop, kv_bound=stop.startswith("KV-bound"),
        max_running=max(x["running"] for x in timeline),
        running_at_stop=last["running"], waiting_at_stop=last["waiting"],
        kv_usage_at_stop=last["kv_usage"],
        context_tokens_at_stop=last["running"] * L,
        preemptions=last["preemptions"],
        peak_kv_usage=max(x["kv_usage"] for x in timeline),
        steps=len(timeline),
        # compress the timeline: keep the steps where something changed
        timeline=[x for k, x in enumerate(timeline)
                  if k == 0 or {y: x[y] for y in x if y != "t"} != {y: timeline[k - 1][y] for y in x if y != "t"}],
    )
    return res


def tables(rows: list[dict]) -> str:
    acc = [r for r in rows if r["mode"] == "account"]
    mea = [r for r in rows if r["mode"] == "measure"]
    out = []
    if acc:
        ref = next((r for r in acc if r["map"] == "full"), acc[0])
        out += [f"(a) vLLM accounting, KV space {acc[0]['kv_cache_memory_bytes'] / 2**20:.0f} MiB, max_model_len {acc[0]['max_model_len']}:", "",
                "| map | max_num_batched_tokens | blocks | block size | KV cache size (tokens) | max concurrency @ 8192 | vs full |",
                "|---|---|---|---|---|---|---|"]
        for r in acc:
            out.append(f"| {r['map']} | {r['max_num_batched_tokens']} | {r['num_gpu_blocks']} | {r['block_size']} | {r['kv_cache_size_tokens']:,} | "
                       f"{r['kv_cache_max_concurrency']:.2f} | "
                       f"{r['kv_cache_max_concurrency'] / ref['kv_cache_max_concurrency']:.2f}x |")
    if mea:
        ref = next((r for r in mea if r["map"] == "full"), mea[0])
        out += ["", f"(b) measured, KV space {mea[0]['kv_cache_memory_bytes'] / 2**20:.0f} MiB, "
                f"{mea[0]['requests']} requests x {mea[0]['prompt_tokens']} prompt tokens + {mea[0]['max_tokens']} decoded:", "",
                "| map | accounting concurrency | 8K requests held at once | vs full | KV-bound | waiting at stop | preemptions | KV usage at stop | wall s |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in mea:
            out.append(f"| {r['map']} | {r['kv_cache_max_concurrency']:.2f} | {r['running_at_stop']} | "
                       f"{r['running_at_stop'] / ref['running_at_stop']:.2f}x | {'yes' if r['kv_bound'] else 'no'} | "
                       f"{r['waiting_at_stop']} | {r['preemptions']} | "
                       f"{r['kv_usage_at_stop']:.0%} | {r['wall_s']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--maps", nargs="+", default=["CPU_ATTN"] + DEFAULT_MAPS)
    ap.add_argument("--measure", nargs="+", default=["full", "longgen"],
                    help="map names that also get the measured run, or 'all'")
    ap.add_argument("--kv-bytes", type=int, default=1 << 30, help="KV space for (a)")
    ap.add_argument("--measure-kv-bytes", type=int, default=1 << 30, help="KV space for (b)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=8000)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--settle-steps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--account-chunks", type=int, nargs="*", default=[],
                    help="extra max_num_batched_tokens values for (a) (sparse maps only): a "
                    "sparse group's worst case includes one chunk's live tail")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-account", action="store_true", help="only the measured runs")
    ap.add_argument("--out", default=str(RESULTS / "capacity.json"))
    add_child_args(ap, sequential=False)
    ns = ap.parse_args()
    if run_child(ns, run_one):
        return
    env_space = os.environ.get("VLLM_CPU_KVCACHE_SPACE") or None
    space_source = (f"VLLM_CPU_KVCACHE_SPACE={env_space} GiB (overrides --kv-bytes inside vLLM)"
                    if env_space else f"kv_cache_memory_bytes={ns.kv_bytes}")
    measure_env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    rows = []
    for m in (resolve_map(a) for a in ns.maps):
        extra = dict(adaptive_attention=m["adaptive_attention"], source=m["source"],
                     full_layers=full_layers_of(m["adaptive_attention"]))
        for chunk in ([] if ns.skip_account else [ns.chunk] + [c for c in ns.account_chunks if c != ns.chunk]):
            if chunk != ns.chunk and m["adaptive_attention"] in (None, "full"):
                continue  # full attention's accounting does not depend on the chunk
            r = run_subprocess(__file__, {"map": m, "mode": "account", "kv_bytes": ns.kv_bytes,
                                          "chunk": chunk}, grep=GREP)
            rows.append({**r, **extra})
            print(f"{m['name']} (a, chunk {chunk}): blocks {r['num_gpu_blocks']} x {r['block_size']}, "
                  f"{r['kv_cache_size_tokens']:,} tokens, concurrency {r['kv_cache_max_concurrency']:.2f}",
                  flush=True)
        if "all" in ns.measure or m["name"] in ns.measure:
            r = run_subprocess(__file__, {"map": m, "mode": "measure", "kv_bytes": ns.measure_kv_bytes,
                                          "chunk": ns.chunk, "requests": ns.requests,
                                          "prompt_tokens": ns.prompt_tokens, "max_tokens": ns.max_tokens,
                                          "settle_steps": ns.settle_steps,
                                          "seed": ns.seed}, env=measure_env, grep=GREP)
            rows.append({**r, **extra})
            print(f"{m['name']} (b): {r['running_at_stop']} running at stop ({r['stop']}), max running {r['max_running']}/{r['requests']}, preemptions "
                  f"{r['preemptions']}, peak KV {r['peak_kv_usage']:.0%}, {r['wall_s']} s "
                  f"(accounting at this space: {r['kv_cache_max_concurrency']:.2f})", flush=True)
    doc = {"meta": {**meta(sys.argv), "kv_space_account": space_source,
                    "kv_space_measure": f"kv_cache_memory_bytes={ns.measure_kv_bytes} "
                    "(VLLM_CPU_KVCACHE_SPACE removed from the engine's environment)",
                    "dtype": "bfloat16", "max_num_batched_tokens": ns.chunk},
           "rows": rows}
    write_doc(ns.out, doc)
    print(tables(rows))


if __name__ == "__main__":
    main()
