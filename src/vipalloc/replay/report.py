"""``replay.json``, ``replay.md`` and the PNG plots of ``vipalloc replay``.

Measured figures (what the log holds) and model-based estimates (counterfactual plans) are kept apart in every
output, and every share that cannot be computed is ``null`` with a line in ``cannot_compute`` saying why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vipalloc.reporting import md_table, provenance

__all__ = ["write_report"]

MODEL_NOTE = (
    "Model-based estimates, not training outcomes: each allocator was replayed through this run's log (it planned "
    "each step's real prompts at the step's real total, then learned the real outcomes); the policy and its "
    "outcomes are the logged run's. The variance ratio is vipalloc's gradient-variance model at the predicted p."
)


def _f(v: Any, digits: int = 3, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * float(v):.1f}%"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{float(v):.{digits}f}"


def _tok(v: Any) -> str:
    return "-" if v is None else f"{float(v):,.0f}"


def _plots(out: Path, result: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    per_step = result["per_step"]
    if per_step:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        steps = [r["step"] for r in per_step]
        correct = [r["all_correct_rollouts"] / max(r["rollouts"], 1) for r in per_step]
        wrong = [r["all_wrong_rollouts"] / max(r["rollouts"], 1) for r in per_step]
        ax.stackplot(steps, wrong, correct, labels=["all-wrong groups", "all-correct groups"], alpha=0.7)
        if per_step[0].get("zero_variance_tokens_share") is not None:
            ax.plot(steps, [r["zero_variance_tokens_share"] for r in per_step], "k--", lw=1, label="tokens")
        if per_step[0].get("zero_advantage_share") is not None:
            ax.plot(
                steps, [r["zero_advantage_share"] for r in per_step], "r-", lw=1.2, label="zero advantage as trained"
            )
        ax.set_xlabel("step")
        ax.set_ylabel("share of the step's rollouts")
        ax.set_ylim(0, 1)
        ax.set_title("Rollouts in zero-variance groups (measured)")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "zero_variance.png")
        plt.close(fig)
        made.append("zero_variance.png")
    preds = {k: v for k, v in result["predictors"].items() if v.get("calibration")}
    if preds:
        fig, ax = plt.subplots(figsize=(5.5, 5), dpi=110)
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        for name, v in preds.items():
            bins = v["calibration"]
            xs, ys = [b["p_mean"] for b in bins], [b["observed"] for b in bins]
            line = ax.plot(xs, ys, marker="o", ms=3, label=name)[0]
            for b, x, y in zip(bins, xs, ys):  # how many groups each point stands for
                ax.annotate(
                    str(b["groups"]),
                    (x, y),
                    fontsize=6,
                    color=line.get_color(),
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_xlabel("predicted success probability (next step; labels: (prompt, step) pairs per bin)")
        ax.set_ylabel("observed success rate")
        ax.set_title("Predictor calibration on this run")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "calibration.png")
        plt.close(fig)
        made.append("calibration.png")
    strats = {k: v for k, v in result["strategies"].items() if v.get("per_step")}
    if strats:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        for name, v in strats.items():
            rows = [r for r in v["per_step"] if r.get("variance_ratio") is not None]
            ax.plot([r["step"] for r in rows], [r["variance_ratio"] for r in rows], lw=1.2, label=name)
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("modelled variance vs uniform (same rollouts)")
        ax.set_title("Counterfactual plans (model-based estimate)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "counterfactual_variance.png")
        plt.close(fig)
        made.append("counterfactual_variance.png")
    return made


def _markdown(result: dict[str, Any], plots: list[str], command: str) -> str:
    r = result
    lines = ["# Replay of a training log", "", f"**{r['headline']}**", "", provenance(command), ""]
    dup = len(r["skipped_duplicate_files"])
    dup_note = f", {dup} repeated TRL file(s) skipped" if dup else ""
    lines += [
        f"- format: `{r['format']}`, {r['files']} of {r['files_found']} file(s) read{dup_note}",
        f"- groups: {'; '.join(r['grouping']) or '-'}",
        f"- success (zero-variance measure): {r['success']}",
        f"- zero advantage as trained: {r['zero_advantage_method'] or 'not in this log'}",
        f"- tokens: {r['tokens_method']}",
        "",
        "## What the run spent (measured)",
        "",
    ]
    headers = ["", "rollouts", "share", "tokens", "token share"]
    rows = [
        ["all", _f(r["rollouts"]), "100%", _tok(r["tokens"]), "100%" if r["tokens"] else "-"],
        [
            "zero-variance groups",
            _f(r["zero_variance_rollouts"]),
            _f(r["zero_variance_share"], pct=True),
            _tok(r["zero_variance_tokens"]),
            _f(r["zero_variance_tokens_share"], pct=True),
        ],
        [
            "  all correct (solved)",
            _f(r["all_correct_rollouts"]),
            _f(r["all_correct_rollouts"] / r["rollouts"] if r["rollouts"] else None, pct=True),
            _tok(r["all_correct_tokens"]),
            _f(r["all_correct_tokens"] / r["tokens"] if r["tokens"] else None, pct=True),
        ],
        [
            "  all wrong (hopeless)",
            _f(r["all_wrong_rollouts"]),
            _f(r["all_wrong_rollouts"] / r["rollouts"] if r["rollouts"] else None, pct=True),
            _tok(r["all_wrong_tokens"]),
            _f(r["all_wrong_tokens"] / r["tokens"] if r["tokens"] else None, pct=True),
        ],
    ]
    if r["zero_advantage_rollouts"] is not None:
        rows.insert(
            1,
            [
                "zero advantage as trained",
                _f(r["zero_advantage_rollouts"]),
                _f(r["zero_advantage_share"], pct=True),
                _tok(r["zero_advantage_tokens"]),
                _f(r["zero_advantage_tokens_share"], pct=True),
            ],
        )
    lines += [md_table(headers, rows)]
    lines += [
        f"{r['prompt_steps']:,} groups over {r['steps']} step(s) and {r['prompts']['prompts']:,} "
        f"prompts: {_f(r['solved_share'], pct=True)} of groups solved, {_f(r['hopeless_share'], pct=True)} "
        f"hopeless; {r['prompts']['never_solved']:,} prompts never solved and {r['prompts']['always_solved']:,} "
        "always solved over the whole log. Zero variance is measured on the success reward; a run that trains on "
        "more (a format bonus) can still give such a group an advantage, which the zero-advantage row (from what the "
        "trainer logged) counts: that row is what bought no gradient.",
        "",
    ]
    if r["per_step"]:
        lines += ["### Per step", ""]
        shown = r["per_step"] if len(r["per_step"]) <= 40 else r["per_step"][:: max(1, len(r["per_step"]) // 40)]
        lines += [
            md_table(
                ["step", "rollouts", "zero-adv share", "zero-var share", "zero-var token share", "solved", "hopeless"],
                [
                    [
                        s["step"],
                        _f(s["rollouts"]),
                        _f(s["zero_advantage_share"], pct=True),
                        _f(s["zero_variance_share"], pct=True),
                        _f(s["zero_variance_tokens_share"], pct=True),
                        _f(s["solved_share"], pct=True),
                        _f(s["hopeless_share"], pct=True),
                    ]
                    for s in shown
                ],
            )
        ]
        if len(shown) < len(r["per_step"]):
            lines += [f"(every {len(r['per_step']) // len(shown)}th step shown; all steps are in replay.json)", ""]
    if "zero_variance.png" in plots:
        lines += ["![zero-variance share per step](zero_variance.png)", ""]
    lines += ["## Predictors: next-step forecasts on this run (measured)", ""]
    preds = {k: v for k, v in r["predictors"].items() if v.get("count")}
    if preds:
        lines += [
            "Each predictor learned from steps before t and forecast each prompt's success at step t (Brier: mean "
            "squared error per rollout, lower is better; 0.25 is a constant 0.5).",
            "",
            md_table(
                [
                    "predictor",
                    "Brier",
                    "Brier, seen prompts",
                    "Brier, new prompts",
                    "log loss",
                    "(prompt, step) pairs scored",
                ],
                [
                    [
                        k,
                        _f(v["brier"], 4),
                        _f(v["brier_seen"], 4),
                        _f(v["brier_new"], 4),
                        _f(v["log_loss"], 4),
                        _f(v["count"]),
                    ]
                    for k, v in preds.items()
                ],
            ),
        ]
        if "calibration.png" in plots:
            lines += ["![calibration](calibration.png)", ""]
        lines += ["Calibration bins (a bin with few (prompt, step) pairs is noise):", ""]
        lines += [
            md_table(
                ["predictor", "bin", "(prompt, step) pairs", "rollouts", "mean predicted", "observed"],
                [
                    [
                        k,
                        f"{b['lo']:.1f}-{b['hi']:.1f}",
                        _f(b["groups"]),
                        _f(b["rollouts"]),
                        _f(b["p_mean"]),
                        _f(b["observed"]),
                    ]
                    for k, v in preds.items()
                    for b in v["calibration"]
                ],
            )
        ]
    lines += ["## Counterfactual allocation (model-based estimates)", "", MODEL_NOTE, ""]
    strats = r["strategies"]
    if r.get("counterfactual_nothing_to_gain"):
        lines += [f"**{r['counterfactual_nothing_to_gain']}.**", ""]
    elif strats:
        lines += _strategy_tables(r, plots)
    if r["cannot_compute"]:
        lines += ["", "## What this log cannot tell", ""] + [f"- {c}" for c in r["cannot_compute"]]
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def _why_not(v: dict[str, Any]) -> str:
    return v["skip_reasons"][0] if v.get("skip_reasons") else "no step could be planned"


def _strategy_tables(r: dict[str, Any], plots: list[str]) -> list[str]:
    """Both counterfactual tables with a row for every strategy asked for (its reason where it has no figure)."""
    strats = r["strategies"]
    info = r["counterfactual_settings"]
    lines = [
        f"Settings: predictor `{info['predictor']}`, estimator `{info['estimator']}`, n_min {info['n_min']}, "
        f"n_max {info['n_max']}; the first step is not planned (no history to predict from). Rollouts moved: "
        "rollouts the log spent on groups that turned out zero-variance minus what the plan gave them "
        "(positive: the plan spent less there), tokens at each prompt's realised mean length.",
        "",
        "### Same rollout budget",
        "",
    ]
    rows = []
    for k, v in strats.items():
        if not v["steps_planned"]:
            rows.append([k, "-", "-", "-", "-", "-", f"0: {_why_not(v)}"])
            continue
        rows.append(
            [
                k,
                _f(v["variance_ratio"]),
                _f(v["variance_ratio_vs_logged"]),
                _f(v["rollouts_moved_from_zero_variance"]),
                _tok(v["tokens_moved_from_zero_variance"]),
                _f(v["dropped_prompt_steps"]),
                f"{v['steps_planned']}" + (f" ({v['steps_skipped']} skipped)" if v["steps_skipped"] else ""),
            ]
        )
    lines += [
        md_table(
            ["strategy", "var ratio vs uniform", "vs logged", "rollouts moved", "tokens moved", "dropped", "steps"],
            rows,
        )
    ]
    if r["tokens"] is not None:
        rows = []
        for k, v in strats.items():
            t = v.get("same_token_budget")
            if t:
                rows.append(
                    [
                        k,
                        _f(t["rollouts"]),
                        _f(t["variance_ratio"]),
                        _f(t["predicted_tokens"] / t["target_tokens"] if t["target_tokens"] else None),
                        _tok(t["tokens_moved_from_zero_variance"]),
                        "",
                    ]
                )
            else:
                why = v.get("same_token_budget_refused") or (
                    _why_not(v) if not v["steps_planned"] else "no step had a token budget to plan"
                )
                rows.append([k, "-", "-", "-", "-", str(why).splitlines()[0]])
        lines += [
            "### Same token budget",
            "",
            f"Method: {info['token_budget_method']}.",
            "",
            md_table(
                ["strategy", "rollouts", "var ratio vs uniform", "predicted tokens / logged", "tokens moved", "note"],
                rows,
            ),
        ]
    if "counterfactual_variance.png" in plots:
        lines += ["![counterfactual variance per step](counterfactual_variance.png)", ""]
    lines += ["Per-(step, prompt) counts of every plan: `counterfactuals/<strategy>.jsonl`.", ""]
    for k, v in strats.items():
        if v["steps_skipped"] and v["steps_planned"]:
            lines += [f"- `{k}` skipped {v['steps_skipped']} step(s), e.g. {v['skip_reasons'][0]}"]
    return lines


def write_report(out: Path, result: dict[str, Any], command: str) -> list[Path]:
    """Write ``replay.json``, ``replay.md`` and the plots into ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(out, result)
    (out / "replay.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "replay.md").write_text(_markdown(result, plots, command), encoding="utf-8")
    return [out / "replay.json", out / "replay.md", *(out / p for p in plots)]
