"""Figures and report of the equal-token league (``vipalloc bench tokens``): ``tokens.md``, ``tokens.json``, PNGs.

Every curve is a run's mean true success against its cumulative *generated* tokens, cut at its seed's token total
(the uniform row's) by linear interpolation, so the rows of a seed end at exactly the same tokens, and expressed as
a share of that total (seeds' totals differ by a few percent; on this axis every seed ends at 1, so seed-mean curves
never stop short of a seed's end).

* **Tokens to a target, as a ratio to uniform, at several target levels.** The target at level ``f`` is
  ``s_0 + f (s_final - s_0)``: ``s_0`` the mean success before training (the same for every row of a seed),
  ``s_final`` uniform's mean final success (its last point by default: ``final_points = 1``), so ``f = 1`` is
  "uniform's final success" and ``f = 0.5`` half of uniform's gain. As in :func:`vipalloc.reporting.league`: the
  curves are averaged over seeds on a common token grid, the crossing is interpolated, and the 95% interval is a
  percentile bootstrap over seeds, *paired* (one draw of seed indices for every row; the target is recomputed on
  each resample). A row whose mean curve never reaches the target is censored (``inf``).
* **AUC over tokens**: the success curve averaged over ``[0, total]`` tokens; **final gap**: final success minus
  uniform's, same seed. Both with paired t-intervals over seeds (:func:`vipalloc.reporting.fmt_ci`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vipalloc.bench.token_sim import TokenRun
from vipalloc.reporting import crossing, fmt_ci, git_commit, md_table, mean_curve, plot_bands, provenance

__all__ = ["LevelRow", "cut_curve", "level_ratios", "write_tokens_report"]

Curve = tuple[np.ndarray, np.ndarray]


def cut_curve(x: np.ndarray, y: np.ndarray, end: float) -> Curve:
    """The piecewise-linear curve ``(x, y)`` (``x`` increasing) restricted to ``x <= end``, its last point at
    ``end`` exactly (interpolated; held flat if the curve stops before ``end``)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    keep = x < end
    return np.r_[x[keep], end], np.r_[y[keep], np.interp(end, x, y)]


@dataclass(frozen=True)
class LevelRow:
    """One row's tokens to one target level: ratio to the baseline's with its paired bootstrap interval."""

    label: str
    level: float
    target: float  # the success value of the target
    tokens: float  # tokens at which the seed-mean curve reaches it (inf = not within the run)
    ratio: float
    ratio_lo: float
    ratio_hi: float
    frac_reached: float  # share of bootstrap resamples in which the row reached the target


def level_ratios(
    curves: Mapping[str, Sequence[Curve]],
    levels: Sequence[float],
    *,
    baseline: str = "uniform",
    final_points: int = 1,
    grid_points: int = 401,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[LevelRow]:
    """Tokens-to-target ratios against ``baseline`` at each level of ``levels`` (shares of the baseline's gain).

    ``curves[row][s]`` is seed ``s``'s ``(cumulative tokens, success)``; every row must have the same seeds in the
    same order (pairing). Returns one :class:`LevelRow` per (level, row), levels outer.
    """
    if baseline not in curves:
        raise ValueError(f"baseline {baseline!r} has no runs")
    n = {k: len(v) for k, v in curves.items()}
    if len(set(n.values())) != 1 or min(n.values()) < 1:
        raise ValueError(f"every row needs the same number (>= 1) of seeds to pair them, got {n}")
    s = n[baseline]
    end = max(float(np.max(x)) for runs in curves.values() for x, _ in runs)
    grid = np.linspace(0.0, end, grid_points)
    lv = [float(v) for v in levels]

    def tokens(idx: np.ndarray) -> tuple[list[float], dict[str, list[float]]]:
        base = [curves[baseline][i] for i in idx]
        s0 = float(np.mean([y[0] for _, y in base]))
        sf = float(np.mean([np.mean(y[-final_points:]) for _, y in base]))
        targets = [s0 + f * (sf - s0) for f in lv]
        out: dict[str, list[float]] = {}
        for name, runs in curves.items():
            sub = [runs[i] for i in idx]
            last = min(float(np.max(x)) for x, _ in sub)
            g = grid[grid <= last]
            mc = mean_curve(sub, g)
            # 1e-12: the baseline's own mean curve ends at its target up to rounding (interp vs mean)
            out[name] = [crossing(g, mc, t - 1e-12) for t in targets]
        return targets, out

    targets, point = tokens(np.arange(s))
    rng = np.random.default_rng(seed)
    boot: dict[str, list[list[float]]] = {k: [] for k in curves}
    for _ in range(n_boot):
        _, r = tokens(rng.integers(0, s, size=s))
        for k, v in r.items():
            boot[k].append([a / b if np.isfinite(b) and b > 0 else float("nan") for a, b in zip(v, r[baseline])])
    rows = []
    for j, f in enumerate(lv):
        b0 = point[baseline][j]
        for name in curves:
            b = np.array([x[j] for x in boot[name]], np.float64)
            b = b[~np.isnan(b)]
            lo, hi = np.quantile(b, [0.025, 0.975], method="inverted_cdf") if b.size else (np.nan, np.nan)
            ratio = point[name][j] / b0 if np.isfinite(b0) and b0 > 0 else float("nan")
            rows.append(
                LevelRow(
                    label=name,
                    level=f,
                    target=float(targets[j]),
                    tokens=float(point[name][j]),
                    ratio=float(ratio),
                    ratio_lo=float(lo),
                    ratio_hi=float(hi),
                    frac_reached=float(np.mean(np.isfinite(b))) if b.size else 0.0,
                )
            )
    return rows


def _auc(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) / x[-1]) if x[-1] > 0 else float(y[-1])


def _cut_runs(runs: Mapping[str, Sequence[TokenRun]]) -> dict[str, list[Curve]]:
    """Every run's (share of its seed's uniform token total, success) curve, cut at 1."""
    totals = {r.seed: float(r.cum_tokens[-1]) for r in runs["uniform"]}
    out: dict[str, list[Curve]] = {}
    for lbl, rs in runs.items():
        out[lbl] = []
        for r in rs:
            x, y = cut_curve(r.cum_tokens, r.success, totals[r.seed])
            out[lbl].append((x / totals[r.seed], y))
    return out


def _fmt_ratio(r: LevelRow) -> str:
    def num(v: float) -> str:
        return "inf" if np.isinf(v) else "—" if not np.isfinite(v) else f"{v:.2f}"

    if not np.isfinite(r.ratio):
        return f"not reached [{num(r.ratio_lo)}, {num(r.ratio_hi)}]"
    return f"{r.ratio:.2f} [{num(r.ratio_lo)}, {num(r.ratio_hi)}]"


def summarize(runs: Mapping[str, Sequence[TokenRun]], levels: Sequence[float], n_boot: int = 2000) -> dict[str, Any]:
    """JSON-ready figures of one sigma's runs: level ratios, per-row AUC / final / gaps, tokens and cuts."""
    curves = _cut_runs(runs)
    lrows = level_ratios(curves, levels, n_boot=n_boot)
    base_auc = {r.seed: _auc(*c) for r, c in zip(runs["uniform"], curves["uniform"])}
    base_fin = {r.seed: float(c[1][-1]) for r, c in zip(runs["uniform"], curves["uniform"])}
    per_row: dict[str, Any] = {}
    for lbl, rs in runs.items():
        cs = curves[lbl]
        auc = [_auc(*c) for c in cs]
        fin = [float(c[1][-1]) for c in cs]
        over = [float(r.cum_tokens[-1]) / base_tok - 1 for r, base_tok in
                zip(rs, [float(u.cum_tokens[-1]) for u in runs["uniform"]])]  # fmt: skip
        tel = [r.extra.get("telemetry", {}) for r in rs]
        per_row[lbl] = {
            "auc": auc,
            "final": fin,
            "d_auc": [a - base_auc[r.seed] for a, r in zip(auc, rs)],
            "d_final": [f - base_fin[r.seed] for f, r in zip(fin, rs)],
            "steps": [int(r.steps[-1]) for r in rs],
            "tokens_per_step": [float(np.mean(r.tokens)) for r in rs],
            "rollouts_per_step": [float(np.mean(r.rollouts)) for r in rs],
            "tokens_per_rollout": [float(np.sum(r.tokens) / np.sum(r.rollouts)) for r in rs],
            "frac_cut": [float(np.nanmean(r.frac_cut)) for r in rs],
            "zero_var": [float(np.nanmean(r.zero_var_frac)) for r in rs],
            "kept": [float(np.nanmean(r.kept_frac)) for r in rs],
            "gap_max": max((float(np.nanmax(r.gap)) for r in rs if np.isfinite(r.gap).any()), default=None),
            "overshoot": over,
            "share_tokens_hopeless": [t.get("vip/tokens_share_hopeless", float("nan")) for t in tel],
            "share_tokens_zero_var": [t.get("vip/tokens_share_zero_var", float("nan")) for t in tel],
            "alloc_ms": [1e3 * float(np.mean(r.alloc_seconds)) for r in rs],
        }
    return {
        "levels": [{k: v for k, v in vars(r).items()} for r in lrows],
        "rows": per_row,
        "token_total": [float(r.cum_tokens[-1]) for r in runs["uniform"]],
    }


def _level_table(summary: dict[str, Any], labels: Sequence[str], levels: Sequence[float]) -> str:
    by = {(d["label"], d["level"]): LevelRow(**d) for d in summary["levels"]}
    rows = []
    for lbl in labels:
        rows.append([lbl] + [_fmt_ratio(by[(lbl, float(f))]) for f in levels])
    return md_table(["row"] + [f"{100 * f:g}% of uniform's gain" for f in levels], rows)


def write_tokens_report(
    out: Path,
    res: dict[str, Any],
    results: Mapping[float, Mapping[str, Sequence[TokenRun]]],
    *,
    command: str,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """Write ``tokens.md`` / ``tokens.json`` (and a PNG) for ``results[sigma][row]`` = runs in seed order; returns
    the summaries added to ``tokens.json`` (``commit``, ``summary`` per sigma)."""
    levels = res["levels"]
    sigma = res["sigma"]
    commit = git_commit()
    summaries = {str(sg): summarize(runs, levels, n_boot) for sg, runs in results.items()}
    main = results[sigma]
    curves = _cut_runs(main)
    plot = plot_bands(
        curves,
        out / "tokens_success.png",
        xlabel="cumulative generated tokens (share of uniform's total)",
        ylabel="mean success over the pool (true p)",
        title=f"simulator with lengths, sigma={sigma:g}: mean ± 95% CI over {res['seeds']} seeds",
    )
    s = summaries[str(sigma)]
    rows_t = []
    for lbl, d in s["rows"].items():
        base = lbl == "uniform"
        rows_t.append(
            [
                lbl,
                fmt_ci(d["auc"]),
                "—" if base else fmt_ci(d["d_auc"], signed=True),
                fmt_ci(d["final"]),
                "—" if base else fmt_ci(d["d_final"], signed=True),
                fmt_ci(d["steps"], digits=1),
                fmt_ci(d["tokens_per_step"], digits=1, scale=1e-3),
                fmt_ci(d["rollouts_per_step"], digits=1),
                fmt_ci(d["tokens_per_rollout"], digits=0),
                fmt_ci(d["frac_cut"]),
                fmt_ci(d["zero_var"]),
                fmt_ci(d["share_tokens_zero_var"]),
                "—" if d["gap_max"] is None else f"{d['gap_max']:.1e}",
            ]
        )
    lc = res["lengths"]
    tot = np.mean(s["token_total"])
    lines = [
        "# Equal-token league on the simulator with response lengths",
        "",
        provenance(
            command,
            {
                "simulator": ", ".join(f"{k}={v}" for k, v in res["config"].items()),
                "lengths": ", ".join(f"{k}={v}" for k, v in lc.items()),
                "run": f"{res['seeds']} seeds; uniform trains {res['steps']} steps x {res['batch']} prompts x "
                f"{res['n_mean']} rollouts and sets the seed's token total (mean {tot / 1e6:.1f}M tokens); every "
                "other row trains until it has generated as many tokens; n in [2, 32]; predictor beta (uniform: "
                "empirical)",
                "token-budget rows": "each step's token_budget = Allocator.uniform_tokens(ids, n_mean) (the tokens "
                "uniform would spend on the batch, by the row's own length model), no rollout cap; the first step "
                "is planned by rollouts (no length observed yet)",
                "two-phase row": "left out: Allocator.plan_pilot has no token_budget yet"
                if res.get("two_phase_row") is None
                else f"left out: {res['two_phase_row']}",
                "wall time": f"{res['elapsed_s']:.0f} s (runs resumed from tokens_runs/ count 0)",
            },
            commit=commit,
        ),
        "Every curve is cut at its seed's token total (uniform's), so every row of a seed ends at exactly the same",
        "cumulative generated tokens; a row stops at the first step past it (overshoot < one step, interpolated away).",
        "",
        f"## Tokens to a target, ratio to uniform (sigma = {sigma:g})",
        "",
        "Target = success before training + level x uniform's gain (100% = uniform's final success). Ratio of the",
        "tokens at which the seed-mean curve first reaches it, [95% paired bootstrap interval over seeds]; < 1: fewer",
        "tokens than uniform. `inf`: some resamples never reach the target within the run.",
        "",
        _level_table(s, list(main), levels),
        "",
        "## Per-row figures (mean ± 95% t-interval over seeds; Δ = minus uniform, same seed)",
        "",
        md_table(
            [
                "row",
                "AUC over tokens",
                "Δ AUC",
                "final success",
                "Δ final (gap)",
                "steps",
                "k tokens / step",
                "rollouts / step",
                "tokens / rollout",
                "cut at cap",
                "zero-var groups",
                "tokens in zero-var groups",
                "max certified gap",
            ],
            rows_t,
        ),
        "",
        f"![success vs tokens]({Path(plot).name})",
        "",
    ]
    if len(results) > 1:
        sigmas = sorted(results)
        lines += ["## Sigma sweep", "", "Ratio of tokens to the target vs uniform [95% paired bootstrap]:", ""]
        for sg in sigmas:
            lines += [f"**sigma = {sg:g}**", "", _level_table(summaries[str(sg)], list(results[sg]), levels), ""]
        sweep_rows = [lbl for lbl in results[sigmas[0]] if all(lbl in results[x] for x in sigmas)]
        cells = []
        for lbl in sweep_rows:
            if lbl == "uniform":
                continue
            cells.append(
                [lbl]
                + [
                    f"{fmt_ci(summaries[str(sg)]['rows'][lbl]['d_auc'], signed=True)} / "
                    f"{fmt_ci(summaries[str(sg)]['rows'][lbl]['d_final'], signed=True)}"
                    for sg in sigmas
                ]
            )
        lines += [
            "Δ AUC over tokens / Δ final success vs uniform (paired, mean ± 95% t-interval):",
            "",
            md_table(["row"] + [f"sigma={sg:g}" for sg in sigmas], cells),
            "",
        ]
    (out / "tokens.md").write_text("\n".join(lines))
    full = {**res, "commit": commit, "summary": summaries}
    (out / "tokens.json").write_text(json.dumps(full, default=float))
    return {"commit": commit, "summary": summaries}
