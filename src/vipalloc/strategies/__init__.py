"""The strategies' registry: every allocation rule by name, behind one interface.

``get_strategy(name, estimator=..., **options)`` builds one; ``STRATEGY_NAMES`` lists them all and
``TWO_PHASE_STRATEGIES`` the ones planned with ``Allocator.plan_pilot`` / ``plan_commit``. Each family lives in its
own module, and none of them imports this one:

| module | strategies |
|---|---|
| :mod:`~vipalloc.strategies.base` | :class:`Strategy` and its flags, :class:`AllocationContext`, checks, ties |
| :mod:`~vipalloc.strategies.uniform` | ``uniform``, ``inverse_acc``, ``inverse_var`` |
| :mod:`~vipalloc.strategies.vip` | ``vip``, ``vip_pure`` |
| :mod:`~vipalloc.strategies.error` | ``vip_error`` (the gradient error at the best step size) |
| :mod:`~vipalloc.strategies.authors` | ``vip_authors`` (the VIP authors' whole procedure) |
| :mod:`~vipalloc.strategies.peers` | ``knapsack``, ``gvm``, ``dynamo``, ``hora`` |
| :mod:`~vipalloc.strategies.coba` | ``coba`` (CoBA-RL) |
| :mod:`~vipalloc.strategies.two_phase` | ``vip_two_phase`` (pilot, then commit), the shared two-phase pieces |
| :mod:`~vipalloc.strategies.pilot_commit` | ``pilot_commit`` (the Pilot-Commit peer) |
| :mod:`~vipalloc.strategies.error_two_phase` | ``vip_error_two_phase`` (two-phase on the gradient error) |

Ties are broken toward earlier prompts; the ``Allocator`` shuffles prompts with a seeded per-step permutation, so
no prompt is favoured systematically. Details and worked examples: ``docs/strategies.md``.
"""

from __future__ import annotations

from collections.abc import Callable

from vipalloc.strategies.authors import VIPAuthors
from vipalloc.strategies.base import (
    HARDNESS_BONUS,
    P_CLIP,
    AllocationContext,
    Strategy,
    StrategyBase,
    balance_ties,
    check_vip_options,
    equal_classes,
    tie_classes,
    uniform_counts,
)
from vipalloc.strategies.coba import CoBA
from vipalloc.strategies.error import VIPError
from vipalloc.strategies.error_two_phase import VIPErrorTwoPhase
from vipalloc.strategies.peers import GVM, HORA, DynaMO, Knapsack, knapsack_value, proportional_counts
from vipalloc.strategies.pilot_commit import PilotCommit
from vipalloc.strategies.two_phase import TwoPhaseStrategy, VIPTwoPhase
from vipalloc.strategies.uniform import InverseAcc, InverseVar, Uniform
from vipalloc.strategies.vip import VIP, VIPPure

__all__ = [
    "GVM",
    "HARDNESS_BONUS",
    "HORA",
    "P_CLIP",
    "STRATEGY_NAMES",
    "TWO_PHASE_STRATEGIES",
    "VIP",
    "AllocationContext",
    "CoBA",
    "DynaMO",
    "InverseAcc",
    "InverseVar",
    "Knapsack",
    "PilotCommit",
    "Strategy",
    "StrategyBase",
    "TwoPhaseStrategy",
    "Uniform",
    "VIPAuthors",
    "VIPError",
    "VIPErrorTwoPhase",
    "VIPPure",
    "VIPTwoPhase",
    "balance_ties",
    "check_vip_options",
    "equal_classes",
    "get_strategy",
    "knapsack_value",
    "proportional_counts",
    "tie_classes",
    "uniform_counts",
]

# name -> factory(estimator, **options); the estimator reaches only the rules with a variance model.
_FACTORIES: dict[str, Callable[..., Strategy]] = {
    "uniform": lambda estimator, **kw: Uniform(**kw),
    "vip": lambda estimator, **kw: VIP(estimator=estimator, **kw),
    "vip_pure": lambda estimator, **kw: VIPPure(estimator=estimator, **kw),
    "inverse_acc": lambda estimator, **kw: InverseAcc(**kw),
    "inverse_var": lambda estimator, **kw: InverseVar(**kw),
    "knapsack": lambda estimator, **kw: Knapsack(**kw),
    "gvm": lambda estimator, **kw: GVM(**kw),
    "vip_authors": lambda estimator, **kw: VIPAuthors(estimator=estimator, **kw),
    "dynamo": lambda estimator, **kw: DynaMO(**kw),
    "hora": lambda estimator, **kw: HORA(**kw),
    "vip_two_phase": lambda estimator, **kw: VIPTwoPhase(estimator=estimator, **kw),
    "pilot_commit": lambda estimator, **kw: PilotCommit(**kw),
    "coba": lambda estimator, **kw: CoBA(**kw),
    "vip_error": lambda estimator, **kw: VIPError(estimator=estimator, **kw),
    "vip_error_two_phase": lambda estimator, **kw: VIPErrorTwoPhase(estimator=estimator, **kw),
}
STRATEGY_NAMES = tuple(_FACTORIES)
TWO_PHASE_STRATEGIES = tuple(n for n, f in _FACTORIES.items() if f("drgrpo").two_phase)


def get_strategy(name: str, *, estimator: str = "drgrpo", **kwargs: object) -> Strategy:
    """Build a strategy by name (one of ``STRATEGY_NAMES``); ``kwargs`` go to its constructor.

    ``estimator`` (``"drgrpo"`` or ``"rloo"``) selects the variance model of the VIP family. When training
    with GRPO, allocate with ``"drgrpo"``: the std-normalised GRPO variance is no allocation target.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGY_NAMES)}")
    if estimator not in HARDNESS_BONUS:
        hint = " (for GRPO training allocate with 'drgrpo')" if estimator == "grpo" else ""
        raise ValueError(f"unknown allocation estimator {estimator!r}; choose 'drgrpo' or 'rloo'{hint}")
    try:
        return _FACTORIES[name](estimator, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad options for strategy {name!r}: {exc}") from None
