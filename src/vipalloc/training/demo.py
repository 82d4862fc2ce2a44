"""``vipalloc demo``: warm-up (cached), then strategies compared at the same rollout budget on real training
(by default uniform and the library default, :data:`vipalloc.defaults.DEFAULT_STRATEGY`).

Every run of a seed uses the same warm-up model, prompt pool, evaluation set and per-step prompt sampling seed;
only the allocation strategy differs. Writes ``<out>/report.md`` and PNG plots.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vipalloc.defaults import DEFAULT_STRATEGY
from vipalloc.training.config import STRATEGIES, TrainConfig


def demo_config(quick: bool = False, **overrides: Any) -> TrainConfig:
    """The embedded default demo configuration (``quick``: a ~1-minute smoke of the same pipeline)."""
    # 4 rollouts a prompt on average: the tight budget where allocation matters most (at 8 the gain is within noise,
    # docs/training.md); 19,200 rollouts a run: six seeds, enough to resolve that gain, take ~13 minutes on 2 cores
    # evaluations every 15 steps (11 a run, 128 prompts x 16 samples each): about a third of a run's CPU time
    base: dict[str, Any] = {"steps": 150, "prompts_per_step": 32, "n_mean": 4, "eval_every": 15}
    if quick:
        base = {
            "steps": 12,
            "prompts_per_step": 16,
            "n_mean": 4,
            "n_max": 16,
            "pool_size": 256,
            "eval_size": 64,
            "eval_samples": 4,
            "eval_every": 4,
            "ckpt_every": 4,
            "levels": [(2, 1), (3, 1)],  # one-digit chains: a 300-step warm-up already gets some right
            "warmup": {"steps": 300, "batch_size": 64},
        }
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.model_validate(base)


def run_demo(
    out: str | Path = "runs/demo",
    quick: bool = False,
    seeds: Sequence[int] = (0,),
    strategies: Sequence[str] = ("uniform", DEFAULT_STRATEGY),
    steps: int | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    jobs: int | None = None,
    **overrides: Any,
) -> Path:
    """Run every (strategy, seed) and write the report; returns the report path.

    ``jobs``: worker processes (default: one per CPU core, at most one per run); results do not depend on it.
    ``on_event(kind, info)``: ``"warmup"`` (step, total), then per run ``"run"`` / ``"step"`` / ``"done"`` events
    carrying the run's ``label`` (see :mod:`vipalloc.training.parallel`).
    """
    from vipalloc.training.parallel import default_jobs, run_many
    from vipalloc.training.report import write_report
    from vipalloc.training.trainer import checkpoint_config, same_run, warmup_policy

    strategies = list(dict.fromkeys(strategies))
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise ValueError(f"unknown strategies {bad}; choose from {', '.join(STRATEGIES)}")
    if not seeds:
        raise ValueError("seeds is empty; run at least one seed")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = demo_config(quick, steps=steps, **overrides)
    emit = on_event or (lambda kind, info: None)
    t0 = time.perf_counter()
    warm = warmup_policy(base, progress=lambda s, n: emit("warmup", {"step": s, "total": n}))
    warm_s = time.perf_counter() - t0
    runs: dict[str, list[list[dict[str, Any]]]] = {s: [] for s in strategies}
    plans: dict[str, list[list[dict[str, Any]]]] = {s: [] for s in strategies}
    cfgs = [
        TrainConfig.model_validate(
            {**base.model_dump(), "strategy": strat, "seed": seed, "run_dir": str(out / f"{strat}-seed{seed}")}
        )
        for seed in seeds
        for strat in strategies
    ]
    for cfg in cfgs:  # finished or killed runs of the same configuration resume; anything else starts afresh
        run_dir = Path(cfg.run_dir)
        if run_dir.exists() and not ((old := checkpoint_config(run_dir)) is not None and same_run(old, cfg)):
            emit("restart", {"label": f"{cfg.strategy} seed {cfg.seed}", "run_dir": str(run_dir)})
            shutil.rmtree(run_dir)
    n_jobs = jobs if jobs is not None else default_jobs(len(cfgs))
    emit("runs", {"n": len(cfgs), "jobs": n_jobs})
    for cfg, res in zip(cfgs, run_many(cfgs, warm, jobs=n_jobs, on_event=emit)):
        runs[cfg.strategy].append(res["metrics"])
        plans[cfg.strategy].append(res["plans"])
    report = write_report(out, base, runs, plans, warm_s, jobs=n_jobs)
    emit("report", {"report": str(report)})
    return report
