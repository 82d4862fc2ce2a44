"""Summarise `vipalloc bench lm --parts variance` (its `lm_variance.json`) for choosing a default strategy.

For every strategy, over all (snapshot, task setting, budget, estimator) cells of one predictor: the geometric mean
of the measured best-step error ratio vs uniform, the worst cell, and how many cells are resolved better (95%
interval below 1) or worse (above 1) than uniform; then the per-snapshot Dr.GRPO table at 4 rollouts a prompt.

    python benchmarks/variance_summary.py reports/lm_variance.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np


def main(path: str) -> None:
    doc = json.load(open(path))
    cells: dict[tuple[str, str], list[tuple[float, float, float, float, str]]] = defaultdict(list)
    for block in doc["blocks"]:
        for r in block["rows"]:
            if r["strategy"] == "uniform":
                continue
            lo, hi = r["best_error_ratio_ci"]
            where = f"{block['snapshot']} {block['setting']} {r['mean_n']}/prompt {r['estimator']}"
            cells[(r["predictor"], r["strategy"])].append((r["best_error_ratio"], lo, hi, r["modelled_error"], where))
    print(f"commit {doc['commit']}; best-step error ratio vs uniform (measured), over all cells\n")
    for pred in ("oracle", "gp"):
        print(f"### predictor {pred}\n")
        print("| strategy | cells | geometric mean | worst (cell) | resolved better | resolved worse |")
        print("| :--- | ---: | ---: | :--- | ---: | ---: |")
        rows = [(s, v) for (p, s), v in cells.items() if p == pred]
        rows.sort(key=lambda sv: float(np.exp(np.mean(np.log([c[0] for c in sv[1]])))))
        for strat, v in rows:
            vals = np.array([c[0] for c in v])
            worst = max(v, key=lambda c: c[0])
            better = sum(c[2] < 1 for c in v)
            worse = sum(c[1] > 1 for c in v)
            print(
                f"| {strat} | {len(v)} | {float(np.exp(np.log(vals).mean())):.3f} | {worst[0]:.2f} ({worst[4]}) "
                f"| {better} | {worse} |"
            )
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "reports/lm_variance.json")
