"""Recycled large buffers for received frames and accumulators.

A fresh 1 MiB array costs ~0.7 ms here in page faults: glibc hands large freed blocks back to
the kernel, so every allreduce of a prefill-size message re-faulted its receive buffers and its
accumulator (measured: W=2 1 MiB star 2.3 → 1.0 ms per op once allocations stopped faulting).
Frames handed to callers must stay theirs as long as they keep them, so a buffer is lent, not
owned: ``take`` returns a memoryview whose exporter is a fresh array object viewing a pooled
block; when the last reference to that object is gone, the block returns to the pool.
Everything derived from the memoryview (slices, ``np.frombuffer``, ``torch.from_numpy`` of
that) holds the exporter, so a block cannot come back while anything still reads it. (It is
a memoryview, not the array, on purpose: numpy views of an array skip intermediate arrays and
reference the block directly, which would return it too early.)
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

MIN_POOLED = 64 * 1024  # smaller arrays come from numpy's own small-block cache: no faults
PER_SIZE = 4
MAX_BYTES = 64 * 1024 * 1024  # idle blocks kept at most


class BufferPool:
    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self._free: dict[int, list[np.ndarray]] = {}
        self._held = 0
        self._max = max_bytes
        self._lock = threading.Lock()  # blocks come back from whichever thread drops the last reference

    def take(self, nbytes: int) -> memoryview:
        """``nbytes`` writable bytes (contents undefined), the caller's to keep."""
        if nbytes < MIN_POOLED:
            return memoryview(np.empty(nbytes, np.uint8))
        with self._lock:
            free = self._free.get(nbytes)
            block = free.pop() if free else None
            if block is not None:
                self._held -= nbytes
        if block is None:
            block = np.empty(nbytes, np.uint8)
        lent = block.view()
        weakref.finalize(lent, self._give, block)
        return memoryview(lent)

    def _give(self, block: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault(block.nbytes, [])
            if len(free) < PER_SIZE and self._held + block.nbytes <= self._max:
                free.append(block)
                self._held += block.nbytes

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return self._held


__all__ = ["BufferPool"]
