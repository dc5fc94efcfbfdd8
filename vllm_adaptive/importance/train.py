"""``vllm-adaptive train-controller``: train ADORE's GRU controller on this CPU.

Labels come from full attention of the embedded model on real text (the
``calib`` split of :mod:`vllm_adaptive.text` for training, ``eval`` held out).
The Hugging Face model runs in float32 with eager attention on windows of
``--tokens`` tokens; a hook on every attention module reduces its
probabilities ``A[h, p, j]`` at once (one layer's matrix held at a time) to

    r[l, h, j] = mean over far queries p >= j + far of A[h, p, j]

(``far`` = 128: attention from the local window is what the protected recent
blocks serve anyway), normalised per head by its mean over ``j`` so that
sharp and diffuse heads weigh the same, and averaged over layers and heads:
``importance[j]``. This is ADORE's "receives top-K attention from later
queries" made concrete: a token is labelled 1 when its importance is in the
top ``--positive`` fraction (10%) of its window. The first ``sink`` tokens
(always kept) and the last ``far`` (too few far queries to judge) are left
out of loss and metrics.

The inputs are the value vectors of ``--layer`` (a hook on ``v_proj``), the
controller's ``x_i``. Training is BCE (positives weighted by their rarity)
with Adam over whole windows, the GRU run across each. The report gives,
on the held-out split, the token-level ROC AUC of the controller and of two
baselines on the same labels (recency: later = more important; and the
value norm), and the block-level AUC (a block of 128 tokens is positive when
any of its tokens is; the controller's block score is the max of its tokens'
scores, as the serving path aggregates them).

Run: ``vllm-adaptive train-controller [--output PATH] [--layer L] ...``;
the default output is the shipped file (``importance/controller_smollm2.pt``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from vllm_adaptive.importance.controller import SHIPPED, Controller
from vllm_adaptive.text import available_tokens, real_text

FAR = 128
SINK = 128
BLOCK = 128


def collect(model, windows: list[list[int]], layer: int, positive: float, desc: str):
    """(values [W, T, in_dim], labels [W, T] bool, mask [W, T] bool, importance [W, T])."""
    from tqdm import tqdm

    T = len(windows[0])
    decoder = model.get_decoder()
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    far = (q >= k + FAR).float()  # [T, T] far queries of each key
    n_far = far.sum(0).clamp(min=1)
    acc: list[torch.Tensor] = []
    feats: list[torch.Tensor] = []

    def attn_hook(_m, _a, out):
        w = out[1][0]  # [H, T, T]
        r = (w * far).sum(1) / n_far  # [H, T]
        r = r / r[:, SINK:].mean(1, keepdim=True).clamp(min=1e-12)
        acc.append(r.mean(0))

    def v_hook(_m, _a, out):
        feats.append(out[0].detach().clone())

    handles = [lyr.self_attn.register_forward_hook(attn_hook) for lyr in decoder.layers]
    handles.append(decoder.layers[layer].self_attn.v_proj.register_forward_hook(v_hook))
    xs, imps = [], []
    try:
        with torch.inference_mode():
            for w in tqdm(windows, desc=desc, unit="window", file=sys.stderr):
                acc.clear()
                feats.clear()
                decoder(input_ids=torch.tensor([w]), use_cache=False)
                imps.append(torch.stack(acc).mean(0))
                xs.append(feats[0])
    finally:
        for h in handles:
            h.remove()
    x, imp = torch.stack(xs), torch.stack(imps)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[SINK:T - FAR] = True
    mask = mask.expand_as(imp).clone()
    labels = torch.zeros_like(mask)
    for i in range(len(windows)):
        vals = imp[i][mask[i]]
        thr = torch.quantile(vals, 1.0 - positive)
        labels[i] = (imp[i] >= thr) & mask[i]
    return x, labels, mask, imp


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Rank-based ROC AUC (ties get the average rank)."""
    s, y = scores.double().flatten(), labels.flatten().bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.double)
    # average ranks over ties
    uniq, inv = torch.unique(s, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inv, ranks)
    cnts = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / cnts)[inv]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def block_view(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """Per block of BLOCK tokens (fully inside the mask): max score, any label."""
    W, T = scores.shape
    nb = T // BLOCK
    s = scores[:, : nb * BLOCK].reshape(W, nb, BLOCK)
    y = labels[:, : nb * BLOCK].reshape(W, nb, BLOCK)
    m = mask[:, : nb * BLOCK].reshape(W, nb, BLOCK).all(-1)
    return s.max(-1).values[m], y.any(-1)[m]


def evaluate(ctl: Controller, x, labels, mask) -> dict[str, float]:
    W, T = labels.shape
    pos = torch.arange(T).expand(W, T)
    with torch.no_grad():
        logits, _ = ctl.logits(x, pos)
    p = torch.sigmoid(logits)
    recency = pos.float()
    vnorm = x.float().norm(dim=-1)
    out = {
        "auc_controller": roc_auc(p[mask], labels[mask]),
        "auc_recency": roc_auc(recency[mask], labels[mask]),
        "auc_value_norm": roc_auc(vnorm[mask], labels[mask]),
        "block_auc_controller": roc_auc(*block_view(p, labels, mask)),
        "block_auc_recency": roc_auc(*block_view(recency, labels, mask)),
    }
    # precision / recall at the label rate
    k = int(labels[mask].sum())
    top = torch.topk(p[mask], k).indices
    hit = float(labels[mask][top].float().sum())
    out["precision_at_label_rate"] = hit / max(k, 1)
    pred = p[mask] >= 0.5
    tp = float((pred & labels[mask]).sum())
    out["precision@0.5"] = tp / max(float(pred.sum()), 1.0)
    out["recall@0.5"] = tp / max(float(labels[mask].sum()), 1.0)
    return out


def train(model_path: str | Path, *, layer: int, tokens: int, train_windows: int,
          eval_windows: int, epochs: int, positive: float, hidden: int, seed: int,
          threads: int | None = None) -> tuple[Controller, dict]:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_path)
    wins = {}
    for split, n in (("calib", train_windows), ("eval", eval_windows)):
        have = available_tokens(split, tok) // tokens
        if n > have:
            raise ValueError(f"split {split!r} holds {have} windows of {tokens} tokens, {n} asked")
        ids = real_text(split, n * tokens, tok)
        wins[split] = [ids[i * tokens:(i + 1) * tokens] for i in range(n)]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    nl = model.config.num_hidden_layers
    if not 0 <= layer < nl:
        raise ValueError(f"--layer must be in [0, {nl}), got {layer}")
    xt, yt, mt, _ = collect(model, wins["calib"], layer, positive, "labels (calib)")
    xe, ye, me, _ = collect(model, wins["eval"], layer, positive, "labels (eval)")
    label_s = time.perf_counter() - started

    ctl = Controller(xt.shape[-1], hidden)
    ctl.layer = layer
    flat = xt.reshape(-1, xt.shape[-1])
    ctl.mean.copy_(flat.mean(0))
    ctl.std.copy_(flat.std(0).clamp(min=1e-4))
    opt = torch.optim.Adam(ctl.parameters(), lr=3e-3)
    pos_w = torch.tensor((~yt[mt]).sum().item() / max(yt[mt].sum().item(), 1))
    W, T = yt.shape
    positions = torch.arange(T).expand(W, T)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_w, reduction="none")
    bar = tqdm(range(epochs), desc="train", unit="epoch", file=sys.stderr)
    history = []
    for _ in bar:
        ctl.train()
        logits, _ = ctl.logits(xt, positions)
        loss = (loss_fn(logits, yt.float()) * mt).sum() / mt.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ctl.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{float(loss):.4f}")
    ctl.eval()
    report = {
        "model": str(model_path), "layer": layer, "tokens_per_window": tokens,
        "train_windows": train_windows, "eval_windows": eval_windows, "epochs": epochs,
        "positive_fraction": positive, "hidden": hidden, "seed": seed,
        "label_seconds": round(label_s, 1),
        "train_seconds": round(time.perf_counter() - started - label_s, 1),
        "final_train_loss": history[-1],
        "train": evaluate(ctl, xt, yt, mt),
        "eval": evaluate(ctl, xe, ye, me),
        "parameters": sum(p.numel() for p in ctl.parameters()),
    }
    return ctl, report


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vllm-adaptive train-controller", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: the embedded model)")
    ap.add_argument("--output", default=str(SHIPPED), help="controller file to write (default: the shipped one)")
    ap.add_argument("--report", default=None, help="also write the report as JSON here")
    ap.add_argument("--layer", type=int, default=2, help="decoder layer whose values feed the controller")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per window")
    ap.add_argument("--train-windows", type=int, default=10)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--positive", type=float, default=0.1, help="fraction of tokens labelled important")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.model is None:
        from vllm_adaptive.model import default_model_path

        ns.model = str(default_model_path())
    ctl, report = train(ns.model, layer=ns.layer, tokens=ns.tokens, train_windows=ns.train_windows,
                        eval_windows=ns.eval_windows, epochs=ns.epochs, positive=ns.positive,
                        hidden=ns.hidden, seed=ns.seed, threads=ns.threads)
    out = Path(ns.output)
    ctl.save(out, **{k: v for k, v in report.items() if k != "model"})
    text = json.dumps(report, indent=2)
    print(text)
    if ns.report:
        Path(ns.report).write_text(text + "\n")
    print(f"controller written to {out} ({out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
