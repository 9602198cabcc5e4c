"""How values travel: accumulation dtype, wire dtype (optional fp16/bf16 compression), error bound.

All algorithms work on a flat numpy *accumulator* (fp32 for 16/32-bit floats, so 16-bit inputs
are summed without compounding 16-bit rounding) and put a *wire* array in each message:

- the tensor's own dtype by default (bf16 travels as its raw 16-bit words, zero-copy);
- for fp32 tensors, optionally fp16 or bf16 (half the bytes), or ``q8_0`` (blocks of 32 values
  as one fp16 scale + 32 int8 codes: 34 bytes per 32 values, 0.27 of fp32; the precision of
  distributed-llama's q80 sync buffers: each value within 1/254 of its block's largest magnitude
  plus the fp16 rounding of the scale). The receiver always reads the dtype from the frame's
  spec, so a sender may fall back to fp32 for one message — it does so when a value would
  overflow fp16 (|x| > 65504, or a q8 scale would) or is not finite, rather than send inf.

Whoever sends a rounded result applies the same rounding to its own copy, so every rank still
ends with bit-identical tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from edgemesh.collective.buffers import BufferPool

from edgemesh.errors import ProtocolError
from edgemesh.wire.tensor import Q8, Q8_BLOCK, TensorSpec

WIRE_DTYPES = ("float16", "bfloat16", Q8)
Q8_MAX_SCALE = 65504.0  # the scale travels as fp16
# |error| of one q8 rounding, as a fraction of the block's largest magnitude: half a code step
# (1/254) plus the scale's own fp16 rounding (2^-11 relative, times at most 127 codes / 127).
Q8_UNIT = 1 / 254 + 2.0**-10
FP16_MAX = 65504.0
# Unit roundoff (round to nearest) and the absolute error floor from subnormals.
_UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}
_FLOOR = {"float16": 2.0**-25, "bfloat16": 2.0**-134, "float32": 2.0**-150}

_ACC = {
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float32),
    torch.bfloat16: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.int64: np.dtype(np.int64),
    torch.int32: np.dtype(np.int32),
}
# numpy's dtype name lookup is a slow Python property (µs each): map dtypes to names instead.
_NP_NAME = {np.dtype(t): t for t in ("float32", "float16", "float64", "int64", "int32")}
_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
         torch.float64: "float64", torch.int64: "int64", torch.int32: "int32"}


def check_wire_dtype(wire_dtype: str | None) -> None:
    if wire_dtype is not None and wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire compression must be one of {WIRE_DTYPES} or None, got {wire_dtype!r}")


def wire_dtype_for(dtype: torch.dtype, compression: str | None) -> str:
    """What a tensor of ``dtype`` travels as. Compression only ever narrows fp32."""
    if dtype not in _NAME:
        raise TypeError(f"collectives support {sorted(_NAME.values())}, not {dtype}")
    if compression is not None and dtype == torch.float32:
        return compression
    return _NAME[dtype]


def to_accumulator(tensor: torch.Tensor, *, copy: bool, pool: BufferPool | None = None) -> np.ndarray:
    """Flat accumulator-dtype array of ``tensor``. ``copy=False`` may share its memory (read only!).
    A copy comes from ``pool`` when given (recycled memory: no page faults for large ones)."""
    t = tensor.detach()
    if t.dtype not in _ACC:
        raise TypeError(f"collectives support {sorted(_NAME.values())}, not {t.dtype}")
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.reshape(-1).to(torch.float32).numpy()  # a fresh array either way
    arr = t.contiguous().numpy().reshape(-1)  # numpy's reshape is cheaper than torch's
    if not copy:
        return arr
    if pool is None:
        return arr.copy()
    out = np.frombuffer(pool.take(arr.nbytes), dtype=arr.dtype)  # holds the lent block (see buffers.py)
    out[:] = arr
    return out


def from_accumulator(acc: np.ndarray, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """Back to a torch tensor of the caller's dtype and shape (shares memory when it can)."""
    t = torch.from_numpy(acc.reshape(tuple(shape)))
    return t if t.dtype == dtype else t.to(dtype)


def encode(acc: np.ndarray, wire: str) -> tuple[TensorSpec, Any]:
    """Accumulator values → (spec, buffer) for one tensor frame; zero-copy when no cast is needed."""
    shape = (int(acc.size),)
    acc_name = _NP_NAME[acc.dtype]
    if wire == acc_name:
        return TensorSpec(wire, shape), acc
    if wire == "float16":
        if acc.size and max(float(acc.max()), -float(acc.min())) > FP16_MAX:
            return TensorSpec(acc_name, shape), acc  # would overflow: send exact instead
        return TensorSpec("float16", shape), acc.astype(np.float16)
    if wire == "bfloat16":
        words = torch.from_numpy(acc).to(torch.bfloat16).view(torch.int16).numpy()
        return TensorSpec("bfloat16", shape), words
    if wire == Q8 and acc.dtype == np.float32:
        packed = q8_encode(acc)
        return (TensorSpec(Q8, shape), packed) if packed is not None else (TensorSpec(acc_name, shape), acc)
    raise ProtocolError(f"cannot put {acc_name} values on the wire as {wire}")


def q8_encode(values: np.ndarray) -> np.ndarray | None:
    """fp32 values → the q8_0 frame (all fp16 scales, then all int8 codes); None when a value
    is not finite or a block's scale would overflow fp16 (the caller then sends fp32)."""
    n = values.size
    blocks = -(-n // Q8_BLOCK)
    if n % Q8_BLOCK:
        padded = np.zeros(blocks * Q8_BLOCK, dtype=np.float32)
        padded[:n] = values
        values = padded
    x = values.reshape(blocks, Q8_BLOCK)
    amax = np.abs(x).max(axis=1) if n else np.zeros(0, dtype=np.float32)
    if not np.isfinite(amax).all() or (amax.size and float(amax.max()) / 127 > Q8_MAX_SCALE):
        return None
    scale16 = (amax / 127).astype(np.float16)
    scale = scale16.astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    codes = np.clip(np.rint(x * inv[:, None]), -127, 127).astype(np.int8)
    out = np.empty(blocks * (2 + Q8_BLOCK), dtype=np.uint8)
    out[:2 * blocks] = scale16.view(np.uint8)
    out[2 * blocks:] = codes.reshape(-1).view(np.uint8)
    return out


def q8_decode(buf: Any, n: int) -> np.ndarray:
    """A q8_0 frame of ``n`` values → fp32 (a fresh array)."""
    blocks = -(-n // Q8_BLOCK)
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size != blocks * (2 + Q8_BLOCK):
        raise ProtocolError(f"q8_0 frame of {raw.size} bytes for {n} values")
    scale = raw[:2 * blocks].view(np.float16).astype(np.float32)
    codes = raw[2 * blocks:].view(np.int8).reshape(blocks, Q8_BLOCK).astype(np.float32)
    codes *= scale[:, None]
    return codes.reshape(-1)[:n]


def decode(spec: TensorSpec, buf: Any, acc_dtype: np.dtype) -> np.ndarray:
    """A received frame as accumulator-dtype values (a zero-copy view when the dtypes match)."""
    if len(spec.shape) != 1:
        raise ProtocolError(f"collective frames are flat, got shape {list(spec.shape)}")
    if spec.dtype == _NP_NAME[acc_dtype]:
        return np.frombuffer(buf, dtype=acc_dtype)
    if spec.dtype == "float16" and acc_dtype == np.float32:
        return np.frombuffer(buf, dtype=np.float16).astype(np.float32)
    if spec.dtype == "bfloat16" and acc_dtype == np.float32:
        # bf16 is the top half of an fp32: widening is a shift, exact.
        words = np.frombuffer(buf, dtype=np.uint16).astype(np.uint32)
        return (words << 16).view(np.float32)
    if spec.dtype == Q8 and acc_dtype == np.float32:
        return q8_decode(buf, spec.shape[0])
    raise ProtocolError(f"a {spec.dtype} frame cannot be summed into {_NP_NAME[acc_dtype]}")


def add_into(acc: np.ndarray, spec: TensorSpec, buf: Any) -> None:
    """``acc += decoded frame`` with no temporary when the dtypes match (the common case)."""
    if spec.dtype == "float16" and acc.dtype == np.float32:
        np.add(acc, np.frombuffer(buf, dtype=np.float16), out=acc)  # ufunc widens per element
        return
    np.add(acc, decode(spec, buf, acc.dtype), out=acc)


def round_trip(acc: np.ndarray, wire: str) -> tuple[TensorSpec, Any, np.ndarray]:
    """Encode ``acc`` and also return the values receivers will decode (the sender keeps those)."""
    spec, buf = encode(acc, wire)
    if spec.dtype == _NP_NAME[acc.dtype]:
        return spec, buf, acc
    return spec, buf, decode(spec, buf, acc.dtype)


def error_bound(parts: list[torch.Tensor], wire: str, algorithm: str) -> torch.Tensor:
    """Elementwise bound on |result − exact sum| for fp32 ``parts`` sent compressed as ``wire``.

    Star: every worker's part is rounded once, the fp32 sum adds (W−1) fp32 roundings, the
    result is rounded once more. Direct: every part is rounded once, the sum is not rounded
    again. Ring: each of the W−1 partial sums of a chunk is rounded before
    it travels, then the reduced chunk once more. With u the unit roundoff of the wire dtype,
    A = Σ|x_i| and S the exact sum:
        star: u·(A + |S|)·(1+2u) + W·2⁻²³·A + (W+1)·floor
        direct: u·A·(1+2u) + W·2⁻²³·A + W·floor
        ring: u·(W·A + |S|)·(1+2u) + W²·2⁻²³·A + (2W)·floor
    """
    w = len(parts)
    stack = torch.stack([p.double() for p in parts])
    a = stack.abs().sum(0)
    s = stack.sum(0).abs()
    if wire == Q8:  # errors scale with each block's largest magnitude, not with each value
        u32 = _UNIT["float32"]
        k = {"direct": 0, "star": 1, "chunked_star": 1, "ring": w}.get(algorithm)
        if k is None:
            raise ValueError(f"unknown algorithm {algorithm!r}")
        floor = 2.0**-24 * Q8_BLOCK  # fp16 scales below its subnormal range
        return (Q8_UNIT * (sum(_block_max(p.abs()) for p in stack) + (k + 1) * _block_max(a)) * (1 + 2 * u32)
                + w * w * 2 * u32 * a + (w + 1) * floor)
    u, floor, u32 = _UNIT[wire], _FLOOR[wire], _UNIT["float32"]
    if algorithm == "star":
        return u * (a + s) * (1 + 2 * u) + w * 2 * u32 * a + (w + 1) * floor
    if algorithm == "direct":
        return u * a * (1 + 2 * u) + w * 2 * u32 * a + w * floor
    if algorithm in ("ring", "chunked_star"):
        k = w if algorithm == "ring" else 1
        return u * (k * a + s) * (1 + 2 * u) + w * w * 2 * u32 * a + 2 * w * floor
    raise ValueError(f"unknown algorithm {algorithm!r}")


def _block_max(x: torch.Tensor) -> torch.Tensor:
    """Each element replaced by the largest value of its q8 block (x flat, non-negative)."""
    n = x.numel()
    blocks = -(-n // Q8_BLOCK)
    padded = torch.zeros(blocks * Q8_BLOCK, dtype=x.dtype)
    padded[:n] = x.reshape(-1)
    return padded.view(blocks, Q8_BLOCK).amax(1).repeat_interleave(Q8_BLOCK)[:n].view(x.shape)
