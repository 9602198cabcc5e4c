"""Attacks on the collective's TCP + TLS 1.3 links (tcp_links.SecureLinks), through a proxy.

Rank 1 dials the hub through a proxy thread that forwards the clear hello and the TLS handshake
untouched and then rewrites rank 1's TLS records (flip a bit, replay, reorder, lie about the
length, truncate). Each must end in a typed error on the hub (``LinkAuthError`` /
``LinkProtocolError``), a ``PeerLost(aborted=True)`` on rank 1 (the hub rejected its stream),
a broken group on both — never a wrong sum, a crash or a hang. A proxy that terminates TLS
itself (a man in the middle with its own certificate) fails the handshake on both sides.
Strangers, keys outside the member list, other jobs and half-handshakes during join are refused
and counted without disturbing the group.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from typing import Any, Callable

import pytest
import torch

from edgemesh.collective import tls as tlsmod
from edgemesh.collective.errors import CollectiveError, CollectiveTimeout, LinkAuthError, LinkProtocolError, PeerLost
from edgemesh.collective.members import CurveKeys, Peer
from edgemesh.collective.tcp_links import (ACCEPT, HELLO, MAGIC, MODE_SECURE, PREFIX, REFUSED, STATUS, WRONG_JOB,
                                           SecureLinks)
from edgemesh.collective.group import CollectiveOptions, CollectiveGroup
from edgemesh.errors import AuthError, ProtocolError
from edgemesh.transport.endpoint import parse_endpoint
from zmq.utils import z85

from tests.integration.conftest import wait_for
from tests.integration.test_collective_zmq import LOCAL, in_threads

pytestmark = [pytest.mark.integration, pytest.mark.security]

TLS_HEADER = struct.Struct(">BHH")  # content type, legacy version, length
DATA_RECORD = 1500  # rank 1's tensor parts are larger than this; handshake records are smaller
Mutate = Callable[[int, bytes], list[bytes]]  # (data record index, TLS record bytes) → what to forward


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


class Proxy:
    """Forwards one connection; rewrites the dialer's large TLS records (its data) after the handshake."""

    def __init__(self, target: str, mutate: Mutate) -> None:
        self.target = parse_endpoint(target)
        self.mutate = mutate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.socks: list[socket.socket] = [self.listener]
        self.threads = [threading.Thread(target=self._run, daemon=True)]
        self.threads[0].start()

    def _run(self) -> None:
        try:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.target)
        except OSError:
            return
        self.socks += [client, server]
        back = threading.Thread(target=self._pipe, args=(server, client), daemon=True)
        back.start()
        self.threads.append(back)
        try:
            server.sendall(_recv_exact(client, HELLO.size))  # clear hello: untouched
            i = 0
            while True:
                header = _recv_exact(client, TLS_HEADER.size)
                _type, _version, length = TLS_HEADER.unpack(header)
                record = header + _recv_exact(client, length)
                if length < DATA_RECORD:
                    server.sendall(record)  # handshake and small records: untouched
                    continue
                for out in self.mutate(i, record):
                    server.sendall(out)
                i += 1
        except (OSError, EOFError):
            pass

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass

    def close(self) -> None:
        for s in self.socks:
            s.close()
        for t in self.threads:
            t.join(5)


def group_via_proxy(mutate: Mutate, **opts: Any) -> tuple[list[CollectiveGroup], Proxy]:
    keys = [CurveKeys.generate() for _ in range(2)]
    publics = [k.public for k in keys]
    links = [SecureLinks.bind(LOCAL, keys[r], publics, job="job-a") for r in range(2)]
    proxy = Proxy(links[0].endpoint, mutate)
    # Rank 1 believes the hub is at the proxy's address.
    peers_of = [[Peer(1, links[1].endpoint, publics[1])], [Peer(0, proxy.endpoint, publics[0])]]
    # Deadlines far beyond the 15 s within which run_and_check wants the attack noticed: an
    # error that came from a deadline instead of the attack cannot pass.
    options = CollectiveOptions(**{"timeout": 60.0, "connect_timeout": 60.0, **opts})
    groups = in_threads(2, lambda r: CollectiveGroup(links[r], r, 2, peers_of[r], options))
    assert all(isinstance(g, CollectiveGroup) for g in groups), groups
    return groups, proxy


def flip_last_bit_of(index: int) -> Mutate:
    def mutate(i: int, record: bytes) -> list[bytes]:
        if i != index:
            return [record]
        return [record[:-1] + bytes([record[-1] ^ 1])]
    return mutate


def replay_first_instead_of(index: int) -> Mutate:
    first: list[bytes] = []

    def mutate(i: int, record: bytes) -> list[bytes]:
        if i == 0:
            first.append(record)
        return [first[0]] if i == index else [record]
    return mutate


def swap_first_two() -> Mutate:
    held: list[bytes] = []

    def mutate(i: int, record: bytes) -> list[bytes]:
        if i == 0:
            held.append(record)
            return []
        if i == 1:
            return [record, held[0]]
        return [record]
    return mutate


def oversized_length_at(index: int) -> Mutate:
    """A TLS record header announcing more than TLS allows (2^14 + 256 bytes of ciphertext)."""
    def mutate(i: int, record: bytes) -> list[bytes]:
        if i != index:
            return [record]
        kind, version, _length = TLS_HEADER.unpack_from(record)
        return [TLS_HEADER.pack(kind, version, 0xFFF0) + record[TLS_HEADER.size:]]
    return mutate


def truncated_then_garbage_at(index: int) -> Mutate:
    """Half of a record, then random bytes that look like the rest of it."""
    def mutate(i: int, record: bytes) -> list[bytes]:
        if i != index:
            return [record]
        half = len(record) // 2
        return [record[:half] + os.urandom(len(record) - half)]
    return mutate


def run_and_check(groups: list[CollectiveGroup], steps: int, hub_error: type[Exception] | tuple[type[Exception], ...]
                  ) -> list[Any]:
    def rank(r: int) -> Any:
        out = []
        # A direct allreduce (the default for small parts) lets a rank that received every part
        # finish the op the hub failed in; it learns of the abort in its next op.
        for i in range(steps + (r > 0)):
            out.append(groups[r].allreduce_sum(torch.full((1000,), float(r + 1) * (i + 1))))
        return out

    t0 = time.monotonic()
    res = in_threads(2, rank)
    # Typically within milliseconds; the deadline is 60 s (group_via_proxy), the cap 15 s: a
    # loaded host fits, an error that waited for the deadline does not.
    assert time.monotonic() - t0 < 15.0, "an attack was noticed only at the deadline"
    assert isinstance(res[0], hub_error), res[0]
    assert isinstance(res[1], PeerLost) and res[1].aborted, res[1]
    for g in groups:  # broken cleanly: every later call fails at once
        with pytest.raises(CollectiveError, match="broken"):
            g.allreduce_sum(torch.ones(4))
    return res


@pytest.fixture
def closing() -> Any:
    made: list[tuple[list[CollectiveGroup], Proxy]] = []
    yield made.append
    for groups, proxy in made:
        for g in groups:
            g.close()
        proxy.close()


def test_untouched_proxy_is_transparent(closing: Any) -> None:
    groups, proxy = group_via_proxy(lambda i, rec: [rec])
    closing((groups, proxy))
    res = in_threads(2, lambda r: [groups[r].allreduce_sum(torch.full((1000,), float(r + 1))) for _ in range(3)])
    assert all(torch.equal(x, torch.full((1000,), 3.0)) for out in res for x in out)


def test_tampered_frame_is_an_auth_error(closing: Any) -> None:
    groups, proxy = group_via_proxy(flip_last_bit_of(1))
    closing((groups, proxy))
    res = run_and_check(groups, 3, LinkAuthError)
    assert isinstance(res[0], AuthError) and res[0].rank == 1
    assert "failed authentication" in str(res[0])


def test_replayed_frame_is_an_auth_error(closing: Any) -> None:
    groups, proxy = group_via_proxy(replay_first_instead_of(1))
    closing((groups, proxy))
    run_and_check(groups, 3, LinkAuthError)


def test_reordered_frames_are_an_auth_error(closing: Any) -> None:
    # Chunked star: rank 1 sends two chunks back to back; the proxy swaps them.
    groups, proxy = group_via_proxy(swap_first_two(), algorithm="chunked_star", chunks=2)
    closing((groups, proxy))
    run_and_check(groups, 2, LinkAuthError)


def test_oversized_tls_length_is_refused_before_reading_it(closing: Any) -> None:
    groups, proxy = group_via_proxy(oversized_length_at(0))
    closing((groups, proxy))
    res = run_and_check(groups, 2, (LinkAuthError, LinkProtocolError))
    assert res[0].rank == 1


def test_truncated_then_garbage_record_is_an_auth_error(closing: Any) -> None:
    groups, proxy = group_via_proxy(truncated_then_garbage_at(1))
    closing((groups, proxy))
    run_and_check(groups, 3, LinkAuthError)


def test_a_broken_link_leaves_other_groups_serving(closing: Any) -> None:
    """Garbage on one group's link breaks that group only: another group of the same processes
    (threads here) keeps computing right sums before and after."""
    from tests.integration.test_collective_zmq import close_all, make_group

    other = make_group(2)
    try:
        groups, proxy = group_via_proxy(truncated_then_garbage_at(0))
        closing((groups, proxy))
        run_and_check(groups, 1, LinkAuthError)
        res = in_threads(2, lambda r: [other[r].allreduce_sum(torch.full((1000,), float(r + 1))) for _ in range(3)])
        assert all(torch.equal(x, torch.full((1000,), 3.0)) for out in res for x in out), res
    finally:
        close_all(other)


def test_max_message_bounds_what_a_member_may_send() -> None:
    keys = [CurveKeys.generate() for _ in range(2)]
    publics = [k.public for k in keys]
    links = [SecureLinks.bind(LOCAL, keys[0], publics, max_message=4096), SecureLinks.bind(LOCAL, keys[1], publics)]
    peers = [Peer(r, links[r].endpoint, publics[r]) for r in range(2)]
    groups = in_threads(2, lambda r: CollectiveGroup(links[r], r, 2, peers, CollectiveOptions(timeout=5.0)))
    try:
        # 40 kB > 4 KiB. Rank 1 may finish this op (a direct allreduce: it has both parts), then
        # learns in its next one that rank 0 gave up.
        res = in_threads(2, lambda r: [groups[r].allreduce_sum(torch.ones(10_000)) for _ in range(1 + r)])
        assert isinstance(res[0], LinkProtocolError), res[0]
        assert isinstance(res[1], PeerLost), res[1]
    finally:
        for g in groups:
            g.close()


def test_strangers_during_join_are_refused_and_counted() -> None:
    """Garbage, a silent socket, a key outside the member list, and a member's public key
    without its secret: none of them stop the real rank 1 from joining, and each is counted."""
    keys = [CurveKeys.generate() for _ in range(2)]
    publics = [k.public for k in keys]
    links = [SecureLinks.bind(LOCAL, keys[r], publics, job="job-a") for r in range(2)]
    addr = parse_endpoint(links[0].endpoint)
    digest = tlsmod.job_digest("job-a")
    silent = socket.create_connection(addr)
    garbage = socket.create_connection(addr)
    garbage.sendall(os.urandom(HELLO.size))
    stranger = socket.create_connection(addr)
    stranger.sendall(HELLO.pack(MAGIC, MODE_SECURE, 0, 2, 1, 0, os.urandom(32), digest))
    thief = socket.create_connection(addr)  # claims rank 1's public key, cannot make its certificate
    thief.sendall(HELLO.pack(MAGIC, MODE_SECURE, 0, 2, 1, 0, z85.decode(publics[1]), digest))
    peers = [Peer(r, links[r].endpoint, publics[r]) for r in range(2)]

    for s in (silent, garbage, stranger, thief):
        s.settimeout(30.0)
    formed: list[Any] = []
    attackers_done = threading.Event()

    def rank(r: int) -> Any:
        if r == 1:  # the attackers go first: rank 1 dials once the hub has dealt with them all
            attackers_done.wait(60)
        return CollectiveGroup(links[r], r, 2, peers, CollectiveOptions(timeout=30.0, connect_timeout=60.0))

    joiner = threading.Thread(target=lambda: formed.extend(in_threads(2, rank)))
    joiner.start()
    try:
        assert _recv_exact(stranger, STATUS.size)[0] == REFUSED
        assert _recv_exact(thief, STATUS.size)[0] == ACCEPT  # the hub cannot tell yet: TLS will
        # A TLS client hello with its own certificate would fail the same way; bytes that are
        # not TLS at all must not be taken for it either.
        thief.sendall(os.urandom(512))
        assert wait_for(lambda: links[0].refused_connections == 3, 30), links[0].refused_connections
        attackers_done.set()
        joiner.join(30)
        assert all(isinstance(g, CollectiveGroup) for g in formed), formed
        res = in_threads(2, lambda r: formed[r].allreduce_sum(torch.ones(8)))
        assert all(torch.equal(x, torch.full((8,), 2.0)) for x in res)
        assert links[0].refused_connections == 3  # garbage, stranger, thief (the silent one just waited)
    finally:
        attackers_done.set()
        joiner.join(30)
        for g in formed:
            if isinstance(g, CollectiveGroup):
                g.close()
        for s in (silent, garbage, stranger, thief):
            s.close()


class TlsInTheMiddle:
    """Forwards the clear hello and status, then runs TLS itself on both sides with a
    certificate of its own (what an attacker on the path, or a member relaying another
    pair's link, can do at best)."""

    def __init__(self, target: str) -> None:
        self.target = parse_endpoint(target)
        cert = tlsmod.pair_cert(os.urandom(32))
        self.as_server = tlsmod.pair_context(cert, server=True, cipher="aes")
        self.as_client = tlsmod.pair_context(cert, server=False, cipher="aes")
        for ctx in (self.as_server, self.as_client):
            ctx.verify_mode = ssl.CERT_NONE if ctx is self.as_client else ssl.CERT_OPTIONAL
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.socks: list[socket.socket] = [self.listener]
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.target)
            self.socks += [client, server]
            client.settimeout(10)
            server.settimeout(10)
            server.sendall(_recv_exact(client, HELLO.size))
            client.sendall(_recv_exact(server, STATUS.size))
            up = self.as_client.wrap_socket(server)  # to the hub: our certificate, not rank 1's
            self.socks.append(up)
        except (OSError, EOFError) as exc:
            self.errors.append(f"hub side: {exc}")
        try:
            down = self.as_server.wrap_socket(client, server_side=True)  # to rank 1: not the hub's
            self.socks.append(down)
        except (OSError, EOFError) as exc:
            self.errors.append(f"rank 1 side: {exc}")

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.thread.join(10)


def test_tls_man_in_the_middle_fails_on_both_sides() -> None:
    keys = [CurveKeys.generate() for _ in range(2)]
    publics = [k.public for k in keys]
    links = [SecureLinks.bind(LOCAL, keys[r], publics, job="job-a") for r in range(2)]
    mitm = TlsInTheMiddle(links[0].endpoint)
    opts = [CollectiveOptions(connect_timeout=3.0), CollectiveOptions(connect_timeout=30.0)]
    peers_of = [[Peer(1, links[1].endpoint, publics[1])], [Peer(0, mitm.endpoint, publics[0])]]
    try:
        hub, rank1 = in_threads(2, lambda r: CollectiveGroup(links[r], r, 2, peers_of[r], opts[r]), timeout=60)
        assert isinstance(rank1, AuthError) and "does not hold rank 0's key" in str(rank1), rank1
        assert isinstance(hub, CollectiveTimeout), hub  # nobody it trusts ever finished a handshake
        assert links[0].refused_connections == 1
        # Rank 1 rejected the proxy's certificate (TLS alert to the proxy). On the hub side the
        # proxy's client handshake "completes" (TLS 1.3 clients finish before the server checks
        # their certificate); the hub then refused it, counted above.
        assert any("rank 1 side" in e and "UNKNOWN_CA" in e for e in mitm.errors), mitm.errors
    finally:
        mitm.close()


def test_a_rank_of_another_job_is_refused() -> None:
    """Same node keys, same ranks, different job id: refused by the clear hello, and — if it
    lies about its job there — by the TLS handshake, whose certificate binds the job id."""
    keys = [CurveKeys.generate() for _ in range(2)]
    publics = [k.public for k in keys]
    for lie in (False, True):
        hub = SecureLinks.bind(LOCAL, keys[0], publics, job="job-a")
        other = SecureLinks.bind(LOCAL, keys[1], publics, job="job-b")
        if lie:
            other._job_digest = tlsmod.job_digest("job-a")  # claims job-a in the clear
        opts = [CollectiveOptions(connect_timeout=3.0), CollectiveOptions(connect_timeout=30.0)]
        peers_of = [[Peer(1, other.endpoint, publics[1])], [Peer(0, hub.endpoint, publics[0])]]
        res = in_threads(2, lambda r: CollectiveGroup([hub, other][r], r, 2, peers_of[r], opts[r]), timeout=60)
        assert isinstance(res[1], AuthError), res[1]
        assert ("failed the TLS handshake" if lie else "another job") in str(res[1]), res[1]
        assert isinstance(res[0], CollectiveTimeout), res[0]
        assert hub.refused_connections >= 1
        for links in (hub, other):
            links.close()


def test_wrong_job_status_is_sent_for_a_foreign_digest() -> None:
    keys = [CurveKeys.generate() for _ in range(2)]
    publics = [k.public for k in keys]
    hub = SecureLinks.bind(LOCAL, keys[0], publics, job="job-a")
    joiner = threading.Thread(target=lambda: in_threads(1, lambda _r: CollectiveGroup(
        hub, 0, 2, [Peer(1, "tcp://127.0.0.1:9", publics[1])], CollectiveOptions(connect_timeout=3.0))))
    joiner.start()
    try:
        s = socket.create_connection(parse_endpoint(hub.endpoint))
        s.settimeout(10)
        s.sendall(HELLO.pack(MAGIC, MODE_SECURE, 0, 2, 1, 0, z85.decode(publics[1]), tlsmod.job_digest("job-b")))
        assert _recv_exact(s, STATUS.size)[0] == WRONG_JOB
        s.close()
    finally:
        joiner.join(30)
        hub.close()


def test_plain_and_encrypted_ranks_do_not_mix() -> None:
    keys = [CurveKeys.generate() for _ in range(2)]
    publics = [k.public for k in keys]
    hub = SecureLinks.bind(LOCAL, keys[0], publics)
    worker = SecureLinks.bind(LOCAL, None, plain=True)
    # The hub's expected outcome is its deadline (2 s); the worker is answered as soon as the hub
    # reads its hello, so it may wait long (both had 1 s: a loaded hub could miss the worker).
    hub_opts, worker_opts = CollectiveOptions(connect_timeout=2.0), CollectiveOptions(connect_timeout=30.0)

    def rank(r: int) -> Any:
        if r == 0:
            return CollectiveGroup(hub, 0, 2, [Peer(1, worker.endpoint, publics[1])], hub_opts)
        return CollectiveGroup(worker, 1, 2, [Peer(0, hub.endpoint)], worker_opts)

    hub_result, worker_result = in_threads(2, rank)
    assert isinstance(worker_result, ProtocolError) and "encrypted" in str(worker_result)
    assert isinstance(hub_result, CollectiveError)  # it never got a valid hello: timeout
    assert hub.refused_connections >= 1


def test_record_and_hello_layout() -> None:
    # protocols/collective.md documents this layout; keep them in step.
    assert PREFIX.size == 8 and HELLO.size == 60 and STATUS.size == 1
    assert struct.calcsize("<IBBH") == PREFIX.size
