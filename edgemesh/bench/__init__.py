"""Benchmarks: the measuring logic behind `edgemesh bench …` (their CLI is `edgemesh/cli/bench_*.py`),
and the link variants they compare the production data plane against (``zmq_links``)."""
