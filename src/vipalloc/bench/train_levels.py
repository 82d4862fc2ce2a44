"""``bench train``'s cost figures: rollouts, generated tokens and wall-clock to reach the baseline's mean@k, at
several target levels, paired by seed (issue 20).

A single "cost to reach the baseline's *final* value" depends on where the baseline's curve goes flat: a strategy
that learns at the same speed but plateaus a little higher gets a small ratio at 100% of the gain and ~1 at 50%.
So the ratio is reported at several targets, ``start + level x (final - start)`` of the baseline's seed-mean curve
(:func:`vipalloc.reporting.league` with ``level``), on three axes: cumulative rollouts, cumulative generated tokens
(``cum_tokens``) and cumulative training wall-clock (``cum_seconds``, evaluations excluded), each with a paired
percentile bootstrap over seeds; beside them the area under the mean@k-vs-tokens curve and the final gap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vipalloc.reporting import LeagueRow, fmt_ci, league, md_table

__all__ = ["AXES", "LEVELS", "cost_table", "levels_lines"]

#: target levels, as shares of the baseline's gain from its first evaluation to its final mean@k
LEVELS: tuple[float, ...] = (0.5, 0.75, 0.9, 1.0)
#: (metrics key, name in the report, display scale, unit after scaling)
AXES: tuple[tuple[str, str, float, str], ...] = (
    ("cum_rollouts", "rollouts", 1e-3, "k"),
    ("cum_tokens", "tokens", 1e-3, "k"),
    ("cum_seconds", "wall-clock", 1.0, "s"),
)


def _curve(metrics: list[dict[str, Any]], axis: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(m[axis], m["eval_acc"]) for m in metrics if "eval_acc" in m]
    arr = np.asarray(pts, np.float64)
    return arr[:, 0], arr[:, 1]


def _has_axis(runs: dict[str, list[dict[str, Any]]], axis: str) -> bool:
    return all(axis in m for rs in runs.values() for r in rs for m in r["metrics"] if "eval_acc" in m)


def _cell(row: LeagueRow, base: LeagueRow) -> str:
    """``ratio [lo, hi]`` for one row; censored (never reached) and undefined baselines said in words."""
    if not base.rollouts > 0:
        return "undefined (baseline did not improve)"
    if not np.isfinite(row.ratio):
        return "not reached"
    hi = "inf" if not np.isfinite(row.ratio_hi) else f"{row.ratio_hi:.2f}"
    return f"**{row.ratio:.2f}** [{row.ratio_lo:.2f}, {hi}]"


def cost_table(
    runs: dict[str, list[dict[str, Any]]], baseline: str = "uniform", n_boot: int = 2000
) -> dict[str, dict[float, tuple[float, list[LeagueRow]]]]:
    """``{axis key: {level: (target, rows)}}`` for every axis the runs logged and every level of :data:`LEVELS`.

    ``runs[name]`` is a list of ``{"seed", "metrics"}`` runs; the strategies that ran every seed of ``baseline``
    are paired by seed. Empty when the baseline did not run.
    """
    if baseline not in runs or not runs[baseline]:
        return {}
    seeds = sorted(r["seed"] for r in runs[baseline])
    by_seed = {s: {r["seed"]: r for r in rs} for s, rs in runs.items()}
    names = [s for s in runs if all(sd in by_seed[s] for sd in seeds)]
    out: dict[str, dict[float, tuple[float, list[LeagueRow]]]] = {}
    for axis, _, _, _ in AXES:
        if not _has_axis({s: runs[s] for s in names}, axis):
            continue
        curves = {s: [_curve(by_seed[s][sd]["metrics"], axis) for sd in seeds] for s in names}
        out[axis] = {lv: league(curves, baseline=baseline, n_boot=n_boot, level=lv) for lv in LEVELS}
    return out


def levels_lines(
    res: dict[str, Any], out: Path | None = None, baseline: str = "uniform", n_boot: int = 2000
) -> list[str]:
    """Markdown: cost to reach the baseline's final mean@k on each axis, the ratio at each target level (a table,
    and ``train_levels.png`` in ``out`` when given), the AUC over tokens and the final gap, paired by seed."""
    runs = res["runs"]
    table = cost_table(runs, baseline, n_boot)
    if not table:
        return []
    seeds = sorted(r["seed"] for r in runs[baseline])
    by_seed = {s: {r["seed"]: r for r in rs} for s, rs in runs.items()}
    names = [row.strategy for row in next(iter(table.values()))[1.0][1]]
    axes = [a for a in AXES if a[0] in table]
    lines = [
        f"## Cost to reach {baseline}'s final mean@k: rollouts, tokens, wall-clock ({len(seeds)} seeds, paired)",
        "",
        f"Each cell: the cost at which the seed-mean curve first reaches {baseline}'s final mean@k (its last two "
        "evaluations), then the ratio to the baseline's own with a paired percentile bootstrap 95% interval "
        "(2,000 resamples over seeds). Tokens: every generated token, end-of-sequence included. Wall-clock: "
        "cumulative training seconds (evaluations excluded), measured with several runs sharing the CPU cores, "
        "so it carries their contention.",
        "",
    ]
    base_rows = {a[0]: {r.strategy: r for r in table[a[0]][1.0][1]} for a in axes}
    headers = (
        ["strategy"]
        + [f"{label} ({unit})" for _, label, _, unit in axes]
        + [f"{label} ratio" for _, label, _, _ in axes]
    )
    rows = []
    for name in names:
        cells = [name]
        for axis, _, scale, _ in axes:
            r = base_rows[axis][name]
            cells.append("—" if not np.isfinite(r.rollouts) else f"{r.rollouts * scale:,.1f}")
        for axis, _, _, _ in axes:
            r, b = base_rows[axis][name], base_rows[axis][baseline]
            cells.append("1 (baseline)" if name == baseline else _cell(r, b))
        rows.append(cells)
    lines += [md_table(headers, rows), ""]
    # the ratio as a function of the target level
    lines += [
        f"### Ratio vs {baseline} at several target levels (share of {baseline}'s gain)",
        "",
        f"Target = {baseline}'s first evaluation + level x (its final mean@k - first evaluation); the 100% column "
        "is the table above. A ratio that holds across levels is a speed-up; one that only appears near 100% is a "
        f"higher plateau ({baseline} flattening before the target), not faster learning.",
        "",
    ]
    lv_headers = ["axis", "strategy"] + [f"{lv:.0%} (target)" for lv in LEVELS]
    lv_rows = []
    for axis, label, _, _ in axes:
        for name in names:
            if name == baseline:
                continue
            cells = [label, name]
            for lv in LEVELS:
                tgt, rs = table[axis][lv]
                by = {r.strategy: r for r in rs}
                cells.append(f"{_cell(by[name], by[baseline])} ({tgt:.3f})")
            lv_rows.append(cells)
    lines += [md_table(lv_headers, lv_rows), ""]
    if out is not None:
        series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        for axis, label, _, _ in axes:
            for name in names:
                if name == baseline:
                    continue
                rs = [{r.strategy: r for r in table[axis][lv][1]}[name] for lv in LEVELS]
                x = np.asarray(LEVELS) * 100
                series[f"{name}, {label}"] = (
                    x,
                    np.array([r.ratio for r in rs]),
                    np.array([r.ratio_lo for r in rs]),
                    np.array([r.ratio_hi for r in rs]),
                )
        if series and _plot_levels(series, Path(out) / "train_levels.png", baseline):
            lines += [f"![ratio vs {baseline} by target level](train_levels.png)", ""]
    # beside the ratios: the AUC over tokens and the final gap, paired by seed
    extra = []
    tok = "cum_tokens" in table
    if tok:
        end = min(_curve(by_seed[s][sd]["metrics"], "cum_tokens")[0][-1] for s in names for sd in seeds)
        grid = np.linspace(0.0, end, 201)[1:]

        def auc(r: dict[str, Any]) -> float:
            x, y = _curve(r["metrics"], "cum_tokens")
            return float(np.mean(np.interp(grid, x, y)))

    for name in names:
        finals = [_curve(by_seed[name][sd]["metrics"], "cum_rollouts")[1][-1] for sd in seeds]
        base_f = [_curve(by_seed[baseline][sd]["metrics"], "cum_rollouts")[1][-1] for sd in seeds]
        toks = [_curve(by_seed[name][sd]["metrics"], "cum_tokens")[0][-1] for sd in seeds] if tok else []
        cells = [name, fmt_ci(finals)]
        if name == baseline:
            cells += ["—"]
        else:
            d = [a - b for a, b in zip(finals, base_f)]
            cells += [f"{fmt_ci(d, signed=True)} ({sum(x > 0 for x in d)}/{len(d)})"]
        if tok:
            cells += [fmt_ci(toks, digits=1, scale=1e-3)]
            a = [auc(by_seed[name][sd]) for sd in seeds]
            cells += [fmt_ci(a)]
            if name == baseline:
                cells += ["—"]
            else:
                d = [x - auc(by_seed[baseline][sd]) for x, sd in zip(a, seeds)]
                cells += [f"{fmt_ci(d, signed=True)} ({sum(x > 0 for x in d)}/{len(d)})"]
        extra.append(cells)
    ex_headers = ["strategy", "final mean@k", f"final gap vs {baseline} (paired)"]
    if tok:
        ex_headers += ["tokens spent (k)", "AUC over tokens", f"Δ AUC vs {baseline} (paired)"]
    lines += [
        "### Area under the curve over tokens, and the final gap",
        "",
        "Mean ± 95% t-interval over seeds; paired columns: the strategy minus the baseline on the same seed, "
        "(seeds ahead / seeds). *AUC over tokens*: mean@k averaged over cumulative tokens from 0 to the fewest "
        "tokens any run spent, so every run is compared over the same token range.",
        "",
        md_table(ex_headers, extra),
        "",
    ]
    return lines


def _plot_levels(
    series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], path: Path, baseline: str
) -> bool:
    """Ratio vs target level with its bootstrap interval (``(levels %, ratio, lo, hi)`` per line; an infinite
    bound is drawn at the top of the axes). Writes a PNG; False when nothing was finite to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [v for _, r, lo, hi in series.values() for v in (*r, *lo, *hi) if np.isfinite(v)]
    if not finite:
        return False
    top = max(finite) * 1.1
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for i, (label, (x, r, lo, hi)) in enumerate(series.items()):
        xs = x + (i - (len(series) - 1) / 2) * 0.6  # small offsets so the interval bars do not overlap
        rr, ll, hh = (np.where(np.isfinite(v), v, top) for v in (r, lo, hi))
        # a percentile interval need not contain the point ratio (nor a finite point an infinite bound): clip at 0
        err = [np.clip(rr - ll, 0, None), np.clip(hh - rr, 0, None)]
        ax.errorbar(xs, rr, yerr=err, label=label, marker="o", ms=4, capsize=3, lw=1.4)
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_xlabel(f"target: % of {baseline}'s gain (first evaluation to final mean@k)")
    ax.set_ylabel(f"cost ratio vs {baseline} (below 1 = cheaper)")
    ax.set_title("cost to reach the target: ratio, 95% paired bootstrap interval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True
