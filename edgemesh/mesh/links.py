"""The link table: per peer, how we reach it and what the link measures (RTT, bandwidth)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

RTT_ALPHA = 0.2  # EWMA weight of a new RTT sample


@dataclass
class Link:
    path: str = "direct"  # lan | direct | punched | relayed
    rtt_ms: float | None = None
    mbps: float | None = None
    since: float = 0.0
    probed_at: float = 0.0


class LinkTable:
    def __init__(self) -> None:
        self._links: dict[str, Link] = {}

    def _get(self, node_id: str) -> Link:
        link = self._links.get(node_id)
        if link is None:
            link = self._links[node_id] = Link(since=time.time())
        return link

    def rtt(self, node_id: str, ms: float) -> None:
        link = self._get(node_id)
        link.rtt_ms = ms if link.rtt_ms is None else (1 - RTT_ALPHA) * link.rtt_ms + RTT_ALPHA * ms

    def bandwidth(self, node_id: str, nbytes: int, seconds: float, empty_seconds: float) -> None:
        """``seconds`` for a request carrying ``nbytes``, ``empty_seconds`` for an empty one
        just before: the difference is the transfer time. Floored at half the total, so a
        noisy empty call can only under-, never wildly over-state the bandwidth."""
        link = self._get(node_id)
        transfer = max(seconds - empty_seconds, seconds / 2, 1e-6)
        link.mbps = round(nbytes * 8 / transfer / 1e6, 1)
        link.probed_at = time.monotonic()

    def needs_probe(self, node_id: str, interval: float) -> bool:
        link = self._links.get(node_id)
        return link is None or link.mbps is None or time.monotonic() - link.probed_at > interval

    def forget(self, node_id: str) -> None:
        self._links.pop(node_id, None)

    def to_json(self, node_id: str) -> dict[str, Any]:
        link = self._links.get(node_id)
        if link is None:
            return {}
        return {"path": link.path, "rtt_ms": None if link.rtt_ms is None else round(link.rtt_ms, 3),
                "mbps": link.mbps, "since": link.since}
