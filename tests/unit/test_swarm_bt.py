"""Bradley–Terry by MM: golden vectors, agreement with choix, degenerate win matrices."""

from __future__ import annotations

import numpy as np
import pytest

from edgemesh.swarm.bt import bradley_terry

pytestmark = pytest.mark.unit


def test_golden_two_items():
    r = bradley_terry([[0, 3], [1, 0]])
    assert r.converged
    assert r.p == pytest.approx([1.5, 0.5], abs=1e-4)


def test_golden_three_items():
    r = bradley_terry([[0, 2, 1], [0, 0, 2], [1, 0, 0]])
    assert r.converged
    assert r.p == pytest.approx([1.7754, 0.8334, 0.3912], abs=1e-4)
    assert sum(r.p) == pytest.approx(3.0)
    assert r.order() == [0, 1, 2]


@pytest.mark.parametrize("seed", range(8))
def test_agrees_with_choix_on_random_win_matrices(seed):
    choix = pytest.importorskip("choix")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    w = rng.integers(1, 6, size=(n, n)).astype(float)  # every pair played both ways: the ML estimate exists
    np.fill_diagonal(w, 0)
    comparisons = [(i, j) for i in range(n) for j in range(n) for _ in range(int(w[i, j]))]
    ref = np.exp(choix.mm_pairwise(n, comparisons, tol=1e-12, max_iter=100_000))
    ref *= n / ref.sum()  # choix centres log-strengths; we normalise Σp = n
    ours = bradley_terry(w)
    assert ours.converged
    assert ours.p == pytest.approx(ref.tolist(), abs=1e-4)


def test_fractional_weights_scale_invariant():
    w = np.array([[0, 2.5, 0.5], [1.0, 0, 1.5], [0.5, 0.5, 0]])
    assert bradley_terry(w).p == pytest.approx(bradley_terry(w * 7.3).p, abs=1e-6)


def test_item_that_never_wins_goes_to_zero_and_the_rest_still_rank():
    r = bradley_terry([[0, 1, 2], [1, 0, 2], [0, 0, 0]])
    assert r.p[2] == pytest.approx(0.0, abs=1e-9)
    assert r.p[0] == pytest.approx(r.p[1], abs=1e-6)
    assert sum(r.p) == pytest.approx(3.0)


def test_item_never_compared_keeps_one_and_others_share_the_rest():
    r = bradley_terry([[0, 3, 0], [1, 0, 0], [0, 0, 0]])
    assert r.p == pytest.approx([1.5, 0.5, 1.0], abs=1e-4)


def test_unbeaten_item_hits_iteration_cap_without_nan():
    r = bradley_terry([[0, 1, 1], [0, 0, 1], [0, 0, 0]])
    assert not r.converged and r.iterations == 1000
    assert all(np.isfinite(r.p)) and r.order() == [0, 1, 2]


def test_all_zero_and_empty_and_bad_input():
    assert bradley_terry(np.zeros((3, 3))).p == [1.0, 1.0, 1.0]
    assert bradley_terry(np.zeros((0, 0))).p == []
    with pytest.raises(ValueError):
        bradley_terry([[0, 1, 2], [1, 0, 2]])
    with pytest.raises(ValueError):
        bradley_terry([[0, -1], [1, 0]])


def test_large_matrices_take_the_numpy_path_and_agree_with_choix():
    choix = pytest.importorskip("choix")
    rng = np.random.default_rng(42)
    n = 20
    w = rng.integers(1, 4, size=(n, n)).astype(float)
    np.fill_diagonal(w, 0)
    comparisons = [(i, j) for i in range(n) for j in range(n) for _ in range(int(w[i, j]))]
    ref = np.exp(choix.mm_pairwise(n, comparisons, tol=1e-12, max_iter=100_000))
    ref *= n / ref.sum()
    assert bradley_terry(w).p == pytest.approx(ref.tolist(), abs=1e-4)
