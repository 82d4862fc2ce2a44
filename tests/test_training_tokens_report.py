"""Cost figures in tokens (issue 20): bench train's ratio-vs-target-level section and the demo report's lead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _training_helpers import tiny

from vipalloc.bench.train_levels import cost_table, levels_lines
from vipalloc.training.demo import run_demo
from vipalloc.training.report import primary_lines


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One warm-up cache for the module's tiny runs (the same config key: trained once)."""
    return tmp_path_factory.mktemp("warm")


def _metrics(seed: int, speed: float, tokens_per_rollout: float, plateau: float = 0.3) -> list[dict[str, Any]]:
    """mean@k = 0.2 + plateau (1 - exp(-speed x / 3000)) over x cumulative rollouts, evaluated every 800."""
    rng = np.random.default_rng(seed)
    out = []
    for i, x in enumerate(range(0, 8001, 800)):
        acc = 0.2 + plateau * (1 - np.exp(-speed * x / 3000.0)) + rng.normal(0, 0.002)
        out.append(
            {
                "step": i - 1,
                "cum_rollouts": x,
                "cum_tokens": x * tokens_per_rollout,
                "cum_seconds": x / 100.0,
                "eval_acc": acc,
            }
        )
    return out


def _runs() -> dict[str, list[dict[str, Any]]]:
    return {
        "uniform": [{"seed": s, "metrics": _metrics(s, 1.0, 10.0)} for s in range(4)],
        # twice as fast per rollout and half the tokens a rollout: ~0.5x the rollouts, ~0.25x the tokens
        "vip-tokens": [{"seed": s, "metrics": _metrics(s, 2.0, 5.0)} for s in range(4)],
        # same speed, a higher plateau: cheaper only near 100% of uniform's gain
        "higher": [{"seed": s, "metrics": _metrics(s, 1.0, 10.0, plateau=0.36)} for s in range(4)],
    }


def test_cost_table_ratios_by_axis_and_level() -> None:
    table = cost_table(_runs(), n_boot=60)
    assert set(table) == {"cum_rollouts", "cum_tokens", "cum_seconds"}
    by = {axis: {lv: {r.strategy: r for r in rows} for lv, (_, rows) in t.items()} for axis, t in table.items()}
    for lv in (0.5, 0.75, 0.9, 1.0):
        assert 0.4 < by["cum_rollouts"][lv]["vip-tokens"].ratio < 0.6
        assert 0.2 < by["cum_tokens"][lv]["vip-tokens"].ratio < 0.3
        assert by["cum_rollouts"][lv]["uniform"].ratio == 1.0
    # a higher plateau at the same rate: the ratio shrinks as the target nears uniform's flat end
    higher = [by["cum_rollouts"][lv]["higher"].ratio for lv in (0.5, 0.75, 0.9, 1.0)]
    assert higher == sorted(higher, reverse=True) and higher[0] > higher[-1] + 0.1
    targets = [table["cum_rollouts"][lv][0] for lv in (0.5, 0.75, 0.9, 1.0)]
    assert targets == sorted(targets)


def test_levels_lines_report_and_figure(tmp_path: Path) -> None:
    text = "\n".join(levels_lines({"runs": _runs()}, tmp_path, n_boot=60))
    assert "## Cost to reach uniform's final mean@k: rollouts, tokens, wall-clock (4 seeds, paired)" in text
    assert "### Ratio vs uniform at several target levels" in text
    assert "| tokens | vip-tokens |" in text and "| wall-clock | higher |" in text
    assert "AUC over tokens" in text and "final gap vs uniform (paired)" in text
    assert (tmp_path / "train_levels.png").stat().st_size > 0
    assert levels_lines({"runs": {"vip": _runs()["higher"]}}, n_boot=60) == []  # no baseline, no section


def test_primary_lines_lead_with_rollouts_and_tokens() -> None:
    runs = {s: [r["metrics"] for r in rs] for s, rs in _runs().items()}
    lines = primary_lines(runs, n_boot=60)
    assert lines[0] == "## Rollouts and tokens to reach uniform's final mean@k (4 seeds, paired)"
    text = "\n".join(lines).splitlines()  # the table is one multi-line entry
    rows = {ln.split("|")[1].strip(): ln for ln in text if ln.startswith("| ") and "---" not in ln}
    cells = [c.strip() for c in rows["vip-tokens"].split("|")[1:-1]]
    assert 0.4 < float(cells[2].split("**")[1]) < 0.6 and 0.2 < float(cells[4].split("**")[1]) < 0.3
    no_tokens = {
        s: [[{k: v for k, v in m.items() if k != "cum_tokens"} for m in r] for r in rs] for s, rs in runs.items()
    }
    assert primary_lines(no_tokens, n_boot=50)[0].startswith("## Rollouts to reach uniform's final mean@k")


def test_demo_report_leads_with_the_primary_figures(tmp_path: Path, warm: Path) -> None:
    cfg = tiny(tmp_path / "unused", warm, steps=3, eval_every=1)
    options = cfg.model_dump(exclude={"run_dir", "strategy", "seed", "steps"})
    report = run_demo(tmp_path / "demo", seeds=(0, 1), strategies=("uniform", "vip"), steps=3, jobs=1, **options)
    text = report.read_text()
    lead = text.split("\n## ")[1]
    assert lead.startswith("Rollouts and tokens to reach uniform's final mean@k (2 seeds, paired)")
    assert "rollouts ratio vs uniform [95% CI]" in lead and "tokens ratio vs uniform [95% CI]" in lead
    assert "rollouts to half-gain" in text  # the old figure stays, secondary
