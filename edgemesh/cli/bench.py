"""CLI: `edgemesh bench …` — benchmarks print a table and write JSON with --json FILE (or print it with --json -)."""

from __future__ import annotations

import typer

from edgemesh.cli import app

bench_app = typer.Typer(help="Benchmarks: side-by-side comparisons, printed as a table (--json FILE to save, --json - to print JSON).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
