"""Ring allreduce: reduce-scatter then allgather, 2(W−1) steps of M/W bytes each.

Every rank sends and receives the same number of bytes, 2(W−1)·M/W — no hub link carrying
(W−1)·M — at the price of 2(W−1) sequential hops. So it pays for large (prefill) messages on
links where bandwidth, not latency, dominates.

The tensor is cut into W chunks. In reduce-scatter step s, rank r sends chunk r−s to the next
rank and adds chunk r−s−1 from the previous one; after W−1 steps it holds the full sum of
chunk r+1. In allgather the summed chunks travel once around the ring, forwarded unchanged.
Each chunk is summed in a fixed order (starting at its rank), so results are the same on every
run, and equal the star's result up to fp32 rounding (a different summation order).

Over links with a native side (``SecureLinks.ring_native``) an fp32 or q8_0 op runs all its
steps in one C call, planned here by ``native_steps``: the same records, the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemesh.collective.compress import add_into, decode, encode, round_trip
from edgemesh.collective.op import REDUCE, RESULT, Op, data_header, private, sender_of
from edgemesh.collective.star import _one_frame, chunk_bounds
from edgemesh.collective.native import RING_ENCODE, RING_FORWARD, RING_OWN_RESULT
from edgemesh.wire.tensor import Q8, TensorSpec


def ring_allreduce(op: Op, acc: np.ndarray, wire: str) -> np.ndarray:
    """Sum over ranks into ``acc`` (a writable, private copy of this rank's part)."""
    world, rank = op.links.world_size, op.links.rank
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    bounds = chunk_bounds(acc.size, world)
    native = getattr(op.links, "ring_native", None)
    if native is not None and wire in ("float32", Q8) and acc.dtype == np.float32 and world > 2:
        if native(nxt, prv, acc, native_steps(op, bounds, wire), op.deadline):
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


@dataclass(frozen=True)
class NativeStep:
    """One step of the ring as ``SecureLinks.ring_native`` runs it: the part sent (and how), the
    envelopes it may go with, the part received, the envelopes it may come with, and whether it
    is added (reduce-scatter) or copied (allgather). Envelopes: (fp32's, q8_0's or None)."""

    send: tuple[int, int]
    mode: int  # native.RING_ENCODE / RING_OWN_RESULT / RING_FORWARD
    send_envs: tuple[bytes, bytes | None]
    recv: tuple[int, int]
    recv_envs: tuple[bytes, bytes | None]
    add: bool


def native_steps(op: Op, bounds: list[tuple[int, int]], wire: str) -> list[NativeStep]:
    """The ring above, step by step, for the native links (fp32 or q8_0 wire). The envelopes
    are the ones ``op.send`` makes and ``op.recv`` takes, so either side may run either path; on
    the q8_0 wire a part may travel as fp32 (``compress.encode``), so each has both."""
    world, rank = op.links.world_size, op.links.rank
    prv = (rank - 1) % world
    seq = op.seq

    def envs(method: str, sender: int, c: int) -> tuple[bytes, bytes | None]:
        n = bounds[c][1] - bounds[c][0]
        who = sender_of(sender)
        return (data_header(method, seq, who, c, [TensorSpec("float32", (n,))]),
                data_header(method, seq, who, c, [TensorSpec(Q8, (n,))]) if wire == Q8 else None)

    steps = []
    for s in range(world - 1):
        c_out, c_in = (rank - s) % world, (rank - s - 1) % world
        steps.append(NativeStep(bounds[c_out], RING_ENCODE, envs(REDUCE, rank, c_out), bounds[c_in],
                                envs(REDUCE, prv, c_in), True))
    own = (rank + 1) % world
    out, out_envs, mode = own, envs(RESULT, rank, own), RING_OWN_RESULT
    for s in range(world - 1):
        c_in = (rank - s) % world
        in_envs = envs(RESULT, (rank - s - 1) % world, c_in)  # the chunk's owner made it; it is forwarded as is
        steps.append(NativeStep(bounds[out], mode, out_envs, bounds[c_in], in_envs, False))
        out, out_envs, mode = c_in, in_envs, RING_FORWARD
    return steps
