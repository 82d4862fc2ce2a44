"""Two-phase rows on the simulator: equal cumulative rollouts, common random numbers with single-phase rows,
the Brier figures, the pool rule of pilot_commit, and the report section."""

from __future__ import annotations

import numpy as np
import pytest

from vipalloc.bench.simulate import RowSpec, parse_rows, run_simulate, simulate_run
from vipalloc.bench.simulator import SimConfig, Simulator
from vipalloc.bench.two_phase_sim import pilot_commit_pool_factor, simulate_two_phase_run

CFG = SimConfig(n_prompts=96, n_clusters=4, dim=8)


def test_pool_factor_rule() -> None:
    assert pilot_commit_pool_factor(4) == 1.0  # half of 4 rollouts a prompt = the batch piloted twice
    assert pilot_commit_pool_factor(8) == 2.0
    assert pilot_commit_pool_factor(16) == 3.0 and pilot_commit_pool_factor(64) == 3.0  # the recipe's 3x
    assert pilot_commit_pool_factor(2) == 1.0


@pytest.mark.parametrize("strategy", ["vip_two_phase", "pilot_commit"])
def test_two_phase_rows_end_at_the_same_rollouts(strategy: str) -> None:
    row = parse_rows(f"{strategy}:beta")[0]
    assert row == RowSpec(f"{strategy} (beta)", strategy, "beta")
    run = simulate_run(row, CFG, 0, steps=6, batch=16, n_mean=8, n_max=16)  # dispatched to two_phase_sim
    uni = simulate_run(RowSpec("uniform", "uniform", "empirical"), CFG, 0, steps=6, batch=16, n_mean=8, n_max=16)
    assert run.cum_rollouts.tolist() == uni.cum_rollouts.tolist() == [128 * k for k in range(7)]
    assert run.total_rollouts == 6 * 128
    ex = run.extra
    assert ex["generation_rounds"] == 2 and ex["pool_factor"] == (2.0 if strategy == "pilot_commit" else 1.0)
    for key in ("brier_prior", "brier_post"):  # expected Brier = MSE to the true p + p(1-p): within [0, 0.5]
        assert 0.0 < ex[key] < 0.5
    again = simulate_run(row, CFG, 0, steps=6, batch=16, n_mean=8, n_max=16)
    assert again.success.tolist() == run.success.tolist()  # deterministic per seed
    if strategy == "pilot_commit":
        assert np.all(np.isnan(run.var_plan))  # trained prompts chosen after seeing rewards, like DAPO
    else:
        assert np.all(np.isfinite(run.var_plan)) and np.all(run.var_uniform > 0)


def test_common_random_numbers_with_single_phase_rows() -> None:
    """Pilot + commit of a prompt reuse the uniforms a single-phase row would use for its group. With
    skip="none" and n_mean = pilot_n = 2 the commit has nothing to place, every group is its 2 pilot rollouts, as
    in the uniform row, so the two runs must match exactly (same rewards, same update, same noise)."""
    uni = simulate_run(RowSpec("uniform", "uniform", "empirical"), CFG, 3, steps=5, batch=16, n_mean=2, n_max=8)
    row = RowSpec("tp", "vip_two_phase", "beta")
    tp = simulate_two_phase_run(row, CFG, 3, steps=5, batch=16, n_mean=2, n_max=8, strategy_kwargs={"skip": "none"})
    np.testing.assert_array_equal(tp.success, uni.success)
    np.testing.assert_array_equal(tp.zero_var_frac, uni.zero_var_frac)


def test_rollout_block_prefix_is_the_group() -> None:
    """The premise of the common random numbers: rollouts of width n_max are prefixes of each other."""
    sim = Simulator(CFG, 1)
    idx = np.arange(8)
    a = sim.rollouts(idx, np.full(8, 8), np.random.default_rng(5), width=8)
    b = sim.rollouts(idx, np.arange(8), np.random.default_rng(5), width=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x[: len(y)], y)


def test_report_has_the_two_phase_section(tmp_path) -> None:
    rows = parse_rows("uniform,vip_two_phase:beta,pilot_commit:beta")
    res = run_simulate(tmp_path, rows=rows, seeds=2, steps=3, batch=16, n_mean=8, sweep=(), config=CFG)
    text = (tmp_path / "simulate.md").read_text()
    assert "Two-phase rows: the predictor before and after the pilot" in text
    assert "| vip_two_phase (beta) | 2 / 1x |" in text and "| pilot_commit (beta) | 2 / 2x |" in text
    assert res["league"]["pilot_commit (beta)"][0]["pool_factor"] == 2.0


def test_paired_differences_by_seed() -> None:
    from vipalloc.bench.two_phase_sim import paired_differences

    def run(seed: int, ys: list[float]) -> dict:
        return {"seed": seed, "cum_rollouts": [0, 10, 20], "success": ys}

    result = {
        "config": {"sigma": 10.0},
        "league": {"a": [run(0, [0.5, 0.6, 0.7]), run(1, [0.5, 0.5, 0.5])], "b": [run(1, [0.5, 0.4, 0.3])]},
        "sweep": {"0.0": {"a": [run(0, [0.5, 0.5, 0.9])], "b": [run(0, [0.5, 0.5, 0.5])]}},
    }
    rows = paired_differences(result, "a", "b")
    assert [r["sigma"] for r in rows] == [0.0, 10.0]
    assert rows[0]["final"] == "+0.400 (n=1)" and rows[0]["auc"] == "+0.100 (n=1)"  # AUC: (0 + 0.4) / 2 / 2
    assert rows[1]["seeds"] == 1 and rows[1]["final"] == "+0.200 (n=1)" and rows[1]["auc_ahead"] == 1
