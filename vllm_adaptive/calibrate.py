"""``vllm-adaptive calibrate``: measure which layers need full attention.

Training-free, the choice of full layers decides quality. LongGen keeps the
middle third of the stack full; this command measures, on real text and the
actual model, how much attention each layer would lose under the sparse
pattern, and keeps the layers that would lose most.

Metric (lost attention mass). The Hugging Face model runs in float32 with
eager attention on ``windows`` consecutive, non-overlapping slices of
``tokens`` tokens of the ``calib`` split of :mod:`vllm_adaptive.text`. Every
layer runs with full attention. A forward hook on each attention module takes
its softmax probabilities ``A[h, p, j]`` and computes, per head ``h``::

    lost[h] = mean over affected queries p of  sum over hidden keys j of A[h, p, j]

where key ``j`` is hidden from query ``p`` when ``j <= p`` and the pattern
(:meth:`SparsePattern.visible`) does not let ``p`` read it, and a query is
affected when it has at least one hidden key (the first ``sink + window``
queries of a ``sink_window`` layer lose nothing and are left out, so they do
not dilute the score; longer windows still score higher, as more keys lie
beyond the pattern's reach). Since each row of ``A`` sums to one,
``lost`` is ``1 - mass on visible keys``, i.e. the share of attention that the
sparse layer would have to redistribute over the keys it keeps. Every window
has the same affected queries, so the mean over windows is the mean over all
affected queries. The hook reduces and discards each layer's matrix at once,
so only one layer's attention is held at a time.

A layer's score is the mean of ``lost`` over its heads (``--reduce mean``,
default: the average share lost) or the maximum (``--reduce max``: the worst
head). The ``K`` layers with the highest score stay full (ties: the lower
index), ``K = ceil(num_layers / 3)`` by default like LongGen. The total lost
mass of a placement is the sum of the scores of its sparse layers, so the
calibrated placement has the smallest total of all placements with ``K`` full
layers, and never more than LongGen's placement of the same ``K`` layers in
the middle of the stack (:func:`middle_layers`, the middle third for the
default ``K``), which the report gives for comparison.

Limits: this is a first-order estimate; each layer is measured with every
other layer full, so interactions between sparse layers are not seen. Mass is
a proxy for damage: diffuse attention over many hidden keys counts as much as
a sharp retrieval head's, though the first may change the layer's output
less. Check a calibrated map on held-out text (the ``eval`` split) before
relying on it.

The JSON written holds the map to serve with (``adaptive_attention``), the
per-layer and per-head scores, the pattern, the text and token counts, and the
lost mass of the middle placement and of the calibrated one. Run it as
``python -m vllm_adaptive.calibrate [--kind strided] [--output PATH] ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from vllm_adaptive.config import CONFIG_KEY, KIND_DEFAULTS, parse_config
from vllm_adaptive.kinds import KINDS
from vllm_adaptive.sparse_pattern import SparsePattern
from vllm_adaptive.text import real_text, source_description

#: The kinds a placement is calibrated for: those with a position-only
#: ``SparsePattern`` (release layers keep what their scorer says, not a pattern).
PATTERN_KINDS: tuple[str, ...] = tuple(k for k, kind in KINDS.items() if kind.family == "sparse")

#: The preset a calibrated map starts from, per sparse layer kind.
PRESET_OF_KIND: dict[str, str] = {"sink_window": "longgen", "strided": "longgen-strided"}
REDUCTIONS: tuple[str, ...] = ("mean", "max")

DEFAULT_TOKENS = 2048
DEFAULT_WINDOWS = 2


def pattern_masks(pattern: SparsePattern, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden, affected)`` for a sequence of ``num_tokens`` tokens.

    ``hidden[p, j]``: key ``j`` is causal for query ``p`` (``j <= p``) but the
    pattern does not let ``p`` read it. ``affected[p]``: query ``p`` has at
    least one hidden key.
    """
    pos = torch.arange(num_tokens, dtype=torch.int64)
    p, j = pos[:, None], pos[None, :]
    hidden = (j <= p) & ~pattern.visible(p, j)
    return hidden, hidden.any(dim=-1)


def lost_mass(attn: torch.Tensor, hidden: torch.Tensor, affected: torch.Tensor) -> torch.Tensor:
    """Per head, the attention mass on hidden keys, averaged over the batch
    and the affected queries.

    ``attn``: ``[batch, heads, T, T]`` softmax probabilities; ``hidden`` and
    ``affected`` from :func:`pattern_masks`. Returns ``[heads]`` float32.
    """
    per_query = (attn.float() * hidden).sum(dim=-1)  # [batch, heads, T]
    return per_query[..., affected].mean(dim=(0, 2))


def measure_lost_mass(
    model: torch.nn.Module, windows: Sequence[Sequence[int]], pattern: SparsePattern
) -> torch.Tensor:
    """``[layers, heads]`` lost mass of ``pattern`` for every layer of a
    Hugging Face decoder-only model loaded with eager attention, averaged over
    ``windows`` (token id lists of one common length)."""
    lengths = {len(w) for w in windows}
    if len(lengths) != 1:
        raise ValueError(f"windows must share one length, got lengths {sorted(lengths)}")
    attn_impl = getattr(model.config, "_attn_implementation", None)
    if attn_impl != "eager":
        raise ValueError(
            f"the model must be loaded with attn_implementation='eager' (it returns the "
            f"attention probabilities), got {attn_impl!r}"
        )
    num_tokens = lengths.pop()
    hidden, affected = pattern_masks(pattern, num_tokens)
    if not affected.any():
        raise ValueError(
            f"the pattern ({pattern.describe()}) hides no key within {num_tokens} tokens; "
            "use longer windows or a smaller pattern"
        )
    decoder = model.get_decoder()
    layers = decoder.layers
    totals = torch.zeros(len(layers), model.config.num_attention_heads)

    def hook_for(layer_idx: int) -> Callable[[torch.nn.Module, Any, Any], None]:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            weights = output[1]
            if weights is None:
                raise RuntimeError(f"layer {layer_idx}: attention module returned no weights")
            totals[layer_idx] += lost_mass(weights, hidden, affected)

        return hook

    handles = [layer.self_attn.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for k, window in enumerate(windows):
                t0 = time.perf_counter()
                decoder(input_ids=torch.tensor([list(window)]), use_cache=False)
                print(
                    f"calibrate: window {k + 1}/{len(windows)} ({num_tokens} tokens) "
                    f"in {time.perf_counter() - t0:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for handle in handles:
            handle.remove()
    return totals / len(windows)


def layer_scores(per_head: torch.Tensor, reduce: str) -> list[float]:
    """One score per layer from ``[layers, heads]`` lost mass."""
    if reduce == "mean":
        return per_head.mean(dim=1).tolist()
    if reduce == "max":
        return per_head.amax(dim=1).tolist()
    raise ValueError(f"reduce must be one of {list(REDUCTIONS)}, got {reduce!r}")


def choose_full_layers(scores: Sequence[float], num_full: int) -> tuple[int, ...]:
    """The ``num_full`` layers with the highest score (ties: lower index), sorted."""
    if not 0 <= num_full <= len(scores):
        raise ValueError(f"num_full must be in [0, {len(scores)}], got {num_full}")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return tuple(sorted(ranked[:num_full]))


def middle_layers(num_layers: int, num_full: int) -> tuple[int, ...]:
    """LongGen's placement of ``num_full`` full layers: the middle of the
    stack, as :func:`~vllm_adaptive.config.middle_third` places one third."""
    start = (num_layers - num_full) // 2
    return tuple(range(start, start + num_full))


def total_lost_mass(scores: Sequence[float], full_layers: Sequence[int]) -> float:
    """Lost mass of a placement: the sum of the scores of its sparse layers."""
    full = set(full_layers)
    return float(sum(s for i, s in enumerate(scores) if i not in full))


def resolve_pattern(
    kind: str, overrides: dict[str, Any], num_layers: int
) -> tuple[SparsePattern, dict[str, int]]:
    """The pattern of ``kind`` (preset defaults updated by ``overrides``),
    validated by :func:`parse_config`, and its complete config sub-dict."""
    if kind not in PATTERN_KINDS:
        raise ValueError(f"kind must be one of {list(PATTERN_KINDS)}, got {kind!r}")
    cfg = parse_config({"preset": PRESET_OF_KIND[kind], kind: overrides}, num_layers)
    return cfg.kind_params[kind], {**KIND_DEFAULTS[kind], **overrides}


def calibrate(
    model_path: str | Path,
    kind: str = "sink_window",
    tokens: int = DEFAULT_TOKENS,
    windows: int = DEFAULT_WINDOWS,
    num_full: int | None = None,
    pattern_overrides: dict[str, Any] | None = None,
    reduce: str = "mean",
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the calibration on the model at ``model_path``; return the report
    (see the module docstring) that :func:`main` writes as JSON.

    ``threads``: torch CPU threads for the forward passes (restored after);
    None keeps torch's setting. On a CPU shared with other jobs one thread can
    be several times faster than an oversubscribed default."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if tokens < 1 or windows < 1:
        raise ValueError(f"tokens and windows must be >= 1, got {tokens} and {windows}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {list(REDUCTIONS)}, got {reduce!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    started = time.perf_counter()
    num_layers = AutoConfig.from_pretrained(model_path).num_hidden_layers
    pattern, pattern_dict = resolve_pattern(kind, dict(pattern_overrides or {}), num_layers)
    k = -(-num_layers // 3) if num_full is None else num_full
    if not 0 <= k <= num_layers:
        raise ValueError(f"num_full must be in [0, {num_layers}], got {k}")
    affected = int(pattern_masks(pattern, tokens)[1].sum())
    if not affected:
        raise ValueError(
            f"the pattern ({pattern.describe()}) hides no key within {tokens} tokens; "
            "use more --tokens or a smaller --pattern"
        )

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = real_text("calib", tokens * windows, tokenizer)
    slices = [ids[i * tokens : (i + 1) * tokens] for i in range(windows)]
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        used_threads = torch.get_num_threads()
        per_head = measure_lost_mass(model, slices, pattern)
    finally:
        torch.set_num_threads(previous_threads)
    scores = layer_scores(per_head, reduce)
    full = choose_full_layers(scores, k)
    middle = middle_layers(num_layers, k)
    adaptive = {"preset": PRESET_OF_KIND[kind], "full_layers": list(full), kind: pattern_dict}
    return {
        CONFIG_KEY: adaptive,
        "hf_overrides": json.dumps({CONFIG_KEY: adaptive}),
        "model": str(model_path),
        "num_layers": num_layers,
        "num_heads": per_head.shape[1],
        "kind": kind,
        "pattern": pattern_dict,
        "pattern_desc": pattern.describe(),
        "metric": (
            "attention mass on keys the pattern hides, mean over affected queries "
            f"and windows; layer score = {reduce} over heads"
        ),
        "reduce": reduce,
        "text": {
            "source": source_description(),
            "split": "calib",
            "tokens_per_window": tokens,
            "windows": windows,
            "total_tokens": tokens * windows,
            "affected_queries_per_window": affected,
        },
        "num_full": k,
        "full_layers": list(full),
        "middle_layers": list(middle),
        "lost_mass": {
            "calibrated": total_lost_mass(scores, full),
            "middle": total_lost_mass(scores, middle),
        },
        "layers": [
            {
                "layer": i,
                "score": scores[i],
                "mean": float(per_head[i].mean()),
                "max": float(per_head[i].max()),
                "heads": per_head[i].tolist(),
            }
            for i in range(num_layers)
        ],
        "runtime_s": round(time.perf_counter() - started, 1),
        "torch_threads": used_threads,
    }


def format_report(report: dict[str, Any]) -> str:
    """A short table: per layer the mean and worst head, and both placements."""
    full, middle = set(report["full_layers"]), set(report["middle_layers"])
    lines = [
        f"{report['kind']} ({report['pattern_desc']}), {report['text']['windows']} x "
        f"{report['text']['tokens_per_window']} tokens of {report['text']['source']}; "
        f"layer score = {report['reduce']} over heads",
        "layer  mean    max     calibrated  middle",
    ]
    for row in report["layers"]:
        i = row["layer"]
        lines.append(
            f"{i:5d}  {row['mean']:.4f}  {row['max']:.4f}  "
            f"{'full' if i in full else '-':>10}  {'full' if i in middle else '-':>6}"
        )
    lost = report["lost_mass"]
    gain = 1 - lost["calibrated"] / lost["middle"] if lost["middle"] else 0.0
    lines += [
        f"full layers (calibrated): {report['full_layers']}",
        f"lost mass, sum over sparse layers: middle {report['num_full']} layers "
        f"{lost['middle']:.4f}, "
        f"calibrated {lost['calibrated']:.4f} ({gain:.1%} less)",
        f"serve with: --hf-overrides '{report['hf_overrides']}'",
    ]
    return "\n".join(lines)


def _json_object(value: str) -> dict[str, Any]:
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {value!r}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return obj


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vllm-adaptive calibrate",
        description="Measure per layer the attention mass a sparse pattern would lose "
        "and write a layer map that keeps the neediest layers full.",
    )
    ap.add_argument("--kind", choices=PATTERN_KINDS, default="sink_window",
                    help="sparse layer kind (preset longgen / longgen-strided)")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens per window")
    ap.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="number of windows")
    ap.add_argument("--num-full", type=int, default=None,
                    help="layers kept full (default: ceil(num_layers / 3))")
    ap.add_argument("--pattern", type=_json_object, default={},
                    help="JSON overrides of the kind's pattern, e.g. '{\"window\": 512}'")
    ap.add_argument("--reduce", choices=REDUCTIONS, default="mean",
                    help="layer score from head scores")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 helps on a busy CPU)")
    ap.add_argument("--model", default=None, help="HF model folder (default: embedded model)")
    ap.add_argument("--output", type=Path, default=None,
                    help="JSON report path (default: calibrated_<kind>.json)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    ns = _parser().parse_args(argv)
    if ns.model is None:
        from vllm_adaptive.model import default_model_path

        ns.model = str(default_model_path())
    try:
        report = calibrate(ns.model, ns.kind, ns.tokens, ns.windows, ns.num_full,
                           ns.pattern, ns.reduce, ns.threads)
    except ValueError as e:  # AdaptiveConfigError included
        print(f"vllm-adaptive calibrate: {e}", file=sys.stderr)
        return 2
    output = ns.output or Path(f"calibrated_{ns.kind}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(format_report(report))
    print(f"wrote {output} ({report['runtime_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
