"""Authenticated point-to-point zmq CURVE links between the members of one collective group: the
previous data plane, kept for the allreduce benchmark to compare the TCP links (production) against.

Topology: every rank binds one ROUTER (a CURVE server behind a ZAP allow-list of the group's
member keys) and connects one DEALER (a CURVE client) to each *lower* rank. So each pair of
ranks shares exactly one TCP connection, and both ends know who is on the other side:

- to a lower rank p: my DEALER to p (messages from p come back on it, and only from p);
- to a higher rank q: my ROUTER with routing id q (messages from all higher ranks arrive here
  mixed, so they are sorted into per-peer inboxes).

Routing ids are claimed by the connecting side, so the join handshake checks each claim
against the key the link authenticated (ZAP ``User-Id``); a ROUTER keeps the first connection
for an id, so a verified id cannot be taken over later.

Everything is blocking and runs on the caller's thread (the compute thread). Waits are sliced
(``SLICE_MS``) so a dead peer shows up as ``PeerLost`` (socket monitor saw the connection drop)
or ``CollectiveTimeout`` (deadline) instead of a hang.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Sequence

import zmq
import zmq.auth.thread
from zmq.utils.monitor import recv_monitor_message

from edgemesh.collective.errors import CollectiveError, CollectiveTimeout, PeerLost
from edgemesh.collective.members import CurveKeys, Peer, peers_by_rank
from edgemesh.errors import AuthError, ProtocolError
from edgemesh.transport.endpoint import parse_endpoint, tcp_endpoint
from edgemesh.wire.envelope import Envelope, Kind, decode_message, encode_envelope

ZAP_DOMAIN = b"edgemesh.collective"
SLICE_MS = 50  # how often a blocked wait looks at connection events and the deadline
HEARTBEAT_IVL_MS = 1000  # zmq heartbeats find peers that vanish without closing TCP (power loss)
HEARTBEAT_TIMEOUT_MS = 5000
HWM = 10_000  # messages; a ring or chunked star queues a few per peer, never near this
DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024  # largest frame accepted (ZMQ_MAXMSGSIZE), as tcp_links

_HELLO = "coll.hello"
_WELCOME = "coll.welcome"
_PING = "coll.ping"  # probe to find which member dropped; receivers discard it
_PING_FRAME = encode_envelope(Envelope(Kind.NOTIFY, _PING, 0, b""))
_ABORT = "coll.abort"  # "I failed, the group is over": lets the others fail now, not at their deadline
_ABORT_PREFIX = encode_envelope(Envelope(Kind.NOTIFY, _ABORT, 0, b""))[:14]  # through the method name


class _AllowList:
    """ZAP credentials provider: only the group's member keys may connect."""

    def __init__(self, keys: set[bytes]) -> None:
        self._keys = frozenset(keys)
        self._lock = threading.Lock()  # called from the authenticator thread
        self._refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self._keys:
            return True
        with self._lock:
            self._refused += 1
        return False

    @property
    def refused(self) -> int:
        with self._lock:
            return self._refused


class PeerLinks:
    """One rank's sockets to all other ranks. Create with ``bind``, then ``join``."""

    retains_frames = True  # zmq sends large frames later, from its I/O thread
    buffers = None  # zmq allocates received frames itself

    def __init__(self, ctx: zmq.Context, router: zmq.Socket, endpoint: str, keys: CurveKeys | None,
                 auth: zmq.auth.thread.ThreadAuthenticator | None, allow: _AllowList | None,
                 linger_ms: int, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self._ctx = ctx
        self._router = router
        self.endpoint = endpoint
        self._keys = keys
        self._auth = auth
        self._allow = allow
        self._linger_ms = linger_ms
        self._max_message = max_message
        self._router_mon = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.rank = -1
        self.world_size = 0
        self._dealers: dict[int, zmq.Socket] = {}
        self._dealer_mons: dict[int, zmq.Socket] = {}
        self._ids: dict[int, bytes] = {}  # higher rank → its routing id on my ROUTER
        self._rank_of_id: dict[bytes, int] = {}
        self._inbox: dict[int, deque[list[Any]]] = {}
        self._lost: set[int] = set()
        self._closed = False
        # Application bytes (all frames of data-plane messages) this rank sent and received:
        # what `bench generate` reports as bytes on the wire per token.
        self.bytes_sent = 0
        self.bytes_received = 0

    # ----------------------------------------------------------------- construction

    @classmethod
    def bind(cls, endpoint: str, keys: CurveKeys | None, member_keys: Sequence[bytes] = (), *,
             plain: bool = False, linger_ms: int = 1000, io_threads: int = 1,
             max_message: int = DEFAULT_MAX_MESSAGE) -> PeerLinks:
        """Bind this rank's ROUTER. ``member_keys``: public keys allowed to connect (all ranks').

        The allow-list is installed *before* the bind, so no connection is ever accepted
        without it (CURVE without a ZAP handler accepts anyone who knows our public key).
        ``plain=True`` turns off encryption and authentication: benchmarks only.
        ``endpoint`` may use port 0 (or ``*``) to take a free port; read ``.endpoint``.
        ``io_threads``: zmq I/O threads, which do the CURVE encryption. Each connection is
        served by one of them, so a hub with spare cores can decrypt several workers at once.
        ``max_message``: the largest frame any peer may send (a larger one drops its connection
        before it is buffered); also bounds what an unauthenticated handshake can make us hold.
        """
        if not plain and keys is None:
            raise ValueError("a CURVE group needs this rank's key pair (or plain=True for benchmarks)")
        ctx = zmq.Context(io_threads=io_threads)
        auth: zmq.auth.thread.ThreadAuthenticator | None = None
        allow: _AllowList | None = None
        router: zmq.Socket | None = None
        try:
            if not plain:
                assert keys is not None
                allow = _AllowList({keys.public, *member_keys})
                auth = zmq.auth.thread.ThreadAuthenticator(ctx)
                auth.start()
                auth.configure_curve_callback(domain=ZAP_DOMAIN.decode(), credentials_provider=allow)
            router = ctx.socket(zmq.ROUTER)
            _common_options(router, linger_ms, max_message)
            # A send to a peer whose connection is gone must fail (EHOSTUNREACH), not vanish.
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if not plain:
                assert keys is not None
                router.curve_server = True
                router.curve_publickey = keys.public
                router.curve_secretkey = keys.secret
                router.zap_domain = ZAP_DOMAIN
                # Refuse (rather than accept) if the ZAP handler were ever missing.
                router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            host, port = parse_endpoint(endpoint)
            router.bind(tcp_endpoint(host, "*") if port == 0 else endpoint)
            bound = router.getsockopt_string(zmq.LAST_ENDPOINT)
            return cls(ctx, router, bound, keys, auth, allow, linger_ms, max_message)
        except BaseException:
            if router is not None:
                router.close(0)
            if auth is not None:
                auth.stop()
            ctx.term()
            raise

    @property
    def plain(self) -> bool:
        return self._keys is None

    @property
    def refused_connections(self) -> int:
        """How many connection attempts the allow-list refused (unknown CURVE keys)."""
        return self._allow.refused if self._allow is not None else 0

    def join(self, rank: int, world_size: int, peers: Sequence[Peer], timeout: float) -> None:
        """Connect to lower ranks, accept higher ranks, verify every claimed rank; or raise."""
        by_rank = peers_by_rank(rank, world_size, peers, self.plain)
        self.rank, self.world_size = rank, world_size
        my_id = str(rank).encode()
        for p in range(rank):
            peer = by_rank[p]
            d = self._ctx.socket(zmq.DEALER)
            _common_options(d, self._linger_ms, self._max_message)
            d.routing_id = my_id
            if not self.plain:
                assert self._keys is not None and peer.public_key is not None
                d.curve_serverkey = peer.public_key  # we authenticate the server too
                d.curve_publickey = self._keys.public
                d.curve_secretkey = self._keys.secret
            self._dealer_mons[p] = d.get_monitor_socket(
                zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            d.connect(peer.endpoint)
            self._dealers[p] = d
            d.send(encode_envelope(Envelope(Kind.REQUEST, _HELLO, 1, my_id, {"rank": rank, "world": world_size})))
        for q in range(rank + 1, world_size):
            self._inbox[q] = deque()
        self._handshake(by_rank, timeout)

    def _handshake(self, by_rank: dict[int, Peer], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        want_hello = set(range(self.rank + 1, self.world_size))
        want_welcome = set(range(self.rank))
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        for p, d in self._dealers.items():
            poller.register(d, zmq.POLLIN)
            poller.register(self._dealer_mons[p], zmq.POLLIN)
        mon_rank = {id(m): p for p, m in self._dealer_mons.items()}
        while want_hello or want_welcome:
            left = deadline - time.monotonic()
            if left <= 0:
                waiting = tuple(sorted(want_hello | want_welcome))
                raise CollectiveTimeout(
                    f"rank {self.rank}: group did not form within {timeout:.1f}s; no answer from "
                    f"ranks {list(waiting)} (not started, wrong endpoint, or a firewall)", waiting)
            for sock, _ in poller.poll(min(int(left * 1000) + 1, 200)):
                if sock is self._router:
                    frames = self._router.recv_multipart(copy=False)
                    self._accept_hello(frames, by_rank, want_hello)
                elif id(sock) in mon_rank:
                    p = mon_rank[id(sock)]
                    event = recv_monitor_message(sock)["event"]
                    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                        raise AuthError(f"rank {p} at {by_rank[p].endpoint} refused our key "
                                        f"(it is not in that rank's member list)")
                    if event != zmq.EVENT_DISCONNECTED:
                        raise AuthError(f"CURVE handshake with rank {p} at {by_rank[p].endpoint} failed "
                                        f"(wrong server key, or the peer does not speak CURVE)")
                    # A disconnect before the welcome: the peer may restart its socket; wait on.
                else:
                    p = next(r for r, d in self._dealers.items() if d is sock)
                    env, _ = decode_message(sock.recv_multipart(copy=False))
                    if env.method != _WELCOME:
                        raise ProtocolError(f"rank {p} sent {env.method!r} before welcoming us")
                    want_welcome.discard(p)
                    # Data from p may follow at once: leave it on the socket for recv().
                    poller.unregister(sock)

    def _accept_hello(self, frames: list[Any], by_rank: dict[int, Peer], want: set[int]) -> None:
        ident = frames[0].bytes
        known = self._rank_of_id.get(ident)
        if known is not None:
            # That rank already finished its join and started the first collective.
            self._inbox[known].append(frames[1:])
            return
        env, _ = decode_message(frames[1:])
        if env.method != _HELLO or not isinstance(env.body, dict):
            raise ProtocolError(f"expected a hello, got {env.method!r}")
        claimed = env.body.get("rank")
        if not isinstance(claimed, int) or claimed not in want or ident != str(claimed).encode():
            raise ProtocolError(f"hello from an unexpected rank {claimed!r} (routing id {ident!r})")
        if env.body.get("world") != self.world_size:
            raise ProtocolError(f"rank {claimed} thinks the group has {env.body.get('world')} members, "
                                f"we have {self.world_size}")
        if not self.plain:
            user = frames[1].get("User-Id")
            expected = by_rank[claimed].public_key
            assert expected is not None
            if user.encode() != expected:
                raise AuthError(f"a member key claimed rank {claimed}, but that is not rank {claimed}'s key")
        self._ids[claimed] = ident
        self._rank_of_id[ident] = claimed
        want.discard(claimed)
        self._router.send_multipart([ident, encode_envelope(
            Envelope(Kind.REPLY, _WELCOME, 1, str(self.rank).encode()))])

    # ----------------------------------------------------------------- data plane

    def send(self, peer: int, frames: Sequence[Any]) -> None:
        """Queue a multipart message to ``peer`` (large frames are not copied)."""
        self.bytes_sent += sum(_frame_len(f) for f in frames)
        try:
            if peer < self.rank:
                self._dealers[peer].send_multipart(frames, copy=False)
            else:
                self._router.send_multipart([self._ids[peer], *frames], copy=False)
        except zmq.Again:
            raise CollectiveTimeout(f"rank {self.rank}: send queue to rank {peer} stayed full "
                                    f"(peer not reading)", (peer,)) from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self._lost.add(peer)
                raise PeerLost(f"rank {peer} is gone (its connection closed)", peer) from None
            raise

    def recv(self, peer: int, deadline: float) -> list[Any]:
        """The next message from ``peer`` as frames (zmq.Frame, writable, zero-copy)."""
        if peer in self._lost:
            raise PeerLost(f"rank {peer} is gone (its connection closed)", peer)
        if peer < self.rank:
            sock = self._dealers[peer]
            while True:
                try:
                    frames = sock.recv_multipart(copy=False)
                except zmq.Again:
                    self._check(peer, deadline)
                    continue
                if not _is_ping(frames):
                    self._raise_if_abort(peer, frames)
                    self.bytes_received += sum(len(f) for f in frames)
                    return frames
        inbox = self._inbox[peer]
        while not inbox:
            try:
                frames = self._router.recv_multipart(copy=False)
            except zmq.Again:
                self._check(peer, deadline)
                continue
            sender = self._rank_of_id.get(frames[0].bytes)
            if sender is None or _is_ping(frames[1:]):
                continue  # not a member's data (the ROUTER only admits members; be strict anyway)
            self._raise_if_abort(sender, frames[1:])
            self._inbox[sender].append(frames[1:])
        frames = inbox.popleft()
        self.bytes_received += sum(len(f) for f in frames)
        return frames

    def abort(self, reason: str) -> None:
        """Best effort: tell every member still connected that this rank gave up on the group."""
        frame = encode_envelope(Envelope(Kind.NOTIFY, _ABORT, 0, str(self.rank).encode(),
                                         {"reason": reason[:500], "lost": sorted(self._lost)}))
        for p in range(self.world_size):
            if p == self.rank or p in self._lost:
                continue
            try:
                if p < self.rank:
                    self._dealers[p].send(frame, flags=zmq.NOBLOCK)
                elif p in self._ids:
                    self._router.send_multipart([self._ids[p], frame], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # that one is gone too, or its queue is full: it will hit its own deadline

    def _raise_if_abort(self, peer: int, frames: Sequence[Any]) -> None:
        if len(frames) != 1 or not frames[0].bytes.startswith(_ABORT_PREFIX):
            return
        env, _ = decode_message(frames)
        body = env.body if isinstance(env.body, dict) else {}
        reason = body.get("reason", "?")
        raw = body.get("lost")
        lost = tuple(r for r in raw if isinstance(r, int) and 0 <= r < self.world_size) if isinstance(raw, list) else ()
        raise PeerLost(f"rank {peer} gave up on the group: {reason}", peer, aborted=True, lost=lost)

    def _check(self, waiting_for: int, deadline: float) -> None:
        """Called when a wait slice ran out: did anyone drop, or is the deadline over?"""
        for p, mon in self._dealer_mons.items():
            while mon.poll(0):
                if recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED:
                    self._lost.add(p)
        dropped = False
        while self._router_mon.poll(0):
            recv_monitor_message(self._router_mon)
            dropped = True
        if dropped:
            # A ROUTER event does not say which connection closed, and a refused stranger
            # closes one too; probe the members to find out who (if anyone) is gone.
            for q, ident in self._ids.items():
                try:
                    self._router.send_multipart([ident, _PING_FRAME], flags=zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EHOSTUNREACH:
                        self._lost.add(q)
        if self._lost:
            # Anyone gone breaks the group, even if it is not the rank we are waiting on.
            gone = waiting_for if waiting_for in self._lost else min(self._lost)
            raise PeerLost(f"rank {self.rank}: rank {gone} is gone (its connection closed)", gone)
        if time.monotonic() >= deadline:
            raise CollectiveTimeout(f"rank {self.rank}: no data from rank {waiting_for} before the "
                                    f"deadline (peer hung or overloaded)", (waiting_for,))

    # ----------------------------------------------------------------- teardown

    def close(self, *, abandon: bool = False) -> None:
        """Close every socket and the context; stop the authenticator thread.

        Normally pending sends get ``linger_ms`` to leave (a hub closing with LINGER=0 would drop
        its last results and hang the workers). ``abandon=True`` (group broken) drops them.
        """
        if self._closed:
            return
        self._closed = True
        linger = 0 if abandon else self._linger_ms
        socks = [self._router, *self._dealers.values()]
        for s in socks:
            try:
                s.disable_monitor()
            except zmq.ZMQError:
                pass
        for m in [self._router_mon, *self._dealer_mons.values()]:
            m.close(0)
        for s in socks:
            s.close(linger)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()


def _common_options(sock: zmq.Socket, linger_ms: int, max_message: int) -> None:
    sock.linger = linger_ms
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    sock.rcvtimeo = SLICE_MS
    sock.sndtimeo = 30_000  # a full queue for this long means the peer stopped reading
    sock.sndhwm = HWM
    sock.rcvhwm = HWM
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)


def _frame_len(frame: Any) -> int:
    if isinstance(frame, (bytes, bytearray, zmq.Frame)):
        return len(frame)
    return memoryview(frame).nbytes


def _is_ping(frames: Sequence[Any]) -> bool:
    # Cheap check without decoding: pings are a single, fixed frame.
    return len(frames) == 1 and frames[0].bytes == _PING_FRAME


__all__ = ["CurveKeys", "Peer", "PeerLinks", "CollectiveError"]  # keys and peers re-exported for old callers
