"""Exact integer solver for the budgeted, separable rollout-allocation program.

Problem (per batch of ``M`` prompts)::

    minimise   sum_i  w_i * Var(p_i, n_i) + hardness_bonus * log(clip(p_i, 1e-6, 1-1e-6)) * n_i
    subject to sum_i n_i == budget,   n_i in [n_min, n_max]   (or n_i in {0} U [n_min, n_max] with allow_drop)

``Var`` is :func:`vipalloc.variance.gradient_variance` for ``drgrpo`` or ``rloo``; a dropped prompt (``n_i = 0``)
contributes 0. The per-prompt cost is not always discretely convex (the drop option; Dr.GRPO at ``n = 3`` when
``n_min = 2``), so greedy marginal allocation is not exact in general. :func:`minimize_separable` is exact for ANY
per-item cost table over a shared set of counts (the knapsack strategy reuses it):

1. Lagrangian stage. The price ``t`` of one rollout is the budget-th cheapest unit on the items' lower convex hulls
   (exact selection, no bisection). Every item's cost minus ``t * n`` is minimal at its "base" count; ties are
   resolved so the base total misses the budget by a residual ``r`` with ``|r| < span = max(vals) - min(vals)``.
2. Correction stage. Reduced costs ``rc >= 0`` make every solution cost ``L + sum_i rc_i(n_i)`` (``L`` a lower bound).
   An optimal solution can be chosen to move at most ``K = 2 * span - 1`` items away from their base (no zero-sum
   subset of moves; a Steinitz-type ordering argument), and so, for every move size ``d``, only the ``K`` cheapest
   items offering ``d`` matter (exchange argument). A feasible correction gives an upper bound ``U``; only moves
   with ``rc <= U - L`` can appear in an optimum. A dynamic program over those few candidate moves, on the running
   deviation, returns the exact optimum.

Proofs, complexity and measured speed: ``docs/allocation.md``. The plain exact DP over the whole budget
(O(M * budget * K)), the reference for cross-checks, is :func:`vipalloc.allocation_dp.solve_dp`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from vipalloc.variance import gradient_variance

__all__ = [
    "ALLOCATION_ESTIMATORS",
    "N_MAX_LIMIT",
    "cost_table",
    "domain",
    "feasible_range",
    "minimize_separable",
    "objective",
    "solve",
]

ALLOCATION_ESTIMATORS = ("drgrpo", "rloo")
P_CLIP = 1e-6  # the authors' clip of p inside log(p) (and our variance-free log terms)
N_MAX_LIMIT = 4096  # rollouts per prompt; beyond it the (M, K) cost tables stop being cheap


def domain(n_min: int, n_max: int, allow_drop: bool = False) -> np.ndarray:
    """Allowed rollout counts of one prompt, sorted int64: ``[n_min..n_max]`` (with ``0`` first when ``allow_drop``)."""
    vals = np.arange(n_min, n_max + 1, dtype=np.int64)
    return np.concatenate([[0], vals]).astype(np.int64) if allow_drop else vals


def feasible_range(m: int, n_min: int, n_max: int, allow_drop: bool = False) -> tuple[int, int]:
    """Smallest and largest achievable budget (total rollouts) for ``m`` prompts.

    Without drops every budget in the range is achievable. With drops the reachable totals are the union over
    ``j`` kept prompts of ``[j * n_min, j * n_max]``, which has holes: always ``1 .. n_min - 1``, and more when
    ``n_max < 2 * n_min - 1``. :func:`solve` checks reachability exactly and names the nearest feasible budgets.
    """
    return (0 if allow_drop else m * n_min), m * n_max


def _reachable(budget: int, m: int, n_min: int, n_max: int, allow_drop: bool) -> bool:
    if not allow_drop:
        return m * n_min <= budget <= m * n_max
    if budget == 0:
        return True
    # j kept prompts reach exactly [j*n_min, j*n_max]: is there a j <= m with j*n_min <= budget <= j*n_max?
    j_lo = -(-budget // n_max)
    j_hi = min(m, budget // n_min)
    return j_lo <= j_hi


def _nearest_feasible(budget: int, m: int, n_min: int, n_max: int, allow_drop: bool) -> tuple[int | None, int | None]:
    """The closest reachable budgets below and above ``budget`` (None when there is none)."""
    lo, hi = feasible_range(m, n_min, n_max, allow_drop)
    if budget > hi:
        return hi, None
    if budget < lo:
        return None, lo
    below = next(b for b in range(budget, lo - 1, -1) if _reachable(b, m, n_min, n_max, allow_drop))
    above = next(b for b in range(budget, hi + 1) if _reachable(b, m, n_min, n_max, allow_drop))
    return below, above


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
    if n_max > N_MAX_LIMIT:
        raise ValueError(f"n_max ({n_max}) is above the supported {N_MAX_LIMIT} rollouts per prompt; lower it")


def _check_bonus(hardness_bonus: object) -> float:
    if isinstance(hardness_bonus, bool) or not isinstance(hardness_bonus, (int, float, np.integer, np.floating)):
        raise ValueError(f"hardness_bonus must be a real number (e.g. 4e-4), got {hardness_bonus!r}")
    if not np.isfinite(hardness_bonus):
        raise ValueError(f"hardness_bonus must be finite, got {hardness_bonus}")
    return float(hardness_bonus)


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
    """Per-(prompt, count) objective terms ``w_i Var(p_i, v_k) + bonus * log(clip(p_i)) * v_k``.

    ``p``: validated probabilities ``(M,)``; ``vals``: counts ``(K,)``. Returns float64 ``(M, K)``; 0 at count 0.
    """
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
    """Value of the allocation objective for counts ``n`` (dropped prompts, ``n = 0``, contribute 0).

    ``p`` and ``n`` have shape ``(M,)``; the value is in the variance model's units (squared advantage per unit
    score variance) plus the bonus term. Uses the same clip of ``p`` inside ``log`` as :func:`solve`.
    """
    p_arr = _check_p(p)
    n_raw = np.asarray(n)
    if n_raw.shape != p_arr.shape:
        raise ValueError(f"n must have shape {p_arr.shape}, got {n_raw.shape}")
    n_f = n_raw.astype(np.float64)
    if not np.all(np.isfinite(n_f)) or np.any(n_f != np.round(n_f)) or np.any(n_f < 0):
        raise ValueError("n must hold whole, non-negative numbers of rollouts")
    n_arr = n_f.astype(np.int64)
    w = _check_weights(weights, len(p_arr))
    hardness_bonus = _check_bonus(hardness_bonus)
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
    bonus = _check_bonus(hardness_bonus)
    m = len(p_arr)
    if not _reachable(budget, m, n_min, n_max, allow_drop):
        lo, hi = feasible_range(m, n_min, n_max, allow_drop)
        below, above = _nearest_feasible(budget, m, n_min, n_max, allow_drop)
        near = " or ".join(str(b) for b in (below, above) if b is not None)
        extra = (
            " (with drops a total is a sum of counts in {0} U [n_min, n_max], which leaves holes)" if allow_drop else ""
        )
        raise ValueError(
            f"budget {budget} is infeasible for {m} prompts with n in {'{0} U ' if allow_drop else ''}"
            f"[{n_min}, {n_max}]: feasible budgets lie in [{lo}, {hi}]{extra}; nearest feasible: {near}"
        )
    vals = domain(n_min, n_max, allow_drop)
    table = cost_table(p_arr, vals, estimator, bonus, w)
    idx = minimize_separable(table, vals, budget)
    return vals[idx]


# --------------------------------------------------------------------------------------------- exact machinery
def minimize_separable(table: ArrayLike, vals: ArrayLike, budget: int) -> np.ndarray:
    """Exactly minimise ``sum_i table[i, k_i]`` subject to ``sum_i vals[k_i] == budget``.

    ``table``: float64 ``(M, K)`` costs, any values (no convexity assumed); ``vals``: int ``(K,)`` strictly
    increasing counts shared by all items (they need not be consecutive, e.g. ``{0} U [4, 32]``). Returns the chosen
    column per item, int64 ``(M,)``. Raises ``ValueError`` when no choice reaches ``budget``. Exact up to
    floating-point rounding of the costs (about 1e-13 relative); the algorithm and its proof are in
    ``docs/allocation.md``. Ties: items earlier in the order get the larger counts in the Lagrangian stage, and the
    correction stage prefers leaving items at their Lagrangian count.
    """
    c = np.asarray(table, dtype=np.float64)
    v = np.asarray(vals, dtype=np.int64)
    if c.ndim != 2 or c.shape[0] == 0:
        raise ValueError(f"table must be a non-empty 2-D array (items x counts), got shape {c.shape}")
    m, k = c.shape
    if v.shape != (k,) or np.any(np.diff(v) <= 0):
        raise ValueError("vals must be strictly increasing with one entry per table column")
    if not np.all(np.isfinite(c)):
        raise ValueError("cost table must be finite")
    budget = int(budget)
    lo_tot, hi_tot = m * int(v[0]), m * int(v[-1])
    if not (lo_tot <= budget <= hi_tot):
        raise ValueError(f"budget {budget} outside [{lo_tot}, {hi_tot}]")
    if budget == lo_tot or k == 1:
        return np.zeros(m, np.int64)
    if budget == hi_tot:
        return np.full(m, k - 1, np.int64)

    # 1. Lagrangian stage: the critical unit price t (slope of the budget-th cheapest hull unit).
    t = _critical_slope(c, v, budget - lo_tot)
    score = c - t * v.astype(np.float64)[None, :]
    rc = score - score.min(axis=1, keepdims=True)  # reduced costs, >= 0 exactly in floating point
    scale = float(np.abs(c).max() + abs(t) * np.abs(v).max())
    tol = 256.0 * np.finfo(np.float64).eps * max(scale, np.finfo(np.float64).tiny)
    base = _lagrangian_base(rc, v, budget, tol)
    assert float(rc[np.arange(m), base].max()) <= tol  # the exchange argument needs a Lagrangian minimiser
    residual = budget - int(v[base].sum())
    if residual == 0:
        return base

    # 2. Correction stage on the deviations d_i = n_i - base_i (sum d = residual).
    span = int(v[-1] - v[0])
    k_max = min(m, span + max(span, abs(residual)) - 1)  # most items an optimal correction must move
    rows = np.arange(m)
    rel = rc - rc[rows, base][:, None]  # cost of moving item i to column k, relative to its base
    delta = v[None, :] - v[base][:, None]
    bound = k_max * span  # |partial sums| of an optimal correction
    ub = _upper_bound(rel, delta, residual, span, k_max, bound)
    if ub is None:
        raise ValueError(f"budget {budget} is not reachable as a sum of {m} counts from vals")
    slack = (k_max + 2) * tol
    if ub.cost <= slack:  # the Lagrangian bound is met: already optimal
        return _apply(base, v, ub)
    thresh = ub.cost + slack
    active = (rel <= thresh) & (delta != 0)
    # Movers are also bounded by cost: c movers cost at least the c smallest per-item cheapest moves.
    cheapest = np.sort(np.maximum(np.where(active, rel, np.inf).min(axis=1), 0.0))
    k_eff = max(1, min(k_max, int(np.searchsorted(np.cumsum(cheapest), thresh, side="right"))))
    it, kc = np.nonzero(active)
    cand = _cap_per_delta(it, delta[it, kc], rel[it, kc], k_eff)
    best = _correct(cand, residual, k_eff * span, thresh)
    if best is None or best.cost > ub.cost:  # rounding at the threshold edge: the upper bound stands
        best = ub
    return _apply(base, v, best)


def _upper_bound(
    rel: np.ndarray, delta: np.ndarray, residual: int, span: int, k_max: int, bound: int
) -> _Correction | None:
    """A feasible correction (any will do; a cheap one keeps the final candidate set small), or None if the
    budget is unreachable. First the cheapest single move by exactly ``residual``; else DPs over the ``c``
    cheapest items per move size for growing ``c``, up to ``k_max``, where failure proves infeasibility."""
    single = np.where(delta == residual, rel, np.inf)
    flat = int(np.argmin(single))
    if np.isfinite(single.flat[flat]):
        return _Correction(float(single.flat[flat]), {flat // rel.shape[1]: residual})
    m = rel.shape[0]
    dense = np.full((m, 2 * span + 1), np.inf)
    dense[np.arange(m)[:, None], delta + span] = rel
    dense[:, span] = np.inf  # moving by 0 is the base itself
    for per_delta in sorted({min(c, k_max) for c in (1, 4, 16, k_max)}):
        ub = _correct(_cheapest_per_delta(dense, per_delta, span), residual, bound, np.inf)
        if ub is not None:
            return ub
    return None


class _Correction(NamedTuple):
    cost: float
    moves: dict[int, int]  # item -> deviation from its base count


def _apply(base: np.ndarray, v: np.ndarray, corr: _Correction) -> np.ndarray:
    out = base.copy()
    for i, d in corr.moves.items():
        out[i] = int(np.searchsorted(v, v[base[i]] + d))
    return out


def _lower_hull_segments(c: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lengths and slopes of every item's lower-convex-hull segments over the points ``(v[k], c[i, k])``.

    Returns two flat arrays: all items' segments in no particular order, padded with length-0 entries (only the
    multiset of unit slopes matters to the caller). Collinear points are not vertices. Gift wrapping from the
    left, vectorised over items, runs only until each item reaches a column from which its row is discretely
    convex; the rest of the row is then its hull. Typical tables are convex (no wrapping step) or convex after
    the first column (``{0} U [n_min, n_max]``, Dr.GRPO's ``n = 2``: one step).
    """
    m, k = c.shape
    vf = v.astype(np.float64)
    dv = np.diff(vf)
    s = np.diff(c, axis=1) / dv[None, :]
    # conv_from[i]: the first column j such that the row is convex on columns j..K-1 (0 for convex rows)
    conv_from = np.zeros(m, np.int64)
    if k > 2:
        dec = s[:, 1:] < s[:, :-1]  # dec[:, j]: the slope falls at column j + 1
        bad = np.flatnonzero(dec.any(axis=1))
        conv_from[bad] = (k - 2) - np.argmax(dec[bad, ::-1], axis=1)
    cur = np.zeros(m, np.int64)
    seg_len: list[np.ndarray] = []
    seg_slope: list[np.ndarray] = []
    cols = np.arange(k)
    live = np.flatnonzero(cur < conv_from)
    while live.size:
        j0 = cur[live]
        with np.errstate(invalid="ignore", divide="ignore"):
            sl = (c[live] - c[live, j0][:, None]) / (vf[None, :] - vf[j0][:, None])
        sl[cols[None, :] <= j0[:, None]] = np.inf
        best = sl.min(axis=1)
        # ties (collinear points): the farthest point is the next vertex
        nxt = k - 1 - np.argmax((sl == best[:, None])[:, ::-1], axis=1)
        seg_len.append(v[nxt] - v[j0])
        seg_slope.append(best)
        cur[live] = nxt
        live = live[nxt < conv_from[live]]
    if not cur.any():  # convex rows only: consecutive segments (no boolean gather needed)
        seg_len.append(np.broadcast_to(np.diff(v)[None, :], s.shape).ravel())
        seg_slope.append(s.ravel())
    else:  # segments left of an item's wrap point get weight 0 (cheaper than a boolean gather)
        tail = cols[None, :-1] >= cur[:, None]
        seg_len.append(np.where(tail, np.diff(v)[None, :], 0).ravel())
        seg_slope.append(np.where(tail, s, 0.0).ravel())
    return np.concatenate(seg_len), np.concatenate(seg_slope)


def _critical_slope(c: np.ndarray, v: np.ndarray, units: int) -> float:
    """The ``units``-th smallest marginal unit cost over all items' hull segments (1-based).

    At this price the items' cheapest responses bracket the budget (Lagrangian optimality of the convexified
    problem): fewer than ``units`` hull units are strictly cheaper, at least ``units`` are not dearer.
    """
    length, slope = _lower_hull_segments(c, v)
    return _weighted_kth(slope, length, units)


def _weighted_kth(values: np.ndarray, weights: np.ndarray, k: int) -> float:
    """The ``k``-th smallest element (1-based) of the multiset holding ``weights[j]`` copies of ``values[j]``.

    A sorted random sample brackets the answer, one pass counts what lies below the bracket, and only the
    values inside it are sorted; if the bracket misses (adversarial order) everything is sorted. Robust to
    heavy duplication, where ``np.partition`` degrades badly (all items tied, e.g. many p = 0 prompts).
    """
    n = len(values)
    if n > 8192:
        # a fixed-seed random sample of units (so weight-0 padding and long segments are counted right):
        # deterministic, and unbiased whatever the layout (a stride could alias with the table's row length)
        cum = np.cumsum(weights)
        total = int(cum[-1])
        units = np.random.default_rng(0).integers(0, total, 2048)
        sample = np.sort(values[np.searchsorted(cum, units, side="right")])
        at = int(k / total * (len(sample) - 1))
        lo_v, hi_v = sample[max(at - 48, 0)], sample[min(at + 48, len(sample) - 1)]
        below = int(np.sum(weights, where=values < lo_v))
        upto = int(np.sum(weights, where=values <= hi_v))
        if below < k <= upto:
            if lo_v == hi_v:
                return float(lo_v)
            inside = (values >= lo_v) & (values <= hi_v)
            values, weights, k = values[inside], weights[inside], k - below
    order = np.argsort(values, kind="stable")
    pos = int(np.searchsorted(np.cumsum(weights[order]), k))
    return float(values[order[pos]])


def _lagrangian_base(rc: np.ndarray, v: np.ndarray, budget: int, tol: float) -> np.ndarray:
    """A column per item with reduced cost <= ``tol`` (a Lagrangian minimiser) whose total is as close to
    ``budget`` as a greedy pass gets: smallest minimisers first, then earlier items are raised first.

    Returns column indices ``(M,)``. The remaining residual is < ``v[-1] - v[0]`` (see docs/allocation.md).
    """
    m, k = rc.shape
    zero = rc <= tol
    lo_col = np.argmax(zero, axis=1)  # smallest minimiser
    hi_col = k - 1 - np.argmax(zero[:, ::-1], axis=1)  # largest minimiser
    base = lo_col.copy()
    left = budget - int(v[base].sum())
    if left <= 0:
        return base
    # Pass 1: raise whole spans (smallest to largest minimiser), in index order, while they fit.
    cap = v[hi_col] - v[lo_col]
    tied = np.flatnonzero(cap > 0)
    fits = np.cumsum(cap[tied]) <= left
    n_fit = len(tied) if fits.all() else int(np.argmin(fits))
    raised = tied[:n_fit]
    base[raised] = hi_col[raised]
    left -= int(cap[raised].sum())
    # Pass 2 (left is now below the next span): raise the first item that can absorb part of `left` by the
    # largest amount it can take at zero reduced cost; repeat. Each raise lowers `left`, so this loop is short.
    rest = tied[n_fit:]
    while left > 0 and rest.size:
        from_lo = v[None, :] - v[lo_col[rest]][:, None]
        gain = np.where(zero[rest] & (from_lo <= left), from_lo, 0).max(axis=1)
        ok = np.flatnonzero(gain > 0)
        if ok.size == 0:
            break
        i = rest[ok[0]]
        base[i] = int(np.searchsorted(v, v[lo_col[i]] + gain[ok[0]]))
        left -= int(gain[ok[0]])
        rest = rest[ok[0] + 1 :]
    return base


_Cands = tuple[np.ndarray, np.ndarray, np.ndarray]  # (item, deviation, cost), sorted by item


def _cheapest_per_delta(dense: np.ndarray, per_delta: int, span: int) -> _Cands:
    """The ``per_delta`` cheapest items for every deviation, from the dense ``(M, 2*span+1)`` table."""
    m = dense.shape[0]
    if per_delta >= m:
        idx = np.broadcast_to(np.arange(m)[:, None], dense.shape)
    elif per_delta == 1:
        idx = np.argmin(dense, axis=0)[None, :]
    else:
        idx = np.argpartition(dense, per_delta - 1, axis=0)[:per_delta]
    cols = np.broadcast_to(np.arange(dense.shape[1])[None, :], idx.shape)
    cost = dense[idx, cols]
    ok = np.isfinite(cost)
    items, devs, costs = idx[ok], cols[ok] - span, cost[ok]
    order = np.lexsort((devs, items))
    return items[order], devs[order], costs[order]


def _cap_per_delta(items: np.ndarray, devs: np.ndarray, costs: np.ndarray, cap: int) -> _Cands:
    """Keep, for each deviation, the ``cap`` cheapest items (ties: lower index first)."""
    order = np.lexsort((items, costs, devs))
    items, devs, costs = items[order], devs[order], costs[order]
    starts = np.r_[0, np.flatnonzero(np.diff(devs)) + 1]
    rank = np.arange(len(devs)) - np.repeat(starts, np.diff(np.r_[starts, len(devs)]))
    keep = rank < cap
    items, devs, costs = items[keep], devs[keep], costs[keep]
    order = np.lexsort((devs, items))
    return items[order], devs[order], costs[order]


def _correct(cands: _Cands, residual: int, bound: int, thresh: float) -> _Correction | None:
    """Cheapest set of moves (at most one per item) from ``cands`` whose deviations sum to ``residual``.

    Dynamic program over the candidate items in index order; the state is the running deviation, kept within
    ``[-bound, bound]`` and within what the remaining items can still reach; states costing more than ``thresh``
    are pruned (every move costs >= 0 up to rounding). Staying at the base (deviation 0, cost 0) is every item's
    first option, and only strictly cheaper alternatives replace it, which makes the result deterministic.
    """
    items, devs, costs = cands
    if items.size == 0:
        return None
    starts = np.r_[0, np.flatnonzero(np.diff(items)) + 1, len(items)]
    groups = [(int(items[s]), devs[s:e], costs[s:e]) for s, e in zip(starts[:-1], starts[1:])]
    # Small movers first, big jumps last: the window is bounded by what was reachable so far and by what the
    # remaining items can still reach, so this order keeps it narrow. (Stable: ties keep item order.)
    groups.sort(key=lambda g: int(np.abs(g[1]).max()))
    dmin = np.array([min(0, int(d.min())) for _, d, _ in groups])
    dmax = np.array([max(0, int(d.max())) for _, d, _ in groups])
    suf_min = np.r_[np.cumsum(dmin[::-1])[::-1], 0]
    suf_max = np.r_[np.cumsum(dmax[::-1])[::-1], 0]
    if not (suf_min[0] <= residual <= suf_max[0]):
        return None
    lo = hi = 0
    dp = np.zeros(1)
    back: list[tuple[int, np.ndarray]] = []
    for j, (_, d_opt, c_opt) in enumerate(groups):
        new_lo = max(lo + int(dmin[j]), residual - int(suf_max[j + 1]), -bound)
        new_hi = min(hi + int(dmax[j]), residual - int(suf_min[j + 1]), bound)
        if new_lo > new_hi:
            return None
        # all options at once: new[s] = min_o dp[s - d_o] + cost_o (argmin keeps the first, i.e. the base, on ties)
        d_all = np.r_[0, d_opt]
        prev = np.arange(new_lo, new_hi + 1)[None, :] - d_all[:, None] - lo
        inside = (prev >= 0) & (prev <= hi - lo)
        cand = np.where(inside, dp[np.clip(prev, 0, hi - lo)], np.inf) + np.r_[0.0, c_opt][:, None]
        arg = np.argmin(cand, axis=0).astype(np.int32)
        new = cand[arg, np.arange(cand.shape[1])]
        if thresh < np.inf:
            new[new > thresh] = np.inf
        finite = np.flatnonzero(np.isfinite(new))
        if finite.size == 0:
            return None
        a, b = int(finite[0]), int(finite[-1])
        dp, arg = new[a : b + 1], arg[a : b + 1]
        lo, hi = new_lo + a, new_lo + b
        back.append((lo, arg))
    if not (lo <= residual <= hi) or not np.isfinite(dp[residual - lo]):
        return None
    cost = float(dp[residual - lo])
    moves: dict[int, int] = {}
    s = residual
    for j in range(len(groups) - 1, -1, -1):
        start, arg = back[j]
        o = int(arg[s - start])
        if o > 0:
            i, d_opt, _ = groups[j]
            moves[i] = int(d_opt[o - 1])
            s -= moves[i]
    return _Correction(cost, moves)
