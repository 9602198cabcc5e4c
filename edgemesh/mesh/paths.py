"""What the mesh needs from a second way to reach a peer, for when its address does not answer.

``mesh.peers`` calls a member straight at its advertised address when that works; otherwise it
calls through a ``PeerPath``. The mesh only defines this face: NAT traversal (``nat``) provides
the paths (``ChannelRpc`` over ICE channels) and the daemon injects the factory, so the mesh
never imports ``nat``.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from edgemesh.errors import RpcError
from edgemesh.wire.tensor import TensorSpec


class PeerPath(Protocol):
    """One peer's fallback path: callable like an ``RpcClient`` while ``connected``."""

    @property
    def connected(self) -> bool: ...

    async def call(self, method: str, body: Any = None, tensors: Sequence[tuple[TensorSpec, Any]] = (),
                   timeout: float = 3.0) -> tuple[Any, list[tuple[TensorSpec, memoryview]]]: ...

    def notify(self, method: str, body: Any = None) -> bool: ...

    def close(self) -> None: ...


PathFactory = Callable[[str], PeerPath]  # node id -> a new (not yet connected) path to it


class NoPath:
    """A peer reachable only at its address (no NAT traversal in this process)."""

    connected = False

    async def call(self, method: str, body: Any = None, tensors: Sequence[tuple[TensorSpec, Any]] = (),
                   timeout: float = 3.0) -> tuple[Any, list[tuple[TensorSpec, memoryview]]]:
        raise RpcError(f"{method}: no path to this peer", "closed")

    def notify(self, method: str, body: Any = None) -> bool:
        return False

    def close(self) -> None:
        pass


def no_path(node_id: str) -> PeerPath:
    return NoPath()
