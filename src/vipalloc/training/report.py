"""The demo's ``report.md`` and PNG plots, computed from the runs' metrics (one list of records per run).

Every accuracy here is the evaluation metric of :func:`vipalloc.training.trainer.evaluate`: mean success over
``eval_samples`` temperature-1 samples of each held-out prompt. Because one evaluation has a sampling noise of
about +-0.01, "final" accuracy is the mean of the last three evaluations, and strategies are also compared by the
mean accuracy over the whole run (area under the learning curve per rollout) and by paired per-seed differences
(same seed = same warm-up model, prompt pool, evaluation set and prompt order).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vipalloc.reporting import league, md_table, paired_verdict
from vipalloc.training.config import TrainConfig
from vipalloc.training.evaluation import paper_metrics_lines, plot_paper_metrics

Run = list[dict[str, Any]]  # metrics records of one run: step -1 (initial eval), then one per training step
FINAL_EVALS = 3


def opt_desc(cfg: TrainConfig) -> str:
    """The optimizer as the report names it, e.g. ``AdamW lr 0.0001`` or ``SGD lr 1.0, momentum 0.9``."""
    if cfg.optimizer == "sgd":
        return f"SGD lr {cfg.lr}" + (f", momentum {cfg.momentum}" if cfg.momentum else "")
    return f"AdamW lr {cfg.lr}"


def curve(metrics: Run) -> tuple[np.ndarray, np.ndarray]:
    """``(cumulative rollouts, eval accuracy)`` at every evaluation of a run, float64 ``(E,)`` each."""
    pts = [(m["cum_rollouts"], m["eval_acc"]) for m in metrics if "eval_acc" in m]
    arr = np.array(pts, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def final_acc(metrics: Run, k: int = FINAL_EVALS) -> float:
    """Mean of the last ``k`` evaluations (one evaluation alone is too noisy to rank strategies)."""
    return float(curve(metrics)[1][-k:].mean())


def acc_at(metrics: Run, rollouts: float) -> float:
    """Eval accuracy at ``rollouts`` cumulative rollouts, linearly interpolated between evaluations."""
    x, y = curve(metrics)
    return float(np.interp(rollouts, x, y))


def mean_acc(metrics: Run, upto: float) -> float:
    """Mean eval accuracy over ``[0, upto]`` cumulative rollouts (normalised area under the learning curve)."""
    x, y = curve(metrics)
    grid = np.linspace(0.0, upto, 201)
    return float(np.interp(grid, x, y).mean())


def rollouts_to(metrics: Run, target: float) -> float:
    """Cumulative rollouts at the first evaluation where the 3-eval moving average reaches ``target`` (NaN: never)."""
    x, y = curve(metrics)
    smooth = np.array([y[max(0, i - 2) : i + 1].mean() for i in range(len(y))])
    hit = np.flatnonzero(smooth >= target)
    return float(x[hit[0]]) if hit.size else float("nan")


def cost_curve(metrics: Run, axis: str) -> tuple[np.ndarray, np.ndarray]:
    """``(cumulative cost, eval accuracy)`` at every evaluation; ``axis``: ``cum_rollouts`` or ``cum_tokens``."""
    pts = [(m[axis], m["eval_acc"]) for m in metrics if "eval_acc" in m]
    arr = np.array(pts, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def primary_lines(runs: dict[str, list[Run]], ref: str = "uniform", n_boot: int = 2000) -> list[str]:
    """The report's lead, the same figure as the README and docs/results.md: rollouts (and generated tokens, when
    the runs logged them) each strategy's seed-mean curve needs to reach ``ref``'s final mean@k (its last two
    evaluations), as a ratio to ``ref``'s own with a paired percentile bootstrap over seeds
    (:func:`vipalloc.reporting.league`). Empty when ``ref`` did not run or the seeds do not pair."""
    if ref not in runs or len({len(rs) for rs in runs.values()}) != 1:
        return []
    n_seeds = len(runs[ref])
    axes = [("cum_rollouts", "rollouts")]
    if all("cum_tokens" in m for rs in runs.values() for r in rs for m in r if "eval_acc" in m):
        axes.append(("cum_tokens", "tokens"))
    results = {
        axis: league({s: [cost_curve(r, axis) for r in rs] for s, rs in runs.items()}, baseline=ref, n_boot=n_boot)
        for axis, _ in axes
    }
    target = results["cum_rollouts"][0]
    headers = ["strategy"]
    for _, name in axes:
        headers += [f"{name} to {target:.3f}", f"{name} ratio vs {ref} [95% CI]"]
    rows = []
    for i, s in enumerate(runs):
        cells = [s]
        for axis, _ in axes:
            row, base = results[axis][1][i], next(r for r in results[axis][1] if r.strategy == ref)
            cells.append("not reached" if not np.isfinite(row.rollouts) else f"{row.rollouts:,.0f}")
            if s == ref:
                cells.append("1 (baseline)")
            elif not base.rollouts > 0:
                cells.append(f"undefined ({ref} did not improve)")
            elif not np.isfinite(row.ratio):
                cells.append("not reached within the run")
            else:
                hi = "inf" if not np.isfinite(row.ratio_hi) else f"{row.ratio_hi:.2f}"
                cells.append(f"**{row.ratio:.2f}** [{row.ratio_lo:.2f}, {hi}]")
        rows.append(cells)
    few = " With one seed the interval is degenerate: run more seeds (`--seeds`)." if n_seeds < 2 else ""
    return [
        f"## Rollouts{' and tokens' if len(axes) > 1 else ''} to reach {ref}'s final mean@k ({n_seeds} seeds, paired)",
        "",
        f"Target: {ref}'s final mean@k (its last two evaluations, averaged over seeds) = {target:.3f}. Cost: where "
        "the seed-mean curve first reaches it (linear between evaluations); ratio: that over "
        f"{ref}'s own (below 1 = cheaper), with a paired percentile bootstrap 95% interval over seeds (2,000 "
        "resamples; an upper bound of inf = some resamples never reached it). The same figure as `vipalloc bench "
        "train` and the README; it depends on where the baseline flattens, so `bench train` also reports it at "
        f"50/75/90% of {ref}'s gain." + few,
        "",
        md_table(headers, rows),
        "",
    ]


def wall_seconds(metrics: Run) -> float:
    """Training + evaluation seconds of a run, summed from its records (correct across kills and resumes)."""
    return float(sum(m.get("step_seconds", 0.0) + m.get("eval_seconds", 0.0) for m in metrics))


def _steps(metrics: Run) -> Run:
    return [m for m in metrics if m["step"] >= 0]


def _ms(values: Any) -> str:
    arr = np.asarray(values, dtype=np.float64)
    return f"{arr.mean():.3f} +- {arr.std(ddof=1):.3f}" if arr.size > 1 else f"{arr.mean():.3f}"


def summarize(runs: dict[str, list[Run]]) -> dict[str, Any]:
    """Per-strategy statistics (lists over seeds) used by the report and written to ``summary.json``."""
    common = min(_steps(r)[-1]["cum_rollouts"] for rs in runs.values() for r in rs)  # every run reached this
    ref = "uniform" if "uniform" in runs else next(iter(runs))
    initial = float(np.mean([r[0]["eval_acc"] for rs in runs.values() for r in rs]))
    ref_final = float(np.mean([acc_at(r, common) for r in runs[ref]]))
    target = initial + 0.5 * (ref_final - initial)
    out: dict[str, Any] = {"common_rollouts": common, "initial": initial, "target": target, "reference": ref}
    for s, rs in runs.items():
        st = [_steps(r) for r in rs]
        out[s] = {
            "initial": [r[0]["eval_acc"] for r in rs],
            "final": [final_acc(r) for r in rs],
            "at_common": [acc_at(r, common) for r in rs],
            "mean_acc": [mean_acc(r, common) for r in rs],
            "cum_rollouts": [x[-1]["cum_rollouts"] for x in st],
            "rollouts_to_target": [rollouts_to(r, target) for r in rs],
            "zero_var": [float(np.mean([m["frac_all_correct"] + m["frac_all_wrong"] for m in x])) for x in st],
            "all_correct": [float(np.mean([m["frac_all_correct"] for m in x])) for x in st],
            "all_wrong": [float(np.mean([m["frac_all_wrong"] for m in x])) for x in st],
            "dropped": [float(np.mean([m["vip/num_dropped"] for m in x])) for x in st],
            "mean_n": [float(np.mean([m["vip/mean_n"] for m in x])) for x in st],
            "max_n": [int(max(m["vip/max_n"] for m in x)) for x in st],
            "pred_err": [float(np.mean([m["vip/pred_abs_err"] for m in x])) for x in st],
            "var_ratio": [float(np.mean([m["vip/expected_var_ratio_vs_uniform"] for m in x])) for x in st],
            "wall_s": [wall_seconds(r) for r in rs],
            "alloc_share": [
                sum(m["alloc_seconds"] for m in x) / max(sum(m["step_seconds"] for m in x), 1e-9) for x in st
            ],
        }
        if s != ref and len(rs) == len(runs[ref]):
            out[s]["paired_diff_at_common"] = [a - b for a, b in zip(out[s]["at_common"], out[ref]["at_common"])]
            out[s]["paired_diff_mean_acc"] = [a - b for a, b in zip(out[s]["mean_acc"], out[ref]["mean_acc"])]
    return out


def write_report(
    out: Path,
    cfg: TrainConfig,
    runs: dict[str, list[Run]],
    plans: dict[str, list[list[dict[str, Any]]]],
    warm_s: float,
    jobs: int = 1,
) -> Path:
    """Write ``report.md``, ``summary.json`` and the plots ``eval_vs_rollouts.png``, ``allocations.png``,
    ``predicted_vs_realised.png``, ``groups.png`` into ``out``; returns the report path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    sm = summarize(runs)
    strategies = list(runs)
    n_seeds = len(next(iter(runs.values())))
    ref = sm["reference"]
    noise = "/".join(f"{x:.0%}" for x in cfg.level_noise)  # per level
    lines = [
        "# vipalloc demo: allocation strategies at equal rollout budget",
        "",
        *primary_lines(runs, ref),
        "",
        f"Policy: char-level GPT-2 ({cfg.model.n_layer} layers, width {cfg.model.n_embd}), supervised warm-up of "
        f"{cfg.warmup.steps} steps on the task generator with {noise} near-miss answers "
        f"({warm_s:.0f} s here, cached under {cfg.warmup_cache}/). Task: reasoning-gym chain_sum, levels "
        f"(terms, digits) {', '.join(str(tuple(x)) for x in cfg.levels)}; {cfg.pool_size}-prompt training pool, "
        f"{cfg.eval_size} held-out prompts x {cfg.eval_samples} samples at temperature {cfg.temperature}; exact-match "
        f"0/1 reward. RL: {cfg.loss}, {opt_desc(cfg)}, {cfg.steps} steps of {cfg.prompts_per_step} prompts, budget "
        f"{cfg.budget} rollouts per step for every strategy (uniform n = {cfg.n_mean}), n in [{cfg.n_min}, "
        f"{cfg.n_max}], predictor {cfg.predictor}. Seeds: {n_seeds} (a seed fixes the prompt order and sampling). "
        f"Runs: {jobs} at a time in worker processes, one torch thread each (wall times include that sharing).",
        "",
        f"Initial eval accuracy {sm['initial']:.3f}. All runs compared at {sm['common_rollouts']:,} cumulative "
        f"rollouts (every run reached it). *rollouts to half-gain* below: first evaluation whose 3-eval moving "
        f"average reaches {sm['target']:.3f} (half of {ref}'s gain), a secondary figure.",
        "",
        "## Outcome (mean +- sd over seeds)",
        "",
        f"| strategy | acc at {sm['common_rollouts']:,} rollouts | final acc (last {FINAL_EVALS} evals) "
        f"| mean acc over run | paired diff vs {ref} (at end / mean) | rollouts to half-gain | cumulative rollouts "
        "| wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in strategies:
        d = sm[s]
        to_t = np.array(d["rollouts_to_target"])
        ok = np.isfinite(to_t)
        to_txt = f"{np.nanmean(to_t):,.0f} ({ok.sum()}/{ok.size} runs)" if ok.any() else f"not reached (0/{ok.size})"
        diff = (
            f"{_ms(d['paired_diff_at_common'])} / {_ms(d['paired_diff_mean_acc'])}"
            if "paired_diff_at_common" in d
            else "-"
        )
        lines.append(
            f"| {s} | {_ms(d['at_common'])} | {_ms(d['final'])} | {_ms(d['mean_acc'])} | {diff} | {to_txt} "
            f"| {np.mean(d['cum_rollouts']):,.0f} | {np.mean(d['wall_s']):.0f} |"
        )
    others = [s for s in strategies if "paired_diff_at_common" in sm[s]]
    if others:
        lines += [
            "",
            f"Paired differences vs {ref} on the same seed (same prompts and warm-up), mean ± 95% t-interval; "
            "'resolved' = the interval excludes 0:",
            "",
            "| strategy | at the common budget | mean accuracy over the run |",
            "|---|---|---|",
        ]
        for s in others:
            d = sm[s]
            lines.append(
                f"| {s} | {paired_verdict(d['paired_diff_at_common'])} | {paired_verdict(d['paired_diff_mean_acc'])} |"
            )
    lines += [
        "",
        "## Mechanics (means over steps and seeds)",
        "",
        "| strategy | zero-variance groups | all-correct / all-wrong | dropped prompts per step | mean n / max n "
        "| predictor error abs(p_hat - rate) | expected variance vs uniform | allocator share of step time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in strategies:
        d = sm[s]
        lines.append(
            f"| {s} | {np.mean(d['zero_var']):.3f} | {np.mean(d['all_correct']):.3f} / {np.mean(d['all_wrong']):.3f} "
            f"| {np.mean(d['dropped']):.1f} | {np.mean(d['mean_n']):.2f} / {max(d['max_n'])} "
            f"| {np.mean(d['pred_err']):.3f} | {np.mean(d['var_ratio']):.3f} | {100 * np.mean(d['alloc_share']):.1f}% |"
        )
    lines += ["", *paper_metrics_lines(runs)]
    lines += ["Per seed (acc at the common budget):", ""]
    for s in strategies:
        lines.append(f"- {s}: " + ", ".join(f"{v:.3f}" for v in sm[s]["at_common"]))
    lines += [
        "",
        "Zero-variance groups (all rollouts right or all wrong) give no gradient under group baselines; the "
        "'expected variance vs uniform' column is the allocator's own model of the plan's gradient variance under "
        "its predicted p (below 1 = it expects to beat uniform).",
        "",
        "Plots: `eval_vs_rollouts.png` (eval accuracy vs cumulative rollouts: mean, +-1 sd band, thin lines per "
        "seed), `allocations.png` (rollouts per prompt, 0 = dropped), `predicted_vs_realised.png` (predicted "
        "success probability vs realised rate, binned), `groups.png` (share of zero-variance groups per step), "
        "`eval_metrics.png` (mean@k, pass@k, maj@k vs cumulative rollouts).",
        "",
    ]
    colors = {s: f"C{i}" for i, s in enumerate(strategies)}
    # 1. learning curves against cumulative rollouts
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for s in strategies:
        grid = np.linspace(0, sm["common_rollouts"], 60)
        ys = np.array([np.interp(grid, *curve(r)) for r in runs[s]])
        for r in runs[s]:
            ax.plot(*curve(r), color=colors[s], lw=0.6, alpha=0.35)
        ax.plot(grid, ys.mean(0), color=colors[s], lw=2, label=f"{s} ({n_seeds} seeds)")
        if len(ys) > 1:
            sd = ys.std(0, ddof=1)
            ax.fill_between(grid, ys.mean(0) - sd, ys.mean(0) + sd, color=colors[s], alpha=0.15)
    _finish(
        plt,
        fig,
        ax,
        out / "eval_vs_rollouts.png",
        "cumulative rollouts",
        "held-out eval accuracy (mean success)",
        grid=True,
    )
    # 2. allocation histogram
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for s in strategies:
        counts = np.concatenate([np.array(p["counts"]) for run in plans[s] for p in run] or [np.zeros(1)])
        ax.hist(counts, bins=(np.arange(0, cfg.n_max + 2) - 0.5).tolist(), alpha=0.5, label=s, color=colors[s])
    _finish(plt, fig, ax, out / "allocations.png", "rollouts per prompt (0 = dropped)", "prompts x steps", logy=True)
    # 3. predicted vs realised success rate
    fig, ax = plt.subplots(figsize=(5, 5))
    bins = np.linspace(0, 1, 11)
    for s in strategies:
        pm, rt, nn = [], [], []
        for run in plans[s]:
            for p in run[1:]:  # step 0 has no history: every predictor returns its prior
                for a, b, c in zip(p["p_mean"], p["rate"], p["counts"]):
                    if c > 0 and b is not None and np.isfinite(b):
                        pm.append(a)
                        rt.append(b)
                        nn.append(c)
        if not pm:
            continue
        pm_a, rt_a = np.array(pm), np.array(rt)
        ax.scatter(pm_a, rt_a, s=2, alpha=0.08, color=colors[s])
        idx = np.clip(np.digitize(pm_a, bins) - 1, 0, len(bins) - 2)
        xs = [pm_a[idx == b].mean() for b in range(len(bins) - 1) if (idx == b).sum() >= 5]
        ys_b = [rt_a[idx == b].mean() for b in range(len(bins) - 1) if (idx == b).sum() >= 5]
        ax.plot(xs, ys_b, "o-", color=colors[s], label=f"{s} (MAE {np.mean(np.abs(pm_a - rt_a)):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    _finish(plt, fig, ax, out / "predicted_vs_realised.png", "predicted success probability", "realised success rate")
    # 4. zero-variance groups per step
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for s in strategies:
        zv = np.array([[m["frac_all_correct"] + m["frac_all_wrong"] for m in _steps(r)] for r in runs[s]])
        k = max(1, min(10, zv.shape[1]))
        smooth = np.array([np.convolve(z, np.ones(k) / k, mode="valid") for z in zv])
        ax.plot(np.arange(smooth.shape[1]) + k - 1, smooth.mean(0), color=colors[s], label=s)
    _finish(plt, fig, ax, out / "groups.png", "training step", "zero-variance groups (10-step mean)", grid=True)
    plot_paper_metrics(runs, out / "eval_metrics.png")
    (out / "summary.json").write_text(json.dumps(sm, indent=1))
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _finish(
    plt: Any, fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, *, logy: bool = False, grid: bool = False
) -> None:
    """Label the axes, add the legend (and grid / log y), save the figure as a 110-dpi PNG and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.legend()
    if grid:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
