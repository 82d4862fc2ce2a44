"""TRL plug-in: VIP's per-prompt rollout counts inside TRL's ``GRPOTrainer`` (supported TRL: ``>=1.16,<2``).

Route (justified in ``docs/trl.md``): TRL's sampler hands every generation batch over as rectangular groups of
``num_generations`` (= ``n_max``) consecutive rows per prompt. :class:`VIPGRPOTrainer` asks ``Allocator.plan`` for
per-prompt counts ``n_i`` (summing to the budget) and marks the first ``n_i`` rows of group ``i`` real. Only real rows
are generated and scored; the unused rows carry a one-token placeholder and a NaN reward, which TRL's NaN-aware group
statistics ignore. After TRL has computed the advantages, the unused rows are removed from the batch, so they never
reach the loss, its normalisers or the backward pass. Each prompt's real rewards, binarised by
``success_threshold``, are then reported to ``Allocator.observe``.

Scope: TRL's transformers generation path (plain ``generate`` or continuous batching), text prompts, no tools,
environments or ``rollout_func``. In one process every TRL loss type is exact, because unused rows are removed
rather than masked. With several processes (accelerate/torchrun) the main process plans for the whole generation
batch and broadcasts the plan, groups may span processes, and the token-normalised losses ``dapo``, ``cispo`` and
``vespo`` stay exact. Unsupported settings raise at construction with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

try:
    import torch
    import trl
    import trl.trainer.grpo_trainer as _grpo_module
    from accelerate.utils import broadcast_object_list, gather, gather_object
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        f'vipalloc.integrations.trl needs TRL and PyTorch ({exc}); install them with: pip install "vipalloc[trl]"'
    ) from exc

from packaging.version import Version

from vipalloc.allocator import Allocator, Plan

__all__ = ["ALLOCATOR_FILE", "SUPPORTED_TRL", "VIPBatchRecord", "VIPGRPOConfig", "VIPGRPOTrainer"]

SUPPORTED_TRL = ">=1.16,<2"
_TRL_RANGE = (Version("1.16"), Version("2"))
ALLOCATOR_FILE = "vip_allocator.json"  # saved inside each TRL checkpoint folder
# Losses normalised by the global token count: exact when processes hold different numbers of completions.
_MULTI_PROCESS_LOSSES = ("dapo", "cispo", "vespo")


def _trl_version_supported(found: str) -> bool:
    return _TRL_RANGE[0] <= Version(found) < _TRL_RANGE[1]


if not _trl_version_supported(trl.__version__):  # pragma: no cover - depends on the installed TRL
    warnings.warn(
        f"vipalloc's TRL plug-in supports trl{SUPPORTED_TRL} (it overrides TRL internals); found trl "
        f"{trl.__version__}. Install a supported version or expect breakage.",
        RuntimeWarning,
        stacklevel=2,
    )


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass
class VIPGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus VIP allocation settings.

    The group width ``num_generations`` is the largest count a prompt can get (``n_max``; setting ``n_max`` sets it).
    ``per_device_train_batch_size`` counts rectangular rows, so a generation batch holds
    ``generation_batch_size // n_max`` prompts. Of its rows, only ``budget_per_generation`` are generated:
    ``rollout_budget`` if given, else ``round(mean_generations * prompts)`` (the budget of uniform GRPO with
    ``mean_generations`` rollouts per prompt). ``n_min`` is the fewest rollouts of a prompt that is not dropped.
    """

    rollout_budget: int | None = field(
        default=None, metadata={"help": "Rollouts generated per generation batch (overrides mean_generations)."}
    )
    mean_generations: float = field(
        default=4.0, metadata={"help": "Average rollouts per prompt; budget = mean_generations x prompts per batch."}
    )
    n_min: int = field(default=2, metadata={"help": "Fewest rollouts of a kept prompt (>= 2)."})
    n_max: int | None = field(
        default=None, metadata={"help": "Most rollouts of a prompt; sets num_generations (the TRL group width)."}
    )
    allocation_strategy: str = field(
        default="vip", metadata={"help": "uniform | vip | vip_pure | inverse_acc | inverse_var | knapsack | gvm"}
    )
    predictor: str = field(default="gp", metadata={"help": "gp | beta | empirical | ridge | oracle"})
    variance_estimator: str = field(
        default="drgrpo", metadata={"help": "Variance model the allocation minimises: drgrpo | rloo."}
    )
    embedder: str = field(default="auto", metadata={"help": "Prompt features: auto | minilm | hashing."})
    success_threshold: float = field(
        default=0.5, metadata={"help": "A rollout succeeds when its weighted reward is >= this."}
    )
    allocator_seed: int = field(default=0, metadata={"help": "Seed of the allocator's tie-breaking."})
    prompt_id_column: str = field(
        default="prompt_id", metadata={"help": "Dataset column with a stable prompt id (else a hash of the prompt)."}
    )

    def __post_init__(self) -> None:
        if self.n_max is not None:
            self.n_max = _positive_int("n_max", self.n_max, 2)
            default_g = type(self).__dataclass_fields__["num_generations"].default
            if self.num_generations not in (None, default_g, self.n_max):
                raise ValueError(
                    f"n_max ({self.n_max}) and num_generations ({self.num_generations}) disagree; they are the same "
                    "quantity (the group width): set only n_max"
                )
            self.num_generations = self.n_max
        super().__post_init__()
        # GRPOConfig.__post_init__ has set (or raised about) the group width and the generation batch layout.
        assert self.num_generations is not None and self.steps_per_generation is not None
        self.n_max = int(self.num_generations)
        self.n_min = _positive_int("n_min", self.n_min, 2)
        if self.n_min > self.n_max:
            raise ValueError(f"n_min ({self.n_min}) must be <= n_max = num_generations ({self.n_max})")
        if self.variance_estimator not in ("drgrpo", "rloo"):
            raise ValueError(
                f"variance_estimator must be 'drgrpo' or 'rloo', got {self.variance_estimator!r} "
                "(use 'drgrpo' when training with TRL's grpo/dapo losses)"
            )
        if not (isinstance(self.success_threshold, (int, float)) and math.isfinite(self.success_threshold)):
            raise ValueError(f"success_threshold must be a finite number, got {self.success_threshold!r}")
        m = self.prompts_per_generation
        if self.rollout_budget is not None:
            self.rollout_budget = _positive_int("rollout_budget", self.rollout_budget)
        elif not (
            isinstance(self.mean_generations, (int, float))
            and math.isfinite(self.mean_generations)
            and self.mean_generations > 0
        ):
            raise ValueError(f"mean_generations must be a positive number, got {self.mean_generations!r}")
        budget = self.budget_per_generation
        if budget > m * self.n_max:
            raise ValueError(
                f"budget of {budget} rollouts exceeds the {m} prompts x n_max {self.n_max} = {m * self.n_max} rows of "
                "a generation batch; lower rollout_budget/mean_generations or raise n_max"
            )
        if self.world_size == 1 and budget % self.steps_per_generation:
            raise ValueError(
                f"budget of {budget} rollouts per generation batch must be divisible by steps_per_generation "
                f"({self.steps_per_generation}), because TRL splits the generated rows into that many equal "
                "micro-batches; adjust rollout_budget/mean_generations or steps_per_generation"
            )

    @property
    def prompts_per_generation(self) -> int:
        """Distinct prompts in one (global) generation batch: ``generation_batch_size // num_generations``."""
        assert self.generation_batch_size is not None and self.num_generations is not None  # set by __post_init__
        return int(self.generation_batch_size) // int(self.num_generations)

    @property
    def budget_per_generation(self) -> int:
        """Rollouts generated per generation batch (``rollout_budget`` or ``mean_generations`` x prompts)."""
        if self.rollout_budget is not None:
            return int(self.rollout_budget)
        return int(round(self.mean_generations * self.prompts_per_generation))


@dataclass
class VIPBatchRecord:
    """What one VIP generation step did (``trainer.vip_last``). Arrays are aligned with ``prompt_ids``.

    ``rewards[i]`` are the weighted rewards (TRL's sum over reward functions) of prompt ``i``'s scorable
    completions, ``successes[i]`` their binarised values as sent to ``Allocator.observe``.
    """

    step: int
    prompt_ids: list[str]
    counts: np.ndarray  # int64 (M,): completions generated per prompt
    rewards: list[np.ndarray]
    successes: list[np.ndarray]
    plan: Plan
    real_rows: np.ndarray  # bool (M * n_max,): rows of the rectangular batch that were generated


def _prompt_key(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is not None:
        return str(value)
    blob = json.dumps(row["prompt"], sort_keys=True, default=str)
    return "h" + hashlib.sha1(blob.encode()).hexdigest()[:16]


def _prompt_text(prompt: Any) -> str:
    """Text the allocator embeds: the prompt string, or the last user turn of a conversational prompt."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        for msg in reversed(prompt):
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, str):
                return content
    return json.dumps(prompt, default=str)


class VIPGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` that generates ``n_i`` completions for prompt ``i`` as planned by a :class:`Allocator`.

    Takes every ``GRPOTrainer`` argument plus ``allocator`` (optional: built from the config when omitted). Needs a
    :class:`VIPGRPOConfig`. The allocator is saved into each checkpoint (``vip_allocator.json``) and restored on
    ``train(resume_from_checkpoint=...)``. ``vip_last`` holds a :class:`VIPBatchRecord` of the latest step.

    With several processes the main process plans for the global generation batch and broadcasts the plan; a
    prompt's group may span processes (TRL's layout), and the group statistics use the gathered rewards as in TRL.
    """

    # TRL copies ``args.num_generations`` here; VIPGRPOConfig.__post_init__ has made it an int (= n_max).
    num_generations: int

    def __init__(self, *args: Any, allocator: Allocator | None = None, **kwargs: Any) -> None:
        bound = inspect.signature(GRPOTrainer.__init__).bind(self, *args, **kwargs).arguments
        cfg = bound.get("args")
        if not isinstance(cfg, VIPGRPOConfig):
            raise ValueError(
                f"VIPGRPOTrainer needs args=VIPGRPOConfig(...) (it carries the allocation settings), got {type(cfg)}"
            )
        # Checked before GRPOTrainer.__init__ so that nothing heavy (vLLM, models, process groups) starts for nothing.
        if cfg.use_vllm:
            raise NotImplementedError(
                "VIPGRPOTrainer needs TRL's transformers generation path (use_vllm=False): TRL's vLLM server path "
                "samples prompts[::num_generations] with n=num_generations and cannot vary the count per prompt"
            )
        if cfg.world_size > 1 and cfg.loss_type not in _MULTI_PROCESS_LOSSES:
            raise NotImplementedError(
                f"with {cfg.world_size} processes VIPGRPOTrainer supports loss_type in {_MULTI_PROCESS_LOSSES}: after "
                "the unused rows are removed, processes hold different numbers of completions, and only losses "
                f"normalised by the global token count stay exact (got {cfg.loss_type!r}; use one process for it)"
            )
        for name in ("tools", "rollout_func", "environment_factory"):
            if bound.get(name) is not None:
                raise NotImplementedError(
                    f"VIPGRPOTrainer does not support {name}: it generates single-turn completions for a "
                    "planned subset of rows"
                )
        super().__init__(*args, **kwargs)
        if allocator is None:
            assert cfg.n_max is not None  # VIPGRPOConfig.__post_init__ sets it to num_generations
            allocator = Allocator(
                strategy=cfg.allocation_strategy,
                predictor=cfg.predictor,
                estimator=cfg.variance_estimator,
                n_min=cfg.n_min,
                n_max=cfg.n_max,
                seed=cfg.allocator_seed,
                embedder=cfg.embedder,
                # The trainer binarises rewards with cfg.success_threshold itself and reports 0/1 values.
                success_threshold=0.5,
            )
        elif not isinstance(allocator, Allocator):
            raise ValueError(f"allocator must be a vipalloc.Allocator, got {type(allocator)}")
        if allocator.n_max > self.num_generations:
            raise ValueError(
                f"the allocator's n_max ({allocator.n_max}) exceeds num_generations ({self.num_generations}), the "
                "TRL group width; set VIPGRPOConfig(n_max=...) to at least the allocator's n_max"
            )
        if not 0.0 < allocator.success_threshold <= 1.0:
            raise ValueError(
                f"the allocator's success_threshold ({allocator.success_threshold}) must lie in (0, 1]: the trainer "
                "reports binarised 0/1 rewards (set VIPGRPOConfig.success_threshold for the raw-reward threshold)"
            )
        self.allocator = allocator  # planned and updated on the main process only
        self.vip_last: VIPBatchRecord | None = None
        # Set only while a planned generation batch is generated and scored (None otherwise, e.g. in evaluation):
        # the real rows of this process's slice and of the whole (gathered) generation batch.
        self._vip_real: np.ndarray | None = None
        self._vip_real_global: np.ndarray | None = None
        self._vip_rewards: torch.Tensor | None = None
        self._vip_local_rows: np.ndarray | None = None  # rows of the local slice kept for training (last step)

    @property
    def _vip_world(self) -> int:
        return int(self.accelerator.num_processes)

    # ------------------------------------------------------------------ planning
    def _vip_groups(self, inputs: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
        """Prompt ids and texts of the global rectangular batch (one per group of ``num_generations`` rows)."""
        g = self.num_generations
        col = cast(VIPGRPOConfig, self.args).prompt_id_column
        rows = [(_prompt_key(x, col), x["prompt"]) for x in inputs]
        if self._vip_world > 1:  # groups may span processes: look at the gathered batch in process order
            rows = gather_object(rows)
        if len(rows) % g:
            raise RuntimeError(f"generation batch of {len(rows)} rows is not made of full groups of {g}")
        ids, texts = [], []
        for start in range(0, len(rows), g):
            key = rows[start][0]
            if any(rows[start + k][0] != key for k in range(1, g)):
                raise RuntimeError(
                    "rows of one group belong to different prompts: VIPGRPOTrainer relies on TRL's RepeatSampler "
                    "layout (num_generations consecutive copies of each prompt); do not override the sampler"
                )
            ids.append(key)
            texts.append(_prompt_text(rows[start][1]))
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(
                f"prompt id(s) {dup[:3]} occur twice in one generation batch; give every distinct prompt its own "
                f"value in the {col!r} column (or deduplicate the dataset's prompts)"
            )
        return ids, texts

    def _vip_plan(self, inputs: list[dict[str, Any]]) -> Plan:
        args = cast(VIPGRPOConfig, self.args)
        ids, texts = self._vip_groups(inputs)
        if args.rollout_budget is not None and len(ids) != args.prompts_per_generation:
            raise RuntimeError(f"expected {args.prompts_per_generation} prompts per batch, got {len(ids)}")
        budget = args.rollout_budget or int(round(args.mean_generations * len(ids)))
        if self._vip_world == 1:
            return self.allocator.plan(ids, prompts=texts, budget=budget)
        # One allocator decides for everyone: plan on the main process, send the plan to the others.
        box = [self.allocator.plan(ids, prompts=texts, budget=budget) if self.accelerator.is_main_process else None]
        broadcast_object_list(box, from_process=0)
        return cast(Plan, box[0])  # the main process's plan, now on every process

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        assert self.model is not None  # GRPOTrainer always has a model
        if not self.model.training:  # evaluation keeps TRL's plain rectangular groups
            return super()._generate_and_score_completions(inputs)
        g = self.num_generations
        plan = self._vip_plan(inputs)
        real_global = (np.arange(g)[None, :] < plan.counts[:, None]).reshape(-1)
        rank, n_local = self.accelerator.process_index, len(inputs)
        real = real_global[rank * n_local : (rank + 1) * n_local]  # TRL's process slice of the gathered batch
        self._vip_real, self._vip_real_global, self._vip_rewards = real, real_global, None
        try:
            output = super()._generate_and_score_completions(inputs)
            rewards_per_func = self._vip_rewards
        finally:
            self._vip_real, self._vip_real_global, self._vip_rewards = None, None, None
        if rewards_per_func is None:  # pragma: no cover - TRL always scores through _calculate_rewards
            raise RuntimeError("TRL did not call _calculate_rewards; this TRL version is not supported")
        output = self._vip_keep_rows(output, real)
        self._vip_trim_logs(real_global)
        self._vip_observe(plan, real_global, rewards_per_func)
        return output

    def _vip_keep_rows(self, output: dict[str, Any], real: np.ndarray) -> dict[str, Any]:
        """Remove unused rows from TRL's scored batch: afterwards they cost no forward, backward or normaliser.

        TRL splits the kept rows into ``steps_per_generation`` equal micro-batches. In one process the budget is a
        multiple of it (checked by the config). With several processes the local count varies, so a few unused rows
        stay, fully masked (advantage 0, loss mask 0), to round it up; every process keeps at least one row per
        micro-batch so that all run the same number of forward/backward passes.
        """
        args = cast(VIPGRPOConfig, self.args)
        assert args.steps_per_generation is not None  # set by GRPOConfig.__post_init__
        n, chunks = len(real), int(args.steps_per_generation)
        keep = np.flatnonzero(real)
        inert = np.flatnonzero(~real)[: max(chunks, -(-keep.size // chunks) * chunks) - keep.size]
        rows = np.sort(np.concatenate([keep, inert]))
        self._vip_local_rows = rows
        idx = torch.as_tensor(rows, device=output["completion_mask"].device)
        out: dict[str, Any] = {}
        for key, value in output.items():
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.size(0) == n:
                out[key] = value.index_select(0, idx)
            elif isinstance(value, list) and len(value) == n:
                out[key] = [value[i] for i in rows]
            else:
                out[key] = value
        if inert.size:
            live = torch.as_tensor(real[rows], device=idx.device)
            out["completion_mask"] = out["completion_mask"] * live.unsqueeze(1).to(out["completion_mask"].dtype)
            out["advantages"] = torch.where(live, out["advantages"], torch.zeros_like(out["advantages"]))
        if self.pad_to_multiple_of is None:  # drop left-padding columns that only the removed rows needed
            first = int(out["prompt_mask"].any(dim=0).float().argmax())
            out["prompt_ids"], out["prompt_mask"] = out["prompt_ids"][:, first:], out["prompt_mask"][:, first:]
        loss_mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        tokens = loss_mask.sum().to(output["num_items_in_batch"].dtype)
        out["num_items_in_batch"] = self.accelerator.gather(tokens).sum() if self._vip_world > 1 else tokens
        return out

    # ------------------------------------------------------------------ generation and scoring of real rows only
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        real = self._vip_real
        if real is None or len(prompt_ids) != len(real):
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if (images is not None and any(im is not None for im in images)) or multimodal_fields:
            raise NotImplementedError("VIPGRPOTrainer supports text prompts only")
        keep = np.flatnonzero(real)
        # A process without real rows still generates one throw-away row: sharded models (FSDP, ZeRO-3) gather
        # their weights collectively for generation, so every process must take part.
        todo = keep if keep.size else np.array([0])
        # The rows handed over are no longer groups of num_generations copies: ask for one completion per row.
        completions, logps = super()._generate_single_turn(
            [prompt_ids[i] for i in todo], None, multimodal_fields, 1, has_tool_images
        )
        placeholder = [self.eos_token_ids[0] if self.eos_token_ids else self._tokenizer.eos_token_id]
        full: list[Any] = [placeholder] * len(prompt_ids)  # never sampled; removed after the advantages
        full_logps: list[Any] | None = None if logps is None else [[float("nan")]] * len(prompt_ids)
        for j, i in enumerate(keep):
            full[i] = completions[j]
            if full_logps is not None:
                full_logps[i] = logps[j]
        return full, full_logps

    def _generate(self, prompts: list):
        result = super()._generate(prompts)
        if self._vip_real is not None:
            self._vip_fix_generation_metrics(result[0], result[1], self._vip_real)
        return result

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        # TRL's no-grad passes for old/reference log-probs run inside generation: compute them for real rows only.
        # (Single process only: sharded models need the same number of forward calls on every process.)
        real = self._vip_real
        extra = [v for k, v in kwargs.items() if k not in ("batch_size", "compute_entropy", "compute_aux_loss")]
        if (
            real is None
            or self._vip_world > 1
            or input_ids.size(0) != len(real)
            or real.all()
            or not real.any()
            or args
            or any(v is not None for v in extra)
        ):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        idx = torch.as_tensor(np.flatnonzero(real), device=input_ids.device)
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(
            model, input_ids.index_select(0, idx), attention_mask.index_select(0, idx), logits_to_keep, **kwargs
        )

        def scatter(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            full = t.new_zeros((input_ids.size(0), *t.shape[1:]))
            full[idx] = t
            return full

        return scatter(logps), scatter(entropies), aux

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        real = self._vip_real
        if real is None:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        keep = np.flatnonzero(real)
        # Reward functions see real completions only; unused rows get NaN, which TRL treats as unscorable: excluded
        # from the NaN-aware group mean/std and given advantage 0 (they are removed right after).
        device = self.accelerator.device
        if keep.size:
            with _local_reward_gather(self._vip_world > 1):  # gather the NaN-padded full slice below instead
                scored = super()._calculate_rewards(
                    [inputs[i] for i in keep],
                    [prompts[i] for i in keep],
                    [completions[i] for i in keep],
                    [completion_ids_list[i] for i in keep],
                )
        else:
            scored = torch.zeros((0, len(self.reward_funcs)), device=device)
        local = scored.new_full((len(prompts), scored.shape[1]), float("nan"))
        local[torch.as_tensor(keep, device=scored.device, dtype=torch.long)] = scored
        full = gather(local) if self._vip_world > 1 else local
        self._vip_rewards = full.detach().float().cpu()
        return full

    # ------------------------------------------------------------------ feedback, metrics, logs
    def _vip_observe(self, plan: Plan, real: np.ndarray, rewards_per_func: torch.Tensor) -> None:
        """Report each prompt's real, binarised rewards to the allocator (main process) and log ``vip/*`` metrics."""
        g = self.num_generations
        weights = self.reward_weights.detach().float().cpu().unsqueeze(0)
        scorable = ~torch.isnan(rewards_per_func).all(dim=1).numpy()
        total = (rewards_per_func * weights).nansum(dim=1).double().numpy()  # TRL's weighted reward per row
        thr = float(cast(VIPGRPOConfig, self.args).success_threshold)
        rewards, successes = [], []
        for i, c in enumerate(plan.counts):
            rows = np.arange(i * g, i * g + int(c))
            r = total[rows[scorable[rows]]]  # rows every reward function declined (None) are not observations
            rewards.append(r)
            successes.append((r >= thr).astype(np.float64))
        kept = plan.counts > 0
        if self.accelerator.is_main_process:
            observed = [i for i in range(len(plan.prompt_ids)) if kept[i]]
            self.allocator.observe([plan.prompt_ids[i] for i in observed], [successes[i] for i in observed], plan.step)
        self.vip_last = VIPBatchRecord(
            step=plan.step,
            prompt_ids=list(plan.prompt_ids),
            counts=plan.counts.copy(),
            rewards=rewards,
            successes=successes,
            plan=plan,
            real_rows=real.copy(),
        )
        metrics = self._metrics["train"]
        rates = np.array([s.mean() if s.size else np.nan for s in successes])
        seen = kept & ~np.isnan(rates)
        zero_std = np.array([s.size > 0 and s.min() == s.max() for s in successes])
        metrics["vip/mean_n"].append(float(plan.counts[kept].mean()) if kept.any() else 0.0)
        metrics["vip/max_n"].append(float(plan.counts.max()))
        metrics["vip/frac_dropped"].append(float((~kept).mean()))
        metrics["vip/frac_zero_std"].append(float(zero_std[seen].mean()) if seen.any() else 0.0)
        metrics["vip/pred_abs_err"].append(float(np.abs(plan.p_mean[seen] - rates[seen]).mean()) if seen.any() else 0.0)
        ratio = plan.variance_ratio
        metrics["vip/expected_var_ratio_vs_uniform"].append(float(ratio) if math.isfinite(ratio) else float("nan"))
        metrics["vip/plan_seconds"].append(float(sum(plan.timings.values())))
        # TRL's frac_reward_zero_std counted unused rows; recompute it over generated rows (group-wise std).
        n_real = int(real.sum())
        if self.scale_rewards != "batch" and self.multi_objective_aggregation == "sum_then_normalize" and n_real:
            flat_rows = sum(r.size for r in rewards if r.size > 1 and np.allclose(r, r[0]))
            if metrics["frac_reward_zero_std"]:
                metrics["frac_reward_zero_std"][-1] = flat_rows / n_real

    def _vip_fix_generation_metrics(self, prompt_ids: list, completion_ids: list, real: np.ndarray) -> None:
        """TRL's length metrics and token counter included the placeholders: recompute them over real rows."""
        stop = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        pad_tokens = sum(len(prompt_ids[i]) + len(completion_ids[i]) for i in np.flatnonzero(~real))
        stats = [
            (len(completion_ids[i]), len(completion_ids[i]) > 0 and completion_ids[i][-1] not in stop)
            for i in np.flatnonzero(real)
        ]
        if self._vip_world > 1:  # TRL's metrics are over the gathered batch
            pad_tokens = sum(gather_object([pad_tokens]))
            stats = gather_object(stats)
        self.state.num_input_tokens_seen -= pad_tokens
        metrics = self._metrics["train"]
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        if not stats:  # pragma: no cover - budgets are >= 1
            return
        lengths = np.array([n for n, _ in stats], np.float64)
        truncated = np.array([t for _, t in stats], bool)
        term = lengths[~truncated] if (~truncated).any() else np.zeros(1)
        fixes = {
            "completions/mean_length": lengths.mean(),
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": truncated.mean(),
            "completions/mean_terminated_length": term.mean(),
            "completions/min_terminated_length": term.min(),
            "completions/max_terminated_length": term.max(),
        }
        for key, value in fixes.items():
            if metrics.get(key):
                metrics[key][-1] = float(value)

    def _vip_trim_logs(self, real: np.ndarray) -> None:
        """Drop the unused rows TRL just appended to its completions table (gathered prompt, completion, rewards,
        advantages)."""
        n, keep = len(real), np.flatnonzero(real)

        def trim(buf: deque) -> None:
            if len(buf) < n:
                return
            last = [buf.pop() for _ in range(n)][::-1]
            buf.extend(last[i] for i in keep)

        for key in ("prompt", "completion", "advantages"):
            trim(cast(deque, self._logs[key]))
        for buf in cast("dict[str, deque]", self._logs["rewards"]).values():
            trim(buf)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            self.allocator.save(os.path.join(folder, ALLOCATOR_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and os.path.exists(os.path.join(checkpoint, ALLOCATOR_FILE)):
            self.allocator = Allocator.load(os.path.join(checkpoint, ALLOCATOR_FILE))


@contextlib.contextmanager
def _local_reward_gather(active: bool) -> Iterator[None]:
    """Let ``GRPOTrainer._calculate_rewards`` return this process's rewards without its cross-process gather.

    With several processes each one scores a different number of real rows, and TRL's gather needs equal shapes; the
    caller gathers the NaN-padded slice (equal shapes) itself. Pinned to TRL's module-level ``gather`` (TRL 1.16).
    """
    if not active:
        yield
        return
    original = _grpo_module.gather
    _grpo_module.gather = lambda tensor: tensor
    try:
        yield
    finally:
        _grpo_module.gather = original
