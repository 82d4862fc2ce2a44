"""``vipalloc replay`` on files written by the trainers' own code: TRL's ``GRPOTrainer`` (two reward functions,
the same prompt text twice in a generation batch, ``log_completions=True``) and verl's ``_write_generations`` (reward
extras, ``uid``). Every expected figure is counted here from the files themselves, not through replay's code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vipalloc.cli import app

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAST = ["--strategies", "none", "--predictors", "beta"]
G = 4  # num_generations of the TRL run


def replay(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["replay", *args])
    return res.exit_code, res.output + (res.stderr if res.stderr_bytes is not None else "")


def load(out: Path) -> dict:
    return json.loads((out / "replay.json").read_text())


# ------------------------------------------------------------------------------------------------ TRL
@pytest.fixture(scope="module")
def trl_run(tmp_path_factory) -> tuple[Path, object]:
    """A real CPU GRPOTrainer run: 3 distinct prompt texts over 24 dataset rows, so every generation batch of 4
    prompts holds one text at least twice; trained on correct + fmt, both logged."""
    pytest.importorskip("trl")
    import torch
    from _trl_helpers import tiny_llama, tiny_tokenizer
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("trl_dup")
    tok = tiny_tokenizer()

    def correct(prompts, completions, **kw):  # the verifiable 0/1 reward
        return [float(any(ch.isdigit() for ch in c)) for c in completions]

    def fmt(prompts, completions, **kw):  # a second 0/1 reward training also uses (a format bonus)
        return [float(len(c) % 2 == 0) for c in completions]

    texts = ["1+2=", "3+4=", "2*2="]
    data = Dataset.from_dict({"prompt": [texts[i % 3] for i in range(24)]})
    args = GRPOConfig(
        output_dir=str(out),
        use_cpu=True,
        per_device_train_batch_size=8,
        num_generations=G,
        gradient_accumulation_steps=1,
        steps_per_generation=2,  # generation batch of 16 rows: 4 prompts x 4
        max_completion_length=6,
        max_steps=6,
        learning_rate=1e-3,
        logging_steps=2,  # one file per generation batch
        report_to=[],
        save_strategy="no",
        log_completions=True,
        seed=0,
        dataloader_num_workers=0,
        temperature=1.5,
    )
    trainer = GRPOTrainer(
        model=tiny_llama(len(tok)), reward_funcs=[correct, fmt], args=args, train_dataset=data, processing_class=tok
    )
    trainer.train()
    return out, tok


def _trl_frames(folder: Path) -> list:
    """The completion files in step order, a file that repeats the previous one's rows left out."""
    import pandas as pd

    frames, prev = [], None
    for f in sorted((folder / "completions").glob("completions_*.parquet")):
        df = pd.read_parquet(f)
        key = df[["prompt", "completion", "correct", "fmt"]].to_json()
        if key != prev:
            frames.append(df)
        prev = key
    return frames


def test_trl_groups_are_trls_blocks_and_zero_advantage_is_what_was_trained(trl_run, tmp_path: Path) -> None:
    folder, _ = trl_run
    frames = _trl_frames(folder)
    assert len(frames) == 3
    # independent count: TRL's groups are consecutive blocks of G rows of a file
    groups = zero_var = zero_adv = zero_adv_from_rewards = 0
    rollouts = merged_by_text = 0
    zv_rollouts = za_rollouts = 0
    for df in frames:
        assert len(df) % G == 0
        rollouts += len(df)
        merged_by_text += df["prompt"].nunique()
        for b in range(len(df) // G):
            block = df.iloc[b * G : (b + 1) * G]
            assert block["prompt"].nunique() == 1  # TRL's layout: a block is one dataset row's rollouts
            groups += 1
            c = block["correct"].to_numpy()
            if c.min() == c.max():
                zero_var += 1
                zv_rollouts += G
            if np.all(np.abs(block["advantage"].to_numpy()) < 1e-6):
                zero_adv += 1
                za_rollouts += G
            total = (block["correct"] + block["fmt"]).to_numpy()
            zero_adv_from_rewards += int(total.min() == total.max())  # what TRL's sum_then_normalize trains on
    assert merged_by_text < groups  # the same text twice in a batch: merging by text would lose groups
    assert zero_adv == zero_adv_from_rewards  # the logged advantage is the trained reward's group-relative one
    code, text = replay(str(folder), "--out", str(tmp_path / "o"), "--reward", "correct", *FAST)
    assert code == 0, text
    r = load(tmp_path / "o")
    assert r["rollouts"] == rollouts and r["prompt_steps"] == groups
    assert len(r["grouping"]) == 1
    assert r["grouping"][0].startswith(f"TRL's consecutive blocks of {G} rows (num_generations, inferred from the log")
    assert r["zero_variance_groups"] == zero_var and r["zero_variance_rollouts"] == zv_rollouts
    assert r["zero_advantage_groups"] == zero_adv and r["zero_advantage_rollouts"] == za_rollouts
    assert r["zero_advantage_share"] == pytest.approx(za_rollouts / rollouts)
    assert zero_var != zero_adv  # the format bonus: not the same measure on this run
    assert "advantage" in r["zero_advantage_method"]
    assert r["headline"].startswith(f"{100 * za_rollouts / rollouts:.1f}% of the {rollouts:,} rollouts")
    assert "zero advantage as trained" in r["headline"]
    assert any("share their step and prompt" in n for n in r["notes"])
    # the group size named on the command line gives the same groups; a wrong one is refused in one line
    code, text = replay(str(folder), "--out", str(tmp_path / "g"), "--reward", "correct", "--group-size", "4", *FAST)
    assert code == 0 and load(tmp_path / "g")["prompt_steps"] == groups
    code, text = replay(str(folder), "--out", str(tmp_path / "g"), "--reward", "correct", "--group-size", "3", *FAST)
    assert code == 2 and "not a multiple of --group-size 3" in text and "completions_" in text


def test_trl_tokens_are_the_completion_tokens(trl_run, tmp_path: Path) -> None:
    folder, tok = trl_run
    frames = _trl_frames(folder)
    completions = [c for df in frames for c in df["completion"]]
    retok = sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in completions)
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    code, text = replay(
        str(folder), "--out", str(tmp_path / "o"), "--reward", "correct", "--tokenizer", str(tok_dir), *FAST
    )
    assert code == 0, text
    r = load(tmp_path / "o")
    assert abs(r["tokens"] - retok) <= 0.02 * retok and r["tokens"] == retok
    code, _ = replay(str(folder), "--out", str(tmp_path / "w"), "--reward", "correct", *FAST)
    assert load(tmp_path / "w")["tokens"] == sum(len(c.split()) for c in completions)


def test_trl_conversational_completion_counts_content_only(tmp_path: Path) -> None:
    """TRL logs a conversational completion as a list of messages: the role is not generated text."""
    import pandas as pd

    d = tmp_path / "completions"
    d.mkdir()
    conv = [[{"role": "user", "content": "q a"}] for _ in range(4)]
    comp = [[{"role": "assistant", "content": "the answer is 4"}] for _ in range(2)]
    comp += [[{"role": "assistant", "content": "five"}], [{"role": "assistant", "content": "no idea at all"}]]
    pd.DataFrame(
        {"step": [1] * 4, "prompt": conv, "completion": comp, "acc": [1.0, 1.0, 0.0, 0.0], "advantage": [1.0] * 4}
    ).to_parquet(d / "completions_00001.parquet")
    code, text = replay(str(tmp_path), "--out", str(tmp_path / "o"), *FAST)
    assert code == 0, text
    assert load(tmp_path / "o")["tokens"] == 4 + 4 + 1 + 4


# ------------------------------------------------------------------------------------------------ verl
def test_verl_dump_with_uid_and_extras(tmp_path: Path) -> None:
    """verl's own ``_write_generations``: the score is correctness + a format bonus, ``acc`` a bool extra, ``uid``
    one id per prompt sample (the same prompt twice in step 1), rows in verl's balanced (shuffled) order."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    rng = np.random.default_rng(0)
    # (uid, prompt, acc per rollout, format bonus per rollout)
    spec = {
        1: [
            ("u1", "P?", [1, 1, 1, 1], [0, 0, 0, 0]),  # zero variance on acc, zero advantage on score
            ("u2", "P?", [1, 1, 1, 1], [1, 0, 0, 0]),  # the same prompt again: acc zero-var, score not
            ("u3", "Q?", [0, 0, 0, 0], [1, 1, 1, 1]),  # both zero
            ("u4", "R?", [1, 0, 0, 1], [0, 0, 0, 0]),  # informative
        ],
        2: [
            ("u5", "P?", [0, 0, 0, 0], [0, 1, 0, 1]),  # acc zero-var, score not
            ("u6", "Q?", [1, 0, 1, 0], [1, 1, 1, 1]),
        ],
    }
    dump = tmp_path / "dump"
    for step, groups in spec.items():
        rows = [(u, q, a, f) for u, q, acc, fmt in groups for a, f in zip(acc, fmt)]
        order = rng.permutation(len(rows))  # balance_batch reorders a step's rows
        rows = [rows[i] for i in order]
        inputs = [q for _, q, _, _ in rows]
        outputs = ["x " * (2 + f) for _, _, _, f in rows]
        scores = [float(a) + 0.1 * f for _, _, a, f in rows]
        extras = {"acc": [bool(a) for _, _, a, _ in rows], "uid": [u for u, _, _, _ in rows]}
        RayPPOTrainer._write_generations(inputs, outputs, [None] * len(rows), scores, extras, str(dump), step)
    # counted from the spec
    all_groups = [g for gs in spec.values() for g in gs]
    zero_var = [g for g in all_groups if len(set(g[2])) == 1]
    zero_adv = [g for g in all_groups if len({a + 0.1 * f for a, f in zip(g[2], g[3])}) == 1]
    # the score is not 0/1: refused without a threshold, in one line naming the range and the flag
    code, text = replay(str(dump), "--out", str(tmp_path / "o"), *FAST)
    assert code == 2 and "--threshold" in text and "[0, 1.1]" in text and "Traceback" not in text
    code, text = replay(str(dump), "--out", str(tmp_path / "o"), "--reward", "acc", *FAST)
    assert code == 0, text
    r = load(tmp_path / "o")
    assert r["prompt_steps"] == len(all_groups) == 6 and r["rollouts"] == 24
    assert r["grouping"][0].startswith("verl's uid")
    assert r["zero_variance_groups"] == len(zero_var) == 4 and r["zero_variance_rollouts"] == 16
    assert r["zero_advantage_groups"] == len(zero_adv) == 2 and r["zero_advantage_rollouts"] == 8
    # tokens: "x " * k has k words
    assert r["tokens"] == sum(2 + f for g in all_groups for f in g[3])
    assert r["zero_advantage_tokens"] == sum(2 + f for g in zero_adv for f in g[3])
    # the threshold on the total score: success = score >= 1
    code, text = replay(str(dump), "--out", str(tmp_path / "t"), "--threshold", "1", *FAST)
    assert code == 0, text
    assert load(tmp_path / "t")["zero_variance_groups"] == 4


def test_trl_conversational_run_counts_completion_tokens_only(tmp_path: Path) -> None:
    """A real conversational GRPOTrainer run: TRL logs each completion as ``[{"role": "assistant", ...}]``; replay
    counts the re-tokenised assistant content, not the role."""
    pytest.importorskip("trl")
    import pandas as pd
    import torch
    from _trl_helpers import tiny_llama, tiny_tokenizer
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
    )

    def correct(prompts, completions, **kw):
        return [float(any(ch.isdigit() for ch in c[0]["content"])) for c in completions]

    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+1"}] for i in range(8)]})
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        log_completions=True,
        seed=0,
        dataloader_num_workers=0,
    )
    GRPOTrainer(
        model=tiny_llama(len(tok)), reward_funcs=[correct], args=args, train_dataset=data, processing_class=tok
    ).train()
    files = sorted((tmp_path / "run" / "completions").glob("*.parquet"))
    df = pd.concat([pd.read_parquet(f) for f in files])
    first = df["completion"].iloc[0]
    assert first[0]["role"] == "assistant"  # conversational: a list of messages
    contents = [c[0]["content"] for c in df["completion"]]
    retok = sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in contents)
    tok.save_pretrained(tmp_path / "tok")
    code, text = replay(
        str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "tok"), *FAST
    )
    assert code == 0, text
    r = load(tmp_path / "o")
    assert r["rollouts"] == len(df) == 16 and r["prompt_steps"] == 4
    assert r["tokens"] == retok
