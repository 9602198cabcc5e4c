"""Bradley–Terry strengths from a (weighted) win matrix, by Hunter's MM iteration (ALGORITHMS §5)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOL = 1e-6
MAX_ITER = 1000


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
    q = np.ones(m)
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        s = q[:, None] + q[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(s > 0, gr / np.where(s > 0, s, 1.0), 0.0)
        denom = terms.sum(axis=1)
        new = np.where(denom > 0, wins / np.where(denom > 0, denom, 1.0), 0.0)
        total = new.sum()
        if total <= 0:  # nobody won anything (all verdicts had zero weight): no information
            new = np.ones(m)
        else:
            new *= m / total
        change = float(np.abs(new - q).max())
        q = new
        if change < tol:
            converged = True
            break
    p[idx] = q
    return BTResult(p.tolist(), it, converged)
