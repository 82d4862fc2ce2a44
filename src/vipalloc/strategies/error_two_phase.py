"""``vip_error_two_phase``: the two-phase plan (pilot, Beta posterior, exact commit) on the gradient error.

Same steps as ``vip_two_phase`` (:mod:`vipalloc.strategies.two_phase`), with ``vip_error``'s objective
(:mod:`vipalloc.strategies.error`): the pilot skips the prompts ``vip_error`` drops on the prior, and the commit
maximises ``N^2 / D`` over the final groups of ``t_i + e_i`` rollouts, each prompt's group a Beta-Binomial draw
under its posterior ``Beta(a_i, b_i)`` (as the variance commit treats it). A prompt left at its pilot (``e_i = 0``)
still trains on its pilot group, so it keeps that group's ``N`` and ``D``. Kept groups end at ``>= n_min``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from vipalloc.allocation import minimize_separable
from vipalloc.allocation_tokens import solve_tokens
from vipalloc.gradient_error import DEFAULT_SIGNAL_RATIO, check_signal_ratio, signal_terms
from vipalloc.strategies.commit import beta_mean_std, commit_domain, group_violations
from vipalloc.strategies.error import VIPError, best_plan
from vipalloc.strategies.two_phase import Commit, VIPTwoPhase

__all__ = ["VIPErrorTwoPhase"]


@dataclass
class VIPErrorTwoPhase(VIPTwoPhase):
    """Two-phase VIP (arXiv 2602.01601, pilot evidence as in Pilot-Commit, arXiv 2605.26606) on the gradient error
    at the best step size (module docstring). Options: ``signal_ratio`` (``rho``), ``allow_drop`` (``e_i = 0``
    allowed), ``skip`` (``"vip"``: skip what ``vip_error`` drops on the prior; ``"none"``), and the prior mapping's
    ``prior_nu_max`` / ``prior_nu_min``."""

    signal_ratio: float = DEFAULT_SIGNAL_RATIO
    min_keep: int = 2  # kept groups end at >= n_min: the objective itself prices small groups
    name: str = "vip_error_two_phase"
    trains_pilot_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.signal_ratio = check_signal_ratio(self.signal_ratio)

    def _single(self) -> VIPError:
        return VIPError(estimator=self.estimator, signal_ratio=self.signal_ratio, allow_drop=self.allow_drop)

    def pilot(self, p_mean: np.ndarray, budget: int, n_min: int, n_max: int, pilot_n: int) -> np.ndarray:
        """``pilot_n`` rollouts for each piloted prompt, 0 for the prompts ``vip_error`` drops on the prior at the
        whole step's ``budget`` (``skip="vip"``). int64 ``(M,)``."""
        m = len(p_mean)
        self.check_pilot(m, budget, n_min, n_max, pilot_n)
        counts = np.full(m, pilot_n, np.int64)
        if self.skip == "vip" and self.allow_drop and budget >= m * n_min:
            counts[self._single().allocate(np.asarray(p_mean, np.float64), budget, n_min, n_max) == 0] = 0
        return counts

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
        """Token mode of :meth:`pilot`: the prompts ``vip_error`` drops under the same token budget are skipped."""
        counts = super().pilot_tokens(p_mean, token_budget, lengths, n_min, n_max, pilot_n, max_rollouts)
        c = np.asarray(lengths, np.float64)
        if self.skip == "vip" and self.allow_drop and token_budget >= n_min * float(c.sum()):
            counts[:] = pilot_n
            res = self._single().allocate_tokens(np.asarray(p_mean, np.float64), token_budget, c, n_min, n_max,
                                                 max_rollouts=max_rollouts)  # fmt: skip
            counts[res.counts == 0] = 0
        return counts

    def _terms(self, a: np.ndarray, b: np.ndarray, n_tot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, std = beta_mean_std(a, b)
        return signal_terms(mean, n_tot, self.estimator, signal_ratio=self.signal_ratio, p_std=std)

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
        """The commit of ``budget`` extra rollouts over the piloted prompts maximising ``N^2 / D`` of the final
        groups under the posteriors, each ``lam`` solved exactly; skipped prompts get 0."""
        a, b = self.posterior(prior_mean, prior_std, successes, trials)
        live = np.flatnonzero(np.asarray(planned) > 0)
        extra = np.zeros(len(a), np.int64)
        if live.size == 0:
            if budget:
                raise ValueError(f"no prompt was piloted, so the commit cannot place {budget} rollouts")
            return Commit(extra, a, b, False)
        t = np.asarray(trials, np.int64)[live]
        vals = commit_domain(pilot_n, n_min, n_max, allow_drop=self.allow_drop, min_keep=self.min_keep)
        bad = group_violations(t, vals, n_min, n_max, allow_drop=self.allow_drop, min_keep=self.min_keep)
        n_tab, d_tab = self._terms(a[live], b[live], t[:, None] + vals[None, :])
        rows = np.arange(live.size)

        def solve(lam: float) -> np.ndarray:
            table = lam * d_tab - 2.0 * n_tab
            if bad.any():  # failed pilot rollouts: groups that would end below the minimum, priced out
                table = table + np.where(bad, 1e6 * (1.0 + float(np.abs(table).max())), 0.0)
            return minimize_separable(table, vals, budget)

        extra[live] = vals[self._plan(solve, n_tab, d_tab, rows)]
        relaxed = bool(bad[rows, np.searchsorted(vals, extra[live])].any())
        return Commit(extra, a, b, relaxed)

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
        """Token mode: the same objective under ``sum_i e_i c_i <= token_budget`` (the tokens left after the
        pilot) and ``sum e <= max_rollouts``; the largest certified gap of the programs solved is returned."""
        a, b = self.posterior(prior_mean, prior_std, successes, trials)
        live = np.flatnonzero(np.asarray(planned) > 0)
        extra = np.zeros(len(a), np.int64)
        if live.size == 0:
            return Commit(extra, a, b, False)
        t = np.asarray(trials, np.int64)[live]
        vals = np.arange(0, n_max + 1, dtype=np.int64)  # every extra; the kept minimum is a per-prompt mask
        n_tot = t[:, None] + vals[None, :]
        bad = (n_tot > n_max) | ((vals[None, :] > 0) & (n_tot < n_min))
        if not self.allow_drop:
            bad |= n_tot < n_min
        bad[np.all(bad, axis=1), 0] = False  # a prompt with nothing allowed stays at its pilot
        n_tab, d_tab = self._terms(a[live], b[live], n_tot)
        c = np.asarray(lengths, np.float64)[live]
        rows = np.arange(live.size)
        gaps: list[float] = []

        def solve(lam: float) -> np.ndarray:
            sol = solve_tokens(np.where(bad, np.inf, lam * d_tab - 2.0 * n_tab), vals, c,
                               max(float(token_budget), 0.0), max_rollouts=max_rollouts)  # fmt: skip
            gaps.append(sol.gap)
            return sol.idx

        extra[live] = vals[self._plan(solve, n_tab, d_tab, rows)]
        return Commit(extra, a, b, False, float(max(gaps)) if gaps else 0.0)

    @staticmethod
    def _plan(
        solve: Callable[[float], np.ndarray], n_tab: np.ndarray, d_tab: np.ndarray, rows: np.ndarray
    ) -> np.ndarray:
        """Columns maximising ``N^2 / D`` (:func:`vipalloc.strategies.error.best_plan`), started from the plan that
        is exact at the pilot-only ``N / D`` (column 0 is ``e = 0``); any plan when no group carries signal."""
        n0, d0 = float(n_tab[:, 0].sum()), float(d_tab[:, 0].sum())
        lam0 = n0 / d0 if n0 > 0 and d0 > 0 else 1.0
        return best_plan(solve, n_tab, d_tab, rows, solve(lam0))
