"""Failure detector: alive → suspect → dead by time since we last heard from a peer.

Any authenticated message counts as hearing from the peer, not only heartbeats. A peer we have
never heard from since we started is `suspect` until it speaks or `dead_after` passes.
"""

from __future__ import annotations

from edgemesh.clock import Clock
from edgemesh.config import MeshConfig

ALIVE, SUSPECT, DEAD = "alive", "suspect", "dead"


class FailureDetector:
    def __init__(self, config: MeshConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self._started = clock.now()
        self._last: dict[str, float] = {}

    def heard(self, node_id: str) -> None:
        self._last[node_id] = self.clock.now()

    def forget(self, node_id: str) -> None:
        self._last.pop(node_id, None)

    def silence(self, node_id: str) -> float:
        """Seconds since we last heard from ``node_id`` (or since we started)."""
        return self.clock.now() - self._last.get(node_id, self._started)

    def state(self, node_id: str) -> str:
        quiet = self.silence(node_id)
        if node_id in self._last and quiet < self.config.suspect_after:
            return ALIVE
        if quiet < self.config.dead_after:
            return SUSPECT
        return DEAD
