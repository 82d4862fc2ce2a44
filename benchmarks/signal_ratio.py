"""Measure the gradient-error model's one free number, the signal-to-noise ratio per rollout ``rho``, on real pools.

The model (``vipalloc.gradient_error``, ``docs/variance.md`` "The gradient error") writes a rollout's score vector
as ``s_j = (r_j - P) Delta + eps_j``: ``Delta`` is the difference of the mean scores of successes and failures,
``eps_j`` zero-mean noise, ``rho = |Delta|^2 / E|eps|^2``. The pools of ``vipalloc bench lm --parts variance``
(``<out>/lm/pool-<snapshot>-<setting>-<prompts>.npz``) hold, per prompt, 16 rewards and the CountSketch of each
reply's LoRA score vector. For every prompt with both outcomes in its pool:

* ``D_i = mean_S s - mean_F s`` (successes ``S``, failures ``F``);
* ``sigma2_i`` = pooled within-outcome variance, summed over the sketch's coordinates (an unbiased ``E|eps|^2``);
* ``|Delta_i|^2`` unbiased: ``|D_i|^2 - sigma2_i (1/|S| + 1/|F|)``.

It prints ``rho`` pooled over prompts (``sum |Delta_i|^2 / sum sigma2_i``, with a bootstrap interval over prompts),
the median of the per-prompt ratios, and the count of prompts used, per pool file.

Usage: ``python benchmarks/signal_ratio.py reports/lm/pool-*.npz``
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def prompt_terms(rewards: np.ndarray, sketches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased ``|Delta_i|^2`` and ``sigma2_i`` (float64 ``(K,)``) of the K prompts with both outcomes.

    ``rewards``: float ``(M, n)`` 0/1; ``sketches``: float ``(M, n, dim)`` score vectors."""
    sig, noise = [], []
    for r, s in zip(rewards, sketches.astype(np.float64)):
        succ = r > 0.5
        ns, nf = int(succ.sum()), int((~succ).sum())
        if ns < 1 or nf < 1 or ns + nf < 3:
            continue
        ms, mf = s[succ].mean(axis=0), s[~succ].mean(axis=0)
        within = float(((s[succ] - ms) ** 2).sum() + ((s[~succ] - mf) ** 2).sum()) / (ns + nf - 2)
        d2 = float(((ms - mf) ** 2).sum())
        sig.append(d2 - within * (1.0 / ns + 1.0 / nf))
        noise.append(within)
    return np.array(sig), np.array(noise)


def main(paths: list[str]) -> None:
    rng = np.random.default_rng(0)
    print("| pool | prompts used (of M) | rho pooled [95% bootstrap over prompts] | median per prompt |")
    print("| :--- | ---: | :--- | ---: |")
    for path in paths:
        z = np.load(path)
        sig, noise = prompt_terms(z["rewards"], z["sketches"])
        k = len(sig)
        if k == 0:
            print(f"| {Path(path).stem} | 0 of {len(z['rewards'])} | - | - |")
            continue
        rho = sig.sum() / noise.sum()
        boot = [sig[ix].sum() / noise[ix].sum() for ix in (rng.integers(0, k, k) for _ in range(2000))]
        lo, hi = np.quantile(boot, [0.025, 0.975])
        print(
            f"| {Path(path).stem} | {k} of {len(z['rewards'])} | {rho:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{float(np.median(sig / noise)):.3f} |"
        )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/signal_ratio.py <pool .npz files>")
    main(sys.argv[1:])
