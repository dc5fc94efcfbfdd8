"""What the ADAPTIVE layers do to the KV cache, in vLLM's Prometheus ``/metrics``.

vLLM's KV managers run in the EngineCore process; ``/metrics`` is served by
the API server process. ``SchedulerStats`` (the EngineCore -> frontend stats
message) has no field a plugin may fill: its ``kv_connector_stats`` is read
by vLLM's logging as the configured connector's (and asserts there is one).
So the counters travel beside it:

* **EngineCore side** (:func:`counters`): our KV managers count, per layer
  kind, the blocks they hand back to vLLM's pool before the request ends
  (``freed``), and release layers also ``released`` / ``dropped`` (released
  with no host copy) / ``rebuilt``. A daemon thread writes the totals, when
  they changed, to ``$VLLM_ADAPTIVE_METRICS_DIR/engine-<pid>.json`` (atomic
  replace, at most every 0.2 s).
* **Start-up** (:func:`publish_static`, from ``startup.finalize_vllm_config``
  in the user's process, before any engine process starts): creates that
  directory when the variable is unset (engine processes inherit it) and
  writes ``static.json``: per layer kind and KV format, the KV bytes per
  token saved against full attention at ``max_model_len``, and the KV
  capacity against full attention.
* **API server side** (:class:`AdaptiveCollector`, registered by
  ``register()`` in every process): a Prometheus collector that reads those
  files when ``/metrics`` is scraped, so the numbers are current even when
  the server is idle. Files of engines that no longer run are skipped: a
  process that starts several engines (or tests that start servers one after
  another) hands all of them the same directory.

Metric names start with ``vllm_adaptive:`` (vLLM unregisters collectors named
``vllm:*`` when its own logger starts). With ``--api-server-count`` > 1 vLLM
serves ``/metrics`` from a multiprocess registry and these are absent.

Pool audit (opt-in, ``VLLM_ADAPTIVE_AUDIT=1``, used by the load tests):
``patches/block_pool_audit.py`` counts frees of a block whose reference count
is already 0 (a double free, otherwise silent in vLLM's ``BlockPool``), and
when the pool has seen no allocation or free for 1 s the publisher thread
counts the blocks still referenced (leaked once no request is running).
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import threading
import time
import weakref
from typing import Any

METRICS_DIR_ENV = "VLLM_ADAPTIVE_METRICS_DIR"
AUDIT_ENV = "VLLM_ADAPTIVE_AUDIT"
FIELDS = ("freed", "released", "dropped", "rebuilt")
_FLUSH_S = 0.2
_IDLE_S = 1.0


def audit_enabled() -> bool:
    return os.environ.get(AUDIT_ENV, "0") not in ("", "0")


class EngineCounters:
    """Per-kind KV block counters of one EngineCore process, and the pool audit."""

    def __init__(self) -> None:
        self.kinds: dict[str, dict[str, int]] = {}
        self.audit = {"double_frees": 0, "idle_audits": 0, "leaked_blocks": 0,
                      "pool_blocks": 0, "pool_free_blocks": 0, "current": 0}
        self.pools: list[weakref.ref] = []
        self.last_pool_activity = time.monotonic()
        self._audited_at = 0.0
        self._lock = threading.Lock()
        self._dirty = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------- counting
    def add(self, kind: str, field: str, n: int = 1) -> None:
        with self._lock:
            per = self.kinds.setdefault(kind, dict.fromkeys(FIELDS, 0))
            per[field] += n
            self._dirty = True
        self._start()

    def double_free(self) -> None:
        with self._lock:
            self.audit["double_frees"] += 1
            self._dirty = True

    def watch_pool(self, pool) -> None:
        self.pools.append(weakref.ref(pool))
        self._start()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"kinds": {k: dict(v) for k, v in self.kinds.items()}, "audit": dict(self.audit)}

    # ----------------------------------------------------------- publishing
    def _start(self) -> None:
        if self._thread is None and os.environ.get(METRICS_DIR_ENV):
            self._thread = threading.Thread(target=self._run, name="vllm-adaptive-metrics", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        path = os.path.join(os.environ[METRICS_DIR_ENV], f"engine-{os.getpid()}.json")
        while True:
            time.sleep(_FLUSH_S)
            self._maybe_audit()
            current = int(self._audited_at > self.last_pool_activity)
            if current != self.audit["current"]:
                with self._lock:
                    self.audit["current"] = current
                    self._dirty = True
            if self._dirty:
                self._dirty = False
                try:
                    _write_json(path, self.snapshot())
                except OSError:  # the directory went away (server shutting down)
                    return

    def _maybe_audit(self) -> None:
        """Count referenced blocks once the pool has been quiet for a while:
        after the last request finished, anything still referenced leaked."""
        if not audit_enabled() or self.last_pool_activity <= self._audited_at:
            return
        if time.monotonic() - self.last_pool_activity < _IDLE_S:
            return
        pools = [p for r in self.pools if (p := r()) is not None]
        if not pools:
            return
        self._audited_at = time.monotonic()
        total = free = leaked = 0
        for pool in pools:
            for block in pool.blocks:
                if block is pool.null_block:
                    continue
                total += 1
                leaked += block.ref_cnt > 0
            free += pool.get_num_free_blocks()
        with self._lock:
            self.audit.update(idle_audits=self.audit["idle_audits"] + 1, leaked_blocks=leaked,
                              pool_blocks=total, pool_free_blocks=free)
            self._dirty = True


_COUNTERS: EngineCounters | None = None


def counters() -> EngineCounters:
    """This process's counters (the EngineCore's: our KV managers live there)."""
    global _COUNTERS
    if _COUNTERS is None:
        _COUNTERS = EngineCounters()
    return _COUNTERS


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------- start-up
def publish_static(rows: list[dict[str, Any]], capacity_vs_full: float) -> None:
    """Write what start-up computed for the API server's collector: the KV
    bytes per token saved, summed over the ``rows`` (one per layer, with its
    ``kind`` and ``kv_format``) of each kind and format, and the capacity
    against full attention."""
    d = os.environ.get(METRICS_DIR_ENV)
    if not d:
        d = tempfile.mkdtemp(prefix="vllm-adaptive-metrics-")
        os.environ[METRICS_DIR_ENV] = d
        import atexit
        import shutil

        atexit.register(shutil.rmtree, d, ignore_errors=True)  # ours: gone with this process
    saved: dict[str, float] = {}
    for r in rows:
        key = f"{r['kind']}|{r['kv_format']}"
        saved[key] = saved.get(key, 0.0) + r["full_bytes_per_token"] - r["bytes_per_token"]
    _write_json(os.path.join(d, "static.json"), {"saved_bytes_per_token": saved,
                                                  "capacity_vs_full": capacity_vs_full})


# ----------------------------------------------------------- API server side
class AdaptiveCollector:
    """Prometheus collector over the files above (read at scrape time)."""

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        d = os.environ.get(METRICS_DIR_ENV)
        if not d or not os.path.isdir(d):
            return
        static = _read_json(os.path.join(d, "static.json")) or {}
        engines = [e for p in sorted(glob.glob(os.path.join(d, "engine-*.json")))
                   if _alive(p) and (e := _read_json(p)) is not None]
        help_ = {
            "freed": "KV blocks ADAPTIVE layers returned to vLLM's pool before their request ended",
            "released": "KV blocks release layers gave up for a low importance score",
            "dropped": "released KV blocks with no host copy (cannot be rebuilt)",
            "rebuilt": "released KV blocks brought back from the host tier",
        }
        for field in FIELDS:
            fam = CounterMetricFamily(f"vllm_adaptive:kv_blocks_{field}", help_[field], labels=["layer_kind"])
            totals: dict[str, int] = {}
            for e in engines:
                for kind, per in e.get("kinds", {}).items():
                    totals[kind] = totals.get(kind, 0) + per.get(field, 0)
            for kind, v in sorted(totals.items()):
                fam.add_metric([kind], v)
            yield fam
        saved = GaugeMetricFamily(
            "vllm_adaptive:kv_bytes_per_token_saved",
            "KV bytes per token saved against full attention at max_model_len (all layers of the kind)",
            labels=["layer_kind", "kv_format"])
        for key, v in sorted(static.get("saved_bytes_per_token", {}).items()):
            saved.add_metric(key.split("|"), v)
        yield saved
        if "capacity_vs_full" in static:
            yield GaugeMetricFamily("vllm_adaptive:kv_capacity_vs_full",
                                    "KV capacity at max_model_len against full attention (x)",
                                    value=static["capacity_vs_full"])
        if audit_enabled() or any(e.get("audit", {}).get("idle_audits") for e in engines):
            for name, field, kind, text in (
                ("double_frees", "double_frees", CounterMetricFamily, "frees of a block whose reference count was 0"),
                ("idle_audits", "idle_audits", CounterMetricFamily, "pool audits run after 1 s without allocation or free"),
                ("leaked_blocks", "leaked_blocks", GaugeMetricFamily,
                 "blocks still referenced at the last idle audit (leaked, when no request was running)"),
                ("blocks", "pool_blocks", GaugeMetricFamily, "blocks in the pool (null block excluded)"),
                ("free_blocks", "pool_free_blocks", GaugeMetricFamily, "free blocks at the last idle audit"),
                ("audit_current", "current", GaugeMetricFamily,
                 "1 when no allocation or free happened since the last audit"),
            ):
                fam = kind(f"vllm_adaptive:kv_pool_{name}", text)
                fam.add_metric([], sum(e.get("audit", {}).get(field, 0) for e in engines))
                yield fam


def _alive(path: str) -> bool:
    """Whether the engine that wrote ``engine-<pid>.json`` still runs: a
    directory that outlives an engine (an earlier server or ``LLM`` started
    from the same process, which inherits the directory) must not add that
    engine's last counts to this one's."""
    try:
        pid = int(os.path.basename(path)[len("engine-"):-len(".json")])
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


_installed = False


def install_collector() -> None:
    """Register :class:`AdaptiveCollector` in Prometheus's default registry (once)."""
    global _installed
    if _installed:
        return
    try:
        from prometheus_client import REGISTRY
    except ImportError:  # pragma: no cover - vLLM depends on prometheus_client
        return
    REGISTRY.register(AdaptiveCollector())
    _installed = True
