"""Exact integer solver for the budgeted, separable rollout-allocation program.

Problem (per batch of ``M`` prompts)::

    minimise   sum_i  w_i * Var(p_i, n_i) + hardness_bonus * log(clip(p_i, 1e-6, 1-1e-6)) * n_i
    subject to sum_i n_i == budget,   n_i in [n_min, n_max]   (or n_i in {0} U [n_min, n_max] with allow_drop)

``Var`` is :func:`vipalloc.variance.gradient_variance` for ``drgrpo`` or ``rloo``. A dropped prompt (``n_i = 0``)
contributes 0. The per-prompt cost is not always discretely convex (the drop option; Dr.GRPO at ``n = 2 -> 3``),
so greedy marginal allocation is not exact in general. :func:`minimize_separable` is exact for ANY per-item cost
table over a shared domain of counts:

1. Lagrangian dual: bisect on the price ``lam`` of one rollout; every item best-responds
   ``argmin_k C[i, k] + lam * v[k]``. The dual value ``L(lam) = sum_i min_k (C[i,k] + lam v[k]) - lam B`` is a lower
   bound on the optimum for any ``lam`` (weak duality).
2. Reduced costs ``rc[i, k] = C[i,k] + lam v[k] - min_k'(...) >= 0``; any feasible solution costs
   ``L(lam) + sum_i rc[i, n_i]``. So if a feasible solution costs ``UB``, every optimal solution uses only
   (item, value) pairs with ``rc <= UB - L(lam)``.
3. A dynamic program over the (few) items that have such "active" alternatives, on the deviation from the
   Lagrangian base solution, finds the cheapest feasible combination of active moves. Starting from a tiny
   threshold (Lagrangian ties only: Everett's theorem) and widening it to the measured gap ``UB - L(lam)`` makes the
   result provably optimal; see ``docs/allocation.md``.

``_solve_dp`` is a plain exact DP over the whole budget (O(M * budget * K)), kept for cross-checks.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from vipalloc.variance import gradient_variance

__all__ = [
    "ALLOCATION_ESTIMATORS",
    "cost_table",
    "domain",
    "feasible_range",
    "minimize_separable",
    "objective",
    "solve",
]

ALLOCATION_ESTIMATORS = ("drgrpo", "rloo")
P_CLIP = 1e-6
# Above this many (active item x option x state) cells the DP would be slow; the gap argument still holds, we
# only warn through the docstring: realistic batches stay far below it.
_BISECT_ITERS = 100


def domain(n_min: int, n_max: int, allow_drop: bool = False) -> np.ndarray:
    """Allowed rollout counts of one prompt, sorted: ``[n_min..n_max]`` (with ``0`` first when ``allow_drop``)."""
    vals = np.arange(n_min, n_max + 1, dtype=np.int64)
    return np.concatenate([[0], vals]).astype(np.int64) if allow_drop else vals


def feasible_range(m: int, n_min: int, n_max: int, allow_drop: bool = False) -> tuple[int, int]:
    """Smallest and largest achievable budget for ``m`` prompts (with drops, some budgets inside may be
    unreachable when ``n_max < 2 * n_min - 1``; :func:`solve` checks exactly)."""
    return (0 if allow_drop else m * n_min), m * n_max


def _reachable(budget: int, m: int, n_min: int, n_max: int, allow_drop: bool) -> bool:
    if not allow_drop:
        return m * n_min <= budget <= m * n_max
    if budget == 0:
        return True
    # j kept prompts reach exactly [j*n_min, j*n_max]
    j_lo = -(-budget // n_max)
    j_hi = min(m, budget // n_min)
    return j_lo <= j_hi


def _check_params(estimator: str, n_min: int, n_max: int) -> None:
    if estimator == "grpo":
        raise ValueError(
            "estimator 'grpo' is not an allocation target: the std-normalised GRPO variance is not monotone in n (it "
            "first grows with the chance 1 - p^n - (1-p)^n that a group is not constant), so minimising it would "
            "favour useless constant groups; allocate with estimator='drgrpo' or 'rloo'"
        )
    if estimator not in ALLOCATION_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose 'drgrpo' or 'rloo'")
    for name, v in (("n_min", n_min), ("n_max", n_max)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if n_min < 2:
        raise ValueError(f"n_min must be >= 2 (a group of 1 has no baseline), got {n_min}")
    if n_min > n_max:
        raise ValueError(f"n_min ({n_min}) must be <= n_max ({n_max})")


def _check_budget(budget: object) -> int:
    if isinstance(budget, bool):
        raise ValueError(f"budget must be an integer number of rollouts, got {budget!r}")
    if isinstance(budget, (float, np.floating)):
        if not np.isfinite(budget) or not float(budget).is_integer():
            raise ValueError(f"budget must be an integer number of rollouts, got {budget!r}")
        budget = int(budget)
    if not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget must be an integer number of rollouts, got {budget!r}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    return int(budget)


def _check_p(p: ArrayLike) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"p must be a 1-D array of success probabilities, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("empty batch: p has no prompts")
    if not np.all(np.isfinite(arr)):
        raise ValueError("p contains NaN or inf; predictions must be finite probabilities in [0, 1]")
    if np.any((arr < 0) | (arr > 1)):
        raise ValueError(f"p must be in [0, 1], got values in [{arr.min():g}, {arr.max():g}]")
    return arr


def _check_weights(weights: ArrayLike | None, m: int) -> np.ndarray:
    if weights is None:
        return np.ones(m)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (m,):
        raise ValueError(f"weights must have shape ({m},), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and >= 0")
    return w


def cost_table(
    p: np.ndarray,
    vals: np.ndarray,
    estimator: str = "drgrpo",
    hardness_bonus: float = 0.0,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Per-(prompt, count) objective terms, shape ``(M, K)`` for ``vals`` of shape ``(K,)``; 0 at count 0."""
    w = np.ones(len(p)) if weights is None else weights
    var = w[:, None] * gradient_variance(p[:, None], vals[None, :], estimator)
    if hardness_bonus:
        logp = np.log(np.clip(p, P_CLIP, 1.0 - P_CLIP))
        var = var + hardness_bonus * logp[:, None] * vals[None, :].astype(np.float64)
    return var


def objective(
    p: ArrayLike,
    n: ArrayLike,
    *,
    estimator: str = "drgrpo",
    hardness_bonus: float = 0.0,
    weights: ArrayLike | None = None,
) -> float:
    """Value of the allocation objective for counts ``n`` (dropped prompts, ``n = 0``, contribute 0)."""
    p_arr = _check_p(p)
    n_arr = np.asarray(n, dtype=np.int64)
    if n_arr.shape != p_arr.shape:
        raise ValueError(f"n must have shape {p_arr.shape}, got {n_arr.shape}")
    w = _check_weights(weights, len(p_arr))
    total = w * gradient_variance(p_arr, n_arr, estimator)
    if hardness_bonus:
        total = total + hardness_bonus * np.log(np.clip(p_arr, P_CLIP, 1.0 - P_CLIP)) * n_arr
    return float(total.sum())


def solve(
    p: ArrayLike,
    budget: int,
    *,
    n_min: int = 4,
    n_max: int = 32,
    estimator: str = "drgrpo",
    hardness_bonus: float = 0.0,
    allow_drop: bool = False,
    weights: ArrayLike | None = None,
) -> np.ndarray:
    """Exact integer minimiser of the VIP objective (see module docstring).

    Parameters
    ----------
    p:
        Predicted success probabilities, shape ``(M,)``, in ``[0, 1]``.
    budget:
        Total rollouts ``sum_i n_i`` (a non-negative integer).
    n_min, n_max:
        Bounds for a kept prompt (``2 <= n_min <= n_max``).
    estimator:
        ``"drgrpo"`` or ``"rloo"`` (``"grpo"`` is rejected: its variance is not monotone in ``n``).
    hardness_bonus:
        Weight ``gamma`` of the authors' ``gamma * log(p) * n`` term (7e-4 for RLOO, 4e-4 for Dr.GRPO in their code);
        > 0 shifts rollouts toward hard prompts.
    allow_drop:
        Allow ``n_i = 0`` (the prompt is not generated).
    weights:
        Optional non-negative per-prompt weights on the variance term, shape ``(M,)``.

    Returns
    -------
    numpy.ndarray
        int64 counts, shape ``(M,)``, summing to ``budget``. Deterministic for identical inputs.
    """
    _check_params(estimator, n_min, n_max)
    p_arr = _check_p(p)
    budget = _check_budget(budget)
    w = _check_weights(weights, len(p_arr))
    if not np.isfinite(hardness_bonus):
        raise ValueError(f"hardness_bonus must be finite, got {hardness_bonus}")
    m = len(p_arr)
    if not _reachable(budget, m, n_min, n_max, allow_drop):
        lo, hi = feasible_range(m, n_min, n_max, allow_drop)
        extra = " (with drops, a total must be a sum of counts in {0} U [n_min, n_max])" if allow_drop else ""
        raise ValueError(
            f"budget {budget} is infeasible for {m} prompts with n in "
            f"{'{0} U ' if allow_drop else ''}[{n_min}, {n_max}]: feasible budgets lie in [{lo}, {hi}]{extra}"
        )
    vals = domain(n_min, n_max, allow_drop)
    table = cost_table(p_arr, vals, estimator, float(hardness_bonus), w)
    idx = minimize_separable(table, vals, budget)
    return vals[idx]


# --------------------------------------------------------------------------------------------- exact machinery
def _responses(table: np.ndarray, vals: np.ndarray, lam: float, prefer_high: bool) -> np.ndarray:
    """Each item's minimiser of ``C + lam * v`` (ties broken toward the largest or smallest count)."""
    score = table + lam * vals[None, :]
    if prefer_high:
        return score.shape[1] - 1 - np.argmin(score[:, ::-1], axis=1)
    return np.argmin(score, axis=1)


def minimize_separable(table: ArrayLike, vals: ArrayLike, budget: int) -> np.ndarray:
    """Exactly minimise ``sum_i table[i, k_i]`` subject to ``sum_i vals[k_i] == budget``.

    ``table``: float64 ``(M, K)`` costs; ``vals``: int ``(K,)`` strictly increasing counts shared by all items.
    Returns the chosen column index per item, int64 ``(M,)``. Raises ``ValueError`` if no choice reaches ``budget``.
    """
    c = np.asarray(table, dtype=np.float64)
    v = np.asarray(vals, dtype=np.int64)
    m, k = c.shape
    if v.shape != (k,) or np.any(np.diff(v) <= 0):
        raise ValueError("vals must be strictly increasing with one entry per table column")
    if not np.all(np.isfinite(c)):
        raise ValueError("cost table must be finite")
    if not (m * v[0] <= budget <= m * v[-1]):
        raise ValueError(f"budget {budget} outside [{m * v[0]}, {m * v[-1]}]")
    vf = v.astype(np.float64)
    spread = float(c.max() - c.min())
    scale = 1.0 + float(np.abs(c).max())
    tol = 1e-12 * scale * m
    # 1. Bisection on the unit price: S(lam) = sum of best responses is non-increasing in lam.
    big = spread + 1.0
    lo, hi = -big, big  # S(lo) = m*v[-1] >= budget >= m*v[0] = S(hi)
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if vf[_responses(c, v, mid, prefer_high=False)].sum() >= budget:
            lo = mid
        else:
            hi = mid
    best: tuple[float, np.ndarray] | None = None
    for lam in (lo, hi):
        res = _solve_with_price(c, v, budget, lam, tol)
        if res is not None and (best is None or res[0] < best[0] - tol):
            best = res
    if best is None:  # pragma: no cover - the DP with an unbounded threshold always finds a solution
        raise RuntimeError("allocation solver failed to find a feasible solution")
    return best[1]


def _solve_with_price(
    c: np.ndarray, v: np.ndarray, budget: int, lam: float, tol: float
) -> tuple[float, np.ndarray] | None:
    """Exact optimum via reduced costs at price ``lam`` (see module docstring); returns (cost, choice)."""
    score = c + lam * v[None, :].astype(np.float64)
    base = np.argmin(score, axis=1)
    mins = score[np.arange(len(c)), base]
    rc = score - mins[:, None]
    lower = float(mins.sum() - lam * budget)  # dual bound
    residual = budget - int(v[base].sum())
    thresh = tol
    rc_max = float(rc.max())
    while True:
        found = _active_dp(rc, v, base, residual, thresh)
        if found is not None:
            choice = found
            cost = float(c[np.arange(len(c)), choice].sum())
            gap = cost - lower
            if gap <= thresh + tol:
                return cost, choice
            # Every optimal solution uses only moves with rc <= gap: one more DP at that threshold is exact.
            exact = _active_dp(rc, v, base, residual, gap + tol)
            assert exact is not None
            return float(c[np.arange(len(c)), exact].sum()), exact
        if thresh > rc_max:
            return None
        thresh = max(thresh * 16.0, _next_level(rc, thresh))


def _next_level(rc: np.ndarray, thresh: float) -> float:
    """The smallest reduced cost above ``thresh`` (so each widening adds at least one move)."""
    above = rc[rc > thresh]
    return float(above.min()) if above.size else thresh * 2.0 + 1.0


def _active_dp(rc: np.ndarray, v: np.ndarray, base: np.ndarray, residual: int, thresh: float) -> np.ndarray | None:
    """Cheapest choice reaching ``sum v == budget`` using only (item, value) pairs with ``rc <= thresh``.

    Items with no active alternative stay at ``base``. DP over the deviation ``sum (v[k_i] - v[base_i])``,
    restricted to the window from which ``residual`` is still reachable.
    """
    m = len(rc)
    active = rc <= thresh
    active[np.arange(m), base] = True
    n_opts = active.sum(axis=1)
    movers = np.flatnonzero(n_opts > 1)
    choice = base.copy()
    if residual == 0 and movers.size == 0:
        return choice
    if movers.size == 0:
        return None
    devs = []
    costs = []
    dmin = np.empty(len(movers), np.int64)
    dmax = np.empty(len(movers), np.int64)
    for j, i in enumerate(movers):
        ks = np.flatnonzero(active[i])
        d = v[ks] - v[base[i]]
        devs.append((ks, d))
        costs.append(rc[i, ks])
        dmin[j], dmax[j] = d.min(), d.max()
    if not (dmin.sum() <= residual <= dmax.sum()):
        return None
    # Suffix sums bound what the remaining items can still add: state d after item j must satisfy
    # residual - suf_max[j+1] <= d <= residual - suf_min[j+1].
    suf_min = np.concatenate([np.cumsum(dmin[::-1])[::-1], [0]])
    suf_max = np.concatenate([np.cumsum(dmax[::-1])[::-1], [0]])
    lo_d, hi_d = 0, 0
    dp = np.zeros(1)
    back: list[tuple[int, np.ndarray]] = []  # per mover: (window start, chosen option index per state)
    for j in range(len(movers)):
        ks, d = devs[j]
        cst = costs[j]
        new_lo = max(lo_d + int(dmin[j]), residual - int(suf_max[j + 1]))
        new_hi = min(hi_d + int(dmax[j]), residual - int(suf_min[j + 1]))
        if new_lo > new_hi:
            return None
        width = new_hi - new_lo + 1
        new = np.full(width, np.inf)
        arg = np.zeros(width, np.int16)
        for o in range(len(ks)):
            # new[s] for s = prev + d[o]; prev in [lo_d, hi_d]
            s0 = max(new_lo, lo_d + int(d[o]))
            s1 = min(new_hi, hi_d + int(d[o]))
            if s0 > s1:
                continue
            cand = dp[s0 - int(d[o]) - lo_d : s1 - int(d[o]) - lo_d + 1] + cst[o]
            seg = new[s0 - new_lo : s1 - new_lo + 1]
            better = cand < seg  # strict: the earlier (smaller-count) option wins ties -> deterministic
            seg[better] = cand[better]
            arg[s0 - new_lo : s1 - new_lo + 1][better] = o
        dp, lo_d, hi_d = new, new_lo, new_hi
        back.append((lo_d, arg))
    if not (lo_d <= residual <= hi_d) or not np.isfinite(dp[residual - lo_d]):
        return None
    s = residual
    for j in range(len(movers) - 1, -1, -1):
        start, arg = back[j]
        o = int(arg[s - start])
        ks, d = devs[j]
        choice[movers[j]] = ks[o]
        s -= int(d[o])
    return choice


def _solve_dp(table: ArrayLike, vals: ArrayLike, budget: int) -> np.ndarray:
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
