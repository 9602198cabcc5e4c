"""What every service of one daemon shares: identity, settings, addresses, transport, RPC stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from edgemesh.clock import Clock
from edgemesh.config import MeshConfig
from edgemesh.identity.keys import NodeKey
from edgemesh.identity.statedir import ClusterInfo, StateDir
from edgemesh.rpc.dispatch import RpcStats
from edgemesh.transport.zmq_link import ZmqTransport


@dataclass
class Node:
    state: StateDir
    key: NodeKey
    name: str
    cluster: ClusterInfo
    config: MeshConfig
    clock: Clock
    settings: dict[str, Any]
    host: str  # where this node's sockets listen
    port: int  # mesh port; join port is port + 1
    advertise: str  # where members on other machines reach it
    transport: ZmqTransport
    stats: RpcStats = field(default_factory=RpcStats)
    stop: Callable[[], None] = lambda: None  # ends the daemon (set by the daemon)

    @property
    def node_id(self) -> str:
        return self.key.node_id

    @property
    def sender(self) -> bytes:
        return bytes.fromhex(self.key.node_id)
