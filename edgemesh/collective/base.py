"""The collective interface that model code calls.

Model code (edgemesh.llm and every other model package) never touches sockets: it receives a ``Collective`` and
calls ``allreduce_sum`` / ``broadcast`` / ``gather``. A single-device ``LocalCollective`` turns the same
code into a plain model; in-process and zmq implementations make it distributed.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Collective(Protocol):
    """A fixed group of ``world_size`` participants; this one is ``rank`` (0 = master/hub)."""

    rank: int
    world_size: int

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in rank order (deterministic); every rank gets the sum."""
        ...

    def broadcast(self, tensor: torch.Tensor | None, root: int = 0) -> torch.Tensor:
        """Root passes a tensor, the others pass None; every rank returns the root's tensor."""
        ...

    def broadcast_meta(self, meta: dict[str, Any] | None, root: int = 0) -> dict[str, Any]:
        """Like ``broadcast`` for a small msgpack-able control dict (commands, positions)."""
        ...

    def gather(self, tensor: torch.Tensor, root: int = 0) -> list[torch.Tensor] | None:
        """Every rank passes a tensor (sizes may differ by rank); the root returns them in rank
        order, the others None. For small per-rank results, e.g. each rank's choice of token."""
        ...

    def close(self) -> None:
        ...


class LocalCollective:
    """World of one: every collective is the identity. Makes a sharded model a plain model."""

    rank = 0
    world_size = 1

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor | None, root: int = 0) -> torch.Tensor:
        if tensor is None:
            raise ValueError("the root of a broadcast must pass a tensor")
        return tensor

    def broadcast_meta(self, meta: dict[str, Any] | None, root: int = 0) -> dict[str, Any]:
        if meta is None:
            raise ValueError("the root of a broadcast must pass a dict")
        return meta

    def gather(self, tensor: torch.Tensor, root: int = 0) -> list[torch.Tensor] | None:
        return [tensor]

    def close(self) -> None:
        pass
