"""``vipalloc bench budget``: where the budget goes, per strategy and predicted-p bin ."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from vipalloc.bench.budget import BINS, batch_table, format_table, skewed_batch, trace_table
from vipalloc.bench.predictors import Trace
from vipalloc.cli import app


def conserved(table, budget_per_plan: float) -> None:
    """Mean rollouts per bin x prompts per bin adds up to the budget of a plan, for every strategy."""
    prompts = np.array(table.prompts_per_bin)
    for row in table.rows.values():
        mean = np.nan_to_num(np.array(row["mean_n"]))
        assert abs(float(mean @ prompts) - budget_per_plan) < 1e-6 * budget_per_plan


def test_skewed_batch_table() -> None:
    p = skewed_batch(0)
    assert len(p) == 256 and (p == 0).sum() == 51 and (p == 1).sum() == 25 and np.all((p >= 0) & (p <= 1))
    table = batch_table(("uniform", "vip", "vip_authors"), estimator="rloo", seeds=3)
    conserved(table, 2048)
    assert table.rows["uniform"]["mean_n"] == [8.0] * len(BINS) and table.rows["uniform"]["dropped"] == 0
    mid = [label for label, _, _ in BINS].index("[.2,.8)")
    assert table.rows["vip_authors"]["mean_n"][mid] > table.rows["vip"]["mean_n"][mid] + 2  # authors: more mid-p
    assert table.rows["vip"]["mean_n"][0] > table.rows["vip_authors"]["mean_n"][0]  # never-solved prompts
    lines = format_table(table)
    assert lines[2].startswith("| strategy | p~0 |") and any(line.startswith("| `vip_authors` |") for line in lines)


def test_trace_table(tmp_path) -> None:
    rng = np.random.default_rng(0)
    ids = [f"q{i}" for i in range(12)]
    p_true = np.r_[np.zeros(3), np.ones(2), rng.uniform(0.1, 0.9, 7)]
    steps = []
    for step in range(5):
        trials = np.full(12, 8)
        steps.append(
            {
                "step": step,
                "ids": ids,
                "texts": [f"prompt {i}" for i in ids],
                "successes": rng.binomial(8, p_true),
                "trials": trials,
                "p_true": None,
            }
        )
    Trace("synthetic", steps).save(tmp_path / "trace.jsonl")
    table = trace_table(tmp_path / "trace.jsonl", ("uniform", "vip", "vip_authors"), predictor="beta")
    assert table.plans == 4  # the first step (no history) is skipped
    conserved(table, 96)


def test_cli_budget(tmp_path) -> None:
    res = CliRunner().invoke(
        app, ["bench", "budget", "--seeds", "1", "--strategies", "uniform,vip", "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    assert "| `vip` |" in res.output and (tmp_path / "budget.md").exists()
    bad = CliRunner().invoke(app, ["bench", "budget", "--strategies", "nope", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "strategy must be one of" in bad.output and "got 'nope'" in bad.output
