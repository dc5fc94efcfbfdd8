"""The server launcher of the tests and benchmarks: ``vllm-adaptive serve``
(the README's command) as a child process on a free loopback port, yielded
once ``/health`` answers and stopped afterwards. The load against it lives
in ``loadgen.py``."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(preset: str | None, args: tuple[str, ...], env: dict, log_path: Path, cwd=None,
           timeout: float = 600):
    """``vllm-adaptive serve`` (the README's command) on a free loopback port,
    with ``--preset preset``, or stock vLLM (``--attention-backend CPU_ATTN``)
    when ``preset`` is None; yields ``(base_url, process)`` once ``/health``
    answers and stops the server afterwards."""
    import requests

    port = free_port()
    which = ["--preset", preset] if preset is not None else ["--attention-backend", "CPU_ATTN"]
    cmd = [sys.executable, "-m", "vllm_adaptive.cli", "serve", *which, "--port", str(port), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + timeout
        try:
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"server exited rc={proc.returncode}:\n{log_path.read_text()[-5000:]}")
                try:
                    if requests.get(base + "/health", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.time() > deadline:
                    raise AssertionError(f"server not healthy in time:\n{log_path.read_text()[-5000:]}")
                time.sleep(2)
            yield base, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
