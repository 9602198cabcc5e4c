"""``CollectiveGroup``: the ``Collective`` that model code uses across processes and machines.

It runs over any ``members.Links``: in production ``tcp_links.SecureLinks`` (TCP + TLS 1.3 with
per-pair certificates derived from the node keys and the job id, see protocols/collective.md), the one data plane;
the allreduce benchmark also runs it over zmq CURVE links (``edgemesh.bench.zmq_links``).

Build one per rank::

    keys = CurveKeys.generate()                       # or the node's own key pair
    links = SecureLinks.bind("tcp://0.0.0.0:0", keys, member_keys=[...all ranks' public keys], job=job_id)
    # ... publish links.endpoint and keys.public to the others, learn theirs ...
    group = CollectiveGroup(links, rank=k, world_size=W,
                          peers=[Peer(r, endpoint_r, public_key_r) for r in others])

or in one step when the endpoints are known in advance::

    group = CollectiveGroup.create(rank=k, world_size=W, peers=peers, keys=keys,
                                 bind="tcp://0.0.0.0:5600")

Every call blocks the calling (compute) thread until the collective is done. All ranks must
call the same collectives in the same order with tensors of the same size and dtype. A peer
that dies → ``PeerLost``; one that stays silent past ``timeout`` → ``CollectiveTimeout``; after
either the group is broken and only ``close()`` is useful.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from edgemesh.collective import native
from edgemesh.collective.compress import check_wire_dtype, from_accumulator, to_accumulator, wire_dtype_for
from edgemesh.collective.direct import direct_allreduce, direct_allreduce_rounded, finish_direct
from edgemesh.collective.costmodel import LOOPBACK_CURVE, Algorithm, Choice, LinkCost, choose, predict
from edgemesh.collective.errors import CollectiveError, PeerLost
from edgemesh.collective.op import REDUCE, Op, part_template
from edgemesh.collective.ring import ring_allreduce
from edgemesh.wire.tensor import TensorSpec
from edgemesh.collective.star import HUB, star_allreduce, star_broadcast, star_broadcast_meta, star_gather
from edgemesh.collective.members import CurveKeys, Links, Peer
from edgemesh.collective.shm import SLOT_FLOATS, SharedPlane, token_from_hex, unlink
from edgemesh.collective.tcp_links import SecureLinks


# Wires equal to the accumulator's dtype (no compression, not a 16-bit float summed in fp32):
# the direct allreduce runs only on these; other messages picked for it take the star.
_EXACT_WIRES = frozenset({"float32", "float64", "int32", "int64"})


@dataclass(frozen=True)
class CollectiveOptions:
    """How the group runs. Every rank must use the same values (the choice of algorithm
    per message is computed locally from them, and must agree everywhere)."""

    timeout: float = 30.0  # seconds one collective may take before CollectiveTimeout
    connect_timeout: float = 30.0  # seconds for the group to form
    algorithm: str = "auto"  # "auto" (cost model) | "star" | "chunked_star" | "ring" | "direct"
    chunks: int = 4  # for a forced "chunked_star"
    compression: str | None = None  # None | "float16" | "bfloat16": fp32 parts travel narrowed
    cost: LinkCost = field(default_factory=lambda: LOOPBACK_CURVE)
    # Try the shared-memory plane (``collective.shm``) for float32 allreduces: for groups whose
    # ranks all run on one machine. The ranks check it (a token in the mapped segment); if any
    # cannot map it, the group keeps its sockets. Its sums are exact fp32 (no wire compression).
    shared_memory: bool = False

    def __post_init__(self) -> None:
        if self.algorithm != "auto":
            Algorithm(self.algorithm)  # raises ValueError on an unknown name
        check_wire_dtype(self.compression)
        if self.timeout <= 0 or self.connect_timeout <= 0 or self.chunks < 1:
            raise ValueError("timeouts must be positive and chunks at least 1")


class CollectiveGroup:
    """A fixed group of ``world_size`` ranks over authenticated links; rank 0 is the hub."""

    def __init__(self, links: Links, rank: int, world_size: int, peers: Sequence[Peer],
                 options: CollectiveOptions | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.options = options or CollectiveOptions()
        self._links = links
        self._seq = 0
        self._choices: dict[int, Choice] = {}  # by message bytes: the options are fixed
        self._native: dict[int, NativeAllreduce | SharedAllreduce | None] = {}  # by values per op
        self._broken: str | None = None
        self._closed = False
        self._shm: SharedPlane | None = None
        try:
            links.join(rank, world_size, peers, self.options.connect_timeout)
            if self.options.shared_memory and world_size > 1:
                self._shm = self._shared_plane()
        except BaseException:
            links.close(abandon=True)
            self._closed = True
            raise

    @classmethod
    def create(cls, rank: int, world_size: int, peers: Sequence[Peer], keys: CurveKeys | None,
               bind: str, options: CollectiveOptions | None = None, *, plain: bool = False,
               job: str = "") -> CollectiveGroup:
        """Bind and join in one call (endpoints known in advance). ``job``: the job id, the same
        on every rank; it is bound into every link's TLS certificate."""
        member_keys = [p.public_key for p in peers if p.public_key is not None]
        links = SecureLinks.bind(bind, keys, member_keys, plain=plain, job=job)
        return cls(links, rank, world_size, peers, options)

    @property
    def endpoint(self) -> str:
        return self._links.endpoint

    @property
    def refused_connections(self) -> int:
        return self._links.refused_connections

    @property
    def shared_memory(self) -> bool:
        """True: this group's float32 allreduces go through shared memory, not its sockets."""
        return self._shm is not None

    @property
    def wire_bytes(self) -> tuple[int, int]:
        """(sent, received) data-plane bytes of this rank so far."""
        return self._links.bytes_sent, self._links.bytes_received

    # ----------------------------------------------------------------- the Collective protocol

    def choice(self, nbytes: int) -> Choice:
        """The algorithm this group runs for a part of ``nbytes`` (same answer on every rank)."""
        hit = self._choices.get(nbytes)
        if hit is not None:
            return hit
        if len(self._choices) > 4096:
            self._choices.clear()
        self._choices[nbytes] = pick = self._choose(nbytes)
        return pick

    def _choose(self, nbytes: int) -> Choice:
        opt = self.options
        if opt.algorithm == "auto":
            return choose(nbytes, self.world_size, opt.cost)
        algo = Algorithm(opt.algorithm)
        k = opt.chunks if algo is Algorithm.CHUNKED_STAR else 1
        return Choice(algo, k, predict(algo, nbytes, self.world_size, opt.cost, k))

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        wire = wire_dtype_for(tensor.dtype, self.options.compression)  # TypeError before numbering
        if self._shm is not None and tensor.dtype == torch.float32:
            return self._shared_allreduce(tensor)
        op = self._begin()
        if self.world_size == 1:
            return tensor
        nbytes = tensor.numel() * tensor.element_size()
        pick = self.choice(nbytes)
        try:
            pool = self._links.buffers
            if pick.algorithm is Algorithm.RING:
                acc = ring_allreduce(op, to_accumulator(tensor, copy=True, pool=pool), wire)
            elif pick.algorithm is Algorithm.DIRECT and wire in _EXACT_WIRES:
                mine = to_accumulator(tensor, copy=False, pool=pool)  # read only
                acc = direct_allreduce(op, mine, TensorSpec(wire, (mine.size,)))
            elif pick.algorithm is Algorithm.DIRECT:
                acc = direct_allreduce_rounded(op, to_accumulator(tensor, copy=False, pool=pool), wire)
            else:
                mine = to_accumulator(tensor, copy=self.rank == HUB, pool=pool)  # only the hub writes into it
                acc = star_allreduce(op, mine, wire, pick.chunks)
        except BaseException as exc:
            self._fail(exc)
            raise
        return from_accumulator(acc, tensor.dtype, tensor.shape)

    def native_allreduce(self, numel: int) -> NativeAllreduce | None:
        """This group's allreduce of ``numel`` float32 values as a C callback, for a native loop
        of ops (the decode step's layers, ``kernels.decode_layers``); None where it does not
        apply: the cost model does not pick the direct allreduce for that size, the link layer
        has no native side, or the group is closed or broken."""
        if self._closed or self._broken is not None or self.world_size == 1:
            return None
        if self._shm is not None:
            if numel > SLOT_FLOATS:  # one op per slot: the Python loop's allreduce takes pieces
                return None
            if self._native.get(numel) is None:
                self._native[numel] = SharedAllreduce(self, self._shm, numel)
            return self._native[numel]
        if numel not in self._native:
            make = getattr(self._links, "direct_loop", None)
            ctx = None
            if (make is not None and self.options.compression is None  # the C op sends exact fp32
                    and self.choice(4 * numel).algorithm is Algorithm.DIRECT):
                spec = TensorSpec("float32", (numel,))
                templates = [part_template(REDUCE, str(r).encode(), spec) for r in range(self.world_size)]
                ctx = make(templates, numel, self.options.timeout)
            self._native[numel] = None if ctx is None else NativeAllreduce(self, ctx, numel)
        return self._native[numel]

    def broadcast(self, tensor: torch.Tensor | None, root: int = 0) -> torch.Tensor:
        # Check the caller's mistakes before the op is numbered, so the group stays in step.
        self._check_root(root)
        if self.rank == root and tensor is None:
            raise ValueError("the root of a broadcast must pass a tensor")
        op = self._begin()
        if self.world_size == 1:
            assert tensor is not None
            return tensor
        try:
            return star_broadcast(op, tensor, root)
        except BaseException as exc:
            self._fail(exc)
            raise

    def broadcast_meta(self, meta: dict[str, Any] | None, root: int = 0) -> dict[str, Any]:
        self._check_root(root)
        if self.rank == root and meta is None:
            raise ValueError("the root of a broadcast must pass a dict")
        op = self._begin()
        if self.world_size == 1:
            assert meta is not None
            return dict(meta)
        try:
            return star_broadcast_meta(op, meta, root)
        except BaseException as exc:
            self._fail(exc)
            raise

    def gather(self, tensor: torch.Tensor, root: int = 0) -> list[torch.Tensor] | None:
        self._check_root(root)
        op = self._begin()
        if self.world_size == 1:
            return [tensor]
        try:
            return star_gather(op, tensor, root)
        except BaseException as exc:
            self._fail(exc)
            raise

    def close(self) -> None:
        """Close sockets and threads. Pending results still get ``linger`` to leave, unless the
        group is broken. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._links.close(abandon=self._broken is not None)
        if self._shm is not None:
            self._shm.close()

    def __enter__(self) -> CollectiveGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    def _begin(self) -> Op:
        self._usable()
        self._seq += 1
        return Op(self._links, self._seq, self.options.timeout)

    def _usable(self) -> None:
        if self._closed:
            raise CollectiveError("the collective group is closed")
        if self._broken is not None:
            raise CollectiveError(f"the collective group is broken ({self._broken}); close it and re-plan")

    def _shared_allreduce(self, tensor: torch.Tensor) -> torch.Tensor:
        # Not numbered: no socket carries it, and a rank running the decode step's ops in C
        # (``SharedAllreduce``) must keep the same numbering as one running them here.
        self._usable()
        assert self._shm is not None
        x = tensor.detach().reshape(-1).contiguous().numpy()
        try:
            out = self._shm.allreduce(self._links, x)
        except BaseException as exc:
            self._fail(exc)
            raise
        return torch.from_numpy(out).view(tensor.shape)

    def _shared_plane(self) -> SharedPlane | None:
        """The shared-memory set-up (``collective.shm``), three ops on every rank: the hub's
        segment name and token, each rank's yes or no, and the verdict."""
        can = hasattr(self._links, "watched_fds")
        made = SharedPlane.create(self.world_size, self.options.timeout) if can and self.rank == HUB else None
        plane = made[0] if made is not None else None
        try:
            if self.rank == HUB:
                offer = {"name": made[1], "token": made[2].hex()} if made is not None else {"name": None}
                self.broadcast_meta({"op": "shm", **offer})
            else:
                offer = self.broadcast_meta(None)
                if can and offer.get("name") is not None:
                    plane = SharedPlane.attach(offer.get("name"), token_from_hex(offer.get("token")), self.world_size,
                                               self.rank, self.options.timeout)
            answers = self.gather(torch.tensor([1.0 if plane is not None else 0.0]))
            verdict = self.broadcast_meta(
                {"shm": answers is not None and all(a.numel() == 1 and float(a.reshape(-1)[0]) == 1.0 for a in answers)}
                if self.rank == HUB else None)
        except BaseException:
            if plane is not None:
                plane.close()
            raise
        finally:
            if made is not None:
                unlink(made[1])  # every rank has mapped it or given up: no name left behind
        if verdict.get("shm") is not True:
            if plane is not None:
                plane.close()
            return None
        return plane

    def _check_root(self, root: int) -> None:
        if not 0 <= root < self.world_size:
            raise ValueError(f"root {root} is outside a group of {self.world_size}")

    def _fail(self, exc: BaseException) -> None:
        # Peers are now at different points of the op sequence: nothing later can be trusted.
        # Tell the others, so a worker waiting on a hub that lost someone fails now.
        self._broken = f"{type(exc).__name__}: {exc}"
        if not (isinstance(exc, PeerLost) and exc.aborted):
            self._links.abort(f"rank {self.rank}: {self._broken}")


class NativeAllreduce:
    """A group's direct allreduce of one vector size as a C callback: ``fn(ctx, part, sum, n)``
    (``native_links.c``). A C loop runs ops through it between ``begin`` and ``end``; each is
    numbered like an ``allreduce_sum`` of the group and gives the same bits. An op the callback
    cannot finish stops the loop; ``finish`` completes it in Python (or raises, breaking the
    group, as ``allreduce_sum`` would)."""

    def __init__(self, group: CollectiveGroup, ctx: Any, numel: int) -> None:
        state = native.native()
        assert state is not None
        self._group, self._ctx, self.numel = group, ctx, numel
        self.fn: int = state.lib.edgemesh_direct_step_fn()
        self.ctx: int = ctypes.addressof(ctx)
        self._call = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_int)(self.fn)

    @property
    def seconds(self) -> float:
        """Time spent in the ops the C side ran (sending, waiting for the others, receiving)."""
        return self._ctx.ns / 1e9

    def allreduce_sum(self, part: torch.Tensor) -> torch.Tensor:
        """One op through the callback, as the C loop runs it (``bench``'s in-band probe):
        ``part`` float32 of ``numel`` values; the sum as a new tensor of its shape."""
        x = part.detach().reshape(-1).contiguous()
        if x.dtype != torch.float32 or x.numel() != self.numel or not self.begin():
            return self._group.allreduce_sum(part)
        out = torch.empty_like(x)
        try:
            if self._call(self.ctx, x.data_ptr(), out.data_ptr(), self.numel) != 0:
                out = self.finish(x)
        finally:
            self.end()
        return out.view(part.shape)

    def begin(self) -> bool:
        """Ready the callback for ops numbered after the group's last one; False: not now (data
        of another op is waiting in Python, or the group is broken): run the ops in Python."""
        g = self._group
        if g._closed or g._broken is not None or not g._links.direct_loop_ready():  # type: ignore[attr-defined]
            return False
        self._ctx.seq = g._seq + 1
        self._ctx.n = self.numel  # (un)held: see finish
        return True

    def end(self) -> None:
        """After the C loop: the group's numbering and byte counts include its ops."""
        self._group._seq = self._ctx.seq - 1
        self._group._links.direct_loop_settle(self._ctx)  # type: ignore[attr-defined]

    def finish(self, part: torch.Tensor) -> torch.Tensor:
        """The op the C loop stopped in, done in Python: the sum of every rank's ``part``."""
        g = self._group
        g._seq = self._ctx.seq - 1
        op = g._begin()  # this op's number, the one the C side used
        links = g._links
        try:
            if self._ctx.status == native.TIMEOUT:
                op.deadline = time.monotonic()  # its deadline passed in C: take what is here, or fail
            sent = links.direct_loop_stopped(self._ctx)  # type: ignore[attr-defined]
            mine = part.detach().reshape(-1).numpy()
            out = finish_direct(op, mine, TensorSpec("float32", (self.numel,)), sent)
        except BaseException as exc:
            g._fail(exc)
            raise
        finally:
            self._ctx.seq = g._seq + 1  # the next op's number, for the loop and for `end`
        if not links.direct_loop_ready():  # type: ignore[attr-defined]
            # Python read ahead (a faster rank's next record is in its buffers): the C side
            # must not read those sockets now. Hold it: every later op of this loop stops at
            # once, without I/O, and is done here.
            self._ctx.n = -1
        return torch.from_numpy(out)


class SharedAllreduce:
    """The shared-memory allreduce of one vector size with ``NativeAllreduce``'s interface, for
    the native decode loop: the callback is ``shm.c``'s op. An op it stops in (bytes on a
    socket: an abort, a lost peer; or its deadline) is finished by ``finish``, which resumes it
    (this rank's part is published once) or raises, breaking the group."""

    def __init__(self, group: CollectiveGroup, plane: SharedPlane, numel: int) -> None:
        self._group, self._plane, self.numel = group, plane, numel
        self.fn: int = plane.fn
        self.ctx: int = plane.ctx_addr

    @property
    def seconds(self) -> float:
        """Time spent in the ops a native loop ran through the plane (every size: one counter)."""
        return self._plane.loop_seconds

    def allreduce_sum(self, part: torch.Tensor) -> torch.Tensor:
        return self._group.allreduce_sum(part)

    def begin(self) -> bool:
        """Ready the callback; False: run the ops in Python (the group is closed or broken, or
        a rank's link is gone: Python's ops give it the grace and then fail)."""
        g = self._group
        if g._closed or g._broken is not None:
            return False
        links = g._links
        if self._plane.peer_gone(links) or not self._plane.enter():
            return False
        self._plane.prepare(links)
        return True

    def end(self) -> None:
        self._plane.leave()  # (a close meanwhile unmaps now)

    def finish(self, part: torch.Tensor) -> torch.Tensor:
        g = self._group
        x = part.detach().reshape(-1).contiguous()
        out = torch.empty_like(x)
        try:
            self._plane.run(g._links, x.data_ptr(), out.data_ptr(), self.numel)
        except BaseException as exc:
            g._fail(exc)
            raise
        return out
