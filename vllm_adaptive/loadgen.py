"""A mixed load against an OpenAI-compatible vLLM server, and its checks.

``make_requests`` builds a reproducible mix: unique prompts of several lengths
(some within a few tokens of ``max_model_len``), each sent several times in
different ways: a plain completion, a streamed one, a stream the client
abandons after a few chunks (``abort``), and a plain request whose connection
the client closes before the answer (``disconnect``). ``run_load`` sends all of
them at once; ``serve_alone`` sends each unique prompt by itself afterwards;
``compare`` says which answers differ from the request served alone.
Greedy (temperature 0) with ``ignore_eos``, so every answer has exactly
``max_tokens`` tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MODEL = "smollm2"
MODES = ("plain", "stream", "abort", "disconnect")


@dataclass
class Req:
    idx: int
    key: int  # the unique prompt it repeats
    prompt: str
    max_tokens: int
    mode: str


@dataclass
class Answer:
    idx: int
    mode: str
    ok: bool
    text: str = ""
    status: int = 0
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: str = ""
    ttft_s: float | None = None
    latency_s: float = 0.0
    chunks: int = 0


@dataclass
class Mix:
    requests: list[Req]
    uniques: dict[int, tuple[str, int]] = field(default_factory=dict)  # key -> (prompt, max_tokens)


def _prompt_of(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """A prompt of exactly ``n_tokens`` tokens (with the BOS the server adds)."""
    words = ["river", "stone", "lamp", "orange", "window", "seven", "garden", "music", "paper",
             "cloud", "silver", "horse", "winter", "bridge", "candle", "forest"]
    text = " ".join(rng.choice(words) for _ in range(n_tokens * 2))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max(1, n_tokens - 1)]
    prompt = tokenizer.decode(ids)
    # decoding can merge pieces: trim until it tokenizes to the target or less
    while len(tokenizer(prompt)["input_ids"]) > n_tokens:
        ids = ids[:-1]
        prompt = tokenizer.decode(ids)
    return prompt


def make_requests(tokenizer, *, max_model_len: int, n: int = 100, seed: int = 0) -> Mix:
    """``n`` requests over ``n // 4`` unique prompts (each sent 4 times)."""
    rng = random.Random(seed)
    n_unique = n // 4
    lengths = []
    for k in range(n_unique):
        bucket = k % 5
        if bucket == 4:  # near the limit: prompt + answer within 8 tokens of max_model_len
            lengths.append(("near", max_model_len - 16 - rng.randint(0, 8), 16))
        elif bucket == 3:
            lengths.append(("long", rng.randint(max_model_len // 3, max_model_len // 2), 12))
        elif bucket == 2:
            lengths.append(("medium", rng.randint(64, 256), 16))
        else:
            lengths.append(("short", rng.randint(4, 40), rng.choice([8, 16, 24])))
    mix = Mix(requests=[])
    for k, (_, n_tok, max_tokens) in enumerate(lengths):
        mix.uniques[k] = (_prompt_of(tokenizer, n_tok, rng), max_tokens)
    modes = ["plain"] * (n // 2) + ["stream"] * (n // 5) + ["abort"] * (n // 10)
    modes += ["disconnect"] * (n - len(modes))
    rng.shuffle(modes)
    for i in range(n):
        k = i % n_unique
        prompt, max_tokens = mix.uniques[k]
        mix.requests.append(Req(i, k, prompt, max_tokens, modes[i]))
    rng.shuffle(mix.requests)
    return mix


def _body(prompt: str, max_tokens: int, stream: bool) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


async def _one(client, base: str, r: Req) -> Answer:
    import json

    t0 = time.perf_counter()
    url = base + "/v1/completions"
    ans = Answer(r.idx, r.mode, ok=False)
    try:
        if r.mode in ("plain", "disconnect"):
            coro = client.post(url, json=_body(r.prompt, r.max_tokens, False))
            if r.mode == "disconnect":
                # close the connection long before the answer can be ready
                try:
                    await asyncio.wait_for(coro, timeout=0.3 + 0.2 * (r.idx % 5))
                    ans.error = "answered before the client disconnected"
                except asyncio.TimeoutError:
                    pass
                ans.ok = True
                return ans
            resp = await coro
            ans.status = resp.status_code
            if resp.status_code == 200:
                data = resp.json()
                ch = data["choices"][0]
                ans.text, ans.finish_reason = ch["text"], ch["finish_reason"]
                ans.completion_tokens = data["usage"]["completion_tokens"]
                ans.ok = True
            else:
                ans.error = resp.text[:500]
        else:
            body = _body(r.prompt, r.max_tokens, True)
            async with client.stream("POST", url, json=body) as resp:
                ans.status = resp.status_code
                if resp.status_code != 200:
                    ans.error = (await resp.aread()).decode()[:500]
                    return ans
                pieces = []
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if not chunk.get("choices"):
                        continue
                    ch = chunk["choices"][0]
                    if ans.ttft_s is None and ch.get("text"):
                        ans.ttft_s = time.perf_counter() - t0
                    pieces.append(ch.get("text") or "")
                    ans.chunks += 1
                    ans.finish_reason = ch.get("finish_reason") or ans.finish_reason
                    if r.mode == "abort" and ans.chunks >= 2:
                        break  # leaving the block closes the stream mid-answer
                ans.text = "".join(pieces)
                ans.ok = r.mode == "abort" or ans.finish_reason is not None
                if r.mode == "stream":
                    ans.completion_tokens = ans.chunks
    except Exception as e:  # noqa: BLE001 - every failure is reported, none raised
        ans.error = f"{type(e).__name__}: {e}"
    finally:
        ans.latency_s = time.perf_counter() - t0
    return ans


async def _run(base: str, reqs: list[Req], timeout: float) -> list[Answer]:
    import httpx

    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        return await asyncio.gather(*[_one(client, base, r) for r in reqs])


def run_load(base: str, mix: Mix, timeout: float = 900) -> list[Answer]:
    """Every request of ``mix`` at once; answers in request order."""
    answers = asyncio.run(_run(base, mix.requests, timeout))
    return sorted(answers, key=lambda a: a.idx)


def serve_alone(base: str, mix: Mix, timeout: float = 300) -> dict[int, str]:
    """Each unique prompt, one at a time: the reference texts."""
    import httpx

    out = {}
    with httpx.Client(timeout=timeout) as client:
        for k, (prompt, max_tokens) in mix.uniques.items():
            r = client.post(base + "/v1/completions", json=_body(prompt, max_tokens, False))
            r.raise_for_status()
            out[k] = r.json()["choices"][0]["text"]
    return out


def compare(mix: Mix, answers: list[Answer], alone: dict[int, str]) -> list[str]:
    """Problems: failed requests, wrong lengths, texts that differ from alone."""
    by_idx = {r.idx: r for r in mix.requests}
    problems = []
    for a in answers:
        r = by_idx[a.idx]
        if not a.ok:
            problems.append(f"request {a.idx} ({a.mode}) failed: status {a.status} {a.error}")
            continue
        if a.mode in ("abort", "disconnect"):
            continue
        if a.finish_reason != "length" or a.completion_tokens != r.max_tokens:
            problems.append(f"request {a.idx} ({a.mode}): finish {a.finish_reason}, "
                            f"{a.completion_tokens} tokens, expected {r.max_tokens}")
        if a.text != alone[r.key]:
            problems.append(f"request {a.idx} ({a.mode}, prompt {r.key}): {a.text!r} != alone {alone[r.key]!r}")
    return problems


def metric(text: str, name: str, **labels) -> float | None:
    """Sum of a Prometheus sample ``name`` (with these labels) in ``/metrics`` text."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        lab = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(lab.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    return total if found else None


def wait_idle(base: str, timeout: float = 120) -> str:
    """``/metrics`` text once no request runs or waits and, with the pool
    audit on, the last idle audit saw the pool as it is now."""
    import requests

    deadline = time.time() + timeout
    last = None
    while True:
        text = requests.get(base + "/metrics", timeout=10).text
        busy = (metric(text, "vllm:num_requests_running") or 0) + (metric(text, "vllm:num_requests_waiting") or 0)
        current = metric(text, "vllm_adaptive:kv_pool_audit_current")
        audits = metric(text, "vllm_adaptive:kv_pool_idle_audits_total")
        # two polls a second apart that agree: no stale sample from mid-load
        if busy == 0 and current in (None, 1.0):
            if last == audits:
                return text
            last = audits
        else:
            last = None
        if time.time() > deadline:
            raise AssertionError(f"server not idle after {timeout} s:\n{text[-3000:]}")
        time.sleep(1.0)


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
