"""Statistics and report helpers shared by the trainer's report and the benchmarks: mean +- 95% interval, paired
verdicts, markdown tables, the provenance header, PNG plots (matplotlib Agg).

It sits below both ``vipalloc.training`` and ``vipalloc.bench`` and imports neither (nor the engine).
Intervals are Student-t 95% confidence intervals of the mean over seeds (``t_{0.975, n-1} * sd / sqrt(n)``);
a single value has no interval (shown as ``+- nan``-free ``x (n=1)``).
"""

from __future__ import annotations

import math
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Curve",
    "LeagueRow",
    "crossing",
    "league",
    "mean_curve",
    "fmt_ci",
    "git_commit",
    "md_table",
    "mean_ci",
    "paired_verdict",
    "plot_bands",
    "plot_lines",
    "provenance",
]


def mean_ci(values: Sequence[float] | np.ndarray) -> tuple[float, float, int]:
    """``(mean, half-width of the 95% t-interval, n)`` over the finite entries; ``(nan, nan, 0)`` when none."""
    a = np.asarray(values, np.float64).ravel()
    a = a[np.isfinite(a)]
    n = int(a.size)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = float(a.mean())
    if n == 1:
        return m, float("nan"), 1
    from scipy import stats

    hw = float(stats.t.ppf(0.975, n - 1) * a.std(ddof=1) / math.sqrt(n))
    return m, hw, n


def fmt_ci(values: Sequence[float] | np.ndarray, digits: int = 3, scale: float = 1.0, signed: bool = False) -> str:
    """``"mean ± hw"`` of ``values * scale`` (``"—"`` when there is no finite value; ``(n=1)`` without interval)."""
    m, hw, n = mean_ci(np.asarray(values, np.float64) * scale)
    if n == 0:
        return "—"
    sign = "+" if signed else ""
    if n == 1:
        return f"{m:{sign}.{digits}f} (n=1)"
    return f"{m:{sign}.{digits}f} ± {hw:.{digits}f}"


def paired_verdict(diffs: Sequence[float] | np.ndarray) -> str:
    """``mean ± 95% t-interval (k/n seeds ahead; verdict)`` of per-seed paired differences (same seed, two arms);
    the verdict says whether 0 lies outside the interval (``ahead``/``behind, resolved``) or not (``within
    noise``). One seed has no interval."""
    arr = np.asarray(diffs, dtype=np.float64)
    mean, half, n = mean_ci(arr)
    ahead = f"{int((arr > 0).sum())}/{arr.size} seeds ahead"
    if n < 2:
        return f"{mean:+.4f} ({ahead}; one seed: no interval)"
    verdict = "ahead, resolved" if mean - half > 0 else ("behind, resolved" if mean + half < 0 else "within noise")
    return f"{mean:+.4f} ± {half:.4f} ({ahead}; {verdict})"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table. ``align``: one char per column (``l``/``r``), default: first left, rest right."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError("every row must have one cell per header")
    al = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---:" if a == "r" else ":---" for a in al]
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines) + "\n"


def git_commit(root: str | Path | None = None) -> str:
    """Short commit hash of the working tree (``+dirty`` if tracked files differ), or ``unknown``."""
    cwd = str(root) if root is not None else str(Path(__file__).resolve().parents[2])  # the repository root
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(command: str, extra: Mapping[str, Any] | None = None, commit: str | None = None) -> str:
    """Markdown lines naming the command, commit (pass the one read when the run started: the tree may change
    while it runs), date and machine that produced a report."""
    import os

    lines = [
        f"- command: `{command}`",
        f"- commit: `{commit or git_commit()}` (at the start of the run; `+dirty`: uncommitted changes in the tree)",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, Python {sys.version.split()[0]}, "
        f"numpy {np.__version__}",
    ]
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bands(
    curves: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    grid: np.ndarray | None = None,
    hline: float | None = None,
) -> Path:
    """One line per label: the mean over its runs of ``y(x)`` (each run linearly interpolated onto ``grid``,
    default: the union range) with a shaded 95% t-interval band. Writes a PNG and returns its path."""
    from scipy import stats

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for label, runs in curves.items():
        if not runs:
            continue
        lo = max(float(np.min(x)) for x, _ in runs)
        hi = min(float(np.max(x)) for x, _ in runs)
        g = grid if grid is not None else np.linspace(lo, hi, 100)
        g = g[(g >= lo) & (g <= hi)]
        if g.size == 0:
            continue
        ys = np.array([np.interp(g, np.asarray(x, float), np.asarray(y, float)) for x, y in runs])
        m = ys.mean(axis=0)
        (line,) = ax.plot(g, m, label=f"{label} (n={len(runs)})", lw=1.6)
        if len(runs) > 1:
            hw = stats.t.ppf(0.975, len(runs) - 1) * ys.std(axis=0, ddof=1) / math.sqrt(len(runs))
            ax.fill_between(g, m - hw, m + hw, color=line.get_color(), alpha=0.15, lw=0)
    if hline is not None:
        ax.axhline(hline, color="grey", ls=":", lw=1)
    return _save(plt, fig, ax, path, xlabel, ylabel, title)


def _save(plt: Any, fig: Any, ax: Any, path: str | Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, grid and legend the axes, write the figure as a PNG (creating the folder) and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_lines(
    series: Mapping[str, tuple[Sequence[float], Sequence[Sequence[float]]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    logy: bool = False,
    hline: float | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Path:
    """One line per label through ``(x_k, mean of values_k)`` with 95% t-interval error bars; ``values_k`` are the
    per-seed values at ``x_k``. Writes a PNG and returns its path."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for label, (xs, vals) in series.items():
        stats_ = [mean_ci(transform(np.asarray(v)) if transform else v) for v in vals]
        m = np.array([s[0] for s in stats_])
        hw = np.nan_to_num(np.array([s[1] for s in stats_]))
        ax.errorbar(np.asarray(xs, float), m, yerr=hw, label=label, marker="o", ms=3, capsize=3, lw=1.4)
    if hline is not None:
        ax.axhline(hline, color="grey", ls=":", lw=1)
    if logx:
        ax.set_xscale("symlog" if any(min(x) <= 0 for x, _ in series.values()) else "log")
    if logy:
        ax.set_yscale("log")
    return _save(plt, fig, ax, path, xlabel, ylabel, title)


# ================================================================================= league statistics
# League statistics for real-training benchmarks: rollouts needed to reach a target, with bootstrap intervals.
#
# The primary figure of ``vipalloc bench train`` and of the demo is the *rollouts-to-target ratio*: how many
# cumulative rollouts a strategy needs before its seed-averaged evaluation curve reaches the baseline's (uniform's)
# final value, divided by what the baseline itself needs. Below 1 = learns faster per rollout. Single evaluation
# points are noisy (a few hundredths), so
#
# * the target is the baseline's mean over seeds of its final evaluation(s) (``final_points`` last points
#   averaged per seed, to damp the noise of one evaluation),
# * each strategy's curve is the mean over seeds on a common rollout grid (linear interpolation between
#   evaluations), and the crossing is interpolated between grid points instead of snapped to the next evaluation,
# * the 95% interval is a percentile bootstrap over seeds, *paired*: each resample draws seed indices once and uses
#   them for every strategy, because all strategies share the seed's warm-up model, prompt pool and eval set.
#
# A strategy whose mean curve never reaches the target within its run is *censored*: its ratio is reported as
# ``> budget / baseline rollouts`` (``inf`` in the arrays), never as a made-up number.

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


def _target(curves: Sequence[Curve], final_points: int, level: float = 1.0) -> float:
    final = float(np.mean([np.mean(y[-final_points:]) for _, y in curves]))
    if level == 1.0:  # the final value itself (not start + 1.0 * gain, which may differ in the last bit)
        return final
    start = float(np.mean([y[0] for _, y in curves]))
    return start + level * (final - start)


def league(
    curves: Mapping[str, Sequence[Curve]],
    *,
    baseline: str = "uniform",
    final_points: int = 2,
    grid_points: int = 401,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 1.0,
) -> tuple[float, list[LeagueRow]]:
    """Rollouts-to-target ratio of every strategy against ``baseline``, with a paired seed bootstrap.

    ``curves[strategy][s]`` is seed ``s``'s evaluation curve; every strategy must have the same number of seeds in
    the same seed order (pairing). Returns ``(target, rows)``: the target value (baseline's mean final metric) and
    one :class:`LeagueRow` per strategy, baseline included (its ratio is 1 by construction).

    ``level``: the target as a share of the baseline's gain, ``start + level * (final - start)`` with ``start``
    the baseline's seed-mean first point (1.0 = its final value; 0.5 = half its gain). The x axis may be any
    cumulative cost (rollouts, tokens, seconds); "rollouts" below is that cost.
    """
    if baseline not in curves:
        raise ValueError(f"baseline {baseline!r} has no runs; strategies with runs: {sorted(curves)}")
    n_seeds = {k: len(v) for k, v in curves.items()}
    if len(set(n_seeds.values())) != 1 or min(n_seeds.values()) < 1:
        raise ValueError(f"every strategy needs the same number (>= 1) of seeds to pair them, got {n_seeds}")
    if final_points < 1:
        raise ValueError(f"final_points must be >= 1, got {final_points}")
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must lie in (0, 1], got {level}")
    s = n_seeds[baseline]
    end = max(float(np.max(x)) for runs in curves.values() for x, _ in runs)
    grid = np.linspace(0.0, end, grid_points)

    def rollouts(idx: np.ndarray) -> tuple[float, dict[str, float]]:
        tgt = _target([curves[baseline][i] for i in idx], final_points, level)
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
