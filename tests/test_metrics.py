"""The ``/metrics`` channel and the block-pool audit, without an engine.

* counters written by the EngineCore-side publisher come back out of the
  API-server-side Prometheus collector, per layer kind, with the start-up
  figures (bytes per token saved, capacity against full attention);
* the audit patch catches a double free in vLLM's ``BlockPool`` (which vLLM
  itself lets through silently) and the idle audit counts a leaked block.
"""

from __future__ import annotations

import os
import time

import pytest

from vllm_adaptive import metrics


@pytest.fixture
def metrics_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(metrics, "_COUNTERS", None)
    return tmp_path


def _scrape() -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    reg.register(metrics.AdaptiveCollector())
    return generate_latest(reg).decode()


def _wait_for(pred, timeout=5.0):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, "publisher did not write in time"
        time.sleep(0.05)


def test_counters_reach_the_collector(metrics_dir):
    from vllm_adaptive.loadgen import metric

    c = metrics.counters()
    c.add("sink_window", "freed", 5)
    c.add("release", "released", 3)
    c.add("release", "freed", 3)
    c.add("release", "rebuilt", 1)
    metrics.publish_static(
        [{"kind": "sink_window", "kv_format": "model_dtype", "bytes_per_token": 100.0,
          "full_bytes_per_token": 768.0}] * 20
        + [{"kind": "full", "kv_format": "model_dtype", "bytes_per_token": 768.0,
            "full_bytes_per_token": 768.0}] * 10, 2.6)
    _wait_for(lambda: list(metrics_dir.glob("engine-*.json")))
    text = _scrape()
    assert metric(text, "vllm_adaptive:kv_blocks_freed_total", layer_kind="sink_window") == 5
    assert metric(text, "vllm_adaptive:kv_blocks_freed_total", layer_kind="release") == 3
    assert metric(text, "vllm_adaptive:kv_blocks_released_total", layer_kind="release") == 3
    assert metric(text, "vllm_adaptive:kv_blocks_rebuilt_total", layer_kind="release") == 1
    assert metric(text, "vllm_adaptive:kv_bytes_per_token_saved", layer_kind="sink_window") == 20 * 668
    assert metric(text, "vllm_adaptive:kv_bytes_per_token_saved", layer_kind="full") == 0
    assert metric(text, "vllm_adaptive:kv_capacity_vs_full") == 2.6
    # later counts replace the file: the scrape is current, not cumulative twice
    c.add("sink_window", "freed", 2)
    _wait_for(lambda: metric(_scrape(), "vllm_adaptive:kv_blocks_freed_total", layer_kind="sink_window") == 7)


def test_an_ended_engines_file_is_not_counted(metrics_dir):
    """A directory inherited by a second server (or a second ``LLM`` in one
    process) still holds the first engine's last file: its counts and audit
    must not add to the live engine's (CI once summed three earlier servers'
    mid-request audits into a 'leak')."""
    import json
    import subprocess

    from vllm_adaptive.loadgen import metric

    ended = subprocess.Popen(["true"])
    ended.wait()
    stale = {"kinds": {"sink_window": {"freed": 40, "released": 0, "dropped": 0, "rebuilt": 0}},
             "audit": {"double_frees": 2, "idle_audits": 3, "leaked_blocks": 16, "pool_blocks": 100,
                       "pool_free_blocks": 84, "current": 1}}
    (metrics_dir / f"engine-{ended.pid}.json").write_text(json.dumps(stale))
    (metrics_dir / "engine-notapid.json").write_text(json.dumps(stale))
    c = metrics.counters()
    c.add("sink_window", "freed", 5)
    _wait_for(lambda: (metrics_dir / f"engine-{os.getpid()}.json").exists())
    text = _scrape()
    assert metric(text, "vllm_adaptive:kv_blocks_freed_total", layer_kind="sink_window") == 5
    # the same file under a live pid is counted (the filter is by liveness, not by name)
    (metrics_dir / "engine-1.json").write_text(json.dumps(stale))
    text = _scrape()
    assert metric(text, "vllm_adaptive:kv_blocks_freed_total", layer_kind="sink_window") == 45


def test_audit_catches_a_double_free_and_a_leak(metrics_dir, monkeypatch):
    from vllm.v1.core.block_pool import BlockPool

    from vllm_adaptive.loadgen import metric
    from vllm_adaptive.patches import block_pool_audit

    monkeypatch.setenv(metrics.AUDIT_ENV, "1")
    originals = {n: BlockPool.__dict__[n] for n in ("__init__", "free_blocks", "get_new_blocks")}
    block_pool_audit.apply()
    try:
        pool = BlockPool(num_gpu_blocks=8, enable_caching=False, hash_block_size=16)
        a, b = pool.get_new_blocks(2)
        pool.free_blocks([a])
        assert metrics.counters().audit["double_frees"] == 0
        pool.free_blocks([a])  # vLLM accepts this silently: ref_cnt becomes -1
        assert metrics.counters().audit["double_frees"] == 1
        # b is never freed: once the pool is quiet the audit counts it
        _wait_for(lambda: metrics.counters().audit["idle_audits"] >= 1, timeout=10)
        assert metrics.counters().audit["leaked_blocks"] == 1
        assert metrics.counters().audit["pool_blocks"] == 7
        _wait_for(lambda: metric(_scrape(), "vllm_adaptive:kv_pool_leaked_blocks") == 1)
        assert metric(_scrape(), "vllm_adaptive:kv_pool_double_frees_total") == 1
    finally:
        for n, f in originals.items():
            setattr(BlockPool, n, f)
