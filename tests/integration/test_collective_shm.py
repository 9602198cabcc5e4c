"""The shared-memory data plane (collective/shm.py): a group whose ranks share one machine sums
through one mapped segment; the same bits as the sockets, every failure as the sockets report it,
and nothing that does not check out is mapped."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import Any

import pytest
import torch

from edgemesh.collective import shm
from edgemesh.collective.errors import CollectiveError, CollectiveTimeout, PeerLost
from edgemesh.collective.shm import SharedPlane
from tests.integration.test_collective_zmq import close_all, in_threads, make_group, parts, rank_order_sum

pytestmark = pytest.mark.integration


def _ours() -> set[str]:
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith("edgemesh-")} if shm.SHM_DIR.is_dir() else set()


@pytest.fixture
def groups() -> Any:
    if shm.library() is None or not shm.SHM_DIR.is_dir():
        pytest.skip("no C compiler or no /dev/shm: the shared-memory plane is off")
    made: list[list[Any]] = []

    def factory(w: int, **opts: Any) -> list[Any]:
        made.append(make_group(w, **{"timeout": 10.0, **opts}))
        return made[-1]

    yield factory
    for g in made:
        close_all(g)


@pytest.mark.parametrize("w", [2, 3, 4])
def test_sums_equal_the_sockets_bit_for_bit_and_leave_no_name_behind(groups: Any, w: int) -> None:
    before = _ours()
    fast = groups(w, shared_memory=True)
    slow = groups(w, algorithm="direct")
    assert [g.shared_memory for g in fast] == [True] * w
    assert [g.shared_memory for g in slow] == [False] * w
    assert _ours() == before, "the segment's name outlived the set-up"
    sent = [g.wire_bytes for g in fast]
    # A decode step's size, a prefill message's, one over a slot (two pieces), an empty one.
    for n in (576, 256 * 576, shm.SLOT_FLOATS + 1000, 0):
        xs = parts(w, n, seed=n)
        got = in_threads(w, lambda r: fast[r].allreduce_sum(xs[r].view(1, -1)))
        want = in_threads(w, lambda r: slow[r].allreduce_sum(xs[r].view(1, -1)))
        for r in range(w):
            assert got[r].shape == (1, n)
            assert torch.equal(got[r], want[r]) and torch.equal(got[r].view(-1), rank_order_sum(xs)), (n, r)
    assert [g.wire_bytes for g in fast] == sent, "an allreduce through memory went over a socket"
    # Other dtypes keep the sockets, and the group stays in step.
    ints = in_threads(w, lambda r: fast[r].allreduce_sum(torch.full((5,), r, dtype=torch.int64)))
    assert all(torch.equal(t, torch.full((5,), sum(range(w)), dtype=torch.int64)) for t in ints)


def test_the_native_loop_callback_gives_the_same_sums(groups: Any) -> None:
    """The decode loop calls ``fn(ctx, part, sum, n)`` (kernels.decode_layers): through memory
    it must give what ``allreduce_sum`` gives, op after op."""
    w, n = 3, 576
    g = groups(w, shared_memory=True)
    nats = [x.native_allreduce(n) for x in g]
    assert all(a is not None for a in nats)
    fns = [ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)(a.fn)
           for a in nats]

    def rank(r: int) -> list[torch.Tensor]:
        a = nats[r]
        assert a.begin()
        outs = []
        try:
            for step in range(20):
                x = parts(w, n, seed=step)[r]
                out = torch.empty(n)
                assert fns[r](a.ctx, x.data_ptr(), out.data_ptr(), n) == 0
                outs.append(out)
        finally:
            a.end()
        return outs

    got = in_threads(w, rank)
    for step in range(20):
        want = rank_order_sum(parts(w, n, seed=step))
        assert all(torch.equal(got[r][step], want) for r in range(w)), step
    assert nats[0].seconds > 0


def test_a_rank_that_cannot_map_the_segment_keeps_the_whole_group_on_sockets(groups: Any, monkeypatch: Any) -> None:
    real = SharedPlane.attach

    def attach(name: Any, token: Any, world: int, me: int, timeout: float) -> Any:
        return None if me == 2 else real(name, token, world, me, timeout)

    monkeypatch.setattr(SharedPlane, "attach", staticmethod(attach))
    g = groups(3, shared_memory=True)
    assert [x.shared_memory for x in g] == [False] * 3
    xs = parts(3, 1000, seed=1)
    got = in_threads(3, lambda r: g[r].allreduce_sum(xs[r]))
    assert all(torch.equal(t, rank_order_sum(xs)) for t in got)
    assert all(x.wire_bytes[0] > 0 for x in g)


def test_only_the_hubs_own_segment_is_mapped(groups: Any, tmp_path: Any) -> None:
    made = SharedPlane.create(3, 5.0)
    assert made is not None
    plane, name, token = made
    try:
        assert SharedPlane.attach(name, token, 3, 1, 5.0) is not None  # the real thing maps
        assert SharedPlane.attach(name, bytes(32), 3, 1, 5.0) is None  # another token
        assert SharedPlane.attach(name, token, 4, 1, 5.0) is None  # another size
        assert SharedPlane.attach(name, token[:16], 3, 1, 5.0) is None
        for bad in ("../../etc/passwd", "edgemesh-xyz", name + "/", "", None, 7):
            assert SharedPlane.attach(bad, token, 3, 1, 5.0) is None
        assert (os.stat(shm.SHM_DIR / name).st_mode & 0o777) == 0o600
    finally:
        shm.unlink(name)
        plane.close()
    # A link planted under a valid name is not followed.
    planted = f"edgemesh-{'0' * 32}"
    target = tmp_path / "target"
    target.write_bytes(bytes(shm.segment_bytes(3)))
    os.symlink(target, shm.SHM_DIR / planted)
    try:
        assert SharedPlane.attach(planted, bytes(32), 3, 1, 5.0) is None
    finally:
        os.unlink(shm.SHM_DIR / planted)


def _waiting(g: list[Any], busy: set[int]) -> dict[int, Any]:
    """Ranks outside ``busy`` start an allreduce on threads; their outcomes (result or error)."""
    out: dict[int, Any] = {}

    def run(r: int) -> None:
        try:
            out[r] = g[r].allreduce_sum(torch.ones(576))
        except BaseException as exc:  # noqa: BLE001 - the outcome is what the test checks
            out[r] = exc

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(len(g)) if r not in busy]
    for t in threads:
        t.start()
    out["threads"] = threads
    return out


def _join(out: dict[int, Any], limit: float) -> None:
    for t in out.pop("threads"):
        t.join(limit)
        assert not t.is_alive(), "a rank still waits"


def test_an_abort_on_the_sockets_ends_the_wait_at_once(groups: Any) -> None:
    g = groups(3, shared_memory=True, timeout=30.0)
    out = _waiting(g, {2})
    time.sleep(0.2)  # ranks 0 and 1 wait for rank 2's part, asleep on its flag
    t0 = time.monotonic()
    g[2]._links.abort("rank 2: gave up")
    _join(out, 10.0)
    assert time.monotonic() - t0 < 10.0  # not the 30 s deadline
    for r in (0, 1):
        assert isinstance(out[r], PeerLost) and out[r].aborted and out[r].rank == 2, out[r]
    with pytest.raises(CollectiveError, match="broken"):
        g[0].allreduce_sum(torch.ones(576))


def test_a_rank_whose_connections_close_is_lost_not_waited_for(groups: Any) -> None:
    g = groups(3, shared_memory=True, timeout=30.0)
    out = _waiting(g, {1})
    time.sleep(0.2)
    g[1]._links.close(abandon=True)  # the process died: its sockets close, its flag stays
    _join(out, 10.0)
    # Each survivor either sees rank 1's sockets close itself or gets the abort of the other
    # survivor that saw it first; both name rank 1 as the one gone (a re-planner drops it).
    for r in (0, 2):
        assert isinstance(out[r], PeerLost) and out[r].lost == (1,), out[r]
    assert any(out[r].rank == 1 and not out[r].aborted for r in (0, 2))


def test_a_silent_rank_times_out_naming_it(groups: Any) -> None:
    g = groups(3, shared_memory=True, timeout=1.0)
    out = _waiting(g, {2})
    _join(out, 10.0)  # 1 s deadline; 5x and more of margin before the join gives up
    for r in (0, 1):
        assert isinstance(out[r], (CollectiveTimeout, PeerLost)), out[r]
    # The first to time out names rank 2 (the other may see that rank's abort first).
    named = [out[r] for r in (0, 1) if isinstance(out[r], CollectiveTimeout)]
    assert named and all(e.waiting_for == (2,) for e in named)


def test_closing_the_group_mid_op_fails_the_op_and_never_unmaps_under_it(groups: Any) -> None:
    """A stop closes the group from another thread while the compute thread waits in an op:
    that op fails with a collective error, and the mapping goes only once it has left."""
    g = groups(3, shared_memory=True, timeout=30.0)
    out = _waiting(g, {2})
    time.sleep(0.2)
    plane = g[0]._shm
    g[0].close()  # ranks 0 and 1 are in the op, waiting for rank 2
    _join(out, 10.0)
    assert isinstance(out[0], CollectiveError), out[0]
    assert isinstance(out[1], CollectiveError), out[1]
    assert plane is not None and not plane.enter()  # closed, and unmapped after the op left
    assert plane._addr == 0


def test_a_name_left_by_a_killed_hub_is_swept_later(groups: Any) -> None:
    stale, fresh = f"edgemesh-{'a' * 32}", f"edgemesh-{'b' * 32}"
    for n in (stale, fresh):
        (shm.SHM_DIR / n).write_bytes(b"x")
    old = time.time() - shm.STALE_S - 60
    os.utime(shm.SHM_DIR / stale, (old, old))
    try:
        made = SharedPlane.create(2, 5.0)
        assert made is not None
        made[0].close()
        shm.unlink(made[1])
        assert not (shm.SHM_DIR / stale).exists()
        assert (shm.SHM_DIR / fresh).exists()  # a set-up in progress elsewhere keeps its name
    finally:
        shm.unlink(stale)
        shm.unlink(fresh)
