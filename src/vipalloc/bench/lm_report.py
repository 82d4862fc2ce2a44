"""The reports of ``vipalloc bench lm``: the variance part at policy snapshots (measured gradient error and cosine
next to the modelled values) and the league (costs to reach 50/75/90/100% of uniform's gain on rollouts, tokens and
wall-clock with paired bootstrap intervals, AUC, final mean@k and pass@k, next-step Brier).

The level ratios, their bootstrap and the AUC come from :mod:`vipalloc.bench.train_levels` (the same code as
``bench train``); this module only turns league runs into its input.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vipalloc.bench.lm_league import BRIER_PREDICTORS, LeagueConfig, RunResult, label
from vipalloc.bench.train_levels import levels_lines
from vipalloc.reporting import fmt_ci, md_table, paired_verdict

__all__ = ["league_section", "power_lines", "variance_section"]


def _ci(lo_hi: Sequence[float], digits: int = 3) -> str:
    return f"[{lo_hi[0]:.{digits}f}, {lo_hi[1]:.{digits}f}]"


def variance_section(blocks: Sequence[dict[str, Any]]) -> str:
    """``blocks``: one per (snapshot, task setting): ``{"snapshot", "setting", "pool" (a Pool), "rows"}``."""
    lines = [
        "## (a) Gradient error and variance on real rollouts, at policy snapshots\n",
        "For each snapshot (the pretrained model, or LoRA adapters saved by the league's uniform runs) and task "
        "setting, a pool of replies per prompt (the first few are the predictors' history); allocations at a budget "
        "of `mean_n` rollouts a prompt are resampled from the pool. *error*: measured `E|G - g|^2` over uniform's, "
        "with `g` the pool's unbiased whole-pool gradient (RLOO advantages over every pool reply); *best step*: the "
        "same at the best step size, `1 - E<G,g>^2 / (|g|^2 E|G|^2)`, over uniform's (what `Plan.error_ratio` "
        "models); *model err*: mean `Plan.error_ratio`; *var*: measured tr Cov ratio, *model var*: mean "
        "`Plan.variance_ratio`; *cos*: mean cosine to the whole-pool gradient of the same estimator. Brackets: 95% "
        "bootstrap over resamples (resampling noise only, not another pool).\n",
    ]
    for b in blocks:
        pool = b["pool"]
        p = pool.p
        mixed = int(((p > 0) & (p < 1)).sum())
        lines.append(
            f"### snapshot `{b['snapshot']}`, chain_sum {b['setting']}\n\nPool: {len(p)} prompts x "
            f"{pool.rewards.shape[1]} replies (+{pool.prior_rewards.shape[1]} history each), mean success "
            f"{p.mean():.3f}, {mixed} prompts with 0 < p < 1, {int((p == 0).sum())} never solved; sampling "
            f"{pool.seconds['sample']:.0f} s, gradients {pool.seconds['grad']:.0f} s.\n"
        )
        table = []
        for r in b["rows"]:
            table.append(
                [
                    r.mean_n,
                    r.estimator,
                    r.predictor,
                    r.strategy,
                    f"{r.error_ratio:.3f} {_ci(r.error_ratio_ci)}",
                    f"{r.best_error_ratio:.3f} {_ci(r.best_error_ratio_ci)}",
                    f"{r.modelled_error:.3f}",
                    f"{r.ratio:.3f} {_ci(r.ratio_ci)}",
                    f"{r.modelled:.3f}",
                    f"{r.cosine:.3f} {_ci(r.cosine_ci)}",
                    f"{r.dropped:.1f}",
                ]
            )
        lines.append(
            md_table(
                [
                    "n/prompt",
                    "estimator",
                    "p from",
                    "strategy",
                    "error",
                    "best step",
                    "model err",
                    "var",
                    "model var",
                    "cos",
                    "dropped",
                ],
                table,
                align="rlllrrrrrrr",
            )
        )
        lines.append("")
    return "\n".join(lines)


def _as_train_runs(results: Sequence[RunResult]) -> dict[str, list[dict[str, Any]]]:
    """League runs in ``bench train``'s shape for :func:`levels_lines`: per label, per seed, one metrics record per
    evaluation with cumulative rollouts, tokens, training seconds and ``eval_acc`` (mean@k)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        metrics = []
        for step, acc in zip(r.eval_steps, r.eval_mean_at_k):
            k = step - 1
            metrics.append(
                {
                    "cum_rollouts": float(r.rollouts[k]) if k >= 0 else 0.0,
                    "cum_tokens": float(r.tokens[k]) if k >= 0 else 0.0,
                    "cum_seconds": float(r.train_seconds[k]) if k >= 0 and r.train_seconds else 0.0,
                    "eval_acc": float(acc),
                }
            )
        runs.setdefault(label(r.strategy, r.mode), []).append({"seed": r.seed, "metrics": metrics})
    return runs


def league_section(results: Sequence[RunResult], cfg: LeagueConfig, labels: Sequence[str], out: Path | None) -> str:
    """The league's markdown: per-row summary, cost ratios at four levels (train_levels), pass@k, Brier."""
    by: dict[str, dict[int, RunResult]] = {}
    for r in results:
        by.setdefault(label(r.strategy, r.mode), {})[r.seed] = r
    k = cfg.eval_k
    lines = [
        "## (c) GRPO league on SmolLM2: equal rollouts, and equal tokens (`<strategy>@tokens`)\n",
        f"{cfg.steps} steps of {cfg.batch} prompts x {cfg.mean_n} rollouts on average (n in [{cfg.n_min}, "
        f"{cfg.n_max}]; `@tokens` rows: `token_budget = Allocator.uniform_tokens(ids, {cfg.mean_n})`), "
        f"{cfg.train_prompts} training prompts revisited, LoRA r={cfg.rank} on the top "
        f"{cfg.top_layers or 'all'} layers, Adam lr {cfg.lr}, Dr.GRPO loss, short answers "
        f"({cfg.max_new_tokens} new tokens at most), predictor `{cfg.predictor}`; held-out mean@{k} and pass@{k} "
        f"on {cfg.eval_prompts} prompts (the same prompts and sampling seeds for every row of a seed).\n",
    ]
    lines.append(_commit_line(results))
    table = []
    for name in labels:
        runs = list(by.get(name, {}).values())
        if not runs:
            continue
        table.append(
            [
                name,
                len(runs),
                fmt_ci([r.eval_mean_at_k[0] for r in runs]),
                fmt_ci([r.eval_mean_at_k[-1] for r in runs]),
                fmt_ci([r.eval_pass_at_k[-1] for r in runs if r.eval_pass_at_k]),
                f"{np.mean([r.eval_se[-1] for r in runs if r.eval_se]):.3f}" if runs[0].eval_se else "-",
                fmt_ci([float(np.mean(r.train_success)) for r in runs]),
                fmt_ci([r.rollouts[-1] for r in runs], digits=0),
                fmt_ci([r.tokens[-1] for r in runs], digits=0),
                fmt_ci([r.train_seconds[-1] / len(r.steps) for r in runs if r.train_seconds], digits=1),
                f"{np.mean([r.cpu_seconds for r in runs]) / 60:.1f}",
            ]
        )
    lines.append(
        md_table(
            [
                "row",
                "seeds",
                f"mean@{k} start",
                f"mean@{k} end",
                f"pass@{k} end",
                "eval se",
                "train success",
                "rollouts",
                "tokens",
                "wall s / step",
                "CPU min / run",
            ],
            table,
        )
    )
    lines.append("")
    base = by.get("uniform", {})
    if base:
        # the gain the cost-to-reach levels are shares of; a league whose uniform barely learns says little
        gains = [r.eval_mean_at_k[-1] - r.eval_mean_at_k[0] for r in base.values()]
        peaks = [max(r.eval_mean_at_k) - r.eval_mean_at_k[0] for r in base.values()]
        lines.append(
            f"- `uniform`'s own gain in mean@{k}, start to end: {paired_verdict(gains)}; "
            f"start to its peak: {paired_verdict(peaks)}"
        )
    for name in labels:
        if name == "uniform" or name not in by:
            continue
        common = sorted(set(base) & set(by[name]))
        if not common:
            continue
        d_end = [by[name][s].eval_mean_at_k[-1] - base[s].eval_mean_at_k[-1] for s in common]
        d_pass = [
            by[name][s].eval_pass_at_k[-1] - base[s].eval_pass_at_k[-1]
            for s in common
            if by[name][s].eval_pass_at_k and base[s].eval_pass_at_k
        ]
        # the curve's mean after the start and its peak: less swayed than the last evaluation by a late collapse
        d_mean = [
            float(np.mean(by[name][s].eval_mean_at_k[1:]) - np.mean(base[s].eval_mean_at_k[1:]))
            for s in common
            if len(by[name][s].eval_mean_at_k) > 1 and len(base[s].eval_mean_at_k) > 1
        ]
        d_peak = [max(by[name][s].eval_mean_at_k) - max(base[s].eval_mean_at_k) for s in common]
        # at each evaluation after the start: where along the run a lead opens or fades
        steps = base[common[0]].eval_steps
        at_step = [
            f"step {st} {paired_verdict([by[name][s].eval_mean_at_k[j] - base[s].eval_mean_at_k[j] for s in common])}"
            for j, st in enumerate(steps)
            if j > 0 and all(len(by[name][s].eval_mean_at_k) > j and len(base[s].eval_mean_at_k) > j for s in common)
        ]
        lines.append(
            f"- `{name}` - `uniform`, paired over seeds {common}: final mean@{k} {paired_verdict(d_end)}"
            + (f"; final pass@{k} {paired_verdict(d_pass)}" if d_pass else "")
            + (f"; mean@{k} averaged over the evaluations after the start {paired_verdict(d_mean)}" if d_mean else "")
            + f"; peak mean@{k} {paired_verdict(d_peak)}"
            + (f"; mean@{k} at each evaluation: " + ", ".join(at_step) if at_step else "")
        )
    lines.append("")
    train_runs = _as_train_runs([r for r in results if label(r.strategy, r.mode) in labels])
    if "uniform" in train_runs and len(train_runs) > 1:
        seeds = {r["seed"] for r in train_runs["uniform"]}
        paired = {n: rs for n, rs in train_runs.items() if seeds <= {r["seed"] for r in rs}}
        paired = {n: [r for r in rs if r["seed"] in seeds] for n, rs in paired.items()}
        lines += levels_lines({"runs": paired}, out)
        # a league run in pieces has rows that lack some of uniform's seeds: say so rather than drop them silently
        short = {n: sorted(r["seed"] for r in rs) for n, rs in train_runs.items() if n not in paired}
        if short:
            listed = "; ".join(f"`{n}` (seeds {s})" for n, s in short.items())
            lines += [
                f"- Not in the cost tables (each needs all of uniform's {len(seeds)} seeds, {sorted(seeds)}): "
                f"{listed}. Finish their runs (the same command resumes them) before reading their ratios.",
                "",
            ]
    lines.append("## (b) Next-step Brier along the league runs\n")
    lines.append(
        "Rollout-weighted Brier of each predictor's prediction made before the step, on prompts seen at an earlier "
        "step (binary outcomes; lower is better); one value per run (mean over its steps), mean ± 95% interval.\n"
    )
    rows = []
    per_run: dict[str, list[float]] = {}
    for name in BRIER_PREDICTORS:
        vals = []
        for r in results:
            b, w = np.array(r.brier.get(name, []), float), np.array(r.brier_n, float)
            ok = np.isfinite(b) & (w > 0) if b.size == w.size else np.zeros(0, bool)
            vals.append(float((b[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else float("nan"))
        per_run[name] = vals
        rows.append([name, int(np.isfinite(vals).sum()), fmt_ci([v for v in vals if np.isfinite(v)], digits=4)])
    lines.append(md_table(["predictor", "runs", "Brier"], rows))
    for other in BRIER_PREDICTORS[1:]:
        diff = np.array(per_run[other]) - np.array(per_run[BRIER_PREDICTORS[0]])
        diff = diff[np.isfinite(diff)]
        if diff.size:
            lines.append(
                f"- Brier of `{other}` minus `{BRIER_PREDICTORS[0]}`, paired by run (positive: "
                f"`{BRIER_PREDICTORS[0]}` better): {paired_verdict(diff)}"
            )
    return "\n".join(lines)


def _commit_line(results: Sequence[RunResult]) -> str:
    """Which commit and environment made the runs. One table must never mix commits, so a mix is said in bold,
    naming each; a mix of environments (library versions, CPU) is named too: such runs are equally valid draws, but
    only runs of one environment replay bit for bit."""
    commits = Counter(r.commit for r in results)
    envs = Counter(", ".join(f"{k} {v}" for k, v in sorted(r.env.items())) or "not recorded" for r in results)
    if len(commits) <= 1:
        line = f"Runs: {len(results)}, all made at commit `{next(iter(commits), 'unknown')}`"
    else:
        listed = ", ".join(f"`{c}` ({n} runs)" for c, n in sorted(commits.items()))
        line = (
            f"**Runs from {len(commits)} commits: {listed}.** Do not quote this table: rerun the league at one "
            "commit (a new `--out`, or delete the other commits' run files)"
        )
    if len(envs) <= 1:
        return line + f"; environment: {next(iter(envs), 'not recorded')}.\n"
    listed = "; ".join(f"{e} ({n} runs)" for e, n in sorted(envs.items()))
    return line + f". Runs from {len(envs)} environments (each replays bit for bit only on its own): {listed}.\n"


def power_lines(results: Sequence[RunResult], effect: float = 0.03) -> list[str]:
    """Seeds needed to resolve a final mean@k difference of ``effect`` (paired, two-sided 5%, 80% power), from
    the runs at hand: the between-seed sd of a paired difference is estimated as ``sqrt(2) x`` the sd of uniform's
    gain over seeds (no correlation credited) and, for every row with 2 or more seeds paired with uniform, from
    those pairs themselves (one line a row). Normal approximation: ``n = ((z_0.975 + z_0.8) sd / effect)^2``."""
    from scipy.stats import norm

    uni = [r for r in results if r.strategy == "uniform" and r.mode == "rollouts"]
    if len(uni) < 2:
        return ["- power: needs 2 or more uniform seeds."]
    gains = np.array([r.eval_mean_at_k[-1] - r.eval_mean_at_k[0] for r in uni])
    sd = float(np.sqrt(2) * gains.std(ddof=1))
    z = float(norm.ppf(0.975) + norm.ppf(0.8))
    need = int(np.ceil((z * sd / effect) ** 2))
    se = float(np.mean([r.eval_se[-1] for r in uni if r.eval_se])) if uni[0].eval_se else float("nan")
    lines = [
        f"- power: uniform's gain over {len(uni)} seeds {gains.mean():+.3f} (sd {gains.std(ddof=1):.3f}); one "
        f"evaluation's se {se:.3f}; a paired difference of {effect:.2f} in final mean@k needs about {need} seeds "
        f"(sd of a difference taken as {sd:.3f}, unpaired)."
    ]
    base = {r.seed: r.eval_mean_at_k[-1] for r in uni}
    rows: dict[str, dict[int, float]] = {}
    for r in results:
        if not (r.strategy == "uniform" and r.mode == "rollouts") and r.seed in base:
            rows.setdefault(label(r.strategy, r.mode), {})[r.seed] = r.eval_mean_at_k[-1] - base[r.seed]
    for name, diffs in rows.items():
        if len(diffs) < 2:
            continue
        d = np.array(list(diffs.values()))
        sd_pair = float(d.std(ddof=1))
        need_pair = int(np.ceil((z * sd_pair / effect) ** 2))
        lines.append(
            f"- power, `{name}` paired with uniform over {d.size} seeds: sd of the final mean@k difference "
            f"{sd_pair:.3f}; a difference of {effect:.2f} needs about {need_pair} seeds; the smallest resolvable "
            f"with these {d.size} seeds is about {z * sd_pair / np.sqrt(d.size):.3f}."
        )
    return lines
