"""CLI: `edgemesh bench …` — benchmarks print a table and write JSON with --json."""

from __future__ import annotations

import typer

from edgemesh.cli import app

bench_app = typer.Typer(help="Benchmarks: side-by-side comparisons, printed as a table (--json to save).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
