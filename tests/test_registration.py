"""Registration: entry point, idempotence, pickling into fresh processes,
CPU platform selection, and start-up validation of the engine config."""

from __future__ import annotations

import importlib.metadata
import pickle
import subprocess
import sys

import pytest

import vllm_adaptive
from vllm.v1.attention.backends.registry import AttentionBackendEnum


def test_entry_point_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "vllm_adaptive:register" for ep in eps)


def test_register_is_idempotent_and_import_registers():
    member = AttentionBackendEnum["ADAPTIVE"]
    vllm_adaptive.register()
    vllm_adaptive.register()
    assert AttentionBackendEnum["ADAPTIVE"] is member
    assert member.get_path() == "vllm_adaptive.backend.AdaptiveBackend"
    from vllm_adaptive.backend import AdaptiveBackend

    assert member.get_class() is AdaptiveBackend
    assert AdaptiveBackend.get_name() == "ADAPTIVE"
    # the enum value collides with no built-in member (TORCH_SDPA is "")
    assert member.value not in ("", None)


def test_member_unpickles_in_a_fresh_process_without_plugins():
    """EngineCore / workers / Ray actors unpickle before loading plugins."""
    blob = pickle.dumps({"backend": AttentionBackendEnum["ADAPTIVE"]})
    code = (
        "import pickle, sys\n"
        "assert 'vllm_adaptive' not in sys.modules\n"
        "obj = pickle.loads(sys.stdin.buffer.read())\n"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E\n"
        "assert obj['backend'] is E['ADAPTIVE'], obj\n"
        "print('OK', obj['backend'].get_path())\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["VLLM_PLUGINS"] = ""  # no plugin auto-loading: unpickling alone must suffice
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    assert b"OK vllm_adaptive.backend.AdaptiveBackend" in out.stdout


def test_other_members_pickle_as_before():
    m = AttentionBackendEnum.CPU_ATTN
    assert pickle.loads(pickle.dumps(m)) is m
    assert "__reduce_ex__" not in vars(m)


def _selector(**kw):
    import torch
    from vllm.v1.attention.selector import AttentionSelectorConfig

    base = dict(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=None)
    base.update(kw)
    return AttentionSelectorConfig(**base)


def test_cpu_platform_honours_adaptive_and_delegates_the_rest():
    from vllm.platforms.cpu import CpuPlatform

    path = CpuPlatform.get_attn_backend_cls(AttentionBackendEnum["ADAPTIVE"], _selector())
    assert path == "vllm_adaptive.backend.AdaptiveBackend"
    stock = CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.FLASH_ATTN, _selector())
    assert stock == AttentionBackendEnum.CPU_ATTN.get_path()


@pytest.mark.parametrize(
    "kw,needle",
    [(dict(head_size=48), "head_size not supported"),
     (dict(kv_cache_dtype="fp8"), "kv_cache_dtype not supported"),
     (dict(has_sliding_window=True), "sliding window not supported"),
     (dict(attn_type="encoder_only"), "attention type")],
)
def test_cpu_platform_rejects_what_adaptive_cannot_serve(kw, needle):
    from vllm.platforms.cpu import CpuPlatform

    with pytest.raises(ValueError, match=f"ADAPTIVE cannot serve this model: .*{needle}"):
        CpuPlatform.get_attn_backend_cls(AttentionBackendEnum["ADAPTIVE"], _selector(**kw))


# --- start-up validation through the real EngineArgs -> VllmConfig path -----

def _engine_config(model_path, **kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model_path, max_model_len=1024, **kw).create_engine_config()


def test_bad_config_fails_at_startup_naming_the_key(model_path):
    with pytest.raises(ValueError, match=r"adaptive_attention\.kernels: expected one of"):
        _engine_config(model_path, attention_backend="ADAPTIVE",
                       hf_overrides={"adaptive_attention": {"kernels": "fast"}})
    with pytest.raises(ValueError, match=r"adaptive_attention\.preset"):
        _engine_config(model_path, attention_backend="adaptive",
                       hf_overrides={"adaptive_attention": "nope"})
    with pytest.raises(ValueError, match=r"adaptive_attention\.kernels: expected a kernel path that runs on cpu, got 'triton'"):
        _engine_config(model_path, attention_backend="ADAPTIVE",
                       hf_overrides={"adaptive_attention": {"kernels": "triton"}})


def test_backend_name_any_case_and_default_preset(model_path):
    cfg = _engine_config(model_path, attention_backend="adaptive")
    assert cfg.attention_config.backend is AttentionBackendEnum["ADAPTIVE"]


def test_config_key_selects_adaptive_when_no_backend_given(model_path):
    cfg = _engine_config(model_path, hf_overrides={"adaptive_attention": "full"})
    assert cfg.attention_config.backend is AttentionBackendEnum["ADAPTIVE"]


def test_config_key_with_another_backend_is_refused(model_path):
    with pytest.raises(ValueError, match="only attention backend ADAPTIVE implements"):
        _engine_config(model_path, attention_backend="CPU_ATTN",
                       hf_overrides={"adaptive_attention": "full"})


def test_stock_configs_untouched(model_path):
    cfg = _engine_config(model_path)
    assert cfg.attention_config.backend is None


def test_every_subpackage_ships_in_a_regular_install():
    """The editable install used here finds subpackages on disk; a wheel ships
    only what ``[tool.setuptools] packages`` lists, so a subpackage missing
    there breaks ``pip install vllm-adaptive`` (as ``vllm_adaptive.kv`` once did)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(root).parts)
        for p in (root / "vllm_adaptive").rglob("__init__.py")
    }
    on_disk |= {"vllm_adaptive.patches"} if (root / "patches" / "__init__.py").is_file() else set()
    assert on_disk <= listed, f"not listed in pyproject.toml packages: {sorted(on_disk - listed)}"
    for pkg in listed - set(cfg.get("package-dir", {})):
        assert (root / pkg.replace(".", "/") / "__init__.py").is_file(), pkg


def test_the_shipped_controller_is_package_data():
    """A wheel carries the trained controller (the ``adore`` preset's default)."""
    import tomllib
    from pathlib import Path

    from vllm_adaptive.importance.controller import SHIPPED, load_controller

    root = Path(__file__).resolve().parents[1]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert SHIPPED.name in cfg["package-data"]["vllm_adaptive.importance"]
    ctl = load_controller(None)
    assert ctl.in_dim == 3 * 64 and ctl.info["eval"]["block_auc_controller"] > 0.5
    assert SHIPPED.stat().st_size < 200_000


def test_the_architecture_module_table_matches_the_tree():
    """docs/ARCHITECTURE.md's module table is generated from the modules'
    docstrings; a module added, moved or re-described without regenerating it
    fails here (fix: python scripts/module_table.py --write)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "module_table.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
