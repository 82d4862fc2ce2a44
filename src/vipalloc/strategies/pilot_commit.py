"""The Pilot-Commit peer (arXiv 2605.26606, ``databricks/pilot-commit``), in-step part: a pilot on a candidate
pool, the prompts whose pilot pass-rate lies in a band committed uniformly. Planned like ``vip_two_phase``
(``Allocator.plan_pilot`` / ``plan_commit``; the shared pieces are in :mod:`vipalloc.strategies.two_phase`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from vipalloc.strategies.base import AllocationContext, StrategyBase
from vipalloc.strategies.two_phase import (
    Commit,
    check_pilot,
    check_pilot_tokens,
    fill_uniform,
    fill_uniform_tokens,
    not_single_phase,
)

__all__ = ["PILOT_BAND", "PilotCommit"]

PILOT_BAND = (0.125, 0.75)  # Pilot-Commit's kept pass-rate band (inclusive)


@dataclass
class PilotCommit(StrategyBase):
    """The Pilot-Commit peer (arXiv 2605.26606, databricks/pilot-commit), in-step part only.

    The caller hands in a candidate pool of ``pool_factor`` x the batch (default 3). Rule: ``pilot_n`` rollouts on
    every candidate; keep those whose pilot pass-rate lies in ``band`` (inclusive, default ``[0.125, 0.75]``), at
    most ``round(M / pool_factor)`` of them (the batch; earlier candidates first, and the ``Allocator`` shuffles
    them per step); commit the remaining budget uniformly over the kept prompts, up to ``n_max`` in all. Every
    pilot rollout counts in the budget. Rollouts the kept prompts cannot absorb (few kept, or none) go uniformly to
    the other candidates: in-band ones beyond the batch first, then the rest a batch at a time, nearest pass-rate
    to the band first, so the step spends exactly its budget.

    Left out (see ``docs/two_phase.md``): the replay buffer that defers too-hard prompts to later steps
    (staleness <= 4) and evicts solved ones; repeated generation rounds until the batch is full; sub-sampling
    ``n_effective`` of the pilot responses by variance (all pilot rollouts stay in the group here).
    """

    pool_factor: float = 3.0
    band: tuple[float, float] = PILOT_BAND
    name: str = "pilot_commit"
    two_phase: ClassVar[bool] = True
    token_refusal: ClassVar[str | None] = None  # token mode: Allocator.plan_pilot(..., token_budget=T)
    trains_pilot_only: ClassVar[bool] = False  # only committed prompts train; the peer defers the others' pilot groups

    def __post_init__(self) -> None:
        pf = self.pool_factor
        if isinstance(pf, bool) or not isinstance(pf, (int, float, np.integer, np.floating)) or not pf >= 1.0:
            raise ValueError(f"pool_factor must be a number >= 1 (candidates per batch slot), got {pf!r}")
        self.pool_factor = float(pf)
        lo, hi = (float(x) for x in self.band)
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"band must be (lo, hi) with 0 <= lo <= hi <= 1, got {self.band!r}")
        self.band = (lo, hi)

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        raise not_single_phase(self.name)

    def batch_size(self, m: int) -> int:
        """Prompts the commit trains on at most, for a pool of ``m`` candidates: ``max(1, round(m / pool_factor))``."""
        return max(1, int(round(m / self.pool_factor)))

    def check_pilot(self, m: int, budget: int, n_min: int, n_max: int, pilot_n: int) -> None:
        """Refuse a pilot request this strategy cannot serve (``ValueError`` naming the fix)."""
        check_pilot(m, budget, n_min, n_max, pilot_n)

    def pilot(self, p_mean: np.ndarray, budget: int, n_min: int, n_max: int, pilot_n: int) -> np.ndarray:
        """``pilot_n`` rollouts on each of the ``M`` candidates (int64 ``(M,)``)."""
        self.check_pilot(len(p_mean), budget, n_min, n_max, pilot_n)
        return np.full(len(p_mean), pilot_n, np.int64)

    def _bands(self, successes: np.ndarray, trials: np.ndarray) -> list[np.ndarray]:
        """The candidates in the order the commit fills them, for both budgets: the kept batch (in-band, earlier
        first, at most :meth:`batch_size`), the spare in-band ones, then the others by distance of their pilot
        pass-rate to the band, a batch at a time (the nearest batch first). Lists of int64 indices."""
        rate = np.where(trials > 0, successes / np.maximum(trials, 1), np.nan)
        lo, hi = self.band
        in_band = (rate >= lo) & (rate <= hi)  # NaN (no pilot came back) is never in band
        band_idx = np.flatnonzero(in_band)
        k = self.batch_size(len(trials))
        dist = np.where(np.isnan(rate), np.inf, np.maximum(lo - rate, rate - hi))
        others = np.flatnonzero(~in_band)
        others = others[np.argsort(dist[others], kind="stable")]
        return [band_idx[:k], band_idx[k:], *np.array_split(others, max(1, -(-others.size // k)))]

    def commit(
        self,
        prior_mean: np.ndarray,
        prior_std: np.ndarray,
        planned: np.ndarray,
        successes: np.ndarray,
        trials: np.ndarray,
        budget: int,
        n_min: int,
        n_max: int,
        pilot_n: int,
    ) -> Commit:
        """Uniform commit over the in-band candidates (the predictor's prior is not used)."""
        s = np.asarray(successes, np.int64)
        t = np.asarray(trials, np.int64)
        m = len(t)
        cap = np.maximum(n_max - t, 0)  # extra rollouts a prompt can still take
        extra = np.zeros(m, np.int64)
        left = int(budget)
        for group in self._bands(s, t):
            if left == 0 or group.size == 0:
                continue
            left -= fill_uniform(extra, group, cap, left)
        if left:
            raise ValueError(f"cannot place {budget} extra rollouts on {m} candidates within n_max={n_max}")
        # The posterior reported with the plan: a Beta(1, 1) prior updated by the pilot (Pilot-Commit uses no prior).
        return Commit(extra, 1.0 + s, 1.0 + (t - s), False)

    def pilot_tokens(
        self,
        p_mean: np.ndarray,
        token_budget: float,
        lengths: np.ndarray,
        n_min: int,
        n_max: int,
        pilot_n: int,
        max_rollouts: int | None,
    ) -> np.ndarray:
        """Token mode: ``pilot_n`` rollouts on each candidate, their predicted tokens within the budget."""
        check_pilot_tokens(len(p_mean), token_budget, np.asarray(lengths, np.float64), n_max, pilot_n, max_rollouts)
        return np.full(len(p_mean), pilot_n, np.int64)

    def commit_tokens(
        self,
        prior_mean: np.ndarray,
        prior_std: np.ndarray,
        planned: np.ndarray,
        successes: np.ndarray,
        trials: np.ndarray,
        token_budget: float,
        lengths: np.ndarray,
        n_min: int,
        n_max: int,
        pilot_n: int,
        max_rollouts: int | None,
    ) -> Commit:
        """Token mode: the same groups in the same order (kept, spare in-band, the others by distance to the band),
        each filled one round at a time while the tokens left after the pilot (and the rollout cap) allow."""
        s = np.asarray(successes, np.int64)
        t = np.asarray(trials, np.int64)
        c = np.asarray(lengths, np.float64)
        cap = np.maximum(n_max - t, 0)
        extra = np.zeros(len(t), np.int64)
        tokens = max(float(token_budget), 0.0)
        rolls = float("inf") if max_rollouts is None else float(max_rollouts)
        for group in self._bands(s, t):
            if group.size:
                tokens, rolls = fill_uniform_tokens(extra, group, cap, c, tokens, rolls)
        return Commit(extra, 1.0 + s, 1.0 + (t - s), False, float("nan"))
