"""verl plug-in: VIP allocation in verl's Ray PPO/GRPO trainer, without forking verl (tested with verl 0.9.1).

Pieces:

* :func:`expand_by_counts` expands a :class:`verl.DataProto` by per-prompt counts (``select_idxs`` with each row
  index repeated ``n_i`` times, dropped prompts removed): the ``uid`` of a prompt is shared by its ``n_i`` rows, so
  verl's uid-grouped ``compute_grpo_outcome_advantage`` / RLOO handle the variable group sizes unchanged.
* :func:`divisible_budget` picks the largest feasible budget <= the requested one that is divisible by the
  data-parallel world size (verl chunks the batch into equal per-rank parts; unequal mini-batch counts hang NCCL,
  verl PR#5228); counts are >= ``n_min`` >= 2, so no group of size 1 (which verl would give its raw reward as
  advantage) is ever produced.
* :func:`balanced_order` orders the expanded rows so that each rank receives the same number of rows with balanced
  token counts (verl's Karmarkar-Karp ``get_seqlen_balanced_partitions(..., equal_size=True)``).
* :class:`VIPVerlAllocator` wraps a :class:`vipalloc.Allocator` for verl batches (prompt ids from a non-tensor key,
  plan, expansion, observe from ``token_level_scores``, ``vip/*`` metrics, save/load beside verl checkpoints).
* :class:`RayVIPTrainer` subclasses verl's ``RayPPOTrainer``: it plans in ``_get_gen_batch`` (both ``.repeat(n)``
  calls of ``fit`` then expand by the plan), observes in ``_update_actor`` (rewards are final there), and saves /
  restores the allocator with verl's checkpoints. Configure it with a ``vip:`` group (see ``docs/verl.md``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    import torch
    from verl import DataProto
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('vipalloc.integrations.verl needs verl: pip install "vipalloc[verl]"') from exc

from vipalloc import Allocator

__all__ = [
    "VIPConfig",
    "VIPVerlAllocator",
    "balanced_order",
    "divisible_budget",
    "expand_by_counts",
]

ALLOCATOR_FILE = "vip_allocator.json"


@dataclass
class VIPConfig:
    """The ``vip:`` config group. ``budget``: rollouts per step (default: batch size x ``rollout.n``)."""

    enable: bool = True
    budget: int | None = None
    n_min: int = 4
    n_max: int = 32
    strategy: str = "vip"
    predictor: str = "gp"
    estimator: str = "drgrpo"
    embedder: str = "auto"
    success_threshold: float = 0.5
    seed: int = 0
    prompt_id_key: str = "index"
    prompt_text_key: str | None = "raw_prompt"
    predictor_kwargs: dict[str, Any] = field(default_factory=dict)


def divisible_budget(budget: int, world_size: int, m: int, n_min: int, n_max: int) -> int:
    """Largest budget <= ``budget`` that is divisible by ``world_size`` and feasible for ``m`` prompts in
    ``[n_min, n_max]``; raises ``ValueError`` naming the fix when none exists."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    hi = min(budget, m * n_max)
    b = hi - hi % world_size
    if b < m * n_min:
        raise ValueError(
            f"no budget <= {budget} divisible by world size {world_size} is feasible for {m} prompts with n in "
            f"[{n_min}, {n_max}] (need >= {m * n_min}); raise the budget or n_max"
        )
    return b


def expand_by_counts(data: DataProto, counts: np.ndarray) -> DataProto:
    """Rows of ``data`` repeated ``counts[i]`` times each, consecutively; count 0 removes the row."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (len(data),):
        raise ValueError(f"counts must have one entry per row ({len(data)}), got shape {counts.shape}")
    if np.any(counts < 0):
        raise ValueError("counts must be >= 0")
    if np.any(counts == 1):
        raise ValueError("a count of 1 would make a singleton uid group (verl gives it its raw reward as advantage)")
    idx = np.repeat(np.arange(len(data)), counts)
    return data.select_idxs(idx)


def balanced_order(seqlens: np.ndarray, world_size: int) -> np.ndarray:
    """A permutation of the rows such that consecutive equal chunks (one per rank) have the same size and balanced
    token counts (verl's Karmarkar-Karp partitioner)."""
    from verl.utils.seqlen_balancing import get_seqlen_balanced_partitions

    n = len(seqlens)
    if n % world_size:
        raise ValueError(f"{n} rows cannot be split evenly over {world_size} ranks")
    parts = get_seqlen_balanced_partitions(list(map(int, seqlens)), k_partitions=world_size, equal_size=True)
    return np.concatenate([np.asarray(sorted(p), dtype=np.int64) for p in parts])


class VIPVerlAllocator:
    """Allocator glue for verl batches: plan per prompt, expand, observe, metrics, save/load."""

    def __init__(self, cfg: VIPConfig, world_size: int = 1) -> None:
        self.cfg = cfg
        self.world_size = int(world_size)
        self.allocator = Allocator(
            strategy=cfg.strategy,
            predictor=cfg.predictor,
            estimator=cfg.estimator,
            n_min=cfg.n_min,
            n_max=cfg.n_max,
            seed=cfg.seed,
            embedder=cfg.embedder,
            success_threshold=cfg.success_threshold,
            predictor_kwargs=cfg.predictor_kwargs,
        )
        self.last_plan: Any = None
        self.last_ids: list[str] = []

    def prompt_ids(self, batch: DataProto) -> list[str]:
        key = self.cfg.prompt_id_key
        ntb = batch.non_tensor_batch
        if key in ntb:
            return [str(x) for x in ntb[key]]
        extra = ntb.get("extra_info")
        if extra is not None and all(isinstance(e, dict) and "index" in e for e in extra):
            return [str(e["index"]) for e in extra]
        raise ValueError(
            f"verl batch has no prompt id column {key!r} (nor extra_info['index']); set vip.prompt_id_key to a "
            "non-tensor key that identifies prompts across epochs"
        )

    def prompt_texts(self, batch: DataProto) -> list[str] | None:
        key = self.cfg.prompt_text_key
        if key is None or key not in batch.non_tensor_batch:
            return None
        out = []
        for x in batch.non_tensor_batch[key]:
            if isinstance(x, (list, np.ndarray)) and len(x) and isinstance(x[-1], dict):
                out.append(str(x[-1].get("content", "")))
            else:
                out.append(str(x))
        return out

    def plan(self, batch: DataProto, step: int, default_n: int) -> np.ndarray:
        """Per-prompt counts for ``batch`` (one row per prompt), with a world-size-divisible exact budget."""
        ids = self.prompt_ids(batch)
        m = len(ids)
        requested = self.cfg.budget if self.cfg.budget is not None else m * default_n
        budget = divisible_budget(requested, self.world_size, m, self.cfg.n_min, self.cfg.n_max)
        plan = self.allocator.plan(ids, prompts=self.prompt_texts(batch), budget=budget, step=step)
        self.last_plan, self.last_ids = plan, ids
        # verl moves non-reward keys to the generation batch; the uid survives everywhere, so map it back.
        uids = batch.non_tensor_batch.get("uid")
        self._uid_to_pid = {} if uids is None else {str(u): p for u, p in zip(uids, ids)}
        return plan.counts

    def observe(self, batch: DataProto, step: int) -> dict[str, float]:
        """Feed the expanded batch's scalar rewards (sum of ``token_level_scores``) back; returns ``vip/*`` metrics."""
        uids = batch.non_tensor_batch.get("uid")
        if uids is not None and getattr(self, "_uid_to_pid", None):
            ids = [self._uid_to_pid[str(u)] for u in uids]
        else:
            ids = self.prompt_ids(batch)
        scores = batch.batch["token_level_scores"].sum(-1).detach().cpu().double().numpy()
        if np.any(~np.isfinite(scores)):
            raise ValueError("non-finite rewards in token_level_scores")
        success = (scores >= self.cfg.success_threshold).astype(np.float64)
        groups: dict[str, list[float]] = {}
        for pid, s in zip(ids, success):
            groups.setdefault(pid, []).append(float(s))
        order = [pid for pid in self.last_ids if pid in groups]
        self.allocator.observe(order, [groups[p] for p in order], step=step)
        plan = self.last_plan
        counts = plan.counts
        kept = counts > 0
        rates = np.array([np.mean(groups[p]) if p in groups else np.nan for p in self.last_ids])
        zero_std = np.array([min(groups[p]) == max(groups[p]) for p in order])
        return {
            "vip/mean_n": float(counts[kept].mean()) if kept.any() else 0.0,
            "vip/max_n": float(counts.max()),
            "vip/frac_dropped": float((~kept).mean()),
            "vip/frac_zero_std": float(zero_std.mean()) if len(zero_std) else 0.0,
            "vip/pred_abs_err": float(np.nanmean(np.abs(plan.p_mean - rates))) if kept.any() else 0.0,
            "vip/expected_var_ratio_vs_uniform": float(plan.variance_ratio),
        }

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.allocator.save(os.path.join(folder, ALLOCATOR_FILE))

    def load(self, folder: str) -> bool:
        path = os.path.join(folder, ALLOCATOR_FILE)
        if not os.path.exists(path):
            return False
        self.allocator = Allocator.load(path)
        return True


class _PlannedDataProto(DataProto):
    """A DataProto whose next ``repeat(n, interleave=True)`` expands by the VIP plan instead (one shot)."""

    _vip_counts: np.ndarray | None = None

    def repeat(self, repeat_times: int = 2, interleave: bool = True) -> DataProto:
        counts = self.__dict__.pop("_vip_counts", None)
        if counts is None or not interleave:
            return DataProto.repeat(self, repeat_times, interleave)
        out = expand_by_counts(self, counts)
        out.__class__ = DataProto
        return out


def _plan_onto(data: DataProto, counts: np.ndarray) -> None:
    data.__class__ = _PlannedDataProto
    data.__dict__["_vip_counts"] = counts


def _make_trainer_class():
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    class RayVIPTrainer(RayPPOTrainer):
        """verl's Ray PPO/GRPO trainer with VIP allocation (config group ``vip``)."""

        def _vip(self) -> VIPVerlAllocator:
            hook = getattr(self, "_vip_hook", None)
            if hook is None:
                raw = dict(self.config.get("vip", {}) or {})
                ws = int(self.config.trainer.n_gpus_per_node) * int(self.config.trainer.nnodes)
                hook = VIPVerlAllocator(VIPConfig(**raw), world_size=ws)
                self._vip_hook = hook
            return hook

        def _get_gen_batch(self, batch: DataProto) -> DataProto:
            hook = self._vip()
            counts = None
            if hook.cfg.enable:  # plan first: _get_gen_batch moves the prompt id/text keys out of `batch`
                n = int(self.config.actor_rollout_ref.rollout.n)
                counts = hook.plan(batch, step=int(self.global_steps), default_n=n)
            gen_batch = super()._get_gen_batch(batch)
            if counts is not None:
                _plan_onto(batch, counts)  # fit() calls batch.repeat(n) after generation
                _plan_onto(gen_batch, counts)  # ... and gen_batch.repeat(n) before it
            return gen_batch

        def _update_actor(self, batch: DataProto):
            hook = self._vip()
            metrics = hook.observe(batch, step=int(self.global_steps)) if hook.cfg.enable else {}
            output = super()._update_actor(batch)
            for k, v in metrics.items():
                output.meta_info.setdefault("metrics", {})[k] = [v]
            return output

        def _save_checkpoint(self):
            super()._save_checkpoint()
            folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
            self._vip().save(folder)

        def _load_checkpoint(self):
            out = super()._load_checkpoint()
            from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

            folder = find_latest_ckpt_path(self.config.trainer.default_local_dir)
            if folder:
                self._vip().load(folder)
            return out

    return RayVIPTrainer


def __getattr__(name: str):  # build the trainer subclass lazily: importing verl's trainer pulls Ray and more
    if name == "RayVIPTrainer":
        cls = _make_trainer_class()
        globals()["RayVIPTrainer"] = cls
        return cls
    raise AttributeError(name)


def torch_scores(rewards: list[float], response_len: int = 4) -> torch.Tensor:
    """Token-level scores with the scalar reward on the last token (verl's layout), shape (R, response_len)."""
    out = torch.zeros(len(rewards), response_len)
    out[:, -1] = torch.tensor(rewards, dtype=torch.float32)
    return out
