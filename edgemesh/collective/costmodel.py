"""Which allreduce algorithm to run for a message: ``t = a·hops + bytes/b``.

Pure functions over measured (or given) link constants, so every rank computes the *same*
choice from the same inputs — a disagreement would deadlock the group, which is why the
choice never depends on local timing.

- ``a``: seconds per hop (link latency plus per-message software cost).
- ``b``: bytes per second one link carries in one direction.

Per message of M bytes over W ranks:
- star: 2 hops; the hub's link carries (W−1)·M in, then (W−1)·M out →
  ``2a + 2(W−1)M/b``.
- chunked star with K chunks: the out-going chunk i overlaps the incoming chunk i+1, so the
  hub link's two directions work in parallel → ``(K+1)a + (W−1)M(1 + 1/K)/b``.
- ring: 2(W−1) steps of M/W bytes each → ``2(W−1)a + 2(W−1)M/(W·b)``.
- direct (``direct.py``): every rank sends its part to every other, 1 hop; each rank's link
  carries (W−1)·M each way at once → ``a + (W−1)M/b``. It puts W(W−1)·M on the network
  instead of 2(W−1)·M, which a shared medium (one Wi-Fi channel) pays for although this
  model does not see it, so it is offered for latency-bound messages only (≤ DIRECT_MAX_BYTES).
  On a compressed wire each rank rounds its own part once and every rank adds the same rounded
  parts (no second rounding of the sum, as the star's hub makes).
Latency-bound decode messages pick direct (1 hop); bandwidth-bound prefill messages pick ring
or chunked star.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Algorithm(str, Enum):
    STAR = "star"
    CHUNKED_STAR = "chunked_star"
    RING = "ring"
    DIRECT = "direct"


CHUNK_CHOICES = (2, 4, 8)
MIN_CHUNK_BYTES = 16 * 1024  # below this, per-chunk overhead dominates any overlap
DIRECT_MAX_BYTES = 64 * 1024  # direct allreduce: decode-size messages only


@dataclass(frozen=True)
class LinkCost:
    a: float  # seconds per hop
    b: float  # bytes per second per link direction

    def __post_init__(self) -> None:
        if not (math.isfinite(self.a) and math.isfinite(self.b)) or self.a < 0 or self.b <= 0:
            raise ValueError(f"link cost needs a >= 0 and b > 0, got a={self.a}, b={self.b}")


# Loopback on a small machine over the encrypted TCP links (tcp_links), fitted by
# `edgemesh bench allreduce` to its star, chunked-star and ring columns (2-core VM, W = 2..4
# processes sharing it: a = 510 µs, b = 977 MB/s). The per-hop cost is software and CPU
# sharing, not the wire; with it, messages up to 256 KiB go by star, which measured fastest
# there (the zmq-era constants, a = 60 µs and b = 400 MB/s, sent 64 KiB at W ≥ 3 by ring,
# measured ~2× slower than star).
LOOPBACK_CURVE = LinkCost(a=510e-6, b=977e6)


# What a job's links may claim (``for_links``, and a worker checking the master's figures):
# a hop of at most 10 s, a link of 1 kB/s to 1 TB/s.
MAX_HOP_S = 10.0
MIN_LINK_BPS, MAX_LINK_BPS = 1e3, 1e12


def for_links(rtts_ms: list[float], mbits: list[float]) -> LinkCost:
    """The group's constants over links between machines: the slowest link's half round trip
    per hop (never under loopback's software cost per hop, which every link pays too) and its
    bandwidth (never over what the software moves on loopback). Members' links are measured
    from the master only, so every link is assumed as slow as the slowest of those."""
    a = max([LOOPBACK_CURVE.a, *(r / 2e3 for r in rtts_ms if math.isfinite(r))])
    b = min([LOOPBACK_CURVE.b, *(m * 1e6 / 8 for m in mbits if math.isfinite(m))])
    return LinkCost(a=min(a, MAX_HOP_S), b=min(max(b, MIN_LINK_BPS), MAX_LINK_BPS))


@dataclass(frozen=True)
class Choice:
    algorithm: Algorithm
    chunks: int  # 1 unless chunked star
    predicted_s: float


def predict(algorithm: Algorithm, nbytes: int, world_size: int, cost: LinkCost, chunks: int = 1) -> float:
    """Predicted seconds for one allreduce of ``nbytes`` per rank."""
    w, m, a, b = world_size, float(nbytes), cost.a, cost.b
    if w <= 1:
        return 0.0
    if algorithm is Algorithm.STAR:
        return 2 * a + 2 * (w - 1) * m / b
    if algorithm is Algorithm.CHUNKED_STAR:
        k = max(1, chunks)
        return (k + 1) * a + (w - 1) * m * (1 + 1 / k) / b
    if algorithm is Algorithm.RING:
        return 2 * (w - 1) * a + 2 * (w - 1) * m / (w * b)
    if algorithm is Algorithm.DIRECT:
        return a + (w - 1) * m / b
    raise ValueError(f"unknown algorithm {algorithm!r}")


def candidates(nbytes: int, world_size: int, cost: LinkCost) -> list[Choice]:
    """Every option with its prediction (what `choose` picks from; shown by the benchmark)."""
    out = [Choice(Algorithm.STAR, 1, predict(Algorithm.STAR, nbytes, world_size, cost))]
    for k in CHUNK_CHOICES:
        if nbytes // k >= MIN_CHUNK_BYTES:
            out.append(Choice(Algorithm.CHUNKED_STAR, k, predict(Algorithm.CHUNKED_STAR, nbytes, world_size, cost, k)))
    if world_size > 2:  # at W = 2 a ring is a star with more messages
        out.append(Choice(Algorithm.RING, 1, predict(Algorithm.RING, nbytes, world_size, cost)))
    if world_size > 1 and nbytes <= DIRECT_MAX_BYTES:
        out.append(Choice(Algorithm.DIRECT, 1, predict(Algorithm.DIRECT, nbytes, world_size, cost)))
    return out


def choose(nbytes: int, world_size: int, cost: LinkCost) -> Choice:
    """The fastest predicted option; ties go to the simpler algorithm (listed first)."""
    return min(candidates(nbytes, world_size, cost), key=lambda c: c.predicted_s)


def cost_terms(algorithm: Algorithm, nbytes: int, world_size: int, chunks: int = 1) -> tuple[float, float]:
    """(hops, bytes on the busiest link) of one allreduce: ``predict`` is ``a·hops + bytes/b``."""
    w, m = world_size, float(nbytes)
    if algorithm is Algorithm.STAR:
        return 2.0, 2 * (w - 1) * m
    if algorithm is Algorithm.CHUNKED_STAR:
        k = max(1, chunks)
        return float(k + 1), (w - 1) * m * (1 + 1 / k)
    if algorithm is Algorithm.DIRECT:
        return 1.0, (w - 1) * m
    return 2.0 * (w - 1), 2 * (w - 1) * m / w


def fit_from_allreduces(samples: list[tuple[Algorithm, int, int, int, float]]) -> LinkCost:
    """Least-squares (a, b) from measured allreduces: (algorithm, bytes, W, chunks, seconds)."""
    rows = [(*cost_terms(alg, n, w, k), t) for alg, n, w, k, t in samples]
    shh = sum(h * h for h, _, _ in rows)
    sbb = sum(x * x for _, x, _ in rows)
    shb = sum(h * x for h, x, _ in rows)
    sht = sum(h * t for h, _, t in rows)
    sbt = sum(x * t for _, x, t in rows)
    det = shh * sbb - shb * shb
    if len(rows) < 2 or det <= 0:
        raise ValueError("need allreduces of different shapes to fit a and b")
    a = (sht * sbb - sbt * shb) / det
    inv_b = (shh * sbt - shb * sht) / det
    return LinkCost(a=max(a, 0.0), b=1.0 / max(inv_b, 1e-15))


def fit_link_cost(samples: list[tuple[int, float]]) -> LinkCost:
    """Least-squares fit of one-way ``t = a + bytes/b`` to (bytes, seconds) ping samples."""
    if len(samples) < 2 or len({n for n, _ in samples}) < 2:
        raise ValueError("need samples at two or more message sizes to fit a and b")
    n = len(samples)
    mx = sum(x for x, _ in samples) / n
    my = sum(y for _, y in samples) / n
    sxx = sum((x - mx) ** 2 for x, _ in samples)
    sxy = sum((x - mx) * (y - my) for x, y in samples)
    slope = max(sxy / sxx, 1e-12)  # seconds per byte; a flat fit means "very fast"
    a = max(my - slope * mx, 0.0)
    return LinkCost(a=a, b=1.0 / slope)
