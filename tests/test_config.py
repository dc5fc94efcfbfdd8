"""adaptive_attention parsing: presets, the per-layer table, and clear errors."""

from __future__ import annotations

import pytest

from vllm_adaptive.sparse_pattern import SparsePattern
from vllm_adaptive.config import AdaptiveConfigError, parse_config
from vllm_adaptive.plan import resolve


def resolve_on(cfg, device="cpu", block_size=128, max_model_len=8192):
    return resolve(cfg, block_size=block_size, device_type=device, max_model_len=max_model_len)


def test_none_and_preset_name_mean_full():
    for raw in (None, "full", {"preset": "full"}, {}):
        cfg = parse_config(raw, 30)
        assert cfg.num_layers == 30 and cfg.all_full
        assert cfg.kinds == ("full",) * 30
        assert set(cfg.kernels.values()) == {"auto"}


def test_dict_overrides_preset_key_by_key():
    cfg = parse_config({"preset": "full", "kernels": "torch"}, 4)
    assert cfg.preset == "full" and cfg.kernels["full"] == "torch" and cfg.all_full


def test_layer_table_lookup():
    cfg = parse_config({"layer_kinds": ["full"] * 3}, 3)
    assert cfg.kind_of(2) == "full"
    with pytest.raises(IndexError, match="layer 3"):
        cfg.kind_of(3)
    with pytest.raises(IndexError, match="layer 3"):
        resolve_on(cfg).layer(3)


@pytest.mark.parametrize(
    "raw,needle",
    [
        ("longgen-typo", r"adaptive_attention\.preset: expected one of \['adore', 'full', 'kivi2', 'kivi4', 'kivi8', 'longgen', 'longgen-adore', 'longgen-kivi4', 'longgen-strided'\], got 'longgen-typo'"),
        ({"preset": 3}, r"adaptive_attention\.preset: expected one of"),
        ({"windw": 4}, r"unknown key\(s\) \['windw'\]; allowed keys are"),
        ({"kernels": "cuda"}, r"adaptive_attention\.kernels: expected one of \['auto', 'vllm_cpu', 'torch', 'triton'\], got 'cuda'"),
        ({"default_kind": "sparse"}, r"adaptive_attention\.default_kind: expected one of \['full', 'sink_window', 'strided', 'release'\], got 'sparse'"),
        ({"layer_kinds": "full"}, r"adaptive_attention\.layer_kinds: expected a list of 4 layer kinds, got 'full'"),
        ({"layer_kinds": ["full"] * 3}, r"layer_kinds: expected 4 entries .* got 3"),
        ({"layer_kinds": ["full", "full", 7, "full"]}, r"layer_kinds\[2\]: expected one of \['full', 'sink_window', 'strided', 'release'\], got 7"),
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
        ({"kernels": {"sink_window": "cuda"}}, r"adaptive_attention\.kernels\.sink_window: expected one of \['auto', 'vllm_cpu', 'torch', 'triton'\], got 'cuda'"),
        ({"kernels": {"sparse": "torch"}}, r"adaptive_attention\.kernels \(a layer kind\): expected one of \['full', 'sink_window', 'strided', 'release'\], got 'sparse'"),
        ({"kernels": 3}, r"adaptive_attention\.kernels: expected one of .* or a dict \{layer kind: value\}, got 3"),
        ({"kv_format": "int4"}, r"adaptive_attention\.kv_format: expected one of \['model_dtype', 'kivi'\], got 'int4'"),
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
        resolve_on(cfg, device)
    else:
        with pytest.raises(AdaptiveConfigError, match=r"adaptive_attention\.kernels: expected a kernel path that runs on"):
            resolve_on(cfg, device)


def test_longgen_presets_place_the_middle_third_full():
    from vllm_adaptive.config import middle_third

    cfg = parse_config("longgen", 30)
    assert cfg.full_layer_indices == tuple(range(10, 20)) == middle_third(30)
    assert {k for i, k in enumerate(cfg.kinds) if i not in range(10, 20)} == {"sink_window"}
    # LongGen's block-granular sink + window: 128 sink tokens, the last 6 blocks of 128
    assert cfg.params("sink_window") == SparsePattern(sink=128, block=128, local_blocks=6)
    assert cfg.params("full") is None
    exact = parse_config({"preset": "longgen", "sink_window": {"block": 1, "sink": 64}}, 30)
    assert exact.params("sink_window") == SparsePattern(sink=64, window=768)
    strided = parse_config({"preset": "longgen-strided", "strided": {"vert_stride": 4}}, 30)
    assert strided.freeing_kinds_used == ("strided",)
    assert strided.params("strided").vert_stride == 4  # overrides key by key
    assert strided.params("strided").local_blocks == 4  # the rest from the preset
    assert middle_third(7) == (2, 3, 4)
    # block-aligned sink + local blocks (no vertical stride): LongGen's
    # sink + window at block granularity
    local = parse_config({"preset": "longgen-strided", "strided": {"vert_stride": 0, "local_blocks": 6}}, 30)
    assert local.params("strided").vert_stride == 0 and local.params("strided").block_aligned(128)


def test_calibrated_map_and_explicit_layer_kinds():
    cfg = parse_config({"preset": "longgen", "full_layers": [0, 3]}, 4)
    assert list(cfg.kinds) == ["full", "sink_window", "sink_window", "full"]
    mixed = parse_config({"layer_kinds": ["full", "strided", "sink_window", "full"]}, 4)
    assert mixed.freeing_kinds_used == ("sink_window", "strided")


def test_engine_dependent_checks():
    resolve_on(parse_config("longgen-strided", 30))
    with pytest.raises(AdaptiveConfigError, match=r"strided\.block: expected a multiple of the KV cache block size \(96\), got 128"):
        resolve_on(parse_config("longgen-strided", 30), block_size=96)
    big = parse_config({"preset": "longgen", "sink_window": {"window": 8192, "block": 1}}, 30)
    with pytest.raises(AdaptiveConfigError, match=r"sink_window: the pattern .* max_model_len=8192, so it would free nothing"):
        resolve_on(big)


def test_vllm_cpu_kernels_cannot_run_token_windows():
    token_window = {"preset": "longgen", "kernels": "vllm_cpu", "sink_window": {"block": 1}}
    with pytest.raises(AdaptiveConfigError, match=r"adaptive_attention\.kernels: 'vllm_cpu' cannot run layer 0 \(sink_window, kv_format model_dtype\): vLLM's CPU kernel runs a sparse pattern only when it is aligned .* sink=128,window=768\. Use 'auto' or 'torch'"):
        resolve_on(parse_config(token_window, 30))
    resolve_on(parse_config({"preset": "longgen", "kernels": "vllm_cpu"}, 30))
    # block-aligned strided layers can, at a block size the pattern is aligned to
    resolve_on(parse_config({"preset": "longgen-strided", "kernels": "vllm_cpu"}, 30))
    with pytest.raises(AdaptiveConfigError, match=r"kernels: 'vllm_cpu' cannot run layer 0 \(strided"):
        resolve_on(parse_config({"preset": "longgen-strided", "kernels": "vllm_cpu", "strided": {"sink": 16}}, 30))


def test_plan_paths_per_kind_and_auto():
    """auto: vLLM's CPU ops where a runner can use them, else torch; Triton on
    CUDA. A path can be set per layer kind; every layer of a kind shares it."""
    plan = resolve_on(parse_config("longgen", 30))
    assert {(p.kind, p.path) for p in plan.layers} == {("full", "vllm_cpu"), ("sink_window", "vllm_cpu")}
    assert plan.layer(10).runner.describe() == "dense/model_dtype/vllm_cpu"
    assert plan.layer(0).runner.describe() == "sparse/model_dtype/vllm_cpu"
    window = resolve_on(parse_config({"preset": "longgen", "sink_window": {"block": 1}}, 30))
    assert window.layer(0).path == "torch" and window.layer(0).runner.in_step_free
    assert window.layer(15).path == "vllm_cpu"
    per_kind = resolve_on(parse_config({"preset": "longgen", "kernels": {"full": "torch"}}, 30))
    assert per_kind.layer(15).path == "torch" and per_kind.layer(0).path == "vllm_cpu"
    cuda = resolve_on(parse_config("longgen", 30), device="cuda", block_size=16)
    assert {p.path for p in cuda.layers} == {"triton"}
    assert cuda.layer(0).runner.decodes_first
    with pytest.raises(AdaptiveConfigError, match=r"kernels\.sink_window: expected a kernel path that runs on cuda, got 'vllm_cpu'"):
        resolve_on(parse_config({"preset": "longgen", "kernels": {"sink_window": "vllm_cpu"}}, 30), device="cuda", block_size=16)
    table = plan.table()
    assert "sink_window" in table and "0-9,20-29" in table and "10-19" in table


def test_missing_runner_names_layer_and_what_exists(monkeypatch):
    from vllm_adaptive import runners

    monkeypatch.delitem(runners.RUNNERS, ("sparse", "model_dtype", "torch"))
    cfg = parse_config({"preset": "longgen", "kernels": {"sink_window": "torch"}}, 30)
    with pytest.raises(AdaptiveConfigError, match=r"kernels\.sink_window: layer 0 \(sink_window, kv_format model_dtype\) has no runner for kernel path 'torch' \(implemented for sparse layers in model_dtype: \['triton', 'vllm_cpu'\]\)"):
        resolve_on(cfg)
    window = parse_config({"preset": "longgen", "sink_window": {"block": 1}}, 30)
    with pytest.raises(AdaptiveConfigError, match=r"no kernel path runs layer 0 \(sink_window, kv_format model_dtype\) on cpu: vllm_cpu: vLLM's CPU kernel .*; torch: no runner"):
        resolve_on(window)


def test_kivi_presets_and_per_kind_formats():
    cfg = parse_config("kivi4", 30)
    plan = resolve_on(cfg)
    assert {lp.kv_format for lp in plan.layers} == {"kivi"}
    assert {lp.path for lp in plan.layers} == {"torch"}  # vLLM's CPU ops cannot read it
    assert plan.layers[0].kv_params.bits == 4
    lg = resolve_on(parse_config("longgen-kivi4", 30))
    assert {(lp.kind, lp.kv_format) for lp in lg.layers} == {("full", "kivi"), ("sink_window", "kivi")}
    only_sparse = parse_config({"preset": "longgen", "kv_format": {"sink_window": "kivi"},
                                "kivi": {"bits": 2}}, 30)
    plan = resolve_on(only_sparse)
    assert {lp.kv_format for lp in plan.layers if lp.kind == "full"} == {"model_dtype"}
    assert {lp.kv_params.bits for lp in plan.layers if lp.kind == "sink_window"} == {2}
    assert "kivi(int2" in plan.table()


@pytest.mark.parametrize("raw,block_size,needle", [
    ({"preset": "kivi4", "kivi": {"bits": 3}}, 128, "adaptive_attention.kivi.bits: expected one of [8, 4, 2], got 3"),
    ({"preset": "kivi4", "kivi": {"bit": 4}}, 128, "unknown key(s) ['bit']"),
    ({"preset": "kivi4", "kivi": {"group_size": 48}}, 128, "kivi.group_size: expected a divisor of the block size 128, got 48"),
    ({"preset": "kivi4", "kivi": {"group_size": 0}}, 128, "kivi.group_size: expected a positive int"),
    ({"preset": "kivi4", "kivi": {"group_size": 32, "residual": 48}}, 128, "kivi.residual: expected a multiple of group_size 32"),
    ({"preset": "kivi4", "kivi": {"residual": 256}}, 256, "kivi.residual: expected at most the model's length 128"),
    ({"kv_format": "int4"}, 128, "kv_format: expected one of ['model_dtype', 'kivi'], got 'int4'"),
    ({"preset": "kivi4", "kivi": {"rotation": "hadamard"}}, 128, "kivi.rotation: expected one of ['none', 'v', 'kv'], got 'hadamard'"),
    ({"preset": "kivi4", "kivi": {"value_group": 0}}, 128, "kivi.value_group: expected a positive int, or null for 32 (KIVI)"),
])
def test_kivi_bad_values_name_the_key(raw, block_size, needle):
    with pytest.raises(AdaptiveConfigError) as e:
        resolve_on(parse_config(raw, 30), block_size=block_size, max_model_len=128)
    assert needle in str(e.value)


def test_adore_presets():
    plan = resolve_on(parse_config("adore", 30))
    assert {(lp.kind, lp.path) for lp in plan.layers} == {("release", "torch")}
    p = plan.layers[0].params
    assert (p.budget, p.sink, p.recent, p.scorer) == (1024, 128, 256, "gru")
    lg = resolve_on(parse_config({"preset": "longgen-adore", "release": {"scorer": "h2o"}}, 30))
    assert [lp.kind for lp in lg.layers][9:21] == ["release"] + ["full"] * 10 + ["release"]
    assert lg.layers[0].params.scorer == "h2o" and lg.layers[0].params.budget == 1024
    assert "release" in lg.table() and "scorer=h2o" in lg.table()


@pytest.mark.parametrize("raw,needle", [
    ({"release": {"budget": 1000}}, "release.budget: expected a multiple of the KV cache block size (128), got 1000"),
    ({"release": {"budget": 512}}, "release.budget: expected at least 640 tokens at block size 128"),
    ({"release": {"budget": 8192}}, "release.budget: 8192 tokens is not less than max_model_len=8192"),
    ({"release": {"scorer": "snapkv"}}, "release.scorer: expected one of ['gru', 'h2o', 'recent', 'quest'], got 'snapkv'"),
    ({"release": {"sink": 0}}, "release.sink: expected an int >= 1, got 0"),
    ({"release": {"rebuild": -1}}, "release.rebuild: expected an int >= 0, got -1"),
    ({"release": {"budgets": 1024}}, "release: unknown key(s) ['budgets']"),
    ({"release": {"controller": "/nonexistent/ctl.pt"}}, "release.controller: expected an existing controller file, got '/nonexistent/ctl.pt'"),
    ({"release": {"controller": 3}}, "release.controller: expected a path to a controller file, or null, got 3"),
    ({"release": {"prefill_chunk": 0}}, "release.prefill_chunk: expected an int >= 1, got 0"),
])
def test_release_bad_values_name_the_key(raw, needle):
    with pytest.raises(AdaptiveConfigError) as e:
        resolve_on(parse_config({"preset": "adore", **raw}, 30))
    assert needle in str(e.value)


def test_release_has_no_kivi_runner_yet():
    with pytest.raises(AdaptiveConfigError, match=r"no kernel path runs layer 0 \(release, kv_format kivi\)"):
        resolve_on(parse_config({"preset": "adore", "kv_format": "kivi"}, 30))


def test_damaged_controller_file_names_the_key(tmp_path):
    bad = tmp_path / "ctl.pt"
    bad.write_bytes(b"not a controller")
    with pytest.raises(AdaptiveConfigError, match=r"release\.controller: expected a controller file written by train-controller"):
        resolve_on(parse_config({"preset": "adore", "release": {"controller": str(bad)}}, 30))


def _fake_vllm_config(kv_transfer_config=None):
    from types import SimpleNamespace

    model = SimpleNamespace(hf_config=SimpleNamespace(num_hidden_layers=30),
                            get_total_num_kv_heads=lambda: 3, get_head_size=lambda: 64)
    return SimpleNamespace(kv_transfer_config=kv_transfer_config, model_config=model,
                           scheduler_config=SimpleNamespace(long_prefill_token_threshold=0))


def test_release_startup_installs_the_connector_and_checks_the_controller():
    from types import SimpleNamespace

    from vllm_adaptive.kinds import KINDS
    from vllm_adaptive.release.connector import CONNECTOR_NAME
    from vllm_adaptive.startup import logger

    def _setup_release(cfg, vc):  # what start-up runs for the kind
        KINDS["release"].prepare_engine(cfg, vc, logger)

    vc = _fake_vllm_config()
    _setup_release(parse_config("adore", 30), vc)
    assert vc.kv_transfer_config.kv_connector == CONNECTOR_NAME
    assert vc.scheduler_config.long_prefill_token_threshold == 256
    # the shipped controller reads layer 2: it must be a release layer
    kinds = ["release"] * 30
    kinds[2] = "full"
    with pytest.raises(ValueError, match=r"release\.controller: the controller reads layer 2's values, but the layer map "
                       r"\(layer_kinds / full_layers / default_kind\) makes that layer 'full', not a release layer"):
        _setup_release(parse_config({"preset": "adore", "layer_kinds": kinds}, 30), _fake_vllm_config())
    other = SimpleNamespace(kv_connector="NixlConnector")
    with pytest.raises(ValueError, match=r"release layers need their own KV connector \(AdoreConnector\), but --kv-transfer-config sets 'NixlConnector'"):
        _setup_release(parse_config("adore", 30), _fake_vllm_config(other))
    # a controller for another model
    vc = _fake_vllm_config()
    vc.model_config.get_head_size = lambda: 128
    with pytest.raises(AdaptiveConfigError, match=r"release\.controller: expected a controller for this model .* got 'one trained on layer 2 with 192 inputs'"):
        _setup_release(parse_config("adore", 30), vc)


def test_block_freeing_layers_refuse_engine_features_they_cannot_serve():
    """Start-up refuses, naming the layers, what freed blocks would break; it
    switches prefix caching off; release layers bring their own connector."""
    from types import SimpleNamespace

    from vllm_adaptive.startup import _check_block_freeing_engine

    def vc(**kw):
        base = _fake_vllm_config(kw.pop("kv_transfer_config", None))
        base.speculative_config = kw.pop("speculative_config", None)
        base.scheduler_config.disable_hybrid_kv_cache_manager = kw.pop("disable_hybrid", False)
        base.cache_config = SimpleNamespace(enable_prefix_caching=True)
        return base

    longgen = parse_config("longgen", 30)
    with pytest.raises(ValueError, match=r"sparse layers \(sink_window\) do not support KV transfer connectors "
                                         r"such as 'NixlConnector'"):
        _check_block_freeing_engine(longgen, vc(kv_transfer_config=SimpleNamespace(kv_connector="NixlConnector")))
    with pytest.raises(ValueError, match=r"sparse layers \(sink_window\) do not support speculative decoding"):
        _check_block_freeing_engine(longgen, vc(speculative_config=object()))
    with pytest.raises(ValueError, match=r"release layers need vLLM's hybrid KV cache manager"):
        _check_block_freeing_engine(parse_config("adore", 30), vc(disable_hybrid=True))
    ok = vc()
    _check_block_freeing_engine(longgen, ok)
    assert ok.kv_transfer_config is None and not ok.cache_config.enable_prefix_caching
    adore = vc()
    _check_block_freeing_engine(parse_config("longgen-adore", 30), adore)
    assert adore.kv_transfer_config.kv_connector == "AdoreConnector"
