"""One swarm query, end to end: query → commit → reveal → (filter) → judging → verdicts → result.

The coordinator drives abstract peers through the phases with a deadline per phase; a peer that
misses a deadline (or errs, or reveals something it did not commit to) is left out of the rest of
the round and loses reputation. Peers are a protocol so the same code runs over in-process
members (tests, benchmarks) and over mesh RPC (a remote node runs a ``LocalPeer`` around its own
backend and the coordinator calls it through RPC).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, NamedTuple, Protocol, Sequence, TypeVar

import numpy as np

from edgemesh.swarm.bt import bradley_terry
from edgemesh.swarm.commit import commitment, new_nonce, verify_reveal
from edgemesh.swarm.pairs import Judgment, probation_judgments, round_seed, schedule_judgments, shuffled_order
from edgemesh.swarm.reputation import ReputationBook, kendall_agreement
from edgemesh.swarm.verdict import parse_verdict

T = TypeVar("T")


class SwarmMember(Protocol):
    """A model that can answer and judge: the backend side (simulated, OpenAI-compatible, local LLM)."""

    @property
    def id(self) -> str: ...

    async def answer(self, question: str) -> str: ...

    async def judge(self, question: str, answer_a: str, answer_b: str) -> str: ...


class Query(NamedTuple):
    query_id: str
    question: str


class Reveal(NamedTuple):
    answer: str
    nonce: str


class SwarmPeer(Protocol):
    """What the coordinator talks to; over the mesh, each method is one RPC to the member's node."""

    @property
    def id(self) -> str: ...

    async def commit(self, query: Query) -> str: ...

    async def reveal(self, query_id: str) -> Reveal: ...

    async def judge(self, query: Query, answer_a: str, answer_b: str) -> str: ...


class LocalPeer:
    """The member side of the protocol around a ``SwarmMember``: answers, keeps the answer and its
    nonce secret until asked to reveal. ``rng`` only for reproducible simulations."""

    def __init__(self, member: SwarmMember, rng: random.Random | None = None) -> None:
        self.member = member
        self._rng = rng
        self._pending: dict[str, Reveal] = {}

    @property
    def id(self) -> str:
        return self.member.id

    async def commit(self, query: Query) -> str:
        text = await self.member.answer(query.question)
        nonce = new_nonce(self._rng)
        self._pending[query.query_id] = Reveal(text, nonce)
        return commitment(query.query_id, self.id, text, nonce)

    async def reveal(self, query_id: str) -> Reveal:
        try:
            return self._pending.pop(query_id)
        except KeyError:
            raise LookupError(f"no committed answer for query {query_id}") from None

    async def judge(self, query: Query, answer_a: str, answer_b: str) -> str:
        return await self.member.judge(query.question, answer_a, answer_b)


AnswerFilter = Callable[[str, str], Awaitable[bool]]
"""Optional quick GOOD/BAD screen: (question, answer) → keep? Dropped answers leave the tournament."""


@dataclass(frozen=True)
class RoundConfig:
    commit_timeout: float = 120.0   # answering is the slow part (a model generates)
    reveal_timeout: float = 10.0
    judge_timeout: float = 60.0
    filter_timeout: float = 30.0
    max_answer_chars: int = 16_000  # longer answers are refused: judges have small contexts
    answer_filter: AnswerFilter | None = None
    # Groups answers that say the same thing (e.g. the letter of a multiple-choice answer; None =
    # ungrouped): the group with the largest summed strength wins. None: the strongest answer wins.
    answer_key: Callable[[str], str | None] | None = None
    # Judgments whose votes count go to judges with weight; each judge without weight (newcomer,
    # reputation ≤ 0) gets this many extra judgments on the side, scored but not counted.
    probation_judgments: int = 2


@dataclass
class JudgedPair:
    judge: str
    a: str          # author of the answer shown first
    b: str
    verdict: str    # A, B, U, or "-" when the judge did not answer in time
    weight: float
    raw: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"judge": self.judge, "a": self.a, "b": self.b, "verdict": self.verdict, "weight": self.weight,
                "raw": self.raw}


@dataclass
class SwarmResult:
    query_id: str
    question: str
    winner: str | None                   # member whose answer won
    answer: str | None
    scores: dict[str, float]             # BT strength per answering member (Σ = number of answers)
    answers: dict[str, str]
    order: list[str]                     # tournament order (shuffled by the shared seed)
    judgments: list[JudgedPair]
    left_out: dict[str, str]             # member → why it is not in the result
    filtered: dict[str, str] = field(default_factory=dict)
    groups: dict[str, float] = field(default_factory=dict)       # answer key → summed strength
    reputation: dict[str, float] = field(default_factory=dict)   # after this round
    agreement: dict[str, float] = field(default_factory=dict)    # each judge's τ this round
    seed: int = 0
    bt_iterations: int = 0
    bt_converged: bool = True
    notes: list[str] = field(default_factory=list)

    def ranking(self) -> list[str]:
        return sorted(self.scores, key=lambda m: (-self.scores[m], self.order.index(m)))

    def to_dict(self) -> dict[str, Any]:
        """JSON/msgpack-friendly (str keys, plain numbers and strings)."""
        return {"query_id": self.query_id, "question": self.question, "winner": self.winner, "answer": self.answer,
                "scores": dict(self.scores), "ranking": self.ranking(), "answers": dict(self.answers),
                "order": list(self.order), "judgments": [j.to_dict() for j in self.judgments],
                "left_out": dict(self.left_out), "filtered": dict(self.filtered), "groups": dict(self.groups),
                "reputation": dict(self.reputation), "agreement": dict(self.agreement), "seed": self.seed,
                "bt_iterations": self.bt_iterations, "bt_converged": self.bt_converged, "notes": list(self.notes)}


async def _phase(calls: Mapping[Any, Callable[[], Awaitable[T]]], timeout: float) -> tuple[dict[Any, T], dict[Any, str]]:
    """Run every call concurrently under one deadline: (results, key → why it failed)."""
    tasks = {k: asyncio.ensure_future(c()) for k, c in calls.items()}
    if not tasks:
        return {}, {}
    done, pending = await asyncio.wait(tasks.values(), timeout=timeout)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    ok: dict[Any, T] = {}
    failed: dict[Any, str] = {}
    for k, t in tasks.items():
        if t in pending:
            failed[k] = f"no reply within {timeout:g} s"
        elif t.exception() is not None:
            exc = t.exception()
            failed[k] = f"failed: {type(exc).__name__}: {exc}"[:200]
        else:
            ok[k] = t.result()
    return ok, failed


async def run_round(query: Query, peers: Sequence[SwarmPeer], book: ReputationBook,
                    config: RoundConfig = RoundConfig(), known_key: str | None = None) -> SwarmResult:
    """Run one query through the swarm and update ``book`` (reputation) in place.

    ``known_key``: for a spot-check query whose right answer the coordinator knows (its key under
    ``config.answer_key``), judges are scored against the truth instead of the swarm's own order.
    Members cannot tell a spot check from a real query."""
    by_id = {p.id: p for p in peers}
    if len(by_id) != len(peers):
        raise ValueError("peer ids must be unique")
    left_out: dict[str, str] = {}
    notes: list[str] = []

    # 1. Everyone answers and commits to its answer by hash; nothing is revealed yet.
    commits, failed = await _phase({pid: (lambda p=p: p.commit(query)) for pid, p in by_id.items()}, config.commit_timeout)
    for pid, why in failed.items():
        left_out[pid] = f"commit: {why}"
        book.timeout(pid)
    for pid, c in list(commits.items()):
        if not isinstance(c, str) or len(c) != 64:
            left_out[pid] = "commit: malformed commitment"
            book.bad_reveal(pid)
            del commits[pid]

    # 2. Reveals, each checked against its commitment.
    reveals, failed = await _phase({pid: (lambda p=by_id[pid]: p.reveal(query.query_id)) for pid in commits},
                                   config.reveal_timeout)
    for pid, why in failed.items():
        left_out[pid] = f"reveal: {why}"
        book.timeout(pid)
    answers: dict[str, str] = {}
    for pid in sorted(reveals):
        r = reveals[pid]
        if not isinstance(r, Reveal) or not verify_reveal(query.query_id, pid, commits[pid], r.answer, r.nonce):
            left_out[pid] = "reveal does not match its commitment"
            book.bad_reveal(pid)
        elif len(r.answer) > config.max_answer_chars:
            left_out[pid] = f"answer longer than {config.max_answer_chars} characters"
        else:
            answers[pid] = r.answer
    judges = sorted(answers)  # members that kept to the protocol judge, whatever the filter says
    seed = round_seed(query.query_id, [commits[pid] for pid in judges])

    # 3. Optional GOOD/BAD screen.
    filtered: dict[str, str] = {}
    if config.answer_filter is not None and answers:
        flt = config.answer_filter
        keep, failed = await _phase({pid: (lambda a=a: flt(query.question, a)) for pid, a in answers.items()},
                                    config.filter_timeout)
        for pid in sorted(answers):
            quarantined = book.quarantined(pid)  # judged on the record before this answer
            if pid in failed:
                notes.append(f"filter for {pid}'s answer: {failed[pid]} (kept)")
            elif not keep[pid]:
                filtered[pid] = "marked BAD by the filter"
                book.bad_answer(pid)
            else:
                book.good_answer(pid)
            if quarantined and pid not in filtered:
                filtered[pid] = (f"quarantined: {sum(book.record(pid).recent_screens)} of its last "
                                 f"{len(book.record(pid).recent_screens)} screened answers were marked BAD")
        for pid in filtered:
            del answers[pid]

    authors = sorted(answers)
    order = [authors[k] for k in shuffled_order(len(authors), seed)]
    result = SwarmResult(query.query_id, query.question, None, None, {}, dict(answers), order, [], left_out,
                         filtered, seed=seed, notes=notes)
    if not authors:
        result.notes.append("no answer reached the tournament")
        result.reputation = {pid: book.reputation(pid) for pid in sorted(by_id)}
        return result
    if len(authors) == 1:
        result.winner, result.answer = authors[0], answers[authors[0]]
        result.scores = {authors[0]: 1.0}
        result.notes.append("a single answer: nothing to compare")
        result.reputation = {pid: book.reputation(pid) for pid in sorted(by_id)}
        return result

    # 4. Pairwise judgments, both orders, never by an author of either answer; judges whose votes
    # count take them, the others judge on probation.
    weights = {j: book.weight(j) for j in judges}
    counted = [j for j in judges if weights[j] > 0]
    plan = schedule_judgments(authors, judges, seed, preferred=counted if counted else None)
    if counted and config.probation_judgments > 0:
        plan += probation_judgments(authors, [j for j in judges if weights[j] == 0], seed, config.probation_judgments)
    if len(plan) == 0:
        result.notes.append("no eligible judge for any pair")
    verdicts_raw, failed = await _phase(
        {k: (lambda j=j: by_id[j.judge].judge(query, answers[authors[j.a]], answers[authors[j.b]]))
         for k, j in enumerate(plan)}, config.judge_timeout)
    for k in sorted(failed):
        j = plan[k]
        if j.judge not in left_out:
            left_out[j.judge] = f"judge: {failed[k]}"
        book.timeout(j.judge)  # every missed judgment costs

    if not any(weights[plan[k].judge] > 0 for k in verdicts_raw):
        # A young swarm (nobody has earned weight yet) still has to answer: calibrated judges
        # count equally; if none is calibrated, everyone does. Said in the result.
        calibrated = {j for j in judges if book.record(j).calibrated}
        weights = {j: 1.0 if (j in calibrated or not calibrated) else 0.0 for j in judges}
        result.notes.append("no judge with earned weight answered: verdicts counted with equal weight"
                            + (" (calibrated judges only)" if calibrated else ""))
    n = len(authors)
    per_judge: dict[str, list[tuple[Judgment, str]]] = {}
    for k, j in enumerate(plan):
        raw = verdicts_raw.get(k)
        v = parse_verdict(raw) if isinstance(raw, str) else "-"
        wt = weights[j.judge] if v != "-" else 0.0
        result.judgments.append(JudgedPair(j.judge, authors[j.a], authors[j.b], v, wt,
                                           raw[:500] if isinstance(raw, str) else ""))
        if v != "-":
            per_judge.setdefault(j.judge, []).append((j, v))
    w = np.zeros((n, n))
    for judge, vs in per_judge.items():
        w += _wins(n, vs, weights[judge])

    # 5. Bradley–Terry; the strongest answer wins (ties: earlier tournament position). With an
    # answer key (e.g. the option letter of a multiple-choice answer) answers that say the same
    # thing pool their strength: the strongest group wins, represented by its strongest answer.
    bt = bradley_terry(w)
    pos = {m: k for k, m in enumerate(order)}
    result.scores = {authors[i]: bt.p[i] for i in range(n)}
    result.bt_iterations, result.bt_converged = bt.iterations, bt.converged
    candidates = list(range(n))
    keys: list[str | None] = [None] * n
    group_score: dict[str, float] = {}
    if config.answer_key is not None:
        keys = [config.answer_key(answers[a]) for a in authors]
        for i, k in enumerate(keys):
            if k is not None:
                group_score[k] = group_score.get(k, 0.0) + bt.p[i]
        result.groups = dict(sorted(group_score.items()))
        if group_score:
            top = max(group_score.values())
            best_keys = {k for k, v in group_score.items() if v == top}
            candidates = [i for i in range(n) if keys[i] in best_keys]
    best = min(candidates, key=lambda i: (-bt.p[i], pos[authors[i]]))
    result.winner, result.answer = authors[best], answers[authors[best]]

    # 6. Reputation: each judge's agreement with the final order (of groups, when answers are grouped).
    strength = list(bt.p)
    if config.answer_key is not None and known_key is not None:
        strength = [1.0 if keys[i] == known_key else 0.0 for i in range(n)]
        result.notes.append("spot check: judges scored against the known answer")
    elif config.answer_key is not None:
        strength = [group_score[keys[i]] if keys[i] is not None else bt.p[i] for i in range(n)]
    for judge, vs in sorted(per_judge.items()):
        tau = kendall_agreement(vs, strength)
        if tau is not None:
            result.agreement[judge] = tau
            book.agreement(judge, tau)
    result.reputation = {pid: book.reputation(pid) for pid in sorted(by_id)}
    return result


def _wins(n: int, verdicts: Sequence[tuple[Judgment, str]], weight: float) -> np.ndarray:
    """Win matrix of one judge's verdicts: the named answer gets ``weight``, U gives half to each."""
    w = np.zeros((n, n))
    for j, v in verdicts:
        if v == "A":
            w[j.a, j.b] += weight
        elif v == "B":
            w[j.b, j.a] += weight
        else:
            w[j.a, j.b] += weight / 2
            w[j.b, j.a] += weight / 2
    return w


async def calibrate(peer: SwarmPeer, query: Query, good: str, bad: str, book: ReputationBook,
                    timeout: float = 60.0) -> bool:
    """A known-answer check for a judge: ``good`` vs ``bad`` in both orders. Passed only if the
    judge names the good answer both times (a judge that always says A fails). The peer sees an
    ordinary judging request, so it cannot tell calibration from real work."""
    async def both() -> tuple[str, str]:
        return (await peer.judge(query, good, bad), await peer.judge(query, bad, good))

    got, failed = await _phase({0: both}, timeout)
    if 0 in failed:
        book.record(peer.id).timeouts += 1  # counted; the failed calibration below is the penalty
        book.calibration_result(peer.id, False)
        return False
    first, second = got[0]
    passed = parse_verdict(first) == "A" and parse_verdict(second) == "B"
    book.calibration_result(peer.id, passed)
    return passed
