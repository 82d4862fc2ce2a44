"""Allocator overhead benchmark (issue: core engine).

Prints, for M in {256, 1024, 4096} prompts a step and history windows of {10k, 50k} rows:
* our exact solver's time vs the authors' SLSQP + rounding pipeline and their bisection allocator (ratio in the
  same run, and the objective each reaches: ours is the exact optimum, so the others' gap is >= 0);
* the GP's update (observe) and predict time at that history size;
* the whole ``Allocator.plan()`` time (embed with the hashing embedder, predict, solve).
Target: ``plan()`` for M=1024 with 50k history rows under 1 s on 2 CPU cores.

Run: ``.venv/bin/python benchmarks/allocator.py [--quick]``. Figures are printed, nothing is asserted.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from vipalloc import Allocator
from vipalloc.allocation import objective, solve
from vipalloc.bench.peers import authors_bisection_allocate, authors_slsqp_allocate

HARDNESS = {"drgrpo": 4e-4, "rloo": 7e-4}


def timeit(fn, repeat: int) -> tuple[float, object]:
    times = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def solver_rows(ms: list[int], slsqp_max: int, console: Console) -> Table:
    table = Table(
        title="solver: exact (ours) vs the authors' SLSQP+rounding and bisection (budget 8M, n in {0}U[4,32])"
    )
    for col in (
        "M",
        "estimator",
        "ours ms",
        "SLSQP ms",
        "SLSQP/ours",
        "SLSQP gap",
        "bisect ms",
        "bisect/ours",
        "bisect gap",
    ):
        table.add_column(col, justify="right")
    rng = np.random.default_rng(0)
    for m in ms:
        p = rng.beta(0.6, 0.6, size=m)
        budget = 8 * m
        for est in ("drgrpo", "rloo"):
            kw = dict(n_min=4, n_max=32, estimator=est, hardness_bonus=HARDNESS[est], allow_drop=True)
            t_ours, n_ours = timeit(functools.partial(solve, p, budget, **kw), 5)
            f_ours = objective(p, n_ours, estimator=est, hardness_bonus=HARDNESS[est])
            if m <= slsqp_max:
                t_s, n_s = timeit(functools.partial(authors_slsqp_allocate, p, budget, estimator=est), 1)
                gap_s = objective(p, n_s, estimator=est, hardness_bonus=HARDNESS[est]) - f_ours
                s_cols = (f"{1e3 * t_s:.0f}", f"{t_s / t_ours:.0f}x", f"{gap_s:+.2e}")
            else:
                s_cols = ("skipped", "-", "-")
            t_b, n_b = timeit(functools.partial(authors_bisection_allocate, p, budget), 1)
            gap_b = objective(p, n_b, estimator=est, hardness_bonus=HARDNESS[est]) - f_ours
            table.add_row(
                str(m), est, f"{1e3 * t_ours:.1f}", *s_cols, f"{1e3 * t_b:.0f}", f"{t_b / t_ours:.0f}x", f"{gap_b:+.2e}"
            )
            console.log(f"solver M={m} {est} done")
    return table


def plan_rows(ms: list[int], windows: list[int], console: Console) -> Table:
    table = Table(title="Allocator(strategy='vip', predictor='gp', n_min=4, embedder='hashing'): time per step")
    for col in ("M", "history rows", "observe ms", "embed ms", "predict ms", "solve ms", "plan() total ms"):
        table.add_column(col, justify="right")
    for m in ms:
        for rows in windows:
            rng = np.random.default_rng(1)
            n_pool = max(4 * m, rows // 8)
            pool = [f"p{i}" for i in range(n_pool)]
            texts = [f"problem {i}: {i % 97} + {i % 13} * {i % 7}" for i in range(n_pool)]
            alloc = Allocator(strategy="vip", predictor="gp", n_min=4, embedder="hashing")
            steps = max(1, rows // m)
            t_obs = []
            for step in range(steps):
                idx = rng.choice(n_pool, size=m, replace=False)
                ids = [pool[i] for i in idx]
                plan = alloc.plan(ids, prompts=[texts[i] for i in idx], budget=8 * m, step=step)
                rewards = [rng.binomial(1, 0.4, size=n).astype(float) for n in plan.counts]
                t0 = time.perf_counter()
                alloc.observe(ids, rewards, step=step)
                t_obs.append(time.perf_counter() - t0)
            idx = rng.choice(n_pool, size=m, replace=False)
            t0 = time.perf_counter()
            plan = alloc.plan([pool[i] for i in idx], prompts=[texts[i] for i in idx], budget=8 * m, step=steps)
            total = time.perf_counter() - t0
            tm = plan.timings
            table.add_row(
                str(m),
                f"{len(alloc.history):,}",
                f"{1e3 * statistics.median(t_obs[-3:]):.0f}",
                f"{1e3 * tm['embed']:.0f}",
                f"{1e3 * tm['predict']:.0f}",
                f"{1e3 * tm['solve']:.1f}",
                f"{1e3 * total:.0f}",
            )
            console.log(f"plan M={m} rows={rows} done")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    args = ap.parse_args()
    console = Console()
    ms = [256, 1024] if args.quick else [256, 1024, 4096]
    windows = [10_000] if args.quick else [10_000, 50_000]
    console.print(solver_rows(ms, slsqp_max=1024, console=console))
    console.print(plan_rows(ms, windows, console=console))


if __name__ == "__main__":
    main()
