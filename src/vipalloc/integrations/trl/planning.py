"""Planning a generation batch of :class:`~vipalloc.integrations.trl.trainer.VIPGRPOTrainer`.

What a plan is laid onto: the distinct prompts of TRL's rectangular batch (``n_max`` consecutive rows a prompt),
the rows each prompt's count makes real (:class:`Layout`), the two rounds of a two-phase step
(:func:`two_phase_layout`, :class:`PilotRound`), the record a step leaves (:class:`VIPBatchRecord`), and the
allocator check made before TRL starts (:func:`check_allocator`). Functions take the trainer as their first
argument; nothing here subclasses TRL.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from accelerate.utils import gather_object

from vipalloc import Allocator, Plan
from vipalloc.integrations.trl.config import VIPGRPOConfig, _prompt_key, _prompt_text, bounds_message
from vipalloc.integrations.trl.environments import ResetTasks, check_group_tasks, group_keys
from vipalloc.settings import SURFACE_NAMES
from vipalloc.strategies import TWO_PHASE_STRATEGIES

__all__ = [
    "Layout",
    "PilotRound",
    "VIPBatchRecord",
    "check_allocator",
    "check_dataset_rows",
    "group_rows",
    "two_phase_layout",
]


@dataclass
class VIPBatchRecord:
    """What one VIP generation step did (``trainer.vip_last``). Arrays are aligned with ``prompt_ids``.

    ``prompt_ids`` are the distinct prompts of the generation batch (a prompt sampled twice is one entry).
    ``rewards[i]`` are the success rewards (TRL's weighted sum over reward functions, or ``success_reward``'s) of
    prompt ``i``'s scorable completions, ``successes[i]`` their binarised values as sent to ``Allocator.observe``.
    """

    step: int
    prompt_ids: list[str]
    counts: np.ndarray  # int64 (M,): completions generated per prompt
    rewards: list[np.ndarray]
    successes: list[np.ndarray]
    plan: Plan
    real_rows: np.ndarray  # bool (groups * n_max,): rows of the gathered rectangular batch that were generated
    # int64 arrays aligned with rewards: tokens the policy generated in each scored episode (every turn, tool output
    # excluded), for token-budget accounting
    lengths: list[np.ndarray] = dataclasses.field(default_factory=list)


@dataclass
class Layout:
    """Where a plan's rows sit in the gathered rectangular batch: ``groups`` consecutive blocks of ``n_max`` rows."""

    plan: Plan  # counts: rollouts generated per prompt (a two-phase step: pilot + commit)
    group_prompt: np.ndarray  # int (groups,): index into plan.prompt_ids of each block
    first_block: np.ndarray  # int (M,): the block whose first counts[i] rows are prompt i's real rows
    real_global: np.ndarray  # bool (groups * n_max,)
    observed: np.ndarray | None = None  # int (M,): leading rows of each prompt already observed (the pilot)
    train: np.ndarray | None = None  # bool (M,): prompts whose rows enter the update (default: counts > 0)

    def train_rows(self, g: int) -> np.ndarray:
        """Real rows of the gathered batch that are trained on, bool ``(groups * g,)``."""
        if self.train is None:
            return self.real_global
        per_block = np.zeros(len(self.group_prompt), bool)
        per_block[self.first_block] = self.train
        return self.real_global & np.repeat(per_block, g)


@dataclass
class PilotRound:
    """This process's pilot rows of a two-phase step, reused when TRL's method generates the whole step."""

    real: np.ndarray  # bool (L,): local rows generated in the pilot
    completion_ids: list[Any]  # (L,) token id lists, as TRL's _generate returned them
    logps: list[Any] | None  # (L,) sampling log-probs (vLLM) or None
    rewards: torch.Tensor  # (L, reward functions): the pilot's rewards of the local slice (NaN elsewhere)
    extra_logs: dict[str, list[Any]]  # log_extra columns of the pilot, one value per local row


def check_allocator(cfg: VIPGRPOConfig, allocator: Allocator | None) -> Allocator:
    """The allocator to use (built from ``cfg`` when None), checked against the config before TRL starts."""
    assert cfg.n_max is not None
    if allocator is None:
        return Allocator.from_settings(
            cfg,
            # the one name TRL's plug-in spells differently: GRPOConfig.seed is TRL's training seed, not the
            # allocator's (allocator_seed None: follow it)
            names=SURFACE_NAMES["trl"],
            seed=cfg.allocator_seed_resolved,
            # The trainer binarises rewards with cfg.success_threshold itself and reports 0/1 values.
            success_threshold=0.5,
        )
    if not isinstance(allocator, Allocator):
        raise ValueError(f"allocator must be a vipalloc.Allocator, got {type(allocator)}")
    if allocator.n_max > cfg.n_max:
        raise ValueError(
            f"the allocator's n_max ({allocator.n_max}) exceeds VIPGRPOConfig.n_max ({cfg.n_max}), the TRL "
            "group width; set VIPGRPOConfig(n_max=...) to at least the allocator's n_max"
        )
    if bool(getattr(allocator.strategy, "two_phase", False)) != bool(cfg.two_phase):
        raise ValueError(
            f"the allocator's strategy {allocator.strategy_name!r} and VIPGRPOConfig.two_phase={cfg.two_phase} "
            f"disagree: two-phase strategies ({', '.join(TWO_PHASE_STRATEGIES)}) need two_phase=True, others "
            "two_phase=False"
        )
    mean = cfg.budget_per_generation / cfg.prompts_per_generation
    if not allocator.n_min <= mean <= allocator.n_max:
        raise ValueError(bounds_message(allocator.n_min, mean, allocator.n_max, "the allocator"))
    refusal = allocator.strategy.token_refusal
    if cfg.token_budget is not None and refusal is not None:
        raise ValueError(
            f"VIPGRPOConfig.token_budget={cfg.token_budget!r} needs a strategy with a token mode; the allocator's "
            f"{allocator.strategy_name!r} cannot plan under a token budget: {refusal}"
        )
    if not 0.0 < allocator.success_threshold <= 1.0:
        raise ValueError(
            f"the allocator's success_threshold ({allocator.success_threshold}) must lie in (0, 1]: the trainer "
            "reports binarised 0/1 rewards (set VIPGRPOConfig.success_threshold for the raw-reward threshold)"
        )
    return allocator


def check_dataset_rows(bound: dict[str, Any]) -> None:
    """Refuse, before TRL starts, a ``train_dataset`` without a ``prompt`` column when no environment supplies the
    prompt (``bound``: the trainer's bound constructor arguments). With ``environment_factory`` such rows are
    keyed by their environment's ``reset()`` output; datasets that list no columns are not checked."""
    dataset = bound.get("train_dataset")
    columns = getattr(dataset, "column_names", None)
    if dataset is None or bound.get("environment_factory") is not None or not isinstance(columns, list):
        return
    if "prompt" not in columns:
        raise ValueError(
            f"train_dataset has no 'prompt' column (columns: {columns}) and no environment_factory supplies the "
            "prompt: GRPOTrainer generates from each row's 'prompt'; rename the prompt column to 'prompt', or pass an "
            "environment_factory whose reset(**row) returns it"
        )


def group_rows(
    trainer: Any, inputs: list[dict[str, Any]], tasks: ResetTasks | None = None
) -> tuple[list[str], list[str], np.ndarray, int]:
    """Distinct prompt ids and texts of the global rectangular batch, the prompt of each block, the budget.

    A row's id is its ``prompt_id_column`` value, else a hash of its ``prompt``, else (``tasks``: environments reset
    before the plan, :mod:`~vipalloc.integrations.trl.environments`) a hash of the row and its environment's
    observation, else a hash of the whole row.
    """
    args = cast(VIPGRPOConfig, trainer.args)
    g = trainer.num_generations
    if tasks is None:
        rows = [(_prompt_key(x, args.prompt_id_column), _prompt_text(x.get("prompt", x))) for x in inputs]
    else:
        rows = list(zip(tasks.keys, tasks.texts))
    if trainer._vip_world > 1:  # groups may span processes: look at the gathered batch in process order
        rows = gather_object(rows)
    if len(rows) % g:
        raise RuntimeError(f"generation batch of {len(rows)} rows is not made of full groups of {g}")
    if tasks is not None:
        check_group_tasks([key for key, _ in rows], g)
        if tasks.per_group:  # no dataset: each group is its own draw of the environment
            rows = list(zip(group_keys([key for key, _ in rows], g), [text for _, text in rows]))
    ids: list[str] = []
    texts: list[str] = []
    index: dict[str, int] = {}
    group_prompt = []
    for start in range(0, len(rows), g):
        key = rows[start][0]
        if any(rows[start + k][0] != key for k in range(1, g)):
            raise RuntimeError(
                "rows of one group belong to different prompts: VIPGRPOTrainer relies on TRL's RepeatSampler "
                "layout (n_max consecutive copies of each prompt); do not override the sampler"
            )
        if key not in index:  # a prompt sampled twice (duplicate rows, no id column) is planned once
            index[key] = len(ids)
            ids.append(key)
            texts.append(rows[start][1])
        group_prompt.append(index[key])
    groups = len(group_prompt)
    budget = int(round(args.budget_per_generation * groups / args.prompts_per_generation))
    most = len(ids) * int(trainer.allocator.n_max)
    if budget > most:
        warnings.warn(
            f"{groups - len(ids)} duplicate prompt(s) in one generation batch leave {len(ids)} distinct prompts, "
            f"which take at most {most} of the {budget} budgeted rollouts (n_max={trainer.allocator.n_max}); give "
            f"every prompt its own id in {args.prompt_id_column!r} or deduplicate the dataset",
            RuntimeWarning,
            stacklevel=4,
        )
        budget = most
    return ids, texts, np.asarray(group_prompt, np.int64), budget


def two_phase_layout(trainer: Any, inputs: list[dict[str, Any]]) -> Layout:
    """A two-phase step: generate and score the pilot rows with TRL's own methods, observe them, plan the commit.

    The pilot's completions, log-probs, rewards and ``log_extra`` values are kept (``trainer._vip_pilot``) and
    handed back when TRL's method then generates the whole step, so its group statistics cover pilot and commit
    rows alike. The pilot round's length metrics and token count are rolled back; the step reports them once.
    """
    args = cast(VIPGRPOConfig, trainer.args)
    ids, texts, gp, budget = trainer._vip_groups(inputs)
    pilot = cast(Plan, trainer._vip_on_main(lambda: trainer._vip_pilot_plan(ids, texts, budget)))
    first_block, pilot_global = trainer._vip_place(pilot.counts, gp)
    rank, n_local = trainer.accelerator.process_index, len(inputs)
    pilot_real = pilot_global[rank * n_local : (rank + 1) * n_local]
    prompts = [x["prompt"] for x in inputs]
    metrics = trainer._metrics["train"]
    saved_metrics = {k: list(v) for k, v in metrics.items()}
    saved_tokens = trainer.state.num_input_tokens_seen
    trainer._vip_real = pilot_real
    try:
        generated = trainer._generate(prompts)
        completion_ids, completions, logps = generated[1], generated[3], generated[4]
        rewards = trainer._calculate_rewards(inputs, prompts, completions, completion_ids)
    finally:
        trainer._vip_real = None
    metrics.clear()
    metrics.update(saved_metrics)
    trainer.state.num_input_tokens_seen = saved_tokens
    extra_logs = {k: list(v) for k, v in trainer._pending_extra_logs.items()}
    trainer._pending_extra_logs.clear()
    g = trainer.num_generations
    success = trainer._vip_success_rewards(rewards.detach().float().cpu())
    pilot_lengths = trainer._vip_gather_lengths(n_local)
    trainer._vip_lengths = None
    pilot_ids, pilot_succ, pilot_lens = [], [], []
    for i, c in enumerate(pilot.counts):
        if c > 0:
            rows = slice(int(first_block[i]) * g, int(first_block[i]) * g + int(c))
            r = success[rows]
            pilot_ids.append(ids[i])
            pilot_succ.append((r[~np.isnan(r)] >= float(args.success_threshold)).astype(np.float64))
            pilot_lens.append(pilot_lengths[rows][~np.isnan(r)])

    def commit() -> Plan:
        trainer.allocator.observe(pilot_ids, pilot_succ, pilot.step, lengths=pilot_lens)
        return trainer.allocator.plan_commit(step=pilot.step)

    plan = cast(Plan, trainer._vip_on_main(commit))
    total = pilot.counts + plan.counts
    trainer._vip_pilot = PilotRound(
        real=pilot_real,
        completion_ids=list(completion_ids),
        logps=None if logps is None else list(logps),
        rewards=rewards[rank * n_local : (rank + 1) * n_local].detach().clone(),
        extra_logs=extra_logs,
    )
    steps = dataclasses.replace(plan, counts=total, budget=int(total.sum()), pilot_counts=None, train=None)
    _, real_global = trainer._vip_place(total, gp)
    train = None if plan.train is None else np.asarray(plan.train, bool)
    return Layout(steps, gp, first_block, real_global, observed=pilot.counts.copy(), train=train)
