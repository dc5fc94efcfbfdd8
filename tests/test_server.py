"""The README's serve command with the ``longgen`` preset: OpenAI-compatible
server on loopback, real ``openai`` client, a completion, a streamed chat
completion and a prompt longer than the sparse layers' window; bad requests get
HTTP errors and the server stays up."""

from __future__ import annotations

import pytest

from conftest import engine_env, serve

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = engine_env()
    env.pop("VLLM_CPU_KVCACHE_SPACE")  # exercise the CLI's default, as `make serve` does
    with serve("longgen", tmp_path_factory.mktemp("server"), env) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_server_uses_adaptive(server):
    text = server[1].read_text()
    assert "Using ADAPTIVE attention backend on CPU" in text
    assert "adaptive_attention=longgen: 30 layers (10 full, 20 sink_window)" in text
    assert "prefix caching switched off" in text
    assert "VLLM_CPU_KVCACHE_SPACE=4" in text


def test_prompt_longer_than_the_window(client):
    # ~1,300 tokens: the sparse layers keep 128 sink + 768 window tokens
    facts = " ".join(f"Fact {i}: the number {i} is followed by {i + 1}." for i in range(75))
    r = client.completions.create(model="smollm2", prompt=facts + " Fact 75: the number 75 is followed by",
                                  max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens > 1000
    assert "76" in r.choices[0].text


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
    bad_json = requests.post(server[0] + "/v1/completions", data="{not json",
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert 400 <= bad_json.status_code < 500
    assert requests.get(server[0] + "/health", timeout=10).status_code == 200
    r = client.completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=4, temperature=0)
    assert r.choices[0].text
