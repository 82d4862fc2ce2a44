"""verl plug-in, part 6: verl's asynchronous experimental trainers (decided by reading verl 0.9.1's code).

**``verl.experimental.one_step_off_policy``: supported.** ``OneStepOffRayTrainer`` replaces ``fit`` (an
``asyncio`` loop that generates batch ``t+1`` while batch ``t`` trains) but keeps the legacy seam unchanged:
``_async_gen_next_batch`` calls ``self._get_gen_batch(batch)``, then ``gen_batch.repeat(rollout.n)`` before its
(awaited) generation and ``batch.repeat(rollout.n)`` after it, and ``SeparateRayPPOTrainer._fit_update_actor`` calls
``self._update_actor(batch)``. So :func:`~vipalloc.integrations.verl.loops.vip_trainer_class` serves it unchanged:

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

from vipalloc.integrations.verl.checks import FULLY_ASYNC_REFUSAL, ONE_STEP_OFF_PATHS, check_one_step_off

__all__ = [
    "FULLY_ASYNC_REFUSAL",
    "ONE_STEP_OFF_PATHS",
    "check_one_step_off",
    "one_step_off_task_runner_class",
    "vip_one_step_off_trainer_class",
]

_CLASSES: dict[type, type] = {}


def vip_one_step_off_trainer_class(base: type | None = None) -> type:
    """``OneStepOffRayTrainer`` (default ``base``) with VIP allocation: the legacy loop's hooks
    (:func:`~vipalloc.integrations.verl.loops.vip_trainer_class`), ``vip.two_phase`` refused at the first plan."""
    from verl.experimental.one_step_off_policy.ray_trainer import OneStepOffRayTrainer

    from vipalloc.integrations.verl.loops import vip_trainer_class

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
