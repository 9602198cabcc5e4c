"""Tensors whose data starts on a 64-byte boundary, as native CPU kernels expect.

safetensors returns each tensor at the byte offset it has in the file (header length plus the
sizes of the tensors before it), so a loaded tensor can start anywhere. Some kernels assume
more: ``aten._weight_int8pack_mm`` on a CPU with AVX-512/AMX segfaults when its int8 weight
does not start on a 64-byte boundary (one cache line, one ZMM register). Every loader of weights
that reach the model goes through :func:`load_aligned` (or :func:`aligned_tensors`), which copies
a tensor once, at load, when its pointer is off; aligned tensors are returned as they are.

torch's CPU allocator aligns fresh allocations to 64 bytes (c10 ``gAlignment``); the copy still
checks and over-allocates if an allocator ever gives less.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

ALIGNMENT = 64  # bytes: a cache line and an AVX-512 register


def is_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % ALIGNMENT == 0


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is contiguous and 64-byte aligned, else a contiguous aligned copy."""
    if t.is_contiguous() and is_aligned(t):
        return t
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    if not is_aligned(out):  # an allocator with weaker alignment: carve an aligned window
        nbytes = t.numel() * t.element_size()
        buf = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=t.device)
        skip = -buf.data_ptr() % ALIGNMENT
        out = buf[skip:skip + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def aligned_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: aligned(v) for k, v in tensors.items()}


def load_aligned(path: Path | str) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with every tensor 64-byte aligned."""
    return aligned_tensors(load_file(str(path)))
