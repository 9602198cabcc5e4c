"""The link table: per peer, how we reach it and what the link measures (RTT, bandwidth).

``path`` is how *this* node's calls reach the peer: ``lan`` / ``direct`` (zmq to the advertised
address), ``punched`` (ICE through the NATs), ``relayed`` (ICE through TURN), or ``None`` while
no path works. ``since`` is when the current path came up, ``connected_at`` when the peer was
first reachable at all (join-to-connected is measured from it), ``history`` the last path
changes with their times (a restarted peer is back at the first path after its restart, even if
a better path replaces that one a moment later).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

RTT_ALPHA = 0.2  # EWMA weight of a new RTT sample
# The minimum over recent samples estimates the path's own latency: every delay on top of it
# (a busy event loop, a CPU quota) only ever adds. 20 heartbeats ≈ 10 s.
RTT_WINDOW = 20
# Bandwidth as the best of the recent probes, for the same reason: a probe that ran while the
# link carried other traffic (a model's weights) or while either end was starved only under-reads
# (lan-4 at 0.5 core: 0.7-26.6 MB/s probed on 37.5 MB/s links). 5 probes ≈ 5 minutes.
BANDWIDTH_WINDOW = 5
EARLY_PROBES = 3  # bandwidth probes made every EARLY_INTERVAL_S after a link comes up
EARLY_INTERVAL_S = 5.0
HISTORY = 8  # path changes kept per peer
PATHS = ("lan", "direct", "punched", "relayed")


@dataclass
class Link:
    path: str | None = None
    rtt_ms: float | None = None
    recent_rtt: deque[float] = field(default_factory=lambda: deque(maxlen=RTT_WINDOW))
    recent_mbps: deque[float] = field(default_factory=lambda: deque(maxlen=BANDWIDTH_WINDOW))
    since: float = 0.0
    connected_at: float | None = None
    probed_at: float = 0.0
    changes: int = 0
    history: deque[tuple[float, str | None]] = field(default_factory=lambda: deque(maxlen=HISTORY))

    @property
    def mbps(self) -> float | None:
        """The best of the recent bandwidth probes (None before the first)."""
        return max(self.recent_mbps) if self.recent_mbps else None


class LinkTable:
    def __init__(self) -> None:
        self._links: dict[str, Link] = {}

    def _get(self, node_id: str) -> Link:
        link = self._links.get(node_id)
        if link is None:
            link = self._links[node_id] = Link(since=time.time())
        return link

    def set_path(self, node_id: str, path: str | None, fresh: bool = False) -> None:
        """Record the path now in use; a new path resets RTT and bandwidth (they were another path's).
        ``fresh``: a new channel of the same type (e.g. after the peer restarted) counts as new."""
        if path is not None and path not in PATHS:
            raise ValueError(f"unknown path {path!r}")
        link = self._get(node_id)
        if link.path == path and not (fresh and path is not None):
            return
        link.path, link.since, link.changes = path, time.time(), link.changes + 1
        link.history.append((link.since, path))
        link.rtt_ms = None
        link.recent_rtt.clear()
        link.recent_mbps.clear()
        link.probed_at = 0.0
        if path is not None and link.connected_at is None:
            link.connected_at = link.since

    def path(self, node_id: str) -> str | None:
        link = self._links.get(node_id)
        return link.path if link else None

    def rtt(self, node_id: str, ms: float) -> None:
        link = self._get(node_id)
        link.rtt_ms = ms if link.rtt_ms is None else (1 - RTT_ALPHA) * link.rtt_ms + RTT_ALPHA * ms
        link.recent_rtt.append(ms)

    def bandwidth(self, node_id: str, nbytes: int, seconds: float, empty_seconds: float) -> None:
        """``seconds`` for a request carrying ``nbytes``, ``empty_seconds`` for an empty one
        just before: the difference is the transfer time. Floored at half the total, so a
        noisy empty call can only under-, never wildly over-state the bandwidth."""
        link = self._get(node_id)
        transfer = max(seconds - empty_seconds, seconds / 2, 1e-6)
        link.recent_mbps.append(round(nbytes * 8 / transfer / 1e6, 1))
        link.probed_at = time.monotonic()

    def needs_probe(self, node_id: str, interval: float) -> bool:
        """Whether to probe ``node_id``'s bandwidth now: every ``interval`` seconds, but every
        ``EARLY_INTERVAL_S`` (at most) until the link has ``EARLY_PROBES`` probes. The figure is
        the best recent probe, and the first ones are the noisiest: they run while the daemons
        start, measure their profiles and send weights (0.56–2 MB/s read for 37.5 MB/s links on
        lan-4 when a launch came a minute after start)."""
        link = self._links.get(node_id)
        if link is not None and link.path is None:
            return False
        if link is None or link.mbps is None:
            return True
        wait = interval if len(link.recent_mbps) >= EARLY_PROBES else min(interval, EARLY_INTERVAL_S)
        return time.monotonic() - link.probed_at > wait

    def forget(self, node_id: str) -> None:
        self._links.pop(node_id, None)

    def to_json(self, node_id: str) -> dict[str, Any]:
        link = self._links.get(node_id)
        if link is None:
            return {}
        rtt_min = min(link.recent_rtt) if link.recent_rtt else None
        return {"path": link.path, "rtt_ms": None if link.rtt_ms is None else round(link.rtt_ms, 3),
                "rtt_min_ms": None if rtt_min is None else round(rtt_min, 3),
                "mbps": link.mbps, "since": link.since, "connected_at": link.connected_at,
                "changes": link.changes, "history": [[t, p] for t, p in link.history]}
