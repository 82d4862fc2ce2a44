"""The plain exact dynamic program over the whole budget: the reference the fast solver
(:func:`vipalloc.allocation.minimize_separable`) is checked against, and Knapsack-RL's own method in
``vipalloc bench peers``. O(M * budget * K) time and O(M * budget) memory.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["solve_dp"]


def solve_dp(table: ArrayLike, vals: ArrayLike, budget: int) -> np.ndarray:
    """Reference exact DP over the whole budget, O(M * budget * K) time and O(M * budget) memory."""
    c = np.asarray(table, dtype=np.float64)
    v = np.asarray(vals, dtype=np.int64)
    m, k = c.shape
    dp = np.full(budget + 1, np.inf)
    dp[0] = 0.0
    back = np.zeros((m, budget + 1), np.int16)
    for i in range(m):
        new = np.full(budget + 1, np.inf)
        for o in range(k):
            d = int(v[o])
            if d > budget:
                break
            cand = dp[: budget + 1 - d] + c[i, o]
            seg = new[d:]
            better = cand < seg
            seg[better] = cand[better]
            back[i, d:][better] = o
        dp = new
    if not np.isfinite(dp[budget]):
        raise ValueError(f"budget {budget} is not reachable")
    choice = np.zeros(m, np.int64)
    s = budget
    for i in range(m - 1, -1, -1):
        o = int(back[i, s])
        choice[i] = o
        s -= int(v[o])
    return choice
