"""The native data plane of SecureLinks (collective/native.py): the decode-size allreduces that
C moves must give the Python path's results, and hand everything unexpected back to it."""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import pytest
import torch

from edgemesh.collective import native
from edgemesh.collective.errors import CollectiveTimeout, PeerLost
from edgemesh.collective.group import CollectiveGroup, CollectiveOptions
from edgemesh.collective.members import Peer
from edgemesh.collective.tcp_links import SecureLinks
from edgemesh.errors import ProtocolError
from tests.integration.test_collective_zmq import LOCAL, close_all, in_threads, make_group, parts, rank_order_sum

pytestmark = pytest.mark.integration


@pytest.fixture
def natives() -> Any:
    if native.native() is None:
        pytest.skip("no C compiler: the native links are off")
    made: list[list[Any]] = []

    def factory(w: int, plain: bool = False, **opts: Any) -> list[Any]:
        made.append(_plain_group(w, **opts) if plain else make_group(w, **opts))
        return made[-1]

    yield factory
    for groups in made:
        close_all(groups)


def _plain_group(w: int, **opts: Any) -> list[Any]:
    links = [SecureLinks.bind(LOCAL, None, plain=True) for _ in range(w)]
    peers = [Peer(r, links[r].endpoint) for r in range(w)]
    options = CollectiveOptions(**{"timeout": 10.0, "connect_timeout": 10.0, **opts})
    groups = in_threads(w, lambda r: CollectiveGroup(links[r], r, w, peers, options))
    assert all(isinstance(g, CollectiveGroup) for g in groups), groups
    return groups


def _python_only(groups: list[Any]) -> None:
    for g in groups:
        g._links._native = None


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("algorithm", ["direct", "star"])
def test_native_and_python_paths_give_the_same_bits(natives: Any, algorithm: str, plain: bool) -> None:
    w = 3
    fast = natives(w, plain, algorithm=algorithm)
    slow = natives(w, plain, algorithm=algorithm)
    assert all(g._links._native is not None for g in fast), "sessions not reached natively"
    _python_only(slow)
    for step in range(3):
        xs = parts(w, 576, seed=step)
        got = in_threads(w, lambda r: fast[r].allreduce_sum(xs[r]))
        want = in_threads(w, lambda r: slow[r].allreduce_sum(xs[r]))
        for r in range(w):
            assert torch.equal(got[r], rank_order_sum(xs)), f"rank {r}, step {step}"
            assert torch.equal(got[r], want[r])
    # Both paths put the same bytes on the wire; the C side moved every op of the fast groups.
    assert [g.wire_bytes for g in fast] == [g.wire_bytes for g in slow]
    assert [g._links.native_ops for g in fast] == [3] * w
    assert [g._links.native_ops for g in slow] == [0] * w


def test_ranks_out_of_step_fail_as_in_python(natives: Any) -> None:
    """A part of another size is not the expected record: the C side hands it to the Python
    decoder, which raises the same ProtocolError as without native links."""
    groups = natives(3)
    res = in_threads(3, lambda r: groups[r].allreduce_sum(torch.ones(100 if r < 2 else 101)))
    assert any(isinstance(x, ProtocolError) for x in res), res
    assert not any(isinstance(x, torch.Tensor) for x in res[:2]), res


def test_mixed_messages_are_decoded_in_order(natives: Any) -> None:
    """Broadcasts and metadata between allreduces go through Python; the allreduces after them
    through C; nothing is lost or reordered between the two."""
    groups = natives(3)

    def rank(r: int) -> list[Any]:
        g = groups[r]
        out = []
        for i in range(5):
            meta = g.broadcast_meta({"step": i} if r == 0 else None)
            h = g.broadcast(torch.full((576,), float(i)) if r == 0 else None)
            s = g.allreduce_sum(h + r)
            out.append((meta["step"], float(s[0])))
        return out

    res = in_threads(3, rank)
    for r in range(3):
        assert res[r] == [(i, 3.0 * i + 3.0) for i in range(5)], res[r]


def test_a_peer_that_dies_is_peer_lost(natives: Any) -> None:
    groups = natives(2)
    in_threads(2, lambda r: groups[r].allreduce_sum(torch.ones(8)))  # both natively connected
    groups[1]._links.close(abandon=True)
    with pytest.raises(PeerLost):
        groups[0].allreduce_sum(torch.ones(8))


def test_sessions_are_checked_before_use() -> None:
    state = native.native()
    if state is None or state.libssl is None:
        pytest.skip("native links or OpenSSL not reachable here")
    a, b = socket.socketpair()
    try:
        assert native.session_of(a, state) is None  # type: ignore[arg-type]  # not TLS
    finally:
        a.close()
        b.close()
    assert native.is_eof(native.SSL_ERROR_ZERO_RETURN, 0)
    assert not native.is_eof(native.SSL_ERROR_SSL, 0)
    err = native.ssl_error(state, 0)
    assert err.reason == "UNKNOWN_ERROR"


def test_python_rank_order_sum_matches_numpy() -> None:
    """The C hub adds element by element in rank order; numpy's add does the same."""
    xs = [p.numpy() for p in parts(3, 1000, seed=5)]
    acc = xs[0].copy()
    for x in xs[1:]:
        np.add(acc, x, out=acc)
    assert np.array_equal(acc, rank_order_sum([torch.from_numpy(x) for x in xs]).numpy())


# ---- the native ring (native_links.c: edgemesh_ring): a prefill's large messages -----------------
# The ranks here are threads of one process, so each test also shows that the C call leaves the
# GIL free: a rank still in Python (or not started yet) could not run otherwise.


@pytest.mark.parametrize("plain", [False, True], ids=["tls", "plain"])
@pytest.mark.parametrize("w", [3, 4])
def test_native_ring_gives_the_python_rings_bits(natives: Any, w: int, plain: bool) -> None:
    fast = natives(w, plain, algorithm="ring")
    slow = natives(w, plain, algorithm="ring")
    mixed = natives(w, plain, algorithm="ring")
    _python_only(slow)
    mixed[1]._links._native = None  # one rank runs the Python ring between native neighbours
    sizes = (100_003, 576 * 64 + 1, 7, 2)  # uneven chunks; 2 < W leaves a rank an empty chunk
    for step, n in enumerate(sizes):
        xs = parts(w, n, seed=step)
        got = in_threads(w, lambda r: fast[r].allreduce_sum(xs[r]))
        want = in_threads(w, lambda r: slow[r].allreduce_sum(xs[r]))
        mix = in_threads(w, lambda r: mixed[r].allreduce_sum(xs[r]))
        for r in range(w):
            assert isinstance(got[r], torch.Tensor) and isinstance(mix[r], torch.Tensor), (r, got[r], mix[r])
            assert torch.equal(got[r], want[r]), f"rank {r}, n {n}"
            assert torch.equal(mix[r], want[r]), f"rank {r}, n {n}"
            assert torch.equal(got[r], got[0])  # every rank holds the same bits
        assert torch.allclose(got[0], rank_order_sum(xs), rtol=1e-5, atol=1e-2)
    assert [g.wire_bytes for g in fast] == [g.wire_bytes for g in slow]
    assert [g._links.native_ops for g in fast] == [len(sizes)] * w
    assert [g._links.native_ops for g in slow] == [0] * w
    assert [g._links.native_ops for g in mixed] == [len(sizes) if r != 1 else 0 for r in range(w)]


def test_native_ring_takes_an_abort_from_the_previous_rank(natives: Any) -> None:
    groups = natives(3, algorithm="ring")
    assert all(isinstance(x, torch.Tensor) for x in in_threads(3, lambda r: groups[r].allreduce_sum(torch.ones(50_000))))
    groups[2]._links.abort("rank 2 gives up (test)")
    res = in_threads(2, lambda r: groups[r].allreduce_sum(torch.ones(50_000)))
    # Rank 0 reads from rank 2 and meets its abort record where a ring step was due; rank 1
    # then gets rank 0's abort.
    assert isinstance(res[0], PeerLost) and res[0].aborted and "gives up" in str(res[0]), res[0]
    assert isinstance(res[1], PeerLost) and res[1].aborted, res[1]
    assert [g._links.native_ops for g in groups[:2]] == [1, 1]


def test_native_ring_ranks_out_of_step_fail(natives: Any) -> None:
    """A step's record of another size is not the expected head: its bytes go to the Python
    decoder and the op fails with ProtocolError (the others then see the group aborted)."""
    groups = natives(3, algorithm="ring")
    res = in_threads(3, lambda r: groups[r].allreduce_sum(torch.ones(30_000 if r < 2 else 30_003)))
    assert any(isinstance(x, ProtocolError) for x in res), res
    assert not any(isinstance(x, torch.Tensor) for x in res), res


def test_native_ring_a_peer_that_dies_is_peer_lost(natives: Any) -> None:
    groups = natives(3, algorithm="ring")
    in_threads(3, lambda r: groups[r].allreduce_sum(torch.ones(50_000)))
    groups[2]._links.close(abandon=True)
    res = in_threads(2, lambda r: groups[r].allreduce_sum(torch.ones(50_000)))
    assert all(isinstance(x, PeerLost) for x in res), res


def test_native_ring_a_silent_peer_times_out(natives: Any) -> None:
    groups = natives(3, algorithm="ring", timeout=1.0)
    in_threads(3, lambda r: groups[r].allreduce_sum(torch.ones(50_000)))
    res = in_threads(2, lambda r: groups[r].allreduce_sum(torch.ones(50_000)))
    assert isinstance(res[0], CollectiveTimeout), res[0]  # it waits for rank 2, which never sends
    assert isinstance(res[1], (PeerLost, CollectiveTimeout)), res[1]
