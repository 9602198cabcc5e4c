"""Bradley–Terry strengths from a (weighted) win matrix, by Hunter's MM iteration (ALGORITHMS §5)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOL = 1e-6
MAX_ITER = 1000
_SMALL = 16  # up to this many items plain Python floats beat numpy's per-call overhead


@dataclass(frozen=True)
class BTResult:
    p: list[float]          # strengths, Σp = n (items with no comparison at all sit at 1.0)
    iterations: int
    converged: bool

    def order(self) -> list[int]:
        """Item indices, strongest first; ties keep the lower index first (deterministic)."""
        return sorted(range(len(self.p)), key=lambda i: (-self.p[i], i))


def bradley_terry(w: np.ndarray | list[list[float]], tol: float = TOL, max_iter: int = MAX_ITER) -> BTResult:
    """``w[i][j]`` = (weighted) wins of i over j. Iterates
    ``p_i ← Σ_j w_ij / Σ_{j≠i} (w_ij + w_ji) / (p_i + p_j)`` and renormalises to Σp = n until the
    largest change is below ``tol`` (or ``max_iter``).

    Degenerate inputs, handled rather than divided by zero:
    - an item that never won (zero row) goes to p = 0 — the ML estimate at the boundary;
    - an item never compared (zero row and column) carries no information: it keeps p = 1 and the
      others share the remaining mass (Σ over compared items = their count);
    - a pair whose strengths are both 0 contributes nothing to the denominators.
    """
    w = np.asarray(w, dtype=float)
    n = w.shape[0]
    if w.shape != (n, n):
        raise ValueError(f"win matrix must be square, got shape {w.shape}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("win matrix entries must be finite and ≥ 0")
    w = w.copy()
    np.fill_diagonal(w, 0.0)
    p = np.ones(n)
    if n == 0:
        return BTResult([], 0, True)
    games = w + w.T
    rated = games.sum(axis=1) > 0
    m = int(rated.sum())
    if m == 0:
        return BTResult(p.tolist(), 0, True)
    idx = np.flatnonzero(rated)
    wr = w[np.ix_(idx, idx)]
    gr = games[np.ix_(idx, idx)]
    wins = wr.sum(axis=1)
    if m <= _SMALL:
        qs, it, converged = _mm_small(wins.tolist(), gr.tolist(), tol, max_iter)
        p[idx] = qs
        return BTResult(p.tolist(), it, converged)
    q = np.ones(m)
    terms = np.zeros((m, m))
    new = np.zeros(m)
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        s = np.add.outer(q, q)
        terms.fill(0.0)
        np.divide(gr, s, out=terms, where=s > 0)
        denom = terms.sum(axis=1)
        new.fill(0.0)
        np.divide(wins, denom, out=new, where=denom > 0)
        total = new.sum()
        if total <= 0:  # nobody won anything (all verdicts had zero weight): no information
            new.fill(1.0)
        else:
            new *= m / total
        change = float(np.abs(new - q).max())
        q, new = new, q
        if change < tol:
            converged = True
            break
    p[idx] = q
    return BTResult(p.tolist(), it, converged)


def _mm_small(wins: list[float], games: list[list[float]], tol: float, max_iter: int) -> tuple[list[float], int, bool]:
    """The same iteration as above in plain floats, for the swarm's usual 3–16 answers."""
    m = len(wins)
    pairs = [[(j, g) for j, g in enumerate(row) if g > 0] for row in games]
    q = [1.0] * m
    it = 0
    for it in range(1, max_iter + 1):
        new = [0.0] * m
        for i in range(m):
            qi = q[i]
            d = 0.0
            for j, g in pairs[i]:
                s = qi + q[j]
                if s > 0:
                    d += g / s
            if d > 0:
                new[i] = wins[i] / d
        total = sum(new)
        if total <= 0:
            new = [1.0] * m
        else:
            f = m / total
            new = [x * f for x in new]
        change = max(abs(a - b) for a, b in zip(new, q))
        q = new
        if change < tol:
            return q, it, True
    return q, it, False
