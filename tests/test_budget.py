"""The one budget policy (vipalloc.budget): rollouts, tokens, tokens with a rollout cap; 'uniform', a fixed number of
tokens, and the first step before any length is known."""

from __future__ import annotations

import numpy as np
import pytest

from vipalloc import Allocator
from vipalloc.budget import BudgetSpec, StepBudget, check_rollout_budget, check_token_budget, resolve_tokens
from vipalloc.predictors.length import LengthPrediction

M = 4


def _pred(c: list[float]) -> LengthPrediction:
    arr = np.asarray(c, np.float64)
    return LengthPrediction(expected=arr, success=arr, fail=arr, prior=arr)


def test_by_rollouts() -> None:
    assert resolve_tokens(BudgetSpec(rollouts=16), _pred([1.0] * M), M, 2) == StepBudget(16)


def test_uniform_prices_uniform_rollouts_and_plans_the_first_step_by_rollouts() -> None:
    spec = BudgetSpec(rollouts=16, tokens="uniform", rollout_cap=20)
    first = resolve_tokens(spec, None, M, 2)
    assert (first.rollouts, first.tokens, first.first) == (16, None, True)
    later = resolve_tokens(spec, _pred([10.0, 20.0, 30.0, 40.0]), M, 2)
    assert later.tokens == 4 * 100.0 and later.rollouts == 20 and later.expected_lengths is None
    # a budget that is not a multiple of the batch: rollouts / M a prompt
    odd = resolve_tokens(BudgetSpec(rollouts=18, tokens="uniform"), _pred([10.0] * M), M, 2)
    assert odd.tokens == pytest.approx(18 / 4 * 40.0) and odd.rollouts is None


def test_fixed_budget_first_step_at_max_length_or_by_rollouts() -> None:
    spec = BudgetSpec(rollouts=16, tokens=500.0, rollout_cap=16, max_length=12)
    first = resolve_tokens(spec, None, M, 2)
    assert first.tokens == 500.0 and first.first and first.rollouts == 16
    assert first.expected_lengths is not None and np.array_equal(first.expected_lengths, np.full(M, 12.0))
    no_max = resolve_tokens(BudgetSpec(rollouts=16, tokens=500.0), None, M, 2)
    assert (no_max.rollouts, no_max.tokens, no_max.first) == (16, None, True)
    later = resolve_tokens(spec, _pred([10.0] * M), M, 2)
    assert later.tokens == 500.0 and later.expected_lengths is None and not later.first


def test_fixed_budget_too_small_is_raised_to_n_min_with_a_warning() -> None:
    with pytest.warns(RuntimeWarning, match="cannot pay for n_min=2"):
        low = resolve_tokens(BudgetSpec(rollouts=16, tokens=10.0), _pred([10.0] * M), M, 2)
    assert low.tokens == 2 * 40.0
    with pytest.warns(RuntimeWarning, match=r"max\(n_min, pilot_n\)=3"):
        pilot = resolve_tokens(BudgetSpec(rollouts=16, tokens=10.0, least=3), _pred([10.0] * M), M, 2)
    assert pilot.tokens == 3 * 40.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rollouts": 0}, "rollouts must be an integer >= 1"),
        ({"rollouts": 8, "tokens": "all"}, "None, 'uniform' or a number"),
        ({"rollouts": 8, "tokens": -1.0}, "finite number of tokens > 0"),
        ({"rollouts": 8, "rollout_cap": 0}, "rollout_cap must be None or an integer >= 1"),
        ({"rollouts": 8, "max_length": 2.5}, "max_length must be None or an integer >= 1"),
    ],
)
def test_bad_specs_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BudgetSpec(**kwargs)


def test_checks_name_the_feasible_range() -> None:
    with pytest.raises(ValueError, match=r"feasible budgets lie in \[8, 32\]"):
        check_rollout_budget(7, 4, 2, 8)
    with pytest.raises(ValueError, match="at most 32; raise n_max"):
        check_rollout_budget(33, 4, 2, 8)
    check_rollout_budget(33, 4, 2, 8, cap=True)  # a cap above M n_max only never binds
    with pytest.raises(ValueError, match="token_budget must be a number"):
        check_token_budget(True)
    assert check_token_budget(np.int64(7)) == 7.0


def test_resolve_through_an_allocator_plans_the_first_step_and_later_ones() -> None:
    alloc = Allocator(strategy="vip", predictor="beta", n_min=2, n_max=8)
    ids = [f"q{i}" for i in range(M)]
    spec = BudgetSpec(rollouts=16, tokens=200.0, rollout_cap=16, max_length=10)
    first = spec.resolve(alloc, ids, 0)
    plan = alloc.plan(ids, step=0, **first.kwargs())
    assert float(plan.counts @ np.full(M, 10.0)) <= 200.0 and int(plan.counts.sum()) <= 16
    alloc.observe(ids, [np.ones(n) for n in plan.counts], step=0, lengths=[[4] * n for n in plan.counts])
    later = spec.resolve(alloc, ids, 1)
    assert later.expected_lengths is None and later.tokens == 200.0
    plan1 = alloc.plan(ids, step=1, **later.kwargs())
    assert plan1.expected_lengths is not None and float(plan1.counts @ plan1.expected_lengths) <= 200.0 + 1e-6


def test_the_trainer_states_its_budget_as_the_plug_ins_do() -> None:
    """The CPU trainer's budget is the policy's spec with the plug-ins' meaning of each field: the rollout budget,
    the token mode, uniform's rollouts as the cap, the most tokens a rollout can hold for the first step."""
    from vipalloc.training.config import TrainConfig
    from vipalloc.training.trainer import budget_spec

    cfg = TrainConfig(prompts_per_step=8, n_mean=4, token_budget=300.0, max_new_tokens=12)
    assert budget_spec(cfg) == BudgetSpec(rollouts=32, tokens=300.0, rollout_cap=32, max_length=12)
    uncapped = TrainConfig(prompts_per_step=8, n_mean=4, token_budget="uniform", token_rollout_cap=None)
    assert budget_spec(uncapped) == BudgetSpec(rollouts=32, tokens="uniform", rollout_cap=None, max_length=6)
    two_phase = TrainConfig(strategy="vip_two_phase", prompts_per_step=8, n_mean=4, n_min=2, pilot_n=3)
    assert budget_spec(two_phase).rollout_cap == 32 and budget_spec(two_phase).least == 3
