"""Benchmarks: side-by-side measurements behind `edgemesh bench …` (their CLI: ``edgemesh/cli/bench_<name>.py``;
not imported by the library), and the link variants they compare the production data plane
against (``zmq_links``)."""
