"""Validated training configuration (pydantic), loadable from YAML or TOML."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from vipalloc.settings import check_bounds, default, help_text, validate
from vipalloc.strategies import TWO_PHASE_STRATEGIES
from vipalloc.training.tasks import LEVELS, TaskName, completion_tokens_bound

# The strategies a run may use: the library's (vipalloc.strategies.STRATEGY_NAMES) plus DAPO dynamic sampling,
# which is a trainer loop rather than an allocation. Written once: the config field's type and the tuple below.
StrategyName = Literal[
    "uniform",
    "vip",
    "vip_pure",
    "inverse_acc",
    "inverse_var",
    "knapsack",
    "gvm",
    "vip_authors",
    "dynamo",
    "hora",
    "vip_two_phase",
    "pilot_commit",
    "coba",
    "vip_error",
    "vip_error_two_phase",
    "dapo",
]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)

# Strategies the trainer cannot run under a token budget, and why. vip_authors: the engine refuses it
# (Allocator(strategy="vip_authors").strategy.token_refusal); refused here so that a config fails at validation,
# not at its first token-mode step. The two-phase strategies run in token mode (plan_pilot(token_budget=)).
TOKEN_REFUSALS: dict[str, str] = {
    "dapo": "DAPO draws extra generation batches until it has enough mixed groups; it has no token mode",
    "vip_authors": "the engine refuses it: the authors' allocation has no token mode",
    "coba": "the engine refuses it: CoBA-RL's rule splits a count budget and has no token form",
}


class ModelConfig(BaseModel):
    """Tiny GPT-2 policy size."""

    model_config = ConfigDict(extra="forbid")
    n_layer: int = Field(default=4, ge=1, le=12)
    n_embd: int = Field(default=128, ge=16, le=1024)
    n_head: int = Field(default=4, ge=1, le=16)


class WarmupConfig(BaseModel):
    """Supervised warm-up that turns the random policy into a base model with mixed success rates."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(default=1500, ge=0)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    label_noise: float | list[float] = Field(
        default=0.3,
        description="fraction of warm-up answers replaced by near misses, in [0, 1): one value, or one per level "
        "(a clean level is learnt to near-certainty, a noisy one leaves the right answer the mode of a spread)",
    )
    seed: int = 12345
    threads: int = Field(
        default=2,
        ge=1,
        le=64,
        description="torch threads for the warm-up: fixed (not the core count) so the cached model is the same "
        "on any machine with the same kernels; 2 halves the warm-up on a 2-core machine",
    )


class TrainConfig(BaseModel):
    """One RL run. Budget per step = ``prompts_per_step * n_mean`` rollouts for every strategy."""

    model_config = ConfigDict(extra="forbid")
    run_dir: str = "runs/train"
    # the settings shared with every surface: default, help and validator from vipalloc.settings (_shared below)
    strategy: StrategyName = Field(
        default=default("strategy"),
        description=f"{help_text('strategy')} The CPU trainer also runs dapo (DAPO's dynamic sampling loop).",
    )
    predictor: Literal["gp", "beta", "empirical", "ridge", "oracle"] = Field(
        default=default("predictor"), description=help_text("predictor")
    )
    predictor_kwargs: dict = Field(default_factory=dict, description=help_text("predictor_kwargs"))
    embedder: Literal["auto", "minilm", "hashing"] = Field(
        default="hashing",
        description=f"{help_text('embedder')} The CPU trainer's own default is hashing (offline and cheap; its "
        "results were measured with it).",
    )
    loss: Literal["drgrpo", "rloo", "grpo"] = Field(
        default="drgrpo",
        description="the policy-gradient loss; the allocator's estimator follows it (rloo -> rloo, else drgrpo)",
    )
    seed: int = Field(default=default("seed"), description=f"{help_text('seed')} Also the run's seed.")
    steps: int = Field(default=150, ge=1)
    prompts_per_step: int = Field(default=32, ge=1)
    n_mean: int = Field(default=8, ge=2, description="uniform group size; the budget is prompts_per_step * n_mean")
    n_min: int = Field(default=default("n_min"), description=help_text("n_min"))
    n_max: int = Field(default=default("n_max"), description=help_text("n_max"))
    dapo_max_batches: int = Field(default=3, ge=1, description="DAPO: generation batches per step at most")
    pilot_n: int = Field(default=default("pilot_n"), description=help_text("pilot_n"))
    pool_factor: float | None = Field(
        default=None,
        ge=1.0,
        description="pilot_commit: candidate prompts per batch slot; None = min(3, n_mean / (2 pilot_n)), the "
        "recipe's half of the budget on the pilot (docs/two_phase.md)",
    )
    optimizer: Literal["adamw", "sgd"] = Field(
        default="adamw",
        description="sgd: plain (momentum) SGD, whose step length scales with the gradient, unlike Adam's; used to "
        "test whether lower gradient variance buys more progress without Adam's normalisation",
    )
    lr: float = Field(
        default=1e-4,
        gt=0,
        description="step size of either optimizer; AdamW 3e-4 collapsed the easy levels within 40 steps, SGD needs "
        "a different scale and did not learn at any we tried (docs/training.md)",
    )
    momentum: float = Field(default=0.0, ge=0, lt=1, description="SGD momentum (optimizer='sgd' only)")
    lr_warmup_steps: int = Field(default=10, ge=0, description="linear lr ramp: avoids Adam's large first updates")
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    ppo_epochs: int = Field(default=1, ge=1, description="passes over each step's rollouts (PPO-style reuse)")
    minibatches: int = Field(default=1, ge=1, description="gradient steps per pass; prompt groups are never split")
    clip_eps: float = Field(
        default=0.2, gt=0, description="PPO ratio clip; inert with 1 epoch x 1 minibatch (ratio = 1)"
    )
    kl_coef: float = Field(default=0.0, ge=0, description="k3 KL penalty towards the warm-up (reference) policy")
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(
        default=6,
        ge=1,
        description="generated tokens per rollout at most (end-of-sequence included); a longer sample is cut there",
    )
    task: TaskName = Field(
        default="chain_sum",
        description="chain_sum: the completion is the answer; chain_sum_steps: the partial sums, then the answer "
        '("42-25-73=" -> "17 -56"), so longer chains take more tokens; both rewarded by exact match on the '
        "final answer (vipalloc.training.tasks)",
    )
    token_budget: Literal["uniform"] | float | None = Field(
        default=None,
        description=f"{help_text('token_budget')} Here: None = plan by rollouts (prompts_per_step x n_mean); "
        "'uniform' = the tokens uniform's n_mean rollouts a prompt are predicted to take on the step's batch "
        "(Allocator.uniform_tokens; the first step, with no lengths yet, plans by rollouts); a number = that many "
        "tokens a step (the first step predicts max_new_tokens a rollout). The rollout budget stays a cap "
        "(token_rollout_cap)",
    )
    token_rollout_cap: float | None = Field(
        default=1.0,
        gt=0,
        description="token mode, single-phase strategies: the rollouts a step may use, as a multiple of "
        "prompts_per_step x n_mean (1 = uniform's rollouts); None = no cap but n_max a prompt. Two-phase "
        "strategies keep the rollout budget (their pilot is sized from it)",
    )
    levels: list[tuple[int, int]] = Field(
        default_factory=lambda: list(LEVELS),
        description="difficulty ladder: (terms, digits) per level of chain_sum, mixed evenly in pool and eval set",
    )
    pool_size: int = Field(default=1024, ge=1)
    pool_seed: int = 1
    eval_size: int = Field(default=128, ge=1, description="held-out prompts, spread evenly over the levels")
    eval_samples: int = Field(
        default=16,
        ge=1,
        description="samples per held-out prompt: 16 defines pass@k and maj@k up to k = 16; 128 x 16 samples give "
        "mean@k a sampling error of about 0.008",
    )
    eval_every: int = Field(default=10, ge=1)
    ckpt_every: int = Field(default=10, ge=1)
    threads: int = Field(default=1, ge=1, description="torch CPU threads; 1 is fastest when other jobs share the cores")
    device: Literal["cpu", "cuda", "auto"] = Field(
        default="cpu",
        description="where the policy runs: cpu (default; the project never needs a GPU), cuda (refused with a "
        "clear error when torch sees no GPU) or auto (cuda when available, else cpu); sampling draws stay on the "
        "CPU generator, so a run is seeded the same way on either",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    warmup_cache: str = "runs/warmup"
    tensorboard: bool = True

    @field_validator(
        "strategy",
        "predictor",
        "predictor_kwargs",
        "embedder",
        "seed",
        "n_min",
        "n_max",
        "pilot_n",
        "token_budget",
        mode="before",
    )
    @classmethod
    def _shared(cls, value: Any, info: ValidationInfo) -> Any:
        """The shared settings' one validator each (vipalloc.settings): the same message as on every surface."""
        name = str(info.field_name)
        if name == "strategy" and value == "dapo":  # the trainer's own loop, no allocation strategy
            return value
        return validate(name, value)

    @model_validator(mode="after")
    def _bounds(self) -> TrainConfig:
        if self.momentum > 0 and self.optimizer != "sgd":
            raise ValueError("momentum applies to optimizer='sgd' only; AdamW has its own betas")
        check_bounds(self.n_min, self.n_max)
        if not (self.n_min <= self.n_mean <= self.n_max):
            raise ValueError(f"n_mean ({self.n_mean}) must lie in [n_min, n_max] = [{self.n_min}, {self.n_max}]")
        if self.prompts_per_step > self.pool_size:
            raise ValueError("prompts_per_step cannot exceed pool_size")
        if self.model.n_embd % self.model.n_head:
            raise ValueError("model.n_embd must be divisible by model.n_head")
        for terms, digits in self.levels:
            if not (2 <= terms <= 6 and 1 <= digits <= 4):
                raise ValueError(f"level ({terms}, {digits}) is out of range: use 2..6 terms of 1..4 digits")
            if self.task == "chain_sum" and terms * (10**digits - 1) >= 10 ** (self.max_new_tokens - 1):
                raise ValueError(
                    f"level ({terms}, {digits}) can have answers longer than max_new_tokens={self.max_new_tokens} "
                    "allows (digits + sign + end-of-sequence); raise max_new_tokens"
                )
            need = completion_tokens_bound(terms, digits, self.task)
            if self.task != "chain_sum" and need > self.max_new_tokens:
                raise ValueError(
                    f"level ({terms}, {digits}) of {self.task} can need {need} tokens (partial sums, signs, spaces, "
                    f"end-of-sequence), more than max_new_tokens={self.max_new_tokens}; raise max_new_tokens"
                )
        if self.token_budget is not None and self.strategy in TOKEN_REFUSALS:
            raise ValueError(
                f"strategy {self.strategy!r} cannot run under a token budget: {TOKEN_REFUSALS[self.strategy]}; "
                "use token_budget=None or a single-phase strategy"
            )
        noise = self.warmup.label_noise
        if isinstance(noise, list) and len(noise) != len(self.levels):
            raise ValueError(
                f"warmup.label_noise has {len(noise)} values for {len(self.levels)} levels: give one per level or "
                "a single number"
            )
        if not all(0.0 <= x < 1.0 for x in self.level_noise):
            raise ValueError(f"warmup.label_noise must lie in [0, 1), got {noise}")
        if self.loss == "rloo" and self.n_min < 2:
            raise ValueError("RLOO needs n_min >= 2")
        return self

    @property
    def level_noise(self) -> tuple[float, ...]:
        """The warm-up's label noise of each level (``warmup.label_noise`` broadcast to the levels)."""
        noise = self.warmup.label_noise
        return tuple(float(x) for x in noise) if isinstance(noise, list) else (float(noise),) * len(self.levels)

    @property
    def level_tuples(self) -> tuple[tuple[int, int], ...]:
        """``levels`` as a tuple of ``(terms, digits)`` pairs."""
        return tuple((int(t), int(d)) for t, d in self.levels)

    @property
    def label(self) -> str:
        """The run's name in leagues and folders: the strategy, with ``-tokens`` (uniform's tokens) or
        ``-tokens<T>`` (a fixed token budget) when it plans by tokens."""
        return run_label(self.model_dump())

    @property
    def budget(self) -> int:
        """Rollouts per step (identical for every strategy)."""
        return self.prompts_per_step * self.n_mean

    @property
    def pilot_pool_factor(self) -> float:
        """pilot_commit's candidates per batch slot: ``pool_factor``, or ``min(3, n_mean / (2 pilot_n))`` (>= 1)."""
        if self.pool_factor is not None:
            return float(self.pool_factor)
        return max(1.0, min(3.0, self.n_mean / (2.0 * self.pilot_n)))

    @property
    def candidate_prompts(self) -> int:
        """Prompts planned a step: ``prompts_per_step``, or pilot_commit's pool of ``pool_factor`` x that."""
        if self.strategy != "pilot_commit":
            return self.prompts_per_step
        return max(self.prompts_per_step, int(round(self.prompts_per_step * self.pilot_pool_factor)))

    @model_validator(mode="after")
    def _two_phase_bounds(self) -> TrainConfig:
        if self.strategy not in TWO_PHASE_STRATEGIES:
            return self
        m = self.candidate_prompts
        if self.pilot_n > self.n_max:
            raise ValueError(f"pilot_n ({self.pilot_n}) exceeds n_max ({self.n_max})")
        if self.pilot_n * m > self.budget:
            raise ValueError(
                f"the pilot ({self.pilot_n} x {m} prompts = {self.pilot_n * m} rollouts) exceeds the step budget "
                f"{self.budget} = prompts_per_step x n_mean: lower pilot_n or pool_factor, or raise n_mean"
            )
        if m > self.pool_size:
            raise ValueError(f"pilot_commit's candidate pool ({m} prompts) exceeds pool_size ({self.pool_size})")
        return self

    def warmup_key(self, device: str = "cpu") -> str:
        """Hash of everything the warm-up model depends on (its cache key); ``device`` is the resolved device the
        warm-up runs on (a GPU warm-up is numerically different: it gets its own key, CPU keys are unchanged)."""
        spec: dict[str, object] = {
            "model": self.model.model_dump(),
            "warmup": self.warmup.model_dump(),
            "levels": self.level_tuples,
            "v": 2,
        }
        if self.task != "chain_sum":  # another warm-up target text; the default task's keys are unchanged
            spec["task"] = self.task
        if device != "cpu":
            spec["device"] = device
        blob = json.dumps(spec, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: Named option sets layered over the defaults. ``gpu``: the same league on one GPU with a larger policy and batch
#: (the command ``bench train --device cuda``): 6 layers x 256 wide (~4.8 M parameters, 6x the CPU policy), 128
#: prompts a step (4x), a 4096-prompt pool and 512 held-out prompts; the warm-up scales with it.
PRESETS: dict[str, dict[str, object]] = {
    "gpu": {
        "device": "cuda",
        "model": {"n_layer": 6, "n_embd": 256, "n_head": 8},
        "prompts_per_step": 128,
        "pool_size": 4096,
        "eval_size": 512,
        "eval_samples": 16,
        "warmup": {"steps": 3000, "batch_size": 512, "lr": 1e-3},
    },
    # The equal-token league on the length-growing task (docs/results.md), sized for a shared 2-core machine: 8
    # seeds x 3 rows of 100 steps in ~45 min. A smaller policy (2 x 64) than the demo's with a 1,000-step warm-up on
    # 1-digit chains of 2-4 terms (completions of 2 to 12 tokens), 16 prompts a step, 64 held-out prompts x 16.
    "tokens_cpu": {
        "task": "chain_sum_steps",
        "max_new_tokens": 12,
        "levels": [[2, 1], [3, 1], [4, 1]],
        "model": {"n_layer": 2, "n_embd": 64, "n_head": 4},
        "warmup": {"steps": 1000, "batch_size": 64, "threads": 1},
        "prompts_per_step": 16,
        "pool_size": 512,
        "eval_size": 64,
        "eval_samples": 16,
        "eval_every": 10,
    },
}


def run_label(options: Mapping[str, Any]) -> str:
    """:attr:`TrainConfig.label` from a config's options (a saved ``model_dump``; missing token options mean their
    defaults), without validating them."""
    strategy = str(options.get("strategy", default("strategy")))
    tokens = options.get("token_budget")
    if tokens is None:
        return strategy
    out = f"{strategy}-tokens" + ("" if tokens == "uniform" else f"{float(tokens):g}")
    cap = options.get("token_rollout_cap", 1.0)
    return out + ("-nocap" if cap is None else "" if float(cap) == 1.0 else f"-cap{float(cap):g}")


def label_options(label: str) -> dict[str, object]:
    """The config options a league row name stands for (the inverse of :attr:`TrainConfig.label`):
    ``"vip"`` -> ``{"strategy": "vip"}``, ``"vip-tokens"`` -> ``{"strategy": "vip", "token_budget": "uniform"}``,
    ``"vip-tokens5000"`` -> a fixed budget of 5,000 tokens a step; a ``-cap<x>`` / ``-nocap`` suffix sets
    ``token_rollout_cap``. Raises ``ValueError`` for an unknown strategy."""
    opts: dict[str, object] = {}
    if label.endswith("-nocap"):
        label, opts["token_rollout_cap"] = label[: -len("-nocap")], None
    elif "-cap" in label:
        label, _, cap = label.rpartition("-cap")
        try:
            opts["token_rollout_cap"] = float(cap)
        except ValueError:
            raise ValueError(f"{label!r}: the rollout cap after '-cap' must be a number, got {cap!r}") from None
    if opts and "-tokens" not in label:
        raise ValueError(f"{label!r}: a rollout cap ('-cap<x>', '-nocap') applies to token mode ('-tokens') only")
    strategy, _, rest = label.partition("-tokens")
    if strategy not in STRATEGIES or (rest and not label.startswith(f"{strategy}-tokens")):
        raise ValueError(
            f"unknown strategy {label!r}; choose from {', '.join(STRATEGIES)}, optionally with '-tokens' (plan by "
            "uniform's tokens) or '-tokens<T>' (T tokens a step)"
        )
    if "-tokens" not in label:
        return {"strategy": strategy}
    if not rest:
        return {"strategy": strategy, "token_budget": "uniform", **opts}
    try:
        return {"strategy": strategy, "token_budget": float(rest), **opts}
    except ValueError:
        raise ValueError(f"{label!r}: the token budget after '-tokens' must be a number, got {rest!r}") from None


def preset(name: str, **overrides: object) -> dict[str, object]:
    """The options of preset ``name`` with ``overrides`` on top (nested ``model`` / ``warmup`` dicts merged)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    out = json.loads(json.dumps(PRESETS[name]))  # a deep copy
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        elif value is not None:
            out[key] = value
    return out


def load_config(path: str | Path, **overrides: object) -> TrainConfig:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file into a validated :class:`TrainConfig`."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such config file")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{p}: invalid YAML ({exc})") from None
    elif p.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{p}: invalid TOML ({exc})") from None
    else:
        raise ValueError(f"{p}: config must be .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise ValueError(f"{p}: the config must be a mapping of options")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.model_validate(data)
