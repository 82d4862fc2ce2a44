"""Where the budget goes: the per-step metrics every trainer and plug-in logs under one set of names.

Two groups, both plain ``dict[str, float]`` keyed ``vip/...`` so TensorBoard, W&B, TRL's ``_metrics`` and verl's
metrics dict take them as they are:

* :func:`plan_metrics` describes a plan before generation (what the allocator decided and why it looks so).
* :func:`outcome_metrics` describes what came back (realised zero-variance groups, accuracy weighted per prompt
  and per rollout, prediction error).

The names are the contract: ``docs/architecture.md`` lists them and both plug-ins and the CPU trainer log exactly
these. The histogram of counts is logged by the caller under the tag :data:`COUNTS_TAG` (it is an array, not a
scalar).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "COUNTS_TAG",
    "HOPELESS_P",
    "PLAN_METRIC_NAMES",
    "OUTCOME_METRIC_NAMES",
    "SOLVED_P",
    "outcome_metrics",
    "plan_metrics",
]

HOPELESS_P = 0.05  # predicted success below this: "predicted hopeless"
SOLVED_P = 0.95  # predicted success above this: "predicted solved"
COUNTS_TAG = "vip/counts"

PLAN_METRIC_NAMES = (
    "vip/budget",
    "vip/prompts",
    "vip/mean_n",
    "vip/max_n",
    "vip/num_dropped",
    "vip/frac_dropped",
    "vip/share_hopeless",
    "vip/share_solved",
    "vip/expected_var_ratio_vs_uniform",
    "vip/plan_seconds",
    "vip/p_mean",
    "vip/min_keep_relaxed",
)
OUTCOME_METRIC_NAMES = (
    "vip/rollouts_generated",
    "vip/frac_zero_var_groups",
    "vip/prompt_accuracy",
    "vip/rollout_accuracy",
    "vip/pred_abs_err",
)


def plan_metrics(
    counts: np.ndarray,
    p_mean: np.ndarray,
    *,
    variance_ratio: float,
    timings: Mapping[str, float] | None = None,
    min_keep_relaxed: bool = False,
) -> dict[str, float]:
    """Scalar description of one plan.

    ``counts`` int ``(M,)`` rollouts per prompt (0 = dropped), ``p_mean`` float ``(M,)`` predicted success
    probabilities. Shares are fractions of the planned rollouts (0 when the budget is 0); ``vip/mean_n`` and
    ``vip/max_n`` are over kept prompts only, because a dropped prompt is not generated at all.
    """
    counts = np.asarray(counts, np.int64)
    p = np.asarray(p_mean, np.float64)
    if counts.shape != p.shape or counts.ndim != 1:
        raise ValueError(f"counts {counts.shape} and p_mean {p.shape} must be 1-D arrays of the same length")
    m = int(counts.size)
    total = int(counts.sum())
    kept = counts > 0
    dropped = int(m - np.count_nonzero(kept))

    def share(mask: np.ndarray) -> float:
        return float(counts[mask].sum() / total) if total > 0 else 0.0

    return {
        "vip/budget": float(total),
        "vip/prompts": float(m),
        "vip/mean_n": float(counts[kept].mean()) if kept.any() else 0.0,
        "vip/max_n": float(counts.max()) if m else 0.0,
        "vip/num_dropped": float(dropped),
        "vip/frac_dropped": float(dropped / m) if m else 0.0,
        "vip/share_hopeless": share(p < HOPELESS_P),
        "vip/share_solved": share(p > SOLVED_P),
        "vip/expected_var_ratio_vs_uniform": float(variance_ratio),
        "vip/plan_seconds": float(sum((timings or {}).values())),
        "vip/p_mean": float(p.mean()) if m else 0.0,
        "vip/min_keep_relaxed": float(bool(min_keep_relaxed)),
    }


def outcome_metrics(
    rewards: Sequence[Any],
    *,
    success_threshold: float = 0.5,
    p_mean: np.ndarray | None = None,
) -> dict[str, float]:
    """Scalar description of the rollouts that came back for one plan.

    ``rewards``: one 1-D array per prompt (as given to ``Allocator.observe``); empty arrays are prompts that were
    dropped or whose generations failed and count in none of the rates. ``p_mean`` ``(M,)``, aligned with
    ``rewards``, enables ``vip/pred_abs_err`` (mean |p_mean - realised success rate| over generated prompts; NaN
    without it). A zero-variance group is a generated group whose raw rewards are all equal (its advantages are
    all zero, so it gives no gradient); a group of one rollout counts as zero-variance.
    """
    arrs = [np.asarray(r, np.float64).reshape(-1) for r in rewards]
    if p_mean is not None and len(p_mean) != len(arrs):
        raise ValueError(f"p_mean has {len(p_mean)} entries but rewards has {len(arrs)} groups; align them")
    gen = [i for i, a in enumerate(arrs) if a.size > 0]
    n_roll = int(sum(arrs[i].size for i in gen))
    if not gen:
        return {
            "vip/rollouts_generated": 0.0,
            "vip/frac_zero_var_groups": 0.0,
            "vip/prompt_accuracy": float("nan"),
            "vip/rollout_accuracy": float("nan"),
            "vip/pred_abs_err": float("nan"),
        }
    rates = np.array([np.mean(arrs[i] >= success_threshold) for i in gen])
    zero_var = np.array([np.ptp(arrs[i]) == 0.0 for i in gen])
    succ = float(sum(np.count_nonzero(arrs[i] >= success_threshold) for i in gen))
    err = float("nan")
    if p_mean is not None:
        err = float(np.mean(np.abs(np.asarray(p_mean, np.float64)[gen] - rates)))
    return {
        "vip/rollouts_generated": float(n_roll),
        "vip/frac_zero_var_groups": float(zero_var.mean()),
        "vip/prompt_accuracy": float(rates.mean()),
        "vip/rollout_accuracy": succ / n_roll,
        "vip/pred_abs_err": err,
    }
