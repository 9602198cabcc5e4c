"""The signalling mailbox a member keeps for others (a relay for offers and answers).

Members behind NAT cannot be called, but they can call out: each one long-polls the members it
reaches directly (``nat.poll``), and anyone can drop a signal for it there (``nat.signal``).
Signals are opaque, signed bytes: the mailbox neither reads nor vouches for them. Any member
may name any recipient, made-up ones included, so the mailbox is bounded per recipient, in
recipients, in total bytes (``MAX_BYTES``) and in time: every ``put`` first drops signals older
than ``MAX_AGE`` (whether or not anyone ever polls for them), so a flood costs at most
``MAX_BYTES`` for at most ``MAX_AGE`` seconds.

Delivery is acknowledged, not drain-on-read: a poll returns every queued signal newer than the
sequence number the poller acknowledges, and only an acknowledgement removes them. A long poll
left hanging by a daemon that has just stopped would otherwise swallow the signals meant for its
restarted successor (an offer sent in that window was lost, and the pair waited out a 4 s answer
timeout before trying again).
"""

from __future__ import annotations

import asyncio
from collections import deque

from edgemesh.clock import Clock, MonotonicClock

MAX_QUEUED = 64  # per recipient; the oldest go first
MAX_RECIPIENTS = 1024  # queues kept at once; the one written to longest ago goes first
MAX_AGE = 20.0  # seconds a signal waits for its recipient
ACTIVE_FOR = 15.0  # a recipient that polled this recently is "listening here"
# Bytes of signals held at once. An offer or answer (SDP with a few candidates, signed) is 1-3 KB
# and a pair exchanges a handful per attempt: 4 MiB holds every member's in-flight signals many
# times over, where the per-recipient and recipient caps alone allowed 1024 × 64 × 16 KiB = 1 GiB.
MAX_BYTES = 4 * 1024 * 1024
ENTRY_OVERHEAD = 64  # per signal: the tuple, its timestamp and sequence number


class Mailbox:
    def __init__(self, clock: Clock | None = None, max_bytes: int = MAX_BYTES) -> None:
        self._clock = clock or MonotonicClock()
        self._queues: dict[str, deque[tuple[float, int, bytes]]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._polled: dict[str, float] = {}
        self._seq = 0
        self._max_bytes = max_bytes
        self.nbytes = 0  # what the queued signals cost, by ``_cost``

    @staticmethod
    def _cost(signal: bytes) -> int:
        return len(signal) + ENTRY_OVERHEAD

    def put(self, to: str, signal: bytes) -> bool:
        """Queue ``signal`` for ``to``; True if ``to`` is polling here (it will get it soon)."""
        now = self._clock.now()
        self._expire(now)
        self._seq += 1
        q = self._queues.pop(to, None) or deque()
        self._queues[to] = q  # re-inserted: the dict's order is the order of last writes
        while len(self._queues) > MAX_RECIPIENTS:
            self._drop_queue(next(iter(self._queues)))
        if len(q) >= MAX_QUEUED:
            self.nbytes -= self._cost(q.popleft()[2])
        q.append((now, self._seq, signal))
        self.nbytes += self._cost(signal)
        while self.nbytes > self._max_bytes:
            # Over budget: the oldest signal of the recipient written to longest ago goes first
            # (the one just queued is the newest of the newest queue: it goes last).
            oldest = next(iter(self._queues))
            oq = self._queues[oldest]
            self.nbytes -= self._cost(oq.popleft()[2])
            if not oq:
                del self._queues[oldest]
        ev = self._events.get(to)  # only pollers (members) get an event: puts cannot grow this
        if ev is not None:
            ev.set()
        return self.active(to)

    def _drop_queue(self, node: str) -> None:
        q = self._queues.pop(node, None)
        if q:
            self.nbytes -= sum(self._cost(s) for _, _, s in q)

    def _expire(self, now: float) -> None:
        """Drop the queues whose newest signal is too old. The dict is in order of last write,
        so they are at its front: this stops at the first queue still fresh (O(1) amortized)."""
        cutoff = now - MAX_AGE
        while self._queues:
            node = next(iter(self._queues))
            if self._queues[node][-1][0] >= cutoff:
                break
            self._drop_queue(node)

    def active(self, node: str) -> bool:
        return self._clock.now() - self._polled.get(node, -1e9) < ACTIVE_FOR

    def _event(self, node: str) -> asyncio.Event:
        ev = self._events.get(node)
        if ev is None:
            ev = self._events[node] = asyncio.Event()
        return ev

    def _pending(self, node: str, ack: int) -> tuple[list[bytes], int]:
        """Drop what ``ack`` covers and what is too old; the rest and the newest sequence number."""
        now = self._clock.now()
        self._expire(now)
        q = self._queues.get(node)
        if not q:
            return [], ack
        cutoff = now - MAX_AGE
        kept = [(t, n, s) for t, n, s in q if n > ack and t >= cutoff]
        self.nbytes -= sum(self._cost(s) for _, _, s in q) - sum(self._cost(s) for _, _, s in kept)
        if kept:
            q.clear()
            q.extend(kept)  # in place: the queue keeps its place in the order of writes
        else:
            del self._queues[node]
        return [s for _, _, s in kept], max([ack, *(n for _, n, _ in kept)])

    async def take(self, node: str, wait: float, ack: int = 0) -> tuple[list[bytes], int]:
        """Signals for ``node`` newer than ``ack`` (which the poller has seen: they are dropped),
        waiting up to ``wait`` seconds for the first, and the sequence number to acknowledge next."""
        self._polled[node] = self._clock.now()
        got, last = self._pending(node, ack)
        if got or wait <= 0:
            return got, last
        ev = self._event(node)
        ev.clear()
        try:
            await asyncio.wait_for(ev.wait(), wait)
        except asyncio.TimeoutError:
            pass
        self._polled[node] = self._clock.now()
        return self._pending(node, ack)

    def forget(self, node: str) -> None:
        self._drop_queue(node)
        self._events.pop(node, None)
        self._polled.pop(node, None)
