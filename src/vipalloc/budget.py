"""One budget type and one resolution policy for a step: rollouts, tokens, or tokens with a rollout cap.

Every front-end (the CPU trainer, the TRL and verl plug-ins) describes what a step may spend with a
:class:`BudgetSpec` and turns it into the arguments of :meth:`Allocator.plan` / :meth:`Allocator.plan_pilot` with
:meth:`BudgetSpec.resolve`, so they plan the same batch, history and budget identically, first step included.

The policy (``tokens`` of the spec):

* ``None``: by rollouts, ``sum n_i = rollouts`` exactly.
* ``"uniform"``: the tokens the uniform plan of ``rollouts / M`` rollouts a prompt is predicted to spend on this
  batch (:meth:`Allocator.uniform_tokens`). Before any length was observed there is nothing to price it with: the
  step is planned by rollouts (``rollouts`` exactly), which is what uniform spends.
* a number ``T``: at most ``T`` tokens. Before any length was observed the step is planned at ``max_length`` tokens
  a rollout (the most a completion can hold, so ``T`` holds whatever the lengths turn out to be); without a
  ``max_length`` it is planned by rollouts. When ``T`` cannot pay for ``least`` (default ``n_min``) rollouts of
  every prompt at the expected lengths, it is raised to that minimum with a ``RuntimeWarning`` naming both.

In token mode ``rollout_cap`` (None: none but ``n_max`` a prompt) caps the step's rollouts.

The rollout-budget feasibility check (:func:`check_rollout_budget`) and the token-budget check
(:func:`check_token_budget`) are the strategies' own (:mod:`vipalloc.strategies.base`), written once: the
allocator validates a budget at its boundary with them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from vipalloc._args import check_int, check_lengths_arg
from vipalloc.strategies.base import check_budget_range as check_rollout_budget
from vipalloc.strategies.base import check_token_budget

if TYPE_CHECKING:  # annotations only: the allocator imports this module
    from vipalloc.predictors.length import LengthPrediction

__all__ = [
    "BudgetSpec",
    "StepBudget",
    "check_plan_args",
    "check_rollout_budget",
    "check_token_budget",
    "resolve_tokens",
]

TokenMode = Literal["uniform"] | float | None


@dataclass(frozen=True)
class StepBudget:
    """What one step may spend, resolved for a batch: the keyword arguments of :meth:`Allocator.plan`.

    ``rollouts``: the step's rollouts exactly when ``tokens`` is None, else the rollout cap (None: no cap);
    ``tokens``: the token budget (None: plan by rollouts); ``expected_lengths``: tokens per rollout to plan with,
    float64 ``(M,)`` (None: the allocator's length model); ``first``: planned before any length was observed.
    """

    rollouts: int | None
    tokens: float | None = None
    expected_lengths: np.ndarray | None = None
    first: bool = False

    def kwargs(self) -> dict[str, Any]:
        """``budget=``, ``token_budget=``, ``expected_lengths=`` for :meth:`Allocator.plan` / ``plan_pilot``."""
        return {"budget": self.rollouts, "token_budget": self.tokens, "expected_lengths": self.expected_lengths}


@dataclass(frozen=True)
class BudgetSpec:
    """A front-end's budget for every step (see the module docstring for the policy).

    ``rollouts``: the step's rollout budget ``B`` (uniform's ``n x M``); ``tokens``: None (by rollouts),
    ``"uniform"`` or a number of tokens a step; ``rollout_cap``: in token mode, the most rollouts a step may use
    (None: no cap); ``max_length``: the most tokens one rollout can generate (prices the first step of a fixed
    token budget); ``least``: the fewest rollouts a prompt a fixed token budget must pay for (None: ``n_min``; a
    two-phase step passes ``max(n_min, pilot_n)``, its pilot being part of the budget).
    """

    rollouts: int
    tokens: TokenMode = None
    rollout_cap: int | None = None
    max_length: int | None = None
    least: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rollouts, bool) or not isinstance(self.rollouts, (int, np.integer)) or self.rollouts < 1:
            raise ValueError(f"rollouts must be an integer >= 1 (the step's rollout budget), got {self.rollouts!r}")
        if isinstance(self.tokens, str):
            if self.tokens != "uniform":
                raise ValueError(f"tokens must be None, 'uniform' or a number of tokens, got {self.tokens!r}")
        elif self.tokens is not None:
            check_token_budget(self.tokens)
        for name in ("rollout_cap", "max_length", "least"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {v!r}")

    def resolve(
        self, allocator: Any, ids: Sequence[str], step: int | None = None, prompts: Sequence[str] | None = None
    ) -> StepBudget:
        """This step's budget for the batch ``ids`` (texts ``prompts`` for prompts the predictor has not seen).
        Asks ``allocator`` (an :class:`~vipalloc.allocator.Allocator`) for the batch's expected lengths, which it
        forecasts once for the batch and step: the plan that follows reuses them."""
        if self.tokens is None:
            return StepBudget(self.rollouts)
        pred = allocator.expected_lengths(ids, step, prompts=prompts)
        return resolve_tokens(self, pred, len(ids), allocator.n_min, warn_stacklevel=3)


def resolve_tokens(
    spec: BudgetSpec, pred: LengthPrediction | None, m: int, n_min: int, *, warn_stacklevel: int = 2
) -> StepBudget:
    """:meth:`BudgetSpec.resolve` given the batch's length prediction ``pred`` (None before any length) for ``m``
    prompts and the allocator's ``n_min``: the policy itself, without an allocator."""
    if spec.tokens is None:
        return StepBudget(spec.rollouts)
    if spec.tokens == "uniform":
        if pred is None:  # nothing to price uniform's tokens with yet: uniform's rollouts
            return StepBudget(spec.rollouts, first=True)
        b, per_rollout = spec.rollouts, float(pred.expected.sum())
        # b / m rollouts a prompt (uniform_tokens(ids, b // m) when whole, as the trainer and the plug-ins price it)
        tokens = (b // m) * per_rollout if b % m == 0 else per_rollout * b / m
        return StepBudget(spec.rollout_cap, float(tokens))
    cap = float(spec.tokens)
    given = None
    if pred is not None:
        c = pred.expected
    elif spec.max_length is None:  # nothing bounds a rollout's length yet: plan by rollouts
        return StepBudget(spec.rollouts, first=True)
    else:
        c = given = np.full(m, float(spec.max_length))
    least = n_min if spec.least is None else max(int(spec.least), n_min)
    need = float(least * c.sum())
    if cap < need:
        what = f"n_min={n_min}" if least == n_min else f"max(n_min, pilot_n)={least}"
        warnings.warn(
            f"token_budget={cap:g} cannot pay for {what} rollouts of each of the {m} prompts at the expected "
            f"lengths ({need:,.0f} tokens); this step is planned at {need:,.0f} tokens. Raise the token budget or "
            "lower n_min" + ("" if least == n_min else " / pilot_n"),
            RuntimeWarning,
            stacklevel=warn_stacklevel + 1,
        )
        cap = need
    return StepBudget(spec.rollout_cap, cap, given, first=pred is None)


def check_plan_args(
    m: int, budget: Any, token_budget: Any, expected_lengths: Any, history: Any
) -> tuple[int | None, float | None, np.ndarray | None]:
    """The checked ``(budget, token_budget, expected_lengths)`` of one :meth:`Allocator.plan` / ``plan_pilot`` call
    for ``m`` prompts (``expected_lengths``: float64 ``(m,)`` tokens per rollout or None). Refuses a call without a
    budget, or a token budget with no length to predict from (``history.has_lengths`` false and none given)."""
    if budget is None and token_budget is None:
        raise ValueError(
            f"budget is required: total rollouts of the step, e.g. {m} prompts x 8 = {8 * m} (or token_budget=T, "
            "generated tokens)"
        )
    budget = None if budget is None else check_int("budget", budget, 0)
    tokens = None if token_budget is None else check_token_budget(token_budget)
    given = None if expected_lengths is None else check_lengths_arg(expected_lengths, m)
    if tokens is not None and given is None and not history.has_lengths:
        raise ValueError(
            "a token budget needs the expected tokens per rollout: report lengths with observe(..., lengths=[...]) on "
            "earlier steps, pass expected_lengths=[...] (e.g. the maximum completion length), or plan this first "
            "step by rollouts (budget=...)"
        )
    return budget, tokens, given
