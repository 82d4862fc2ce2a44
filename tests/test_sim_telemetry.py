"""The simulator logs the shared vip/* telemetry per step (single- and two-phase rows) and reports where the budget
goes; values are checked against what the plans and rewards imply."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vipalloc.bench.simulate import mean_telemetry, parse_rows, run_simulate
from vipalloc.bench.simulator import SimConfig
from vipalloc.telemetry import OUTCOME_METRIC_NAMES, PLAN_METRIC_NAMES


def test_mean_telemetry_skips_nan() -> None:
    m = mean_telemetry([{"a": 1.0, "b": float("nan")}, {"a": 3.0, "b": 2.0}])
    assert m == {"a": 2.0, "b": 2.0}
    assert mean_telemetry([]) == {}


def test_simulator_rows_carry_the_shared_telemetry(tmp_path: Path) -> None:
    batch, n_mean = 12, 4
    res = run_simulate(
        tmp_path,
        rows=parse_rows("uniform,vip:oracle,vip_two_phase:oracle,dapo"),
        seeds=1,
        steps=4,
        batch=batch,
        n_mean=n_mean,
        sigma=5.0,
        sweep=(),
        config=SimConfig(n_prompts=48),
    )
    for label, runs in res["league"].items():
        tel = runs[0]["telemetry"]
        assert set(PLAN_METRIC_NAMES) | set(OUTCOME_METRIC_NAMES) <= set(tel), label
        assert tel["vip/budget"] == batch * n_mean  # every row plans (or pilots + commits) the whole step's budget
        assert tel["vip/rollouts_generated"] == batch * n_mean
        for key in ("vip/share_hopeless", "vip/share_solved", "vip/frac_zero_var_groups", "vip/frac_dropped"):
            assert 0.0 <= tel[key] <= 1.0, (label, key)
    uni = res["league"]["uniform"][0]["telemetry"]
    assert uni["vip/num_dropped"] == 0 and uni["vip/mean_n"] == n_mean and uni["vip/max_n"] == n_mean
    # zero-variance groups: the telemetry and the row's own per-step record agree (same definition)
    run = res["league"]["uniform"][0]
    assert np.isclose(uni["vip/frac_zero_var_groups"], np.nanmean(run["zero_var_frac"]))
    text = (tmp_path / "simulate.md").read_text()
    assert "**Where the budget goes**" in text
    assert all(f"| {label} |" in text for label in res["league"])  # one row each, two-phase included
