"""The fixed-group baseline and the VIP authors' two linear ablations.

| name | rule | source |
|---|---|---|
| ``uniform`` | ``budget // M`` each, remainder +1 to the first prompts | GRPO (arXiv 2402.03300) / RLOO / Dr.GRPO |
| ``inverse_acc`` | min ``sum n log p`` (linear: hardest prompts to n_max) | VIP ablation |
| ``inverse_var`` | min ``sum n log(p(1-p))`` (lowest-variance prompts to n_max) | VIP ablation |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vipalloc.strategies.base import P_CLIP, AllocationContext, StrategyBase, check_call, uniform_counts

__all__ = ["InverseAcc", "InverseVar", "Uniform"]


@dataclass
class Uniform(StrategyBase):
    """The same number of rollouts for every prompt: the group size of GRPO (Shao et al., arXiv 2402.03300),
    RLOO and Dr.GRPO. Rule: ``budget // M`` each, the remainder +1 to the first ``budget % M`` prompts."""

    name: str = "uniform"

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        return uniform_counts(len(p), budget)


def _linear_allocate(score: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
    """Exact minimiser of the linear ``sum_i score_i n_i``: everyone gets ``n_min``, then groups of equal score in
    increasing score order are filled to ``n_max``; the group where the budget runs out shares the rest evenly
    (earlier prompts first), so equal prompts are treated alike (any split among equal scores is optimal)."""
    m = len(score)
    counts = np.full(m, n_min, dtype=np.int64)
    left = budget - m * n_min
    uniq, inv = np.unique(score, return_inverse=True)
    inv = inv.ravel()
    for g in range(len(uniq)):
        if left <= 0:
            break
        members = np.flatnonzero(inv == g)
        take = min(left, len(members) * (n_max - n_min))
        counts[members] += uniform_counts(len(members), take)
        left -= take
    return counts


@dataclass
class InverseAcc(StrategyBase):
    """The VIP authors' "inverse_acc" ablation (arXiv 2602.01601): minimise ``sum_i n_i log(clip(p_i))``, a linear
    program whose exact integer solution sends the hardest prompts to ``n_max``, the rest to ``n_min``, and one
    prompt in between."""

    name: str = "inverse_acc"

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        return _linear_allocate(np.log(np.clip(p, P_CLIP, 1 - P_CLIP)), budget, n_min, n_max)


@dataclass
class InverseVar(StrategyBase):
    """The VIP authors' "inverse_var" ablation (arXiv 2602.01601): minimise ``sum_i n_i log(p_i (1 - p_i))``
    (p clipped to [1e-6, 1-1e-6]), deliberately the opposite of VIP: the lowest-variance prompts (p near 0 or 1)
    get ``n_max``, the rest ``n_min``, one prompt in between."""

    name: str = "inverse_var"

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        pc = np.clip(p, P_CLIP, 1 - P_CLIP)
        return _linear_allocate(np.log(pc * (1 - pc)), budget, n_min, n_max)
