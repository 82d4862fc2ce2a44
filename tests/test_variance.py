"""Variance models vs Monte Carlo, symmetry, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipalloc.variance import gradient_variance


def mc_sum_a2(p: float, n: int, estimator: str, reps: int, rng: np.random.Generator, eps: float = 1e-6) -> np.ndarray:
    """Per-group sum_j A_j^2 / n^2 for `reps` simulated groups."""
    r = rng.binomial(1, p, size=(reps, n)).astype(float)
    mean = r.mean(1, keepdims=True)
    if estimator == "drgrpo":
        a = r - mean
    elif estimator == "rloo":
        a = r - (r.sum(1, keepdims=True) - r) / (n - 1)
    else:
        a = (r - mean) / (r.std(1, ddof=1, keepdims=True) + eps)
    return (a**2).sum(1) / n**2


@pytest.mark.parametrize("estimator", ["drgrpo", "rloo", "grpo"])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("n", [2, 3, 8, 17])
def test_matches_monte_carlo(estimator, p, n) -> None:
    rng = np.random.default_rng(n * 100 + int(p * 100))
    x = mc_sum_a2(p, n, estimator, 200_000, rng)
    se = x.std() / np.sqrt(len(x))
    got = float(gradient_variance(p, n, estimator))
    assert abs(got - x.mean()) < 5 * se + 1e-12, (got, x.mean(), se)


@pytest.mark.parametrize(("p", "n"), [(0.3, 3), (0.1, 6), (0.5, 9)])
def test_grpo_with_large_eps_matches_monte_carlo(p, n) -> None:
    # eps = 0.5 makes the eps term matter: checks the exact binomial sum, not just its eps -> 0 limit
    rng = np.random.default_rng(n)
    x = mc_sum_a2(p, n, "grpo", 200_000, rng, eps=0.5)
    se = x.std() / np.sqrt(len(x))
    got = float(gradient_variance(p, n, "grpo", grpo_eps=0.5))
    assert abs(got - x.mean()) < 5 * se, (got, x.mean(), se)
    assert got < float(gradient_variance(p, n, "grpo", grpo_eps=0.0))


def test_broadcasting_matches_scalar_calls() -> None:
    p = np.array([0.0, 0.2, 0.5, 0.9])[:, None]
    n = np.array([0, 2, 5, 32])[None, :]
    for est in ("drgrpo", "rloo", "grpo"):
        table = gradient_variance(p, n, est)
        assert table.shape == (4, 4) and table.dtype == np.float64
        for i in range(4):
            for j in range(4):
                assert table[i, j] == float(gradient_variance(float(p[i, 0]), int(n[0, j]), est))
    with pytest.raises(ValueError, match="do not broadcast"):
        gradient_variance([0.1, 0.2], [2, 3, 4])


def test_grpo_eps_limit() -> None:
    p, n = 0.37, np.arange(2, 20)
    limit = (n - 1) / n**2 * (1 - p**n - (1 - p) ** n)
    np.testing.assert_allclose(gradient_variance(p, n, "grpo", grpo_eps=1e-9), limit, rtol=1e-7)
    with pytest.raises(ValueError, match="grpo_eps"):
        gradient_variance(p, n, "grpo", grpo_eps=-1.0)
    with pytest.raises(ValueError, match="grpo_eps"):
        gradient_variance(p, n, "grpo", grpo_eps=float("nan"))


def test_closed_forms() -> None:
    p = np.array([0.1, 0.5, 0.8])
    n = np.array([4, 8, 16])
    a = p * (1 - p)
    np.testing.assert_allclose(gradient_variance(p, n, "drgrpo"), a * (n - 1) / n**2)
    np.testing.assert_allclose(gradient_variance(p, n, "rloo"), a / (n - 1))
    limit = (n - 1) / n**2 * (1 - p**n - (1 - p) ** n)
    np.testing.assert_allclose(gradient_variance(p, n, "grpo", grpo_eps=0.0), limit, rtol=1e-12)
    assert np.all(gradient_variance(p, n, "grpo") < limit)  # eps > 0 only shrinks advantages


def test_edge_counts_and_probabilities() -> None:
    assert gradient_variance(0.5, 0, "rloo") == 0.0  # dropped prompt
    np.testing.assert_array_equal(gradient_variance(0.5, [0, 2], "rloo"), [0.0, 0.25])
    assert gradient_variance(0.5, 1, "drgrpo") == 0.0
    assert gradient_variance(0.5, 1, "grpo") == 0.0
    with pytest.raises(ValueError, match="n >= 2"):
        gradient_variance(0.5, 1, "rloo")
    for est in ("drgrpo", "rloo", "grpo"):
        np.testing.assert_array_equal(gradient_variance([0.0, 1.0], [8, 8], est), [0.0, 0.0])


def test_grpo_not_monotone_in_n() -> None:
    v = gradient_variance(0.05, np.arange(2, 40), "grpo")
    assert np.argmax(v) > 0  # grows before it falls: why it is no allocation target


@pytest.mark.parametrize(
    ("p", "n", "est", "match"),
    [
        (float("nan"), 4, "drgrpo", "NaN"),
        (1.2, 4, "drgrpo", r"\[0, 1\]"),
        (0.5, 2.5, "drgrpo", "whole"),
        (0.5, -1, "drgrpo", ">= 0"),
        (0.5, 4, "ppo", "unknown estimator"),
    ],
)
def test_bad_input(p, n, est, match) -> None:
    with pytest.raises(ValueError, match=match):
        gradient_variance(p, n, est)


@settings(max_examples=200, deadline=None)
@given(
    p=st.floats(0, 1),
    n=st.integers(2, 64),
    est=st.sampled_from(["drgrpo", "rloo", "grpo"]),
)
def test_properties(p, n, est) -> None:
    v = float(gradient_variance(p, n, est))
    assert v >= 0 and np.isfinite(v)
    assert v == pytest.approx(float(gradient_variance(1 - p, n, est)), rel=1e-9, abs=1e-15)  # symmetric in p <-> 1-p
    if est != "grpo":
        assert float(gradient_variance(p, n + 1, est)) <= v + 1e-15  # more rollouts never hurt
