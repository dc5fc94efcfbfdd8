"""Calibration: the lost-mass metric, the layer choice, the text splits, and
an end-to-end run on the embedded model (tiny windows, small patterns)."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from vllm_adaptive import text
from vllm_adaptive.calibrate import (
    choose_full_layers,
    lost_mass,
    main,
    middle_layers,
    pattern_masks,
    total_lost_mass,
)
from vllm_adaptive.config import middle_third, parse_config
from vllm_adaptive.sparse_pattern import SparsePattern


# ---------------------------------------------------------------- metric
def test_pattern_masks_hand_made() -> None:
    # sink 1, window 2 over 6 tokens: query p reads key 0 and keys p-1, p.
    hidden, affected = pattern_masks(SparsePattern(sink=1, window=2), 6)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for p, j in [(3, 1), (4, 1), (4, 2), (5, 1), (5, 2), (5, 3)]:
        expected[p, j] = True
    assert torch.equal(hidden, expected)
    assert affected.tolist() == [False, False, False, True, True, True]


def test_lost_mass_hand_made() -> None:
    """Hand-computed values. Head 0's probabilities are dyadic, so its sums
    are exact in float32; head 1's (2/5, ...) and the means (/3) round, by a
    few float32 ulps of numbers below 1 (2^-24 each): abs=1e-7."""
    hidden, affected = pattern_masks(SparsePattern(sink=1, window=2), 6)
    e = 1 / 8
    head0 = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [4 * e, 4 * e, 0, 0, 0, 0],
            [2 * e, 2 * e, 4 * e, 0, 0, 0],
            [4 * e, 2 * e, e, e, 0, 0],  # hides key 1: 2/8
            [e, e, e, e, 4 * e, 0],  # hides keys 1, 2: 2/8
            [e, 2 * e, e, e, e, 2 * e],  # hides keys 1, 2, 3: 4/8
        ]
    )
    head1 = torch.tril(torch.ones(6, 6)) / torch.arange(1, 7)[:, None]  # uniform
    # uniform: row 3 hides 1/4, row 4 hides 2/5, row 5 hides 3/6
    attn = torch.stack([head0, head1])[None]  # [batch 1, heads 2, 6, 6]
    got = lost_mass(attn, hidden, affected)
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx((2 / 8 + 2 / 8 + 4 / 8) / 3, abs=1e-7)
    assert got[1].item() == pytest.approx((1 / 4 + 2 / 5 + 3 / 6) / 3, abs=1e-7)
    # equals 1 - mass on visible keys
    visible = torch.tril(torch.ones(6, 6, dtype=torch.bool)) & ~hidden
    kept = (attn * visible).sum(-1)[..., affected].mean(dim=(0, 2))
    # sums of <= 6 terms below 1: gamma_6 = 6 * 2^-24 < 4e-7 each way
    assert torch.allclose(got, 1 - kept, atol=1e-6)
    # a batch of two identical windows has the same mean
    assert torch.allclose(lost_mass(torch.cat([attn, attn]), hidden, affected), got)


def test_strided_masks_match_pattern() -> None:
    pat = SparsePattern(sink=2, block=4, local_blocks=1, vert_stride=2)
    hidden, affected = pattern_masks(pat, 20)
    for p in range(20):
        for j in range(20):
            assert hidden[p, j].item() == (j <= p and not pat.visible_one(p, j))
    assert affected.tolist() == [bool(hidden[p].any()) for p in range(20)]


# ---------------------------------------------------------------- choice
def test_choose_full_layers_top_k_and_ties() -> None:
    assert choose_full_layers([0.1, 0.5, 0.3, 0.5, 0.0], 2) == (1, 3)
    assert choose_full_layers([0.2, 0.2, 0.2], 2) == (0, 1)
    assert choose_full_layers([0.2, 0.1], 0) == ()
    with pytest.raises(ValueError):
        choose_full_layers([0.2, 0.1], 3)


def test_middle_layers_is_middle_third_for_default_k() -> None:
    for n in range(1, 40):
        assert middle_layers(n, len(middle_third(n))) == middle_third(n)
    assert middle_layers(30, 3) == (13, 14, 15)


def test_calibrated_total_is_minimal_and_beats_middle() -> None:
    rng = random.Random(0)
    for n, k in ((3, 1), (7, 3), (9, 3), (9, 5)):
        for _ in range(20):
            scores = [rng.random() for _ in range(n)]
            chosen = choose_full_layers(scores, k)
            best = min(total_lost_mass(scores, c) for c in itertools.combinations(range(n), k))
            assert total_lost_mass(scores, chosen) == pytest.approx(best)
            assert total_lost_mass(scores, chosen) <= total_lost_mass(scores, middle_layers(n, k))


# ---------------------------------------------------------------- text
@pytest.fixture(scope="module")
def tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _paragraphs(split: str) -> set[str]:
    return {p.strip() for _, t in text.split_documents(split) for p in t.split("\n\n")}


def test_real_text_splits_disjoint() -> None:
    calib, ev = text.split_documents("calib"), text.split_documents("eval")
    assert calib and ev
    assert not {k for k, _ in calib} & {k for k, _ in ev}
    assert not _paragraphs("calib") & _paragraphs("eval")


def test_real_text_deterministic_and_long_enough(tokenizer) -> None:
    # recomputed from scratch, not from the cache
    assert text._documents.__wrapped__() == text._documents()
    for split in text.SPLITS:
        assert text.available_tokens(split, tokenizer) >= 4 * 8192
        ids = text.real_text(split, 8192, tokenizer)
        assert len(ids) == 8192 and ids == text.real_text(split, 8192, tokenizer)
        assert text.real_text(split, 100, tokenizer) == ids[:100]
    calib = text.real_text("calib", 8192, tokenizer)
    ev = text.real_text("eval", 8192, tokenizer)
    n = 64
    grams = {tuple(calib[i : i + n]) for i in range(len(calib) - n + 1)}
    assert not any(tuple(ev[i : i + n]) in grams for i in range(len(ev) - n + 1))


def test_real_text_errors(tokenizer) -> None:
    with pytest.raises(ValueError, match="split"):
        text.real_text("train", 10, tokenizer)
    with pytest.raises(ValueError, match="holds"):
        text.real_text("eval", 10**7, tokenizer)


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize(
    ("kind", "pattern", "num_full", "want"),
    [
        ("sink_window", {"sink": 4, "window": 32, "block": 1}, 10, SparsePattern(sink=4, window=32)),
        ("sink_window", {"sink": 16, "window": 32, "block": 16}, 10,
         SparsePattern(sink=16, block=16, local_blocks=2)),
        ("strided", {"sink": 4, "block": 16, "local_blocks": 2, "vert_stride": 4}, 3,
         SparsePattern(sink=4, block=16, local_blocks=2, vert_stride=4)),
    ],
)
def test_end_to_end(model_path: str, tmp_path: Path, kind: str, pattern: dict, num_full: int,
                    want: SparsePattern) -> None:
    out = tmp_path / "map.json"
    threads = torch.get_num_threads()
    rc = main([
        "--model", model_path, "--kind", kind, "--tokens", "128", "--windows", "1", "--threads", "1",
        "--pattern", json.dumps(pattern), "--num-full", str(num_full), "--output", str(out),
    ])
    assert rc == 0
    assert torch.get_num_threads() == threads  # restored
    report = json.loads(out.read_text())
    assert report["torch_threads"] == 1
    cfg = parse_config(report["adaptive_attention"], report["num_layers"])
    assert report["num_layers"] == 30 and report["num_heads"] == 9
    assert len(cfg.full_layer_indices) == num_full
    assert list(cfg.full_layer_indices) == report["full_layers"]
    assert set(cfg.kinds) == {"full", kind}
    assert cfg.kind_params[kind] == want
    scores = [row["score"] for row in report["layers"]]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert all(len(row["heads"]) == 9 for row in report["layers"])
    assert report["full_layers"] == list(choose_full_layers(scores, num_full))
    lost = report["lost_mass"]
    assert lost["calibrated"] == pytest.approx(total_lost_mass(scores, report["full_layers"]))
    assert report["middle_layers"] == list(middle_layers(30, num_full))
    assert lost["middle"] == pytest.approx(total_lost_mass(scores, report["middle_layers"]))
    assert lost["calibrated"] <= lost["middle"]
    assert report["text"]["split"] == "calib" and report["text"]["total_tokens"] == 128


def test_pattern_hiding_nothing_is_rejected(model_path: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "map.json"
    rc = main(["--model", model_path, "--tokens", "64", "--windows", "1", "--output", str(out)])
    assert rc == 2 and not out.exists()
    assert "hides no key" in capsys.readouterr().err
