"""verl plug-in, part 1: the ``vip:`` config, the estimator mapping and the batch arithmetic (no trainer code).

Everything here is pure: it needs verl only for :class:`verl.DataProto` in :func:`expand_by_counts`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from verl import DataProto

from vipalloc.settings import (
    AUTO,
    SETTINGS,
    check_bounds,
    check_estimator,
    check_two_phase,
    dataclass_field,
    validate,
)

__all__ = [
    "ADV_ESTIMATOR_TARGETS",
    "ALLOCATOR_FILE",
    "SUPPORTED_VERL",
    "VIPConfig",
    "divisible_budget",
    "expand_by_counts",
    "required_multiple",
    "resolve_estimator",
    "trim_to_multiple",
]

ALLOCATOR_FILE = "vip_allocator.json"
SUPPORTED_VERL = ">=0.9,<0.10"  # the verl releases whose hook points the plug-in is written against
# verl advantage estimators that build a per-uid baseline from however many rows share the uid, mapped to the
# variance model the allocator minimises (GRPO's std-normalised variance is no allocation target: use Dr.GRPO's;
# ``checks.estimator_warnings`` says so when the run normalises).
ADV_ESTIMATOR_TARGETS: dict[str, str] = {
    "grpo": "drgrpo",
    "grpo_vectorized": "drgrpo",
    "rloo": "rloo",
    "rloo_vectorized": "rloo",
}


# the shared settings (vipalloc.settings) that VIPConfig has, checked by the schema; estimator also takes "auto" here
_SHARED = tuple(name for name in SETTINGS if name != "estimator")


@dataclass
class VIPConfig:
    """The ``vip:`` config group (``verl_config/vip/default.yaml`` mirrors these fields).

    ``budget``: rollouts per training batch (``None``: ``M x actor_rollout_ref.rollout.n``, the uniform budget); it is
    rounded down to a multiple of :func:`required_multiple`. ``strategy`` / ``predictor``: any name in
    ``vipalloc.strategies.STRATEGY_NAMES`` / ``vipalloc.predictors.PREDICTOR_NAMES`` (read at run time, so strategies
    added to the package are selectable here). ``estimator``: ``auto`` derives it from ``algorithm.adv_estimator``
    (``grpo*`` -> ``drgrpo``, ``rloo*`` -> ``rloo``). ``prompt_id_key``: the non-tensor column that names a prompt
    across epochs (verl's datasets copy ``extra_info.index`` into ``index``); ``None`` or a column that is not
    consistent with the prompt texts falls back to a hash of the prompt text. ``success_key``: a reward-extra-info
    column holding the per-rollout success (e.g. ``acc``); rows without it use the summed token-level score. A
    rollout succeeds when its value is ``>= success_threshold``. ``two_phase``: pilot-then-commit allocation
    (``Allocator.plan_pilot`` / ``plan_commit``) with ``pilot_n`` pilot rollouts per prompt and a two-phase strategy
    (``vip_two_phase``, ``pilot_commit``); legacy loop only (``docs/verl.md``). ``token_budget`` (token mode,
    ``docs/verl.md`` "Token budgets"): ``None`` plans rollouts (``budget``); ``"uniform"`` spends per step the
    generated tokens uniform ``rollout.n`` would have spent (``Allocator.uniform_tokens``, predicted from recent
    lengths); a number is an absolute cap in generated tokens per training batch. In token mode ``budget`` (or its
    default) caps the rollouts, and steps before any length was observed are planned by rollouts.
    """

    enable: bool = True
    budget: int | None = None
    n_min: int = dataclass_field("n_min")
    n_max: int = dataclass_field("n_max")
    strategy: str = dataclass_field("strategy")
    predictor: str = dataclass_field("predictor")
    estimator: str = dataclass_field("estimator", default=AUTO)  # verl's own default: derived from adv_estimator
    embedder: str = dataclass_field("embedder")
    seed: int = dataclass_field("seed")
    success_threshold: float = dataclass_field("success_threshold")
    success_key: str | None = "acc"
    prompt_id_key: str | None = "index"
    prompt_text_key: str | None = "raw_prompt"
    save_allocator: bool = True
    two_phase: bool = dataclass_field("two_phase")
    pilot_n: int = dataclass_field("pilot_n")
    token_budget: str | float | None = dataclass_field("token_budget")
    predictor_kwargs: dict[str, Any] = dataclass_field("predictor_kwargs")
    strategy_kwargs: dict[str, Any] = dataclass_field("strategy_kwargs")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> VIPConfig:
        """Build from a dict / OmegaConf node, rejecting unknown keys with the list of valid ones. A ``strategy`` of
        None (``default.yaml``'s) is the library default, :data:`vipalloc.defaults.DEFAULT_STRATEGY`."""
        data = dict(raw or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown vip config key(s) {unknown}; valid keys: {sorted(names)}")
        for key in ("predictor_kwargs", "strategy_kwargs"):
            data[key] = dict(data.get(key) or {})
        if data.get("strategy", "") is None:
            del data["strategy"]
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the fix for values verl cannot run with; normalise the rest.

        The shared settings are checked by their one schema (:mod:`vipalloc.settings`, the message prefixed with
        ``vip.``); ``budget`` and ``pilot_n >= 2`` are verl's own checks."""
        try:
            for name in _SHARED:
                setattr(self, name, validate(name, getattr(self, name)))
            self.estimator = check_estimator(self.estimator, auto=True)
            check_bounds(self.n_min, self.n_max)
            check_two_phase(self.strategy, self.two_phase)
        except ValueError as exc:
            raise ValueError(f"vip.{exc}") from None
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)):
            raise ValueError(f"vip.budget must be an integer number of rollouts or null, got {self.budget!r}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"vip.budget must be >= 1 (or null for batch size x rollout.n), got {self.budget}")
        if self.pilot_n < 2:
            raise ValueError(
                f"vip.pilot_n must be >= 2 in verl, got {self.pilot_n} (verl gives a pilot group of 1 its raw reward "
                "as advantage: no baseline)"
            )

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


def trim_to_multiple(counts: np.ndarray | Sequence[int], multiple: int, n_min: int) -> np.ndarray:
    """The counts with the largest total ``<= counts.sum()`` that is a multiple of ``multiple``, each count cut down.

    ``counts``: int ``(M,)``, each 0 or ``>= n_min``. Returns int64 ``(M,)`` with ``0 <= out_i <= counts_i`` and each
    ``out_i`` 0 or ``>= n_min``, so the tokens of a plan never grow. Rollouts come off the largest counts first (the
    last rollout of a big group reduces the variance least, ``~p(1-p)/n^2``); a prompt is dropped only when the kept
    ones cannot absorb the cut (the smallest groups go first). Raises ``ValueError`` when no positive multiple fits.
    """
    c = np.asarray(counts, dtype=np.int64).copy()
    multiple = _positive("multiple", multiple)
    total = int(c.sum())
    if total % multiple == 0 and total > 0:
        return c
    order = sorted(range(len(c)), key=lambda i: (-int(c[i]), i))  # largest first, ties by position
    prefix = np.concatenate([[0], np.cumsum(c[order])])
    kept = int(np.count_nonzero(c))
    for target in range(total - total % multiple, 0, -multiple):
        # keeping the j largest groups reaches any total in [j n_min, prefix[j]]; keep as many prompts as possible
        j = next((j for j in range(kept, 0, -1) if n_min * j <= target <= prefix[j]), None)
        if j is None:
            continue
        out = np.zeros_like(c)
        keep = np.asarray(order[:j], dtype=np.int64)
        out[keep] = c[keep]
        for _ in range(int(out.sum()) - target):  # fewer than `multiple` + one dropped group's rollouts
            room = np.where(out > n_min, out, -1)
            out[int(np.argmax(room))] -= 1
        return out
    raise ValueError(
        f"a plan of {total} rollouts cannot be cut to a positive multiple of {multiple} (DP size x mini-batch rows) "
        f"with n >= {n_min}: raise vip.token_budget, or lower ppo_mini_batch_size / the DP size"
    )


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
