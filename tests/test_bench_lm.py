"""`vipalloc bench lm` part (a) without a model: the estimators and the resampling on synthetic pools.

With score vectors that are i.i.d. standard normal and independent of the rewards -- exactly the variance model's
assumptions -- the measured variance ratio must match the modelled one; that checks the measurement pipeline that
the real-LM pool then runs through.
"""

from __future__ import annotations

import numpy as np
import pytest

from vipalloc.bench.lm_pool import Pool
from vipalloc.bench.lm_variance import group_gradient, measure_variance


def test_group_gradient_drgrpo_and_rloo_by_hand():
    r = np.array([1.0, 0.0, 0.0])
    s = np.eye(3)
    # Dr.GRPO: A = r - mean = (2/3, -1/3, -1/3), g = A s / n
    assert np.allclose(group_gradient(r, s, "drgrpo"), np.array([2 / 3, -1 / 3, -1 / 3]) / 3)
    # RLOO: A_j = r_j - mean of the others = (1, -1/2, -1/2)
    assert np.allclose(group_gradient(r, s, "rloo"), np.array([1.0, -0.5, -0.5]) / 3)
    assert np.allclose(group_gradient(np.ones(4), np.ones((4, 2)), "drgrpo"), 0.0)  # constant group: no signal
    assert np.allclose(group_gradient(np.ones(1), np.ones((1, 2)), "rloo"), 0.0)  # one rollout: no estimate
    with pytest.raises(ValueError):
        group_gradient(r, s, "grpo")


def _pool(p: np.ndarray, pool_n: int, dim: int, seed: int) -> Pool:
    rng = np.random.default_rng(seed)
    m = p.size
    rewards = np.zeros((m, pool_n))
    for i, pi in enumerate(p):  # exact rates: round(p * pool_n) successes
        rewards[i, : int(round(pi * pool_n))] = 1.0
    return Pool(
        prompt_ids=[f"q{i}" for i in range(m)],
        questions=[f"What is {i} + 1?" for i in range(m)],
        levels=np.zeros(m, int),
        prior_rewards=rewards[:, :4].copy(),
        rewards=rewards,
        sketches=rng.standard_normal((m, pool_n, dim)).astype(np.float32),
        seconds={"sample": 0.0, "grad": 0.0},
    )


def test_measured_ratio_matches_the_model_under_its_assumptions():
    p = np.array([0.0, 0.05, 0.1, 0.25, 0.5, 0.5, 0.8, 1.0])
    pool = _pool(p, pool_n=400, dim=48, seed=0)
    rows = measure_variance(
        pool,
        mean_n=4,
        n_min=2,
        n_max=16,
        resamples=600,
        boots=100,
        seed=1,
        predictors=("oracle",),
        strategies=("uniform", "vip", "knapsack"),
        progress=lambda _: None,
    )
    assert [(r.estimator, r.strategy) for r in rows] == [
        (e, s) for e in ("drgrpo", "rloo") for s in ("uniform", "vip", "knapsack")
    ]
    for r in rows:
        assert r.trace > 0 and r.trace_ci[0] <= r.trace <= r.trace_ci[1]
        assert r.ratio_ci[0] <= r.ratio <= r.ratio_ci[1]
        if r.strategy == "uniform":
            assert r.ratio == pytest.approx(1.0) and r.modelled == pytest.approx(1.0)
            continue
        assert r.modelled == pytest.approx(r.modelled_pool_p)  # the oracle predicts the pool's rates
        assert r.modelled < 1.0  # p = 0 and p = 1 prompts waste uniform's rollouts
        assert r.ratio == pytest.approx(r.modelled, rel=0.2)  # the measurement reproduces the model
        assert r.ratio_ci[0] < r.modelled < r.ratio_ci[1] or abs(r.ratio / r.modelled - 1) < 0.1
    knap = next(r for r in rows if r.strategy == "knapsack" and r.estimator == "drgrpo")
    assert sum(knap.counts) == pytest.approx(32.0) and knap.counts[-1] == 2  # p = 1: the minimum


def test_two_phase_resamples_its_pilot_and_commit():
    p = np.array([0.0, 0.2, 0.5, 0.9])
    pool = _pool(p, pool_n=100, dim=16, seed=2)
    rows = measure_variance(
        pool,
        mean_n=4,
        n_min=2,
        n_max=12,
        resamples=40,
        boots=20,
        seed=0,
        predictors=("oracle",),
        estimators=("drgrpo",),
        strategies=("uniform", "vip_two_phase"),
        progress=lambda _: None,
    )
    two = rows[-1]
    assert two.strategy == "vip_two_phase"
    assert sum(two.counts) == pytest.approx(16.0)  # pilot + commit = the budget, every resample
    assert np.isfinite(two.ratio) and 0 < two.ratio < 1.5
    assert 0 < two.modelled < 1.5 and -1 <= two.cosine <= 1


def test_league_report_pairs_seeds_and_reads_every_finished_run(tmp_path):
    import dataclasses
    import json

    from vipalloc.bench.lm import PRESETS
    from vipalloc.bench.lm_league import RunResult, load_runs
    from vipalloc.bench.lm_report import league_section, power_lines
    from vipalloc.reporting import paired_verdict

    cfg = PRESETS["cpu"]["league"]
    for seed, (u, v, vt) in enumerate([(0.20, 0.25, 0.22), (0.10, 0.18, 0.12), (0.30, 0.31, 0.33)]):
        for strat, mode, end in (("uniform", "rollouts", u), ("vip", "rollouts", v), ("vip", "tokens", vt)):
            run = RunResult(
                strat,
                seed,
                mode,
                steps=[1, 2],
                rollouts=[32, 64],
                tokens=[500, 900],
                train_seconds=[5.0, 10.0],
                train_success=[0.1, 0.2],
            )
            run.eval_steps, run.eval_mean_at_k = [0, 1, 2], [0.1, (0.1 + end) / 2, end]
            run.eval_pass_at_k, run.eval_se = [0.3, 0.35, 0.4], [0.02, 0.02, 0.02]
            run.brier = {"gp": [0.1, 0.1], "beta": [0.2, 0.2], "empirical": [float("nan")] * 2}
            run.brier_n = [8, 8]
            (tmp_path / f"{strat}-{mode}-seed{seed}.json").write_text(json.dumps(dataclasses.asdict(run)))
    (tmp_path / "vip-rollouts-seedx.json").write_text("{}")  # not a run: ignored
    labels = ["uniform", "vip", "vip@tokens"]
    runs = load_runs(tmp_path, labels)
    assert [(r.seed, r.strategy, r.mode) for r in runs] == [
        (s, k, m) for s in range(3) for k, m in (("uniform", "rollouts"), ("vip", "rollouts"), ("vip", "tokens"))
    ]
    text = league_section(runs, cfg, labels, None)
    assert "`vip` - `uniform`, paired over seeds [0, 1, 2]" in text
    assert "`vip@tokens` - `uniform`" in text
    assert "Runs: 9, all made at commit `unknown`; environment: not recorded." in text
    # uniform's gain, start (0.1) to end: 0.10, 0.00, 0.20; its peak is its end here
    gains = [0.10, 0.00, 0.20]
    gain = paired_verdict(gains)
    assert f"own gain in mean@4, start to end: {gain}; start to its peak: {gain}" in text
    assert "3/3 seeds ahead" in text  # vip's final mean@4 is above uniform's on every seed
    # curve mean after the start: ((0.1 + v) / 2 + v) / 2 - same for u = 0.75 (v - u); the peak is the final here
    avg = [0.75 * (v - u) for u, v in [(0.20, 0.25), (0.10, 0.18), (0.30, 0.31)]]
    assert f"averaged over the evaluations after the start {paired_verdict(avg)}; peak mean@4 " in text
    # each evaluation after the start: at step 1 the curve is halfway, (v - u) / 2; at step 2 the final v - u
    half = paired_verdict([(v - u) / 2 for u, v in [(0.20, 0.25), (0.10, 0.18), (0.30, 0.31)]])
    full = paired_verdict([v - u for u, v in [(0.20, 0.25), (0.10, 0.18), (0.30, 0.31)]])
    assert f"mean@4 at each evaluation: step 1 {half}, step 2 {full}" in text
    assert "| gp | 9 | 0.1000" in text and "| empirical | 0 | —" in text
    assert "Brier of `beta` minus `gp`, paired by run (positive: `gp` better): +0.1000" in text
    # the level table of bench train: rollouts, tokens and wall-clock ratios at 50-100% of uniform's gain
    assert "Ratio vs uniform at several target levels" in text
    for axis in ("rollouts", "tokens", "wall-clock"):
        assert f"| {axis} | vip |" in text
    assert "Not in the cost tables" not in text
    # a row that lacks one of uniform's seeds (a league run in pieces) is named, not silently left out
    partial = [r for r in runs if not (r.mode == "tokens" and r.seed == 1)]
    short = league_section(partial, cfg, labels, None)
    assert "| rollouts | vip@tokens |" not in short and "| rollouts | vip |" in short
    note = "Not in the cost tables (each needs all of uniform's 3 seeds, [0, 1, 2]): `vip@tokens` (seeds [0, 2])"
    assert note in short
    # a run resumed at another commit: the report names both and says not to quote it
    mixed = [dataclasses.replace(r, commit="abc1234") if r.seed == 2 else r for r in runs]
    warned = league_section(mixed, cfg, labels, None)
    assert "**Runs from 2 commits: `abc1234` (3 runs), `unknown` (6 runs).** Do not quote this table" in warned
    assert "all made at commit" not in warned
    # runs from two machines: both environments are named, with their counts
    envs = [dataclasses.replace(r, env={"cpu": "A" if r.seed else "B", "torch": "2.13.0"}) for r in runs]
    named = league_section(envs, cfg, labels, None)
    assert "Runs from 2 environments (each replays bit for bit only on its own): " in named
    assert "cpu A, torch 2.13.0 (6 runs); cpu B, torch 2.13.0 (3 runs)" in named
    from vipalloc.bench.lm_league import run_env

    env = run_env()
    assert set(env) == {"torch", "transformers", "cpu", "cpu_capability"} and all(env.values())
    power = power_lines(runs, effect=0.03)
    assert "seeds" in power[0] and "se 0.020" in power[0]
    # the paired lines: vip's final differences 0.05, 0.08, 0.01 -> sd 0.0351; ((1.96 + 0.8416) 0.0351 / 0.03)^2
    sd = float(np.std([0.05, 0.08, 0.01], ddof=1))
    need = int(np.ceil((2.8016 * sd / 0.03) ** 2))
    assert f"`vip` paired with uniform over 3 seeds: sd of the final mean@k difference {sd:.3f}" in power[1]
    assert f"needs about {need} seeds" in power[1] and need == 11
    assert power[2].startswith("- power, `vip@tokens` paired")  # 0.02, 0.02, 0.03


def test_error_ratio_is_measured_beside_the_model(tmp_path):
    """Score vectors with signal (``s = (r - p) Delta + noise``): uniform's measured error ratio is 1 by
    construction, every row carries the modelled ``Plan.error_ratio``, and dropping the mixed prompts costs error."""
    rng = np.random.default_rng(3)
    p = np.array([0.0, 0.0, 0.1, 0.3, 0.5, 0.6, 0.9, 1.0])
    pool = _pool(p, pool_n=200, dim=32, seed=4)
    delta = rng.standard_normal((p.size, 32)) * 2.0
    pool.sketches = (
        (pool.rewards - pool.rewards.mean(axis=1, keepdims=True))[:, :, None] * delta[:, None, :]
        + rng.standard_normal(pool.sketches.shape)
    ).astype(np.float32)
    rows = measure_variance(
        pool,
        mean_n=4,
        n_min=2,
        n_max=16,
        resamples=300,
        boots=100,
        seed=0,
        predictors=("oracle",),
        estimators=("rloo",),
        strategies=("uniform", "vip_pure", "vip"),
        progress=lambda _: None,
    )
    uni = rows[0]
    assert uni.strategy == "uniform" and uni.error_ratio == pytest.approx(1.0)
    assert uni.best_error_ratio == pytest.approx(1.0) and uni.modelled_error == pytest.approx(1.0)
    for r in rows:
        assert r.mean_n == 4 and np.isfinite(r.modelled_error) and r.modelled_error > 0
        assert r.error_ratio_ci[0] <= r.error_ratio <= r.error_ratio_ci[1]
    pure = rows[1]
    assert pure.error_ratio < 1.0  # more rollouts where the signal and the noise are: a better gradient


def test_common_random_numbers_an_allocation_equal_to_uniforms_measures_exactly_one():
    """At 2 rollouts a prompt with n_min = 2 knapsack cannot differ from uniform: with common random numbers its
    measured ratios are exactly 1, not 1 plus resampling noise."""
    pool = _pool(np.array([0.1, 0.3, 0.5, 0.7]), pool_n=50, dim=8, seed=5)
    rows = measure_variance(
        pool,
        mean_n=2,
        n_min=2,
        n_max=8,
        resamples=50,
        boots=20,
        seed=0,
        predictors=("oracle",),
        estimators=("drgrpo",),
        strategies=("uniform", "knapsack"),
        progress=lambda _: None,
    )
    knap = rows[1]
    assert knap.counts == [2.0, 2.0, 2.0, 2.0]
    assert knap.ratio == pytest.approx(1.0, abs=1e-12) and knap.error_ratio == pytest.approx(1.0, abs=1e-12)
    assert knap.ratio_ci == pytest.approx((1.0, 1.0))


def test_league_folder_names_every_setting_that_differs_from_the_preset():
    """Runs made with another lr, held-out size or LoRA depth land in their own folder: `--reuse` never mixes them
    with the preset's (a run file does not carry its settings)."""
    import dataclasses
    from pathlib import Path

    from vipalloc.bench.lm import PRESETS, league_folder, run_lm

    lc = PRESETS["cpu"]["league"]
    # the lr is always named: the folder of the committed lr 4e-3 runs (benchmarks/results) is the preset's
    assert lc.lr == 0.004 and league_folder("cpu", lc) == f"league-cpu-{lc.steps}-lr0.004"
    other = dataclasses.replace(lc, lr=lc.lr / 2, eval_prompts=128, top_layers=None)
    assert league_folder("cpu", other) == f"league-cpu-{lc.steps}-lr{lc.lr / 2:g}-eval128-topall"
    assert league_folder("cpu", dataclasses.replace(lc, lr=0.008)) == f"league-cpu-{lc.steps}-lr0.008"
    with pytest.raises(ValueError, match="lr must be > 0, got 0"):
        run_lm(Path("unused"), parts=["league"], lr=0.0)
