"""Progress of a long multi-phase command (launch, generate, plan, bench generate).

On a terminal: one spinner line that each update replaces. Elsewhere (a pipe, a log file, a
test, `ssh host cmd`) a spinner prints nothing at all, so a command waiting on an unreachable
member looked hung: there, every new phase is printed as its own line, and a message that only
updates a counter (the same text once its numbers are masked) at most every ``every`` seconds.
"""

from __future__ import annotations

import re
import time
from types import TracebackType

from rich.console import Console
from rich.markup import escape

_COUNTER = re.compile(r"\d+")


class PhaseProgress:
    def __init__(self, console: Console, first: str = "starting…", every: float = 5.0) -> None:
        self.console = console
        self.first = first
        self.every = every
        self._status = console.status(first) if console.is_terminal else None
        self._last_kind = ""
        self._last_print = 0.0

    def __call__(self, message: str) -> None:
        if self._status is not None:
            self._status.update(escape(message))
            return
        kind = _COUNTER.sub("#", message)
        now = time.monotonic()
        if kind != self._last_kind or now - self._last_print >= self.every:
            self.console.print(f"… {escape(message)}", highlight=False)
            self._last_kind, self._last_print = kind, now

    def __enter__(self) -> PhaseProgress:
        if self._status is not None:
            self._status.start()
        else:
            self(self.first)
        return self

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
