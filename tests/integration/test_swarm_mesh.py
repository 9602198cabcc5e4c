"""Swarm inference over the mesh: three real daemons, each answering with an OpenAI-compatible
backend (edgemesh's own API serving a small model), one `edgemesh swarm ask` through the
coordinator's daemon: commit, reveal, judging and the result travel as mesh RPCs."""

from __future__ import annotations

import json

import openai
import pytest

from edgemesh.collective.base import LocalCollective
from edgemesh.llm.build import load_from_store
from edgemesh.runtime.engine import Engine
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.shard import ShardSpec
from edgemesh.weights.store import ModelStore
from edgemesh.weights.synth import synth_model

from .conftest import run_cli, states, wait_for
from .llm_fixtures import ServerThread, tiny_tokenizer, tokenizer_files

pytestmark = pytest.mark.integration


def _engine(root) -> Engine:  # type: ignore[no-untyped-def]
    """A small random model whose context holds a judging prompt."""
    tok = tiny_tokenizer()
    cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=tok.vocab_size, max_position_embeddings=2048)
    entry = synth_model(ModelStore(root), cfg, seed=1, name="tiny", aux_files=tokenizer_files(tok))
    model = load_from_store(entry, [ShardSpec.full(cfg)] * cfg.num_hidden_layers, LocalCollective(), max_seq_len=2048)
    return Engine("tiny", model, tok)


def _backend(root):  # type: ignore[no-untyped-def]
    """edgemesh's own API serving that model: what each member answers with."""
    return ServerThread(_engine(root), "tiny")


def test_a_question_goes_round_the_swarm_over_the_mesh(cluster3, tmp_path):
    d, sds, nodes = cluster3
    assert wait_for(lambda: all(v == "alive" for v in states(sds[0]).values()), 30)
    server = _backend(tmp_path / "models")
    try:
        # Without a backend anywhere, a clear one-line error.
        res = run_cli("swarm", "ask", "Which is larger, 3 or 7?", "--state-dir", str(sds[0].path), home=tmp_path)
        assert res.returncode != 0 and "Traceback" not in res.stderr
        assert "swarm backend" in res.stderr or "edgemesh swarm config" in res.stderr, res.stderr
        for sd in sds:
            run_cli("swarm", "config", "--base-url", server.base_url, "--model", "tiny", "--state-dir", str(sd.path),
                    home=tmp_path, check=True)
        res = run_cli("swarm", "ask", "Which is larger, 3 or 7?", "--json", "-", "--timeout", "60",
                      "--state-dir", str(sds[0].path), home=tmp_path, timeout=300, check=True)
        result = json.loads(res.stdout)
        ids = {m["id"] for m in json.loads(run_cli("status", "--json", "-", "--state-dir", str(sds[0].path),
                                                   home=tmp_path, check=True).stdout)["members"]}
        assert set(result["answers"]) == ids, result["left_out"]  # every member answered
        assert result["winner"] in ids and result["answer"] == result["answers"][result["winner"]]
        assert abs(sum(result["scores"].values()) - len(ids)) < 1e-6  # BT strengths sum to n
        n = len(ids)
        assert len(result["judgments"]) >= 2 * (n - 1) + 2 * (n // 2)  # the schedule (+ probation ones)
        assert all(j["judge"] not in (j["a"], j["b"]) for j in result["judgments"])  # nobody judges itself
        # The reputation book is kept by the coordinator across rounds.
        assert (sds[0].path / "swarm-reputation.json").is_file()
        res = run_cli("swarm", "ask", "Name a colour.", "--explain", "--state-dir", str(sds[0].path), home=tmp_path,
                      timeout=300, check=True)
        assert "winner:" in res.stderr and "judgments" in res.stderr
        # `model: "swarm"` on the OpenAI API of a node: the official client gets the winning answer.
        front = _api_with_swarm(tmp_path / "front", sds[0])
        try:
            client = openai.OpenAI(base_url=front.base_url, api_key="none", max_retries=0, timeout=300)
            assert "swarm" in [m.id for m in client.models.list().data]
            reply = client.chat.completions.create(model="swarm", messages=[{"role": "user", "content": "2 + 2?"}])
            extra = reply.model_extra["swarm"]
            assert reply.choices[0].message.content == extra["answer"] and extra["winner"] in ids
        finally:
            front.stop()
    finally:
        server.stop()


def _api_with_swarm(root, state):  # type: ignore[no-untyped-def]
    from edgemesh.runtime.control import control_call

    async def swarm(question: str) -> dict:  # type: ignore[type-arg]
        return await control_call(state, "admin.swarm_ask", {"question": question, "timeout": 60.0}, timeout=300.0)

    return ServerThread(_engine(root), "tiny", swarm=swarm)
