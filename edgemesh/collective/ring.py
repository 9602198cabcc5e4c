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
from edgemesh.collective.op import REDUCE, RESULT, Op, data_header, private, sender_of
from edgemesh.collective.star import _one_frame, chunk_bounds
from edgemesh.wire.tensor import TensorSpec


def ring_allreduce(op: Op, acc: np.ndarray, wire: str) -> np.ndarray:
    """Sum over ranks into ``acc`` (a writable, private copy of this rank's part)."""
    world, rank = op.links.world_size, op.links.rank
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    bounds = chunk_bounds(acc.size, world)
    native = getattr(op.links, "ring_native", None)
    if native is not None and wire == "float32" and acc.dtype == np.float32 and world > 2:
        scratch = np.frombuffer(op.links.buffers.take(4 * max(hi - lo for lo, hi in bounds)), np.float32)
        if native(nxt, prv, acc, scratch, native_steps(op, bounds), op.deadline):
            return acc
    chunk = [acc[lo:hi] for lo, hi in bounds]

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


def native_steps(op: Op, bounds: list[tuple[int, int]]) -> list[tuple[int, int, bytes, int, int, bytes, bool]]:
    """The ring above as the native links run it (``SecureLinks.ring_native``), exact fp32 wire:
    per step the part sent and its envelope, the part received, the envelope it must come
    with, and whether it is added (reduce-scatter) or copied (allgather). The envelopes are the
    ones ``op.send`` makes and ``op.recv`` takes, so either side may run either path."""
    world, rank = op.links.world_size, op.links.rank
    prv = (rank - 1) % world
    me, seq = sender_of(rank), op.seq

    def env(method: str, sender: int | bytes, c: int) -> bytes:
        lo, hi = bounds[c]
        who = sender if isinstance(sender, bytes) else sender_of(sender)
        return data_header(method, seq, who, c, [TensorSpec("float32", (hi - lo,))])

    steps = []
    for s in range(world - 1):
        c_out, c_in = (rank - s) % world, (rank - s - 1) % world
        steps.append((*bounds[c_out], env(REDUCE, me, c_out), *bounds[c_in], env(REDUCE, prv, c_in), True))
    own = (rank + 1) % world
    out_env = env(RESULT, me, own)
    out = own
    for s in range(world - 1):
        c_in = (rank - s) % world
        in_env = env(RESULT, (rank - s - 1) % world, c_in)  # the chunk's owner made it; it is forwarded as is
        steps.append((*bounds[out], out_env, *bounds[c_in], in_env, False))
        out, out_env = c_in, in_env
    return steps
