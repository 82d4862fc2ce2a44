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
  go to ``Allocator.observe``; ``vip/*`` metrics (same names as the TRL plug-in) are logged with verl's metrics.
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

Use the entry point ``python -m vipalloc.integrations.verl_trainer`` (hydra, ``vip:`` config group).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

try:
    import torch
    from verl import DataProto
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('vipalloc.integrations.verl needs verl and ray: pip install "vipalloc[verl]"') from exc

from vipalloc import Allocator, Plan

__all__ = [
    "ALLOCATOR_FILE",
    "ADV_ESTIMATOR_TARGETS",
    "VIPConfig",
    "VIPHook",
    "divisible_budget",
    "expand_by_counts",
    "install_vip_trainers",
    "required_multiple",
    "resolve_estimator",
    "vip_v1_trainer_class",
]

logger = logging.getLogger(__name__)

ALLOCATOR_FILE = "vip_allocator.json"
# verl advantage estimators that build a per-uid baseline from however many rows share the uid, mapped to the
# variance model the allocator minimises (GRPO's std-normalised variance is no allocation target: use Dr.GRPO's).
ADV_ESTIMATOR_TARGETS: dict[str, str] = {
    "grpo": "drgrpo",
    "grpo_vectorized": "drgrpo",
    "rloo": "rloo",
    "rloo_vectorized": "rloo",
}
_ROLLOUT_N_KEY = "__rollout_n__"  # the per-prompt rollout count verl's v1 agent loop reads
_MAX_PLANS = 16  # plans kept for feedback (async v1 trainers observe a few steps after planning)


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class VIPConfig:
    """The ``vip:`` config group (``verl_config/vip/default.yaml`` mirrors these fields).

    ``budget``: rollouts per training batch (``None``: ``M x actor_rollout_ref.rollout.n``, the uniform budget); it is
    rounded down to a multiple of :func:`required_multiple`. ``estimator``: ``auto`` derives it from
    ``algorithm.adv_estimator`` (``grpo*`` -> ``drgrpo``, ``rloo*`` -> ``rloo``). ``prompt_id_key``: the non-tensor
    column that names a prompt across epochs (verl's datasets copy ``extra_info.index`` into ``index``); ``None`` or a
    missing/duplicated column falls back to a hash of the prompt text. ``success_key``: a reward-extra-info column
    holding the per-rollout success (e.g. ``acc``); rows without it use the summed token-level score. A rollout
    succeeds when its value is ``>= success_threshold``.
    """

    enable: bool = True
    budget: int | None = None
    n_min: int = 4
    n_max: int = 32
    strategy: str = "vip"
    predictor: str = "gp"
    estimator: str = "auto"
    embedder: str = "auto"
    seed: int = 0
    success_threshold: float = 0.5
    success_key: str | None = "acc"
    prompt_id_key: str | None = "index"
    prompt_text_key: str | None = "raw_prompt"
    save_allocator: bool = True
    predictor_kwargs: dict[str, Any] = field(default_factory=dict)
    strategy_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> VIPConfig:
        """Build from a dict / OmegaConf node, rejecting unknown keys with the list of valid ones."""
        data = dict(raw or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown vip config key(s) {unknown}; valid keys: {sorted(names)}")
        for key in ("predictor_kwargs", "strategy_kwargs"):
            data[key] = dict(data.get(key) or {})
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the fix for values verl cannot run with."""
        if isinstance(self.n_min, bool) or not isinstance(self.n_min, int) or self.n_min < 2:
            raise ValueError(
                f"vip.n_min must be an integer >= 2, got {self.n_min!r}: verl gives a group of size 1 its raw reward "
                "as advantage (mean 0, std 1), so a kept prompt needs at least 2 rollouts"
            )
        if isinstance(self.n_max, bool) or not isinstance(self.n_max, int) or self.n_max < self.n_min:
            raise ValueError(f"vip.n_max must be an integer >= vip.n_min ({self.n_min}), got {self.n_max!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)):
            raise ValueError(f"vip.budget must be an integer number of rollouts or null, got {self.budget!r}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"vip.budget must be >= 1 (or null for batch size x rollout.n), got {self.budget}")
        if self.estimator not in ("auto", "drgrpo", "rloo"):
            raise ValueError(f"vip.estimator must be 'auto', 'drgrpo' or 'rloo', got {self.estimator!r}")
        if not math.isfinite(float(self.success_threshold)):
            raise ValueError(f"vip.success_threshold must be finite, got {self.success_threshold!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_estimator(cfg: VIPConfig, adv_estimator: str) -> str:
    """The allocator's variance target for verl's ``algorithm.adv_estimator``; raises for unsupported estimators."""
    adv = str(getattr(adv_estimator, "value", adv_estimator))
    if adv not in ADV_ESTIMATOR_TARGETS:
        raise ValueError(
            f"algorithm.adv_estimator={adv!r} is not supported with VIP allocation: use one of "
            f"{sorted(ADV_ESTIMATOR_TARGETS)} (group baselines per uid), or set vip.enable=false"
        )
    if cfg.estimator == "auto":
        return ADV_ESTIMATOR_TARGETS[adv]
    return cfg.estimator


# ---------------------------------------------------------------------------------------------- batch arithmetic
def required_multiple(dp_size: int, actor_mini_rows: int | None = None, critic_mini_rows: int | None = None) -> int:
    """Rows per training batch must be a multiple of this: ``lcm(dp_size, actor mini-batch rows, critic ...)``.

    Mini-batch rows are ``ppo_mini_batch_size x rollout.n`` (verl counts mini-batches in prompts x n). With a
    multiple of this, every DP rank receives ``rows / dp_size`` rows and the same number of mini-batches.
    """
    out = _positive("dp_size", dp_size)
    for name, rows in (("actor mini-batch rows", actor_mini_rows), ("critic mini-batch rows", critic_mini_rows)):
        if rows is not None:
            out = math.lcm(out, _positive(name, rows))
    return out


def divisible_budget(budget: int, multiple: int, m: int, n_min: int, n_max: int) -> int:
    """Largest budget ``<= budget`` that is a multiple of ``multiple`` and feasible for ``m`` prompts.

    Feasible means ``m * n_min <= b <= m * n_max`` (every strategy keeps counts in ``[n_min, n_max]`` or drops a
    prompt while re-spending its share). Raises ``ValueError`` naming the fix when no such budget exists.
    """
    budget, multiple, m = _positive("budget", budget), _positive("multiple", multiple), _positive("prompts", m)
    hi = min(budget, m * n_max)
    b = hi - hi % multiple
    if b < m * n_min:
        raise ValueError(
            f"no budget <= {budget} that is a multiple of {multiple} (DP size x mini-batch rows) is feasible for {m} "
            f"prompts with n in [{n_min}, {n_max}] (need >= {m * n_min}); raise vip.budget or vip.n_max, lower "
            "vip.n_min, or use a ppo_mini_batch_size / DP size that divides the budget"
        )
    return b


def expand_by_counts(data: DataProto, counts: np.ndarray | Sequence[int]) -> DataProto:
    """Row ``i`` of ``data`` repeated ``counts[i]`` times, consecutively (``DataProto.sample_level_repeat``).

    ``counts``: int array of shape ``(len(data),)``; 0 removes the row. A count of 1 is refused: it would create a
    singleton uid group, which verl's GRPO scores with the raw reward instead of a zero advantage.
    """
    c = np.asarray(counts)
    if c.shape != (len(data),):
        raise ValueError(f"counts must have one entry per row ({len(data)}), got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"counts must be integers, got dtype {c.dtype}")
    if np.any(c < 0):
        raise ValueError("counts must be >= 0 (0 drops a prompt)")
    if np.any(c == 1):
        raise ValueError(
            "a count of 1 would make a singleton uid group (verl gives it its raw reward as advantage); use n_min >= 2"
        )
    if int(c.sum()) == 0:
        raise ValueError("counts are all 0: nothing would be generated; the plan must keep at least one prompt")
    out = data.sample_level_repeat(c.astype(np.int64))
    out.meta_info = dict(data.meta_info)  # sample_level_repeat shares the dict; keep the two batches independent
    return out


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------- the glue object
class VIPHook:
    """Allocator glue shared by both trainer loops: prompt ids, plan, uid bookkeeping, feedback, metrics, files.

    ``plan`` records which prompt and plan step every uid belongs to, so feedback works from any later view of the
    batch (verl moves the ``index`` column into the generation batch; the uid survives everywhere).
    """

    def __init__(self, cfg: VIPConfig, estimator: str) -> None:
        self.cfg = cfg
        self.estimator = estimator
        self.allocator = Allocator(
            strategy=cfg.strategy,
            predictor=cfg.predictor,
            estimator=estimator,
            n_min=cfg.n_min,
            n_max=cfg.n_max,
            seed=cfg.seed,
            embedder=cfg.embedder,
            predictor_kwargs=cfg.predictor_kwargs,
            strategy_kwargs=cfg.strategy_kwargs,
        )
        self._uids: dict[str, tuple[str, int]] = {}  # uid -> (prompt id, plan step)
        self._plans: dict[int, Plan] = {}
        self._last_plan_step = -1
        self._warned: set[str] = set()

    # -- prompt identity
    def prompt_ids(self, columns: Mapping[str, Sequence[Any]], m: int) -> list[str]:
        """Stable prompt ids for ``m`` rows: ``columns[prompt_id_key]`` when present and unique, else text hashes."""
        key = self.cfg.prompt_id_key
        if key is not None and key in columns:
            ids = [str(x) for x in _as_list(columns[key])]
            if len(ids) == m and len(set(ids)) == m:
                return ids
            self._warn_once(
                "dup-ids",
                f"prompt id column {key!r} is not unique within a batch (e.g. extra_info.index missing, so verl "
                "fills 0); falling back to hashes of the prompt text",
            )
        texts = self.prompt_texts(columns, m)
        if texts is None:
            raise ValueError(
                f"cannot identify prompts: no unique column {key!r} and no prompt text column "
                f"{self.cfg.prompt_text_key!r}; set vip.prompt_id_key to a non-tensor column that names each prompt"
            )
        import hashlib

        ids = ["h" + hashlib.sha1(t.encode("utf-8")).hexdigest()[:16] for t in texts]
        if len(set(ids)) != m:
            raise ValueError(
                "the same prompt appears twice in one training batch and has no unique id; give each dataset row a "
                "distinct extra_info.index (verl copies it into the 'index' column)"
            )
        return ids

    def prompt_texts(self, columns: Mapping[str, Sequence[Any]], m: int) -> list[str] | None:
        """Prompt texts for the embedder: the last message's content of a chat prompt, or ``str`` of the value."""
        key = self.cfg.prompt_text_key
        if key is None or key not in columns:
            return None
        out = []
        for x in _as_list(columns[key]):
            if isinstance(x, (list, tuple, np.ndarray)) and len(x) and isinstance(x[-1], Mapping):
                out.append(str(x[-1].get("content", "")))
            else:
                out.append(str(x))
        return out if len(out) == m else None

    # -- plan
    def plan(self, ids: list[str], texts: list[str] | None, uids: Sequence[Any], budget: int, step: int) -> Plan:
        """Plan ``budget`` rollouts over the prompts ``ids`` (aligned with ``uids``) at training ``step``.

        Plan steps are unique and increasing: a second submission in the same training step (v1 DAPO refills, async
        prefetch) is planned at the next free step, so each plan keeps its own pending record in the allocator. With
        one plan per training step (the usual case) the plan step is the training step.
        """
        if len(uids) != len(ids):
            raise ValueError(f"got {len(ids)} prompt ids but {len(uids)} uids")
        step = max(int(step), self._last_plan_step + 1)
        t0 = time.perf_counter()
        plan = self.allocator.plan(ids, prompts=texts, budget=budget, step=step)
        self._last_plan_step = step
        if np.any(plan.counts == 1):  # the strategies keep counts in {0} U [n_min, n_max]; guard verl's gotcha anyway
            raise RuntimeError(f"strategy {self.cfg.strategy!r} planned a group of size 1; report this as a bug")
        plan.timings["total"] = time.perf_counter() - t0
        for u, pid in zip(uids, ids):
            self._uids[str(u)] = (pid, step)
        self._plans[step] = plan
        for old in sorted(self._plans)[:-_MAX_PLANS]:  # the allocator keeps the same newest plans pending
            self._forget(old)
        return plan

    def _forget(self, step: int) -> None:
        self._plans.pop(step, None)
        for u in [u for u, (_, s) in self._uids.items() if s == step]:
            del self._uids[u]

    # -- feedback
    def observe(self, uids: Sequence[Any], success: np.ndarray) -> dict[str, float]:
        """Record one 0/1 outcome per row (rows grouped by uid) and return the ``vip/*`` metrics.

        Rows whose uid was not planned here (verl's padding rows, validation) are ignored. Each planned prompt is
        observed once; a later call for the same uid is ignored.
        """
        success = np.asarray(success, dtype=np.float64).reshape(-1)
        if len(uids) != len(success):
            raise ValueError(f"got {len(uids)} uids but {len(success)} outcomes")
        by_step: dict[int, dict[str, list[float]]] = {}
        for u, s in zip(uids, success):
            hit = self._uids.get(str(u))
            if hit is not None:
                by_step.setdefault(hit[1], {}).setdefault(hit[0], []).append(float(s))
        metrics: dict[str, float] = {}
        for step, groups in sorted(by_step.items()):
            plan = self._plans[step]
            planned = dict(zip(plan.prompt_ids, plan.counts.tolist()))
            # A multi-output agent loop or a retried session could report more rows than planned: keep the first.
            ids = [pid for pid in plan.prompt_ids if pid in groups]
            rewards = [np.asarray(groups[pid][: planned[pid]]) for pid in ids]
            self.allocator.observe(ids, rewards, step=step)
            metrics = self._metrics(plan, dict(zip(ids, rewards)))
            done = set(ids)
            for u in [u for u, (pid, s) in self._uids.items() if s == step and pid in done]:
                del self._uids[u]
        return metrics

    @staticmethod
    def _metrics(plan: Plan, outcomes: dict[str, np.ndarray]) -> dict[str, float]:
        counts = plan.counts
        kept = counts > 0
        observed = [pid for pid in plan.prompt_ids if pid in outcomes and len(outcomes[pid])]
        zero_std = [float(outcomes[p].min() == outcomes[p].max()) for p in observed]
        idx = {pid: i for i, pid in enumerate(plan.prompt_ids)}
        err = [abs(plan.p_mean[idx[p]] - float(outcomes[p].mean())) for p in observed]
        return {
            "vip/mean_n": float(counts[kept].mean()) if kept.any() else 0.0,
            "vip/max_n": float(counts.max()),
            "vip/frac_dropped": float((~kept).mean()),
            "vip/frac_zero_std": float(np.mean(zero_std)) if zero_std else 0.0,
            "vip/pred_abs_err": float(np.mean(err)) if err else 0.0,
            "vip/expected_var_ratio_vs_uniform": float(plan.variance_ratio),
            "vip/budget": float(plan.budget),
            "vip/plan_time_s": float(plan.timings.get("total", 0.0)),
        }

    def successes(self, scores: np.ndarray, extra: Sequence[Any] | None) -> np.ndarray:
        """0/1 per row: ``extra`` (the ``success_key`` column) when given, else the summed score, vs the threshold."""
        vals = np.asarray(scores, dtype=np.float64) if extra is None else np.asarray(extra, dtype=np.float64)
        if not np.all(np.isfinite(vals)):
            raise ValueError("non-finite rewards reached the VIP feedback; check the reward function")
        return (vals >= float(self.cfg.success_threshold)).astype(np.float64)

    # -- state
    def save(self, folder: str) -> str:
        """Write ``folder/vip_allocator.json`` atomically; returns the path."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, ALLOCATOR_FILE)
        self.allocator.save(path)
        return path

    def load(self, folder: str) -> bool:
        """Restore the allocator from ``folder`` if it holds one; returns whether it did."""
        path = os.path.join(folder, ALLOCATOR_FILE)
        if not os.path.exists(path):
            self._warn_once("no-file", f"no {ALLOCATOR_FILE} in {folder}: the allocator starts without history")
            return False
        self.allocator = Allocator.load(path)
        self._uids.clear()
        self._plans.clear()
        # keep plan steps increasing across the resume (the allocator records the last step it planned or observed)
        self._last_plan_step = int(getattr(self.allocator, "_last_step", -1))
        return True

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("vipalloc: %s", msg)


def _as_list(col: Any) -> list[Any]:
    if isinstance(col, torch.Tensor):
        return col.tolist()
    if hasattr(col, "tolist"):
        return list(col.tolist())
    return list(col)


def _resumed_folder(config: Any, global_steps: int) -> str | None:
    """The ``global_step_<k>`` folder verl just resumed from (``None`` when it started fresh)."""
    if global_steps <= 0 or config.trainer.resume_mode == "disable":
        return None
    if config.trainer.resume_mode == "resume_path" and config.trainer.resume_from_path:
        folder = str(config.trainer.resume_from_path)
    else:
        folder = os.path.join(str(config.trainer.default_local_dir), f"global_step_{global_steps}")
    return folder if os.path.isabs(folder) else os.path.join(os.getcwd(), folder)


def _dp_size(worker_group: Any, fallback: int) -> int:
    """Data-parallel size of the actor, from verl's dispatch info (cached by verl itself)."""
    try:
        info = worker_group._dispatch_info.get("actor")
        if info is None:
            info = worker_group._query_dispatch_info("actor")
            worker_group._dispatch_info["actor"] = info
        return int(max(info)) + 1
    except (AttributeError, TypeError, ValueError):
        return fallback


def _make_hook(config: Any) -> VIPHook:
    cfg = VIPConfig.from_mapping(_to_container(config.get("vip", None)))
    if cfg.enable:
        adv = str(config.algorithm.adv_estimator)
        if adv == "remax":
            raise ValueError("vip allocation does not support algorithm.adv_estimator=remax; use grpo or rloo")
        estimator = resolve_estimator(cfg, adv)
    else:
        estimator = cfg.estimator if cfg.estimator != "auto" else "drgrpo"
    return VIPHook(cfg, estimator)


def _to_container(node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return dict(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - omegaconf ships with verl
        pass
    return dict(node)


def _mini_rows(config: Any, use_critic: bool) -> tuple[int, int | None]:
    n = int(config.actor_rollout_ref.rollout.n)
    actor = int(config.actor_rollout_ref.actor.ppo_mini_batch_size) * n
    critic = int(config.critic.ppo_mini_batch_size) * n if use_critic else None
    return actor, critic


# ------------------------------------------------------------------------------------------- legacy (v0) trainer
def _one_shot_plan(data: DataProto, counts: np.ndarray) -> None:
    """Make the next ``data.repeat(...)`` expand ``data`` by ``counts`` instead (once), leaving the class alone.

    verl's legacy ``fit`` calls ``gen_batch.repeat(rollout.n)`` before generation and ``batch.repeat(rollout.n)``
    after it; an instance attribute shadows the method for exactly those two objects and removes itself on use.
    """

    def repeat(repeat_times: int = 2, interleave: bool = True) -> DataProto:
        del data.__dict__["repeat"]
        if not interleave:
            raise ValueError("VIP expansion needs interleave=True (verl's fit uses it); got interleave=False")
        return expand_by_counts(data, counts)

    data.__dict__["repeat"] = repeat


class _VIPTrainerMixin:
    """What both verl trainer loops share: the lazily built hook and the allocator file in verl's checkpoints.

    Listed before verl's trainer class in the bases, so ``super()`` reaches verl's own methods.
    """

    config: Any
    global_steps: int

    def _vip(self) -> VIPHook:
        hook = self.__dict__.get("_vip_hook")
        if hook is None:
            hook = _make_hook(self.config)
            self._vip_hook = hook
        return hook

    def _save_checkpoint(self) -> None:
        hook = self._vip()
        if hook.cfg.save_allocator:  # before verl writes latest_checkpointed_iteration.txt
            hook.save(os.path.join(str(self.config.trainer.default_local_dir), f"global_step_{self.global_steps}"))
        super()._save_checkpoint()  # type: ignore[misc]

    def _load_checkpoint(self) -> Any:
        out = super()._load_checkpoint()  # type: ignore[misc]
        folder = _resumed_folder(self.config, int(getattr(self, "global_steps", 0)))
        if folder is not None:
            self._vip().load(folder)
        return out


def _make_v0_trainer_class() -> type:
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    class RayVIPTrainer(_VIPTrainerMixin, RayPPOTrainer):  # type: ignore[misc, valid-type]
        """verl's legacy Ray PPO/GRPO trainer (``trainer.use_v1=false``) with VIP allocation (config group ``vip``)."""

        def _validate(self, *args: Any, **kwargs: Any) -> Any:
            self._vip_validating = True  # _validate also calls _get_gen_batch; validation is never re-allocated
            try:
                return super()._validate(*args, **kwargs)
            finally:
                self._vip_validating = False

        def _get_gen_batch(self, batch: DataProto) -> DataProto:
            hook = self._vip()
            if not hook.cfg.enable or getattr(self, "_vip_validating", False):
                return super()._get_gen_batch(batch)
            counts = self._vip_plan(batch)  # before the parent moves the id / text columns out of `batch`
            gen_batch = super()._get_gen_batch(batch)
            _one_shot_plan(gen_batch, counts)  # fit(): gen_batch.repeat(n) before generation
            _one_shot_plan(batch, counts)  # fit(): batch.repeat(n) after generation
            return gen_batch

        def _vip_plan(self, batch: DataProto) -> np.ndarray:
            hook = self._vip()
            m = len(batch)
            ntb = batch.non_tensor_batch
            ids, texts = hook.prompt_ids(ntb, m), hook.prompt_texts(ntb, m)
            n = int(self.config.actor_rollout_ref.rollout.n)
            fallback = int(self.config.trainer.n_gpus_per_node) * int(self.config.trainer.nnodes)
            dp = _dp_size(self.actor_rollout_wg, fallback)
            multiple = required_multiple(dp, *_mini_rows(self.config, self.use_critic))
            requested = hook.cfg.budget if hook.cfg.budget is not None else m * n
            budget = divisible_budget(requested, multiple, m, hook.cfg.n_min, hook.cfg.n_max)
            if budget != requested:
                hook._warn_once("budget", f"budget {requested} rounded down to {budget} (a multiple of {multiple})")
            return hook.plan(ids, texts, ntb["uid"], budget, int(self.global_steps)).counts

        def _vip_feedback(self, batch: DataProto) -> dict[str, float]:
            hook = self._vip()
            if not hook.cfg.enable or getattr(self, "_vip_observed_step", None) == self.global_steps:
                return {}
            self._vip_observed_step = self.global_steps
            scores = batch.batch["token_level_scores"].sum(-1).detach().cpu().double().numpy()
            key = hook.cfg.success_key
            extra = batch.non_tensor_batch.get(key) if key else None
            return hook.observe(batch.non_tensor_batch["uid"], hook.successes(scores, extra))

        def _vip_attach(self, output: DataProto, metrics: dict[str, float]) -> DataProto:
            if metrics:
                sink = output.meta_info.setdefault("metrics", {})
                for k, v in metrics.items():
                    sink[k] = [v]
            return output

        # Rewards are final (token_level_scores) when the critic or the actor is updated; whichever runs first
        # observes (a GRPO run has no critic; a critic-warmup step has no actor update).
        def _update_critic(self, batch: DataProto) -> DataProto:
            metrics = self._vip_feedback(batch)
            return self._vip_attach(super()._update_critic(batch), metrics)

        def _update_actor(self, batch: DataProto) -> DataProto:
            metrics = self._vip_feedback(batch)
            return self._vip_attach(super()._update_actor(batch), metrics)

    return RayVIPTrainer


# ------------------------------------------------------------------------------------------------ v1 trainer
_V1_CLASSES: dict[type, type] = {}


def vip_v1_trainer_class(base: type) -> type:
    """A subclass of a verl v1 trainer (``PPOTrainerSync``, ``...ColocateAsync``, ``...SeparateAsync``) with VIP.

    * ``_submit_batch_to_rollout``: plans the submitted prompts and writes each count into ``__rollout_n__``, which
      verl's agent loop uses instead of ``rollout.n``; a dropped prompt (0) finishes with no trajectory. A full
      training batch gets the budget rounded to ``_get_required_batch_multiple`` (no padding rows); smaller
      submissions (DAPO refills, async chunks) get the proportional share and verl pads as usual.
    * ``_compute_advantage``: reads ``rm_scores`` (and the success column) of the sampled trajectories from the
      TransferQueue, observes, and adds ``vip/*`` to the step metrics.
    * ``_save_checkpoint`` / ``_load_checkpoint``: the allocator file beside verl's checkpoint.
    """
    if base in _V1_CLASSES:
        return _V1_CLASSES[base]

    class VIPTrainerV1(_VIPTrainerMixin, base):  # type: ignore[misc, valid-type]
        def _submit_batch_to_rollout(self, batch: Any) -> int:
            hook = self._vip()
            if hook.cfg.enable:
                counts = self._vip_plan(batch)
                batch[_ROLLOUT_N_KEY] = torch.as_tensor(counts, dtype=torch.int64)
            return super()._submit_batch_to_rollout(batch)

        def _vip_plan(self, batch: Any) -> np.ndarray:
            hook = self._vip()
            m = len(batch)
            wanted = [k for k in (hook.cfg.prompt_id_key, hook.cfg.prompt_text_key, "uid") if k is not None]
            cols = {k: batch.get(k) for k in wanted if k in batch.keys()}
            ids, texts = hook.prompt_ids(cols, m), hook.prompt_texts(cols, m)
            n = int(self.config.actor_rollout_ref.rollout.n)
            train_bs = int(self.config.data.train_batch_size)
            full = hook.cfg.budget if hook.cfg.budget is not None else train_bs * n
            if m == train_bs:
                fallback = int(self.config.trainer.n_gpus_per_node) * int(self.config.trainer.nnodes)
                multiple = self._get_required_batch_multiple(_dp_size(self.actor_rollout_wg, fallback))
                budget = divisible_budget(full, multiple, m, hook.cfg.n_min, hook.cfg.n_max)
            else:
                budget = int(round(full * m / train_bs))
                budget = min(max(budget, m * hook.cfg.n_min), m * hook.cfg.n_max)
            step = int(getattr(self, "global_steps", 0))
            return hook.plan(ids, texts, _as_list(cols["uid"]), budget, step).counts

        def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
            hook = self._vip()
            if hook.cfg.enable:
                metrics.update(self._vip_feedback(batch))
            return super()._compute_advantage(batch, metrics)

        def _vip_feedback(self, batch: Any) -> dict[str, float]:
            import transfer_queue as tq

            hook = self._vip()
            rows = _final_rows(batch.keys, batch.tags)
            if not rows:
                return {}
            keys = [batch.keys[i] for i in rows]
            key = hook.cfg.success_key
            try:
                fields_ = ["rm_scores", "extra_fields"] if key else ["rm_scores"]
                data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=fields_)
            except (KeyError, ValueError):  # no extra_fields stored (custom agent loop): use the scores
                key = None
                data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=["rm_scores"])
            scores = np.array([float(t.sum()) for t in data["rm_scores"].unbind()], dtype=np.float64)
            extra = _v1_success_column(data, key, len(keys)) if key else None
            uids = [k.rsplit("_", 2)[0] for k in keys]
            return hook.observe(uids, hook.successes(scores, extra))

    VIPTrainerV1.__name__ = VIPTrainerV1.__qualname__ = f"VIP{base.__name__}"
    _V1_CLASSES[base] = VIPTrainerV1
    return VIPTrainerV1


def _final_rows(keys: Sequence[str], tags: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of one row per ``{uid}_{session}`` (its last output), skipping verl's padding rows."""
    best: dict[str, tuple[int, int]] = {}
    for i, (k, tag) in enumerate(zip(keys, tags)):
        if tag.get("is_padding", False):
            continue
        uid, session, index = k.rsplit("_", 2)
        sk = f"{uid}_{session}"
        if sk not in best or best[sk][0] < int(index):
            best[sk] = (int(index), i)
    return sorted(i for _, i in best.values())


def _v1_success_column(data: Any, key: str, n: int) -> list[float] | None:
    """``extra_fields['reward_extra_info'][key]`` per row, or ``None`` when any row lacks it."""
    try:
        extras = list(data["extra_fields"])
    except KeyError:
        return None
    out = []
    for e in extras:
        e = getattr(e, "data", e)
        info = e.get("reward_extra_info", {}) if isinstance(e, Mapping) else {}
        if key not in info:
            return None
        out.append(float(info[key]))
    return out if len(out) == n else None


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
            registry[mode] = vip_v1_trainer_class(cls)
        main_ppo_v0.RayPPOTrainer = __getattr__("RayVIPTrainer")  # type: ignore[misc]
        yield
    finally:
        registry.clear()
        registry.update(saved_registry)
        main_ppo_v0.RayPPOTrainer = saved_v0  # type: ignore[misc]


def __getattr__(name: str) -> Any:  # the legacy trainer pulls verl's whole trainer stack: build it on first use
    if name == "RayVIPTrainer":
        cls = _make_v0_trainer_class()
        globals()["RayVIPTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
