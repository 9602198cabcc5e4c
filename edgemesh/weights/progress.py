"""The progress callback that long weight operations report to (the CLI draws it with rich)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, done: int, total: int, what: str) -> None: ...
