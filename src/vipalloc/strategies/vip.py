"""VIP (Variance-Informed Predictive allocation, arXiv 2602.01601): the exact integer program over the estimator's
variance.

| name | rule |
|---|---|
| ``vip`` | exact min of variance + ``gamma log(p) n``, authors' two-stage drop, kept n >= 4 |
| ``vip_pure`` | exact min of the estimator's variance only, no bonus, no drop |

Both return the uniform plan when the predictions carry no information (``std(p_hat) < 1e-6``, as on the first
step), like the authors' code. Details and a worked example: ``docs/strategies.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from vipalloc.allocation import cost_table, domain, solve
from vipalloc.strategies.base import (
    HARDNESS_BONUS,
    P_CLIP,
    AllocationContext,
    Ctx,
    StrategyBase,
    TokenCounts,
    balance_ties,
    check_call,
    check_vip_options,
    equal_classes,
    no_information,
    table_tokens,
    tie_classes,
    uniform_counts,
)
from vipalloc.strategies.uniform import uniform_token_counts
from vipalloc.variance import gradient_variance

__all__ = ["VIP", "VIPPure"]


@dataclass
class VIP(StrategyBase):
    """VIP (Variance-Informed Predictive allocation, arXiv 2602.01601) with the authors' final settings.

    Rule: minimise ``sum_i Var(p_i, n_i) + gamma * log(clip(p_i, 1e-6, 1-1e-6)) * n_i`` (``Var`` of the chosen
    estimator; ``gamma`` = 7e-4 for RLOO, 4e-4 for Dr.GRPO, their hardness bonus) exactly in integers, with
    ``sum n = budget``. With ``allow_drop`` (default) prompts may be dropped and kept ones get at least
    ``max(n_min, min_keep)`` (``min_keep`` = 4). Uniform when all predictions are equal (``std < 1e-6``). ``p`` is
    clipped to ``[1e-6, 1-1e-6]`` before anything (as the authors do), so ``a = p (1 - p) > 0``.

    Where no plan keeps every kept prompt at ``>= max(n_min, min_keep)`` (``ceil(budget / n_max) >
    budget // max(n_min, min_keep)``, e.g. ``allocate([.1, .5, .9], 6, 2, 4)``), the minimum is relaxed: one exact
    solve on ``[n_min, n_max]`` without drops, and ``last_min_keep_relaxed`` is set (``Plan.min_keep_relaxed``).

    Dropping follows the authors' two-stage structure (their SLSQP solution, then "any n < 4 -> 0" and the budget
    handed back), each stage solved exactly: (1) the optimum with every prompt kept on ``[2, n_max]``; (2) prompts
    whose stage-1 count is below ``max(n_min, min_keep)`` are dropped (a group of equal prompts as one: dropped when
    its mean stage-1 count is below; fewer if the rest could not absorb the budget) and the budget is re-solved
    exactly over the kept prompts on ``[max(n_min, min_keep), n_max]``. The
    one-shot program with 0 in every prompt's domain (``solve(..., allow_drop=True)``) is degenerate here: a dropped
    prompt costs 0 while a kept one costs its positive variance, so it drops the informative mid-p prompts (on a
    Beta(0.6, 0.6) batch it drops 75% of them, every prompt with p >= 0.2; docs/strategies.md).
    """

    estimator: str = "drgrpo"
    hardness_bonus: float | None = None
    allow_drop: bool = True
    min_keep: int = 4
    name: str = "vip"
    token_refusal: ClassVar[str | None] = None
    last_min_keep_relaxed: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.hardness_bonus = check_vip_options(self.hardness_bonus, self.min_keep, self.allow_drop)

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        self.last_min_keep_relaxed = False
        m = len(p)
        if no_information(p):
            return uniform_counts(m, budget)
        bonus = HARDNESS_BONUS[self.estimator] if self.hardness_bonus is None else float(self.hardness_bonus)
        pc = np.clip(p, P_CLIP, 1 - P_CLIP)
        cls = equal_classes(pc)

        def exact(idx: np.ndarray, lo: int, hi: int) -> np.ndarray:
            out = solve(pc[idx], budget, n_min=lo, n_max=hi, estimator=self.estimator, hardness_bonus=bonus)
            return balance_ties(out, cls[idx])

        every = np.arange(m)
        if not self.allow_drop:
            return exact(every, n_min, n_max)
        lo = min(max(n_min, int(self.min_keep)), n_max)
        # Keep j prompts; j must let the kept prompts absorb the budget within [lo, n_max]:
        # ceil(budget / n_max) <= j <= budget // lo.
        j_min, j_max = -(-budget // n_max), min(m, budget // lo)
        if j_min > j_max:  # no kept set fits [lo, n_max] (lo close to n_max): keep everyone on [n_min, n_max]
            self.last_min_keep_relaxed = True
            return exact(every, n_min, n_max)
        mean1, order = _served(exact(every, 2, n_max), cls)
        keep = np.flatnonzero(_kept(mean1, cls, order, lo, j_min, j_max))
        counts = np.zeros(m, np.int64)
        counts[keep] = exact(keep, lo, n_max)
        return counts

    def _allocate_tokens(
        self, p: np.ndarray, c: np.ndarray, t: float, cap: int | None, n_min: int, n_max: int, context: Ctx
    ) -> TokenCounts:
        """The same objective and drop rule under ``sum_i n_i c_i <= token_budget`` (``c = lengths``, expected
        tokens per rollout; optionally ``sum n <= max_rollouts``), each stage solved by
        :func:`vipalloc.allocation_tokens.solve_tokens` (exact or with a certified gap, returned).

        Stage 1 keeps every prompt on ``[2, n_max]``; prompts whose stage-1 count is below the kept minimum are
        dropped (equal prompts, same prediction and length, as one group), as under a rollout budget. The kept set
        must be able to reach the limit that binds (``sum_kept n_max c >= token_budget``, or ``n_max * |kept| >=
        max_rollouts`` when the rollout cap binds first: the token analogue of "absorb the budget") and to afford
        its minimum; the most-served dropped groups are added back, or the least-served kept ones dropped, until
        it does. So loosening a token budget that does not bind never changes the plan, and with equal lengths and
        the cap binding the plan is the rollout-mode plan at ``budget = max_rollouts``. The returned gap certifies
        the last stage (the exact program over the kept set), not the drop rule, which optimises nothing.
        Uniform (:class:`~vipalloc.strategies.uniform.Uniform`) when the predictions carry no information."""
        self.last_min_keep_relaxed = False
        m = len(p)
        if no_information(p):
            return TokenCounts(uniform_token_counts(c, t, n_max, cap), float("nan"))
        bonus = HARDNESS_BONUS[self.estimator] if self.hardness_bonus is None else float(self.hardness_bonus)
        pc = np.clip(p, P_CLIP, 1 - P_CLIP)
        cls = equal_classes(np.stack([pc, c], axis=1))

        def exact(idx: np.ndarray, lo: int, hi: int) -> TokenCounts:
            vals = domain(lo, hi)
            cost = cost_table(pc[idx], vals, self.estimator, bonus)  # the rollout mode's objective, as a table
            return table_tokens(cost, vals, c[idx], t, cap, equal_classes(cls[idx]))

        every = np.arange(m)
        if not self.allow_drop:
            return exact(every, n_min, n_max)
        lo = min(max(n_min, int(self.min_keep)), n_max)
        mean1, order = _served(exact(every, 2, n_max).counts, cls)
        # the kept prompts must afford lo each and be able to spend the tokens (n_max each)
        afford = np.cumsum(lo * c[order]) <= t * (1 + 1e-12) + 1e-9
        if cap is not None:
            afford &= lo * np.arange(1, m + 1) <= cap
        # ... and to reach the limit that binds: the token budget, or the rollout cap when it binds first (a kept
        # set that fills the cap spends all the tokens the plan can spend; requiring it to reach a looser token
        # budget would keep prompts the cap leaves no rollouts for, and a looser budget would change the plan)
        spend = np.cumsum(n_max * c[order]) >= t * (1 - 1e-12)
        if cap is not None:
            spend |= n_max * np.arange(1, m + 1) >= cap
        j_max = int(afford.sum())
        j_min = int(np.argmax(spend)) + 1 if spend.any() else m
        if j_max == 0:  # not even one prompt can have the kept minimum: keep everyone on [n_min, n_max]
            self.last_min_keep_relaxed = True
            return exact(every, n_min, n_max)
        keep = np.flatnonzero(_kept(mean1, cls, order, lo, j_min, j_max))
        counts = np.zeros(m, np.int64)
        sol = exact(keep, lo, n_max)
        counts[keep] = sol.counts
        return TokenCounts(counts, sol.gap)


def _served(stage1: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The drop rule's ranking, shared by both budgets: each class's mean stage-1 count (float ``(C,)``; a group
    of equal prompts is kept or dropped as one) and the prompts ordered most-served class first, a class's members
    adjacent, earlier classes on ties (int64 ``(M,)``)."""
    mean1 = np.bincount(cls, weights=stage1) / np.bincount(cls)
    return mean1, np.lexsort((np.arange(len(cls)), cls, -mean1[cls]))


def _kept(mean1: np.ndarray, cls: np.ndarray, order: np.ndarray, lo: int, j_min: int, j_max: int) -> np.ndarray:
    """The drop rule (both budgets): keep the classes whose mean stage-1 count reaches the kept minimum ``lo``;
    where the budget needs more or fewer kept prompts than that (``[j_min, j_max]``), the most-served first.
    Bool ``(M,)``."""
    keep = (mean1 >= lo)[cls]
    j = int(keep.sum())
    if not (j_min <= j <= j_max):
        keep = np.zeros(len(cls), bool)
        keep[order[: min(max(j, j_min), j_max)]] = True
    return keep


@dataclass
class VIPPure(StrategyBase):
    """VIP's variance objective alone (arXiv 2602.01601, Sec. 3): the exact integer minimiser of
    ``sum_i Var(p_i, n_i)`` for the chosen estimator, no hardness bonus, no dropping; uniform when all predictions
    are equal (``std < 1e-6``). ``p`` is clipped to ``[1e-6, 1-1e-6]`` first, so predictions of 0 or 1 keep a
    (tiny) variance that decreases with ``n`` instead of a flat zero whose split would be arbitrary."""

    estimator: str = "drgrpo"
    name: str = "vip_pure"
    token_refusal: ClassVar[str | None] = None

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        if no_information(p):
            return uniform_counts(len(p), budget)
        pc = np.clip(p, P_CLIP, 1 - P_CLIP)
        return balance_ties(solve(pc, budget, n_min=n_min, n_max=n_max, estimator=self.estimator), tie_classes(pc))

    def _allocate_tokens(
        self, p: np.ndarray, c: np.ndarray, t: float, cap: int | None, n_min: int, n_max: int, context: Ctx
    ) -> TokenCounts:
        """The variance objective on ``[n_min, n_max]`` under ``sum_i n_i c_i <= token_budget`` (exact or with a
        certified gap); uniform under the same tokens when the predictions carry no information."""
        if no_information(p):
            return TokenCounts(uniform_token_counts(c, t, n_max, cap), float("nan"))
        pc = np.clip(p, P_CLIP, 1 - P_CLIP)
        vals = domain(n_min, n_max)
        cost = gradient_variance(pc[:, None], vals[None, :], self.estimator)
        return table_tokens(cost, vals, c, t, cap, equal_classes(np.stack([pc, c], axis=1)))
