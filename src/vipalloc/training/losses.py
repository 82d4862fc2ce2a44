"""Group advantages for groups of ANY size, identified by prompt id (never by reshaping to a fixed width).

``group_advantages(rewards, group)``: ``rewards`` float (R,), ``group`` int (R,) group index per rollout.
* ``drgrpo``: ``A = r - mean(group)``
* ``rloo``:   ``A = r - mean(other rollouts of the group)`` (needs groups of >= 2)
* ``grpo``:   ``A = (r - mean) / (std_ddof1 + eps)``; a constant group gets 0
A group of size 1 gets advantage 0 under every estimator (no baseline: nothing to learn from it).
"""

from __future__ import annotations

import torch

GRPO_EPS = 1e-6


def group_advantages(rewards: torch.Tensor, group: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-rollout advantages, float (R,)."""
    r = rewards.double()
    g = group.long()
    n_groups = int(g.max()) + 1 if g.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, g, torch.ones_like(r))
    total = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, g, r)
    n = count[g]
    mean = total[g] / n
    if estimator == "drgrpo":
        adv = r - mean
    elif estimator == "rloo":
        adv = torch.where(n > 1, r - (total[g] - r) / (n - 1).clamp(min=1), torch.zeros_like(r))
    elif estimator == "grpo":
        sq = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, g, (r - mean) ** 2)
        std = torch.sqrt(sq[g] / (n - 1).clamp(min=1))
        adv = (r - mean) / (std + GRPO_EPS)
    else:
        raise ValueError(f"unknown estimator {estimator!r}; choose drgrpo, rloo or grpo")
    return torch.where(n > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)
