"""Speculative decoding: several tokens per forward through the (split) model.

A decode step of a tensor-parallel group costs two allreduces per layer whatever the number of
positions it carries, and reads every weight once; so checking k proposed tokens in one forward
costs about one plain step, and every accepted proposal is a token almost for free.

One step, with ``last`` the newest token not yet fed to the model and ``d1..dk`` proposals:
forward ``[last, d1..dk]`` at ``pos`` → logits ``L0..Lk`` (``Li`` predicts the token after
``di``). Proposals are checked in order: greedy accepts ``di`` iff it is the argmax of ``L(i-1)``;
sampling accepts it with probability ``p(di)`` (``p`` the sampler's distribution from
``L(i-1)``), which with a proposer that puts all its mass on one token is the standard rejection
rule: on rejection the token is drawn from ``p`` without ``di``, renormalised, so every emitted
token has exactly the distribution plain decoding gives. After the accepted run one more token
comes from the next distribution (the first rejected position's residual, or ``Lk``). Each step
emits accepted + 1 tokens. The KV cache needs no rollback: positions past the accepted run hold
stale entries that the next forward, which starts right after them, overwrites before any query
can see them (attention reads positions < its own).

Proposers: prompt lookup (the last n-gram's previous occurrence in prompt + text so far) and a
draft model on the master (a smaller model with the same tokenizer, greedy).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from edgemesh.errors import ConfigError
from edgemesh.llm.model import Participant
from edgemesh.llm.sampling import Sampler


class Proposer(Protocol):
    def propose(self, context: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that may follow ``context`` (may be fewer, or none)."""
        ...


@dataclass
class LookupProposer:
    """Prompt lookup: find the most recent earlier occurrence of the context's last n tokens
    (n from ``max_ngram`` down to ``min_ngram``) and propose what followed it. Pays where the
    answer repeats its input: rewriting, summarising, editing code, quoting."""

    max_ngram: int = 3
    min_ngram: int = 1
    window: int = 4096  # look this far back at most (a long context stays cheap)

    def propose(self, context: list[int], k: int) -> list[int]:
        if k <= 0 or len(context) < 2:
            return []
        ctx = context[-self.window:]
        n_ctx = len(ctx)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            tail = ctx[-n:]
            # Most recent first: nearby text predicts the continuation best.
            for start in range(n_ctx - n - 1, -1, -1):
                if ctx[start:start + n] == tail:
                    follow = ctx[start + n:start + n + k]
                    if follow:
                        return follow
        return []


class DraftProposer:
    """A small model on the master proposes greedily. Its KV cache is kept for the longest
    prefix of the context it has already seen, so each step feeds only the new tokens."""

    def __init__(self, draft: Participant) -> None:
        if draft.collective.world_size != 1:
            raise ConfigError("a draft model runs on the master alone")
        self.draft = draft
        self._fed: list[int] = []  # tokens whose keys/values the draft's cache holds, in order

    def propose(self, context: list[int], k: int) -> list[int]:
        if k <= 0 or len(context) + k > self.draft.max_seq_len:
            return []
        same = 0
        for a, b in zip(self._fed, context):
            if a != b:
                break
            same += 1
        same = min(same, len(context) - 1)  # feed at least the newest token: its logits are needed
        new = context[same:]
        logits = self.draft.forward(torch.tensor([new]), same, last_only=True)
        self._fed = list(context)
        out: list[int] = []
        for i in range(k):
            tok = int(torch.argmax(logits[0, -1]).item())
            out.append(tok)
            if i == k - 1:
                break
            logits = self.draft.forward(torch.tensor([[tok]]), len(self._fed))
            self._fed.append(tok)
        return out


@dataclass
class SpecStats:
    """What speculation did for one request (reported in the API's usage block)."""

    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    plain_steps: int = 0
    disabled: bool = False

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@dataclass
class AdaptiveK:
    """How many tokens to propose next. Doubles while whole proposals are accepted, halves when
    less than half of one is; speculation turns itself off for the rest of the request when its
    measured tokens per second fall below ``min_gain`` of plain steps' (a plain step, one token,
    is measured whenever the proposer has nothing, and forced every ``probe_every`` steps)."""

    k: int = 4
    k_min: int = 1
    k_max: int = 8
    probe_every: int = 16
    min_gain: float = 0.95
    off: bool = False
    _plain_s: float | None = None  # EMA of seconds per plain step
    _spec_tps: float | None = None  # EMA of tokens per second over speculative steps
    _spec_steps: int = 0
    _since_plain: int = 0

    def want_plain(self) -> bool:
        return self.off or self._since_plain >= self.probe_every or (self._plain_s is None and self._spec_steps >= 2)

    def plain_step(self, seconds: float) -> None:
        self._since_plain = 0
        self._plain_s = seconds if self._plain_s is None else 0.7 * self._plain_s + 0.3 * seconds

    def spec_step(self, proposed: int, accepted: int, seconds: float) -> None:
        self._spec_steps += 1
        self._since_plain += 1
        tps = (accepted + 1) / max(seconds, 1e-9)
        self._spec_tps = tps if self._spec_tps is None else 0.7 * self._spec_tps + 0.3 * tps
        if accepted == proposed:
            self.k = min(self.k * 2, self.k_max)
        elif 2 * accepted < proposed:
            self.k = max(self.k // 2, self.k_min)
        if self._plain_s is not None and self._spec_steps >= 4 and self._spec_tps * self._plain_s < self.min_gain:
            self.off = True


def verify(logits: torch.Tensor, proposals: list[int], sampler: Sampler) -> tuple[list[int], int]:
    """The accepted run of ``proposals`` and the token after it. ``logits[i]`` predicts the
    position of ``proposals[i]``; ``logits`` has one more row than there are proposals."""
    accepted: list[int] = []
    for i, d in enumerate(proposals):
        if sampler.greedy:
            top = int(torch.argmax(logits[i].to(torch.float32)).item())
            if top != d:
                return accepted, top
        else:
            probs = sampler.probs(logits[i])
            if sampler.uniform() >= float(probs[d]):
                residual = probs.clone()
                residual[d] = 0.0
                return accepted, sampler.draw(residual / residual.sum())
        accepted.append(d)
    return accepted, sampler(logits[len(proposals)])


@torch.inference_mode()
def speculative_generate(
    model: Participant,
    prompt_ids: list[int],
    max_new_tokens: int,
    proposer: Proposer,
    stop_ids: Iterable[int] = (),
    *,
    sampler: Sampler,
    k: AdaptiveK | None = None,
    stats: SpecStats | None = None,
) -> Iterator[int]:
    """Yield new token ids like ``generate`` (same tokens for greedy decoding, the same
    distribution when sampling), several per forward when proposals are accepted."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty")
    if len(prompt_ids) + max_new_tokens > model.max_seq_len:
        raise ConfigError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"context of {model.max_seq_len} tokens")
    if max_new_tokens <= 0:
        return
    k = k or AdaptiveK()
    stats = stats if stats is not None else SpecStats()
    stops = set(stop_ids)
    context = list(prompt_ids)
    logits = model.forward(torch.tensor([prompt_ids]), 0, last_only=True)[0, -1]
    last = sampler(logits)
    emitted = 0
    while True:
        context.append(last)
        yield last
        emitted += 1
        if last in stops or emitted == max_new_tokens:
            return
        pos = len(context) - 1  # where `last` goes
        room = min(max_new_tokens - emitted, model.max_seq_len - len(context))
        proposals = [] if k.want_plain() else proposer.propose(context, min(k.k, room))[:room]
        t0 = time.perf_counter()
        out = model.forward(torch.tensor([[last, *proposals]]), pos)[0]  # [1 + len(proposals), V]
        seconds = time.perf_counter() - t0
        stats.steps += 1
        if not proposals:
            stats.plain_steps += 1
            k.plain_step(seconds)
            last = sampler(out[-1])
            continue
        accepted, nxt = verify(out, proposals, sampler)
        stats.proposed += len(proposals)
        stats.accepted += len(accepted)
        k.spec_step(len(proposals), len(accepted), seconds)
        stats.disabled = k.off
        for tok in accepted:
            context.append(tok)
            yield tok
            emitted += 1
            if tok in stops or emitted == max_new_tokens:
                return
        last = nxt
