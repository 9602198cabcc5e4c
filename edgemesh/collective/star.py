"""Star collectives: every part goes to one rank and comes back — 2 hops whatever W is.

Allreduce (hub = rank 0): each worker sends its part to the hub; the hub sums the parts in
rank order 0, 1, …, W−1 — the same order on every run, so results are bit-identical run to
run and equal the plain left-to-right sum — and sends the sum back: 2(W−1) messages. With
``chunks > 1`` (chunked star) the hub returns chunk i while chunk i+1 is still arriving, so
the two directions of the hub's link work at the same time for large messages.

Broadcast: the root sends its tensor (or msgpack dict) to every other rank. Gather: every
other rank sends its tensor to the root, which takes them in rank order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from edgemesh.collective.compress import add_into, decode, encode, round_trip
from edgemesh.collective.op import BCAST, GATHER, META, REDUCE, RESULT, Op, private
from edgemesh.errors import ProtocolError
from edgemesh.wire.tensor import TensorSpec, array_to_frame, byte_view, frame_to_array

HUB = 0
_EXACT = {np.dtype(t): t for t in ("float32", "float64", "float16", "int32", "int64")}  # wire = dtype


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` contiguous ranges covering 0..n, sizes differing by at most one."""
    edges = [n * i // chunks for i in range(chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _one_frame(env_tensors: tuple[TensorSpec, ...], n: int, peer: int) -> TensorSpec:
    if len(env_tensors) != 1 or env_tensors[0].shape != (n,):
        got = [list(s.shape) for s in env_tensors]
        raise ProtocolError(f"rank {peer} sent tensor frames {got}, expected one of [{n}]: "
                            f"the ranks called allreduce with different tensor sizes")
    return env_tensors[0]


def star_allreduce(op: Op, acc: np.ndarray, wire: str, chunks: int = 1) -> np.ndarray:
    """Sum over ranks. Hub: ``acc`` must be writable and is summed into. Workers: read only."""
    if chunks == 1 and _EXACT.get(acc.dtype) == wire:
        return _star_exact(op, acc, TensorSpec(wire, (acc.size,)))
    world = op.links.world_size
    bounds = chunk_bounds(acc.size, chunks)
    if op.links.rank == HUB:
        for i, (lo, hi) in enumerate(bounds):
            part = acc[lo:hi]
            for peer in range(1, world):  # fixed rank order: deterministic sums
                env, views, _ = op.recv(peer, REDUCE, i)
                add_into(part, _one_frame(env.tensors, hi - lo, peer), views[0])
            spec, buf, mine = round_trip(part, wire)
            if mine is not part:
                part[:] = mine  # keep what the workers will see: all ranks bit-identical
            else:
                buf = private(buf, op.links)  # the caller gets `acc` back and may write into it
            for peer in range(1, world):
                op.send(peer, RESULT, [(spec, buf)], i)
        return acc
    for i, (lo, hi) in enumerate(bounds):
        # Zero-copy from the caller's tensor: it is safe because we return only after the
        # hub's result arrived, and the hub answers only after it received all of this.
        op.send(HUB, REDUCE, [encode(acc[lo:hi], wire)], i)
    if chunks == 1:
        env, views, _ = op.recv(HUB, RESULT, 0)
        return decode(_one_frame(env.tensors, acc.size, HUB), views[0], acc.dtype)
    out = np.empty_like(acc)
    for i, (lo, hi) in enumerate(bounds):
        env, views, _ = op.recv(HUB, RESULT, i)
        out[lo:hi] = decode(_one_frame(env.tensors, hi - lo, HUB), views[0], acc.dtype)
    return out


def _star_exact(op: Op, acc: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The star in one piece, uncompressed (every decode step): the same messages and sums as
    the general path, with envelopes from templates checked by one comparison (``Op.recv_part``)
    instead of a full decode per message. A link layer with a native path (``SecureLinks``)
    does a rank's whole part in one call when every message is the expected one."""
    links = op.links
    native = getattr(links, "star_hub", None) is not None and acc.dtype == np.float32
    if links.rank == HUB:
        peers = range(1, links.world_size)
        if native and links.star_hub(peers, [op.part_header(REDUCE, p, spec) for p in peers], acc,  # type: ignore[attr-defined]
                                     op.part_header(RESULT, HUB, spec), op.deadline):
            return acc
        for peer in peers:  # fixed rank order: deterministic sums
            np.add(acc, np.frombuffer(op.recv_part(peer, REDUCE, spec), acc.dtype), out=acc)
        buf = private(acc, links)  # the caller gets `acc` back and may write into it
        for peer in peers:
            op.send_part(peer, RESULT, spec, buf)
        return acc
    sent = False
    if native:
        sent, out = links.star_worker(HUB, op.part_header(REDUCE, links.rank, spec), acc,  # type: ignore[attr-defined]
                                      op.part_header(RESULT, HUB, spec), op.deadline)
        if out is not None:
            return out
    if not sent:
        op.send_part(HUB, REDUCE, spec, acc)  # zero-copy: we return only after the hub answered
    return np.frombuffer(op.recv_part(HUB, RESULT, spec), acc.dtype)


_TORCH_OF = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8,
             "int16": torch.int16, "int32": torch.int32, "int64": torch.int64}


def _tensor_frame(t: torch.Tensor) -> tuple[TensorSpec, Any]:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: ship the raw 16-bit words
        words = t.view(torch.int16).numpy()
        return TensorSpec("bfloat16", tuple(t.shape)), byte_view(words)
    return array_to_frame(t.numpy())


def _frame_tensor(spec: TensorSpec, buf: Any) -> torch.Tensor:
    arr = frame_to_array(spec, buf)  # a view of the received frame, which is ours to keep
    if spec.dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def star_broadcast(op: Op, tensor: torch.Tensor | None, root: int) -> torch.Tensor:
    links = op.links
    if links.rank == root:
        if tensor is None:
            raise ValueError("the root of a broadcast must pass a tensor")
        spec, buf = _tensor_frame(tensor)
        buf = private(np.frombuffer(buf, dtype=np.uint8), links) if spec.nbytes else buf
        for peer in range(links.world_size):
            if peer != root:
                op.send(peer, BCAST, [(spec, buf)])
        return tensor
    env, views, _ = op.recv(root, BCAST)
    if len(env.tensors) != 1:
        raise ProtocolError(f"a broadcast carries one tensor, rank {root} sent {len(env.tensors)}")
    return _frame_tensor(env.tensors[0], views[0])


def star_broadcast_meta(op: Op, meta: dict[str, Any] | None, root: int) -> dict[str, Any]:
    links = op.links
    if links.rank == root:
        if meta is None:
            raise ValueError("the root of a broadcast must pass a dict")
        for peer in range(links.world_size):
            if peer != root:
                op.send(peer, META, body=meta)
        return dict(meta)
    env, _, _ = op.recv(root, META)
    if not isinstance(env.body, dict):
        raise ProtocolError(f"broadcast_meta from rank {root} carried {type(env.body).__name__}, not a dict")
    return env.body


def star_gather(op: Op, tensor: torch.Tensor, root: int) -> list[torch.Tensor] | None:
    """Root: every rank's tensor in rank order (its own as given). Others: send, return None."""
    links = op.links
    if links.rank != root:
        spec, buf = _tensor_frame(tensor)
        buf = private(np.frombuffer(buf, dtype=np.uint8), links) if spec.nbytes else buf
        op.send(root, GATHER, [(spec, buf)])
        return None
    parts: list[torch.Tensor] = []
    for peer in range(links.world_size):
        if peer == root:
            parts.append(tensor)
            continue
        env, views, _ = op.recv(peer, GATHER)
        if len(env.tensors) != 1:
            raise ProtocolError(f"a gather part is one tensor, rank {peer} sent {len(env.tensors)}")
        parts.append(_frame_tensor(env.tensors[0], views[0]))
    return parts
