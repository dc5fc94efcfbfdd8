"""Shared fixtures. Engines are expensive (~30-90 s to start), so engine tests
run each configuration once per session in a subprocess (tests/engine_runner.py)
and share the results."""

from __future__ import annotations

import contextlib
import json
import os
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


def run_engine(spec: dict, timeout: int = 900, env_extra: dict | None = None) -> dict:
    """Start an engine in a fresh process, generate, return its JSON result."""
    env = {**engine_env(), **(env_extra or {})}
    # lets the runner ask the worker which backend each layer really uses
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    proc = subprocess.run(
        [sys.executable, str(RUNNER), json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-6000:]
        shown = {k: v for k, v in spec.items() if k != "prompts"}
        raise AssertionError(f"engine run failed (rc={proc.returncode}) for {shown}:\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


@contextlib.contextmanager
def serve(preset: str | None, tmp_dir: Path, env: dict, extra: tuple[str, ...] = (), with_proc: bool = False):
    """The README's serve command with ``preset`` on a free loopback port;
    yields ``(base_url, log_path)`` once ``/health`` answers (and the server
    process when ``with_proc``). ``preset=None`` serves stock vLLM
    (``--attention-backend CPU_ATTN``) through the same command."""
    from vllm_adaptive.loadgen import served

    args = ("--max-model-len", "2048", "--enforce-eager", "--max-num-seqs", "8", *extra)
    with served(preset, args, env, tmp_dir / "server.log", cwd=ROOT) as (base, proc):
        yield (base, tmp_dir / "server.log", proc) if with_proc else (base, tmp_dir / "server.log")


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
