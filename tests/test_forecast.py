"""One forecast per (batch, step): the calls a front-end makes for one batch and step share one prediction, and
anything that changes the predictor's state makes the next call predict afresh."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from vipalloc import Allocator
from vipalloc.budget import BudgetSpec

IDS = [f"q{i}" for i in range(8)]
TEXTS = [f"What is {i} + {i}?" for i in range(8)]


def _count_predictions(alloc: Allocator) -> list[int]:
    """Wrap the allocator's predictor so that each ``predict`` call is counted; returns the (mutable) counter."""
    calls = [0]
    pred = alloc.predictor
    inner = pred.predict

    def counted(ids: Any, step: int) -> tuple[np.ndarray, np.ndarray]:
        calls[0] += 1
        return inner(ids, step)

    pred.predict = counted
    return calls


def _with_lengths(predictor: str = "beta", strategy: str = "vip") -> Allocator:
    """An allocator that has seen two steps of rewards and lengths (so token budgets can be priced)."""
    alloc = Allocator(strategy=strategy, predictor=predictor, n_min=2, n_max=16, embedder="hashing")
    rng = np.random.default_rng(0)

    def observe(counts: np.ndarray, step: int) -> None:
        rewards = [rng.integers(0, 2, n).astype(float) for n in counts]
        alloc.observe(IDS, rewards, step=step, lengths=[rng.integers(5, 40, n) for n in counts])

    for step in range(2):
        if alloc.strategy.two_phase:
            observe(alloc.plan_pilot(IDS, prompts=TEXTS, budget=6 * len(IDS), step=step).counts, step)
            observe(alloc.plan_commit(step).counts, step)
        else:
            observe(alloc.plan(IDS, prompts=TEXTS, budget=4 * len(IDS), step=step).counts, step)
    return alloc


@pytest.mark.parametrize("predictor", ["beta", "gp"])
def test_uniform_tokens_then_plan_predicts_once(predictor: str) -> None:
    alloc = _with_lengths(predictor)
    calls = _count_predictions(alloc)
    tokens = alloc.uniform_tokens(IDS, 4, step=2, prompts=TEXTS)
    assert tokens is not None and tokens > 0
    plan = alloc.plan(IDS, prompts=TEXTS, step=2, token_budget=tokens, budget=4 * len(IDS))
    assert calls[0] == 1
    # the plan is the one a fresh prediction gives: same counts and predictions from an allocator without the cache hit
    fresh = _with_lengths(predictor)
    ref = fresh.plan(IDS, prompts=TEXTS, step=2, token_budget=tokens, budget=4 * len(IDS))
    assert np.array_equal(plan.counts, ref.counts)
    assert np.array_equal(plan.p_mean, ref.p_mean) and np.array_equal(plan.expected_lengths, ref.expected_lengths)


def test_expected_lengths_then_pilot_predicts_once() -> None:
    alloc = _with_lengths("beta", "vip_two_phase")
    calls = _count_predictions(alloc)
    pred = alloc.expected_lengths(IDS, 2)
    assert pred is not None
    alloc.plan_pilot(IDS, prompts=TEXTS, step=2, budget=6 * len(IDS), token_budget=float(6 * pred.expected.sum()))
    assert calls[0] == 1


def test_budget_policy_then_plan_predicts_once() -> None:
    alloc = _with_lengths()
    calls = _count_predictions(alloc)
    spec = BudgetSpec(rollouts=4 * len(IDS), tokens="uniform", rollout_cap=4 * len(IDS))
    step_budget = spec.resolve(alloc, IDS, 2, prompts=TEXTS)
    assert step_budget.tokens is not None and not step_budget.first
    alloc.plan(IDS, prompts=TEXTS, step=2, **step_budget.kwargs())
    assert calls[0] == 1


def test_observe_invalidates_the_forecast() -> None:
    alloc = _with_lengths()
    calls = _count_predictions(alloc)
    plan = alloc.plan(IDS, prompts=TEXTS, budget=4 * len(IDS), step=2)
    before = alloc.uniform_tokens(IDS, 4, step=2)
    assert calls[0] == 1
    alloc.observe(IDS[:1], [np.ones(int(plan.counts[0]))], step=2, lengths=[[50] * int(plan.counts[0])])
    after = alloc.uniform_tokens(IDS, 4, step=2)
    assert calls[0] == 2  # new evidence: predicted again
    assert after != before  # and the new lengths moved the price


def test_other_batch_or_step_is_its_own_forecast() -> None:
    alloc = _with_lengths()
    calls = _count_predictions(alloc)
    alloc.uniform_tokens(IDS, 4, step=2)
    alloc.uniform_tokens(IDS, 4, step=3)
    alloc.uniform_tokens(IDS[:4], 4, step=2)
    alloc.uniform_tokens(IDS, 4, step=2)  # the first again: cached
    assert calls[0] == 3


def test_set_true_p_through_the_predictor_invalidates() -> None:
    alloc = Allocator(strategy="vip", predictor="oracle", n_min=2, n_max=16)
    alloc.predictor.set_true_p(IDS, np.full(8, 0.5))
    first = alloc.plan(IDS, budget=32, step=0)
    alloc.predictor.set_true_p(IDS, np.linspace(0.05, 0.95, 8))
    again = alloc.plan(IDS, budget=32, step=0)  # same batch and step, new truth
    assert np.allclose(first.p_mean, 0.5)
    assert np.allclose(again.p_mean, np.linspace(0.05, 0.95, 8))


def test_plan_arrays_are_the_callers() -> None:
    """The cached prediction is shared; the plan hands out copies the caller may edit."""
    alloc = _with_lengths()
    a = alloc.plan(IDS, budget=32, step=2)
    a.p_mean[:] = -1.0
    b = alloc.plan(IDS, budget=32, step=2)
    assert np.all(b.p_mean >= 0)


def test_load_starts_without_forecasts(tmp_path: Any) -> None:
    alloc = _with_lengths()
    alloc.uniform_tokens(IDS, 4, step=2)
    alloc.save(tmp_path / "a.json")
    loaded = Allocator.load(tmp_path / "a.json")
    calls = _count_predictions(loaded)
    assert loaded.uniform_tokens(IDS, 4, step=2) == alloc.uniform_tokens(IDS, 4, step=2)
    assert calls[0] == 1
