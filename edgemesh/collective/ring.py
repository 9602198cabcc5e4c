"""Ring allreduce: reduce-scatter then allgather, 2(W−1) steps of M/W bytes each.

Every rank sends and receives the same number of bytes, 2(W−1)·M/W — no hub link carrying
(W−1)·M — at the price of 2(W−1) sequential hops. So it pays for large (prefill) messages on
links where bandwidth, not latency, dominates.

The tensor is cut into W chunks. In reduce-scatter step s, rank r sends chunk r−s to the next
rank and adds chunk r−s−1 from the previous one; after W−1 steps it holds the full sum of
chunk r+1. In allgather the summed chunks travel once around the ring, forwarded unchanged.
Each chunk is summed in a fixed order (starting at its rank), so results are the same on every
run, and equal the star's result up to fp32 rounding (a different summation order).
"""

from __future__ import annotations

import numpy as np

from edgemesh.collective.compress import add_into, decode, encode, round_trip
from edgemesh.collective.op import REDUCE, RESULT, Op, private
from edgemesh.collective.star import _one_frame, chunk_bounds


def ring_allreduce(op: Op, acc: np.ndarray, wire: str) -> np.ndarray:
    """Sum over ranks into ``acc`` (a writable, private copy of this rank's part)."""
    world, rank = op.links.world_size, op.links.rank
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    chunk = [acc[lo:hi] for lo, hi in chunk_bounds(acc.size, world)]

    for s in range(world - 1):
        c_out, c_in = (rank - s) % world, (rank - s - 1) % world
        # Sent straight from `acc`: chunk c_out is never written again in this phase, and
        # allgather overwrites it only with its fully reduced value, which cannot come back
        # to us before the next rank has received this message (it is part of that sum).
        op.send(nxt, REDUCE, [encode(chunk[c_out], wire)], c_out)
        env, views, _ = op.recv(prv, REDUCE, c_in)
        add_into(chunk[c_in], _one_frame(env.tensors, chunk[c_in].size, prv), views[0])

    own = (rank + 1) % world
    spec, buf, mine = round_trip(chunk[own], wire)
    if mine is not chunk[own]:
        chunk[own][:] = mine  # every rank must hold the same (rounded) values
    else:
        buf = private(buf, op.links)  # nothing orders this send before the caller reuses `acc`
    op.send(nxt, RESULT, [(spec, buf)], own)
    for s in range(world - 1):
        c_in = (rank - s) % world
        env, views, frames = op.recv(prv, RESULT, c_in)
        chunk[c_in][:] = decode(_one_frame(env.tensors, chunk[c_in].size, prv), views[0], acc.dtype)
        if s < world - 2:
            op.send_frames(nxt, frames)  # forward as received: no decode, no re-encode, no copy
    return acc
