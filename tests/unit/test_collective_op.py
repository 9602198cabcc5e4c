"""``Op``'s template path for one-tensor messages (every decode-step allreduce): envelopes from a
cached template must be byte for byte what ``data_header`` packs, and ``recv_part`` must take
exactly what the full decoder takes and refuse, with the same errors, what it refuses."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from edgemesh.collective.op import REDUCE, RESULT, Op, data_header, part_header
from edgemesh.errors import ProtocolError
from edgemesh.wire.envelope import VERSION, Kind
from edgemesh.wire.tensor import TensorSpec, spec_to_wire

pytestmark = pytest.mark.unit

SPEC = TensorSpec("float32", (576,))


class _Links:
    """Hands ``recv`` the queued messages; records what is sent."""

    rank, world_size, retains_frames = 0, 3, False

    def __init__(self, *messages: list[Any]) -> None:
        self.queue = list(messages)
        self.sent: list[tuple[int, list[Any]]] = []

    def recv(self, peer: int, deadline: float) -> list[Any]:
        return self.queue.pop(0)

    def send(self, peer: int, frames: list[Any]) -> None:
        self.sent.append((peer, frames))


@pytest.mark.parametrize("seq", [1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1])
@pytest.mark.parametrize("spec", [SPEC, TensorSpec("q8_0", (576,)), TensorSpec("float64", (7, 3))])
def test_the_template_packs_what_data_header_packs(seq: int, spec: TensorSpec) -> None:
    for method, sender in ((REDUCE, b"0"), (RESULT, b"12")):
        assert part_header(method, seq, sender, spec) == data_header(method, seq, sender, None, [spec])


def _frame(n: int = 576 * 4) -> memoryview:
    return memoryview(bytearray(range(256)) * (n // 256) + bytearray(n % 256))


def test_recv_part_takes_the_expected_message_and_a_differently_packed_equal_one() -> None:
    tensor = _frame()
    mine = [memoryview(bytearray(part_header(REDUCE, 5, b"2", SPEC))), tensor]
    # the same fields, packed with wider integers than msgpack needs: still a valid message
    wide = msgpack.Packer(use_bin_type=True, autoreset=True)
    odd = b"\x97" + b"\xcc" + bytes([VERSION]) + b"\xcc" + bytes([int(Kind.REQUEST)]) + wide.pack(REDUCE) + \
        b"\xcf" + (5).to_bytes(8, "big") + wide.pack(b"2") + wide.pack(None) + wide.pack([spec_to_wire(SPEC)])
    op = Op(_Links(mine, [memoryview(bytearray(odd)), tensor]), 5, 30.0)
    assert op.recv_part(2, REDUCE, SPEC) is tensor
    assert bytes(op.recv_part(2, REDUCE, SPEC)) == bytes(tensor)


@pytest.mark.parametrize(("frames", "match"), [
    (lambda: [part_header(RESULT, 5, b"2", SPEC), _frame()], "out of step"),          # another method
    (lambda: [part_header(REDUCE, 6, b"2", SPEC), _frame()], "out of step"),          # another op
    (lambda: [data_header(REDUCE, 5, b"2", {"x": 1}, [SPEC]), _frame()], "out of step"),  # a body
    (lambda: [part_header(REDUCE, 5, b"2", TensorSpec("float32", (575,))), _frame(575 * 4)], "different tensor sizes"),
    (lambda: [part_header(REDUCE, 5, b"2", SPEC), _frame(100)], "bytes"),             # frame shorter than its spec
    (lambda: [part_header(REDUCE, 5, b"2", SPEC)], "tensor frames"),                  # frame missing
    (lambda: [msgpack.packb([1, 2, 3]), _frame()], "7 items"),                         # not an envelope
])
def test_recv_part_refuses_what_the_decoder_refuses(frames: Any, match: str) -> None:
    msg = [memoryview(bytearray(f)) if isinstance(f, bytes) else f for f in frames()]
    with pytest.raises(ProtocolError, match=match):
        Op(_Links(msg), 5, 30.0).recv_part(2, REDUCE, SPEC)


def test_send_part_sends_the_template_envelope_and_the_buffer() -> None:
    links = _Links()
    buf = _frame()
    Op(links, 9, 30.0).send_part(1, RESULT, SPEC, buf)
    assert links.sent == [(1, [data_header(RESULT, 9, b"0", None, [SPEC]), buf])]
