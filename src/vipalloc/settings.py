"""The one schema of the allocator settings that every surface shares.

The surfaces are :class:`~vipalloc.allocator.Allocator`, the ``vipalloc allocate`` command, the TRL plug-in's
``VIPGRPOConfig``, the verl plug-in's ``VIPConfig`` (``vip:`` config group) and the CPU trainer's ``TrainConfig``.
Each setting below has one name, one type, one default (from :mod:`vipalloc.defaults`), one help text and one
validator; the surfaces take their field defaults, help texts and checks from here. A validator returns the
normalised value or raises ``ValueError`` naming the setting, the bad value and the valid range or choices::

    >>> validate("n_min", 1)
    Traceback (most recent call last):
    ...
    ValueError: n_min must be an integer >= 2 (a group of 1 rollout has no baseline, so no advantage), got 1

Checks that involve a surface's own fields stay on that surface (TRL: ``n_min <= num_generations <= n_max``;
verl: ``pilot_n >= 2``). The one name that differs: the TRL plug-in's allocator seed is ``allocator_seed``,
because ``GRPOConfig.seed`` is TRL's training seed (:data:`SURFACE_NAMES`).

``estimator="auto"`` (:func:`check_estimator` with ``auto=True``; verl's ``vip.estimator``, its default there):
derive the variance model from the host's algorithm (``algorithm.adv_estimator``: ``grpo*`` -> ``drgrpo``,
``rloo*`` -> ``rloo``). The CPU trainer has no estimator setting: it derives it from its ``loss`` the same way
(``rloo`` -> ``rloo``, else ``drgrpo``). The TRL plug-in has no ``auto``: its default is ``drgrpo``, right for TRL's
losses. An :class:`~vipalloc.allocator.Allocator` always gets a concrete estimator.

Light on purpose: the name lists of strategies and predictors are imported inside the validators, so importing
this module (and the CLI that reads its help texts) stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vipalloc import defaults
from vipalloc.embeddings import EMBEDDER_NAMES

__all__ = [
    "AUTO",
    "ESTIMATORS",
    "SETTINGS",
    "SURFACE_NAMES",
    "Setting",
    "check_bounds",
    "check_estimator",
    "check_two_phase",
    "dataclass_field",
    "default",
    "help_text",
    "validate",
    "validate_settings",
]

#: the variance models an allocation can minimise (GRPO's std-normalised variance is not monotone in n: allocate
#: GRPO training with ``drgrpo``)
ESTIMATORS: tuple[str, ...] = ("drgrpo", "rloo")
#: the plug-ins' estimator value that derives the estimator from the host's algorithm
AUTO = "auto"
#: prompt embedders (:func:`vipalloc.embeddings.get_embedder`)
EMBEDDERS: tuple[str, ...] = tuple(EMBEDDER_NAMES)


# ---------------------------------------------------------------------------------------------------- validators
def _integer(name: str, value: Any, minimum: int, why: str = "") -> int:
    """An integer ``>= minimum`` (numpy integers and integral floats accepted, bools refused)."""
    ok = not isinstance(value, bool) and (
        isinstance(value, (int, np.integer))
        or (isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer())
    )
    if not ok or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{f' ({why})' if why else ''}, got {value!r}")
    return int(value)


def _choice(name: str, value: Any, choices: tuple[str, ...], note: str = "") -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}{note}")
    return value


def _strategy_names() -> tuple[str, ...]:
    from vipalloc.strategies import STRATEGY_NAMES

    return tuple(STRATEGY_NAMES)


def _two_phase_names() -> tuple[str, ...]:
    from vipalloc.strategies import TWO_PHASE_STRATEGIES

    return tuple(TWO_PHASE_STRATEGIES)


def _predictor_names() -> tuple[str, ...]:
    from vipalloc.predictors import PREDICTOR_NAMES

    return tuple(PREDICTOR_NAMES)


def check_strategy(value: Any) -> str:
    return _choice("strategy", value, _strategy_names())


def check_predictor(value: Any) -> str:
    return _choice("predictor", value, _predictor_names())


def check_estimator(value: Any, *, auto: bool = False) -> str:
    """``drgrpo`` or ``rloo``; with ``auto=True`` (a plug-in that derives it from the host) also ``auto``."""
    choices = (AUTO, *ESTIMATORS) if auto else ESTIMATORS
    note = (
        " (for GRPO training allocate with 'drgrpo': the std-normalised GRPO variance is not monotone in n and is "
        "no allocation target)"
    )
    return _choice("estimator", value, choices, note)


def check_embedder(value: Any) -> str:
    return _choice("embedder", value, EMBEDDERS)


def check_n_min(value: Any) -> int:
    return _integer("n_min", value, 2, "a group of 1 rollout has no baseline, so no advantage")


def check_n_max(value: Any) -> int:
    return _integer("n_max", value, 2)


def check_seed(value: Any) -> int:
    return _integer("seed", value, 0)


def check_success_threshold(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"success_threshold must be a finite number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"success_threshold must be a finite number, got {value!r}")
    return float(value)


def check_two_phase_flag(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"two_phase must be true or false, got {value!r}")
    return bool(value)


def check_pilot_n(value: Any) -> int:
    return _integer("pilot_n", value, 1, "pilot rollouts per prompt")


def check_token_budget(value: Any) -> float | str | None:
    """None (plan rollouts), ``"uniform"``, or a cap in tokens (a float > 0). Strings from a command line are read
    too: ``"off"`` / ``"none"`` / ``"null"`` / ``""`` mean None, ``"uniform"``, or a number such as ``"20000"``."""
    if value is None:
        return None
    what = "token_budget must be None, 'off', 'uniform' or a number of tokens > 0"
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("off", "none", "null", ""):
            return None
        if word == "uniform":
            return "uniform"
        try:
            value = float(word)
        except ValueError:
            raise ValueError(f"{what}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what}, got {value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{what} (finite), got {value!r}")
    return float(value)


def _kwargs(name: str) -> Callable[[Any], dict[str, Any]]:
    def check(value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"{name} must be a mapping of keyword arguments (str keys) or None, got {value!r}")
        return dict(value)

    return check


def check_bounds(n_min: int, n_max: int) -> None:
    """``n_min <= n_max`` (both already checked)."""
    if n_min > n_max:
        raise ValueError(f"n_min ({n_min}) must be <= n_max ({n_max})")


def check_two_phase(strategy: str, two_phase: bool) -> None:
    """A two-phase strategy runs with ``two_phase=True``, every other strategy with ``two_phase=False``."""
    names = _two_phase_names()
    if bool(two_phase) != (strategy in names):
        raise ValueError(
            f"two_phase={bool(two_phase)} and strategy={strategy!r} disagree: the two-phase strategies "
            f"({', '.join(names)}) run with two_phase=True, every other strategy with two_phase=False"
        )


# ---------------------------------------------------------------------------------------------------- the schema
@dataclass(frozen=True)
class Setting:
    """One shared setting: its name, type (as written in annotations), default, help text and validator."""

    name: str
    type: str
    default: Any
    help: str
    check: Callable[[Any], Any]
    choices: Callable[[], tuple[str, ...]] | None = None

    def validate(self, value: Any) -> Any:
        """The normalised value; ``ValueError`` naming the setting, the value and the valid range or choices."""
        return self.check(value)

    def default_value(self) -> Any:
        """The default (a fresh dict for the keyword-argument settings)."""
        return dict(self.default) if isinstance(self.default, dict) else self.default

    def full_help(self) -> str:
        """The help text with the current choices listed (imports the name lists: not for the CLI's start-up)."""
        if self.choices is None:
            return self.help
        return f"{self.help} Choices: {', '.join(self.choices())}."


_ALL = (
    Setting(
        "strategy",
        "str",
        defaults.DEFAULT_STRATEGY,
        "Allocation strategy: any name in vipalloc.strategies.STRATEGY_NAMES (docs/strategies.md); those in "
        "TWO_PHASE_STRATEGIES run with two_phase.",
        check_strategy,
        _strategy_names,
    ),
    Setting(
        "predictor",
        "str",
        defaults.DEFAULT_PREDICTOR,
        "Success-probability predictor: any name in vipalloc.predictors.PREDICTOR_NAMES (gp, beta, empirical, "
        "ridge, oracle).",
        check_predictor,
        _predictor_names,
    ),
    Setting(
        "estimator",
        "str",
        defaults.DEFAULT_ESTIMATOR,
        "Policy-gradient estimator whose variance the plan minimises: drgrpo | rloo (train GRPO with drgrpo); "
        "verl's vip.estimator also takes auto (from algorithm.adv_estimator).",
        check_estimator,
        lambda: ESTIMATORS,
    ),
    Setting(
        "embedder",
        "str",
        defaults.DEFAULT_EMBEDDER,
        "Prompt features of the gp / ridge predictors: auto (packaged all-MiniLM-L6-v2 if installed, else hashing) "
        "| minilm | hashing.",
        check_embedder,
        lambda: EMBEDDERS,
    ),
    Setting(
        "n_min",
        "int",
        defaults.DEFAULT_N_MIN,
        "Fewest rollouts of a kept prompt (>= 2: the smallest group with a non-zero advantage).",
        check_n_min,
    ),
    Setting("n_max", "int", defaults.DEFAULT_N_MAX, "Most rollouts of one prompt (>= n_min).", check_n_max),
    Setting(
        "seed",
        "int",
        defaults.DEFAULT_SEED,
        "Seed of the allocator's tie-breaking (>= 0; a plan is a deterministic function of seed, step and inputs).",
        check_seed,
    ),
    Setting(
        "success_threshold",
        "float",
        defaults.DEFAULT_SUCCESS_THRESHOLD,
        "A rollout succeeds when its (success) reward is >= this (a finite number).",
        check_success_threshold,
    ),
    Setting(
        "two_phase",
        "bool",
        False,
        "Pilot-then-commit allocation (plan_pilot / plan_commit); true exactly with a two-phase strategy.",
        check_two_phase_flag,
    ),
    Setting(
        "pilot_n",
        "int",
        defaults.DEFAULT_PILOT_N,
        "Pilot rollouts per prompt in a two-phase step (>= 1; part of the step's budget).",
        check_pilot_n,
    ),
    Setting(
        "token_budget",
        "float | str | None",
        None,
        "Generated tokens a step may spend: None / 'off' = plan by rollouts; 'uniform' = the tokens uniform groups "
        "are predicted to spend; a number = a cap in tokens (> 0). The rollout budget stays a cap (docs/tokens.md).",
        check_token_budget,
    ),
    Setting(
        "predictor_kwargs",
        "dict[str, Any]",
        {},
        "Extra keyword arguments of the predictor's constructor.",
        _kwargs("predictor_kwargs"),
    ),
    Setting(
        "strategy_kwargs",
        "dict[str, Any]",
        {},
        "Extra keyword arguments of the strategy's constructor.",
        _kwargs("strategy_kwargs"),
    ),
)

#: the shared settings by name, in a fixed order
SETTINGS: dict[str, Setting] = {s.name: s for s in _ALL}

#: where a surface names a shared setting differently (setting -> the surface's field). The TRL plug-in's allocator
#: seed is ``allocator_seed`` because ``GRPOConfig.seed`` is TRL's training seed (``None`` there: follow it).
SURFACE_NAMES: dict[str, dict[str, str]] = {"trl": {"seed": "allocator_seed"}}


def default(name: str) -> Any:
    """The default of setting ``name``."""
    return SETTINGS[name].default_value()


def dataclass_field(name: str, *, extra: str = "", list_choices: bool = False, **over: Any) -> Any:
    """A ``dataclasses.field`` for setting ``name`` on a surface's config dataclass: its default (or
    ``default=...``, the surface's own), its help text (with the current choices when ``list_choices``; plus
    ``extra``, what is the surface's own). A real field, so that parsers such as ``HfArgumentParser`` see it."""
    setting = SETTINGS[name]
    text = f"{setting.full_help() if list_choices else setting.help} {extra}".strip()
    value = over.get("default", setting.default_value())
    if isinstance(value, dict):
        return field(default_factory=dict, metadata={"help": text})
    return field(default=value, metadata={"help": text})


def help_text(name: str) -> str:
    """The help text of setting ``name``."""
    return SETTINGS[name].help


def validate(name: str, value: Any) -> Any:
    """Setting ``name``'s value, normalised; ``ValueError`` for a bad value (or an unknown name)."""
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; choose from {', '.join(SETTINGS)}")
    return SETTINGS[name].validate(value)


def validate_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Every shared setting in ``values`` validated and normalised (others passed through unchanged), then the
    checks between them: ``n_min <= n_max``, and ``two_phase`` agreeing with ``strategy`` when both are given."""
    out = {k: (SETTINGS[k].validate(v) if k in SETTINGS else v) for k, v in values.items()}
    if "n_min" in out and "n_max" in out:
        check_bounds(out["n_min"], out["n_max"])
    if "strategy" in out and "two_phase" in out:
        check_two_phase(out["strategy"], out["two_phase"])
    return out
