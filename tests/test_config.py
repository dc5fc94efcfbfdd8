"""adaptive_attention parsing: presets, the per-layer table, and clear errors."""

from __future__ import annotations

import pytest

from vllm_adaptive.pattern import SparsePattern
from vllm_adaptive.config import (
    AdaptiveConfigError,
    check_kernels_for_device,
    parse_config,
)


def test_none_and_preset_name_mean_full():
    for raw in (None, "full", {"preset": "full"}, {}):
        cfg = parse_config(raw, 30)
        assert cfg.num_layers == 30 and cfg.all_full
        assert [p.layer_idx for p in cfg.layers] == list(range(30))
        assert cfg.kernels == "auto"


def test_dict_overrides_preset_key_by_key():
    cfg = parse_config({"preset": "full", "kernels": "torch"}, 4)
    assert cfg.preset == "full" and cfg.kernels == "torch" and cfg.all_full


def test_layer_table_lookup():
    cfg = parse_config({"layer_kinds": ["full"] * 3}, 3)
    assert cfg.plan(2).kind == "full"
    with pytest.raises(IndexError, match="layer 3"):
        cfg.plan(3)


@pytest.mark.parametrize(
    "raw,needle",
    [
        ("longgen-typo", r"adaptive_attention\.preset: expected one of \['full', 'longgen', 'longgen-strided'\], got 'longgen-typo'"),
        ({"preset": 3}, r"adaptive_attention\.preset: expected one of"),
        ({"windw": 4}, r"unknown key\(s\) \['windw'\]; allowed keys are"),
        ({"kernels": "cuda"}, r"adaptive_attention\.kernels: expected one of \['auto', 'vllm_cpu', 'torch', 'triton'\], got 'cuda'"),
        ({"default_kind": "sparse"}, r"adaptive_attention\.default_kind: expected one of \['full', 'sink_window', 'strided'\], got 'sparse'"),
        ({"layer_kinds": "full"}, r"adaptive_attention\.layer_kinds: expected a list of 4 layer kinds, got 'full'"),
        ({"layer_kinds": ["full"] * 3}, r"layer_kinds: expected 4 entries .* got 3"),
        ({"layer_kinds": ["full", "full", 7, "full"]}, r"layer_kinds\[2\]: expected one of \['full', 'sink_window', 'strided'\], got 7"),
        ({"full_layers": [0, 4]}, r"adaptive_attention\.full_layers\[1\]: expected a layer index in \[0, 4\), got 4"),
        ({"full_layers": [1, 1]}, r"adaptive_attention\.full_layers: expected distinct layer indices"),
        ({"full_layers": "top"}, r"adaptive_attention\.full_layers: expected 'middle_third' or a list"),
        ({"sink_window": {"window": 0}}, r"adaptive_attention\.sink_window\.window: expected an int >= 1, got 0"),
        ({"sink_window": {"sink": -1}}, r"adaptive_attention\.sink_window\.sink: expected an int >= 0, got -1"),
        ({"sink_window": {"windw": 8}}, r"adaptive_attention\.sink_window: unknown key\(s\) \['windw'\]"),
        ({"sink_window": {"window": 100}}, r"adaptive_attention\.sink_window\.window: expected a multiple of sink_window\.block \(128; or block 1 for a token window\), got 100"),
        ({"strided": {"vert_stride": 1}}, r"adaptive_attention\.strided\.vert_stride: expected 0 \(off\) or an int >= 2, got 1"),
        ({"strided": 64}, r"adaptive_attention\.strided: expected a dict with keys"),
        (42, r"adaptive_attention: expected a preset name .* got int 42"),
    ],
)
def test_bad_values_name_the_key(raw, needle):
    with pytest.raises(AdaptiveConfigError, match=needle):
        parse_config(raw, 4)


def test_errors_are_value_errors():
    assert issubclass(AdaptiveConfigError, ValueError)


@pytest.mark.parametrize(
    "kernels,device,ok",
    [("vllm_cpu", "cuda", False), ("triton", "cpu", False), ("vllm_cpu", "cpu", True),
     ("triton", "cuda", True), ("torch", "cpu", True), ("auto", "cuda", True)],
)
def test_kernels_must_fit_the_device(kernels, device, ok):
    cfg = parse_config({"kernels": kernels}, 2)
    if ok:
        check_kernels_for_device(cfg, device)
    else:
        with pytest.raises(AdaptiveConfigError, match="adaptive_attention.kernels"):
            check_kernels_for_device(cfg, device)


def test_longgen_presets_place_the_middle_third_full():
    from vllm_adaptive.config import middle_third

    cfg = parse_config("longgen", 30)
    assert cfg.full_layer_indices == tuple(range(10, 20)) == middle_third(30)
    assert {p.kind for p in cfg.layers if p.layer_idx not in range(10, 20)} == {"sink_window"}
    # LongGen's block-granular sink + window: 128 sink tokens, the last 6 blocks of 128
    assert cfg.pattern("sink_window") == SparsePattern(sink=128, block=128, local_blocks=6)
    assert cfg.pattern("full") is None
    exact = parse_config({"preset": "longgen", "sink_window": {"block": 1, "sink": 64}}, 30)
    assert exact.pattern("sink_window") == SparsePattern(sink=64, window=768)
    strided = parse_config({"preset": "longgen-strided", "strided": {"vert_stride": 4}}, 30)
    assert strided.sparse_kinds_used == ("strided",)
    assert strided.pattern("strided").vert_stride == 4  # overrides key by key
    assert strided.pattern("strided").local_blocks == 4  # the rest from the preset
    assert middle_third(7) == (2, 3, 4)
    # block-aligned sink + local blocks (no vertical stride): LongGen's
    # sink + window at block granularity
    local = parse_config({"preset": "longgen-strided", "strided": {"vert_stride": 0, "local_blocks": 6}}, 30)
    assert local.pattern("strided").vert_stride == 0 and local.pattern("strided").block_aligned(128)


def test_calibrated_map_and_explicit_layer_kinds():
    cfg = parse_config({"preset": "longgen", "full_layers": [0, 3]}, 4)
    assert [p.kind for p in cfg.layers] == ["full", "sink_window", "sink_window", "full"]
    mixed = parse_config({"layer_kinds": ["full", "strided", "sink_window", "full"]}, 4)
    assert mixed.sparse_kinds_used == ("sink_window", "strided")


def test_engine_dependent_checks():
    from vllm_adaptive.config import check_against_engine

    check_against_engine(parse_config("longgen-strided", 30), 128, 8192)
    with pytest.raises(AdaptiveConfigError, match=r"strided\.block: expected a multiple of the KV cache block size \(96\), got 128"):
        check_against_engine(parse_config("longgen-strided", 30), 96, 8192)
    big = parse_config({"preset": "longgen", "sink_window": {"window": 8192, "block": 1}}, 30)
    with pytest.raises(AdaptiveConfigError, match=r"sink_window: the pattern .* max_model_len=8192, so it would free nothing"):
        check_against_engine(big, 128, 8192)


def test_vllm_cpu_kernels_cannot_run_token_windows():
    with pytest.raises(AdaptiveConfigError, match="kernels: expected 'auto', 'torch' or 'triton'"):
        check_kernels_for_device(parse_config(
            {"preset": "longgen", "kernels": "vllm_cpu", "sink_window": {"block": 1}}, 30), "cpu")
    check_kernels_for_device(parse_config({"preset": "longgen", "kernels": "vllm_cpu"}, 30), "cpu")
    # block-aligned strided layers can (the block size is checked at start-up)
    check_kernels_for_device(parse_config({"preset": "longgen-strided", "kernels": "vllm_cpu"}, 30), "cpu")
