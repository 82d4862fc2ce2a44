"""Per-seed curves of a `vipalloc bench lm --parts league` folder: held-out mean@k at every evaluation, the peak, the
drop from it, the mean tokens a reply over the last 10 steps (a policy that pads to the cap shows ~max_new_tokens),
and the tokens each run spent; then per row, how many runs dropped 0.05 or more from their peak.

    python benchmarks/lm_league_curves.py reports/l27/lm/league-cpu-40
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(folder: Path) -> None:
    rows: dict[str, dict[int, dict]] = {}
    for f in sorted(folder.glob("*-seed*.json")):
        d = json.loads(f.read_text())
        if "strategy" not in d:
            continue
        name = d["strategy"] + ("@tokens" if d["mode"] == "tokens" else "")
        rows.setdefault(name, {})[d["seed"]] = d
    print("| row | seed | mean@k at each evaluation | peak | end - peak | tokens a reply, last 10 | tokens spent |")
    print("| :--- | ---: | :--- | ---: | ---: | ---: | ---: |")
    summary: dict[str, list[tuple[float, float]]] = {}
    for name in sorted(rows, key=lambda x: (x != "uniform", x)):
        for seed in sorted(rows[name]):
            d = rows[name][seed]
            m = d["eval_mean_at_k"]
            tok = np.diff([0, *d["tokens"]])[-10:].sum() / max(1, np.diff([0, *d["rollouts"]])[-10:].sum())
            print(
                f"| {name} | {seed} | {' / '.join(f'{x:.3f}' for x in m)} | {max(m):.3f} | {m[-1] - max(m):+.3f} "
                f"| {tok:.1f} | {d['tokens'][-1]} |"
            )
            summary.setdefault(name, []).append((m[-1] - max(m), tok))
    for name, v in summary.items():
        arr = np.array(v)
        print(
            f"- {name}: {len(arr)} runs; {(arr[:, 0] <= -0.05).sum()} end 0.05 or more below their peak; "
            f"{(arr[:, 1] >= 7.5).sum()} spend 7.5 or more tokens a reply over the last 10 steps"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
