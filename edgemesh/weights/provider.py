"""Where a layer gets its weights at call time.

Model code asks ``provider.get(block)`` right before it computes a block and calls
``provider.release(block)`` right after, instead of owning parameters forever. The in-memory
provider keeps everything resident; a sliding-window disk provider (ALGORITHMS §3) implements
the same two calls by loading ahead and dropping behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from edgemesh.errors import ConfigError
from edgemesh.weights.aligned import aligned_tensors, load_aligned


@runtime_checkable
class WeightProvider(Protocol):
    def get(self, block: str) -> dict[str, torch.Tensor]:
        """The tensors of ``block`` (this participant's slice); valid until ``release``."""
        ...

    def release(self, block: str) -> None:
        """The caller holds no reference to ``block`` any more; it may be evicted."""
        ...


class InMemoryProvider:
    """Every block resident in RAM; ``release`` is a no-op.

    Tensors are made 64-byte aligned on the way in (``aligned.py``): whoever built ``blocks``,
    the native kernels the model calls get aligned data. Aligned tensors are kept as they are.
    """

    def __init__(self, blocks: dict[str, dict[str, torch.Tensor]]) -> None:
        self._blocks = {name: aligned_tensors(tensors) for name, tensors in blocks.items()}

    def get(self, block: str) -> dict[str, torch.Tensor]:
        try:
            return self._blocks[block]
        except KeyError:
            raise ConfigError(f"this participant holds no weights for block {block!r}") from None

    def release(self, block: str) -> None:
        pass

    def blocks(self) -> list[str]:
        return list(self._blocks)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self._blocks.values() for t in b.values())

    @classmethod
    def from_files(cls, files: dict[str, Path], dtype: torch.dtype | None = None) -> InMemoryProvider:
        """Load block files (already hash-verified by the caller) into memory."""
        blocks: dict[str, dict[str, torch.Tensor]] = {}
        for name, path in files.items():
            tensors = load_aligned(path)
            if dtype is not None:  # int8 weights stay int8: only float tensors change dtype
                tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
            blocks[name] = tensors
        return cls(blocks)
