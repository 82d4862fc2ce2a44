"""Summarise `vipalloc bench lm --parts variance` (its `lm_variance.json`) for choosing a default strategy.

For every strategy, over all (snapshot, task setting, budget, estimator) cells of one predictor: the geometric mean
of the measured best-step error ratio vs uniform, the worst cell, and how many cells are resolved better (95%
interval below 1) or worse (above 1) than uniform; then, per budget, the table of every (snapshot, setting) at Dr.GRPO:
measured [95% bootstrap] / modelled (`Plan.error_ratio`), and the cells where a strategy is resolved worse.

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
    for mean_n in (2, 4, 8):
        print(f"### Dr.GRPO, {mean_n} rollouts a prompt: measured [95%] / modelled\n")
        heads = [(b["snapshot"], b["setting"].split(" x")[0], pred) for b in doc["blocks"] for pred in ("oracle", "gp")]
        print(
            "| strategy | " + " | ".join(f"{s} {t}, {'exact p' if p == 'oracle' else 'GP'}" for s, t, p in heads) + " |"
        )
        print("| :--- |" + " :--- |" * len(heads))
        # every strategy the run measured, in its order (each appears once per estimator and predictor)
        for strat in dict.fromkeys(r["strategy"] for r in doc["blocks"][0]["rows"]):
            if strat == "uniform":
                continue
            cells = []
            for b in doc["blocks"]:
                for pred in ("oracle", "gp"):
                    (r,) = [
                        r
                        for r in b["rows"]
                        if r["strategy"] == strat
                        and r["predictor"] == pred
                        and r["mean_n"] == mean_n
                        and r["estimator"] == "drgrpo"
                    ]
                    lo, hi = r["best_error_ratio_ci"]
                    cells.append(f"{r['best_error_ratio']:.2f} [{lo:.2f}, {hi:.2f}] / {r['modelled_error']:.2f}")
            print(f"| {strat} | " + " | ".join(cells) + " |")
        print()
    print("### cells where vip_error is resolved worse than uniform\n")
    for v in cells_of(doc, "vip_error"):
        print(f"- {v}")


def cells_of(doc: dict, strategy: str) -> list[str]:
    """The cells where ``strategy``'s best-step error ratio has its whole interval above 1."""
    out = []
    for b in doc["blocks"]:
        for r in b["rows"]:
            lo, hi = r["best_error_ratio_ci"]
            if r["strategy"] == strategy and lo > 1:
                out.append(
                    f"{b['snapshot']} {b['setting']}, {r['mean_n']}/prompt {r['estimator']} {r['predictor']}: "
                    f"{r['best_error_ratio']:.2f} [{lo:.2f}, {hi:.2f}], modelled {r['modelled_error']:.2f}, "
                    f"dropped {r['dropped']:.1f} of {len(b['pool_p'])}"
                )
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "reports/lm_variance.json")
