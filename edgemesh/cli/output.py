"""One ``--json`` convention for every command: ``--json PATH`` writes the result as JSON to PATH
(beside the usual table); ``--json -`` prints the JSON on stdout, and nothing else goes there
(no table, or the table on stderr), so ``edgemesh status --json - | jq`` works."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console

STDOUT = "-"


def json_option(what: str = "the result") -> Any:
    return typer.Option(None, "--json", metavar="PATH",
                        help=f"Write {what} as JSON to PATH ('-': print it on stdout instead of the table).")


def to_stdout(path: str | None) -> bool:
    return path == STDOUT


def table_console(path: str | None) -> Console:
    """Where a command's table goes: stdout, unless the JSON does."""
    return Console(stderr=to_stdout(path))


def write_json(path: str | None, data: Any, *, indent: int = 1, default: Callable[[Any], Any] | None = None,
               note: Callable[[str], None] | None = None) -> None:
    """Nothing when ``path`` is None; stdout for ``-``; else the file, then ``note('wrote PATH')``."""
    if path is None:
        return
    text = json.dumps(data, indent=indent, default=default)
    if to_stdout(path):
        print(text)
        return
    Path(path).write_text(text + "\n")
    if note is not None:
        note(f"wrote {path}")
