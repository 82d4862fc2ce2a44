"""Named allocation strategies behind one interface: ``allocate(p_hat, budget, n_min, n_max) -> counts``.

Every strategy returns int64 counts of shape ``(M,)`` that sum to ``budget`` exactly and respect
``n_min <= n <= n_max`` (only ``vip`` may also return 0 = dropped). Sources:

| name | rule | source |
|---|---|---|
| ``uniform`` | ``budget // M`` each, remainder +1 to the first prompts | GRPO/RLOO/Dr.GRPO default |
| ``vip`` | min variance + ``gamma log(p) n`` (exact, 2 stages), drops, kept n >= 4 | VIP, arXiv 2602.01601 |
| ``vip_pure`` | exact min of the estimator's variance only, no drop | VIP's variance objective alone |
| ``inverse_acc`` | min ``sum n log p`` (hardest prompts first) | VIP ablation |
| ``inverse_var`` | min ``sum n log(p(1-p))`` (lowest-variance prompts first) | VIP ablation |
| ``knapsack`` | max ``sum (1-p^n-(1-p)^n) p (1-p)^2``, exact | Knapsack-RL, arXiv 2509.25849 |
| ``gvm`` | ``n ~ 1/sqrt(p + a/p^(b-1))``, a=1e-3, b=2, sum-preserving rounding | GVM-RAFT, arXiv 2505.02391 |

``vip`` and ``vip_pure`` return the uniform plan when predictions carry no information (``std(p_hat) < 1e-6``,
as on the first step), like the authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vipalloc.allocation import _check_budget, _check_p, domain, minimize_separable, solve

__all__ = ["STRATEGY_NAMES", "Strategy", "get_strategy", "uniform_counts"]

P_CLIP = 1e-6
HARDNESS_BONUS = {"rloo": 7e-4, "drgrpo": 4e-4}  # the authors' final settings


class Strategy(Protocol):
    """An allocation rule: predicted success probabilities -> rollout counts."""

    name: str

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray: ...


def _check(p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> tuple[np.ndarray, int]:
    p = _check_p(p_hat)
    budget = _check_budget(budget)
    if n_min < 2 or n_min > n_max:
        raise ValueError(f"need 2 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
    m = len(p)
    if not (m * n_min <= budget <= m * n_max):
        raise ValueError(
            f"budget {budget} is infeasible for {m} prompts with n in [{n_min}, {n_max}]: "
            f"feasible budgets lie in [{m * n_min}, {m * n_max}]"
        )
    return p, budget


def uniform_counts(m: int, budget: int) -> np.ndarray:
    """``budget // m`` each; the remainder goes +1 to the first prompts (the Allocator permutes prompts per step)."""
    counts = np.full(m, budget // m, dtype=np.int64)
    counts[: budget % m] += 1
    return counts


@dataclass
class Uniform:
    """Same number of rollouts for every prompt (the GRPO default)."""

    name: str = "uniform"

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        return uniform_counts(len(p), budget)


@dataclass
class VIP:
    """VIP (arXiv 2602.01601) with the authors' final settings: minimise the estimator's expected gradient variance
    plus their hardness bonus ``gamma * log(p) * n`` (7e-4 RLOO, 4e-4 Dr.GRPO); prompts may be dropped and kept
    prompts get at least ``min_keep`` (4) rollouts. Uniform when all predictions are equal (no information yet).

    Dropping follows the authors' two-stage structure, each stage solved exactly: (1) the exact optimum with every
    prompt kept (``n in [2, n_max]``); (2) prompts whose optimum is below ``min_keep`` are dropped and the budget is
    re-solved exactly over the kept prompts on ``[min_keep, n_max]``. The one-shot program with ``0`` in every
    prompt's domain (``solve(..., allow_drop=True)``) is degenerate here: a dropped prompt costs 0 while a kept one
    costs its (positive) variance, so it would drop exactly the informative mid-p prompts (see docs/allocation.md).
    """

    estimator: str = "drgrpo"
    hardness_bonus: float | None = None
    allow_drop: bool = True
    min_keep: int = 4
    name: str = "vip"

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        m = len(p)
        if float(np.std(p)) < 1e-6:
            return uniform_counts(m, budget)
        bonus = HARDNESS_BONUS[self.estimator] if self.hardness_bonus is None else float(self.hardness_bonus)
        kw = {"estimator": self.estimator, "hardness_bonus": bonus}
        if not self.allow_drop:
            return solve(p, budget, n_min=n_min, n_max=n_max, **kw)
        lo = min(max(n_min, self.min_keep), n_max)
        stage1 = solve(p, budget, n_min=2, n_max=n_max, **kw)
        # Keep prompts at or above min_keep, most-served first; add back dropped ones (largest stage-1 n first)
        # until the kept prompts can absorb the budget within [lo, n_max].
        order = np.lexsort((np.arange(m), -stage1))
        n_keep = int((stage1 >= lo).sum())
        need = -(-budget // n_max)  # fewest kept prompts that can absorb the budget
        n_keep = min(max(n_keep, need), budget // lo, m)
        if n_keep == 0 or n_keep < need:
            # The budget cannot be packed into kept prompts of [lo, n_max] (e.g. lo == n_max): keep everyone.
            return solve(p, budget, n_min=n_min, n_max=n_max, **kw)
        keep = np.sort(order[:n_keep])
        counts = np.zeros(m, np.int64)
        counts[keep] = solve(p[keep], budget, n_min=lo, n_max=n_max, **kw)
        return counts


@dataclass
class VIPPure:
    """VIP's variance objective alone: no hardness bonus, no dropping (exact minimiser)."""

    estimator: str = "drgrpo"
    name: str = "vip_pure"

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        if float(np.std(p)) < 1e-6:
            return uniform_counts(len(p), budget)
        return solve(p, budget, n_min=n_min, n_max=n_max, estimator=self.estimator)


def _linear_allocate(score: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
    """Exact minimiser of ``sum score_i n_i``: everyone gets n_min, then prompts in increasing score order are
    filled to n_max (stable order: earlier prompts first among equal scores); one prompt takes the remainder."""
    m = len(score)
    counts = np.full(m, n_min, dtype=np.int64)
    left = budget - m * n_min
    for i in np.argsort(score, kind="stable"):
        if left <= 0:
            break
        add = min(n_max - n_min, left)
        counts[i] += add
        left -= add
    return counts


@dataclass
class InverseAcc:
    """VIP ablation: minimise ``sum n_i log p_i`` (linear): the hardest prompts get n_max, the rest n_min."""

    name: str = "inverse_acc"

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        return _linear_allocate(np.log(np.clip(p, P_CLIP, 1 - P_CLIP)), budget, n_min, n_max)


@dataclass
class InverseVar:
    """VIP ablation: minimise ``sum n_i log(p_i(1-p_i))``: the lowest-variance (p near 0 or 1) prompts get n_max."""

    name: str = "inverse_var"

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        pc = np.clip(p, P_CLIP, 1 - P_CLIP)
        return _linear_allocate(np.log(pc * (1 - pc)), budget, n_min, n_max)


@dataclass
class Knapsack:
    """Knapsack-RL (arXiv 2509.25849): maximise ``sum_i (1 - p^n - (1-p)^n) * p (1-p)^2`` exactly.

    A prompt with p in {0, 1} has value 0 at every n: after the valuable prompts are served, leftover budget is
    sent to p = 0 prompts (the paper's fallback: hard prompts are where extra samples may find a first success),
    implemented as a tiny preference ``-1e-12 * n`` for p = 0 prompts.
    """

    name: str = "knapsack"

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        vals = domain(n_min, n_max)
        n = vals[None, :].astype(np.float64)
        pc = p[:, None]
        value = (1.0 - pc**n - (1.0 - pc) ** n) * pc * (1.0 - pc) ** 2
        value = value + np.where(pc <= P_CLIP, 1e-12 * n, 0.0)
        return vals[minimize_separable(-value, vals, budget)]


@dataclass
class GVM:
    """GVM-RAFT (arXiv 2505.02391): ``n_i ~ 1 / sqrt(p_i + a / p_i^(b-1))`` (a=1e-3, b=2; gradient norms taken
    equal), clipped to [n_min, n_max] with an exact-sum largest-remainder rounding."""

    a: float = 1e-3
    b: float = 2.0
    name: str = "gvm"

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        pc = np.clip(p, P_CLIP, 1.0)
        weight = 1.0 / np.sqrt(pc + self.a / pc ** (self.b - 1.0))
        return _proportional_round(weight, budget, n_min, n_max)


def _proportional_round(weight: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
    """Counts proportional to ``weight`` within bounds, summing to ``budget`` (water-filling + largest remainder)."""
    m = len(weight)
    fixed = np.zeros(m, dtype=np.float64)
    free = np.ones(m, dtype=bool)
    target = np.zeros(m)
    for _ in range(m + 1):  # each pass pins at least one prompt to a bound, or stops
        if not free.any():
            break
        rest = budget - fixed[~free].sum()
        w = weight[free]
        target[free] = rest * w / w.sum() if w.sum() > 0 else rest / free.sum()
        over = free & (target > n_max)
        under = free & (target < n_min)
        if not over.any() and not under.any():
            break
        pin = over if over.any() else under
        fixed[pin] = np.where(target[pin] > n_max, n_max, n_min)
        target[pin] = fixed[pin]
        free &= ~pin
    target = np.clip(target, n_min, n_max)
    counts = np.floor(target).astype(np.int64)
    left = budget - int(counts.sum())
    order = np.argsort(-(target - counts), kind="stable")
    for i in order:
        if left == 0:
            break
        if counts[i] < n_max:
            counts[i] += 1
            left -= 1
    i = 0
    while left < 0:  # only possible through clipping round-off
        j = order[::-1][i % m]
        if counts[j] > n_min:
            counts[j] -= 1
            left += 1
        i += 1
    return counts


_FACTORIES = {
    "uniform": lambda estimator, **kw: Uniform(**kw),
    "vip": lambda estimator, **kw: VIP(estimator=estimator, **kw),
    "vip_pure": lambda estimator, **kw: VIPPure(estimator=estimator, **kw),
    "inverse_acc": lambda estimator, **kw: InverseAcc(**kw),
    "inverse_var": lambda estimator, **kw: InverseVar(**kw),
    "knapsack": lambda estimator, **kw: Knapsack(**kw),
    "gvm": lambda estimator, **kw: GVM(**kw),
}
STRATEGY_NAMES = tuple(_FACTORIES)


def get_strategy(name: str, *, estimator: str = "drgrpo", **kwargs: object) -> Strategy:
    """Build a strategy by name (``STRATEGY_NAMES``); ``kwargs`` go to its constructor."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGY_NAMES)}")
    if estimator not in HARDNESS_BONUS:
        raise ValueError(f"unknown estimator {estimator!r}; choose 'drgrpo' or 'rloo'")
    try:
        return _FACTORIES[name](estimator, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad options for strategy {name!r}: {exc}") from None
