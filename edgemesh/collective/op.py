"""One collective operation on the wire: numbered messages with a shared deadline.

Every rank calls the same collectives in the same order, so each operation gets the same
sequence number everywhere; it travels as the envelope's ``rid``. A message whose method,
number or step is not the one expected means the ranks disagree about the program (a bug or a
restarted peer): that raises ``ProtocolError`` at once instead of summing the wrong tensors.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import msgpack
import zmq

from edgemesh.collective.members import Links
from edgemesh.errors import ProtocolError
from edgemesh.wire.envelope import VERSION, Envelope, Kind, decode_message
from edgemesh.wire.tensor import TensorSpec, spec_to_wire

REDUCE = "coll.reduce"  # a part travelling to whoever sums it
RESULT = "coll.result"  # a summed part travelling back
BCAST = "coll.bcast"
META = "coll.meta"
GATHER = "coll.gather"  # one rank's part travelling to the root of a gather


class Op:
    def __init__(self, links: Links, seq: int, timeout: float) -> None:
        self.links = links
        self.seq = seq
        self.deadline = time.monotonic() + timeout
        self._sender = str(links.rank).encode()

    def send(self, peer: int, method: str, tensors: Sequence[tuple[TensorSpec, Any]] = (),
             body: Any = None) -> None:
        self.links.send(peer, [data_header(method, self.seq, self._sender, body, [s for s, _ in tensors]),
                               *(b for _, b in tensors)])

    def send_frames(self, peer: int, frames: Sequence[Any]) -> None:
        """Forward a received message unchanged (ring allgather): no decode, no copy."""
        self.links.send(peer, frames)

    def recv(self, peer: int, method: str, body: Any = None) -> tuple[Envelope, list[memoryview], list[Any]]:
        """Next message from ``peer``; must be ``method`` of this op (and ``body`` if given)."""
        frames = self.links.recv(peer, self.deadline)
        env, views = decode_message(frames)
        if env.method != method or env.rid != self.seq or (body is not None and env.body != body):
            raise ProtocolError(
                f"rank {self.links.rank}: expected {method} #{self.seq} {body if body is not None else ''} "
                f"from rank {peer}, got {env.method} #{env.rid} {env.body!r}: the ranks are out of step")
        return env, views, frames


def data_header(method: str, seq: int, sender: bytes, body: Any, specs: Sequence[TensorSpec]) -> bytes:
    """The envelope of a data-plane request, byte for byte what ``encode_envelope`` makes.

    Packed directly because every field comes from this module (method constants, our own
    sequence number and specs), so validating them again costs ~3 µs per message for
    nothing on the decode-step path; a unit test pins the bytes to ``encode_envelope``.
    """
    return msgpack.packb([VERSION, int(Kind.REQUEST), method, seq, sender, body,
                          [spec_to_wire(s) for s in specs]], use_bin_type=True)


def private(buf: Any, links: Links) -> Any:
    """A buffer safe to send when the caller may overwrite the original right after we return.

    zmq sends large frames (≥ COPY_THRESHOLD) straight from our memory, later, from its I/O
    thread; smaller ones it copies at once. So only large ones need a copy of their own, and
    only on links that keep frames past send() (TCP links are done with them on return).
    """
    if links.retains_frames and memoryview(buf).nbytes >= zmq.COPY_THRESHOLD:
        return buf.copy()
    return buf
