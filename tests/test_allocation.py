"""The exact solver: optimal vs brute force (incl. non-convex cases and ties), vs a full DP, constraints, errors."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipalloc.allocation import (
    _weighted_kth,
    cost_table,
    domain,
    feasible_range,
    minimize_separable,
    objective,
    solve,
)
from vipalloc.allocation_dp import solve_dp

REL = 1e-12


def reference_table(p, vals, estimator, bonus, weights) -> np.ndarray:
    """The objective's per-(prompt, count) terms written out from the formulas (independent of cost_table)."""
    p = np.asarray(p, float)[:, None]
    n = np.asarray(vals, float)[None, :]
    a = p * (1 - p)
    if estimator == "drgrpo":
        var = np.where(n > 0, a * (n - 1) / np.maximum(n, 1) ** 2, 0.0)
    else:
        var = np.where(n > 1, a / np.maximum(n - 1, 1), 0.0)
    w = np.ones(p.shape[0]) if weights is None else np.asarray(weights, float)
    return w[:, None] * var + bonus * np.log(np.clip(p, 1e-6, 1 - 1e-6)) * n


def enumerate_all(table: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every count vector (as column indices) and its cost: K^M rows."""
    m, k = table.shape
    idx = np.stack(np.meshgrid(*[np.arange(k)] * m, indexing="ij"), -1).reshape(-1, m)
    return idx, table[np.arange(m), idx].sum(axis=1)


def brute_force_min(table: np.ndarray, vals: np.ndarray, budget: int) -> float:
    idx, cost = enumerate_all(table, vals)
    ok = vals[idx].sum(axis=1) == budget
    return float(cost[ok].min()) if ok.any() else np.inf


def reachable_budgets(m: int, vals: np.ndarray) -> list[int]:
    sums = {0}
    for _ in range(m):
        sums = {s + int(x) for s in sums for x in vals}
    return sorted(sums)


def close(got: float, best: float) -> bool:
    return got <= best + REL * (1 + abs(best))


# ------------------------------------------------------------------------------------------ brute force
@st.composite
def instances(draw):
    m = draw(st.integers(1, 6))
    n_min = draw(st.integers(2, 4))
    n_max = draw(st.integers(n_min, 8 if m <= 5 else 6))
    drop = draw(st.booleans())
    p = np.array(
        draw(st.lists(st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.25]), st.floats(0, 1)), min_size=m, max_size=m))
    )
    budget = draw(st.sampled_from(reachable_budgets(m, domain(n_min, n_max, drop))))
    estimator = draw(st.sampled_from(["drgrpo", "rloo"]))
    bonus = draw(st.sampled_from([0.0, 4e-4, 7e-4, 0.05]))
    weights = draw(st.one_of(st.none(), st.lists(st.floats(0, 3), min_size=m, max_size=m).map(np.array)))
    return p, budget, n_min, n_max, estimator, bonus, drop, weights


@settings(max_examples=300, deadline=None)
@given(inst=instances())
def test_solve_equals_brute_force(inst) -> None:
    p, budget, n_min, n_max, estimator, bonus, drop, weights = inst
    n = solve(
        p, budget, n_min=n_min, n_max=n_max, estimator=estimator, hardness_bonus=bonus, allow_drop=drop, weights=weights
    )
    assert n.dtype == np.int64 and n.shape == p.shape and int(n.sum()) == budget
    kept = n[n > 0]
    assert np.all((kept >= n_min) & (kept <= n_max))
    if not drop:
        assert np.all(n >= n_min)
    vals = domain(n_min, n_max, drop)
    best = brute_force_min(reference_table(p, vals, estimator, bonus, weights), vals, budget)
    got = objective(p, n, estimator=estimator, hardness_bonus=bonus, weights=weights)
    assert close(got, best), (got, best)


@st.composite
def tables(draw):
    """Arbitrary cost tables: reals, small integers (many exact ties), identical or linear rows; gapped counts."""
    m = draw(st.integers(1, 5))
    k = draw(st.integers(1, 6))
    vals = np.array(sorted(draw(st.sets(st.integers(0, 12), min_size=k, max_size=k))))
    kind = draw(st.sampled_from(["real", "int", "same", "linear"]))
    if kind == "real":
        c = np.array(draw(st.lists(st.floats(-5, 5), min_size=m * k, max_size=m * k))).reshape(m, k)
    elif kind == "int":
        c = np.array(draw(st.lists(st.integers(-2, 2), min_size=m * k, max_size=m * k)), float).reshape(m, k)
    elif kind == "same":
        c = np.tile(np.array(draw(st.lists(st.floats(-5, 5), min_size=k, max_size=k))), (m, 1))
    else:
        slopes = np.array(draw(st.lists(st.integers(-2, 2), min_size=m, max_size=m)), float)
        c = slopes[:, None] * vals[None, :]
    budget = draw(st.sampled_from(reachable_budgets(m, vals)))
    return c, vals, budget


@settings(max_examples=300, deadline=None)
@given(inst=tables())
def test_minimize_separable_any_table_equals_brute_force(inst) -> None:
    c, vals, budget = inst
    idx = minimize_separable(c, vals, budget)
    assert idx.dtype == np.int64 and int(vals[idx].sum()) == budget
    assert close(float(c[np.arange(len(c)), idx].sum()), brute_force_min(c, vals, budget))


def test_nonconvex_drgrpo_where_greedy_fails() -> None:
    # Dr.GRPO's a(n-1)/n^2 is not discretely convex at n = 3 (f(3)-f(2) = -a/36 > f(4)-f(3) = -5a/144), so
    # greedy marginal allocation from n_min = 2 is not optimal. This instance shows it.
    p = np.array([0.54, 0.94, 0.82])
    greedy = np.array([8, 3, 8])  # what unit-by-unit greedy returns (largest variance decrease first)
    n = solve(p, 19, n_min=2, n_max=8)
    assert n.tolist() == [8, 4, 7]
    assert objective(p, n) < objective(p, greedy) - 1e-5
    vals = domain(2, 8)
    assert objective(p, n) == pytest.approx(brute_force_min(reference_table(p, vals, "drgrpo", 0, None), vals, 19))


# ------------------------------------------------------------------------------------------ larger instances
def dp_optimum(p, budget, n_min, n_max, estimator, bonus, drop, weights=None) -> float:
    vals = domain(n_min, n_max, drop)
    tab = cost_table(p, vals, estimator, bonus, weights)
    return float(tab[np.arange(len(p)), solve_dp(tab, vals, budget)].sum())


def random_p(rng: np.random.Generator, m: int, mode: str) -> np.ndarray:
    if mode == "beta":
        return rng.beta(0.5, 0.5, m)
    if mode == "discrete":  # empirical rates k/8: many identical predictions
        return rng.integers(0, 9, m) / 8
    if mode == "prior":  # mostly never-seen prompts at the GP prior, a few informative ones
        return np.where(rng.random(m) < 0.8, 0.0067, rng.random(m))
    return np.where(rng.random(m) < 0.7, 0.0, rng.random(m))  # "zeros": mostly unsolved prompts


@pytest.mark.parametrize("mode", ["beta", "discrete", "prior", "zeros"])
@pytest.mark.parametrize("drop", [False, True])
def test_matches_full_dp_on_medium_instances(mode, drop) -> None:
    rng = np.random.default_rng(len(mode) * 10 + drop)
    for trial in range(4):
        m = int(rng.integers(20, 70))
        estimator = ("drgrpo", "rloo")[trial % 2]
        bonus = (0.0, 4e-4, 7e-4, 0.02)[trial]
        n_min = int(rng.integers(2, 5))
        n_max = int(rng.integers(n_min + 1, 24))
        weights = rng.random(m) * 2 if trial == 3 else None
        lo, hi = feasible_range(m, n_min, n_max, drop)
        budget = int(rng.integers(max(lo, n_min), hi + 1))
        p = random_p(rng, m, mode)
        kw = dict(n_min=n_min, n_max=n_max, estimator=estimator, hardness_bonus=bonus, allow_drop=drop)
        n = solve(p, budget, weights=weights, **kw)
        assert int(n.sum()) == budget
        best = dp_optimum(p, budget, n_min, n_max, estimator, bonus, drop, weights)
        assert close(objective(p, n, estimator=estimator, hardness_bonus=bonus, weights=weights), best)


def test_random_tables_match_full_dp() -> None:
    rng = np.random.default_rng(5)
    for _ in range(25):
        m = int(rng.integers(10, 60))
        vals = np.sort(rng.choice(np.arange(0, 20), int(rng.integers(2, 9)), replace=False))
        c = rng.integers(-3, 4, size=(m, len(vals))).astype(float) + (rng.random() < 0.5) * rng.normal(size=(m, 1))
        budget = int(rng.choice(reachable_budgets(2, vals))) + int(vals[0]) * (m - 2)  # reachable: others at min
        idx = minimize_separable(c, vals, budget)
        ref = solve_dp(c, vals, budget)
        assert int(vals[idx].sum()) == budget
        assert close(float(c[np.arange(m), idx].sum()), float(c[np.arange(m), ref].sum()))


def greedy_convex(p: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
    """Marginal allocation with a heap: exact for RLOO's convex a/(n-1) (an independent check at scale)."""
    a = p * (1 - p)
    n = np.full(len(p), n_min)
    heap = [(a[i] / n_min - a[i] / (n_min - 1), i) for i in range(len(p)) if n_min < n_max]
    heapq.heapify(heap)
    for _ in range(budget - n_min * len(p)):
        _, i = heapq.heappop(heap)
        n[i] += 1
        if n[i] < n_max:
            heapq.heappush(heap, (a[i] / n[i] - a[i] / (n[i] - 1), i))
    return n


@pytest.mark.parametrize("mode", ["beta", "discrete", "prior"])
def test_large_convex_instances_match_greedy(mode) -> None:
    rng = np.random.default_rng(1)
    m = 3000
    p = random_p(rng, m, mode)
    budget = 8 * m + 123
    n = solve(p, budget, estimator="rloo")
    ref = objective(p, greedy_convex(p, budget, 4, 32), estimator="rloo")
    assert close(objective(p, n, estimator="rloo"), ref)


@pytest.mark.parametrize("mode", ["beta", "zeros", "prior"])
def test_large_instances_with_drop_are_valid(mode) -> None:
    rng = np.random.default_rng(2)
    m = 4096
    p = random_p(rng, m, mode)
    n = solve(p, 8 * m + 3, estimator="drgrpo", hardness_bonus=4e-4, allow_drop=True)
    assert n.sum() == 8 * m + 3 and set(np.unique(n)) <= {0, *range(4, 33)}


# ------------------------------------------------------------------------------------------ behaviour
def test_deterministic_ties_go_to_earlier_prompts() -> None:
    p = np.full(5, 0.5)
    assert solve(p, 42, n_min=2, n_max=16).tolist() == [9, 9, 8, 8, 8]
    rng = np.random.default_rng(3)
    q = rng.random(300)
    a = solve(q, 2400, estimator="rloo", hardness_bonus=7e-4, allow_drop=True)
    b = solve(q.copy(), 2400, estimator="rloo", hardness_bonus=7e-4, allow_drop=True)
    np.testing.assert_array_equal(a, b)


def test_optimal_value_is_permutation_invariant() -> None:
    rng = np.random.default_rng(4)
    p = rng.integers(0, 5, 80) / 4
    perm = rng.permutation(80)
    kw = dict(n_min=2, n_max=12, hardness_bonus=4e-4, allow_drop=True)
    assert objective(p, solve(p, 500, **kw), hardness_bonus=4e-4) == pytest.approx(
        objective(p[perm], solve(p[perm], 500, **kw), hardness_bonus=4e-4), rel=1e-12
    )


@pytest.mark.parametrize("estimator", ["drgrpo", "rloo"])
def test_more_budget_never_hurts_without_drops(estimator) -> None:
    rng = np.random.default_rng(3)
    p = rng.random(120)
    prev = np.inf
    for budget in range(480, 3841, 160):  # variance falls with n (and the bonus is <= 0): value nonincreasing
        n = solve(p, budget, estimator=estimator, hardness_bonus=4e-4)
        val = objective(p, n, estimator=estimator, hardness_bonus=4e-4)
        assert val <= prev + 1e-12
        prev = val


def test_mid_p_gets_more_than_extremes() -> None:
    n = solve(np.array([0.001, 0.5, 0.999]), 24, n_min=2, n_max=20)
    assert n[1] > n[0] and n[1] > n[2]


def test_hardness_bonus_shifts_rollouts_to_hard_prompts() -> None:
    p = np.array([0.2, 0.8])
    plain = solve(p, 20, n_min=2, n_max=18)
    assert plain[0] == plain[1]  # p(1-p) is symmetric
    bonus = solve(p, 20, n_min=2, n_max=18, hardness_bonus=0.01)
    assert bonus[0] > bonus[1]


def test_weights_shift_rollouts() -> None:
    p = np.full(3, 0.5)
    n = solve(p, 30, n_min=2, n_max=28, weights=[1.0, 4.0, 0.0])
    assert n[1] > n[0] > n[2] == 2


def test_zero_and_one_probabilities_and_literal_drop_semantics() -> None:
    p = np.array([0.0, 1.0, 0.5, 0.4])
    n = solve(p, 24, n_min=2, n_max=16)
    assert n[0] == 2 and n[1] == 2 and n[2] + n[3] == 20  # constant prompts: no variance to cut
    # With drops and no bonus the literal program parks the budget on zero-cost constant prompts and drops the
    # informative ones (cost 0 < their variance): why the vip strategy solves in two stages instead.
    d = solve(p, 24, n_min=2, n_max=16, allow_drop=True)
    assert objective(p, d) == 0.0 and d[2] == 0 and d[3] == 0


def test_objective_matches_formula() -> None:
    p = np.array([0.2, 0.0, 0.9])
    n = np.array([4, 0, 9])
    expect = 0.16 * 3 / 16 + 0.09 * 8 / 81 + 1e-3 * (np.log(0.2) * 4 + np.log(0.9) * 9)
    assert objective(p, n, hardness_bonus=1e-3) == pytest.approx(expect, rel=1e-14)
    assert objective(p, n, estimator="rloo") == pytest.approx(0.16 / 3 + 0.09 / 8, rel=1e-14)
    vals, w = domain(2, 6, True), np.array([1.0, 2.0, 0.5])
    np.testing.assert_allclose(
        cost_table(p, vals, "rloo", 1e-3, w), reference_table(p, vals, "rloo", 1e-3, w), rtol=1e-14
    )


def test_weighted_kth_selection() -> None:
    rng = np.random.default_rng(6)
    for values, weights in [
        (rng.normal(size=20000), rng.integers(0, 4, 20000)),
        (np.where(rng.random(20000) < 0.9, -0.5, rng.normal(size=20000)), rng.integers(1, 3, 20000)),
        (np.arange(20000.0), np.r_[np.zeros(19999, int), 5]),  # all mass on one value: the sample bracket misses
    ]:
        expanded = np.sort(np.repeat(values, weights))
        for k in (1, len(expanded) // 3, len(expanded)):
            assert _weighted_kth(values, weights, k) == expanded[k - 1]


# ------------------------------------------------------------------------------------------ errors and ranges
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": [0.5, 0.5], "budget": 3}, r"infeasible .* \[8, 64\].*nearest feasible: 8"),
        ({"p": [0.5, 0.5], "budget": 65}, r"infeasible.*nearest feasible: 64"),
        ({"p": [0.5, 0.5], "budget": 2, "allow_drop": True}, r"leaves holes\); nearest feasible: 0 or 4"),
        ({"p": [0.5, 0.5], "budget": 9, "allow_drop": True, "n_max": 4}, "nearest feasible: 8"),
        ({"p": [0.5, 0.5], "budget": 8.5}, "integer"),
        ({"p": [0.5, 0.5], "budget": -8}, ">= 0"),
        ({"p": [0.5, 0.5], "budget": True}, "integer"),
        ({"p": [0.5, 0.5], "budget": "8"}, "integer"),
        ({"p": [], "budget": 0}, "empty batch"),
        ({"p": [[0.5]], "budget": 4}, "1-D"),
        ({"p": [0.5, float("nan")], "budget": 8}, "NaN"),
        ({"p": [0.5, float("inf")], "budget": 8}, "NaN or inf"),
        ({"p": [0.5, 1.5], "budget": 8}, r"\[0, 1\]"),
        ({"p": [0.5], "budget": 8, "estimator": "grpo"}, "not monotone in n.*drgrpo"),
        ({"p": [0.5], "budget": 8, "estimator": "ppo"}, "unknown estimator"),
        ({"p": [0.5], "budget": 8, "n_min": 1}, "n_min must be >= 2"),
        ({"p": [0.5], "budget": 8, "n_min": 9, "n_max": 8}, r"n_min \(9\) must be <= n_max"),
        ({"p": [0.5], "budget": 8, "n_min": 2.5}, "n_min must be an integer"),
        ({"p": [0.5], "budget": 8, "n_max": 10**6}, "n_max .* supported"),
        ({"p": [0.5, 0.5], "budget": 8, "weights": [1.0]}, r"weights must have shape \(2,\)"),
        ({"p": [0.5, 0.5], "budget": 8, "weights": [1.0, -1.0]}, "weights must be finite and >= 0"),
        ({"p": [0.5, 0.5], "budget": 8, "hardness_bonus": float("nan")}, "hardness_bonus must be finite"),
        ({"p": [0.5, 0.5], "budget": 8, "hardness_bonus": "big"}, "hardness_bonus must be a real number"),
    ],
)
def test_errors(kwargs, match) -> None:
    kw = dict(kwargs)
    p = kw.pop("p")
    budget = kw.pop("budget")
    with pytest.raises(ValueError, match=match):
        solve(p, budget, **kw)


def test_objective_and_table_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        objective([0.5, 0.5], [4])
    with pytest.raises(ValueError, match="whole"):
        objective([0.5], [2.5])
    with pytest.raises(ValueError, match="n >= 2"):
        objective([0.5], [1], estimator="rloo")
    with pytest.raises(ValueError, match="not reachable"):
        minimize_separable(np.zeros((2, 2)), np.array([0, 4]), 6)
    with pytest.raises(ValueError, match="strictly increasing"):
        minimize_separable(np.zeros((2, 2)), np.array([4, 4]), 8)
    with pytest.raises(ValueError, match="finite"):
        minimize_separable(np.array([[0.0, np.nan]]), np.array([0, 1]), 1)
    with pytest.raises(ValueError, match="outside"):
        minimize_separable(np.zeros((2, 2)), np.array([0, 1]), 3)


def test_feasible_range_and_drop_budgets() -> None:
    assert feasible_range(3, 4, 8) == (12, 24)
    assert feasible_range(3, 4, 8, allow_drop=True) == (0, 24)
    assert solve([0.5, 0.5, 0.5], 0, allow_drop=True).tolist() == [0, 0, 0]
    assert sorted(solve([0.5, 0.3, 0.5], 5, n_min=5, n_max=6, allow_drop=True).tolist()) == [0, 0, 5]
    for budget in (1, 2, 3):  # always holes below n_min with drops
        with pytest.raises(ValueError, match="infeasible"):
            solve([0.5, 0.5], budget, allow_drop=True)


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
    assert relaxed <= exact + 1e-6  # the relaxation is a lower bound
    assert exact <= relaxed * 1.02  # and the integer optimum is close to it
    np.testing.assert_allclose(n, x.value, atol=1.5)
