"""Entry point: verl's PPO/GRPO trainer with VIP allocation, configured by hydra with a ``vip:`` group.

    python -m vipalloc.integrations.verl_trainer \\
        data.train_files=... actor_rollout_ref.model.path=... actor_rollout_ref.rollout.n=8 \\
        algorithm.adv_estimator=grpo algorithm.norm_adv_by_std_in_grpo=false \\
        vip.strategy=vip vip.predictor=gp vip.n_min=4 vip.n_max=32

The config is verl's ``ppo_trainer.yaml`` plus ``verl_config/vip/default.yaml``; every verl override works unchanged.
It runs verl's own ``run_ppo`` (Ray init, task runner, workers) with a task runner that builds the VIP trainer:
verl's v1 trainer for ``trainer.use_v1=true`` (verl's default) or the legacy ``RayPPOTrainer`` otherwise.
"""

from __future__ import annotations

from typing import Any

from vipalloc.integrations.verl import (
    VIPConfig,
    check_hook_points,
    check_verl_version,
    config_refusals,
    config_warnings,
    install_vip_trainers,
    resolve_estimator,
)
from vipalloc.integrations.verl.checks import emit_warnings

__all__ = ["check_config", "main", "task_runner_class"]


def check_config(config: Any) -> VIPConfig:
    """Validate the ``vip`` group against the rest of the config on the driver, before Ray starts anything.

    Raises ``ValueError`` for unknown keys, bad values (``vip.strategy`` / ``vip.predictor`` are checked against the
    package's registered names), an unsupported ``algorithm.adv_estimator``, a refused setup (DAPO
    ``filter_groups``, ``verl.experimental`` trainer configs, ``vip.two_phase``; every reason in one message) or a
    uniform budget that is infeasible for ``n_min`` / ``n_max``; raises ``UnsupportedVerlError`` when the installed
    verl lacks a hook point of the configured loop. Warns (``UserWarning``) for std-normalised GRPO and a verl
    outside the supported range.
    """
    from omegaconf import OmegaConf

    raw = config.get("vip", None)
    container = OmegaConf.to_container(raw, resolve=True) if raw is not None else None
    if container is not None and not isinstance(container, dict):
        raise ValueError(f"the vip config group must be a mapping of keys, got {type(container).__name__}")
    cfg = VIPConfig.from_mapping({str(k): v for k, v in container.items()} if container is not None else None)
    if not cfg.enable:
        return cfg
    refusals = config_refusals(config, cfg)
    if refusals:
        raise ValueError("; ".join(refusals))
    resolve_estimator(cfg, str(config.algorithm.adv_estimator))
    n = int(config.actor_rollout_ref.rollout.n)
    if cfg.budget is None and not cfg.n_min <= n <= cfg.n_max:
        raise ValueError(
            f"the default budget is rollout.n={n} rollouts per prompt, outside vip.n_min..vip.n_max "
            f"({cfg.n_min}..{cfg.n_max}); set vip.budget or widen the bounds"
        )
    check_verl_version()
    check_hook_points(bool(config.trainer.get("use_v1", True)), cfg.two_phase)
    emit_warnings(config_warnings(config, cfg))
    return cfg


def task_runner_class(use_v1: bool) -> Any:
    """verl's Ray task runner (v1 or legacy) whose ``run`` builds VIP trainers (see ``install_vip_trainers``)."""
    import ray

    remote_base: Any  # a Ray ActorClass; __ray_actor_class__ is the undecorated class
    if use_v1:
        from verl.trainer.main_ppo import TaskRunnerV1

        remote_base = TaskRunnerV1
    else:
        from verl.trainer.main_ppo_v0 import TaskRunner

        remote_base = TaskRunner
    base = remote_base.__ray_actor_class__

    class VIPTaskRunner(base):  # type: ignore[misc, valid-type]
        """Runs verl's task runner with the VIP trainer classes installed in this (the runner's) process."""

        def run(self, config: Any) -> Any:
            with install_vip_trainers():
                return super().run(config)

    VIPTaskRunner.__name__ = VIPTaskRunner.__qualname__ = f"VIP{base.__name__}"
    return ray.remote(VIPTaskRunner)


def _main(config: Any) -> None:
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    check_config(config)
    run_ppo(config, task_runner_class=task_runner_class(bool(config.trainer.use_v1)))


def main() -> None:
    """Hydra entry point (``python -m vipalloc.integrations.verl_trainer``)."""
    import hydra

    hydra.main(config_path="verl_config", config_name="vip_trainer", version_base=None)(_main)()


if __name__ == "__main__":
    main()
