"""One schema of the shared allocator settings (vipalloc.settings): every surface (Allocator, ``vipalloc allocate``,
TRL's VIPGRPOConfig, verl's VIPConfig and default.yaml, the CPU trainer's TrainConfig) exposes the same names and
defaults, refuses a bad value with the same message, and round-trips through ``Allocator.from_settings``."""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from pathlib import Path
from typing import Any

import pytest

from vipalloc import Allocator
from vipalloc import defaults as d
from vipalloc.settings import SETTINGS, SURFACE_NAMES, check_estimator, default, validate, validate_settings

ALLOCATOR_PARAMS = inspect.signature(Allocator.__init__).parameters
# the settings a surface has, with the surface's own default where it documents one of its own
CLI_SETTINGS = ("strategy", "predictor", "estimator", "n_min", "n_max", "seed", "embedder")
TRAINER_SETTINGS = ("strategy", "predictor", "predictor_kwargs", "embedder", "seed", "n_min", "n_max", "pilot_n")
TRAINER_OWN = {"embedder": "hashing"}  # offline and cheap; the trainer's results were measured with it
TRL_OWN = {"n_max": None, "allocator_seed": None}  # n_max: 2 x num_generations; seed: TRL's seed
VERL_OWN = {"estimator": "auto"}  # derived from algorithm.adv_estimator


def test_schema_defaults_come_from_defaults_py() -> None:
    assert default("strategy") == d.DEFAULT_STRATEGY and default("predictor") == d.DEFAULT_PREDICTOR
    assert default("estimator") == d.DEFAULT_ESTIMATOR and default("embedder") == d.DEFAULT_EMBEDDER
    assert (default("n_min"), default("n_max"), default("seed")) == (2, d.DEFAULT_N_MAX, d.DEFAULT_SEED)
    for s in SETTINGS.values():
        assert s.help and s.help.endswith(".")  # a sentence, with its unit or range
        assert validate(s.name, s.default_value()) == s.default_value()  # every default passes its validator


def test_allocator_signature_is_the_schema() -> None:
    for name in ("strategy", "predictor", "estimator", "n_min", "n_max", "seed", "embedder", "success_threshold"):
        assert ALLOCATOR_PARAMS[name].default == default(name), name
    for name in ("predictor_kwargs", "strategy_kwargs"):  # None: no extra arguments
        assert ALLOCATOR_PARAMS[name].default is None and validate(name, None) == default(name) == {}
    a = Allocator()
    assert (a.strategy_name, a.n_min, a.n_max, a.seed) == (d.DEFAULT_STRATEGY, 2, d.DEFAULT_N_MAX, 0)


def _cli_options() -> dict[str, Any]:
    from vipalloc.cli import allocate

    out = {}
    for name, par in inspect.signature(allocate).parameters.items():
        out[name] = par.default  # a typer OptionInfo
    return out


def test_cli_options_take_default_and_help_from_the_schema() -> None:
    options = _cli_options()
    for name in CLI_SETTINGS:
        assert options[name].default == default(name), name
        assert options[name].help == SETTINGS[name].help, name


def test_cli_help_names_every_predictor() -> None:
    from vipalloc.predictors import PREDICTOR_NAMES

    assert all(p in SETTINGS["predictor"].help for p in PREDICTOR_NAMES)  # the help's list has not drifted


def _trl() -> Any:
    pytest.importorskip("trl")
    from vipalloc.integrations.trl.config import VIPGRPOConfig

    return VIPGRPOConfig


def trl_config(tmp_path: Path, **kw: Any) -> Any:
    common = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, report_to=[])
    return _trl()(**{"num_generations": 4, **common, **kw})


def test_trl_fields_take_default_and_help_from_the_schema() -> None:
    cls = _trl()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    renamed = SURFACE_NAMES["trl"]
    for name, s in SETTINGS.items():
        if name in ("predictor_kwargs", "strategy_kwargs"):
            assert name not in fields  # not a TRL setting
            continue
        f = fields[renamed.get(name, name)]
        want = TRL_OWN.get(f.name, s.default_value())
        assert f.default == want, name
        assert f.metadata["help"].startswith(s.help), name
    assert "allocator_seed" in fields and "seed" in fields  # seed: TRL's training seed
    assert "TRL's training seed" in fields["allocator_seed"].metadata["help"]


def _verl() -> Any:
    pytest.importorskip("verl")
    from vipalloc.integrations.verl.core import VIPConfig

    return VIPConfig


def test_verl_fields_and_yaml_take_defaults_from_the_schema() -> None:
    import yaml

    cls = _verl()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    cfg = cls()
    for name, s in SETTINGS.items():
        assert getattr(cfg, name) == VERL_OWN.get(name, s.default_value()), name
        assert fields[name].metadata["help"] == s.help, name
    path = Path(__file__).resolve().parents[1] / "src/vipalloc/integrations/verl_config/vip/default.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["n_min"] == 2 and raw["strategy"] is None  # null: vipalloc.defaults.DEFAULT_STRATEGY
    assert cls.from_mapping(raw).strategy == d.DEFAULT_STRATEGY


def test_trainer_fields_take_default_and_help_from_the_schema() -> None:
    pytest.importorskip("pydantic")
    from vipalloc.training.config import TrainConfig

    fields = TrainConfig.model_fields
    cfg = TrainConfig()
    for name in TRAINER_SETTINGS:
        assert getattr(cfg, name) == TRAINER_OWN.get(name, default(name)), name
        assert (fields[name].description or "").startswith(SETTINGS[name].help), name
    assert cfg.token_budget is None and (fields["token_budget"].description or "").startswith(
        SETTINGS["token_budget"].help
    )


# --------------------------------------------------------------------------------- the same message everywhere
BAD = [
    ("n_min", 1),
    ("n_max", 1),
    ("seed", -1),
    ("strategy", "nope"),
    ("predictor", "nope"),
    ("embedder", "nope"),
    ("estimator", "grpo"),
    ("pilot_n", 0),
    ("token_budget", -5.0),
]


def _message(name: str, value: Any) -> str:
    with pytest.raises(ValueError) as info:
        validate(name, value)
    return str(info.value)


@pytest.mark.parametrize(("name", "value"), BAD)
def test_bad_value_is_refused_with_the_same_message_on_every_surface(name: str, value: Any, tmp_path: Path) -> None:
    msg = _message(name, value)
    assert name in msg and repr(value) in msg  # scikit-learn style: the field, the value, the valid range
    match = re.escape(msg)
    if name in ALLOCATOR_PARAMS:
        with pytest.raises(ValueError, match=match):
            Allocator(**{name: value})
    if name in CLI_SETTINGS:
        from typer.testing import CliRunner

        from vipalloc.cli import app

        batch = tmp_path / "b.jsonl"
        batch.write_text('{"prompt_id": "a"}\n{"prompt_id": "b"}\n')
        flag = "--" + name.replace("_", "-")
        res = CliRunner().invoke(
            app, ["allocate", "--batch", str(batch), "--budget", "8", "--out", str(tmp_path / "p"), flag, str(value)]
        )
        assert res.exit_code != 0 and msg in " ".join(res.output.split()), res.output
    trl_name = SURFACE_NAMES["trl"].get(name, name)
    if name not in ("n_max",):  # TRL checks n_max against num_generations first (its own message)
        with pytest.raises(ValueError, match=match):
            trl_config(tmp_path, **{trl_name: value})
    if name == "estimator":  # verl also takes auto: the same validator, with auto among the choices
        with pytest.raises(ValueError) as info:
            check_estimator(value, auto=True)
        match = re.escape(str(info.value))
    with pytest.raises(ValueError, match=match):
        _verl().from_mapping({name: value})
    match = re.escape(msg)
    from pydantic import ValidationError

    from vipalloc.training.config import TrainConfig

    if name in TRAINER_SETTINGS or name == "token_budget":
        with pytest.raises(ValidationError, match=match):
            TrainConfig(**{name: value})


def test_cross_checks_share_one_message(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"n_min \(9\) must be <= n_max \(8\)") as info:
        validate_settings({"n_min": 9, "n_max": 8})
    msg = re.escape(str(info.value))
    with pytest.raises(ValueError, match=msg):
        Allocator(n_min=9, n_max=8)
    with pytest.raises(ValueError, match=msg):
        _verl().from_mapping({"n_min": 9, "n_max": 8})
    from vipalloc.training.config import TrainConfig

    with pytest.raises(ValueError, match=msg):
        TrainConfig(n_min=9, n_max=8, n_mean=8)
    with pytest.raises(ValueError, match="two_phase=True and strategy='vip' disagree") as info:
        validate_settings({"strategy": "vip", "two_phase": True})
    msg = re.escape(str(info.value))
    with pytest.raises(ValueError, match=msg):
        trl_config(tmp_path, strategy="vip", two_phase=True)
    with pytest.raises(ValueError, match=msg):
        _verl().from_mapping({"strategy": "vip", "two_phase": True})


def test_auto_estimator_only_where_a_host_derives_it() -> None:
    assert check_estimator("auto", auto=True) == "auto"
    with pytest.raises(ValueError, match="estimator must be one of drgrpo, rloo, got 'auto'"):
        Allocator(estimator="auto")
    assert _verl().from_mapping({"estimator": "auto"}).estimator == "auto"


# --------------------------------------------------------------------------------- TRL's deprecated names
def test_trl_deprecated_names_warn_and_still_work(tmp_path: Path) -> None:
    with pytest.warns(FutureWarning, match=r"allocation_strategy=\.\.\.\) is deprecated.*use strategy='knapsack'"):
        cfg = trl_config(tmp_path, allocation_strategy="knapsack")
    assert cfg.strategy == "knapsack" and cfg.allocation_strategy is None
    with pytest.warns(FutureWarning, match=r"variance_estimator=\.\.\.\) is deprecated.*use estimator='rloo'"):
        cfg = trl_config(tmp_path, variance_estimator="rloo")
    assert cfg.estimator == "rloo"
    with warnings.catch_warnings():  # agreeing old and new names: a warning, no error
        warnings.simplefilter("ignore", FutureWarning)
        assert trl_config(tmp_path, allocation_strategy="uniform", strategy="uniform").strategy == "uniform"
    with (
        pytest.warns(FutureWarning),
        pytest.raises(ValueError, match=r"allocation_strategy='knapsack' \(deprecated\) and strategy='uniform'"),
    ):
        trl_config(tmp_path, allocation_strategy="knapsack", strategy="uniform")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the new names never warn
        trl_config(tmp_path, strategy="knapsack", estimator="rloo")


def test_trl_allocator_seed_follows_trl_seed_unless_set(tmp_path: Path) -> None:
    from vipalloc.integrations.trl.planning import check_allocator

    cfg = trl_config(tmp_path, seed=7)
    assert cfg.allocator_seed is None and check_allocator(cfg, None).seed == 7
    cfg = trl_config(tmp_path, seed=7, allocator_seed=3)
    assert check_allocator(cfg, None).seed == 3
    with pytest.raises(ValueError, match=r"allocator_seed: seed must be an integer >= 0, got -1"):
        trl_config(tmp_path, allocator_seed=-1)


# --------------------------------------------------------------------------------- from_settings round trips
def _config_of(alloc: Allocator) -> dict[str, Any]:
    cfg = alloc.config()
    return {k: cfg[k] for k in ("strategy", "predictor", "estimator", "n_min", "n_max", "seed", "embedder")}


def test_from_settings_round_trips_each_surface(tmp_path: Path) -> None:
    want = dict(strategy="knapsack", predictor="beta", n_min=3, n_max=8, embedder="hashing")
    expect = {**want, "estimator": "rloo", "seed": 5}
    assert _config_of(Allocator.from_settings({**want, "estimator": "rloo", "seed": 5})) == expect

    from vipalloc.integrations.trl.planning import check_allocator

    trl = trl_config(tmp_path, estimator="rloo", allocator_seed=5, **want)
    assert _config_of(check_allocator(trl, None)) == expect

    verl = _verl().from_mapping({**want, "estimator": "rloo", "seed": 5})
    from vipalloc.integrations.verl.core import resolve_estimator

    assert _config_of(Allocator.from_settings(verl, estimator=resolve_estimator(verl, "rloo"))) == expect

    from vipalloc.training.config import TrainConfig

    train = TrainConfig(**want, seed=5, loss="rloo", n_mean=4)
    assert _config_of(Allocator.from_settings(train, estimator="rloo")) == expect
    # and the defaults: every surface's allocator is the schema's (but each surface's own documented defaults)
    base = _config_of(Allocator())
    assert _config_of(Allocator.from_settings(_verl()(), estimator="drgrpo")) == base
    trained = _config_of(Allocator.from_settings(TrainConfig()))
    assert trained == {**base, "embedder": "hashing"}
