"""League statistics for real-training benchmarks: rollouts needed to reach a target, with bootstrap intervals.

The primary figure of ``vipalloc bench train`` and of the demo is the *rollouts-to-target ratio*: how many
cumulative rollouts a strategy needs before its seed-averaged evaluation curve reaches the baseline's (uniform's)
final value, divided by what the baseline itself needs. Below 1 = learns faster per rollout. Single evaluation
points are noisy (a few hundredths), so

* the target is the baseline's mean over seeds of its final evaluation(s) (``final_points`` last points
  averaged per seed, to damp the noise of one evaluation),
* each strategy's curve is the mean over seeds on a common rollout grid (linear interpolation between
  evaluations), and the crossing is interpolated between grid points instead of snapped to the next evaluation,
* the 95% interval is a percentile bootstrap over seeds, *paired*: each resample draws seed indices once and uses
  them for every strategy, because all strategies share the seed's warm-up model, prompt pool and eval set.

A strategy whose mean curve never reaches the target within its run is *censored*: its ratio is reported as
``> budget / baseline rollouts`` (``inf`` in the arrays), never as a made-up number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Curve", "LeagueRow", "crossing", "league", "mean_curve"]

Curve = tuple[np.ndarray, np.ndarray]  # (cumulative rollouts (E,), metric value (E,)), rollouts increasing


def crossing(x: np.ndarray, y: np.ndarray, target: float) -> float:
    """First ``x`` at which the piecewise-linear curve ``(x, y)`` reaches ``target``; ``inf`` if it never does.

    ``x`` increasing, shape ``(E,)``. If the first point is already at or above the target, that ``x`` is returned.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    above = np.flatnonzero(y >= target)
    if above.size == 0:
        return float("inf")
    j = int(above[0])
    if j == 0:
        return float(x[0])
    x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
    return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))  # y0 < target <= y1, so y1 > y0


def mean_curve(curves: Sequence[Curve], grid: np.ndarray) -> np.ndarray:
    """Mean over runs of each curve interpolated on ``grid`` (shape ``(G,)``); points past a run's last
    evaluation take that run's last value (``np.interp`` holds the ends)."""
    return np.mean([np.interp(grid, x, y) for x, y in curves], axis=0)


@dataclass(frozen=True)
class LeagueRow:
    """One strategy's rollouts-to-target figures. Rollouts are cumulative rollouts (pilot rollouts included)."""

    strategy: str
    rollouts: float  # rollouts at which the seed-mean curve reaches the target (inf = not within the run)
    ratio: float  # rollouts / baseline's rollouts (inf = censored)
    ratio_lo: float  # 2.5% bootstrap percentile
    ratio_hi: float  # 97.5% bootstrap percentile (inf when some resamples never reach the target)
    frac_reached: float  # share of bootstrap resamples in which the target was reached


def _target(curves: Sequence[Curve], final_points: int) -> float:
    return float(np.mean([np.mean(y[-final_points:]) for _, y in curves]))


def league(
    curves: Mapping[str, Sequence[Curve]],
    *,
    baseline: str = "uniform",
    final_points: int = 2,
    grid_points: int = 401,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, list[LeagueRow]]:
    """Rollouts-to-target ratio of every strategy against ``baseline``, with a paired seed bootstrap.

    ``curves[strategy][s]`` is seed ``s``'s evaluation curve; every strategy must have the same number of seeds in
    the same seed order (pairing). Returns ``(target, rows)``: the target value (baseline's mean final metric) and
    one :class:`LeagueRow` per strategy, baseline included (its ratio is 1 by construction).
    """
    if baseline not in curves:
        raise ValueError(f"baseline {baseline!r} has no runs; strategies with runs: {sorted(curves)}")
    n_seeds = {k: len(v) for k, v in curves.items()}
    if len(set(n_seeds.values())) != 1 or min(n_seeds.values()) < 1:
        raise ValueError(f"every strategy needs the same number (>= 1) of seeds to pair them, got {n_seeds}")
    if final_points < 1:
        raise ValueError(f"final_points must be >= 1, got {final_points}")
    s = n_seeds[baseline]
    end = max(float(np.max(x)) for runs in curves.values() for x, _ in runs)
    grid = np.linspace(0.0, end, grid_points)

    def rollouts(idx: np.ndarray) -> tuple[float, dict[str, float]]:
        tgt = _target([curves[baseline][i] for i in idx], final_points)
        out = {}
        for name, runs in curves.items():
            sub = [runs[i] for i in idx]
            last = min(float(np.max(x)) for x, _ in sub)  # never extrapolate past the shortest run
            g = grid[grid <= last]
            out[name] = crossing(g, mean_curve(sub, g), tgt)
        return tgt, out

    target, point = rollouts(np.arange(s))
    rng = np.random.default_rng(seed)
    boot: dict[str, list[float]] = {k: [] for k in curves}
    for _ in range(n_boot):
        _, r = rollouts(rng.integers(0, s, size=s))
        base = r[baseline]
        for k, v in r.items():
            boot[k].append(v / base if np.isfinite(base) and base > 0 else float("nan"))
    rows = []
    base0 = point[baseline]
    for name in curves:
        b = np.asarray(boot[name], np.float64)
        b = b[~np.isnan(b)]
        # inverted_cdf never interpolates, so an unreached (inf) resample gives an honest inf bound, not NaN
        lo, hi = np.quantile(b, [0.025, 0.975], method="inverted_cdf") if b.size else (float("nan"), float("nan"))
        ratio = point[name] / base0 if np.isfinite(base0) and base0 > 0 else float("nan")
        rows.append(
            LeagueRow(
                strategy=name,
                rollouts=point[name],
                ratio=float(ratio),
                ratio_lo=float(lo),
                ratio_hi=float(hi),
                frac_reached=float(np.mean(np.isfinite(b))) if b.size else 0.0,
            )
        )
    return target, rows
