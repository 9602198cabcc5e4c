"""A swarm member backed by this node's own model: the local edgemesh LLM runtime (``Engine``),
without HTTP. Generation runs in the engine's compute thread; this side only awaits its events."""

from __future__ import annotations

import asyncio

from edgemesh.errors import SwarmError
from edgemesh.llm.sampling import SamplingParams
from edgemesh.runtime.engine import Engine, GenEvent, GenRequest
from edgemesh.swarm.prompts import answer_messages, judge_messages, parse_screen, screen_messages


class EngineMember:
    """``SwarmMember`` over a local ``Engine`` (single-device or tensor-parallel, the same object
    the API server uses)."""

    def __init__(self, member_id: str, engine: Engine, answer_max_tokens: int = 96, judge_max_tokens: int = 8,
                 temperature: float = 0.0, seed: int | None = None) -> None:
        self._id = member_id
        self.engine = engine
        self.answer_max_tokens = answer_max_tokens
        self.judge_max_tokens = judge_max_tokens
        self.params = SamplingParams(temperature=temperature, seed=seed)

    @property
    def id(self) -> str:
        return self._id

    async def answer(self, question: str) -> str:
        return await self.chat(answer_messages(question), self.answer_max_tokens)

    async def judge(self, question: str, answer_a: str, answer_b: str) -> str:
        return await self.chat(judge_messages(question, answer_a, answer_b), self.judge_max_tokens)

    async def screen(self, question: str, answer: str) -> bool:
        return parse_screen(await self.chat(screen_messages(question, answer), self.judge_max_tokens))

    async def chat(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        ids = await asyncio.to_thread(self.engine.tokenizer.encode_chat, messages)
        room = self.engine.context_length - len(ids)
        if room < 1:
            raise SwarmError(f"{self.engine.name}: the prompt ({len(ids)} tokens) does not fit the model's "
                             f"context ({self.engine.context_length})")
        gen = GenRequest(ids, min(max_tokens, room), self.params)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenEvent] = asyncio.Queue()
        self.engine.submit(gen, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        parts: list[str] = []
        try:
            while True:
                ev = await events.get()
                if ev.error is not None:
                    raise SwarmError(f"{self.engine.name}: generation failed: {ev.error}")
                parts.append(ev.text)
                if ev.done:
                    return "".join(parts)
        finally:
            gen.cancel.set()  # done, failed or cancelled by a phase deadline: stop generating
