"""Real VIPGRPOTrainer steps on a tiny offline model: counts follow the plan, unused rows are inert and removed."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from _trl_helpers import (  # noqa: E402
    N_PROMPTS,
    TRUE_P,
    DigitReward,
    sums,
    tiny_tokenizer,
)
from _trl_helpers import tiny_llama as tiny_model  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from vipalloc import Allocator  # noqa: E402
from vipalloc.integrations.trl import ALLOCATOR_FILE, VIPGRPOConfig, VIPGRPOTrainer  # noqa: E402
from vipalloc.strategies import (
    STRATEGY_NAMES,  # noqa: E402
    TWO_PHASE_STRATEGIES,  # noqa: E402
)
from vipalloc.telemetry import COUNTS_TAG, OUTCOME_METRIC_NAMES, PLAN_METRIC_NAMES, outcome_metrics  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

WIDTH, PROMPTS_PER_BATCH, BUDGET, STEPS = 4, 4, 12, 4  # 16 rectangular rows per generation batch, 12 generated


class HistogramWriter:
    """Stands in for a TensorBoard ``SummaryWriter`` held by a reporting callback (``tb_writer``)."""

    def __init__(self) -> None:
        self.histograms: list[tuple[str, list[int], int]] = []

    def add_histogram(self, tag, values, global_step=None) -> None:
        self.histograms.append((tag, list(np.asarray(values).tolist()), global_step))


class TensorBoardLike(TrainerCallback):
    """A trainer callback exposing ``tb_writer`` the way transformers' ``TensorBoardCallback`` does."""

    def __init__(self) -> None:
        self.tb_writer = HistogramWriter()


def vip_args(out: Path, **kw) -> VIPGRPOConfig:
    base = dict(
        output_dir=str(out),
        use_cpu=True,
        per_device_train_batch_size=BUDGET // 2,  # completions trained per micro-batch, as in TRL
        gradient_accumulation_steps=2,  # 2 micro-batches per generation batch: 4 prompts, sampled 4 times each
        num_generations=BUDGET // PROMPTS_PER_BATCH,  # the uniform group size replaced: sets the budget (12)
        n_max=WIDTH,
        max_completion_length=3,
        max_steps=STEPS,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="steps",
        save_steps=STEPS,
        loss_type="grpo",  # per-sequence mean: exact only because unused rows are removed, not masked
        beta=0.04,  # exercises the reference-model log-prob pass
        n_min=2,
        strategy="vip",  # the authors' rule: may drop prompts it predicts always/never solved
        predictor="oracle",
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return VIPGRPOConfig(**base)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Four real training steps; records what the base TRL code generated, scored and trained on."""
    out = tmp_path_factory.mktemp("vip")
    tok = tiny_tokenizer()
    # Saved to disk so that TRL can build the reference model (beta > 0) from the same path.
    model_dir = tmp_path_factory.mktemp("tiny")
    tiny_model(len(tok)).save_pretrained(model_dir)
    reward = DigitReward(log_extra=True)  # logs a column to TRL's completions table through log_extra
    tb = TensorBoardLike()
    raw, gen_rows, loss_inputs, records = [], [], [], []
    base_score = GRPOTrainer._generate_and_score_completions
    base_gen = GRPOTrainer._generate_single_turn
    base_loss = GRPOTrainer.compute_loss

    class Recording(VIPGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            records.append((self.vip_last, {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}))
            return output

    def score(self, inputs):
        output = base_score(self, inputs)
        raw.append({k: v.clone() for k, v in output.items() if isinstance(v, torch.Tensor)})
        return output

    def gen(self, prompt_ids, *a, **kw):
        gen_rows.append(len(prompt_ids))
        return base_gen(self, prompt_ids, *a, **kw)

    def loss(self, model, inputs, *a, **kw):
        value = base_loss(self, model, inputs, *a, **kw)
        loss_inputs.append((inputs["completion_ids"].size(0), float(value.detach())))
        return value

    mp = pytest.MonkeyPatch()
    mp.setattr(GRPOTrainer, "_generate_and_score_completions", score)
    mp.setattr(GRPOTrainer, "_generate_single_turn", gen)
    mp.setattr(GRPOTrainer, "compute_loss", loss)
    try:
        trainer = Recording(
            model=str(model_dir),
            reward_funcs=reward,
            args=vip_args(out, log_completions=True),
            train_dataset=sums(),
            processing_class=tok,
            callbacks=[tb],
        )
        # Skewed true success rates (some exactly 0 or 1) make the plan non-uniform and drop some prompts.
        ids = [f"q{i}" for i in range(N_PROMPTS)]
        trainer.allocator.predictor.set_true_p(ids, TRUE_P)
        trainer.train()
    finally:
        mp.undo()
    return dict(
        model_dir=model_dir,
        trainer=trainer,
        reward=reward,
        raw=raw,
        gen_rows=gen_rows,
        loss_inputs=loss_inputs,
        records=records,
        out=out,
        tb=tb,
    )


def test_generated_completions_follow_the_plan(run) -> None:
    records = run["records"]
    assert len(records) == STEPS
    assert run["gen_rows"] == [BUDGET] * STEPS  # the model generated exactly the budget, never the unused rows
    assert [len(call) for call in run["reward"].calls] == [BUDGET] * STEPS  # only real ones scored
    assert any(len(set(rec.counts.tolist())) > 1 for rec, _ in records)  # the plan really varies per prompt
    assert any((rec.counts == 0).any() for rec, _ in records)  # ... and drops prompts (no rows, no rewards)
    for (rec, _), call in zip(records, run["reward"].calls):
        assert rec.counts.sum() == BUDGET
        np.testing.assert_array_equal(rec.real_rows.reshape(-1, WIDTH).sum(1), rec.counts)
        scored = [pid for pid, _, _ in call]
        assert scored == [pid for pid, c in zip(rec.prompt_ids, rec.counts) for _ in range(int(c))]


def test_unused_rows_have_zero_advantage_and_never_reach_the_loss(run) -> None:
    for (rec, out), raw in zip(run["records"], run["raw"]):
        real = torch.as_tensor(rec.real_rows)
        assert raw["advantages"].shape[0] == PROMPTS_PER_BATCH * WIDTH
        assert torch.all(raw["advantages"][~real] == 0)  # TRL's NaN-aware statistics gave them advantage 0
        assert out["advantages"].shape[0] == BUDGET  # ... and they are gone from the training batch
        torch.testing.assert_close(out["advantages"], raw["advantages"][real])
        width = out["completion_ids"].shape[1]
        torch.testing.assert_close(out["completion_ids"], raw["completion_ids"][real][:, :width])
        assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
        assert int(raw["num_items_in_batch"]) == int(raw["completion_mask"].sum())  # TRL counted placeholders
        assert int(out["num_items_in_batch"]) == int(raw["completion_mask"][real].sum())
        # Reference log-probs of the real rows are what the base pass gave for them.
        torch.testing.assert_close(out["ref_per_token_logps"], raw["ref_per_token_logps"][real][:, :width])
    # Every loss call saw one micro-batch of real rows only: budget / steps_per_generation rows.
    assert [n for n, _ in run["loss_inputs"]] == [BUDGET // 2] * (2 * STEPS)
    assert all(math.isfinite(v) for _, v in run["loss_inputs"])
    losses = [h["loss"] for h in run["trainer"].state.log_history if "loss" in h]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)


def test_allocator_received_exactly_the_real_rewards(run) -> None:
    trainer = run["trainer"]
    steps = list(trainer.allocator.history.iter_steps())
    assert len(steps) == STEPS
    for (step, ids, succ, trials), (rec, _), call in zip(steps, run["records"], run["reward"].calls):
        assert step == rec.step
        by_prompt: dict[str, list[float]] = {}
        for pid, _, r in call:
            by_prompt.setdefault(pid, []).append(r)
        assert ids == list(by_prompt)
        np.testing.assert_array_equal(trials, [len(v) for v in by_prompt.values()])
        np.testing.assert_array_equal(succ, [sum(x >= 0.5 for x in v) for v in by_prompt.values()])
        for pid, r in zip(rec.prompt_ids, rec.rewards):
            np.testing.assert_allclose(r, by_prompt.get(pid, []), rtol=1e-6)
    assert 0 < sum(int(s.sum()) for _, _, s, _ in steps) < STEPS * BUDGET  # mixed outcomes: a meaningful check


def test_vip_metrics_are_logged(run) -> None:
    """The shared telemetry names, every generation, equal to the plan's and the outcome's own metrics."""
    logged = [h for h in run["trainer"].state.log_history if "vip/mean_n" in h]
    assert len(logged) == STEPS
    for h, (rec, _) in zip(logged, run["records"]):
        assert set(PLAN_METRIC_NAMES) | set(OUTCOME_METRIC_NAMES) <= set(h)
        assert not any(k in h for k in ("vip/frac_zero_std", "vip/frac_zero_std_groups"))  # old names are gone
        for key, value in rec.plan.metrics().items():  # TRL logs a metric that is NaN throughout as None
            assert h[key] is None if math.isnan(value) else h[key] == pytest.approx(value, rel=1e-6), key
        expected = outcome_metrics(rec.successes, p_mean=rec.plan.p_mean)
        for key in OUTCOME_METRIC_NAMES:
            assert h[key] == pytest.approx(expected[key], rel=1e-6), key
        assert h["vip/rollouts_generated"] == h["vip/budget"] == BUDGET  # every budgeted rollout came back
        assert h["vip/expected_var_ratio_vs_uniform"] == pytest.approx(rec.plan.variance_ratio)
    assert any(h["vip/expected_var_ratio_vs_uniform"] < 1.0 for h in logged)
    assert any(h["vip/num_dropped"] > 0 for h in logged)
    # TRL's own length metrics are over the real completions, not the 1-token placeholders.
    assert all(h["completions/min_length"] >= 1 for h in logged)
    # the counts histogram went to the TensorBoard writer once per generation
    hist = run["tb"].tb_writer.histograms
    assert [tag for tag, _, _ in hist] == [COUNTS_TAG] * STEPS
    assert [counts for _, counts, _ in hist] == [rec.counts.tolist() for rec, _ in run["records"]]


def test_completions_table_keeps_real_rows_and_log_extra_columns(run) -> None:
    """log_completions=True with a reward function calling log_extra: one table row per real completion."""
    tables = sorted((run["out"] / "completions").glob("*.parquet"))
    assert len(tables) == STEPS
    for table, call in zip(tables, run["reward"].calls):
        df = pd.read_parquet(table)
        assert len(df) == BUDGET
        assert df["completion"].tolist() == [c for _, c, _ in call]
        assert df["digit_count"].tolist() == [sum(ch.isdigit() for ch in c) for _, c, _ in call]
        np.testing.assert_allclose(df["digit_share"], [r for _, _, r in call], rtol=1e-6)


def test_allocator_file_is_in_the_checkpoint_before_the_upload(run, tmp_path, monkeypatch) -> None:
    trainer = run["trainer"]
    seen: list[bool] = []
    monkeypatch.setattr(trainer.args, "output_dir", str(tmp_path))
    monkeypatch.setattr(trainer.args, "push_to_hub", True)
    monkeypatch.setattr(
        trainer,
        "_push_from_checkpoint",
        lambda folder: seen.append(os.path.exists(os.path.join(folder, ALLOCATOR_FILE))),
    )
    trainer._save_checkpoint(trainer.model, trial=None)
    assert seen == [True]


def test_allocator_is_checkpointed_and_restored(run, tmp_path) -> None:
    trainer, out = run["trainer"], run["out"]
    ckpt = out / f"checkpoint-{STEPS}"
    saved = Allocator.load(ckpt / ALLOCATOR_FILE)
    assert len(saved.history) == len(trainer.allocator.history)
    tok = tiny_tokenizer()
    resumed = VIPGRPOTrainer(
        model=str(run["model_dir"]),
        reward_funcs=DigitReward(),
        args=vip_args(out, max_steps=STEPS + 1, save_strategy="no"),
        train_dataset=sums(),
        processing_class=tok,
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.vip_last is not None and resumed.vip_last.step == STEPS  # the step counter continued
    assert len(resumed.allocator.history) == len(saved.history) + int((resumed.vip_last.counts > 0).sum())
    # a checkpoint without the allocator file resumes with a fresh allocator, and says so
    bare = tmp_path / ckpt.name
    shutil.copytree(ckpt, bare)
    (bare / ALLOCATOR_FILE).unlink()
    fresh = VIPGRPOTrainer(
        model=str(run["model_dir"]),
        reward_funcs=DigitReward(),
        args=vip_args(tmp_path, max_steps=STEPS + 1, save_strategy="no"),
        train_dataset=sums(),
        processing_class=tok,
    )
    fresh.allocator.predictor.set_true_p([f"q{i}" for i in range(N_PROMPTS)], TRUE_P)
    with pytest.warns(RuntimeWarning, match=f"no {ALLOCATOR_FILE}: the allocator starts fresh"):
        fresh.train(resume_from_checkpoint=str(bare))
    assert len(fresh.allocator.history) == int((fresh.vip_last.counts > 0).sum())  # only the new step


def test_config_defaults_to_the_uniform_budget_it_replaces(tmp_path) -> None:
    common = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=16, report_to=[])
    plain = GRPOConfig(num_generations=8, gradient_accumulation_steps=4, **common)
    vip = VIPGRPOConfig(num_generations=8, gradient_accumulation_steps=4, **common)
    # same prompts, same rollouts per generation batch as the GRPOConfig it replaces; width 2 x num_generations
    assert vip.budget_per_generation == plain.generation_batch_size == 64
    assert vip.prompts_per_generation == plain.generation_batch_size // plain.num_generations == 8
    assert vip.n_max == 16 and vip.sampled_rows_per_process == 8 * 16
    assert vip.per_device_train_batch_size == plain.per_device_train_batch_size  # completions per micro-batch


def test_config_rejects_conflicting_or_infeasible_settings(tmp_path) -> None:
    common = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=16, report_to=[])
    with pytest.raises(ValueError, match="raise n_max of VIPGRPOConfig to at least 8"):
        VIPGRPOConfig(n_max=4, **common)  # num_generations=8 (TRL's default) with n_max=4 cannot meet the budget
    with pytest.raises(ValueError, match="n_min <= num_generations.*lower n_min of VIPGRPOConfig to at most 4"):
        VIPGRPOConfig(num_generations=4, n_min=5, n_max=8, **common)
    # n_min above n_max: the advice is not to raise n_max to what it already is (issue 30)
    with pytest.raises(ValueError, match="n_min exceeds n_max") as info:
        VIPGRPOConfig(num_generations=4, n_min=6, n_max=4, **common)
    assert "raise n_max" not in str(info.value)
    with pytest.raises(ValueError, match="num_generations"):
        VIPGRPOConfig(num_generations=None, **common)
    with pytest.raises(ValueError, match="strategy must be one of .*, got 'nope'"):
        VIPGRPOConfig(num_generations=4, strategy="nope", **common)
    with pytest.raises(ValueError, match="predictor must be one of"):
        VIPGRPOConfig(num_generations=4, predictor="nope", **common)
    with pytest.raises(ValueError, match="estimator must be one of drgrpo, rloo, got 'grpo'"):
        VIPGRPOConfig(num_generations=4, estimator="grpo", **common)
    with pytest.raises(ValueError, match="two_phase=True and strategy='vip' disagree"):
        VIPGRPOConfig(num_generations=4, strategy="vip", two_phase=True, **common)
    with pytest.raises(ValueError, match="two_phase=False and strategy='vip_two_phase' disagree"):
        VIPGRPOConfig(num_generations=4, strategy="vip_two_phase", **common)
    with pytest.raises(ValueError, match="pilot_n \\(5\\) exceeds num_generations \\(4\\)"):
        VIPGRPOConfig(num_generations=4, strategy="vip_two_phase", two_phase=True, pilot_n=5, **common)
    with pytest.raises(ValueError, match="divisible by num_generations"):  # TRL's own check: whole prompts
        VIPGRPOConfig(num_generations=3, **common)


def test_every_registered_strategy_is_selectable(tmp_path) -> None:
    common = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=16, report_to=[])
    for name in STRATEGY_NAMES:  # no whitelist of our own: whatever vipalloc.strategies registers
        two = name in TWO_PHASE_STRATEGIES
        cfg = VIPGRPOConfig(num_generations=4, strategy=name, two_phase=two, **common)
        assert cfg.strategy == name


def test_trainer_rejects_unsupported_setups(tmp_path) -> None:
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    plain = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, num_generations=4)
    with pytest.raises(ValueError, match="VIPGRPOConfig"):
        VIPGRPOTrainer(model=model, reward_funcs=DigitReward(), args=plain, train_dataset=sums())
    with pytest.raises(NotImplementedError, match="rollout_func"):  # tools: tests/test_trl_tools.py
        VIPGRPOTrainer(model, DigitReward(), vip_args(tmp_path), sums(), rollout_func=lambda prompts, trainer: {})
    with pytest.raises(ValueError, match="budget is 3 rollouts per prompt.*lower n_min of the allocator to at most 3"):
        VIPGRPOTrainer(
            model,
            DigitReward(),
            vip_args(tmp_path, beta=0.0),
            sums(),
            processing_class=tok,
            allocator=Allocator(n_min=4, n_max=4, predictor="beta", embedder="hashing"),
        )
    with pytest.raises(ValueError, match="success_reward 'accuracy' is not a reward function"):
        VIPGRPOTrainer(
            model, DigitReward(), vip_args(tmp_path, success_reward="accuracy", beta=0.0), sums(), processing_class=tok
        )


def test_import_is_cheap_and_explains_missing_trl() -> None:
    code = (
        "import sys\n"
        "import vipalloc\n"
        "assert 'trl' not in sys.modules and 'torch' not in sys.modules, 'import vipalloc pulled in trl/torch'\n"
        "sys.modules['trl'] = None\n"
        "try:\n"
        "    import vipalloc.integrations.trl\n"
        "except ImportError as e:\n"
        "    assert 'pip install \"vipalloc[trl]\"' in str(e), str(e)\n"
        "else:\n"
        "    raise SystemExit('no ImportError without trl')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
