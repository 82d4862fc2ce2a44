"""``VIPGRPOTrainer``: TRL's ``GRPOTrainer`` generating, scoring and training on the planned rows only.

The route and its scope are described in the package docstring (:mod:`vipalloc.integrations.trl`) and in
``docs/trl.md``; the planning of a batch lives in :mod:`~vipalloc.integrations.trl.planning`, the training layout in
:mod:`~vipalloc.integrations.trl.layout`, the logs in :mod:`~vipalloc.integrations.trl.logs` and tool episodes in
:mod:`~vipalloc.integrations.trl.tools`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections import defaultdict, deque
from collections.abc import Iterator, Sized
from typing import Any, cast

import numpy as np
import torch
import trl.trainer.grpo_trainer as _grpo_module
from accelerate.utils import broadcast_object_list, gather, gather_object
from datasets import IterableDataset
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler, repeat_iterable_dataset

from vipalloc import Allocator, Plan
from vipalloc.integrations.trl.config import (
    ALLOCATOR_FILE,
    VIPGRPOConfig,
    _prompt_text,
    default_config,
    step_token_budget,
)
from vipalloc.integrations.trl.environments import (
    ResetTasks,
    cached_resets,
    needs_reset_before_plan,
    reset_before_plan,
)
from vipalloc.integrations.trl.layout import (
    SHIFT_KEY,
    accepts_position_ids,
    install_position_hook,
    training_layout,
)
from vipalloc.integrations.trl.logs import fix_generation_metrics, merge_pilot_logs, spread_extra_logs, trim_logs
from vipalloc.integrations.trl.planning import (
    Layout,
    PilotRound,
    VIPBatchRecord,
    check_allocator,
    check_dataset_rows,
    group_rows,
    two_phase_layout,
)
from vipalloc.integrations.trl.tools import check_tool_setup, environments_of, episode_tokens, fix_tool_metrics
from vipalloc.telemetry import COUNTS_TAG

__all__ = ["VIPGRPOTrainer"]


class VIPGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` that generates ``n_i`` completions for prompt ``i`` as planned by a :class:`Allocator`.

    Takes every ``GRPOTrainer`` argument plus ``allocator`` (optional: built from the config when omitted). Needs a
    :class:`VIPGRPOConfig`. The allocator is saved into each checkpoint (``vip_allocator.json``, before any Hub
    upload) and restored on ``train(resume_from_checkpoint=...)``. ``vip_last`` holds a :class:`VIPBatchRecord`.

    With several processes the main process plans for the global generation batch and broadcasts the plan; group
    statistics use the gathered rewards as in TRL, and every process then trains on the same number of real rows.
    """

    # TRL copies ``args.num_generations`` here; the trainer replaces it by the group width n_max after init.
    num_generations: int

    def __init__(self, *args: Any, allocator: Allocator | None = None, **kwargs: Any) -> None:
        bound = dict(inspect.signature(GRPOTrainer.__init__).bind(self, *args, **kwargs).arguments)
        bound.pop("self")
        cfg = bound.get("args")
        if cfg is None:  # as GRPOTrainer does: a default config named after the model, with VIP's defaults
            cfg = bound["args"] = default_config(bound["model"])
        if not isinstance(cfg, VIPGRPOConfig):
            raise ValueError(
                f"VIPGRPOTrainer needs args=VIPGRPOConfig(...) (it carries the allocation settings), got {type(cfg)}"
            )
        # Checked before GRPOTrainer.__init__ so that nothing heavy (vLLM, models, process groups) starts for nothing.
        if bound.get("rollout_func") is not None:
            raise NotImplementedError(
                "VIPGRPOTrainer does not support rollout_func: the function generates every row of the batch itself "
                "(TRL 1.16's _generate hands it all prompts and skips _generate_single_turn), so the plan's row "
                "selection cannot be applied; use tools=[...] or environment_factory for multi-turn rollouts"
            )
        check_tool_setup(cfg, bound)
        check_dataset_rows(bound)
        # The environment owns the data (TRL trains on placeholder rows): tasks are keyed by reset()'s observation.
        env_owned = bound.get("train_dataset") is None and bound.get("environment_factory") is not None
        assert cfg.n_max is not None  # VIPGRPOConfig.__post_init__ sets it
        allocator = check_allocator(cfg, allocator)
        super().__init__(**bound)
        self._vip_env_owned = env_owned
        # From here on TRL's group width is n_max (the sampler, the advantage view and the logs use it); evaluation
        # keeps TRL's plain groups of num_generations_eval (default: num_generations).
        self.num_generations = int(cfg.n_max)
        names = list(self.reward_func_names)
        if cfg.success_reward is not None and cfg.success_reward not in names:
            raise ValueError(f"success_reward {cfg.success_reward!r} is not a reward function; choose one of {names}")
        self._vip_success_col = None if cfg.success_reward is None else names.index(cfg.success_reward)
        assert self.model is not None  # GRPOTrainer always has a model
        self._vip_positions = accepts_position_ids(self.model)
        if not self._vip_positions and self._vip_world > 1:
            raise NotImplementedError(
                f"with several processes VIPGRPOTrainer moves rows between processes and keeps their token positions "
                f"through position_ids, which {type(self.model).__name__}.forward does not accept; use one process"
            )
        self._vip_shift: torch.Tensor | None = None
        if self._vip_positions:
            self._vip_hook = install_position_hook(self.model, lambda: self._vip_shift)
        self.allocator = allocator  # planned and updated on the main process only
        self.vip_last: VIPBatchRecord | None = None
        # Set only while a planned generation batch is generated and scored (None otherwise, e.g. in evaluation):
        # the real rows of this process's slice.
        self._vip_real: np.ndarray | None = None
        self._vip_rewards: torch.Tensor | None = None
        self._vip_pilot: PilotRound | None = None  # a two-phase step's pilot rows, while TRL generates the step
        self._vip_local_rows: np.ndarray | None = None  # global rows this process trains on (last step), -1-i inert
        self._vip_in_tool_loop = False  # True while TRL's _tool_call_loop generates later turns of the episodes
        self._vip_tool_calls = 0  # tool calls of this process's episodes in the current generation
        self._vip_lengths: np.ndarray | None = None  # int64 (L,): generated tokens per local row's episode
        self._vip_batch_lengths = np.zeros(0, np.int64)  # the same for the gathered batch, (world * L,)
        # TRL sized its completion-log deques for generation_batch_size (the budget); they receive the sampled rows.
        rows = cfg.prompts_per_generation * self.num_generations
        self._logs = {
            "images": deque(maxlen=rows),
            "prompt": deque(maxlen=rows),
            "completion": deque(maxlen=rows),
            "rewards": defaultdict(lambda: deque(maxlen=rows)),
            "advantages": deque(maxlen=rows),
            "extra": defaultdict(lambda: deque(maxlen=rows)),
        }

    @property
    def _vip_world(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def _vip_tp(self) -> int:
        """vLLM tensor-parallel group size in colocate mode (1 without vLLM)."""
        args = cast(VIPGRPOConfig, self.args)
        return int(args.vllm_tensor_parallel_size) if self.use_vllm else 1

    # ------------------------------------------------------------------ sampling: each prompt n_max times
    def _get_train_sampler(self, dataset: Any = None) -> Any:
        args = cast(VIPGRPOConfig, self.args)
        assert args.steps_per_generation is not None
        source = self.train_dataset if dataset is None else dataset
        assert source is not None  # training needs a dataset (environments, which own the data, are refused)
        return RepeatSampler(
            data_source=cast(Sized, source),  # a map-style dataset (iterable ones take the dataloader path)
            mini_repeat_count=self.num_generations,
            batch_size=args.prompts_per_generation,
            repeat_count=self.num_iterations * args.steps_per_generation,
            shuffle=bool(self.shuffle_dataset),
            seed=args.seed,
        )

    def get_train_dataloader(self) -> Any:
        # TRL's method with the batch counted in sampled rows (prompts x n_max per generation batch), not budget rows.
        args = cast(VIPGRPOConfig, self.args)
        assert args.steps_per_generation is not None
        dataset = self.train_dataset
        assert dataset is not None  # training needs a dataset (environments, which own the data, are refused)
        if isinstance(dataset, IterableDataset):
            if self.shuffle_dataset:
                dataset = dataset.shuffle(seed=args.seed)
            dataset = repeat_iterable_dataset(
                dataset,
                mini_repeat_count=self.num_generations,
                batch_size=args.prompts_per_generation,
                repeat_count=self.num_iterations * args.steps_per_generation,
            )
        return self._get_dataloader(
            dataset=dataset,
            description="Training",
            batch_size=args.sampled_rows_per_process,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    # ------------------------------------------------------------------ planning
    def _vip_groups(
        self, inputs: list[dict[str, Any]], tasks: ResetTasks | None = None
    ) -> tuple[list[str], list[str], np.ndarray, int]:
        """Distinct prompt ids and texts of the global rectangular batch, the prompt of each block, the budget."""
        return group_rows(self, inputs, tasks)

    def _vip_on_main(self, make: Any) -> Any:
        """``make()`` on the main process (the one allocator that decides), its result sent to every process."""
        if self._vip_world == 1:
            return make()
        box = [make() if self.accelerator.is_main_process else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _vip_place(self, counts: np.ndarray, group_prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First block of each prompt and the real rows: the first ``counts[i]`` rows of prompt i's first block."""
        m, g = len(counts), self.num_generations
        first_block = np.array([int(np.flatnonzero(group_prompt == i)[0]) for i in range(m)], np.int64)
        per_block = np.zeros(len(group_prompt), np.int64)
        per_block[first_block] = counts
        return first_block, (np.arange(g)[None, :] < per_block[:, None]).reshape(-1)

    def _vip_layout(self, inputs: list[dict[str, Any]], tasks: ResetTasks | None = None) -> Layout:
        """Plan for the global rectangular batch (main process) and place each prompt's real rows; ``tasks``: the
        rows' environments were reset before the plan and key the rows (:func:`reset_before_plan`)."""
        ids, texts, gp, budget = self._vip_groups(inputs, tasks)
        plan = cast(Plan, self._vip_on_main(lambda: self._vip_plan(ids, texts, budget)))
        first_block, real_global = self._vip_place(plan.counts, gp)
        return Layout(plan=plan, group_prompt=gp, first_block=first_block, real_global=real_global)

    def _vip_plan(self, ids: list[str], texts: list[str], budget: int) -> Plan:
        """The allocator's plan for one generation batch: by rollouts (``budget``), or in token mode under the
        step's token budget with ``budget`` as the rollout cap (the layout has room for ``budget`` real rows)."""
        tokens, lengths = self._vip_token_budget(ids, texts, budget)
        if tokens is None:
            return self.allocator.plan(ids, prompts=texts, budget=budget)
        return self.allocator.plan(ids, prompts=texts, budget=budget, token_budget=tokens, expected_lengths=lengths)

    def _vip_token_budget(
        self, ids: list[str], texts: list[str], budget: int
    ) -> tuple[float | None, np.ndarray | None]:
        """This step's token budget and expected lengths (:func:`step_token_budget`; None, None: by rollouts)."""
        args = cast(VIPGRPOConfig, self.args)
        # a two-phase step pilots every prompt pilot_n times: a cap is raised to at least that pilot's tokens
        least = max(int(args.pilot_n), self.allocator.n_min) if args.two_phase else None
        return step_token_budget(
            args.token_budget, args.max_completion_length, self.allocator, ids, texts, budget, least=least
        )

    def _vip_pilot_plan(self, ids: list[str], texts: list[str], budget: int) -> Plan:
        """The pilot of a two-phase step (main process): by rollouts (``budget``, the whole step's), or in token
        mode under the step's token budget with ``budget`` as the rollout cap. The pilot's predicted tokens must fit
        the token budget; the tokens it actually spends (the lengths given to ``observe``) come off it before the
        commit."""
        args = cast(VIPGRPOConfig, self.args)
        tokens, lengths = self._vip_token_budget(ids, texts, budget)
        pilot_n = int(args.pilot_n)
        if tokens is None:
            return self.allocator.plan_pilot(ids, prompts=texts, budget=budget, pilot_n=pilot_n)
        return self.allocator.plan_pilot(
            ids, prompts=texts, budget=budget, pilot_n=pilot_n, token_budget=tokens, expected_lengths=lengths
        )

    def _vip_two_phase_layout(self, inputs: list[dict[str, Any]]) -> Layout:
        """A two-phase step's layout (:func:`~vipalloc.integrations.trl.planning.two_phase_layout`)."""
        return two_phase_layout(self, inputs)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        assert self.model is not None  # GRPOTrainer always has a model
        if not self.model.training:  # evaluation keeps TRL's plain rectangular groups
            return super()._generate_and_score_completions(inputs)
        args = cast(VIPGRPOConfig, self.args)
        tasks = None  # two-phase steps have no environments (refused at construction)
        if not args.two_phase and needs_reset_before_plan(self, inputs, args.prompt_id_column):
            tasks = reset_before_plan(self, inputs, _prompt_text)
        layout = self._vip_two_phase_layout(inputs) if args.two_phase else self._vip_layout(inputs, tasks)
        rank, n_local = self.accelerator.process_index, len(inputs)
        real = layout.real_global[rank * n_local : (rank + 1) * n_local]  # TRL's process slice of the gathered batch
        self._vip_real, self._vip_rewards, self._vip_lengths = real, None, None
        try:
            with cached_resets(tasks):  # TRL's reset of each row's environment returns the planned task
                output = super()._generate_and_score_completions(inputs)
            rewards_per_func = self._vip_rewards
            self._vip_batch_lengths = self._vip_gather_lengths(n_local)
        finally:
            self._vip_real, self._vip_rewards, self._vip_pilot = None, None, None
        if rewards_per_func is None:  # pragma: no cover - TRL always scores through _calculate_rewards
            raise RuntimeError("TRL did not call _calculate_rewards; this TRL version is not supported")
        assert args.steps_per_generation is not None
        output, self._vip_local_rows = training_layout(
            output,
            layout.train_rows(self.num_generations),
            rank=rank,
            world=self._vip_world,
            chunks=int(args.steps_per_generation),
            pad_token_id=int(self._tokenizer.pad_token_id),
            trim=self._vip_positions and self.pad_to_multiple_of is None,
            gather=self.accelerator.gather,
            sequence_level_ratio=self.use_vllm and "sequence" in str(self.vllm_importance_sampling_mode),
        )
        if not self._vip_positions:
            output.pop(SHIFT_KEY)
        trim_logs(self._logs, layout.real_global)
        self._vip_observe(layout, rewards_per_func)
        return output

    def _vip_gather_lengths(self, n_local: int) -> np.ndarray:
        """Generated tokens per episode for every row of the gathered batch, int64 ``(world * L,)`` (0: unused)."""
        local = self._vip_lengths if self._vip_lengths is not None else np.zeros(n_local, np.int64)
        if self._vip_world == 1:
            return local
        t = torch.as_tensor(local, device=self.accelerator.device, dtype=torch.long)
        return self.accelerator.gather(t).cpu().numpy().astype(np.int64)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Training rows carry the position shift of their log-prob passes; the forward hook applies it. The dict is
        # copied, not popped: with num_iterations > 1 TRL feeds the same buffered micro-batch again.
        shift = inputs.get(SHIFT_KEY)
        inputs = {k: v for k, v in inputs.items() if k != SHIFT_KEY}
        self._vip_shift = shift if shift is not None and bool((shift != 0).any()) else None
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._vip_shift = None

    # ------------------------------------------------------------------ generation and scoring of real rows only
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        real = self._vip_real
        # TRL's tool loop generates the later turns of the episodes already started (rows that called a tool).
        if real is None or self._vip_in_tool_loop or len(prompt_ids) != len(real):
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if (images is not None and any(im is not None for im in images)) or multimodal_fields:
            raise NotImplementedError("VIPGRPOTrainer supports text prompts only")
        pilot = self._vip_pilot
        keep = np.flatnonzero(real if pilot is None else real & ~pilot.real)  # pilot rows are generated already
        # A process without rows to generate still generates one throw-away row: sharded models (FSDP, ZeRO-3)
        # gather their weights collectively for generation, so every process must take part.
        todo = list(keep) if keep.size else [0]
        if self._vip_world > 1 and self.use_vllm and (self._vip_tp > 1 or self.vllm_mode == "server"):
            # TRL's vLLM server mode (and colocate mode with tensor parallelism) generates for the gathered prompts
            # and hands each process an equal slice: pad every process to the largest count with throw-away copies.
            most = max(gather_object([len(todo)]))
            todo += [todo[0]] * (most - len(todo))
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
        if pilot is not None:
            for i in np.flatnonzero(pilot.real):
                full[i] = pilot.completion_ids[i]
                if full_logps is not None and pilot.logps is not None:
                    full_logps[i] = pilot.logps[i]
        return full, full_logps

    def _generate(self, prompts: list):
        self._vip_tool_calls = 0
        result = super()._generate(prompts)
        real = self._vip_real
        if real is not None:
            prompt_ids, completion_ids, tool_mask = result[0], result[1], result[2]
            fix_generation_metrics(self, prompt_ids, completion_ids, real, tool_mask)
            self._vip_lengths = np.where(real, episode_tokens(completion_ids, tool_mask), 0)
            if self.tools:
                fix_tool_metrics(self, self._vip_tool_calls, real)
        return result

    def _tool_call_loop(self, prompts, prompt_ids, completion_ids, completions, logprobs, images, multimodal_fields):
        # Later turns of the planned episodes: generated by TRL as is (one completion per row that called a tool);
        # unused rows hold a placeholder that calls no tool, so they never enter the loop.
        self._vip_in_tool_loop = True
        try:
            result = super()._tool_call_loop(
                prompts, prompt_ids, completion_ids, completions, logprobs, images, multimodal_fields
            )
        finally:
            self._vip_in_tool_loop = False
        self._vip_tool_calls = int(result[4])
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
        pilot = self._vip_pilot
        keep = np.flatnonzero(real if pilot is None else real & ~pilot.real)  # pilot rows are scored already
        # Reward functions see real completions only; unused rows get NaN, which TRL treats as unscorable: excluded
        # from the NaN-aware group mean/std and given advantage 0 (they are removed right after).
        throwaway = keep.size == 0 and self._vip_world > 1
        # A process without real rows still calls every reward function once, on a throw-away row: reward models
        # sharded with ZeRO-3 gather their weights collectively in the forward. Its logs are rolled back.
        todo = np.array([0]) if throwaway else keep
        before = {k: len(v) for k, v in self._pending_extra_logs.items()}
        metrics_before = {k: len(v) for k, v in self._pending_metrics.items()}
        if todo.size:
            # gather the NaN-padded full slice below instead; reward functions see the scored rows' environments
            with _local_reward_gather(self._vip_world > 1), environments_of(self, todo):
                scored = super()._calculate_rewards(
                    [inputs[i] for i in todo],
                    [prompts[i] for i in todo],
                    [completions[i] for i in todo],
                    [completion_ids_list[i] for i in todo],
                )
        else:
            scored = torch.zeros((0, len(self.reward_funcs)), device=self.accelerator.device)
        pending, pending_metrics = self._pending_extra_logs, self._pending_metrics
        spread_extra_logs(pending, pending_metrics, before, metrics_before, keep, len(prompts), throwaway)
        if throwaway:
            scored = scored[:0]
        local = scored.new_full((len(prompts), scored.shape[1]), float("nan"))
        local[torch.as_tensor(keep, device=scored.device, dtype=torch.long)] = scored
        if pilot is not None:
            rows = torch.as_tensor(np.flatnonzero(pilot.real), device=scored.device, dtype=torch.long)
            local[rows] = pilot.rewards.to(local.device)[rows]
            merge_pilot_logs(self._pending_extra_logs, pilot.real, pilot.extra_logs, len(prompts))
        full = gather(local) if self._vip_world > 1 else local
        self._vip_rewards = full.detach().float().cpu()
        return full

    def _vip_success_rewards(self, rewards_per_func: torch.Tensor) -> np.ndarray:
        """Per row of the gathered batch, the reward that decides success (NaN: none), float64 ``(rows,)``."""
        if self._vip_success_col is None:  # TRL's weighted reward per row; rows all reward functions declined: NaN
            weights = self.reward_weights.detach().float().cpu().unsqueeze(0)
            scorable = ~torch.isnan(rewards_per_func).all(dim=1).numpy()
            total = (rewards_per_func * weights).nansum(dim=1).double().numpy()
            total[~scorable] = np.nan
            return total
        # one named reward function defines success (e.g. accuracy, not format)
        return rewards_per_func[:, self._vip_success_col].double().numpy()

    # ------------------------------------------------------------------ feedback, metrics, logs
    def _vip_observe(self, layout: Layout, rewards_per_func: torch.Tensor) -> None:
        """Report each prompt's real, binarised rewards to the allocator (main process) and log ``vip/*`` metrics.

        ``self._vip_batch_lengths``: int64 ``(rows,)`` of the gathered batch, tokens the policy generated in each
        row's episode; kept per prompt in ``vip_last.lengths``, aligned with its rewards.
        """
        lengths = self._vip_batch_lengths
        plan, real = layout.plan, layout.real_global
        g = self.num_generations
        args = cast(VIPGRPOConfig, self.args)
        total = self._vip_success_rewards(rewards_per_func)
        thr = float(args.success_threshold)
        before = np.zeros(len(plan.counts), np.int64) if layout.observed is None else layout.observed
        rewards, successes, new_ids, new_succ, new_lens, tokens = [], [], [], [], [], []
        for i, c in enumerate(plan.counts):
            start = int(layout.first_block[i]) * g
            r = total[start : start + int(c)]
            ln = lengths[start : start + int(c)]
            fresh, fresh_ln = r[int(before[i]) :], ln[int(before[i]) :]  # a two-phase pilot was observed before
            tokens.append(ln[~np.isnan(r)])
            fresh_ln = fresh_ln[~np.isnan(fresh)]
            r, fresh = r[~np.isnan(r)], fresh[~np.isnan(fresh)]  # rows without a success reward are no observations
            rewards.append(r)
            successes.append((r >= thr).astype(np.float64))
            if c > before[i]:
                new_ids.append(plan.prompt_ids[i])
                new_succ.append((fresh >= thr).astype(np.float64))
                new_lens.append(fresh_ln)
        if self.accelerator.is_main_process and new_ids:
            self.allocator.observe(new_ids, new_succ, plan.step, lengths=new_lens)
        self.vip_last = VIPBatchRecord(
            step=plan.step,
            prompt_ids=list(plan.prompt_ids),
            counts=plan.counts.copy(),
            rewards=rewards,
            successes=successes,
            plan=plan,
            real_rows=real.copy(),
            lengths=tokens,
        )
        metrics = self._metrics["train"]
        outcome = self.allocator.outcome_metrics(successes, plan, lengths=tokens, max_length=args.max_completion_length)
        values = {**plan.metrics(), **outcome}
        for key, value in values.items():
            metrics[key].append(float(value))
        self._vip_log_histogram(plan)
        # TRL's frac_reward_zero_std counted unused rows; recompute it over generated rows (group-wise std).
        n_real = int(real.sum())
        if self.scale_rewards != "batch" and self.multi_objective_aggregation == "sum_then_normalize" and n_real:
            weights = self.reward_weights.detach().float().cpu().unsqueeze(0)
            weighted = (rewards_per_func * weights).nansum(dim=1).double().numpy()
            flat_rows = 0
            for i, c in enumerate(plan.counts):
                start = int(layout.first_block[i]) * g
                r = weighted[start : start + int(c)]
                flat_rows += r.size if r.size > 1 and np.allclose(r, r[0]) else 0
            if metrics["frac_reward_zero_std"]:
                metrics["frac_reward_zero_std"][-1] = flat_rows / n_real

    def _vip_log_histogram(self, plan: Plan) -> None:
        """Counts histogram under ``vip/counts`` through the TensorBoard writer of a reporting callback, if any."""
        if not self.accelerator.is_main_process:
            return
        for callback in self.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None and hasattr(writer, "add_histogram"):
                writer.add_histogram(COUNTS_TAG, np.asarray(plan.counts), global_step=self.state.global_step)

    # ------------------------------------------------------------------ checkpoints
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Trainer._save_checkpoint calls save_model first and uploads the folder last (push_to_hub), so the
        # allocator saved here is part of every checkpoint and of its upload.
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            folder = output_dir if output_dir is not None else self.args.output_dir
            assert folder is not None  # TrainingArguments always has an output_dir
            self.allocator.save(os.path.join(folder, ALLOCATOR_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, ALLOCATOR_FILE)
        if os.path.exists(path):
            self.allocator = Allocator.load(path)
        else:
            warnings.warn(
                f"resuming from {checkpoint}, which has no {ALLOCATOR_FILE}: the allocator starts fresh (no history, "
                "untrained predictor); copy the file from the run that wrote the checkpoint to keep its state",
                RuntimeWarning,
                stacklevel=2,
            )


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
