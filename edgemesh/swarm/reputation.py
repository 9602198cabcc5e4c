"""Judge reputation: an exponential moving average of how well each judge's verdicts agree with
the final ranking, a calibration gate for newcomers, and penalties for misbehaviour.

The paper does not publish its rule (ALGORITHMS §5); ours:
- agreement of a judge in a round = Kendall τ between its verdicts and the final BT order over the
  pairs it judged that the order separates: (concordant − discordant) / those verdicts, in [−1, 1]
  (U counts 0);
- reputation ← (1 − α)·reputation + α·τ, so it lives in [−1, 1] and estimates the judge's
  expected agreement; newcomers start at 0, i.e. "no better than chance" until shown otherwise;
- a calibration check counts as τ = +1 when passed, −1 when failed; a timeout, a reveal that does
  not open its commitment, or an answer the GOOD/BAD screen drops counts as τ = −1;
- a member whose answers the screen keeps marking BAD (≥ 3 of its last 10) is quarantined: its
  answers skip the tournament until its record improves;
- judge weight = max(reputation, 0) — a judge at chance level carries no information, one below
  it (a liar, a colluder) gets none — and 0 until the member passed calibration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

from edgemesh.swarm.pairs import Judgment

ALPHA = 0.1
START = 0.0              # newcomers start at chance level: a fresh identity buys no influence
CALIBRATION_NEEDED = 3   # known-answer judgments a newcomer must get right…
CALIBRATION_RATE = 0.5   # …at this rate (over its calibration history) before its votes count
SCREEN_WINDOW = 10       # a member with ≥ QUARANTINE_AFTER of its last SCREEN_WINDOW screened
QUARANTINE_AFTER = 3     # answers marked BAD is quarantined: its answers skip the tournament


@dataclass
class MemberRecord:
    reputation: float = START
    calibrated: bool = False
    calibration_passed: int = 0
    calibration_failed: int = 0
    rounds: int = 0
    timeouts: int = 0
    bad_reveals: int = 0
    bad_answers: int = 0   # answers dropped by the GOOD/BAD filter
    recent_screens: list[bool] = field(default_factory=list)  # last screen outcomes, True = BAD

    def to_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def kendall_agreement(verdicts: Iterable[tuple[Judgment, str]], p: Sequence[float]) -> float | None:
    """Kendall-τ-style agreement of one judge's verdicts with strengths ``p``: +1 per verdict that
    names the answer ranked higher, −1 per verdict for the lower one, 0 for U; divided by the
    number of verdicts on pairs the ranking separates. Pairs it ranks equal (e.g. two answers of
    one group) say nothing about the judge and are skipped; None when no pair is left."""
    n = 0
    score = 0
    for j, v in verdicts:
        if p[j.a] == p[j.b]:
            continue
        n += 1
        if v == "U":
            continue
        a_higher = p[j.a] > p[j.b]
        score += 1 if (v == "A") == a_higher else -1
    return None if n == 0 else score / n


@dataclass
class ReputationBook:
    """Reputation of every member the swarm has seen. Plain data, so the mesh can replicate it
    with the membership view (``to_dict``/``from_dict``)."""

    alpha: float = ALPHA
    start: float = START
    calibration_needed: int = CALIBRATION_NEEDED
    calibration_rate: float = CALIBRATION_RATE
    screen_window: int = SCREEN_WINDOW
    quarantine_after: int = QUARANTINE_AFTER
    members: dict[str, MemberRecord] = field(default_factory=dict)

    def record(self, member: str) -> MemberRecord:
        if member not in self.members:
            self.members[member] = MemberRecord(reputation=self.start)
        return self.members[member]

    def reputation(self, member: str) -> float:
        return self.record(member).reputation

    def weight(self, member: str) -> float:
        """How much a verdict of this member counts: its reputation (≥ 0) once calibrated, else 0."""
        r = self.record(member)
        return max(r.reputation, 0.0) if r.calibrated else 0.0

    def admit(self, member: str, reputation: float | None = None) -> None:
        """Mark a member calibrated without calibration queries (an operator's decision, or a
        benchmark starting from a known-good population)."""
        r = self.record(member)
        r.calibrated = True
        if reputation is not None:
            r.reputation = reputation

    def calibration_result(self, member: str, passed: bool) -> None:
        """One known-answer judgment; the member's votes count once it has enough passes at a high
        enough rate. Each check also moves its reputation like a round in full (dis)agreement."""
        r = self.record(member)
        if passed:
            r.calibration_passed += 1
        else:
            r.calibration_failed += 1
        self._update(r, 1.0 if passed else -1.0)  # a check is a round scored against the truth
        total = r.calibration_passed + r.calibration_failed
        r.calibrated = r.calibration_passed >= self.calibration_needed and r.calibration_passed >= self.calibration_rate * total

    def agreement(self, member: str, tau: float) -> None:
        r = self.record(member)
        r.rounds += 1
        self._update(r, tau)

    def timeout(self, member: str) -> None:
        r = self.record(member)
        r.timeouts += 1
        self._update(r, -1.0)

    def bad_reveal(self, member: str) -> None:
        r = self.record(member)
        r.bad_reveals += 1
        self._update(r, -1.0)

    def bad_answer(self, member: str) -> None:
        """An answer the GOOD/BAD screen dropped (e.g. one that addresses the judges instead of
        the question): misbehaviour as an author, counted like a disagreeing round."""
        r = self.record(member)
        r.bad_answers += 1
        self._screened(r, True)
        self._update(r, -1.0)

    def good_answer(self, member: str) -> None:
        self._screened(self.record(member), False)

    def quarantined(self, member: str) -> bool:
        """A repeat offender: its answers skip the tournament (it may still judge, by weight).
        An honest member with a 2 % false-positive screen is quarantined about once in 1,000
        rounds and leaves quarantine as soon as its window holds fewer BAD marks."""
        return sum(self.record(member).recent_screens) >= self.quarantine_after

    def _screened(self, r: MemberRecord, bad: bool) -> None:
        r.recent_screens.append(bad)
        del r.recent_screens[:-self.screen_window]

    def _update(self, r: MemberRecord, tau: float) -> None:
        tau = max(-1.0, min(1.0, tau))
        r.reputation = (1 - self.alpha) * r.reputation + self.alpha * tau

    def snapshot(self) -> dict[str, float]:
        return {m: r.reputation for m, r in sorted(self.members.items())}

    def to_dict(self) -> dict[str, object]:
        return {"alpha": self.alpha, "start": self.start, "calibration_needed": self.calibration_needed,
                "calibration_rate": self.calibration_rate, "screen_window": self.screen_window,
                "quarantine_after": self.quarantine_after,
                "members": {m: r.to_dict() for m, r in sorted(self.members.items())}}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ReputationBook:
        members = data.get("members", {})
        if not isinstance(members, Mapping):
            raise ValueError("reputation book: 'members' must be a mapping")
        book = cls(alpha=float(data.get("alpha", ALPHA)), start=float(data.get("start", START)),  # type: ignore[arg-type]
                   calibration_needed=int(data.get("calibration_needed", CALIBRATION_NEEDED)),  # type: ignore[arg-type]
                   calibration_rate=float(data.get("calibration_rate", CALIBRATION_RATE)),  # type: ignore[arg-type]
                   screen_window=int(data.get("screen_window", SCREEN_WINDOW)),  # type: ignore[arg-type]
                   quarantine_after=int(data.get("quarantine_after", QUARANTINE_AFTER)))  # type: ignore[arg-type]
        for m, rec in members.items():
            fields_ = {k: rec[k] for k in MemberRecord.__dataclass_fields__ if k in rec}
            fields_["recent_screens"] = [bool(x) for x in fields_.get("recent_screens", [])]
            book.members[str(m)] = MemberRecord(**fields_)
        return book
