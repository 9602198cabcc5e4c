"""Benchmarks: side-by-side measurements behind `edgemesh bench …` (not imported by the library)."""
