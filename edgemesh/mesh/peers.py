"""One link per member we talk to, kept in step with the membership view.

A ``PeerLink`` looks like an ``RpcClient`` (``call``, ``notify``) but picks the path per call:
zmq straight to the member's advertised address when that works (``lan``/``direct``), else the
member's fallback path (``mesh.paths.PeerPath``: in the daemon an ICE channel, ``punched``/``relayed``,
set up by ``nat.traversal``). Whether direct
works is learned, not guessed: a short probe at first, then the fate of real calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any, Callable, Sequence

from edgemesh.errors import EdgemeshError, RpcTimeout
from edgemesh.mesh.links import LinkTable
from edgemesh.mesh.records import MemberRecord
from edgemesh.mesh.paths import PathFactory, PeerPath, no_path
from edgemesh.mesh.rpc import RpcClient
from edgemesh.rpc.dispatch import RpcStats
from edgemesh.transport.endpoint import endpoint_host
from edgemesh.transport.zmq_link import ZmqTransport
from edgemesh.wire.tensor import TensorSpec

log = logging.getLogger(__name__)

FIRST_PROBE = 0.4  # s: long enough for a TCP + CURVE handshake across a continent's worth of RTT
REPROBE_EVERY = 10.0  # s: how often a peer we reach only by ICE is tried directly again
DIRECT_FAILURES = 2  # consecutive timeouts before a direct path is given up
# Where home routers and carriers put the hosts they translate (RFC 1918, RFC 6598).
_NATTED = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"))


def same_subnet(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_network(f"{a}/24", strict=False) == ipaddress.ip_network(f"{b}/24", strict=False)
    except ValueError:
        return False


class PeerLink:
    def __init__(self, record: MemberRecord, client: RpcClient, task: asyncio.Task[None], rpc: PeerPath,
                 links: LinkTable, local_host: str, on_change: Callable[[PeerLink], None]) -> None:
        self.node_id = record.node_id
        self.record = record
        self.endpoint = record.addresses[0]
        self.client = client
        self.task = task
        self.rpc = rpc
        self.links = links
        self.direct: bool | None = None  # None: not tried yet
        self.local_host = local_host
        self.direct_path = "lan" if same_subnet(endpoint_host(self.endpoint), local_host) else "direct"
        self.ice_path: str | None = None
        self._failures = 0
        self._on_change = on_change
        self._probe: asyncio.Task[None] | None = None

    # ---- path state ----------------------------------------------------------
    @property
    def path(self) -> str | None:
        if self.direct:
            return self.direct_path
        return self.ice_path if self.rpc.connected else None

    def _set_direct(self, ok: bool) -> None:
        changed = ok != self.direct
        self.direct = ok
        self._failures = 0
        if changed:
            self._refresh()

    def set_ice(self, path: str | None) -> None:
        self.ice_path = path
        self._refresh(fresh=path is not None and not self.direct)

    def _refresh(self, fresh: bool = False) -> None:
        self.links.set_path(self.node_id, self.path, fresh=fresh)
        self._on_change(self)

    def start_probe(self) -> None:
        self._probe = asyncio.ensure_future(self._probe_loop())

    def _hopeless(self) -> bool:
        """A private address outside our subnet: behind someone's NAT, almost surely."""
        host = endpoint_host(self.endpoint)
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in _NATTED) and not same_subnet(host, self.local_host)

    async def _probe_loop(self) -> None:
        timeout = FIRST_PROBE
        if self._hopeless():
            self._set_direct(False)  # start ICE now; the probe below may still prove us wrong
        while True:
            if not self.direct:
                try:
                    await self.client.call("ping", {}, timeout=timeout)
                    self._set_direct(True)
                except EdgemeshError:
                    self._set_direct(False)
            timeout = 1.0
            await asyncio.sleep(REPROBE_EVERY if self.direct is False else 1.0)

    # ---- the RpcClient face ----------------------------------------------------
    async def call(self, method: str, body: Any = None, tensors: Sequence[tuple[TensorSpec, Any]] = (),
                   timeout: float = 3.0) -> tuple[Any, list[tuple[TensorSpec, memoryview]]]:
        if self.direct:
            try:
                result = await self.client.call(method, body, tensors, timeout=timeout)
                self._failures = 0
                return result
            except RpcTimeout:
                self._failures += 1
                if self._failures >= DIRECT_FAILURES and self.direct:
                    log.info("direct path to %s lost; falling back to ICE", self.node_id)
                    self._set_direct(False)
                raise
        if self.direct is None and not self.rpc.connected:
            # Not probed yet: try the advertised address, as before there was any other path.
            return await self.client.call(method, body, tensors, timeout=timeout)
        return await self.rpc.call(method, body, tensors, timeout=timeout)

    def notify(self, method: str, body: Any = None) -> bool:
        if self.direct or (self.direct is None and not self.rpc.connected):
            return self.client.notify(method, body)
        return self.rpc.notify(method, body)

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        self.task.cancel()
        self.rpc.close()


class PeerSet:
    def __init__(self, transport: ZmqTransport, node_id: str, stats: RpcStats, links: LinkTable | None = None,
                 new_path: PathFactory = no_path, local_host: str = "",
                 on_change: Callable[[PeerLink], None] = lambda link: None) -> None:
        self.transport = transport
        self.sender = bytes.fromhex(node_id)
        self.stats = stats
        self.links = links or LinkTable()
        self.new_path = new_path
        self.local_host = local_host
        self.on_change = on_change
        self._peers: dict[str, PeerLink] = {}

    def sync(self, records: list[MemberRecord]) -> None:
        """Connect to new members, reconnect moved ones, drop those that left."""
        wanted = {r.node_id: r for r in records if r.addresses}
        for node_id in list(self._peers):
            if node_id not in wanted or wanted[node_id].addresses[0] != self._peers[node_id].endpoint:
                self._drop(node_id)
        for node_id, r in wanted.items():
            if node_id in self._peers:
                self._peers[node_id].record = r
                continue
            sock = self.transport.client(r.addresses[0], r.curve_key)
            client = RpcClient(sock, self.sender, self.stats)
            task = asyncio.ensure_future(client.run())
            rpc = self.new_path(node_id)
            link = PeerLink(r, client, task, rpc, self.links, self.local_host, self.on_change)
            self._peers[node_id] = link
            link.start_probe()

    def _drop(self, node_id: str) -> None:
        self.close_link(self._peers.pop(node_id))

    def detach(self, node_id: str) -> PeerLink | None:
        """Take a member's link out of the set without closing it (a last message can still
        go over it); the caller closes it with ``close_link``."""
        return self._peers.pop(node_id, None)

    def close_link(self, link: PeerLink) -> None:
        link.close()
        self.transport.forget(link.client.sock)
        self.on_change(link)

    def ids(self) -> list[str]:
        return list(self._peers)

    def get(self, node_id: str) -> PeerLink | None:
        return self._peers.get(node_id)

    def clients(self) -> list[PeerLink]:
        return list(self._peers.values())

    async def call_all(self, method: str, body: Any, timeout: float) -> dict[str, bool]:
        async def one(node_id: str, link: PeerLink) -> tuple[str, bool]:
            try:
                await link.call(method, body, timeout=timeout)
                return node_id, True
            except EdgemeshError:
                return node_id, False

        results = await asyncio.gather(*(one(n, p) for n, p in self._peers.items()))
        return dict(results)

    async def close(self) -> None:
        tasks = [p.task for p in self._peers.values()]
        for node_id in list(self._peers):
            self._drop(node_id)
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
