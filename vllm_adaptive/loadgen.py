"""A mixed load against an OpenAI-compatible vLLM server, and its checks.

``make_requests`` builds a reproducible mix: unique prompts of several lengths
(some within a few tokens of ``max_model_len``), each sent several times in
different ways: a plain completion, a streamed one, a stream the client
abandons after a few chunks (``abort``), and a plain request whose connection
the client closes before the answer (``disconnect``). ``run_load`` sends all of
them at once; ``serve_alone`` sends each unique prompt by itself afterwards;
``compare`` says which answers differ from the request served alone.
Greedy (temperature 0) with ``ignore_eos``, so every answer has exactly
``max_tokens`` tokens (counted by the server: a streamed chunk can carry
more than one token when the server falls behind).

Every answer carries its two best tokens and their logprobs at each step, so
``compare`` can tell a real difference from a near tie (``follows``): the
same prompt in another batch sums its float32 GEMMs in another order, and
greedy decoding then parts wherever the two best tokens were closer than that.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from dataclasses import dataclass, field

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
    # per generated token: [[token, logprob], ...], the chosen token first, then the runner-up
    steps: list = field(default_factory=list)


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
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream, "logprobs": 2, "return_tokens_as_token_ids": True}
    if stream:
        body["stream_options"] = {"include_usage": True}  # the token count, in a last chunk
    return body


def _steps(logprobs: dict | None) -> list:
    """The completions API's ``logprobs`` of some tokens as ``Answer.steps``."""
    if not logprobs:
        return []
    out = []
    for tok, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        others = sorted(((t, v) for t, v in (top or {}).items() if t != tok), key=lambda x: -x[1])
        out.append([[tok, lp], *[list(x) for x in others[:1]]])
    return out


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
                ans.steps = _steps(ch.get("logprobs"))
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
                    if chunk.get("usage"):
                        ans.completion_tokens = chunk["usage"]["completion_tokens"]
                    if not chunk.get("choices"):
                        continue
                    ch = chunk["choices"][0]
                    if ans.ttft_s is None and ch.get("text"):
                        ans.ttft_s = time.perf_counter() - t0
                    pieces.append(ch.get("text") or "")
                    ans.steps += _steps(ch.get("logprobs"))
                    ans.chunks += 1
                    ans.finish_reason = ch.get("finish_reason") or ans.finish_reason
                    if r.mode == "abort" and ans.chunks >= 2:
                        break  # leaving the block closes the stream mid-answer
                ans.text = "".join(pieces)
                ans.ok = r.mode == "abort" or ans.finish_reason is not None
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


def serve_alone(base: str, mix: Mix, timeout: float = 300) -> dict[int, Answer]:
    """Each unique prompt, one at a time: the reference answers."""
    import httpx

    out = {}
    with httpx.Client(timeout=timeout) as client:
        for k, (prompt, max_tokens) in mix.uniques.items():
            r = client.post(base + "/v1/completions", json=_body(prompt, max_tokens, False))
            r.raise_for_status()
            ch = r.json()["choices"][0]
            out[k] = Answer(-1, "alone", True, text=ch["text"], finish_reason=ch["finish_reason"],
                            steps=_steps(ch.get("logprobs")))
    return out


def follows(reference: list, other: list, tol: float) -> str | None:
    """What is wrong with greedy ``other`` against ``reference`` (per step:
    ``[[token, logprob], ...]``, the chosen token first, then at least the
    runner-up of ``reference``), or None.

    Up to where the tokens part, the logprob of each token both rank is the
    same within ``tol``; the tokens may part only on a near tie (the
    reference's two best within ``2 * tol``, and ``other`` chose the
    runner-up), and comparing stops there: the contexts differ."""
    for j, (s, r) in enumerate(zip(reference, other)):
        if not all(math.isfinite(lp) for _, lp in s + r):
            return f"step {j}: a logprob is not finite ({s} against {r})"
        theirs = dict((t, lp) for t, lp in r)
        for t, lp in s:
            if t in theirs and abs(lp - theirs[t]) > tol:
                return f"step {j}: token {t} has logprob {lp:.5f}, against {theirs[t]:.5f}"
        if s[0][0] != r[0][0]:
            if len(s) < 2 or r[0][0] != s[1][0] or s[0][1] - s[1][1] > 2 * tol:
                return f"step {j}: token {r[0][0]} against {s[0][0]}, not a near tie ({s})"
            return None
    if len(reference) != len(other):
        return f"{len(other)} steps against {len(reference)}"
    return None


def largest_difference(reference: list, other: list) -> float:
    """The largest logprob difference of a token both rank, before the tokens part."""
    diffs = [0.0]
    for s, r in zip(reference, other):
        theirs = dict((t, lp) for t, lp in r)
        diffs += [abs(lp - theirs[t]) for t, lp in s if t in theirs]
        if s[0][0] != r[0][0]:
            break
    return max(diffs)


def compare(mix: Mix, answers: list[Answer], alone: dict[int, Answer], tie_tol: float | None = None) -> list[str]:
    """Problems: failed requests, wrong lengths, texts that differ from alone.
    With ``tie_tol``, a text that parts from alone's on a near tie is no
    problem, and one that does not part must agree in logprobs (``follows``)."""
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
        ref = alone[r.key]
        why = "text" if a.text != ref.text else None
        if tie_tol is not None:
            why = follows(ref.steps, a.steps, tie_tol)
        if why:
            problems.append(f"request {a.idx} ({a.mode}, prompt {r.key}): {a.text!r} != alone {ref.text!r} ({why})")
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
