"""Quality against KV budget for the release scorers, one picture.

Reads the perplexity runs of release maps named ``adore-<scorer>`` (budget
1024) and ``adore-<scorer>-b<budget>`` (``benchmarks/maps/``) from the
``--ppl`` JSON files written by perplexity.py, and the stock run
(``CPU_ATTN``) as the reference line. Left panel: perplexity over positions
> 2048 against the budget, one line per scorer. Right panel: passkey
retrieval at budget 1024 per map (``--passkey``, written by passkey.py).

Usage: python benchmarks/plot_budget.py --ppl benchmarks/results/perplexity_adore*.json \\
           --passkey benchmarks/results/passkey_adore.json
Writes benchmarks/results/adore_budget.png.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ppl", nargs="+", required=True)
    ap.add_argument("--passkey", default=None)
    ap.add_argument("--out", default=str(RESULTS / "adore_budget.png"))
    ns = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = {}
    stock = None
    for f in ns.ppl:
        for m in json.loads(Path(f).read_text())["maps"]:
            tail = m["summary"]["ppl_tail"]
            if m["map"] == "CPU_ATTN":
                stock = tail
                continue
            hit = re.fullmatch(r"adore-(\w+?)(?:-b(\d+))?", m["map"])
            if hit:
                series.setdefault(hit[1], {})[int(hit[2] or 1024)] = tail
    fig, axes = plt.subplots(1, 2 if ns.passkey else 1, figsize=(11 if ns.passkey else 6, 4.2))
    ax = axes[0] if ns.passkey else axes
    for scorer, pts in sorted(series.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=scorer)
    if stock:
        ax.axhline(stock, ls=":", color="k", label="full attention (stock)")
        ax.axhline(stock * 1.05, ls="--", color="grey", lw=0.8, label="+5% target")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV budget per request (tokens), 4K-token windows")
    ax.set_ylabel("perplexity, positions > 2048")
    ax.set_title("Perplexity against budget (eval text)")
    ax.legend(fontsize=8)
    if ns.passkey:
        pk = json.loads(Path(ns.passkey).read_text())
        names = [r["map"] for r in pk["maps"]]
        acc = [r["summary"]["overall"] for r in pk["maps"]]
        axes[1].barh(names, acc)
        axes[1].set_xlim(0, 1)
        axes[1].set_xlabel("passkey retrieved (all lengths and depths)")
        axes[1].set_title("Passkey at budget 1024")
    fig.tight_layout()
    fig.savefig(ns.out, dpi=120)
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
