"""End-to-end CPU training: budget every step, binary rewards, finite loss, exact resume (also after kill -9)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vipalloc.training.config import TrainConfig, load_config
from vipalloc.training.losses import group_advantages
from vipalloc.training.tasks import make_problems, reward
from vipalloc.training.trainer import Trainer, train

TIMING = {"alloc_seconds", "step_seconds"}


def tiny(run_dir: Path, cache: Path, **kw) -> TrainConfig:
    base = dict(
        run_dir=str(run_dir),
        steps=6,
        prompts_per_step=8,
        n_mean=4,
        n_max=8,
        pool_size=48,
        eval_size=16,
        eval_samples=2,
        eval_every=3,
        ckpt_every=2,
        model={"n_layer": 2, "n_embd": 32, "n_head": 2},
        warmup={"steps": 30, "batch_size": 32},
        warmup_cache=str(cache),
        predictor="beta",
        tensorboard=False,
        threads=1,
    )
    base.update(kw)
    return TrainConfig.model_validate(base)


def strip(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("warmup")


@pytest.mark.parametrize(
    "strategy,loss", [("vip", "drgrpo"), ("uniform", "rloo"), ("knapsack", "grpo"), ("dapo", "drgrpo")]
)
def test_budget_rewards_loss(tmp_path, cache, strategy, loss) -> None:
    cfg = tiny(tmp_path / "run", cache, strategy=strategy, loss=loss)
    res = train(cfg)
    steps = [m for m in res.metrics if m["step"] >= 0]
    assert len(steps) == cfg.steps
    for m in steps:
        if strategy == "dapo":
            assert m["rollouts_used"] % cfg.n_mean == 0 and cfg.budget <= m["rollouts_used"] <= 3 * cfg.budget
        else:
            assert m["rollouts_used"] == cfg.budget  # the plan's budget, exactly, every step
        assert np.isfinite(m["loss"])
        assert 0.0 <= m["train_reward"] <= 1.0
    assert steps[-1]["cum_rollouts"] == sum(m["rollouts_used"] for m in steps)
    for p in res.plans:
        assert sum(p["counts"]) == cfg.budget
        for r in p["rate"]:  # realised rates come from 0/1 rewards: multiples of 1/n
            assert r is None or np.isnan(r) or 0.0 <= r <= 1.0
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_rewards_are_binary_exact_match() -> None:
    assert reward("-4", "-4") == 1.0 and reward("-40", "-4") == 0.0 and reward(" 7", "7") == 1.0
    probs = make_problems(12, seed=3)
    assert len({p.prompt_id for p in probs}) == 12 and {p.level for p in probs} == set(range(6))
    assert all(p.prompt.endswith("=") for p in probs)


def test_group_advantages_any_group_size() -> None:
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    g = torch.tensor([0, 0, 0, 1, 2, 2])  # sizes 3, 1, 2
    dr = group_advantages(r, g, "drgrpo")
    np.testing.assert_allclose(dr.numpy(), [1 / 3, -2 / 3, 1 / 3, 0.0, -0.5, 0.5], atol=1e-7)
    rl = group_advantages(r, g, "rloo")
    np.testing.assert_allclose(rl.numpy(), [0.5, -1.0, 0.5, 0.0, -1.0, 1.0], atol=1e-7)
    gr = group_advantages(r, g, "grpo")
    std0 = np.std([1, 0, 1], ddof=1)
    np.testing.assert_allclose(gr.numpy()[:3], (np.array([1, 0, 1]) - 2 / 3) / (std0 + 1e-6), rtol=1e-5)
    assert float(gr[3]) == 0.0  # singleton group: no baseline, no signal
    const = group_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long), "grpo")
    assert torch.all(const == 0)


def test_resume_matches_uninterrupted(tmp_path, cache) -> None:
    full = train(tiny(tmp_path / "a", cache, strategy="vip", predictor="gp", embedder="hashing"))
    cfg_b = tiny(tmp_path / "b", cache, strategy="vip", predictor="gp", embedder="hashing")
    Trainer(cfg_b).run(stop_after=3)  # "killed" after step 3 (last checkpoint at step 2)
    resumed = Trainer(cfg_b).run()
    assert strip(resumed.metrics) == strip(full.metrics)
    lines_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert strip(lines_a) == strip(lines_b)


def test_kill9_resume_identical(tmp_path, cache) -> None:
    cfg_path = tmp_path / "cfg.yaml"

    def write_cfg(run_dir: Path) -> None:
        c = tiny(run_dir, cache, steps=30, ckpt_every=3, strategy="vip", predictor="gp", embedder="hashing")
        import yaml

        cfg_path.write_text(yaml.safe_dump(json.loads(c.model_dump_json())))

    write_cfg(tmp_path / "ref")
    cmd = [sys.executable, "-m", "vipalloc.cli", "train", "--config", str(cfg_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=300)
    ref = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    write_cfg(tmp_path / "killed")
    rng = random.Random(0)
    kills = 0
    for _ in range(12):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(3.0, 7.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if proc.returncode == 0:
            break
    else:
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=300)
    got = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert strip(got) == strip(ref)
    assert kills >= 1


def test_config_validation(tmp_path) -> None:
    with pytest.raises(ValueError, match="n_mean"):
        TrainConfig(n_mean=40, n_max=32)
    with pytest.raises(ValueError, match="extra"):
        TrainConfig.model_validate({"nope": 1})
    p = tmp_path / "c.toml"
    p.write_text('strategy = "uniform"\nsteps = 3\n[model]\nn_layer = 2\n')
    cfg = load_config(p)
    assert cfg.strategy == "uniform" and cfg.model.n_layer == 2
    bad = tmp_path / "c.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ValueError, match="must be .yaml"):
        load_config(tmp_path / "c.json") if (tmp_path / "c.json").write_text("{}") else None
