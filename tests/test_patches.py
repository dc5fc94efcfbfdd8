"""Every monkeypatch is recorded, and every patched target still exists in
the pinned vLLM (a vLLM bump that moves one fails here, not in serving)."""

from __future__ import annotations

import importlib

import pytest

from vllm_adaptive import patches


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_pinned_vllm_version():
    import vllm

    assert vllm.__version__ == "0.32.0", "patches are recorded against vLLM 0.32.0"


@pytest.mark.parametrize("record", patches.records(), ids=lambda r: r.area)
def test_record_complete_and_targets_exist(record):
    for field in ("area", "why", "how", "upstream", "delete_when"):
        assert getattr(record, field).strip(), field
    assert record.targets
    for target in record.targets:
        if target.endswith("CudaPlatformBase.check_and_update_config"):
            pytest.importorskip("vllm.platforms.cuda")
        _resolve(target)


def test_every_patch_module_listed_and_applied():
    import pathlib

    here = pathlib.Path(patches.__file__).parent
    modules = sorted(p.stem for p in here.glob("*.py") if not p.stem.startswith("_"))
    assert sorted(patches.MODULES) == modules
    from vllm.platforms.cpu import CpuPlatform

    assert getattr(CpuPlatform.get_attn_backend_cls, "_vllm_adaptive_wrapped", False)


def test_index_is_generated_from_records():
    text = patches.index_markdown()
    for r in patches.records():
        assert r.area in text
