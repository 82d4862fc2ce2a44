"""Where each strategy puts the rollouts of a realistic batch, and what the gradient-error model says of it.

The batch of the objective issue: 256 prompts, 25% with p = 0, 15% with p in (0, 0.02), 10% in (0.97, 1), the rest
Beta(2, 2); exact p (oracle predictor), n in [n_min, 32]; 10 batches per setting, means over them. Columns:
rollouts on p < 0.02, on 0.2 <= p <= 0.8, mid-p prompts dropped, the expected share of rollouts in mixed groups,
``Plan.variance_ratio`` and ``Plan.error_ratio`` (at rho = 1, the default), and the error ratio re-evaluated at
rho = 0.1 and 10 (the plan unchanged) to show how far the verdict depends on the one free ratio.

    .venv/bin/python benchmarks/objective_table.py [--batches 10]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from vipalloc.allocator import Allocator
from vipalloc.plan import Plan

STRATEGIES = ("uniform", "vip", "vip_authors", "vip_pure", "knapsack", "coba", "vip_error")


def realistic_batch(rng: np.random.Generator, m: int = 256) -> np.ndarray:
    k0, k1, k2 = int(0.25 * m), int(0.15 * m), int(0.10 * m)
    return np.concatenate(
        [np.zeros(k0), rng.uniform(0, 0.02, k1), rng.uniform(0.97, 1, k2), rng.beta(2, 2, m - k0 - k1 - k2)]
    )


def row(plan: Plan, p: np.ndarray) -> list[float]:
    n = plan.counts.astype(np.float64)
    mid = (p >= 0.2) & (p <= 0.8)
    mixed = float(np.sum(n * (1 - p**n - (1 - p) ** n)) / n.sum())
    at = [dataclasses.replace(plan, signal_ratio=r).error_ratio for r in (0.1, 10.0)]
    return [
        n[p < 0.02].sum(),
        n[mid].sum(),
        float((n[mid] == 0).sum()),
        mixed,
        plan.variance_ratio,
        plan.error_ratio,
        *at,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=10)
    args = ap.parse_args()
    for estimator in ("drgrpo", "rloo"):
        for per, n_min in ((4, 2), (8, 4)):
            print(f"\n{estimator}, {per} rollouts a prompt (budget {per * 256}), n in [{n_min}, 32]\n")
            print(
                "| strategy | on p < 0.02 | on 0.2 <= p <= 0.8 | mid-p dropped | in mixed groups | variance ratio "
                "| error ratio (rho 1) | at rho 0.1 | at rho 10 |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for name in STRATEGIES:
                rng = np.random.default_rng(7)
                rows = []
                for b in range(args.batches):
                    p = realistic_batch(rng)
                    ids = [f"b{b}q{i}" for i in range(len(p))]
                    alloc = Allocator(strategy=name, predictor="oracle", estimator=estimator, n_min=n_min, n_max=32)
                    alloc.predictor.set_true_p(ids, p)  # type: ignore[attr-defined]
                    rows.append(row(alloc.plan(ids, budget=per * len(p)), p))
                r = np.mean(rows, axis=0)
                print(
                    f"| `{name}` | {r[0]:,.0f} | {r[1]:,.0f} | {r[2]:.1f} | {100 * r[3]:.1f}% | {r[4]:.3f} "
                    f"| {r[5]:.3f} | {r[6]:.3f} | {r[7]:.3f} |"
                )


if __name__ == "__main__":
    main()
