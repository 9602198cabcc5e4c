"""Incremental record decoding in tcp_links: records cut at every possible place, several in one
read, frames larger than the read buffer — over a socketpair (no network), plain mode."""

from __future__ import annotations

import random
import socket
import struct
from collections import deque

import pytest

from edgemesh.collective.errors import LinkProtocolError
from edgemesh.collective.tcp_links import INBUF, PREFIX, T_DATA, SecureLinks, _Conn

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
