"""``VIPGRPOConfig``: TRL's ``GRPOConfig`` plus the allocation settings, validated at construction.

Drop-in meaning: every field TRL already has keeps TRL's meaning. ``num_generations`` is the uniform group size
being replaced and sets the budget (``num_generations`` rollouts per prompt on average, the same rollouts per step
as plain GRPO); ``per_device_train_batch_size`` is the number of completions each process trains on per
micro-batch, as in TRL. VIP adds the largest count a prompt can get, ``n_max`` (default ``2 x num_generations``):
the trainer samples each prompt ``n_max`` times (TRL's group width) and generates only the planned rows.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
from trl import GRPOConfig

from vipalloc import Allocator
from vipalloc.budget import BudgetSpec
from vipalloc.settings import check_two_phase, dataclass_field, default, help_text, validate
from vipalloc.strategies import get_strategy

ALLOCATOR_FILE = "vip_allocator.json"  # saved inside each TRL checkpoint folder (and next to save_model's output)


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _setting_field(name: str, **over: Any) -> Any:
    """The shared setting's field (:func:`vipalloc.settings.dataclass_field`), its help listing the choices."""
    return dataclass_field(name, list_choices=True, **over)


@dataclass
class VIPGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus VIP allocation settings (all validated at construction).

    * ``num_generations`` (TRL's field): the uniform group size VIP replaces. Budget per generation batch = TRL's
      ``generation_batch_size`` (= ``per_device_train_batch_size x processes x steps_per_generation`` completions),
      over ``generation_batch_size / num_generations`` prompts: the rollouts plain GRPO would generate.
    * ``n_max``: most rollouts of one prompt (default ``2 x num_generations``); ``n_min``: fewest of a kept prompt.
      The budget is feasible for every strategy because ``n_min <= num_generations <= n_max``.
    * ``per_device_train_batch_size``: completions per process per micro-batch, as in TRL (every process trains on
      exactly that many; the plug-in moves rows between processes when the plan leaves them uneven).
    * ``two_phase`` with a two-phase strategy (``vip_two_phase``, ``pilot_commit``): ``pilot_n`` rollouts per prompt
      first, then the rest of the budget committed from their outcomes, inside each generation batch.
    * ``token_budget``: plan each generation batch under a budget of generated tokens (``"uniform"``: the tokens
      plain GRPO's ``num_generations`` rollouts per prompt are predicted to spend; a number: a cap in tokens). The
      rollout budget stays a cap (at most ``generation_batch_size`` rollouts); ``None`` / ``"off"``: rollouts only.
      With ``two_phase`` the pilot's tokens count against the budget and the commit spends the tokens left.
    * The allocation settings shared with every surface (``strategy``, ``predictor``, ``estimator``, ``embedder``,
      ``n_min``, ``n_max``, ``success_threshold``, ``two_phase``, ``pilot_n``, ``token_budget``) take their
      defaults, help and checks from :mod:`vipalloc.settings`. The allocator's seed is ``allocator_seed`` (None:
      TRL's ``seed``), the one name that differs: ``seed`` is TRL's training seed. The old names
      ``allocation_strategy`` / ``variance_estimator`` still work with a ``FutureWarning``.
    """

    n_max: int | None = _setting_field(
        "n_max",
        default=None,
        extra="Default: 2 x num_generations (TRL's group width: each prompt is sampled n_max times).",
    )
    n_min: int = _setting_field("n_min")
    strategy: str = _setting_field("strategy")
    predictor: str = _setting_field("predictor")
    estimator: str = _setting_field("estimator", extra="TRL: drgrpo with TRL's grpo / dr_grpo / dapo losses.")
    embedder: str = _setting_field("embedder")
    success_threshold: float = _setting_field("success_threshold")
    success_reward: str | None = field(
        default=None,
        metadata={
            "help": "Name of the reward function whose (unweighted) reward defines success; default: TRL's "
            "weighted sum over all reward functions."
        },
    )
    allocator_seed: int | None = field(
        default=None,
        metadata={
            "help": f"{help_text('seed')} None: follow TRL's `seed`. The one setting named differently here: "
            "GRPOConfig's `seed` is TRL's training seed, so the allocator's is `allocator_seed`."
        },
    )
    prompt_id_column: str = field(
        default="prompt_id", metadata={"help": "Dataset column with a stable prompt id (else a hash of the prompt)."}
    )
    two_phase: bool = _setting_field("two_phase", extra="Inside each generation batch.")
    pilot_n: int = _setting_field("pilot_n", extra="At most num_generations.")
    token_budget: float | str | None = _setting_field(
        "token_budget",
        extra="Per generation batch (over all processes), at most generation_batch_size rollouts; 'uniform': "
        "num_generations rollouts per prompt at the lengths predicted from recent steps (the first generation batch, "
        "before any length is known, is planned by rollouts). With two_phase the pilot's tokens count against the "
        "budget and the commit spends what is left. Not available with the vip_authors strategy.",
    )
    allocation_strategy: str | None = field(
        default=None, metadata={"help": "Deprecated: use `strategy` (the same name on every surface)."}
    )
    variance_estimator: str | None = field(
        default=None, metadata={"help": "Deprecated: use `estimator` (the same name on every surface)."}
    )

    def __post_init__(self) -> None:
        self._take_deprecated_names()
        g = _positive_int("num_generations (the uniform group size VIP replaces)", self.num_generations, 2)
        if self.n_max is None:
            self.n_max = 2 * g
        # the shared settings: one validator each (vipalloc.settings); the checks below are TRL's own
        n_max, n_min = validate("n_max", self.n_max), validate("n_min", self.n_min)
        if not n_min <= g <= n_max:
            raise ValueError(bounds_message(n_min, g, n_max, "VIPGRPOConfig"))
        self.strategy = validate("strategy", self.strategy)
        self.two_phase = validate("two_phase", self.two_phase)
        check_two_phase(self.strategy, self.two_phase)
        self.pilot_n = validate("pilot_n", self.pilot_n)
        if self.two_phase and self.pilot_n > g:
            raise ValueError(
                f"pilot_n ({self.pilot_n}) exceeds num_generations ({g}): the pilot is part of the budget of "
                f"{g} rollouts per prompt; lower pilot_n to at most {g}"
            )
        self.predictor = validate("predictor", self.predictor)
        self.estimator = validate("estimator", self.estimator)
        self.embedder = validate("embedder", self.embedder)
        self.success_threshold = validate("success_threshold", self.success_threshold)
        if self.allocator_seed is not None:
            try:
                self.allocator_seed = validate("seed", self.allocator_seed)
            except ValueError as exc:
                raise ValueError(f"allocator_seed: {exc}") from None
        if self.success_reward is not None and not (isinstance(self.success_reward, str) and self.success_reward):
            raise ValueError(f"success_reward must be a reward function's name or None, got {self.success_reward!r}")
        self.token_budget = normalise_token_budget(self.token_budget)
        if self.token_budget is not None:
            refusal = get_strategy(self.strategy, estimator=self.estimator).token_refusal
            if refusal is not None:
                raise ValueError(
                    f"token_budget={self.token_budget!r} cannot be used with strategy={self.strategy!r}: {refusal}"
                )
        super().__post_init__()
        # GRPOConfig.__post_init__ has set the generation batch layout (and checked it holds full groups).
        assert self.generation_batch_size is not None and self.steps_per_generation is not None
        world = int(self.world_size)
        rect = self.prompts_per_generation * n_max
        if rect % world:
            raise ValueError(
                f"the {self.prompts_per_generation} prompts x n_max {n_max} = {rect} sampled rows of a generation "
                f"batch must split evenly over the {world} processes; change n_max or the batch size"
            )
        self.n_max, self.n_min = n_max, n_min
        least = max(n_min, int(self.pilot_n)) if self.two_phase else n_min
        if isinstance(self.token_budget, float) and self.token_budget < self.prompts_per_generation * least:
            what = f"n_min={n_min}" if least == n_min else f"max(n_min, pilot_n)={least}"
            raise ValueError(
                f"token_budget={self.token_budget:g} tokens cannot give the {self.prompts_per_generation} prompts of a "
                f"generation batch {what} rollouts of even one token each; raise it to at least "
                f"{self.prompts_per_generation * least} (or use token_budget='uniform')"
            )

    def _take_deprecated_names(self) -> None:
        """``allocation_strategy`` / ``variance_estimator`` (the old names): a ``FutureWarning`` naming the new field,
        the value moved there (the old field reset to None), a ``ValueError`` when the new field says otherwise."""
        for old, new in (("allocation_strategy", "strategy"), ("variance_estimator", "estimator")):
            value = getattr(self, old)
            if value is None:
                continue
            warnings.warn(
                f"VIPGRPOConfig({old}=...) is deprecated and will be removed: use {new}={value!r} (the same name on "
                "every vipalloc surface)",
                FutureWarning,
                stacklevel=4,
            )
            current = getattr(self, new)
            if current != default(new) and current != value:
                raise ValueError(f"{old}={value!r} (deprecated) and {new}={current!r} disagree; set only {new}")
            setattr(self, new, value)
            setattr(self, old, None)

    @property
    def allocator_seed_resolved(self) -> int:
        """The allocator's seed: ``allocator_seed``, or TRL's ``seed`` when it is None."""
        return int(self.seed if self.allocator_seed is None else self.allocator_seed)

    @property
    def prompts_per_generation(self) -> int:
        """Distinct prompts in one (global) generation batch: ``generation_batch_size // num_generations``."""
        assert self.generation_batch_size is not None and self.num_generations is not None  # set by __post_init__
        return int(self.generation_batch_size) // int(self.num_generations)

    @property
    def budget_per_generation(self) -> int:
        """Rollouts generated per (global) generation batch: TRL's ``generation_batch_size``."""
        assert self.generation_batch_size is not None  # set by GRPOConfig.__post_init__
        return int(self.generation_batch_size)

    @property
    def sampled_rows_per_process(self) -> int:
        """Rows of width ``n_max`` each process receives per generation batch (``prompts x n_max / processes``)."""
        assert self.n_max is not None
        return self.prompts_per_generation * int(self.n_max) // int(self.world_size)


def bounds_message(n_min: int, mean: float, n_max: int, owner: str) -> str:
    """Why ``n_min <= mean <= n_max`` fails and the fix that applies (``mean``: the budget in rollouts per prompt,
    ``num_generations``; ``owner``: whose bounds, e.g. ``"VIPGRPOConfig"`` or ``"the allocator"``)."""
    head = (
        f"need n_min <= num_generations <= n_max, got n_min={n_min}, num_generations={mean:g}, n_max={n_max}: the "
        f"budget is {mean:g} rollouts per prompt on average, which prompts of at least n_min and at most n_max "
        "rollouts cannot meet; "
    )
    if n_min > n_max:
        return head + f"n_min exceeds n_max: give {owner} n_min <= {mean:g} <= n_max (e.g. n_min=2, n_max={n_max})"
    if mean < n_min:
        return head + f"lower n_min of {owner} to at most {mean:g}, or raise num_generations to at least {n_min}"
    return (
        head + f"raise n_max of {owner} to at least {mean:g} (VIPGRPOConfig's default: 2 x num_generations), or "
        f"lower num_generations to at most {n_max}"
    )


def normalise_token_budget(value: Any) -> float | str | None:
    """``VIPGRPOConfig.token_budget`` normalised: None (rollouts only), ``"uniform"``, or a cap in tokens (float);
    the shared setting's one validator (:func:`vipalloc.settings.check_token_budget`, which also reads the strings
    TRL's parser gives: ``"off"`` / ``"none"``, ``"uniform"``, or a number such as ``"20000"``)."""
    return cast("float | str | None", validate("token_budget", value))


def step_token_budget(
    mode: float | str | None,
    max_length: int | None,
    allocator: Allocator,
    ids: list[str],
    texts: list[str],
    budget: int,
    *,
    least: int | None = None,
) -> tuple[float | None, np.ndarray | None]:
    """The token budget of one generation batch (None: plan it by rollouts) and the expected tokens per rollout to
    plan with (None: the allocator's length model), for the token mode ``mode`` (``VIPGRPOConfig.token_budget``,
    normalised); ``max_length``: the most tokens a rollout can hold (``max_completion_length``); ``budget``: the
    step's rollouts, also the rollout cap in token mode; ``least``: the fewest rollouts per prompt a cap must pay for
    (default the allocator's ``n_min``; a two-phase step passes ``max(n_min, pilot_n)``, its pilot being part of the
    budget).

    The engine's one budget policy (:class:`vipalloc.budget.BudgetSpec`, shared with the CPU trainer and verl):
    ``"uniform"`` prices ``budget / M`` rollouts a prompt at the predicted lengths (by rollouts before any length is
    known); a cap is planned before any length at ``max_completion_length`` tokens a rollout and raised, with a
    warning, to ``least`` rollouts a prompt at the expected lengths when it cannot pay for them. The lengths are
    forecast once for the batch and step; the plan that follows reuses them.
    """
    if mode is None:
        return None, None
    tokens: float | Literal["uniform"] = "uniform" if mode == "uniform" else float(mode)
    spec = BudgetSpec(rollouts=budget, tokens=tokens, rollout_cap=budget, max_length=max_length, least=least)
    resolved = spec.resolve(allocator, ids, prompts=texts)
    if resolved.tokens is None:  # "uniform" before any length: uniform's rollouts
        return None, None
    return resolved.tokens, resolved.expected_lengths


def default_config(model: Any) -> VIPGRPOConfig:
    """The config ``VIPGRPOTrainer(args=None)`` uses: TRL's default, built as ``GRPOTrainer.__init__`` builds its own.

    TRL 1.16 names the output directory ``<model name>-GRPO`` (the last path part of the model id, or of
    ``model.config``'s ``_name_or_path`` for a model object) and keeps every ``GRPOConfig`` default; VIP's fields keep
    theirs (``n_max = 2 x num_generations``, the strategy and predictor of :mod:`vipalloc.settings`).
    """
    from trl.trainer.utils import get_config_model_id

    name = model if isinstance(model, str) else get_config_model_id(model.config)
    return VIPGRPOConfig(f"{str(name).split('/')[-1]}-GRPO")


def _prompt_key(row: dict[str, Any], column: str) -> str:
    """A row's prompt id: its ``column`` value, else ``"h"`` + 16 hex digits of SHA-1 over its ``prompt`` (JSON),
    else over the whole row (a dataset without a ``prompt`` column, e.g. one that only routes to environments)."""
    value = row.get(column)
    if value is not None:
        return str(value)
    blob = json.dumps(row["prompt"] if "prompt" in row else row, sort_keys=True, default=str)
    return "h" + hashlib.sha1(blob.encode()).hexdigest()[:16]


def _prompt_text(prompt: Any) -> str:
    """Text the allocator embeds: the prompt string, or the last user turn of a conversational prompt."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        for msg in reversed(prompt):
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, str):
                return content
    return json.dumps(prompt, default=str)
