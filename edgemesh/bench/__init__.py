"""Benchmark logic (the CLI in edgemesh/cli/bench_*.py only parses and prints)."""
