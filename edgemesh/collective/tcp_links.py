"""Authenticated, encrypted point-to-point links over TCP + TLS 1.3: the collective data plane.

One TCP connection per pair of ranks: the higher rank dials the lower one. Everything runs on
the caller's (compute) thread — no I/O thread between the tensor and the kernel, which is what
made small allreduces over zmq cost ~4 context switches per message on a 2-core box.

Security (protocols/collective.md has the byte layout):
- a short clear hello (ranks, world size, the dialer's node key, a digest of the job id) lets
  the listener refuse strangers, other jobs and misconfigured members with a clear status;
- then TLS 1.3, mutual, with one certificate per pair of ranks derived from the two node keys
  and the job id (``collective.tls``) and pinned exactly: only the two members of this job and
  these ranks can make it, so a key outside the member list, a rank of another job and a man in
  the middle all fail the handshake; the node key itself is only used in one X25519 exchange
  whose result is domain-separated by HKDF;
- records inside TLS carry the multipart messages; TLS authenticates every byte, so a tampered,
  replayed, reordered or truncated stream → ``LinkAuthError``; a record header over
  ``max_message`` → ``LinkProtocolError`` before anything is allocated for it.

Bounded before authentication: during join at most ``MAX_PENDING`` connections that have not
finished their hello and TLS handshake are kept (the oldest that has not even sent a hello goes
first), each for at most ``HANDSHAKE_TIMEOUT`` seconds; an ``accept()`` that fails for want of
descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) frees the oldest pending connection,
backs off and keeps serving. ``max_message`` comes from the group's plan (``max_message_for``).

Progress rule (no deadlock with blocking semantics on non-blocking sockets): records are decoded
*incrementally* — each connection keeps its partial record (header, then frames filled in
place) across calls, and a read takes only what the socket has now. A send that cannot complete
waits for its socket to drain while taking whatever every connection has (into per-rank
inboxes), never waiting for a whole record, so two ranks sending large records to each other at
once (ring steps, chunked star) both make progress whatever their socket buffer sizes.
"""

from __future__ import annotations

import errno
import logging
import ctypes
import math
import os
import select
import selectors
import socket
import ssl
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack
import numpy as np
from zmq.utils import z85

from edgemesh.collective import native as nativemod
from edgemesh.collective import tls as tlsmod
from edgemesh.collective.buffers import BufferPool
from edgemesh.collective.errors import CollectiveTimeout, LinkAuthError, LinkProtocolError, PeerLost
from edgemesh.collective.members import CurveKeys, Peer, peers_by_rank
from edgemesh.errors import AuthError, ProtocolError
from edgemesh.transport.endpoint import parse_endpoint
from edgemesh.wire.tensor import q8_nbytes

log = logging.getLogger(__name__)


def _spin_us() -> int:
    """µs a native receive polls (yielding the core) before it sleeps: a sender then need not
    wake it, which costs tens of µs in a VM. ``EDGEMESH_LINK_SPIN_US`` (0 = sleep at once)."""
    raw = os.environ.get("EDGEMESH_LINK_SPIN_US", "").strip()
    try:
        return max(0, min(int(raw), 10_000)) if raw else 50
    except ValueError:
        log.warning("EDGEMESH_LINK_SPIN_US=%r is not a number; using 50", raw)
        return 50


SPIN_US = _spin_us()

MAGIC = b"EMC2"
MODE_PLAIN, MODE_SECURE = 0, 1
HELLO = struct.Struct("<4sBBHHH32s16s")  # magic, mode, 0, world, from rank, to rank, dialer's key, job digest
STATUS = struct.Struct("<B")
ACCEPT, REFUSED, WRONG_MODE, WRONG_JOB, WRONG_GROUP = 1, 2, 3, 4, 5
READY = b"\x01"  # listener → dialer, inside TLS, once the listener has checked everything
PREFIX = struct.Struct("<IBBH")  # frame bytes, record type, frame count, 0
_QUICK = struct.Struct("<IBBHII")  # PREFIX and the frame lengths of a two-frame record
T_DATA, T_ABORT = 0, 1
MAX_FRAMES = 16
DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024  # bytes of frames in one message (prefill of a big model fits)
MESSAGE_HEADROOM = 1024 * 1024  # on top of the largest tensor: the envelope frame and slack
MAX_PENDING = 32  # unauthenticated connections kept at once during join
HANDSHAKE_TIMEOUT = 5.0  # seconds an accepted connection may take to finish its handshake
ACCEPT_BACKOFF = (0.05, 1.0)  # first and longest pause after accept() ran out of descriptors
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
INBUF = 64 * 1024  # per-connection read buffer: a decode-size message arrives in one recv
# Messages up to this many bytes are gathered into one write (one TLS record, one syscall);
# larger frames are written from the caller's buffer.
ONE_SEGMENT = 64 * 1024
SEND_TIMEOUT = 30.0  # a send that cannot progress this long means the peer stopped reading
LOST_GRACE = 0.05  # a *different* rank's connection closed: how long the awaited one may still answer
_POLLIN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


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


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A peer that vanishes without closing (power loss, cable) shows up within seconds.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", 15000)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
    sock.setblocking(False)


class _Retry(Exception):
    """The listener closed during the handshake: it may be restarting, dial again."""


class _Conn:
    """One established link: its socket (TLS or plain) and the record being decoded from it."""

    __slots__ = ("sock", "fd", "rank", "tls", "buf", "view", "start", "end", "frames", "idx", "off",
                 "kind", "plain", "poll", "partial")

    def __init__(self, sock: socket.socket, rank: int, tls: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.rank = rank
        self.tls = tls
        self.buf = bytearray(INBUF)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        # The record being decoded: None = reading its header; else its frames, filled in place.
        self.frames: list[memoryview] | None = None
        self.idx = self.off = 0  # frame being filled, bytes of it so far
        self.kind = T_DATA
        self.plain = bytearray(ONE_SEGMENT + PREFIX.size + 4 * MAX_FRAMES)  # small records, gathered
        self.poll = select.poll()
        self.poll.register(self.fd, _POLLIN)
        self.partial = False  # a record to this peer was interrupted half-way: the stream is unusable


@dataclass
class _Pending:
    """A connection accepted during join, still in its hello or TLS handshake."""

    sock: socket.socket
    since: float
    buf: bytearray
    rank: int = -1  # the rank its hello claimed; -1 until the hello is in
    tls: ssl.SSLSocket | None = None
    writing: bool = False  # the TLS handshake waits for the socket to drain


class SecureLinks:
    """One rank's connections to all other ranks. Create with ``bind``, then ``join``."""

    retains_frames = False  # send() is done with the caller's buffers when it returns

    def __init__(self, listener: socket.socket, endpoint: str, keys: CurveKeys | None,
                 members: frozenset[bytes], max_message: int, job: str = "", cipher: str = "aes") -> None:
        self._listener: socket.socket | None = listener
        self.endpoint = endpoint
        self._keys = keys
        self._secret = _raw_key(keys.secret, "secret key") if keys else bytes(32)
        self._public = _raw_key(keys.public, "public key") if keys else bytes(32)
        self._members = members
        self._max_message = max_message
        self.job = job
        self._job_digest = tlsmod.job_digest(job) if keys else bytes(16)
        self.cipher = cipher  # "aes" or "chacha20": the suite order this rank offers and, listening, prefers
        self._contexts: dict[int, ssl.SSLContext] = {}
        self._certs: dict[int, bytes] = {}
        self._peer_keys: dict[int, bytes] = {}  # raw X25519 key of each other rank
        self.rank = -1
        self.world_size = 0
        self._conns: dict[int, _Conn] = {}
        self._by_fd: dict[int, _Conn] = {}
        self._poll = select.poll()
        self._inbox: dict[int, deque[tuple[int, list[memoryview]]]] = {}
        self._lost: set[int] = set()
        self._refused = 0
        self._evicted = 0
        self._closed = False
        self._sockbuf: int | None = None
        self.buffers = BufferPool()  # received frames (and the group's accumulators) come from here
        # Application bytes (all frames of data-plane messages) this rank sent and received:
        # what `bench generate` reports as bytes on the wire per token.
        self.bytes_sent = 0
        self.bytes_received = 0
        # The native side of the decode-size messages (native.py); None: Python only.
        self._native: nativemod._Native | None = None
        self._nlinks: Any = None  # ctypes array of native.Link, the other ranks in rank order
        self._npos: dict[int, int] = {}  # rank → index in _nlinks
        self._nkeep: list[Any] = []  # buffer exports the Link structs point into
        self._which = ctypes.c_int(0)
        self.native_ops = 0  # collective ops whose messages the C side moved all by itself

    # ----------------------------------------------------------------- construction

    @classmethod
    def bind(cls, endpoint: str, keys: CurveKeys | None, member_keys: Sequence[bytes] = (), *,
             plain: bool = False, max_message: int = DEFAULT_MAX_MESSAGE, job: str = "",
             cipher: str = "auto", sockbuf: int | None = None) -> SecureLinks:
        """Listen on ``endpoint`` (``tcp://HOST:PORT``, port 0 or ``*`` = any free port).

        ``member_keys``: z85 public keys allowed to connect (all ranks'). ``job``: the job id
        every rank of the group passes; it is bound into each link's certificate, so ranks of
        different jobs cannot connect. ``cipher``: "auto" (AES-GCM if the CPU has AES
        instructions, else ChaCha20-Poly1305), "aes" or "chacha20". ``sockbuf``: SO_SNDBUF and
        SO_RCVBUF of every connection, set before it connects (default: the kernel's autotuning;
        tests use tiny buffers). ``plain=True`` turns off encryption and authentication:
        benchmarks only.
        """
        if not plain and keys is None:
            raise ValueError("a secure group needs this rank's key pair (or plain=True for benchmarks)")
        suite = tlsmod.resolve_cipher(cipher)
        members = frozenset() if plain else frozenset(
            _raw_key(k, "member key") for k in [keys.public, *member_keys])  # type: ignore[union-attr]
        host, port = parse_endpoint(endpoint)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _set_bufs(listener, sockbuf)  # accepted connections inherit them
            listener.bind((host, port))
            listener.listen(64)
            listener.setblocking(False)
            bound = listener.getsockname()[1]
        except BaseException:
            listener.close()
            raise
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        links = cls(listener, f"tcp://{shown}:{bound}", None if plain else keys, members, max_message, job, suite)
        links._sockbuf = sockbuf
        return links

    @property
    def plain(self) -> bool:
        return self._keys is None

    @property
    def refused_connections(self) -> int:
        """Connections refused during join: unknown keys, other jobs, failed TLS handshakes, garbage."""
        return self._refused

    @property
    def evicted_connections(self) -> int:
        """Unauthenticated connections closed during join for being too many or too slow."""
        return self._evicted

    @property
    def ciphers(self) -> dict[int, str]:
        """The TLS 1.3 suite negotiated with each other rank (empty when plain)."""
        out = {}
        for p, c in self._conns.items():
            got = c.sock.cipher() if isinstance(c.sock, ssl.SSLSocket) else None
            if got:
                out[p] = got[0]
        return out

    def join(self, rank: int, world_size: int, peers: Sequence[Peer], timeout: float) -> None:
        """Dial lower ranks, accept higher ranks, authenticate every link; or raise."""
        by_rank = peers_by_rank(rank, world_size, peers, self.plain)
        self.rank, self.world_size = rank, world_size
        deadline = time.monotonic() + timeout
        try:
            if not self.plain:
                self._make_contexts(by_rank)
            for p in range(rank):
                self._add(self._dial(by_rank[p], deadline))
            self._accept_higher(by_rank, deadline)
        finally:
            # Nobody else may join this group later: stop listening.
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self._contexts.clear()  # they hold the pair keys; the links are up (or failed)
        for q in range(world_size):
            if q != rank:
                self._inbox[q] = deque()
        self._setup_native()

    def _setup_native(self) -> None:
        """Describe every link to the C side, or leave ``_native`` None (Python path only) if
        it is unavailable or any TLS session cannot be reached safely."""
        nat = nativemod.native()
        if nat is None or not self._conns:
            return
        ranks = sorted(self._conns)
        arr = (nativemod.Link * len(ranks))()
        keep: list[Any] = []
        for i, r in enumerate(ranks):
            conn = self._conns[r]
            link = arr[i]
            if conn.tls:
                ptr = nativemod.session_of(conn.sock, nat)  # type: ignore[arg-type]
                if ptr is None:
                    log.debug("rank %d: TLS session to rank %d not reachable natively; Python path", self.rank, r)
                    return
                link.ssl = ptr
            rbuf = (ctypes.c_char * len(conn.buf)).from_buffer(conn.buf)
            keep += [rbuf, (ctypes.c_char * len(conn.plain)).from_buffer(conn.plain)]
            link.fd = conn.fd
            link.rbuf = ctypes.addressof(rbuf)
            link.wbuf = ctypes.addressof(keep[-1])
        self._nlinks, self._nkeep = arr, keep
        self._npos = {r: i for i, r in enumerate(ranks)}
        self._native = nat

    def _make_contexts(self, by_rank: dict[int, Peer]) -> None:
        for p, peer in by_rank.items():
            assert peer.public_key is not None
            theirs = _raw_key(peer.public_key, f"rank {p}'s public key")
            lo, hi = (self.rank, p) if self.rank < p else (p, self.rank)
            keys = (self._public, theirs) if self.rank < p else (theirs, self._public)
            seed = tlsmod.pair_seed(self._secret, theirs, job=self.job, world=self.world_size, ranks=(lo, hi), keys=keys)
            cert = tlsmod.pair_cert(seed)
            # The higher rank dials: it is the TLS client.
            self._contexts[p] = tlsmod.pair_context(cert, server=p > self.rank, cipher=self.cipher)
            self._certs[p] = cert.der
            self._peer_keys[p] = theirs

    def _add(self, conn: _Conn) -> None:
        self._conns[conn.rank] = conn
        self._by_fd[conn.fd] = conn
        self._poll.register(conn.fd, _POLLIN)

    # -- dialer side

    def _dial(self, peer: Peer, deadline: float) -> _Conn:
        host, port = parse_endpoint(peer.endpoint)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CollectiveTimeout(
                    f"rank {self.rank}: group did not form; no handshake with rank {peer.rank} at "
                    f"{peer.endpoint} (not started, wrong endpoint, or a firewall)", (peer.rank,))
            try:
                sock = _connect(host, port, min(left, 2.0), self._sockbuf)
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
        hello = HELLO.pack(MAGIC, MODE_PLAIN if self.plain else MODE_SECURE, 0, self.world_size, self.rank, p,
                           self._public, self._job_digest)
        _send_small(sock, hello, deadline, p)
        status = _recv_small(sock, STATUS.size, deadline, p)[0]
        where = f"rank {p} at {peer.endpoint}"
        if status == REFUSED:
            raise AuthError(f"{where} refused our key (it is not rank {self.rank}'s key in that rank's member list)")
        if status == WRONG_MODE:
            raise ProtocolError(f"{where} runs its links {'encrypted' if self.plain else 'plain'}, "
                                f"we run them {'plain' if self.plain else 'encrypted'}")
        if status == WRONG_JOB:
            raise AuthError(f"{where} serves another job than ours ({self.job or 'no job id'})")
        if status == WRONG_GROUP:
            raise ProtocolError(f"{where} does not expect rank {self.rank} of a group of {self.world_size} "
                                f"(different world size or rank numbering)")
        if status != ACCEPT:
            raise ProtocolError(f"{where} answered the handshake with status {status}")
        if self.plain:
            if _recv_small(sock, 1, deadline, p) != READY:
                raise ProtocolError(f"{where} sent no ready byte")
            return _Conn(sock, p, tls=False)
        tls = self._contexts[p].wrap_socket(sock, server_side=False, do_handshake_on_connect=False)
        try:
            _tls_handshake(tls, deadline, p)
            if tls.getpeercert(binary_form=True) != self._certs[p]:  # the context trusts only it; belt and braces
                raise ssl.SSLCertVerificationError("not the pair certificate")
            if _recv_small(tls, 1, deadline, p) != READY:
                raise ProtocolError(f"{where} sent no ready byte")
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError):
            tls.close()  # closed without an alert: evicted under load, or restarting
            raise _Retry() from None
        except ssl.SSLCertVerificationError:
            tls.close()
            raise AuthError(f"{where} failed the TLS handshake: it does not hold rank {p}'s key for this "
                            f"job ({self.job or 'no job id'})") from None
        except ssl.SSLError as exc:
            tls.close()
            raise AuthError(f"{where} refused our TLS certificate ({exc.reason or exc}): we are not the "
                            f"member it expects as rank {self.rank} of job {self.job or '(none)'}") from None
        except BaseException:
            tls.close()
            raise
        return _Conn(tls, p, tls=True)

    # -- listener side

    def _accept_higher(self, by_rank: dict[int, Peer], deadline: float) -> None:
        want = set(range(self.rank + 1, self.world_size))
        if not want:
            return
        assert self._listener is not None
        sel = selectors.DefaultSelector()
        pending: dict[int, _Pending] = {}  # by fd, in order of acceptance
        sel.register(self._listener, selectors.EVENT_READ)
        listening = True
        backoff = 0.0
        resume_at = 0.0

        def close(st: _Pending) -> None:
            fd = st.sock.fileno()
            sel.unregister(fd)
            del pending[fd]
            st.sock.close()

        def evict_one() -> bool:
            # Prefer the oldest connection that has not even sent a hello: a rank dialing us
            # sends its hello at once, so such a connection is the least likely to be one.
            victim = next((st for st in pending.values() if st.rank < 0), None) or next(iter(pending.values()), None)
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
                for st in [st for st in pending.values() if now - st.since > HANDSHAKE_TIMEOUT]:
                    self._evicted += 1
                    close(st)
                if not listening and now >= resume_at:
                    sel.register(self._listener, selectors.EVENT_READ)
                    listening = True
                events = sel.select(min(left, 0.2, max(resume_at - now, 0.001) if not listening else 0.2))
                # Handshakes first, then new connections: a rank accepted in the last round
                # has its hello read before new arrivals can push it out.
                events.sort(key=lambda e: e[0].fileobj is self._listener)
                for key, _ in events:
                    if key.fileobj is self._listener:
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
                            pending[new.fileno()] = _Pending(new, time.monotonic(), bytearray())
                            sel.register(new.fileno(), selectors.EVENT_READ)
                        continue
                    st = pending.get(key.fd)
                    if st is None:
                        continue  # evicted earlier in this round
                    done = self._advance(st, want)
                    if done is None:
                        events_now = selectors.EVENT_READ | (selectors.EVENT_WRITE if st.writing else 0)
                        if key.events != events_now:
                            sel.modify(key.fd, events_now)
                        continue
                    sel.unregister(key.fd)
                    del pending[key.fd]
                    if isinstance(done, _Conn):
                        self._add(done)
                    else:
                        st.sock.close()
        finally:
            for st in pending.values():
                st.sock.close()
            sel.close()

    def _advance(self, st: _Pending, want: set[int]) -> _Conn | bool | None:
        """Feed one handshake: a link when done, False to drop the connection, None to wait on."""
        if st.tls is not None:
            return self._tls_step(st, want)
        try:
            chunk = st.sock.recv(HELLO.size - len(st.buf))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            chunk = b""
        if not chunk:
            return self._drop(st, count=True)
        st.buf += chunk
        if len(st.buf) < HELLO.size:
            return None
        return self._on_hello(st, want)

    def _drop(self, st: _Pending, *, count: bool, status: int | None = None) -> bool:
        if count:
            self._refused += 1
        if status is not None:
            try:
                st.sock.send(STATUS.pack(status))
            except OSError:
                pass
        return False

    def _on_hello(self, st: _Pending, want: set[int]) -> _Conn | bool | None:
        magic, mode, zero, world, frm, to, key, digest = HELLO.unpack(st.buf)
        if magic != MAGIC or zero != 0:
            return self._drop(st, count=True)  # not our protocol
        if mode != (MODE_PLAIN if self.plain else MODE_SECURE):
            return self._drop(st, count=True, status=WRONG_MODE)
        if not self.plain:
            # Checks on claims nobody has proven yet: they only give a member a clear answer.
            # The proof is the TLS handshake with the pair certificate of (frm, us, job).
            if key not in self._members or key != self._expected_key(frm):
                return self._drop(st, count=True, status=REFUSED)
            if digest != self._job_digest:
                return self._drop(st, count=True, status=WRONG_JOB)
        if world != self.world_size or to != self.rank or frm not in want:
            return self._drop(st, count=True, status=WRONG_GROUP)
        try:
            if st.sock.send(STATUS.pack(ACCEPT)) != STATUS.size:
                return self._drop(st, count=False)
            if self.plain:
                if st.sock.send(READY) != 1:
                    return self._drop(st, count=False)
                want.discard(frm)
                return _Conn(st.sock, frm, tls=False)
        except OSError:
            return self._drop(st, count=False)
        st.rank = frm
        st.tls = self._contexts[frm].wrap_socket(st.sock, server_side=True, do_handshake_on_connect=False)
        st.sock = st.tls
        return self._tls_step(st, want)

    def _expected_key(self, rank: int) -> bytes | None:
        return self._peer_keys.get(rank)

    def _tls_step(self, st: _Pending, want: set[int]) -> _Conn | bool | None:
        assert st.tls is not None
        st.writing = False
        try:
            st.tls.do_handshake()
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLWantWriteError:
            st.writing = True
            return None
        except (ssl.SSLError, OSError) as exc:
            # Not the pair certificate (a key outside the list, another job, a man in the
            # middle), or the dialer gave up.
            log.info("rank %d: TLS handshake from a claimed rank %d failed: %s", self.rank, st.rank, exc)
            return self._drop(st, count=True)
        if st.tls.getpeercert(binary_form=True) != self._certs[st.rank]:
            return self._drop(st, count=True)
        try:
            if st.tls.send(READY) != 1:
                return self._drop(st, count=False)
        except (ssl.SSLError, OSError):
            return self._drop(st, count=False)
        want.discard(st.rank)
        return _Conn(st.tls, st.rank, tls=True)

    # ----------------------------------------------------------------- data plane: sending

    def star_hub(self, peers: Sequence[int], envelopes: Sequence[bytes], acc: np.ndarray,
                 envelope: bytes, deadline: float) -> bool:
        """The hub's part of a one-piece star allreduce of float32 ``acc``, in one native call:
        the next message of each of ``peers`` (increasing ranks), which must be exactly
        ``[envelopes[i], acc.nbytes bytes]``, added into ``acc`` in that order, then ``[envelope,
        acc]`` sent to each. False: nothing was done that the caller cannot redo with ``recv``
        and ``send`` (the C side is not usable here, or a message is not the expected one, or
        the deadline passed: every byte read is where ``recv`` decodes it)."""
        conns = self._native_idle(peers, envelopes, acc)
        if conns is None:
            return False
        n = acc.nbytes
        elen = _QUICK.size + len(envelopes[0])
        expect = b"".join([_pair_head(e, n) for e in envelopes])
        head = _pair_head(envelope, n)
        phase = ctypes.c_int(0)
        nat = self._native
        assert nat is not None
        first = self._npos[peers[0]]
        st = nat.lib.edgemesh_star_hub(self._link_addr(peers[0]), len(conns), expect, elen, elen + n, acc.ctypes.data,
                                       acc.size, head, len(head), self._timeout_ms(deadline), SPIN_US,
                                       ctypes.byref(self._which), ctypes.byref(phase))
        if phase.value == 0:  # failed while receiving: nothing summed
            self._native_received(conns, first, st, self._which.value)  # raises a link failure
            return False
        for conn in conns:
            conn.start = conn.end = 0
        self.bytes_received += sum(len(e) + n for e in envelopes)
        if st == nativemod.OK:
            self.bytes_sent += len(conns) * (len(envelope) + n)
            self.native_ops += 1
            return True
        # Sending, stopped at link `which`: the ones before it have the result.
        k = self._which.value
        self.bytes_sent += k * (len(envelope) + n)
        self._native_finish_send(conns[k], self._nlinks[first + k], st, len(head) + n, len(envelope) + n)
        for p in list(peers)[k + 1:]:
            self.send(p, [envelope, acc])
        return True

    def star_worker(self, hub: int, envelope: bytes, mine: np.ndarray, expect: bytes,
                    deadline: float) -> tuple[bool, np.ndarray | None]:
        """A worker's part of the same allreduce, in one native call: ``[envelope, mine]`` sent to
        ``hub``, then its answer, which must be exactly ``[expect, mine.nbytes bytes]``, returned
        as a new array. (sent, result): (False, None) = nothing done; (True, None) = sent, and
        the answer is for ``recv`` to take (it is not the expected one, or not there yet)."""
        conns = self._native_idle((hub,), (expect,), mine)
        if conns is None:
            return False, None
        n = mine.nbytes
        head, want = _pair_head(envelope, n), _pair_head(expect, n)
        out = np.empty_like(mine)
        phase = ctypes.c_int(0)
        nat = self._native
        assert nat is not None
        st = nat.lib.edgemesh_star_worker(self._link_addr(hub), head, len(head), mine.ctypes.data, mine.size, want,
                                          len(want), out.ctypes.data, self._timeout_ms(deadline), SPIN_US,
                                          ctypes.byref(phase))
        if phase.value == 1:  # the send stopped
            self._native_finish_send(conns[0], self._nlinks[self._npos[hub]], st, len(head) + n, len(envelope) + n)
            return True, None
        self.bytes_sent += len(envelope) + n
        if not self._native_received(conns, self._npos[hub], st, 0):
            return True, None
        conns[0].start = conns[0].end = 0
        self.bytes_received += len(expect) + n
        self.native_ops += 1
        return True, out

    def direct_exchange(self, envelope: bytes, mine: np.ndarray, envelopes: Sequence[bytes],
                        deadline: float) -> tuple[int, np.ndarray | None]:
        """One rank's part of a direct allreduce of float32 ``mine``, in one native call:
        ``[envelope, mine]`` sent to every other rank, then each one's next message, which must
        be exactly ``[envelopes[i], mine.nbytes bytes]`` (other ranks in increasing order), and
        all parts added in rank order into a new array. (sent, result): ``sent`` other ranks
        (in order) have this rank's part; result None = the messages are for ``recv`` to take
        (not usable here, not the expected ones, or not there yet)."""
        peers = sorted(self._conns)
        conns = self._native_idle(peers, envelopes, mine) if len(envelopes) == len(peers) else None
        if conns is None:
            return 0, None
        n = mine.nbytes
        elen = _QUICK.size + len(envelopes[0])
        head = _pair_head(envelope, n)
        expect = b"".join([_pair_head(e, n) for e in envelopes])
        out = np.empty_like(mine)
        phase = ctypes.c_int(0)
        nat = self._native
        assert nat is not None
        st = nat.lib.edgemesh_direct(self._link_addr(peers[0]), len(peers), self.rank, head, len(head), mine.ctypes.data,
                                     mine.size, expect, elen, out.ctypes.data, self._timeout_ms(deadline), SPIN_US,
                                     ctypes.byref(self._which), ctypes.byref(phase))
        sent, received = self._direct_after(conns, st, phase.value, self._which.value, len(head) + n, len(envelope) + n,
                                            len(envelopes[0]) + n)
        if not received:
            return sent, None
        self.native_ops += 1
        return sent, out

    def _direct_after(self, conns: list[_Conn], status: int, phase: int, which: int, total: int,
                      payload: int, payload_in: int) -> tuple[int, bool]:
        """After a native direct op: (ranks that have this rank's part, all parts received).
        A stopped send is finished in Python; a failed receive leaves its bytes to ``recv``;
        a link failure raises as Python's own read or write would."""
        if phase == 1:  # the send to link `which` stopped: the ones before it are out
            self.bytes_sent += which * payload
            self._native_finish_send(conns[which], self._nlinks[which], status, total, payload)
            return which + 1, False
        self.bytes_sent += len(conns) * payload
        if not self._native_received(conns, 0, status, which):
            return len(conns), False
        for conn in conns:
            conn.start = conn.end = 0
        self.bytes_received += len(conns) * payload_in
        return len(conns), True

    def direct_loop(self, templates: Sequence[tuple[bytes, bytes]], n: int, timeout: float) -> Any:
        """A ``native.DirectCtx`` for direct allreduces of ``n`` float32 values run from C (the
        native decode loop), or None where the C side cannot run them. ``templates[r]``: rank
        r's envelope around the sequence number (``op.part_template``)."""
        nat = self._native
        peers = sorted(self._conns)
        if nat is None or len(templates) != self.world_size or len(peers) != self.world_size - 1:
            return None
        pre, tails = templates[0][0], [t for _, t in templates]
        longest = _QUICK.size + len(pre) + 9 + len(tails[0]) + 4 * n  # the largest sequence number
        if (any(p != pre for p, _ in templates) or len({len(t) for t in tails}) != 1 or len(pre) > nativemod.PRE_MAX
                or len(tails[0]) > nativemod.TAIL_MAX or longest > min(INBUF, ONE_SEGMENT)
                or longest - _QUICK.size > self._max_message or len(peers) > nativemod.MAX_LINKS):
            return None
        ctx = nativemod.DirectCtx()
        ctx.links, ctx.k, ctx.me, ctx.n = self._link_addr(peers[0]), len(peers), self.rank, n
        ctx.timeout_ms, ctx.spin_us = max(1, math.ceil(timeout * 1000)), SPIN_US
        ctx.pre_len, ctx.tail_len = len(pre), len(tails[0])
        ctypes.memmove(ctx.pre, pre, len(pre))
        for r, t in enumerate(tails):
            ctypes.memmove(ctypes.addressof(ctx.tails) + r * nativemod.TAIL_MAX, t, len(t))
        return ctx

    def direct_loop_ready(self) -> bool:
        """Nothing of any link is buffered or pending in Python: the C side may read them."""
        return self._native is not None and not self._lost and all(self._idle(p) for p in self._conns)

    def _idle(self, p: int) -> bool:
        """Nothing of rank ``p``'s link is buffered or pending in Python, and it is usable: the C
        side may take it."""
        conn = self._conns.get(p)
        return (conn is not None and p not in self._lost and not self._inbox[p] and conn.frames is None
                and conn.start == conn.end and not conn.partial)

    def direct_loop_settle(self, ctx: Any) -> None:
        """Account the ops the C side finished since the last call (bytes, counters)."""
        if ctx.ops:
            self.bytes_sent += ctx.bytes
            self.bytes_received += ctx.bytes
            self.native_ops += ctx.ops
            ctx.ops = ctx.bytes = 0
            for conn in self._conns.values():
                conn.start = conn.end = 0

    def direct_loop_stopped(self, ctx: Any) -> int:
        """The op the C loop stopped in (sequence number ``ctx.seq``): handled as after
        ``direct_exchange``; returns how many other ranks already have this rank's part (the
        caller sends to the rest and receives everything with ``recv``)."""
        self.direct_loop_settle(ctx)
        if ctx.phase == 2:
            return 0
        conns = [self._conns[p] for p in sorted(self._conns)]
        payload = ctx.pre_len + len(msgpack.packb(ctx.seq)) + ctx.tail_len + 4 * ctx.n
        sent, received = self._direct_after(conns, ctx.status, ctx.phase, ctx.which, _QUICK.size + payload, payload,
                                            payload)
        assert not received
        return sent

    def ring_native(self, nxt: int, prv: int, acc: np.ndarray, steps: Sequence[Any], deadline: float) -> bool:
        """A whole ring allreduce of float32 ``acc`` in one native call (the GIL is free meanwhile).
        ``steps``: ``ring.NativeStep`` per step — the part of ``acc`` sent to ``nxt`` (encoded, or
        the previous step's record forwarded), the part received from ``prv``, whose message must
        be one of the step's envelopes with its data, added into or copied over that part.
        False: not usable here, nothing was done (the caller runs the ring in Python). A failure
        raises as Python's own path would: a link failure, a deadline, or what the unexpected
        message means (an abort of the group, or ranks out of step). The group is then broken."""
        nat = self._native
        if (nat is None or nxt == prv or acc.dtype != np.float32 or not acc.flags.c_contiguous or not steps
                or len(self._conns) > nativemod.MAX_LINKS):
            return False
        if not all(self._idle(p) and p in self._npos for p in (nxt, prv)):
            return False
        heads: list[bytes] = []
        arr = (nativemod.RingStep * len(steps))()
        pos = most = 0
        for st, step in zip(arr, steps):
            (slo, shi), (rlo, rhi) = step.send, step.recv
            if not (0 <= slo <= shi <= acc.size and 0 <= rlo <= rhi <= acc.size):
                raise ValueError("a ring step's part lies outside the tensor")
            st.send_off, st.send_cnt, st.send_mode = slo, shi - slo, step.mode
            st.recv_off, st.recv_cnt, st.add = rlo, rhi - rlo, 1 if step.add else 0
            most = max(most, shi - slo, rhi - rlo)
            for v, (senv, renv) in enumerate(zip(step.send_envs, step.recv_envs)):
                if senv is None or renv is None:
                    continue
                nbytes = [4 * (shi - slo), 4 * (rhi - rlo)] if v == 0 else [q8_nbytes(shi - slo), q8_nbytes(rhi - rlo)]
                sh, rh = _pair_head(senv, nbytes[0]), _pair_head(renv, nbytes[1])
                if len(rh) > INBUF or max(len(senv) + nbytes[0], len(renv) + nbytes[1]) > self._max_message:
                    return False  # Python's path refuses it with the precise error
                st.send_hoff[v], st.send_hlen[v], st.recv_hoff[v], st.recv_hlen[v] = pos, len(sh), pos + len(sh), len(rh)
                heads += [sh, rh]
                pos += len(sh) + len(rh)
        room = max(4 * most, q8_nbytes(most))
        tx, rx0, rx1 = (np.frombuffer(self.buffers.take(room), np.uint8) for _ in range(3))
        state, phase = nativemod.RingState(), ctypes.c_int(0)
        to, frm = self._conns[nxt], self._conns[prv]
        out_link, in_link = self._nlinks[self._npos[nxt]], self._nlinks[self._npos[prv]]
        blob = b"".join(heads)
        grace: float | None = None  # another rank's link closed: how long this op may still finish
        try:
            while True:
                # Every link but the one the ring reads: `nxt`'s too, which the ring only writes to
                # (at W = 3 that is where the third rank's abort arrives).
                others = [c for p, c in self._conns.items()
                          if p != prv and p not in self._lost and c.fd in self._by_fd]
                fds = (ctypes.c_int * max(1, len(others)))(*[c.fd for c in others])
                until = deadline if grace is None else min(deadline, grace)
                st_code = nat.lib.edgemesh_ring(self._link_addr(nxt), self._link_addr(prv), acc.ctypes.data,
                                                tx.ctypes.data, rx0.ctypes.data, rx1.ctypes.data,
                                                ctypes.addressof(arr), len(steps), blob, fds, len(others),
                                                self._timeout_ms(until), ctypes.byref(state), ctypes.byref(phase))
                if st_code != nativemod.ELSEWHERE:
                    break
                # Bytes on another link: an abort raises here, a faster rank's next message waits
                # in its inbox, a closed link gives this op a moment (as ``recv`` does).
                for c in others:
                    if not self._pump(c, raise_lost=False) and grace is None:
                        grace = time.monotonic() + LOST_GRACE
        finally:
            # Bytes of whole records, as Python counts them (envelope and data); a record to
            # `nxt` that stopped half-way leaves that stream unusable.
            self.bytes_sent += state.sent_payload
            self.bytes_received += state.recv_payload
            # (TLS: OpenSSL may hold a record it took but could not write yet, with nothing
            # counted as sent: a step's send that began and did not end counts as half-way.)
            if state.step < len(steps) and state.started and not state.sdone and (to.tls or out_link.sent > 0):
                to.partial = True
        if st_code == nativemod.OK:
            self.native_ops += 1
            return True
        k = state.step
        if st_code == nativemod.TIMEOUT and grace is not None and time.monotonic() < deadline:
            gone = min(self._lost)
            raise PeerLost(f"rank {self.rank}: rank {gone} is gone (its connection closed)", gone)
        if phase.value == 1:
            if st_code == nativemod.TIMEOUT:
                raise CollectiveTimeout(f"rank {self.rank}: rank {nxt} stopped reading (ring allreduce)", (nxt,))
            raise self._native_failure(to, st_code, out_link)
        if st_code == nativemod.TIMEOUT:
            raise CollectiveTimeout(f"rank {self.rank}: no data from rank {prv} before the deadline "
                                    f"(peer hung or overloaded)", (prv,))
        if st_code in (nativemod.IO, nativemod.EOF):
            raise self._native_failure(frm, st_code, in_link)
        # Not the expected record: the bytes read are the Python decoder's (an abort raises here).
        frm.start, frm.end = 0, in_link.got
        frames = self.recv(prv, deadline)
        raise ProtocolError(f"rank {self.rank}: rank {prv} sent a message of {len(frames)} frames "
                            f"({sum(f.nbytes for f in frames)} bytes) that is not step {k + 1} of this ring "
                            f"allreduce: the ranks are out of step")

    def watched_fds(self) -> list[int]:
        """The sockets of the ranks still connected. Bytes or a close on one while another data
        plane waits (``collective.shm``) are for Python: ``take_waiting``."""
        return [c.fd for p, c in self._conns.items() if p not in self._lost and c.fd in self._by_fd]

    def take_waiting(self) -> list[int]:
        """Read what every connected rank has sent into its inbox (an abort raises ``PeerLost``
        at once, a faster rank's next message waits there); the ranks gone, sorted."""
        for p, c in list(self._conns.items()):
            if p not in self._lost and c.fd in self._by_fd:
                self._pump(c, raise_lost=False)
        return sorted(self._lost)

    def _native_idle(self, peers: Sequence[int], envelopes: Sequence[bytes], data: np.ndarray) -> list[_Conn] | None:
        """The connections to ``peers`` if the C side may take them now: float32 data, records
        that fit the read buffer, consecutive ranks, nothing buffered or pending in Python."""
        if self._native is None or data.dtype != np.float32 or not data.flags.c_contiguous:
            return None
        elen = len(envelopes[0])
        if (_QUICK.size + elen + data.nbytes > min(INBUF, ONE_SEGMENT) or elen + data.nbytes > self._max_message
                or len(peers) > nativemod.MAX_LINKS):
            return None
        first = self._npos.get(peers[0], -1)
        conns = []
        for i, p in enumerate(peers):
            if self._npos.get(p) != first + i or len(envelopes[i]) != elen or not self._idle(p):
                return None
            conns.append(self._conns[p])
        return conns

    def _link_addr(self, rank: int) -> int:
        """Address of ``rank``'s ``native.Link`` (links of consecutive ranks follow it)."""
        return ctypes.addressof(self._nlinks) + self._npos[rank] * ctypes.sizeof(nativemod.Link)

    @staticmethod
    def _timeout_ms(deadline: float) -> int:
        return max(0, math.ceil((deadline - time.monotonic()) * 1000))

    def _native_received(self, conns: list[_Conn], first: int, status: int, which: int) -> bool:
        """After a native receive: True if every record came whole. Otherwise the bytes read go
        to the Python decoder (False), or the link failure is raised as Python would."""
        if status == nativemod.OK:
            return True
        links = self._nlinks
        for i, conn in enumerate(conns):
            conn.start, conn.end = 0, links[first + i].got
        if status in (nativemod.IO, nativemod.EOF):
            raise self._native_failure(conns[which], status, links[first + which])
        return False

    def _native_finish_send(self, conn: _Conn, link: nativemod.Link, status: int, total: int, payload: int) -> None:
        """A native send that stopped: the rest from where OpenSSL (or the kernel) stopped
        taking it (it needs the same bytes again), or the failure raised as Python would."""
        if status != nativemod.BLOCKED:
            conn.partial = link.sent > 0
            raise self._native_failure(conn, status, link)
        self.bytes_sent += payload
        self._send_all(conn, [memoryview(conn.plain)[link.sent:total]], time.monotonic() + SEND_TIMEOUT)

    def _native_failure(self, conn: _Conn, status: int, link: nativemod.Link) -> PeerLost | LinkAuthError:
        """What Python's own read or write would have raised for the C side's failure."""
        nat = self._native
        if status == nativemod.EOF or nat is None or nativemod.is_eof(link.err, link.detail):
            return self._gone(conn)
        return self._broken(conn, nativemod.ssl_error(nat, link.detail))

    def send(self, peer: int, frames: Sequence[Any]) -> None:
        """Send one multipart message to ``peer``; returns when the kernel has all of it."""
        if peer in self._lost:
            raise PeerLost(f"rank {self.rank}: rank {peer} is gone (its connection closed)", peer)
        conn = self._conns[peer]
        nbytes, bufs = self._record(conn, T_DATA, frames)
        self.bytes_sent += nbytes
        self._send_all(conn, bufs, time.monotonic() + SEND_TIMEOUT)

    def _record(self, conn: _Conn, kind: int, frames: Sequence[Any]) -> tuple[int, list[Any]]:
        """(frame bytes, buffers to write): small records gathered into one buffer."""
        views = [memoryview(f).cast("B") for f in frames]
        n = len(views)
        if not 1 <= n <= MAX_FRAMES:
            raise ValueError(f"a message has 1..{MAX_FRAMES} frames, got {n}")
        lens = [v.nbytes for v in views]
        payload = sum(lens)
        header = PREFIX.pack(payload, kind, n, 0) + struct.pack(f"<{n}I", *lens)
        if not conn.tls:
            return payload, [header, *views]  # sendmsg gathers them
        if payload > ONE_SEGMENT:
            return payload, [header, *views]
        hl = len(header)
        out = memoryview(conn.plain)
        out[:hl] = header
        off = hl
        for v, ln in zip(views, lens):
            out[off:off + ln] = v
            off += ln
        return payload, [out[:off]]

    def _send_all(self, conn: _Conn, bufs: list[Any], deadline: float) -> None:
        if not conn.tls:
            self._send_plain(conn, bufs, deadline)
            return
        conn.partial = True
        for b in bufs:
            view = b if isinstance(b, memoryview) else memoryview(b)
            while view.nbytes:
                try:
                    # A TLS write that would block keeps its place; it must be retried with
                    # the same bytes (OpenSSL has already taken part of them).
                    sent = conn.sock.send(view)
                except _WOULD_BLOCK:
                    self._wait_writable(conn, deadline)
                    continue
                except OSError as exc:  # ssl.SSLError included
                    raise self._io_failure(conn, exc) from None
                view = view[sent:]
        conn.partial = False

    def _send_plain(self, conn: _Conn, bufs: list[Any], deadline: float) -> None:
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
        """Block until ``conn`` can take more bytes, taking in every rank's bytes meanwhile."""
        self._poll.modify(conn.fd, _POLLIN | select.POLLOUT)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CollectiveTimeout(f"rank {self.rank}: rank {conn.rank} stopped reading "
                                            f"(send stalled {SEND_TIMEOUT:.0f}s)", (conn.rank,))
                writable = False
                for fd, ev in self._poll.poll(math.ceil(left * 1000)):
                    c = self._by_fd.get(fd)
                    if c is None:
                        continue
                    if ev & _POLLIN:
                        self._pump(c, raise_lost=c is conn)
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
        quick = self._quick(conn)  # what is already there, before any poll
        if quick is not None:
            return quick
        grace: float | None = None  # another rank dropped: give the awaited one a moment, then fail
        while True:
            now = time.monotonic()
            until = deadline if grace is None else min(grace, deadline)
            if now >= until:
                if grace is not None and now >= grace:
                    gone = min(self._lost)
                    raise PeerLost(f"rank {self.rank}: rank {gone} is gone (its connection closed)", gone)
                raise CollectiveTimeout(f"rank {self.rank}: no data from rank {peer} before the "
                                        f"deadline (peer hung or overloaded)", (peer,))
            for fd, _ in self._poll.poll(math.ceil((until - now) * 1000)):
                c = self._by_fd.get(fd)
                if c is None:
                    continue
                if c is conn and not inbox:
                    quick = self._quick(conn)
                    if quick is not None:
                        return quick
                    continue
                if not self._pump(c, raise_lost=c is conn) and grace is None:
                    grace = time.monotonic() + LOST_GRACE
            if inbox:
                return self._deliver(inbox.popleft())

    def _quick(self, conn: _Conn) -> list[memoryview] | None:
        """The decode-step case in a few calls: nothing of ``conn`` is buffered and one read
        brings exactly one whole small data record of two frames (envelope, tensor). Anything
        else (nothing there, a partial or larger record, more bytes, an abort, a malformed
        header) goes through ``_fill``, the general decoder, which also raises every error."""
        if conn.frames is not None or conn.start != conn.end or conn.rank in self._lost:
            self._pump(conn, raise_lost=True)
            inbox = self._inbox[conn.rank]
            return self._deliver(inbox.popleft()) if inbox else None
        n = self._recv_some(conn, conn.view)
        if n is None:
            return None
        if n > _QUICK.size:
            body, kind, count, zero, l0, l1 = _QUICK.unpack_from(conn.buf)
            if (kind == T_DATA and count == 2 and zero == 0 and l0 + l1 == body and n == _QUICK.size + body
                    and body <= ONE_SEGMENT and body <= self._max_message and not (conn.tls and conn.sock.pending())):
                # A block of its own (the caller keeps the frames), the tensor 64-byte aligned.
                block = bytearray(body + 64)
                pad = -(ctypes.addressof(ctypes.c_char.from_buffer(block)) + l0) % 64
                whole = memoryview(block)
                whole[pad:pad + body] = conn.view[_QUICK.size:n]
                self.bytes_received += body
                return [whole[pad:pad + l0], whole[pad + l0:pad + body]]
        conn.start, conn.end = 0, n  # the general decoder takes it from here
        self._pump(conn, raise_lost=True)
        inbox = self._inbox[conn.rank]
        return self._deliver(inbox.popleft()) if inbox else None

    def _deliver(self, record: tuple[int, list[memoryview]]) -> list[memoryview]:
        kind, frames = record
        assert kind == T_DATA
        self.bytes_received += sum(f.nbytes for f in frames)
        return frames

    def _pump(self, conn: _Conn, *, raise_lost: bool) -> bool:
        """Take what ``conn`` has now into its inbox. False: that rank is gone (and not awaited)."""
        try:
            self._fill(conn)
        except PeerLost as exc:
            if exc.aborted:
                raise
            if self._inbox[conn.rank]:
                return True  # what it sent before closing is delivered first; then PeerLost
            if raise_lost:
                raise
            return False
        return True

    def _fill(self, conn: _Conn) -> None:
        """Decode what ``conn`` has without waiting: complete records go to its rank's inbox, a
        partial one stays in ``conn`` for the next call. An abort record raises at once."""
        inbox = self._inbox[conn.rank]
        # Once a record is complete, go on only with bytes already here (buffered, or held by
        # TLS): a further read would most often just find the socket empty, and whatever is
        # still in the kernel wakes the next poll.
        done = False
        while True:
            if conn.frames is None:
                if not self._header(conn):
                    if done and not (conn.tls and conn.sock.pending()):
                        return
                    if not self._recv_buffered(conn):
                        return
                    continue
            assert conn.frames is not None
            frames = conn.frames
            while conn.idx < len(frames):
                f = frames[conn.idx]
                want = f.nbytes - conn.off
                if not want:  # an empty frame (a rank with no rows of something) needs no bytes
                    conn.idx += 1
                    conn.off = 0
                    continue
                have = conn.end - conn.start
                if have:
                    k = min(have, want)
                    f[conn.off:conn.off + k] = conn.view[conn.start:conn.start + k]
                    conn.start += k
                    conn.off += k
                    if conn.start == conn.end:
                        conn.start = conn.end = 0
                elif done and not (conn.tls and conn.sock.pending()):
                    return
                elif want >= INBUF // 2:  # a large frame: straight from the socket, no second copy
                    got = self._recv_some(conn, f[conn.off:])
                    if got is None:
                        return
                    conn.off += got
                elif not self._recv_buffered(conn):
                    return
                if conn.off == f.nbytes:
                    conn.idx += 1
                    conn.off = 0
            conn.frames = None
            conn.idx = conn.off = 0
            if conn.kind == T_ABORT:
                raise self._abort_error(conn.rank, frames)
            inbox.append((T_DATA, frames))
            done = True

    def _header(self, conn: _Conn) -> bool:
        """Parse the next record header if it is all buffered and set up its frames; False if not yet."""
        have = conn.end - conn.start
        if have < PREFIX.size:
            return False
        body, kind, n, zero = PREFIX.unpack_from(conn.buf, conn.start)
        if kind not in (T_DATA, T_ABORT) or not 1 <= n <= MAX_FRAMES or zero != 0:
            raise self._bad(conn, f"a record header that is not ours (type {kind}, {n} frames)")
        if body > self._max_message:
            raise self._bad(conn, f"a message of {body} bytes, over the {self._max_message}-byte limit")
        hl = PREFIX.size + 4 * n
        if have < hl:
            return False
        lens = struct.unpack_from(f"<{n}I", conn.buf, conn.start + PREFIX.size)
        if sum(lens) != body:
            raise self._bad(conn, "frame lengths that do not add up to the record length")
        conn.start += hl
        if conn.start == conn.end:
            conn.start = conn.end = 0
        if body <= ONE_SEGMENT:
            # One block, shifted so that the frame after the envelope (the tensor) starts
            # 64-byte aligned, as a separately allocated frame would.
            block = self.buffers.take(body + 64)
            pad = -(np.frombuffer(block, np.uint8).ctypes.data + lens[0]) % 64
            frames, off = [], pad
            for ln in lens:
                frames.append(block[off:off + ln])
                off += ln
        else:
            frames = [self.buffers.take(ln) for ln in lens]
        conn.frames, conn.kind, conn.idx, conn.off = frames, kind, 0, 0
        return True

    def _recv_buffered(self, conn: _Conn) -> bool:
        """One read into the connection's buffer; False if the socket has nothing now."""
        if conn.start and conn.end - conn.start < PREFIX.size + 4 * MAX_FRAMES:
            n = conn.end - conn.start  # compact: keep the partial header at the front
            conn.buf[:n] = bytes(conn.view[conn.start:conn.end])
            conn.start, conn.end = 0, n
        got = self._recv_some(conn, conn.view[conn.end:])
        if got is None:
            return False
        conn.end += got
        return True

    def _recv_some(self, conn: _Conn, into: memoryview) -> int | None:
        try:
            n = conn.sock.recv_into(into)
        except _WOULD_BLOCK:
            return None
        except OSError as exc:  # ssl.SSLError included
            raise self._io_failure(conn, exc) from None
        if n == 0:
            raise self._gone(conn)
        return n

    # ----------------------------------------------------------------- failures

    def _gone(self, conn: _Conn) -> PeerLost:
        self._forget(conn)
        return PeerLost(f"rank {self.rank}: rank {conn.rank} is gone (its connection closed)", conn.rank)

    def _forget(self, conn: _Conn, *, lost: bool = True) -> None:
        """Stop reading ``conn``. ``lost=False``: its stream is corrupt but the rank may be alive
        (a tampering path): an abort can still be attempted to it."""
        if lost:
            self._lost.add(conn.rank)
        if conn.fd in self._by_fd:
            self._poll.unregister(conn.fd)
            del self._by_fd[conn.fd]

    def _io_failure(self, conn: _Conn, exc: OSError) -> PeerLost | LinkAuthError:
        """What a failed read or write on an established link means: the peer closed (TLS close
        or EOF, a socket error), or a TLS error (``_broken``)."""
        if isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLZeroReturnError, ssl.SSLEOFError)):
            return self._broken(conn, exc)
        return self._gone(conn)

    def _bad(self, conn: _Conn, what: str) -> LinkProtocolError:
        self._forget(conn, lost=False)
        return LinkProtocolError(f"rank {self.rank}: rank {conn.rank}'s link sent {what}", conn.rank)

    def _broken(self, conn: _Conn, exc: ssl.SSLError) -> PeerLost | LinkAuthError:
        """A TLS error after the handshake. An alert *from* the peer means it rejected our stream
        (a man in the middle tampered with what we sent): that rank gave up, like an abort.
        Anything else is our side failing to authenticate what arrived."""
        if "ALERT" in str(exc.reason or ""):
            self._forget(conn, lost=False)
            conn.partial = True
            return PeerLost(f"rank {self.rank}: rank {conn.rank} rejected our stream to it "
                            f"(TLS alert {exc.reason}: altered on the way)", conn.rank, aborted=True)
        return self._forged(conn, exc)

    def _forged(self, conn: _Conn, exc: ssl.SSLError) -> LinkAuthError:
        self._forget(conn, lost=False)
        conn.partial = True  # the TLS stream is dead both ways: no in-band abort
        return LinkAuthError(f"rank {self.rank}: a frame on the link from rank {conn.rank} failed "
                             f"authentication (tampered, replayed or reordered: TLS says "
                             f"{exc.reason or exc})", conn.rank)

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
                total = sum(memoryview(b).nbytes for b in bufs)
                if conn.tls:
                    if conn.sock.send(bufs[0]) != total:
                        raise OSError("abort did not fit")
                elif conn.sock.sendmsg(bufs) != total:
                    raise OSError("abort did not fit")
            except (OSError, ssl.SSLError):
                # It cannot be told in-band: end the connection so it sees us gone at once.
                conn.partial = True
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


def _set_bufs(sock: socket.socket, size: int | None) -> None:
    if size is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def _connect(host: str, port: int, timeout: float, sockbuf: int | None) -> socket.socket:
    """``socket.create_connection`` with the buffer sizes set before the connection (the receive
    window is agreed on then; shrinking it later stalls TCP)."""
    err: OSError | None = None
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            _set_bufs(sock, sockbuf)
            sock.settimeout(timeout)
            sock.connect(addr)
            return sock
        except OSError as exc:
            sock.close()
            err = exc
    raise err or OSError(f"cannot resolve {host}")


def _pair_head(envelope: bytes, nbytes: int) -> bytes:
    """The start of the record of message [envelope, nbytes of tensor], as ``_record`` makes it:
    prefix, both frame lengths, the envelope (the C side adds the tensor)."""
    return _QUICK.pack(len(envelope) + nbytes, T_DATA, 2, 0, len(envelope), nbytes) + envelope


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


def _tls_handshake(tls: ssl.SSLSocket, deadline: float, rank: int) -> None:
    while True:
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            _wait_fd(tls, select.POLLIN, deadline, rank)
        except ssl.SSLWantWriteError:
            _wait_fd(tls, select.POLLOUT, deadline, rank)
        except ssl.SSLError:
            raise
        except OSError:
            raise _Retry() from None


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
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            _wait_fd(sock, select.POLLIN, deadline, rank)
            continue
        except ssl.SSLError:
            raise
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


__all__ = ["CurveKeys", "Peer", "SecureLinks"]
