"""End-to-end runs of the `vipalloc` command (in-process via typer's runner, and once as a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vipalloc import __version__
from vipalloc.cli import app
from vipalloc.history import RolloutHistory

runner = CliRunner()


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    h = RolloutHistory()
    ids = [f"q{i}" for i in range(10)]
    p = np.linspace(0.05, 0.95, 10)
    for step in range(3):
        h.extend(
            step,
            ids,
            [rng.binomial(1, pi, 8).astype(float) for pi in p],
            prompts=[f"compute {i} * {i + 3}" for i in range(10)],
        )
    hist = tmp_path / "history.jsonl"
    h.save(hist)
    batch = tmp_path / "batch.jsonl"
    batch.write_text(
        "".join(json.dumps({"prompt_id": pid, "prompt": f"compute {i} * {i + 3}"}) + "\n" for i, pid in enumerate(ids))
    )
    return tmp_path, hist, batch


def read_plan(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("predictor", ["beta", "gp"])
def test_allocate_end_to_end(files, predictor) -> None:
    tmp, hist, batch = files
    out = tmp / "plan.jsonl"
    res = runner.invoke(
        app,
        [
            "allocate",
            "--history",
            str(hist),
            "--batch",
            str(batch),
            "--budget",
            "80",
            "--out",
            str(out),
            "--predictor",
            predictor,
            "--embedder",
            "hashing",
            "--n-min",
            "2",
            "--n-max",
            "16",
        ],
    )
    assert res.exit_code == 0, res.output
    plan = read_plan(out)
    assert [r["prompt_id"] for r in plan] == [f"q{i}" for i in range(10)]
    assert sum(r["n"] for r in plan) == 80
    assert all(r["n"] == 0 or 2 <= r["n"] <= 16 for r in plan)
    assert "plan for step 3" in res.output


def test_allocate_without_history_is_uniform(files) -> None:
    tmp, _, batch = files
    out = tmp / "plan.jsonl"
    res = runner.invoke(
        app, ["allocate", "--batch", str(batch), "--budget", "80", "--out", str(out), "--predictor", "beta", "-q"]
    )
    assert res.exit_code == 0, res.output
    assert [r["n"] for r in read_plan(out)] == [8] * 10


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--budget", "10"], "infeasible|budget"),
        (["--budget", "80", "--strategy", "bogus"], "bogus"),
        (["--budget", "80", "--estimator", "grpo"], "not monotone"),
        (["--budget", "80", "--n-min", "1"], "n_min"),
    ],
)
def test_allocate_bad_arguments_one_line_error(files, extra, match) -> None:
    tmp, hist, batch = files
    res = runner.invoke(
        app, ["allocate", "--history", str(hist), "--batch", str(batch), "--out", str(tmp / "o.jsonl"), *extra]
    )
    assert res.exit_code == 2
    assert res.output.startswith("error: ")
    assert res.output.count("\n") == 1
    import re

    assert re.search(match, res.output), res.output
    assert not (tmp / "o.jsonl").exists()


def test_allocate_corrupt_inputs(files) -> None:
    tmp, hist, batch = files
    bad = tmp / "bad.jsonl"
    bad.write_text('{"step": 0, "prompt_id": "a", "rewards": [1, 0]}\n{"step": 1, "prompt_id": "a", "rew')
    res = runner.invoke(
        app, ["allocate", "--history", str(bad), "--batch", str(batch), "--budget", "80", "--out", str(tmp / "o.jsonl")]
    )
    assert res.exit_code == 2 and "line 2" in res.output
    empty = tmp / "empty.jsonl"
    empty.write_text("\n")
    res = runner.invoke(app, ["allocate", "--batch", str(empty), "--budget", "8", "--out", str(tmp / "o.jsonl")])
    assert res.exit_code == 2 and "empty" in res.output
    dup = tmp / "dup.jsonl"
    dup.write_text('{"prompt_id": "a"}\n{"prompt_id": "a"}\n')
    res = runner.invoke(
        app, ["allocate", "--batch", str(dup), "--budget", "8", "--out", str(tmp / "o.jsonl"), "--predictor", "beta"]
    )
    assert res.exit_code == 2 and "duplicate" in res.output
    res = runner.invoke(
        app, ["allocate", "--batch", str(tmp / "nope.jsonl"), "--budget", "8", "--out", str(tmp / "o.jsonl")]
    )
    assert res.exit_code == 2 and "no such batch file" in res.output


def test_version_and_help_subprocess() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "vipalloc.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert res.stdout.strip() == f"vipalloc {__version__}"
    res = subprocess.run([sys.executable, "-m", "vipalloc.cli", "--help"], capture_output=True, text=True, check=True)
    assert "allocate" in res.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "predictor=beta"], {"predictor": "beta"}),  # used to raise TypeError: multiple values
        (["--predictor", "ridge", "--set", "predictor=beta"], {"predictor": "ridge"}),  # the named option wins
        (["--set", "threads=2", "--set", "lr=0.0002"], {"threads": 2, "lr": 0.0002}),
    ],
)
def test_demo_set_overrides_reach_run_demo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str], expected: dict
) -> None:
    import vipalloc.training.demo as demo

    seen: dict = {}

    def fake_run_demo(**kwargs):
        seen.update(kwargs)
        path = tmp_path / "report.md"
        path.write_text("# report\n")
        return path

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path), *args])
    assert res.exit_code == 0, res.output
    for key, value in expected.items():
        assert seen[key] == value


def test_allocate_by_tokens_from_history_lengths(tmp_path) -> None:
    """A hand-written history.jsonl with per-rollout lengths; `--token-budget` plans within it, and a history
    without lengths gets a one-line error naming the fix."""
    rng = np.random.default_rng(1)
    rows = []
    for step in range(2):
        for i in range(6):
            rewards = rng.binomial(1, 0.2 + 0.12 * i, 6).tolist()
            lengths = [int(100 + 150 * (5 - i)) for _ in rewards]  # harder prompts (low i) answer longer
            rows.append({"step": step, "prompt_id": f"q{i}", "rewards": rewards, "lengths": lengths})
    hist = tmp_path / "history.jsonl"
    hist.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps({"prompt_id": f"q{i}"}) + "\n" for i in range(6)))
    out = tmp_path / "plan.jsonl"
    args = ["allocate", "--history", str(hist), "--batch", str(batch), "--out", str(out), "--predictor", "beta"]
    res = runner.invoke(app, [*args, "--token-budget", "20000", "--n-min", "2", "--n-max", "16"])
    assert res.exit_code == 0, res.output
    plan = read_plan(out)
    assert sum(r["n"] * r["expected_length"] for r in plan) <= 20000
    assert "expected tokens" in res.output
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "lengths"}) + "\n" for r in rows))
    res = runner.invoke(app, [*args[:2], str(plain), *args[3:], "--token-budget", "20000", "-q"])
    assert res.exit_code == 2 and "lengths" in res.output
