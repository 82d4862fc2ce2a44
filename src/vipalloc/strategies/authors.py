"""The VIP authors' complete allocation procedure (``vip_authors``), with its continuous stage solved exactly.

Reproduces ``allocate_rollout`` of their final package (``HieuNT91/VIP``, earlier history,
``src/vip/allocation/bernoulli_allocation.py``; described in ``shared/reference/vip-authors-code.md`` section 3),
written from that description, step by step:

1. ``p`` clipped to ``[1e-6, 1 - 1e-6]``; ``a = p (1 - p)``, ``b = gamma log p`` (gamma 7e-4 RLOO, 4e-4 Dr.GRPO).
   If ``std(p) < 1e-6``: the uniform plan.
2. The continuous problem ``min sum_i f_i(n_i)`` s.t. ``sum n = budget``, ``lower <= n_i <= upper`` with
   ``f = a/(n-1) + b n`` (RLOO) or ``f = a (n-1)/n^2 + b n`` (Dr.GRPO), their bounds ``[1, n_max]``. They use SLSQP
   (which stops at its iteration limit on realistic batches); we solve it exactly by bisection on the budget
   multiplier (:func:`continuous_optimum`).
3. Their rounding (:func:`authors_rounding`): floor; every ``n < 4`` becomes 0 (dropped); the missing units go one at
   a time to the largest decrease of the legacy surrogate ``sum a (n+3)/(n+4)^2`` (prompts at ``upper`` skipped);
   counts left in ``1..3`` are zeroed and their units handed one at a time to the largest count below ``upper``.

Deviations, each needed for a well-defined or tie-symmetric result (``docs/strategies.md`` lists them):

* Dr.GRPO's ``a (n-1)/n^2`` is concave below ``n = 3`` and 0 at ``n = 1``, so the global optimum on ``[1, n_max]`` is
  a degenerate bang-bang plan (every prompt at 1 or ``n_max``: one rollout has zero advantage, hence zero
  "variance"). SLSQP, started at the uniform point, finds the local optimum on the convex branch instead. We solve
  exactly the problem with ``f`` replaced below ``n = 3`` by its tangent at 3 (the convex C1 extension), whose
  optimum is that local optimum. RLOO's objective is strictly convex on ``n > 1``: its optimum is the unique one.
* Prompts with equal (clipped) predictions are treated alike: the continuous optimum already gives them equal
  ``n``; the greedy steps hand a group of equal prompts its units one member at a time (they stay within one
  rollout of each other), and where the "1..3 -> 0" repair would keep some members of such a group and drop others,
  the group keeps as many members as its units allow (each at least ``min_keep``) instead of zeroing some of them.
* Where their code raises (freed units with every kept prompt at ``upper``) we keep more prompts; where no plan
  with every kept prompt at ``>= max(n_min, min_keep)`` exists, the minimum is relaxed and flagged.

Maths only: imports :mod:`vipalloc.strategies.base` and numpy.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import numpy as np

from vipalloc.strategies.base import (
    HARDNESS_BONUS,
    AllocationContext,
    StrategyBase,
    check_call,
    check_vip_options,
    equal_classes,
)

__all__ = [
    "AUTHORS_GAMMA",
    "VIPAuthors",
    "AuthorsResult",
    "authors_allocate",
    "authors_rounding",
    "continuous_optimum",
    "legacy_gain",
    "legacy_greedy_fill",
]

AUTHORS_GAMMA = {"rloo": 7e-4, "drgrpo": 4e-4}  # their hardness-bonus weights ("grpo" rule = Dr.GRPO)
P_CLIP = 1e-6  # their clip of p
NO_INFO_STD = 1e-6  # their first-step rule: std(p) below this -> uniform
FLOOR_TOL = 1e-9  # floor(x + tol): an exact optimum at 7.999999999 means 8, not 7


class AuthorsResult(NamedTuple):
    counts: np.ndarray  # int64 (M,)
    continuous: np.ndarray | None  # float64 (M,), the continuous optimum (None on the uniform path)
    min_keep_relaxed: bool


# ----------------------------------------------------------------------------------- continuous stage
def _n_of_lambda(a: np.ndarray, b: np.ndarray, lam: float, lower: float, upper: float, estimator: str) -> np.ndarray:
    """Per-prompt minimiser of ``f_i(n) - lam n`` on ``[lower, upper]`` (smallest minimiser where flat)."""
    c = b - lam  # f'(n) = lam  <=>  (variance part)'(n) = -c
    if estimator == "rloo":
        # -a/(n-1)^2 + b = lam  ->  n = 1 + sqrt(a / c) for c > 0; c <= 0: f' < lam everywhere -> upper
        with np.errstate(divide="ignore", invalid="ignore"):
            n = np.where(c > 0, 1.0 + np.sqrt(a / np.where(c > 0, c, 1.0)), upper)
        return np.clip(n, lower, upper)
    # Dr.GRPO: on [3, upper] f' = a(2-n)/n^3 + b increases; below 3 f is replaced by its tangent at 3 (slope
    # b - a/27). Stationary point: (n-2)/n^3 = y with y = c/a in (y(upper), 1/27).
    y = c / a
    y_up = (upper - 2.0) / upper**3 if upper > 3 else 1.0 / 27.0
    n = np.empty_like(a)
    low = y >= 1.0 / 27.0  # lam <= f'(3): the tangent piece (or below) is optimal -> lower end
    high = y <= y_up  # lam >= f'(upper) -> upper
    mid = ~(low | high)
    n[low] = lower
    n[high] = upper
    if mid.any():
        ym = y[mid]
        # y n^3 - n + 2 = 0: the largest of three real roots (y < 1/27), by the trigonometric formula, polished
        r = 2.0 * np.sqrt(1.0 / (3.0 * ym))
        arg = np.clip((3.0 * (2.0 / ym) / (2.0 * (-1.0 / ym))) * np.sqrt(3.0 * ym), -1.0, 1.0)
        root = r * np.cos(np.arccos(arg) / 3.0)
        for _ in range(3):  # Newton on g(n) = y n^3 - n + 2 (g' = 3 y n^2 - 1 > 0 at the largest root)
            g = ym * root**3 - root + 2.0
            dg = 3.0 * ym * root**2 - 1.0
            root = np.where(dg > 0, root - g / np.where(dg > 0, dg, 1.0), root)
        n[mid] = np.clip(root, 3.0, upper)
    return np.clip(n, lower, upper)


def continuous_optimum(
    p: np.ndarray,
    budget: int,
    *,
    estimator: str = "rloo",
    gamma: float | None = None,
    lower: float = 1.0,
    upper: float = 32.0,
) -> np.ndarray:
    """Exact minimiser of the authors' continuous problem (module docstring, step 2), float64 ``(M,)`` summing to
    ``budget``. ``p`` is clipped to ``[1e-6, 1-1e-6]``. Prompts with equal ``p`` get equal ``n``.

    The minimiser of ``f_i(n) - lam n`` is nondecreasing in the multiplier ``lam``; bisection brackets the budget
    between two adjacent multipliers and the answer interpolates between their minimisers (a convex combination
    of optimal points of a convex problem is optimal; it spreads prompts on a flat piece evenly)."""
    pc = np.clip(np.asarray(p, np.float64), P_CLIP, 1 - P_CLIP)
    m = len(pc)
    if not (m * lower <= budget <= m * upper):
        raise ValueError(f"budget {budget} outside [{m * lower:g}, {m * upper:g}] for the continuous problem")
    a = pc * (1 - pc)
    b = (AUTHORS_GAMMA[estimator] if gamma is None else gamma) * np.log(pc)
    if budget == m * upper:
        return np.full(m, float(upper))
    if budget == m * lower and estimator != "rloo":
        return np.full(m, float(lower))
    # Bracket: at lam_hi every prompt is at upper; at lam_lo the total is below the budget.
    if estimator == "rloo":
        lam_hi = float(b.max())
        delta = max((budget / m - max(lower, 1.0)) / 2.0, 1e-12)
        lam_lo = float(b.min() - a.max() / delta**2)
    else:
        lam_hi = float((a * (2.0 - upper) / upper**3 + b).max())
        lam_lo = float((b - a / 27.0).min())
        if lam_hi <= lam_lo:
            lam_hi = lam_lo + 1.0
        lam_lo -= abs(lam_lo) + 1.0
    n_lo = _n_of_lambda(a, b, lam_lo, lower, upper, estimator)
    n_hi = _n_of_lambda(a, b, lam_hi, lower, upper, estimator)
    for _ in range(400):
        mid = 0.5 * (lam_lo + lam_hi)
        if mid <= lam_lo or mid >= lam_hi:
            break
        n_mid = _n_of_lambda(a, b, mid, lower, upper, estimator)
        if n_mid.sum() < budget:
            lam_lo, n_lo = mid, n_mid
        else:
            lam_hi, n_hi = mid, n_mid
    t_lo, t_hi = float(n_lo.sum()), float(n_hi.sum())
    theta = 1.0 if t_hi <= t_lo else min(max((budget - t_lo) / (t_hi - t_lo), 0.0), 1.0)
    return n_lo + theta * (n_hi - n_lo)


# ----------------------------------------------------------------------------------- rounding stage
def legacy_gain(a: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Decrease of the authors' rounding surrogate ``a (n+3)/(n+4)^2`` when ``n -> n+1`` (positive, decreasing in
    ``n``: the surrogate is convex for ``n >= 0``)."""
    n = np.asarray(n, np.float64)
    return a * ((n + 3) / (n + 4) ** 2 - (n + 4) / (n + 5) ** 2)


def _split(total: int, k: int) -> np.ndarray:
    """``total`` units over ``k`` members, within one of each other (earlier members get the extra units)."""
    out = np.full(k, total // k, np.int64)
    out[: total % k] += 1
    return out


def legacy_greedy_fill(a: np.ndarray, n: np.ndarray, left: int, upper: int) -> np.ndarray:
    """Give ``left`` units one at a time to the prompt whose legacy surrogate falls most (prompts at ``upper``
    skipped; the earlier prompt on equal gains, so equal prompts stay within one unit). Returns int64 ``(M,)``."""
    n = np.asarray(n, np.int64).copy()
    heap = [(-float(legacy_gain(a[i], n[i])), i) for i in range(len(n)) if n[i] < upper]
    heapq.heapify(heap)
    for _ in range(left):
        if not heap:
            raise ValueError("every prompt is at upper; the budget cannot be placed")
        _, i = heapq.heappop(heap)
        n[i] += 1
        if n[i] < upper:
            heapq.heappush(heap, (-float(legacy_gain(a[i], n[i])), i))
    return n


class _Infeasible(Exception):
    """The authors' repair cannot place its units (their code raises here)."""


def authors_rounding(
    x: np.ndarray, a: np.ndarray, budget: int, upper: int, *, min_keep: int = 4, classes: np.ndarray | None = None
) -> np.ndarray:
    """The authors' integer rounding of a continuous plan ``x`` (float ``(M,)``, ``sum x = budget``), tie-symmetric.

    floor; counts ``< min_keep`` -> 0; greedy fill on the legacy surrogate; counts left in ``1..min_keep-1`` are
    zeroed and their units go one at a time to the largest count below ``upper``. ``classes`` (int labels, from
    :func:`equal_classes`) marks equal prompts: each class's units are held balanced over its members, and a class
    whose units cannot give every member ``min_keep`` after the fill keeps as many members as they allow.
    Returns int64 ``(M,)`` in ``{0} U [min_keep, upper]`` summing to ``budget``; raises ``_Infeasible`` where the
    repair cannot place its units."""
    m = len(x)
    cls = np.arange(m) if classes is None else np.asarray(classes, np.int64)
    n_cls = int(cls.max()) + 1
    order = np.argsort(cls, kind="stable")  # members of each class, in index order
    k = np.bincount(cls, minlength=n_cls).astype(np.int64)
    starts = np.r_[0, np.cumsum(k)[:-1]]
    first = order[starts]
    a_c = a[first]
    floors = np.floor(np.asarray(x, np.float64) + FLOOR_TOL).astype(np.int64)
    floors[floors < min_keep] = 0
    total = np.bincount(cls, weights=floors, minlength=n_cls).astype(np.int64)
    # greedy fill over classes: a class's next unit goes to its member with the fewest units (count total // k)
    left = budget - int(total.sum())
    if left < 0:
        raise _Infeasible("floors exceed the budget")
    heap = [
        (-float(legacy_gain(a_c[c], total[c] // k[c])), int(first[c]), c)
        for c in range(n_cls)
        if total[c] < k[c] * upper
    ]
    heapq.heapify(heap)
    for _ in range(left):
        if not heap:
            raise _Infeasible("every prompt is at upper")
        _, f, c = heapq.heappop(heap)
        total[c] += 1
        if total[c] < k[c] * upper:
            heapq.heappush(heap, (-float(legacy_gain(a_c[c], total[c] // k[c])), f, c))
    # repair: members in 1..min_keep-1 -> 0, their units to the largest counts below upper
    q, r = np.divmod(total, k)
    small = (total > 0) & (q < min_keep)
    split = small & (q == min_keep - 1) & (r > 0)  # members at min_keep and one below: keep what the units allow
    kept = np.where(total > 0, k, 0)
    kept[split] = total[split] // min_keep
    excess = np.where(split, np.maximum(total - kept * upper, 0), 0)
    zero = small & ~split
    freed = int(total[zero].sum() + excess.sum())
    total = np.where(zero, 0, total - excess)
    kept[zero] = 0
    while freed > 0:
        tops = _top_counts(total, kept, upper)
        if (tops[~split] >= 0).any():
            tops[split] = -1  # split classes are topped up only when nothing else can take the unit
        if tops.max() < 0:
            raise _Infeasible("freed units with every kept prompt at upper")
        # Unit by unit the same class keeps the largest count below upper (its top never falls and the others do
        # not move) until it is full, so it takes its whole capacity at once. The earliest class on ties.
        c = int(np.argmax(tops))
        take = min(freed, int(kept[c]) * upper - int(total[c]))
        total[c] += take
        freed -= take
    kept[split] = np.minimum(k[split], total[split] // min_keep)  # a split class topped up may keep more members
    counts = np.zeros(m, np.int64)
    for g in np.flatnonzero(kept):
        counts[order[starts[g] : starts[g] + kept[g]]] = _split(int(total[g]), int(kept[g]))
    return counts


def _top_counts(total: np.ndarray, kept: np.ndarray, upper: int) -> np.ndarray:
    """Per class, the largest member count below ``upper`` (-1 where none: nothing kept, or all at upper)."""
    q, r = np.divmod(total, np.maximum(kept, 1))
    top = np.where((r > 0) & (q + 1 < upper), q + 1, q)
    return np.where((kept == 0) | (total >= kept * upper), -1, top)


def _keep_top(x: np.ndarray, a: np.ndarray, budget: int, j: int, lo: int, upper: int, cls: np.ndarray) -> np.ndarray:
    """Keep the ``j`` prompts with the largest continuous ``x`` (earlier first on ties; equal prompts adjacent), each
    at ``lo``, and greedy-fill the rest of the budget on the legacy surrogate."""
    order = np.lexsort((np.arange(len(x)), cls, -x))
    keep = np.sort(order[:j])
    n = np.zeros(len(x), np.int64)
    n[keep] = lo
    sub = legacy_greedy_fill(a[keep], n[keep], budget - j * lo, upper)
    n[keep] = sub
    return n


def authors_allocate(
    p: np.ndarray,
    budget: int,
    n_min: int,
    n_max: int,
    *,
    estimator: str = "rloo",
    gamma: float | None = None,
    lower: float = 1.0,
    min_keep: int = 4,
) -> AuthorsResult:
    """The authors' ``allocate_rollout`` (module docstring) on validated input. Counts lie in
    ``{0} U [max(n_min, min_keep), n_max]`` and sum to ``budget``; when no such plan exists, in ``[n_min, n_max]``
    (``min_keep_relaxed``)."""
    pc = np.clip(np.asarray(p, np.float64), P_CLIP, 1 - P_CLIP)
    m = len(pc)
    if float(np.std(pc)) < NO_INFO_STD:
        counts = np.full(m, budget // m, np.int64)
        counts[: budget % m] += 1
        return AuthorsResult(counts, None, False)
    a = pc * (1 - pc)
    cls = equal_classes(pc)
    lo = min(max(n_min, min_keep), n_max)
    x = continuous_optimum(pc, budget, estimator=estimator, gamma=gamma, lower=lower, upper=float(n_max))
    j_min, j_max = -(-budget // n_max), min(m, budget // lo)
    if j_min > j_max:  # no plan keeps every prompt at >= lo: relax to [n_min, n_max], their greedy from n_min
        start = np.full(m, n_min, np.int64)
        return AuthorsResult(legacy_greedy_fill(a, start, budget - m * n_min, n_max), x, True)
    rounded: np.ndarray | None
    try:
        rounded = authors_rounding(x, a, budget, n_max, min_keep=lo, classes=cls)
    except _Infeasible:
        rounded = None
    if rounded is None or not (j_min <= int((rounded > 0).sum()) <= j_max):
        kept = 0 if rounded is None else int((rounded > 0).sum())
        rounded = _keep_top(x, a, budget, min(max(kept, j_min), j_max), lo, n_max, cls)
    return AuthorsResult(rounded, x, False)


@dataclass
class VIPAuthors(StrategyBase):
    """The VIP authors' complete allocation procedure (arXiv 2602.01601; their final code, ``allocate_rollout``),
    with the continuous stage solved exactly instead of by SLSQP (:mod:`vipalloc.strategies.authors`).

    Rule: ``p`` clipped to ``[1e-6, 1-1e-6]``; the continuous minimum of their objective (``a/(n-1) + gamma log(p)
    n`` for RLOO with gamma 7e-4, ``a (n-1)/n^2 + gamma log(p) n`` for Dr.GRPO with 4e-4) on their bounds
    ``[lower, n_max]`` = ``[1, n_max]``; floor; ``n < max(n_min, min_keep)`` -> 0; greedy fill on their legacy
    surrogate ``sum a (n+3)/(n+4)^2``; counts left below the minimum zeroed, their units to the largest counts.
    Uniform when ``std(p) < 1e-6``. Unlike ``vip``, the freed rollouts follow the surrogate, which has no hardness
    bonus: mid-p prompts get more, never-solved prompts fewer (``docs/strategies.md``, "where the budget goes").
    ``last_min_keep_relaxed`` as for ``vip``.
    """

    estimator: str = "drgrpo"
    hardness_bonus: float | None = None
    lower: float = 1.0
    min_keep: int = 4
    name: str = "vip_authors"
    token_refusal: ClassVar[str | None] = (
        "the authors' procedure is defined by its rollout-count steps (floor, n < 4 -> 0, greedy fill to the exact "
        "count budget); use 'vip' or 'vip_two_phase', which solve the same objective under a token budget"
    )
    last_min_keep_relaxed: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.hardness_bonus = check_vip_options(self.hardness_bonus, self.min_keep)
        if isinstance(self.lower, bool) or not isinstance(self.lower, (int, float)) or not 1.0 <= self.lower:
            raise ValueError(f"lower (the continuous problem's lower bound) must be a number >= 1, got {self.lower!r}")

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        if self.lower > n_max:
            raise ValueError(f"lower ({self.lower}) must be <= n_max ({n_max}); the authors use lower=1")
        res = authors_allocate(
            p,
            budget,
            n_min,
            n_max,
            estimator=self.estimator,
            gamma=HARDNESS_BONUS[self.estimator] if self.hardness_bonus is None else float(self.hardness_bonus),
            lower=float(self.lower),
            min_keep=int(self.min_keep),
        )
        self.last_min_keep_relaxed = res.min_keep_relaxed
        return res.counts
