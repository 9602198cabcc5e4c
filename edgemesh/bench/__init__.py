"""Benchmarks: side-by-side measurements behind `edgemesh bench …` (their CLI is `edgemesh/cli/bench_*.py`;
not imported by the library), and the link variants they compare the production data plane
against (``zmq_links``)."""
