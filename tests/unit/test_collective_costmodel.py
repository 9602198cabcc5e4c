"""The cost model that picks star / chunked star / ring / direct: pure functions."""

from __future__ import annotations

import pytest

from edgemesh.collective.costmodel import Algorithm, LinkCost, candidates, choose, fit_link_cost, predict

pytestmark = pytest.mark.unit

LAN_1MS = LinkCost(a=1e-3, b=300e6 / 8)  # 1 ms, 300 Mbit/s: the TPI-LLM paper's links


def test_decode_step_messages_take_one_hop() -> None:
    # hidden 4096 × fp32 = 16 KiB (or its q8_0 frame): latency-bound; direct's 1 hop beats the
    # star's 2, which beat the ring's 2(W−1).
    for w in (2, 3, 4, 8):
        assert choose(16 * 1024, w, LAN_1MS).algorithm is Algorithm.DIRECT
        assert choose(4352, w, LAN_1MS).algorithm is Algorithm.DIRECT
        assert predict(Algorithm.STAR, 16 * 1024, w, LAN_1MS) < predict(Algorithm.RING, 16 * 1024, w, LAN_1MS) or w == 2


def test_direct_is_offered_for_small_messages_only() -> None:
    from edgemesh.collective.costmodel import DIRECT_MAX_BYTES

    def offered(n: int) -> bool:
        return any(c.algorithm is Algorithm.DIRECT for c in candidates(n, 4, LAN_1MS))

    assert offered(DIRECT_MAX_BYTES) and not offered(DIRECT_MAX_BYTES + 1)
    assert choose(1 << 26, 4, LAN_1MS).algorithm in (Algorithm.RING, Algorithm.CHUNKED_STAR)


def test_star_beats_ring_by_hops_on_1ms_links() -> None:
    # At 2 KiB the hops dominate: 2 against 2(W−1) = 6.
    assert predict(Algorithm.STAR, 2048, 4, LAN_1MS) <= 0.5 * predict(Algorithm.RING, 2048, 4, LAN_1MS)
    # At 16 KiB over 300 Mbit/s the hub link's (W−1)·M already costs 1.3 ms each way: still ahead.
    assert predict(Algorithm.STAR, 16384, 4, LAN_1MS) < predict(Algorithm.RING, 16384, 4, LAN_1MS)


def test_large_prefill_messages_leave_the_star() -> None:
    pick = choose(64 * 1024 * 1024, 4, LAN_1MS)
    assert pick.algorithm in (Algorithm.RING, Algorithm.CHUNKED_STAR)
    assert pick.predicted_s < predict(Algorithm.STAR, 64 * 1024 * 1024, 4, LAN_1MS)


def test_two_ranks_never_ring_and_small_parts_never_chunk() -> None:
    assert all(c.algorithm is not Algorithm.RING for c in candidates(1 << 26, 2, LAN_1MS))
    assert all(c.algorithm is not Algorithm.CHUNKED_STAR for c in candidates(8 * 1024, 4, LAN_1MS))


def test_predictions_follow_the_formulas() -> None:
    c = LinkCost(a=1e-3, b=1e6)
    m = 1_000_000
    assert predict(Algorithm.STAR, m, 4, c) == pytest.approx(2e-3 + 6.0)
    assert predict(Algorithm.RING, m, 4, c) == pytest.approx(6e-3 + 1.5)
    assert predict(Algorithm.CHUNKED_STAR, m, 4, c, chunks=4) == pytest.approx(5e-3 + 3.75)
    assert predict(Algorithm.DIRECT, m, 4, c) == pytest.approx(1e-3 + 3.0)
    assert predict(Algorithm.STAR, m, 1, c) == 0.0


def test_fit_recovers_a_and_b() -> None:
    truth = LinkCost(a=250e-6, b=80e6)
    samples = [(n, truth.a + n / truth.b) for n in (2048, 16384, 1 << 20, 1 << 22)]
    fit = fit_link_cost(samples)
    assert fit.a == pytest.approx(truth.a, rel=1e-6)
    assert fit.b == pytest.approx(truth.b, rel=1e-6)
    with pytest.raises(ValueError):
        fit_link_cost([(100, 1.0), (100, 2.0)])
    with pytest.raises(ValueError):
        LinkCost(a=-1, b=1)
    for a, b in ((float("nan"), 1.0), (1e-3, float("nan")), (float("inf"), 1.0), (1e-3, float("inf"))):
        with pytest.raises(ValueError):
            LinkCost(a=a, b=b)


def test_fit_from_allreduces_recovers_a_and_b() -> None:
    from edgemesh.collective.costmodel import fit_from_allreduces

    truth = LinkCost(a=300e-6, b=200e6)
    samples = [(alg, n, w, 4, predict(alg, n, w, truth, 4))
               for alg in (Algorithm.STAR, Algorithm.CHUNKED_STAR, Algorithm.RING, Algorithm.DIRECT)
               for n in (2048, 1 << 20) for w in (2, 4)]
    fit = fit_from_allreduces(samples)
    assert fit.a == pytest.approx(truth.a, rel=1e-6)
    assert fit.b == pytest.approx(truth.b, rel=1e-6)


def test_for_links_takes_the_slowest_link_and_never_beats_loopback() -> None:
    from edgemesh.collective.costmodel import LOOPBACK_CURVE, for_links

    lan = for_links([2.0, 2.4], [300.0, 280.0])  # lan-4 from dev1: 2 ms round trips, ~300 Mbit/s
    assert lan.a == pytest.approx(1.2e-3) and lan.b == pytest.approx(280e6 / 8)
    # Faster than the software on loopback is not believed: loopback's costs are the floor.
    fast = for_links([0.01], [100_000.0])
    assert fast.a == LOOPBACK_CURVE.a and fast.b == LOOPBACK_CURVE.b
    # No link measured (a group of one machine never asks): loopback's.
    assert for_links([], []) == LOOPBACK_CURVE
    # Figures that are no measurement at all are left out; a zero bandwidth is floored.
    odd = for_links([float("nan"), 2.0], [float("inf"), float("nan"), 0.0])
    assert odd.a == pytest.approx(1e-3) and odd.b == 1e3


def test_a_prefill_message_over_a_lan_takes_the_ring_where_loopback_would_take_the_star() -> None:
    """Measured on lan-4 (three 0.5-core devices, 300 Mbit/s, 2 ms round trips): with loopback's
    constants a prefill chunk of 128 positions (295 KB) went by star, ~33 ms an op on those
    links; the ring sends 2(W-1)/W of it instead of 2(W-1) at the hub."""
    from edgemesh.collective.costmodel import LOOPBACK_CURVE, for_links

    chunk = 128 * 576 * 4
    assert choose(chunk, 3, LOOPBACK_CURVE).algorithm is Algorithm.STAR
    lan = for_links([2.0], [300.0])
    assert choose(chunk, 3, lan).algorithm is Algorithm.RING
    assert choose(576 * 4, 3, lan).algorithm is Algorithm.DIRECT  # a decode step's message: one hop
