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
from edgemesh.collective.compress import q8_decode, q8_encode
from edgemesh.collective.tcp_links import SecureLinks
from edgemesh.errors import ProtocolError
from edgemesh.wire.tensor import q8_nbytes
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
    # Rank 0 waits for rank 2, which never sends, and rank 1 for rank 0: whichever deadline
    # passes first times out, and the other then either times out too or gets its abort.
    assert any(isinstance(x, CollectiveTimeout) for x in res), res
    for x in res:
        assert isinstance(x, CollectiveTimeout) or (isinstance(x, PeerLost) and "CollectiveTimeout" in str(x)), x


def _c_q8(x: np.ndarray) -> np.ndarray | None:
    state = native.native()
    assert state is not None
    out = np.zeros(q8_nbytes(x.size), np.uint8)
    x = np.ascontiguousarray(x, np.float32)
    if state.lib.edgemesh_q8_encode(x.ctypes.data, x.size, out.ctypes.data) != 0:
        return None
    return out


def test_native_q8_codec_is_numpys_bit_for_bit(natives: Any) -> None:
    state = native.native()
    g = np.random.default_rng(7)
    cases = [g.standard_normal(1000).astype(np.float32) * np.float32(10.0) ** g.integers(-30, 6, 1000).astype(np.float32),
             np.zeros(33, np.float32),                                   # zero blocks: scale 0
             np.full(64, 1e-7, np.float32),                              # scales that are fp16 subnormals
             np.array([6.0e6, -8.3e6, 1.0, 5.0], np.float32),            # scales near fp16's top
             (g.standard_normal(31) * 3).astype(np.float32),             # a padded last block
             np.float32(0.5) + np.arange(96, dtype=np.float32) * np.float32(2.0 ** -3)]  # exact .5 ties
    for x in cases:
        want = q8_encode(x)
        got = _c_q8(x)
        assert want is not None and got is not None and np.array_equal(got, want), x[:4]
        dec = np.empty(x.size, np.float32)
        state.lib.edgemesh_q8_decode(got.ctypes.data, x.size, dec.ctypes.data, 0)
        assert np.array_equal(dec, q8_decode(want, x.size))
        acc = g.standard_normal(x.size).astype(np.float32)
        both = acc + q8_decode(want, x.size)
        state.lib.edgemesh_q8_decode(got.ctypes.data, x.size, acc.ctypes.data, 1)
        assert np.array_equal(acc, both)
    # What q8_0 cannot carry goes as fp32 in both: a value not finite, a scale over fp16's range.
    for bad in (np.array([1.0, np.inf], np.float32), np.array([np.nan, 1.0], np.float32),
                np.array([1.0e7, 0.0], np.float32)):
        assert q8_encode(bad) is None and _c_q8(bad) is None


@pytest.mark.parametrize("w", [3, 4])
def test_native_q8_ring_gives_the_python_rings_bits(natives: Any, w: int) -> None:
    fast = natives(w, algorithm="ring", compression="q8_0")
    slow = natives(w, algorithm="ring", compression="q8_0")
    mixed = natives(w, algorithm="ring", compression="q8_0")
    _python_only(slow)
    mixed[2]._links._native = None
    g = torch.Generator().manual_seed(3)
    inputs = [parts(w, 100_003, seed=1), parts(w, 40, seed=2), parts(w, 2, seed=3),
              # one rank's part that q8_0 cannot carry: that message goes as fp32, the others q8_0
              [torch.randn(5_000, generator=g) * (1e8 if r == 1 else 1.0) for r in range(w)]]
    for xs in inputs:
        got = in_threads(w, lambda r: fast[r].allreduce_sum(xs[r]))
        want = in_threads(w, lambda r: slow[r].allreduce_sum(xs[r]))
        mix = in_threads(w, lambda r: mixed[r].allreduce_sum(xs[r]))
        for r in range(w):
            assert isinstance(got[r], torch.Tensor) and isinstance(mix[r], torch.Tensor), (r, got[r], mix[r])
            assert torch.equal(got[r], want[r]) and torch.equal(mix[r], want[r]), r
            assert torch.equal(got[r], got[0])
    assert [g.wire_bytes for g in fast] == [g.wire_bytes for g in slow]
    assert [g._links.native_ops for g in fast] == [len(inputs)] * w
    # q8_0 carries ~0.27 of fp32's bytes
    sent = fast[0].wire_bytes[0]
    assert sent < 0.35 * 4 * sum(x[0].numel() for x in inputs) * 2 * (w - 1) / w, sent


def test_native_ring_send_stopped_half_way_leaves_the_stream_unused() -> None:
    """A rank whose ring record to the next rank could not all go out (the next rank never
    reads, its socket buffers are small) must not write anything else on that stream: the
    abort after the failure shuts the connection down instead of writing into the record."""
    if native.native() is None:
        pytest.skip("no C compiler: the native links are off")
    from edgemesh.collective.members import CurveKeys

    w = 3
    keys = [CurveKeys.generate() for _ in range(w)]
    publics = [k.public for k in keys]
    links = [SecureLinks.bind(LOCAL, keys[r], publics, job="half", sockbuf=64 * 1024) for r in range(w)]
    peers = [Peer(r, links[r].endpoint, publics[r]) for r in range(w)]
    options = CollectiveOptions(timeout=1.0, connect_timeout=10.0, algorithm="ring")
    groups = in_threads(w, lambda r: CollectiveGroup(links[r], r, w, peers, options))
    try:
        assert all(isinstance(g, CollectiveGroup) for g in groups), groups
        big = 3 * 2**20  # 4 MiB a chunk to rank 2, far over its buffers
        res = in_threads(2, lambda r: groups[r].allreduce_sum(torch.ones(big)))
        assert not any(isinstance(x, torch.Tensor) for x in res), res
        assert groups[1]._links._conns[2].partial  # rank 1's record to rank 2 stopped half-way
    finally:
        close_all(groups)
