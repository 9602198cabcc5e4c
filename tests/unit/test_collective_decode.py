"""Incremental record decoding in tcp_links: records cut at every possible place, several in one
read, frames larger than the read buffer — over a socketpair (no network), plain mode. Also
``recv``'s short path for a whole small record, and what it leaves to the decoder."""

from __future__ import annotations

import random
import socket
import struct
import time
from collections import deque

import msgpack
import numpy as np
import pytest

from edgemesh.collective.errors import CollectiveTimeout, LinkProtocolError, PeerLost
from edgemesh.collective.tcp_links import INBUF, PREFIX, T_ABORT, T_DATA, SecureLinks, _Conn

pytestmark = pytest.mark.unit


def _record(frames: list[bytes]) -> bytes:
    return PREFIX.pack(sum(map(len, frames)), T_DATA, len(frames), 0) + \
        struct.pack(f"<{len(frames)}I", *map(len, frames)) + b"".join(frames)


@pytest.fixture
def wired():
    a, b = socket.socketpair()
    a.setblocking(False)
    links = SecureLinks(None, "test", None, frozenset(), max_message=1 << 22)  # type: ignore[arg-type]
    links.rank, links.world_size = 0, 2
    conn = _Conn(a, 1, tls=False)
    links._add(conn)
    links._inbox[1] = deque()
    yield links, conn, b
    a.close()
    b.close()


def _received(links: SecureLinks) -> list[list[bytes]]:
    return [[bytes(f) for f in frames] for _, frames in links._inbox[1]]


def test_a_record_cut_at_every_byte_is_decoded_once_complete(wired) -> None:
    links, conn, peer = wired
    frames = [b"envelope", bytes(range(200))]
    wire = _record(frames)
    for i in range(len(wire)):
        peer.sendall(wire[i:i + 1])
        links._fill(conn)
        assert len(links._inbox[1]) == (1 if i == len(wire) - 1 else 0), i
    assert _received(links) == [frames]


@pytest.mark.parametrize("frames", [[b"envelope", b""], [b"envelope", b"", b"x"], [b"", b"tail"]])
def test_a_record_with_an_empty_frame_is_delivered_without_more_bytes(wired, frames) -> None:
    """An empty frame (a rank holding no rows of something sends an empty tensor) needs no
    bytes: its record is complete when its last byte is in, cut anywhere. (An empty last frame
    used to wait for a byte that never came, and the receiver timed out.)"""
    links, conn, peer = wired
    wire = _record(frames)
    for i in range(len(wire)):
        peer.sendall(wire[i:i + 1])
        links._fill(conn)
        assert len(links._inbox[1]) == (1 if i == len(wire) - 1 else 0), i
    assert _received(links) == [frames]


def test_many_records_in_random_pieces_including_frames_larger_than_the_buffer(wired) -> None:
    links, conn, peer = wired
    rng = random.Random(7)
    sent = []
    for k in range(12):
        big = rng.randbytes(rng.choice([10, 3000, INBUF // 2, INBUF + 123, 300_000]))
        sent.append([f"env{k}".encode(), big])
    wire = b"".join(_record(f) for f in sent)
    pos = 0
    while pos < len(wire):
        n = rng.randint(1, 70_000)
        peer.sendall(wire[pos:pos + n])
        pos += n
        links._fill(conn)  # never waits: takes what is there
    links._fill(conn)
    assert _received(links) == sent


def test_an_oversized_header_is_refused_before_its_body(wired) -> None:
    links, conn, peer = wired
    peer.sendall(PREFIX.pack(1 << 23, T_DATA, 1, 0) + struct.pack("<I", 1 << 23))
    with pytest.raises(LinkProtocolError, match="limit"):
        links._fill(conn)


# ---- recv: a whole small record in one read takes a short path; everything else the decoder


def _recv(links: SecureLinks, wait: float = 5.0) -> list[bytes]:
    return [bytes(f) for f in links.recv(1, time.monotonic() + wait)]


def test_recv_of_a_whole_small_record_gives_aligned_frames_of_its_own(wired) -> None:
    links, conn, peer = wired
    frames = [b"an envelope", bytes(range(256)) * 9]
    peer.sendall(_record(frames))
    got = links.recv(1, time.monotonic() + 5)
    assert [bytes(f) for f in got] == frames
    assert np.frombuffer(got[1], np.uint8).ctypes.data % 64 == 0  # the tensor frame starts aligned
    assert links.bytes_received == sum(map(len, frames))
    peer.sendall(_record([b"x", b"y" * 100]))  # the next record reuses the read buffer...
    assert _recv(links) == [b"x", b"y" * 100]
    assert [bytes(f) for f in got] == frames  # ...and the frames already handed out are unchanged


def test_recv_hands_everything_else_to_the_decoder(wired) -> None:
    links, conn, peer = wired
    a, b, c = [b"e1", b"t" * 50], [b"e2", b"u" * 70], [b"three", b"frames", b"here"]
    peer.sendall(_record(a) + _record(b) + _record(c))  # several records in one read
    assert [_recv(links) for _ in range(3)] == [a, b, c]
    wire = _record([b"env", b"v" * 3000])
    peer.sendall(wire[:100])  # a record cut in two: the first recv times out, keeping the part
    with pytest.raises(CollectiveTimeout):
        links.recv(1, time.monotonic() + 0.05)
    peer.sendall(wire[100:])
    assert _recv(links) == [b"env", b"v" * 3000]
    peer.sendall(PREFIX.pack(1 << 23, T_DATA, 2, 0) + struct.pack("<2I", 1 << 22, 1 << 22))
    with pytest.raises(LinkProtocolError, match="limit"):  # refused on the header, as before
        _recv(links)


def test_recv_of_an_abort_record_raises_peer_lost(wired) -> None:
    links, conn, peer = wired
    body = msgpack.packb({"reason": "rank 1: out of memory"})
    peer.sendall(PREFIX.pack(len(body), T_ABORT, 1, 0) + struct.pack("<I", len(body)) + body)
    with pytest.raises(PeerLost):
        _recv(links)
