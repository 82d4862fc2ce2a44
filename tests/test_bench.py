"""Benchmarks: the simulator learns by real policy gradients, runs spend equal budgets, reports are well-formed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit

from vipalloc.bench.overhead import run_overhead
from vipalloc.bench.predictors import run_predictors
from vipalloc.bench.simulate import RowSpec, parse_rows, run_simulate, simulate_run
from vipalloc.bench.simulator import PromptStream, SimConfig, Simulator, group_advantages_np
from vipalloc.bench.train import _write_train_report
from vipalloc.reporting import fmt_ci, md_table, mean_ci

TINY = SimConfig(n_prompts=96, n_clusters=4, dim=8)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ simulator
def test_advantages_match_definitions() -> None:
    r = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    counts = np.array([3, 0, 1, 3])  # groups: [1,0,0], [], [1], [1,1,0]
    dr = group_advantages_np(r, counts, "drgrpo")
    np.testing.assert_allclose(dr, [2 / 3, -1 / 3, -1 / 3, 0.0, 1 / 3, 1 / 3, -2 / 3])
    rl = group_advantages_np(r, counts, "rloo")
    np.testing.assert_allclose(rl, [1.0, -0.5, -0.5, 0.0, 0.5, 0.5, -1.0])
    gr = group_advantages_np(r, counts, "grpo")
    std = np.std([1, 0, 0], ddof=1)
    np.testing.assert_allclose(gr[:3], np.array([2 / 3, -1 / 3, -1 / 3]) / (std + 1e-6))
    assert gr[3] == 0.0  # a group of one has no baseline
    with pytest.raises(ValueError, match="counts sum"):
        group_advantages_np(r[:3], counts, "drgrpo")


def test_initial_success_rates_spread_over_unit_interval() -> None:
    p = Simulator(SimConfig(), seed=0).true_p()
    assert p.min() < 0.1 and p.max() > 0.9
    assert 0.35 < p.mean() < 0.65
    assert np.mean((p > 0.2) & (p < 0.8)) > 0.4  # plenty of prompts where groups are mixed


def test_gradient_mean_is_the_estimators_policy_gradient() -> None:
    """With sigma = 0 the Dr.GRPO gradient of a prompt averages to ((n-1)/n) p (1-p) x (Monte Carlo)."""
    sim = Simulator(TINY.with_(sigma=0.0), seed=1)
    idx = np.array([0, 1, 2])
    counts = np.array([4, 8, 2])
    rng = np.random.default_rng(0)
    draws = [sim.gradient(idx, sim.rollouts(idx, counts, rng), rng) for _ in range(6000)]
    p = sim.true_p(idx)
    expected = (((counts - 1) / counts) * p * (1 - p)) @ sim.features[idx] / len(idx)
    se = np.std(draws, axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(np.mean(draws, axis=0) - expected) < 4 * se + 1e-12)


def test_noise_variance_follows_the_advantages() -> None:
    """For fixed rewards the noise part has per-coordinate variance sigma^2 sum_ij (A_ij / n_i)^2 / M^2."""
    sim = Simulator(TINY.with_(sigma=5.0), seed=2)
    idx = np.array([3, 4])
    rewards = [np.array([1.0, 0.0, 0.0, 0.0]), np.array([1.0, 1.0])]  # second group constant: no noise
    rng = np.random.default_rng(1)
    g = np.array([sim.gradient(idx, rewards, rng) for _ in range(8000)])
    a = group_advantages_np(np.concatenate(rewards), np.array([4, 2]), "drgrpo")
    w = a / np.repeat([4, 2], [4, 2])
    var = 25.0 * np.sum(w**2) / 4
    assert np.allclose(g.var(axis=0), var, rtol=0.08)


def test_policy_gradient_learning_raises_success() -> None:
    cfg = TINY.with_(sigma=0.0)
    sim = Simulator(cfg, seed=3)
    stream = PromptStream(cfg.n_prompts, seed=3)
    rng = np.random.default_rng(3)
    start = sim.mean_success()
    for _ in range(60):
        idx = stream.next(16)
        sim.update(sim.gradient(idx, sim.rollouts(idx, np.full(16, 8), rng), rng))
    assert sim.mean_success() > start + 0.08


def test_adam_beta1_is_the_momentum() -> None:
    """adam_beta1=0 makes each step lr * g_t / sqrt(v_hat_t) (normalisation only); the default 0.9 averages steps."""
    g1, g2 = np.linspace(-1, 1, TINY.dim), np.linspace(2, -0.5, TINY.dim)
    thetas = {}
    for b1 in (0.0, 0.9):
        sim = Simulator(TINY.with_(optimizer="adam", lr=0.1, adam_beta1=b1), seed=0)
        t0 = sim.theta.copy()
        sim.update(g1)
        t1 = sim.theta.copy()
        sim.update(g2)
        thetas[b1] = (t0, t1, sim.theta.copy())
    t0, t1, t2 = thetas[0.0]
    v2 = (0.999 * 0.001 * g1**2 + 0.001 * g2**2) / (1 - 0.999**2)
    np.testing.assert_allclose(t2 - t1, 0.1 * g2 / (np.sqrt(v2) + 1e-8), rtol=1e-9)
    np.testing.assert_allclose(thetas[0.9][1], t1)  # bias correction: the first step is the same
    assert not np.allclose(thetas[0.9][2], t2)
    with pytest.raises(ValueError, match="adam_beta1"):
        TINY.with_(adam_beta1=1.0)


def test_adam_learns_and_noise_slows_it() -> None:
    """Adam normalises the step, so reward-independent noise slows learning (the mechanism VIP targets)."""

    def train(sigma: float) -> float:
        cfg = TINY.with_(sigma=sigma, optimizer="adam", lr=0.05)
        sim = Simulator(cfg, seed=8)
        stream = PromptStream(cfg.n_prompts, seed=8)
        rng = np.random.default_rng(8)
        for _ in range(60):
            idx = stream.next(16)
            sim.update(sim.gradient(idx, sim.rollouts(idx, np.full(16, 8), rng), rng))
        return sim.mean_success()

    start = Simulator(TINY, seed=8).mean_success()
    clean, noisy = train(0.0), train(30.0)
    assert clean > start + 0.08
    assert noisy < clean - 0.03


def test_prompt_stream_epochs() -> None:
    s = PromptStream(10, seed=0)
    batches = [s.next(4) for _ in range(5)]  # 20 prompts = two epochs
    for b in batches:
        assert len(set(b.tolist())) == 4
    flat = np.concatenate(batches)
    assert sorted(flat[:10].tolist()) == list(range(10))
    assert sorted(flat[10:].tolist()) == list(range(10))
    with pytest.raises(ValueError, match="batch size"):
        s.next(11)


def test_texts_reflect_clusters() -> None:
    """Same-cluster prompts get more similar embeddings than other-cluster ones (what the GP can exploit)."""
    from vipalloc.embeddings import HashingEmbedder

    sim = Simulator(TINY, seed=4)
    e = HashingEmbedder().embed(sim.texts)
    sims = e @ e.T
    same = sim.cluster[:, None] == sim.cluster[None, :]
    off = ~np.eye(len(e), dtype=bool)
    assert sims[same & off].mean() > sims[~same].mean() + 0.05
    assert len(set(sim.texts)) > 0.9 * len(sim.texts)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="estimator"):
        SimConfig(estimator="ppo")
    with pytest.raises(ValueError, match="lr"):
        SimConfig(lr=0.0)
    with pytest.raises(ValueError, match="n_clusters"):
        SimConfig(n_prompts=3, n_clusters=4)
    with pytest.raises(ValueError, match="optimizer"):
        SimConfig(optimizer="lbfgs")


# ------------------------------------------------------------------------------------------------ league
def _tiny_run(row: RowSpec, seed: int = 0, sigma: float = 5.0):
    return simulate_run(row, TINY.with_(sigma=sigma), seed, steps=6, batch=12, n_mean=4, n_min=2, n_max=12)


def test_equal_cumulative_budgets_and_oracle_variance() -> None:
    rows = parse_rows("uniform,vip_pure:beta,knapsack (beta),inverse_var (beta),vip (oracle p),dapo")
    runs = {r.label: _tiny_run(r) for r in rows}
    total = 6 * 12 * 4
    for label, run in runs.items():
        assert run.cum_rollouts[-1] == total, label  # DAPO included: every row spends exactly the budget
        assert np.all(np.diff(run.cum_rollouts) > 0)
        assert np.all((run.success > 0) & (run.success < 1))
    assert runs["dapo dynamic sampling"].steps[-1] < 6  # it spends extra rollouts per step
    for label in ("uniform", "vip_pure (beta)", "knapsack (beta)", "inverse_var (beta)"):
        run = runs[label]
        # the oracle plan is the exact minimum-variance plan under the true p: nobody (without drops) beats it
        assert np.all(run.var_oracle <= run.var_plan * (1 + 1e-9) + 1e-12), label
    np.testing.assert_allclose(runs["uniform"].var_plan, runs["uniform"].var_uniform)
    assert np.all(np.isnan(runs["dapo dynamic sampling"].var_plan))


def test_same_seed_same_world_and_prompts() -> None:
    a = _tiny_run(parse_rows("uniform")[0], seed=5)
    b = _tiny_run(parse_rows("uniform")[0], seed=5)
    np.testing.assert_array_equal(a.success, b.success)
    c = _tiny_run(parse_rows("uniform")[0], seed=6)
    assert not np.array_equal(a.success, c.success)


def test_parse_rows() -> None:
    assert [r.label for r in parse_rows("uniform,vip:beta,dapo")] == ["uniform", "vip (beta)", "dapo dynamic sampling"]
    assert len(parse_rows(None)) == 10
    with pytest.raises(ValueError, match="unknown row"):
        parse_rows("vip:crystal_ball")
    with pytest.raises(ValueError, match="duplicate"):
        parse_rows("uniform,uniform")


def test_run_simulate_writes_report(tmp_path: Path) -> None:
    res = run_simulate(
        tmp_path,
        rows=parse_rows("uniform,vip (oracle p),dapo"),
        seeds=2,
        steps=4,
        batch=12,
        n_mean=4,
        sigma=5.0,
        sweep=(0.0, 5.0),
        sweep_rows=("uniform", "vip (oracle p)"),
        config=TINY,
    )
    md = (tmp_path / "simulate.md").read_text()
    assert "| row | final success |" in md
    for label in ("uniform", "vip (oracle p)", "dapo dynamic sampling"):
        assert f"| {label} |" in md
    assert "sigma=0" in md and "sigma=5" in md
    for png in ("simulate_success.png", "simulate_sweep_final.png", "simulate_sweep_delta.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
    data = json.loads((tmp_path / "simulate.json").read_text())
    assert len(data["league"]["uniform"]) == 2
    assert data["sweep"]["5.0"]["uniform"][0]["success"] == res["league"]["uniform"][0]["success"]


# ------------------------------------------------------------------------------------------------ others
def test_run_predictors_scores_against_truth(tmp_path: Path) -> None:
    res = run_predictors(tmp_path, seeds=1, steps=5, batch=16, pool=24, config=TINY, train_trace=False)
    oracle = res["simulator"]["oracle (true p)"][0]["metrics"]
    assert oracle["all"]["mae_true"] == 0.0
    beta = res["simulator"]["beta"][0]["metrics"]
    assert beta["never seen"]["count"] > 0 and beta["seen"]["count"] > 0
    assert oracle["all"]["brier"] < beta["all"]["brier"]  # the truth is better calibrated than a cold start
    md = (tmp_path / "predictors.md").read_text()
    assert "### never seen prompts" in md and "| oracle (true p) |" in md


def test_run_overhead_small(tmp_path: Path) -> None:
    res = run_overhead(tmp_path, ms=(16, 32), histories=(300,), predictors=("beta",), gp_windows=())
    assert {s["m"] for s in res["stages"]} == {16, 32}
    assert all(s["plan"] > 0 and s["peak_mb"] > 0 for s in res["stages"])
    assert all("slsqp" in r and "dp" in r and "bisection" in r for r in res["solvers"])
    # our exact solver is at least as good as SLSQP + rounding on its own objective
    assert all(r["obj_ours"] <= r["obj_slsqp"] + 1e-9 for r in res["solvers"])
    md = (tmp_path / "overhead.md").read_text()
    assert "Scaling exponents" in md and "| 32 |" in md


def test_train_report_from_metrics(tmp_path: Path) -> None:
    def metrics(acc: list[float], per_step: int) -> list[dict]:
        out = [{"step": -1, "cum_rollouts": 0, "eval_acc": acc[0]}]
        for k, a in enumerate(acc[1:], 1):
            out.append(
                {
                    "step": k - 1,
                    "cum_rollouts": k * per_step,
                    "eval_acc": a,
                    "vip/rollout_accuracy": a,
                    "vip/frac_zero_var_groups": 0.5,
                    "vip/mean_n": 8.0,
                    "alloc_seconds": 0.01,
                }
            )
        return out

    runs = {
        "uniform": [{"seed": s, "metrics": metrics([0.2, 0.25, 0.3], 100), "wall_s": 1.0} for s in range(2)],
        "vip": [{"seed": s, "metrics": metrics([0.2, 0.3, 0.35], 100), "wall_s": 1.0} for s in range(2)],
    }
    cfg = {
        "model": {"n_layer": 4, "n_embd": 128},
        "loss": "drgrpo",
        "lr": 3e-5,
        "prompts_per_step": 32,
        "n_mean": 8,
        "steps": 2,
        "n_min": 2,
        "n_max": 32,
        "predictor": "gp",
        "embedder": "hashing",
        "eval_size": 256,
        "eval_samples": 8,
        "eval_every": 1,
    }
    res = {"runs": runs, "config": cfg, "total_rollouts": 200, "seeds": 2, "elapsed_s": 1.0, "warmup_s": 0.0}
    md = _write_train_report(tmp_path, res, "test").read_text()
    # mean accuracy over the run: the curve on a 40-point rollout grid; vip (0.2, 0.3, 0.35) -> 0.289375,
    # uniform (0.2, 0.25, 0.3) -> 0.25125
    assert "| vip | 0.350 ± 0.000 | +0.050 ± 0.000 | 0.289 ± 0.000 | +0.038 ± 0.000 | 0.1 ± 0.0 | 2/2 |" in md
    assert (tmp_path / "train_accuracy.png").read_bytes()[:8] == PNG_MAGIC


def test_report_helpers() -> None:
    m, hw, n = mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and hw == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
    assert fmt_ci([float("nan")]) == "—"
    assert fmt_ci([0.5]) == "0.500 (n=1)"
    assert fmt_ci([0.1, 0.3], signed=True).startswith("+0.200 ± ")
    assert md_table(["a", "b"], [[1, "x|y"]]).splitlines()[2] == "| 1 | x\\|y |"
    with pytest.raises(ValueError, match="one cell per header"):
        md_table(["a"], [[1, 2]])


def test_cli_bench(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vipalloc.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--help"])
    assert res.exit_code == 0
    for cmd in ("simulate", "predictors", "overhead", "train"):
        assert cmd in res.output
    res = runner.invoke(app, ["bench", "simulate", "--rows", "vip:nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown row" in res.output
    res = runner.invoke(
        app,
        [
            "bench",
            "simulate",
            "--rows",
            "uniform,dapo",
            "--seeds",
            "1",
            "--steps",
            "3",
            "--sweep",
            "0",
            "--batch",
            "16",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    md = (tmp_path / "simulate.md").read_text()
    assert "| dapo dynamic sampling |" in md
    sweep = md[md.index("## Sigma sweep") :]
    assert "| uniform |" in sweep and "| dapo dynamic sampling |" in sweep
    assert "vip (beta)" not in sweep  # the sweep runs the rows asked for, not the default cheap set
    res = runner.invoke(app, ["bench", "train", "--strategies", "uniform,magic", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown strategies" in res.output


def test_sigmoid_model_consistency() -> None:
    sim = Simulator(TINY, seed=7)
    sim.theta = np.linspace(-1, 1, TINY.dim)
    np.testing.assert_allclose(sim.true_p(), expit(sim.features @ sim.theta + sim.bias))
    with pytest.raises(ValueError, match="gradient must be finite"):
        sim.update(np.full(TINY.dim, np.nan))
