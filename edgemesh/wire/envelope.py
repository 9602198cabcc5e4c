"""Message envelopes: one msgpack frame, optionally followed by raw tensor frames.

Layout of the first frame (a msgpack array of 7 items, see protocols/wire.md):

    [version, kind, method, rid, sender, body, tensors]

``tensors`` lists the (dtype, shape) of each raw frame that follows. Decoding is strict:
anything that does not match the spec raises ``ProtocolError`` and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Sequence

import msgpack

from edgemesh.errors import ProtocolError
from edgemesh.wire.tensor import TensorSpec, check_frame, spec_from_wire, spec_to_wire

VERSION = 1
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024
MAX_TENSORS = 64
MAX_SENDER_BYTES = 32
MAX_RID = 2**63 - 1
_METHOD_RE = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")


class Kind(IntEnum):
    REQUEST = 0  # expects a REPLY or ERROR with the same rid
    REPLY = 1
    ERROR = 2  # body: {"code": str, "message": str}
    NOTIFY = 3  # one-way; rid is 0


@dataclass(frozen=True)
class Envelope:
    kind: Kind
    method: str
    rid: int
    sender: bytes
    body: Any = None
    tensors: tuple[TensorSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Validate on construction too, so we never *send* what we would refuse to receive.
        _check_fields(self.kind, self.method, self.rid, self.sender, len(self.tensors))


def _check_fields(kind: Any, method: Any, rid: Any, sender: Any, n_tensors: int) -> None:
    if not isinstance(kind, int) or kind not in Kind._value2member_map_:
        raise ProtocolError(f"unknown message kind {kind!r}")
    if not isinstance(method, str) or not _METHOD_RE.match(method):
        raise ProtocolError("method must be 1-64 chars of [a-z0-9_.] starting with a letter")
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid <= MAX_RID:
        raise ProtocolError("request id must be an integer in [0, 2^63)")
    if kind == Kind.NOTIFY and rid != 0:
        raise ProtocolError("a notify message must have rid 0")
    if kind != Kind.NOTIFY and rid == 0:
        raise ProtocolError("requests and replies need a non-zero rid")
    if not isinstance(sender, bytes) or len(sender) > MAX_SENDER_BYTES:
        raise ProtocolError(f"sender must be at most {MAX_SENDER_BYTES} bytes")
    if n_tensors > MAX_TENSORS:
        raise ProtocolError(f"at most {MAX_TENSORS} tensor frames per message")


def encode_envelope(env: Envelope) -> bytes:
    try:
        packed = msgpack.packb(
            [VERSION, int(env.kind), env.method, env.rid, env.sender, env.body,
             [spec_to_wire(s) for s in env.tensors]],
            use_bin_type=True,
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"body is not msgpack-serializable: {exc}") from None
    if len(packed) > MAX_ENVELOPE_BYTES:
        raise ProtocolError(f"envelope of {len(packed)} bytes exceeds {MAX_ENVELOPE_BYTES}")
    return packed


def decode_envelope(data: bytes | memoryview) -> Envelope:
    """Parse the first frame. Raises ``ProtocolError`` for any malformed input."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ProtocolError(f"envelope of {len(data)} bytes exceeds {MAX_ENVELOPE_BYTES}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"malformed msgpack: {exc}") from None
    except (ValueError, TypeError, UnicodeDecodeError, OverflowError, RecursionError) as exc:
        raise ProtocolError(f"malformed msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, list) or len(obj) != 7:
        raise ProtocolError("envelope must be a msgpack array of 7 items")
    version, kind, method, rid, sender, body, tensors = obj
    if version != VERSION or isinstance(version, bool):
        raise ProtocolError(f"unsupported protocol version {version!r} (this node speaks {VERSION})")
    if not isinstance(tensors, list):
        raise ProtocolError("tensor list must be an array")
    _check_fields(kind, method, rid, sender, len(tensors))
    specs = tuple(spec_from_wire(t) for t in tensors)
    return Envelope(Kind(kind), method, rid, sender, body, specs)


def encode_message(env: Envelope, buffers: Sequence[Any] = ()) -> list[Any]:
    """Envelope plus raw buffers as a multipart message (buffers are passed through, zero-copy)."""
    if len(buffers) != len(env.tensors):
        raise ProtocolError(f"{len(env.tensors)} tensor specs but {len(buffers)} buffers")
    for spec, buf in zip(env.tensors, buffers):
        check_frame(spec, memoryview(buf).nbytes)
    return [encode_envelope(env), *buffers]


def decode_message(frames: Sequence[Any]) -> tuple[Envelope, list[memoryview]]:
    """Multipart message → (envelope, one memoryview per tensor frame, sizes checked)."""
    if not frames:
        raise ProtocolError("empty message")
    env = decode_envelope(_as_bytes(frames[0]))
    raw = frames[1:]
    if len(raw) != len(env.tensors):
        raise ProtocolError(f"envelope announces {len(env.tensors)} tensor frames, got {len(raw)}")
    views = []
    for spec, frame in zip(env.tensors, raw):
        view = memoryview(_as_buffer(frame))
        check_frame(spec, view.nbytes)
        views.append(view)
    return env, views


def _as_buffer(frame: Any) -> Any:
    # zmq.Frame exposes .buffer; bytes and memoryview pass through.
    return getattr(frame, "buffer", frame)


def _as_bytes(frame: Any) -> bytes | memoryview:
    buf = _as_buffer(frame)
    return buf if isinstance(buf, (bytes, memoryview)) else bytes(buf)
