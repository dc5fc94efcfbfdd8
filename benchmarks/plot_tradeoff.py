"""Capacity vs quality of the LongGen layer maps, one picture.

Question: what does each layer map buy in KV capacity, and what does it cost
in retrieval and language-modelling quality?

Method: reads the JSON written by capacity.py, passkey.py and perplexity.py
and plots one labelled point per map. x: KV capacity relative to ``full`` at
8K, from vLLM's accounting (``kv_cache_max_concurrency`` over full's; filled
circles) and, where capacity.py measured it, the most 8K requests running at
once over full's (open squares, same y). Left panel y: passkey accuracy over
all lengths and depths. Right panel y: perplexity over positions > 2048 of the
eval text (dotted line: full's). Maps missing from a file are left out of
that panel.

Usage: python benchmarks/plot_tradeoff.py   (needs matplotlib: pip install -e ".[bench]")
Writes benchmarks/results/tradeoff.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def capacity_ratios(cap: dict) -> tuple[dict, dict]:
    """``(accounting, measured)``: map name -> capacity relative to full."""
    rows = cap.get("rows", [])
    # accounting at the measured engines' max_num_batched_tokens (a sparse
    # group's worst case depends on it; capacity.py --account-chunks adds others)
    chunk = cap.get("meta", {}).get("max_num_batched_tokens")
    acc = {r["map"]: r["kv_cache_max_concurrency"] for r in rows
           if r["mode"] == "account" and r.get("max_num_batched_tokens") in (chunk, None)}
    mea = {r["map"]: r["running_at_stop"] for r in rows if r["mode"] == "measure"}
    acc = {k: v / acc["full"] for k, v in acc.items()} if "full" in acc else {}
    mea = {k: v / mea["full"] for k, v in mea.items()} if "full" in mea else {}
    return acc, mea


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capacity", type=Path, default=RESULTS / "capacity.json")
    ap.add_argument("--passkey", type=Path, default=RESULTS / "passkey.json")
    ap.add_argument("--perplexity", type=Path, default=RESULTS / "perplexity.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "tradeoff.png")
    ap.add_argument("--title", default="LongGen layer maps on SmolLM2-135M (vLLM CPU, bf16): capacity vs quality")
    ns = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc, mea = capacity_ratios(load(ns.capacity))
    if not acc and not mea:
        raise SystemExit(f"{ns.capacity}: no capacity rows with a 'full' reference")
    pk = {r["map"]: r["summary"]["overall"] for r in load(ns.passkey).get("maps", [])}
    pp = {r["map"]: r["summary"]["ppl_tail"] for r in load(ns.perplexity).get("maps", [])}

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = [n for n in (list(acc) + [m for m in mea if m not in acc]) if n in pk or n in pp]
    for ax, ys, ylabel in ((axes[0], pk, "passkey accuracy (all lengths, depths)"),
                           (axes[1], pp, "perplexity, positions > 2048")):
        for i, name in enumerate(names):
            if name not in ys:
                continue
            c = colors[i % len(colors)]
            y = ys[name]
            if name in acc:
                ax.scatter(acc[name], y, color=c, s=60, zorder=3, label=name)
            if name in mea:
                ax.scatter(mea[name], y, facecolors="none", edgecolors=c, marker="s", s=80, zorder=3)
                if name in acc and abs(mea[name] - acc[name]) > 1e-9:
                    ax.plot([acc[name], mea[name]], [y, y], color=c, lw=0.8, ls="--")
        ax.set_xlabel("KV capacity at 8K relative to full (filled: vLLM accounting, open: measured)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ref in ("full", "CPU_ATTN"):
        if ref in pp:
            axes[1].axhline(pp[ref], color="gray", ls=":", lw=1)
            break
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].legend(loc="upper right", fontsize=9)  # one colour per map, both panels
    fig.suptitle(ns.title)
    fig.tight_layout()
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(ns.out, dpi=120)
    print(f"wrote {ns.out}")
    for name in names:
        print(f"{name}: capacity x{acc.get(name, float('nan')):.2f} (accounting), "
              f"x{mea.get(name, float('nan')):.2f} (measured), passkey {pk.get(name, float('nan')):.2f}, "
              f"ppl>2048 {pp.get(name, float('nan')):.3f}")


if __name__ == "__main__":
    main()
