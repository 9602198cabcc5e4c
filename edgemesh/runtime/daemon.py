"""The node daemon: one asyncio TaskGroup owning the mesh for one state directory.

Sockets: the mesh ROUTER on ``port`` (member keys only) and the join ROUTER on ``port + 1``
(any key, join methods only). Tasks: the two servers, heartbeats (which also measure RTT),
gossip of the membership view, link bandwidth probes, the device profile, LAN announcement,
NAT traversal (ICE channels to members we cannot reach directly; see ``edgemesh.nat``) and,
when configured, a coturn STUN/TURN server beside this node.
The CLI talks to its own daemon over the mesh port with the node's own key; methods under
``admin.`` answer only that key.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import replace
from typing import Any

import psutil

from edgemesh.clock import Clock, MonotonicClock
from edgemesh.config import MeshConfig
from edgemesh.errors import EdgemeshError, ProtocolError, RpcError, StateDirError
from edgemesh.identity.statedir import StateDir
from edgemesh.mesh.failure import ALIVE, FailureDetector
from edgemesh.mesh.join import JoinService
from edgemesh.mesh.links import LinkTable
from edgemesh.mesh.peers import PeerSet
from edgemesh.mesh.profile import static_profile
from edgemesh.mesh.records import MemberRecord, admit, sign_self
from edgemesh.mesh.rpc import Call, RpcServer, RpcStats
from edgemesh.mesh.view import MembershipView
from edgemesh.nat.servers import IceServer, is_server_url, servers_from
from edgemesh.nat.traversal import Traversal
from edgemesh.nat.turn import TURN_PORT, coturn_argv, coturn_config, turn_secret
from edgemesh.transport.addresses import detect_host, is_wildcard
from edgemesh.transport.zmq_link import MAX_FRAME, ZmqTransport, tcp_endpoint
from edgemesh.wire.schema import body_map, maybe, need
from edgemesh.wire.tensor import TensorSpec

log = logging.getLogger(__name__)


RELAYED_PREFIXES = ("vit.",)  # member services a local process may reach through `admin.relay`


class _Shutdown(Exception):
    """Raised inside the task group to stop every task."""


class NodeDaemon:
    def __init__(
        self,
        state: StateDir,
        host: str,
        port: int,
        advertise: str | None = None,
        config: MeshConfig | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.state = state
        self.host = host
        self.port = port
        self.advertise_explicit = bool(advertise)
        self.advertise = advertise or _advertise_host(host)
        self.config = config or MeshConfig()
        self.clock = clock or MonotonicClock()
        self.key, self.name = state.load_identity()
        self.cluster = state.require_cluster()
        self.view = MembershipView(self.cluster)
        self.failure = FailureDetector(self.config, self.clock)
        self.links = LinkTable()
        self.stats = RpcStats()
        self.transport = ZmqTransport(self.key)
        self.settings = state.load_settings()
        # Channel handlers are the mesh handlers; the dict is filled once traversal exists.
        self._handlers: dict[str, Any] = {}
        self.peers = PeerSet(self.transport, self.key.node_id, self.stats, self.links, self._handlers,
                             self._authorize, self.advertise)
        self.traversal = Traversal(
            self.key, self.cluster.cluster_id, self.peers, self._member_key, self._node_for_curve,
            self._ice_servers, turn_secret(self.cluster.secret), self._refresh_view_via)
        self._handlers.update(self._mesh_handlers())
        from edgemesh.runtime.swarm_service import SwarmService

        self.swarm = SwarmService(state, self.key.node_id, self._alive_peers, self._caller)
        self._handlers.update(self.swarm.handlers())
        from edgemesh.runtime.vit_service import VitService

        self.vit = VitService(state)
        self._handlers.update(self.vit.handlers())
        self._handlers["admin.relay"] = self._rpc_admin_relay
        self.turn_pid: int | None = None
        self.join_service = JoinService(self.cluster, self.key, self.view, self.clock, self._on_admit)
        from edgemesh.runtime.workers import WorkerManager

        self.workers = WorkerManager(state, self.host, self.advertise)
        self._stop = asyncio.Event()
        self._leaving = False
        self._started = time.time()
        self._dirty = False

    # ---- lifecycle -----------------------------------------------------------
    async def run(self) -> None:
        logging.getLogger("aioice").setLevel(logging.WARNING)  # one line per ICE check otherwise
        self._load_view()
        self.me = self._fresh_self_record(self.view.get(self.key.node_id))
        self.view.merge([self.me])
        self.transport.start()
        try:
            mesh_sock = self.transport.server(tcp_endpoint(self.host, self.port), "mesh", self.view.is_member_curve_key)
            join_sock = self.transport.server(tcp_endpoint(self.host, self.port + 1), "join", lambda key: True)
            sender = bytes.fromhex(self.key.node_id)
            mesh_server = RpcServer(mesh_sock, sender, self._handlers, self.stats, self._authorize)
            join_server = RpcServer(join_sock, sender, self._join_handlers(), self.stats)
            self._write_daemon_record()
            self._install_signals()
            log.info("node %s (%s) up on %s, cluster %s", self.key.node_id, self.name,
                     self.me.addresses[0], self.cluster.cluster_id)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(mesh_server.run())
                    tg.create_task(join_server.run())
                    tg.create_task(self._heartbeat_loop())
                    tg.create_task(self._gossip_loop())
                    tg.create_task(self._link_probe_loop())
                    tg.create_task(self._profile_task())
                    tg.create_task(self._persist_loop())
                    tg.create_task(self._preload_ice())
                    tg.create_task(self.traversal.run())
                    if self.settings.get("turn") == "local":
                        tg.create_task(self._turn_server())
                    if self.config.mdns:
                        tg.create_task(self._announce())
                    tg.create_task(self._wait_stop())
            except* _Shutdown:
                pass
        finally:
            await asyncio.to_thread(self.workers.stop_all)
            await self.peers.close()
            self.transport.close()
            self._persist()
            self.state.clear_daemon()
            log.info("node %s stopped", self.key.node_id)

    def stop(self) -> None:
        self._stop.set()

    async def _wait_stop(self) -> None:
        await self._stop.wait()
        raise _Shutdown

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests): stop() is called directly

    def _write_daemon_record(self) -> None:
        proc = psutil.Process()
        control_host = ("::1" if self.host == "::" else "127.0.0.1") if is_wildcard(self.host) else self.host
        # "host" is what services of this node (job server, collective links) may bind; "advertise"
        # is the address members on other machines reach it at (see transport.addresses).
        self.state.save_daemon({
            "pid": proc.pid, "create_time": proc.create_time(), "node_id": self.key.node_id,
            "host": self.host, "port": self.port, "join_port": self.port + 1,
            "control": tcp_endpoint(control_host, self.port), "started": self._started,
            "advertise": self.advertise, "advertise_explicit": self.advertise_explicit,
        })

    # ---- own record and view -------------------------------------------------
    def _load_view(self) -> None:
        self.view.merge_wire(self.state.load_members())

    def _fresh_self_record(self, previous: MemberRecord | None) -> MemberRecord:
        version = int(time.time() * 1000)
        if previous is not None:
            version = max(version, previous.version + 1)
        record = MemberRecord(
            node_id=self.key.node_id, name=self.name, key=self.key.sign_public, version=version,
            status="member", addresses=(tcp_endpoint(self.advertise, self.port), *self._published_servers()),
            join=(tcp_endpoint(self.advertise, self.port + 1),),
            # What psutil knows right away; the measured numbers (GFLOP/s, disk) follow.
            profile={**(previous.profile if previous else {}), **static_profile(), **self._declared_profile()},
            admitted_by=previous.admitted_by if previous else "",
            admission_sig=previous.admission_sig if previous else b"",
        )
        if previous is None or not previous.admission_sig:
            if self.key.node_id != self.cluster.root:
                raise StateDirError(
                    f"{self.state.path} has no admission record for this node; join again with `edgemesh join TOKEN`")
            record = admit(self.cluster.cluster_id, self.key, record)
        return sign_self(self.cluster.cluster_id, self.key, record)

    def _declared_profile(self) -> dict[str, Any]:
        """A nodes/*.toml profile named in settings, published as profile["declared"]."""
        path = self.state.load_settings().get("profile")
        if not path:
            return {}
        from pathlib import Path

        from edgemesh.config import load_toml

        return {"declared": load_toml(Path(path))}

    def _update_self(self, **changes: Any) -> None:
        record = replace(self.me, version=max(int(time.time() * 1000), self.me.version + 1), **changes)
        self.me = sign_self(self.cluster.cluster_id, self.key, record)
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

    def _persist(self) -> None:
        try:
            self.state.save_members(self.view.to_wire())
            self._dirty = False
        except OSError as exc:
            log.error("could not save the membership view: %s", exc)

    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._dirty:
                self._persist()

    def _merge(self, items: Any) -> None:
        if not isinstance(items, list):
            from edgemesh.errors import ProtocolError

            raise ProtocolError("records must be a list")
        changed = self.view.merge_wire(items)
        if changed:
            self._dirty = True
            mine = self.view.get(self.key.node_id)
            if mine is not None and mine.version > self.me.version and not self._leaving:
                # Someone holds a newer record of us (e.g. we restarted from an old cache):
                # re-assert ourselves with an even newer version.
                self.me = mine
                self._update_self(status="member")

    # ---- handlers --------------------------------------------------------------
    def _authorize(self, peer_key: bytes, method: str) -> bool:
        record = self.view.node_for_curve_key(peer_key)
        if record is not None:
            self.failure.heard(record.node_id)
        if method.startswith("admin."):
            return peer_key == self.key.curve_public
        return record is not None

    def _mesh_handlers(self) -> dict[str, Any]:
        return {
            "ping": self._rpc_ping,
            "status": self._rpc_status,
            "gossip.sync": self._rpc_gossip_sync,
            "gossip.push": self._rpc_gossip_push,
            "link.probe": self._rpc_link_probe,
            "link.digest": self._rpc_link_digest,
            "admin.link_test": self._rpc_admin_link_test,
            "nat.signal": self.traversal.rpc_signal,
            "nat.poll": self.traversal.rpc_poll,
            "llm.start": self._rpc_llm_start,
            "llm.stop": self._rpc_llm_stop,
            "llm.jobs": self._rpc_llm_jobs,
            "admin.stop": self._rpc_admin_stop,
            "admin.leave": self._rpc_admin_leave,
        }

    def _join_handlers(self) -> dict[str, Any]:
        async def challenge(call: Call) -> Any:
            return self.join_service.challenge(call.peer_key, call.body)

        async def register(call: Call) -> Any:
            return self.join_service.register(call.peer_key, call.body)

        return {"join.challenge": challenge, "join.register": register}

    async def _rpc_ping(self, call: Call) -> Any:
        return {"v": self.me.version}

    async def _rpc_gossip_sync(self, call: Call) -> Any:
        self._merge(need(body_map(call.body), "records", list, max_len=4096))
        return {"records": self.view.to_wire()}

    async def _rpc_gossip_push(self, call: Call) -> Any:
        self._merge(need(body_map(call.body), "records", list, max_len=4096))

    async def _rpc_link_probe(self, call: Call) -> Any:
        return {"bytes": sum(spec.nbytes for spec, _ in call.tensors)}

    async def _rpc_link_digest(self, call: Call) -> Any:
        import hashlib

        return {"sha256": [hashlib.sha256(view).digest() for _, view in call.tensors]}

    async def _rpc_admin_link_test(self, call: Call) -> Any:
        """RTT (median of pings) and one transfer of ``bytes`` random bytes to ``node``, checked
        end to end by digest, over whatever path the link uses now."""
        import hashlib
        import statistics

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

    async def _rpc_llm_start(self, call: Call) -> Any:
        from edgemesh.runtime.jobs import JobSpec

        spec = JobSpec.from_wire(call.body)
        launcher = self.view.node_for_curve_key(call.peer_key)
        if launcher is None or launcher.status != "member":  # a node that left keeps its record
            raise RpcError("only a current member may start a job", "forbidden")
        if launcher.key != spec.server_key:
            raise ProtocolError("a job must be started by the member that serves its weights")
        if spec.keys[spec.rank] != self.key.sign_public:
            raise ProtocolError("this job gives my rank to another key")
        return {"pid": self.workers.start(spec)}

    async def _rpc_llm_stop(self, call: Call) -> Any:
        job = need(body_map(call.body), "job", str, max_len=64)
        owner = self.workers.owner(job)
        caller = self.view.node_for_curve_key(call.peer_key)
        if owner is not None and call.peer_key != self.key.curve_public and (caller is None or caller.key != owner):
            # Only the master that started the job (or this node's own CLI) ends it.
            raise RpcError("only the member that started a job may stop it", "forbidden")
        return {"stopped": await asyncio.to_thread(self.workers.stop, job)}

    async def _rpc_llm_jobs(self, call: Call) -> Any:
        return {"jobs": self.workers.jobs()}

    async def _rpc_admin_stop(self, call: Call) -> Any:
        asyncio.get_running_loop().call_later(0.05, self.stop)
        return {"stopping": True}

    async def _rpc_admin_leave(self, call: Call) -> Any:
        if self.key.node_id == self.cluster.root and len(self.view.members()) == 1:
            pass  # the last member leaving dissolves the cluster; nothing to tell anyone
        self._leaving = True
        self._update_self(status="left")
        # Make sure the others have heard before we go: one synchronous round of pushes.
        acks = await self.peers.call_all("gossip.sync", {"records": self.view.to_wire()}, timeout=2.0)
        asyncio.get_running_loop().call_later(0.05, self.stop)
        return {"left": True, "told": sum(1 for ok in acks.values() if ok)}

    async def _rpc_status(self, call: Call) -> Any:
        return self.status()

    def status(self) -> dict[str, Any]:
        members = []
        for r in sorted(self.view.members(), key=lambda r: (r.name, r.node_id)):
            me = r.node_id == self.key.node_id
            members.append({
                "id": r.node_id, "name": r.name,
                "state": ALIVE if me else self.failure.state(r.node_id),
                "self": me, "addresses": list(r.addresses), "join": list(r.join), "key": r.key.hex(),
                "profile": r.profile,
                "links": {} if me else self.links.to_json(r.node_id),
            })
        return {
            "cluster": self.cluster.cluster_id, "node": self.key.node_id, "name": self.name,
            "members": members,
            "stats": {
                "received": self.stats.received, "protocol_errors": self.stats.protocol_errors,
                "internal_errors": self.stats.internal_errors, "refused_calls": self.stats.refused,
                "refused_connections": self.transport.refused_connections,
                "refused_joins": self.join_service.refused, "rejected_records": self.view.rejected,
                "refused_channels": self.traversal.stats.refused_channels,
            },
            "nat": {**self.traversal.stats.to_json(), "turn_pid": self.turn_pid,
                    "servers": [s.public_url for s in self._ice_servers() if s is not None]},
            "uptime": time.time() - self._started,
        }

    # ---- periodic work -------------------------------------------------------
    def _sync_peers(self) -> None:
        self.peers.sync([r for r in self.view.members() if r.node_id != self.key.node_id])
        for r in self.view.records.values():
            if r.status != "member":
                self.failure.forget(r.node_id)
                self.links.forget(r.node_id)

    async def _heartbeat_loop(self) -> None:
        while True:
            self._sync_peers()
            timeout = max(self.config.heartbeat_interval * 2, 0.5)

            async def ping(node_id: str) -> None:
                client = self.peers.get(node_id)
                if client is None:
                    return
                start = time.perf_counter()
                try:
                    await client.call("ping", {"v": self.me.version}, timeout=timeout)
                except RpcError:
                    return
                self.failure.heard(node_id)
                self.links.rtt(node_id, (time.perf_counter() - start) * 1000)

            await asyncio.gather(*(ping(n) for n in self.peers.ids()))
            await asyncio.sleep(self.config.heartbeat_interval)

    async def _gossip_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.gossip_interval * (0.75 + random.random() / 2))
            candidates = [n for n in self.peers.ids() if self.failure.state(n) == ALIVE] or self.peers.ids()
            if not candidates:
                continue
            client = self.peers.get(random.choice(candidates))
            if client is None:
                continue
            try:
                body, _ = await client.call("gossip.sync", {"records": self.view.to_wire()}, timeout=self.config.rpc_timeout)
                self._merge(need(body_map(body), "records", list, max_len=4096))
            except EdgemeshError as exc:
                log.debug("gossip failed: %s", exc)

    async def _link_probe_loop(self) -> None:
        payload = bytes(self.config.link_probe_bytes)
        spec = TensorSpec("uint8", (len(payload),))
        while True:
            await asyncio.sleep(1.0)
            for node_id in self.peers.ids():
                if self.failure.state(node_id) != ALIVE or not self.links.needs_probe(node_id, self.config.link_probe_interval):
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

    async def _profile_task(self) -> None:
        await asyncio.sleep(self.config.profile_delay)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edgemesh.mesh.profile", str(self.state.path),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                preexec_fn=lambda: os.nice(5),
            )
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), 120)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                log.warning("device profile timed out")
                return
            import json

            profile = json.loads(out)
        except (OSError, ValueError) as exc:
            log.warning("could not measure the device profile: %s", exc)
            return
        self._update_self(profile={**self.me.profile, **profile})

    async def _announce(self) -> None:
        from edgemesh.mesh.discovery import announce

        await announce(self.cluster.cluster_id, self.key, self.name, self.advertise, self.port + 1)

    # ---- calls to peers for services (swarm) ------------------------------------
    def _alive_peers(self) -> list[str]:
        return [n for n in self.peers.ids() if self.failure.state(n) == ALIVE]

    def _caller(self, node_id: str) -> Any:
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

    async def _rpc_admin_relay(self, call: Call) -> Any:
        """This node's own processes (a ViT launch) call a member's service through the path the
        daemon has to it — LAN, direct, punched or relayed — which they cannot open themselves."""
        from edgemesh.mesh.rpc import Reply

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

    # ---- NAT traversal -------------------------------------------------------
    def _member_key(self, node_id: str) -> bytes | None:
        r = self.view.get(node_id)
        return r.key if r is not None and r.status == "member" else None

    def _node_for_curve(self, curve_key: bytes) -> str | None:
        r = self.view.node_for_curve_key(curve_key)
        return r.node_id if r is not None and r.status == "member" else None

    def _published_servers(self) -> list[str]:
        """STUN/TURN URLs this node serves (coturn beside it), published in its record."""
        if self.settings.get("turn") != "local":
            return []
        return [f"stun:{self.advertise}:{TURN_PORT}", f"turn:{self.advertise}:{TURN_PORT}"]

    def _ice_servers(self) -> tuple[IceServer | None, IceServer | None]:
        local = [*self.settings.get("stun_servers", []), *self.settings.get("turn_servers", [])]
        published = [a for r in self.view.members() for a in r.addresses if is_server_url(a)]
        return servers_from(local, published)

    async def _refresh_view_via(self, node_id: str) -> None:
        """Pull the view from ``node_id`` (a signal came from someone we do not know yet)."""
        client = self.peers.get(node_id)
        if client is None:
            return
        try:
            body, _ = await client.call("gossip.sync", {"records": self.view.to_wire()}, timeout=2.0)
            self._merge(need(body_map(body), "records", list, max_len=4096))
        except EdgemeshError as exc:
            log.debug("view refresh via %s failed: %s", node_id, exc)
        self._sync_peers()

    async def _preload_ice(self) -> None:
        # aiortc takes ~0.5 s to import; do it off the loop now, not when the first peer needs ICE.
        try:
            await asyncio.to_thread(importlib.import_module, "aiortc")
        except ImportError as exc:
            log.error("aiortc is not installed: members behind NAT will be unreachable (%s)", exc)

    async def _turn_server(self) -> None:
        """Run coturn beside this node (``init --turn``), restarting it if it dies."""
        binary = shutil.which("turnserver")
        if binary is None:
            log.error("`init --turn` asked for coturn but `turnserver` is not installed (apt-get install coturn)")
            return
        conf = self.state.file("turnserver.conf")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the TURN secret
        with os.fdopen(fd, "w") as fh:
            fh.write(coturn_config(self.advertise, turn_secret(self.cluster.secret), self.state.file("turnserver.log")))
        while True:
            proc = await asyncio.create_subprocess_exec(
                *coturn_argv(binary, conf), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            self.turn_pid = proc.pid
            try:
                code = await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), 3.0)
                    except asyncio.TimeoutError:
                        proc.kill()
                        await proc.wait()
                self.turn_pid = None
            log.warning("coturn exited with code %s; restarting it in 5 s", code)
            await asyncio.sleep(5.0)


def _advertise_host(host: str) -> str:
    return host if not is_wildcard(host) else detect_host()
