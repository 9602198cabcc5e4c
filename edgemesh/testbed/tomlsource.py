"""Where a key sits in a TOML file, so validation errors can name the line.

tomllib returns plain dicts without positions. Scenario files are simple (tables, arrays of
tables, ``key = value`` lines), so a line scan recovers the line of every key path well enough
for error messages; anything it cannot place falls back to the line of its table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\.\"' ]+?)\s*=")


def _split_dotted(text: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in text.split("."))


@dataclass
class KeyLines:
    """Maps key paths such as ``("sites", "home", "nat")`` to 1-based line numbers."""

    lines: dict[tuple[str, ...], int] = field(default_factory=dict)

    @classmethod
    def scan(cls, text: str) -> KeyLines:
        out: dict[tuple[str, ...], int] = {}
        array_counts: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            header = _HEADER.match(line)
            if header:
                path = _split_dotted(header.group(2))
                if header.group(1) == "[[":
                    index = array_counts.get(path, 0)
                    array_counts[path] = index + 1
                    path = path + (str(index),)
                table = path
                out.setdefault(table, number)
                continue
            key = _KEY.match(line)
            if key:
                out.setdefault(table + _split_dotted(key.group(1)), number)
        return cls(out)

    def line_of(self, path: tuple[str, ...]) -> int | None:
        """The line of ``path`` or of its closest enclosing table that has one."""
        for end in range(len(path), 0, -1):
            found = self.lines.get(path[:end])
            if found is not None:
                return found
        return None
