"""The OpenAI-compatible swarm backend against a real server: edgemesh's own API serving a small
random-weight model with a real tokenizer (its answers are gibberish; the protocol is what is tested)."""

from __future__ import annotations

import asyncio

import pytest

from edgemesh.collective.base import LocalCollective
from edgemesh.errors import ConfigError, SwarmError
from edgemesh.llm.build import load_from_store
from edgemesh.runtime.engine import Engine
from edgemesh.runtime.swarm_engine import EngineMember
from edgemesh.runtime.swarm_openai import OpenAIBackendConfig, OpenAIMember
from edgemesh.swarm.reputation import ReputationBook
from edgemesh.swarm.round import LocalPeer, Query, RoundConfig, run_round
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.shard import ShardSpec
from edgemesh.weights.store import ModelStore
from edgemesh.weights.synth import synth_model

from .llm_fixtures import ServerThread, tiny_tokenizer

pytestmark = pytest.mark.integration

QUESTION = "Which structure is found in the inner ear?\n\nA) hammer\nB) basilar membrane\nC) tympanic membrane\nD) pinna"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = tiny_tokenizer()
    # A long context: judging prompts hold the question and two answers, and this byte-level
    # tokenizer spends about a token per character on words it was not trained on.
    cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=tok.vocab_size, max_position_embeddings=4096)
    entry = synth_model(ModelStore(tmp_path_factory.mktemp("store")), cfg, seed=0, name="tiny")
    model = load_from_store(entry, [ShardSpec.full(entry.config)] * cfg.num_hidden_layers, LocalCollective(),
                            max_seq_len=3072)
    srv = ServerThread(Engine("tiny", model, tok), "tiny")
    yield srv
    srv.stop()


def backend(server, **kw) -> OpenAIBackendConfig:
    return OpenAIBackendConfig(server.base_url, kw.pop("model", "tiny"), api_key="k-not-checked",
                               answer_max_tokens=12, judge_max_tokens=4, timeout=60, **kw)


def test_member_answers_and_judges_through_the_api(server):
    async def go():
        m = OpenAIMember("m0", backend(server))
        try:
            a = await m.answer(QUESTION)
            v = await m.judge(QUESTION, "B) basilar membrane", "The answer is D.")
            keep = await m.screen(QUESTION, "B")
        finally:
            await m.aclose()
        return a, v, keep

    a, v, keep = asyncio.run(go())
    assert isinstance(a, str) and isinstance(v, str) and isinstance(keep, bool)


def test_three_members_complete_a_round_end_to_end(server):
    async def go():
        members = [OpenAIMember(f"m{k}", backend(server, temperature=0.8 + 0.1 * k)) for k in range(3)]
        book = ReputationBook()
        try:
            return await run_round(Query("q-int", QUESTION), [LocalPeer(m) for m in members], book,
                                   RoundConfig(commit_timeout=60, reveal_timeout=5, judge_timeout=60)), book
        finally:
            for m in members:
                await m.aclose()

    res, book = asyncio.run(go())
    assert not res.left_out, res.left_out
    assert set(res.answers) == {"m0", "m1", "m2"} and res.winner in res.answers
    assert len(res.judgments) == 2 * 2 + 2 * 1
    assert all(j.verdict in ("A", "B", "U") and j.judge not in (j.a, j.b) for j in res.judgments)
    assert sum(res.scores.values()) == pytest.approx(3)


def test_backend_errors_are_clear(server):
    async def go(cfg):
        m = OpenAIMember("m0", cfg)
        try:
            return await m.answer(QUESTION)
        finally:
            await m.aclose()

    with pytest.raises(SwarmError, match="HTTP 404"):
        asyncio.run(go(backend(server, model="nope")))
    with pytest.raises(SwarmError, match="cannot reach"):
        asyncio.run(go(OpenAIBackendConfig("http://127.0.0.1:9/v1", "tiny", timeout=5)))
    with pytest.raises(ConfigError):
        OpenAIBackendConfig("ftp://x", "tiny")
    with pytest.raises(ConfigError):
        OpenAIBackendConfig.from_env({})
    cfg = OpenAIBackendConfig.from_env({"EDGEMESH_SWARM_BASE_URL": "http://h/v1/", "EDGEMESH_SWARM_MODEL": "m",
                                        "OPENAI_API_KEY": "secret"})
    assert cfg.base_url == "http://h/v1" and cfg.api_key == "secret" and "secret" not in repr(cfg)


def test_local_engine_member_joins_http_members_in_a_round(server):
    """The node's own model (no HTTP) in the same round as three endpoint members (4 answers: everyone judges)."""
    async def go():
        http = [OpenAIMember(f"h{k}", backend(server, temperature=0.9)) for k in range(3)]
        local = EngineMember("local", server.engine, answer_max_tokens=12, judge_max_tokens=4, temperature=0.7, seed=1)
        try:
            text = await local.answer(QUESTION)
            res = await run_round(Query("q-mixed", QUESTION), [LocalPeer(m) for m in [*http, local]], ReputationBook(),
                                  RoundConfig(commit_timeout=60, reveal_timeout=5, judge_timeout=60))
        finally:
            for m in http:
                await m.aclose()
        return text, res

    text, res = asyncio.run(go())
    assert isinstance(text, str)
    assert not res.left_out, res.left_out
    assert set(res.answers) == {"h0", "h1", "h2", "local"} and any(j.judge == "local" for j in res.judgments)
