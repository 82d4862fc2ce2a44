"""verl plug-in, part 4: the trainer subclasses for verl's two loops (legacy ``RayPPOTrainer``, v1 TransferQueue).

Both are built on first use (importing verl's trainer stack is slow) by :func:`vip_trainer_class` /
:func:`vip_v1_trainer_class`, which refuse bases whose loop the overrides would not reach
(:func:`~vipalloc.integrations.verl.checks.check_trainer_base`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from verl import DataProto

from vipalloc.integrations.verl.checks import (
    check_hook_points,
    check_trainer_base,
    check_verl_version,
    config_refusals,
    config_warnings,
    emit_warnings,
)
from vipalloc.integrations.verl.core import VIPConfig, divisible_budget, expand_by_counts, required_multiple
from vipalloc.integrations.verl.core import resolve_estimator as _resolve_estimator
from vipalloc.integrations.verl.hook import PlanNotAppliedError, VIPHook
from vipalloc.integrations.verl.layers import as_list
from vipalloc.integrations.verl.multiturn import episode_rows, generated_tokens, row_generated_tokens

__all__ = ["vip_trainer_class", "vip_v1_trainer_class"]

_ROLLOUT_N_KEY = "__rollout_n__"  # the per-prompt rollout count verl's v1 agent loop reads
_V0_WHERE = "RayPPOTrainer.fit must expand the batches _get_gen_batch marked via .repeat(), every row generated"
_V1_WHERE = "verl's v1 agent loop must start __rollout_n__ sessions per prompt (verl/trainer/ppo/v1/agent_loop_tq.py)"


# ------------------------------------------------------------------------------------------------- shared parts
def make_hook(config: Any, use_v1: bool) -> VIPHook:
    """The hook for a trainer process: the ``vip`` group validated, refusals raised, hook points checked."""
    cfg = VIPConfig.from_mapping(to_container(config.get("vip", None)))
    if not cfg.enable:
        return VIPHook(cfg, cfg.estimator if cfg.estimator != "auto" else "drgrpo")
    refusals = config_refusals(config, cfg)
    if use_v1 and cfg.two_phase and not any("two_phase" in r for r in refusals):
        refusals.append("vip.two_phase=true is supported in the legacy loop only (trainer.use_v1=false)")
    if refusals:
        raise ValueError("; ".join(refusals))
    estimator = _resolve_estimator(cfg, str(config.algorithm.adv_estimator))
    check_verl_version()
    check_hook_points(use_v1, cfg.two_phase)
    emit_warnings(config_warnings(config, cfg))
    return VIPHook(cfg, estimator, max_length=_response_length(config))


def _response_length(config: Any) -> int | None:
    """verl's ``rollout.response_length`` (tokens; the most one rollout's response may hold), ``None`` if unset."""
    try:
        return int(config.actor_rollout_ref.rollout.response_length)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def to_container(node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return dict(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - omegaconf ships with verl
        pass
    return dict(node)


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


def _mini_rows(config: Any, use_critic: bool) -> tuple[int, int | None]:
    n = int(config.actor_rollout_ref.rollout.n)
    actor = int(config.actor_rollout_ref.actor.ppo_mini_batch_size) * n
    critic = int(config.critic.ppo_mini_batch_size) * n if use_critic else None
    return actor, critic


class _VIPTrainerMixin:
    """What both verl trainer loops share: the lazily built hook and the allocator file in verl's checkpoints.

    Listed before verl's trainer class in the bases, so ``super()`` reaches verl's own methods.
    """

    config: Any
    global_steps: int
    _vip_use_v1: bool = False

    def _vip(self) -> VIPHook:
        hook = self.__dict__.get("_vip_hook")
        if hook is None:
            hook = make_hook(self.config, self._vip_use_v1)
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


_V0_CLASSES: dict[type, type] = {}


def vip_trainer_class(base: type | None = None) -> type:
    """A subclass of verl's legacy ``RayPPOTrainer`` (``trainer.use_v1=false``) with VIP allocation.

    Overrides ``_get_gen_batch`` (plan, then mark the two objects ``fit`` will ``repeat(rollout.n)`` so that
    their next ``repeat`` expands by the plan), ``_validate`` (never re-allocated), ``_update_critic`` /
    ``_update_actor`` (whichever runs first observes), and the checkpoint methods. ``base`` defaults to
    ``RayPPOTrainer``; other bases are refused unless they keep its loop (``check_trainer_base``).
    """
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    base = RayPPOTrainer if base is None else base
    check_trainer_base(base, use_v1=False)
    if base in _V0_CLASSES:
        return _V0_CLASSES[base]

    class RayVIPTrainer(_VIPTrainerMixin, base):  # type: ignore[misc, valid-type]
        """verl's legacy Ray PPO/GRPO trainer (``trainer.use_v1=false``) with VIP allocation (config group ``vip``)."""

        _vip_use_v1 = False

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
            if hook.cfg.two_phase:
                return self._vip_two_phase(batch)
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
            budget, multiple = self._vip_budget_and_multiple(m)
            n = int(self.config.actor_rollout_ref.rollout.n)
            # rows must be a multiple here (no padding in this loop): a token plan is rounded down to one
            plan = hook.plan(ids, texts, ntb["uid"], budget, int(self.global_steps), rollout_n=n, multiple=multiple)
            return plan.counts

        def _vip_two_phase(self, batch: DataProto) -> DataProto:
            """Plan the pilot, and arrange for fit()'s one generation call to run pilot then commit (see
            :class:`_TwoPhaseStep`) and for ``batch.repeat`` to expand by the final pilot + commit groups."""
            hook = self._vip()
            m, ntb = len(batch), batch.non_tensor_batch
            ids, texts = hook.prompt_ids(ntb, m), hook.prompt_texts(ntb, m)
            uids = [str(u) for u in ntb["uid"]]
            pilot = hook.plan_pilot(ids, texts, uids, self._vip_budget(m), int(self.global_steps))
            gen_batch = super()._get_gen_batch(batch)
            state = _TwoPhaseStep(self, pilot.step, uids, gen_batch, pilot.counts, self._vip_budget(m))
            self._vip_two_phase_step = state
            manager: Any = getattr(self, "async_rollout_manager")  # noqa: B009 - set by verl's init_workers
            if not isinstance(manager, _TwoPhaseRollout):
                self.async_rollout_manager = _TwoPhaseRollout(self, manager)

            def gen_repeat(repeat_times: int = 2, interleave: bool = True) -> DataProto:
                del gen_batch.__dict__["repeat"]
                state.pilot_batch = expand_by_counts(gen_batch, pilot.counts)
                state.pilot_view = _PilotView.of(state.pilot_batch, final_rows=state.budget)
                return state.pilot_view

            def batch_repeat(repeat_times: int = 2, interleave: bool = True) -> DataProto:
                del batch.__dict__["repeat"]
                if state.group_sizes is None:
                    raise PlanNotAppliedError(
                        f"fit() expanded the batch before the two-phase generation ran ({_V0_WHERE})"
                    )
                return expand_by_counts(batch, state.group_sizes)

            gen_batch.__dict__["repeat"] = gen_repeat
            batch.__dict__["repeat"] = batch_repeat
            return gen_batch

        def _vip_budget(self, m: int) -> int:
            return self._vip_budget_and_multiple(m)[0]

        def _vip_budget_and_multiple(self, m: int) -> tuple[int, int]:
            """The step's rollout budget (exact; the cap in token mode) and the multiple its rows must be."""
            hook = self._vip()
            n = int(self.config.actor_rollout_ref.rollout.n)
            fallback = int(self.config.trainer.n_gpus_per_node) * int(self.config.trainer.nnodes)
            dp = _dp_size(self.actor_rollout_wg, fallback)
            multiple = required_multiple(dp, *_mini_rows(self.config, self.use_critic))
            requested = hook.cfg.budget if hook.cfg.budget is not None else m * n
            budget = divisible_budget(requested, multiple, m, hook.cfg.n_min, hook.cfg.n_max)
            if budget != requested:
                hook._warn_once("budget", f"budget {requested} rounded down to {budget} (a multiple of {multiple})")
            return budget, multiple

        def _vip_feedback(self, batch: DataProto) -> dict[str, float]:
            hook = self._vip()
            if not hook.cfg.enable or getattr(self, "_vip_observed_step", None) == self.global_steps:
                return {}
            self._vip_observed_step = self.global_steps
            scores = batch.batch["token_level_scores"].sum(-1).detach().cpu().double().numpy()
            key = hook.cfg.success_key
            extra = batch.non_tensor_batch.get(key) if key else None
            success = hook.successes(scores, extra)
            return hook.observe(
                batch.non_tensor_batch["uid"], success, exact=True, where=_V0_WHERE, lengths=_batch_tokens(batch)
            )

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

    if base is not RayPPOTrainer:
        RayVIPTrainer.__name__ = RayVIPTrainer.__qualname__ = f"VIP{base.__name__}"
    _V0_CLASSES[base] = RayVIPTrainer
    return RayVIPTrainer


class _TwoPhaseStep:
    """One legacy step with ``vip.two_phase``: fit() makes one ``generate_sequences`` call on the pilot batch; it
    becomes pilot generation, pilot feedback, ``plan_commit``, commit generation and commit feedback, and returns the
    rows of both rounds ordered prompt by prompt (pilot rows, then commit rows) as ``batch.repeat`` lays them out."""

    def __init__(
        self, trainer: Any, step: int, uids: list[str], gen_batch: DataProto, pilot: np.ndarray, budget: int
    ) -> None:
        self.trainer, self.step, self.uids, self.gen_batch, self.pilot = trainer, step, uids, gen_batch, pilot
        self.budget = budget  # pilot + commit rows of the step (exact)
        self.pilot_batch: DataProto | None = None
        self.pilot_view: DataProto | None = None
        self.group_sizes: np.ndarray | None = None

    def run(self, manager: Any) -> DataProto:
        hook: VIPHook = self.trainer._vip()
        assert self.pilot_batch is not None
        pilot_out = manager.generate_sequences(self.pilot_batch)
        pilot_uids = np.repeat(self.uids, self.pilot).tolist()
        pilot_res, pilot_len = hook.observe_phase(
            pilot_uids, self._successes(hook, pilot_out), _V0_WHERE, lengths=_batch_tokens(pilot_out)
        )
        commit = hook.plan_commit(self.step, self.uids)
        parts, counts = [pilot_out], [self.pilot]
        commit_res: dict[str, np.ndarray] = {}
        commit_len: dict[str, np.ndarray] | None = {}
        if int(commit.counts.sum()) > 0:
            # an extra count of 1 joins the pilot's group (never a singleton), so expand without expand_by_counts' guard
            commit_batch = self.gen_batch.sample_level_repeat(commit.counts.astype(np.int64))
            commit_batch.meta_info = dict(self.gen_batch.meta_info)
            commit_out = manager.generate_sequences(commit_batch)
            commit_uids = np.repeat(self.uids, commit.counts).tolist()
            commit_res, commit_len = hook.observe_phase(
                commit_uids, self._successes(hook, commit_out), _V0_WHERE, lengths=_batch_tokens(commit_out)
            )
            parts.append(commit_out)
            counts.append(commit.counts)
        lens = None if pilot_len is None or commit_len is None else (pilot_len, commit_len)
        hook.finish_two_phase(self.step, self.uids, pilot_res, commit_res, lengths=lens)
        self.group_sizes = commit.group_sizes
        out = _interleave_rounds(parts, counts)
        if len(out) != self.budget:
            raise RuntimeError(f"two-phase step generated {len(out)} rows, not its budget {self.budget}; report this")
        return out

    @staticmethod
    def _successes(hook: VIPHook, out: DataProto) -> np.ndarray:
        if "rm_scores" not in out.batch.keys():
            raise ValueError(
                "vip.two_phase needs rewards computed during generation (rm_scores in the rollout output) to plan "
                "the commit; use rule-based rewards or reward.reward_model.enable_resource_pool=true"
            )
        scores = out.batch["rm_scores"].sum(-1).detach().cpu().double().numpy()
        key = hook.cfg.success_key
        return hook.successes(scores, out.non_tensor_batch.get(key) if key else None)


class _TwoPhaseRollout:
    """Wraps the trainer's rollout manager: the marked pilot batch runs both rounds, everything else passes."""

    def __init__(self, trainer: Any, inner: Any) -> None:
        self._vip_trainer, self._vip_inner = trainer, inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vip_inner, name)

    def generate_sequences(self, gen_batch: DataProto) -> DataProto:
        state = self._vip_trainer.__dict__.get("_vip_two_phase_step")
        if state is None or gen_batch is not state.pilot_view:
            return self._vip_inner.generate_sequences(gen_batch)
        self._vip_trainer._vip_two_phase_step = None
        return state.run(self._vip_inner)


class _PilotView(DataProto):
    """The pilot batch as fit() sees it: same rows, but ``len`` is the step's final row count (pilot + commit).

    verl's legacy fit() keeps the first ``len(gen_batch_output)`` rows of the generation output (taken before
    generation, for REMAX's baseline rows), so the pilot batch must report the size both rounds will have. It is
    only ever handed to :class:`_TwoPhaseRollout`, which generates from the real pilot batch.
    """

    _vip_final_rows = 0

    @classmethod
    def of(cls, data: DataProto, final_rows: int) -> _PilotView:
        view = cls(batch=data.batch, non_tensor_batch=data.non_tensor_batch, meta_info=data.meta_info)
        view._vip_final_rows = int(final_rows)
        return view

    def __len__(self) -> int:
        return self._vip_final_rows


def _batch_tokens(data: DataProto) -> np.ndarray | None:
    """Generated tokens per row of a legacy batch (``response_mask`` summed: int64 ``(R,)``), ``None`` without it."""
    keys = data.batch.keys() if data.batch is not None else ()
    return row_generated_tokens(data.batch["response_mask"]) if "response_mask" in keys else None


def _interleave_rounds(parts: list[DataProto], counts: list[np.ndarray]) -> DataProto:
    """Concatenate generation rounds and order the rows prompt by prompt: round 0's rows of prompt 0, round 1's rows
    of prompt 0, ..., then prompt 1. ``counts[r]`` int ``(M,)``: rows of each prompt in round ``r``."""
    timing: dict[str, float] = {}
    for part in parts:
        for k, v in dict(part.meta_info.pop("timing", {}) or {}).items():
            timing[k] = timing.get(k, 0.0) + float(v)
    merged = parts[0] if len(parts) == 1 else DataProto.concat(parts)
    offsets = [0]
    for c in counts[:-1]:
        offsets.append(offsets[-1] + int(c.sum()))
    starts = [off + np.concatenate([[0], np.cumsum(c)[:-1]]) for off, c in zip(offsets, counts)]
    order = [
        int(starts[r][i]) + j
        for i in range(len(counts[0]))
        for r in range(len(counts))
        for j in range(int(counts[r][i]))
    ]
    merged.reorder(torch.as_tensor(order, dtype=torch.long))
    merged.meta_info["timing"] = timing
    return merged


# ------------------------------------------------------------------------------------------------ v1 trainer
_V1_CLASSES: dict[type, type] = {}


def vip_v1_trainer_class(base: type) -> type:
    """A subclass of a verl v1 trainer (``PPOTrainerSync``, ``...ColocateAsync``, ``...SeparateAsync``) with VIP.

    * ``_submit_batch_to_rollout``: plans the submitted prompts and writes each count into ``__rollout_n__``, which
      verl's agent loop uses instead of ``rollout.n``; a dropped prompt (0) finishes with no trajectory. A full
      training batch gets the budget rounded to ``_get_required_batch_multiple`` (no padding rows); smaller
      submissions (async refills) get the proportional share and verl pads as usual.
    * ``_compute_advantage``: reads ``rm_scores`` (and the success column) of the sampled trajectories from the
      TransferQueue, checks every group's size against its plan, observes, and adds ``vip/*`` to the step metrics.
    * ``_save_checkpoint`` / ``_load_checkpoint``: the allocator file beside verl's checkpoint.
    """
    check_trainer_base(base, use_v1=True)
    if base in _V1_CLASSES:
        return _V1_CLASSES[base]

    class VIPTrainerV1(_VIPTrainerMixin, base):  # type: ignore[misc, valid-type]
        _vip_use_v1 = True

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
            # rows need not be a multiple in this loop: _balance_batch pads with verl's no-op rows (as for refills and
            # failed sessions), so a token plan is used as planned, never cut
            if m == train_bs:
                fallback = int(self.config.trainer.n_gpus_per_node) * int(self.config.trainer.nnodes)
                multiple = self._get_required_batch_multiple(_dp_size(self.actor_rollout_wg, fallback))
                budget = divisible_budget(full, multiple, m, hook.cfg.n_min, hook.cfg.n_max)
            else:
                budget = int(round(full * m / train_bs))
                budget = min(max(budget, m * hook.cfg.n_min), m * hook.cfg.n_max)
            step = int(getattr(self, "global_steps", 0))
            plan = hook.plan(ids, texts, as_list(cols["uid"]), budget, step, rollout_n=n, share=m / train_bs)
            return plan.counts

        def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
            hook = self._vip()
            if hook.cfg.enable:
                metrics.update(self._vip_feedback(batch))
            return super()._compute_advantage(batch, metrics)

        def _vip_feedback(self, batch: Any) -> dict[str, float]:
            import transfer_queue as tq

            hook = self._vip()
            rows, members = episode_rows(batch.keys, batch.tags)  # one success per session: its last output
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
            # generated tokens per episode: response_mask (tool output excluded) over all of the session's outputs
            all_rows = sorted(r for m in members for r in m)
            masks = tq.kv_batch_get(
                keys=[batch.keys[i] for i in all_rows], partition_id=batch.partition_id, select_fields=["response_mask"]
            )["response_mask"]
            lengths = generated_tokens(row_generated_tokens(masks), members, all_rows)
            return hook.observe(uids, hook.successes(scores, extra), exact=False, where=_V1_WHERE, lengths=lengths)

    VIPTrainerV1.__name__ = VIPTrainerV1.__qualname__ = f"VIP{base.__name__}"
    _V1_CLASSES[base] = VIPTrainerV1
    return VIPTrainerV1


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
