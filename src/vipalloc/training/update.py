"""The CPU trainer's policy-gradient update on one step's rollouts (clipped surrogate, optional KL anchor)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vipalloc.training.config import TrainConfig
from vipalloc.training.generation import token_logprobs
from vipalloc.training.model import CharTokenizer

__all__ = ["NO_UPDATE", "policy_update"]

#: the diagnostics of a step without an update (no rollout, or every advantage zero)
NO_UPDATE: dict[str, float | None] = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": None, "grad_norm": 0.0}


def policy_update(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ref_model: torch.nn.Module | None,
    tok: CharTokenizer,
    cfg: TrainConfig,
    rng: np.random.Generator,
    prompts: list[str],
    owners: list[int],
    comps: list[list[int]],
    adv: torch.Tensor,
) -> dict[str, Any]:
    """Policy-gradient update on one step's rollouts; returns loss/KL/clip/entropy/grad-norm diagnostics.

    ``prompts[g]`` is group g's text, ``owners[r]`` the group of rollout r, ``comps[r]`` its completion (token
    ids), ``adv`` float ``(R,)`` its advantage. Per-token clipped surrogate ``-min(rho A, clip(rho, 1-eps, 1+eps) A)``
    with ``rho = pi/pi_old`` (plain policy gradient when each batch is used once: rho = 1). Rollout r of group g has
    weight ``1 / (n_g * G_mb * max_new_tokens)``: mean over a prompt's rollouts, mean over the minibatch's prompts,
    Dr.GRPO's constant token normaliser (no per-sequence length division, which would bias towards short wrong
    answers). Groups are split across minibatches whole, never by reshaping to a fixed width; ``rng`` shuffles them
    when there are several minibatches. ``ref_model`` (the frozen warm-up policy) is required when ``kl_coef > 0``.
    """
    dev = next(model.parameters()).device
    adv = adv.to(dev)
    owners_t = torch.tensor(owners, dtype=torch.long, device=dev)
    n_groups = len(prompts)
    n_per = torch.zeros(n_groups, device=dev).index_add_(0, owners_t, torch.ones(len(owners), device=dev))
    row_prompts = [prompts[g] for g in owners]
    need_old = cfg.ppo_epochs * cfg.minibatches > 1
    with torch.no_grad():
        old = token_logprobs(model, tok, row_prompts, comps)[0] if need_old else None
        ref = None
        if cfg.kl_coef > 0:
            if ref_model is None:
                raise ValueError("kl_coef > 0 needs the frozen reference policy (ref_model); pass the warm-up model")
            ref = token_logprobs(ref_model, tok, row_prompts, comps)[0]
    active = sorted(set(owners))  # groups with at least one rollout, ascending
    stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    n_updates = 0
    for _ in range(cfg.ppo_epochs):
        order = [active[i] for i in rng.permutation(len(active))] if cfg.minibatches > 1 else active
        for chunk in np.array_split(np.array(order, dtype=np.int64), min(cfg.minibatches, len(order))):
            in_mb = torch.zeros(n_groups, dtype=torch.bool, device=dev)
            in_mb[torch.from_numpy(chunk).to(dev)] = True
            rows = torch.nonzero(in_mb[owners_t]).squeeze(1)
            rows_l = rows.tolist()
            logp, mask, ent = token_logprobs(model, tok, [row_prompts[r] for r in rows_l], [comps[r] for r in rows_l])
            t = logp.shape[1]
            a = adv[rows].float()[:, None]
            w = (1.0 / (n_per[owners_t[rows]] * len(chunk) * cfg.max_new_tokens))[:, None] * mask
            if old is not None:
                ratio = torch.exp(logp - old[rows, :t])
                surr = torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * a)
                clipped = ((ratio - 1).abs() > cfg.clip_eps).float()
            else:
                surr = torch.exp(logp - logp.detach()) * a  # value = A, gradient = A * grad log pi
                clipped = torch.zeros_like(logp)
            loss = -(w * surr).sum()
            kl = torch.zeros((), device=dev)
            if ref is not None:
                d = ref[rows, :t] - logp
                kl = (w * (torch.exp(d) - d - 1)).sum()  # k3 estimator of KL(pi || pi_ref), >= 0
                loss = loss + cfg.kl_coef * kl
            opt.zero_grad()
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            tokens = float(mask.sum())
            stats["loss"] += float(loss.detach())
            stats["kl"] += float(kl.detach())
            stats["clip_frac"] += float((clipped * mask).sum()) / max(tokens, 1.0)
            stats["entropy"] += float(ent.sum()) / max(tokens, 1.0)
            stats["grad_norm"] += float(gn)
            n_updates += 1
    return {k: v / max(n_updates, 1) for k, v in stats.items()}
