"""The CPU trainer's two-phase strategies: two generation rounds, the exact budget every step, the candidate pool
of pilot_commit, whole-group training, exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _training_helpers import tiny as tiny_config

from vipalloc.training.config import TrainConfig
from vipalloc.training.trainer import Trainer, train

TIMING = {
    "alloc_seconds",
    "step_seconds",
    "cum_seconds",
    "eval_seconds",
    "pilot_gen_seconds",
    "commit_gen_seconds",
    "vip/plan_seconds",
}


def tiny(run_dir: Path, cache: Path, **kw) -> TrainConfig:
    """The shared tiny config at n_mean 8: room for a pilot and a commit."""
    return tiny_config(run_dir, cache, **{**dict(steps=5, n_mean=8, n_max=16, pool_size=64, eval_every=5), **kw})


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("warmup")


@pytest.mark.parametrize("strategy", ["vip_two_phase", "pilot_commit", "vip_error_two_phase"])
def test_two_rounds_spend_the_budget_exactly(tmp_path, cache, strategy) -> None:
    cfg = tiny(tmp_path / "run", cache, strategy=strategy)
    res = train(cfg)
    steps = [m for m in res.metrics if m["step"] >= 0]
    assert len(steps) == cfg.steps
    # pilot_commit: a pool of min(3, n_mean / (2 pilot_n)) = 2 x the batch; vip_two_phase: the batch
    pool = 16 if strategy == "pilot_commit" else 8
    for m, p in zip(steps, res.plans):
        assert m["rollouts_used"] == cfg.budget  # pilot + commit, exactly
        assert m["pilot_rollouts"] + m["commit_rollouts"] == cfg.budget
        assert np.isfinite(m["loss"])
        assert len(p["counts"]) == pool and sum(p["counts"]) == cfg.budget  # whole groups
        assert sum(p["pilot"]) == m["pilot_rollouts"]
        assert all(c <= cfg.n_max for c in p["counts"])
        if strategy == "pilot_commit":
            assert m["pilot_rollouts"] == 2 * pool  # every candidate piloted, counted in the budget
            # only committed prompts train (the batch, plus any candidates that took the overflow)
            assert m["trained_prompts"] == sum(c > q for c, q in zip(p["counts"], p["pilot"]))
        else:
            assert m["trained_prompts"] == sum(c > 0 for c in p["counts"])
    assert steps[-1]["cum_rollouts"] == cfg.steps * cfg.budget
    assert any(m["grad_norm"] > 0 for m in steps)


def test_two_phase_resume_matches_uninterrupted(tmp_path, cache) -> None:
    full = train(tiny(tmp_path / "a", cache, strategy="vip_two_phase"))
    cfg_b = tiny(tmp_path / "b", cache, strategy="vip_two_phase")
    Trainer(cfg_b).run(stop_after=3)
    resumed = Trainer(cfg_b).run()
    strip = [{k: v for k, v in m.items() if k not in TIMING} for m in resumed.metrics]
    assert strip == [{k: v for k, v in m.items() if k not in TIMING} for m in full.metrics]


def test_two_phase_config_errors(tmp_path, cache) -> None:
    with pytest.raises(ValueError, match="pilot"):  # 3 x 8 candidates x 2 pilot rollouts > 8 x 4 budget
        tiny(tmp_path / "c", cache, strategy="pilot_commit", n_mean=4, pool_factor=3.0)
    with pytest.raises(ValueError, match="pilot_n"):
        tiny(tmp_path / "c", cache, strategy="vip_two_phase", pilot_n=0)
    with pytest.raises(ValueError, match="pool_size"):
        tiny(tmp_path / "c", cache, strategy="pilot_commit", pool_size=12)
