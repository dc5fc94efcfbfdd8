"""Decode attention from KIVI int4 / int2 packed pages (kernels/kivi_attention_triton.py)
against the bf16 Triton decode kernel (kernels/paged_decode.py), on one GPU.

Needs only torch + triton + this repository (no vLLM engine). For each block
size and context: batch of ``--batch`` requests, one query token each,
32 query heads / 8 KV heads, head size 128, bf16 model dtype; KIVI groups and
residual default to the block size (``KiviParams``). Pages are filled with
random codes and valid float16 scales (no write pass: the write is checked
bit for bit by ``tests/test_kivi_triton.py``); each request has a partially
filled residual segment (``seq_len`` is not a multiple of the residual).

Reports per call: time (``triton.testing.do_bench``, median), bytes the
kernel must read (KIVI: the packed codes and scales of the pages touched plus
the residual keys; bf16: K and V), achieved GB/s, percent of the HBM peak
(H100 SXM 3.35 TB/s, H100 PCIe 2.0 TB/s, H200 4.8 TB/s, from
``torch.cuda.get_device_name()``), speedup over bf16, and the max abs error of
each kernel's output against its torch reference (``kernels.kivi.attention``
for KIVI, gather + SDPA for bf16), checked once per configuration.

GPU:   python benchmarks/gpu_kivi.py            (JSON to $OUT/gpu_kivi.json if OUT is set)
CPU:   python benchmarks/gpu_kivi.py --smoke    (tiny shapes, TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PEAK = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12)]


def peak_bw(name: str) -> float | None:
    for key, bw in PEAK:
        if key.lower() in name.lower():
            return bw
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--contexts", type=int, nargs="*", default=None)
    ap.add_argument("--block-sizes", type=int, nargs="*", default=None)
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 2])
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--num-splits", type=int, default=None, help="KIVI split-KV (default: ~2 programs per SM)")
    ap.add_argument("--tile-n", type=int, default=None, help="KIVI key tokens per iteration (default min(bs, 64))")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting configurations after this")
    args = ap.parse_args()

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    sys.path.insert(0, str(ROOT))
    import torch
    import triton

    from vllm_adaptive.formats.kivi import KiviLayout, KiviParams
    from vllm_adaptive.kernels import kivi, paged_decode
    from vllm_adaptive.kernels.kivi_attention_triton import kivi_paged_attention

    t_start = time.time()
    if args.smoke:
        dev = torch.device("cpu")
        hq, hkv, d = 4, 2, 32
        contexts = args.contexts or [40, 70]
        block_sizes = args.block_sizes or [16]
        batch = args.batch or 2
        dev_name, peak = "cpu (TRITON_INTERPRET=1)", None
    else:
        if not torch.cuda.is_available():
            print("no GPU: run with --smoke on CPU", file=sys.stderr)
            return 2
        dev = torch.device("cuda")
        hq, hkv, d = 32, 8, 128
        contexts = args.contexts or [8192, 16384, 32768]
        block_sizes = args.block_sizes or [16, 64]
        batch = args.batch or 8
        dev_name = torch.cuda.get_device_name()
        peak = peak_bw(dev_name)
    dtype = torch.bfloat16
    scale = d ** -0.5

    def bench(fn) -> float:
        """Seconds per call."""
        if args.smoke:
            fn()
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3

    torch.manual_seed(0)  # everything random is drawn on the device
    rows = []
    skipped = []
    for bs in block_sizes:
        for ctx in contexts:
            if time.time() - t_start > args.budget_s:
                skipped.append({"block_size": bs, "context": ctx})
                continue
            # ragged: every request has a partially filled residual segment
            lens = [max(1, ctx - 3 - 5 * r) for r in range(batch)]
            seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
            qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
            query = torch.randn(batch, hq, d, device=dev).to(dtype)

            # ---------------------------------------------------- bf16 baseline
            nbl = max(math.ceil(n / bs) for n in lens)
            nb = 1 + batch * nbl
            perm = 1 + torch.randperm(nb - 1)
            bt = perm[: batch * nbl].reshape(batch, nbl).int().to(dev)
            kc = torch.randn(nb, hkv, bs, d, device=dev).to(dtype)
            vc = torch.randn(nb, hkv, bs, d, device=dev).to(dtype)
            out = torch.empty_like(query)
            paged_decode.paged_decode(query, kc, vc, bt, qsl, seq_lens, scale, out)
            ref = torch.empty_like(query, dtype=torch.float32)
            for r, n in enumerate(lens):
                pg = bt[r, : math.ceil(n / bs)].long()
                k = kc[pg].transpose(0, 1).reshape(hkv, -1, d)[:, :n].float()
                v = vc[pg].transpose(0, 1).reshape(hkv, -1, d)[:, :n].float()
                o = torch.nn.functional.scaled_dot_product_attention(
                    query[r].float()[:, None], k, v, scale=scale, enable_gqa=True)
                ref[r] = o[:, 0]
            err = (out.float() - ref).abs().max().item()
            t = bench(lambda: paged_decode.paged_decode(query, kc, vc, bt, qsl, seq_lens, scale, out))
            nbytes = sum(lens) * hkv * d * 2 * 2
            base = {"block_size": bs, "context": ctx, "kind": "bf16", "time_us": t * 1e6,
                    "bytes": nbytes, "gbps": nbytes / t / 1e9, "max_abs_err": err}
            rows.append(base)
            kc = vc = None  # free before the next size

            # ---------------------------------------------------- KIVI
            for bits in args.bits:
                layout = KiviLayout.of(KiviParams(bits), bs, d, dtype)
                width = nbl + layout.residual_pages + 1
                nb = 1 + batch * width
                perm = 1 + torch.randperm(nb - 1)
                bt = perm[: batch * width].reshape(batch, width).int().to(dev)
                cache = torch.empty(nb, hkv, bs, layout.token_bytes // layout.itemsize, dtype=dtype, device=dev)
                pages = layout.pages(cache)
                pages.copy_(torch.randint(0, 256, pages.shape, dtype=torch.uint8, device=dev))
                views = layout.views(cache)
                ks = views.k_scale
                ks[..., 0, :] = (torch.rand(ks[..., 0, :].shape, device=dev) * 0.6 / (1 << bits)).half()
                ks[..., 1, :] = (torch.randn(ks[..., 1, :].shape, device=dev) * 0.3 - 0.3).half()
                vs = views.v_scale
                vs[..., 0] = (torch.rand(vs[..., 0].shape, device=dev) * 2.0 / (1 << bits)).half()
                vs[..., 1] = (-torch.rand(vs[..., 1].shape, device=dev)).half()
                nbytes = 0
                for r, n in enumerate(lens):  # residual keys of each open segment
                    e = n // layout.residual * layout.residual
                    j = e // bs
                    for i in range(layout.residual_pages):
                        pg = int(bt[r, j + 1 + i])
                        views.residual[pg] = torch.randn(views.residual[pg].shape, device=dev).to(dtype)
                    ng_q = math.ceil(e / layout.group)
                    # key codes (complete segments), value codes, value scales
                    # per channel group, key scales per group, residual K and V
                    nbytes += hkv * (e * layout.code_cols + e * layout.code_cols + 4 * e * layout.v_groups
                                     + ng_q * 4 * d + 2 * (n - e) * d * layout.itemsize)
                out = torch.empty_like(query)
                # the step's own token, in full precision (as the engine passes it)
                fresh_k = torch.randn(batch, hkv, d, device=dev).to(dtype)
                fresh_v = torch.randn(batch, hkv, d, device=dev).to(dtype)
                kw = dict(max_query_len=1, num_splits=args.num_splits, tile_n=args.tile_n,
                          key=fresh_k, value=fresh_v)

                def run():
                    kivi_paged_attention(layout, cache, query, bt, qsl, seq_lens, scale, out, **kw)

                run()
                want = torch.empty_like(query, dtype=torch.float32)
                kivi.attention(layout, views, query, bt, qsl.cpu(), seq_lens.cpu(), scale, want,
                               key=fresh_k, value=fresh_v)
                err = (out.float() - want).abs().max().item()
                t = bench(run)
                rows.append({"block_size": bs, "context": ctx, "kind": f"int{bits}", "time_us": t * 1e6,
                             "bytes": nbytes, "gbps": nbytes / t / 1e9, "max_abs_err": err,
                             "speedup_vs_bf16": base["time_us"] / (t * 1e6),
                             "bytes_ratio_vs_bf16": base["bytes"] / nbytes})
                cache = pages = views = None  # free before the next size
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    for r in rows:
        r["pct_peak"] = 100 * r["gbps"] * 1e9 / peak if peak else None
    result = {"device": dev_name, "peak_bytes_per_s": peak, "batch": batch, "heads_q": hq,
              "heads_kv": hkv, "head_size": d, "dtype": "bfloat16", "smoke": args.smoke,
              "num_splits": args.num_splits, "tile_n": args.tile_n, "rows": rows,
              "skipped_over_budget": skipped, "wall_s": time.time() - t_start}

    print(f"\n{dev_name}: batch {batch}, {hq} q heads / {hkv} kv heads, D={d}, bf16, decode\n")
    print("| block | context | kind | time (us) | MB read | GB/s | % peak | speedup vs bf16 | max abs err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pct = f"{r['pct_peak']:.0f}" if r["pct_peak"] is not None else "-"
        sp = f"{r['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in r else "-"
        print(f"| {r['block_size']} | {r['context']} | {r['kind']} | {r['time_us']:.1f} | "
              f"{r['bytes'] / 1e6:.2f} | {r['gbps']:.0f} | {pct} | {sp} | {r['max_abs_err']:.2e} |")
    if skipped:
        print(f"\nskipped (over --budget-s {args.budget_s}): {skipped}")
    print(f"\nwall {result['wall_s']:.1f} s")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_kivi.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
