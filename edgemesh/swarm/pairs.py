"""Which answers meet, in which order, and who judges each meeting (ALGORITHMS §5 step 3).

Everything here is a pure function of a seed every participant knows, so any member can
recompute (and check) the schedule the coordinator used.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence


def round_seed(query_id: str, commitments: Sequence[str]) -> int:
    """Shared seed of a round: fixed only once every commitment is in, so no single member can
    choose the shuffle (and it is the same on every node that saw the same commitments)."""
    h = hashlib.sha256(b"edgemesh-swarm-seed-v1\0" + query_id.encode())
    for c in sorted(commitments):
        h.update(b"\0" + c.encode())
    return int.from_bytes(h.digest()[:8], "big")


def shuffled_order(n: int, seed: int) -> list[int]:
    """A permutation of 0..n-1: position k of the tournament holds answer ``order[k]``."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def pair_schedule(n: int) -> list[tuple[int, int]]:
    """Ordered pairs of tournament positions: adjacent (i, i+1) for i < n-1 and cross
    (i, i+⌊n/2⌋) for i < ⌊n/2⌋, each in both orders so a judge's preference for the first
    (or second) slot cancels out. Length 2(n−1) + 2⌊n/2⌋ (0 for n < 2)."""
    if n < 2:
        return []
    base = [(i, i + 1) for i in range(n - 1)] + [(i, i + n // 2) for i in range(n // 2)]
    out: list[tuple[int, int]] = []
    for a, b in base:
        out += [(a, b), (b, a)]
    return out


def judgment_count(n: int) -> int:
    return 0 if n < 2 else 2 * (n - 1) + 2 * (n // 2)


@dataclass(frozen=True)
class Judgment:
    """One comparison: answer ``a`` shown first (slot A), answer ``b`` second (slot B)."""

    a: int          # answer index (into the round's answer list, not the tournament position)
    b: int
    judge: str


def schedule_judgments(authors: Sequence[str], judges: Sequence[str], seed: int,
                       preferred: Sequence[str] | None = None) -> list[Judgment]:
    """The round's judgments: answers (``authors[k]`` wrote answer k) shuffled by ``seed``, paired
    as in :func:`pair_schedule`, each given to the least-loaded judge that wrote neither answer
    (ties broken by a seeded shuffle of the judges). A judgment nobody may judge is dropped.

    Load: greedy hand-out, then moves from the busiest judges to idler eligible ones, so loads
    differ by at most one unless the self-judging rule forces otherwise (e.g. 3 answers).

    ``preferred``: judges whose votes count; a judgment goes to one of them whenever one may judge
    it, to the others only when none may (a judgment given to a judge without weight is lost)."""
    rng = random.Random(seed)
    order = shuffled_order(len(authors), seed)
    pairs = [(order[x], order[y]) for x, y in pair_schedule(len(authors))]
    pool = list(dict.fromkeys(judges))
    rng.shuffle(pool)
    rank = {j: k for k, j in enumerate(pool)}
    load = {j: 0 for j in pool}
    # Hand out the most constrained judgments first (fewest eligible judges), then the rest.
    slots = list(range(len(pairs)))
    rng.shuffle(slots)
    eligible = {s: [j for j in pool if j not in (authors[pairs[s][0]], authors[pairs[s][1]])] for s in slots}
    if preferred is not None:
        pref = set(preferred)
        eligible = {s: ([j for j in js if j in pref] or js) for s, js in eligible.items()}
    slots.sort(key=lambda s: len(eligible[s]))
    chosen: dict[int, str] = {}
    for s in slots:
        if not eligible[s]:
            continue
        j = min(eligible[s], key=lambda c: (load[c], rank[c]))
        load[j] += 1
        chosen[s] = j
    _rebalance(chosen, eligible, load, rank)
    return [Judgment(pairs[s][0], pairs[s][1], chosen[s]) for s in range(len(pairs)) if s in chosen]


def probation_judgments(authors: Sequence[str], judges: Sequence[str], seed: int, per_judge: int) -> list[Judgment]:
    """Extra judgments for judges whose votes do not count yet (newcomers, low reputation): pairs
    of the round's schedule they may judge, ``per_judge`` each, so they can earn (or keep losing)
    reputation without taking judgments away from judges that count."""
    order = shuffled_order(len(authors), seed)
    pairs = [(order[x], order[y]) for x, y in pair_schedule(len(authors))]
    rng = random.Random(seed ^ 0x5EED)
    out: list[Judgment] = []
    for j in sorted(judges):
        ok = [p for p in pairs if j not in (authors[p[0]], authors[p[1]])]
        for a, b in rng.sample(ok, min(per_judge, len(ok))):
            out.append(Judgment(a, b, j))
    return out


def _rebalance(chosen: dict[int, str], eligible: dict[int, list[str]], load: dict[str, int],
               rank: dict[str, int]) -> None:
    """Shift work from a judge with load L to one with load ≤ L − 2 along a chain of reassignments
    (u gives a judgment to v, v gives another to w, …), found breadth-first; repeat until no chain
    exists. Each shift lowers Σ load², so this ends; the result is as even as eligibility allows."""
    while True:
        for u in sorted(load, key=lambda j: (-load[j], rank[j])):
            path = _chain(u, chosen, eligible, load, rank)
            if path:
                for s, new in path:
                    load[chosen[s]] -= 1
                    load[new] += 1
                    chosen[s] = new
                break
        else:
            return


def _chain(u: str, chosen: dict[int, str], eligible: dict[int, list[str]], load: dict[str, int],
           rank: dict[str, int]) -> list[tuple[int, str]]:
    held: dict[str, list[int]] = {}
    for s, j in sorted(chosen.items()):
        held.setdefault(j, []).append(s)
    back: dict[str, tuple[str, int] | None] = {u: None}
    frontier = [u]
    while frontier:
        nxt: list[str] = []
        for x in frontier:
            for s in held.get(x, []):
                for c in sorted(eligible[s], key=lambda c: (load[c], rank[c])):
                    if c in back:
                        continue
                    back[c] = (x, s)
                    if load[c] <= load[u] - 2:
                        path: list[tuple[int, str]] = []
                        cur = c
                        while back[cur] is not None:
                            prev, slot = back[cur]  # type: ignore[misc]
                            path.append((slot, cur))
                            cur = prev
                        return path
                    nxt.append(c)
        frontier = nxt
    return []
