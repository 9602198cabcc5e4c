"""Wire values: accumulator/wire dtypes, exact widening, fp16 overflow fallback, malformed frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgemesh.collective.compress import add_into, decode, encode, from_accumulator, round_trip, to_accumulator, wire_dtype_for
from edgemesh.errors import ProtocolError
from edgemesh.wire.tensor import TensorSpec

pytestmark = pytest.mark.unit


def test_compression_only_narrows_fp32() -> None:
    assert wire_dtype_for(torch.float32, "bfloat16") == "bfloat16"
    assert wire_dtype_for(torch.float64, "float16") == "float64"
    assert wire_dtype_for(torch.bfloat16, None) == "bfloat16"
    with pytest.raises(TypeError):
        wire_dtype_for(torch.bool, None)


def test_fp32_wire_is_zero_copy_and_bf16_widening_is_exact() -> None:
    acc = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    spec, buf = encode(acc, "float32")
    assert buf is acc and spec == TensorSpec("float32", (100,))
    spec, buf = encode(acc, "bfloat16")
    got = decode(spec, memoryview(buf).cast("B"), np.dtype(np.float32))
    want = torch.from_numpy(acc).to(torch.bfloat16).float().numpy()
    assert np.array_equal(got, want)


def test_round_trip_gives_the_sender_what_receivers_see() -> None:
    acc = np.linspace(-3, 3, 50, dtype=np.float32)
    spec, buf, mine = round_trip(acc, "float16")
    assert np.array_equal(mine, decode(spec, memoryview(buf).cast("B"), np.dtype(np.float32)))
    assert not np.array_equal(mine, acc)


def test_fp16_overflow_sends_fp32() -> None:
    acc = np.array([70000.0, 1.0], dtype=np.float32)
    spec, buf = encode(acc, "float16")
    assert spec.dtype == "float32" and buf is acc


def test_add_into_widens_fp16_without_a_temporary() -> None:
    acc = np.ones(4, dtype=np.float32)
    part = np.array([0.5, 1.5, -2.0, 1e-3], dtype=np.float16)
    add_into(acc, TensorSpec("float16", (4,)), memoryview(part).cast("B"))
    assert np.array_equal(acc, 1 + part.astype(np.float32))


def test_frames_that_do_not_fit_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError):
        decode(TensorSpec("float32", (2, 2)), b"\0" * 16, np.dtype(np.float32))
    with pytest.raises(ProtocolError):
        decode(TensorSpec("int8", (4,)), b"\0" * 4, np.dtype(np.float32))


def test_accumulator_round_trip_keeps_dtype_and_shape() -> None:
    t = torch.randn(3, 4).to(torch.bfloat16)
    acc = to_accumulator(t, copy=False)
    assert acc.dtype == np.float32 and acc.shape == (12,)
    back = from_accumulator(acc, torch.bfloat16, t.shape)
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)


def test_q8_frames_are_blocks_of_codes_and_scales_within_the_bound() -> None:
    from edgemesh.collective.compress import Q8_UNIT, q8_decode, q8_encode
    from edgemesh.wire.tensor import Q8, q8_nbytes

    rng = np.random.default_rng(3)
    for n in (1, 31, 32, 33, 576, 1000):
        acc = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 50.0], n)).astype(np.float32)
        spec, buf = encode(acc, Q8)
        assert spec == TensorSpec(Q8, (n,)) and spec.nbytes == q8_nbytes(n) == len(buf) == -(-n // 32) * 34
        got = decode(spec, memoryview(buf).cast("B"), np.dtype(np.float32))
        padded = np.zeros(-(-n // 32) * 32, np.float32)
        padded[:n] = np.abs(acc)
        block_max = np.repeat(padded.reshape(-1, 32).max(1), 32)[:n]
        assert (np.abs(got - acc) <= Q8_UNIT * block_max + 1e-12).all()
        assert np.array_equal(got, q8_decode(buf, n))
    assert q8_encode(np.array([1.0, np.inf], np.float32)) is None  # not finite: the caller sends fp32
    spec, buf = encode(np.array([1.0, np.nan], np.float32), Q8)
    assert spec.dtype == "float32"
    spec, buf = encode(np.array([1e8, 1.0], np.float32), Q8)  # scale 1e8/127 overflows fp16
    assert spec.dtype == "float32" and buf[0] == 1e8


def test_q8_round_trip_and_malformed_frames() -> None:
    from edgemesh.wire.tensor import Q8, frame_to_array

    acc = np.linspace(-3, 3, 70, dtype=np.float32)
    spec, buf, mine = round_trip(acc, Q8)
    assert np.array_equal(mine, decode(spec, memoryview(buf).cast("B"), np.dtype(np.float32)))
    assert not np.array_equal(mine, acc)
    with pytest.raises(ProtocolError):
        decode(TensorSpec(Q8, (70,)), bytes(10), np.dtype(np.float32))
    with pytest.raises(ProtocolError):
        frame_to_array(TensorSpec(Q8, (70,)), bytes(TensorSpec(Q8, (70,)).nbytes))
