"""Re-implementations of the peers' allocation solvers, for side-by-side benchmarks only.

Written from the published descriptions (``shared/reference/vip-authors-code.md`` sections 1 and 3, and the
Knapsack-RL paper), not from their code:

* :func:`authors_slsqp_allocate`: the VIP authors' final pipeline: scipy SLSQP on the continuous relaxation
  (start at uniform, box bounds, equality budget), then their rounding: floor, zero any n < 4, greedy fill by the
  legacy surrogate ``sum a (n+3)/(n+4)^2``, re-zero any 1..3 and hand the freed units to the largest n.
* :func:`authors_bisection_allocate`: their earlier research allocator: minimise ``sum a (n+3)/(n+4)^2`` over
  rollouts *added* to a minimum of 4 by bisection on the KKT multiplier, floor, greedy fill.
* :func:`knapsack_dp_allocate`: Knapsack-RL's exact dynamic program, O(M * budget * n_max).

Our greedy loops recompute each prompt's marginal gain vectorised (O(M) per unit) where the authors' code
recomputes the whole objective per candidate (O(M^2) per unit), so the timings here flatter the peers.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from vipalloc.allocation import _solve_dp, domain

__all__ = ["authors_bisection_allocate", "authors_slsqp_allocate", "knapsack_dp_allocate"]

GAMMA = {"rloo": 7e-4, "drgrpo": 4e-4}


def _legacy_gain(a: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Decrease of a (n+3)/(n+4)^2 when n -> n+1 (the authors' rounding surrogate)."""
    return a * ((n + 3) / (n + 4) ** 2 - (n + 4) / (n + 5) ** 2)


def _greedy_fill(a: np.ndarray, n: np.ndarray, left: int, upper: int) -> np.ndarray:
    n = n.copy()
    for _ in range(left):
        gain = np.where(n < upper, _legacy_gain(a, n), -np.inf)
        n[int(np.argmax(gain))] += 1
    return n


def authors_slsqp_allocate(
    p: np.ndarray, budget: int, *, estimator: str = "rloo", lower: float = 1.0, upper: int = 32, min_keep: int = 4
) -> np.ndarray:
    """The VIP authors' final allocator (SLSQP + rounding); returns int64 counts in {0} U [min_keep, upper]."""
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    m = len(p)
    if np.std(p) < 1e-6:
        counts = np.full(m, budget // m, np.int64)
        counts[: budget % m] += 1
        return counts
    a = p * (1 - p)
    b = GAMMA[estimator] * np.log(p)
    if estimator == "rloo":
        lower = max(lower, 1.0 + 1e-3)  # a/(n-1) is singular at their lower bound of 1

        def fun(n: np.ndarray) -> float:
            return float(np.sum(a / (n - 1) + b * n))

        def jac(n: np.ndarray) -> np.ndarray:
            return -a / (n - 1) ** 2 + b
    else:

        def fun(n: np.ndarray) -> float:
            return float(np.sum(a * (n - 1) / n**2 + b * n))

        def jac(n: np.ndarray) -> np.ndarray:
            return a * (2 - n) / n**3 + b

    res = minimize(
        fun,
        np.full(m, budget / m),
        jac=jac,
        method="SLSQP",
        bounds=[(lower, upper)] * m,
        constraints=[{"type": "eq", "fun": lambda n: np.sum(n) - budget, "jac": lambda n: np.ones_like(n)}],
    )
    n = np.floor(res.x).astype(np.int64)  # used even when SLSQP did not converge, as in their code
    n = np.clip(n, 0, upper)
    n[n < min_keep] = 0
    left = budget - int(n.sum())
    if left > 0:
        n = _greedy_fill(a, n, left, upper)
    elif left < 0:  # floor of an infeasible iterate can overshoot: take back from the largest
        for _ in range(-left):
            n[int(np.argmax(n))] -= 1
    small = (n > 0) & (n < min_keep)
    freed = int(n[small].sum())
    n[small] = 0
    for _ in range(freed):
        cand = np.where(n < upper, n, -1)
        n[int(np.argmax(cand))] += 1
    return n


def authors_bisection_allocate(p: np.ndarray, budget: int, *, upper: int = 32, min_n: int = 4) -> np.ndarray:
    """The authors' research allocator: ``min_n`` each, then the remaining units by the Lagrangian of
    ``sum a (n+3)/(n+4)^2`` over added rollouts (bisection on lambda, per-item root of a(n+2)/(n+4)^3 = lambda),
    floor, greedy fill. Returns int64 counts in [min_n, upper]."""
    p = np.clip(np.asarray(p, np.float64), 1e-5, 1 - 1e-5)
    m = len(p)
    a = p * (1 - p)
    extra_cap = upper - min_n
    total = budget - min_n * m

    def n_star(lam: float) -> np.ndarray:
        # a (n+2)/(n+4)^3 is decreasing in n >= 0: solve per item by vectorised bisection
        lo = np.zeros(m)
        hi = np.full(m, float(extra_cap))
        at_cap = a * (extra_cap + 2) / (extra_cap + 4) ** 3 >= lam
        at_zero = a * 2 / 64 <= lam
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            big = a * (mid + 2) / (mid + 4) ** 3 > lam
            lo = np.where(big, mid, lo)
            hi = np.where(big, hi, mid)
        n = 0.5 * (lo + hi)
        return np.where(at_cap, extra_cap, np.where(at_zero, 0.0, n))

    lo, hi = 0.0, float(a.max())
    for _ in range(60):
        lam = 0.5 * (lo + hi)
        if n_star(lam).sum() > total:
            lo = lam
        else:
            hi = lam
    n = np.floor(n_star(hi)).astype(np.int64)
    left = total - int(n.sum())
    n = _greedy_fill(a, n, max(left, 0), extra_cap)
    return n + min_n


def knapsack_dp_allocate(p: np.ndarray, budget: int, *, n_min: int = 2, n_max: int = 32) -> np.ndarray:
    """Knapsack-RL's exact DP over (prompts x budget): maximise sum (1 - p^n - (1-p)^n) p (1-p)^2."""
    p = np.asarray(p, np.float64)
    vals = domain(n_min, n_max)
    n = vals[None, :].astype(np.float64)
    pc = p[:, None]
    value = (1 - pc**n - (1 - pc) ** n) * pc * (1 - pc) ** 2
    return vals[_solve_dp(-value, vals, budget)]
