"""verl plug-in, part 6: verl's asynchronous experimental trainers (decided by reading verl 0.9.1's code).

**``verl.experimental.one_step_off_policy``: supported.** ``OneStepOffRayTrainer`` replaces ``fit`` (an
``asyncio`` loop that generates batch ``t+1`` while batch ``t`` trains) but keeps the legacy seam unchanged:
``_async_gen_next_batch`` calls ``self._get_gen_batch(batch)``, then ``gen_batch.repeat(rollout.n)`` before its
(awaited) generation and ``batch.repeat(rollout.n)`` after it, and ``SeparateRayPPOTrainer._fit_update_actor`` calls
``self._update_actor(batch)``. So :func:`~vipalloc.integrations._verl_loops.vip_trainer_class` serves it unchanged:

* each dispatched batch (one optimizer step) is planned when ``_async_gen_next_batch`` starts it, with the latest
  posterior (the batch being trained at that moment is not observed yet: the plan is one step behind, which is the
  trainer's own staleness), at the next free plan step;
* its outcomes are observed at ``_update_actor`` against that plan step (the policy version that generated it), so
  a late batch is never credited to a newer plan;
* its budget is that optimizer step's rows, rounded to the DP size and mini-batch rows as in the legacy loop.

``vip.two_phase`` is refused there: the one generation call is awaited on the rollout manager's coroutine, which the
two-phase wrapper (a synchronous ``generate_sequences``) cannot stand in for.

**``verl.experimental.fully_async_policy``: refused** (:data:`FULLY_ASYNC_REFUSAL`): an optimizer step there is
whatever ``required_samples`` prompt groups arrive first, so no plan can fix its row count.
"""

from __future__ import annotations

from typing import Any

from vipalloc.integrations._verl_checks import UnsupportedVerlError, _missing_paths

__all__ = [
    "FULLY_ASYNC_REFUSAL",
    "ONE_STEP_OFF_PATHS",
    "check_one_step_off",
    "one_step_off_task_runner_class",
    "vip_one_step_off_trainer_class",
]

FULLY_ASYNC_REFUSAL = (
    "verl.experimental.fully_async_policy is refused with VIP: (1) FullyAsyncTrainer._get_samples_from_queue "
    "(fully_async_trainer.py) builds every optimizer step from the first required_samples = "
    "ppo_mini_batch_size x async_training.require_batches prompt groups (RolloutSamples) to arrive on the message "
    "queue, in arrival order, after the rollouter dropped stale ones, and assemble_batch_from_rollout_samples "
    "(detach_utils.py) concatenates them as they are; with per-prompt counts the rows of a step are the sum of the "
    "counts of whichever groups arrived, which no plan can make a multiple of the DP size x mini-batch rows that "
    "train_mini_batch (workers/engine_workers.py) asserts, unless every count equals rollout.n; (2) the count is "
    "fixed before the rollouter sees a prompt: FullyAsyncRollouter._feed_samples calls the module function "
    "prepare_single_generation_data (detach_utils.py), which repeats every prompt rollout.n times. Supporting it "
    "would mean copying _get_samples_from_queue and _feed_samples. What would unlock it: a verl hook that collects "
    "samples until a row budget is met (or pads a step to the required multiple, as the v1 trainer's "
    "_get_required_batch_multiple does) and a per-sample rollout count such as the v1 agent loop's __rollout_n__. "
    "Use trainer.use_v1=true with trainer.v1.trainer_mode=colocate_async or separate_async (asynchronous, "
    "supported), or verl.experimental.one_step_off_policy"
)
# Code of OneStepOffRayTrainer the legacy hooks rely on: (method, text that must appear in its source, meaning).
ONE_STEP_OFF_PATHS = (
    ("_async_gen_next_batch", "self._get_gen_batch(", "_async_gen_next_batch builds the batch with _get_gen_batch"),
    ("_async_gen_next_batch", "gen_batch.repeat(", "_async_gen_next_batch expands the generation batch with .repeat"),
    ("_async_gen_next_batch", "batch.repeat(", "_async_gen_next_batch expands the training batch with .repeat"),
    ("_fit_update_actor", "self._update_actor(", "_fit_update_actor calls _update_actor (where rewards are observed)"),
)


def check_one_step_off(base: type) -> None:
    """Raise :class:`UnsupportedVerlError` when ``base`` (``OneStepOffRayTrainer`` or a subclass keeping its loop)
    lacks a code path the legacy hooks rely on (:data:`ONE_STEP_OFF_PATHS`)."""
    problems = _missing_paths(base, ONE_STEP_OFF_PATHS, base.__name__)
    if problems:
        from vipalloc.integrations._verl_core import SUPPORTED_VERL

        raise UnsupportedVerlError(
            f"{base.__name__} does not provide what the VIP plug-in hooks in one_step_off_policy: "
            + "; ".join(problems)
            + f". Supported: verl {SUPPORTED_VERL}, or set vip.enable=false"
        )


_CLASSES: dict[type, type] = {}


def vip_one_step_off_trainer_class(base: type | None = None) -> type:
    """``OneStepOffRayTrainer`` (default ``base``) with VIP allocation: the legacy loop's hooks
    (:func:`~vipalloc.integrations._verl_loops.vip_trainer_class`), ``vip.two_phase`` refused at the first plan."""
    from verl.experimental.one_step_off_policy.ray_trainer import OneStepOffRayTrainer

    from vipalloc.integrations._verl_loops import vip_trainer_class

    base = OneStepOffRayTrainer if base is None else base
    if base in _CLASSES:
        return _CLASSES[base]
    check_one_step_off(base)
    parent: Any = vip_trainer_class(base)

    class VIPOneStepOffRayTrainer(parent):  # type: ignore[misc, valid-type]
        """verl's one-step-off-policy trainer with VIP allocation (config group ``vip``)."""

        def _vip(self) -> Any:
            hook = super()._vip()
            if hook.cfg.enable and hook.cfg.two_phase:
                raise ValueError(
                    "vip.two_phase=true is refused with one_step_off_policy: OneStepOffRayTrainer awaits "
                    "async_rollout_manager.generate_sequences (a coroutine) once per batch, which the two-phase "
                    "rounds cannot wrap; set vip.two_phase=false or use the legacy loop (trainer.use_v1=false)"
                )
            return hook

    VIPOneStepOffRayTrainer.__name__ = VIPOneStepOffRayTrainer.__qualname__ = f"VIP{base.__name__}"
    _CLASSES[base] = VIPOneStepOffRayTrainer
    return VIPOneStepOffRayTrainer


def one_step_off_task_runner_class() -> Any:
    """verl's ``OneStepTaskRunner`` (a Ray actor) whose ``run`` builds :func:`vip_one_step_off_trainer_class`:
    pass it to ``verl.trainer.main_ppo.run_ppo(config, task_runner_class=...)`` with a ``vip`` config group."""
    import ray
    from verl.experimental.one_step_off_policy import main_ppo

    base: Any = getattr(main_ppo.OneStepTaskRunner, "__ray_actor_class__", main_ppo.OneStepTaskRunner)
    runner_module: Any = main_ppo  # its trainer class is looked up in this module when run() builds it

    class VIPOneStepTaskRunner(base):  # type: ignore[misc, valid-type]
        def run(self, config: Any) -> Any:
            saved = runner_module.OneStepOffRayTrainer
            runner_module.OneStepOffRayTrainer = vip_one_step_off_trainer_class(saved)
            try:
                return super().run(config)
            finally:
                runner_module.OneStepOffRayTrainer = saved

    options: dict[str, Any] = {"num_cpus": 10, "max_concurrency": 100}  # as verl declares OneStepTaskRunner
    return ray.remote(**options)(VIPOneStepTaskRunner)
