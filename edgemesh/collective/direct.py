"""Direct allreduce: every rank sends its part to every other rank and adds all of them.

One hop instead of the star's two: no rank waits for a hub to wake, receive, add and answer.
Each rank adds the W parts in rank order 0, 1, …, W−1, starting from rank 0's, which is the
order of the star's hub, so every rank gets the same bits and the same result as the star.
The cost: each rank sends and receives W−1 messages (the star's hub does too, the workers one
each), and W(W−1) messages cross the network instead of 2(W−1); the cost model offers it for
latency-bound (decode-size) messages only. On a compressed wire (``direct_allreduce_rounded``)
each rank sends its part rounded to the wire and adds its own part rounded the same way, so
every rank still adds the same W values in the same order: the same bits everywhere, each
part rounded once and the sum not rounded again.
"""

from __future__ import annotations

import numpy as np

from edgemesh.collective.compress import decode, round_trip
from edgemesh.collective.op import REDUCE, Op, private
from edgemesh.collective.star import _one_frame
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


def direct_allreduce_rounded(op: Op, mine: np.ndarray, wire: str) -> np.ndarray:
    """The direct allreduce on a compressed ``wire`` (fp16, bf16, q8_0): ``mine`` (read only) is
    sent as the wire carries it (``compress.encode``: exact where the wire cannot carry a value),
    each part received is decoded by its own frame's spec, and the W parts, this rank's as the
    others decode it, are added in rank order from rank 0's into a new array."""
    links = op.links
    me, world = links.rank, links.world_size
    peers = [p for p in range(world) if p != me]
    spec, buf, rounded = round_trip(mine, wire)
    if rounded is mine:
        buf = private(buf, links)  # sent as is: links that keep frames after send() get a copy
    for p in peers:
        op.send(p, REDUCE, [(spec, buf)])
    parts = {me: rounded}
    for p in peers:
        env, views, _ = op.recv(p, REDUCE)
        parts[p] = decode(_one_frame(env.tensors, mine.size, p), views[0], mine.dtype)
    out = np.array(parts[0], dtype=mine.dtype, copy=True)
    for r in range(1, world):  # rank order, as everywhere
        np.add(out, parts[r], out=out)
    return out
