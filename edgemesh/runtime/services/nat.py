"""NAT traversal: ICE channels to the members we cannot reach at their address (``nat.traversal``),
the signalling mailbox other members use through us (``nat.signal``, ``nat.poll``), and the
STUN/TURN servers to use (settings, then those members publish).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from edgemesh.nat.servers import IceServer, is_server_url, servers_from
from edgemesh.nat.traversal import Traversal
from edgemesh.nat.turn import turn_secret
from edgemesh.rpc.dispatch import Handler
from edgemesh.runtime.services import Task
from edgemesh.runtime.services.membership import MembershipService
from edgemesh.runtime.services.node import Node

log = logging.getLogger(__name__)


class NatService:
    name = "nat"

    def __init__(self, node: Node, membership: MembershipService) -> None:
        self.node = node
        self.membership = membership
        self.traversal = Traversal(
            node.key, node.cluster.cluster_id, membership.peers, membership.member_key, membership.node_for_curve,
            self.ice_servers, turn_secret(node.cluster.secret), membership.refresh_view_via)

    def ice_servers(self) -> tuple[IceServer | None, IceServer | None]:
        settings = self.node.settings
        local = [*settings.get("stun_servers", []), *settings.get("turn_servers", [])]
        published = [a for r in self.membership.view.members() for a in r.addresses if is_server_url(a)]
        return servers_from(local, published)

    def server_urls(self) -> list[str]:
        return [s.public_url for s in self.ice_servers() if s is not None]

    def handlers(self) -> dict[str, Handler]:
        return {"nat.signal": self.traversal.rpc_signal, "nat.poll": self.traversal.rpc_poll}

    def tasks(self) -> list[Task]:
        return [self._preload_ice, self.traversal.run]

    async def close(self) -> None:
        await self.traversal.close()

    async def _preload_ice(self) -> None:
        # aiortc takes ~0.5 s to import; do it off the loop now, not when the first peer needs ICE.
        try:
            await asyncio.to_thread(importlib.import_module, "aiortc")
        except ImportError as exc:
            log.error("aiortc is not installed: members behind NAT will be unreachable (%s)", exc)
