"""Cost per step of the importance scorers, next to the attention they serve.

Question: what does scoring add to a release layer's step on this CPU?

Method (no engine; the torch code the worker runs, one thread like vLLM's
CPU worker): the embedded model's shapes (9 query heads, 3 KV heads, head
size 64, bfloat16 cache, block 128), ``--batch`` requests each holding
``--held`` tokens (the budget). Timed, median of ``--reps`` runs:

* ``attention``: one release layer's attention (``ReleaseTorch``'s kernel,
  ``torch_paged.paged_attention`` on the compacted table) for a decode step
  (one query per request) and for a prefill chunk of ``--chunk`` tokens per
  request;
* ``gru``: the controller (``Controller.step``) over the step's tokens of
  every request: it runs in one layer per step;
* ``h2o`` / ``quest``: the scorer on the observation queries and the held
  keys (gather included), per layer: they run in every release layer;
* ``bound``: the rebuild bound over held keys plus ``--host`` host blocks,
  per layer, for requests with released blocks.

Usage: python benchmarks/scorer_cost.py [--batch 8 --held 1024 --chunk 256]
Writes benchmarks/results/scorer_cost.json and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from common import RESULTS, meta, write_doc


def timeit(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--held", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--host", type=int, default=56, help="host-tier blocks per request (8K - 1K)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS / "scorer_cost.json"))
    ns = ap.parse_args()
    torch.set_num_threads(1)
    from vllm_adaptive.importance.controller import load_controller
    from vllm_adaptive.importance.scorers import Observation
    from vllm_adaptive.importance.scorers.h2o import H2OScorer
    from vllm_adaptive.importance.scorers.quest import QuestScorer, bound, key_minmax
    from vllm_adaptive.kernels.torch_paged import paged_attention

    H, HKV, D, BS = 9, 3, 64, 128
    B, held = ns.batch, ns.held
    nb = held // BS
    g = torch.Generator().manual_seed(0)
    num_blocks = B * (nb + 4) + 1
    kc = torch.randn(num_blocks, HKV, BS, D, generator=g).bfloat16()
    vc = torch.randn(num_blocks, HKV, BS, D, generator=g).bfloat16()
    table = torch.arange(1, B * (nb + 4) + 1, dtype=torch.int32).reshape(B, nb + 4)
    ctl = load_controller(None)
    rows = {}
    for mode, q_len in (("decode", 1), (f"prefill {ns.chunk}", ns.chunk)):
        seq = torch.full((B,), held + (q_len if q_len > 1 else 0), dtype=torch.int32)
        qsl = torch.arange(0, (B + 1) * q_len, q_len, dtype=torch.int32)
        q = torch.randn(B * q_len, H, D, generator=g).bfloat16()
        out = torch.empty_like(q)
        rows[(mode, "attention (1 layer)")] = timeit(
            lambda: paged_attention(q, kc, vc, table, qsl, seq, 0.125, out=out), ns.reps)
        vals = torch.randn(q_len, HKV * D, generator=g).bfloat16()
        pos = torch.arange(held, held + q_len)
        rows[(mode, "gru controller (1 layer)")] = timeit(
            lambda: [ctl.step(vals, pos, None) for _ in range(B)], ns.reps)
        keys = torch.randn(HKV, held, D, generator=g).bfloat16()
        obs = Observation("r", 0, BS, 0.125, pos, query=q[: min(q_len, 16)],
                          keys=keys, block_index=torch.arange(nb))
        rows[(mode, "h2o (per layer)")] = timeit(lambda: [H2OScorer().score(obs) for _ in range(B)], ns.reps)
        rows[(mode, "quest (per layer)")] = timeit(lambda: [QuestScorer().score(obs) for _ in range(B)], ns.reps)
        hmin = torch.randn(ns.host, HKV, D, generator=g)
        hmax = hmin + 1

        def bounds():
            for _ in range(B):
                kmin, kmax = key_minmax(keys, BS)
                bound(q[0].float(), kmin, kmax, 0.125)
                bound(q[0].float(), hmin, hmax, 0.125)
        rows[(mode, "rebuild bound (per layer)")] = timeit(bounds, ns.reps)
    out_rows = [{"mode": m, "what": w, "ms": round(v, 3)} for (m, w), v in rows.items()]
    write_doc(ns.out, {"meta": {**meta(sys.argv), "batch": B, "held": held, "chunk": ns.chunk,
                                "host_blocks": ns.host, "threads": 1}, "rows": out_rows})
    print(f"| step | what | ms ({B} requests, {held} held tokens each) |\n|---|---|---|")
    for r in out_rows:
        print(f"| {r['mode']} | {r['what']} | {r['ms']:.2f} |")


if __name__ == "__main__":
    main()
