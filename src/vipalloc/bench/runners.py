"""Benchmark runners behind ``vipalloc bench ...``: league table on the simulator, predictor calibration,
allocator overhead vs peers, and the real CPU-training comparison. Each ``run_*`` function returns its raw results
(JSON-ready) and writes a markdown report with PNG plots; nothing here asserts a result.

Every strategy and predictor is reached through :class:`vipalloc.Allocator`; plans are scored against the TRUE
success probabilities of the simulator with :func:`vipalloc.variance.gradient_variance` (via
``Allocator.expected_variance``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from vipalloc.bench.report import fmt_ci, git_commit, md_table, plot_bands, plot_lines, provenance
from vipalloc.bench.simulator import PromptStream, SimConfig, Simulator

__all__ = [
    "DEFAULT_ROWS",
    "SWEEP_ROWS",
    "RowSpec",
    "SimRun",
    "parse_rows",
    "run_simulate",
    "simulate_run",
]

Progress = Callable[[str, dict[str, Any]], None]


def _noop(kind: str, info: dict[str, Any]) -> None:
    return None


# ================================================================================================ simulate
@dataclass(frozen=True)
class RowSpec:
    """One league-table row: an allocation strategy with a predictor, or DAPO dynamic sampling (``dapo=True``:
    uniform groups, only mixed groups kept, extra batches until the batch is full or ``dapo_max_batches``)."""

    label: str
    strategy: str
    predictor: str
    dapo: bool = False


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


@dataclass
class SimRun:
    """One (row, seed) run. Curves have one entry per logged point (index 0 = before training); per-step arrays
    one entry per training step. Variances are the allocator estimator's model under the TRUE p, summed over the
    batch (NaN for DAPO, whose kept batch is chosen after seeing rewards)."""

    label: str
    seed: int
    sigma: float
    steps: np.ndarray  # int (T+1,)
    cum_rollouts: np.ndarray  # int (T+1,)
    success: np.ndarray  # float (T+1,), exact mean success over the pool
    var_plan: np.ndarray  # float (T,)
    var_uniform: np.ndarray  # float (T,), the uniform plan of the same batch
    var_oracle: np.ndarray  # float (T,), the exact min-variance plan under the true p (vip_pure + oracle p)
    zero_var_frac: np.ndarray  # float (T,), generated groups with all-equal rewards
    kept_frac: np.ndarray  # float (T,), planned prompts with at least one rollout
    alloc_seconds: np.ndarray  # float (T,), plan + observe wall time
    total_rollouts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def final_success(self) -> float:
        """Mean success at the end of the equal-rollout budget."""
        return float(self.success[-1])

    def auc(self) -> float:
        """Mean success averaged over the cumulative-rollout axis (area under the curve / total rollouts): a
        learning-speed summary that averages out the random walk of a single end point."""
        x = np.asarray(self.cum_rollouts, np.float64)
        if x[-1] <= 0:
            return float(self.success[-1])
        y = np.asarray(self.success, np.float64)
        return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) / x[-1])

    def reach(self, target: float) -> tuple[float, float]:
        """``(steps, cumulative rollouts)`` at which the mean success first reached ``target`` (NaN if never)."""
        hit = np.flatnonzero(self.success >= target)
        if not hit.size:
            return float("nan"), float("nan")
        k = int(hit[0])
        return float(self.steps[k]), float(self.cum_rollouts[k])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "seed": self.seed, "sigma": self.sigma}
        for k in (
            "steps",
            "cum_rollouts",
            "success",
            "var_plan",
            "var_uniform",
            "var_oracle",
            "zero_var_frac",
            "kept_frac",
            "alloc_seconds",
        ):
            out[k] = [None if not np.isfinite(v) else float(v) for v in np.asarray(getattr(self, k), float)]
        out["total_rollouts"] = self.total_rollouts
        out.update(self.extra)
        return out


def _alloc_estimator(sim_estimator: str) -> str:
    # GRPO is a valid training loss but no allocation target: its allocations use Dr.GRPO's variance
    return "rloo" if sim_estimator == "rloo" else "drgrpo"


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
    from vipalloc import Allocator

    if not (2 <= n_min <= n_mean <= n_max):
        raise ValueError(f"need 2 <= n_min <= n_mean <= n_max, got {n_min}, {n_mean}, {n_max}")
    if batch > cfg.n_prompts:
        raise ValueError(f"batch ({batch}) cannot exceed the pool size n_prompts ({cfg.n_prompts})")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    sim = Simulator(cfg, seed)
    stream = PromptStream(cfg.n_prompts, seed)
    rng_r = np.random.default_rng([seed, 1])  # rewards of the planned batch
    rng_g = np.random.default_rng([seed, 2])  # gradient noise
    rng_x = np.random.default_rng([seed, 3])  # rewards of DAPO's extra batches
    est = _alloc_estimator(cfg.estimator)
    common = {"estimator": est, "n_min": n_min, "n_max": n_max, "seed": seed, "embedder": embedder}
    alloc = Allocator(strategy=row.strategy, predictor=row.predictor, **common)
    shadow_uniform = Allocator(strategy="uniform", predictor="empirical", **common)
    shadow_oracle = Allocator(strategy="vip_pure", predictor="oracle", **common)
    budget = batch * n_mean
    total = steps * budget
    cum = 0
    t = 0
    log_steps, log_cum, log_succ = [0], [0], [sim.mean_success()]
    var_plan: list[float] = []
    var_uni: list[float] = []
    var_orc: list[float] = []
    zero_var: list[float] = []
    kept_frac: list[float] = []
    alloc_s: list[float] = []
    dapo_batches: list[int] = []
    while cum < total:
        idx = stream.next(batch)
        ids = [sim.ids[i] for i in idx]
        texts = [sim.texts[i] for i in idx]
        p_true = sim.true_p(idx)
        if row.predictor == "oracle":
            alloc.predictor.set_true_p(ids, p_true)
        t0 = time.perf_counter()
        plan = alloc.plan(ids, prompts=texts, budget=budget, step=t)
        a_s = time.perf_counter() - t0
        rewards = sim.rollouts(idx, plan.counts, rng_r, width=n_max)
        t0 = time.perf_counter()
        alloc.observe(ids, rewards, step=t)
        a_s += time.perf_counter() - t0
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
            var_plan.append(float("nan"))
            var_uni.append(float("nan"))
            var_orc.append(float("nan"))
        else:
            uni = shadow_uniform.plan(ids, prompts=texts, budget=budget, step=t).counts
            shadow_oracle.predictor.set_true_p(ids, p_true)
            orc = shadow_oracle.plan(ids, prompts=texts, budget=budget, step=t).counts
            var_plan.append(alloc.expected_variance(p_true, plan.counts))
            var_uni.append(alloc.expected_variance(p_true, uni))
            var_orc.append(alloc.expected_variance(p_true, orc))
        alloc_s.append(a_s)
        zero_var.append(float(np.mean([r.min() == r.max() for r in generated])) if generated else float("nan"))
        kept_frac.append(float(np.mean(plan.counts > 0)))
        if len(train_idx):
            sim.update(sim.gradient(train_idx, train_rewards, rng_g, p=sim.true_p(train_idx), batch_size=batch))
        else:  # DAPO found no mixed group: no update, but the noise generator still advances alike
            rng_g.standard_normal((0, cfg.dim))
        cum += used
        t += 1
        log_steps.append(t)
        log_cum.append(cum)
        log_succ.append(sim.mean_success())
        if on_step is not None:
            on_step(t)
    extra: dict[str, Any] = {"estimator": cfg.estimator}
    if row.dapo:
        extra["dapo_batches_mean"] = float(np.mean(dapo_batches))
    return SimRun(
        label=row.label,
        seed=seed,
        sigma=cfg.sigma,
        steps=np.asarray(log_steps),
        cum_rollouts=np.asarray(log_cum),
        success=np.asarray(log_succ),
        var_plan=np.asarray(var_plan),
        var_uniform=np.asarray(var_uni),
        var_oracle=np.asarray(var_orc),
        zero_var_frac=np.asarray(zero_var),
        kept_frac=np.asarray(kept_frac),
        alloc_seconds=np.asarray(alloc_s),
        total_rollouts=total,
        extra=extra,
    )


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
    progress: Progress = _noop,
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
            wall[row.label] += time.perf_counter() - t0
            league[row.label].append(run)
            progress("run", {"label": row.label, "seed": seed, "final": run.final_success()})
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
                    run = simulate_run(row, cfg_s, seed, **kw, on_step=lambda s: progress("advance", {}))
                    progress("advance", {"n": steps - int(run.steps[-1])})
                    sweep_runs[sg][row.label].append(run)
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
    for lbl, rs in league.items():
        b = [r.extra["dapo_batches_mean"] for r in rs if "dapo_batches_mean" in r.extra]
        if b:
            lines.append(
                f"{lbl}: {np.mean(b):.2f} generation batches a step on average, so "
                f"{np.mean([r.steps[-1] for r in rs]):.0f} steps within the same rollouts."
            )
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


# ================================================================================================ predictors
@dataclass
class Trace:
    """Rollout outcomes of a run, step by step: per step the prompt ids, texts, successes and trials (int arrays,
    aligned), and in simulations the true success probabilities at that step (else None)."""

    name: str
    steps: list[dict[str, Any]]

    def save(self, path: str | Path) -> None:
        """JSON Lines, one step per line (arrays as lists)."""
        from vipalloc._io import atomic_write_text

        lines = []
        for st in self.steps:
            rec = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
            lines.append(json.dumps(rec))
        atomic_write_text(path, "".join(line + "\n" for line in lines))

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> Trace:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"{p}: no such trace file")
        steps = []
        for lineno, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                st = {
                    "step": int(rec["step"]),
                    "ids": [str(i) for i in rec["ids"]],
                    "texts": [str(t) for t in rec["texts"]],
                    "successes": np.asarray(rec["successes"], np.int64),
                    "trials": np.asarray(rec["trials"], np.int64),
                    "p_true": None if rec.get("p_true") is None else np.asarray(rec["p_true"], np.float64),
                }
            except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
                raise ValueError(f"{p}: line {lineno}: not a trace step ({exc})") from None
            steps.append(st)
        if not steps:
            raise ValueError(f"{p}: the trace is empty")
        return cls(name or p.stem, steps)


def simulator_trace(
    cfg: SimConfig,
    seed: int,
    *,
    steps: int = 60,
    batch: int = 64,
    n_rollouts: int = 8,
    new_frac: float = 0.25,
    pool: int = 512,
) -> Trace:
    """A simulated training run with uniform allocation (``n_rollouts`` each), recorded as a :class:`Trace`.

    Each step's batch has ``round(new_frac * batch)`` never-seen prompts (drawn once from a reserve) and the rest
    from a recurring pool of ``pool`` prompts visited in epochs, so every step scores both kinds. The policy learns
    (Dr.GRPO updates, ``cfg.sigma`` noise), so success rates drift as in training.
    """
    from vipalloc import Allocator

    n_new = int(round(new_frac * batch))
    n_old = batch - n_new
    if n_old > pool:
        raise ValueError(f"the recurring part of a batch ({n_old}) exceeds the pool ({pool})")
    sim = Simulator(cfg.with_(n_prompts=pool + n_new * steps), seed)
    stream = PromptStream(pool, seed)
    rng_r = np.random.default_rng([seed, 11])
    rng_g = np.random.default_rng([seed, 12])
    alloc = Allocator(strategy="uniform", predictor="empirical", n_min=2, n_max=max(2, n_rollouts), seed=seed)
    out = []
    for t in range(steps):
        idx = np.concatenate(
            [stream.next(n_old) if n_old else np.zeros(0, np.int64), pool + t * n_new + np.arange(n_new)]
        )
        ids = [sim.ids[i] for i in idx]
        plan = alloc.plan(ids, budget=n_rollouts * len(idx), step=t)
        p = sim.true_p(idx)
        rewards = sim.rollouts(idx, plan.counts, rng_r)
        alloc.observe(ids, rewards, step=t)
        out.append(
            {
                "step": t,
                "ids": ids,
                "texts": [sim.texts[i] for i in idx],
                "successes": np.array([int(r.sum()) for r in rewards], np.int64),
                "trials": np.array([len(r) for r in rewards], np.int64),
                "p_true": p,
            }
        )
        sim.update(sim.gradient(idx, rewards, rng_g, p=p))
    return Trace(f"simulator seed {seed}", out)


def trainer_trace(
    out_dir: str | Path,
    *,
    steps: int = 60,
    prompts_per_step: int = 32,
    n_mean: int = 8,
    pool_size: int = 256,
    seed: int = 0,
    progress: Progress = _noop,
) -> Trace:
    """Run the real CPU trainer (uniform allocation, Dr.GRPO) and record its rollout outcomes as a :class:`Trace`.

    A run folder under ``out_dir`` is reused (the trainer resumes from its checkpoint), so a second call is fast.
    """
    from vipalloc.training.config import TrainConfig
    from vipalloc.training.trainer import Trainer, checkpoint_config, same_run, warmup_policy

    cfg = TrainConfig(
        run_dir=str(Path(out_dir) / "trace_run"),
        strategy="uniform",
        predictor="empirical",
        embedder="hashing",
        seed=seed,
        steps=steps,
        prompts_per_step=prompts_per_step,
        n_mean=n_mean,
        pool_size=pool_size,
        eval_every=max(steps, 1),
        ckpt_every=10,
        tensorboard=False,
    )
    progress("phase", {"name": "trainer trace: warm-up (cached)", "total": steps})
    old = checkpoint_config(cfg.run_dir)
    if Path(cfg.run_dir).exists() and (old is None or not same_run(old, cfg)):
        shutil.rmtree(cfg.run_dir)  # written by another configuration (e.g. an older version): trace afresh
    warm = warmup_policy(cfg)
    trainer = Trainer(cfg, warm_state=warm)
    trainer.run(progress=lambda s, n, rec: progress("advance", {}))
    texts = {p.prompt_id: p.prompt for p in trainer.pool}
    out = []
    for step, ids, succ, trials in trainer.alloc.history.iter_steps():
        out.append(
            {
                "step": int(step),
                "ids": list(ids),
                "texts": [texts[i] for i in ids],
                "successes": np.asarray(succ, np.int64),
                "trials": np.asarray(trials, np.int64),
                "p_true": None,
            }
        )
    return Trace(f"CPU trainer (seed {seed}, {steps} steps, pool {pool_size})", out)


PREDICTOR_SPECS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("gp (vipalloc)", "gp", {}),
    ("gp (paper)", "gp", {"preset": "paper"}),
    ("beta", "beta", {}),
    ("empirical", "empirical", {}),
    ("ridge", "ridge", {}),
)


def replay_predictor(
    trace: Trace, predictor: str, predictor_kwargs: dict[str, Any] | None = None, embedder: str = "hashing"
) -> dict[str, Any]:
    """Replay ``trace`` through an ``Allocator(strategy="uniform", predictor=...)``: at each step predict the
    batch (``plan``), score against what the step produced, then ``observe`` it. Step 0 is not scored (nothing to
    predict from). Returns metrics for all / seen-before / never-seen prompts and the mean seconds per step."""
    from vipalloc import Allocator
    from vipalloc.predictors.metrics import calibration_metrics, merge_metrics

    n_max = max(2, max(int(st["trials"].max()) for st in trace.steps))
    alloc = Allocator(
        strategy="uniform",
        predictor=predictor,
        n_min=2,
        n_max=n_max,
        embedder=embedder,
        predictor_kwargs=predictor_kwargs,
    )
    seen: set[str] = set()
    parts: dict[str, list[dict[str, Any]]] = {"all": [], "seen": [], "never seen": []}
    secs = []
    for st in trace.steps:
        ids, s, n = st["ids"], st["successes"], st["trials"]
        if predictor == "oracle":
            if st["p_true"] is None:
                raise ValueError("the oracle predictor needs a trace with true p (a simulator trace)")
            alloc.predictor.set_true_p(ids, st["p_true"])
        t0 = time.perf_counter()
        # budget = the step's rollouts; the uniform plan only has to cover every prompt's rollouts
        plan = alloc.plan(
            ids, prompts=st["texts"], budget=min(int(n.max()) * len(ids), n_max * len(ids)), step=st["step"]
        )
        rewards = [np.r_[np.ones(si), np.zeros(ni - si)] for si, ni in zip(s, n)]
        alloc.observe(ids, rewards, step=st["step"])
        secs.append(time.perf_counter() - t0)
        if st["step"] > trace.steps[0]["step"]:
            mask_seen = np.array([i in seen for i in ids])
            pt = st["p_true"]
            for key, mask in (("all", np.ones(len(ids), bool)), ("seen", mask_seen), ("never seen", ~mask_seen)):
                if mask.any():
                    parts[key].append(
                        calibration_metrics(plan.p_mean[mask], s[mask], n[mask], None if pt is None else pt[mask])
                    )
        seen.update(ids)
    return {
        "metrics": {k: merge_metrics(v) for k, v in parts.items()},
        "seconds_per_step": float(np.mean(secs)),
    }


_CAL_COLS = ("brier", "log_loss", "mae_rate", "spearman_rate", "mae_true", "spearman_true")


def run_predictors(
    out_dir: str | Path = "reports",
    *,
    seeds: int = 3,
    steps: int = 60,
    batch: int = 64,
    pool: int = 512,
    config: SimConfig | None = None,
    train_trace: bool = True,
    train_steps: int = 60,
    trace_path: str | Path | None = None,
    minilm: bool = True,
    command: str = "vipalloc bench predictors",
    progress: Progress = _noop,
) -> dict[str, Any]:
    """Next-step calibration of every predictor on simulator traces (``seeds`` of them, with the oracle as the
    noise floor) and on one trace of the real CPU trainer. Writes ``predictors.md`` / ``predictors.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config or SimConfig()
    commit = git_commit()
    t_start = time.perf_counter()
    specs = list(PREDICTOR_SPECS)
    sim_specs = specs + [("oracle (true p)", "oracle", {})]
    sim_res: dict[str, list[dict[str, Any]]] = {lbl: [] for lbl, _, _ in sim_specs}
    progress("phase", {"name": "simulator traces", "total": seeds * len(sim_specs)})
    for seed in range(seeds):
        trace = simulator_trace(cfg, seed, steps=steps, batch=batch, pool=pool)
        if seed == 0:
            trace.save(out / "predictors_sim_trace_seed0.jsonl")
        for lbl, name, kw in sim_specs:
            sim_res[lbl].append(replay_predictor(trace, name, kw))
            progress("advance", {})
    train_res: dict[str, dict[str, Any]] = {}
    train_name = None
    if train_trace or trace_path is not None:
        if trace_path is not None:
            tr = Trace.load(trace_path)
        else:
            tr = trainer_trace(out / "predictors_train", steps=train_steps, progress=progress)
            tr.save(out / "predictors_train_trace.jsonl")
        train_name = tr.name
        t_specs = list(specs)
        if minilm:
            t_specs.append(("gp (vipalloc, MiniLM)", "gp", {}))
        progress("phase", {"name": "trainer trace replay", "total": len(t_specs)})
        for lbl, name, kw in t_specs:
            emb = "minilm" if "MiniLM" in lbl else "hashing"
            try:
                train_res[lbl] = replay_predictor(tr, name, kw, embedder=emb)
            except ImportError as exc:  # MiniLM not installed: say so in the report
                train_res[lbl] = {"error": str(exc)}
            progress("advance", {})
    elapsed = time.perf_counter() - t_start
    result = {
        "commit": commit,
        "config": cfg.to_dict(),
        "seeds": seeds,
        "steps": steps,
        "batch": batch,
        "elapsed_s": elapsed,
        "simulator": sim_res,
        "trainer": train_res,
        "trainer_trace": train_name,
    }
    (out / "predictors.json").write_text(json.dumps(result, default=float))
    # ---- report
    lines = [
        "# Predictor calibration (next-step)",
        "",
        provenance(
            command,
            {
                "simulator traces": f"{seeds} seeds x {steps} steps x {batch} prompts x 8 rollouts (uniform), 25% "
                f"of each batch never seen before; sigma={cfg.sigma:g}, lr={cfg.lr:g}; embedder hashing",
                "trainer trace": train_name or "not run",
                "wall time": f"{elapsed:.0f} s",
            },
            commit=commit,
        ),
        "At each step every predictor (through `Allocator.plan`) predicts the batch's success probabilities",
        "before seeing that step's rollouts; then the rollouts are observed. Scores per prompt, averaged over",
        "prompts and steps (step 0 excluded): Brier and log loss per rollout, MAE and Spearman correlation of the",
        "prediction vs the realised rate (a noisy target: even the true p has MAE > 0 there, see the oracle row) and,",
        "in the simulator, vs the true p. *seen*: prompts observed at an earlier step; *never seen*: first appearance.",
        "",
        "## Simulator traces (mean ± 95% CI over seeds)",
        "",
    ]
    headers = [
        "predictor",
        "prompts",
        "Brier",
        "log loss",
        "MAE vs rate",
        "Spearman vs rate",
        "MAE vs true p",
        "Spearman vs true p",
        "ms/step",
    ]
    for subset in ("all", "seen", "never seen"):
        rows = []
        for lbl, rs in sim_res.items():
            mets = [r["metrics"][subset] for r in rs]
            rows.append(
                [lbl, f"{np.mean([m['count'] for m in mets]):.0f}"]
                + [fmt_ci([m[c] for m in mets]) for c in _CAL_COLS]
                + [fmt_ci([1e3 * r["seconds_per_step"] for r in rs], digits=1)]
            )
        lines += [f"### {subset} prompts", "", md_table(headers, rows), ""]
    if train_res:
        lines += [f"## Real CPU trainer trace: {train_name}", "", "One trace (no true p: only realised rates).", ""]
        h2 = ["predictor", "subset", "prompts", "Brier", "log loss", "MAE vs rate", "Spearman vs rate", "ms/step"]
        rows = []
        for lbl, r in train_res.items():
            if "error" in r:
                rows.append([lbl, "—", "—", r["error"], "", "", "", ""])
                continue
            for subset in ("all", "seen", "never seen"):
                m = r["metrics"][subset]
                rows.append(
                    [lbl, subset, str(m["count"])]
                    + [f"{m[c]:.4f}" if np.isfinite(m[c]) else "—" for c in _CAL_COLS[:4]]
                    + [f"{1e3 * r['seconds_per_step']:.1f}"]
                )
        lines += [md_table(h2, rows), ""]
    (out / "predictors.md").write_text("\n".join(lines))
    return result


# ================================================================================================ overhead
def _synthetic_texts(prefix: str, n: int, rng: np.random.Generator) -> list[str]:
    """Arithmetic-style prompt texts (distinct), for embedding cost and GP features."""
    a, b, c, d = (rng.integers(1, 999, size=n) for _ in range(4))
    ops = np.array(["+", "-", "*"])[rng.integers(0, 3, size=n)]
    return [
        f"[{prefix}{i}] Compute {a[i]} {ops[i]} {b[i]} * {c[i]} and give the result modulo {d[i]}." for i in range(n)
    ]


def _history_rows(rows: int, pool: int, seed: int, rows_per_step: int = 1024) -> Any:
    """A synthetic :class:`RolloutHistory` with ``rows`` (step, prompt) rows over a pool of ``pool`` prompts."""
    from vipalloc.history import RolloutHistory

    rng = np.random.default_rng(seed)
    texts = _synthetic_texts("h", pool, rng)
    ids = [f"h{i}" for i in range(pool)]
    logit_p = rng.normal(0.0, 1.5, size=pool)
    h = RolloutHistory()
    step = 0
    left = rows
    seen_text: set[int] = set()
    while left > 0:
        k = min(rows_per_step, left, pool)
        idx = rng.choice(pool, size=k, replace=False)
        trials = rng.integers(4, 17, size=k)
        succ = rng.binomial(trials, 1.0 / (1.0 + np.exp(-(logit_p[idx] + 0.01 * step))))
        new = [i for i in idx if i not in seen_text]
        if new:  # texts ride on a first reward-array row so GP predictors can embed history prompts
            pos = {int(i): j for j, i in enumerate(idx)}
            h.extend(
                step,
                [ids[i] for i in new],
                [np.r_[np.ones(succ[pos[i]]), np.zeros(trials[pos[i]] - succ[pos[i]])] for i in new],
                prompts=[texts[i] for i in new],
            )
            seen_text.update(int(i) for i in new)
        old = np.array([i for i in idx if i not in set(new)], np.int64)
        if old.size:
            pos = {int(i): j for j, i in enumerate(idx)}
            sel = np.array([pos[int(i)] for i in old])
            h.extend_counts(step, [ids[i] for i in old], succ[sel], trials[sel])
        left -= k
        step += 1
    return h


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares exponent ``b`` of ``y ~ a x^b`` over the finite positive points (NaN if < 2)."""
    x = np.asarray(xs, float)
    y = np.asarray(ys, float)
    ok = np.isfinite(y) & (y > 0) & (x > 0)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def _load_peer(path: Path, name: str) -> Any | None:
    import importlib.util

    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _quiet_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Time ``fn()`` with its prints swallowed (the peers' code prints diagnostics)."""
    import contextlib
    import io
    import warnings

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def _solver_row(
    p: np.ndarray, budget: int, caps: dict[str, int], vip_peer: Any, ks_peer: Any, n_mean: int
) -> dict[str, Any]:
    """Time every solver on the same predicted ``p`` (one batch); objectives of the vip-objective solvers."""
    from vipalloc import Allocator
    from vipalloc.allocation import objective
    from vipalloc.bench.peers import authors_bisection_allocate, authors_slsqp_allocate, knapsack_dp_allocate

    m = len(p)
    row: dict[str, Any] = {"m": m}

    def ours(strategy: str) -> tuple[float, np.ndarray]:
        a = Allocator(strategy=strategy, predictor="oracle", n_min=2, n_max=32, seed=0)
        ids = [f"o{j}" for j in range(m)]
        a.predictor.set_true_p(ids, np.clip(p, 0.0, 1.0))
        pl = a.plan(ids, budget=budget, step=0)
        return pl.timings["solve"], pl.counts

    def obj(n: np.ndarray) -> float:
        return objective(p, np.asarray(n), estimator="drgrpo", hardness_bonus=4e-4)

    row["ours_vip"], n_ours = ours("vip")
    row["ours_knapsack"], _ = ours("knapsack")
    row["obj_ours"] = obj(n_ours)
    if m <= caps["slsqp"]:
        row["slsqp"], n_s = _quiet_call(lambda: authors_slsqp_allocate(p, budget, estimator="drgrpo"))
        row["obj_slsqp"] = obj(n_s)
    row["bisection"], _ = _quiet_call(lambda: authors_bisection_allocate(p, budget))
    if m <= caps["dp"]:
        row["dp"], _ = _quiet_call(lambda: knapsack_dp_allocate(p, budget, n_min=2, n_max=32))
    if vip_peer is not None and m <= caps["peer"]:
        row["peer_vip"], n_v = _quiet_call(
            lambda: np.asarray(vip_peer.allocate_rollout(p, budget, lower=1, upper=32, allocation_rule="grpo"))
        )
        row["obj_peer_vip"] = obj(n_v)
    if ks_peer is not None and m <= caps["peer"]:
        # their input: [valid, success rate, count]; rates on the grid of an 8-rollout epoch estimate
        states = np.stack([np.ones(m), np.round(p * 8) / 8, np.full(m, 8.0)], axis=1)
        try:
            row["peer_knapsack"], _ = _quiet_call(
                lambda: ks_peer.sampling_budget_by_knapsack(states, n_mean, min_n=2, max_n=32)
            )
        except (AssertionError, ZeroDivisionError, ValueError) as exc:
            # their fallback divides by the number of p in {0, 1} prompts; with none it fails: rerun without it
            row["peer_knapsack_note"] = f"default call failed ({type(exc).__name__}); timed with allow_fallback=False"
            row["peer_knapsack"], _ = _quiet_call(
                lambda: ks_peer.sampling_budget_by_knapsack(states, n_mean, min_n=2, max_n=32, allow_fallback=False)
            )
    return row


def run_overhead(
    out_dir: str | Path = "reports",
    *,
    ms: Sequence[int] = (256, 1024, 4096, 16384),
    histories: Sequence[int] = (10_000, 50_000, 200_000),
    predictors: Sequence[str] = ("gp", "beta"),
    embedder: str = "hashing",
    n_mean: int = 8,
    slsqp_max: int = 1024,
    dp_max: int = 1024,
    peer_code: str | Path | None = None,
    peer_max: int = 256,
    gp_windows: Sequence[int] = (512, 1024, 2048, 4096, 8192),
    window_m: int = 4096,
    command: str = "vipalloc bench overhead",
    progress: Progress = _noop,
) -> dict[str, Any]:
    """Time ``plan()`` stage by stage (embed / observe / GP fit / predict / solve) and peak memory for batches of
    ``ms`` prompts after histories of ``histories`` rows; time the peers' solvers on the same predicted p; sweep
    the exact GP's window. Writes ``overhead.md`` / ``overhead.json`` and a PNG."""
    import tracemalloc

    from vipalloc import Allocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ms = sorted(int(m) for m in ms)
    histories = sorted(int(h) for h in histories)
    if not ms or not histories or min(ms) < 2 or min(histories) < 1:
        raise ValueError("need at least one batch size >= 2 and one history size >= 1")
    rng = np.random.default_rng(0)
    commit = git_commit()
    t_start = time.perf_counter()
    pool = 8192
    total = len(predictors) * len(histories) * len(ms) + len(ms) + len(gp_windows)
    progress("phase", {"name": "overhead", "total": total})
    stages: list[dict[str, Any]] = []
    p_for_solvers: dict[int, np.ndarray] = {}
    for h_rows in histories:
        hist = _history_rows(h_rows, pool, seed=h_rows)
        last = int(hist.last_step or 0)
        for pred in predictors:
            for m in ms:
                alloc = Allocator(strategy="vip", predictor=pred, n_min=2, n_max=32, embedder=embedder, seed=0)
                alloc.ingest_history(hist)
                ids = [f"b{m}-{j}" for j in range(m)]
                texts = _synthetic_texts(f"b{m}-", m, rng)
                budget = n_mean * m
                s0 = last + 1
                plan_a = alloc.plan(ids, prompts=texts, budget=budget, step=s0)  # new prompts: embedding cost
                rewards = [(rng.random(c) < 0.5).astype(float) for c in plan_a.counts]
                t0 = time.perf_counter()
                alloc.observe(ids, rewards, step=s0)
                t_obs = time.perf_counter() - t0
                t0 = time.perf_counter()
                plan_b = alloc.plan(ids, prompts=texts, budget=budget, step=s0 + 1)  # steady state: cached features
                t_plan = time.perf_counter() - t0
                t0 = time.perf_counter()
                alloc.predictor.predict(ids, s0 + 1)  # the fit is cached now: prediction alone
                t_pred = time.perf_counter() - t0
                rewards = [(rng.random(c) < 0.5).astype(float) for c in plan_b.counts]
                tracemalloc.start()
                alloc.observe(ids, rewards, step=s0 + 1)
                alloc.plan(ids, prompts=texts, budget=budget, step=s0 + 2)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                if pred == predictors[0] and h_rows == histories[-1]:
                    p_for_solvers[m] = plan_b.p_mean.copy()
                stages.append(
                    {
                        "predictor": pred,
                        "history_rows": h_rows,
                        "m": m,
                        "embed_new": plan_a.timings["embed"],
                        "observe": t_obs,
                        "fit": max(plan_b.timings["predict"] - t_pred, 0.0),
                        "predict": t_pred,
                        "solve": plan_b.timings["solve"],
                        "plan": t_plan,
                        "peak_mb": peak / 2**20,
                    }
                )
                progress("advance", {"label": f"{pred} H={h_rows} M={m}: plan {t_plan:.2f}s"})
    # ---- solvers on the same p
    peer_dir = Path(peer_code) if peer_code is not None else None
    vip_peer = _load_peer(peer_dir / "bernoulli_allocation.py", "_vip_authors_peer") if peer_dir else None
    ks_peer = _load_peer(peer_dir / "exploration_utils.py", "_knapsackrl_peer") if peer_dir else None
    solvers: list[dict[str, Any]] = []
    for m in ms:
        p = p_for_solvers.get(m)
        if p is None:
            p = rng.beta(0.6, 0.6, size=m)
        caps = {"slsqp": slsqp_max, "dp": dp_max, "peer": peer_max}
        row = _solver_row(p, n_mean * m, caps, vip_peer, ks_peer, n_mean)
        solvers.append(row)
        progress("advance", {"label": f"solvers M={m}"})
    # ---- exact-GP window sweep at M = window_m, largest history
    windows: list[dict[str, Any]] = []
    if "gp" in predictors and gp_windows:
        from vipalloc.predictors.gp import PRESETS

        hist = _history_rows(histories[-1], pool, seed=histories[-1])
        last = int(hist.last_step or 0)
        m = window_m
        ids = [f"w{j}" for j in range(m)]
        texts = _synthetic_texts("w", m, rng)
        for mp in gp_windows:
            kw: dict[str, Any] = {"max_points": int(mp)}
            if "max_history" in PRESETS["vipalloc"]:
                kw["max_history"] = max(int(PRESETS["vipalloc"]["max_history"]), int(mp))
            alloc = Allocator(strategy="vip", predictor="gp", n_min=2, n_max=32, embedder=embedder, predictor_kwargs=kw)
            alloc.ingest_history(hist)
            pl = alloc.plan(ids, prompts=texts, budget=n_mean * m, step=last + 1)
            alloc.observe(ids, [(rng.random(c) < 0.5).astype(float) for c in pl.counts], step=last + 1)
            t0 = time.perf_counter()
            pl = alloc.plan(ids, prompts=texts, budget=n_mean * m, step=last + 2)
            t_plan = time.perf_counter() - t0
            windows.append({"max_points": int(mp), "plan": t_plan, **{k: float(v) for k, v in pl.timings.items()}})
            progress("advance", {"label": f"GP window {mp}: plan {t_plan:.2f}s"})
    elapsed = time.perf_counter() - t_start
    result = {
        "commit": commit,
        "ms": ms,
        "histories": histories,
        "predictors": list(predictors),
        "embedder": embedder,
        "stages": stages,
        "solvers": solvers,
        "gp_windows": windows,
        "window_m": window_m,
        "peer_code": None if peer_dir is None else str(peer_dir),
        "gp_max_points": _gp_default_window(),
        "elapsed_s": elapsed,
    }
    (out / "overhead.json").write_text(json.dumps(result, default=float))
    _write_overhead_report(out, result, command)
    return result


def _gp_default_window() -> int | None:
    try:
        from vipalloc.predictors.gp import PRESETS

        return int(PRESETS["vipalloc"]["max_points"])
    except (ImportError, KeyError, TypeError, ValueError):
        return None


def _ms(v: Any) -> str:
    if v is None or not np.isfinite(v):
        return "—"
    v = 1e3 * float(v)
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def _rel(r: dict[str, Any], key: str) -> str:
    """Objective of ``r[key]`` relative to ours (``—`` when absent or ours is 0)."""
    if key not in r or not r.get("obj_ours"):
        return "—"
    return f"{r[key] / r['obj_ours']:.4f}"


def _write_overhead_report(out: Path, res: dict[str, Any], command: str) -> Path:
    stages = res["stages"]
    ms = res["ms"]
    cols = ("embed_new", "observe", "fit", "predict", "solve", "plan")
    names = ("embed (new prompts)", "observe", "GP fit", "predict", "solve", "plan() steady")
    lines = [
        "# Allocator overhead",
        "",
        provenance(
            command,
            {
                "embedder": res["embedder"],
                "budget": "8 rollouts a prompt, n in [2, 32]",
                "GP": f"preset vipalloc, default window max_points={res.get('gp_max_points', '?')}",
                "wall time": f"{res['elapsed_s']:.0f} s",
            },
            commit=res.get("commit"),
        ),
        "Times in milliseconds, one measurement each on a shared 2-core machine (expect ±30% noise).",
        "*embed (new prompts)*: `plan()`'s embedding time for a batch of never-seen prompts (the worst case; seen",
        "prompts are cached). *observe*: `Allocator.observe` of the batch's rewards. *GP fit*: `plan()`'s predict",
        "time minus a second, cached `predictor.predict` (the refit after new observations). *predict*: that",
        "cached prediction. *solve*: the strategy (vip, exact). *plan() steady*: the whole `plan()` after one",
        "observed step, features cached. *peak MB*: tracemalloc peak over one observe + plan.",
        "",
    ]
    for pred in res["predictors"]:
        for h in res["histories"]:
            rows = []
            for m in ms:
                r = next((s for s in stages if s["predictor"] == pred and s["history_rows"] == h and s["m"] == m), None)
                if r is None:
                    continue
                rows.append([str(m)] + [_ms(r[c]) for c in cols] + [f"{r['peak_mb']:.0f}"])
            lines += [
                f"## predictor `{pred}`, history {h:,} rows",
                "",
                md_table(["M"] + list(names) + ["peak MB"], rows),
            ]
        h = res["histories"][-1]
        sub = [s for s in stages if s["predictor"] == pred and s["history_rows"] == h]
        exps = [f"{n} {_slope([s['m'] for s in sub], [s[c] for s in sub]):.2f}" for c, n in zip(cols, names)]
        lines += [f"Scaling exponents in M (fit of t ~ M^b, history {h:,} rows): " + ", ".join(exps) + ".", ""]
    gp_big = [
        s for s in stages if s["predictor"] == "gp" and s["history_rows"] == res["histories"][-1] and s["m"] == 4096
    ]
    if gp_big:
        t = gp_big[0]["plan"]
        verdict = "meets" if t < 1.0 else "MISSES"
        lines += [
            f"**Target** `plan()` < 1 s at M = 4096 with {res['histories'][-1]:,} history rows (GP): {t:.2f} s, "
            f"{verdict} the target on this machine.",
            "",
        ]
    # solvers
    sol = res["solvers"]
    lines += [
        "## Solvers on the same predicted p (budget 8M)",
        "",
        "Our exact solvers (via `Allocator`, strategy `vip` and `knapsack`) next to re-implementations of the",
        "peers' approaches in `vipalloc.bench.peers` (the VIP authors' SLSQP + rounding and their bisection",
        "allocator; Knapsack-RL's dynamic program) and, where given with `--peer-code`, the peers' own public",
        "code run locally (not committed). *objective*: the vip objective (Dr.GRPO variance + 4e-4 log(p) n) of",
        "each plan relative to ours (> 1 = worse). '—': not run at that size (too slow; see the caps).",
        "",
    ]
    hdr = [
        "M",
        "ours vip ms",
        "ours knapsack ms",
        "SLSQP+rounding ms",
        "SLSQP objective",
        "bisection ms",
        "Knapsack DP ms",
        "authors' code ms",
        "authors' objective",
        "KnapsackRL code ms",
    ]
    rows = []
    for r in sol:
        rows.append(
            [
                str(r["m"]),
                _ms(r["ours_vip"]),
                _ms(r["ours_knapsack"]),
                _ms(r.get("slsqp")),
                _rel(r, "obj_slsqp"),
                _ms(r.get("bisection")),
                _ms(r.get("dp")),
                _ms(r.get("peer_vip")),
                _rel(r, "obj_peer_vip"),
                _ms(r.get("peer_knapsack")),
            ]
        )
    lines += [md_table(hdr, rows), ""]
    exps = []
    for key, name in (
        ("ours_vip", "ours vip"),
        ("ours_knapsack", "ours knapsack"),
        ("slsqp", "SLSQP"),
        ("bisection", "bisection"),
        ("dp", "Knapsack DP"),
        ("peer_vip", "authors' code"),
        ("peer_knapsack", "KnapsackRL code"),
    ):
        xs = [r["m"] for r in sol if key in r]
        if len(xs) >= 2:
            exps.append(f"{name} {_slope(xs, [r[key] for r in sol if key in r]):.2f}")
    if exps:
        lines += ["Scaling exponents in M: " + ", ".join(exps) + ".", ""]
    if res["peer_code"]:
        lines += [f"Peer code loaded from `{res['peer_code']}` (fetched locally, not committed).", ""]
        notes = sorted({r["peer_knapsack_note"] for r in sol if "peer_knapsack_note" in r})
        lines += [f"KnapsackRL code: {n}." for n in notes] + ([""] if notes else [])
    else:
        lines += ["Peer public code: not given (`--peer-code DIR` with the peers' files times it too).", ""]
    if res["gp_windows"]:
        default = res.get("gp_max_points")
        rows = [
            [
                f"{w['max_points']}{' (default)' if w['max_points'] == default else ''}",
                _ms(w["plan"]),
                _ms(w.get("embed")),
                _ms(w.get("predict")),
                _ms(w.get("solve")),
            ]
            for w in res["gp_windows"]
        ]
        lines += [
            f"## Exact GP window (`max_points`) at M = {res['window_m']}, {res['histories'][-1]:,} history rows",
            "",
            md_table(["max_points", "plan() ms", "embed ms", "predict (fit + predict) ms", "solve ms"], rows),
            "",
        ]
        fits = [(w["max_points"], w["predict"]) for w in res["gp_windows"]]
        lines += [
            "Predict-time exponent in the window size: "
            f"{_slope([f[0] for f in fits], [f[1] for f in fits]):.2f}. Largest window keeping plan() under 1 s: "
            + (str(max((w["max_points"] for w in res["gp_windows"] if w["plan"] < 1.0), default="none")) + "."),
            "",
        ]
        plot_lines(
            {
                "plan() seconds": (
                    [w["max_points"] for w in res["gp_windows"]],
                    [[w["plan"]] for w in res["gp_windows"]],
                )
            },
            out / "overhead_gp_window.png",
            xlabel="GP window (max_points rows)",
            ylabel="seconds",
            title=f"plan() vs exact-GP window, M={res['window_m']}",
            logx=True,
            logy=True,
            hline=1.0,
        )
        lines += ["![gp window](overhead_gp_window.png)", ""]
    path = out / "overhead.md"
    path.write_text("\n".join(lines))
    return path


# ================================================================================================ train
TRAIN_STRATEGIES: tuple[str, ...] = ("uniform", "vip", "knapsack", "dapo")


def run_train(
    out_dir: str | Path = "reports",
    *,
    strategies: Sequence[str] = TRAIN_STRATEGIES,
    seeds: int = 3,
    steps: int | None = None,
    quick: bool = False,
    jobs: int | None = None,
    command: str = "vipalloc bench train",
    progress: Progress = _noop,
    **overrides: Any,
) -> dict[str, Any]:
    """Real CPU training (``vipalloc.training``): every strategy x seed at equal cumulative rollouts
    (``steps * prompts_per_step * n_mean``; DAPO stops once its generated rollouts reach that). Writes
    ``train.md`` / ``train.json`` and accuracy-vs-rollouts PNGs; run folders go to ``<out_dir>/train_runs``.
    ``jobs``: worker processes (default one per CPU core); results do not depend on it."""

    from vipalloc.training.demo import demo_config
    from vipalloc.training.parallel import default_jobs, run_many
    from vipalloc.training.trainer import warmup_policy

    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not quick:  # the league keeps the roomier 8 rollouts a prompt (the demo runs the tight 4)
        overrides.setdefault("n_mean", 8)
    base = demo_config(quick, steps=steps, tensorboard=False, **overrides)
    total = base.steps * base.budget
    commit = git_commit()
    t_start = time.perf_counter()
    progress("phase", {"name": "warm-up (cached after the first run)", "total": 1})
    warm = warmup_policy(base)
    t_warm = time.perf_counter() - t_start
    progress("advance", {})
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
    cfgs = []
    for seed in range(seeds):
        for strat in strategies:
            run_dir = out / "train_runs" / f"{strat}-seed{seed}"
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a fresh run: the budget stop is not resumable
            cfgs.append(base.model_copy(update={"strategy": strat, "seed": seed, "run_dir": str(run_dir)}))
    n_jobs = jobs if jobs is not None else default_jobs(len(cfgs))
    progress("phase", {"name": f"training ({n_jobs} at a time)", "total": len(cfgs) * base.steps})

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "step":
            progress("advance", {"label": f"{info['label']} step {info['step']}"})
        elif kind == "done":
            progress("run", {"label": info["label"], "wall": info["wall_s"]})

    results = run_many(cfgs, warm, jobs=n_jobs, on_event=on_event, stop_at_rollouts=total)
    for cfg, res in zip(cfgs, results):
        runs[cfg.strategy].append(
            {"seed": cfg.seed, "metrics": res["metrics"], "wall_s": res["wall_s"], "steps_done": res["steps_done"]}
        )
    elapsed = time.perf_counter() - t_start
    result = {
        "commit": commit,
        "config": json.loads(base.model_dump_json()),
        "total_rollouts": total,
        "seeds": seeds,
        "warmup_s": t_warm,
        "jobs": n_jobs,
        "elapsed_s": elapsed,
        "runs": runs,
    }
    (out / "train.json").write_text(json.dumps(result))
    _write_train_report(out, result, command)
    return result


def _eval_curve(metrics: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    pts = [(m["cum_rollouts"], m["eval_acc"]) for m in metrics if "eval_acc" in m]
    arr = np.asarray(pts, np.float64)
    return arr[:, 0], arr[:, 1]


def _write_train_report(out: Path, res: dict[str, Any], command: str) -> Path:
    runs = res["runs"]
    cfg = res["config"]
    total = res["total_rollouts"]
    uni_final = {r["seed"]: _eval_curve(r["metrics"])[1][-1] for r in runs.get("uniform", [])}
    auc_grid = np.linspace(0.0, float(total), 41)[1:]

    def auc(r: dict[str, Any]) -> float:
        # mean accuracy over the run: the curve interpolated on a common rollout grid (DAPO evaluates off-grid)
        x, y = _eval_curve(r["metrics"])
        return float(np.mean(np.interp(auc_grid, x, y)))

    uni_auc = {r["seed"]: auc(r) for r in runs.get("uniform", [])}
    target = float(np.mean(list(uni_final.values()))) if uni_final else float("nan")
    headers = [
        "strategy",
        "final eval accuracy",
        "Δ vs uniform (paired)",
        "mean acc over run",
        "Δ mean acc vs uniform (paired)",
        "rollouts to uniform's final acc (k)",
        "reached",
        "train reward",
        "mixed groups",
        "mean n (kept)",
        "alloc s/step",
        "wall s/run",
    ]
    rows = []
    for strat, rs in runs.items():
        finals, deltas, reach, reward, mixed, mean_n, alloc_s = [], [], [], [], [], [], []
        aucs, d_aucs = [], []
        for r in rs:
            x, y = _eval_curve(r["metrics"])
            finals.append(y[-1])
            aucs.append(auc(r))
            if r["seed"] in uni_final and strat != "uniform":
                deltas.append(y[-1] - uni_final[r["seed"]])
                d_aucs.append(aucs[-1] - uni_auc[r["seed"]])
            hit = np.flatnonzero(y >= target) if np.isfinite(target) else np.array([], int)
            reach.append(x[hit[0]] if hit.size else float("nan"))
            steps = [m for m in r["metrics"] if m.get("step", -1) >= 0]
            reward.append(np.mean([m["train_reward"] for m in steps]))
            mixed.append(np.mean([m["frac_mixed"] for m in steps]))
            mean_n.append(np.mean([m["mean_n"] for m in steps]))
            alloc_s.append(np.mean([m["alloc_seconds"] for m in steps]))
        n_hit = int(np.isfinite(reach).sum())
        rows.append(
            [
                strat,
                fmt_ci(finals),
                "—" if strat == "uniform" else fmt_ci(deltas, signed=True),
                fmt_ci(aucs),
                "—" if strat == "uniform" else fmt_ci(d_aucs, signed=True),
                fmt_ci(reach, digits=1, scale=1e-3),
                f"{n_hit}/{len(rs)}",
                fmt_ci(reward),
                fmt_ci(mixed),
                fmt_ci(mean_n, digits=2),
                fmt_ci(alloc_s, digits=3),
                fmt_ci([r["wall_s"] for r in rs], digits=0),
            ]
        )
    curves = {s: [_eval_curve(r["metrics"]) for r in rs] for s, rs in runs.items()}
    curves_k = {s: [(x / 1e3, y) for x, y in c] for s, c in curves.items()}
    grid = np.linspace(0, total / 1e3, 25)
    plot_bands(
        curves_k,
        out / "train_accuracy.png",
        xlabel="cumulative rollouts (thousands)",
        ylabel="held-out accuracy (mean of 8 samples a prompt)",
        title=f"CPU trainer: mean ± 95% CI over {res['seeds']} seeds",
        grid=grid,
    )
    lines = [
        "# Real CPU training: strategies at equal cumulative rollouts",
        "",
        provenance(
            command,
            {
                "trainer": f"`vipalloc.training` tiny char GPT-2 ({cfg['model']['n_layer']} layers, width "
                f"{cfg['model']['n_embd']}), reasoning-gym chain_sum, loss {cfg['loss']}, lr {cfg['lr']}",
                "budget": f"{cfg['prompts_per_step']} prompts x {cfg['n_mean']} rollouts a step, {cfg['steps']} "
                f"steps = {total} cumulative rollouts for every strategy (DAPO stops when its generated rollouts "
                "reach it); "
                f"n in [{cfg['n_min']}, {cfg['n_max']}]; vip uses predictor {cfg['predictor']} with the "
                f"{cfg['embedder']} embedder",
                "evaluation": f"{cfg['eval_size']} held-out prompts x {cfg['eval_samples']} samples every "
                f"{cfg['eval_every']} steps",
                "wall time": f"{res['elapsed_s'] / 60:.1f} min (warm-up {res['warmup_s']:.0f} s), "
                f"{res.get('jobs', 1)} runs at a time (one torch thread each)",
            },
            commit=res.get("commit"),
        ),
        f"Mean ± 95% t-interval over {res['seeds']} seeds. *Δ vs uniform*: same seed (same warm-up model, prompt",
        f"pool and evaluation set). *rollouts to uniform's final acc*: first evaluation at or above {target:.3f}",
        "(uniform's mean final accuracy). *mean acc over run*: the accuracy curve averaged over cumulative rollouts",
        "(area under the curve / budget; it averages out the evaluation noise of single points, about ±0.008 each).",
        "*mixed groups*: generated groups with both outcomes. *mean n (kept)*: mean rollouts per generated prompt.",
        "",
        md_table(headers, rows),
        "",
        "![accuracy vs rollouts](train_accuracy.png)",
        "",
    ]
    path = out / "train.md"
    path.write_text("\n".join(lines))
    return path
