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
import secrets
import statistics
import time
from dataclasses import replace
from typing import Any, Awaitable, Callable

from edgemesh.errors import AuthError, EdgemeshError, ProtocolError, RpcError, StateDirError
from edgemesh.mesh.failure import ALIVE, FailureDetector
from edgemesh.mesh.join import JoinService
from edgemesh.mesh.links import LinkTable
from edgemesh.mesh.paths import PathFactory
from edgemesh.mesh.peers import PeerSet
from edgemesh.mesh.profile import static_profile
from edgemesh.mesh.records import MemberRecord, admit, sign_self
from edgemesh.mesh.revocation import Removal, SecretRotation, check_rotation, sign_removal, sign_rotation
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
ACK_TIMEOUT = 2.0  # s: how long `remove` / `token --rotate` wait for each member to acknowledge
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
        # Called with each newly removed member's record (the daemon stops the jobs it started).
        self.on_removed: list[Callable[[MemberRecord], Awaitable[Any]]] = []
        self._removal_tasks: set[asyncio.Task[Any]] = set()
        self._leaving = False
        self._dirty = False

    # ---- our record ------------------------------------------------------------
    def open(self, extra_addresses: list[str], declared_profile: dict[str, Any]) -> MemberRecord:
        """Load the saved view and publish a fresh record of ourselves in it (refused by our own
        view, and everyone's, if we were removed: then ``status`` says so)."""
        self.view.epoch_floor = self.node.cluster.secret_epoch
        self.view.merge_wire(self.node.state.load_members())
        self.view.merge_removals_wire(self.node.state.load_removals())
        self.me = self._fresh_self_record(self.view.get(self.node.node_id), extra_addresses, declared_profile)
        self.view.merge([self.me])
        return self.me

    @property
    def removed(self) -> Removal | None:
        """Our own removal, once we have heard of it."""
        return self.view.removal(self.node.node_id)

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
        body = self.gossip_body()
        for client in self.peers.clients():
            client.notify("gossip.push", body)

    def gossip_body(self) -> dict[str, Any]:
        """What members exchange: records, removals and (between members only, over encrypted
        links) the signed rotation that set the current cluster secret."""
        body: dict[str, Any] = {"records": self.view.to_wire(), "removals": self.view.removals_wire()}
        c = self.node.cluster
        if c.secret_epoch > 0 and c.rotated_by:
            body["secret"] = SecretRotation(c.secret, c.secret_epoch, c.rotated_by, c.rotation_sig).to_wire()
        return body

    def merge_body(self, body: Any) -> None:
        body = body_map(body)
        self.merge(need(body, "records", list, max_len=RECORDS_MAX))
        self.merge_removals(maybe(body, "removals", list, []))
        if "secret" in body:
            self.merge_rotation(body["secret"])

    def merge_removals(self, items: list[Any]) -> None:
        if len(items) > RECORDS_MAX:
            raise ProtocolError("too many removals")
        changed = self.view.merge_removals_wire(items)
        if changed:
            self._on_removals(changed)

    def _on_removals(self, changed: list[Removal]) -> None:
        self._dirty = True
        me = self.node.node_id
        for rm in changed:
            target = self.view.get(rm.node_id)
            log.warning("%s (%s) was removed from the cluster by %s (epoch %d)", rm.node_id,
                        target.name if target else "?", rm.by, rm.epoch)
            if target is not None and rm.node_id != me:
                for hook in self.on_removed:
                    self._spawn(hook(target))
            link = self.peers.detach(rm.node_id) if rm.node_id != me else None
            if link is not None:
                self._spawn(self._tell_removed(link, rm))
        if self.removed is not None:
            log.error("this node was removed from the cluster by %s (epoch %d): it serves and admits no one",
                      self.removed.by, self.removed.epoch)
        self.sync_peers()
        self._push_to_all()

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._removal_tasks.add(task)
        task.add_done_callback(self._removal_tasks.discard)

    async def _tell_removed(self, link: Any, rm: Removal) -> None:
        """Tell a removed node so (its status then says it), over the link we had to it, and
        close that link. Awaited, not fire-and-forget: a notify queued on a socket that is
        closed right away was lost."""
        body = {"records": [], "removals": [rm.to_wire()]}
        try:
            try:
                await link.call("gossip.push", body, timeout=ACK_TIMEOUT)
            except EdgemeshError:
                if link.direct:
                    raise
                # The link's fallback path may not be up (e.g. a node removed right after it
                # joined): try its address too.
                await link.client.call("gossip.push", body, timeout=ACK_TIMEOUT)
        except EdgemeshError as exc:
            log.info("could not tell %s it was removed: %s", rm.node_id, exc)
        finally:
            self.peers.close_link(link)

    def merge_rotation(self, obj: Any) -> None:
        """Adopt a newer cluster secret signed by a current member (old tokens stop working here)."""
        try:
            rot = SecretRotation.from_wire(obj)
            c = self.node.cluster
            if rot.order() <= (c.secret_epoch, hashlib.sha256(c.secret).digest()):
                return
            if rot.epoch > self.view.epoch + 1:
                return  # issued after removals or rotations we have not heard of yet: gossip brings it again
            signer = self.view.get(rot.by)
            if not self.view.is_current(signer):
                raise AuthError(f"secret rotation by {rot.by}, who is not a current member")
            assert signer is not None
            check_rotation(c.cluster_id, rot, signer.key)
        except (ProtocolError, AuthError) as exc:
            self.view.rejected += 1
            log.warning("refused a secret rotation: %s", exc)
            return
        self._adopt_secret(rot)

    def _adopt_secret(self, rot: SecretRotation) -> None:
        cluster = self.node.cluster.rotated(rot.secret, rot.epoch, rot.by, rot.sig)
        self.node.cluster = cluster
        self.join_service.cluster = cluster
        self.view.epoch_floor = max(self.view.epoch_floor, rot.epoch)
        try:
            self.node.state.save_cluster(cluster)
        except OSError as exc:
            log.error("could not save the rotated cluster secret: %s", exc)
        log.warning("cluster secret rotated by %s (epoch %d): tokens made before now no longer admit anyone",
                    rot.by, rot.epoch)
        self._push_to_all()

    def merge(self, items: Any) -> None:
        if not isinstance(items, list):
            raise ProtocolError("records must be a list")
        changed = self.view.merge_wire(items)
        if changed:
            self._dirty = True
            mine = self.view.get(self.node.node_id)
            if (mine is not None and self.me is not None and mine.version > self.me.version and not self._leaving
                    and self.removed is None):
                # Someone holds a newer record of us (e.g. we restarted from an old cache):
                # re-assert ourselves with an even newer version.
                self.me = mine
                self.update_self(status="member")

    def persist(self) -> None:
        try:
            self.node.state.save_members(self.view.to_wire(), self.view.removals_wire())
            self._dirty = False
        except OSError as exc:
            log.error("could not save the membership view: %s", exc)

    # ---- who is who ------------------------------------------------------------
    def admits_connection(self, curve_key: bytes) -> bool:
        """The mesh port's ZAP allow-list: current members, and this node's own CLI (also once
        the node was removed, so its `status` can say so)."""
        return curve_key == self.node.key.curve_public or self.view.is_member_curve_key(curve_key)

    def authorize(self, peer_key: bytes, method: str) -> bool:
        """Every call, on every open link (zmq or ICE), is checked against the view *now*: a
        node that left or was removed is refused on links it opened while it was a member."""
        if peer_key == self.node.key.curve_public:
            return True  # this node's own CLI
        if method.startswith("admin."):
            return False
        record = self.view.node_for_curve_key(peer_key)
        if not self.view.is_current(record):
            return False
        assert record is not None
        self.failure.heard(record.node_id)
        return True

    def member_key(self, node_id: str) -> bytes | None:
        r = self.view.get(node_id)
        return r.key if r is not None and self.view.is_current(r) else None

    def node_for_curve(self, curve_key: bytes) -> str | None:
        r = self.view.node_for_curve_key(curve_key)
        return r.node_id if r is not None and self.view.is_current(r) else None

    def removal_json(self) -> dict[str, Any]:
        """The member epoch, whether this node was removed, and who else was."""
        def one(rm: Removal) -> dict[str, Any]:
            r, by = self.view.get(rm.node_id), self.view.get(rm.by)
            return {"id": rm.node_id, "name": r.name if r else "", "epoch": rm.epoch, "by": rm.by,
                    "by_name": by.name if by else "", "left": rm.by == rm.node_id}

        mine = self.removed
        return {"epoch": self.view.epoch, "secret_epoch": self.node.cluster.secret_epoch,
                "removed": one(mine) if mine is not None else None,
                "removed_members": [one(rm) for rm in self.view.removals.values()]}

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
        """Links to the current members; a link to a node that left or was removed is closed
        (its ICE channel with it). A removed node keeps no links: nobody would serve it."""
        if self.removed is not None:
            self.peers.sync([])
        else:
            self.peers.sync([r for r in self.view.members() if r.node_id != self.node.node_id])
        for r in self.view.records.values():
            if not self.view.is_current(r):
                self.failure.forget(r.node_id)
                self.links.forget(r.node_id)

    async def refresh_view_via(self, node_id: str) -> None:
        """Pull the view from ``node_id`` (e.g. a signal came from someone we do not know yet)."""
        client = self.peers.get(node_id)
        if client is None:
            return
        try:
            body, _ = await client.call("gossip.sync", self.gossip_body(), timeout=2.0)
            self.merge_body(body)
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
            "admin.remove": self._rpc_admin_remove,
            "admin.rotate": self._rpc_admin_rotate,
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
        tasks = list(self._removal_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their clean-up closes detached links
        await self.peers.close()
        self.persist()

    # ---- handlers --------------------------------------------------------------
    async def _rpc_ping(self, call: Call) -> Any:
        assert self.me is not None
        return {"v": self.me.version}

    async def _rpc_gossip_sync(self, call: Call) -> Any:
        self.merge_body(call.body)
        return self.gossip_body()

    async def _rpc_gossip_push(self, call: Call) -> Any:
        self.merge_body(call.body)

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
        # A removal signed by ourselves: no later record of this key is accepted, and what it
        # admits from now on is void (the CLI gives the node a new key for any later join).
        self.view.merge_removals([sign_removal(self.node.cluster.cluster_id, self.node.key, self.node.node_id,
                                               self.view.epoch + 1)])
        self._dirty = True
        # Make sure the others have heard before we go: one synchronous round of pushes.
        acks = await self.peers.call_all("gossip.sync", self.gossip_body(), timeout=2.0)
        asyncio.get_running_loop().call_later(0.05, self.node.stop)
        return {"left": True, "told": sum(1 for ok in acks.values() if ok)}

    def _find_member(self, ref: str) -> MemberRecord:
        """A current member by node id, id prefix (4+ hex digits) or name."""
        ref = ref.strip()
        found = [r for r in self.view.members() if r.node_id == ref or r.name == ref
                 or (len(ref) >= 4 and r.node_id.startswith(ref.lower()))]
        if not found:
            gone = [rm for rm in self.view.removals.values()
                    if rm.node_id.startswith(ref.lower()) or getattr(self.view.get(rm.node_id), "name", None) == ref]
            if gone:
                raise RpcError(f"{ref} was already removed (epoch {gone[0].epoch})", "already_removed")
            raise RpcError(f"no current member is called {ref!r} (use a name or id from `edgemesh status`)", "unknown_node")
        if len({r.node_id for r in found}) > 1:
            raise RpcError(f"{ref!r} names several members ({', '.join(r.node_id for r in found)}); use the id",
                           "ambiguous")
        return found[0]

    async def _rpc_admin_remove(self, call: Call) -> Any:
        if self.removed is not None:
            raise RpcError("this node was itself removed from the cluster; run `remove` on a member", "forbidden")
        target = self._find_member(need(body_map(call.body), "node", str, max_len=128))
        if target.node_id == self.node.node_id:
            raise RpcError("a node cannot remove itself: use `edgemesh leave`", "forbidden")
        rm = sign_removal(self.node.cluster.cluster_id, self.node.key, target.node_id, self.view.epoch + 1)
        self.merge_removals([rm.to_wire()])
        acks = await self.peers.call_all("gossip.sync", self.gossip_body(), timeout=ACK_TIMEOUT)
        return {"removed": target.node_id, "name": target.name, "epoch": rm.epoch,
                "told": sum(1 for ok in acks.values() if ok), "members": len(acks)}

    async def _rpc_admin_rotate(self, call: Call) -> Any:
        if self.removed is not None:
            raise RpcError("this node was removed from the cluster and cannot rotate its secret", "forbidden")
        rot = sign_rotation(self.node.cluster.cluster_id, self.node.key, secrets.token_bytes(len(self.node.cluster.secret)),
                            self.view.epoch + 1)
        self._adopt_secret(rot)
        acks = await self.peers.call_all("gossip.sync", self.gossip_body(), timeout=ACK_TIMEOUT)
        return {"epoch": rot.epoch, "told": sum(1 for ok in acks.values() if ok), "members": len(acks)}

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
            if self.removed is not None:
                continue
            candidates = [n for n in self.peers.ids() if self.failure.state(n) == ALIVE] or self.peers.ids()
            if not candidates:
                continue
            client = self.peers.get(random.choice(candidates))
            if client is None:
                continue
            try:
                body, _ = await client.call("gossip.sync", self.gossip_body(), timeout=config.rpc_timeout)
                self.merge_body(body)
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
