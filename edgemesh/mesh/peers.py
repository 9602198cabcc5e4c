"""One RPC client per member we talk to, kept in step with the membership view."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from edgemesh.errors import EdgemeshError
from edgemesh.mesh.records import MemberRecord
from edgemesh.mesh.rpc import RpcClient, RpcStats
from edgemesh.transport.zmq_link import ZmqTransport


class _Peer:
    def __init__(self, endpoint: str, client: RpcClient, task: asyncio.Task[None]) -> None:
        self.endpoint = endpoint
        self.client = client
        self.task = task


class PeerSet:
    def __init__(self, transport: ZmqTransport, node_id: str, stats: RpcStats) -> None:
        self.transport = transport
        self.sender = bytes.fromhex(node_id)
        self.stats = stats
        self._peers: dict[str, _Peer] = {}

    def sync(self, records: list[MemberRecord]) -> None:
        """Connect to new members, reconnect moved ones, drop those that left."""
        wanted = {r.node_id: r for r in records if r.addresses}
        for node_id in list(self._peers):
            if node_id not in wanted or wanted[node_id].addresses[0] != self._peers[node_id].endpoint:
                self._drop(node_id)
        for node_id, r in wanted.items():
            if node_id not in self._peers:
                sock = self.transport.client(r.addresses[0], r.curve_key)
                client = RpcClient(sock, self.sender, self.stats)
                task = asyncio.ensure_future(client.run())
                self._peers[node_id] = _Peer(r.addresses[0], client, task)

    def _drop(self, node_id: str) -> None:
        peer = self._peers.pop(node_id)
        peer.task.cancel()
        self.transport.forget(peer.client.sock)

    def ids(self) -> list[str]:
        return list(self._peers)

    def get(self, node_id: str) -> RpcClient | None:
        peer = self._peers.get(node_id)
        return peer.client if peer else None

    def clients(self) -> list[RpcClient]:
        return [p.client for p in self._peers.values()]

    async def call_all(self, method: str, body: Any, timeout: float) -> dict[str, bool]:
        async def one(node_id: str, client: RpcClient) -> tuple[str, bool]:
            try:
                await client.call(method, body, timeout=timeout)
                return node_id, True
            except EdgemeshError:
                return node_id, False

        results = await asyncio.gather(*(one(n, p.client) for n, p in self._peers.items()))
        return dict(results)

    async def close(self) -> None:
        tasks = [p.task for p in self._peers.values()]
        for node_id in list(self._peers):
            self._drop(node_id)
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
