"""dynamo and hora (issue 14 item 3): their rules, the AllocationContext the Allocator fills, exactness, fallbacks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vipalloc.allocator import Allocator
from vipalloc.history import RolloutHistory
from vipalloc.strategies import AllocationContext, get_strategy
from vipalloc.strategies.peers import beta_from_moments, p_at_least_one


def grid(m: int, n_min: int, n_max: int, budget: int) -> np.ndarray:
    g = np.array(list(itertools.product(range(n_min, n_max + 1), repeat=m)))
    return g[g.sum(axis=1) == budget]


def test_context_from_history_group_sigma() -> None:
    h = RolloutHistory()
    h.extend(0, ["a", "b", "c"], [np.array([1, 0, 0, 1.0]), np.ones(3), np.array([1.0])])
    h.extend(1, ["a", "b"], [np.array([1, 0.0]), np.array([0, 0, 1, 1, 1, 1.0])])
    ctx = AllocationContext.from_history(["c", "a", "new", "b"], None, h.prompt_ids, h.rows())
    # a: groups (2 of 4) -> 2*2/(4*3) = 1/3 and (1 of 2) -> 1/2; b: 0 and 4*2/(6*5); c: a group of 1 only
    np.testing.assert_allclose(ctx.group_sigma[[1, 3]], [(1 / 3 + 1 / 2) / 2, (0 + 8 / 30) / 2])
    assert np.isnan(ctx.group_sigma[0]) and np.isnan(ctx.group_sigma[2])
    assert ctx.successes.tolist() == [1, 3, 0, 7] and ctx.trials.tolist() == [1, 6, 0, 9]
    assert ctx.take(np.array([3, 0])).trials.tolist() == [9, 1]


def test_dynamo_is_proportional_to_sigma() -> None:
    sigma = np.array([0.25, 0.05, 0.1, np.nan, 0.0])
    ctx = AllocationContext(group_sigma=sigma)
    counts = get_strategy("dynamo").allocate(np.full(5, 0.5), 60, 2, 32, context=ctx)
    w = np.array([0.25, 0.05, 0.1, 0.25, 0.0025])  # unseen -> 0.25, never varied -> the floor 0.0025
    assert counts.sum() == 60 and counts[4] == 2  # the floor's share is below n_min: clipped up
    target = (60 - 2) * w[:4] / w[:4].sum()  # water-filled: the rest is proportional to sigma
    assert np.all(np.abs(counts[:4] - target) < 1)
    # no context: every prompt unseen, the uniform plan within one
    plain = get_strategy("dynamo").allocate(np.array([0.1, 0.9, 0.5]), 20, 2, 16)
    assert plain.max() - plain.min() <= 1 and plain.sum() == 20
    with pytest.raises(ValueError, match="sigma_floor"):
        get_strategy("dynamo", sigma_floor=0.0)


def test_beta_moment_matching() -> None:
    mean, std = np.array([0.3, 0.5, 0.9, 0.5, 0.2]), np.array([0.1, 0.0, 0.05, 0.6, 0.01])
    a, b = beta_from_moments(mean, std)
    nu = a + b
    ok = np.isfinite(nu) & (nu > 2)
    a, b, nu = a[ok], b[ok], nu[ok]
    np.testing.assert_allclose(a / nu, mean[ok])
    np.testing.assert_allclose(np.sqrt(a * b / (nu**2 * (nu + 1))), std[ok])
    full = np.add(*beta_from_moments(mean, std))
    assert np.isinf(full[1])  # std 0: a point mass
    assert full[3] == 2.0  # std beyond any Beta with that mean: the floor (the uniform prior's 2 pseudo-rollouts)


def test_p_at_least_one_matches_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    for alpha, beta in ((0.5, 2.0), (3.0, 1.0), (1.0, 1.0), (20.0, 60.0)):
        p = rng.beta(alpha, beta, 400_000)
        for n in (1, 4, 16):
            mc = 1 - np.mean((1 - p) ** n)
            assert p_at_least_one(alpha, beta, n) == pytest.approx(mc, abs=4e-3)
    assert p_at_least_one(1.0, 1.0, 3) == pytest.approx(3 / 4)  # uniform prior: 1 - 1/(n+1)


def test_hora_exact_vs_brute_force() -> None:
    rng = np.random.default_rng(1)
    strategy = get_strategy("hora")
    for _ in range(60):
        m = int(rng.integers(1, 5))
        p = rng.uniform(0, 1, m)
        std = rng.uniform(0, 0.4, m) * (rng.random(m) < 0.7)
        n_min, n_max = int(rng.integers(2, 4)), int(rng.integers(4, 9))
        budget = int(rng.integers(m * n_min, m * n_max + 1))
        ctx = AllocationContext(p_std=std)
        got = strategy.allocate(p, budget, n_min, n_max, context=ctx)
        vals = np.arange(n_min, n_max + 1)
        table = strategy.value(p, ctx, vals)
        scores = table[np.arange(m)[None, :], grid(m, n_min, n_max, budget) - n_min].sum(axis=1)
        assert got.sum() == budget and table[np.arange(m), got - n_min].sum() >= scores.max() - 1e-12


def test_hora_rule_and_posteriors() -> None:
    p = np.array([0.02, 0.3, 0.95, 1.0])
    c = get_strategy("hora").allocate(p, 40, 2, 32)  # point masses: pass@n gains most on hard prompts
    assert c[0] == c.max() and c[3] == 2 and c[2] == 2
    hist = AllocationContext(successes=np.array([0, 3, 9, 10]), trials=np.array([10, 10, 10, 10]))
    h = get_strategy("hora", posterior="history")
    ch = h.allocate(p, 40, 2, 32, context=hist)
    alpha, beta = h.posterior_params(p, hist)
    assert alpha.tolist() == [1, 4, 10, 11] and beta.tolist() == [11, 8, 2, 1]  # Beta(1 + s, 1 + f)
    assert ch.sum() == 40 and ch[0] == ch.max()
    with pytest.raises(ValueError, match="needs context"):
        h.allocate(p, 40, 2, 32)
    with pytest.raises(ValueError, match="posterior"):
        get_strategy("hora", posterior="x")


@pytest.mark.parametrize("name", ["dynamo", "hora", "vip_authors"])
def test_allocator_fills_the_context(name, tmp_path) -> None:
    rng = np.random.default_rng(2)
    ids = [f"q{i}" for i in range(12)]
    p_true = np.r_[np.zeros(3), np.ones(3), np.full(6, 0.5)]
    alloc = Allocator(strategy=name, predictor="beta", n_min=2, n_max=16)
    for step in range(3):
        plan = alloc.plan(ids, budget=96, step=step)
        alloc.observe(ids, [(rng.random(n) < q).astype(float) for n, q in zip(plan.counts, p_true)], step=step)
    alloc.save(tmp_path / "state.json")
    plan = alloc.plan(ids, budget=96, step=3)
    assert plan.counts.sum() == 96
    if name == "dynamo":  # constant groups (p = 0 or 1) get the floor's share, the varied ones the rest
        assert plan.counts[:6].max() <= 2 < plan.counts[6:].min()
    # saved and reloaded, the allocator plans the same (the context is rebuilt from the saved history)
    assert Allocator.load(tmp_path / "state.json").plan(ids, budget=96, step=3).counts.tolist() == plan.counts.tolist()
