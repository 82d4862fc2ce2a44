"""``vipalloc bench lm``: a real pretrained LM (SmolLM2-135M-Instruct, LoRA) in the loop.

(a) ``variance``: the gradient-error and variance models on real rollouts, at policy snapshots (the pretrained model
and LoRA adapters saved by the league's uniform runs), per task setting and budget (2, 4, 8 rollouts a prompt): a
fixed-policy pool, per-rollout sketched score vectors, allocations resampled at equal budget (any registered
strategy; oracle p and GP predictions), measured squared error to the whole-pool gradient and cosine, beside
``Plan.error_ratio`` and ``Plan.variance_ratio`` (:mod:`vipalloc.bench.lm_variance`).
(b) ``brier`` and (c) ``league``: a GRPO league at equal rollouts and at equal tokens with held-out mean@k / pass@k,
cost ratios at 50-100% of uniform's gain, and the next-step Brier of ``gp``/``beta``/``empirical`` along its runs
(:mod:`vipalloc.bench.lm_league`, the cheap step of :mod:`vipalloc.bench.lm_fast`).

Presets: ``cpu`` (sized for 2 cores: see docs/results.md) and ``gpu`` (``--device cuda``). Everything is written
under ``<out>/lm/`` and resumes: pools, league runs (one file per strategy, budget mode and seed) and snapshots are
files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vipalloc.bench.lm_league import MODES, LeagueConfig, label, load_runs, run_league
from vipalloc.bench.lm_report import league_section, power_lines, variance_section
from vipalloc.reporting import git_commit, provenance

__all__ = ["PRESETS", "league_folder", "run_lm"]

PARTS = ("variance", "league")
_TITLE = "# `vipalloc bench lm`: SmolLM2-135M-Instruct (LoRA) in the loop\n"
VARIANCE_STRATEGIES = ("uniform", "vip", "vip_pure", "vip_authors", "knapsack", "coba", "vip_error", "vip_two_phase")

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "pool": dict(prompts=24, prior_n=4, pool_n=16, max_new_tokens=8, temperature=1.0, sketch_dim=2048),
        "pool_levels": ((2, 1), (3, 1)),
        "variance": dict(budgets=(2, 4, 8), n_min=2, n_max=16, resamples=300, boots=300),
        "league": LeagueConfig(
            steps=40,
            batch=16,
            mean_n=4,
            n_min=2,
            n_max=12,
            train_prompts=128,
            eval_prompts=256,
            eval_k=4,
            eval_every=10,
            max_new_tokens=8,
            temperature=1.0,
            # 8e-3 (the preset until commit 244cff7) learned faster but collapsed: 15 of 24 league runs ended 0.05 or
            # more below their own peak; 4e-3 is the stable step (docs/results.md, "The league at scale")
            lr=4e-3,
            levels=((2, 1), (3, 1)),
            top_layers=4,
            snapshots=(10, 40),
        ),
        "seeds": 8,
    },
    "gpu": {
        "pool": dict(prompts=64, prior_n=8, pool_n=32, max_new_tokens=8, temperature=1.0, sketch_dim=4096),
        "pool_levels": ((2, 1), (3, 1), (2, 2)),
        "variance": dict(budgets=(2, 4, 8), n_min=2, n_max=32, resamples=1000, boots=1000),
        "league": LeagueConfig(
            steps=100,
            batch=32,
            mean_n=8,
            n_min=2,
            n_max=24,
            train_prompts=512,
            eval_prompts=256,
            eval_k=8,
            eval_every=10,
            max_new_tokens=8,
            temperature=1.0,
            lr=2e-3,
            levels=((2, 1), (3, 1)),
            top_layers=8,
            snapshots=(20, 100),
            eval_chunk=128,
        ),
        "seeds": 8,
    },
}


def _snapshot_policy(snapshot: str, device: str, top_layers: int | None) -> Any:
    """The policy of a snapshot: ``pretrained`` (fresh adapters, B = 0) or a file saved by the league."""
    from vipalloc.bench.lm_fast import FastPolicy

    if snapshot == "pretrained":
        return FastPolicy(0, device, top_layers=top_layers)
    path = Path(snapshot)
    if not path.is_file():
        raise ValueError(
            f"snapshot {snapshot!r} is neither 'pretrained' nor a file: run the league's uniform runs first "
            "(their adapters go to <out>/lm/league-*/snapshots/uniform-seed<k>-step<t>.pt) and pass that path"
        )
    import torch

    state = torch.load(path, map_location="cpu")
    n_layers = 30
    top = n_layers - int(state["first_layer"])
    policy = FastPolicy(0, device, top_layers=None if top == n_layers else top, rank=int(state["rank"]))
    policy.load_adapters(path)
    return policy


def _run_variance(
    work: Path,
    cfg: dict[str, Any],
    *,
    snapshots: Sequence[str],
    settings: Sequence[tuple[int, int]],
    budgets: Sequence[int],
    strategies: Sequence[str],
    prompts: int | None,
    resamples: int | None,
    device: str,
    top_layers: int | None,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    from vipalloc.bench.lm_model import chain_sum_problems
    from vipalloc.bench.lm_pool import Pool, build_policy_pool
    from vipalloc.bench.lm_variance import measure_variance

    blocks = []
    for snap in snapshots:
        policy = None
        tag = "pretrained" if snap == "pretrained" else Path(snap).stem
        for terms, digits in settings:
            pc = dict(cfg["pool"])
            n_prompts = prompts if prompts is not None else pc.pop("prompts")
            pc.pop("prompts", None)
            path = work / f"pool-{tag}-{terms}x{digits}-{n_prompts}.npz"
            if path.is_file():
                pool = Pool.load(path)
                progress(f"variance: pool loaded from {path}")
            else:
                if policy is None:
                    progress(f"variance: loading snapshot {snap}")
                    policy = _snapshot_policy(snap, device, top_layers)
                problems = chain_sum_problems(n_prompts, 7, levels=((terms, digits),), tag=f"pool{terms}x{digits}-")
                pool = build_policy_pool(problems, policy, seed=0, progress=progress, **pc)
                pool.save(path)
            vc = dict(cfg["variance"])
            buds = vc.pop("budgets")
            if resamples is not None:
                vc["resamples"] = resamples
            rows = []
            for mean_n in budgets or buds:
                rows += measure_variance(pool, mean_n=mean_n, seed=0, strategies=strategies, progress=progress, **vc)
            blocks.append(
                {"snapshot": tag, "setting": f"{terms} terms x {digits} digit(s)", "pool": pool, "rows": rows}
            )
    return blocks


def league_folder(preset: str, lc: LeagueConfig) -> str:
    """The league's run folder: ``league-<preset>-<steps>-lr<lr>`` (the lr always: the preset's changed once, and
    its runs must not be mistaken for another's), plus a tag for each other setting that differs from the preset's
    (``-eval128``, ``-top8`` / ``-topall``), so runs made with other settings are never reused."""
    base: LeagueConfig = PRESETS[preset]["league"]
    name = f"league-{preset}-{lc.steps}-lr{lc.lr:g}"
    if lc.eval_prompts != base.eval_prompts:
        name += f"-eval{lc.eval_prompts}"
    if lc.top_layers != base.top_layers:
        name += f"-top{lc.top_layers or 'all'}"
    return name


def run_lm(
    out: Path,
    *,
    parts: Sequence[str] = PARTS,
    preset: str = "cpu",
    device: str = "cpu",
    seeds: int | None = None,
    first_seed: int = 0,
    strategies: Sequence[str] = ("uniform", "vip"),
    variance_strategies: Sequence[str] = VARIANCE_STRATEGIES,
    token_strategies: Sequence[str] | None = None,
    modes: Sequence[str] = MODES,
    resamples: int | None = None,
    steps: int | None = None,
    prompts: int | None = None,
    eval_prompts: int | None = None,
    jobs: int = 1,
    threads: int = 1,
    snapshots: Sequence[str] = ("pretrained",),
    settings: Sequence[tuple[int, int]] | None = None,
    budgets: Sequence[int] = (),
    top_layers: int | None | str = "preset",
    lr: float | None = None,
    command: str = "vipalloc bench lm",
    progress: Callable[[str], None] = print,
) -> Path:
    """Run the requested parts (resuming from ``<out>/lm``); each writes ``<out>/lm_<part>.md`` and ``.json``.
    Returns the last report written. ``strategies``: the league's, any registered names (``uniform`` is the
    baseline and runs whatever the list says); ``variance_strategies``: the variance part's; ``token_strategies``:
    those also run at equal tokens (default: all but uniform); ``modes``: ``rollouts`` and/or ``tokens``; ``lr``:
    the league's Adam step (None: the preset's). A league whose settings differ from the preset's runs in its own
    folder (:func:`league_folder`), so a rerun never reuses runs made with other settings."""
    import torch

    from vipalloc.strategies import STRATEGY_NAMES

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"parts must be among {', '.join(PARTS)}, got {list(parts)}")
    unknown = [s for s in [*strategies, *variance_strategies, *(token_strategies or ())] if s not in STRATEGY_NAMES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}: choose from {', '.join(STRATEGY_NAMES)}")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes or not modes:
        raise ValueError(f"modes must be among {', '.join(MODES)}, got {list(modes)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible")
    commit = os.environ.get("VIPALLOC_COMMIT") or git_commit()
    cfg = PRESETS[preset]
    work = out / "lm"
    work.mkdir(parents=True, exist_ok=True)
    head = provenance(command, {"preset": preset, "device": device}, commit)
    written = out / "lm.md"
    lc: LeagueConfig = cfg["league"]
    if top_layers != "preset":
        lc = dataclasses.replace(lc, top_layers=top_layers if isinstance(top_layers, int) else None)
    if "variance" in parts:
        vstrats = ["uniform", *[s for s in variance_strategies if s != "uniform"]]
        blocks = _run_variance(
            work,
            cfg,
            snapshots=snapshots,
            settings=settings or cfg["pool_levels"],
            budgets=budgets,
            strategies=vstrats,
            prompts=prompts,
            resamples=resamples,
            device=device,
            top_layers=lc.top_layers,
            progress=progress,
        )
        written = out / "lm_variance.md"
        written.write_text(_TITLE + "\n" + head + "\n" + variance_section(blocks))
        summary: dict[str, Any] = {"commit": commit, "preset": preset, "device": device, "blocks": []}
        for b in blocks:
            summary["blocks"].append(
                {
                    "snapshot": b["snapshot"],
                    "setting": b["setting"],
                    "pool_p": b["pool"].p.tolist(),
                    "rows": [asdict(r) for r in b["rows"]],
                }
            )
        (out / "lm_variance.json").write_text(json.dumps(summary, indent=1))
    if "league" in parts:
        if steps is not None:
            lc = dataclasses.replace(
                lc,
                steps=steps,
                eval_every=max(1, min(lc.eval_every, steps)),
                snapshots=tuple(t for t in lc.snapshots if t <= steps) or (steps,),
            )
        if eval_prompts is not None:
            lc = dataclasses.replace(lc, eval_prompts=eval_prompts)
        if lr is not None:
            lc = dataclasses.replace(lc, lr=lr)
        n_seeds = cfg["seeds"] if seeds is None else seeds
        folder = work / league_folder(preset, lc)
        run_league(
            folder,
            strategies,
            range(first_seed, first_seed + n_seeds),
            lc,
            device,
            progress,
            modes=modes,
            token_strategies=token_strategies,
            jobs=jobs,
            threads=threads,
            commit=commit,
        )
        tok = [s for s in strategies if s != "uniform"] if token_strategies is None else list(token_strategies)
        labels = [label(s, "rollouts") for s in strategies] if "rollouts" in modes else []
        labels += [label(s, "tokens") for s in tok] if "tokens" in modes else []
        if "uniform" not in labels:
            labels.insert(0, "uniform")
        # the report covers every finished run in the folder (other processes may have run other seeds)
        results = load_runs(folder, labels)
        written = out / "lm_league.md"
        text = league_section(results, lc, labels, out) + "\n\n" + "\n".join(power_lines(results))
        written.write_text(_TITLE + "\n" + head + "\n" + text + "\n")
        summary = {"commit": commit, "preset": preset, "device": device, "config": asdict(lc)}
        summary["runs"] = [{k: v for k, v in asdict(r).items() if k != "trace"} for r in results]
        (out / "lm_league.json").write_text(json.dumps(summary, indent=1))
    return written
