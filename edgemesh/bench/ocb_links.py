"""The collective data plane as it was before TLS 1.3 (protocol v1): kept for `edgemesh bench
allreduce` only, to measure the hand-written handshake and AES-256-OCB3 records against TLS in
one run (column ``star_ocb``). Nothing in the library uses it. Known limit, fixed in
``collective.tcp_links``: its progress loop reads *whole* records while a send is stalled, so two
ranks exchanging records larger than their socket buffers can wait on each other.

Original description:
Authenticated, encrypted point-to-point links over plain blocking TCP.

One TCP connection per pair of ranks: the higher rank dials the lower one. Everything runs on
the caller's (compute) thread — no I/O thread between the tensor and the kernel, which is what
made small allreduces over zmq cost ~4 context switches per message on a 2-core box.

Security replaces zmq CURVE (see protocols/collective.md for the byte layout):
- handshake: both sides know each other's static X25519 key from the member list; each adds a
  fresh ephemeral; session keys = HKDF-SHA256 over DH(e,e) ‖ DH(s,s) ‖ DH(e_i,s_r) ‖ DH(s_i,e_r),
  salted with a hash of the transcript; both sides prove the keys (AEAD tags over the
  transcript hash) before any data. A static key outside the member list is refused and counted.
- data: every frame is AES-256-OCB3 sealed, one key per direction, nonce = frame counter, the
  record header as associated data. A tampered, replayed, reordered or dropped frame fails its
  tag → ``LinkAuthError``; a length over ``max_message`` → ``LinkProtocolError`` before any
  allocation.

Bounded before authentication (a record's tag is checked only once all of it is here):
- ``max_message`` comes from the group's plan (``max_message_for``: the largest tensor the job
  sends), so a forged header cannot announce more than the job could legitimately send;
- the buffer for a large sealed frame grows with the bytes that actually arrive, not with what
  the header announced, and the output buffer is taken only when the ciphertext is complete;
- during join, at most ``MAX_PENDING`` unauthenticated connections are kept (the oldest that has
  not even sent a hello goes first), each for at most ``HANDSHAKE_TIMEOUT`` seconds; an
  ``accept()`` that fails for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM)
  frees the oldest pending connection, backs off and keeps serving.

Progress rule (no deadlock with blocking sockets): a send that cannot complete waits for the
socket to drain *while reading* whatever the other ranks send (into per-rank inboxes), so two
ranks sending large messages to each other (ring, chunked star) never wait on each other.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import select
import selectors
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from zmq.utils import z85

from edgemesh.collective.buffers import BufferPool
from edgemesh.collective.errors import CollectiveTimeout, LinkAuthError, LinkProtocolError, PeerLost
from edgemesh.collective.members import CurveKeys, Peer, peers_by_rank
from edgemesh.errors import AuthError, ProtocolError
from edgemesh.transport.endpoint import parse_endpoint

log = logging.getLogger(__name__)

# AES-256-OCB3 (RFC 7253) rather than AES-256-GCM: both run on AES-NI, but on our measured
# machine GHASH is GCM's bottleneck — 1 MiB seals at 5.0 GB/s with OCB3 vs 3.3 GB/s with GCM
# (idle host, cryptography 50 / OpenSSL 4.0), the same ~2 µs per small message.
AEAD = AESOCB3
MAGIC = b"EMC1"
MODE_PLAIN, MODE_SECURE = 0, 1
HELLO = struct.Struct("<4sBBHHH32s32s")  # magic, mode, 0, world, from rank, to rank, static, ephemeral
REPLY = struct.Struct("<B32s")  # status, responder's ephemeral
ACCEPT, REFUSED, WRONG_MODE = 1, 2, 3
TAG = 16  # AEAD tag; also the size of each key-confirmation message
PREFIX = struct.Struct("<IBBH")  # body bytes, record type, frame count, 0
T_DATA, T_ABORT = 0, 1
MAX_FRAMES = 16
DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024  # bytes of frames in one message (prefill of a big model fits)
MESSAGE_HEADROOM = 1024 * 1024  # on top of the largest tensor: the envelope frame and slack
MAX_PENDING = 32  # unauthenticated connections kept at once during join
HANDSHAKE_TIMEOUT = 5.0  # seconds an accepted connection may take to finish its handshake
ACCEPT_BACKOFF = (0.05, 1.0)  # first and longest pause after accept() ran out of descriptors
GROW_STEP = 1024 * 1024  # a large sealed frame's buffer starts here and doubles as bytes arrive
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
INBUF = 64 * 1024  # per-connection read buffer: a decode-size message arrives in one recv
# Messages with at most this many frame bytes are sealed as one segment (one AEAD call costs
# ~3 µs of setup, more than copying the frames together); larger ones frame by frame, no copy.
ONE_SEGMENT = 64 * 1024
SEND_TIMEOUT = 30.0  # a send that cannot progress this long means the peer stopped reading
LOST_GRACE = 0.05  # a *different* rank's connection closed: how long the awaited one may still answer
PROTOCOL_LABEL = b"edgemesh collective v1"
_NONCE = struct.Struct("<4xQ").pack
_ZERO_TAG = bytes(TAG)
_POLLIN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


def max_message_for(largest_tensor_bytes: int) -> int:
    """The ``max_message`` of a group whose largest message carries a tensor of this many bytes
    (for an LLM job: hidden size × context length × 4, the prefill's hidden state)."""
    return min(max(largest_tensor_bytes, 0) + MESSAGE_HEADROOM, DEFAULT_MAX_MESSAGE)


def _raw_key(z: bytes, what: str) -> bytes:
    try:
        raw = z85.decode(z)
    except Exception:  # noqa: BLE001 - any malformed key is the caller's configuration error
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"{what} is not a z85-encoded 32-byte key")
    return raw


def transcript_hash(hello: bytes, responder_static: bytes, responder_ephemeral: bytes) -> bytes:
    return hashlib.sha256(PROTOCOL_LABEL + hello + responder_static + responder_ephemeral).digest()


def session_keys(dh: bytes, h: bytes) -> tuple[bytes, bytes]:
    """(initiator→responder key, responder→initiator key) from the four DH results and the transcript."""
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=h, info=PROTOCOL_LABEL + b" keys").derive(dh)
    return okm[:32], okm[32:]


def _dh(secret: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return secret.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point gives an all-zero secret: never accept it
        raise AuthError("peer sent an invalid X25519 public key") from None


def _public_raw(secret: X25519PrivateKey) -> bytes:
    return secret.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A peer that vanishes without closing (power loss, cable) shows up within seconds.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", 15000)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
    sock.setblocking(False)


class _Retry(Exception):
    """The responder closed during the handshake: it may be restarting, dial again."""


class _Conn:
    """One established link: socket, buffered reader state and the two directions' ciphers."""

    __slots__ = ("sock", "fd", "rank", "buf", "view", "start", "end", "big", "sbuf", "sview",
                 "plain", "seal", "open", "send_ctr", "recv_ctr", "poll", "partial")

    def __init__(self, sock: socket.socket, rank: int, seal: AEAD | None, open_: AEAD | None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.rank = rank
        self.buf = bytearray(INBUF)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.big = bytearray(0)  # ciphertext of frames larger than INBUF
        self.sbuf = bytearray(0)  # sealed outgoing record
        self.sview = memoryview(self.sbuf)
        self.plain = bytearray(ONE_SEGMENT)  # small messages' frames, gathered to be sealed at once
        self.seal, self.open = seal, open_
        self.send_ctr = self.recv_ctr = 1  # counter 0 was the key confirmation
        self.poll = select.poll()
        self.poll.register(self.fd, _POLLIN)
        self.partial = False  # a record to this peer was interrupted half-way: the stream is unusable


@dataclass
class _Pending:
    """A connection accepted during join, still in its handshake."""

    since: float = 0.0
    need: int = HELLO.size
    buf: bytearray = field(default_factory=bytearray)
    hello: tuple[Any, ...] = ()
    h: bytes = b""
    keys: tuple[bytes, bytes] = (b"", b"")


class OcbLinks:
    """One rank's connections to all other ranks. Create with ``bind``, then ``join``."""

    retains_frames = False  # send() is done with the caller's buffers when it returns

    def __init__(self, listener: socket.socket, endpoint: str, keys: CurveKeys | None,
                 members: frozenset[bytes], max_message: int) -> None:
        self._listener: socket.socket | None = listener
        self.endpoint = endpoint
        self._keys = keys
        self._static = X25519PrivateKey.from_private_bytes(_raw_key(keys.secret, "secret key")) if keys else None
        self._static_pub = _public_raw(self._static) if self._static else bytes(32)
        self._members = members
        self._max_message = max_message
        self.rank = -1
        self.world_size = 0
        self._conns: dict[int, _Conn] = {}
        self._by_fd: dict[int, _Conn] = {}
        self._poll = select.poll()
        self._inbox: dict[int, deque[list[memoryview]]] = {}
        self._lost: set[int] = set()
        self._refused = 0
        self._evicted = 0
        self._closed = False
        self.buffers = BufferPool()  # received frames (and the group's accumulators) come from here
        # Application bytes (all frames of data-plane messages, before sealing) this rank sent
        # and received: what `bench generate` reports as bytes on the wire per token.
        self.bytes_sent = 0
        self.bytes_received = 0

    # ----------------------------------------------------------------- construction

    @classmethod
    def bind(cls, endpoint: str, keys: CurveKeys | None, member_keys: Sequence[bytes] = (), *,
             plain: bool = False, max_message: int = DEFAULT_MAX_MESSAGE) -> OcbLinks:
        """Listen on ``endpoint`` (``tcp://HOST:PORT``, port 0 or ``*`` = any free port).

        ``member_keys``: z85 public keys allowed to connect (all ranks'). ``plain=True`` turns
        off encryption and authentication: benchmarks only.
        """
        if not plain and keys is None:
            raise ValueError("a secure group needs this rank's key pair (or plain=True for benchmarks)")
        members = frozenset() if plain else frozenset(
            _raw_key(k, "member key") for k in [keys.public, *member_keys])  # type: ignore[union-attr]
        host, port = parse_endpoint(endpoint)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(64)
            listener.setblocking(False)
            bound = listener.getsockname()[1]
        except BaseException:
            listener.close()
            raise
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        return cls(listener, f"tcp://{shown}:{bound}", None if plain else keys, members, max_message)

    @property
    def plain(self) -> bool:
        return self._keys is None

    @property
    def refused_connections(self) -> int:
        """Connections refused during join: unknown keys, failed key proofs, garbage."""
        return self._refused

    @property
    def evicted_connections(self) -> int:
        """Unauthenticated connections closed during join for being too many or too slow."""
        return self._evicted

    def join(self, rank: int, world_size: int, peers: Sequence[Peer], timeout: float) -> None:
        """Dial lower ranks, accept higher ranks, authenticate every link; or raise."""
        by_rank = peers_by_rank(rank, world_size, peers, self.plain)
        self.rank, self.world_size = rank, world_size
        deadline = time.monotonic() + timeout
        try:
            for p in range(rank):
                self._add(self._dial(by_rank[p], deadline))
            self._accept_higher(by_rank, deadline)
        finally:
            # Nobody else may join this group later: stop listening.
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        for q in range(world_size):
            if q != rank:
                self._inbox[q] = deque()

    def _add(self, conn: _Conn) -> None:
        self._conns[conn.rank] = conn
        self._by_fd[conn.fd] = conn
        self._poll.register(conn.fd, _POLLIN)

    # -- initiator side

    def _dial(self, peer: Peer, deadline: float) -> _Conn:
        host, port = parse_endpoint(peer.endpoint)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CollectiveTimeout(
                    f"rank {self.rank}: group did not form; no handshake with rank {peer.rank} at "
                    f"{peer.endpoint} (not started, wrong endpoint, or a firewall)", (peer.rank,))
            try:
                sock = socket.create_connection((host, port), timeout=min(left, 2.0))
            except OSError:
                time.sleep(min(0.05, max(left, 0)))
                continue
            try:
                _tune(sock)
                return self._client_handshake(sock, peer, deadline)
            except _Retry:
                sock.close()
                time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
            except BaseException:
                sock.close()
                raise

    def _client_handshake(self, sock: socket.socket, peer: Peer, deadline: float) -> _Conn:
        p = peer.rank
        eph = X25519PrivateKey.generate() if not self.plain else None
        hello = HELLO.pack(MAGIC, MODE_PLAIN if self.plain else MODE_SECURE, 0, self.world_size, self.rank, p,
                           self._static_pub, _public_raw(eph) if eph else bytes(32))
        _send_small(sock, hello, deadline, p)
        status, e_r = REPLY.unpack(_recv_small(sock, REPLY.size, deadline, p))
        if status == REFUSED:
            raise AuthError(f"rank {p} at {peer.endpoint} refused our key (it is not in that rank's member list)")
        if status == WRONG_MODE:
            raise ProtocolError(f"rank {p} at {peer.endpoint} runs its links {'encrypted' if self.plain else 'plain'}, "
                                f"we run them {'plain' if self.plain else 'encrypted'}")
        if status != ACCEPT:
            raise ProtocolError(f"rank {p} at {peer.endpoint} answered the handshake with status {status}")
        if self.plain:
            _send_small(sock, _ZERO_TAG, deadline, p)
            _recv_small(sock, TAG, deadline, p)
            return _Conn(sock, p, None, None)
        assert eph is not None and self._static is not None and peer.public_key is not None
        s_r = _raw_key(peer.public_key, f"rank {p}'s public key")
        h = transcript_hash(hello, s_r, e_r)
        dh = _dh(eph, e_r) + _dh(self._static, s_r) + _dh(eph, s_r) + _dh(self._static, e_r)
        k_i2r, k_r2i = session_keys(dh, h)
        seal, open_ = AEAD(k_i2r), AEAD(k_r2i)
        _send_small(sock, seal.encrypt(_NONCE(0), b"", h), deadline, p)
        proof = _recv_small(sock, TAG, deadline, p)
        try:
            open_.decrypt(_NONCE(0), proof, h)
        except InvalidTag:
            raise AuthError(f"rank {p} at {peer.endpoint} failed the handshake: it does not hold rank {p}'s key") from None
        return _Conn(sock, p, seal, open_)

    # -- responder side

    def _accept_higher(self, by_rank: dict[int, Peer], deadline: float) -> None:
        want = set(range(self.rank + 1, self.world_size))
        if not want:
            return
        assert self._listener is not None
        sel = selectors.DefaultSelector()
        pending: dict[socket.socket, _Pending] = {}  # in order of acceptance
        sel.register(self._listener, selectors.EVENT_READ)
        listening = True
        backoff = 0.0
        resume_at = 0.0

        def close(sock: socket.socket) -> None:
            sel.unregister(sock)
            del pending[sock]
            sock.close()

        def evict_one() -> bool:
            # Prefer the oldest connection that has not even sent a hello: a rank dialing us
            # sends its hello at once, so such a connection is the least likely to be one.
            victim = next((s for s, st in pending.items() if not st.hello), None) or next(iter(pending), None)
            if victim is None:
                return False
            self._evicted += 1
            close(victim)
            return True

        try:
            while want:
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    waiting = tuple(sorted(want))
                    raise CollectiveTimeout(
                        f"rank {self.rank}: group did not form in time; no handshake from ranks "
                        f"{list(waiting)} (not started, wrong endpoint, or a firewall)", waiting)
                for sock in [s for s, st in pending.items() if now - st.since > HANDSHAKE_TIMEOUT]:
                    self._evicted += 1
                    close(sock)
                if not listening and now >= resume_at:
                    sel.register(self._listener, selectors.EVENT_READ)
                    listening = True
                events = sel.select(min(left, 0.2, max(resume_at - now, 0.001) if not listening else 0.2))
                # Handshakes first, then new connections: a rank accepted in the last round
                # has its hello read before new arrivals can push it out.
                events.sort(key=lambda e: e[0].fileobj is self._listener)
                for key, _ in events:
                    sock = key.fileobj
                    if sock is self._listener:
                        for _ in range(MAX_PENDING // 2):  # leave room for the handshakes under way
                            try:
                                new, _addr = self._listener.accept()
                            except (BlockingIOError, InterruptedError):
                                break
                            except OSError as exc:
                                if exc.errno not in _OUT_OF_RESOURCES:
                                    break  # ECONNABORTED and the like: that one is gone, go on
                                # Out of descriptors (or memory): free one, pause accepting, go on.
                                evict_one()
                                backoff = min(max(backoff * 2, ACCEPT_BACKOFF[0]), ACCEPT_BACKOFF[1])
                                log.warning("rank %d: accept() failed (%s); %d handshakes pending; "
                                            "pausing %.2f s", self.rank, exc.strerror, len(pending), backoff)
                                sel.unregister(self._listener)
                                listening, resume_at = False, time.monotonic() + backoff
                                break
                            backoff = 0.0
                            if len(pending) >= MAX_PENDING:
                                evict_one()
                            try:
                                _tune(new)
                            except OSError:
                                new.close()
                                continue
                            pending[new] = _Pending(since=time.monotonic())
                            sel.register(new, selectors.EVENT_READ)
                        continue
                    assert isinstance(sock, socket.socket)
                    st = pending.get(sock)
                    if st is None:
                        continue  # evicted earlier in this round
                    done = self._advance(sock, st, by_rank, want)
                    if done is not None:  # a link, or False: dropped
                        sel.unregister(sock)
                        del pending[sock]
                        if isinstance(done, _Conn):
                            self._add(done)
                        else:
                            sock.close()
        finally:
            for sock in pending:
                sock.close()
            sel.close()

    def _advance(self, sock: socket.socket, st: _Pending, by_rank: dict[int, Peer],
                 want: set[int]) -> _Conn | bool | None:
        """Feed one handshake: a link when done, False to drop the connection, None to wait on."""
        try:
            chunk = sock.recv(st.need - len(st.buf))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            chunk = b""
        if not chunk:
            return self._drop(sock, count=True)
        st.buf += chunk
        if len(st.buf) < st.need:
            return None
        if not st.hello:
            return self._on_hello(sock, st)
        return self._on_proof(sock, st, by_rank, want)

    def _drop(self, sock: socket.socket, *, count: bool, status: int | None = None) -> bool:
        if count:
            self._refused += 1
        if status is not None:
            try:
                sock.send(REPLY.pack(status, bytes(32)))
            except OSError:
                pass
        return False

    def _on_hello(self, sock: socket.socket, st: _Pending) -> _Conn | bool | None:
        magic, mode, zero, world, frm, to, s_i, e_i = HELLO.unpack(st.buf)
        if magic != MAGIC or zero != 0:
            return self._drop(sock, count=True)  # not our protocol
        if mode != (MODE_PLAIN if self.plain else MODE_SECURE):
            return self._drop(sock, count=True, status=WRONG_MODE)
        e_r_pub = bytes(32)
        if not self.plain:
            assert self._static is not None
            if s_i not in self._members:
                return self._drop(sock, count=True, status=REFUSED)
            eph = X25519PrivateKey.generate()
            e_r_pub = _public_raw(eph)
            try:
                dh = _dh(eph, e_i) + _dh(self._static, s_i) + _dh(self._static, e_i) + _dh(eph, s_i)
            except AuthError:
                return self._drop(sock, count=True, status=REFUSED)
            st.h = transcript_hash(bytes(st.buf), self._static_pub, e_r_pub)
            st.keys = session_keys(dh, st.h)
        try:
            if sock.send(REPLY.pack(ACCEPT, e_r_pub)) != REPLY.size:
                return self._drop(sock, count=False)
        except OSError:
            return self._drop(sock, count=False)
        st.hello = (world, frm, to, s_i)
        st.need, st.buf = TAG, bytearray()
        return None

    def _on_proof(self, sock: socket.socket, st: _Pending, by_rank: dict[int, Peer],
                  want: set[int]) -> _Conn | bool:
        world, frm, to, s_i = st.hello
        seal = open_ = None
        if not self.plain:
            k_i2r, k_r2i = st.keys
            open_, seal = AEAD(k_i2r), AEAD(k_r2i)
            try:
                open_.decrypt(_NONCE(0), bytes(st.buf), st.h)
            except InvalidTag:
                return self._drop(sock, count=True)  # knows a member's public key, not its secret
            # From here on the peer has proven it holds s_i: its claims are a member's claims.
            expected = by_rank.get(frm)
            if expected is None or expected.public_key is None or _raw_key(expected.public_key, "key") != s_i:
                sock.close()
                raise AuthError(f"a member key claimed rank {frm}, but that is not rank {frm}'s key")
        if world != self.world_size:
            sock.close()
            raise ProtocolError(f"rank {frm} thinks the group has {world} members, we have {self.world_size}")
        if to != self.rank or frm not in want:
            sock.close()
            raise ProtocolError(f"unexpected handshake from rank {frm} for rank {to} (we are rank {self.rank}, "
                                f"waiting for {sorted(want)})")
        proof = seal.encrypt(_NONCE(0), b"", st.h) if seal is not None else _ZERO_TAG
        try:
            if sock.send(proof) != TAG:
                return self._drop(sock, count=False)
        except OSError:
            return self._drop(sock, count=False)
        want.discard(frm)
        return _Conn(sock, frm, seal, open_)

    # ----------------------------------------------------------------- data plane: sending

    def send(self, peer: int, frames: Sequence[Any]) -> None:
        """Send one multipart message to ``peer``; returns when the kernel has all of it."""
        if peer in self._lost:
            raise PeerLost(f"rank {self.rank}: rank {peer} is gone (its connection closed)", peer)
        conn = self._conns[peer]
        nbytes, bufs = self._record(conn, T_DATA, frames)
        self.bytes_sent += nbytes
        self._send_all(conn, bufs, time.monotonic() + SEND_TIMEOUT)

    def _record(self, conn: _Conn, kind: int, frames: Sequence[Any]) -> tuple[int, list[Any]]:
        views = [memoryview(f).cast("B") for f in frames]
        n = len(views)
        if not 1 <= n <= MAX_FRAMES:
            raise ValueError(f"a message has 1..{MAX_FRAMES} frames, got {n}")
        lens = [v.nbytes for v in views]
        payload = sum(lens)
        if conn.seal is None:
            header = PREFIX.pack(payload, kind, n, 0) + struct.pack(f"<{n}I", *lens)
            return payload, [header, *views]
        one = payload <= ONE_SEGMENT
        body = payload + (TAG if one else n * TAG)
        header = PREFIX.pack(body, kind, n, 0) + struct.pack(f"<{n}I", *lens)
        hl = len(header)
        total = hl + body
        if len(conn.sbuf) < total:
            conn.sbuf = bytearray(max(total, 2 * len(conn.sbuf)))
            conn.sview = memoryview(conn.sbuf)
        sv = conn.sview
        sv[:hl] = header
        seal, ctr = conn.seal, conn.send_ctr
        if one:
            if n == 1:
                plain = views[0]
            else:
                off = 0
                for v, ln in zip(views, lens):
                    conn.plain[off:off + ln] = v
                    off += ln
                plain = memoryview(conn.plain)[:payload]
            seal.encrypt_into(_NONCE(ctr), plain, header, sv[hl:total])
            ctr += 1
        else:
            off = hl
            for v, ln in zip(views, lens):
                seal.encrypt_into(_NONCE(ctr), v, header, sv[off:off + ln + TAG])
                ctr += 1
                off += ln + TAG
        conn.send_ctr = ctr
        return payload, [sv[:total]]

    def _send_all(self, conn: _Conn, bufs: list[Any], deadline: float) -> None:
        sock = conn.sock
        total = sum(memoryview(b).nbytes for b in bufs)
        try:
            sent = sock.sendmsg(bufs)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            raise self._gone(conn) from None
        if sent == total:
            return
        conn.partial = True
        rest = _skip(bufs, sent)
        while rest:
            self._wait_writable(conn, deadline)
            try:
                sent = sock.sendmsg(rest)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                raise self._gone(conn) from None
            rest = _skip(rest, sent)
        conn.partial = False

    def _wait_writable(self, conn: _Conn, deadline: float) -> None:
        """Block until ``conn`` can take more bytes, reading every rank's messages meanwhile."""
        self._poll.modify(conn.fd, _POLLIN | select.POLLOUT)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CollectiveTimeout(f"rank {self.rank}: rank {conn.rank} stopped reading "
                                            f"(send stalled {SEND_TIMEOUT:.0f}s)", (conn.rank,))
                writable = False
                for fd, ev in self._poll.poll(math.ceil(left * 1000)):
                    c = self._by_fd[fd]
                    if ev & _POLLIN:
                        self._pump(c, deadline, raise_lost=c is conn)
                    if c is conn and ev & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                        writable = True
                if writable:
                    return
        finally:
            if conn.fd in self._by_fd and conn.rank not in self._lost:
                self._poll.modify(conn.fd, _POLLIN)

    # ----------------------------------------------------------------- data plane: receiving

    def recv(self, peer: int, deadline: float) -> list[memoryview]:
        """The next message from ``peer`` as writable byte views (they are the caller's to keep)."""
        inbox = self._inbox[peer]
        if inbox:
            return self._deliver(inbox.popleft())
        if peer in self._lost:
            raise PeerLost(f"rank {self.rank}: rank {peer} is gone (its connection closed)", peer)
        conn = self._conns[peer]
        grace: float | None = None  # another rank dropped: give the awaited one a moment, then fail
        while True:
            if conn.end > conn.start:  # (part of) a message is already buffered
                return self._deliver(self._take(conn, deadline))
            now = time.monotonic()
            until = deadline if grace is None else min(grace, deadline)
            if now >= until:
                if grace is not None and now >= grace:
                    gone = min(self._lost)
                    raise PeerLost(f"rank {self.rank}: rank {gone} is gone (its connection closed)", gone)
                raise CollectiveTimeout(f"rank {self.rank}: no data from rank {peer} before the "
                                        f"deadline (peer hung or overloaded)", (peer,))
            ready = self._poll.poll(math.ceil((until - now) * 1000))
            if any(fd == conn.fd for fd, _ in ready):
                return self._deliver(self._take(conn, deadline))
            for fd, _ in ready:
                if not self._pump(self._by_fd[fd], deadline, raise_lost=False) and grace is None:
                    grace = time.monotonic() + LOST_GRACE

    def _deliver(self, frames: list[memoryview]) -> list[memoryview]:
        self.bytes_received += sum(f.nbytes for f in frames)
        return frames

    def _take(self, conn: _Conn, deadline: float) -> list[memoryview]:
        """Read the next data message from ``conn``; an abort from that rank raises."""
        kind, frames = self._read_record(conn, deadline)
        if kind == T_ABORT:
            raise self._abort_error(conn.rank, frames)
        return frames

    def _pump(self, conn: _Conn, deadline: float, *, raise_lost: bool) -> bool:
        """Move one message of a rank we are not waiting for into its inbox. False: it is gone."""
        try:
            frames = self._take(conn, deadline)
        except PeerLost as exc:
            if raise_lost or exc.aborted:
                raise
            return False
        self._inbox[conn.rank].append(frames)
        return True

    def _read_record(self, conn: _Conn, deadline: float) -> tuple[int, list[memoryview]]:
        self._need(conn, PREFIX.size, deadline)
        body, kind, n, zero = PREFIX.unpack_from(conn.buf, conn.start)
        hl = PREFIX.size + 4 * n
        if kind not in (T_DATA, T_ABORT) or not 1 <= n <= MAX_FRAMES or zero != 0:
            raise self._bad(conn, f"a record header that is not ours (type {kind}, {n} frames)")
        if body > self._max_message + n * TAG:
            raise self._bad(conn, f"a message of {body} bytes, over the {self._max_message}-byte limit")
        self._need(conn, hl, deadline)
        lens = struct.unpack_from(f"<{n}I", conn.buf, conn.start + PREFIX.size)
        payload = sum(lens)
        one = payload <= ONE_SEGMENT
        tags = 0 if conn.open is None else TAG if one else n * TAG
        if payload + tags != body:
            raise self._bad(conn, "frame lengths that do not add up to the record length")
        header = bytes(conn.view[conn.start:conn.start + hl])
        conn.start += hl
        if conn.open is None:
            frames = []
            for ln in lens:
                out = self.buffers.take(ln)
                self._read_into(conn, out, deadline)
                frames.append(out)
            return kind, frames
        if one:
            # Opened into one block, shifted so that the frame after the envelope (the tensor)
            # starts 64-byte aligned, as a separately allocated frame would.
            block = self.buffers.take(payload + 64)
            pad = -(np.frombuffer(block, np.uint8).ctypes.data + lens[0]) % 64
            whole = block[pad:pad + payload]
            self._open(conn, self._sealed(conn, payload + TAG, deadline), header, whole)
            frames, off = [], 0
            for ln in lens:
                frames.append(whole[off:off + ln])
                off += ln
            return kind, frames
        frames = []
        for ln in lens:
            sealed = self._sealed(conn, ln + TAG, deadline)
            out = self.buffers.take(ln)  # only now: the bytes are all here, the tag is next
            self._open(conn, sealed, header, out)
            frames.append(out)
        return kind, frames

    def _open(self, conn: _Conn, sealed: memoryview, header: bytes, out: memoryview) -> None:
        assert conn.open is not None
        try:
            conn.open.decrypt_into(_NONCE(conn.recv_ctr), sealed, header, out)
        except InvalidTag:
            raise self._forged(conn) from None
        conn.recv_ctr += 1

    def _need(self, conn: _Conn, k: int, deadline: float) -> None:
        """At least ``k`` (≤ INBUF) bytes buffered from ``conn``."""
        if conn.end - conn.start >= k:
            return
        if conn.start + k > INBUF:  # compact: keep the partial message at the front
            n = conn.end - conn.start
            conn.buf[:n] = bytes(conn.view[conn.start:conn.end])  # same length: no resize
            conn.start, conn.end = 0, n
        while conn.end - conn.start < k:
            conn.end += self._recv_some(conn, conn.view[conn.end:], deadline)

    def _read_into(self, conn: _Conn, out: memoryview, deadline: float) -> None:
        """Fill ``out`` from the buffer, then straight from the socket (no second copy)."""
        have = min(conn.end - conn.start, out.nbytes)
        out[:have] = conn.view[conn.start:conn.start + have]
        conn.start += have
        if conn.start == conn.end:
            conn.start = conn.end = 0
        while have < out.nbytes:
            have += self._recv_some(conn, out[have:], deadline)

    def _sealed(self, conn: _Conn, k: int, deadline: float) -> memoryview:
        """A view of the next ``k`` sealed bytes, valid until the next read from ``conn``."""
        if k <= INBUF:
            self._need(conn, k, deadline)
            view = conn.view[conn.start:conn.start + k]
            conn.start += k
            return view
        if len(conn.big) >= k:
            big = memoryview(conn.big)[:k]
            self._read_into(conn, big, deadline)
            return big
        # Larger than any frame so far: grow with the bytes that arrive, not with what the
        # header announced (it is authenticated only with the tag at the end).
        have = 0
        while have < k:
            if have == len(conn.big):
                grown = bytearray(min(k, max(2 * len(conn.big), GROW_STEP)))
                grown[:have] = conn.big[:have]
                conn.big = grown
            have += self._read_some(conn, memoryview(conn.big)[have:min(k, len(conn.big))], deadline)
        return memoryview(conn.big)[:k]

    def _read_some(self, conn: _Conn, into: memoryview, deadline: float) -> int:
        """Fill part of ``into``: what is buffered, else what one recv brings."""
        have = min(conn.end - conn.start, into.nbytes)
        if have:
            into[:have] = conn.view[conn.start:conn.start + have]
            conn.start += have
            if conn.start == conn.end:
                conn.start = conn.end = 0
            return have
        return self._recv_some(conn, into, deadline)

    def _recv_some(self, conn: _Conn, into: memoryview, deadline: float) -> int:
        while True:
            try:
                n = conn.sock.recv_into(into)
            except (BlockingIOError, InterruptedError):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CollectiveTimeout(f"rank {self.rank}: rank {conn.rank} stopped mid-message "
                                            f"(peer hung or overloaded)", (conn.rank,)) from None
                conn.poll.poll(math.ceil(left * 1000))
                continue
            except OSError:
                raise self._gone(conn) from None
            if n == 0:
                raise self._gone(conn)
            return n

    # ----------------------------------------------------------------- failures

    def _gone(self, conn: _Conn) -> PeerLost:
        self._forget(conn)
        return PeerLost(f"rank {self.rank}: rank {conn.rank} is gone (its connection closed)", conn.rank)

    def _forget(self, conn: _Conn, *, lost: bool = True) -> None:
        """Stop reading ``conn``. ``lost=False``: its stream is corrupt but the rank may be alive
        (a forged frame, a tampering path): an abort can still be sent to it."""
        if lost:
            self._lost.add(conn.rank)
        if conn.fd in self._by_fd:
            self._poll.unregister(conn.fd)
            del self._by_fd[conn.fd]

    def _bad(self, conn: _Conn, what: str) -> LinkProtocolError:
        self._forget(conn, lost=False)
        return LinkProtocolError(f"rank {self.rank}: rank {conn.rank}'s link sent {what}", conn.rank)

    def _forged(self, conn: _Conn) -> LinkAuthError:
        self._forget(conn, lost=False)
        return LinkAuthError(f"rank {self.rank}: a frame on the link from rank {conn.rank} failed "
                             f"authentication (tampered, replayed or reordered)", conn.rank)

    def _abort_error(self, peer: int, frames: list[memoryview]) -> PeerLost:
        try:
            body = msgpack.unpackb(frames[0], raw=False, strict_map_key=True, max_str_len=4096,
                                   max_bin_len=0, max_array_len=64, max_map_len=8)
        except Exception:  # noqa: BLE001 - malformed abort: still an abort
            body = {}
        body = body if isinstance(body, dict) else {}
        reason = str(body.get("reason", "?"))[:500]
        raw = body.get("lost")
        lost = tuple(r for r in raw if isinstance(r, int) and 0 <= r < self.world_size) if isinstance(raw, list) else ()
        return PeerLost(f"rank {peer} gave up on the group: {reason}", peer, aborted=True, lost=lost)

    def abort(self, reason: str) -> None:
        """Best effort, never blocks: tell every member still connected that this rank gave up."""
        body = msgpack.packb({"reason": reason[:500], "lost": sorted(self._lost)}, use_bin_type=True)
        for p, conn in self._conns.items():
            if p in self._lost:
                continue
            try:
                if conn.partial:
                    raise OSError("stream is mid-record")
                _, bufs = self._record(conn, T_ABORT, [body])
                if conn.sock.sendmsg(bufs) != sum(memoryview(b).nbytes for b in bufs):
                    raise OSError("abort did not fit")
            except OSError:
                # It cannot be told in-band: end the connection so it sees us gone at once.
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # ----------------------------------------------------------------- teardown

    def close(self, *, abandon: bool = False) -> None:
        """Close every connection. Sent data still arrives (the kernel flushes it before FIN);
        ``abandon=True`` (group broken) resets the connections instead, so peers fail at once."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for conn in self._conns.values():
            try:
                if abandon:
                    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            conn.sock.close()
        self._conns.clear()
        self._by_fd.clear()


def _skip(bufs: list[Any], n: int) -> list[memoryview]:
    """The buffers left after ``n`` bytes of them were sent."""
    out = []
    for b in bufs:
        v = memoryview(b).cast("B") if not isinstance(b, memoryview) or b.format != "B" else b
        if n >= v.nbytes:
            n -= v.nbytes
            continue
        out.append(v[n:])
        n = 0
    return out


def _send_small(sock: socket.socket, data: bytes, deadline: float, rank: int) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, InterruptedError):
            _wait_fd(sock, select.POLLOUT, deadline, rank)
        except OSError:
            raise _Retry() from None


def _recv_small(sock: socket.socket, n: int, deadline: float, rank: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except (BlockingIOError, InterruptedError):
            _wait_fd(sock, select.POLLIN, deadline, rank)
            continue
        except OSError:
            raise _Retry() from None
        if not chunk:
            raise _Retry()
        buf += chunk
    return bytes(buf)


def _wait_fd(sock: socket.socket, event: int, deadline: float, rank: int) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise CollectiveTimeout(f"no handshake answer from rank {rank} in time", (rank,))
    p = select.poll()
    p.register(sock.fileno(), event)
    p.poll(math.ceil(left * 1000))


__all__ = ["OcbLinks"]
