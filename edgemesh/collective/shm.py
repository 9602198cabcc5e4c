"""The shared-memory data plane: allreduces through one mapped segment when every rank of a
group runs on the same machine (a local cluster, or several members on one big host).

Over loopback sockets each decode-size allreduce costs ~110-175 µs at W = 3 on a 2-core machine
(TLS records, system calls, three processes woken in turn), and a 256-token prefill spends
0.25-0.4 core-seconds in TLS and socket copies: the ranks share the cores they would compute on.
Through memory an op is one copy in, a wait on the others' flags and W reads (``shm.c``).

Set-up (``handshake``, three ops of the group over its authenticated links, every rank):
  1. the hub creates ``/dev/shm/edgemesh-<128 random bits>`` (exclusive, mode 0600, not
     following links), writes a 256-bit random token into it and sends name and token;
  2. each worker opens that name (no create, no links followed), accepts it only if it is a
     regular file of its own user with the expected size whose token matches, maps it, and
     answers yes or no;
  3. the hub says whether every rank answered yes; then it unlinks the name (the mappings stay),
     so nothing is left in /dev/shm whatever happens later.
A rank that cannot take part (another machine after all, another user, no /dev/shm, no C
compiler) makes the whole group keep its sockets: the choice is the same on every rank.

The token proves the mapping is the segment the hub made, not a file another process put there
under that name: the name and token only travel over the group's TLS links. Every rank can
write the whole segment (each writes only its own slots and flag): the ranks trust each other
with their sums already. What it carries are float32 parts of a fixed size; nothing in it is
parsed. A hub killed during the set-up leaves its name behind: names older than an hour are
removed when a hub creates one (``_sweep``).
``EDGEMESH_SHM=0`` (or ``EDGEMESH_NATIVE=0``) keeps the sockets.
"""

from __future__ import annotations

import ctypes
import hmac
import logging
import os
import re
import secrets
import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.cbuild import compile_library
from edgemesh.collective.errors import CollectiveError, CollectiveTimeout, PeerLost

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("shm.c")
SHM_DIR = Path("/dev/shm")
SLOT_FLOATS = 1 << 18  # 1 MiB per rank and buffer: a 256-token prefill message of a 576-wide model is 0.56 MiB
MAX_WORLD = 64  # EM_SHM_MAX
LOST_GRACE = 0.05  # as tcp_links: another rank's link closed, how long the op may still finish
OK, OTHER, TIMEOUT, ELSEWHERE = 0, 1, 2, 6
_NAME = re.compile(r"edgemesh-[0-9a-f]{32}\Z")
_TOKEN = 32


class ShmCtx(ctypes.Structure):
    """``em_shm_ctx`` (``shm.c``)."""

    _fields_ = [("base", ctypes.c_void_p), ("world", ctypes.c_int), ("me", ctypes.c_int), ("slot", ctypes.c_int),
                ("timeout_ms", ctypes.c_int), ("spin_us", ctypes.c_int), ("nfds", ctypes.c_int),
                ("fds", ctypes.c_int * MAX_WORLD), ("seq", ctypes.c_uint64), ("phase", ctypes.c_int),
                ("which", ctypes.c_int), ("deadline_us", ctypes.c_int64), ("stop_us", ctypes.c_int64),
                ("ops", ctypes.c_uint64), ("ns", ctypes.c_uint64)]


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def disabled() -> bool:
    off = ("0", "false", "no", "off")
    return any(os.environ.get(k, "1").strip().lower() in off for k in ("EDGEMESH_SHM", "EDGEMESH_NATIVE"))


def library() -> ctypes.CDLL | None:
    """``shm.c`` built and loaded once; None when disabled or not buildable."""
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            _lib = None if disabled() else _load()
    return _lib


def _load() -> ctypes.CDLL | None:
    lib = compile_library(_SOURCE, "shm", ["-O2", "-ffp-contract=off"])
    if lib is None:
        return None
    vp, ci = ctypes.c_void_p, ctypes.c_int
    lib.edgemesh_shm_map.argtypes = [ci, ctypes.c_long]
    lib.edgemesh_shm_map.restype = vp
    lib.edgemesh_shm_unmap.argtypes = [vp, ctypes.c_long]
    lib.edgemesh_shm_allreduce.argtypes = [vp, vp, vp, ci]
    lib.edgemesh_shm_allreduce.restype = ci
    lib.edgemesh_shm_allreduce_fn.argtypes = []
    lib.edgemesh_shm_allreduce_fn.restype = vp
    if lib.edgemesh_shm_ctx_size() != ctypes.sizeof(ShmCtx):
        log.warning("shared-memory plane: unexpected build (%s); the group keeps its sockets", lib._name)
        return None
    return lib


def segment_bytes(world: int, slot: int = SLOT_FLOATS) -> int:
    """Size of a group's segment: the head (token, flags), then two buffers of one slot per rank."""
    lib = library()
    head = lib.edgemesh_shm_head() if lib is not None else 8192
    return head + 2 * world * slot * 4


def spin_us() -> int:
    """How long a wait spins (yielding) before it sleeps: ``EDGEMESH_SHM_SPIN_US``, default 50."""
    try:
        return max(0, min(10_000, int(os.environ.get("EDGEMESH_SHM_SPIN_US", "50"))))
    except ValueError:
        return 50


class SharedPlane:
    """One rank's mapping of the group's segment and its op state. Ops run one at a time, in
    the same order on every rank (as every op of a group)."""

    def __init__(self, lib: ctypes.CDLL, addr: int, size: int, world: int, me: int, timeout: float) -> None:
        self._lib, self._addr, self._size = lib, addr, size
        self.ctx = ShmCtx(base=addr, world=world, me=me, slot=SLOT_FLOATS,
                          timeout_ms=max(1, int(timeout * 1000)), spin_us=spin_us(), seq=1)
        self.fn: int = lib.edgemesh_shm_allreduce_fn()
        self.ctx_addr = ctypes.addressof(self.ctx)
        self._py_ns = 0  # of ctx.ns: the ops run through ``allreduce``
        # The mapping outlives every op in flight: a group closed from another thread (a stop
        # while the compute thread is in the decode loop) unmaps when the last op leaves.
        self._guard = threading.Lock()
        self._busy = 0
        self._closing = False

    # ------------------------------------------------------------------ set-up

    @classmethod
    def create(cls, world: int, timeout: float) -> tuple[SharedPlane, str, bytes] | None:
        """The hub's segment, named and filled with a fresh token; None if it cannot be made."""
        lib = library()
        if lib is None or disabled() or not 2 <= world <= MAX_WORLD:
            return None
        _sweep()
        name, token = f"edgemesh-{secrets.token_hex(16)}", secrets.token_bytes(_TOKEN)
        size = segment_bytes(world)
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.info("shared-memory plane: cannot create %s (%s); the group keeps its sockets", path, exc)
            return None
        try:
            # Pages reserved now: a /dev/shm too small to hold them (a container's 64 MiB) fails
            # here, not with SIGBUS at the first write.
            os.posix_fallocate(fd, 0, size)
            addr = lib.edgemesh_shm_map(fd, size)
        except OSError as exc:
            log.info("shared-memory plane: cannot size %s (%s)", path, exc)
            addr = None
        finally:
            os.close(fd)
        if not addr:
            unlink(name)
            return None
        ctypes.memmove(addr, token, _TOKEN)
        return cls(lib, addr, size, world, 0, timeout), name, token

    @classmethod
    def attach(cls, name: Any, token: Any, world: int, me: int, timeout: float) -> SharedPlane | None:
        """A worker's mapping of the hub's segment, or None (logged) if anything does not check
        out: the name's form, the file (regular, this user's, the expected size) or the token."""
        lib = library()
        if (lib is None or not isinstance(name, str) or not _NAME.match(name) or not isinstance(token, bytes)
                or len(token) != _TOKEN or not 2 <= world <= MAX_WORLD):
            return None
        size = segment_bytes(world)
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            log.info("shared-memory plane: the hub's segment is not here (%s); the group keeps its sockets", exc)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size != size:
                log.warning("shared-memory plane: %s is not the hub's segment (owner, kind or size)", name)
                return None
            addr = lib.edgemesh_shm_map(fd, size)
        except OSError as exc:
            log.info("shared-memory plane: cannot map %s (%s); the group keeps its sockets", name, exc)
            return None
        finally:
            os.close(fd)
        if not addr:
            return None
        if not hmac.compare_digest(ctypes.string_at(addr, _TOKEN), token):
            lib.edgemesh_shm_unmap(addr, size)
            log.warning("shared-memory plane: %s holds another token; the group keeps its sockets", name)
            return None
        return cls(lib, addr, size, world, me, timeout)

    def close(self) -> None:
        """No op starts after this; the mapping goes when the last op in flight leaves (idempotent)."""
        with self._guard:
            self._closing = True
            self.ctx.stop_us = 1  # long past: a wait in C returns within one sleep slice
            if self._busy == 0:
                self._unmap()

    def enter(self) -> bool:
        """An op (or a native loop of them) begins; False: the plane is closed."""
        with self._guard:
            if self._closing or not self._addr:
                return False
            self._busy += 1
            return True

    def leave(self) -> None:
        with self._guard:
            self._busy -= 1
            if self._closing and self._busy == 0:
                self._unmap()

    def _unmap(self) -> None:
        if self._addr:
            self._lib.edgemesh_shm_unmap(self._addr, self._size)
            self._addr = 0
            self.ctx.base = None

    # ------------------------------------------------------------------ ops

    @property
    def loop_seconds(self) -> float:
        """Time spent in ops that a native loop ran (copying in, waiting for the others, adding);
        ops through ``allreduce`` are left out (their callers time them)."""
        return (self.ctx.ns - self._py_ns) / 1e9

    def peer_gone(self, links: Any) -> bool:
        """A rank's link is known closed (it is no longer watched)."""
        return len(links.watched_fds()) < self.ctx.world - 1

    def prepare(self, links: Any) -> None:
        """Before ops run in C: the sockets to watch while waiting (see ``run``)."""
        fds = links.watched_fds()[:MAX_WORLD]
        self.ctx.nfds = len(fds)
        for i, fd in enumerate(fds):
            self.ctx.fds[i] = fd

    def allreduce(self, links: Any, x: np.ndarray) -> np.ndarray:
        """Sum over ranks of the float32 vector ``x`` (read only) as a new array, the same bits on
        every rank; in slot-sized pieces, one op each."""
        out = np.empty_like(x)
        before = self.ctx.ns
        try:
            for lo in range(0, x.size, SLOT_FLOATS):
                hi = min(x.size, lo + SLOT_FLOATS)
                self.run(links, x.ctypes.data + 4 * lo, out.ctypes.data + 4 * lo, hi - lo)
        finally:
            self._py_ns += self.ctx.ns - before
        return out

    def run(self, links: Any, part: int, out: int, n: int) -> None:
        """One op (or the rest of one a C loop stopped in): ``n`` floats at address ``part`` in,
        their sum over ranks at ``out``. Raises ``PeerLost`` (an abort read from the sockets, or
        a rank whose link closed and that did not publish within ``LOST_GRACE``),
        ``CollectiveTimeout``, or ``CollectiveError``."""
        if not self.enter():
            raise CollectiveError("the collective group is closed")
        ctx, lib = self.ctx, self._lib
        lost: list[int] = []
        if self.peer_gone(links):  # a link closed before this op
            lost = links.take_waiting()
            ctx.stop_us = int((time.monotonic() + LOST_GRACE) * 1e6)
        try:
            while True:
                self.prepare(links)
                status = lib.edgemesh_shm_allreduce(self.ctx_addr, part, out, n)
                if status == OK:
                    return
                if self._closing:
                    raise CollectiveError("the collective group was closed during an allreduce")
                if status == ELSEWHERE:
                    gone = links.take_waiting()  # an abort raises PeerLost here
                    if gone and not lost:
                        ctx.stop_us = int((time.monotonic() + LOST_GRACE) * 1e6)  # CLOCK_MONOTONIC, as C
                    lost = gone
                    continue
                if status == TIMEOUT and lost:
                    gone_rank = ctx.which if ctx.which in lost else min(lost)
                    raise PeerLost(f"rank {ctx.me}: rank {gone_rank} is gone (its connection closed)", gone_rank)
                if status == TIMEOUT:
                    raise CollectiveTimeout(f"rank {ctx.me}: rank {ctx.which} did not deliver its part before the "
                                            "deadline (shared memory; peer hung or overloaded)", (ctx.which,))
                raise CollectiveError(f"rank {ctx.me}: a shared-memory op of {n} values was refused")
        finally:
            # Once a rank is gone the early limit stays: an op of a native loop that must wait
            # for anyone times out at once and comes back here, where the grace starts anew.
            if not lost and not self._closing:
                ctx.stop_us = 0
            self.leave()


STALE_S = 3600.0  # a set-up lasts at most the group's timeout (600 s at most)


def _sweep() -> None:
    """Remove segment names of this user older than ``STALE_S``: left by a hub killed during
    its set-up (a live set-up's name is younger, and mapped segments have no name)."""
    try:
        names = [n for n in os.listdir(SHM_DIR) if _NAME.match(n)]
    except OSError:
        return
    now = time.time()
    for n in names:
        try:
            st = os.stat(SHM_DIR / n, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and now - st.st_mtime > STALE_S:
                unlink(n)
        except OSError:
            pass


def token_from_hex(text: Any) -> bytes | None:
    """The token of a hub's offer (hex, untrusted), or None; ``attach`` checks its length."""
    try:
        return bytes.fromhex(text) if isinstance(text, str) else None
    except ValueError:
        return None


def unlink(name: str) -> None:
    try:
        os.unlink(SHM_DIR / name)
    except OSError:
        pass
