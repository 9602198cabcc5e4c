"""Writing safetensors files laid out for direct (uncached) reads.

A safetensors file is an 8-byte little-endian header length, a JSON header, then the tensors'
bytes back to back (no holes). The format allows trailing spaces in the header; ``save_file``
uses that to reach an 8-byte boundary. We pad further, so that the data starts on a
``PAGE`` (4 KiB) boundary of the file, and put first the tensors whose sizes are multiples of
64 bytes: every such tensor then starts on a 64-byte boundary both in the file and in a
page-aligned buffer the data region is read into. That lets the sliding window read a block
with ``O_DIRECT`` — straight from the disk into its buffer, no page-cache copy, a quarter of
the CPU time of a buffered read (measured: ``weights/window.py``) — and hand the tensors to
the kernels in place. The files stay ordinary safetensors (``safetensors.torch.load_file``
reads them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

PAGE = 4096  # O_DIRECT wants file offsets, buffer addresses and lengths in these units
TENSOR_ALIGN = 64  # a cache line; what the int8 kernels want

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` with the data region page-aligned (see the module doc).

    Deterministic: the same tensors give the same bytes (the store hashes them)."""
    items: list[tuple[str, torch.Tensor]] = []
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be stored")
        items.append((name, t.detach().contiguous().cpu()))
    # aligned sizes first (so they stay aligned), the odd-sized rest after them; by name within
    items.sort(key=lambda kv: (_nbytes(kv[1]) % TENSOR_ALIGN != 0, kv[0]))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    at = 0
    for name, t in items:
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + _nbytes(t)]}
        at += _nbytes(t)
    raw = json.dumps(header, separators=(",", ":")).encode()
    size = -(-(8 + len(raw)) // PAGE) * PAGE - 8  # the data starts on a page boundary
    with open(path, "wb") as f:
        f.write(size.to_bytes(8, "little"))
        f.write(raw + b" " * (size - len(raw)))
        for _, t in items:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
