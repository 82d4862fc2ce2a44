"""VIP in TRL 1.16's asynchronous GRPO (``trl.experimental.async_grpo``): a rollout loop that plans as it dispatches.

Seam. ``AsyncRolloutWorker`` spawns ``AsyncRolloutWorker._loop_cls`` (a class attribute, ``_AsyncRolloutLoop`` by
default) in a child process; the loop pulls ``(group_id, row)`` pairs from ``_repeat_iterator`` whenever an inflight
slot frees up, rolls each row out (``_generate_one``: one whole, possibly multi-turn, conversation), and scores a
group (``_score_group``) once ``num_generations`` of its rows are back. :class:`VIPRolloutLoop` overrides exactly
those three methods, so nothing of TRL's loop is copied:

* ``_repeat_iterator`` takes the next chunk of prompts, plans it with the allocator's *latest* posterior
  (``Allocator.plan(..., step=chunk)``) and yields ``n_i`` real rows of prompt ``i`` followed by
  ``n_max - n_i`` skip rows (a group is closed by TRL after ``num_generations = n_max`` rows); dropped prompts yield
  nothing. The iterator is lazy, so chunk ``k + 1`` is planned only when the loop needs its first row, after the
  outcomes that arrived meanwhile were observed.
* ``_generate_one`` returns a skip row at once (no server request, no tokens, no training row).
* ``_score_group`` removes the skip rows, lets TRL score the ``n_i`` real conversations (its advantages are then
  those of a group of ``n_i``), and observes their binarised rewards at the chunk's step as they arrive, out of
  order, recording the policy version at dispatch and at arrival.

Budget: a chunk is one optimizer step's worth of rollouts: ``samples_per_step / num_generations`` prompts with a
budget of ``num_generations`` rollouts per prompt (``samples_per_step = per_device_train_batch_size x
gradient_accumulation_steps x processes``, the samples TRL trains on per optimizer step). Token mode
(``token_budget="uniform"`` or a cap in tokens, as ``VIPGRPOConfig.token_budget``) plans each chunk under a token
budget with that rollout budget as a cap; every group's generated tokens (``GroupRecord.tokens``) go to
``Allocator.observe(lengths=...)``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from trl.experimental.async_grpo.async_rollout_worker import AsyncRolloutWorker, RolloutGroup, _AsyncRolloutLoop

from vipalloc import Allocator, Plan
from vipalloc.integrations.trl.config import (  # the plug-in's prompt id rule and token mode
    _prompt_key,
    _prompt_text,
    bounds_message,
    normalise_token_budget,
    step_token_budget,
)

SKIP_KEY = "vip_skip"  # set on the last message of a skip row's prompt (TRL keeps extra keys when it rebuilds it)


def mark_skip(prompt: Any) -> list[dict[str, Any]]:
    """A copy of a conversational ``prompt`` whose last message carries the skip marker."""
    if not (isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict)):
        raise TypeError(f"AsyncGRPO rows need conversational prompts (a list of messages), got {type(prompt)}")
    return [*prompt[:-1], {**prompt[-1], SKIP_KEY: True}]


def is_skip(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[-1], dict) and bool(prompt[-1].get(SKIP_KEY))


@dataclass
class ChunkRecord:
    """One planned chunk (allocator step): its plan, the policy version at planning, what came back so far."""

    step: int
    plan: Plan
    model_version: int
    observed_before: int  # groups observed (any chunk) when this chunk was planned: the posterior it used
    returned: dict[str, int] = field(default_factory=dict)  # prompt id -> real rollouts observed


@dataclass
class GroupRecord:
    """One observed group. ``tokens``: int64 ``(n,)`` tokens the policy generated per episode (tool output and
    prompt excluded)."""

    step: int
    prompt_id: str
    planned: int
    rewards: np.ndarray  # float64 (n,): TRL's summed reward per conversation (NaN: unscorable)
    successes: np.ndarray  # float64 (scorable,): binarised, as observed
    tokens: np.ndarray
    version_dispatched: int
    version_observed: int
    order: int  # arrival rank among observed groups


class VIPRolloutLoop(_AsyncRolloutLoop):
    """``_AsyncRolloutLoop`` whose groups have the allocator's per-prompt sizes (see the module docstring).

    Extra keyword arguments: ``vip_allocator`` (an :class:`Allocator`, planned and updated in this process),
    ``vip_mean_n`` (rollouts per prompt on average: the budget), ``vip_chunk_prompts`` (prompts per chunk),
    ``vip_success_threshold`` (reward ``>=`` this is a success), ``vip_prompt_id_column``, ``vip_state_path``
    (where the allocator is saved after every fully observed chunk; ``None``: not saved), ``vip_token_budget``
    (None, ``"uniform"`` or a cap in tokens per chunk; ``max_tokens`` bounds a rollout before lengths are known),
    ``vip_skipped_path`` (a text file to which the stream positions that form no group are appended, one a line:
    dropped prompts and a prompt's repeat inside one chunk; ``None``: not written). ``num_generations`` must be the
    allocator's ``n_max``.

    Group ids are stream positions: group ``k`` is the ``k``-th row the loop took from the dataset since it started
    (TRL's ``dataset_start_index`` is position 0), so TRL's checkpoint arithmetic (``prompt_index = start + first
    untrained group``) holds once the positions without a group are known (:func:`resume_position`). Chunks are
    planned at the allocator's next step (one past the last planned or observed), so a resumed allocator continues
    its step numbering.
    """

    def __init__(
        self,
        *,
        vip_allocator: Allocator,
        vip_mean_n: int,
        vip_chunk_prompts: int,
        vip_success_threshold: float = 0.5,
        vip_prompt_id_column: str = "prompt_id",
        vip_state_path: str | None = None,
        vip_token_budget: float | str | None = None,
        vip_skipped_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if int(self.num_generations) != int(vip_allocator.n_max):
            raise ValueError(
                f"the loop's group width num_generations={self.num_generations} must be the allocator's n_max "
                f"({vip_allocator.n_max})"
            )
        self.allocator = vip_allocator
        self.vip_mean_n = int(vip_mean_n)
        self.vip_chunk_prompts = max(1, int(vip_chunk_prompts))
        self.vip_threshold = float(vip_success_threshold)
        self.vip_column = vip_prompt_id_column
        self.vip_state_path = vip_state_path
        self.vip_token_budget = normalise_token_budget(vip_token_budget)
        self.vip_chunks: dict[int, ChunkRecord] = {}
        self.vip_log: list[GroupRecord] = []
        self._vip_groups: dict[int, tuple[int, str, int, int]] = {}  # group id -> (step, prompt id, n, version)
        self.vip_skipped_path = vip_skipped_path
        self._vip_rows = self._cycle()

    def _cycle(self) -> Iterator[dict[str, Any]]:
        while True:  # TRL's order: the dataset iterator (resumable at dataset_start_index), then whole passes
            yield from self._dataset_iter
            self._dataset_iter = iter(self.dataset)

    def _vip_key(self, row: dict[str, Any]) -> str:
        return _prompt_key(row, self.vip_column)

    def _repeat_iterator(self) -> Iterator[tuple[int, dict[str, Any]]]:
        position = 0  # stream position of the next row taken from the dataset: the group id of its group
        while True:
            rows: list[dict[str, Any]] = []
            ids: list[str] = []
            positions: list[int] = []
            skipped: list[int] = []
            for _ in range(8 * self.vip_chunk_prompts):  # a prompt sampled twice in a chunk is planned once
                row = next(self._vip_rows)
                key = self._vip_key(row)
                if key in ids:
                    skipped.append(position)
                else:
                    rows.append(row)
                    ids.append(key)
                    positions.append(position)
                position += 1
                if len(ids) == self.vip_chunk_prompts:
                    break
            budget = min(self.vip_mean_n * len(ids), int(self.allocator.n_max) * len(ids))
            texts = [_prompt_text(r.get("prompt", "")) for r in rows]
            tokens, lengths = step_token_budget(
                self.vip_token_budget, self.max_tokens, self.allocator, ids, texts, budget
            )
            if tokens is None:  # step: one past the allocator's last (a resumed allocator continues its numbering)
                plan = self.allocator.plan(ids, prompts=texts, budget=budget)
            else:
                plan = self.allocator.plan(
                    ids, prompts=texts, budget=budget, token_budget=tokens, expected_lengths=lengths
                )
            step = plan.step
            self._push_metrics(plan.metrics())  # vip/* plan metrics (vip/tokens_planned, vip/token_budget, ...)
            self.vip_chunks[step] = ChunkRecord(step, plan, self.model_version, len(self.vip_log))
            skipped += [pos for pos, n in zip(positions, plan.counts) if n <= 0]  # dropped: no group at all
            self._vip_record_skipped(skipped)
            for row, pid, n, group_id in zip(rows, ids, plan.counts, positions):
                if n <= 0:
                    continue
                self._vip_groups[group_id] = (step, pid, int(n), self.model_version)
                # a row without a prompt (its environment's reset() supplies it) gets TRL's empty placeholder, marked
                skip = {**row, "prompt": mark_skip(row.get("prompt", [{"role": "user", "content": ""}]))}
                for j in range(int(self.num_generations)):
                    yield group_id, (row if j < n else skip)

    def _vip_record_skipped(self, positions: list[int]) -> None:
        """Append stream positions that form no group to ``vip_skipped_path`` (read at checkpoints by the trainer)."""
        if not positions or not self.vip_skipped_path:
            return
        with open(self.vip_skipped_path, "a") as f:
            f.write("".join(f"{p}\n" for p in sorted(positions)))
            f.flush()

    async def _generate_one(self, prompt: Any, tool_dict: Any, tools: Any, group_id: int = 0) -> Any:
        if is_skip(prompt):  # a row beyond the prompt's planned count: nothing generated, nothing trained
            return [], [], [], 0, 0, None
        return await super()._generate_one(prompt, tool_dict=tool_dict, tools=tools, group_id=group_id)

    async def _score_group(self, group: RolloutGroup) -> list[Any]:
        keep = [i for i, p in enumerate(group.prompts) if not is_skip(p)]

        def pick(values: list[Any]) -> list[Any]:
            return [values[i] for i in keep] if len(values) == len(group.prompts) else list(values)

        real = RolloutGroup(
            prompts=pick(group.prompts),
            reward_kwargs={k: pick(v) for k, v in group.reward_kwargs.items()},
            completions=pick(group.completions),
            completions_ids=pick(group.completions_ids),
            completions_sequences=pick(group.completions_sequences),
            tool_call_counts=pick(group.tool_call_counts),
            tool_failure_counts=pick(group.tool_failure_counts),
            model_version=group.model_version,
            group_id=group.group_id,
            env_rewards=pick(group.env_rewards),
            rollout_rewards=pick(group.rollout_rewards),
            queued_at=group.queued_at,
        )
        samples = await super()._score_group(real)
        self._vip_observe(real, samples)
        return samples

    def _vip_observe(self, group: RolloutGroup, samples: list[Any]) -> None:
        """Observe a group's binarised rewards at its chunk's step (any arrival order), record it, push metrics."""
        step, pid, planned, version = self._vip_groups.pop(group.group_id)
        rewards = np.full(len(group.completions), np.nan)
        offset = 0
        for i, seqs in enumerate(group.completions_sequences):  # samples: each conversation's rows, in order
            if seqs:
                rewards[i] = float(samples[offset].metrics["reward"])
            offset += len(seqs)
        scorable = rewards[~np.isnan(rewards)]
        successes = (scorable >= self.vip_threshold).astype(np.float64)
        tokens = np.array([len(ids) for ids in group.completions_ids], np.int64)
        # the scorable episodes' generated tokens feed the length model (token budgets plan with it)
        self.allocator.observe([pid], [successes], step, lengths=[tokens[~np.isnan(rewards)]])
        now = self.model_version
        self.vip_log.append(
            GroupRecord(step, pid, planned, rewards, successes, tokens, version, now, len(self.vip_log))
        )
        chunk = self.vip_chunks[step]
        chunk.returned[pid] = int(successes.size)
        kept = int(np.count_nonzero(chunk.plan.counts))
        if len(chunk.returned) == kept:  # the whole chunk is back: persist the allocator, forget the chunk's plan
            if self.vip_state_path:
                self.allocator.save(self.vip_state_path)
            self.vip_chunks.pop(step)
        self._push_metrics(
            {
                "vip/group_size": float(len(group.completions)),
                "vip/group_tokens": float(tokens.sum()),
                "vip/group_frac_truncated": float(np.mean(tokens >= int(self.max_tokens))) if tokens.size else 0.0,
                "vip/observe_staleness": float(now - version),
                "vip/group_success_rate": float(successes.mean()) if successes.size else math.nan,
                "vip/observed_at": time.time(),
            }
        )


class VIPAsyncRolloutWorker(AsyncRolloutWorker):
    """``AsyncRolloutWorker`` that runs :class:`VIPRolloutLoop` in its child process.

    Takes ``AsyncRolloutWorker``'s keyword arguments (as ``AsyncGRPOTrainer`` builds them) plus ``allocator``,
    ``chunk_prompts``, ``success_threshold``, ``prompt_id_column``, ``state_path``, ``token_budget`` and
    ``skipped_path`` (the loop's ``vip_*`` arguments).
    ``num_generations`` (the trainer's ``args.num_generations``) becomes the budget per prompt; the group width sent
    to the loop is the allocator's ``n_max``. The allocator is pickled into the child (``AsyncRolloutWorker.start``
    checks it).
    """

    _loop_cls = VIPRolloutLoop

    def __init__(
        self,
        *,
        allocator: Allocator,
        chunk_prompts: int,
        success_threshold: float = 0.5,
        prompt_id_column: str = "prompt_id",
        state_path: str | None = None,
        token_budget: float | str | None = None,
        skipped_path: str | None = None,
        num_generations: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_generations=int(allocator.n_max),
            vip_token_budget=token_budget,
            vip_skipped_path=skipped_path,
            vip_allocator=allocator,
            vip_mean_n=int(num_generations),
            vip_chunk_prompts=int(chunk_prompts),
            vip_success_threshold=float(success_threshold),
            vip_prompt_id_column=prompt_id_column,
            vip_state_path=state_path,
            **kwargs,
        )


def resume_position(trained: Any, skipped_path: str | None) -> int:
    """The first stream position a resumed run must serve again: the smallest position that is neither a trained
    group (``trained``: TRL's ``_trained_groups``, group ids = positions) nor a position without a group (listed in
    ``skipped_path`` by the loop: dropped prompts, a prompt's repeat inside a chunk)."""
    skipped: set[int] = set()
    if skipped_path and os.path.exists(skipped_path):
        with open(skipped_path) as f:
            skipped = {int(line) for line in f if line.strip()}
    done = set(trained) | skipped
    return next(k for k in itertools.count() if k not in done)


def build_async_trainer_class() -> type:
    """``VIPAsyncGRPOTrainer``: TRL's ``AsyncGRPOTrainer`` with :class:`VIPAsyncRolloutWorker` as its worker.

    Built on first use (``vipalloc.integrations.trl.VIPAsyncGRPOTrainer``) so that importing the TRL plug-in does not
    import TRL's experimental package.
    """
    import contextlib
    import functools
    import shutil

    import trl.experimental.async_grpo.async_grpo_trainer as trainer_module
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer

    from vipalloc.strategies import TWO_PHASE_STRATEGIES

    state_file = "vip_allocator.json"
    skipped_file = "vip_skipped_positions.txt"

    class VIPAsyncGRPOTrainer(AsyncGRPOTrainer):
        """``AsyncGRPOTrainer`` whose rollout worker gives prompt ``i`` the allocator's ``n_i`` rollouts.

        Same arguments as ``AsyncGRPOTrainer`` plus ``allocator`` (default: ``vip`` with the ``gp`` predictor,
        ``n_min=2``, ``n_max=2 x num_generations``), ``success_threshold``, ``prompt_id_column`` and
        ``rollout_token_budget`` (None, ``"uniform"`` or a cap in generated tokens per chunk, as
        ``VIPGRPOConfig.token_budget``). ``AsyncGRPOConfig.token_budget`` is TRL's, a different quantity (tokens per
        packed training row); the keyword ``token_budget=`` is still accepted for ``rollout_token_budget`` with a
        ``FutureWarning``.
        ``args.num_generations`` is the uniform group size replaced (the budget per prompt). Refused before anything
        starts: a custom ``rollout_worker`` (VIP is the worker), no ``train_dataset`` (the environment would choose
        the task after the plan), two-phase strategies, ``max_steps <= 0`` (TRL's epoch stop counts one group per
        prompt, and dropped prompts have none).
        """

        def __init__(
            self,
            model: str,
            reward_funcs: Any = None,
            args: Any = None,
            train_dataset: Any = None,
            *rest: Any,
            allocator: Allocator | None = None,
            success_threshold: float = 0.5,
            prompt_id_column: str = "prompt_id",
            rollout_token_budget: float | str | None = None,
            **kwargs: Any,
        ) -> None:
            if "token_budget" in kwargs:  # the old name, which TRL's AsyncGRPOConfig uses for packed training rows
                old = kwargs.pop("token_budget")
                if rollout_token_budget is not None:
                    raise ValueError(
                        "give rollout_token_budget= only (token_budget= is its old name, and AsyncGRPOConfig."
                        "token_budget is TRL's tokens per packed training row)"
                    )
                warnings.warn(
                    "VIPAsyncGRPOTrainer(token_budget=...) is renamed rollout_token_budget=...: it is the generated "
                    "tokens each chunk of rollouts may spend, while AsyncGRPOConfig.token_budget (TRL's) is the tokens "
                    "per packed training row; pass rollout_token_budget= instead",
                    FutureWarning,
                    stacklevel=2,
                )
                rollout_token_budget = old
            if args is None:  # as AsyncGRPOTrainer does
                args = AsyncGRPOConfig(f"{model.split('/')[-1]}-AsyncGRPO")
            allocator, chunk = check_async_setup(args, train_dataset, allocator, kwargs.get("rollout_worker"), rest)
            token_budget = normalise_token_budget(rollout_token_budget)
            refusal = allocator.strategy.token_refusal
            if token_budget is not None and refusal is not None:
                raise ValueError(
                    f"rollout_token_budget={token_budget!r} needs a strategy with a token mode; the allocator's "
                    f"{allocator.strategy_name!r} cannot plan under a token budget: {refusal}"
                )
            state_path = os.path.join(str(args.output_dir), state_file)
            skipped_path = os.path.join(str(args.output_dir), skipped_file)
            worker = functools.partial(
                VIPAsyncRolloutWorker,
                allocator=allocator,
                chunk_prompts=chunk,
                success_threshold=success_threshold,
                prompt_id_column=prompt_id_column,
                state_path=state_path,
                token_budget=token_budget,
                skipped_path=skipped_path,
            )
            self.vip_state_path = state_path
            self.vip_skipped_path = skipped_path
            # AsyncGRPOTrainer.__init__ builds `AsyncRolloutWorker(...)` by its module-level name; this one call
            # builds VIP's worker with the same arguments (TRL 1.16, async_grpo_trainer.py).
            with _swap(trainer_module, "AsyncRolloutWorker", worker):
                super().__init__(model, reward_funcs, args, train_dataset, *rest, **kwargs)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            super()._save_checkpoint(model, trial)
            if not self.accelerator.is_main_process:
                return
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            if os.path.exists(self.vip_state_path):
                shutil.copyfile(self.vip_state_path, os.path.join(folder, state_file))
            rollout_state = os.path.join(folder, "rollout_state.json")
            worker = self.rollout_worker
            if os.path.exists(rollout_state) and isinstance(worker, VIPAsyncRolloutWorker):
                # TRL wrote start + first untrained group id; positions that form no group (drops) are not trained
                # either, so the resume position skips them (:func:`resume_position`).
                with open(rollout_state) as f:
                    saved = json.load(f)
                start = int(worker._loop_kwargs["dataset_start_index"])
                saved["prompt_index"] = start + resume_position(self._trained_groups, self.vip_skipped_path)
                with open(rollout_state, "w") as f:
                    json.dump(saved, f)

        def _inner_training_loop(self, *args: Any, **kwargs: Any) -> Any:
            checkpoint = kwargs.get("resume_from_checkpoint")
            worker = self.rollout_worker
            if self.accelerator.is_main_process and os.path.exists(self.vip_skipped_path):
                os.remove(self.vip_skipped_path)  # positions count from this run's start
            if checkpoint and isinstance(worker, VIPAsyncRolloutWorker):  # it starts at train begin: hand it over now
                path = os.path.join(str(checkpoint), state_file)
                if os.path.exists(path):
                    worker._loop_kwargs["vip_allocator"] = Allocator.load(path)
            return super()._inner_training_loop(*args, **kwargs)

    @contextlib.contextmanager
    def _swap(module: Any, name: str, value: Any) -> Iterator[None]:
        original = getattr(module, name)
        setattr(module, name, value)
        try:
            yield
        finally:
            setattr(module, name, original)

    def check_async_setup(
        args: Any, dataset: Any, allocator: Allocator | None, worker: Any, rest: tuple
    ) -> tuple[Allocator, int]:
        if worker is not None or len(rest) > 5:  # rest: processing_class, callbacks, optimizers, peft, tools, ...
            raise NotImplementedError(
                "VIPAsyncGRPOTrainer does not take a rollout_worker: VIP is the rollout worker (it plans each chunk "
                "it dispatches); plug a custom backend in by subclassing VIPRolloutLoop instead"
            )
        if dataset is None:
            raise NotImplementedError(
                "VIPAsyncGRPOTrainer needs a train_dataset: without one the environment chooses the task in reset(), "
                "after the plan, so the allocator cannot know which prompt a rollout belongs to"
            )
        if int(args.max_steps) <= 0:
            raise ValueError(
                "set AsyncGRPOConfig(max_steps=...): TRL's epoch stop counts one trained group per prompt of the "
                "dataset, and prompts the plan drops never form a group, so an epoch would never end on time"
            )
        g = int(args.num_generations)
        if allocator is None:
            allocator = Allocator(n_min=2, n_max=2 * g, success_threshold=0.5)  # strategy, predictor: the defaults
        if not isinstance(allocator, Allocator):
            raise ValueError(f"allocator must be a vipalloc.Allocator, got {type(allocator)}")
        if allocator.strategy_name in TWO_PHASE_STRATEGIES:
            raise NotImplementedError(
                f"{allocator.strategy_name!r} is not supported with AsyncGRPOTrainer: a pilot-then-commit plan needs "
                "the pilot's outcomes before the rest of a group is dispatched, and TRL's _generate_loop closes a "
                "group only when all num_generations rows are back; use a single-phase strategy"
            )
        if not allocator.n_min <= g <= allocator.n_max:
            raise ValueError(bounds_message(allocator.n_min, g, allocator.n_max, "the allocator"))
        samples_per_step = int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps)
        samples_per_step *= int(args.world_size)
        return allocator, max(1, samples_per_step // g)

    return VIPAsyncGRPOTrainer
