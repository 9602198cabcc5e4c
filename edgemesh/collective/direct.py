"""Direct allreduce: every rank sends its part to every other rank and adds all of them.

One hop instead of the star's two: no rank waits for a hub to wake, receive, add and answer.
Each rank adds the W parts in rank order 0, 1, …, W−1, starting from rank 0's, which is the
order of the star's hub, so every rank gets the same bits and the same result as the star.
The cost: each rank sends and receives W−1 messages (the star's hub does too, the workers one
each), and W(W−1) messages cross the network instead of 2(W−1); the cost model offers it for
latency-bound (decode-size) messages only. Exact wires only: a compressed wire keeps the star,
whose hub rounds the sum once for everybody.
"""

from __future__ import annotations

import numpy as np

from edgemesh.collective.op import REDUCE, Op, private
from edgemesh.wire.tensor import TensorSpec


def direct_allreduce(op: Op, mine: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Sum over ranks of ``mine`` (read only) as a new array, the same on every rank."""
    links = op.links
    me, world = links.rank, links.world_size
    peers = [p for p in range(world) if p != me]
    sent = 0
    exchange = getattr(links, "direct_exchange", None)
    if exchange is not None and mine.dtype == np.float32:
        sent, out = exchange(op.part_header(REDUCE, me, spec), mine,
                             [op.part_header(REDUCE, p, spec) for p in peers], op.deadline)
        if out is not None:
            return out
    return finish_direct(op, mine, spec, sent)


def finish_direct(op: Op, mine: np.ndarray, spec: TensorSpec, sent: int) -> np.ndarray:
    """The rest of a direct allreduce in Python, after ``sent`` other ranks (in rank order)
    already got this rank's part."""
    links = op.links
    me, world = links.rank, links.world_size
    peers = [p for p in range(world) if p != me]
    buf = private(mine, links)  # links that keep frames after send() get their own copy
    for p in peers[sent:]:
        op.send_part(p, REDUCE, spec, buf)
    parts = {p: np.frombuffer(op.recv_part(p, REDUCE, spec), mine.dtype) for p in peers}
    parts[me] = mine
    out = parts[0].copy()
    for r in range(1, world):  # rank order: the star hub's sum, bit for bit
        np.add(out, parts[r], out=out)
    return out
