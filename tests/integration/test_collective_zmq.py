"""CollectiveGroup over real links on 127.0.0.1: W ranks as W threads of this process.

Every rank has its own sockets (and, on zmq links, its own context and authenticator), exactly
as in separate processes; threads only save process start-up time. The default links are
tcp_links.SecureLinks; the core results are also checked over the zmq CURVE links, which stay
selectable. Process-level death is in tests/integration/test_collective_processes.py; attacks
on the TCP links' handshake and frames in tests/integration/test_collective_tcp_security.py.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Any, Callable

import pytest
import torch

from edgemesh.collective.base import Collective
from edgemesh.collective.compress import error_bound
from edgemesh.collective.errors import CollectiveError, CollectiveTimeout, PeerLost
from edgemesh.collective.op import data_header
from edgemesh.collective.group import CollectiveOptions, CollectiveGroup
from edgemesh.collective.members import CurveKeys, Peer
from edgemesh.collective.tcp_links import SecureLinks
from edgemesh.bench.zmq_links import PeerLinks
from edgemesh.errors import AuthError, ProtocolError
from edgemesh.wire.envelope import Envelope, Kind, encode_envelope
from edgemesh.wire.tensor import TensorSpec

pytestmark = pytest.mark.integration

LOCAL = "tcp://127.0.0.1:0"


def in_threads(n: int, fn: Callable[[int], Any], timeout: float = 20.0) -> list[Any]:
    """Run fn(rank) for every rank in its own thread; return results or the exceptions raised."""
    out: list[Any] = [None] * n

    def body(r: int) -> None:
        try:
            out[r] = fn(r)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            out[r] = exc

    threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a rank hung"
    return out


LINKS = {"tcp": SecureLinks, "zmq": PeerLinks}


def make_group(w: int, kind: str = "tcp", **opts: Any) -> list[CollectiveGroup]:
    keys = [CurveKeys.generate() for _ in range(w)]
    publics = [k.public for k in keys]
    links = [LINKS[kind].bind(LOCAL, keys[r], publics) for r in range(w)]
    peers = [Peer(r, links[r].endpoint, publics[r]) for r in range(w)]
    options = CollectiveOptions(**{"timeout": 10.0, "connect_timeout": 10.0, **opts})
    groups = in_threads(w, lambda r: CollectiveGroup(links[r], r, w, peers, options))
    for g in groups:
        assert isinstance(g, CollectiveGroup), g
    return groups


def close_all(groups: list[CollectiveGroup]) -> None:
    in_threads(len(groups), lambda r: groups[r].close())


def parts(w: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    # Magnitudes spread over 1e-3..1e3 so that the summation order changes the fp32 result.
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) * 10.0 ** torch.randint(-3, 4, (n,), generator=g) for _ in range(w)]


def rank_order_sum(xs: list[torch.Tensor]) -> torch.Tensor:
    total = xs[0].clone()
    for x in xs[1:]:
        total += x
    return total


@pytest.fixture
def group_of() -> Any:
    made: list[list[CollectiveGroup]] = []

    def factory(w: int, kind: str = "tcp", **opts: Any) -> list[CollectiveGroup]:
        made.append(make_group(w, kind, **opts))
        return made[-1]

    yield factory
    for groups in made:
        close_all(groups)


@pytest.mark.parametrize("w", [2, 3, 4])
@pytest.mark.parametrize("algorithm", ["star", "chunked_star", "direct"])
@pytest.mark.parametrize("kind", ["tcp", "zmq"])
def test_star_allreduce_is_the_rank_order_sum_bit_for_bit(group_of: Any, w: int, algorithm: str, kind: str) -> None:
    groups = group_of(w, kind, algorithm=algorithm, chunks=3)
    assert isinstance(groups[0], Collective)
    xs = parts(w, 4099)  # not a multiple of the chunk count
    expected = rank_order_sum(xs)
    if w >= 3:  # (two terms commute exactly) the data is order-sensitive, so bit-equality means rank order
        assert not torch.equal(expected, rank_order_sum(xs[::-1]))
    for _ in range(2):  # twice: results are the same run after run
        results = in_threads(w, lambda r: groups[r].allreduce_sum(xs[r]))
        for r, res in enumerate(results):
            assert torch.equal(res, expected), f"rank {r} differs"
    for r in range(w):  # inputs untouched
        assert torch.equal(xs[r], parts(w, 4099)[r])


@pytest.mark.parametrize("w", [3, 4])
@pytest.mark.parametrize("kind", ["tcp", "zmq"])
def test_ring_matches_star_within_fp32_rounding(group_of: Any, w: int, kind: str) -> None:
    groups = group_of(w, kind, algorithm="ring")
    xs = parts(w, 1000, seed=1)
    star = rank_order_sum(xs)
    runs = [in_threads(w, lambda r: groups[r].allreduce_sum(xs[r])) for _ in range(2)]
    for res in runs[0]:
        assert torch.equal(res, runs[0][0])  # every rank holds the same bits
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)  # and the same bits every run
    bound = w * 2.0**-24 * torch.stack([x.abs() for x in xs]).sum(0)
    assert ((runs[0][0] - star).abs() <= bound).all()


@pytest.mark.parametrize("algorithm", ["star", "chunked_star", "ring"])
def test_large_results_stay_valid_while_held(group_of: Any, algorithm: str) -> None:
    """Large frames and accumulators come from recycled buffers: a result the caller still
    holds must never be reused for a later message (or be summed into)."""
    w, n = 3, 300_000  # 1.2 MB per part: pooled sizes
    groups = group_of(w, algorithm=algorithm)
    held = []
    for i in range(4):
        xs = [torch.full((n,), float((r + 1) * (i + 1))) for r in range(w)]
        held.append(in_threads(w, lambda r: groups[r].allreduce_sum(xs[r])))
    for i, results in enumerate(held):
        for out in results:
            assert torch.equal(out, torch.full((n,), 6.0 * (i + 1))), f"step {i}: {out[:3]}"


def test_auto_picks_by_size_and_every_rank_agrees(group_of: Any) -> None:
    groups = group_of(3)  # default: cost model
    small, large = groups[0].choice(8 * 1024), groups[0].choice(64 * 1024 * 1024)
    assert small.algorithm.value == "direct"  # latency-bound: 1 hop
    assert large.algorithm.value not in ("star", "direct")
    assert all(g.choice(64 * 1024 * 1024) == large for g in groups)
    xs = parts(3, 2048, seed=2)
    res = in_threads(3, lambda r: groups[r].allreduce_sum(xs[r]))
    assert all(torch.equal(x, rank_order_sum(xs)) for x in res)


def test_shapes_and_dtypes_are_kept(group_of: Any) -> None:
    groups = group_of(2)
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.int64):
        xs = [(torch.randn(3, 5, 7, generator=g) * 8).to(dtype) for _ in range(2)]
        res = in_threads(2, lambda r: groups[r].allreduce_sum(xs[r]))
        for out in res:
            assert out.dtype == dtype and out.shape == (3, 5, 7)
            # 16-bit parts are summed in fp32 and rounded once.
            assert torch.equal(out, (xs[0].double() + xs[1].double()).to(dtype))


def test_broadcast_any_root_any_dtype(group_of: Any) -> None:
    groups = group_of(3)
    cases = [(0, torch.randn(2, 3)), (2, torch.arange(12, dtype=torch.int64).reshape(3, 4)),
             (1, torch.randn(70_000).to(torch.bfloat16))]  # large: the zero-copy path
    for root, value in cases:
        res = in_threads(3, lambda r: groups[r].broadcast(value if r == root else None, root=root))
        for r, out in enumerate(res):
            assert out.dtype == value.dtype and torch.equal(out, value)
            if r != root:
                out.add_(1)  # a receiver owns its copy: writing must not touch the root's tensor
        assert not torch.equal(res[(root + 1) % 3], value)
        assert torch.equal(res[root], value)


def test_broadcast_meta(group_of: Any) -> None:
    groups = group_of(4)
    meta = {"cmd": "forward", "positions": [5, 6, 7], "nested": {"temp": 0.7, "stop": None}, "raw": b"\x00\x01"}
    res = in_threads(4, lambda r: groups[r].broadcast_meta(meta if r == 3 else None, root=3))
    assert all(m == meta for m in res)


@pytest.mark.parametrize("kind", ["tcp", "zmq"])
def test_gather_sizes_differ_by_rank_and_arrive_in_rank_order(group_of: Any, kind: str) -> None:
    groups = group_of(3, kind)
    mine = [torch.arange(r + 1, dtype=torch.float64) + 10 * r for r in range(3)]
    mine[2] = torch.randn(2, 40_000)  # large: the zero-copy path
    for root in (0, 2):
        res = in_threads(3, lambda r: groups[r].gather(mine[r], root=root))
        assert all(res[r] is None for r in range(3) if r != root)
        got = res[root]
        assert len(got) == 3 and all(g.dtype == m.dtype and torch.equal(g, m) for g, m in zip(got, mine))
    # the group stays in step with allreduces around a gather
    res = in_threads(3, lambda r: groups[r].allreduce_sum(torch.ones(4)))
    assert all(torch.equal(x, torch.full((4,), 3.0)) for x in res)


def test_a_split_head_model_over_real_links_chooses_like_one_device(group_of: Any) -> None:
    """forward_choose over TCP links: summaries, the tiling check and the gather on the wire."""
    from edgemesh.collective.base import LocalCollective
    from edgemesh.llm.generate import generate
    from edgemesh.llm.model import Participant
    from edgemesh.llm.sampling import SamplingParams
    from edgemesh.weights.provider import InMemoryProvider
    from edgemesh.weights.shard import ShardSpec, split_layer, vocab_range
    from tests.unit.test_llm_equivalence import _blocks, _config
    from tests.unit.test_vocab_split import _head_blocks

    config = _config(tie_word_embeddings=True, vocab_size=600)  # > 64 rows per rank: some unsent
    blocks = _blocks(config, seed=3)
    layer = split_layer(config, [2, 1, 1], [50, 30, 16])
    prompt = [5, 9, 77, 3]
    full = [ShardSpec.full(config)] * config.num_hidden_layers
    one = Participant(config, full, InMemoryProvider(_head_blocks(config, blocks, full, 0, 1)), LocalCollective(),
                      max_seq_len=64, vocab=(0, config.vocab_size))
    want = list(generate(one, prompt, 16))
    groups = group_of(3)

    def rank(r: int) -> Any:
        specs = [layer[r]] * config.num_hidden_layers
        p = Participant(config, specs, InMemoryProvider(_head_blocks(config, blocks, specs, r, 3)), groups[r],
                        max_seq_len=64, vocab=vocab_range(config, specs, r, 3))
        if r:
            from edgemesh.llm.follow import follow_master
            follow_master(p)
            return None
        greedy = list(generate(p, prompt, 16))
        sampled = list(generate(p, prompt, 8, SamplingParams(temperature=5.0, top_p=0.999, seed=1)))  # fallback too
        p.stop_workers()
        return greedy, sampled, p.full_logit_choices

    res = in_threads(3, rank, timeout=60)
    assert not any(isinstance(x, BaseException) for x in res), res
    greedy, sampled, fallbacks = res[0]
    assert greedy == want and len(sampled) == 8 and fallbacks > 0


def test_a_caller_mistake_does_not_break_the_group(group_of: Any) -> None:
    groups = group_of(2)
    with pytest.raises(ValueError):
        groups[0].broadcast(None)  # root without a tensor
    with pytest.raises(ValueError):
        groups[1].broadcast_meta({}, root=5)
    with pytest.raises(TypeError):
        groups[0].allreduce_sum(torch.ones(2, dtype=torch.bool))
    res = in_threads(2, lambda r: groups[r].allreduce_sum(torch.full((4,), float(r + 1))))
    assert all(torch.equal(x, torch.full((4,), 3.0)) for x in res)


@pytest.mark.parametrize("wire", ["float16", "bfloat16", "q8_0"])
@pytest.mark.parametrize("algorithm", ["star", "ring", "direct"])
def test_compressed_wire_error_is_bounded(group_of: Any, wire: str, algorithm: str) -> None:
    w = 4
    groups = group_of(w, algorithm=algorithm, compression=wire)
    xs = parts(w, 5000, seed=4)
    res = in_threads(w, lambda r: groups[r].allreduce_sum(xs[r]))
    for out in res:
        assert out.dtype == torch.float32 and torch.equal(out, res[0])  # all ranks identical
    exact = torch.stack([x.double() for x in xs]).sum(0)
    err = (res[0].double() - exact).abs()
    bound = error_bound(xs, wire, algorithm)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    rel = (err.max() / exact.abs().max()).item()
    print(f"\n{wire} {algorithm}: max |err| / max |sum| = {rel:.2e}, "
          f"max err/bound = {(err / bound).max().item():.2f}")
    assert rel < {"float16": 2e-3, "bfloat16": 1.6e-2, "q8_0": 3e-2}[wire]
    assert not torch.equal(res[0], rank_order_sum(xs))  # it really was compressed


@pytest.mark.parametrize("algorithm", ["star", "direct"])
def test_fp16_wire_falls_back_to_exact_on_overflow(group_of: Any, algorithm: str) -> None:
    groups = group_of(2, algorithm=algorithm, compression="float16")
    xs = [torch.tensor([1e5, 1.0, -7e4]), torch.tensor([3.0, 2.0, 1.0])]
    res = in_threads(2, lambda r: groups[r].allreduce_sum(xs[r]))
    assert all(torch.isfinite(x).all() and torch.equal(x, xs[0] + xs[1]) for x in res)


def test_unknown_key_is_refused() -> None:
    member0, member1, stranger = CurveKeys.generate(), CurveKeys.generate(), CurveKeys.generate()
    hub_links = SecureLinks.bind(LOCAL, member0, [member0.public, member1.public])
    rogue_links = SecureLinks.bind(LOCAL, stranger, [member0.public, stranger.public])
    # The hub waits 2 s for a valid hello (its expected outcome is that deadline); the stranger
    # is refused as soon as the hub reads its hello, so it gets a long deadline: a short one
    # could end before a loaded hub got to it (both had 0.8 s).
    hub_opts, rogue_opts = CollectiveOptions(connect_timeout=2.0), CollectiveOptions(connect_timeout=30.0)
    t0 = time.monotonic()

    def rank(r: int) -> Any:
        if r == 0:
            return CollectiveGroup(hub_links, 0, 2, [Peer(1, rogue_links.endpoint, member1.public)], hub_opts)
        # The stranger knows the hub's address and public key and claims to be rank 1.
        return CollectiveGroup(rogue_links, 1, 2, [Peer(0, hub_links.endpoint, member0.public)], rogue_opts)

    hub_result, rogue_result = in_threads(2, rank)
    assert isinstance(rogue_result, AuthError), rogue_result
    assert "refused our key" in str(rogue_result)
    assert isinstance(hub_result, CollectiveTimeout)  # the hub never heard a hello
    assert hub_result.waiting_for == (1,)
    assert hub_links.refused_connections >= 1
    assert time.monotonic() - t0 < 12  # the hub's 2 s and a loaded host's slack; not the stranger's 30 s


def test_member_key_cannot_claim_another_rank() -> None:
    keys = [CurveKeys.generate() for _ in range(3)]
    publics = [k.public for k in keys]
    links = [SecureLinks.bind(LOCAL, keys[r], publics) for r in range(3)]
    # Rank 2's key (a member) dials the hub claiming to be rank 1: refused from its hello, and
    # it could not have made rank 1's link certificate anyway. The hub keeps waiting for the
    # real rank 1 (an impostor cannot stop the group forming): its expected outcome is its
    # short deadline; the impostor is answered at once, so it may wait long.
    hub_opts, impostor_opts = CollectiveOptions(connect_timeout=3.0), CollectiveOptions(connect_timeout=60.0)
    hub = links[0]
    impostor = links[2]

    def rank(r: int) -> Any:
        if r == 0:
            return CollectiveGroup(hub, 0, 2, [Peer(1, "tcp://127.0.0.1:9", publics[1])], hub_opts)
        return CollectiveGroup(impostor, 1, 2, [Peer(0, hub.endpoint, publics[0])], impostor_opts)

    hub_result, impostor_result = in_threads(2, rank, timeout=90)
    assert isinstance(impostor_result, AuthError) and "refused our key" in str(impostor_result), impostor_result
    assert isinstance(hub_result, CollectiveTimeout), hub_result
    assert hub.refused_connections >= 1
    links[1].close()


def test_dead_peer_is_a_typed_error_well_before_the_deadline(group_of: Any) -> None:
    # Typically ~0.05 s; the deadline is 60 s, so a cap of 15 s still shows that the error came
    # from the dropped connection and not from the deadline, also on a loaded host.
    groups = group_of(3, timeout=60.0)
    t0 = time.monotonic()

    def rank(r: int) -> Any:
        if r == 2:
            groups[2].close()  # its sockets close: the TCP connections drop like a crash
            return None
        return groups[r].allreduce_sum(torch.ones(16))

    res = in_threads(3, rank)
    elapsed = time.monotonic() - t0
    # The hub sees rank 2 drop itself, or hears first from rank 1, which saw it: either way the
    # error names rank 2 as the one lost.
    assert isinstance(res[0], PeerLost) and res[0].lost == (2,)
    assert (res[0].rank == 2 and not res[0].aborted) or (res[0].rank == 1 and res[0].aborted)
    # Rank 1 waits on the hub, which is alive: it learns from the hub's abort, or sees its own
    # connection to rank 2 drop — whichever comes first; either way at once, not at the deadline.
    assert isinstance(res[1], PeerLost) and (res[1].aborted or res[1].rank == 2)
    assert 2 in res[1].lost or res[1].rank == 0
    assert elapsed < 15.0, f"took {elapsed:.1f}s with a 60 s deadline"
    for g in groups[:2]:
        with pytest.raises(CollectiveError, match="broken"):
            g.allreduce_sum(torch.ones(16))


def test_silent_peer_times_out_at_the_deadline(group_of: Any) -> None:
    groups = group_of(2, timeout=0.6)
    t0 = time.monotonic()
    with pytest.raises(CollectiveTimeout) as info:
        groups[0].allreduce_sum(torch.ones(8))  # rank 1 is alive but never calls
    elapsed = time.monotonic() - t0
    assert info.value.waiting_for == (1,)
    # Never before the deadline (it is set when the op starts); after it, only as late as a
    # loaded host wakes the thread: the cap is far below the 10 s connect timeout (which a
    # mix-up of the two deadlines would show) and 8x the deadline (it was 2.5x).
    assert 0.6 <= elapsed < 5.0, elapsed


def test_mismatched_sizes_are_a_protocol_error(group_of: Any) -> None:
    groups = group_of(2, algorithm="star")
    res = in_threads(2, lambda r: groups[r].allreduce_sum(torch.ones(10 + r)))
    assert isinstance(res[0], ProtocolError)
    assert isinstance(res[1], PeerLost) and res[1].aborted


def _os_threads() -> dict[int, str]:
    """This process's OS threads, id → name (zmq I/O threads are not Python threads)."""
    threads = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                threads[int(tid)] = f.read().strip()
        except FileNotFoundError:
            pass  # exited while we listed
    return threads


def _os_threads_once_settled(baseline: dict[int, str] | None = None) -> dict[int, str]:
    """A joined Python thread releases its lock a moment before its OS thread is gone: wait
    until no thread is left beyond ``baseline`` (or, without one, the set stops changing), at
    most 20 s. Threads are compared by id: one that an earlier test left behind and that ends
    meanwhile does not count (comparing whole lists made that a failure)."""
    deadline = time.monotonic() + 20.0
    last = _os_threads()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = _os_threads()
        if (baseline is not None and not now.keys() - baseline.keys()) or (baseline is None and now == last):
            return now
        last = now
    return last


def _new_threads(baseline: dict[int, str]) -> dict[int, str]:
    now = _os_threads_once_settled(baseline)
    return {tid: name for tid, name in now.items() if tid not in baseline}


def _fds() -> dict[int, str]:
    """This process's open descriptors and what each points to (``socket:[inode]`` etc.)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            pass  # closed while we listed (the listing's own descriptor, or another thread's)
    return out


def test_tcp_links_run_on_the_calling_thread_and_close_leaves_nothing() -> None:
    # Descriptors are compared by identity, not counted: a count also moves when the garbage
    # collector closes a socket an earlier test dropped, which made an exact count flaky.
    gc.collect()
    before_threads, before_os, before_fds = set(threading.enumerate()), _os_threads_once_settled(), _fds()
    groups = make_group(3)
    # No I/O thread on the data plane: the sockets are served by whichever thread calls.
    assert not _new_threads(before_os)
    opened = {fd: what for fd, what in _fds().items() if before_fds.get(fd) != what}
    # one connection per pair, two ends each; listeners closed
    assert len(opened) == 3 * 2 and all(what.startswith("socket:") for what in opened.values()), opened
    in_threads(3, lambda r: groups[r].allreduce_sum(torch.ones(4)))
    close_all(groups)
    close_all(groups)
    assert not set(threading.enumerate()) - before_threads
    now = _fds()
    assert not {fd for fd, what in opened.items() if now.get(fd) == what}, "sockets left open"
    with pytest.raises(CollectiveError, match="closed"):
        groups[0].allreduce_sum(torch.ones(4))


def test_zmq_links_close_leaves_no_threads_and_is_idempotent() -> None:
    gc.collect()  # zmq contexts an earlier test dropped end their threads now, not during this test
    before_py, before_os = set(threading.enumerate()), _os_threads_once_settled()
    groups = make_group(3, "zmq")
    assert _os_threads().keys() - before_os.keys()  # zmq I/O threads and the authenticators exist now
    in_threads(3, lambda r: groups[r].allreduce_sum(torch.ones(4)))
    close_all(groups)
    close_all(groups)
    assert not set(threading.enumerate()) - before_py
    assert not _new_threads(before_os)
    with pytest.raises(CollectiveError, match="closed"):
        groups[0].allreduce_sum(torch.ones(4))


def test_data_header_is_the_wire_envelope_byte_for_byte() -> None:
    specs = [TensorSpec("float32", (4096,))]
    env = Envelope(Kind.REQUEST, "coll.reduce", 17, b"3", 2, tuple(specs))
    assert data_header("coll.reduce", 17, b"3", 2, specs) == encode_envelope(env)
