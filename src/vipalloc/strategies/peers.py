"""The peers' allocation rules, written from their papers (``shared/reference/peers.md``, ``peers-2026.md``).

| name | rule | source |
|---|---|---|
| ``knapsack`` | max ``sum (1-p^n-(1-p)^n) p (1-p)^2``, exact; leftovers to p = 0 | Knapsack-RL, arXiv 2509.25849 |
| ``gvm`` | ``n ~ 1/sqrt(p + a/p^(b-1))``, a=1e-3, b=2, clipped, exact-sum rounding | GVM-RAFT, arXiv 2505.02391 |
| ``dynamo`` | ``n ~ sigma_i``, mean ``k(G-k)/(G(G-1))`` of the prompt's past groups, water-filled | arXiv 2602.19208 |
| ``hora`` | max ``sum P(>= 1 success in n_i)`` under each prompt's Beta posterior, exact (concave) | arXiv 2605.07114 |

``dynamo`` and ``hora`` read the optional ``context`` (:class:`~vipalloc.strategies.base.AllocationContext`) that
``Allocator.plan`` fills (``uses_context = True``); called without it they fall back as documented per class.
DynaMO is also written from its public code (``GithubX-F/DynaMO-RL``, ``recipe/dynamo``), not copied.

Maths only: imports :mod:`vipalloc.allocation` and :mod:`vipalloc.strategies.base`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy.special import gammaln

from vipalloc.allocation import domain, minimize_separable
from vipalloc.strategies.base import (
    P_CLIP,
    AllocationContext,
    Ctx,
    StrategyBase,
    TokenCounts,
    balance_ties,
    check_call,
    equal_classes,
    table_tokens,
    uniform_counts,
)

__all__ = [
    "GVM",
    "HORA",
    "DynaMO",
    "Knapsack",
    "beta_from_moments",
    "knapsack_value",
    "p_at_least_one",
    "proportional_counts",
    "proportional_token_counts",
]


def knapsack_value(p: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Knapsack-RL's value of ``n`` rollouts on a prompt: ``(1 - p^n - (1-p)^n) * p * (1-p)^2`` (broadcasts)."""
    return (1.0 - p**n - (1.0 - p) ** n) * p * (1.0 - p) ** 2


@dataclass
class Knapsack(StrategyBase):
    """Knapsack-RL (Li et al., arXiv 2509.25849): maximise ``sum_i (1 - p^n - (1-p)^n) * p (1-p)^2`` (the chance of
    a non-zero gradient times the information gain) subject to ``sum n = budget`` and the bounds, EXACTLY (the
    shared solver of :mod:`vipalloc.allocation`; the paper uses a dynamic program).

    Prompts whose value is 0 at every count (p in {0, 1}) get ``n_min`` while any valuable prompt can still take a
    rollout (every valuable prompt's value strictly grows with n). Rollouts left once the valuable prompts are
    at ``n_max`` go, as in the paper's fallback, to the p = 0 prompts (spread evenly, earlier prompts first), then
    to the p = 1 prompts. This choice is among the exact optima, so it does not change the objective. Predictions
    below 1e-6 (above 1 - 1e-6) count as 0 (1), so "never solved" prompts are one group whatever their exact p.
    """

    name: str = "knapsack"
    token_refusal: ClassVar[str | None] = None

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        p = np.where(p < P_CLIP, 0.0, np.where(p > 1 - P_CLIP, 1.0, p))
        vals = domain(n_min, n_max)
        value = knapsack_value(p[:, None], vals[None, :].astype(np.float64))
        counts = balance_ties(vals[minimize_separable(-value, vals, budget)], equal_classes(p))
        # Zero-value prompts: any split of their rollouts is optimal, so place them by the paper's fallback rule.
        zero = np.flatnonzero(~np.any(value != 0.0, axis=1))
        if zero.size:
            pool = int(counts[zero].sum()) - zero.size * n_min
            counts[zero] = n_min
            for group in (zero[p[zero] < 0.5], zero[p[zero] >= 0.5]):  # unsolved first, then solved
                if pool == 0 or group.size == 0:
                    continue
                take = min(pool, group.size * (n_max - n_min))
                counts[group] += uniform_counts(group.size, take)
                pool -= take
        return counts

    def _allocate_tokens(
        self, p: np.ndarray, c: np.ndarray, t: float, cap: int | None, n_min: int, n_max: int, context: Ctx
    ) -> TokenCounts:
        """The same value, maximised exactly (or with a certified gap) under ``sum_i n_i c_i <= token_budget``."""
        p = np.where(p < P_CLIP, 0.0, np.where(p > 1 - P_CLIP, 1.0, p))
        vals = domain(n_min, n_max)
        value = knapsack_value(p[:, None], vals[None, :].astype(np.float64))
        return table_tokens(-value, vals, c, t, cap, equal_classes(np.stack([p, c], axis=1)))


@dataclass
class GVM(StrategyBase):
    """GVM-RAFT (Yao et al., arXiv 2505.02391): ``n_i`` proportional to ``G_i / sqrt(p_i + a / p_i^(b-1))`` with
    a = 1e-3, b = 2 and equal gradient norms ``G_i`` (we do not observe them), p clipped to >= 1e-6.

    The proportional targets are clipped to ``[n_min, n_max]`` by water-filling (the scale is chosen so the clipped
    targets sum to the budget exactly), then rounded with largest remainders (earlier prompts first on ties).
    GVM gives p = 0 prompts no samples; here they get ``n_min``, since this interface does not drop.
    """

    a: float = 1e-3
    b: float = 2.0
    name: str = "gvm"
    token_refusal: ClassVar[str | None] = None

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        pc = np.clip(p, P_CLIP, 1.0)
        weight = 1.0 / np.sqrt(pc + self.a / pc ** (self.b - 1.0))
        return proportional_counts(weight, budget, n_min, n_max)

    def _allocate_tokens(
        self, p: np.ndarray, c: np.ndarray, t: float, cap: int | None, n_min: int, n_max: int, context: Ctx
    ) -> TokenCounts:
        """Counts proportional to the same weights, water-filled so their predicted tokens meet the budget."""
        pc = np.clip(p, P_CLIP, 1.0)
        weight = 1.0 / np.sqrt(pc + self.a / pc ** (self.b - 1.0))
        return TokenCounts(proportional_token_counts(weight, c, t, n_min, n_max, cap), float("nan"))


def proportional_counts(weight: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
    """Integer counts in ``[n_min, n_max]`` summing to ``budget``, proportional to ``weight > 0`` where the bounds
    allow (water-filling), rounded by largest remainder. ``weight``: float ``(M,)``; returns int64 ``(M,)``."""
    m = len(weight)
    if budget == m * n_min or n_min == n_max:
        return np.full(m, n_min, np.int64) if budget == m * n_min else np.full(m, n_max, np.int64)
    # sum_i clip(s * w_i, n_min, n_max) is continuous and nondecreasing in s: bisect to the exact budget.
    lo, hi = 0.0, n_max / float(weight.min())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if np.clip(mid * weight, n_min, n_max).sum() < budget:
            lo = mid
        else:
            hi = mid
    target = np.clip(hi * weight, n_min, n_max)
    counts = np.floor(target).astype(np.int64)
    left = budget - int(counts.sum())
    frac = target - counts
    # largest remainders first (stable: earlier prompts win ties); only prompts below n_max can take a unit
    order = np.argsort(-frac, kind="stable")
    order = order[counts[order] < n_max]
    counts[order[:left]] += 1
    if left < 0:  # floating round-off pushed the floors over budget: take back from the smallest remainders
        order = np.argsort(frac, kind="stable")
        order = order[counts[order] > n_min]
        counts[order[:-left]] -= 1
    return counts


def proportional_token_counts(
    weight: np.ndarray, c: np.ndarray, token_budget: float, n_min: int, n_max: int, max_rollouts: int | None
) -> np.ndarray:
    """Integer counts in ``[n_min, n_max]`` proportional to ``weight > 0`` where the bounds allow, scaled so their
    predicted tokens ``sum_i n_i c_i`` meet ``token_budget`` (and their sum ``max_rollouts``) as closely as the
    integers allow without exceeding them; floors first, then +1 by largest remainder while it fits. int64
    ``(M,)``; ``c``: expected tokens per rollout ``(M,)``."""
    cap = np.inf if max_rollouts is None else float(max_rollouts)

    def fits(n: np.ndarray) -> bool:
        return float(n @ c) <= token_budget * (1 + 1e-12) + 1e-9 and float(n.sum()) <= cap

    lo, hi = 0.0, n_max / float(weight.min())
    if fits(np.clip(hi * weight, n_min, n_max)):
        target = np.clip(hi * weight, n_min, n_max)
    else:  # the largest scale whose clipped targets fit both caps (the clipped sum grows with the scale)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            if fits(np.clip(mid * weight, n_min, n_max)):
                lo = mid
            else:
                hi = mid
        target = np.clip(lo * weight, n_min, n_max)
    counts = np.floor(target + 1e-9).astype(np.int64)
    counts = np.clip(counts, n_min, n_max)
    left_t = token_budget - float(counts @ c)
    left_n = cap - float(counts.sum())
    for i in np.argsort(-(target - counts), kind="stable"):  # largest remainders first, earlier prompts on ties
        if counts[i] < n_max and c[i] <= left_t * (1 + 1e-12) + 1e-9 and left_n >= 1:
            counts[i] += 1
            left_t -= c[i]
            left_n -= 1
    return counts


@dataclass
class DynaMO(StrategyBase):
    """DynaMO's rollout allocation (Fang et al., arXiv 2602.19208): ``n_i = B sigma_i / sum_k sigma_k``.

    ``sigma_i`` is the paper's proxy of the prompt's gradient variance: the mean over its past groups (the history
    window, ``context.group_sigma``) of ``k (G - k) / (G (G - 1))``, the unbiased Bernoulli variance of a group with
    ``k`` successes of ``G >= 2`` rollouts, used as the paper's formula uses it (no square root). The proportional
    targets are water-filled into ``[n_min, n_max]`` (the scale is chosen so the clipped targets sum to the budget)
    and rounded by largest remainders, so the sum is exact (:func:`proportional_counts`).

    Details we chose: prompts without a group of ``>= 2`` rollouts (unseen) get ``sigma_unseen = 0.25``, the largest
    Bernoulli variance, as DynaMO's code gives unseen prompts the top priority (1.0 = 4 x 0.25); every sigma is
    floored at ``sigma_floor = 0.0025`` (their code's ``min_priority`` 0.01 / 4), so a prompt whose groups never
    varied keeps a small weight. Without a context every prompt counts as unseen (the uniform plan, within one).
    ``p_hat`` is not used: DynaMO allocates from the reward history only.
    """

    sigma_unseen: float = 0.25
    sigma_floor: float = 0.0025
    name: str = "dynamo"
    token_refusal: ClassVar[str | None] = None
    uses_context: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for key in ("sigma_unseen", "sigma_floor"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 0.25:
                raise ValueError(f"{key} must be a number in (0, 0.25] (a Bernoulli variance), got {v!r}")

    def sigma(self, m: int, context: AllocationContext | None) -> np.ndarray:
        """The weights ``sigma_i`` (float64 ``(m,)``) this strategy allocates by."""
        raw = None if context is None else context.group_sigma
        if raw is None:
            return np.full(m, float(self.sigma_unseen))
        sig = np.asarray(raw, np.float64)
        if sig.shape != (m,):
            raise ValueError(f"context.group_sigma must have shape ({m},), got {sig.shape}")
        return np.maximum(np.where(np.isnan(sig), self.sigma_unseen, sig), self.sigma_floor)

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        # equal weights get counts within one (largest remainders, earlier first): ties are treated alike
        return proportional_counts(self.sigma(len(p), context), budget, n_min, n_max)

    def _allocate_tokens(
        self, p: np.ndarray, c: np.ndarray, t: float, cap: int | None, n_min: int, n_max: int, context: Ctx
    ) -> TokenCounts:
        """Counts proportional to ``sigma_i``, water-filled so their predicted tokens meet the budget."""
        return TokenCounts(
            proportional_token_counts(self.sigma(len(p), context), c, t, n_min, n_max, cap), float("nan")
        )


def beta_from_moments(mean: np.ndarray, std: np.ndarray, nu_min: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Beta parameters ``(alpha, beta)`` with the given mean and std (moment matching), float64 ``(M,)`` each.

    ``mean`` is clipped to ``[1e-6, 1-1e-6]``; the concentration ``nu = alpha + beta = mean (1 - mean) / std^2 - 1``
    is floored at ``nu_min`` (a std at or beyond what a Beta with that mean allows, e.g. an unseen prompt's, counts
    as ``nu_min`` pseudo-rollouts; 2 = the uniform prior's); ``std = 0`` gives ``nu = inf`` (a point mass)."""
    m = np.clip(np.asarray(mean, np.float64), P_CLIP, 1 - P_CLIP)
    s = np.asarray(std, np.float64)
    with np.errstate(divide="ignore"):
        nu = np.where(s > 0, m * (1 - m) / np.where(s > 0, s, 1.0) ** 2 - 1.0, np.inf)
    nu = np.maximum(nu, nu_min)
    return m * nu, (1 - m) * nu


def p_at_least_one(alpha: np.ndarray, beta: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``P(at least one success among n rollouts) = 1 - E[(1-p)^n]`` for ``p ~ Beta(alpha, beta)`` (finite
    parameters), broadcast: ``E[(1-p)^n] = B(alpha, beta + n) / B(alpha, beta)``, by log-gamma."""
    a, b, nf = np.broadcast_arrays(np.asarray(alpha, np.float64), np.asarray(beta, np.float64), np.asarray(n, float))
    return -np.expm1(gammaln(b + nf) - gammaln(b) + gammaln(a + b) - gammaln(a + b + nf))


@dataclass
class HORA(StrategyBase):
    """HORA (arXiv 2605.07114): maximise ``sum_i P(at least one correct among n_i rollouts)`` under each prompt's
    Beta posterior, ``P = 1 - E[(1 - p)^n] = 1 - B(alpha, beta + n) / B(alpha, beta)``, subject to ``sum n = budget``
    and the bounds, EXACTLY (:func:`vipalloc.allocation.minimize_separable`; the objective is concave in ``n``, so
    the paper's greedy would also be exact). Learning-free.

    ``posterior="predictor"`` (default): the Beta with the predictor's mean and std (``context.p_std``), by moment
    matching (:func:`beta_from_moments`: concentration ``nu = m (1 - m) / s^2 - 1`` floored at 2; ``s = 0``, or no
    context, is the point mass at ``p_hat``, where the objective is ``1 - (1 - p)^n``). ``posterior="history"``:
    the paper's own posterior from the uniform prior, ``Beta(1 + successes, 1 + failures)`` over the history window
    (``context.successes`` / ``trials``; an unseen prompt is ``Beta(1, 1)``).

    A point mass at ``p = 1`` has value ~1 at every count and one at ``p = 0`` value ~0 (``p`` clipped to
    ``[1e-6, 1-1e-6]``): they get ``n_min`` while other prompts gain more from a rollout; equal posteriors are
    treated alike.
    """

    posterior: str = "predictor"
    nu_min: float = 2.0
    name: str = "hora"
    token_refusal: ClassVar[str | None] = None
    uses_context: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.posterior not in ("predictor", "history"):
            raise ValueError(f"posterior must be 'predictor' or 'history', got {self.posterior!r}")
        if isinstance(self.nu_min, bool) or not isinstance(self.nu_min, (int, float)) or not self.nu_min > 0:
            raise ValueError(f"nu_min must be a positive number of pseudo-rollouts, got {self.nu_min!r}")

    def posterior_params(self, p: np.ndarray, context: AllocationContext | None) -> tuple[np.ndarray, np.ndarray]:
        """``(alpha, beta)`` per prompt, float64 ``(M,)``; ``inf`` for a point mass (then see :meth:`value`)."""
        m = len(p)
        if self.posterior == "history":
            if context is None or context.trials is None or context.successes is None:
                raise ValueError("hora with posterior='history' needs context.successes and context.trials")
            s = np.asarray(context.successes, np.float64)
            t = np.asarray(context.trials, np.float64)
            if s.shape != (m,) or t.shape != (m,) or np.any(s < 0) or np.any(s > t):
                raise ValueError(f"context.successes / trials must have shape ({m},) with 0 <= successes <= trials")
            return 1.0 + s, 1.0 + t - s
        std = np.zeros(m) if context is None or context.p_std is None else np.asarray(context.p_std, np.float64)
        if std.shape != (m,) or not np.all(np.isfinite(std)) or np.any(std < 0):
            raise ValueError(f"context.p_std must be finite, >= 0, shape ({m},)")
        return beta_from_moments(p, std, self.nu_min)

    def value(self, p: np.ndarray, context: AllocationContext | None, vals: np.ndarray) -> np.ndarray:
        """``P(>= 1 success)`` per prompt and count, float64 ``(M, K)`` for counts ``vals``. A point mass (std 0,
        or a concentration above 1e12, where log-gamma differences lose digits) is ``1 - (1 - p)^n`` at ``p``
        clipped to ``[1e-6, 1-1e-6]``."""
        alpha, beta = self.posterior_params(p, context)
        point = ~np.isfinite(alpha + beta) | (alpha + beta > 1e12)
        n = vals[None, :].astype(np.float64)
        out = np.empty((len(p), len(vals)))
        pc = np.clip(p, P_CLIP, 1 - P_CLIP)
        out[point] = -np.expm1(n * np.log1p(-pc[point][:, None]))
        out[~point] = p_at_least_one(alpha[~point][:, None], beta[~point][:, None], n)
        return out

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        vals = domain(n_min, n_max)
        value = self.value(p, context, vals)
        counts = vals[minimize_separable(-value, vals, budget)]
        # equal posteriors (equal rows of the value table) form one class, spread evenly: exact, the cost is convex
        return balance_ties(counts, equal_classes(value))

    def _allocate_tokens(
        self, p: np.ndarray, c: np.ndarray, t: float, cap: int | None, n_min: int, n_max: int, context: Ctx
    ) -> TokenCounts:
        """``P(>= 1 success)`` maximised exactly (or with a certified gap) under ``sum_i n_i c_i <= token_budget``."""
        vals = domain(n_min, n_max)
        value = self.value(p, context, vals)
        return table_tokens(-value, vals, c, t, cap, equal_classes(np.column_stack([value, c])))
