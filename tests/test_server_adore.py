"""The README's serve command with the ``adore`` preset (GRU-scored release
layers): a long prompt is served past its budget, a streamed long request
aborted by its client gives every block back, and the server keeps serving.

The server is test_load.py's ``adore`` server (``conftest.shared_server``:
budget 256 tokens, a 512-token context), so these checks also hold for a
server that has been through the load, whichever module runs first."""

from __future__ import annotations

import json
import time

import pytest

from conftest import SERVED_RELEASE_BUDGET

pytestmark = pytest.mark.server

# ~380 tokens: past the 256-token budget, within the 512-token context
FACTS = " ".join(f"Fact {i}: the number {i} is followed by {i + 1}." for i in range(24))


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server("adore")


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)


def _metric(base: str, name: str) -> float:
    import requests

    text = requests.get(base + "/metrics", timeout=10).text
    vals = [float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + "{") or l.startswith(name + " ")]
    assert vals, f"no {name} in /metrics"
    return sum(vals)


def _stats(server) -> dict:
    """The scheduler's release statistics per release group (cumulative)."""
    return json.loads(server.release_stats.read_text()) if server.release_stats.exists() else {}


def test_server_runs_release_layers(server):
    text = server.log.read_text()
    assert "adaptive_attention=adore: 30 layers (30 release)" in text
    assert f"budget={SERVED_RELEASE_BUDGET}" in text and "scorer=gru" in text
    assert "KV connector AdoreConnector" in text
    assert "prefix caching switched off" in text


def test_long_prompt_past_the_budget(server, client):
    released_before = sum(g["released"] for g in _stats(server).values())
    r = client.completions.create(model="smollm2", prompt=FACTS + " Fact 24: the number 24 is followed by",
                                  max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens > SERVED_RELEASE_BUDGET
    assert "25" in r.choices[0].text
    # the scheduler rewrites the file when its figures change: poll for this request's
    deadline = time.time() + 10
    while sum(g["released"] for g in _stats(server).values()) <= released_before:
        assert time.time() < deadline, _stats(server)
        time.sleep(0.5)
    # and no request, this one or any before it, held more than its budget after a removal
    for g in _stats(server).values():
        assert g["peak_after_release"] <= g["budget_blocks"], g


def test_aborted_stream_gives_every_block_back(server, client):
    stream = client.completions.create(model="smollm2", prompt=FACTS + " Now count on:", max_tokens=100,
                                       temperature=0, stream=True)
    got = 0
    for chunk in stream:
        got += 1
        if got == 3:
            break
    stream.close()  # the client goes away: vLLM aborts the request
    deadline = time.time() + 60
    while _metric(server.base, "vllm:num_requests_running") > 0 and time.time() < deadline:
        time.sleep(0.5)
    assert _metric(server.base, "vllm:num_requests_running") == 0
    assert _metric(server.base, "vllm:kv_cache_usage_perc") == 0.0
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                  temperature=0)
    assert "Paris" in r.choices[0].text
