"""Run one function in several threads at once (tests of code that must be thread-safe)."""

from __future__ import annotations

import threading
from typing import Any, Callable


def in_threads(n: int, fn: Callable[[int], Any], timeout: float = 60.0) -> list[Any]:
    """``fn(i)`` for i in 0..n-1, each in its own thread, started together; their results
    (None for a thread that raised or did not finish within ``timeout``)."""
    out: list[Any] = [None] * n

    def body(i: int) -> None:
        out[i] = fn(i)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return out
