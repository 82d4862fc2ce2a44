"""Re-implementations of the peers' allocation solvers, for side-by-side benchmarks only (never used by vipalloc).

Written from the published descriptions (``shared/reference/vip-authors-code.md`` sections 1 and 3, and the
Knapsack-RL paper), not copied from their code:

* :func:`authors_slsqp_allocate`: the VIP authors' final pipeline with their own continuous stage (the library's
  ``vip_authors``, :mod:`vipalloc.strategies.authors`, is the same pipeline with that stage solved exactly; both
  share one rounding, :func:`vipalloc.strategies.authors.authors_rounding`).
  ``scipy.optimize.minimize(method="SLSQP")`` on the continuous relaxation of ``sum a/(n-1) + gamma log(p) n``
  (RLOO) or ``sum a (n-1)/n^2 + gamma log(p) n``
  (Dr.GRPO), box bounds ``[lower, upper]`` (their trainer passes ``lower=1``), the budget as an equality
  constraint, started at the uniform point, with scipy's defaults (finite-difference gradient, 100 iterations);
  the result is used whether or not SLSQP converged. Then their rounding: floor, set every ``n < 4`` to 0 (the
  prompt is dropped), hand out the missing units one at a time to the largest decrease of the legacy surrogate
  ``sum a (n+3)/(n+4)^2`` (skipping prompts at ``upper``), and if some count ends in ``1..3``, zero it and give the
  freed units one by one to the currently largest count below ``upper``.
* :func:`authors_bisection_allocate`: their earlier research allocator. Minimise ``sum a (n+3)/(n+4)^2`` by
  bisection on the multiplier of its stationarity condition ``a (n+2)/(n+4)^3 = lambda`` (a cubic per prompt),
  floor, greedy fill with the same surrogate. Applied to the rollouts above a floor of ``min_n`` per prompt (as
  their oracle ablation adds 4 to every prompt), so its output lies in ``[min_n, upper]`` like ours.
* :func:`knapsack_dp_allocate`: Knapsack-RL's exact dynamic program over (prompts x budget), O(M * budget * K).

Deviations, all in the peers' favour or needed to run: our greedy loops keep the marginal gains in a heap
(O(log M) per unit) where the authors' code recomputes the whole objective per candidate (O(M^2) per unit); equal
predictions are rounded alike (``vipalloc.strategies.authors``); ``lower`` is raised to ``1 + 1e-3`` for RLOO, whose
objective is singular at their bound of 1; where the floors of a non-converged SLSQP point exceed the budget (their
code raises) we take units back from the largest counts; ``analytic_jac=True`` offers the gradient they did not
pass (faster and more accurate than their setting).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize

from vipalloc.allocation import domain
from vipalloc.allocation_dp import solve_dp
from vipalloc.strategies.authors import AUTHORS_GAMMA, authors_rounding, legacy_greedy_fill
from vipalloc.strategies.base import equal_classes

__all__ = ["GAMMA", "authors_bisection_allocate", "authors_slsqp_allocate", "knapsack_dp_allocate"]

GAMMA = AUTHORS_GAMMA  # the authors' hardness-bonus weights


def authors_slsqp_allocate(
    p: np.ndarray,
    budget: int,
    *,
    estimator: str = "rloo",
    lower: float = 1.0,
    upper: int = 32,
    min_keep: int = 4,
    analytic_jac: bool = False,
    return_result: bool = False,
) -> np.ndarray | tuple[np.ndarray, Any]:
    """The VIP authors' final allocator with THEIR continuous stage (SLSQP) and the shared rounding
    (:func:`vipalloc.strategies.authors.authors_rounding`, the one ``vip_authors`` uses). Returns int64
    counts in
    ``{0} U [min_keep, upper]`` summing to ``budget`` (and scipy's ``OptimizeResult``, or None on the uniform path,
    with ``return_result``)."""
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    m = len(p)
    if np.std(p) < 1e-6:  # their first-step rule: uniform
        counts = np.full(m, budget // m, np.int64)
        counts[: budget % m] += 1
        return (counts, None) if return_result else counts
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
        jac=jac if analytic_jac else None,
        method="SLSQP",
        bounds=[(lower, upper)] * m,
        constraints=[{"type": "eq", "fun": lambda n: np.sum(n) - budget}],
    )
    x = np.clip(np.asarray(res.x, np.float64), 0.0, upper)  # used even when SLSQP did not converge, as theirs
    # A non-converged point can have floors above the budget (their code raises): take units off the largest.
    while int(np.floor(x).sum()) > budget:
        x[int(np.argmax(x))] -= 1.0
    n = authors_rounding(x, a, budget, upper, min_keep=min_keep, classes=equal_classes(p))
    return (n, res) if return_result else n


def authors_bisection_allocate(p: np.ndarray, budget: int, *, upper: int = 32, min_n: int = 4) -> np.ndarray:
    """The authors' research allocator on the rollouts above ``min_n`` per prompt: bisection on lambda for
    ``a (n+2)/(n+4)^3 = lambda`` (per prompt: ``n = upper`` if lambda is below the value at ``upper``, ``0`` if
    above ``a/32``, else the root), floor, greedy fill. Returns int64 counts in ``[min_n, upper]``."""
    p = np.clip(np.asarray(p, np.float64), 1e-5, 1 - 1e-5)
    m = len(p)
    a = p * (1 - p)
    cap = upper - min_n
    total = budget - min_n * m

    def n_star(lam: float) -> np.ndarray:
        # a (n+2)/(n+4)^3 decreases in n >= 0: the root by vectorised bisection instead of their cubic roots
        lo, hi = np.zeros(m), np.full(m, float(cap))
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            big = a * (mid + 2) / (mid + 4) ** 3 > lam
            lo, hi = np.where(big, mid, lo), np.where(big, hi, mid)
        n = 0.5 * (lo + hi)
        n = np.where(a * 2 / 64 <= lam, 0.0, n)
        return np.where(a * (cap + 2) / (cap + 4) ** 3 >= lam, float(cap), n)

    lo, hi = 0.0, float(a.max())
    for _ in range(60):
        lam = 0.5 * (lo + hi)
        if n_star(lam).sum() > total:
            lo = lam
        else:
            hi = lam
    n = np.floor(n_star(hi)).astype(np.int64)
    n = legacy_greedy_fill(a, n, max(total - int(n.sum()), 0), cap)
    return n + min_n


def knapsack_dp_allocate(p: np.ndarray, budget: int, *, n_min: int = 2, n_max: int = 32) -> np.ndarray:
    """Knapsack-RL's exact DP over (prompts x budget) maximising ``sum (1 - p^n - (1-p)^n) p (1-p)^2``.

    O(M * budget * K) time and O(M * budget) memory (int16 back-pointers), the peers' approach."""
    p = np.asarray(p, np.float64)
    vals = domain(n_min, n_max)
    n = vals[None, :].astype(np.float64)
    pc = p[:, None]
    value = (1 - pc**n - (1 - pc) ** n) * pc * (1 - pc) ** 2
    return vals[solve_dp(-value, vals, budget)]
