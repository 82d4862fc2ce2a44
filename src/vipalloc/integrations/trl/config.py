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
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from trl import GRPOConfig

from vipalloc import Allocator
from vipalloc.budget import BudgetSpec
from vipalloc.defaults import DEFAULT_STRATEGY
from vipalloc.predictors import PREDICTOR_NAMES
from vipalloc.strategies import STRATEGY_NAMES, TWO_PHASE_STRATEGIES, get_strategy

ALLOCATOR_FILE = "vip_allocator.json"  # saved inside each TRL checkpoint folder (and next to save_model's output)


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


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
    """

    n_max: int | None = field(
        default=None, metadata={"help": "Most rollouts of one prompt (TRL's group width); default 2 x num_generations."}
    )
    n_min: int = field(default=2, metadata={"help": "Fewest rollouts of a kept prompt (>= 2)."})
    allocation_strategy: str = field(
        default=DEFAULT_STRATEGY,
        metadata={"help": f"One of vipalloc.strategies.STRATEGY_NAMES: {', '.join(STRATEGY_NAMES)}."},
    )
    predictor: str = field(default="gp", metadata={"help": f"One of: {', '.join(PREDICTOR_NAMES)}."})
    variance_estimator: str = field(
        default="drgrpo", metadata={"help": "Variance model the allocation minimises: drgrpo | rloo."}
    )
    embedder: str = field(default="auto", metadata={"help": "Prompt features: auto | minilm | hashing."})
    success_threshold: float = field(
        default=0.5, metadata={"help": "A rollout succeeds when its success reward is >= this."}
    )
    success_reward: str | None = field(
        default=None,
        metadata={
            "help": "Name of the reward function whose (unweighted) reward defines success; default: TRL's "
            "weighted sum over all reward functions."
        },
    )
    allocator_seed: int = field(default=0, metadata={"help": "Seed of the allocator's tie-breaking."})
    prompt_id_column: str = field(
        default="prompt_id", metadata={"help": "Dataset column with a stable prompt id (else a hash of the prompt)."}
    )
    two_phase: bool = field(
        default=False,
        metadata={
            "help": "Pilot-then-commit allocation inside each generation batch (needs a two-phase strategy: "
            f"{', '.join(TWO_PHASE_STRATEGIES)})."
        },
    )
    pilot_n: int = field(default=2, metadata={"help": "Pilot rollouts per prompt in a two-phase step."})
    token_budget: float | str | None = field(
        default=None,
        metadata={
            "help": "Budget of generated tokens per generation batch. `None` or `'off'`: plan by rollouts only "
            "(`generation_batch_size` rollouts). `'uniform'`: spend the tokens plain GRPO would have spent "
            "(`num_generations` rollouts per prompt at the lengths predicted from recent steps; the first generation "
            "batch, before any length is known, is planned by rollouts). A number: a cap in tokens per generation "
            "batch (over all processes). The rollout budget stays a cap in every token mode. With `two_phase` the "
            "pilot's tokens count against the budget and the commit spends what is left. Not available with the "
            "`vip_authors` strategy."
        },
    )

    def __post_init__(self) -> None:
        g = _positive_int("num_generations (the uniform group size VIP replaces)", self.num_generations, 2)
        if self.n_max is None:
            self.n_max = 2 * g
        n_max = _positive_int("n_max", self.n_max, 2)
        n_min = _positive_int("n_min", self.n_min, 2)
        if not n_min <= g <= n_max:
            raise ValueError(bounds_message(n_min, g, n_max, "VIPGRPOConfig"))
        if self.allocation_strategy not in STRATEGY_NAMES:
            raise ValueError(
                f"unknown allocation_strategy {self.allocation_strategy!r}; choose one of: {', '.join(STRATEGY_NAMES)}"
            )
        two_phase_strategy = self.allocation_strategy in TWO_PHASE_STRATEGIES
        if bool(self.two_phase) != two_phase_strategy:
            raise ValueError(
                f"two_phase={self.two_phase} and allocation_strategy={self.allocation_strategy!r} disagree: the "
                f"two-phase strategies ({', '.join(TWO_PHASE_STRATEGIES)}) run with two_phase=True, every other "
                "strategy with two_phase=False"
            )
        if self.two_phase:
            pilot = _positive_int("pilot_n", self.pilot_n, 1)
            if pilot > g:
                raise ValueError(
                    f"pilot_n ({pilot}) exceeds num_generations ({g}): the pilot is part of the budget of "
                    f"{g} rollouts per prompt; lower pilot_n to at most {g}"
                )
        if self.predictor not in PREDICTOR_NAMES:
            raise ValueError(f"unknown predictor {self.predictor!r}; choose one of: {', '.join(PREDICTOR_NAMES)}")
        if self.variance_estimator not in ("drgrpo", "rloo"):
            raise ValueError(
                f"variance_estimator must be 'drgrpo' or 'rloo', got {self.variance_estimator!r} "
                "(use 'drgrpo' when training with TRL's grpo/dapo losses)"
            )
        if isinstance(self.success_threshold, bool) or not (
            isinstance(self.success_threshold, (int, float)) and math.isfinite(self.success_threshold)
        ):
            raise ValueError(f"success_threshold must be a finite number, got {self.success_threshold!r}")
        if self.success_reward is not None and not (isinstance(self.success_reward, str) and self.success_reward):
            raise ValueError(f"success_reward must be a reward function's name or None, got {self.success_reward!r}")
        self.token_budget = normalise_token_budget(self.token_budget)
        if self.token_budget is not None:
            refusal = get_strategy(self.allocation_strategy, estimator=self.variance_estimator).token_refusal
            if refusal is not None:
                raise ValueError(
                    f"token_budget={self.token_budget!r} cannot be used with allocation_strategy="
                    f"{self.allocation_strategy!r}: {refusal}"
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
    """``VIPGRPOConfig.token_budget`` normalised: None (rollouts only), ``"uniform"``, or a cap in tokens (float).

    Strings come from the command line (TRL's parser reads the field as a string): ``"off"`` / ``"none"``,
    ``"uniform"``, or a number such as ``"20000"``.
    """
    if value is None:
        return None
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("off", "none", "null", ""):
            return None
        if word == "uniform":
            return "uniform"
        try:
            value = float(word)
        except ValueError:
            raise ValueError(
                f"token_budget must be None, 'off', 'uniform' or a number of tokens, got {value!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"token_budget must be None, 'off', 'uniform' or a number of tokens, got {value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"token_budget must be a finite number of tokens > 0, got {value!r}")
    return float(value)


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
    theirs (``n_max = 2 x num_generations``, strategy ``vip``, predictor ``gp``).
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
