"""adaptive_attention parsing: presets, the per-layer table, and clear errors."""

from __future__ import annotations

import pytest

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
        ("longgen-typo", r"adaptive_attention\.preset: expected one of \['full'\], got 'longgen-typo'"),
        ({"preset": 3}, r"adaptive_attention\.preset: expected one of"),
        ({"windw": 4}, r"unknown key\(s\) \['windw'\]; allowed keys are"),
        ({"kernels": "cuda"}, r"adaptive_attention\.kernels: expected one of \['auto', 'vllm_cpu', 'torch', 'triton'\], got 'cuda'"),
        ({"default_kind": "sparse"}, r"adaptive_attention\.default_kind: expected one of \['full'\], got 'sparse'"),
        ({"layer_kinds": "full"}, r"adaptive_attention\.layer_kinds: expected a list of 4 layer kinds, got 'full'"),
        ({"layer_kinds": ["full"] * 3}, r"layer_kinds: expected 4 entries .* got 3"),
        ({"layer_kinds": ["full", "full", 7, "full"]}, r"layer_kinds\[2\]: expected one of \['full'\], got 7"),
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
