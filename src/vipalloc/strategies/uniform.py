"""The fixed-group baseline and the VIP authors' two linear ablations.

| name | rule | source |
|---|---|---|
| ``uniform`` | ``budget // M`` each, remainder +1 to the first prompts | GRPO (arXiv 2402.03300) / RLOO / Dr.GRPO |
| ``inverse_acc`` | min ``sum n log p`` (linear: hardest prompts to n_max) | VIP ablation |
| ``inverse_var`` | min ``sum n log(p(1-p))`` (lowest-variance prompts to n_max) | VIP ablation |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from vipalloc.allocation import domain
from vipalloc.strategies.base import (
    P_CLIP,
    AllocationContext,
    Ctx,
    StrategyBase,
    TokenCounts,
    check_call,
    table_tokens,
    uniform_counts,
)

__all__ = ["InverseAcc", "InverseVar", "Uniform", "uniform_token_counts"]


@dataclass
class Uniform(StrategyBase):
    """The same number of rollouts for every prompt: the group size of GRPO (Shao et al., arXiv 2402.03300),
    RLOO and Dr.GRPO. Rule: ``budget // M`` each, the remainder +1 to the first ``budget % M`` prompts.

    Under a token budget: the largest common ``n`` whose predicted tokens fit (``n sum_i c_i <= T``, within the
    rollout cap and ``n_max``), then one pass over the prompts in order giving +1 to each prompt whose extra rollout
    still fits (the ``Allocator`` permutes the order per step, so no prompt is favoured systematically).
    """

    name: str = "uniform"
    token_refusal: ClassVar[str | None] = None

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        return uniform_counts(len(p), budget)

    def _allocate_tokens(
        self, p: np.ndarray, c: np.ndarray, t: float, cap: int | None, n_min: int, n_max: int, context: Ctx
    ) -> TokenCounts:
        return TokenCounts(uniform_token_counts(c, t, n_max, cap), float("nan"))


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
    token_refusal: ClassVar[str | None] = None

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        return _linear_allocate(np.log(np.clip(p, P_CLIP, 1 - P_CLIP)), budget, n_min, n_max)

    def _allocate_tokens(
        self, p: np.ndarray, c: np.ndarray, t: float, cap: int | None, n_min: int, n_max: int, context: Ctx
    ) -> TokenCounts:
        vals = domain(n_min, n_max)
        score = np.log(np.clip(p, P_CLIP, 1 - P_CLIP))
        return table_tokens(score[:, None] * vals[None, :], vals, c, t, cap)


@dataclass
class InverseVar(StrategyBase):
    """The VIP authors' "inverse_var" ablation (arXiv 2602.01601): minimise ``sum_i n_i log(p_i (1 - p_i))``
    (p clipped to [1e-6, 1-1e-6]), deliberately the opposite of VIP: the lowest-variance prompts (p near 0 or 1)
    get ``n_max``, the rest ``n_min``, one prompt in between."""

    name: str = "inverse_var"
    token_refusal: ClassVar[str | None] = None

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        pc = np.clip(p, P_CLIP, 1 - P_CLIP)
        return _linear_allocate(np.log(pc * (1 - pc)), budget, n_min, n_max)

    def _allocate_tokens(
        self, p: np.ndarray, c: np.ndarray, t: float, cap: int | None, n_min: int, n_max: int, context: Ctx
    ) -> TokenCounts:
        vals = domain(n_min, n_max)
        score = np.log(np.clip(p, P_CLIP, 1 - P_CLIP) * (1 - np.clip(p, P_CLIP, 1 - P_CLIP)))
        return table_tokens(score[:, None] * vals[None, :], vals, c, t, cap)


def uniform_token_counts(c: np.ndarray, token_budget: float, n_max: int, max_rollouts: int | None) -> np.ndarray:
    """The uniform plan under a token budget (see :class:`Uniform`): int64 ``(M,)``; ``c`` float ``(M,)``."""
    m = len(c)
    total = float(c.sum())
    n = min(n_max, int(np.floor(token_budget / total * (1 + 1e-12))))
    if max_rollouts is not None:
        n = min(n, max_rollouts // m)
    counts = np.full(m, n, np.int64)
    left_t = token_budget - n * total
    left_n = np.inf if max_rollouts is None else max_rollouts - n * m
    if n < n_max:
        for i in range(m):  # one pass in order: the remainder goes to prompts whose extra rollout fits
            if c[i] <= left_t * (1 + 1e-12) + 1e-9 and left_n >= 1:
                counts[i] += 1
                left_t -= c[i]
                left_n -= 1
    return counts
