"""League statistics: rollouts-to-target crossings and the paired seed bootstrap, on curves with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vipalloc.reporting import crossing, league, mean_curve


def test_crossing_interpolates_between_points() -> None:
    x = np.array([0.0, 100.0, 200.0, 300.0])
    y = np.array([0.1, 0.2, 0.4, 0.5])
    assert crossing(x, y, 0.3) == pytest.approx(150.0)
    assert crossing(x, y, 0.05) == 0.0
    assert crossing(x, y, 0.5) == pytest.approx(300.0)
    assert math.isinf(crossing(x, y, 0.6))


def test_mean_curve_holds_ends() -> None:
    grid = np.array([0.0, 50.0, 100.0, 150.0])
    c1 = (np.array([0.0, 100.0]), np.array([0.0, 1.0]))
    c2 = (np.array([0.0, 150.0]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(mean_curve([c1, c2], grid), [0.5, 0.75, 1.0, 1.0])


def _seeded_curves(speed: float, seeds: int, noise: float, rng: np.random.Generator) -> list:
    x = np.linspace(0.0, 10_000.0, 21)
    # a saturating learning curve; `speed` rescales rollouts: speed 2 learns twice as fast per rollout
    out = []
    for _ in range(seeds):
        y = 0.2 + 0.3 * (1.0 - np.exp(-speed * x / 4000.0)) + rng.normal(0.0, noise, x.size)
        out.append((x, y))
    return out


def test_league_recovers_known_speedup() -> None:
    rng = np.random.default_rng(1)
    curves = {
        "uniform": _seeded_curves(1.0, 8, 0.0, rng),
        "fast": _seeded_curves(2.0, 8, 0.0, rng),
        "never": [(x, np.full_like(y, 0.1)) for x, y in _seeded_curves(1.0, 8, 0.0, rng)],
    }
    target, rows = league(curves, n_boot=200)
    by = {r.strategy: r for r in rows}
    assert by["uniform"].ratio == pytest.approx(1.0)
    assert by["fast"].ratio == pytest.approx(0.5, abs=0.01)  # twice as fast per rollout = half the rollouts
    assert math.isinf(by["never"].ratio) and by["never"].frac_reached == 0.0
    assert 0.2 < target < 0.5


def test_league_interval_covers_truth_under_noise() -> None:
    rng = np.random.default_rng(7)
    curves = {"uniform": _seeded_curves(1.0, 10, 0.01, rng), "fast": _seeded_curves(1.5, 10, 0.01, rng)}
    _, rows = league(curves, n_boot=400, seed=3)
    fast = next(r for r in rows if r.strategy == "fast")
    assert fast.ratio_lo < 1 / 1.5 < fast.ratio_hi
    assert fast.ratio_hi < 1.0  # resolved: faster than uniform


def test_league_rejects_unpaired_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="same number"):
        league({"uniform": _seeded_curves(1, 3, 0, rng), "vip": _seeded_curves(1, 2, 0, rng)})
    with pytest.raises(ValueError, match="baseline"):
        league({"vip": _seeded_curves(1, 2, 0, rng)})
