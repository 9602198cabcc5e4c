"""Authenticated, encrypted zmq links for the control plane (asyncio).

Every socket is CURVE. Servers sit behind a ZAP handler whose allow-list is a callback, so the
mesh socket admits exactly the current member keys (checked at every connection handshake) and
the join socket admits any key but serves only the join methods. CURVE without ZAP would accept
anyone who knows the server key, so a server socket cannot be made without a domain.

Every socket also caps the size of one inbound frame (``ZMQ_MAXMSGSIZE``): a peer that sends a
larger one is disconnected as soon as its length is read, before libzmq buffers it. Without the
cap a peer with any key (the join port admits all) could make the daemon hold a multi-GB frame
before the 4 MiB envelope check ran. The cap also applies to the CURVE handshake's own commands,
so even the member-only mesh port bounds what an unauthenticated connection can make it hold.

The join port admits any key, so it also caps how many connections it keeps at once
(``MAX_PEERS``): a socket monitor counts them and the ZAP handler refuses new handshakes while
the port is full. A stranger could fill the port and keep it full, so its slots are also
short-lived and shared fairly: a join connection is closed ``SLOT_SECONDS`` after it was
accepted whatever it does (a join takes two calls), and one source address holds at most
``MAX_PEERS_PER_SOURCE`` at once (more are closed as they arrive). zmq has no call to close one
peer's connection, so the monitor's descriptor is shut down underneath libzmq (``shutdown(2)``
on a duplicate, after checking it is still the connection accepted), which libzmq handles as
the peer going away.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from edgemesh.errors import ConfigError, PortInUseError
from edgemesh.identity.keys import NodeKey

log = logging.getLogger(__name__)

LINGER_MS = 500  # LINGER=0 drops the last replies of a closing socket; keep a short grace period.
KIB, MIB = 1024, 1024 * 1024
# Largest inbound frame per server domain, from what each carries (one multipart message is an
# envelope frame, at most wire.envelope.MAX_ENVELOPE_BYTES = 4 MiB, plus raw tensor frames):
MAX_FRAME = {
    "join": 64 * KIB,  # join.challenge / join.register: nonces, one signed record, a MAC (~2 KB)
    "data": 64 * KIB,  # requests to a job server: shard.get, job.ready, job.failed (<= 2000 chars)
    "mesh": 16 * MIB,  # member RPC and control: views <= 4 MiB, link probes (1 MiB), link tests (<= 16 MiB)
}
# Clients receive replies: views (<= 4 MiB envelopes) and weight chunks (runtime.job_server.CHUNK_MAX).
CLIENT_MAX_FRAME = 16 * MIB
DEFAULT_MAX_FRAME = 4 * MIB  # a domain not listed above: the envelope limit
# A connection that has not finished its CURVE handshake by then is closed (libzmq's default
# is 30 s): a LAN handshake takes milliseconds, and idle half-open connections hold descriptors.
HANDSHAKE_MS = 10_000
# Connections a server keeps at once, per domain with a limit. Joiners connect, make two calls
# and leave; `cluster up` starts at most 63 at once.
MAX_PEERS = {"join": 64}
# Join slots expire and are shared per source address (see the module doc): a joiner finishes in
# well under a second on a LAN; one address (a NAT hides several joiners behind one) gets 8.
SLOT_SECONDS = {"join": 10.0}
MAX_PEERS_PER_SOURCE = {"join": 8}
FULL_LOG_EVERY = 10.0  # seconds between "port full" warnings (a flood would log each refusal)
Allow = Callable[[bytes], bool]  # z85 CURVE public key → admitted?


@dataclass(frozen=True)
class _Slot:
    """One accepted connection of a capped server: who (address, port) and since when."""

    peer: tuple[str, int] | None
    since: float


def _peer_of(fd: int) -> tuple[str, int] | None:
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            peer = s.getpeername()
    except OSError:
        return None
    return (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None


def _close_connection(fd: int, peer: tuple[str, int] | None) -> bool:
    """Shut down the connection on ``fd`` if it is still the one from ``peer`` (the descriptor
    may have been closed and reused since); libzmq sees the peer go and cleans up."""
    if peer is None:
        return False
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            if tuple(s.getpeername()[:2]) != peer:
                return False
            s.shutdown(socket.SHUT_RDWR)
            return True
    except OSError:
        return False


class _Domains:
    """ZAP credentials provider: one allow callback per domain."""

    def __init__(self) -> None:
        self.rules: dict[str, Allow] = {}
        self.limits: dict[str, tuple[dict[int, _Slot], int]] = {}  # domain → (open connections by fd, cap)
        self.refused = 0
        self.refused_full = 0
        self.closed_slots = 0  # connections closed by the server: over a source's share, or expired
        self._full_logged = -FULL_LOG_EVERY

    def callback(self, domain: str, key: bytes) -> bool:
        allow = self.rules.get(domain)
        ok = bool(allow and allow(key))
        if not ok:
            self.refused += 1
            log.warning("refused a connection with an unknown key %s… (domain %s)", key[:8].decode(errors="replace"), domain)
            return False
        limit = self.limits.get(domain)
        if limit is not None and len(limit[0]) > limit[1]:  # the one asking is among the open ones
            self.refused += 1
            self.refused_full += 1
            now = time.monotonic()
            if now - self._full_logged >= FULL_LOG_EVERY:
                self._full_logged = now
                log.warning("the %s port holds %d connections (limit %d): refusing new ones (%d so far)",
                            domain, len(limit[0]), limit[1], self.refused_full)
            return False
        return True


class ZmqTransport:
    """Owns one zmq context, its ZAP authenticator, and every socket made through it."""

    def __init__(self, key: NodeKey) -> None:
        self.key = key
        self.ctx = zmq.asyncio.Context()
        self._domains = _Domains()
        self._auth: AsyncioAuthenticator | None = None
        self._sockets: list[zmq.asyncio.Socket] = []
        self._monitors: list[tuple[zmq.asyncio.Socket, zmq.asyncio.Socket, list[asyncio.Task[None]]]] = []

    @property
    def refused_connections(self) -> int:
        return self._domains.refused

    @property
    def closed_connections(self) -> int:
        """Connections a capped server closed itself (over a source's share, or expired)."""
        return self._domains.closed_slots

    def start(self) -> None:
        """Start the ZAP handler (needs a running event loop)."""
        self._auth = AsyncioAuthenticator(self.ctx)
        self._auth.start()
        for domain in ("mesh", "join", "data"):
            self._auth.configure_curve_callback(domain, credentials_provider=self._domains)

    def server(self, endpoint: str, domain: str, allow: Allow, max_frame: int | None = None) -> zmq.asyncio.Socket:
        """A ROUTER bound to ``endpoint`` that admits only keys ``allow`` accepts and frames of at
        most ``max_frame`` bytes (default: ``MAX_FRAME[domain]``), and at most
        ``MAX_PEERS[domain]`` connections at once where the domain has a cap."""
        if self._auth is None:
            raise RuntimeError("start() the transport before making servers")
        self._domains.rules[domain] = allow
        sock = self.ctx.socket(zmq.ROUTER)
        sock.curve_server = True
        sock.curve_secretkey = self.key.curve_secret
        sock.curve_publickey = self.key.curve_public
        sock.zap_domain = domain.encode()
        sock.linger = LINGER_MS
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame or MAX_FRAME.get(domain, DEFAULT_MAX_FRAME))
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        if endpoint.endswith(":0"):
            endpoint = endpoint[:-2] + ":*"  # zmq's spelling of "any free port"
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(f"{endpoint} is already in use; pick another port with --port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"cannot listen on {endpoint}: this machine has no such address (check --host)") from None
            raise ConfigError(f"cannot listen on {endpoint}: {exc}") from None
        self._sockets.append(sock)
        cap = MAX_PEERS.get(domain)
        if cap is not None:
            self._limit_peers(sock, domain, cap)
        return sock

    def _limit_peers(self, sock: zmq.asyncio.Socket, domain: str, cap: int) -> None:
        slots: dict[int, _Slot] = {}
        mon = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._domains.limits[domain] = (slots, cap)
        per_source = MAX_PEERS_PER_SOURCE.get(domain)
        ttl = SLOT_SECONDS.get(domain)
        loop = asyncio.get_running_loop()

        def close(fd: int, why: str) -> None:
            slot = slots.get(fd)
            if slot is not None and _close_connection(fd, slot.peer):
                self._domains.closed_slots += 1
                log.debug("closed a %s connection from %s: %s", domain, slot.peer, why)
            else:
                slots.pop(fd, None)  # gone already, or the descriptor is someone else's now

        async def watch() -> None:
            # Every accepted connection ends with DISCONNECTED (closed, refused or timed out).
            try:
                while True:
                    event = parse_monitor_message(await mon.recv_multipart())
                    fd = event["value"]
                    if event["event"] == zmq.EVENT_ACCEPTED:
                        peer = _peer_of(fd)
                        slots[fd] = _Slot(peer, time.monotonic())
                        if per_source is not None and peer is not None and \
                                sum(1 for s in slots.values() if s.peer and s.peer[0] == peer[0]) > per_source:
                            self._domains.refused += 1
                            close(fd, f"more than {per_source} connections from one address")
                    elif event["event"] == zmq.EVENT_DISCONNECTED:
                        slots.pop(fd, None)
            except (zmq.ZMQError, asyncio.CancelledError):
                pass

        async def expire() -> None:
            assert ttl is not None
            while True:
                await asyncio.sleep(min(1.0, ttl / 4))
                deadline = time.monotonic() - ttl
                for fd in [fd for fd, s in slots.items() if s.since < deadline]:
                    close(fd, f"held for more than {ttl:g} s")

        tasks = [loop.create_task(watch())] + ([loop.create_task(expire())] if ttl is not None else [])
        self._monitors.append((sock, mon, tasks))

    def open_connections(self, domain: str) -> int:
        """Connections a capped server holds now (0 for a domain without a cap)."""
        limit = self._domains.limits.get(domain)
        return len(limit[0]) if limit is not None else 0

    @staticmethod
    def bound_endpoint(sock: zmq.asyncio.Socket) -> str:
        """The endpoint a socket actually bound (after binding port 0 or *)."""
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def client(self, endpoint: str, server_curve_public: bytes, max_frame: int = CLIENT_MAX_FRAME) -> zmq.asyncio.Socket:
        """A DEALER to a server whose CURVE key we know (so we cannot be talking to an impostor);
        frames over ``max_frame`` bytes end the connection (an impostor at that address cannot
        finish CURVE, but could still send a huge handshake frame)."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.curve_serverkey = server_curve_public
        sock.curve_publickey = self.key.curve_public
        sock.curve_secretkey = self.key.curve_secret
        sock.linger = LINGER_MS
        sock.setsockopt(zmq.IMMEDIATE, 1)  # don't queue for peers we are not connected to
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
        sock.connect(endpoint)
        self._sockets.append(sock)
        return sock

    def forget(self, sock: zmq.asyncio.Socket) -> None:
        if sock in self._sockets:
            self._sockets.remove(sock)
        sock.close(LINGER_MS)

    async def aclose(self) -> None:
        """Close from inside the event loop. The ZAP handler's poll task is only *cancelled* by
        stop(); its cleanup removes the loop's reader for the ZAP socket's fd one iteration
        later. If the fd was closed and reused by a new transport's ZAP socket by then, the new
        reader is removed instead and every later CURVE handshake hangs. So: stop, let the
        cancellation run, then close."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
            for _ in range(3):
                await asyncio.sleep(0)
        self.close()

    def close(self) -> None:
        for sock, mon, tasks in self._monitors:
            for task in tasks:
                task.cancel()
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            mon.close(0)
        self._monitors.clear()
        for sock in self._sockets:
            sock.close(LINGER_MS)
        self._sockets.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.ctx.term()

