"""CLI: node commands (placeholder until its issue lands)."""

from __future__ import annotations

from edgemesh.cli import app  # noqa: F401
