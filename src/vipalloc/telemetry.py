"""Where the budget goes: the per-step metrics every trainer and plug-in logs under one set of names.

Two groups, both plain ``dict[str, float]`` keyed ``vip/...`` so TensorBoard, W&B, TRL's ``_metrics`` and verl's
metrics dict take them as they are:

* :func:`plan_metrics` describes a plan before generation (what the allocator decided and why it looks so).
* :func:`outcome_metrics` describes what came back (realised zero-variance groups, accuracy weighted per prompt
  and per rollout, prediction error).

Token metrics (:data:`PLAN_TOKEN_METRIC_NAMES`, :data:`OUTCOME_TOKEN_METRIC_NAMES`) are added when the plan has
expected lengths / the caller passes the rollouts' lengths, so a run that never reports lengths logs no
meaningless token figures.

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
    "OUTCOME_TOKEN_METRIC_NAMES",
    "PLAN_TOKEN_METRIC_NAMES",
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
    "vip/expected_error_ratio_vs_uniform",
    "vip/plan_seconds",
    "vip/p_mean",
    "vip/min_keep_relaxed",
)
PLAN_TOKEN_METRIC_NAMES = (
    "vip/tokens_planned",  # sum_i n_i c_i at the predicted lengths
    "vip/token_budget",  # the step's token budget (absent when planned by rollouts)
    "vip/optimality_gap",  # certified relative gap of the token program (0: exact; absent for a rule)
    "vip/tokens_share_hopeless",  # planned tokens on prompts predicted hopeless
    "vip/tokens_share_solved",  # planned tokens on prompts predicted solved
)
OUTCOME_TOKEN_METRIC_NAMES = (
    "vip/tokens_generated",
    "vip/tokens_zero_var",  # tokens spent in zero-variance groups (no gradient)
    "vip/tokens_share_zero_var",
    "vip/tokens_share_pred_hopeless",  # generated tokens on prompts predicted hopeless (needs p_mean)
    "vip/tokens_share_pred_solved",
    "vip/frac_truncated",  # rollouts cut at the maximum length (needs max_length; NaN without)
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
    error_ratio: float = 1.0,
    timings: Mapping[str, float] | None = None,
    min_keep_relaxed: bool = False,
    expected_lengths: np.ndarray | None = None,
    token_budget: float | None = None,
    optimality_gap: float = 0.0,
    expected_tokens: float | None = None,
) -> dict[str, float]:
    """Scalar description of one plan.

    ``counts`` int ``(M,)`` rollouts per prompt (0 = dropped), ``p_mean`` float ``(M,)`` predicted success
    probabilities. Shares are fractions of the planned rollouts (0 when the budget is 0); ``vip/mean_n`` and
    ``vip/max_n`` are over kept prompts only, because a dropped prompt is not generated at all. With
    ``expected_lengths`` (float ``(M,)``, tokens per rollout) the token metrics are added; ``expected_tokens``, when
    given, is the plan's own total (a two-phase commit counts its pilot's tokens as spent, not as predicted).
    ``variance_ratio`` and ``error_ratio`` are :attr:`vipalloc.plan.Plan.variance_ratio` and ``error_ratio``.
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

    out = {
        "vip/budget": float(total),
        "vip/prompts": float(m),
        "vip/mean_n": float(counts[kept].mean()) if kept.any() else 0.0,
        "vip/max_n": float(counts.max()) if m else 0.0,
        "vip/num_dropped": float(dropped),
        "vip/frac_dropped": float(dropped / m) if m else 0.0,
        "vip/share_hopeless": share(p < HOPELESS_P),
        "vip/share_solved": share(p > SOLVED_P),
        "vip/expected_var_ratio_vs_uniform": float(variance_ratio),
        "vip/expected_error_ratio_vs_uniform": float(error_ratio),
        "vip/plan_seconds": float(sum((timings or {}).values())),
        "vip/p_mean": float(p.mean()) if m else 0.0,
        "vip/min_keep_relaxed": float(bool(min_keep_relaxed)),
    }
    if expected_lengths is not None:
        tok = counts * np.asarray(expected_lengths, np.float64)
        planned = float(tok.sum()) if expected_tokens is None else float(expected_tokens)

        def tshare(mask: np.ndarray) -> float:
            return float(tok[mask].sum() / planned) if planned > 0 else 0.0

        out.update(
            {
                "vip/tokens_planned": planned,
                "vip/tokens_share_hopeless": tshare(p < HOPELESS_P),
                "vip/tokens_share_solved": tshare(p > SOLVED_P),
            }
        )
        # left out rather than NaN where they do not apply (a plan by rollouts, a rule with no objective): NaN is
        # not JSON and never equals itself, which breaks logs and resume checks
        if token_budget is not None:
            out["vip/token_budget"] = float(token_budget)
        if np.isfinite(optimality_gap):
            out["vip/optimality_gap"] = float(optimality_gap)
    return out


def outcome_metrics(
    rewards: Sequence[Any],
    *,
    success_threshold: float = 0.5,
    p_mean: np.ndarray | None = None,
    lengths: Sequence[Any] | None = None,
    max_length: int | None = None,
) -> dict[str, float]:
    """Scalar description of the rollouts that came back for one plan.

    ``rewards``: one 1-D array per prompt (as given to ``Allocator.observe``); empty arrays are prompts that were
    dropped or whose generations failed and count in none of the rates. ``p_mean`` ``(M,)``, aligned with
    ``rewards``, enables ``vip/pred_abs_err`` (mean |p_mean - realised success rate| over generated prompts; NaN
    without it). A zero-variance group is a generated group whose raw rewards are all equal (its advantages are
    all zero, so it gives no gradient); a group of one rollout counts as zero-variance. ``lengths`` (one array of
    generated tokens per prompt, aligned with ``rewards``) adds the token metrics; ``max_length`` (tokens) adds the
    share of rollouts cut there (length >= max_length).
    """
    arrs = [np.asarray(r, np.float64).reshape(-1) for r in rewards]
    if p_mean is not None and len(p_mean) != len(arrs):
        raise ValueError(f"p_mean has {len(p_mean)} entries but rewards has {len(arrs)} groups; align them")
    gen = [i for i, a in enumerate(arrs) if a.size > 0]
    n_roll = int(sum(arrs[i].size for i in gen))
    if not gen:
        empty = {
            "vip/rollouts_generated": 0.0,
            "vip/frac_zero_var_groups": 0.0,
            "vip/prompt_accuracy": float("nan"),
            "vip/rollout_accuracy": float("nan"),
            "vip/pred_abs_err": float("nan"),
        }
        if lengths is not None:
            empty.update({k: 0.0 for k in OUTCOME_TOKEN_METRIC_NAMES[:3]})
            empty.update({k: float("nan") for k in OUTCOME_TOKEN_METRIC_NAMES[3:]})
        return empty
    rates = np.array([np.mean(arrs[i] >= success_threshold) for i in gen])
    zero_var = np.array([np.ptp(arrs[i]) == 0.0 for i in gen])
    succ = float(sum(np.count_nonzero(arrs[i] >= success_threshold) for i in gen))
    err = float("nan")
    if p_mean is not None:
        err = float(np.mean(np.abs(np.asarray(p_mean, np.float64)[gen] - rates)))
    out = {
        "vip/rollouts_generated": float(n_roll),
        "vip/frac_zero_var_groups": float(zero_var.mean()),
        "vip/prompt_accuracy": float(rates.mean()),
        "vip/rollout_accuracy": succ / n_roll,
        "vip/pred_abs_err": err,
    }
    if lengths is not None:
        if len(lengths) != len(arrs):
            raise ValueError(f"lengths has {len(lengths)} groups but rewards has {len(arrs)}; align them")
        lens = [np.asarray(lengths[i], np.float64).reshape(-1) for i in gen]
        if any(ln.size != arrs[i].size for ln, i in zip(lens, gen)):
            raise ValueError("each prompt needs one length per reward")
        tok = np.array([ln.sum() for ln in lens])
        total = float(tok.sum())

        def tshare(mask: np.ndarray) -> float:
            return float(tok[mask].sum() / total) if total > 0 else 0.0

        pm = None if p_mean is None else np.asarray(p_mean, np.float64)[gen]
        out.update(
            {
                "vip/tokens_generated": total,
                "vip/tokens_zero_var": float(tok[zero_var].sum()),
                "vip/tokens_share_zero_var": tshare(zero_var),
                "vip/tokens_share_pred_hopeless": float("nan") if pm is None else tshare(pm < HOPELESS_P),
                "vip/tokens_share_pred_solved": float("nan") if pm is None else tshare(pm > SOLVED_P),
                "vip/frac_truncated": float("nan")
                if max_length is None
                else float(sum(np.count_nonzero(ln >= max_length) for ln in lens) / n_roll),
            }
        )
    return out
