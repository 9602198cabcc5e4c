"""The node daemon as a few services, each in its own module.

A service owns one concern of the daemon (membership, jobs, NAT traversal, coturn supervision,
the device profile) and tells the daemon what it brings through the ``Service`` protocol: its
RPC handlers (served on the mesh port and on every peer's ICE channel alike), its long-running
tasks (run in the daemon's one TaskGroup) and its clean-up. ``runtime.daemon`` only builds the
services and wires them together; see docs/architecture.md for adding one (e.g. ``vit``, ``swarm``).
"""

from __future__ import annotations

from typing import Awaitable, Callable, Protocol

from edgemesh.rpc.dispatch import Handler

Task = Callable[[], Awaitable[None]]  # a coroutine factory: the daemon calls it once, in its TaskGroup


class Service(Protocol):
    name: str  # also the prefix of its RPC methods ("jobs" serves "llm.*" for history's sake)

    def handlers(self) -> dict[str, Handler]:
        """Method name -> handler, for the mesh port and ICE channels."""
        ...

    def tasks(self) -> list[Task]:
        """What runs for the daemon's lifetime. An exception in one is logged and counted, and
        the daemon starts that task again after a pause (``runtime.daemon.supervise``): loops
        must not rely on a crash to stop anything."""
        ...

    async def close(self) -> None:
        """After every task has ended (also on a crash): release what the service holds."""
        ...
