"""The HTTP API beyond loopback: API key, bounded queue (429 + Retry-After), body and max_tokens
limits — driven by the official `openai` client; and `launch` refusing to expose it keyless."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from edgemesh.errors import ConfigError
from edgemesh.runtime.api import ApiLimits, check_exposure, is_loopback

from .conftest import run_cli
from .llm_fixtures import local_server

pytestmark = [pytest.mark.integration, pytest.mark.security]

KEY = "sk-test-5f2a0c9e"
MSG = [{"role": "user", "content": "hello world"}]


class GatedEngine:
    """The real engine, except that submitted requests wait at a gate: holds the queue full."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Semaphore(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def submit(self, request: Any, sink: Any) -> None:
        def later() -> None:
            self.held.release()
            self.gate.wait(30)
            self._engine.submit(request, sink)

        threading.Thread(target=later, daemon=True).start()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    holder: dict[str, GatedEngine] = {}

    def wrap(engine: Any) -> GatedEngine:
        holder["engine"] = GatedEngine(engine)
        return holder["engine"]

    srv, _ = local_server(tmp_path_factory.mktemp("store"),
                          ApiLimits(api_key=KEY, max_pending=1, max_body=64 * 1024, max_tokens=8), wrap)
    yield srv, holder["engine"]
    srv.stop()


def _client(srv, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=60)


def test_api_key_is_required_and_checked(guarded):
    srv, _ = guarded
    with pytest.raises(openai.AuthenticationError) as e:
        _client(srv, "sk-wrong").chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(srv, KEY + "x").models.list()  # a longer key with the right prefix is still wrong
    for path in ("/models", "/chat/completions"):  # no header at all, any route
        req = urllib.request.Request(srv.base_url + path, data=b"{}" if "chat" in path else None)
        with pytest.raises(urllib.error.HTTPError) as he:
            urllib.request.urlopen(req, timeout=10)
        assert he.value.code == 401 and he.value.headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(he.value.read())["error"]["code"] == "invalid_api_key"
    ok = _client(srv).chat.completions.create(model="tiny", messages=MSG, max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_full_queue_answers_429_with_retry_after(guarded):
    srv, engine = guarded
    client = _client(srv)
    engine.held = threading.Semaphore(0)  # count only this test's requests
    engine.gate.clear()
    first: list[Any] = []
    t = threading.Thread(target=lambda: first.append(
        client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)))
    t.start()
    try:
        assert engine.held.acquire(timeout=30), "the first request reached the engine"
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="tiny", prompt="hello", max_tokens=4)
        assert e.value.status_code == 429
        assert int(e.value.response.headers["Retry-After"]) >= 1
        assert e.value.body["code"] == "rate_limit_exceeded"
    finally:
        engine.gate.set()
        t.join(60)
    assert first and first[0].usage.completion_tokens >= 1  # the admitted one was served
    again = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
    assert again.choices[0].text == first[0].choices[0].text  # a place freed up
    assert srv.api.refused_busy >= 1 and srv.api.pending == 0


def test_oversized_body_is_413_and_max_tokens_over_the_limit_is_400(guarded):
    srv, _ = guarded
    client = _client(srv)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 100_000}])
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    # A chunked body announces no length: it is cut off while being read, with the same answer.
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
        conn.request("POST", "/v1/chat/completions", body=iter([body[i:i + 8192] for i in range(0, len(body), 8192)]),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                     encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    finally:
        conn.close()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=9)
    assert e.value.body["code"] == "max_tokens_limit" and e.value.body["param"] == "max_tokens"
    # Without max_tokens a chat gets the server's limit, not the whole context.
    reply = client.chat.completions.create(model="tiny", messages=MSG, temperature=0)
    assert reply.usage.completion_tokens <= 8


def test_exposure_rule():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("myhost")
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", KEY)
    with pytest.raises(ConfigError, match="--api-key"):
        check_exposure("0.0.0.0", None)
    with pytest.raises(ConfigError):
        ApiLimits(api_key="  ")


def test_launch_refuses_a_keyless_api_beyond_loopback(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEMESH_API_KEY", raising=False)
    res = run_cli("launch", "no-such-model", "--host", "0.0.0.0", "--state-dir", str(tmp_path / "none"),
                  home=tmp_path)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--api-key" in res.stderr and "EDGEMESH_API_KEY" in res.stderr
    # With a key (from the environment) it gets past that check (and fails later: no such model).
    monkeypatch.setenv("EDGEMESH_API_KEY", KEY)
    res = run_cli("launch", "no-such-model", "--host", "0.0.0.0", "--state-dir", str(tmp_path / "none"),
                  home=tmp_path)
    assert res.returncode != 0 and "--api-key" not in res.stderr


def test_ask_sends_the_key_and_says_when_one_is_missing(guarded, tmp_path, monkeypatch):
    srv, _ = guarded
    monkeypatch.delenv("EDGEMESH_API_KEY", raising=False)
    res = run_cli("ask", "hello", "--url", srv.base_url, "--max-tokens", "2", home=tmp_path)
    assert res.returncode != 0 and "needs an API key" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = run_cli("ask", "hello", "--url", srv.base_url, "--max-tokens", "2", "--api-key", KEY, home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "tokens" in res.stderr
