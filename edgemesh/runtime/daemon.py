"""The node daemon: one asyncio TaskGroup owning the mesh for one state directory.

Sockets: the mesh ROUTER on ``port`` (member keys only) and the join ROUTER on ``port + 1``
(any key, join methods only). What runs is the services' (``runtime.services``): membership
(heartbeats that also measure RTT, gossip, link probes, LAN announcement, the join port), NAT
traversal (ICE channels to members we cannot reach directly; see ``edgemesh.nat``), jobs (worker
processes), the device profile, swarm rounds, ViT parts and, when configured, coturn beside this node. This module only
builds them, puts their handlers on the mesh port and every peer's ICE channel, runs their
tasks and closes them. The CLI talks to its own daemon over the mesh port with the node's own
key; methods under ``admin.`` answer only that key.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any, Callable

import psutil

from edgemesh.clock import Clock, MonotonicClock
from edgemesh.config import MeshConfig
from edgemesh.identity.statedir import StateDir
from edgemesh.mesh.rpc import RpcServer
from edgemesh.nat.channel_rpc import ChannelRpc
from edgemesh.rpc.dispatch import Call, Handler
from edgemesh.runtime.services import Service, Task
from edgemesh.runtime.services.jobs import JobsService
from edgemesh.runtime.services.membership import MembershipService
from edgemesh.runtime.services.nat import NatService
from edgemesh.runtime.services.node import Node
from edgemesh.runtime.services.profile import ProfileService
from edgemesh.runtime.services.supervision import CoturnService
from edgemesh.runtime.services.swarm import SwarmService
from edgemesh.runtime.services.vit import VitService
from edgemesh.transport.addresses import detect_host, is_wildcard
from edgemesh.transport.endpoint import tcp_endpoint
from edgemesh.transport.zmq_link import ZmqTransport

log = logging.getLogger(__name__)


class _Shutdown(Exception):
    """Raised inside the task group to stop every task."""


RESTART_FIRST_S = 1.0  # a crashed service task starts again after this, doubling while it keeps crashing
RESTART_MAX_S = 30.0


async def supervise(name: str, task: Task, on_crash: Callable[[], None] = lambda: None,
                    first: float = RESTART_FIRST_S, most: float = RESTART_MAX_S) -> None:
    """Run one service task for the daemon's lifetime. A crash is logged with its traceback,
    reported to ``on_crash`` and the task started again after ``first`` seconds, the pause
    doubling up to ``most`` while it crashes within ``most`` of each start: a bug in one
    background loop (a probe, a gossip round) must not take the node off the mesh. A task that
    returns has done its work; cancellation (the daemon stopping) passes through."""
    pause = first
    while True:
        started = time.monotonic()
        try:
            await task()
            return
        except Exception:  # noqa: BLE001 - any bug in a loop: log it, keep the daemon up
            on_crash()
            log.exception("the %s task crashed; starting it again in %g s", name, pause)
        await asyncio.sleep(pause)
        pause = first if time.monotonic() - started > most else min(pause * 2, most)


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
        key, name = state.load_identity()
        self.advertise_explicit = bool(advertise)
        self.node = Node(state=state, key=key, name=name, cluster=state.require_cluster(),
                         config=config or MeshConfig(), clock=clock or MonotonicClock(),
                         settings=state.load_settings(), host=host, port=port,
                         advertise=advertise or _advertise_host(host), transport=ZmqTransport(key), stop=self.stop)
        # One handler table for the mesh port and every peer's ICE channel; filled below, once
        # the services exist (a peer's channel is made later, when membership meets it).
        self.handlers: dict[str, Handler] = {}
        node = self.node
        self.membership = MembershipService(
            node, lambda node_id: ChannelRpc(node.sender, self.handlers, self.membership.authorize, node.stats))
        self.nat = NatService(node, self.membership)
        self.jobs = JobsService(node, self.membership.view)
        self.membership.on_removed.append(lambda record: self.jobs.stop_owned_by(record.key))
        self.profile = ProfileService(node, self.membership)
        self.coturn = CoturnService(node)
        self.swarm = SwarmService(node.state, node.node_id, self.membership.alive_peers, self.membership.caller)
        self.vit = VitService(node.state)
        # A new capability is one more service here (docs/architecture.md).
        self.services: list[Service] = [self.membership, self.nat, self.jobs, self.profile, self.coturn, self.swarm,
                                        self.vit]
        for service in self.services:
            self._register(service.name, service.handlers())
        self._register("daemon", {"status": self._rpc_status, "admin.stop": self._rpc_admin_stop})
        self._stop = asyncio.Event()
        self._started = time.time()

    def _register(self, owner: str, handlers: dict[str, Handler]) -> None:
        for method, handler in handlers.items():
            if method in self.handlers:
                raise ValueError(f"{owner} registers {method!r}, which another service already serves")
            self.handlers[method] = handler

    # ---- lifecycle -----------------------------------------------------------
    async def run(self) -> None:
        logging.getLogger("aioice").setLevel(logging.WARNING)  # one line per ICE check otherwise
        node = self.node
        me = self.membership.open(self.coturn.published_servers(), self.profile.declared())
        node.transport.start()
        try:
            mesh_sock = node.transport.server(tcp_endpoint(node.host, node.port), "mesh",
                                              self.membership.admits_connection)
            join_sock = node.transport.server(tcp_endpoint(node.host, node.port + 1), "join", lambda key: True)
            mesh_server = RpcServer(mesh_sock, node.sender, self.handlers, node.stats, self.membership.authorize)
            join_server = RpcServer(join_sock, node.sender, self.membership.join_handlers(), node.stats)
            self._write_daemon_record()
            self._install_signals()
            log.info("node %s (%s) up on %s, cluster %s", node.node_id, node.name, me.addresses[0],
                     node.cluster.cluster_id)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(mesh_server.run())
                    tg.create_task(join_server.run())
                    for service in self.services:
                        for task in service.tasks():
                            tg.create_task(supervise(f"{service.name} {getattr(task, '__name__', 'task')}", task,
                                                     self._count_crash))
                    tg.create_task(self._wait_stop())
            except* _Shutdown:
                pass
        finally:
            for service in reversed(self.services):
                try:
                    await service.close()
                except Exception:  # noqa: BLE001 — one service failing to close must not keep the others open
                    log.exception("closing the %s service failed", service.name)
            node.transport.close()
            node.state.clear_daemon()
            log.info("node %s stopped", node.node_id)

    def stop(self) -> None:
        self._stop.set()

    def _count_crash(self) -> None:
        self.node.stats.internal_errors += 1

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
        node = self.node
        proc = psutil.Process()
        control_host = ("::1" if node.host == "::" else "127.0.0.1") if is_wildcard(node.host) else node.host
        # "host" is what services of this node (job server, collective links) may bind; "advertise"
        # is the address members on other machines reach it at (see transport.addresses).
        node.state.save_daemon({
            "pid": proc.pid, "create_time": proc.create_time(), "node_id": node.node_id,
            "host": node.host, "port": node.port, "join_port": node.port + 1,
            "control": tcp_endpoint(control_host, node.port), "started": self._started,
            "advertise": node.advertise, "advertise_explicit": self.advertise_explicit,
        })

    # ---- the daemon's own methods ------------------------------------------------
    async def _rpc_admin_stop(self, call: Call) -> Any:
        asyncio.get_running_loop().call_later(0.05, self.stop)
        return {"stopping": True}

    async def _rpc_status(self, call: Call) -> Any:
        return self.status()

    def status(self) -> dict[str, Any]:
        node, m = self.node, self.membership
        stats = node.stats
        return {
            "cluster": node.cluster.cluster_id, "node": node.node_id, "name": node.name,
            "members": m.members_json(),
            "stats": {
                "received": stats.received, "protocol_errors": stats.protocol_errors,
                "internal_errors": stats.internal_errors, "refused_calls": stats.refused,
                "refused_connections": node.transport.refused_connections,
                "closed_connections": node.transport.closed_connections,
                "refused_joins": m.join_service.refused, "rejected_records": m.view.rejected,
                "refused_channels": self.nat.traversal.stats.refused_channels,
            },
            "nat": {**self.nat.traversal.stats.to_json(), "turn_pid": self.coturn.pid, "servers": self.nat.server_urls()},
            "uptime": time.time() - self._started,
            **m.removal_json(),
        }


def _advertise_host(host: str) -> str:
    return host if not is_wildcard(host) else detect_host()
