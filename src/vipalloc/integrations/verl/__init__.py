"""verl plug-in: VIP rollout allocation inside verl's Ray PPO/GRPO trainers, without a fork (verl 0.9.x).

verl groups a prompt's rollouts by the non-tensor ``uid`` column, and its group-baseline advantage estimators
(``grpo``, ``grpo_vectorized``, ``rloo``, ``rloo_vectorized``) build each baseline from however many rows carry that
uid, so variable group sizes need no change to verl's maths. What the plug-in adds:

* **Planning** before generation: one :class:`vipalloc.Allocator` plan per training batch of ``M`` prompts, with an
  exact budget (default ``M x rollout.n``, the uniform budget) rounded down to a multiple of the rows per PPO
  mini-batch and the data-parallel size (:func:`required_multiple`, :func:`divisible_budget`), so every DP rank gets
  the same number of rows and the same number of mini-batches (verl asserts ``rows % mini_batch == 0`` per rank;
  unequal mini-batch counts across ranks hang NCCL, verl PR#5228). Counts are ``0`` (dropped) or ``>= n_min >= 2``:
  a group of size 1 is never produced on purpose (verl's GRPO would give it its raw reward as advantage).
* **Expansion**: :func:`expand_by_counts` (verl's ``DataProto.sample_level_repeat``) repeats row ``i`` ``n_i`` times
  consecutively and removes dropped prompts; the uid is repeated with it, so uid groups have the planned sizes.
* **Feedback** after rewards: each row's success (``reward_extra_info[success_key]`` when the reward function reports
  it, e.g. ``acc``, else the summed token-level score) is compared with ``success_threshold`` and the 0/1 outcomes
  go to ``Allocator.observe``, after every group's size has been checked against its plan (a mismatch means verl
  did not apply the plan and raises :class:`PlanNotAppliedError`). The shared ``vip/*`` metrics
  (``Plan.metrics()`` and ``Allocator.outcome_metrics``, the names every trainer and plug-in logs) go into verl's
  step metrics.
* **Token mode** (``vip.token_budget``: ``uniform`` or tokens per step): each plan also satisfies
  ``sum_i n_i c_i <= T`` with ``c_i`` from the lengths observed so far (each episode's ``response_mask`` summed,
  passed to ``Allocator.observe(lengths=...)`` in both loops); the rollout budget stays the cap, legacy rows are
  rounded down to the DP multiple, the v1 loop's are padded by verl. ``vip/tokens_*`` join the metrics.
* **Checkpoints**: the allocator is saved as ``global_step_<k>/vip_allocator.json`` next to verl's actor checkpoint
  and restored with it.

Two trainer loops exist in verl 0.9 and both are supported (``docs/verl.md``):

* ``trainer.use_v1=true`` (verl's default): the TransferQueue trainer (:func:`vip_v1_trainer_class`). verl's agent
  loop already reads a per-prompt ``__rollout_n__`` column (``verl/trainer/ppo/v1/agent_loop_tq.py``); the plug-in
  fills it when prompts are submitted and observes rewards in ``_compute_advantage``.
* ``trainer.use_v1=false``: the legacy ``RayPPOTrainer`` (:class:`RayVIPTrainer`, built lazily). Its ``fit`` calls
  ``gen_batch.repeat(n)`` and ``batch.repeat(n)``; the plug-in plans in ``_get_gen_batch`` and makes the next
  ``repeat`` of exactly those two objects expand by the plan (one shot), then observes in ``_update_critic`` /
  ``_update_actor``, where the batch holds final rewards.

Start-up checks (``checks``) refuse setups the plug-in cannot serve (DAPO ``filter_groups``, the DAPO
recipe's and ``verl.experimental`` trainers, ``vip.two_phase`` in the v1 loop) and verify that every hooked verl
method exists. ``vip.two_phase=true`` (pilot then commit, ``Allocator.plan_pilot`` / ``plan_commit``) runs in the
legacy loop.
Use the entry point ``python -m vipalloc.integrations.verl_trainer`` (hydra, ``vip:`` config group).

Package layout: ``core`` (config, budget arithmetic, expansion), ``hook`` (:class:`VIPHook`, the allocator glue),
``layers`` (batch columns, repeated prompts planned in layers), ``checks`` (start-up checks), ``loops`` (the trainer
mixin and subclasses of both loops, two-phase rounds), ``multiturn`` (episodes and their generated tokens),
``one_step_off`` (``one_step_off_policy`` support, the ``fully_async_policy`` refusal); this module is the public
entry, and ``vipalloc.integrations.verl_trainer`` the hydra entry point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:
    import torch  # noqa: F401
    from verl import DataProto  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('vipalloc.integrations.verl needs verl and ray: pip install "vipalloc[verl]"') from exc

from vipalloc.integrations.verl.checks import (
    UnsupportedVerlError,
    check_hook_points,
    check_trainer_base,
    check_verl_version,
    config_refusals,
    config_warnings,
)
from vipalloc.integrations.verl.core import (
    ADV_ESTIMATOR_TARGETS,
    ALLOCATOR_FILE,
    SUPPORTED_VERL,
    VIPConfig,
    divisible_budget,
    expand_by_counts,
    required_multiple,
    resolve_estimator,
)
from vipalloc.integrations.verl.hook import BatchPlan, PlanNotAppliedError, VIPHook
from vipalloc.integrations.verl.loops import _one_shot_plan, vip_trainer_class, vip_v1_trainer_class
from vipalloc.integrations.verl.one_step_off import (
    FULLY_ASYNC_REFUSAL,
    one_step_off_task_runner_class,
    vip_one_step_off_trainer_class,
)

__all__ = [
    "ALLOCATOR_FILE",
    "ADV_ESTIMATOR_TARGETS",
    "FULLY_ASYNC_REFUSAL",
    "SUPPORTED_VERL",
    "BatchPlan",
    "PlanNotAppliedError",
    "UnsupportedVerlError",
    "VIPConfig",
    "VIPHook",
    "check_hook_points",
    "check_trainer_base",
    "check_verl_version",
    "config_refusals",
    "config_warnings",
    "divisible_budget",
    "expand_by_counts",
    "install_vip_trainers",
    "one_step_off_task_runner_class",
    "required_multiple",
    "resolve_estimator",
    "vip_one_step_off_trainer_class",
    "vip_trainer_class",
    "vip_v1_trainer_class",
]
_ = _one_shot_plan  # re-exported for tests of the legacy loop's one-shot repeat


# ------------------------------------------------------------------------------------------------ installation
@contextlib.contextmanager
def install_vip_trainers() -> Iterator[None]:
    """Inside this block verl builds VIP trainers: v1 modes resolve to :func:`vip_v1_trainer_class` subclasses and
    the legacy task runner instantiates :class:`RayVIPTrainer`. Used by the entry point in the task-runner process;
    the previous registrations are restored on exit."""
    from verl.trainer import main_ppo_v0

    try:  # the v1 trainers need TransferQueue; without it only the legacy loop can run
        from verl.trainer.ppo.v1 import trainer_base

        registry: dict[str, type] = trainer_base.TRAINER_REGISTRY
    except ImportError:
        registry = {}
    saved_registry = dict(registry)
    saved_v0 = main_ppo_v0.RayPPOTrainer
    try:
        for mode, cls in saved_registry.items():
            try:
                registry[mode] = vip_v1_trainer_class(cls)
            except ValueError as exc:  # a custom mode the plug-in cannot hook: refuse it when it is built
                registry[mode] = _refusing_trainer(cls, str(exc))
        main_ppo_v0.RayPPOTrainer = __getattr__("RayVIPTrainer")  # type: ignore[misc]
        yield
    finally:
        registry.clear()
        registry.update(saved_registry)
        main_ppo_v0.RayPPOTrainer = saved_v0  # type: ignore[misc]


def _refusing_trainer(base: type, reason: str) -> type:
    """A stand-in for a registered trainer the plug-in refuses: building it raises ``ValueError(reason)``."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        raise ValueError(f"{reason} (set vip.enable=false to run it without VIP)")

    return type(f"Refused{base.__name__}", (base,), {"__init__": __init__})


def __getattr__(name: str) -> Any:  # the legacy trainer pulls verl's whole trainer stack: build it on first use
    if name == "RayVIPTrainer":
        cls = vip_trainer_class()
        globals()["RayVIPTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
