"""``vipalloc bench train``: real CPU training (``vipalloc.training``), every strategy x seed at equal
cumulative rollouts. :func:`run_train` returns its raw results and writes ``train.md`` / ``train.json`` and an
accuracy-vs-rollouts PNG. ``bench`` may import ``training``; ``training`` never imports ``bench``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vipalloc.bench.progress import Progress, noop
from vipalloc.bench.train_levels import levels_lines
from vipalloc.reporting import fmt_ci, git_commit, league, md_table, plot_bands, provenance
from vipalloc.training.evaluation import paper_metrics_lines, plot_paper_metrics

__all__ = ["TRAIN_STRATEGIES", "league_lines", "rewrite_report", "run_train"]


TRAIN_STRATEGIES: tuple[str, ...] = ("uniform", "vip", "vip_authors", "knapsack", "dynamo", "hora", "dapo")


def run_train(
    out_dir: str | Path = "reports",
    *,
    strategies: Sequence[str] = TRAIN_STRATEGIES,
    seeds: int = 3,
    steps: int | None = None,
    quick: bool = False,
    jobs: int | None = None,
    command: str = "vipalloc bench train",
    progress: Progress = noop,
    device: str = "cpu",
    preset: str | None = None,
    reuse: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Real CPU training (``vipalloc.training``): every strategy x seed at equal cumulative rollouts
    (``steps * prompts_per_step * n_mean``; DAPO stops once its generated rollouts reach that). Writes
    ``train.md`` / ``train.json`` and accuracy-vs-rollouts PNGs; run folders go to ``<out_dir>/train_runs``.
    ``jobs``: worker processes (default one per CPU core); results do not depend on it. ``device``: cpu, cuda or
    auto; ``preset``: a :data:`vipalloc.training.config.PRESETS` name layered under ``overrides`` (default: ``gpu``
    when ``device`` is cuda, none otherwise; ``preset="gpu", device="cpu"`` runs the GPU-sized path on the CPU).
    ``reuse``: keep the runs of ``<out_dir>/train_runs`` that finished with exactly this configuration and budget
    (an interrupted league, or a league that adds strategies or seeds, re-runs only what is missing).
    ``strategies`` are row names: a strategy, or ``<strategy>-tokens`` (planned by uniform's tokens, the rollout
    budget a cap) or ``<strategy>-tokens<T>`` (T tokens a step); see :func:`vipalloc.training.config.label_options`.
    Every run logs its tokens and wall-clock, and the report adds the ratio-vs-target-level curves
    (:mod:`vipalloc.bench.train_levels`) on the rollout, token and wall-clock axes."""

    from vipalloc.training.config import label_options
    from vipalloc.training.config import preset as preset_options
    from vipalloc.training.demo import demo_config
    from vipalloc.training.parallel import default_jobs, finished_result, run_many
    from vipalloc.training.trainer import warmup_policy

    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    row_options = {label: label_options(label) for label in strategies}  # refuses unknown names up front
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not quick:  # the league keeps the roomier 8 rollouts a prompt (the demo runs the tight 4)
        overrides.setdefault("n_mean", 8)
    chosen = preset if preset is not None else ("gpu" if device == "cuda" else None)
    if chosen is not None:
        overrides = preset_options(chosen, **overrides)
    overrides["device"] = device
    base = demo_config(quick, steps=steps, tensorboard=False, **overrides)
    total = base.steps * base.budget
    commit = git_commit()
    t_start = time.perf_counter()
    progress("phase", {"name": "warm-up (cached after the first run)", "total": base.warmup.steps})
    # a bar step by step on a terminal; in a log a line every tenth with the supervised loss
    warm = warmup_policy(
        base,
        progress=lambda s, n: progress("advance", {}),
        on_tenth=lambda s, n, loss: progress(
            "eval", {"label": "warm-up", "step": f"{s}/{n}", "metric": "loss", "value": loss}
        ),
    )
    t_warm = time.perf_counter() - t_start
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
    cfgs: list[Any] = []  # TrainConfig, one per strategy x seed
    done: dict[int, dict[str, Any]] = {}  # index in cfgs -> reused result
    for seed in range(seeds):
        for strat in strategies:
            run_dir = out / "train_runs" / f"{strat}-seed{seed}"
            # validated (not model_copy): a row's token mode must meet the config's refusals
            cfg = type(base).model_validate(
                {**base.model_dump(), **row_options[strat], "seed": seed, "run_dir": str(run_dir)}
            )
            old = finished_result(cfg, total) if reuse else None
            if old is not None:
                done[len(cfgs)] = old
                progress("run", {"label": f"{strat} seed {seed}", "wall": old["wall_s"], "detail": "reused"})
            elif run_dir.exists():
                shutil.rmtree(run_dir)  # a fresh run: the budget stop is not resumable
            cfgs.append(cfg)
    todo = [c for i, c in enumerate(cfgs) if i not in done]
    n_jobs = jobs if jobs is not None else default_jobs(max(len(todo), 1))
    progress("phase", {"name": f"training ({n_jobs} at a time)", "total": len(todo) * base.steps})

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "step":
            progress("advance", {"label": f"{info['label']} step {info['step']}"})
            if "eval_acc" in info:
                k = info.get("eval_k", base.eval_samples)
                progress(
                    "eval",
                    {"label": info["label"], "step": info["step"], "metric": f"mean@{k}", "value": info["eval_acc"]},
                )
        elif kind == "done":
            acc = info.get("eval_acc")
            detail = None if acc is None else f"mean@{info.get('eval_k', base.eval_samples)} {acc:.3f}"
            progress("run", {"label": info["label"], "wall": info["wall_s"], "detail": detail})

    fresh = iter(run_many(todo, warm, jobs=n_jobs, on_event=on_event, stop_at_rollouts=total) if todo else [])
    results = [done[i] if i in done else next(fresh) for i in range(len(cfgs))]
    for cfg, res in zip(cfgs, results):
        runs[cfg.label].append(
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
        "command": command,
    }
    (out / "train.json").write_text(json.dumps(result))
    _write_train_report(out, result, command)
    return result


def _eval_curve(metrics: list[dict[str, Any]], axis: str = "cum_rollouts") -> tuple[np.ndarray, np.ndarray]:
    """``(cumulative cost, mean@k)`` at every evaluation; ``axis``: cum_rollouts, cum_tokens or cum_seconds."""
    pts = [(m[axis], m["eval_acc"]) for m in metrics if "eval_acc" in m]
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
            reward.append(np.mean([m["vip/rollout_accuracy"] for m in steps]))  # shared telemetry names
            mixed.append(np.mean([1.0 - m["vip/frac_zero_var_groups"] for m in steps]))
            mean_n.append(np.mean([m["vip/mean_n"] for m in steps]))
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
        ylabel=f"held-out mean@k ({cfg['eval_samples']} samples a prompt)",
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
                "wall time": (
                    f"interrupted league, reported from the runs that finished ({res['seeds']} seeds finished for "
                    f"every strategy); {res['elapsed_s'] / 60:.1f} min of run time summed over runs"
                    if res.get("partial")
                    else f"{res['elapsed_s'] / 60:.1f} min (warm-up {res['warmup_s']:.0f} s), "
                    f"{res.get('jobs', 1)} runs at a time (one torch thread each), device {cfg.get('device', 'cpu')}"
                ),
            },
            commit=res.get("commit"),
        ),
        f"Mean ± 95% t-interval over {res['seeds']} seeds. *Δ vs uniform*: same seed (same warm-up model, prompt",
        f"pool and evaluation set). *rollouts to uniform's final acc*: first evaluation at or above {target:.3f}",
        "(uniform's mean final accuracy). *mean acc over run*: the accuracy curve averaged over cumulative rollouts",
        "(area under the curve / budget; it averages out single evaluations' noise: the sampling error below).",
        "*mixed groups*: generated groups with both outcomes. *mean n (kept)*: mean rollouts per generated prompt.",
        "",
        md_table(headers, rows),
        "",
        "![accuracy vs rollouts](train_accuracy.png)",
        "",
    ]
    lines[3:3] = league_lines(res) + levels_lines(res, out)  # the primary figures first, under the provenance
    paper = {s: [r["metrics"] for r in rs] for s, rs in runs.items()}  # mean@k / pass@k / maj@k, per level
    lines += paper_metrics_lines(paper)
    if plot_paper_metrics(paper, out / "train_eval_metrics.png"):
        lines += ["![mean@k, pass@k, maj@k vs rollouts](train_eval_metrics.png)", ""]
    path = out / "train.md"
    path.write_text("\n".join(lines))
    return path


def _metric_curve(metrics: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(m["cum_rollouts"], m[key]) for m in metrics if key in m]
    arr = np.asarray(pts, np.float64)
    return arr[:, 0], arr[:, 1]


def _hardest_levels(metrics: list[dict[str, Any]], count: int = 2) -> list[int]:
    """The ``count`` highest difficulty levels evaluated (levels are numbered from easiest to hardest)."""
    first = next(m for m in metrics if "eval_acc" in m)
    levels = sorted({int(k.split("/")[1][5:]) for k in first if k.startswith("eval/level") and k.endswith("/mean")})
    return levels[-count:]


def league_lines(res: dict[str, Any], baseline: str = "uniform", n_boot: int = 2000) -> list[str]:
    """Markdown section: the league at equal cumulative rollouts, paired by seed (issue 14's primary figure).

    Primary: rollouts each strategy needs before its seed-mean mean@k curve reaches the baseline's final mean@k,
    as a ratio to the baseline's own, with a paired seed bootstrap 95% interval (:func:`vipalloc.reporting.league`).
    Secondary, at the budget (each run's final evaluation) and paired by seed against the baseline: mean@k,
    pass@16 (the largest k evaluated), the same on the two hardest levels, and the AUC (curve averaged over
    cumulative rollouts). Empty when the baseline did not run.
    """
    runs = res["runs"]
    if baseline not in runs or not runs[baseline]:
        return []
    seeds = sorted(r["seed"] for r in runs[baseline])
    by_seed = {s: {r["seed"]: r for r in rs} for s, rs in runs.items()}
    strategies = [s for s in runs if all(seed in by_seed[s] for seed in seeds)]
    unpaired = [s for s in runs if s not in strategies]
    curves = {s: [_eval_curve(by_seed[s][seed]["metrics"]) for seed in seeds] for s in strategies}
    target, rows = league(curves, baseline=baseline, n_boot=n_boot)
    total = float(res["total_rollouts"])
    first = next(m for m in runs[baseline][0]["metrics"] if "eval_acc" in m)
    ks = sorted(int(k.split("@")[1]) for k in first if k.startswith("eval/pass@") and not k.endswith("_se"))
    top = f"eval/pass@{ks[-1]}" if ks else None
    hard = _hardest_levels(runs[baseline][0]["metrics"])
    grid = np.linspace(0.0, total, 41)[1:]

    def final(r: dict[str, Any], key: str) -> float:
        return float(_metric_curve(r["metrics"], key)[1][-1])

    def hard_final(r: dict[str, Any], what: str) -> float:
        return float(np.mean([final(r, f"eval/level{lv}/{what}") for lv in hard]))

    def auc(r: dict[str, Any]) -> float:
        x, y = _eval_curve(r["metrics"])
        return float(np.mean(np.interp(grid, x, y)))

    lv = "+".join(map(str, hard))
    stats: list[tuple[str, Any]] = [("mean@k at budget", lambda r: final(r, "eval_acc"))]
    if top is not None:
        stats.append((f"pass@{ks[-1]} at budget", lambda r: final(r, top)))
    stats.append((f"mean@k, levels {lv}, at budget", lambda r: hard_final(r, "mean")))
    if top is not None:
        stats.append((f"pass@{ks[-1]}, levels {lv}, at budget", lambda r: hard_final(r, f"pass@{ks[-1]}")))
    stats.append(("AUC (mean@k averaged over the run)", auc))

    base_rollouts = next(r for r in rows if r.strategy == baseline).rollouts

    def ratio_cell(row: Any) -> str:
        if not base_rollouts > 0:  # the baseline's final mean@k is no better than where it started
            return f"undefined ({baseline} did not improve on its first evaluation)"
        if not np.isfinite(row.ratio):
            return f"> {total / base_rollouts:.2f} (not reached)"
        hi = "inf" if not np.isfinite(row.ratio_hi) else f"{row.ratio_hi:.2f}"
        return f"**{row.ratio:.2f}** [{row.ratio_lo:.2f}, {hi}]"

    headers = ["strategy", f"rollouts to {target:.3f} (k)", "ratio vs uniform [95% CI]", "resamples reached"]
    headers += [f"Δ {name}" for name, _ in stats]
    table = []
    for row in rows:
        cells = [
            row.strategy,
            "—" if not np.isfinite(row.rollouts) else f"{row.rollouts / 1e3:.1f}",
            "1 (baseline)" if row.strategy == baseline else ratio_cell(row),
            f"{row.frac_reached:.0%}",
        ]
        for _, fn in stats:
            if row.strategy == baseline:
                cells.append(fmt_ci([fn(by_seed[baseline][sd]) for sd in seeds]))
            else:
                diffs = [fn(by_seed[row.strategy][sd]) - fn(by_seed[baseline][sd]) for sd in seeds]
                ahead = sum(d > 0 for d in diffs)
                cells.append(f"{fmt_ci(diffs, signed=True)} ({ahead}/{len(diffs)})")
        table.append(cells)
    return [
        f"## League: rollouts to reach {baseline}'s final mean@k ({len(seeds)} seeds, paired)",
        "",
        f"Target: {baseline}'s final mean@k, averaged over its last two evaluations and {len(seeds)} seeds = "
        f"{target:.3f}. *rollouts*: where the seed-mean curve first reaches it (linear between evaluations); "
        f"*ratio*: that over {baseline}'s own, below 1 = fewer rollouts to the same accuracy, with a paired "
        "percentile bootstrap over seeds (2,000 resamples; *resamples reached*: share in which the strategy reached "
        "the target within the budget, an upper bound of inf means some did not). The Δ columns: the strategy "
        f"minus {baseline} on the same seed at the budget (its final evaluation), mean ± 95% t-interval, and "
        f"(seeds ahead / seeds). The {baseline} row shows its own values.",
        "",
        md_table(headers, table),
        "",
        *([f"Left out (not run on every seed of {baseline}): {', '.join(unpaired)}.", ""] if unpaired else []),
    ]


def _collect_finished(out: Path) -> dict[str, Any] | None:
    """A result dict like :func:`run_train`'s from the runs of ``<out>/train_runs`` that finished (their
    ``result.json``), for a league that was interrupted; only seeds that finished for every strategy are kept, so
    the comparison stays paired. ``None`` when no run finished."""
    from vipalloc.training.parallel import RESULT_FILE

    docs = []
    for path in sorted((out / "train_runs").glob(f"*/{RESULT_FILE}")):
        try:
            docs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # cut short while being written: that run did not finish
    if not docs:
        return None
    from vipalloc.training.config import run_label

    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for d in docs:
        cfg = d["config"]
        label = run_label(cfg)  # the row name: strategy, with -tokens in token mode
        runs.setdefault(label, {})[cfg["seed"]] = {"seed": cfg["seed"], **d["result"]}
    common = sorted(set.intersection(*(set(v) for v in runs.values())))
    base = dict(docs[0]["config"])
    return {
        "commit": None,
        "config": base,
        "total_rollouts": docs[0]["stop_at_rollouts"],
        "seeds": len(common),
        "warmup_s": float("nan"),
        "jobs": 0,
        "elapsed_s": float(sum(d["result"]["wall_s"] for d in docs)),
        "runs": {s: [v[sd] for sd in common] for s, v in runs.items()},
        "partial": True,
    }


def rewrite_report(out_dir: str | Path, command: str = "vipalloc bench train --report-only") -> Path:
    """Write ``train.md`` again from ``<out_dir>/train.json`` (nothing is trained); without it (an interrupted
    league), from the runs that finished, keeping the seeds every strategy finished."""
    out = Path(out_dir)
    path = out / "train.json"
    if path.exists():
        res = json.loads(path.read_text())
    else:
        collected = _collect_finished(out)
        if collected is None:
            raise ValueError(f"{path} does not exist and no run finished: run `vipalloc bench train --out {out}` first")
        res = collected
    return _write_train_report(out, res, res.get("command", command))
