"""The exact solver: optimal vs brute force (incl. non-convex cases), vs a full DP, constraints, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipalloc.allocation import _solve_dp, cost_table, domain, feasible_range, objective, solve


def brute_force(p, budget, n_min, n_max, estimator, bonus, drop, weights=None) -> float:
    vals = domain(n_min, n_max, drop)
    best = np.inf
    for combo in itertools.product(vals, repeat=len(p)):
        if sum(combo) == budget:
            best = min(best, objective(p, np.array(combo), estimator=estimator, hardness_bonus=bonus, weights=weights))
    return best


@st.composite
def instances(draw):
    m = draw(st.integers(1, 5))
    n_min = draw(st.integers(2, 4))
    n_max = draw(st.integers(n_min, 8))
    drop = draw(st.booleans())
    p = np.array(draw(st.lists(st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0, 1)), min_size=m, max_size=m)))
    vals = domain(n_min, n_max, drop)
    sums = sorted({sum(c) for c in itertools.product(vals, repeat=m)})
    budget = draw(st.sampled_from(sums))
    estimator = draw(st.sampled_from(["drgrpo", "rloo"]))
    bonus = draw(st.sampled_from([0.0, 4e-4, 7e-4, 0.05]))
    weights = draw(st.one_of(st.none(), st.lists(st.floats(0, 3), min_size=m, max_size=m).map(np.array)))
    return p, budget, n_min, n_max, estimator, bonus, drop, weights


@settings(max_examples=400, deadline=None)
@given(inst=instances())
def test_equals_brute_force(inst) -> None:
    p, budget, n_min, n_max, estimator, bonus, drop, weights = inst
    n = solve(
        p, budget, n_min=n_min, n_max=n_max, estimator=estimator, hardness_bonus=bonus, allow_drop=drop, weights=weights
    )
    assert n.dtype == np.int64 and int(n.sum()) == budget
    kept = n[n > 0]
    assert np.all((kept >= n_min) & (kept <= n_max))
    if not drop:
        assert np.all(n >= n_min)
    got = objective(p, n, estimator=estimator, hardness_bonus=bonus, weights=weights)
    best = brute_force(p, budget, n_min, n_max, estimator, bonus, drop, weights)
    assert got <= best + 1e-12 * (1 + abs(best))


def test_nonconvex_drgrpo_n2_case() -> None:
    # Dr.GRPO's cost is not discretely convex at n = 3 when n_min = 2: greedy from n_min gets this wrong.
    p = np.array([0.5, 0.5, 0.5])
    n = solve(p, 9, n_min=2, n_max=8, estimator="drgrpo")
    assert objective(p, n) == pytest.approx(brute_force(p, 9, 2, 8, "drgrpo", 0.0, False))


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("estimator,bonus", [("drgrpo", 4e-4), ("rloo", 7e-4), ("drgrpo", 0.0)])
def test_matches_full_dp_on_medium_instances(drop, estimator, bonus) -> None:
    rng = np.random.default_rng(7)
    for _ in range(5):
        m = int(rng.integers(20, 60))
        p = rng.beta(0.5, 0.5, m)
        p[rng.random(m) < 0.1] = 0.0
        budget = int(rng.integers(4 * m, 10 * m))
        n_min, n_max = (4, 32)
        n = solve(p, budget, n_min=n_min, n_max=n_max, estimator=estimator, hardness_bonus=bonus, allow_drop=drop)
        vals = domain(n_min, n_max, drop)
        tab = cost_table(p, vals, estimator, bonus)
        ref = tab[np.arange(m), _solve_dp(tab, vals, budget)].sum()
        assert objective(p, n, estimator=estimator, hardness_bonus=bonus) == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_deterministic_and_monotone_budget() -> None:
    rng = np.random.default_rng(3)
    p = rng.random(200)
    a = solve(p, 1600, estimator="rloo", hardness_bonus=7e-4, allow_drop=True)
    b = solve(p.copy(), 1600, estimator="rloo", hardness_bonus=7e-4, allow_drop=True)
    np.testing.assert_array_equal(a, b)
    prev = None
    for budget in range(800, 6401, 400):  # the optimal value never increases with more budget (no drop, convex)
        val = objective(p, solve(p, budget, estimator="rloo"), estimator="rloo")
        if prev is not None:
            assert val <= prev + 1e-12
        prev = val


def test_mid_p_gets_more_than_extremes() -> None:
    p = np.array([0.001, 0.5, 0.999])
    n = solve(p, 24, n_min=2, n_max=20)
    assert n[1] > n[0] and n[1] > n[2]


def test_hardness_bonus_shifts_rollouts_to_hard_prompts() -> None:
    p = np.array([0.2, 0.8])
    plain = solve(p, 20, n_min=2, n_max=18)
    assert plain[0] == plain[1]  # p(1-p) is symmetric
    bonus = solve(p, 20, n_min=2, n_max=18, hardness_bonus=0.01)
    assert bonus[0] > bonus[1]


def test_zero_and_one_probabilities_and_literal_drop_semantics() -> None:
    p = np.array([0.0, 1.0, 0.5, 0.4])
    n = solve(p, 24, n_min=2, n_max=16)
    assert n[2] + n[3] == max(24 - 4, 0) and n[0] == 2 and n[1] == 2  # constant prompts: no variance to cut
    # With drops and no bonus, the literal program parks the budget on zero-cost constant prompts and drops the
    # informative ones (cost 0 < their variance): why the vip strategy solves in two stages instead.
    d = solve(p, 24, n_min=2, n_max=16, allow_drop=True)
    assert objective(p, d) == 0.0 and d[2] == 0 and d[3] == 0


def test_large_instance_is_valid_and_fast_enough() -> None:
    rng = np.random.default_rng(0)
    p = rng.beta(0.6, 0.6, 4096)
    n = solve(p, 8 * 4096, estimator="drgrpo", hardness_bonus=4e-4, allow_drop=True)
    assert n.sum() == 8 * 4096 and set(np.unique(n)) <= {0, *range(4, 33)}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": [0.5, 0.5], "budget": 3}, r"infeasible .* \[8, 64\]"),
        ({"p": [0.5, 0.5], "budget": 65}, "infeasible"),
        ({"p": [0.5, 0.5], "budget": 5, "allow_drop": True, "n_max": 4}, "infeasible"),
        ({"p": [0.5, 0.5], "budget": 8.5}, "integer"),
        ({"p": [0.5, 0.5], "budget": -8}, ">= 0"),
        ({"p": [0.5, 0.5], "budget": True}, "integer"),
        ({"p": [], "budget": 0}, "empty batch"),
        ({"p": [0.5, float("nan")], "budget": 8}, "NaN"),
        ({"p": [0.5, 1.5], "budget": 8}, r"\[0, 1\]"),
        ({"p": [0.5], "budget": 8, "estimator": "grpo"}, "not monotone"),
        ({"p": [0.5], "budget": 8, "n_min": 1}, "n_min must be >= 2"),
        ({"p": [0.5], "budget": 8, "n_min": 9, "n_max": 8}, "n_min"),
        ({"p": [0.5, 0.5], "budget": 8, "weights": [1.0]}, "weights"),
        ({"p": [0.5, 0.5], "budget": 8, "weights": [1.0, -1.0]}, "weights"),
    ],
)
def test_errors(kwargs, match) -> None:
    kw = dict(kwargs)
    p = kw.pop("p")
    budget = kw.pop("budget")
    with pytest.raises(ValueError, match=match):
        solve(p, budget, **kw)


def test_feasible_range_and_drop_budgets() -> None:
    assert feasible_range(3, 4, 8) == (12, 24)
    assert feasible_range(3, 4, 8, allow_drop=True) == (0, 24)
    assert solve([0.5, 0.5, 0.5], 0, allow_drop=True).tolist() == [0, 0, 0]


def test_cross_check_continuous_relaxation_with_cvxpy() -> None:
    cp = pytest.importorskip("cvxpy")
    rng = np.random.default_rng(11)
    p = rng.uniform(0.05, 0.95, 30)
    budget = 30 * 8
    n = solve(p, budget, n_min=2, n_max=32, estimator="rloo")
    x = cp.Variable(30)
    a = p * (1 - p)
    prob = cp.Problem(cp.Minimize(cp.sum(cp.multiply(a, cp.inv_pos(x - 1)))), [cp.sum(x) == budget, x >= 2, x <= 32])
    prob.solve()
    relaxed = float(prob.value)
    exact = objective(p, n, estimator="rloo")
    assert relaxed <= exact + 1e-6  # relaxation is a lower bound
    assert exact <= relaxed * 1.02  # and the integer optimum is close to it
    np.testing.assert_allclose(n, x.value, atol=1.5)
