"""`edgemesh bench swarm`: multiple-choice accuracy of the BT swarm against majority vote and the
best single member, with and without colluding adversaries — simulated members over a real
question set (MMLU), a fixed seed, everything in one process.

Scenario (all knobs in ``SwarmBenchConfig``): ``nodes`` honest members with answer accuracies
spread evenly over [acc_low, acc_high] and judge accuracies ``judge_gap`` higher (capped); the
adversarial run adds ``adversaries`` colluders to the same honest members (same answers), who
agree on a wrong option, append a prompt injection, and vote for each other. Every member first
takes calibration checks (known right vs wrong answer, both orders) on held-out questions; then
the questions run in order, reputation carried from one query to the next.

The swarm's answer groups answers by their option letter (``RoundConfig.answer_key``): the letter
whose answers have the largest summed BT strength wins. The plain rule of ALGORITHMS §5 (the
single strongest answer) is reported beside it as ``acc_swarm_top_answer``.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

from edgemesh.swarm.datasets import MCQuestion, load_questions
from edgemesh.swarm.reputation import ReputationBook
from edgemesh.swarm.round import LocalPeer, Query, RoundConfig, SwarmResult, calibrate, run_round
from edgemesh.swarm.simulated import Oracle, SimProfile, SimulatedMember, SimulatedScreen, rng_for
from edgemesh.swarm.verdict import parse_choice

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SwarmBenchConfig:
    dataset: str = "mmlu"
    nodes: int = 7
    questions: int = 500
    adversaries: int = 2
    seed: int = 0
    acc_low: float = 0.35
    acc_high: float = 0.75
    judge_gap: float = 0.2          # judges are this much better at comparing than at answering…
    judge_max: float = 0.95         # …up to this
    position_bias: float = 0.1
    injection_fooled: float = 0.3
    distractor: float = 0.0
    calibration_checks: int = 12    # at most this many known-answer checks per member before the run
    answer_filter: bool = True      # the GOOD/BAD screen (drops injected answers it recognises)
    filter_recall: float = 0.9
    filter_false_positive: float = 0.02

    def __post_init__(self) -> None:
        if self.nodes < 3:
            raise ValueError("the swarm needs at least 3 members (a judge must not judge its own answer)")
        if self.questions < 1 or self.adversaries < 0:
            raise ValueError("questions must be ≥ 1 and adversaries ≥ 0")


def honest_profiles(cfg: SwarmBenchConfig) -> list[SimProfile]:
    n = cfg.nodes
    accs = [cfg.acc_low + (cfg.acc_high - cfg.acc_low) * k / (n - 1) for k in range(n)]
    return [SimProfile(accuracy=a, judge_accuracy=min(cfg.judge_max, a + cfg.judge_gap),
                       position_bias=cfg.position_bias, injection_fooled=cfg.injection_fooled,
                       distractor=cfg.distractor) for a in accs]


def build_members(cfg: SwarmBenchConfig, oracle: Oracle, adversaries: int) -> list[SimulatedMember]:
    members = [SimulatedMember(f"m{k}", p, oracle, cfg.seed) for k, p in enumerate(honest_profiles(cfg))]
    honest_mean_judge = sum(p.judge_accuracy for p in honest_profiles(cfg)) / cfg.nodes
    for k in range(adversaries):
        prof = SimProfile(accuracy=0.0, judge_accuracy=honest_mean_judge, position_bias=cfg.position_bias,
                          kind="colluder", group="cabal")
        members.append(SimulatedMember(f"adv{k}", prof, oracle, cfg.seed))
    return members


def majority(letters: Sequence[str | None], rng: random.Random) -> str | None:
    """Plurality of the parsed letters; a tie is broken at random (seeded), unparsed answers abstain."""
    c = Counter(x for x in letters if x)
    if not c:
        return None
    top = max(c.values())
    return rng.choice(sorted(x for x, v in c.items() if v == top))


async def _calibrate_all(peers: Sequence[LocalPeer], held_out: Sequence[MCQuestion], book: ReputationBook,
                         cfg: SwarmBenchConfig) -> None:
    for peer in peers:
        for k in range(cfg.calibration_checks):
            if book.record(peer.id).calibrated:
                break
            q = held_out[k % len(held_out)]
            wrong = rng_for(cfg.seed, "calibration", peer.id, k).choice([x for x in q.letters if x != q.answer])
            await calibrate(peer, Query(f"cal-{peer.id}-{k}", q.prompt()), f"The answer is {q.answer}.",
                            f"The answer is {wrong}.", book)


@dataclass
class ScenarioResult:
    swarm_correct: list[bool]          # grouped by option letter (the bench's swarm)
    top_answer_correct: list[bool]     # the single strongest answer (ALGORITHMS §5 without grouping)
    majority_correct: list[bool]
    member_correct: dict[str, list[bool]]
    reputation_trace: list[dict[str, float]]
    book: ReputationBook
    last: SwarmResult | None


async def run_scenario(questions: Sequence[MCQuestion], held_out: Sequence[MCQuestion], members: Sequence[SimulatedMember],
                       cfg: SwarmBenchConfig, label: str, progress: Progress | None = None) -> ScenarioResult:
    book = ReputationBook()
    peers = [LocalPeer(m, rng_for(cfg.seed, "nonce", m.id)) for m in members]
    await _calibrate_all(peers, held_out, book, cfg)
    screen = SimulatedScreen(cfg.filter_recall, cfg.filter_false_positive, cfg.seed) if cfg.answer_filter else None
    tie_rng = rng_for(cfg.seed, "majority", label)
    out = ScenarioResult([], [], [], {m.id: [] for m in members}, [], book, None)
    for k, q in enumerate(questions):
        config = RoundConfig(answer_filter=screen, answer_key=lambda text, opts=q.letters: parse_choice(text, opts))
        res = await run_round(Query(f"{label}-{q.qid}", q.prompt()), peers, book, config)
        top = max(res.scores, key=lambda m: (res.scores[m], -res.order.index(m))) if res.scores else None
        out.swarm_correct.append(res.answer is not None and parse_choice(res.answer, q.letters) == q.answer)
        out.top_answer_correct.append(top is not None and parse_choice(res.answers[top], q.letters) == q.answer)
        # Majority vote sees every member's answer (it has no screen to drop any).
        letters = {m.id: m.choose(q) for m in members}
        out.majority_correct.append(majority(list(letters.values()), tie_rng) == q.answer)
        for m in members:
            out.member_correct[m.id].append(letters[m.id] == q.answer)
        out.reputation_trace.append(book.snapshot())
        out.last = res
        if progress:
            progress(label, k + 1, len(questions))
    return out


def _acc(xs: Sequence[bool]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def first_below(trace: Sequence[dict[str, float]], bad: Sequence[str], good: Sequence[str]) -> int | None:
    """1-based query after which every adversary's reputation is below every honest member's (and
    stays so to the end), or None."""
    ok_from = None
    for k, snap in enumerate(trace):
        holds = max(snap[b] for b in bad) < min(snap[g] for g in good)
        if holds and ok_from is None:
            ok_from = k + 1
        elif not holds:
            ok_from = None
    return ok_from


def run_bench(cfg: SwarmBenchConfig, progress: Progress | None = None, questions: Sequence[MCQuestion] | None = None) -> dict:
    """Run both scenarios; a JSON-ready dict of accuracies and reputation figures."""
    pool = list(questions) if questions is not None else load_questions(cfg.dataset, cfg.questions + 50, cfg.seed)
    qs, held_out = pool[: cfg.questions], pool[cfg.questions:] or pool[:1]
    oracle = Oracle.of(pool, cfg.seed)

    async def both() -> tuple[ScenarioResult, ScenarioResult]:
        honest = await run_scenario(qs, held_out, build_members(cfg, oracle, 0), cfg, "honest", progress)
        if cfg.adversaries == 0:  # the adversarial run would repeat the honest one
            return honest, honest
        adv = await run_scenario(qs, held_out, build_members(cfg, oracle, cfg.adversaries), cfg, "adversarial", progress)
        return honest, adv

    honest, adv = asyncio.run(both())
    honest_ids = [f"m{k}" for k in range(cfg.nodes)]
    adv_ids = [f"adv{k}" for k in range(cfg.adversaries)]
    single = {m: _acc(honest.member_correct[m]) for m in honest_ids}
    best = max(single, key=lambda m: single[m])
    result: dict = {
        "dataset": cfg.dataset, "questions": len(qs), "nodes": cfg.nodes, "adversaries": cfg.adversaries,
        "seed": cfg.seed, "simulated": True,
        "acc_swarm": _acc(honest.swarm_correct), "acc_majority": _acc(honest.majority_correct),
        "acc_best_single": single[best], "best_single_member": best,
        "acc_swarm_adversarial": _acc(adv.swarm_correct), "acc_majority_adversarial": _acc(adv.majority_correct),
        "acc_swarm_top_answer": _acc(honest.top_answer_correct),
        "acc_swarm_top_answer_adversarial": _acc(adv.top_answer_correct),
        "acc_members": single,
        "profiles": {m.id: asdict(m.profile) for m in build_members(cfg, oracle, cfg.adversaries)},
        "calibrated": {m: r.calibrated for m, r in adv.book.members.items()},
        "reputation_end": {"honest": honest.book.snapshot(), "adversarial": adv.book.snapshot()},
        "config": asdict(cfg),
    }
    if adv_ids:
        holds = [max(s[b] for b in adv_ids) < min(s[g] for g in honest_ids) for s in adv.reputation_trace]
        result["adversaries_below_honest_first"] = holds.index(True) + 1 if True in holds else None
        result["adversaries_below_honest_after"] = first_below(adv.reputation_trace, adv_ids, honest_ids)
        result["adversaries_below_honest_fraction"] = sum(holds) / len(holds)
        result["reputation_at_50"] = adv.reputation_trace[min(49, len(adv.reputation_trace) - 1)]
    return result


async def run_members(questions: Sequence[MCQuestion], members: Sequence[object], seed: int = 0,
                      progress: Progress | None = None, config: RoundConfig | None = None) -> dict:
    """The honest comparison with real members (any ``SwarmMember``: an OpenAI-compatible endpoint,
    a local model): BT swarm vs majority vote vs each member alone, on the same answers. Members
    start admitted at reputation 0 (no calibration: small models may never pass it), so the first
    rounds count every judge equally until reputations grow."""
    book = ReputationBook()
    peers = [LocalPeer(m) for m in members]  # type: ignore[arg-type]
    for p in peers:
        book.admit(p.id, 0.0)
    tie_rng = rng_for(seed, "majority", "members")
    swarm, top_ok, maj = [], [], []
    single: dict[str, list[bool]] = {p.id: [] for p in peers}
    left_out = 0
    last: SwarmResult | None = None
    for k, q in enumerate(questions):
        cfg = replace(config or RoundConfig(), answer_key=lambda text, opts=q.letters: parse_choice(text, opts))
        res = await run_round(Query(f"real-{q.qid}", q.prompt()), peers, book, cfg)
        letters = {m: parse_choice(a, q.letters) for m, a in res.answers.items()}
        top = max(res.scores, key=lambda m: (res.scores[m], -res.order.index(m))) if res.scores else None
        swarm.append(res.answer is not None and parse_choice(res.answer, q.letters) == q.answer)
        top_ok.append(top is not None and letters.get(top) == q.answer)
        maj.append(majority(list(letters.values()), tie_rng) == q.answer)
        for pid in single:
            single[pid].append(letters.get(pid) == q.answer)
        left_out += len(res.left_out)
        last = res
        if progress:
            progress("members", k + 1, len(questions))
    acc = {m: _acc(v) for m, v in single.items()}
    best = max(acc, key=lambda m: acc[m]) if acc else None
    return {"questions": len(questions), "nodes": len(peers), "simulated": False,
            "acc_swarm": _acc(swarm), "acc_swarm_top_answer": _acc(top_ok), "acc_majority": _acc(maj),
            "acc_best_single": acc[best] if best else 0.0, "best_single_member": best, "acc_members": acc,
            "left_out_total": left_out, "reputation_end": book.snapshot(),
            "last_round": last.to_dict() if last else None}
