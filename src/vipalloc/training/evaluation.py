"""Held-out evaluation as the RLVR papers report it: mean@k, pass@k and maj@k from ``n`` samples per prompt.

From ``n`` temperature-1 samples of each of ``N`` held-out prompts, with ``c`` of them correct:

* ``mean@k``: expected success of one sample, ``c / n`` averaged over prompts. Its expectation does not depend on
  ``k`` (mean@32 in the papers is the mean over 32 samples), so one number, ``eval_acc``, is mean@k for every k;
  more samples only make it less noisy.
* ``pass@k``: probability that at least one of ``k`` samples is correct, by the unbiased estimator
  ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021), defined for ``k <= n``.
* ``maj@k``: probability that the most frequent answer among ``k`` samples (drawn without replacement from the
  ``n``) is the gold one; a tie at the top that includes the gold answer scores ``1 / (tied answers)`` (a uniform
  random tie-break, in expectation). For ``k < n`` it is averaged over ``draws`` random subsets (seeded, so an
  evaluation is reproducible); for ``k = n`` it is the exact majority of all samples.

Every metric is reported overall and per difficulty level, with standard errors: ``eval/mean_se`` is the sampling
error of ``eval_acc`` on this fixed prompt set (what two evaluations of the same policy differ by), from the
per-prompt binomial variance ``p (1 - p) / (n - 1)``; ``eval/prompt_se`` and ``eval/pass@k_se`` are the standard
deviation over prompts divided by ``sqrt(N)`` (the error against the whole task distribution, which also counts
which prompts happened to be drawn).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from math import comb
from pathlib import Path
from typing import Any

import numpy as np

#: the k of pass@k and maj@k (those above the number of samples are skipped)
EVAL_KS: tuple[int, ...] = (1, 4, 8, 16)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``; needs ``k <= n``."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def maj_at_k(answers: Sequence[str], gold: str, k: int, rng: np.random.Generator, draws: int = 64) -> float:
    """Majority-vote accuracy of ``k`` of the prompt's sampled ``answers`` (strings) against ``gold``.

    ``k = len(answers)``: the exact vote of all samples. ``k < len(answers)``: the mean over ``draws`` subsets of
    size ``k`` drawn without replacement with ``rng``. A tie for the most votes that includes ``gold`` scores
    ``1 / (number of tied answers)``.
    """
    n = len(answers)
    if not 1 <= k <= n:
        raise ValueError(f"maj@k needs 1 <= k <= number of samples ({n}), got k={k}")

    def vote(sub: Sequence[str]) -> float:
        counts = Counter(sub)
        top = max(counts.values())
        if counts.get(gold, 0) != top:
            return 0.0
        return 1.0 / sum(1 for v in counts.values() if v == top)

    if k == n:
        return vote(answers)
    keys = rng.random((draws, n)).argsort(axis=1)[:, :k]
    return float(np.mean([vote([answers[j] for j in row]) for row in keys]))


def eval_metrics(
    answers: Sequence[Sequence[str]],
    golds: Sequence[str],
    levels: Sequence[int],
    seed: int,
    ks: Sequence[int] = EVAL_KS,
    draws: int = 64,
) -> dict[str, float]:
    """All evaluation metrics of ``N`` prompts: ``answers[i]`` the ``n`` decoded samples of prompt ``i`` (the same
    ``n`` for every prompt), ``golds[i]`` its gold answer, ``levels[i]`` its difficulty level.

    Keys: ``eval_acc`` (mean@k), ``eval/mean_se``, ``eval/prompt_se``, ``eval/samples`` (N * n), ``eval/prompts``,
    ``eval/frac_below_0.05`` and ``eval/frac_above_0.95`` (shares of prompts by their n-sample success rate),
    ``eval/pass@{k}``, ``eval/pass@{k}_se``, ``eval/maj@{k}`` for each ``k <= n`` in ``ks``, and per level ``L``
    ``eval/level{L}/mean``, ``eval/level{L}/pass@{k}``, ``eval/level{L}/maj@{k}``.
    """
    if not answers or len(answers) != len(golds) or len(answers) != len(levels):
        raise ValueError("answers, golds and levels must be non-empty and of equal length (one entry per prompt)")
    n = len(answers[0])
    if n < 1 or any(len(a) != n for a in answers):
        raise ValueError("every prompt needs the same number (>= 1) of sampled answers")
    rng = np.random.default_rng(seed)
    correct = np.array([[a == g for a in ans] for ans, g in zip(answers, golds)], dtype=np.float64)  # (N, n)
    rate = correct.mean(1)
    ks_used = [k for k in ks if k <= n]
    passk = {k: np.array([pass_at_k(n, int(c), k) for c in correct.sum(1)]) for k in ks_used}
    majk = {k: np.array([maj_at_k(a, g, k, rng, draws) for a, g in zip(answers, golds)]) for k in ks_used}
    big_n = len(answers)
    out: dict[str, float] = {
        "eval_acc": float(rate.mean()),
        "eval/mean_se": float(np.sqrt((rate * (1 - rate)).sum() / max(n - 1, 1)) / big_n) if n > 1 else float("nan"),
        "eval/prompt_se": float(rate.std(ddof=1) / np.sqrt(big_n)) if big_n > 1 else float("nan"),
        "eval/samples": float(big_n * n),
        "eval/prompts": float(big_n),
        # the U shape of RLVR: prompts (almost) never solved and (almost) always solved, by their n-sample rate
        "eval/frac_below_0.05": float(np.mean(rate < 0.05)),
        "eval/frac_above_0.95": float(np.mean(rate > 0.95)),
    }
    for k in ks_used:
        out[f"eval/pass@{k}"] = float(passk[k].mean())
        out[f"eval/pass@{k}_se"] = float(passk[k].std(ddof=1) / np.sqrt(big_n)) if big_n > 1 else float("nan")
        out[f"eval/maj@{k}"] = float(majk[k].mean())
    lv = np.asarray(levels)
    for level in sorted(set(int(x) for x in lv)):
        m = lv == level
        out[f"eval/level{level}/mean"] = float(rate[m].mean())
        for k in ks_used:
            out[f"eval/level{level}/pass@{k}"] = float(passk[k][m].mean())
            out[f"eval/level{level}/maj@{k}"] = float(majk[k][m].mean())
    return out


# ----------------------------------------------------------------------------------------------- reporting
def _keys(rec: dict[str, Any]) -> list[str]:
    """The paper-metric columns present in an evaluation record, in display order."""
    ks = sorted(int(k.split("@")[1]) for k in rec if k.startswith("eval/pass@") and not k.endswith("_se"))
    return ["eval_acc"] + [f"eval/pass@{k}" for k in ks] + [f"eval/maj@{k}" for k in ks if k > 1]


def _label(key: str) -> str:
    return "mean@k" if key == "eval_acc" else key.removeprefix("eval/")


def _evals(run: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in run if "eval/samples" in m]


def _cell(values: list[float]) -> str:
    arr = np.asarray(values, dtype=np.float64)
    return f"{arr.mean():.3f} ± {arr.std(ddof=1):.3f}" if arr.size > 1 else f"{arr.mean():.3f}"


def paper_metrics_lines(runs: dict[str, list[list[dict[str, Any]]]]) -> list[str]:
    """Markdown section: mean@k / pass@k / maj@k at the first and last evaluation of every strategy (mean ± sd
    over seeds), the same per difficulty level at the last evaluation, and what one evaluation costs and how noisy
    it is. ``runs[strategy]`` is one metrics list per seed. Empty when the runs carry no such metrics."""
    all_runs = [r for rs in runs.values() for r in rs]
    if not all_runs or not all(_evals(r) for r in all_runs):
        return []
    first = _evals(all_runs[0])[0]
    keys = _keys(first)
    n_prompts, n_samples = int(first["eval/prompts"]), int(first["eval/samples"])
    per_prompt = n_samples // max(n_prompts, 1)
    se = [m["eval/mean_se"] for r in all_runs for m in _evals(r)]
    pse = [m["eval/prompt_se"] for r in all_runs for m in _evals(r)]
    top = [k for k in keys if k.startswith("eval/pass@")][-1]  # the largest pass@k
    top_se = [m.get(f"{top}_se", float("nan")) for r in all_runs for m in _evals(r)]
    lines = [
        "## Evaluation as the papers report it (mean@k, pass@k, maj@k)",
        "",
        f"Each evaluation: {n_prompts} held-out prompts x {per_prompt} samples = {n_samples:,} samples. mean@k is the "
        "mean success of one sample (its expectation is the same for every k); pass@k the unbiased estimator "
        "1 - C(n-c, k)/C(n, k); maj@k the majority-vote accuracy of k samples (ties share the credit). Sampling "
        f"error of one evaluation's mean@k on this prompt set: ±{_mean_or_nan(se):.4f} (1 s.e.; two evaluations of "
        f"the same policy differ by about {np.sqrt(2) * _mean_or_nan(se):.4f}); against the task distribution (which "
        f"prompts were drawn): ±{_mean_or_nan(pse):.4f} for mean@k and ±{_mean_or_nan(top_se):.4f} for {_label(top)}.",
        "",
        "| strategy | eval | " + " | ".join(_label(k) for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for s, rs in runs.items():
        for tag, pick in (("start", 0), ("end", -1)):
            recs = [_evals(r)[pick] for r in rs]
            lines.append(f"| {s} | {tag} | " + " | ".join(_cell([m[k] for m in recs]) for k in keys) + " |")
    levels = sorted({int(k.split("/")[1][5:]) for k in first if k.startswith("eval/level")})
    lvl_keys = ["mean"] + [_label(k) for k in keys[1:]]
    lines += [
        "",
        "Per difficulty level, first -> last evaluation (mean over seeds):",
        "",
        "| strategy | level | " + " | ".join("mean@k" if k == "mean" else k for k in lvl_keys) + " |",
        "|---|---|" + "---|" * len(lvl_keys),
    ]
    for s, rs in runs.items():
        for level in levels:
            cells = []
            for k in lvl_keys:
                key = f"eval/level{level}/{k}"
                a = np.mean([_evals(r)[0][key] for r in rs])
                b = np.mean([_evals(r)[-1][key] for r in rs])
                cells.append(f"{a:.3f} -> {b:.3f}")
            lines.append(f"| {s} | {level} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _mean_or_nan(values: list[float]) -> float:
    """Mean of the finite entries; NaN (printed as "nan") when there are none, e.g. a standard error that one
    sample per prompt cannot give. ``np.nanmean`` would warn "Mean of empty slice" there."""
    arr = np.asarray(values, np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def plot_paper_metrics(runs: dict[str, list[list[dict[str, Any]]]], path: Path) -> bool:
    """``path`` (PNG): mean@k, pass@k and maj@k of every strategy (mean over seeds) against cumulative rollouts,
    one panel per metric family. Returns False (and writes nothing) when the runs carry no such metrics."""
    all_runs = [r for rs in runs.values() for r in rs]
    if not all_runs or not all(_evals(r) for r in all_runs):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _keys(_evals(all_runs[0])[0])
    families = [("mean@k", [k for k in keys if k == "eval_acc"]), ("pass@k", [k for k in keys if "pass@" in k])]
    families.append(("maj@k", [k for k in keys if "maj@" in k]))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True)
    for ax, (title, fam) in zip(axes, families):
        for i, (s, rs) in enumerate(runs.items()):
            for j, key in enumerate(fam):
                curves = [[(m["cum_rollouts"], m[key]) for m in _evals(r)] for r in rs]
                width = min(len(c) for c in curves)
                arr = np.array([c[:width] for c in curves], dtype=np.float64)  # (seeds, evals, 2)
                style = ["-", "--", ":", "-."][j % 4]
                ax.plot(arr[..., 0].mean(0), arr[..., 1].mean(0), style, color=f"C{i}", label=f"{s} {_label(key)}")
        ax.set_title(title)
        ax.set_xlabel("cumulative rollouts")
        ax.grid(alpha=0.3)
        if fam:  # a family the evaluation did not measure (e.g. maj@k with one sample) stays an empty panel
            ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
