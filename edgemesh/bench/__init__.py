"""Benchmarks: side-by-side measurements behind `edgemesh bench …` (their CLI: ``edgemesh/cli/bench_<name>.py``)."""
