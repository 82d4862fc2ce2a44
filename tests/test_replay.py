"""``vipalloc replay`` on logs written by the real code paths (TRL, verl, vipalloc) and on hand-made files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vipalloc.cli import app
from vipalloc.history import RolloutHistory
from vipalloc.replay.analysis import waste
from vipalloc.replay.cli import run_replay

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAST = ["--strategies", "none", "--predictors", "beta"]


def replay(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["replay", *args])
    return res.exit_code, res.output + (res.stderr if res.stderr_bytes is not None else "")


def load(out: Path) -> dict:
    return json.loads((out / "replay.json").read_text())


# ------------------------------------------------------------------------------------------------ verl
def write_verl(folder: Path, step: int, groups: list[tuple[str, list[float], int]], **extra_cols) -> None:
    """One verl dump through verl's own ``_write_generations``: groups of (prompt, scores, words per output)."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    inputs = [q for q, scores, _ in groups for _ in scores]
    outputs = [" ".join(["w"] * words) for _, scores, words in groups for _ in scores]
    scores = [float(s) for _, sc, _ in groups for s in sc]
    extras = {"acc": [s >= 1 for s in scores], **extra_cols}
    RayPPOTrainer._write_generations(inputs, outputs, [None] * len(inputs), scores, extras, str(folder), step)


@pytest.fixture(scope="module")
def verl_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("verl")
    # step 1: A solved (4 x 2 words), B mixed (4 x 3), C hopeless (4 x 1)  -> zero-var 8/12 rollouts, 12/24 tokens
    write_verl(d, 1, [("A?", [1, 1, 1, 1], 2), ("B?", [1, 0, 0, 0], 3), ("C?", [0, 0, 0, 0], 1)])
    # step 2: A mixed (4 x 2), B mixed (4 x 3), C hopeless (2 x 5) -> zero-var 2/10 rollouts, 10/30 tokens
    write_verl(d, 2, [("A?", [1, 0, 1, 1], 2), ("B?", [0, 1, 0, 1], 3), ("C?", [0, 0], 5)])
    return d


def test_verl_exact_shares(verl_dir: Path, tmp_path: Path) -> None:
    code, text = replay(str(verl_dir), "--out", str(tmp_path), *FAST)
    assert code == 0, text
    r = load(tmp_path)
    assert r["format"] == "verl" and r["files"] == 2
    assert r["rollouts"] == 22 and r["prompt_steps"] == 6 and r["steps"] == 2
    assert r["zero_variance_rollouts"] == 10 and r["all_correct_rollouts"] == 4 and r["all_wrong_rollouts"] == 6
    assert r["zero_variance_share"] == pytest.approx(10 / 22, abs=1e-15)
    assert r["tokens"] == 54 and r["zero_variance_tokens"] == 22
    assert r["zero_variance_tokens_share"] == pytest.approx(22 / 54, abs=1e-15)
    s1, s2 = r["per_step"]
    assert (s1["step"], s1["rollouts"], s1["zero_variance_share"], s1["zero_variance_tokens_share"]) == (
        1,
        12,
        pytest.approx(8 / 12),
        pytest.approx(12 / 24),
    )
    assert (s1["solved_share"], s1["hopeless_share"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert s2["zero_variance_share"] == pytest.approx(2 / 10)
    assert s2["zero_variance_tokens_share"] == pytest.approx(1 / 3)
    assert r["prompts"] == {"prompts": 3, "never_solved": 1, "always_solved": 0}
    assert "approximate" in r["tokens_method"]
    # beta scored on step 2 only: 3 groups (A and B seen at step 1, C too)
    assert r["predictors"]["beta"]["count"] == 3 and r["predictors"]["beta"]["count_seen"] == 3
    assert (tmp_path / "replay.md").read_text().count("zero-variance groups") >= 1
    assert (tmp_path / "zero_variance.png").stat().st_size > 0


def test_verl_threshold_and_named_reward(verl_dir: Path, tmp_path: Path) -> None:
    # 'acc' is a bool extra: JSON true/false read as 1/0, the same successes as the 0/1 score
    code, text = replay(str(verl_dir), "--out", str(tmp_path), "--reward", "acc", *FAST)
    assert code == 0, text
    r = load(tmp_path)
    assert r["success"] == "acc >= 1" and r["zero_variance_rollouts"] == 10 and r["all_correct_rollouts"] == 4
    # a threshold of 0 makes every rollout a success: every group solved
    code, text = replay(str(verl_dir), "--out", str(tmp_path), "--threshold", "0", *FAST)
    assert code == 0, text
    assert load(tmp_path)["all_correct_rollouts"] == 22


def test_counterfactuals_uniform_and_vip(verl_dir: Path, tmp_path: Path) -> None:
    r = run_replay(
        [verl_dir],
        tmp_path,
        strategies=["uniform", "vip"],
        predictors=["gp", "empirical"],
        embedder="hashing",
        n_min=2,
        n_max=8,
    )
    uni = r["strategies"]["uniform"]
    # the log is uniform at step 2 except C (2 rollouts): uniform at 10 rollouts over 3 prompts gives 4/3/3 or so
    assert uni["steps_planned"] == 1 and uni["rollouts"] == 10
    assert uni["variance_ratio"] == pytest.approx(1.0)
    vip = r["strategies"]["vip"]
    assert vip["rollouts"] == 10 and vip["variance_ratio"] <= 1.0 + 1e-12
    plans = [json.loads(x) for x in (tmp_path / "counterfactuals" / "vip.jsonl").read_text().splitlines()]
    assert sum(p["n_same_rollouts"] for p in plans) == 10 and {p["step"] for p in plans} == {2}
    # rollouts moved away from zero-variance groups, recomputed from the plans file
    moved = sum(p["n_logged"] - p["n_same_rollouts"] for p in plans if p["successes_logged"] in (0, p["n_logged"]))
    assert vip["rollouts_moved_from_zero_variance"] == moved
    same = vip["same_token_budget"]
    assert same is not None and same["target_tokens"] > 0
    # planned by Allocator.plan(token_budget=...): the plan's predicted tokens never exceed the logged cost
    assert same["predicted_tokens"] <= same["target_tokens"] * (1 + 1e-9) + 1e-6
    assert 0.0 <= same["max_optimality_gap"] <= 1e-3
    assert "Allocator.plan(token_budget=T)" in r["counterfactual_settings"]["token_budget_method"]
    same_tok = [p["n_same_tokens"] for p in plans]
    assert all(n is not None and n >= 0 for n in same_tok)
    assert r["predictors"]["gp"]["count"] == 3 and r["predictors"]["empirical"]["count"] == 3
    assert "model-based" in (tmp_path / "replay.md").read_text().lower()


def test_malformed_verl_line_exits_2(tmp_path: Path) -> None:
    d = tmp_path / "dump"
    d.mkdir()
    (d / "3.jsonl").write_text(
        '{"input": "q", "output": "a", "score": 1.0, "step": 3}\n'
        '{"input": "q", "output": "b", "score": "x", "step": 3}\n'
    )
    code, text = replay(str(d), "--out", str(tmp_path / "o"), *FAST)
    assert code == 2
    assert text.strip().splitlines()[-1] == (
        f"error: {d / '3.jsonl'}: line 2: field 'score': expected a number, got 'x'"
    )
    (d / "3.jsonl").write_text('{"input": "q", "output": "a", "score": 1.0, "step": 3}\n{"input": "q", "outp\n')
    code, text = replay(str(d), "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "3.jsonl: line 2: not valid JSON" in text


# ------------------------------------------------------------------------------------------------ history
def test_history_saved_by_rollout_history(tmp_path: Path) -> None:
    h = RolloutHistory()
    h.extend(0, ["a", "b"], [[1, 1, 1], [0, 1, 0]], prompts=["A", "B"])
    h.extend(1, ["a", "b", "c"], [[1, 0], [0, 0, 0, 0], [1]], prompts=["A", "B", "C"])
    path = tmp_path / "history.jsonl"
    h.save(path)
    code, text = replay(str(path), "--out", str(tmp_path / "o"), *FAST)
    assert code == 0, text
    r = load(tmp_path / "o")
    assert r["format"] == "history" and r["rollouts"] == 13 and r["prompt_steps"] == 5
    # zero-var: a@0 (3), b@1 (4), c@1 (1, a singleton) -> 8 of 13
    assert r["zero_variance_rollouts"] == 8 and r["zero_variance_share"] == pytest.approx(8 / 13)
    assert r["singleton_groups"] == 1
    assert r["tokens"] is None and r["zero_variance_tokens_share"] is None
    assert any("token figures" in c for c in r["cannot_compute"])
    # an edited file fails its checksum with a one-line error
    path.write_text(path.read_text().replace('"successes":3', '"successes":2'))
    code, text = replay(str(path), "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "checksum mismatch" in text


def test_history_hand_written_with_lengths(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    rows = [
        {"step": 0, "prompt_id": "p", "rewards": [1, 1], "lengths": [10, 30]},
        {"step": 0, "prompt_id": "q", "rewards": [1, 0], "lengths": [5, 5]},
        {"step": 1, "prompt_id": "p", "trials": 2, "successes": 0, "lengths": [7, 3]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_replay([path], tmp_path / "o", strategies=[], predictors=["empirical"])
    assert r["tokens"] == 60 and r["zero_variance_tokens"] == 50
    assert r["zero_variance_tokens_share"] == pytest.approx(50 / 60)
    path.write_text(json.dumps({"step": 0, "prompt_id": "p", "rewards": [1, 1], "lengths": [10]}) + "\n")
    code, text = replay(str(path), "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "line 1: field 'lengths'" in text


def test_single_step_and_empty_logs_say_what_they_cannot_compute(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"step": 4, "prompt_id": "p", "rewards": [1, 0]}) + "\n")
    code, text = replay(str(path), "--out", str(tmp_path / "o"))
    assert code == 0, text
    r = load(tmp_path / "o")
    assert r["predictors"] == {} and r["strategies"] == {}
    assert "one step" in text and any("one step" in c for c in r["cannot_compute"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, text = replay(str(empty), "--out", str(tmp_path / "e"))
    assert code == 0 and "no rollouts" in text
    assert load(tmp_path / "e")["zero_variance_share"] is None


def test_refusals(tmp_path: Path, verl_dir: Path) -> None:
    code, text = replay(str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert code == 2 and "no such file" in text
    code, text = replay(str(verl_dir), "--out", str(tmp_path / "o"), "--strategies", "vip_two_phase")
    assert code == 2 and "two-phase" in text
    code, text = replay(str(verl_dir), "--out", str(tmp_path / "o"), "--format", "trl")
    assert code == 2


def test_waste_hand_computed() -> None:
    w = waste(np.array([4, 4, 2, 1]), np.array([4, 1, 0, 1]), np.array([8.0, 4.0, 6.0, 2.0]))
    assert w["zero_variance_rollouts"] == 7 and w["zero_variance_share"] == 7 / 11
    assert w["zero_variance_tokens"] == 16.0 and w["zero_variance_tokens_share"] == 16 / 20
    assert w["solved_share"] == 0.5 and w["hopeless_share"] == 0.25


# ------------------------------------------------------------------------------------------------ TRL
@pytest.fixture(scope="module")
def trl_dir(tmp_path_factory) -> Path:
    """A real CPU run of TRL's GRPOTrainer with log_completions=True (tiny offline model)."""
    pytest.importorskip("trl")
    import torch
    from _trl_helpers import sums, tiny_llama, tiny_tokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("trl")
    tok = tiny_tokenizer()

    def has_digit(prompts, completions, **kw):  # 0/1 verifiable reward
        return [float(any(ch.isdigit() for ch in c)) for c in completions]

    def length_bonus(prompts, completions, **kw):  # a second reward column: --reward must choose
        return [len(c) / 10 for c in completions]

    args = GRPOConfig(
        output_dir=str(out),
        use_cpu=True,
        per_device_train_batch_size=8,
        num_generations=4,  # generation batch: 8 x 2 steps = 16 rows, 4 prompts x 4 rollouts
        gradient_accumulation_steps=1,
        steps_per_generation=2,  # one generation every 2 steps: TRL logs the same batch twice
        max_completion_length=4,
        max_steps=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        log_completions=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=tiny_llama(len(tok)),
        reward_funcs=[has_digit, length_bonus],
        args=args,
        train_dataset=sums(with_ids=False),
        processing_class=tok,
    )
    trainer.train()
    return out


def test_trl_log_completions(trl_dir: Path, tmp_path: Path) -> None:
    import pandas as pd

    files = sorted((trl_dir / "completions").glob("*.parquet"))
    assert len(files) == 4
    # two reward columns: the user must say which one defines success
    code, text = replay(str(trl_dir), "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "--reward" in text and "has_digit" in text
    code, text = replay(str(trl_dir), "--out", str(tmp_path / "o"), "--reward", "has_digit", *FAST)
    assert code == 0, text
    r = load(tmp_path / "o")
    # expected values from the parquet files themselves, skipping files that repeat the previous one
    frames, prev = [], None
    for f in files:
        df = pd.read_parquet(f)
        key = df[["prompt", "completion", "has_digit"]].to_json()
        if key != prev:
            frames.append(df)
        prev = key
    assert len(r["skipped_duplicate_files"]) == len(files) - len(frames) == 2
    df = pd.concat(frames)
    g = df.assign(ok=df["has_digit"] >= 1).groupby(["step", "prompt"])["ok"].agg(["sum", "count"])
    zero = (g["sum"] == 0) | (g["sum"] == g["count"])
    assert r["rollouts"] == len(df) == 32  # 2 distinct generation batches of 4 prompts x 4
    assert r["prompt_steps"] == len(g)
    assert r["zero_variance_rollouts"] == int(g["count"][zero].sum())
    words = df["completion"].map(lambda c: len(c.split()))
    assert r["tokens"] == float(words.sum())
    assert r["success"] == "has_digit >= 1"


def test_tokenizer_counts_tokens(verl_dir: Path, tmp_path: Path) -> None:
    from _trl_helpers import tiny_tokenizer

    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)  # one token per character
    code, text = replay(str(verl_dir), "--out", str(tmp_path / "o"), "--tokenizer", str(tok_dir), *FAST)
    assert code == 0, text
    r = load(tmp_path / "o")
    # "w w" = 3 tokens, "w w w" = 5, "w" = 1, "w w w w w" = 9: step 1 12+20+4, step 2 12+20+18
    assert r["tokens"] == 86 and r["zero_variance_tokens"] == 12 + 4 + 18
    assert r["tokens_method"].startswith(f"tokenizer {tok_dir} on the completion text")
    code, text = replay(str(verl_dir), "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "nope"), *FAST)
    assert code == 2 and "--tokenizer" in text


def test_replay_lengths_reach_the_length_model_by_outcome(tmp_path: Path) -> None:
    """History rows with rewards and lengths keep the successes' tokens apart; the rebuilt per-rollout lengths
    sum to each outcome's tokens (the length model reads only those sums); a trials/successes row is split in
    proportion to its outcomes."""
    from vipalloc.replay.analysis import StepData, step_lengths
    from vipalloc.replay.readers import GroupTable

    table = GroupTable()
    table.add_group(0, "g1", "a", "qa", 3, 1, 700.0, 100.0)  # the success wrote 100 tokens, the two failures 600
    table.add_group(0, "g2", "b", "qb", 4, 2, 1000.0)  # which lengths belong to which outcome is unknown
    arr = table.arrays()
    assert arr["tokens_success"][0] == 100.0 and np.isnan(arr["tokens_success"][1])
    sd = StepData(0, ["a", "b"], ["qa", "qb"], arr["trials"], arr["successes"], arr["tokens"], arr["tokens_success"])
    la, lb = step_lengths(sd)
    assert la is not None and lb is not None
    assert la[:1].sum() == 100 and la[1:].sum() == 600 and np.all(la == np.rint(la))
    assert lb[:2].sum() == 500 and lb[2:].sum() == 500
    # through a real history file: rewards + lengths rows, then the token columns an allocator learns from
    h = RolloutHistory()
    h.extend(0, ["p", "q"], [[1, 0, 0], [1, 1]], prompts=["P", "Q"], lengths=[[50, 300, 310], [40, 60]])
    h.extend(1, ["p", "q"], [[0, 1], [1, 0]], lengths=[[280, 70], [50, 500]])
    path = tmp_path / "h.jsonl"
    h.save(path)
    r = run_replay([path], tmp_path / "out", strategies=["vip"], predictors=["beta"], embedder="hashing", n_min=2)
    vip = r["strategies"]["vip"]
    same = vip["same_token_budget"]
    assert same is not None and same["predicted_tokens"] <= same["target_tokens"] * (1 + 1e-9) + 1e-6


def test_replay_vip_authors_token_mode_refused(verl_dir: Path, tmp_path: Path) -> None:
    r = run_replay(
        [verl_dir], tmp_path, strategies=["vip_authors"], predictors=["beta"], embedder="hashing", n_min=2, n_max=8
    )
    s = r["strategies"]["vip_authors"]
    assert s["same_token_budget"] is None and "token budget" in s["same_token_budget_refused"]
