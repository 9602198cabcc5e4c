"""The signalling mailbox a member keeps for others (a relay for offers and answers).

Members behind NAT cannot be called, but they can call out: each one long-polls the members it
reaches directly (``nat.poll``), and anyone can drop a signal for it there (``nat.signal``).
Signals are opaque, signed bytes: the mailbox neither reads nor vouches for them. Bounded per
recipient and by age, so a flood costs memory only up to a cap.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

MAX_QUEUED = 64  # per recipient; the oldest go first
MAX_AGE = 20.0  # seconds a signal waits for its recipient
ACTIVE_FOR = 15.0  # a recipient that polled this recently is "listening here"


class Mailbox:
    def __init__(self) -> None:
        self._queues: dict[str, deque[tuple[float, bytes]]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._polled: dict[str, float] = {}

    def put(self, to: str, signal: bytes) -> bool:
        """Queue ``signal`` for ``to``; True if ``to`` is polling here (it will get it soon)."""
        q = self._queues.setdefault(to, deque(maxlen=MAX_QUEUED))
        q.append((time.monotonic(), signal))
        self._event(to).set()
        return self.active(to)

    def active(self, node: str) -> bool:
        return time.monotonic() - self._polled.get(node, -1e9) < ACTIVE_FOR

    def _event(self, node: str) -> asyncio.Event:
        ev = self._events.get(node)
        if ev is None:
            ev = self._events[node] = asyncio.Event()
        return ev

    def _drain(self, node: str) -> list[bytes]:
        q = self._queues.pop(node, None)
        self._event(node).clear()
        cutoff = time.monotonic() - MAX_AGE
        return [s for t, s in q or () if t >= cutoff]

    async def take(self, node: str, wait: float) -> list[bytes]:
        """Signals for ``node``, waiting up to ``wait`` seconds for the first one."""
        self._polled[node] = time.monotonic()
        got = self._drain(node)
        if got or wait <= 0:
            return got
        try:
            await asyncio.wait_for(self._event(node).wait(), wait)
        except asyncio.TimeoutError:
            pass
        self._polled[node] = time.monotonic()
        return self._drain(node)

    def forget(self, node: str) -> None:
        self._queues.pop(node, None)
        self._events.pop(node, None)
        self._polled.pop(node, None)
