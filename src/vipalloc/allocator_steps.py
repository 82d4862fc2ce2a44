"""What every plan of an :class:`~vipalloc.allocator.Allocator` shares, and its two-phase rounds.

:class:`StepPlanner` is the allocator's base class: the forecast of a batch (:mod:`vipalloc.forecast`), the checked
budget arguments (:mod:`vipalloc.budget`), the one way a plan leaves the allocator (``_issue``: remembered for
``observe``), and the two rounds of a two-phase step (:meth:`StepPlanner.plan_pilot`, :meth:`StepPlanner.plan_commit`;
strategies ``vip_two_phase`` and ``pilot_commit``, :mod:`vipalloc.strategies.two_phase`). The state it works on is
set up by :meth:`Allocator.__init <vipalloc.allocator.Allocator>` and declared below.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from vipalloc._args import as_ids, check_int
from vipalloc.budget import check_plan_args
from vipalloc.forecast import Forecast, Forecaster
from vipalloc.history import RolloutHistory
from vipalloc.plan import Plan, plan_variance, step_permutation
from vipalloc.strategies import Strategy, TwoPhaseStrategy, uniform_counts
from vipalloc.strategies.two_phase import PilotState, check_pilot_tokens, expected_variance, uniform_commit

__all__ = ["StepPlanner"]

# Plans kept for validating observe(); older ones are forgotten (a trainer observes the step it planned).
_MAX_PENDING_STEPS = 16


class StepPlanner:
    """Base of :class:`~vipalloc.allocator.Allocator`: forecasts, budget checks, plan issuing, two-phase rounds."""

    # set by Allocator.__init__
    n_min: int
    n_max: int
    seed: int
    estimator: str
    strategy: Strategy
    strategy_name: str
    history: RolloutHistory
    _fc: Forecaster
    _pending: dict[int, dict[str, int]]  # step -> {prompt_id: planned count}
    _pilots: dict[int, PilotState]  # step -> outstanding two-phase pilot (see plan_pilot)
    _last_step: int

    # ------------------------------------------------------------------ shared plumbing
    def _forecast(self, ids: list[str], prompts: Sequence[str] | None, step: int) -> Forecast:
        """The batch's forecast at ``step`` (features, ``(p_mean, p_std)``), computed once per batch and step."""
        return self._fc.forecast(ids, prompts, step, self.history)

    def _lengths(self, fc: Forecast, ids: list[str], step: int) -> np.ndarray | None:
        """The forecast's expected tokens per rollout, float64 ``(M,)``; None before any length was observed."""
        pred = self._fc.lengths(fc, ids, step, self.history)
        return None if pred is None else pred.expected

    def _budget_args(
        self, ids: list[str], budget: Any, token_budget: Any, expected_lengths: Any, step: Any
    ) -> tuple[int | None, float | None, np.ndarray | None, int]:
        """The checked ``(budget, token_budget, expected_lengths, step)`` of ``plan`` / ``plan_pilot`` (the whole
        step's budgets; :func:`vipalloc.budget.check_plan_args`)."""
        budget, tokens, given = check_plan_args(len(ids), budget, token_budget, expected_lengths, self.history)
        step = self._last_step + 1 if step is None else check_int("step", step, 0)
        return budget, tokens, given, step

    def _issue(
        self,
        step: int,
        ids: list[str],
        counts: np.ndarray,
        p_mean: np.ndarray,
        p_std: np.ndarray,
        *,
        budget: int,
        expected: float,
        uniform: float,
        timings: dict[str, float],
        **fields: Any,
    ) -> Plan:
        """The one way a plan leaves the allocator: remember ``counts`` for ``observe`` at ``step`` (copied: the
        caller may edit the returned arrays), then build the :class:`Plan` (``fields``: its optional fields)."""
        self._remember(step, dict(zip(ids, counts.tolist())))
        return Plan(
            prompt_ids=list(ids),
            counts=counts,
            p_mean=p_mean,
            p_std=p_std,
            budget=budget,
            step=step,
            strategy=self.strategy_name,
            estimator=self.estimator,
            expected_variance=float(expected),
            uniform_variance=float(uniform),
            timings=timings,
            **fields,
        )

    # ------------------------------------------------------------------ two-phase steps
    def plan_pilot(
        self,
        prompt_ids: Sequence[Any],
        prompts: Sequence[str] | None = None,
        budget: int | None = None,
        step: int | None = None,
        pilot_n: int = 2,
        *,
        token_budget: float | None = None,
        expected_lengths: Sequence[float] | np.ndarray | None = None,
    ) -> Plan:
        """Phase 1 of a two-phase step (strategies ``vip_two_phase``, ``pilot_commit``): the pilot rollouts.

        ``budget`` is the WHOLE step's budget (pilot + commit); the returned plan's counts are the pilot rollouts
        per prompt (``pilot_n`` each; 0 = skipped) and ``plan.budget`` their total. Observe their rewards with
        :meth:`observe` at the same ``step``, then call :meth:`plan_commit`. The predictor learns from the pilot
        at once (it merges the commit's rollouts of the same step into the same group); the commit conditions on
        the prediction made here plus the pilot outcomes. Raises ``ValueError`` (nothing recorded) for a
        single-phase strategy, ``pilot_n * M > budget``, an infeasible budget, or a step whose pilot already has
        observed outcomes.

        Token mode (``token_budget``, tokens for the whole step, as in :meth:`plan`; ``budget`` then optional, a
        cap on the step's rollouts): the pilot's predicted tokens must fit; its tokens actually spent (the lengths
        given to :meth:`observe`, else the prediction per rollout) are taken from the budget before the commit.
        """
        two_phase = self._two_phase_strategy()
        if two_phase is None:
            raise ValueError(
                f"plan_pilot needs a two-phase strategy ('vip_two_phase' or 'pilot_commit'), this allocator uses "
                f"{self.strategy_name!r}: call plan() instead, or build Allocator(strategy='vip_two_phase')"
            )
        ids = as_ids(prompt_ids)
        budget, tokens, given, step = self._budget_args(ids, budget, token_budget, expected_lengths, step)
        old = self._pilots.get(step)
        if old is not None and (old.trials.any() or old.extra is not None):
            raise ValueError(
                f"step {step} already has a pilot with observed outcomes; call plan_commit(step={step}) to finish "
                "it, or plan the next step"
            )
        m = len(ids)
        # Refuse a bad request before embedding: the feature caches keep the first text given for an id.
        if tokens is None:
            assert budget is not None
            two_phase.check_pilot(m, budget, self.n_min, self.n_max, pilot_n)
        elif given is not None:
            check_pilot_tokens(m, tokens, given, self.n_max, pilot_n, budget)
        fc = self._forecast(ids, prompts, step)
        p_mean, p_std, timings = fc.p_mean.copy(), fc.p_std.copy(), dict(fc.timings)
        t2 = time.perf_counter()
        perm, inv = step_permutation(self.seed, step, m)
        c = given if given is not None else self._lengths(fc, ids, step)
        if tokens is None:
            assert budget is not None
            counts = np.asarray(two_phase.pilot(p_mean[perm], budget, self.n_min, self.n_max, pilot_n), np.int64)
        else:
            assert c is not None
            counts = two_phase.pilot_tokens(p_mean[perm], tokens, c[perm], self.n_min, self.n_max, pilot_n, budget)
        counts = np.asarray(counts, np.int64)[inv]
        timings["solve"] = time.perf_counter() - t2
        total = int(counts.sum())
        # A pilot group of one carries no gradient (RLOO's formula is undefined there): it counts 0, as in the
        # commit's objective (vipalloc.strategies.two_phase._h). Computed before anything is recorded.
        var = float(plan_variance(p_mean, np.where(counts >= 2, counts, 0), self.estimator))
        uni_counts = uniform_counts(m, total)
        uni = float(plan_variance(p_mean, np.where(uni_counts >= 2, uni_counts, 0), self.estimator))
        self._pilots[step] = PilotState(  # copies: the caller may edit the returned plan's arrays in place
            ids=ids,
            counts=counts.copy(),
            prior_mean=p_mean.copy(),
            prior_std=p_std.copy(),
            budget=budget,
            pilot_n=int(pilot_n),
            successes=np.zeros(m, np.int64),
            trials=np.zeros(m, np.int64),
            token_budget=tokens,
            lengths=None if c is None else c.copy(),
            tokens=None if c is None else np.zeros(m),
        )
        return self._issue(
            step,
            ids,
            counts,
            p_mean,
            p_std,
            budget=total,
            expected=var,
            uniform=uni,
            timings=timings,
            phase="pilot",
            expected_lengths=c,
            expected_tokens=None if c is None else float(counts @ c),
            token_budget=tokens,
        )

    def plan_commit(self, step: int | None = None) -> Plan:
        """Phase 2 of a two-phase step: the EXTRA rollouts per prompt, given the pilot outcomes observed so far.

        ``step`` defaults to the newest pilot not yet committed. ``pilot.counts.sum() + commit.counts.sum()``
        equals the step budget exactly. The plan's ``p_mean``/``p_std`` are the posterior's,
        ``pilot_counts`` the pilot rollouts that came back, ``group_sizes`` the final groups, and its variances
        the posterior expected variance of those groups (``uniform_variance``: the same pilot plus a uniform
        split of the rest). Pilot prompts whose rewards never came back count as 0 pilot rollouts. Observe the
        extra rollouts' rewards with :meth:`observe` at the same step. Raises ``ValueError`` (nothing recorded)
        without a pilot at ``step``, when no pilot outcome was observed, or when the step was already committed.
        """
        two_phase = self._two_phase_strategy()
        if two_phase is None:
            raise ValueError(
                f"plan_commit needs a two-phase strategy ('vip_two_phase' or 'pilot_commit'), this allocator uses "
                f"{self.strategy_name!r}: call plan() instead"
            )
        if step is None:
            open_steps = [s for s, p in self._pilots.items() if p.extra is None]
            if not open_steps:
                raise ValueError("no pilot is waiting for a commit; call plan_pilot(...) first")
            step = max(open_steps)
        step = check_int("step", step, 0)
        pilot = self._pilots.get(step)
        if pilot is None:
            known = sorted(self._pilots)
            raise ValueError(
                f"no pilot was planned at step {step} (pilots: steps {known[-5:]}); call plan_pilot(..., step={step}) "
                "and observe its rewards before plan_commit"
            )
        if pilot.extra is not None:
            raise ValueError(f"step {step} was already committed; observe its extra rollouts and plan the next step")
        if not pilot.trials.any():
            raise ValueError(
                f"no pilot outcome was observed at step {step}; call observe(ids, pilot_rewards, step={step}) first"
            )
        m = len(pilot.ids)
        rolls_left = None if pilot.budget is None else pilot.budget - int(pilot.counts.sum())
        t0 = time.perf_counter()
        perm, inv = step_permutation(self.seed, step, m)
        args = (pilot.prior_mean[perm], pilot.prior_std[perm], pilot.counts[perm], pilot.successes[perm])
        c = pilot.lengths
        tokens_left = None
        if pilot.token_budget is None:
            assert rolls_left is not None
            dec = two_phase.commit(*args, pilot.trials[perm], rolls_left, self.n_min, self.n_max, pilot.pilot_n)
        else:
            assert c is not None and pilot.tokens is not None
            tokens_left = max(pilot.token_budget - float(pilot.tokens.sum()), 0.0)
            dec = two_phase.commit_tokens(
                *args, pilot.trials[perm], tokens_left, c[perm], self.n_min, self.n_max, pilot.pilot_n, rolls_left
            )
        extra = np.asarray(dec.extra, np.int64)[inv]
        a, b = np.asarray(dec.post_a)[inv], np.asarray(dec.post_b)[inv]
        t1 = time.perf_counter()
        if extra.shape != (m,) or (pilot.token_budget is None and int(extra.sum()) != rolls_left):
            raise RuntimeError(f"strategy {self.strategy_name!r} returned an invalid commit (sum != {rolls_left})")
        groups = pilot.trials + extra
        exp_var = float(expected_variance(a, b, groups, self.estimator).sum())
        # the uniform commit of the same rollouts (or tokens) left, on the same permuted order
        uni = pilot.trials + uniform_commit(pilot.trials, self.n_max, rolls_left, perm, tokens_left, c)
        uni_var = float(expected_variance(a, b, uni, self.estimator).sum())
        pilot.extra = extra.copy()  # the returned plan's counts are the caller's to edit
        nu = a + b
        return self._issue(
            step,
            pilot.ids,
            extra,
            a / nu,
            np.sqrt(a * b / (nu * nu * (nu + 1.0))),
            budget=int(extra.sum()),
            expected=exp_var,
            uniform=uni_var,
            timings={"solve": t1 - t0},
            min_keep_relaxed=bool(dec.min_keep_relaxed),
            phase="commit",
            pilot_counts=pilot.trials.copy(),
            train=(groups > 0) if two_phase.trains_pilot_only else (extra > 0),
            # token fields describe the whole step (pilot + commit), as the plan's metrics do
            expected_lengths=c,
            # the pilot as spent (reported lengths, else predicted per rollout), the commit as predicted
            expected_tokens=None if c is None else _step_tokens(pilot.tokens, groups, extra, c),
            token_budget=pilot.token_budget,
            optimality_gap=float(dec.gap),
        )

    def _two_phase_strategy(self) -> TwoPhaseStrategy | None:
        """The strategy as a :class:`~vipalloc.strategies.TwoPhaseStrategy`, or None for a single-phase one."""
        return cast(TwoPhaseStrategy, self.strategy) if self.strategy.two_phase else None

    def _remember(self, step: int, planned: dict[str, int]) -> None:
        """Make ``planned`` the counts ``observe`` validates at ``step``; forget the oldest steps beyond the cap."""
        self._pending[step] = planned
        while len(self._pending) > _MAX_PENDING_STEPS:
            self._pending.pop(min(self._pending))
        while len(self._pilots) > _MAX_PENDING_STEPS:
            self._pilots.pop(min(self._pilots))
        self._last_step = max(self._last_step, step)


def _step_tokens(spent: np.ndarray | None, groups: np.ndarray, extra: np.ndarray, c: np.ndarray) -> float:
    """A two-phase step's tokens: the pilot's spent tokens plus the commit's predicted ones (float)."""
    return float(extra @ c) + (float(spent.sum()) if spent is not None else float((groups - extra) @ c))
