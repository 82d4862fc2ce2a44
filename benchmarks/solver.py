"""Solver benchmark: our exact ``solve`` vs the peers' solvers on the same inputs, in the same run.

Prints four tables (nothing is asserted; figures go to ``docs/allocation.md``):

1. Same program, ``n in [4, 32]``, budget ``8 M``, the authors' hardness bonus, ``p ~ Beta(0.6, 0.6)``: our time
   (median of several runs), the authors' SLSQP + rounding (their scipy defaults: finite-difference gradient, 100
   iterations, ``lower=4`` as in their ``solve``), their research bisection allocator, each one's time ratio to
   ours and its objective gap to ours (ours is the exact optimum, so every gap is >= 0).
2. The authors' deployed pipeline (``lower=1``, rounding drops every n < 4) vs our ``vip`` strategy (two exact
   stages): time and prompts dropped.
3. Knapsack-RL: their exact dynamic program (O(M * B * K)) vs our ``knapsack`` strategy (same optimum).
4. Our solver on hard inputs (exact ties, mostly-unsolved batches, the drop option, Dr.GRPO from n = 2).

SLSQP's cost grows roughly as M^3 (dense QP per iteration): it runs once per cell and is skipped above
``--slsqp-max-m`` (default 1024; at 4096 it would take hours); the DP is skipped above ``--dp-max-m`` (its
back-pointer table is M x B). BLAS is pinned to one thread: on a shared 2-core machine OpenBLAS threads make SLSQP
up to 30x slower, which would flatter us unfairly.

Run: ``.venv/bin/python benchmarks/solver.py [--quick] [--sizes 256 1024 4096] [--repeat 7]``.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from vipalloc.allocation import objective, solve  # noqa: E402
from vipalloc.bench.peers import (  # noqa: E402
    GAMMA,
    authors_bisection_allocate,
    authors_slsqp_allocate,
    knapsack_dp_allocate,
)
from vipalloc.strategies import get_strategy, knapsack_value  # noqa: E402


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median wall time in seconds over ``repeat`` runs (after one warm-up when repeat > 1), and the last output."""
    if repeat > 1:
        fn()
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def ms(t: float) -> str:
    return f"{1e3 * t:,.1f}" if t < 10 else f"{1e3 * t:,.0f}"


def batch(m: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).beta(0.6, 0.6, m)


def same_program(sizes: list[int], repeat: int, slsqp_max: int, console: Console) -> Table:
    table = Table(title="1. same program: n in [4, 32], budget 8M, bonus 4e-4 (Dr.GRPO) / 7e-4 (RLOO), Beta(0.6,0.6)")
    cols = ["M", "estimator", "ours ms", "objective (ours)", "SLSQP ms", "x ours", "SLSQP gap", "SLSQP status"]
    cols += ["bisect ms", "x ours", "bisect gap"]
    for col in cols:
        table.add_column(col, justify="right")
    for m in sizes:
        p, budget = batch(m), 8 * m
        for est in ("drgrpo", "rloo"):
            g = GAMMA[est]

            def f(n: np.ndarray, est: str = est, g: float = g, p: np.ndarray = p) -> float:
                return objective(p, n, estimator=est, hardness_bonus=g)

            t_ours, n_ours = timed(lambda: solve(p, budget, estimator=est, hardness_bonus=g), repeat)  # noqa: B023
            f_ours = f(n_ours)
            row = [str(m), est, ms(t_ours), f"{f_ours:.6f}"]
            if m <= slsqp_max:
                t_s, (n_s, res) = timed(
                    lambda: authors_slsqp_allocate(p, budget, estimator=est, lower=4, return_result=True),  # noqa: B023
                    1,
                )
                dropped = int((n_s == 0).sum())
                status = ("converged" if res.success else f"stopped at {res.nit} it") + (
                    f", {dropped} dropped" if dropped else ""
                )
                row += [ms(t_s), f"{t_s / t_ours:,.0f}", f"{f(n_s) - f_ours:+.2e}", status]
            else:
                row += ["skipped", "-", "-", f"M > {slsqp_max} (~M^3: hours)"]
            t_b, n_b = timed(lambda: authors_bisection_allocate(p, budget), max(1, repeat // 3))  # noqa: B023
            row += [ms(t_b), f"{t_b / t_ours:,.0f}", f"{f(n_b) - f_ours:+.2e}"]
            table.add_row(*row)
            console.log(f"table 1: M={m} {est} done")
    return table


def deployed(sizes: list[int], repeat: int, slsqp_max: int, console: Console) -> Table:
    table = Table(title="2. deployed pipelines, budget 8M: authors (SLSQP lower=1 + drop rounding) vs our vip strategy")
    for col in ("M", "estimator", "vip ms", "vip dropped", "authors ms", "x vip", "authors dropped"):
        table.add_column(col, justify="right")
    for m in sizes:
        p, budget = batch(m), 8 * m
        for est in ("drgrpo", "rloo"):
            vip = get_strategy("vip", estimator=est)
            t_v, n_v = timed(lambda: vip.allocate(p, budget, 4, 32), repeat)  # noqa: B023
            row = [str(m), est, ms(t_v), str(int((n_v == 0).sum()))]
            if m <= slsqp_max:
                t_a, n_a = timed(lambda: authors_slsqp_allocate(p, budget, estimator=est, lower=1.0), 1)  # noqa: B023
                row += [ms(t_a), f"{t_a / t_v:,.0f}", str(int((n_a == 0).sum()))]
            else:
                row += ["skipped", "-", "-"]
            table.add_row(*row)
            console.log(f"table 2: M={m} {est} done")
    return table


def knapsack(sizes: list[int], repeat: int, dp_max: int, console: Console) -> Table:
    table = Table(title="3. Knapsack-RL objective, n in [4, 32], budget 8M: their DP vs our exact solver")
    for col in ("M", "ours ms", "value (ours)", "DP ms", "x ours", "DP value - ours"):
        table.add_column(col, justify="right")
    strat = get_strategy("knapsack")
    for m in sizes:
        p, budget = batch(m), 8 * m
        t_o, n_o = timed(lambda: strat.allocate(p, budget, 4, 32), repeat)  # noqa: B023
        v_o = float(knapsack_value(p, n_o).sum())
        row = [str(m), ms(t_o), f"{v_o:.6f}"]
        if m <= dp_max:
            t_d, n_d = timed(lambda: knapsack_dp_allocate(p, budget, n_min=4, n_max=32), 1)  # noqa: B023
            row += [ms(t_d), f"{t_d / t_o:,.0f}", f"{float(knapsack_value(p, n_d).sum()) - v_o:+.1e}"]
        else:
            row += ["skipped", "-", f"M > {dp_max} (M x B table)"]
        table.add_row(*row)
        console.log(f"table 3: M={m} done")
    return table


def hard_cases(sizes: list[int], repeat: int, console: Console) -> Table:
    table = Table(title="4. our solver on hard inputs (ms, median), budget 8M+3, Dr.GRPO")
    cases: dict[str, tuple[Callable[[np.random.Generator, int], np.ndarray], dict[str, Any]]] = {
        "Beta(0.6,0.6)": (lambda r, m: r.beta(0.6, 0.6, m), {}),
        "all p equal (ties)": (lambda r, m: np.full(m, 0.3), {}),
        "rates k/8 (ties)": (lambda r, m: r.integers(0, 9, m) / 8, {}),
        "n_min = 2 (non-convex at 3)": (lambda r, m: r.beta(0.6, 0.6, m), {"n_min": 2}),
        "drop + bonus": (lambda r, m: r.beta(0.6, 0.6, m), {"allow_drop": True, "hardness_bonus": 4e-4}),
        "90% p=0, drop + bonus": (
            lambda r, m: np.where(r.random(m) < 0.9, 0.0, r.random(m)),
            {"allow_drop": True, "hardness_bonus": 4e-4},
        ),
        "drop + bonus, budget 5M+1": (lambda r, m: r.beta(0.6, 0.6, m), {"allow_drop": True, "hardness_bonus": 4e-4}),
    }
    table.add_column("input")
    for m in sizes:
        table.add_column(f"M={m}", justify="right")
    for name, (gen, kw) in cases.items():
        row = [name]
        for m in sizes:
            p = gen(np.random.default_rng(1), m)
            budget = 5 * m + 1 if "5M" in name else 8 * m + 3
            t, n = timed(lambda: solve(p, budget, **kw), repeat)  # noqa: B023
            assert int(n.sum()) == budget
            row.append(ms(t))
        table.add_row(*row)
        console.log(f"table 4: {name} done")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--repeat", type=int, default=7, help="runs per timing of our solver (median)")
    ap.add_argument("--slsqp-max-m", type=int, default=1024, help="skip SLSQP above this many prompts")
    ap.add_argument("--dp-max-m", type=int, default=1024, help="skip the knapsack DP above this many prompts")
    ap.add_argument("--quick", action="store_true", help="sizes 256 and 1024, SLSQP only at 256")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.slsqp_max_m, args.dp_max_m = [256, 1024], 256, 256
    console = Console(width=180)
    console.print(
        f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
        f"BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}, load average {os.getloadavg()[0]:.1f}"
    )
    console.print(same_program(args.sizes, args.repeat, args.slsqp_max_m, console))
    console.print(deployed(args.sizes, args.repeat, args.slsqp_max_m, console))
    console.print(knapsack(args.sizes, args.repeat, args.dp_max_m, console))
    console.print(hard_cases(sorted(set(args.sizes) | {16384}), args.repeat, console))


if __name__ == "__main__":
    main()
