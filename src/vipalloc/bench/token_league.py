"""``vipalloc bench tokens``: the equal-token league on the simulator with response lengths, with a sigma sweep.

:func:`run_tokens` runs every (sigma, row, seed) once with :func:`vipalloc.bench.token_sim.token_run` and keeps each
run in ``<out>/tokens_runs/`` (one JSON file per run, keyed by a fingerprint of everything that shapes it), so an
interrupted league resumes where it stopped and a finished one is re-reported without training. The uniform row of
a seed runs first and sets the seed's token total; the other rows train until they have generated as many tokens.
:func:`vipalloc.bench.token_report.write_tokens_report` then writes ``tokens.md`` / ``tokens.json`` and PNGs.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vipalloc.bench.progress import Progress, noop
from vipalloc.bench.sim_lengths import SimLengthModel
from vipalloc.bench.simulator import SimConfig
from vipalloc.bench.token_sim import TokenRow, TokenRun, token_run

__all__ = ["SWEEP_TOKEN_ROWS", "TOKEN_ROWS", "parse_token_rows", "run_tokens", "two_phase_token_row"]

# Predictor: the Beta posterior for every row. The GP (the library default) costs ~2.5 s a step on a shared 2-core
# machine, 40 min per row of 8 seeds; the Beta posterior isolates the allocation rule and the budget's unit.
TOKEN_ROWS: tuple[TokenRow, ...] = (
    TokenRow("uniform", "uniform", "empirical", "rollouts"),
    TokenRow("vip (rollouts)", "vip", "beta", "rollouts"),
    TokenRow("vip (tokens)", "vip", "beta", "tokens"),
    TokenRow("knapsack (rollouts)", "knapsack", "beta", "rollouts"),
    TokenRow("knapsack (tokens)", "knapsack", "beta", "tokens"),
    TokenRow("dynamo (tokens)", "dynamo", "beta", "tokens"),
)
SWEEP_TOKEN_ROWS: tuple[str, ...] = ("uniform", "vip (rollouts)", "vip (tokens)")


def two_phase_token_row() -> TokenRow | None:
    """``vip_two_phase (tokens)`` when ``Allocator.plan_pilot`` takes ``token_budget`` (else None: the row is left
    out and the report says so). Not run by :func:`token_run`'s single-phase loop yet."""
    import inspect

    from vipalloc import Allocator

    if "token_budget" not in inspect.signature(Allocator.plan_pilot).parameters:
        return None
    return TokenRow("vip_two_phase (tokens)", "vip_two_phase", "beta", "tokens")


def parse_token_rows(spec: str | None) -> list[TokenRow]:
    """Rows from labels of :data:`TOKEN_ROWS` or ``strategy:predictor:budget`` items (comma-separated)."""
    if spec is None:
        return list(TOKEN_ROWS)
    by_label = {r.label: r for r in TOKEN_ROWS}
    rows = []
    for it in (s.strip() for s in spec.split(",")):
        if not it:
            continue
        if it in by_label:
            rows.append(by_label[it])
            continue
        parts = it.split(":")
        if len(parts) != 3:
            raise ValueError(f"unknown row {it!r}: use a label ({', '.join(by_label)}) or strategy:predictor:budget")
        strat, pred, kind = parts
        rows.append(TokenRow("uniform" if strat == "uniform" else f"{strat} ({kind}, {pred})", strat, pred, kind))
    if not rows or rows[0].label != "uniform":
        raise ValueError("the first row must be 'uniform' (it sets each seed's token total)")
    if len({r.label for r in rows}) != len(rows):
        raise ValueError(f"duplicate rows in {[r.label for r in rows]}")
    return rows


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


def _fingerprint(row: TokenRow, cfg: SimConfig, lengths: SimLengthModel, seed: int, run_kw: dict[str, Any]) -> str:
    blob = json.dumps(
        {"row": asdict(row), "cfg": cfg.to_dict(), "len": lengths.to_dict(), "seed": seed, "kw": run_kw},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _run_cached(
    runs_dir: Path,
    row: TokenRow,
    cfg: SimConfig,
    lengths: SimLengthModel,
    seed: int,
    run_kw: dict[str, Any],
    progress: Progress,
    cached_only: bool = False,
) -> TokenRun | None:
    """The run from ``runs_dir`` when one with the same fingerprint is there, else run it and store it (else None
    with ``cached_only``)."""
    fp = _fingerprint(row, cfg, lengths, seed, run_kw)
    path = runs_dir / f"sigma{cfg.sigma:g}" / f"{_slug(row.label)}-seed{seed}.json"
    if path.exists():
        d = json.loads(path.read_text())
        if d.get("fingerprint") == fp:
            progress("advance", {"n": 1})
            return TokenRun.from_dict(d["run"])
    if cached_only:
        return None
    t0 = time.perf_counter()
    run = token_run(row, cfg, lengths, seed, **run_kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fp, "run": run.to_dict()}))
    tmp.replace(path)  # atomic: an interrupted write never leaves a half file that looks finished
    progress("advance", {"n": 1})
    progress(
        "run",
        {
            "label": f"{row.label} at sigma={cfg.sigma:g}",
            "seed": seed,
            "wall": time.perf_counter() - t0,
            "final": float(run.success[-1]),
        },
    )
    return run


def run_tokens(
    out_dir: str | Path = "reports",
    *,
    rows: Sequence[TokenRow] | None = None,
    seeds: int = 8,
    steps: int = 100,
    batch: int = 64,
    n_mean: int = 8,
    sigma: float = 10.0,
    sweep: Sequence[float] = (3.0, 30.0),
    sweep_rows: Sequence[str] = SWEEP_TOKEN_ROWS,
    levels: Sequence[float] = (0.5, 0.75, 0.9, 1.0),
    config: SimConfig | None = None,
    lengths: SimLengthModel | None = None,
    embedder: str = "hashing",
    report: bool = True,
    cached_only: bool = False,
    command: str = "vipalloc bench tokens",
    progress: Progress = noop,
) -> dict[str, Any]:
    """The equal-token league at ``sigma`` (``rows`` x ``seeds``) and a sweep over ``sweep`` sigmas of
    ``sweep_rows``; resumable (runs kept under ``<out>/tokens_runs``). Returns the results; writes the report
    unless ``report`` is False. ``cached_only``: run nothing, report the seeds whose rows are all stored."""
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    rows = list(rows) if rows is not None else list(TOKEN_ROWS)
    if not rows or rows[0].label != "uniform" or rows[0].budget != "rollouts":
        raise ValueError("the first row must be uniform under a rollout budget (it sets each seed's token total)")
    lcfg = lengths or SimLengthModel()
    base_cfg = (config or SimConfig()).with_(sigma=float(sigma))
    out = Path(out_dir)
    runs_dir = out / "tokens_runs"
    run_kw: dict[str, Any] = {"steps": steps, "batch": batch, "n_mean": n_mean, "embedder": embedder}
    t_start = time.perf_counter()
    by_label = {r.label: r for r in [*TOKEN_ROWS, *rows]}
    s_rows = [by_label[lbl] for lbl in sweep_rows if lbl in by_label]
    plan_sigmas = [float(sigma)] + [float(s) for s in sweep if float(s) != float(sigma)]
    total = seeds * (len(rows) + (len(plan_sigmas) - 1) * len(s_rows))
    progress("phase", {"name": "equal-token league", "total": total})
    results: dict[float, dict[str, list[TokenRun]]] = {}
    for sg in plan_sigmas:
        cfg = base_cfg.with_(sigma=sg)
        sg_rows = rows if sg == float(sigma) else s_rows
        results[sg] = {r.label: [] for r in sg_rows}
        for seed in range(seeds):
            uni = _run_cached(runs_dir, sg_rows[0], cfg, lcfg, seed, run_kw, progress, cached_only)
            if uni is None:
                continue
            kw = {**run_kw, "token_total": float(uni.cum_tokens[-1]), "max_steps": 3 * steps}
            others = [_run_cached(runs_dir, row, cfg, lcfg, seed, kw, progress, cached_only) for row in sg_rows[1:]]
            if any(r is None for r in others):  # cached_only: a seed is reported with all its rows or not at all
                continue
            for row, run in zip(sg_rows, [uni, *others]):
                assert run is not None
                results[sg][row.label].append(run)
    results = {sg: d for sg, d in results.items() if d[rows[0].label]}
    if float(sigma) not in results:
        raise ValueError(f"no complete seed at sigma={sigma:g} yet (cached_only)")
    elapsed = time.perf_counter() - t_start
    res: dict[str, Any] = {
        "config": base_cfg.to_dict(),
        "lengths": lcfg.to_dict(),
        "seeds": len(results[float(sigma)][rows[0].label]),
        "seeds_per_sigma": {str(sg): len(d[rows[0].label]) for sg, d in results.items()},
        "steps": steps,
        "batch": batch,
        "n_mean": n_mean,
        "sigma": float(sigma),
        "levels": [float(v) for v in levels],
        "rows": [asdict(r) for r in rows],
        "two_phase_row": None if two_phase_token_row() is None else "available, not run by this loop yet",
        "elapsed_s": elapsed,
    }
    if report:
        from vipalloc.bench.token_report import write_tokens_report

        res.update(write_tokens_report(out, res, results, command=command))
    return res
