"""The README's serve command with the ``adore`` preset (GRU-scored release
layers, budget 1024 tokens): a long prompt is served past its budget, a
streamed long request aborted by its client gives every block back, and
the server keeps serving."""

from __future__ import annotations

import json
import time

import pytest

from conftest import engine_env, serve

pytestmark = pytest.mark.server

FACTS = " ".join(f"Fact {i}: the number {i} is followed by {i + 1}." for i in range(110))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vllm_adaptive.importance.channel import STATS_ENV

    tmp = tmp_path_factory.mktemp("server_adore")
    env = engine_env()
    env[STATS_ENV] = str(tmp / "release.json")
    with serve("adore", tmp, env) as (base, log):
        yield base, log, tmp / "release.json"


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=300)


def _metric(base: str, name: str) -> float:
    import requests

    text = requests.get(base + "/metrics", timeout=10).text
    vals = [float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + "{") or l.startswith(name + " ")]
    assert vals, f"no {name} in /metrics"
    return sum(vals)


def test_server_runs_release_layers(server):
    text = server[1].read_text()
    assert "adaptive_attention=adore: 30 layers (30 release)" in text
    assert "scorer=gru" in text
    assert "KV connector AdoreConnector" in text
    assert "prefix caching switched off" in text


def test_long_prompt_past_the_budget(server, client):
    r = client.completions.create(model="smollm2", prompt=FACTS + " Fact 110: the number 110 is followed by",
                                  max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens > 1500
    assert "111" in r.choices[0].text
    stats = json.loads(server[2].read_text())
    assert stats["0"]["released"] > 0
    assert stats["0"]["peak_after_release"] <= stats["0"]["budget_blocks"]


def test_aborted_stream_gives_every_block_back(server, client):
    stream = client.completions.create(model="smollm2", prompt=FACTS + " Now count on:", max_tokens=400,
                                       temperature=0, stream=True)
    got = 0
    for chunk in stream:
        got += 1
        if got == 3:
            break
    stream.close()  # the client goes away: vLLM aborts the request
    deadline = time.time() + 60
    while _metric(server[0], "vllm:num_requests_running") > 0 and time.time() < deadline:
        time.sleep(0.5)
    assert _metric(server[0], "vllm:num_requests_running") == 0
    assert _metric(server[0], "vllm:kv_cache_usage_perc") == 0.0
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                  temperature=0)
    assert "Paris" in r.choices[0].text
