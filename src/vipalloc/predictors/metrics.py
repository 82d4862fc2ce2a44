"""Next-step calibration metrics for success-probability predictors (shared by the benchmarks).

A prediction ``p_i`` for prompt ``i`` at step ``t`` is scored against what step ``t`` then produced:
``s_i`` successes of ``n_i`` rollouts (and, in simulations, the true ``p_i``). Per prompt, then averaged over
prompts (each prompt counts once, whatever its rollout count):

* ``brier``: mean over its rollouts of ``(p - r)^2`` = ``[s (1-p)^2 + (n-s) p^2] / n``;
* ``log_loss``: mean over its rollouts of ``-[r log p + (1-r) log(1-p)]``, ``p`` clipped to ``[1e-6, 1 - 1e-6]``
  (the authors' clip), so an overconfident 0 or 1 costs at most 13.8 nats per rollout;
* ``mae_rate``: ``|p - s/n|`` (noisy target: includes binomial noise even for a perfect predictor);
* ``spearman_rate``: Spearman rank correlation of ``p`` with ``s/n`` (ties averaged; NaN if either is constant);
* with the true ``p*``: ``mae_true`` ``|p - p*|``, ``spearman_true``, and ``mae_var`` ``|p(1-p) - p*(1-p*)|``
  (the Bernoulli variance that drives VIP's allocation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["METRIC_NAMES", "calibration_metrics", "merge_metrics"]

METRIC_NAMES = ("brier", "log_loss", "mae_rate", "spearman_rate", "mae_true", "spearman_true", "mae_var")
_EPS = 1e-6


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def calibration_metrics(p_pred: Any, successes: Any, trials: Any, p_true: Any | None = None) -> dict[str, float | int]:
    """Score predictions ``p_pred`` ``(M,)`` against realised ``successes`` of ``trials`` ``(M,)`` (ints,
    ``trials >= 1``) and optionally the true ``p_true`` ``(M,)``. Returns ``{metric: value, "count": M}``; an empty
    input gives NaN metrics and count 0.
    """
    p = np.asarray(p_pred, np.float64)
    s = np.asarray(successes, np.float64)
    n = np.asarray(trials, np.float64)
    m = len(p)
    if p.shape != (m,) or s.shape != (m,) or n.shape != (m,):
        raise ValueError(
            f"p_pred, successes and trials must all have shape ({m},), got {p.shape}, {s.shape}, {n.shape}"
        )
    if m and (np.any(n < 1) or np.any(s < 0) or np.any(s > n) or not np.all(np.isfinite(p))):
        raise ValueError("need finite predictions, trials >= 1 and 0 <= successes <= trials")
    out: dict[str, float | int] = {k: float("nan") for k in METRIC_NAMES}
    out["count"] = m
    if not m:
        return out
    rate = s / n
    pc = np.clip(p, _EPS, 1 - _EPS)
    out["brier"] = float(np.mean((s * (1 - p) ** 2 + (n - s) * p**2) / n))
    out["log_loss"] = float(np.mean(-(s * np.log(pc) + (n - s) * np.log1p(-pc)) / n))
    out["mae_rate"] = float(np.mean(np.abs(p - rate)))
    out["spearman_rate"] = _spearman(p, rate)
    if p_true is not None:
        pt = np.asarray(p_true, np.float64)
        if pt.shape != (m,):
            raise ValueError(f"p_true must have shape ({m},), got {pt.shape}")
        out["mae_true"] = float(np.mean(np.abs(p - pt)))
        out["spearman_true"] = _spearman(p, pt)
        out["mae_var"] = float(np.mean(np.abs(p * (1 - p) - pt * (1 - pt))))
    return out


def merge_metrics(parts: Sequence[Mapping[str, float | int]]) -> dict[str, float | int]:
    """Count-weighted average of per-step metric dicts (NaN entries and empty steps are skipped)."""
    out: dict[str, float | int] = {"count": int(sum(int(d.get("count", 0)) for d in parts))}
    for k in METRIC_NAMES:
        vals = [
            (float(d[k]), int(d["count"])) for d in parts if d.get("count") and np.isfinite(float(d.get(k, np.nan)))
        ]
        w = sum(c for _, c in vals)
        out[k] = sum(v * c for v, c in vals) / w if w else float("nan")
    return out
