"""The shared `vip/...` telemetry: plan metrics and outcome metrics, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipalloc import Allocator
from vipalloc.telemetry import OUTCOME_METRIC_NAMES, PLAN_METRIC_NAMES, outcome_metrics, plan_metrics


def test_plan_metrics_by_hand() -> None:
    counts = np.array([0, 8, 4, 12, 0])
    p = np.array([0.01, 0.02, 0.5, 0.99, 0.97])
    m = plan_metrics(counts, p, variance_ratio=0.8, timings={"embed": 0.1, "solve": 0.2})
    assert set(m) == set(PLAN_METRIC_NAMES)
    assert m["vip/budget"] == 24 and m["vip/prompts"] == 5
    assert m["vip/num_dropped"] == 2 and m["vip/frac_dropped"] == pytest.approx(0.4)
    assert m["vip/mean_n"] == pytest.approx(8.0)  # over kept prompts only
    assert m["vip/max_n"] == 12
    assert m["vip/share_hopeless"] == pytest.approx(8 / 24)  # p 0.01 is dropped, p 0.02 gets 8
    assert m["vip/share_solved"] == pytest.approx(12 / 24)
    assert m["vip/plan_seconds"] == pytest.approx(0.3)
    assert m["vip/min_keep_relaxed"] == 0.0


def test_outcome_metrics_by_hand() -> None:
    rewards = [[], [1, 1, 1, 1], [0, 1, 0, 0], [0.0, 0.0]]
    m = outcome_metrics(rewards, p_mean=np.array([0.3, 0.9, 0.5, 0.2]))
    assert set(m) == set(OUTCOME_METRIC_NAMES)
    assert m["vip/rollouts_generated"] == 10
    assert m["vip/frac_zero_var_groups"] == pytest.approx(2 / 3)
    assert m["vip/prompt_accuracy"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert m["vip/rollout_accuracy"] == pytest.approx(5 / 10)
    assert m["vip/pred_abs_err"] == pytest.approx((0.1 + 0.25 + 0.2) / 3)
    empty = outcome_metrics([[], []])
    assert empty["vip/rollouts_generated"] == 0 and math.isnan(empty["vip/prompt_accuracy"])
    with pytest.raises(ValueError, match="align"):
        outcome_metrics([[1]], p_mean=np.array([0.1, 0.2]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 1.0]), max_size=6), min_size=1, max_size=12))
def test_outcome_metrics_bounds(groups: list[list[float]]) -> None:
    m = outcome_metrics(groups)
    assert m["vip/rollouts_generated"] == sum(len(g) for g in groups)
    if m["vip/rollouts_generated"] > 0:
        assert 0.0 <= m["vip/frac_zero_var_groups"] <= 1.0
        assert 0.0 <= m["vip/prompt_accuracy"] <= 1.0 and 0.0 <= m["vip/rollout_accuracy"] <= 1.0


def test_allocator_plan_and_outcome_metrics() -> None:
    alloc = Allocator(strategy="vip", predictor="beta", n_min=2, n_max=8, seed=0)
    ids = [f"q{i}" for i in range(6)]
    plan = alloc.plan(ids, budget=24, step=0)
    pm = plan.metrics()
    assert pm["vip/budget"] == 24 and pm["vip/prompts"] == 6
    rewards = [np.ones(int(n)) if i % 2 else np.zeros(int(n)) for i, n in enumerate(plan.counts)]
    om = alloc.outcome_metrics(rewards, plan)
    assert om["vip/rollouts_generated"] == 24 and om["vip/frac_zero_var_groups"] == 1.0
    with pytest.raises(ValueError, match="one reward array per prompt"):
        alloc.outcome_metrics(rewards[:3], plan)
