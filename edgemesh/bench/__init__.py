"""Benchmark logic (their CLI lives in ``edgemesh/cli/bench_<name>.py``)."""
