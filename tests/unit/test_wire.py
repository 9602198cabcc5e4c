from __future__ import annotations

import json
import random
from pathlib import Path

import msgpack
import numpy as np
import pytest

from edgemesh.errors import ProtocolError
from edgemesh.wire.envelope import (
    Envelope,
    Kind,
    decode_envelope,
    decode_message,
    encode_envelope,
    encode_message,
)
from edgemesh.wire.tensor import TensorSpec, array_to_frame, frame_to_array

pytestmark = pytest.mark.unit

VECTORS = json.loads((Path(__file__).parents[2] / "protocols/vectors/envelopes.json").read_text())


@pytest.mark.parametrize("vec", VECTORS["valid"], ids=lambda v: v["name"])
def test_golden_valid_vectors_decode_and_reencode_byte_for_byte(vec):
    data = bytes.fromhex(vec["hex"])
    env = decode_envelope(data)
    assert env.kind == vec["kind"]
    assert env.method == vec["method"]
    assert env.rid == vec["rid"]
    assert env.sender == bytes.fromhex(vec["sender_hex"])
    assert env.body == vec["body"]
    assert [[t.dtype, list(t.shape)] for t in env.tensors] == vec["tensors"]
    assert encode_envelope(env) == data


@pytest.mark.parametrize("vec", VECTORS["invalid"], ids=lambda v: v["name"])
def test_golden_invalid_vectors_raise_protocol_error(vec):
    with pytest.raises(ProtocolError, match=vec["error"]):
        decode_envelope(bytes.fromhex(vec["hex"]))


def test_tensor_frames_roundtrip_zero_copy():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    spec, buf = array_to_frame(a)
    env = Envelope(Kind.REQUEST, "collective.allreduce", 5, b"n1", {"step": 1}, (spec,))
    frames = encode_message(env, [buf])
    got_env, views = decode_message(frames)
    got = frame_to_array(got_env.tensors[0], views[0])
    np.testing.assert_array_equal(got, a)
    # The received array is a view of the frame, not a copy.
    assert got.base is not None


def test_frame_size_mismatch_is_refused():
    env = Envelope(Kind.REQUEST, "x", 1, b"", None, (TensorSpec("float32", (4,)),))
    with pytest.raises(ProtocolError, match="needs 16"):
        decode_message([encode_envelope(env), b"\0" * 15])
    with pytest.raises(ProtocolError, match="tensor frames"):
        decode_message([encode_envelope(env)])


def test_unserializable_body_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        encode_envelope(Envelope(Kind.REQUEST, "x", 1, b"", {"f": object()}))


def test_seeded_fuzz_only_protocol_errors():
    """Random and mutated envelopes: the decoder raises ProtocolError or returns, nothing else."""
    rng = random.Random(1234)
    seeds = [bytes.fromhex(v["hex"]) for v in VECTORS["valid"]]
    for i in range(5000):
        if i % 2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 6)):
                op = rng.randrange(3)
                pos = rng.randrange(len(data) + 1)
                if op == 0 and data:
                    data[min(pos, len(data) - 1)] = rng.getrandbits(8)
                elif op == 1:
                    data[pos:pos] = bytes([rng.getrandbits(8)])
                elif data:
                    del data[min(pos, len(data) - 1)]
            data = bytes(data)
        try:
            decode_envelope(data)
        except ProtocolError:
            pass


def test_deeply_nested_body_is_refused_not_crashing():
    nested = b"\x91" * 100000 + b"\xc0"  # 100k nested arrays as the body
    head = msgpack.packb([1, 0, "x", 1, b""], use_bin_type=True)[1:]  # drop the 5-item header
    with pytest.raises(ProtocolError):
        decode_envelope(b"\x97" + head + nested + b"\x90")


@pytest.mark.parametrize("shape", [(0,), (1, 1, 0), (3, 0, 2)])
def test_an_empty_array_is_an_empty_frame(shape: tuple[int, ...]) -> None:
    """A rank holding no rows of something (e.g. no vocabulary rows of the head) sends an
    empty tensor: an empty frame with its shape, not a memoryview error."""
    import numpy as np

    spec, buf = array_to_frame(np.zeros(shape, np.float32))
    assert spec.shape == shape and buf.nbytes == 0
    assert frame_to_array(spec, bytes(buf)).shape == shape
