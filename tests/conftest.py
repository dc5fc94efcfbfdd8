"""Shared fixtures. Engines are expensive (~30-90 s to start), so engine tests
run each configuration once per session (``run_engines``: all configurations
a module asks for in one subprocess, tests/engine_runner.py) and share the
results."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run under the interpreter on machines without a GPU. Triton's
# own standard library (tl.sum, tl.cdiv, ...) is jitted when triton is first
# imported, so the switch must be set before anything imports triton (vLLM
# does). Engine and server subprocesses get it removed from their environment.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "engine_runner.py"


@pytest.fixture
def triton_interpret():
    """Triton tests need a GPU or the interpreter (set above)."""
    from vllm_adaptive.kernels import _triton

    if not (torch.cuda.is_available() or _triton.interpreting()):
        pytest.skip("no GPU and TRITON_INTERPRET is not set")


@pytest.fixture(scope="session")
def model_path() -> str:
    from vllm_adaptive.model import default_model_path

    return str(default_model_path())


def engine_env() -> dict:
    env = dict(os.environ)
    # set in this process by any in-process start-up (test_config_fuzz, ...): each
    # engine or server gets its own metrics directory and logs its own plan table
    env.pop("VLLM_ADAPTIVE_METRICS_DIR", None)
    env.pop("VLLM_ADAPTIVE_PLAN_LOGGED", None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _run_runner(specs: list[dict], timeout: int, env_extra: dict | None, cpu: int | None = None) -> list[dict]:
    """Run ``specs`` one after the other in one engine_runner process (on
    CPU ``cpu`` only, if given)."""
    import tempfile

    env = {**engine_env(), **(env_extra or {})}
    # lets the runner ask the worker which backend each layer really uses
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(specs, f)  # long prompts: too big for one argv entry
    try:
        proc = subprocess.run(
            [sys.executable, str(RUNNER), "@" + f.name],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
            preexec_fn=None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu})),
        )
        out, err, why = proc.stdout, proc.stderr, f"rc={proc.returncode}"
    except subprocess.TimeoutExpired as e:  # keep what finished
        out, err, why = e.stdout or "", e.stderr or "", f"timed out after {timeout} s"
        out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
    finally:
        os.unlink(f.name)
    results = [json.loads(l[len("RESULT "):]) for l in out.splitlines() if l.startswith("RESULT ")]
    # the root cause of a failed start is often only in the output of a
    # process the runner spawned (EngineCore: "See root cause above"), and
    # may lie far above the tail: every exception line comes along
    raised = dict.fromkeys(l.strip() for l in err.splitlines() if re.search(r"\w+(Error|Exception): ", l))
    tail = "exception lines:\n" + "\n".join(list(raised)[-30:]) + "\noutput tail:\n" + (out + err)[-6000:]
    for spec, res in zip(specs, results):
        if "error" in res:
            res["error"] = f"engine run failed for {_shown(spec)}:\n{res['error']}\n{tail}"
    for spec in specs[len(results):]:  # the runner itself died
        results.append({"error": f"engine run failed ({why}) for {_shown(spec)}:\n{tail}"})
    return results


def _shown(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k not in ("prompts", "score", "phases")}


def run_engine(spec: dict, timeout: int = 900, env_extra: dict | None = None) -> dict:
    """Start an engine in a fresh process, generate, return its JSON result."""
    (res,) = _run_runner([spec], timeout, env_extra)
    if "error" in res:
        raise AssertionError(res["error"])
    return res


class EngineRuns(dict):
    """Results by name; reading a configuration that failed fails the test
    that reads it (with the engine's traceback), not the others."""

    def __getitem__(self, name: str) -> dict:
        res = super().__getitem__(name)
        if "error" in res:
            raise AssertionError(f"{name}: {res['error']}")
        return res


_SESSION_RUNS: dict[str, dict] = {}


def run_engines(specs: dict[str, dict], timeout_per_engine: int = 600) -> EngineRuns:
    """Results of named engine configurations, each run once per session.

    Configurations not run yet in this session run now, one after the other
    in a runner process per free CPU, with vLLM's EngineCore in that process
    (``engine_runner.py``: one vLLM import per runner, and batches composed
    the same way every run). A configuration another test module already
    ran (the same spec, whatever its name) is not run again."""
    keys = {name: json.dumps({"in_process": True, **spec}, sort_keys=True) for name, spec in specs.items()}
    todo = [k for k in dict.fromkeys(keys.values()) if k not in _SESSION_RUNS]
    cpus = _engine_cpus(len(todo))
    if len(cpus) > 1:
        # One runner per core, each on one thread of its own core: an engine
        # start is mostly one thread's work (imports, model load), and
        # in-process engines have no vLLM thread binding (only the
        # multiprocess executor binds), so two runners of torch's default
        # thread count would oversubscribe the cores (measured: several
        # times slower than one runner). Every engine of a runner computes on
        # one thread, the same for every configuration it compares.
        from concurrent.futures import ThreadPoolExecutor

        parts = [todo[i::len(cpus)] for i in range(len(cpus))]
        with ThreadPoolExecutor(len(cpus)) as pool:
            done = pool.map(lambda part, cpu: _run_runner([json.loads(k) for k in part],
                                                          300 + timeout_per_engine * len(part),
                                                          {"OMP_NUM_THREADS": "1"}, cpu=cpu),
                            parts, cpus)
            for part, results in zip(parts, done):
                _SESSION_RUNS.update(zip(part, results))
    elif todo:
        results = _run_runner([json.loads(k) for k in todo], 300 + timeout_per_engine * len(todo), None)
        _SESSION_RUNS.update(zip(todo, results))
    return EngineRuns({name: _SESSION_RUNS[k] for name, k in keys.items()})


# an engine runner's resident memory, KV cache (at most 1 GiB in these tests) included
_RUNNER_BYTES = 4 * 2**30


def _engine_cpus(n: int) -> list[int]:
    """CPUs to run ``n`` engine configurations on, one runner process each:
    as many as there are CPUs and memory for, at most ``ENGINE_RUNNERS``
    (``ENGINE_RUNNERS=1``: one runner, torch's own thread count)."""
    most = int(os.environ.get("ENGINE_RUNNERS", "64"))
    if n < 2 or most < 2:
        return []
    try:
        import psutil

        fit = int(psutil.virtual_memory().available // _RUNNER_BYTES)
    except Exception:  # noqa: BLE001 - no way to tell: one runner
        fit = 1
    return sorted(os.sched_getaffinity(0))[:min(n, fit, most)]


@contextlib.contextmanager
def serve(preset: str | None, tmp_dir: Path, env: dict, extra: tuple[str, ...] = (), with_proc: bool = False):
    """The README's serve command with ``preset`` on a free loopback port;
    yields ``(base_url, log_path)`` once ``/health`` answers (and the server
    process when ``with_proc``). ``preset=None`` serves stock vLLM
    (``--attention-backend CPU_ATTN``) through the same command."""
    from vllm_adaptive.serving import served

    args = ("--max-model-len", "2048", "--enforce-eager", "--max-num-seqs", "8", *extra)
    with served(preset, args, env, tmp_dir / "server.log", cwd=ROOT) as (base, proc):
        yield (base, tmp_dir / "server.log", proc) if with_proc else (base, tmp_dir / "server.log")


# Servers shared by the serving tests: test_load.py puts each under load, and
# test_server.py (longgen: the OpenAI API) and test_server_adore.py (adore:
# release) check the same servers, so a server starts once per session (a
# start costs ~1 min of the 2 CPU cores). Float32, a 512-token context and a
# KV pool small enough that the load preempts; the pool audit on.
SERVED_MAX_LEN = 512
SERVED_RELEASE_BUDGET = 256
SERVED = {
    # name: (adaptive_attention, KV pool bytes: small enough to preempt under the load, prefill chunk,
    #        extra vLLM arguments)
    # a sparse layer holds sink + window + one prefill chunk: with 512-token chunks at a
    # 512-token context the load freed no block and never preempted (measured), 128 does both.
    # vLLM admits a request only when its whole prompt fits (scheduler_reserve_full_isl), so
    # with 128-token chunks only the few decode steps could preempt: one CI run of the load
    # never did (687-token pool). Admitting by chunk makes prefills compete for blocks too.
    "longgen": ({"preset": "longgen", "sink_window": {"sink": 32, "window": 128, "block": 32}}, 24 * 2**20, 128,
                ("--no-scheduler-reserve-full-isl",)),
    "kivi8": ("kivi8", 24 * 2**20, 512, ()),
    "adore": ({"preset": "adore", "release": {"budget": SERVED_RELEASE_BUDGET, "sink": 32, "recent": 64,
                                              "prefill_chunk": 64}}, 40 * 2**20, 512, ()),
}


@dataclasses.dataclass(frozen=True)
class Served:
    name: str
    base: str  # http://127.0.0.1:PORT
    log: Path  # the server's output
    release_stats: Path | None  # the scheduler's release statistics (release presets)


def server_cpu(i: int) -> dict:
    """Environment that binds the ``i``-th of several servers running side by
    side to a CPU of its own: vLLM's CPU worker computes on one core and by
    default every server picks the same one. Empty where the user binds."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cpus = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": str(cpus[i % len(cpus)])}


class SharedServers:
    """``SERVED`` servers, each started once (``start`` starts several side
    by side: a start is mostly one core's work) and stopped by ``close``."""

    def __init__(self, tmp_path_factory) -> None:
        self._tmp = tmp_path_factory
        self._stack = contextlib.ExitStack()
        self._started: dict[str, Served] = {}

    def __call__(self, name: str) -> Served:
        self.start(name)
        return self._started[name]

    def start(self, *names: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        todo = [n for n in dict.fromkeys(names) if n not in self._started]
        if not todo:
            return
        with ThreadPoolExecutor(len(todo)) as pool:
            futures = {n: pool.submit(self._enter, n, self._tmp.mktemp(f"served-{n}")) for n in todo}
        for n, f in futures.items():  # every server that started is stopped by close()
            if f.exception() is None:
                cm, served = f.result()
                self._stack.push(cm.__exit__)
                self._started[n] = served
        for f in futures.values():
            f.result()  # raises the first start that failed

    def _enter(self, name: str, tmp: Path):
        cfg, kv_bytes, chunk, more = SERVED[name]
        env = {**engine_env(), **server_cpu(list(SERVED).index(name))}
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes
        env["VLLM_ADAPTIVE_AUDIT"] = "1"
        stats = None
        if "adore" in name:
            from vllm_adaptive.release.stats import STATS_ENV

            stats = env[STATS_ENV] = str(tmp / "release.json")
        extra = ("--dtype", "float32", "--max-model-len", str(SERVED_MAX_LEN), "--max-num-seqs", "16",
                 "--block-size", "32", "--max-num-batched-tokens", str(chunk),
                 "--kv-cache-memory-bytes", str(kv_bytes), *more)
        cm = serve(cfg if isinstance(cfg, str) else json.dumps(cfg), tmp, env, extra)
        base, log = cm.__enter__()
        return cm, Served(name, base, log, Path(stats) if stats else None)

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    """``shared_server(name)``: the running server ``SERVED[name]``, started
    on first use and stopped at the end of the session;
    ``shared_server.start(*names)`` starts several side by side."""
    servers = SharedServers(tmp_path_factory)
    try:
        yield servers
    finally:
        servers.close()


def on_device(fn):
    """``fn`` run on the GPU when there is one: CPU tensor arguments travel to
    CUDA and back (in-place results included), so tests written against CPU
    tensors run the compiled Triton kernels too. Without a GPU, ``fn``."""
    if not torch.cuda.is_available():
        return fn
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        moved = []

        def to_gpu(x):
            if isinstance(x, torch.Tensor) and x.device.type == "cpu":
                y = x.cuda()
                moved.append((x, y))
                return y
            return x

        out = fn(*[to_gpu(a) for a in args], **{k: to_gpu(v) for k, v in kwargs.items()})
        for x, y in moved:
            x.copy_(y.cpu())
        return out.cpu() if isinstance(out, torch.Tensor) else out

    return wrapped
