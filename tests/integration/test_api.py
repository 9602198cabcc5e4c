"""The OpenAI-compatible server, driven by the official `openai` client."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import openai
import pytest

from .llm_fixtures import local_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv, tok = local_server(tmp_path_factory.mktemp("store"))
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


MSG = [{"role": "user", "content": "hello world"}]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_non_streaming_and_streaming_agree_under_greedy(client):
    whole = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert choice.message.role == "assistant"
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]


def test_completions_and_seeded_sampling_is_reproducible(client):
    a = client.completions.create(model="tiny", prompt="the quick", max_tokens=10, temperature=0.9, seed=7)
    b = client.completions.create(model="tiny", prompt="the quick", max_tokens=10, temperature=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text
    assert a.usage.completion_tokens == b.usage.completion_tokens > 0


def test_stop_strings_cut_the_output(client):
    full = client.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=0).choices[0].text
    if len(full) < 4:
        pytest.skip("the random model stopped too early to test stop strings")
    stop = full[2:4]
    cut = client.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MSG)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=-1)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello " * 400}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    req = urllib.request.Request(server.base_url + "/chat/completions", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(req, timeout=10)
    assert he.value.code == 400
    assert "error" in json.loads(he.value.read())
    ok = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_concurrent_requests_do_not_corrupt_each_other(client):
    prompts = ["hello world", "the lazy dog", "quick brown fox"]
    expected = {p: client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
                for p in prompts}
    got: dict[str, list[str]] = {p: [] for p in prompts}

    def worker(p: str) -> None:
        for _ in range(2):
            got[p].append(client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for p in prompts:
        assert got[p] == [expected[p]] * 2
