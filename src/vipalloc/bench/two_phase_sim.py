"""Two-phase strategies (``vip_two_phase``, ``pilot_commit``) on the policy-gradient simulator.

:func:`simulate_two_phase_run` is what :func:`vipalloc.bench.simulate.simulate_run` runs for a two-phase row. Per
step: ``Allocator.plan_pilot`` on the batch (``pilot_commit``: on a candidate pool of ``pool_factor`` x the batch
from the same prompt stream), the pilot's rewards, ``observe``, ``Allocator.plan_commit``, the extra rollouts'
rewards, ``observe`` again, then one policy update on each trained prompt's whole group (pilot + commit). The
step's budget covers both rounds, so every row of a seed ends at exactly the same cumulative rollouts.

Common random numbers: a step draws the same ``(M, n_max)`` block of uniforms a single-phase row draws
(:meth:`Simulator.rollouts` with ``width = n_max``); a prompt's pilot uses the first ``pilot_n`` of its row and its
commit the next ones, so a group of ``n`` rollouts sees exactly the rewards the same group of a single-phase row
sees. The policy does not change between the two rounds (one update per step), so this is exact.

Extra per-run figures (``SimRun.extra``): the expected Brier score of the predictor's p before the pilot and of the
posterior mean after it, against the TRUE p (``mean((q - p)^2 + p (1 - p))``, the Brier score's expectation over
the rollout outcome), their mean absolute errors, and the allocator's wall time per step split by phase.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from vipalloc.bench.sim_runs import RowSpec, SimRun, SimWorld, StepLog, reference_variances
from vipalloc.bench.simulator import SimConfig

__all__ = ["PILOT_N", "pilot_commit_pool_factor", "simulate_two_phase_run", "two_phase_report_lines"]

PILOT_N = 2  # pilot rollouts per prompt in the simulator rows


def pilot_commit_pool_factor(n_mean: float, pilot_n: int = PILOT_N, default: float = 3.0) -> float:
    """Candidate pool per batch slot for ``pilot_commit`` at a mean of ``n_mean`` rollouts per batch prompt.

    Pilot-Commit's recipe spends half the rollouts on the pilot (32 on 3x the batch = 96 per batch prompt, then 96
    committed per kept prompt). At our small budgets a pool of 3x with ``pilot_n`` rollouts would eat more than
    that (or the whole budget: 3 x 2 > 4), so the pool is ``min(default, n_mean / (2 pilot_n))``, at least 1.
    """
    return float(max(1.0, min(default, n_mean / (2.0 * pilot_n))))


def _expected_brier(q: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((q - p) ** 2 + p * (1.0 - p)))


def simulate_two_phase_run(
    row: RowSpec,
    cfg: SimConfig,
    seed: int,
    *,
    steps: int = 120,
    batch: int = 64,
    n_mean: int = 8,
    n_min: int = 2,
    n_max: int = 32,
    embedder: str = "hashing",
    pilot_n: int = PILOT_N,
    pool_factor: float | None = None,
    strategy_kwargs: dict[str, Any] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> SimRun:
    """Train the simulator's policy with a two-phase row until ``steps * batch * n_mean`` cumulative rollouts.

    ``pool_factor`` (``pilot_commit`` only) defaults to :func:`pilot_commit_pool_factor`; ``strategy_kwargs`` go
    to the strategy (e.g. ``{"skip": "none"}`` for ``vip_two_phase``). Variances (``var_plan``
    and the uniform / oracle references) are the allocator's estimator model under the TRUE p of the final groups;
    NaN for ``pilot_commit``, whose trained prompts are chosen after seeing rewards (as for DAPO).
    """
    is_pc = row.strategy == "pilot_commit"
    pf = (pool_factor if pool_factor is not None else pilot_commit_pool_factor(n_mean, pilot_n)) if is_pc else 1.0
    pool = max(batch, int(round(batch * pf)))
    world = SimWorld.build(
        cfg, seed, steps=steps, draw=pool, n_mean=n_mean, n_min=n_min, n_max=n_max, embedder=embedder,
        draw_name="candidate pool",
    )  # fmt: skip
    sim, rng_r, rng_g = world.sim, world.rng_r, world.rng_g  # rewards: the stream the single-phase rows use
    kwargs: dict[str, Any] = {"pool_factor": pf} if is_pc else {}
    kwargs.update(strategy_kwargs or {})
    alloc = world.allocator(row.strategy, row.predictor, strategy_kwargs=kwargs)
    shadow_uniform, shadow_oracle = world.shadows()
    budget = batch * n_mean
    total = steps * budget
    cum = 0
    t = 0
    log = StepLog.start(sim.mean_success())
    pilot_s: list[float] = []
    commit_s: list[float] = []
    brier_prior: list[float] = []
    brier_post: list[float] = []
    mae_prior: list[float] = []
    mae_post: list[float] = []
    extra_zero: list[float] = []
    while cum < total:
        idx, ids, texts, p_true = world.draw(pool, alloc, row.predictor)
        # one block of uniforms per step, as the single-phase rows draw: pilot = first columns, commit = next ones
        full = sim.rollouts(idx, np.full(pool, n_max, np.int64), rng_r, width=n_max)
        t0 = time.perf_counter()
        pilot = alloc.plan_pilot(ids, prompts=texts, budget=budget, step=t, pilot_n=pilot_n)
        r1 = [full[i][: int(c)] for i, c in enumerate(pilot.counts)]
        alloc.observe(ids, r1, step=t)
        t1 = time.perf_counter()
        commit = alloc.plan_commit(step=t)
        r2 = [full[i][int(a) : int(a) + int(c)] for i, (a, c) in enumerate(zip(pilot.counts, commit.counts))]
        alloc.observe(ids, r2, step=t)
        t2 = time.perf_counter()
        pilot_s.append(t1 - t0)
        commit_s.append(t2 - t1)
        log.alloc_seconds.append(t2 - t0)
        groups = [np.concatenate([a, b]) for a, b in zip(r1, r2)]
        sizes = commit.group_sizes
        # the step's telemetry: whole groups, predictions as planned before generating (the pilot's prior)
        as_planned = dataclasses.replace(commit, p_mean=pilot.p_mean)
        log.telemetry.append({**as_planned.metrics(), **alloc.outcome_metrics(groups, as_planned)})
        brier_prior.append(_expected_brier(pilot.p_mean, p_true))
        brier_post.append(_expected_brier(commit.p_mean, p_true))
        mae_prior.append(float(np.mean(np.abs(pilot.p_mean - p_true))))
        mae_post.append(float(np.mean(np.abs(commit.p_mean - p_true))))
        extra_zero.append(float(np.mean(commit.counts == 0)))
        if is_pc:
            log.variances(float("nan"), float("nan"), float("nan"))
        else:
            log.variances(*reference_variances(alloc, shadow_uniform, shadow_oracle, ids, texts, budget, t, p_true,
                                               sizes))  # fmt: skip
        train = np.flatnonzero(commit.train_mask)
        log.groups([g for g in groups if len(g)], train.size / pool)
        if train.size:
            t_idx = idx[train]
            grad = sim.gradient(t_idx, [groups[i] for i in train], rng_g, p=sim.true_p(t_idx), batch_size=batch)
        else:  # keep the noise generator in step with the other rows
            rng_g.standard_normal((0, cfg.dim))
            grad = np.zeros(cfg.dim)
        if train.size:
            sim.update(grad)
        cum += budget
        t += 1
        log.point(t, cum, sim.mean_success())
        if on_step is not None:
            on_step(t)
    return log.run(
        row,
        seed,
        cfg.sigma,
        cfg.estimator,
        total,
        pilot_n=pilot_n,
        pool_factor=pf,
        brier_prior=float(np.mean(brier_prior)),
        brier_post=float(np.mean(brier_post)),
        mae_prior=float(np.mean(mae_prior)),
        mae_post=float(np.mean(mae_post)),
        pilot_ms=1e3 * float(np.mean(pilot_s)),
        commit_ms=1e3 * float(np.mean(commit_s)),
        frac_zero_extra=float(np.mean(extra_zero)),
        generation_rounds=2,
    )


def two_phase_report_lines(league: dict[str, list[SimRun]]) -> list[str]:
    """Markdown lines on the two-phase rows of a league (empty when there are none): predictor calibration
    before / after the pilot, the share of prompts the commit gave no extra rollouts, and the allocator's time
    per phase."""
    from vipalloc.reporting import fmt_ci, md_table

    rows = []
    for label, runs in league.items():
        if not runs or "brier_prior" not in runs[0].extra:
            continue
        ex = [r.extra for r in runs]
        rows.append(
            [
                label,
                f"{ex[0]['pilot_n']} / {ex[0]['pool_factor']:g}x",
                fmt_ci([e["brier_prior"] for e in ex], digits=4),
                fmt_ci([e["brier_post"] for e in ex], digits=4),
                fmt_ci([e["mae_prior"] for e in ex]),
                fmt_ci([e["mae_post"] for e in ex]),
                fmt_ci([e["frac_zero_extra"] for e in ex]),
                fmt_ci([e["pilot_ms"] for e in ex], digits=1),
                fmt_ci([e["commit_ms"] for e in ex], digits=1),
            ]
        )
    if not rows:
        return []
    headers = [
        "row",
        "pilot_n / pool",
        "Brier before pilot",
        "Brier after pilot",
        "MAE p before",
        "MAE p after",
        "prompts with 0 extra",
        "pilot ms/step",
        "commit ms/step",
    ]
    return [
        "## Two-phase rows: the predictor before and after the pilot",
        "",
        "Expected Brier score against the TRUE p (`mean((q - p)^2 + p(1 - p))`) of the predictor's p before the",
        "pilot and of the posterior mean the commit used; allocator wall time per phase (plan + observe). Two-phase",
        "rows generate in two rounds per step (pilot, then commit): on an LLM that is a second generation latency.",
        "",
        md_table(headers, rows),
        "",
    ]


def _auc(run: dict[str, Any]) -> float:
    x = np.asarray(run["cum_rollouts"], np.float64)
    y = np.asarray(run["success"], np.float64)
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) / x[-1]) if x[-1] > 0 else float(y[-1])


def paired_differences(result: dict[str, Any], row: str, baseline: str) -> list[dict[str, Any]]:
    """Per sigma of a ``simulate.json`` (league and sweep): the same-seed differences ``row - baseline`` of the
    final mean success and of the mean success over the run (AUC), as ``fmt_ci`` strings with the seeds ahead."""
    from vipalloc.reporting import fmt_ci

    blocks: dict[float, dict[str, list[dict[str, Any]]]] = {float(result["config"]["sigma"]): result["league"]}
    for sg, runs in result.get("sweep", {}).items():
        blocks.setdefault(float(sg), runs)
    out = []
    for sg in sorted(blocks):
        runs = blocks[sg]
        if row not in runs or baseline not in runs:
            continue
        base = {r["seed"]: r for r in runs[baseline]}
        pairs = [(r, base[r["seed"]]) for r in runs[row] if r["seed"] in base]
        d_final = [a["success"][-1] - b["success"][-1] for a, b in pairs]
        d_auc = [_auc(a) - _auc(b) for a, b in pairs]
        out.append(
            {
                "sigma": sg,
                "seeds": len(pairs),
                "final": fmt_ci(d_final, signed=True),
                "auc": fmt_ci(d_auc, signed=True),
                "auc_ahead": sum(d > 0 for d in d_auc),
            }
        )
    return out


if (
    __name__ == "__main__"
):  # python -m vipalloc.bench.two_phase_sim simulate.json "row" "baseline" ["row" "baseline" ...]
    import json
    import sys

    res = json.loads(open(sys.argv[1]).read())
    names = sys.argv[2:]
    for a, b in zip(names[::2], names[1::2]):
        for d in paired_differences(res, a, b):
            print(
                f"{a} - {b} | sigma {d['sigma']:g} | final {d['final']} | AUC {d['auc']} "
                f"({d['auc_ahead']}/{d['seeds']} seeds ahead)"
            )
