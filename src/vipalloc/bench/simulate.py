"""``vipalloc bench simulate``: the league table of allocation strategies on the policy-gradient simulator, with
a sigma sweep. :func:`run_simulate` returns its raw results (JSON-ready) and writes ``simulate.md``,
``simulate.json`` and PNG plots; nothing here asserts a result.

Every strategy and predictor is reached through :class:`vipalloc.Allocator`; plans are scored against the TRUE
success probabilities of the simulator with :func:`vipalloc.variance.gradient_variance` (via
``Allocator.expected_variance``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from vipalloc.bench.progress import Progress, noop
from vipalloc.bench.sim_runs import DAPO_EXTRA, RowSpec, SimRun, SimWorld, StepLog, mean_telemetry, reference_variances
from vipalloc.bench.simulator import SimConfig
from vipalloc.reporting import fmt_ci, git_commit, md_table, plot_bands, plot_lines, provenance

__all__ = [
    "DEFAULT_ROWS",
    "SWEEP_ROWS",
    "RowSpec",
    "SimRun",
    "mean_telemetry",
    "parse_rows",
    "run_simulate",
    "simulate_run",
]


# Predictors: vip is run with the GP (the library default), the Beta posterior and the true p, so the predictor's
# share of the result is visible; the other strategies use the Beta posterior (a per-prompt success-rate estimate,
# what Knapsack-RL and GVM use), so comparing them with "vip (beta)" isolates the allocation rule. Only one GP row:
# its fit dominates the run time.
DEFAULT_ROWS: tuple[RowSpec, ...] = (
    RowSpec("uniform", "uniform", "empirical"),
    RowSpec("vip (gp)", "vip", "gp"),
    RowSpec("vip (beta)", "vip", "beta"),
    RowSpec("vip (oracle p)", "vip", "oracle"),
    RowSpec("vip_pure (beta)", "vip_pure", "beta"),
    RowSpec("inverse_acc (beta)", "inverse_acc", "beta"),
    RowSpec("inverse_var (beta)", "inverse_var", "beta"),
    RowSpec("knapsack (beta)", "knapsack", "beta"),
    RowSpec("gvm (beta)", "gvm", "beta"),
    RowSpec("dapo dynamic sampling", "uniform", "empirical", dapo=True),
)
# The sigma sweep runs the cheap rows (no GP: its cost would dominate the sweep).
SWEEP_ROWS: tuple[str, ...] = (
    "uniform",
    "vip (beta)",
    "vip (oracle p)",
    "vip_pure (beta)",
    "knapsack (beta)",
    "dapo dynamic sampling",
)


def parse_rows(spec: str | Sequence[str] | None) -> list[RowSpec]:
    """Rows from labels of :data:`DEFAULT_ROWS` or ``strategy:predictor`` / ``dapo`` items (comma-separated)."""
    if spec is None:
        return list(DEFAULT_ROWS)
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise ValueError("no rows given; pass e.g. 'uniform,vip:gp,dapo'")
    from vipalloc.predictors import PREDICTOR_NAMES
    from vipalloc.strategies import STRATEGY_NAMES

    by_label = {r.label: r for r in DEFAULT_ROWS}
    rows: list[RowSpec] = []
    for it in items:
        if it in by_label:
            rows.append(by_label[it])
        elif it == "dapo":
            rows.append(by_label["dapo dynamic sampling"])
        else:
            strat, _, pred = it.partition(":")
            pred = pred or "gp"
            if strat not in STRATEGY_NAMES or pred not in PREDICTOR_NAMES:
                raise ValueError(
                    f"unknown row {it!r}: use a label ({', '.join(by_label)}), 'dapo', or strategy:predictor with a "
                    f"strategy in {', '.join(STRATEGY_NAMES)} and a predictor in {', '.join(PREDICTOR_NAMES)}"
                )
            rows.append(RowSpec(f"{strat} ({pred})" if strat != "uniform" else "uniform", strat, pred))
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate rows in {labels}")
    return rows


class _SimRunKwargs(TypedDict):
    """The keyword arguments :func:`run_simulate` passes to every :func:`simulate_run` call."""

    steps: int
    batch: int
    n_mean: int
    dapo_max_batches: int
    embedder: str


def simulate_run(
    row: RowSpec,
    cfg: SimConfig,
    seed: int,
    *,
    steps: int = 120,
    batch: int = 64,
    n_mean: int = 8,
    n_min: int = 2,
    n_max: int = 32,
    dapo_max_batches: int = 3,
    embedder: str = "hashing",
    on_step: Callable[[int], None] | None = None,
) -> SimRun:
    """Train the simulator's policy with one row's allocation until ``steps * batch * n_mean`` cumulative rollouts.

    Every row of a seed sees the same world, the same prompt order (DAPO draws extra prompts from the same stream)
    and the same random numbers per step and prompt slot (common random numbers). DAPO's extra batches are capped
    so its cumulative rollouts never exceed the budget: every row ends at exactly the same cumulative rollouts.
    """
    from vipalloc.strategies import TWO_PHASE_STRATEGIES

    if row.strategy in TWO_PHASE_STRATEGIES:  # pilot round + commit round per step: vipalloc.bench.two_phase_sim
        from vipalloc.bench.two_phase_sim import simulate_two_phase_run

        return simulate_two_phase_run(
            row, cfg, seed, steps=steps, batch=batch, n_mean=n_mean, n_min=n_min, n_max=n_max, embedder=embedder,
            on_step=on_step,
        )  # fmt: skip
    world = SimWorld.build(
        cfg, seed, steps=steps, draw=batch, n_mean=n_mean, n_min=n_min, n_max=n_max, embedder=embedder
    )
    sim, stream, rng_r, rng_g = world.sim, world.stream, world.rng_r, world.rng_g
    rng_x = world.rng_for(seed, DAPO_EXTRA)  # rewards of DAPO's extra batches
    alloc = world.allocator(row.strategy, row.predictor)
    shadow_uniform, shadow_oracle = world.shadows()
    budget = batch * n_mean
    total = steps * budget
    cum = 0
    t = 0
    log = StepLog.start(sim.mean_success())
    dapo_batches: list[int] = []
    while cum < total:
        idx, ids, texts, p_true = world.draw(batch, alloc, row.predictor)
        t0 = time.perf_counter()
        plan = alloc.plan(ids, prompts=texts, budget=budget, step=t)
        a_s = time.perf_counter() - t0
        rewards = sim.rollouts(idx, plan.counts, rng_r, width=n_max)
        t0 = time.perf_counter()
        alloc.observe(ids, rewards, step=t)
        a_s += time.perf_counter() - t0
        log.telemetry.append({**plan.metrics(), **alloc.outcome_metrics(rewards, plan)})  # the (first) plan
        used = budget
        train_idx, train_rewards = idx, rewards
        generated = [r for r in rewards if len(r)]
        if row.dapo:
            keep = [k for k, r in enumerate(rewards) if 0 < r.sum() < len(r)]
            train_idx_l = [int(idx[k]) for k in keep]
            train_rw = [rewards[k] for k in keep]
            n_batches = 1
            while len(train_idx_l) < batch and n_batches < dapo_max_batches and cum + used + budget <= total:
                idx2 = stream.next(batch)
                ids2 = [sim.ids[i] for i in idx2]
                t0 = time.perf_counter()
                plan2 = alloc.plan(ids2, prompts=[sim.texts[i] for i in idx2], budget=budget, step=t)
                a_s += time.perf_counter() - t0
                rw2 = sim.rollouts(idx2, plan2.counts, rng_x, width=n_max)
                t0 = time.perf_counter()
                alloc.observe(ids2, rw2, step=t)
                a_s += time.perf_counter() - t0
                used += budget
                n_batches += 1
                generated.extend(r for r in rw2 if len(r))
                for k, r in enumerate(rw2):
                    if len(train_idx_l) < batch and 0 < r.sum() < len(r):
                        train_idx_l.append(int(idx2[k]))
                        train_rw.append(r)
            train_idx, train_rewards = np.asarray(train_idx_l, np.int64), train_rw
            dapo_batches.append(n_batches)
            log.variances(float("nan"), float("nan"), float("nan"))
        else:
            log.variances(*reference_variances(alloc, shadow_uniform, shadow_oracle, ids, texts, budget, t, p_true,
                                               plan.counts))  # fmt: skip
        log.alloc_seconds.append(a_s)
        log.groups(generated, float(np.mean(plan.counts > 0)))
        if len(train_idx):
            sim.update(sim.gradient(train_idx, train_rewards, rng_g, p=sim.true_p(train_idx), batch_size=batch))
        else:  # DAPO found no mixed group: no update, but the noise generator still advances alike
            rng_g.standard_normal((0, cfg.dim))
        cum += used
        t += 1
        log.point(t, cum, sim.mean_success())
        if on_step is not None:
            on_step(t)
    extra: dict[str, Any] = {"dapo_batches_mean": float(np.mean(dapo_batches))} if row.dapo else {}
    return log.run(row, seed, cfg.sigma, cfg.estimator, total, **extra)


def _ratio_mean(num: np.ndarray, den: np.ndarray) -> float:
    ok = np.isfinite(num) & np.isfinite(den) & (den > 0)
    return float(np.mean(num[ok] / den[ok])) if ok.any() else float("nan")


def _league_rows(
    runs: dict[str, list[SimRun]], target: float, baseline: str = "uniform"
) -> tuple[list[str], list[list[str]]]:
    headers = [
        "row",
        "final success",
        "Δ final vs uniform",
        "mean success (AUC)",
        "Δ AUC vs uniform",
        "reached target",
        "steps to target",
        "rollouts to target (k)",
        "var / uniform",
        "var / oracle",
        "zero-var groups",
        "kept prompts",
        "alloc ms/step",
    ]
    base = {r.seed: r.final_success() for r in runs.get(baseline, [])}
    base_auc = {r.seed: r.auc() for r in runs.get(baseline, [])}
    rows = []
    for label, rs in runs.items():
        finals = [r.final_success() for r in rs]
        deltas = [r.final_success() - base[r.seed] for r in rs if r.seed in base]
        aucs = [r.auc() for r in rs]
        d_auc = [r.auc() - base_auc[r.seed] for r in rs if r.seed in base_auc]
        reach = [r.reach(target) for r in rs]
        n_hit = sum(1 for s, _ in reach if np.isfinite(s))
        is_dapo = all(not np.isfinite(r.var_plan).any() for r in rs)
        rows.append(
            [
                label,
                fmt_ci(finals),
                "—" if label == baseline else fmt_ci(deltas, signed=True),
                fmt_ci(aucs),
                "—" if label == baseline else fmt_ci(d_auc, signed=True),
                f"{n_hit}/{len(rs)}",
                fmt_ci([s for s, _ in reach], digits=1),
                fmt_ci([c for _, c in reach], digits=1, scale=1e-3),
                "—" if is_dapo else fmt_ci([_ratio_mean(r.var_plan, r.var_uniform) for r in rs]),
                "—" if is_dapo else fmt_ci([_ratio_mean(r.var_plan, r.var_oracle) for r in rs]),
                fmt_ci([np.nanmean(r.zero_var_frac) for r in rs]),
                fmt_ci([np.nanmean(r.kept_frac) for r in rs]),
                fmt_ci([1e3 * np.mean(r.alloc_seconds) for r in rs], digits=1),
            ]
        )
    return headers, rows


def run_simulate(
    out_dir: str | Path = "reports",
    *,
    rows: Sequence[RowSpec] | None = None,
    seeds: int = 5,
    steps: int = 120,
    batch: int = 64,
    n_mean: int = 8,
    sigma: float = 10.0,
    sweep: Sequence[float] = (0.0, 1.0, 3.0, 10.0, 30.0),
    sweep_rows: Sequence[str] = SWEEP_ROWS,
    target: float = 0.7,
    config: SimConfig | None = None,
    dapo_max_batches: int = 3,
    embedder: str = "hashing",
    command: str = "vipalloc bench simulate",
    progress: Progress = noop,
) -> dict[str, Any]:
    """League table at ``sigma`` over ``rows`` x ``seeds`` at equal cumulative rollouts, plus a sigma sweep of
    ``sweep_rows``. Writes ``simulate.md``, ``simulate.json`` and PNGs to ``out_dir``; returns the raw results."""
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target mean success must be in (0, 1), got {target}")
    rows = list(rows) if rows is not None else list(DEFAULT_ROWS)
    base_cfg = (config or SimConfig()).with_(sigma=float(sigma))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw: _SimRunKwargs = {
        "steps": steps,
        "batch": batch,
        "n_mean": n_mean,
        "dapo_max_batches": dapo_max_batches,
        "embedder": embedder,
    }
    commit = git_commit()
    t_start = time.perf_counter()
    # ---- league
    league: dict[str, list[SimRun]] = {r.label: [] for r in rows}
    wall: dict[str, float] = {r.label: 0.0 for r in rows}
    progress("phase", {"name": f"league at sigma={sigma}", "total": len(rows) * seeds * steps})
    for seed in range(seeds):
        for row in rows:
            t0 = time.perf_counter()
            run = simulate_run(row, base_cfg, seed, **kw, on_step=lambda s: progress("advance", {}))
            progress("advance", {"n": steps - int(run.steps[-1])})  # DAPO takes fewer steps
            run_s = time.perf_counter() - t0
            wall[row.label] += run_s
            league[row.label].append(run)
            progress("run", {"label": row.label, "seed": seed, "wall": run_s, "final": run.final_success()})
    # ---- sigma sweep
    by_label = {r.label: r for r in list(DEFAULT_ROWS) + rows}
    s_rows = [by_label[lbl] for lbl in sweep_rows if lbl in by_label]
    sweep_runs: dict[float, dict[str, list[SimRun]]] = {}
    sweep_sigmas = [float(s) for s in sweep]
    if sweep_sigmas and s_rows:
        progress("phase", {"name": "sigma sweep", "total": len(sweep_sigmas) * len(s_rows) * seeds * steps})
        for sg in sweep_sigmas:
            cfg_s = base_cfg.with_(sigma=sg)
            sweep_runs[sg] = {r.label: [] for r in s_rows}
            for seed in range(seeds):
                for row in s_rows:
                    if sg == float(sigma) and row.label in league:  # already run in the league
                        sweep_runs[sg][row.label].append(league[row.label][seed])
                        progress("advance", {"n": steps})
                        continue
                    t0 = time.perf_counter()
                    run = simulate_run(row, cfg_s, seed, **kw, on_step=lambda s: progress("advance", {}))
                    progress("advance", {"n": steps - int(run.steps[-1])})
                    sweep_runs[sg][row.label].append(run)
                    progress(
                        "run",
                        {
                            "label": f"{row.label} at sigma={sg:g}",
                            "seed": seed,
                            "wall": time.perf_counter() - t0,
                            "final": run.final_success(),
                        },
                    )
    elapsed = time.perf_counter() - t_start
    result = {
        "commit": commit,
        "config": base_cfg.to_dict(),
        "seeds": seeds,
        "steps": steps,
        "batch": batch,
        "n_mean": n_mean,
        "target": target,
        "embedder": embedder,
        "elapsed_s": elapsed,
        "league": {lbl: [r.to_dict() for r in rs] for lbl, rs in league.items()},
        "sweep": {str(sg): {lbl: [r.to_dict() for r in rs] for lbl, rs in d.items()} for sg, d in sweep_runs.items()},
    }
    (out / "simulate.json").write_text(json.dumps(result))
    _write_simulate_report(out, result, league, sweep_runs, rows, base_cfg, wall, command, kw, target)
    return result


def _write_simulate_report(
    out: Path,
    result: dict[str, Any],
    league: dict[str, list[SimRun]],
    sweep_runs: dict[float, dict[str, list[SimRun]]],
    rows: Sequence[RowSpec],
    cfg: SimConfig,
    wall: dict[str, float],
    command: str,
    kw: _SimRunKwargs,
    target: float,
) -> Path:
    budget = kw["batch"] * kw["n_mean"]
    total = kw["steps"] * budget
    seeds = result["seeds"]
    plots = []
    curves = {lbl: [(r.cum_rollouts / 1e3, r.success) for r in rs] for lbl, rs in league.items()}
    plots.append(
        plot_bands(
            curves,
            out / "simulate_success.png",
            xlabel="cumulative rollouts (thousands)",
            ylabel="mean success over the pool (true p)",
            title=f"simulator, sigma={cfg.sigma:g}: mean ± 95% CI over {seeds} seeds",
            hline=target,
        )
    )
    if sweep_runs:
        sigmas = sorted(sweep_runs)
        labels = list(next(iter(sweep_runs.values())))
        series_final = {
            lbl: (sigmas, [[r.final_success() for r in sweep_runs[s][lbl]] for s in sigmas]) for lbl in labels
        }
        plots.append(
            plot_lines(
                series_final,
                out / "simulate_sweep_final.png",
                xlabel="sigma (reward-independent score noise)",
                ylabel=f"mean success after {total / 1e3:g}k rollouts",
                title="sigma sweep: final mean success (± 95% CI)",
                logx=True,
            )
        )
        if "uniform" in labels:
            series_delta = {}
            for lbl in labels:
                if lbl == "uniform":
                    continue
                vals = []
                for s in sigmas:
                    base = {r.seed: r.auc() for r in sweep_runs[s]["uniform"]}
                    vals.append([r.auc() - base[r.seed] for r in sweep_runs[s][lbl] if r.seed in base])
                series_delta[lbl] = (sigmas, vals)
            plots.append(
                plot_lines(
                    series_delta,
                    out / "simulate_sweep_delta.png",
                    xlabel="sigma (reward-independent score noise)",
                    ylabel="mean success over the run (AUC) minus uniform's, same seed",
                    title="sigma sweep: paired AUC difference to uniform (± 95% CI)",
                    logx=True,
                    hline=0.0,
                )
            )
    headers, table = _league_rows(league, target)
    lines = [
        "# Simulator league table",
        "",
        provenance(
            command,
            {
                "simulator": ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()),
                "run": f"{seeds} seeds x {kw['steps']} steps x {kw['batch']} prompts x {kw['n_mean']} rollouts "
                f"(budget {budget}/step, {total} cumulative for every row); n in [2, 32]; "
                f"embedder {kw['embedder']}; DAPO at most {kw['dapo_max_batches']} generation batches a step",
                "wall time": f"{result['elapsed_s']:.0f} s",
            },
            commit=result.get("commit"),
        ),
        f"## League at sigma = {cfg.sigma:g} (target mean success {target:g})",
        "",
        "Mean ± 95% t-interval over seeds. *Δ ... vs uniform*: minus uniform's on the same seed (same world, prompt",
        "order and random numbers). *mean success (AUC)*: the success curve averaged over cumulative rollouts",
        "(area under the curve / budget), which averages out the random walk of a single end point.",
        "*var / uniform*, *var / oracle*: the plan's expected gradient variance",
        "(the allocator's estimator model, summed over the batch) under the TRUE p, divided by that of the uniform",
        "plan and of the exact minimum-variance plan (vip_pure with oracle p, no drops) of the same batch, averaged",
        "over steps; plans that drop prompts can go below the oracle because a dropped prompt counts 0.",
        "*zero-var groups*: generated groups whose rewards are all equal. *kept prompts*: share of planned prompts",
        "that got rollouts. Steps/rollouts to target are over the seeds that reached it.",
        "",
        md_table(headers, table),
        "",
        "Wall time per row (all seeds): " + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items()) + ".",
        "",
    ]
    lines += _telemetry_lines(league)
    for lbl, rs in league.items():
        b = [r.extra["dapo_batches_mean"] for r in rs if "dapo_batches_mean" in r.extra]
        if b:
            lines.append(
                f"{lbl}: {np.mean(b):.2f} generation batches a step on average, so "
                f"{np.mean([r.steps[-1] for r in rs]):.0f} steps within the same rollouts."
            )
    from vipalloc.bench.two_phase_sim import two_phase_report_lines

    lines += ["", *two_phase_report_lines(league)]  # Brier before/after the pilot, when there are two-phase rows
    lines += [
        "",
        f"![success curves]({Path(plots[0]).name})",
        "",
    ]
    if sweep_runs:
        sigmas = sorted(sweep_runs)
        labels = list(next(iter(sweep_runs.values())))
        lines += [
            "## Sigma sweep: where allocation matters",
            "",
            f"After {total} rollouts (mean ± 95% CI over {seeds} seeds); in brackets the paired difference to",
            "uniform.",
            "",
        ]
        for title, fn in (
            ("final mean success", SimRun.final_success),
            ("mean success over the run (AUC)", SimRun.auc),
        ):
            sweep_table = []
            for lbl in labels:
                cells = [lbl]
                for s in sigmas:
                    cell = fmt_ci([fn(r) for r in sweep_runs[s][lbl]])
                    if lbl != "uniform" and "uniform" in sweep_runs[s]:
                        base = {r.seed: fn(r) for r in sweep_runs[s]["uniform"]}
                        d = [fn(r) - base[r.seed] for r in sweep_runs[s][lbl] if r.seed in base]
                        cell += f" [{fmt_ci(d, signed=True)}]"
                    cells.append(cell)
                sweep_table.append(cells)
            lines += [f"**{title}**", "", md_table(["row"] + [f"sigma={s:g}" for s in sigmas], sweep_table), ""]
        lines += [f"![sweep]({Path(p).name})" for p in plots[1:]]
        lines.append("")
    path = out / "simulate.md"
    path.write_text("\n".join(lines))
    return path


_TELEMETRY_COLUMNS = (
    ("vip/share_hopeless", "rollouts on p̂ < 0.05", "{:.1%}"),
    ("vip/share_solved", "rollouts on p̂ > 0.95", "{:.1%}"),
    ("vip/num_dropped", "dropped / step", "{:.1f}"),
    ("vip/mean_n", "mean n (kept)", "{:.2f}"),
    ("vip/max_n", "max n", "{:.1f}"),
    ("vip/frac_zero_var_groups", "zero-var groups", "{:.3f}"),
    ("vip/pred_abs_err", "|p̂ - rate|", "{:.3f}"),
)


def _telemetry_lines(league: dict[str, list[SimRun]]) -> list[str]:
    """Where the budget goes, per row: the shared ``vip/*`` telemetry averaged over steps, then over seeds."""
    rows = []
    for lbl, rs in league.items():
        tel = [r.extra["telemetry"] for r in rs if r.extra.get("telemetry")]
        if not tel:
            continue
        cells = [lbl]
        for key, _, fmt in _TELEMETRY_COLUMNS:
            vals = [t[key] for t in tel if key in t and np.isfinite(t[key])]
            cells.append(fmt.format(float(np.mean(vals))) if vals else "—")
        rows.append(cells)
    if not rows:
        return []
    return [
        "",
        "**Where the budget goes** (the `vip/*` telemetry every trainer and plug-in logs, mean over steps and seeds;",
        "p̂ = the allocator's prediction before generating; a two-phase row counts each prompt's pilot + commit group):",
        "",
        md_table(["row", *(name for _, name, _ in _TELEMETRY_COLUMNS)], rows),
        "",
    ]
