"""TRL plug-in: adaptive per-prompt rollout counts in TRL's ``GRPOTrainer`` (TRL >= 1.16, < 2).

Route (see ``docs/trl.md``): TRL's sampler hands each generation batch as rectangular groups of
``num_generations = n_max`` consecutive rows per prompt. Before generation, :class:`VIPGRPOTrainer` asks
``Allocator.plan`` for per-prompt counts ``n_i`` (summing to the budget); only the first ``n_i`` rows of each group are
generated. The other rows get a one-token EOS "completion" (no sampling), their rewards are set to NaN so TRL's
NaN-aware group statistics exclude them and their advantage is 0, their completion mask is zeroed and their token is
removed from ``num_items_in_batch``. After scoring, ``Allocator.observe`` receives each prompt's real rewards,
binarised by ``success_threshold``.

Scope: a single process, TRL's transformers generation path (not vLLM, whose server de-duplicates prompts by
``num_generations``), text prompts, and token-normalised losses (``dapo``, ``bnpo``, ``cispo``, ``vespo``) or
``dr_grpo`` (a constant normaliser: padded rows only rescale it). Anything else raises a clear error at construction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    import torch
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('vipalloc.integrations.trl needs TRL: pip install "vipalloc[trl]"') from exc

from packaging.version import Version

from vipalloc import Allocator

__all__ = ["VIPGRPOConfig", "VIPGRPOTrainer"]

SUPPORTED_TRL = (Version("1.16"), Version("2.0"))
_SUPPORTED_LOSSES = ("dapo", "bnpo", "cispo", "vespo", "dr_grpo")

if not (SUPPORTED_TRL[0] <= Version(trl.__version__) < SUPPORTED_TRL[1]):  # pragma: no cover
    import warnings

    warnings.warn(
        f"vipalloc's TRL plug-in is tested with trl>=1.16,<2; found {trl.__version__}", RuntimeWarning, stacklevel=2
    )


@dataclass
class VIPGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus VIP allocation. ``num_generations`` is the group width (= the largest count ``n_max``).

    Budget per generation batch: ``rollout_budget`` if set, else ``mean_generations`` x prompts in the batch.
    """

    rollout_budget: int | None = field(default=None, metadata={"help": "Rollouts per generation batch."})
    mean_generations: float = field(default=4.0, metadata={"help": "Average rollouts per prompt (budget)."})
    n_min: int = field(default=2, metadata={"help": "Fewest rollouts for a kept prompt (>= 2)."})
    allocation_strategy: str = field(default="vip", metadata={"help": "vipalloc strategy name."})
    predictor: str = field(default="gp", metadata={"help": "gp | beta | empirical | ridge | oracle"})
    variance_estimator: str = field(default="drgrpo", metadata={"help": "drgrpo | rloo"})
    embedder: str = field(default="auto", metadata={"help": "auto | minilm | hashing (prompt features)."})
    success_threshold: float = field(default=0.5, metadata={"help": "A rollout succeeds when reward >= this."})
    allocator_seed: int = field(default=0, metadata={"help": "Seed of the allocator's tie-breaking."})
    prompt_id_column: str = field(default="prompt_id", metadata={"help": "Dataset column with a stable prompt id."})


def _prompt_key(row: dict[str, Any], column: str) -> str:
    if column in row and row[column] is not None:
        return str(row[column])
    blob = json.dumps(row["prompt"], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):  # conversational: use the last user turn's text
        for msg in reversed(prompt):
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, str):
                return content
    return json.dumps(prompt, default=str)


class VIPGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` that generates ``n_i`` completions per prompt as planned by a :class:`vipalloc.Allocator`."""

    def __init__(self, *args: Any, allocator: Allocator | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        args_: VIPGRPOConfig = self.args  # type: ignore[assignment]
        if not isinstance(args_, VIPGRPOConfig):
            raise ValueError("VIPGRPOTrainer needs a VIPGRPOConfig (it carries the allocation settings)")
        if self.accelerator.num_processes > 1:
            raise NotImplementedError(
                "VIPGRPOTrainer supports a single process: TRL spreads one prompt's group over processes, and the "
                "padded rows would have to be planned jointly across ranks. Use one process (or the verl plug-in)."
            )
        if self.use_vllm:
            raise NotImplementedError(
                "VIPGRPOTrainer needs TRL's transformers generation path: TRL's vLLM path samples "
                "prompts[::num_generations] with n=num_generations and cannot vary the count per prompt"
            )
        if self.loss_type not in _SUPPORTED_LOSSES:
            raise ValueError(
                f"loss_type {self.loss_type!r} averages per sequence, so padded rows would dilute it; "
                f"use one of {', '.join(_SUPPORTED_LOSSES)}"
            )
        if self.rollout_func is not None or self.environment_factories is not None:
            raise NotImplementedError("VIPGRPOTrainer does not support rollout_func or environments")
        if args_.n_min > self.num_generations:
            raise ValueError(
                f"n_min ({args_.n_min}) must be <= num_generations ({self.num_generations}), the largest count"
            )
        self.allocator = allocator or Allocator(
            strategy=args_.allocation_strategy,
            predictor=args_.predictor,
            estimator=args_.variance_estimator,
            n_min=args_.n_min,
            n_max=self.num_generations,
            seed=args_.allocator_seed,
            embedder=args_.embedder,
            success_threshold=args_.success_threshold,
        )
        self._vip_real: list[bool] | None = None
        self._vip_rewards: torch.Tensor | None = None
        self._vip_step = 0

    # ------------------------------------------------------------------ planning
    def _vip_plan(self, inputs: list[dict[str, Any]]) -> tuple[list[str], np.ndarray, Any]:
        g = self.num_generations
        if len(inputs) % g:
            raise RuntimeError(f"generation batch of {len(inputs)} rows is not made of full groups of {g}")
        col = self.args.prompt_id_column
        ids, texts = [], []
        for start in range(0, len(inputs), g):
            key = _prompt_key(inputs[start], col)
            if any(_prompt_key(inputs[start + k], col) != key for k in range(g)):
                raise RuntimeError("rows of a group differ: VIPGRPOTrainer relies on TRL's RepeatSampler layout")
            ids.append(key)
            texts.append(_prompt_text(inputs[start]["prompt"]))
        m = len(ids)
        budget = self.args.rollout_budget or int(round(self.args.mean_generations * m))
        plan = self.allocator.plan(ids, prompts=texts, budget=budget, step=self._vip_step)
        return ids, plan.counts, plan

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.model.training:  # evaluation: plain rectangular groups
            self._vip_real = None
            return super()._generate_and_score_completions(inputs)
        g = self.num_generations
        ids, counts, plan = self._vip_plan(inputs)
        real = [k < counts[i // g] for i, k in ((i, i % g) for i in range(len(inputs)))]
        self._vip_real = real
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._vip_real_used = self._vip_real
            self._vip_real = None
        real_t = torch.tensor(real, device=output["completion_mask"].device)
        pad_tokens = output["completion_mask"][~real_t].sum()
        output["completion_mask"] = output["completion_mask"] * real_t.unsqueeze(1).to(output["completion_mask"].dtype)
        output["num_items_in_batch"] = output["num_items_in_batch"] - pad_tokens
        output["advantages"] = torch.where(real_t, output["advantages"], torch.zeros_like(output["advantages"]))
        self._vip_observe(ids, counts, plan)
        self._vip_step += 1
        return output

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        real = self._vip_real
        if real is None or all(real):
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if images is not None and any(im is not None for im in images):
            raise NotImplementedError("VIPGRPOTrainer does not support image prompts")
        keep = [i for i, r in enumerate(real) if r]
        comp, logps = super()._generate_single_turn(
            [prompt_ids[i] for i in keep], None, multimodal_fields, num_generations, has_tool_images
        )
        eos = self.eos_token_ids[0] if self.eos_token_ids else self.processing_class.eos_token_id
        full: list[list[int]] = [[eos] for _ in prompt_ids]  # not sampled: a 1-token placeholder, masked out later
        full_lp: list[list[float]] | None = None if logps is None else [[float("nan")] for _ in prompt_ids]
        for j, i in enumerate(keep):
            full[i] = comp[j]
            if full_lp is not None:
                full_lp[i] = logps[j]
        return full, full_lp

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        real = self._vip_real
        if real is None:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        keep = [i for i, r in enumerate(real) if r]
        # Reward functions see only real completions; placeholders become NaN (unscorable: excluded from TRL's
        # nan-aware group mean/std, advantage forced to 0).
        sub = super()._calculate_rewards(
            [inputs[i] for i in keep],
            [prompts[i] for i in keep],
            [completions[i] for i in keep],
            [completion_ids_list[i] for i in keep],
        )
        full = torch.full((len(prompts), sub.shape[1]), float("nan"), device=sub.device, dtype=sub.dtype)
        full[torch.tensor(keep, device=sub.device)] = sub
        self._vip_rewards = full.detach().cpu()
        return full

    # ------------------------------------------------------------------ feedback
    def _vip_observe(self, ids: list[str], counts: np.ndarray, plan: Any) -> None:
        g = self.num_generations
        rpf = self._vip_rewards
        if rpf is None:
            return
        weights = self.reward_weights.detach().cpu().unsqueeze(0)
        rewards = (rpf * weights).nansum(dim=1).numpy()
        success = (rewards >= self.args.success_threshold).astype(np.float64)
        per_prompt = [success[i * g : i * g + int(c)] for i, c in enumerate(counts)]
        self.allocator.observe(ids, per_prompt, step=self._vip_step)
        kept = counts > 0
        rates = np.array([p.mean() if len(p) else np.nan for p in per_prompt])
        zero_std = np.array([len(p) > 0 and (p.min() == p.max()) for p in per_prompt])
        mode = "train"
        self._metrics[mode]["vip/mean_n"].append(float(counts[kept].mean()) if kept.any() else 0.0)
        self._metrics[mode]["vip/max_n"].append(float(counts.max()))
        self._metrics[mode]["vip/frac_dropped"].append(float((~kept).mean()))
        self._metrics[mode]["vip/frac_zero_std"].append(float(zero_std[kept].mean()) if kept.any() else 0.0)
        self._metrics[mode]["vip/pred_abs_err"].append(
            float(np.nanmean(np.abs(plan.p_mean - rates))) if kept.any() else 0.0
        )
        self._metrics[mode]["vip/expected_var_ratio_vs_uniform"].append(float(plan.variance_ratio))
        self._vip_rewards = None
        self.vip_last = {"ids": ids, "counts": counts.copy(), "success": per_prompt, "rewards": rewards.copy()}
