"""A plan: the rollout counts of one batch, with the predictions (and expected lengths) they came from.

Built only by :class:`vipalloc.allocator.Allocator` (``plan``, ``plan_pilot``, ``plan_commit``); trainers and
plug-ins read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vipalloc.gradient_error import DEFAULT_SIGNAL_RATIO, scaled_error
from vipalloc.telemetry import plan_metrics
from vipalloc.variance import gradient_variance

__all__ = ["Plan", "plan_variance", "step_permutation"]


@dataclass(frozen=True)
class Plan:
    """Rollout counts for one batch, with the predictions they came from.

    Arrays have shape ``(M,)`` aligned with ``prompt_ids``. Variances are the estimator's model
    (:func:`vipalloc.variance.gradient_variance`) evaluated at ``p_mean``, summed over the batch.
    """

    prompt_ids: list[str]
    counts: np.ndarray  # int64, rollouts per prompt; 0 = dropped (do not generate)
    p_mean: np.ndarray  # float64 in [0, 1], predicted success probability
    p_std: np.ndarray  # float64 >= 0, predictive uncertainty of p
    budget: int
    step: int
    strategy: str
    estimator: str
    expected_variance: float  # sum_i Var_i(p_mean_i, counts_i) of this plan
    uniform_variance: float  # the same for the uniform plan at the same budget
    timings: dict[str, float] = field(default_factory=dict)  # seconds: embed, predict, solve
    # True when no plan with every kept prompt at >= the strategy's minimum existed and the minimum was relaxed.
    min_keep_relaxed: bool = False
    # Two-phase steps (plan_pilot / plan_commit): "pilot" or "commit"; "single" for plan(). A commit plan's counts
    # are EXTRA rollouts and pilot_counts (int64 (M,)) the pilot rollouts that came back, so a prompt's training
    # group is pilot_counts + counts (group_sizes); its variances are posterior expectations for those groups.
    phase: str = "single"
    pilot_counts: np.ndarray | None = None
    # Commit plans: which prompts' groups enter the update (bool (M,)); None = every prompt with rollouts.
    # pilot_commit trains only on its committed prompts (the peer defers the other candidates' pilots).
    train: np.ndarray | None = None
    # Tokens. expected_lengths: the c_i used (float64 (M,), expected generated tokens per rollout; None when no
    # length was ever observed); expected_tokens = sum_i counts_i c_i; token_budget: the cap it was planned under
    # (None: planned by rollouts); optimality_gap: certified relative gap of the program that chose the counts
    # (0.0 exact; NaN for a rule that optimises nothing, e.g. uniform under a token budget).
    expected_lengths: np.ndarray | None = None
    expected_tokens: float | None = None
    token_budget: float | None = None
    optimality_gap: float = 0.0
    # The uniform plan this one is compared with (int64 (M,), groups as in group_sizes): at the same rollouts, or at
    # the same tokens (and rollout cap) for a token plan. None: the even split of group_sizes.sum().
    uniform_counts: np.ndarray | None = None
    # rho of the gradient-error model behind error_ratio (vipalloc.gradient_error; the strategy's own when it has one)
    signal_ratio: float = DEFAULT_SIGNAL_RATIO

    @property
    def group_sizes(self) -> np.ndarray:
        """Rollouts in each prompt's training group: ``counts``, plus the pilot's for a commit plan (int64 ``(M,)``)."""
        return self.counts if self.pilot_counts is None else self.pilot_counts + self.counts

    @property
    def train_mask(self) -> np.ndarray:
        """Prompts whose whole group (``group_sizes``) enters the policy update, bool ``(M,)``."""
        return self.group_sizes > 0 if self.train is None else self.train

    @property
    def dropped(self) -> np.ndarray:
        """Boolean mask of prompts that get no rollouts (``counts == 0``)."""
        return self.counts == 0

    @property
    def kept_ids(self) -> list[str]:
        """Prompt ids with at least one rollout, in batch order."""
        return [pid for pid, c in zip(self.prompt_ids, self.counts) if c > 0]

    @property
    def variance_ratio(self) -> float:
        """``expected_variance / uniform_variance`` (1.0 when both are 0): below 1 means better than uniform."""
        if self.uniform_variance <= 0.0:
            return 1.0 if self.expected_variance <= 0.0 else float("inf")
        return self.expected_variance / self.uniform_variance

    @property
    def error_ratio(self) -> float:
        """The plan's modelled gradient error at the best step size over the uniform plan's
        (:func:`vipalloc.gradient_error.scaled_error`: the noise it adds plus the signal it gives up, under the
        predictions ``p_mean`` and their spread ``p_std``); below 1 means a better gradient than uniform's.

        Read this one to judge a plan. ``variance_ratio`` counts a dropped prompt as zero variance, so any drop
        lowers it, even one that throws away the batch's signal (docs/variance.md, "The gradient error")."""
        uniform = self.uniform_counts
        if uniform is None:
            m, total = len(self.counts), int(self.group_sizes.sum())
            uniform = np.full(m, total // m, np.int64) + (np.arange(m) < total % m)
        est = self.estimator if self.estimator in ("drgrpo", "rloo") else "drgrpo"

        def error(counts: np.ndarray) -> float:  # a group of one carries no gradient
            sizes = np.where(counts >= 2, counts, 0)
            return scaled_error(self.p_mean, sizes, est, signal_ratio=self.signal_ratio, p_std=self.p_std)

        ours, ref = error(self.group_sizes), error(uniform)
        if ref <= 0.0:
            return 1.0 if ours <= 0.0 else float("inf")
        return ours / ref

    def metrics(self) -> dict[str, float]:
        """Where the budget goes, as ``vip/...`` scalars (:func:`vipalloc.telemetry.plan_metrics`).

        Every trainer and plug-in logs exactly these names; log ``counts`` as a histogram under ``vip/counts``.
        A commit plan describes the whole step: its groups (``group_sizes``, pilot + commit), so ``vip/budget`` is
        the step's budget and the shares are of all its rollouts, as for a single-phase plan.
        """
        return plan_metrics(
            self.group_sizes,
            self.p_mean,
            variance_ratio=self.variance_ratio,
            error_ratio=self.error_ratio,
            timings=self.timings,
            min_keep_relaxed=self.min_keep_relaxed,
            expected_lengths=self.expected_lengths,
            token_budget=self.token_budget,
            optimality_gap=self.optimality_gap,
            expected_tokens=self.expected_tokens,
        )

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per prompt: ``prompt_id``, ``n``, ``p_mean``, ``p_std`` (and ``expected_length``,
        tokens per rollout, when the plan has lengths)."""
        out: list[dict[str, Any]] = [
            {"prompt_id": pid, "n": int(c), "p_mean": float(m), "p_std": float(s)}
            for pid, c, m, s in zip(self.prompt_ids, self.counts, self.p_mean, self.p_std)
        ]
        if self.expected_lengths is not None:
            for rec, length in zip(out, self.expected_lengths):
                rec["expected_length"] = float(length)
        return out


def plan_variance(p: np.ndarray, counts: np.ndarray, estimator: str) -> float:
    """Sum of per-prompt variances; dropped prompts (count 0) contribute nothing."""
    kept = counts > 0
    if not kept.any():
        return 0.0
    return float(np.sum(gradient_variance(p[kept], counts[kept], estimator)))


def step_permutation(seed: int, step: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded per-step permutation ``plan`` uses for fair tie-breaks, and its inverse."""
    perm = np.random.default_rng([seed, step]).permutation(m)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(m)
    return perm, inv
