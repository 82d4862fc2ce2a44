"""``vipalloc bench lm``: a real pretrained LM (SmolLM2-135M-Instruct, LoRA) in the loop.

(a) ``variance``: the variance model on real rollouts -- a fixed-policy pool, per-rollout sketched score vectors,
allocations resampled at equal budget (``uniform``, ``vip``, ``vip_two_phase``, ``knapsack``; oracle p and GP
predictions), measured ``tr Cov`` of the Dr.GRPO and RLOO batch gradients and cosine to the whole-pool gradient,
against ``Plan.variance_ratio`` (:mod:`vipalloc.bench.lm_variance`).
(b) ``brier`` and (c) ``league``: a short GRPO league at equal rollouts per step with held-out mean@k and paired
intervals, and the next-step Brier of ``gp``/``beta``/``empirical`` along its runs (:mod:`vipalloc.bench.lm_league`).

Presets: ``cpu`` (minutes to an hour on 2 cores, one thread) and ``gpu`` (``--device cuda``: larger pool, more steps
and seeds). Everything is written under ``<out>/lm/`` and resumes: the pool and each league run are files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from vipalloc.bench.lm_league import BRIER_PREDICTORS, LeagueConfig, RunResult, load_runs, run_league
from vipalloc.reporting import fmt_ci, git_commit, md_table, paired_verdict, provenance

__all__ = ["PRESETS", "run_lm"]

PARTS = ("variance", "league")
_TITLE = "# `vipalloc bench lm`: SmolLM2-135M-Instruct (LoRA) in the loop\n"

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "pool": dict(prompts=24, prior_n=4, pool_n=16, max_new_tokens=24, temperature=1.0, sketch_dim=2048),
        "pool_levels": ((2, 1), (3, 1)),
        "variance": dict(mean_n=4, n_min=2, n_max=16, resamples=300, boots=300),
        "league": LeagueConfig(
            steps=6,
            batch=8,
            mean_n=4,
            n_min=2,
            n_max=12,
            train_prompts=24,
            eval_prompts=16,
            eval_k=4,
            eval_every=6,
            max_new_tokens=24,
            temperature=1.0,
            lr=5e-4,
            levels=((2, 1),),
        ),
        "seeds": 3,
    },
    "gpu": {
        "pool": dict(prompts=64, prior_n=8, pool_n=32, max_new_tokens=32, temperature=1.0, sketch_dim=4096),
        "pool_levels": ((2, 1), (3, 1), (2, 2)),
        "variance": dict(mean_n=8, n_min=2, n_max=32, resamples=1000, boots=1000),
        "league": LeagueConfig(
            steps=60,
            batch=32,
            mean_n=8,
            n_min=2,
            n_max=24,
            train_prompts=256,
            eval_prompts=128,
            eval_k=8,
            eval_every=10,
            max_new_tokens=32,
            temperature=1.0,
            lr=5e-4,
            levels=((2, 1), (3, 1)),
        ),
        "seeds": 8,
    },
}


def _ci(lo_hi: tuple[float, float] | list[float], digits: int = 3) -> str:
    return f"[{lo_hi[0]:.{digits}f}, {lo_hi[1]:.{digits}f}]"


def _variance_section(rows: Sequence[Any], pool: Any) -> str:
    p = pool.p
    mixed = int(((p > 0) & (p < 1)).sum())
    lines = [
        "## (a) The variance model on real rollouts\n",
        f"Pool: {len(p)} prompts x {pool.rewards.shape[1]} rollouts (+{pool.prior_rewards.shape[1]} earlier "
        f"rollouts each as predictor history), mean success {p.mean():.3f}, {mixed} prompts with 0 < p < 1; "
        f"score vectors sketched to {pool.sketches.shape[2]} dims; sampling {pool.seconds['sample']:.0f} s, "
        f"gradients {pool.seconds['grad']:.0f} s.\n",
        "Ratios are against `uniform` with the same estimator and predictor. *measured*: tr Cov of the batch "
        "gradient over resamples (95% bootstrap interval); *modelled*: mean `Plan.variance_ratio` (the allocator's "
        "model at its own predictions; for `vip_two_phase` against the same pilot plus a uniform commit); *model at "
        "pool p*: the model's ratio with the pool's rates; *cos*: mean cosine to the whole-pool gradient.\n",
    ]
    table = []
    for r in rows:
        table.append(
            [
                r.estimator,
                r.predictor,
                r.strategy,
                f"{r.ratio:.3f} {_ci(r.ratio_ci)}",
                f"{r.modelled:.3f}",
                f"{r.modelled_pool_p:.3f}",
                f"{r.cosine:.3f} {_ci(r.cosine_ci)}",
                f"{r.dropped:.1f}",
            ]
        )
    lines.append(
        md_table(
            ["estimator", "p from", "strategy", "measured ratio", "modelled", "model at pool p", "cos", "dropped"],
            table,
            align="lllrrrrr",
        )
    )
    return "\n".join(lines)


def _league_section(results: Sequence[RunResult], cfg: LeagueConfig, strategies: Sequence[str]) -> str:
    by: dict[str, dict[int, RunResult]] = {}
    for r in results:
        by.setdefault(r.strategy, {})[r.seed] = r
    lines = [
        "## (c) GRPO league at equal rollouts\n",
        f"{cfg.steps} steps of {cfg.batch} prompts x {cfg.mean_n} rollouts on average (n in [{cfg.n_min}, "
        f"{cfg.n_max}]), {cfg.train_prompts} training prompts revisited, LoRA r=8 lr {cfg.lr}, Dr.GRPO loss; "
        f"held-out mean@{cfg.eval_k} on {cfg.eval_prompts} prompts (same sampling seeds per seed for every "
        f"strategy); predictor `{cfg.predictor}`.\n",
    ]
    table = []
    for s in strategies:
        runs = list(by.get(s, {}).values())
        if not runs:
            continue
        table.append(
            [
                s,
                len(runs),
                fmt_ci([r.eval_mean_at_k[0] for r in runs]),
                fmt_ci([r.eval_mean_at_k[-1] for r in runs]),
                fmt_ci([float(np.mean(r.train_success)) for r in runs]),
                fmt_ci([r.tokens[-1] for r in runs], digits=0),
                fmt_ci([r.seconds for r in runs], digits=0),
            ]
        )
    lines.append(
        md_table(
            [
                "strategy",
                "seeds",
                f"mean@{cfg.eval_k} start",
                f"mean@{cfg.eval_k} end",
                "train success (mean)",
                "tokens",
                "seconds",
            ],
            table,
        )
    )
    base = by.get("uniform", {})
    for s in strategies:
        if s == "uniform" or s not in by:
            continue
        common = sorted(set(base) & set(by[s]))
        if not common:
            continue
        d_end = [by[s][k].eval_mean_at_k[-1] - base[k].eval_mean_at_k[-1] for k in common]
        d_gain = [
            (by[s][k].eval_mean_at_k[-1] - by[s][k].eval_mean_at_k[0])
            - (base[k].eval_mean_at_k[-1] - base[k].eval_mean_at_k[0])
            for k in common
        ]
        d_train = [float(np.mean(by[s][k].train_success) - np.mean(base[k].train_success)) for k in common]
        lines.append(
            f"- `{s}` - `uniform`, paired over seeds {common}: final held-out mean@{cfg.eval_k} "
            f"{paired_verdict(d_end)}; gain over start {paired_verdict(d_gain)}; mean training success "
            f"{paired_verdict(d_train)}"
        )
    lines.append("")
    lines.append("## (b) Next-step Brier along the league runs\n")
    lines.append(
        "Rollout-weighted Brier of each predictor's prediction made before the step, on prompts seen at an earlier "
        "step (binary outcomes; lower is better); one value per run (mean over its steps), mean ± 95% interval "
        "over runs.\n"
    )
    rows = []
    per_run: dict[str, list[float]] = {}
    for name in BRIER_PREDICTORS:
        vals = []
        for r in results:
            b, w = np.array(r.brier[name], float), np.array(r.brier_n, float)
            ok = np.isfinite(b) & (w > 0)
            vals.append(float((b[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else float("nan"))
        per_run[name] = vals
        rows.append([name, int(np.isfinite(vals).sum()), fmt_ci(vals, digits=4)])
    lines.append(md_table(["predictor", "runs", "Brier"], rows))
    for other in BRIER_PREDICTORS[1:]:
        diff = np.array(per_run[other]) - np.array(per_run[BRIER_PREDICTORS[0]])
        diff = diff[np.isfinite(diff)]
        if diff.size:
            lines.append(
                f"- Brier of `{other}` minus `{BRIER_PREDICTORS[0]}`, paired by run (positive: "
                f"`{BRIER_PREDICTORS[0]}` better): {paired_verdict(diff)}"
            )
    return "\n".join(lines)


def run_lm(
    out: Path,
    *,
    parts: Sequence[str] = PARTS,
    preset: str = "cpu",
    device: str = "cpu",
    seeds: int | None = None,
    first_seed: int = 0,
    strategies: Sequence[str] = ("uniform", "vip"),
    resamples: int | None = None,
    steps: int | None = None,
    prompts: int | None = None,
    command: str = "vipalloc bench lm",
    progress: Callable[[str], None] = print,
) -> Path:
    """Run the requested parts (resuming from ``<out>/lm``); each writes ``<out>/lm_<part>.md`` and ``.json``.
    Returns the last report written."""
    import dataclasses

    import torch

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"parts must be among {', '.join(PARTS)}, got {list(parts)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible")
    commit = os.environ.get("VIPALLOC_COMMIT") or git_commit()
    cfg = PRESETS[preset]
    work = out / "lm"
    work.mkdir(parents=True, exist_ok=True)
    head = provenance(command, {"preset": preset, "device": device}, commit)
    written = out / "lm.md"
    if "variance" in parts:
        from vipalloc.bench.lm_model import chain_sum_problems
        from vipalloc.bench.lm_pool import Pool, build_pool
        from vipalloc.bench.lm_variance import measure_variance

        pc = dict(cfg["pool"])
        if prompts is not None:
            pc["prompts"] = prompts
        path = work / f"pool-{preset}-{pc['prompts']}.npz"
        if path.is_file():
            pool = Pool.load(path)
            progress(f"variance: pool loaded from {path}")
        else:
            problems = chain_sum_problems(pc.pop("prompts"), 7, levels=cfg["pool_levels"], tag="pool")
            pool = build_pool(problems, seed=0, device=device, progress=progress, **pc)
            pool.save(path)
        vc = dict(cfg["variance"])
        if resamples is not None:
            vc["resamples"] = resamples
        rows = measure_variance(pool, seed=0, progress=progress, **vc)
        written = out / "lm_variance.md"
        written.write_text(_TITLE + "\n" + head + "\n" + _variance_section(rows, pool))
        summary = {"commit": commit, "preset": preset, "device": device, "settings": vc, "pool_p": pool.p.tolist()}
        summary["rows"] = [asdict(r) for r in rows]
        (out / "lm_variance.json").write_text(json.dumps(summary, indent=1))
    if "league" in parts:
        lc: LeagueConfig = cfg["league"]
        if steps is not None:
            lc = dataclasses.replace(lc, steps=steps, eval_every=max(1, min(lc.eval_every, steps)))
        n_seeds = cfg["seeds"] if seeds is None else seeds
        folder = work / f"league-{preset}-{lc.steps}"
        results = run_league(folder, strategies, range(first_seed, first_seed + n_seeds), lc, device, progress)
        # the report covers every finished run in the folder (other processes may have run other seeds)
        results = load_runs(folder, strategies)
        written = out / "lm_league.md"
        written.write_text(_TITLE + "\n" + head + "\n" + _league_section(results, lc, strategies))
        summary = {"commit": commit, "preset": preset, "device": device, "config": asdict(lc)}
        summary["runs"] = [asdict(r) for r in results]
        (out / "lm_league.json").write_text(json.dumps(summary, indent=1))
    return written
