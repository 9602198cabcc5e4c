"""W participants in W threads of one process: the collective used by equivalence tests.

Every rank deposits its tensor in a slot, a barrier lets all of them see all slots, and each
rank sums the slots in rank order 0..W-1 itself — so every rank gets bit-identical results,
the same order a star hub uses. A second barrier keeps a fast rank from overwriting a slot
before the slow ones have read it. A broken barrier (a rank raised or closed) surfaces as an
error in every other rank instead of a hang.
"""

from __future__ import annotations

import threading
from typing import Any

import torch


class _Room:
    """State shared by the ranks of one thread group."""

    def __init__(self, world_size: int, timeout: float) -> None:
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self.slots: list[Any] = [None] * world_size


class ThreadCollective:
    def __init__(self, room: _Room, rank: int, world_size: int) -> None:
        self._room = room
        self.rank = rank
        self.world_size = world_size

    def _exchange(self, value: Any) -> list[Any]:
        room = self._room
        room.slots[self.rank] = value
        room.barrier.wait()
        seen = list(room.slots)
        room.barrier.wait()
        return seen

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(tensor)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total

    def broadcast(self, tensor: torch.Tensor | None, root: int = 0) -> torch.Tensor:
        if self.rank == root and tensor is None:
            raise ValueError("the root of a broadcast must pass a tensor")
        value = self._exchange(tensor if self.rank == root else None)[root]
        # Ranks must not share storage: a worker writing in place would corrupt the root.
        return value if self.rank == root else value.clone()

    def broadcast_meta(self, meta: dict[str, Any] | None, root: int = 0) -> dict[str, Any]:
        if self.rank == root and meta is None:
            raise ValueError("the root of a broadcast must pass a dict")
        value = self._exchange(dict(meta) if self.rank == root and meta is not None else None)[root]
        return dict(value)

    def gather(self, tensor: torch.Tensor, root: int = 0) -> list[torch.Tensor] | None:
        parts = self._exchange(tensor)
        # Copies: the root must not see a rank's later in-place writes.
        return [p if r == root else p.clone() for r, p in enumerate(parts)] if self.rank == root else None

    def close(self) -> None:
        # Wakes any rank still waiting so it fails instead of hanging.
        self._room.barrier.abort()


def make_thread_group(world_size: int, timeout: float = 60.0) -> list[ThreadCollective]:
    """One collective per rank; give ``group[k]`` to the thread that plays rank k."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    room = _Room(world_size, timeout)
    return [ThreadCollective(room, r, world_size) for r in range(world_size)]
