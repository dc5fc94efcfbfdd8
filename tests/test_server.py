"""The README's serve command with the ``longgen`` preset: OpenAI-compatible
server on loopback, real ``openai`` client, a completion, a streamed chat
completion and a prompt longer than the sparse layers' window; bad requests get
HTTP errors and the server stays up.

The server is test_load.py's ``longgen`` server (``conftest.shared_server``:
a 512-token context, sink 32 + window 128), so these checks also hold for a
server that has been through the load, whichever module runs first. What
``make serve`` adds on top, the CLI's default KV cache size, is checked on the
CLI itself (``test_serve_defaults_the_cpu_kv_cache``)."""

from __future__ import annotations

import os
import re
import time
from unittest import mock

import pytest

from conftest import SERVED_MAX_LEN

pytestmark = pytest.mark.server

# ~390 tokens: past the sparse layers' 32 sink + 128 window tokens, within the context
FACTS = " ".join(f"Fact {i}: the number {i} is followed by {i + 1}." for i in range(24))


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server("longgen")


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_server_uses_adaptive(server):
    text = server.log.read_text()
    assert "Using ADAPTIVE attention backend on CPU" in text
    assert "adaptive_attention=longgen: 30 layers (10 full, 20 sink_window)" in text
    assert "prefix caching switched off" in text
    # one start-up table: what each layer does and the capacity against full attention
    assert f"KV B/token @{SERVED_MAX_LEN}" in text and text.count("with full attention:") == 1


def test_serve_defaults_the_cpu_kv_cache():
    """``make serve`` sets no ``VLLM_CPU_KVCACHE_SPACE``; vLLM's CPU default
    asks for 92% of the memory node, so the CLI sets 4 GiB, unless the user
    gave ``--kv-cache-memory-bytes`` (the variable would override it)."""
    from vllm_adaptive import cli

    class Exec(Exception):
        pass

    def execv(path, argv):
        raise Exec(argv)

    with mock.patch.dict(os.environ), mock.patch.object(cli.os, "execv", execv):
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        with pytest.raises(Exec) as e:
            cli.main(["serve", "--preset", "longgen", "--port", "8123"])
        assert os.environ.get("VLLM_CPU_KVCACHE_SPACE") == "4"
        argv = e.value.args[0]
        assert "vllm.entrypoints.openai.api_server" in argv and "--port" in argv
        assert argv[argv.index("--attention-backend") + 1] == "ADAPTIVE"
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE")
        with pytest.raises(Exec):
            cli.main(["serve", "--kv-cache-memory-bytes", str(2**30)])
        assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ


def test_metrics_show_what_the_layers_save(server, client):
    import requests

    from vllm_adaptive.loadgen import metric

    def scrape() -> str:
        return requests.get(server.base + "/metrics", timeout=10).text

    def freed(text: str) -> float:
        return metric(text, "vllm_adaptive:kv_blocks_freed_total", layer_kind="sink_window") or 0

    before = freed(scrape())
    client.completions.create(model="smollm2", prompt=FACTS, max_tokens=2, temperature=0)
    text = scrape()
    # the gauges say what the start-up table said: here (512-token context,
    # 128-token prefill chunks) a sparse layer holds sink + window + one chunk,
    # 288 of 512 tokens, so it stores fewer bytes per token than a full layer
    m = re.search(r"with full attention: ([0-9.]+)x the KV capacity", server.log.read_text())
    capacity = metric(text, "vllm_adaptive:kv_capacity_vs_full")
    assert m and round(capacity, 2) == float(m.group(1)) and capacity > 1.0
    assert metric(text, "vllm_adaptive:kv_bytes_per_token_saved", layer_kind="sink_window") > 0
    assert metric(text, "vllm_adaptive:kv_bytes_per_token_saved", layer_kind="full") == 0
    # a ~390-token prompt: the sparse layers freed the blocks before their window
    # (the EngineCore publishes its counters asynchronously: poll)
    deadline = time.time() + 10
    while freed(text) <= before:
        assert time.time() < deadline, text[-2000:]
        time.sleep(0.5)
        text = scrape()


def test_prompt_longer_than_the_window(client):
    r = client.completions.create(model="smollm2", prompt=FACTS + " Fact 24: the number 24 is followed by",
                                  max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens > 32 + 128
    assert "25" in r.choices[0].text


def test_completion(client):
    r = client.completions.create(model="smollm2", prompt="The capital of France is",
                                  max_tokens=8, temperature=0)
    assert r.choices[0].text.strip()
    assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"


def test_streamed_chat(client):
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=16, temperature=0, stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) >= 2
    assert "".join(pieces).strip()


def test_bad_requests_get_http_errors_and_server_survives(server, client):
    import openai
    import requests

    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2", prompt="hi", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2", prompt="word " * 5000, max_tokens=4)
    bad_json = requests.post(server.base + "/v1/completions", data="{not json",
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert 400 <= bad_json.status_code < 500
    assert requests.get(server.base + "/health", timeout=10).status_code == 200
    r = client.completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=4, temperature=0)
    assert r.choices[0].text


BAD_BODIES = {
    "prompt of the wrong type": {"model": "smollm2", "prompt": {"text": "hi"}, "max_tokens": 4},
    "max_tokens a string": {"model": "smollm2", "prompt": "hi", "max_tokens": "four"},
    "temperature a string": {"model": "smollm2", "prompt": "hi", "max_tokens": 4, "temperature": "hot"},
    "negative n": {"model": "smollm2", "prompt": "hi", "max_tokens": 4, "n": -1},
    "max_tokens beyond the context": {"model": "smollm2", "prompt": "hi", "max_tokens": 10**6},
    "prompt token ids out of the vocabulary": {"model": "smollm2", "prompt": [10**9, 5], "max_tokens": 4},
    "missing prompt": {"model": "smollm2", "max_tokens": 4},
    "a 4 MB prompt": {"model": "smollm2", "prompt": "word " * 800_000, "max_tokens": 4},
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_malformed_oversized_wrong_typed_requests_get_4xx(server, case):
    import requests

    r = requests.post(server.base + "/v1/completions", json=BAD_BODIES[case], timeout=120)
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
    assert requests.get(server.base + "/health", timeout=10).status_code == 200


def test_chat_with_bad_messages_gets_4xx(server):
    import requests

    for body in ({"model": "smollm2", "messages": "hello", "max_tokens": 4},
                 {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
                 {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                  "temperature": "warm"}):
        r = requests.post(server.base + "/v1/chat/completions", json=body, timeout=60)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text[:300])
    r = requests.post(server.base + "/v1/completions", json={"model": "smollm2", "prompt": "1, 2,", "max_tokens": 3,
                                                          "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_long_context_eval_runs_against_the_endpoint(server, model_path):
    """``benchmarks/longeval.py --base-url``: the eval's cases through the
    OpenAI client, several in flight, come back in case order (each equal
    to the same case sent alone: greedy, float32)."""
    from transformers import AutoTokenizer

    from vllm_adaptive import longeval

    tok = AutoTokenizer.from_pretrained(model_path)
    cases = longeval.make_cases(tok, ["niah_single", "qa"], [SERVED_MAX_LEN], seeds=[0], per_seed=2)
    together = longeval.run_openai(server.base + "/v1", "smollm2", cases, concurrency=4)
    alone = [longeval.run_openai(server.base + "/v1", "smollm2", [c], concurrency=1)[0] for c in cases]
    assert together == alone
    assert all(together), "an empty answer"
