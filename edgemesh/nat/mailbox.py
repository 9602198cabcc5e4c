"""The signalling mailbox a member keeps for others (a relay for offers and answers).

Members behind NAT cannot be called, but they can call out: each one long-polls the members it
reaches directly (``nat.poll``), and anyone can drop a signal for it there (``nat.signal``).
Signals are opaque, signed bytes: the mailbox neither reads nor vouches for them. Bounded per
recipient, in recipients and by age, so a flood costs memory only up to a cap.

Delivery is acknowledged, not drain-on-read: a poll returns every queued signal newer than the
sequence number the poller acknowledges, and only an acknowledgement removes them. A long poll
left hanging by a daemon that has just stopped would otherwise swallow the signals meant for its
restarted successor (an offer sent in that window was lost, and the pair waited out a 4 s answer
timeout before trying again).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

MAX_QUEUED = 64  # per recipient; the oldest go first
MAX_RECIPIENTS = 1024  # queues kept at once; the one written to longest ago goes first
MAX_AGE = 20.0  # seconds a signal waits for its recipient
ACTIVE_FOR = 15.0  # a recipient that polled this recently is "listening here"


class Mailbox:
    def __init__(self) -> None:
        self._queues: dict[str, deque[tuple[float, int, bytes]]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._polled: dict[str, float] = {}
        self._seq = 0

    def put(self, to: str, signal: bytes) -> bool:
        """Queue ``signal`` for ``to``; True if ``to`` is polling here (it will get it soon)."""
        self._seq += 1
        q = self._queues.pop(to, None) or deque(maxlen=MAX_QUEUED)
        self._queues[to] = q  # re-inserted: the dict's order is the order of last writes
        while len(self._queues) > MAX_RECIPIENTS:
            del self._queues[next(iter(self._queues))]
        q.append((time.monotonic(), self._seq, signal))
        ev = self._events.get(to)  # only pollers (members) get an event: puts cannot grow this
        if ev is not None:
            ev.set()
        return self.active(to)

    def active(self, node: str) -> bool:
        return time.monotonic() - self._polled.get(node, -1e9) < ACTIVE_FOR

    def _event(self, node: str) -> asyncio.Event:
        ev = self._events.get(node)
        if ev is None:
            ev = self._events[node] = asyncio.Event()
        return ev

    def _pending(self, node: str, ack: int) -> tuple[list[bytes], int]:
        """Drop what ``ack`` covers and what is too old; the rest and the newest sequence number."""
        q = self._queues.get(node)
        if not q:
            return [], ack
        cutoff = time.monotonic() - MAX_AGE
        kept = [(t, n, s) for t, n, s in q if n > ack and t >= cutoff]
        if kept:
            self._queues[node] = deque(kept, maxlen=MAX_QUEUED)
        else:
            del self._queues[node]
        return [s for _, _, s in kept], max([ack, *(n for _, n, _ in kept)])

    async def take(self, node: str, wait: float, ack: int = 0) -> tuple[list[bytes], int]:
        """Signals for ``node`` newer than ``ack`` (which the poller has seen: they are dropped),
        waiting up to ``wait`` seconds for the first, and the sequence number to acknowledge next."""
        self._polled[node] = time.monotonic()
        got, last = self._pending(node, ack)
        if got or wait <= 0:
            return got, last
        ev = self._event(node)
        ev.clear()
        try:
            await asyncio.wait_for(ev.wait(), wait)
        except asyncio.TimeoutError:
            pass
        self._polled[node] = time.monotonic()
        return self._pending(node, ack)

    def forget(self, node: str) -> None:
        self._queues.pop(node, None)
        self._events.pop(node, None)
        self._polled.pop(node, None)
