"""verl plug-in, part 3: start-up checks, so an unsupported setup fails before training instead of running uniform.

* :func:`check_hook_points`: every verl method the plug-in overrides exists, and the verl code paths it relies on
  are still there (legacy ``fit`` repeats the batches ``_get_gen_batch`` returned; the v1 agent loop reads
  ``__rollout_n__``). Raises :class:`UnsupportedVerlError` naming the supported range.
* :func:`check_trainer_base`: refuses trainer classes whose loop the plug-in does not hook (the DAPO recipe's
  ``fit``, ``verl.experimental`` trainers).
* :func:`config_refusals` / :func:`config_warnings`: setups that are refused (with the reason) or that run with a
  caveat. ``docs/verl.md`` has the table.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Any

from vipalloc.integrations.verl.core import SUPPORTED_VERL, VIPConfig

__all__ = [
    "FULLY_ASYNC_REFUSAL",
    "ONE_STEP_OFF_PATHS",
    "TWO_PHASE_TOKEN_REFUSAL",
    "UnsupportedVerlError",
    "V0_HOOKS",
    "V1_HOOKS",
    "check_hook_points",
    "check_one_step_off",
    "check_trainer_base",
    "check_verl_version",
    "config_refusals",
    "config_warnings",
    "emit_warnings",
    "token_refusals",
]

logger = logging.getLogger("vipalloc.integrations.verl")

# Methods the plug-in overrides (and ``fit``, whose body must be verl's own so the overrides are on its path).
V0_HOOKS = ("fit", "_get_gen_batch", "_validate", "_update_critic", "_update_actor", "_save_checkpoint",
            "_load_checkpoint")  # fmt: skip
V1_HOOKS = ("fit", "step", "_step_once", "_submit_batch_to_rollout", "_compute_advantage",
            "_get_required_batch_multiple", "_save_checkpoint", "_load_checkpoint")  # fmt: skip
# Code the hooks depend on, as (method, text that must appear in its source, what it means).
_V0_PATHS = (
    ("fit", "self._get_gen_batch(", "fit() builds the generation batch with _get_gen_batch"),
    ("fit", "gen_batch.repeat(", "fit() expands the generation batch with .repeat (the plan replaces it)"),
    ("fit", "batch.repeat(", "fit() expands the training batch with .repeat (the plan replaces it)"),
    ("fit", "self._update_actor(", "fit() calls _update_actor (where rewards are observed)"),
)
_V0_TWO_PHASE_PATHS = (
    ("fit", "self.async_rollout_manager.generate_sequences(", "fit() generates through self.async_rollout_manager"),
    ("fit", "combined_gen_output.slice(0, num_sampled_prompts)", "fit() keeps the first len(gen_batch_output) rows"),
)
_V1_PATHS = (
    ("_add_prompts_to_generate", "self._submit_batch_to_rollout(", "refills go through _submit_batch_to_rollout"),
    ("_step_once", "self._compute_advantage(", "each step calls _compute_advantage (where rewards are observed)"),
)


class UnsupportedVerlError(RuntimeError):
    """The installed verl lacks a hook point or code path the plug-in relies on."""


def check_verl_version(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed verl) is in :data:`SUPPORTED_VERL`; warns once when it is not.

    Outside the range the run may still work: :func:`check_hook_points` and the group-size check at feedback are
    what stop a run whose hooks no longer take effect.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        import verl

        version = str(getattr(verl, "__version__", "0"))
    try:
        ok = Version(version) in SpecifierSet(SUPPORTED_VERL)
    except InvalidVersion:
        ok = False
    if not ok:
        _warn(
            f"verl {version} is outside the range the VIP plug-in supports ({SUPPORTED_VERL}); its hook points are "
            "checked at start-up and every group size at feedback, but prefer a supported verl"
        )
    return ok


@functools.lru_cache(maxsize=4)
def check_hook_points(use_v1: bool, two_phase: bool = False) -> None:
    """Raise :class:`UnsupportedVerlError` if a method the plug-in hooks or a code path it relies on is missing.

    ``use_v1``: check the v1 (TransferQueue) loop, else the legacy ``RayPPOTrainer`` loop; ``two_phase``: also the
    legacy code the two-phase rounds rely on. Cached per argument pair.
    """
    problems: list[str] = []
    if use_v1:
        from verl.trainer.ppo.v1 import agent_loop_tq
        from verl.trainer.ppo.v1.trainer_base import PPOTrainer

        problems += _missing(PPOTrainer, V1_HOOKS, "PPOTrainer")
        problems += _missing_paths(PPOTrainer, _V1_PATHS, "PPOTrainer")
        worker = getattr(agent_loop_tq, "AgentLoopWorkerTQ", None)
        worker = getattr(worker, "__ray_actor_class__", worker)
        run_prompt = getattr(worker, "_run_prompt", None)
        src = _source(run_prompt) if run_prompt is not None else ""
        if src is not None and '"__rollout_n__"' not in src:
            problems.append("the v1 agent loop (AgentLoopWorkerTQ._run_prompt) reads the per-prompt __rollout_n__")
    else:
        from verl.trainer.ppo.ray_trainer import RayPPOTrainer

        problems += _missing(RayPPOTrainer, V0_HOOKS, "RayPPOTrainer")
        problems += _missing_paths(RayPPOTrainer, _V0_PATHS, "RayPPOTrainer")
        if two_phase:
            problems += _missing_paths(RayPPOTrainer, _V0_TWO_PHASE_PATHS, "RayPPOTrainer")
    if problems:
        import verl

        raise UnsupportedVerlError(
            f"the installed verl ({getattr(verl, '__version__', 'unknown')}) does not provide what the VIP plug-in "
            f"hooks ({'v1' if use_v1 else 'legacy'} loop): " + "; ".join(problems) + f". Supported: verl "
            f"{SUPPORTED_VERL} (pip install 'verl{SUPPORTED_VERL}'), or set vip.enable=false"
        )


def check_trainer_base(base: type, use_v1: bool) -> None:
    """Refuse (``ValueError``) a trainer class whose loop the plug-in's overrides would not reach.

    verl's own trainers are accepted (``RayPPOTrainer``; the v1 ``sync`` / ``colocate_async`` /
    ``separate_async`` trainers, which keep ``PPOTrainer``'s loop) and ``one_step_off_policy``'s
    ``OneStepOffRayTrainer`` (its own ``fit`` keeps the legacy seam; ``one_step_off``). Refused: the DAPO recipe's
    ``RayDAPOTrainer`` (its own ``fit`` truncates the batch to ``train_batch_size x n`` rows and keeps singleton
    groups), ``fully_async_policy`` (``one_step_off.FULLY_ASYNC_REFUSAL``) and ``separation``'s trainer (own loop),
    and any subclass overriding a hooked method.
    """
    root: type
    hooks: tuple[str, ...]
    if use_v1:
        from verl.trainer.ppo.v1.trainer_base import PPOTrainer

        root, hooks = PPOTrainer, V1_HOOKS
    else:
        from verl.trainer.ppo.ray_trainer import RayPPOTrainer

        root, hooks = RayPPOTrainer, V0_HOOKS
    base = getattr(base, "__ray_actor_class__", base)  # verl declares some trainers as Ray actors (fully_async)
    name = f"{base.__module__}.{base.__qualname__}"
    if not (isinstance(base, type) and issubclass(base, root)):
        raise ValueError(f"{name} is not a verl {root.__name__} subclass; the VIP plug-in hooks verl's own trainers")
    overridden = [m for m in hooks if m not in ("_save_checkpoint", "_load_checkpoint")
                  and getattr(base, m, None) is not getattr(root, m, None)]  # fmt: skip
    if not overridden:
        return
    if not use_v1 and overridden == ["fit"] and _is_one_step_off(base):
        # its own asyncio fit keeps the legacy seam (_get_gen_batch, .repeat, _update_actor): one_step_off checks it
        check_one_step_off(base)
        return
    if "dapo" in name.lower() or base.__module__.startswith("recipe"):
        why = (
            "the DAPO recipe's own fit() truncates the batch to train_batch_size x rollout.n rows and keeps "
            "singleton groups, so variable group sizes would be cut and mis-scored; run verl's trainer with "
            "vip (python -m vipalloc.integrations.verl_trainer) instead"
        )
    elif base.__module__.startswith("verl.experimental.fully_async_policy"):
        why = FULLY_ASYNC_REFUSAL
    elif base.__module__.startswith("verl.experimental"):
        why = (
            "verl.experimental trainers other than one_step_off_policy (e.g. separation's SeparateRayPPOTrainer, "
            "whose fit_step/_fit_generate replace fit) run their own loop, which the plug-in does not hook; "
            "one_step_off_policy is supported "
            "(vipalloc.integrations.verl.vip_one_step_off_trainer_class), and trainer.use_v1=true with "
            "trainer.v1.trainer_mode=colocate_async or separate_async gives asynchronous training with VIP"
        )
    else:
        why = "the plug-in's overrides would not be on its training path"
    raise ValueError(f"{name} overrides {overridden} of verl's {root.__name__}: {why}")


def config_refusals(config: Any, vip: VIPConfig) -> list[str]:
    """Reasons the run is refused (empty: accepted). ``config``: the composed verl config (OmegaConf or dict)."""
    out = []
    filter_groups = _get(config, "algorithm", "filter_groups")
    if filter_groups is not None and bool(_get(filter_groups, "enable") or False):
        out.append(
            "algorithm.filter_groups.enable=true (DAPO dynamic sampling) is refused with VIP: verl's replay buffer "
            "rejects a prompt VIP dropped (it finishes with no trajectories: 'Finished groups are missing DAPO "
            "metric'), and it evicts the all-correct / all-wrong groups before the allocator can observe them, "
            "which are exactly the outcomes VIP learns from; VIP's drops of predicted-solved / predicted-hopeless "
            "prompts replace the filter. Set algorithm.filter_groups.enable=false"
        )
    if _get(config, "async_training") is not None:
        out.append(f"an async_training config section means the verl.experimental trainer fully_async_policy: "
                   f"{FULLY_ASYNC_REFUSAL}")  # fmt: skip
    use_v1 = _get(config, "trainer", "use_v1")
    if vip.two_phase and (use_v1 is None or bool(use_v1)):
        out.append(
            "vip.two_phase=true is supported in the legacy loop only (trainer.use_v1=false): in the v1 loop a second "
            "generation round needs a second agent-loop submission of the same uid, whose sessions (numbered from 0 "
            "each time) would overwrite the pilot's TransferQueue keys {uid}_{session}_{index}, and the replay "
            "buffer may sample the group as soon as the pilot marks it finished; neither can be changed without "
            "copying verl code. Set trainer.use_v1=false or vip.two_phase=false"
        )
    reward_model = _get(config, "reward", "reward_model")
    if vip.two_phase and reward_model is not None and bool(_get(reward_model, "enable") or False):
        if not bool(_get(reward_model, "enable_resource_pool") or False):
            out.append(
                "vip.two_phase=true needs the pilot's rewards before the commit is planned, but a colocated reward "
                "model (reward.reward_model.enable=true, enable_resource_pool=false) scores the batch only after "
                "generation; use rule-based rewards or reward.reward_model.enable_resource_pool=true"
            )
    out.extend(token_refusals(vip))
    return out


TWO_PHASE_TOKEN_REFUSAL = (
    "vip.token_budget with vip.two_phase=true is refused by the verl plug-in (the engine's plan_pilot takes a token "
    "budget; the plug-in does not use it yet): the legacy loop needs each step's rows, pilot + commit, to be an exact "
    "multiple of DP x mini-batch rows fixed before generation (fit keeps len(gen_batch_output) rows), while under a "
    "token budget the commit's size is only known after the pilot; rounding the commit down is the missing piece. "
    "Set vip.token_budget=null or vip.two_phase=false"
)


def token_refusals(vip: VIPConfig) -> list[str]:
    """Reasons token mode (``vip.token_budget``) cannot run with this ``vip`` group (empty: accepted or not asked)."""
    if vip.token_budget is None:
        return []
    from vipalloc.strategies import get_strategy

    out = []
    if vip.two_phase:
        out.append(TWO_PHASE_TOKEN_REFUSAL)
    else:
        reason = get_strategy(vip.strategy).token_refusal
        if reason is not None:
            out.append(
                f"vip.token_budget with vip.strategy={vip.strategy!r} is refused: {reason}; set vip.token_budget=null "
                "or choose a strategy with a token mode"
            )
    return out


def config_warnings(config: Any, vip: VIPConfig) -> list[str]:
    """Caveats of an accepted run (each is logged and issued as a ``UserWarning`` by :func:`emit_warnings`)."""
    out = []
    adv = str(getattr(_get(config, "algorithm", "adv_estimator"), "value", _get(config, "algorithm", "adv_estimator")))
    norm = _get(config, "algorithm", "norm_adv_by_std_in_grpo")
    norm = True if norm is None else bool(norm)  # verl's default
    if (adv == "grpo" and norm) or adv == "grpo_vectorized":
        if adv == "grpo":
            why = "algorithm.norm_adv_by_std_in_grpo=true (verl's default)"
        else:
            why = "algorithm.adv_estimator=grpo_vectorized (verl 0.9.1 always std-normalises it)"
        out.append(
            f"{why}: verl divides each group's advantages by the group's reward std, but the allocator minimises "
            "the Dr.GRPO variance (no std normalisation), so the plan is optimal for Dr.GRPO, not for the objective "
            "being trained. For the paper's setting use algorithm.adv_estimator=grpo with "
            "algorithm.norm_adv_by_std_in_grpo=false"
        )
    return out


def emit_warnings(messages: list[str]) -> None:
    """Log each message and issue it as a ``UserWarning``."""
    for msg in messages:
        _warn(msg)


def _warn(msg: str) -> None:
    logger.warning("vipalloc: %s", msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


def _get(node: Any, *keys: str) -> Any:
    for key in keys:
        if node is None:
            return None
        node = node.get(key, None) if hasattr(node, "get") else getattr(node, key, None)
    return node


def _is_one_step_off(base: type) -> bool:
    try:
        from verl.experimental.one_step_off_policy.ray_trainer import OneStepOffRayTrainer
    except ImportError:  # pragma: no cover - ships with verl 0.9
        return False
    return issubclass(base, OneStepOffRayTrainer) and base.fit is OneStepOffRayTrainer.fit


def _missing(cls: type, names: tuple[str, ...], label: str) -> list[str]:
    return [f"{label}.{m} exists" for m in names if not callable(getattr(cls, m, None))]


def _missing_paths(cls: type, paths: tuple[tuple[str, str, str], ...], label: str) -> list[str]:
    out = []
    for method, needle, meaning in paths:
        fn = getattr(cls, method, None)
        src = _source(fn) if fn is not None else ""
        if src is not None and needle not in src:
            out.append(f"{meaning} ({label}.{method})")
    return out


def _source(fn: Callable[..., Any]) -> str | None:
    """Source text of ``fn``; ``None`` (skip the text check) when Python cannot find it (e.g. a compiled install)."""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        logger.info("vipalloc: no source for %r; skipping the code-path check", fn)
        return None


# --- verl.experimental.one_step_off_policy / fully_async_policy (decided in one_step_off's docstring)
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
        raise UnsupportedVerlError(
            f"{base.__name__} does not provide what the VIP plug-in hooks in one_step_off_policy: "
            + "; ".join(problems)
            + f". Supported: verl {SUPPORTED_VERL}, or set vip.enable=false"
        )
