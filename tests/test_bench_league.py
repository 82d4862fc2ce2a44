"""bench train's league section (rollouts-to-target ratios, paired deltas) and run reuse, on synthetic runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vipalloc.bench.train import league_lines, rewrite_report
from vipalloc.training.config import TrainConfig
from vipalloc.training.parallel import RESULT_FILE, finished_result


def _run(seed: int, speed: float, total: int = 8000, noise_seed: int = 0) -> dict[str, Any]:
    """A run whose mean@k rises like 0.2 + 0.3 (1 - exp(-speed x / 3000)), evaluated every 800 rollouts."""
    rng = np.random.default_rng([seed, noise_seed])
    metrics = []
    for i, x in enumerate(range(0, total + 1, 800)):
        acc = 0.2 + 0.3 * (1 - np.exp(-speed * x / 3000.0)) + rng.normal(0, 0.002)
        rec: dict[str, Any] = {"step": i, "cum_rollouts": x, "alloc_seconds": 0.01}
        rec.update({"vip/rollout_accuracy": acc, "vip/frac_zero_var_groups": 0.5, "vip/mean_n": 4.0})
        rec.update({"eval_acc": acc, "eval/pass@16": min(1.0, 2 * acc), "eval/maj@16": acc})
        rec.update({"eval/prompts": 8.0, "eval/samples": 128.0, "eval/mean_se": 0.01, "eval/prompt_se": 0.02})
        for lv in range(3):
            rec[f"eval/level{lv}/mean"] = acc / (lv + 1)
            rec[f"eval/level{lv}/pass@16"] = min(1.0, 2 * acc / (lv + 1))
            rec[f"eval/level{lv}/maj@16"] = acc / (lv + 1)
        metrics.append(rec)
    return {"seed": seed, "metrics": metrics, "wall_s": 1.0, "steps_done": len(metrics)}


def _res(total: int = 8000) -> dict[str, Any]:
    return {
        "total_rollouts": total,
        "runs": {
            "uniform": [_run(s, 1.0) for s in range(4)],
            "fast": [_run(s, 2.0, noise_seed=1) for s in range(4)],
            "flat": [_run(s, 0.0, noise_seed=2) for s in range(4)],
            "unpaired": [_run(s + 10, 1.0) for s in range(4)],
        },
    }


def test_league_lines_ratio_and_paired_deltas() -> None:
    text = "\n".join(league_lines(_res(), n_boot=200))
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "1 (baseline)" in rows["uniform"]
    fast_ratio = float(rows["fast"].split("**")[1])
    assert 0.4 < fast_ratio < 0.6  # learns twice as fast per rollout: about half the rollouts
    assert "not reached" in rows["flat"]
    assert "(4/4)" in rows["fast"]  # ahead on every seed at the budget
    assert "levels 1+2, at budget" in text  # the two hardest levels are named
    assert "unpaired" not in rows and "Left out (not run on every seed of uniform): unpaired." in text


def test_rewrite_report_from_json(tmp_path: Path) -> None:
    res = _res()
    res.update({"config": _cfg_dict(), "seeds": 4, "warmup_s": 1.0, "elapsed_s": 2.0, "jobs": 1, "commit": "abc"})
    (tmp_path / "train.json").write_text(json.dumps(res))
    path = rewrite_report(tmp_path)
    text = path.read_text()
    assert "## League: rollouts to reach uniform's final mean@k (4 seeds, paired)" in text
    assert text.index("## League") < text.index("| strategy | final eval accuracy")
    with pytest.raises(ValueError, match="run `vipalloc bench train"):
        rewrite_report(tmp_path / "missing")


def _cfg_dict() -> dict[str, Any]:
    return json.loads(TrainConfig().model_dump_json())


def test_finished_result_matches_config_and_stop(tmp_path: Path) -> None:
    cfg = TrainConfig(run_dir=str(tmp_path / "r"))
    assert finished_result(cfg, 100) is None  # nothing there yet
    (tmp_path / "r").mkdir()
    doc = {"config": json.loads(cfg.model_dump_json()), "stop_at_rollouts": 100, "result": {"wall_s": 3.0}}
    (tmp_path / "r" / RESULT_FILE).write_text(json.dumps(doc))
    assert finished_result(cfg, 100) == {"wall_s": 3.0}
    assert finished_result(cfg, 200) is None  # another budget
    assert finished_result(cfg.model_copy(update={"seed": 1}), 100) is None  # another configuration
    (tmp_path / "r" / RESULT_FILE).write_text('{"config": ')  # cut short
    assert finished_result(cfg, 100) is None


def test_report_from_finished_runs_of_an_interrupted_league(tmp_path: Path) -> None:
    cfg = TrainConfig()
    for strat, seeds in (("uniform", (0, 1, 2)), ("fast", (0, 1))):  # fast's seed 2 never finished
        for seed in seeds:
            run = tmp_path / "train_runs" / f"{strat}-seed{seed}"
            run.mkdir(parents=True)
            c = cfg.model_copy(update={"strategy": "uniform" if strat == "uniform" else "vip", "seed": seed})
            doc = json.loads(c.model_dump_json())
            doc["strategy"] = strat
            res = _run(seed, 1.0 if strat == "uniform" else 2.0)
            body = {"metrics": res["metrics"], "wall_s": 1.0, "steps_done": 10}
            (run / RESULT_FILE).write_text(json.dumps({"config": doc, "stop_at_rollouts": 8000, "result": body}))
    (tmp_path / "train_runs" / "fast-seed2").mkdir()
    (tmp_path / "train_runs" / "fast-seed2" / RESULT_FILE).write_text('{"config": {')  # killed mid-write
    text = rewrite_report(tmp_path).read_text()
    assert "(2 seeds, paired)" in text  # only the seeds every strategy finished
    assert "interrupted league" in text


def test_league_lines_when_the_baseline_never_improves() -> None:
    res = _res()
    res["runs"] = {"uniform": [_run(s, 0.0) for s in range(3)], "fast": [_run(s, 2.0, noise_seed=1) for s in range(3)]}
    text = "\n".join(league_lines(res, n_boot=50))  # used to raise ZeroDivisionError
    assert "undefined (uniform did not improve on its first evaluation)" in text


def test_finished_result_survives_a_move_to_another_folder(tmp_path: Path) -> None:
    cfg = TrainConfig(run_dir=str(tmp_path / "a" / "r"))
    (tmp_path / "a" / "r").mkdir(parents=True)
    doc = {"config": json.loads(cfg.model_dump_json()), "stop_at_rollouts": 100, "result": {"wall_s": 3.0}}
    (tmp_path / "a" / "r" / RESULT_FILE).write_text(json.dumps(doc))
    moved = tmp_path / "b" / "r"
    (tmp_path / "a").rename(tmp_path / "b")
    assert finished_result(cfg.model_copy(update={"run_dir": str(moved)}), 100) == {"wall_s": 3.0}
