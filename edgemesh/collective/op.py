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
        self._sender = _SENDERS[links.rank] if links.rank < len(_SENDERS) else str(links.rank).encode()

    def send(self, peer: int, method: str, tensors: Sequence[tuple[TensorSpec, Any]] = (),
             body: Any = None) -> None:
        self.links.send(peer, [data_header(method, self.seq, self._sender, body, [s for s, _ in tensors]),
                               *(b for _, b in tensors)])

    def send_part(self, peer: int, method: str, spec: TensorSpec, buf: Any) -> None:
        """``send`` of one tensor frame and no body, with the envelope from a template."""
        self.links.send(peer, [part_header(method, self.seq, self._sender, spec), buf])

    def recv_part(self, peer: int, method: str, spec: TensorSpec) -> memoryview:
        """The one tensor frame of ``peer``'s next message, which must be ``method`` of this op
        carrying exactly ``spec`` and no body. The common case costs one byte comparison: the
        envelope must equal the one this rank would send in the peer's place (every field is
        known here). Anything else is decoded in full, so a valid message packed differently is
        still taken and a wrong one raises the same ``ProtocolError`` as ``recv``."""
        frames = self.links.recv(peer, self.deadline)
        if (len(frames) == 2 and isinstance(frames[1], memoryview) and frames[1].nbytes == spec.nbytes
                and frames[0] == part_header(method, self.seq, sender_of(peer), spec)):
            return frames[1]
        env, views = decode_message(frames)
        if env.method != method or env.rid != self.seq or env.body is not None:
            raise ProtocolError(
                f"rank {self.links.rank}: expected {method} #{self.seq} from rank {peer}, got "
                f"{env.method} #{env.rid} {env.body!r}: the ranks are out of step")
        if len(views) != 1 or env.tensors[0] != spec:
            got = [(t.dtype, list(t.shape)) for t in env.tensors]
            raise ProtocolError(f"rank {peer} sent tensor frames {got}, expected one {spec.dtype} "
                                f"{list(spec.shape)}: the ranks called allreduce with different tensor sizes")
        return views[0]

    def part_header(self, method: str, sender: int, spec: TensorSpec) -> bytes:
        """The envelope of ``sender``'s ``method`` message of this op carrying ``spec``."""
        return part_header(method, self.seq, sender_of(sender), spec)

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


_SENDERS = [str(r).encode() for r in range(256)]


def sender_of(rank: int) -> bytes:
    return _SENDERS[rank] if 0 <= rank < len(_SENDERS) else str(rank).encode()


_TEMPLATES: dict[tuple[str, bytes, TensorSpec], tuple[bytes, bytes]] = {}


def part_template(method: str, sender: bytes, spec: TensorSpec) -> tuple[bytes, bytes]:
    """(before, after): ``data_header(method, seq, sender, None, [spec])`` is ``before``, then
    ``msgpack.packb(seq)``, then ``after`` — a msgpack array is the concatenation of its items."""
    key = (method, sender, spec)
    parts = _TEMPLATES.get(key)
    if parts is None:
        if len(_TEMPLATES) > 1024:
            _TEMPLATES.clear()
        head = msgpack.packb([VERSION, int(Kind.REQUEST), method], use_bin_type=True)
        tail = msgpack.packb([sender, None, [spec_to_wire(spec)]], use_bin_type=True)
        parts = _TEMPLATES[key] = (b"\x97" + head[1:], tail[1:])  # fixarray headers: 1 byte each
    return parts


def part_header(method: str, seq: int, sender: bytes, spec: TensorSpec) -> bytes:
    """``data_header(method, seq, sender, None, [spec])``, from a cached template: only the
    sequence number is packed per message."""
    parts = _TEMPLATES.get((method, sender, spec)) or part_template(method, sender, spec)
    return parts[0] + msgpack.packb(seq) + parts[1]


def private(buf: Any, links: Links) -> Any:
    """A buffer safe to send when the caller may overwrite the original right after we return.

    zmq sends large frames (≥ COPY_THRESHOLD) straight from our memory, later, from its I/O
    thread; smaller ones it copies at once. So only large ones need a copy of their own, and
    only on links that keep frames past send() (TCP links are done with them on return).
    """
    if links.retains_frames and memoryview(buf).nbytes >= zmq.COPY_THRESHOLD:
        return buf.copy()
    return buf
