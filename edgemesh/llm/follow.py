"""A worker rank's loop: do what the master broadcasts until it says stop.

The master (rank 0) drives the group through ``broadcast_meta``: ``forward`` (run my slices of
every layer on the hidden state broadcast next, overlapped in two chunks if it says so, then my head rows, ending with one gather of
either my logits or my summary for the token choice), ``logits`` (send the last step's logits
slice: a sampled choice the summaries did not decide), ``noop`` (keep-alive while idle), ``probe`` and
``solo`` (measurements for `bench generate`), ``stop``. The same loop serves a worker process
(``runtime.worker_main``) and a thread of an in-process group (``llm.threaded``).
"""

from __future__ import annotations

import torch

from edgemesh.errors import EdgemeshError
from edgemesh.llm.choice import Choice
from edgemesh.llm.measure import follow_solo
from edgemesh.llm.model import Participant, decode_allreduce

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
        allreduce = decode_allreduce(group, numel)
        for _ in range(n):
            allreduce(probe)
        return True
    if op == "logits":  # the last choice was not decided by the candidates: send my slice
        model.send_last_logits()
        return True
    if op == "solo":  # my compute alone, all ranks at once
        follow_solo(model, meta)
        return True
    if op != "forward":
        raise EdgemeshError(f"unknown op from the master: {op!r}")
    start_pos = meta.get("start_pos")
    if not isinstance(start_pos, int) or start_pos < 0:
        raise EdgemeshError("bad start_pos from the master")
    overlap = meta.get("overlap", False)
    if not isinstance(overlap, bool):
        raise EdgemeshError("bad overlap flag from the master")
    h = model.run_layers(group.broadcast(None), start_pos, overlap=overlap)
    head = meta.get("head")
    if head == "logits":
        last_only = meta.get("last_only")
        if not isinstance(last_only, bool):
            raise EdgemeshError("bad last_only from the master")
        model.head_logits(h, last_only)
    elif head == "choose":
        model.choose_step(h, Choice.from_meta(meta.get("choice")))
    else:
        raise EdgemeshError(f"unknown head op from the master: {head!r}")
    return True
