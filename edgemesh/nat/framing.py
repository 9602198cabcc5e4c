"""Framing of mesh messages on an ICE data channel. Sans-IO.

A mesh message is a list of frames (envelope + raw tensor buffers, as on zmq). On a data
channel it becomes one *message* (``u32 count`` then ``u32 length + bytes`` per frame), cut
into *chunks* of at most ``CHUNK_BYTES`` with a one-byte header, because SCTP messages are
bounded (aiortc advertises 256 KiB) while a tensor frame may be many MiB. SCTP keeps a
stream's chunks in order, so reassembly is concatenation until the ``LAST`` flag.
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

from edgemesh.errors import ProtocolError

CHUNK_BYTES = 60 * 1024  # payload per SCTP message (< the 64 KiB default any peer accepts)
MAX_FRAMES = 65  # envelope + 64 tensors (wire.envelope.MAX_TENSORS)
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

MORE = 0x00
LAST = 0x01
_U32 = struct.Struct(">I")


def encode_frames(frames: Sequence[Any]) -> bytes:
    views = [memoryview(f).cast("B") for f in frames]
    if not 0 < len(views) <= MAX_FRAMES:
        raise ProtocolError(f"a message has 1..{MAX_FRAMES} frames, not {len(views)}")
    total = 4 + sum(4 + v.nbytes for v in views)
    if total > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {total} bytes exceeds {MAX_MESSAGE_BYTES}")
    out = bytearray(_U32.pack(len(views)))
    for v in views:
        out += _U32.pack(v.nbytes)
        out += v
    return bytes(out)


def decode_frames(data: bytes | memoryview) -> list[memoryview]:
    view = memoryview(data).cast("B")
    if view.nbytes < 4:
        raise ProtocolError("message shorter than its frame count")
    (count,) = _U32.unpack_from(view, 0)
    if not 0 < count <= MAX_FRAMES:
        raise ProtocolError(f"a message has 1..{MAX_FRAMES} frames, not {count}")
    pos, frames = 4, []
    for _ in range(count):
        if pos + 4 > view.nbytes:
            raise ProtocolError("message cut inside a frame length")
        (n,) = _U32.unpack_from(view, pos)
        pos += 4
        if pos + n > view.nbytes:
            raise ProtocolError("frame longer than the message")
        frames.append(view[pos:pos + n])
        pos += n
    if pos != view.nbytes:
        raise ProtocolError(f"{view.nbytes - pos} trailing bytes after the last frame")
    return frames


def chunks(message: bytes, size: int = CHUNK_BYTES) -> list[bytes]:
    """The chunks of one message, each ``flag || payload``; an empty message is one LAST chunk."""
    view = memoryview(message)
    parts = [view[i:i + size] for i in range(0, len(view), size)] or [view]
    return [bytes([LAST if i == len(parts) - 1 else MORE]) + bytes(p) for i, p in enumerate(parts)]


class Reassembler:
    """Feeds chunks in arrival order; returns each complete message once."""

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> bytes | None:
        if not isinstance(chunk, (bytes, bytearray)) or not chunk:
            raise ProtocolError("empty or non-binary chunk")
        flag = chunk[0]
        if flag not in (MORE, LAST):
            raise ProtocolError(f"unknown chunk flag {flag:#x}")
        self._size += len(chunk) - 1
        if self._size > self.max_bytes:
            self._parts, self._size = [], 0
            raise ProtocolError(f"message exceeds {self.max_bytes} bytes")
        self._parts.append(bytes(chunk[1:]))
        if flag == MORE:
            return None
        message = b"".join(self._parts)
        self._parts, self._size = [], 0
        return message
