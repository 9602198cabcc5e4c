"""A worker rank's loop: do what the master broadcasts until it says stop.

The master (rank 0) drives the group through ``broadcast_meta``: ``forward`` (run my slices of
every layer on the hidden state broadcast next), ``noop`` (keep-alive while idle), ``probe`` and
``solo`` (measurements for `bench generate`), ``stop``. The same loop serves a worker process
(``runtime.worker_main``) and a thread of an in-process group (``llm.threaded``).
"""

from __future__ import annotations

import torch

from edgemesh.errors import EdgemeshError
from edgemesh.llm.measure import follow_solo
from edgemesh.llm.model import Participant

MAX_PROBES = 10_000
MAX_PROBE_NUMEL = 1 << 24


def follow_master(model: Participant) -> None:
    """Serve the master's ops until ``stop``; ``EdgemeshError`` on an op that makes no sense."""
    while follow_one(model):
        pass


def follow_one(model: Participant) -> bool:
    """Serve one op of the master's; False once told to stop (for callers that measure steps)."""
    group = model.collective
    meta = group.broadcast_meta(None)
    op = meta.get("op")
    if op == "stop":
        return False
    if op == "noop":
        return True
    if op == "probe":  # time allreduces of one decode step's size
        n, numel = meta.get("n"), meta.get("numel")
        if not isinstance(n, int) or not isinstance(numel, int) or not (0 < n <= MAX_PROBES and 0 < numel <= MAX_PROBE_NUMEL):
            raise EdgemeshError("bad probe from the master")
        probe = torch.zeros(1, 1, numel)
        for _ in range(n):
            group.allreduce_sum(probe)
        return True
    if op == "solo":  # my compute alone, all ranks at once
        follow_solo(model, meta)
        return True
    if op != "forward":
        raise EdgemeshError(f"unknown op from the master: {op!r}")
    start_pos = meta.get("start_pos")
    if not isinstance(start_pos, int) or start_pos < 0:
        raise EdgemeshError("bad start_pos from the master")
    model.run_layers(group.broadcast(None), start_pos)
    return True
