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
