"""Measurements through a live group, for `bench generate`: each rank's compute with no
communication, all ranks at once (so ranks that share a machine also share its cores and
memory bandwidth, as they do when serving).

The master sends ``{"op": "solo", "n": N, "start_pos": P, "tokens": T}``; every rank then runs
N steps of T tokens (1: decode steps; more: prefills) of its own slices with a world-of-one
collective (the partial sums are not summed: the numbers are wrong, the work is the same), and
the ranks' medians travel back in one allreduce.
"""

from __future__ import annotations

import statistics
import time

import torch

from edgemesh.collective.base import LocalCollective
from edgemesh.errors import EdgemeshError
from edgemesh.llm.model import Participant

MAX_SOLO_STEPS = 1000
# Seconds of steps at most: the ranks meet in an allreduce afterwards, and a rank that waits
# there longer than the group's collective timeout (5 s by default) counts as failed.
SOLO_BUDGET = 1.0
MIN_SOLO_STEPS = 3


def solo_steps_ms(model: Participant, n: int, start_pos: int, budget: float = SOLO_BUDGET,
                  tokens: int = 1) -> float:
    """Median ms of one step of ``tokens`` tokens (1: a decode step; more: a prefill) of this
    rank's slices, without communication: ``n`` steps, or fewer (at least 3) once ``budget``
    seconds have passed. Every rank's step includes the final norm and its rows of the head
    (for the last token); the master's also the embedding."""
    if not (0 < n <= MAX_SOLO_STEPS and 0 < tokens and 0 <= start_pos
            and start_pos + (n if tokens == 1 else tokens) <= model.max_seq_len):
        raise EdgemeshError(f"bad solo measurement: {n} steps of {tokens} token(s) from position {start_pos}")
    group = model.collective
    model.collective = LocalCollective()
    steps = []
    try:
        with torch.inference_mode():
            h = torch.zeros(1, tokens, model.config.hidden_size)
            tok = torch.ones(1, tokens, dtype=torch.long)
            stop = time.perf_counter() + budget
            for i in range(n):
                pos = start_pos + (i if tokens == 1 else 0)  # a prefill starts its sequence again
                t = time.perf_counter()
                if group.rank == 0:
                    model.forward(tok, pos, last_only=True)
                else:  # the layers and this rank's head rows
                    model.head(model.run_layers(h, pos)[:, -1:])
                steps.append(time.perf_counter() - t)
                if len(steps) >= MIN_SOLO_STEPS and time.perf_counter() > stop:
                    break
    finally:
        model.collective = group
    return statistics.median(steps) * 1000


def share_per_rank(model: Participant, mine_ms: float) -> list[float]:
    """Every rank's figure, on every rank (an allreduce of a one-hot vector)."""
    group = model.collective
    vec = torch.zeros(1, 1, group.world_size)
    vec[0, 0, group.rank] = mine_ms
    return [float(v) for v in group.allreduce_sum(vec).flatten()]


def solo_compute_ms(model: Participant, n: int, start_pos: int, tokens: int = 1) -> list[float]:
    """Master: every rank's median compute in ms of a step of ``tokens`` tokens (1: decode),
    measured at the same time."""
    model.collective.broadcast_meta({"op": "solo", "n": n, "start_pos": start_pos, "tokens": tokens})
    return share_per_rank(model, solo_steps_ms(model, n, start_pos, tokens=tokens))


def follow_solo(model: Participant, meta: dict) -> None:
    """Worker: the other half of ``solo_compute_ms``."""
    n, start_pos, tokens = meta.get("n"), meta.get("start_pos"), meta.get("tokens", 1)
    if not isinstance(n, int) or not isinstance(start_pos, int) or type(tokens) is not int:
        raise EdgemeshError("bad solo measurement from the master")
    share_per_rank(model, solo_steps_ms(model, n, start_pos, tokens=tokens))
