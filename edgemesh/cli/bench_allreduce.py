"""CLI: `edgemesh bench` sub-command (placeholder until its issue lands)."""

from __future__ import annotations

from edgemesh.cli.bench import bench_app  # noqa: F401
