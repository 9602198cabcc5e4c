"""CLI: `edgemesh bench …` — benchmarks print a table and write JSON with --json FILE (or print it with --json -)."""

from __future__ import annotations

from typing import Any

import typer

from edgemesh.cli import app

bench_app = typer.Typer(help="Benchmarks: side-by-side comparisons, printed as a table (--json FILE to save, --json - to print JSON).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def sigterm_as_exit(signum: int, frame: Any) -> None:
    """SIGTERM as SystemExit, so a benchmark unwinds through the finally blocks that end its
    workers and tear down its testbed."""
    raise SystemExit(128 + signum)
