"""Speculative decoding behind the OpenAI-compatible API: same text as plain decoding, and the
usage block says how many proposed tokens were accepted (official openai client)."""

from __future__ import annotations

import openai
import pytest

from edgemesh.collective.base import LocalCollective
from edgemesh.llm.build import load_from_store
from edgemesh.llm.speculate import LookupProposer
from edgemesh.runtime.engine import Engine
from edgemesh.weights.shard import ShardSpec

from .llm_fixtures import ServerThread, tiny_entry, tiny_tokenizer

pytestmark = pytest.mark.integration


def _server(root, proposer):  # type: ignore[no-untyped-def]
    tokenizer = tiny_tokenizer(end_tokens=False)
    entry = tiny_entry(root, tokenizer.vocab_size)
    specs = [ShardSpec.full(entry.config)] * entry.config.num_hidden_layers
    model = load_from_store(entry, specs, LocalCollective(), max_seq_len=256)
    return ServerThread(Engine("tiny", model, tokenizer, proposer=proposer), "tiny")


def test_lookup_speculation_through_the_api_gives_the_plain_text_and_reports_usage(tmp_path):
    plain_server = _server(tmp_path / "a", None)
    spec_server = _server(tmp_path / "b", LookupProposer)
    try:
        # A repetitive prompt, so the lookup has something to propose.
        prompt = "a b c d e f a b c d e f a b c d e f a b c"
        answers = []
        for server in (plain_server, spec_server):
            client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
            answers.append(client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0))
        plain, spec = answers
        assert spec.choices[0].text == plain.choices[0].text
        assert spec.usage.completion_tokens == plain.usage.completion_tokens == 40
        usage = spec.usage.model_dump()
        assert "speculative" not in plain.usage.model_dump()
        assert usage["speculative"]["proposed"] >= usage["speculative"]["accepted"] >= 0
        assert usage["speculative"]["steps"] >= 1
        # Streaming: the usage chunk carries it too, and the text is the same.
        client = openai.OpenAI(base_url=spec_server.base_url, api_key="none", max_retries=0)
        pieces, last = [], None
        for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                               stream_options={"include_usage": True}):
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
            if chunk.usage is not None:
                last = chunk.usage.model_dump()
        assert "".join(pieces) == plain.choices[0].text
        assert last is not None and "speculative" in last
    finally:
        plain_server.stop()
        spec_server.stop()
