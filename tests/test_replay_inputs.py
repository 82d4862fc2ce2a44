"""``vipalloc replay`` on hand-made inputs: continuous rewards, booleans, extreme steps, the audit-row and Tinker
formats, progress lines, unscored logs, and what the report shows (calibration counts, every strategy in every
table, nothing to gain). Expected values are counted in the test from what it wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from vipalloc.cli import app
from vipalloc.replay.cli import run_replay

FAST = ["--strategies", "none", "--predictors", "beta"]


def replay(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["replay", *args])
    return res.exit_code, res.output + (res.stderr if res.stderr_bytes is not None else "")


def load(out: Path) -> dict:
    return json.loads((out / "replay.json").read_text())


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def verl_rows(step: int, groups: list[tuple[str, list[float]]]) -> list[dict[str, Any]]:
    return [
        {"input": q, "output": "a b", "gts": None, "score": s, "step": step} for q, scores in groups for s in scores
    ]


# ------------------------------------------------------------------------------------------------ rewards
def test_continuous_reward_without_threshold_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "dump"
    write_jsonl(d / "1.jsonl", verl_rows(1, [("A", [0.2, 0.9]), ("B", [0.5, 0.5])]))
    code, text = replay(str(d), "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "Traceback" not in text
    line = text.strip().splitlines()[-1]
    assert line.startswith("error: the reward score is not 0/1: 4 of 4 rollouts") and "[0.2, 0.9]" in line
    assert "--threshold" in line and not (tmp_path / "o" / "replay.json").exists()
    code, text = replay(str(d), "--out", str(tmp_path / "o"), "--threshold", "0.5", *FAST)
    assert code == 0, text
    r = load(tmp_path / "o")
    # A: 0.2 fails, 0.9 succeeds (mixed); B: both 0.5 succeed (solved)
    assert r["zero_variance_groups"] == 1 and r["all_correct_rollouts"] == 2
    assert r["reward_range"] == {"min": 0.2, "max": 0.9, "non_binary_rollouts": 4}
    # zero advantage on the score: B's scores are equal, A's are not
    assert r["zero_advantage_groups"] == 1 and r["zero_advantage_rollouts"] == 2


def test_boolean_rewards_are_zero_one(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "h.jsonl",
        [{"step": 0, "prompt_id": "p", "rewards": [True, False]}, {"step": 0, "prompt_id": "q", "rewards": [True]}],
    )
    code, text = replay(str(path), "--out", str(tmp_path / "o"), *FAST)
    assert code == 0, text
    r = load(tmp_path / "o")
    assert r["successes"] == 2 and r["zero_variance_rollouts"] == 1 and r["singleton_groups"] == 1


@pytest.mark.parametrize("step", [10**30, 1e30, -1, 2.5, "3", True])
def test_any_step_value_is_a_clear_error(tmp_path: Path, step: Any) -> None:
    d = tmp_path / "dump"
    write_jsonl(d / "1.jsonl", [{"input": "q", "output": "a", "score": 1.0, "step": step}])
    code, text = replay(str(d), "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "Traceback" not in text
    assert text.strip().splitlines()[-1].startswith(f"error: {d / '1.jsonl'}: line 1: field 'step':")


def test_huge_reward_and_length_values_are_clear_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "h.jsonl", [{"step": 0, "prompt_id": "p", "rewards": [1, 0], "lengths": [1, 1e400]}])
    code, text = replay(str(path), "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "field 'lengths'" in text and "Traceback" not in text


# ------------------------------------------------------------------------------------------------ formats
def test_audit_rows_without_step(tmp_path: Path) -> None:
    """``{"prompt_id", "rewards"}`` per line: a prompt's k-th row is its step k - 1."""
    rows = [
        {"prompt_id": "a", "rewards": [1, 1, 1, 1]},
        {"prompt_id": "b", "rewards": [0, 1, 0, 0]},
        {"prompt_id": "a", "rewards": [1, 0, 1, 1]},
        {"prompt_id": "b", "rewards": [0, 0, 0, 0]},
        {"prompt_id": "c", "rewards": [1, 1]},
    ]
    path = write_jsonl(tmp_path / "audit.jsonl", rows)
    code, text = replay(str(path), "--out", str(tmp_path / "o"), *FAST)
    assert code == 0, text
    r = load(tmp_path / "o")
    assert r["format"] == "history" and r["steps"] == 2 and r["rollouts"] == 18
    # step 0: a (4, solved), b (4, mixed), c (2, solved); step 1: a (4, mixed), b (4, hopeless)
    assert [s["rollouts"] for s in r["per_step"]] == [10, 8]
    assert r["zero_variance_rollouts"] == 4 + 2 + 4
    assert r["zero_advantage_rollouts"] == 10  # the rewards are 0/1: equal rewards <=> zero variance
    assert any("k-th row" in n for n in r["notes"])


def tinker_row(it: int, group: int, traj: int, reward: float, tokens: list[int], correct: float) -> dict[str, Any]:
    """One record as the Tinker cookbook's ``write_rollout_summaries_jsonl`` writes it."""
    return {
        "schema_version": 1,
        "split": "train",
        "iteration": it,
        "group_idx": group,
        "traj_idx": traj,
        "tags": ["math"],
        "sampling_client_step": it,
        "total_reward": reward,
        "final_reward": reward,
        "trajectory_metrics": {"correct": correct},
        "steps": [
            {"step_idx": i, "ob_len": 10, "ac_len": n, "reward": 0.0, "episode_done": False, "metrics": {}, "logs": {}}
            for i, n in enumerate(tokens)
        ],
        "final_ob_len": 12,
    }


def test_tinker_rollout_summaries(tmp_path: Path) -> None:
    log = tmp_path / "run"
    # iteration 0: group 0 all correct (reward 1 + format 0.1), group 1 mixed; iteration 1: group 0 all wrong
    it0 = [tinker_row(0, 0, t, 1.1, [5, 3], 1.0) for t in range(3)]
    it0 += [tinker_row(0, 1, 0, 1.1, [4], 1.0), tinker_row(0, 1, 1, 0.1, [6], 0.0), tinker_row(0, 1, 2, 0.0, [2], 0.0)]
    it1 = [tinker_row(1, 0, t, 0.0, [7], 0.0) for t in range(3)]
    write_jsonl(log / "iteration_000000" / "train_rollout_summaries.jsonl", it0)
    write_jsonl(log / "iteration_000001" / "train_rollout_summaries.jsonl", it1)
    write_jsonl(log / "iteration_000001" / "eval_test_rollout_summaries.jsonl", it1)  # evaluation: not read
    code, text = replay(str(log), "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "--threshold" in text  # total_reward 1.1 / 0.1: not 0/1
    code, text = replay(str(log), "--out", str(tmp_path / "o"), "--reward", "correct", *FAST)
    assert code == 0, text
    r = load(tmp_path / "o")
    assert r["format"] == "tinker" and r["files"] == 2 and r["rollouts"] == 9 and r["prompt_steps"] == 3
    assert r["tokens"] == 3 * 8 + 4 + 6 + 2 + 3 * 7 and r["tokens_method"].startswith("exact")
    assert r["zero_variance_rollouts"] == 6 and r["zero_variance_tokens"] == 24 + 21
    # zero advantage on total_reward: group 0 of it0 (all 1.1) and it1 (all 0); group 1 mixed
    assert r["zero_advantage_rollouts"] == 6 and r["zero_advantage_groups"] == 2
    assert r["grouping"][0].startswith("Tinker's group_idx")


# ------------------------------------------------------------------------------------------------ console, report
class Lines:
    """Stands in for ``ProgressConsole``: records every line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)

    def note(self, text: str) -> None:
        self.lines.append(text)

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        pass


def test_progress_lines_count_files(tmp_path: Path) -> None:
    d = tmp_path / "dump"
    for step in range(1, 9):
        write_jsonl(d / f"{step}.jsonl", verl_rows(step, [("A", [1.0, 0.0]), ("B", [1.0, 1.0])]))
    con = Lines()
    run_replay([d], tmp_path / "o", strategies=[], predictors=[], console=con)
    assert "read 32 rollouts from 8 of 8 file(s) in 16 groups" in con.lines[-2] or any(
        "read 32 rollouts from 8 of 8 file(s) in 16 groups" in x for x in con.lines
    )
    progress = [x for x in con.lines if x.startswith("read ") and ", file " in x]
    assert progress and all(" of 8 " in x for x in progress)


def test_every_reward_skipped_says_so(tmp_path: Path) -> None:
    import pandas as pd

    d = tmp_path / "completions"
    d.mkdir()
    pd.DataFrame(
        {"step": [1] * 4, "prompt": ["p"] * 4, "completion": ["c"] * 4, "acc": [np.nan] * 4, "advantage": [0.0] * 4}
    ).to_parquet(d / "completions_00001.parquet")
    code, text = replay(str(tmp_path), "--out", str(tmp_path / "o"), *FAST)
    assert code == 0, text
    r = load(tmp_path / "o")
    assert r["rollouts"] == 0
    assert any("every one of the 4 rollouts read had no value" in c for c in r["cannot_compute"])
    assert "right folder" not in text


def test_report_tables_calibration_and_nothing_to_gain(tmp_path: Path) -> None:
    # an all-wrong log over three steps: no group is informative
    d = tmp_path / "wrong"
    for step in (1, 2, 3):
        write_jsonl(d / f"{step}.jsonl", verl_rows(step, [("A", [0.0] * 4), ("B", [0.0] * 4), ("C", [0.0] * 4)]))
    r = run_replay(
        [d], tmp_path / "o", strategies=["vip", "vip_authors"], predictors=["beta"], embedder="hashing", n_min=2
    )
    assert r["counterfactual_nothing_to_gain"].startswith("Nothing to gain")
    md = (tmp_path / "o" / "replay.md").read_text()
    assert "Nothing to gain" in md and "### Same rollout budget" not in md
    assert r["headline"].startswith("100.0% of the 36 rollouts")
    # a mixed log: both tables list every strategy asked for, vip_authors with its reason in the token table
    d = tmp_path / "mixed"
    rng = np.random.default_rng(0)
    for step in (1, 2, 3, 4):
        groups = [(q, [float(x) for x in rng.random(4) < p]) for q, p in (("A", 0.5), ("B", 0.2), ("C", 0.9))]
        write_jsonl(d / f"{step}.jsonl", verl_rows(step, groups))
    r = run_replay(
        [d], tmp_path / "m", strategies=["vip", "vip_authors"], predictors=["beta"], embedder="hashing", n_min=2
    )
    assert r["counterfactual_nothing_to_gain"] is None
    md = (tmp_path / "m" / "replay.md").read_text()
    same_tok = md.split("### Same token budget")[1].split("\n\n")[2]
    assert "| vip |" in same_tok and "| vip_authors |" in same_tok and "token" in same_tok.split("vip_authors", 1)[1]
    # calibration bins with their counts, in replay.json and in the report
    bins = r["predictors"]["beta"]["calibration"]
    assert sum(b["groups"] for b in bins) == r["predictors"]["beta"]["count"] == 9
    assert sum(b["rollouts"] for b in bins) == 36
    assert "Calibration bins" in md and "| beta |" in md.split("Calibration bins")[1]


# ------------------------------------------------------------------------------------------------ no tracebacks
_ODD = [None, True, "x", 1e308, -1, 10**30, [], {"a": 1}, 0.5, float("nan"), "", 2**63, [1, "a"]]
_BASE = {
    "1.jsonl": lambda s: {
        "input": f"q{s % 3}",
        "output": "a b",
        "score": float(s % 2),
        "step": 1 + s // 6,
        "uid": s // 3,
    },
    "h.jsonl": lambda s: {"step": s // 3, "prompt_id": f"p{s % 3}", "rewards": [1, 0, s % 2], "lengths": [1, 2, 3]},
    "train_rollout_summaries.jsonl": lambda s: {
        "iteration": s // 6,
        "group_idx": (s // 3) % 2,
        "traj_idx": s % 3,
        "total_reward": float(s % 2),
        "steps": [{"ac_len": 3}],
    },
}


@pytest.mark.parametrize("case", range(24))
def test_odd_values_never_give_a_traceback(tmp_path: Path, case: int) -> None:
    """One field of one row of a valid log set to an odd value: exit 0 with a result, or 2 with one error line."""
    rng = np.random.default_rng(case)
    name = list(_BASE)[case % 3]
    rows = [_BASE[name](s) for s in range(12)]
    row = rows[int(rng.integers(12))]
    row[list(row)[int(rng.integers(len(row)))]] = _ODD[int(rng.integers(len(_ODD)))]
    write_jsonl(tmp_path / "log" / name, rows)
    res = CliRunner().invoke(app, ["replay", str(tmp_path / "log"), "--out", str(tmp_path / "o"), *FAST])
    assert res.exit_code in (0, 2), (row, res.exception)
    if res.exit_code == 2:
        assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: ")


@pytest.mark.parametrize(
    ("column", "values"),
    [
        ("step", [float("nan")] * 4),
        ("prompt", [None] * 4),
        ("completion", [None, "a", "b", "c"]),
        ("advantage", ["x"] * 4),
        ("acc", [[1], [1], [0], [0]]),
        ("acc", [None] * 4),
    ],
)
def test_odd_trl_columns_never_give_a_traceback(tmp_path: Path, column: str, values: list[Any]) -> None:
    import pandas as pd

    data: dict[str, list[Any]] = {
        "step": [1] * 4,
        "prompt": ["p"] * 4,
        "completion": ["c d"] * 4,
        "acc": [1.0, 0.0, 1.0, 0.0],
        "advantage": [0.5, -0.5, 0.5, -0.5],
    }
    data[column] = values
    (tmp_path / "completions").mkdir()
    pd.DataFrame(data).to_parquet(tmp_path / "completions" / "completions_00001.parquet")
    res = CliRunner().invoke(app, ["replay", str(tmp_path), "--out", str(tmp_path / "o"), *FAST])
    assert res.exit_code in (0, 2), res.exception
    if res.exit_code == 2:
        assert res.stderr.startswith("error: ") and "completions_00001.parquet" in res.stderr


def test_trl_groups_of_varying_size_are_whole_runs(tmp_path: Path) -> None:
    """vipalloc's TRL plug-in logs groups of different sizes (4, 6, 8 rollouts): their common divisor 2 is not the
    group size; whole runs have zero-mean advantages, blocks of 2 do not, so whole runs are the groups."""
    import pandas as pd

    acc = [1, 0, 0, 0] + [1, 1, 1, 1, 1, 1] + [1, 1, 0, 0, 1, 0, 0, 0]
    prompts = ["A"] * 4 + ["B"] * 6 + ["C"] * 8
    adv: list[float] = []
    for q in ("A", "B", "C"):
        a = np.array([x for x, p in zip(acc, prompts) if p == q], float)
        adv += list(a - a.mean())  # group-relative, zero mean per group
    (tmp_path / "completions").mkdir()
    pd.DataFrame(
        {"step": [3] * 18, "prompt": prompts, "completion": ["x"] * 18, "acc": acc, "advantage": adv}
    ).to_parquet(tmp_path / "completions" / "completions_00003.parquet")
    code, text = replay(str(tmp_path), "--out", str(tmp_path / "o"), *FAST)
    assert code == 0, text
    r = load(tmp_path / "o")
    assert r["prompt_steps"] == 3 and "group sizes vary" in r["grouping"][0]
    assert r["zero_advantage_groups"] == 1 and r["zero_advantage_rollouts"] == 6  # B: all correct
    code, text = replay(str(tmp_path), "--out", str(tmp_path / "o"), "--group-size", "2", *FAST)
    assert code == 0 and load(tmp_path / "o")["prompt_steps"] == 9  # what the user asked for


def test_library_never_imports_the_cli() -> None:
    """The CLI sits on top: no module under src/vipalloc imports ``vipalloc.cli`` (function-level imports
    included); commands report errors through ``vipalloc.console.fail``."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "vipalloc"
    offenders = []
    for path in src.rglob("*.py"):
        if path == src / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "vipalloc.cli" for n in names):
                offenders.append(f"{path.relative_to(src)}:{node.lineno}")
    assert offenders == []
