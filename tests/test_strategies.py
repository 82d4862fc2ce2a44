"""Every named strategy: valid plans, its defining behaviour, exact knapsack, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipalloc.strategies import STRATEGY_NAMES, get_strategy


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(STRATEGY_NAMES),
    p=st.lists(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0])), min_size=1, max_size=40),
    n_min=st.integers(2, 6),
    span=st.integers(0, 20),
    frac=st.floats(0, 1),
    estimator=st.sampled_from(["drgrpo", "rloo"]),
)
def test_valid_plan(name, p, n_min, span, frac, estimator) -> None:
    p = np.array(p)
    n_max = n_min + span
    m = len(p)
    budget = int(m * n_min + round(frac * m * (n_max - n_min)))
    counts = get_strategy(name, estimator=estimator).allocate(p, budget, n_min, n_max)
    assert counts.dtype == np.int64 and counts.shape == (m,)
    assert int(counts.sum()) == budget
    kept = counts[counts > 0]
    assert np.all(kept <= n_max)
    if name == "vip":
        assert np.all(kept >= min(max(n_min, 4), n_max)) or np.all(kept >= n_min)
    else:
        assert np.all(counts >= n_min)


def test_uniform_and_vip_fallback() -> None:
    p = np.full(5, 0.3)
    for name in ("uniform", "vip", "vip_pure"):
        assert get_strategy(name).allocate(p, 42, 2, 16).tolist() == [9, 9, 8, 8, 8]


def test_vip_behaviour() -> None:
    p = np.array([0.0, 0.02, 0.3, 0.5, 0.7, 0.98, 1.0, 0.5])
    counts = get_strategy("vip", estimator="rloo").allocate(p, 64, 2, 32)
    assert counts[6] == 0  # solved prompt dropped
    assert counts[3] >= 4 and counts[7] >= 4  # informative prompts kept
    assert counts[0] == counts.max()  # never-solved prompt explored: the authors' hardness bonus
    pure = get_strategy("vip_pure").allocate(p, 64, 2, 32)
    assert pure[3] == pure.max() and pure[0] == 2 and pure[6] == 2


def test_inverse_rules() -> None:
    p = np.array([0.1, 0.5, 0.9, 0.99])
    acc = get_strategy("inverse_acc").allocate(p, 20, 2, 10)
    assert acc.tolist() == [10, 6, 2, 2]
    var = get_strategy("inverse_var").allocate(p, 20, 2, 10)
    assert var.tolist() == [2, 2, 6, 10]


def test_knapsack_exact_vs_brute_force() -> None:
    rng = np.random.default_rng(5)
    for _ in range(60):
        m = int(rng.integers(1, 5))
        p = rng.random(m)
        p[rng.random(m) < 0.2] = 0.0
        n_min, n_max = 2, int(rng.integers(2, 9))
        budget = int(rng.integers(m * n_min, m * n_max + 1))
        got = get_strategy("knapsack").allocate(p, budget, n_min, n_max)

        def value(n, p=p):
            return float(np.sum((1 - p**n - (1 - p) ** n) * p * (1 - p) ** 2))

        best = max(value(np.array(c)) for c in itertools.product(range(n_min, n_max + 1), repeat=m) if sum(c) == budget)
        assert value(got) >= best - 1e-12


def test_knapsack_sends_leftovers_to_unsolved_prompts() -> None:
    p = np.array([0.0, 1.0, 0.3])
    counts = get_strategy("knapsack").allocate(p, 40, 2, 32)
    assert counts[1] == 2 and counts[0] > 2


def test_gvm_proportional() -> None:
    p = np.array([0.01, 0.25, 1.0])
    counts = get_strategy("gvm").allocate(p, 30, 2, 20)
    assert counts[0] > counts[1] > counts[2]
    w = 1 / np.sqrt(p + 1e-3 / p)
    assert np.all(np.abs(counts - 30 * w / w.sum()) <= 1 + 1e-9) or counts.max() == 20


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'x'.*uniform"):
        get_strategy("x")
    with pytest.raises(ValueError, match="bad options"):
        get_strategy("uniform", foo=1)
    with pytest.raises(ValueError, match="infeasible"):
        get_strategy("uniform").allocate(np.array([0.5, 0.5]), 3, 2, 8)
    with pytest.raises(ValueError, match="empty batch"):
        get_strategy("vip").allocate(np.array([]), 0, 2, 8)
