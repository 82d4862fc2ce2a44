"""CoBA-RL (arXiv 2602.03048), written from its public rule (``shared/reference/peers-2026.md``; public code
``Within-yao/CoBA-RL``, ``recipe/coba_rl/budget_allocators.py``, read, not copied).

Value of ``N`` rollouts on a prompt: ``V(N, p) = (1 - exp(-N p (1 - p) / tau)) * BetaPDF(p; alpha, beta)`` with
``p`` clipped to ``[0.01, 0.99]``; ``alpha = 1 + 5 f'`` (``f`` the failure rate, ``f' = sigmoid(10 (f - 0.5))`` when
``f <= 0.5``, ``alpha`` clipped to ``[1, 6]``), ``beta = 7 - alpha``; ``tau = 3 + 9 * min(var(p) / 0.1667, 1)`` over
the prompts it explores. Every prompt starts at ``n_min``; prompts with ``0.05 <= p <= 0.99`` share an exploration
budget (80% of the rest when they are most of the batch, else ``60% + 40% x`` their share) by greedy marginal value
(``V`` is concave in ``N``, so the exact separable solver returns the greedy optimum); what is left goes, weighted by
``1 - p``, to the hard prompts (``p < 0.05``), then the explored ones, then the easy ones (``p > 0.99``), never past
``n_max``.

Where we differ: CoBA-RL reads ``p`` from a 3-step window of each prompt's observed success rate and ``f`` from the
same window averaged over the batch; here ``p`` is the ``Allocator``'s prediction (any predictor) and ``f`` is
``1 - mean(p)`` over the batch. Uniform when the predictions carry no information (CoBA-RL: no history yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy.stats import beta as beta_dist

from vipalloc.allocation import domain, minimize_separable
from vipalloc.strategies.base import AllocationContext, StrategyBase, check_call, no_information, uniform_counts

__all__ = ["CoBA", "coba_shape", "coba_value"]

_P_SMOOTH = 0.01
_HARD, _EASY = 0.05, 0.99
_TAU_MIN, _TAU_MAX, _VAR_MAX = 3.0, 12.0, 0.1667
_BETA_SUM = 7.0


def coba_shape(failure_rate: float) -> tuple[float, float]:
    """CoBA-RL's ``(alpha, beta)`` for a failure rate in ``[0, 1]`` (its "exploit to explore" schedule)."""
    f = float(failure_rate)
    if f <= 0.5:
        f = 1.0 / (1.0 + np.exp(-10.0 * (f - 0.5)))
    a = float(np.clip(1.0 + (_BETA_SUM - 2.0) * f, 1.0, _BETA_SUM - 1.0))
    return a, _BETA_SUM - a


def coba_value(p: np.ndarray, n: np.ndarray, tau: float, a: float, b: float) -> np.ndarray:
    """``V(N, p)`` (broadcasts ``p`` against ``n``): the chance-of-signal term times the Beta weight."""
    ps = np.clip(p, _P_SMOOTH, 1.0 - _P_SMOOTH)
    return (1.0 - np.exp(-n * ps * (1.0 - ps) / tau)) * beta_dist.pdf(ps, a, b)


def _leftover(counts: np.ndarray, group: np.ndarray, p: np.ndarray, left: int, n_max: int) -> int:
    """CoBA-RL's fallback: ``left`` rollouts to ``group`` weighted by ``1 - p`` (floored shares, capped at
    ``n_max``), then evenly over those still below ``n_max``, extras to the fewest first. Returns what is still left."""
    open_ = group[counts[group] < n_max]
    if left <= 0 or open_.size == 0:
        return left
    w = 1.0 - np.clip(p[open_], 1e-6, 1.0 - 1e-6)
    if w.sum() > 0:
        share = np.floor(left * w / w.sum()).astype(np.int64)
        add = np.minimum(share, n_max - counts[open_])
        counts[open_] += add
        left -= int(add.sum())
    open_ = open_[counts[open_] < n_max]
    # the extras go to the members with the fewest rollouts first (stable), so equal predictions stay within one
    open_ = open_[np.argsort(counts[open_], kind="stable")]
    if left > 0 and open_.size:
        per, extra = divmod(left, open_.size)
        add = np.minimum(per + (np.arange(open_.size) < extra), n_max - counts[open_])
        counts[open_] += add
        left -= int(add.sum())
    return left


@dataclass
class CoBA(StrategyBase):
    """CoBA-RL (arXiv 2602.03048), its budget rule (module docstring); counts in ``[n_min, n_max]`` summing to the
    budget."""

    name: str = "coba"
    token_refusal: ClassVar[str | None] = (
        "CoBA-RL's rule splits a count budget (exploration share, leftover shares); it has no token form"
    )

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        m = len(p)
        if no_information(p):
            return uniform_counts(m, budget)
        counts = np.full(m, n_min, np.int64)
        left = budget - m * n_min
        explore = np.flatnonzero((p >= _HARD) & (p <= _EASY))
        if explore.size and left > 0:
            ratio = 0.8 if explore.size > m / 2 else 0.6 + 0.4 * explore.size / m
            spend = min(int(left * ratio), explore.size * (n_max - n_min))
            pe = np.clip(p[explore], _P_SMOOTH, 1.0 - _P_SMOOTH)
            tau = _TAU_MIN + (_TAU_MAX - _TAU_MIN) * float(np.clip(np.var(pe) / _VAR_MAX, 0.0, 1.0))
            a, b = coba_shape(1.0 - float(p.mean()))
            vals = domain(n_min, n_max)
            value = coba_value(p[explore, None], vals[None, :].astype(np.float64), tau, a, b)
            counts[explore] = vals[minimize_separable(-value, vals, explore.size * n_min + spend)]
            left -= spend
        for group in (np.flatnonzero(p < _HARD), explore, np.flatnonzero(p > _EASY)):
            left = _leftover(counts, group, p, left, n_max)
        return counts
