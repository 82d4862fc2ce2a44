"""Next-step error of the length model against the prompt's last mean, on simulator traces and on real-LM traces
(the SmolLM2 league's runs), for issue 27 item 3.

Score: mean |log predicted - log realised mean tokens per rollout| per prompt and step (``vipalloc.bench.length_eval``),
split into prompts seen at an earlier step and never-seen ones. The length model is reached through
``Allocator.expected_lengths`` as ``vipalloc bench predictors`` does (``replay_predictor``), with the ``gp`` and
``beta`` success predictors; the baselines need no model.

Run::

    python benchmarks/lm_length_eval.py --sim-seeds 3 --league 'reports/lm/league-cpu-*/*-seed*.json'
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np


def _league_trace(path: str) -> object:
    from vipalloc.bench.predictors import Trace

    data = json.loads(open(path).read())
    steps = []
    for st in data.get("trace", []):
        keep = [j for j, n in enumerate(st["trials"]) if n > 0]  # dropped prompts (0 rollouts) left out
        tok = np.asarray(st["tokens"], np.float64)[:, keep]
        steps.append(
            {
                "step": int(st["step"]),
                "ids": [str(st["ids"][j]) for j in keep],
                "texts": [str(st["texts"][j]) for j in keep],
                "successes": np.asarray(st["successes"], np.int64)[keep],
                "trials": np.asarray(st["trials"], np.int64)[keep],
                "p_true": None,
                "tokens": tok,
            }
        )
    return Trace(os.path.basename(path), steps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim-seeds", type=int, default=3, help="simulator traces (40 steps x 64 prompts x 8 each)")
    ap.add_argument("--league", default="", help="glob of SmolLM2 league result files (with per-step traces)")
    ap.add_argument("--predictors", default="gp,beta", help="success predictors behind the length model")
    args = ap.parse_args(argv)

    from vipalloc.bench.length_eval import length_baselines
    from vipalloc.bench.predictors import replay_predictor, simulator_trace
    from vipalloc.bench.simulator import SimConfig
    from vipalloc.reporting import fmt_ci, git_commit, md_table

    preds = [p.strip() for p in args.predictors.split(",") if p.strip()]
    sources: dict[str, list[object]] = {}
    if args.sim_seeds > 0:
        sim = SimConfig()
        sources["simulator"] = [simulator_trace(sim, s, steps=40, batch=64, pool=512) for s in range(args.sim_seeds)]
    files = sorted(glob.glob(args.league)) if args.league else []
    if files:
        traces = [_league_trace(f) for f in files]
        sources["SmolLM2 league"] = [t for t in traces if t.steps]  # type: ignore[attr-defined]
    commit = os.environ.get("VIPALLOC_COMMIT") or git_commit(os.getcwd())
    print(f"commit {commit}; traces: " + ", ".join(f"{k} {len(v)}" for k, v in sources.items()))
    for name, traces in sources.items():
        vals: dict[str, dict[str, list[float]]] = {}
        for tr in traces:
            base = length_baselines(tr.steps)  # type: ignore[attr-defined]
            for lbl, res in base.items():
                for sub in ("seen", "never seen"):
                    vals.setdefault(lbl, {}).setdefault(sub, []).append(res[sub]["mae_log"])
            for pred in preds:
                r = replay_predictor(tr, pred)  # type: ignore[arg-type]
                for sub in ("seen", "never seen"):
                    vals.setdefault(f"length model ({pred} p)", {}).setdefault(sub, []).append(
                        r["length"][sub]["mae_log"]
                    )
        rows = []
        for lbl, by in vals.items():
            rows.append([lbl] + [fmt_ci([v for v in by[s] if np.isfinite(v)]) for s in ("seen", "never seen")])
        print(f"\n{name} ({len(traces)} traces; mean ± 95% interval over traces)\n")
        print(md_table(["predictor", "seen", "never seen"], rows))
        last = np.array(vals["prompt's last mean"]["seen"])
        for pred in preds:
            own = np.array(vals[f"length model ({pred} p)"]["seen"])
            ok = np.isfinite(own) & np.isfinite(last)
            if ok.any():
                d = own[ok] - last[ok]
                print(
                    f"- length model ({pred} p) minus last mean, seen prompts, paired by trace: "
                    f"{fmt_ci(d, signed=True)} ({int((d < 0).sum())}/{d.size} traces better)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
