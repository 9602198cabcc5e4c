"""A tiny model with a real tokenizer, served by the real API server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edgemesh.collective.base import LocalCollective
from edgemesh.llm.build import load_from_store
from edgemesh.llm.generate import generate
from edgemesh.llm.model import Participant
from edgemesh.llm.tokenizer import ChatTokenizer
from edgemesh.runtime.api import ApiLimits, ApiServer, serve
from edgemesh.runtime.engine import Engine
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.shard import ShardSpec
from edgemesh.weights.store import ModelEntry, ModelStore
from edgemesh.weights.synth import synth_model

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prefill_and_generate(m: Participant, prompts: list[list[int]], n: int) -> list[tuple[torch.Tensor, list[int]]]:
    """Per prompt: the prefill logits and ``n`` greedy tokens (what split-vs-reference tests compare)."""
    res = []
    for ids in prompts:
        with torch.inference_mode():
            logits = m.forward(torch.tensor([ids]), 0)
        res.append((logits, list(generate(m, ids, n))))
    return res


def tiny_tokenizer(end_tokens: bool = True) -> ChatTokenizer:
    """A byte-level BPE of 300 tokens. Without ``end_tokens`` nothing can end a generation
    early, so a request runs to max_tokens (what a failure test needs)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>"] if end_tokens else []
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    if not end_tokens:
        return ChatTokenizer(tok, {})
    return ChatTokenizer(tok, {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"})


def tokenizer_files(tok: ChatTokenizer) -> dict[str, bytes]:
    import json

    cfg = {"chat_template": tok.chat_template, "eos_token": tok.eos_token} if tok.eos_token else {}
    return {"tokenizer.json": tok._tok.to_str().encode(), "tokenizer_config.json": json.dumps(cfg).encode()}


def tiny_entry(root: Path, vocab: int, layers: int = 2, seed: int = 0):
    cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=256)
    return synth_model(ModelStore(root), cfg, seed=seed, name="tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """The API server in a background event loop; stop() tears everything down."""

    def __init__(self, engine: Engine | None, name: str, limits: ApiLimits | None = None, swarm=None,  # type: ignore[no-untyped-def]
                 classifier=None) -> None:
        self.port = free_port()
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._task: asyncio.Task | None = None
        self.api = ApiServer(engine, name, limits, swarm=swarm, classifier=classifier)
        self.thread = threading.Thread(target=self._run, args=(self.api,), daemon=True)
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("API server did not start")

    def _run(self, server: ApiServer) -> None:
        asyncio.set_event_loop(self.loop)
        ready = asyncio.Event()

        async def main() -> None:
            self._task = asyncio.ensure_future(serve(server, "127.0.0.1", self.port, ready))
            await ready.wait()
            self._ready.set()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

        self.loop.run_until_complete(main())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self._task is not None:
            self.loop.call_soon_threadsafe(self._task.cancel)
        self.thread.join(10)
        if self.engine is not None:
            self.engine.close()


def local_server(root: Path, limits: ApiLimits | None = None,
                 wrap: Callable[[Engine], Any] | None = None) -> tuple[ServerThread, ChatTokenizer]:
    """``wrap``: an engine wrapper (tests that need to hold requests)."""
    tokenizer = tiny_tokenizer()
    entry = tiny_entry(root, tokenizer.vocab_size)
    specs = [ShardSpec.full(entry.config)] * entry.config.num_hidden_layers
    model = load_from_store(entry, specs, LocalCollective(), max_seq_len=128)
    engine = Engine("tiny", model, tokenizer)
    return ServerThread(wrap(engine) if wrap else engine, "tiny", limits), tokenizer


def single_device(entry: ModelEntry, max_seq_len: int = 256) -> Participant:
    """A store model loaded whole on one device (the reference a split is compared with)."""
    full = [ShardSpec.full(entry.config)] * entry.config.num_hidden_layers
    return load_from_store(entry, full, LocalCollective(), max_seq_len=max_seq_len)


def chat_prompts(entry: ModelEntry, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as a one-message chat, with the model's own tokenizer."""
    tok = ChatTokenizer.from_entry(entry)
    return [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts]


def teacher_forced(m: Participant, ids: list[int], tokens: list[int]) -> torch.Tensor:
    """Decode-step logits [len(tokens), V] when ``tokens`` are fed one by one after ``ids``."""
    with torch.inference_mode():
        out = [m.forward(torch.tensor([ids]), 0, last_only=True)[0, -1]]
        for i, t in enumerate(tokens[:-1]):
            out.append(m.forward(torch.tensor([[t]]), len(ids) + i)[0, -1])
    return torch.stack(out)
