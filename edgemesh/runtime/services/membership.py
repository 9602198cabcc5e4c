"""Membership: the replicated view, our own signed record, heartbeats (which also measure RTT),
gossip, link bandwidth probes, persistence of the view, LAN announcement and the join port.

It owns ``peers`` (one ``PeerLink`` per member), through which every other service reaches a
member: ``membership.peers.get(node_id).call(method, body)`` picks the path (direct or ICE).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import statistics
import time
from dataclasses import replace
from typing import Any, Awaitable, Callable

from edgemesh.errors import EdgemeshError, ProtocolError, RpcError, StateDirError
from edgemesh.mesh.failure import ALIVE, FailureDetector
from edgemesh.mesh.join import JoinService
from edgemesh.mesh.links import LinkTable
from edgemesh.mesh.paths import PathFactory
from edgemesh.mesh.peers import PeerSet
from edgemesh.mesh.profile import static_profile
from edgemesh.mesh.records import MemberRecord, admit, sign_self
from edgemesh.mesh.view import MembershipView
from edgemesh.rpc.dispatch import Call, Handler, Reply
from edgemesh.runtime.services import Task
from edgemesh.runtime.services.node import Node
from edgemesh.transport.endpoint import tcp_endpoint
from edgemesh.transport.zmq_link import MAX_FRAME
from edgemesh.wire.schema import body_map, maybe, need
from edgemesh.wire.tensor import TensorSpec

log = logging.getLogger(__name__)

RECORDS_MAX = 4096
RELAYED_PREFIXES = ("vit.",)  # member services a local process may reach through `admin.relay`


class MembershipService:
    name = "membership"

    def __init__(self, node: Node, new_path: PathFactory) -> None:
        self.node = node
        self.view = MembershipView(node.cluster)
        self.failure = FailureDetector(node.config, node.clock)
        self.links = LinkTable()
        self.peers = PeerSet(node.transport, node.node_id, node.stats, self.links, new_path, node.advertise)
        self.join_service = JoinService(node.cluster, node.key, self.view, node.clock, self._on_admit)
        self.me: MemberRecord | None = None
        self._leaving = False
        self._dirty = False

    # ---- our record ------------------------------------------------------------
    def open(self, extra_addresses: list[str], declared_profile: dict[str, Any]) -> MemberRecord:
        """Load the saved view and publish a fresh record of ourselves in it."""
        self.view.merge_wire(self.node.state.load_members())
        self.me = self._fresh_self_record(self.view.get(self.node.node_id), extra_addresses, declared_profile)
        self.view.merge([self.me])
        return self.me

    def _fresh_self_record(self, previous: MemberRecord | None, extra_addresses: list[str],
                           declared_profile: dict[str, Any]) -> MemberRecord:
        n = self.node
        version = int(time.time() * 1000)
        if previous is not None:
            version = max(version, previous.version + 1)
        record = MemberRecord(
            node_id=n.node_id, name=n.name, key=n.key.sign_public, version=version,
            status="member", addresses=(tcp_endpoint(n.advertise, n.port), *extra_addresses),
            join=(tcp_endpoint(n.advertise, n.port + 1),),
            # What psutil knows right away; the measured numbers (GFLOP/s, disk) follow.
            profile={**(previous.profile if previous else {}), **static_profile(), **declared_profile},
            admitted_by=previous.admitted_by if previous else "",
            admission_sig=previous.admission_sig if previous else b"",
        )
        if previous is None or not previous.admission_sig:
            if n.node_id != n.cluster.root:
                raise StateDirError(
                    f"{n.state.path} has no admission record for this node; join again with `edgemesh join TOKEN`")
            record = admit(n.cluster.cluster_id, n.key, record)
        return sign_self(n.cluster.cluster_id, n.key, record)

    def update_self(self, **changes: Any) -> None:
        assert self.me is not None
        record = replace(self.me, version=max(int(time.time() * 1000), self.me.version + 1), **changes)
        self.me = sign_self(self.node.cluster.cluster_id, self.node.key, record)
        self.view.merge([self.me])
        self._dirty = True
        self._push_to_all()

    def _on_admit(self, record: MemberRecord) -> None:
        self._dirty = True
        self._push_to_all()

    def _push_to_all(self) -> None:
        body = {"records": self.view.to_wire()}
        for client in self.peers.clients():
            client.notify("gossip.push", body)

    def merge(self, items: Any) -> None:
        if not isinstance(items, list):
            raise ProtocolError("records must be a list")
        changed = self.view.merge_wire(items)
        if changed:
            self._dirty = True
            mine = self.view.get(self.node.node_id)
            if mine is not None and self.me is not None and mine.version > self.me.version and not self._leaving:
                # Someone holds a newer record of us (e.g. we restarted from an old cache):
                # re-assert ourselves with an even newer version.
                self.me = mine
                self.update_self(status="member")

    def persist(self) -> None:
        try:
            self.node.state.save_members(self.view.to_wire())
            self._dirty = False
        except OSError as exc:
            log.error("could not save the membership view: %s", exc)

    # ---- who is who ------------------------------------------------------------
    def authorize(self, peer_key: bytes, method: str) -> bool:
        record = self.view.node_for_curve_key(peer_key)
        if record is not None:
            self.failure.heard(record.node_id)
        if method.startswith("admin."):
            return peer_key == self.node.key.curve_public
        return record is not None

    def member_key(self, node_id: str) -> bytes | None:
        r = self.view.get(node_id)
        return r.key if r is not None and r.status == "member" else None

    def node_for_curve(self, curve_key: bytes) -> str | None:
        r = self.view.node_for_curve_key(curve_key)
        return r.node_id if r is not None and r.status == "member" else None

    def members_json(self) -> list[dict[str, Any]]:
        members = []
        for r in sorted(self.view.members(), key=lambda r: (r.name, r.node_id)):
            me = r.node_id == self.node.node_id
            members.append({
                "id": r.node_id, "name": r.name,
                "state": ALIVE if me else self.failure.state(r.node_id),
                "self": me, "addresses": list(r.addresses), "join": list(r.join), "key": r.key.hex(),
                "profile": r.profile,
                "links": {} if me else self.links.to_json(r.node_id),
            })
        return members

    def alive_peers(self) -> list[str]:
        """Ids of the alive members other than this node."""
        return [n for n in self.peers.ids() if self.failure.state(n) == ALIVE]

    def caller(self, node_id: str) -> Callable[[str, Any, float], Awaitable[Any]] | None:
        """An async (method, body, timeout) -> reply body for ``node_id``, over whatever path
        the pair has; None when there is no link to it."""
        if self.peers.get(node_id) is None:
            return None

        async def call(method: str, body: Any, timeout: float) -> Any:
            client = self.peers.get(node_id)
            if client is None:
                raise RpcError(f"no link to {node_id}", "unreachable")
            reply, _ = await client.call(method, body, timeout=timeout)
            return reply

        return call

    def sync_peers(self) -> None:
        self.peers.sync([r for r in self.view.members() if r.node_id != self.node.node_id])
        for r in self.view.records.values():
            if r.status != "member":
                self.failure.forget(r.node_id)
                self.links.forget(r.node_id)

    async def refresh_view_via(self, node_id: str) -> None:
        """Pull the view from ``node_id`` (e.g. a signal came from someone we do not know yet)."""
        client = self.peers.get(node_id)
        if client is None:
            return
        try:
            body, _ = await client.call("gossip.sync", {"records": self.view.to_wire()}, timeout=2.0)
            self.merge(need(body_map(body), "records", list, max_len=RECORDS_MAX))
        except EdgemeshError as exc:
            log.debug("view refresh via %s failed: %s", node_id, exc)
        self.sync_peers()

    # ---- the Service face ------------------------------------------------------
    def handlers(self) -> dict[str, Handler]:
        return {
            "ping": self._rpc_ping,
            "gossip.sync": self._rpc_gossip_sync,
            "gossip.push": self._rpc_gossip_push,
            "link.probe": self._rpc_link_probe,
            "link.digest": self._rpc_link_digest,
            "admin.link_test": self._rpc_admin_link_test,
            "admin.leave": self._rpc_admin_leave,
            "admin.relay": self._rpc_admin_relay,
        }

    def join_handlers(self) -> dict[str, Handler]:
        """For the join port (any key may call it; only these two methods)."""
        async def challenge(call: Call) -> Any:
            return self.join_service.challenge(call.peer_key, call.body, call.source)

        async def register(call: Call) -> Any:
            return self.join_service.register(call.peer_key, call.body)

        return {"join.challenge": challenge, "join.register": register}

    def tasks(self) -> list[Task]:
        tasks: list[Task] = [self._heartbeat_loop, self._gossip_loop, self._link_probe_loop, self._persist_loop]
        if self.node.config.mdns:
            tasks.append(self._announce)
        return tasks

    async def close(self) -> None:
        await self.peers.close()
        self.persist()

    # ---- handlers --------------------------------------------------------------
    async def _rpc_ping(self, call: Call) -> Any:
        assert self.me is not None
        return {"v": self.me.version}

    async def _rpc_gossip_sync(self, call: Call) -> Any:
        self.merge(need(body_map(call.body), "records", list, max_len=RECORDS_MAX))
        return {"records": self.view.to_wire()}

    async def _rpc_gossip_push(self, call: Call) -> Any:
        self.merge(need(body_map(call.body), "records", list, max_len=RECORDS_MAX))

    async def _rpc_link_probe(self, call: Call) -> Any:
        return {"bytes": sum(spec.nbytes for spec, _ in call.tensors)}

    async def _rpc_link_digest(self, call: Call) -> Any:
        return {"sha256": [hashlib.sha256(view).digest() for _, view in call.tensors]}

    async def _rpc_admin_link_test(self, call: Call) -> Any:
        """RTT (median of pings) and one transfer of ``bytes`` random bytes to ``node``, checked
        end to end by digest, over whatever path the link uses now."""
        body = body_map(call.body)
        node = need(body, "node", str, max_len=64)
        nbytes = min(max(need(body, "bytes", int), 1), MAX_FRAME["mesh"])  # the peer's mesh port takes no more
        client = self.peers.get(node)
        if client is None:
            raise RpcError(f"{node} is not a peer of this node", "unknown_peer")
        # One deadline for the whole test, each call getting what is left of it: a call caught by
        # a path failing under it is re-sent once the link has fallen back (several seconds), so a
        # short per-ping timeout would give up first.
        deadline = time.monotonic() + maybe(body, "timeout", float, 60.0)
        path = self.links.path(node)
        rtts = []
        for _ in range(maybe(body, "pings", int, 10)):
            start = time.perf_counter()
            await client.call("ping", {}, timeout=max(deadline - time.monotonic(), 0.001))
            rtts.append((time.perf_counter() - start) * 1000)
        payload = os.urandom(nbytes)
        start = time.perf_counter()
        reply, _ = await client.call("link.digest", {}, tensors=[(TensorSpec("uint8", (nbytes,)), payload)],
                                     timeout=max(deadline - time.monotonic(), 0.001))
        seconds = time.perf_counter() - start
        digests = need(body_map(reply), "sha256", list)
        return {"node": node, "path": path, "path_after": self.links.path(node), "bytes": nbytes,
                "seconds": seconds, "mbytes_per_s": nbytes / seconds / 1e6,
                "rtt_ms": statistics.median(rtts) if rtts else None,
                "intact": digests == [hashlib.sha256(payload).digest()]}

    async def _rpc_admin_leave(self, call: Call) -> Any:
        # The last member leaving dissolves the cluster: then there is nobody to tell.
        self._leaving = True
        self.update_self(status="left")
        # Make sure the others have heard before we go: one synchronous round of pushes.
        acks = await self.peers.call_all("gossip.sync", {"records": self.view.to_wire()}, timeout=2.0)
        asyncio.get_running_loop().call_later(0.05, self.node.stop)
        return {"left": True, "told": sum(1 for ok in acks.values() if ok)}

    async def _rpc_admin_relay(self, call: Call) -> Any:
        """This node's own processes (a ViT launch) call a member's service through the path the
        daemon has to it — LAN, direct, punched or relayed — which they cannot open themselves."""
        body = body_map(call.body)
        node, method = need(body, "node", str, max_len=64), need(body, "method", str, max_len=64)
        if not method.startswith(RELAYED_PREFIXES):
            raise ProtocolError(f"{method} cannot be relayed")
        client = self.peers.get(node)
        if client is None:
            raise RpcError(f"{node} is not a peer of this node", "unknown_peer")
        reply, tensors = await client.call(method, body.get("body"), tensors=call.tensors,
                                           timeout=min(max(maybe(body, "timeout", float, 30.0), 0.1), 600.0))
        return Reply(reply, [(spec, bytes(view)) for spec, view in tensors])

    # ---- tasks -----------------------------------------------------------------
    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._dirty:
                self.persist()

    async def _heartbeat_loop(self) -> None:
        config = self.node.config
        while True:
            self.sync_peers()
            timeout = max(config.heartbeat_interval * 2, 0.5)

            async def ping(node_id: str) -> None:
                client = self.peers.get(node_id)
                if client is None or self.me is None:
                    return
                start = time.perf_counter()
                try:
                    await client.call("ping", {"v": self.me.version}, timeout=timeout)
                except RpcError:
                    return
                self.failure.heard(node_id)
                self.links.rtt(node_id, (time.perf_counter() - start) * 1000)

            await asyncio.gather(*(ping(n) for n in self.peers.ids()))
            await asyncio.sleep(config.heartbeat_interval)

    async def _gossip_loop(self) -> None:
        config = self.node.config
        while True:
            await asyncio.sleep(config.gossip_interval * (0.75 + random.random() / 2))
            candidates = [n for n in self.peers.ids() if self.failure.state(n) == ALIVE] or self.peers.ids()
            if not candidates:
                continue
            client = self.peers.get(random.choice(candidates))
            if client is None:
                continue
            try:
                body, _ = await client.call("gossip.sync", {"records": self.view.to_wire()}, timeout=config.rpc_timeout)
                self.merge(need(body_map(body), "records", list, max_len=RECORDS_MAX))
            except EdgemeshError as exc:
                log.debug("gossip failed: %s", exc)

    async def _link_probe_loop(self) -> None:
        config = self.node.config
        payload = bytes(config.link_probe_bytes)
        spec = TensorSpec("uint8", (len(payload),))
        while True:
            await asyncio.sleep(1.0)
            for node_id in self.peers.ids():
                if self.failure.state(node_id) != ALIVE or not self.links.needs_probe(node_id, config.link_probe_interval):
                    continue
                client = self.peers.get(node_id)
                if client is None:
                    continue
                try:
                    start = time.perf_counter()
                    await client.call("link.probe", {}, timeout=10.0)
                    empty = time.perf_counter() - start
                    start = time.perf_counter()
                    await client.call("link.probe", {}, tensors=[(spec, payload)], timeout=10.0)
                    full = time.perf_counter() - start
                except EdgemeshError:
                    continue
                self.links.bandwidth(node_id, len(payload), full, empty)

    async def _announce(self) -> None:
        from edgemesh.mesh.discovery import announce

        n = self.node
        await announce(n.cluster.cluster_id, n.key, n.name, n.advertise, n.port + 1)
