"""Raw tensor frames: a (dtype, shape) spec in the envelope, the bytes in their own frame.

numpy only (no torch import here, so the control plane stays light); bfloat16 travels as raw
16-bit words and is reinterpreted by the torch side (edgemesh.collective). numpy itself is
imported on first use: the daemon and the CLI (`join`, `status`) never need it, and its import
is a tenth of a second of start-up on a small device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgemesh.errors import ProtocolError

if TYPE_CHECKING:
    import numpy as np

# Wire dtype name → bytes per element. bfloat16 has no numpy dtype: it is carried as uint16.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
}
# Block-quantized wire format (not a numpy dtype): the values in blocks of Q8_BLOCK, each block
# one float16 scale and Q8_BLOCK int8 codes; the frame holds all scales, then all codes (the last
# block zero-padded). Same precision as distributed-llama's q80 buffers.
Q8 = "q8_0"
Q8_BLOCK = 32
DTYPE_SIZES[Q8] = 1  # nominal; the frame size is ``q8_nbytes``
MAX_DIMS = 8
MAX_FRAME_BYTES = 2**31


def q8_nbytes(numel: int) -> int:
    blocks = -(-numel // Q8_BLOCK)
    return blocks * (2 + Q8_BLOCK)


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        if self.dtype == Q8:
            return q8_nbytes(math.prod(self.shape))
        return DTYPE_SIZES[self.dtype] * math.prod(self.shape)


def spec_to_wire(spec: TensorSpec) -> list[Any]:
    return [spec.dtype, list(spec.shape)]


def spec_from_wire(obj: Any) -> TensorSpec:
    if not isinstance(obj, list) or len(obj) != 2:
        raise ProtocolError("tensor spec must be [dtype, shape]")
    dtype, shape = obj
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise ProtocolError(f"unsupported tensor dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise ProtocolError(f"tensor shape must be a list of at most {MAX_DIMS} dims")
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < MAX_FRAME_BYTES:
            raise ProtocolError("tensor dims must be non-negative integers")
    spec = TensorSpec(dtype, tuple(shape))
    if spec.nbytes > MAX_FRAME_BYTES:
        raise ProtocolError(f"tensor of {spec.nbytes} bytes exceeds {MAX_FRAME_BYTES}")
    return spec


def check_frame(spec: TensorSpec, nbytes: int) -> None:
    if nbytes != spec.nbytes:
        raise ProtocolError(
            f"tensor frame has {nbytes} bytes, spec {spec.dtype}{list(spec.shape)} needs {spec.nbytes}"
        )


def array_to_frame(arr: np.ndarray) -> tuple[TensorSpec, memoryview]:
    """A C-contiguous numpy array → (spec, zero-copy buffer)."""
    import numpy as np

    name = arr.dtype.name
    if name not in DTYPE_SIZES or name in ("bfloat16", Q8):
        raise ProtocolError(f"cannot send numpy dtype {name}")
    arr = np.ascontiguousarray(arr)
    return TensorSpec(name, tuple(int(d) for d in arr.shape)), byte_view(arr)


def byte_view(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, zero-copy. An empty array (a rank holding no rows of
    something) is an empty frame: memoryview refuses to cast a view with a zero in its shape."""
    return memoryview(arr).cast("B") if arr.size else memoryview(b"")


def frame_to_array(spec: TensorSpec, buf: Any) -> np.ndarray:
    """Zero-copy view of a received frame; bfloat16 comes back as uint16 words."""
    import numpy as np

    if spec.dtype == Q8:
        raise ProtocolError("a q8_0 frame carries a collective's quantized sums, not an array")
    check_frame(spec, memoryview(buf).nbytes)
    np_dtype = np.uint16 if spec.dtype == "bfloat16" else np.dtype(spec.dtype)
    return np.frombuffer(buf, dtype=np_dtype).reshape(spec.shape)
