"""A swarm member's model for the NAT testbed: edgemesh's own OpenAI-compatible API serving a
small random model, on HOST:PORT inside a device namespace, behind an API key (it listens on a
non-loopback address). Run: python swarm_backend.py HOST PORT KEY."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edgemesh.collective.base import LocalCollective  # noqa: E402
from edgemesh.llm.build import load_from_store  # noqa: E402
from edgemesh.runtime.api import ApiLimits, ApiServer, serve  # noqa: E402
from edgemesh.runtime.engine import Engine  # noqa: E402
from edgemesh.weights.config import ModelConfig  # noqa: E402
from edgemesh.weights.shard import ShardSpec  # noqa: E402
from edgemesh.weights.store import ModelStore  # noqa: E402
from edgemesh.weights.synth import synth_model  # noqa: E402
from tests.integration.llm_fixtures import tiny_tokenizer, tokenizer_files  # noqa: E402


def main() -> None:
    host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    tok = tiny_tokenizer()
    cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=tok.vocab_size, max_position_embeddings=2048)
    with tempfile.TemporaryDirectory() as root:
        entry = synth_model(ModelStore(root), cfg, seed=1, name="tiny", aux_files=tokenizer_files(tok))
        model = load_from_store(entry, [ShardSpec.full(cfg)] * cfg.num_hidden_layers, LocalCollective(),
                                max_seq_len=2048)
        engine = Engine("tiny", model, tok)
        try:
            asyncio.run(serve(ApiServer(engine, "tiny", ApiLimits(api_key=key)), host, port, asyncio.Event()))
        finally:
            engine.close()


if __name__ == "__main__":
    main()
