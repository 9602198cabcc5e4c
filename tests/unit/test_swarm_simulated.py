"""The swarm against majority vote on simulated members over 500 MMLU questions (fixed seed).

Scenario as in the issue: 7 honest members with answer accuracy 0.35–0.75 and judge accuracy
0.2 higher (capped at 0.95), 10 % position bias, honest judges obeying an injected instruction
30 % of the time. The adversarial run adds 2 colluders (agreed wrong option, prompt injection,
votes for each other). What each test assumes beyond that is in its docstring; the README lists
the figures for the other settings, including the ones that miss the targets.
"""

from __future__ import annotations

import pytest

from edgemesh.bench.swarm import SwarmBenchConfig, run_bench
from edgemesh.errors import DatasetMissingError
from edgemesh.swarm.datasets import load_questions

pytestmark = [pytest.mark.unit, pytest.mark.slow]

N_QUESTIONS = 500


@pytest.fixture(scope="module")
def pool():
    try:
        return load_questions("mmlu", N_QUESTIONS + 50, seed=0)
    except DatasetMissingError as exc:
        pytest.skip(str(exc))


def test_swarm_beats_majority_with_independent_mistakes(pool):
    """Wrong answers independent and uniform over the 3 wrong options (the best case for
    majority vote); no screen; no adversaries."""
    r = run_bench(SwarmBenchConfig(questions=N_QUESTIONS, adversaries=0, answer_filter=False, distractor=0.0),
                  questions=pool)
    assert r["questions"] == N_QUESTIONS
    assert r["acc_majority"] > r["acc_best_single"]  # the members really are a useful crowd
    assert r["acc_swarm"] >= r["acc_majority"] + 0.05, r


def test_colluders_cost_at_most_two_points_and_lose_reputation_fast(pool):
    """Independent mistakes again; the GOOD/BAD screen runs (recall 0.9, 2 % false positives),
    so repeat offenders are quarantined. Seed 0 as the bench's default; the README lists seeds 1
    and 2 (drops 0.2 and 3.2 points: the 2-point bound is near the noise of 500 questions) and
    the collapse to majority level without the screen."""
    r = run_bench(SwarmBenchConfig(questions=N_QUESTIONS, adversaries=2, answer_filter=True, distractor=0.0),
                  questions=pool)
    assert r["acc_swarm"] >= r["acc_majority"] + 0.05, r
    assert r["acc_swarm"] - r["acc_swarm_adversarial"] <= 0.02, r
    assert r["acc_swarm_adversarial"] > r["acc_majority_adversarial"], r
    first = r["adversaries_below_honest_first"]
    assert first is not None and first <= 50, r
    at50 = r["reputation_at_50"]
    assert max(at50["adv0"], at50["adv1"]) < min(v for m, v in at50.items() if m.startswith("m")), at50
    assert r["adversaries_below_honest_fraction"] >= 0.9, r
