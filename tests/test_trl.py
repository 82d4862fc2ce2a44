"""Real VIPGRPOTrainer steps on a tiny offline model: counts follow the plan, unused rows are inert and removed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from vipalloc import Allocator  # noqa: E402
from vipalloc.integrations.trl import ALLOCATOR_FILE, VIPGRPOConfig, VIPGRPOTrainer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

CHARS = "0123456789+-=*? "
N_PROMPTS = 40
WIDTH, PROMPTS_PER_BATCH, BUDGET, STEPS = 4, 4, 12, 4  # 16 rectangular rows per generation batch, 12 generated
TRUE_P = [((i * 7) % 10) / 9 for i in range(N_PROMPTS)]  # oracle success rates in [0, 1], some exactly 0 or 1


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def tiny_model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def sums() -> Dataset:
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, N_PROMPTS), rng.integers(0, 5, N_PROMPTS)
    return Dataset.from_dict(
        {
            "prompt": [f"{x}+{y}=" for x, y in zip(a, b)],
            "answer": [str(x + y) for x, y in zip(a, b)],
            "prompt_id": [f"q{i}" for i in range(N_PROMPTS)],
        }
    )


class DigitReward:
    """Verifiable reward in [0, 1] (share of digits in the completion); records every call."""

    __name__ = "digit_share"

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, str, float]]] = []

    def __call__(self, completions, prompt_id, **kwargs):
        out = [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
        self.calls.append(list(zip(prompt_id, completions, out)))
        return out


def vip_args(out: Path, **kw) -> VIPGRPOConfig:
    base = dict(
        output_dir=str(out),
        use_cpu=True,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,  # 2 micro-batches per generation batch of 4 prompts x width 4
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
        rollout_budget=BUDGET,
        n_min=2,
        allocation_strategy="vip",  # the authors' rule: may drop prompts it predicts always/never solved
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
    reward = DigitReward()
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
            args=vip_args(out),
            train_dataset=sums(),
            processing_class=tok,
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
    logged = [h for h in run["trainer"].state.log_history if "vip/mean_n" in h]
    assert len(logged) == STEPS
    for h, (rec, _) in zip(logged, run["records"]):
        kept = rec.counts > 0
        assert h["vip/mean_n"] == pytest.approx(rec.counts[kept].mean())
        assert h["vip/max_n"] == rec.counts.max()
        assert 0.0 <= h["vip/frac_zero_std"] <= 1.0 and 0.0 <= h["vip/pred_abs_err"] <= 1.0
        assert h["vip/expected_var_ratio_vs_uniform"] == pytest.approx(rec.plan.variance_ratio)
    assert any(h["vip/expected_var_ratio_vs_uniform"] < 1.0 for h in logged)
    # TRL's own length metrics are over the real completions, not the 1-token placeholders.
    assert all(h["completions/min_length"] >= 1 for h in logged)


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


def test_config_validation(tmp_path) -> None:
    common = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=16, report_to=[])
    cfg = VIPGRPOConfig(n_max=4, mean_generations=2.5, **common)
    assert cfg.num_generations == 4 and cfg.prompts_per_generation == 4 and cfg.budget_per_generation == 10
    with pytest.raises(ValueError, match="exceeds"):
        VIPGRPOConfig(n_max=4, rollout_budget=17, **common)
    with pytest.raises(ValueError, match="divisible by steps_per_generation"):
        VIPGRPOConfig(n_max=4, rollout_budget=9, steps_per_generation=2, **common)
    with pytest.raises(ValueError, match="n_min"):
        VIPGRPOConfig(n_max=4, n_min=5, **common)
    with pytest.raises(ValueError, match="disagree"):
        VIPGRPOConfig(n_max=4, num_generations=16, **common)
    with pytest.raises(ValueError, match="variance_estimator"):
        VIPGRPOConfig(n_max=4, variance_estimator="grpo", **common)


def test_trainer_rejects_unsupported_setups(tmp_path) -> None:
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    plain = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, num_generations=4)
    with pytest.raises(ValueError, match="VIPGRPOConfig"):
        VIPGRPOTrainer(model=model, reward_funcs=DigitReward(), args=plain, train_dataset=sums())
    args = vip_args(tmp_path, use_vllm=True)
    with pytest.raises(NotImplementedError, match="use_vllm=False"):
        VIPGRPOTrainer(model=model, reward_funcs=DigitReward(), args=args, train_dataset=sums())
    with pytest.raises(NotImplementedError, match="tools"):
        VIPGRPOTrainer(model, DigitReward(), vip_args(tmp_path), sums(), tools=[len])


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


# ---------------------------------------------------------------------- two processes (torchrun, gloo on CPU)
# 3 prompts x width 4 = 12 rows per generation batch, 6 per process; a budget of 11 gives every prompt >= 3
# rollouts, so the middle prompt's real rows always sit on both processes.
MP_WIDTH, MP_BUDGET, MP_STEPS, PROMPTS_PER_MP_BATCH = 4, 11, 2, 3


def _multiprocess_worker(out: Path) -> None:
    """Run under ``torchrun --nproc_per_node 2``: two real steps, then dump what every process saw."""
    import json

    tok = tiny_tokenizer()
    reward = DigitReward()
    raw, gen_rows, loss_rows, records = [], [], [], []
    base_score, base_gen, base_loss = (
        GRPOTrainer._generate_and_score_completions,
        GRPOTrainer._generate_single_turn,
        GRPOTrainer.compute_loss,
    )

    def score(self, inputs):
        output = base_score(self, inputs)
        raw.append({"advantages": output["advantages"].tolist()})
        return output

    def gen(self, prompt_ids, *a, **kw):
        gen_rows.append(len(prompt_ids))
        return base_gen(self, prompt_ids, *a, **kw)

    def loss(self, model, inputs, *a, **kw):
        value = base_loss(self, model, inputs, *a, **kw)
        loss_rows.append([inputs["completion_ids"].size(0), float(value.detach())])
        return value

    class Recording(VIPGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            rec, rank, n = self.vip_last, self.accelerator.process_index, len(inputs)
            real = rec.real_rows[rank * n : (rank + 1) * n]  # this process's slice of the batch
            records.append(
                {
                    "local_real": real.tolist(),
                    "kept_rows": self._vip_local_rows.tolist(),
                    "counts": rec.counts.tolist(),
                    "rewards": [r.tolist() for r in rec.rewards],
                    "advantages": output["advantages"].tolist(),
                    "row_tokens": output["completion_mask"].sum(1).tolist(),
                    "num_items": int(output["num_items_in_batch"]),
                }
            )
            return output

    GRPOTrainer._generate_and_score_completions = score
    GRPOTrainer._generate_single_turn = gen
    GRPOTrainer.compute_loss = loss
    args = vip_args(
        out,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,  # 2 micro-batches: processes holding an odd count keep one inert row
        n_max=MP_WIDTH,
        rollout_budget=MP_BUDGET,
        loss_type="dapo",
        beta=0.0,
        max_steps=MP_STEPS,
        save_strategy="no",
    )
    trainer = Recording(
        model=tiny_model(len(tok)), reward_funcs=reward, args=args, train_dataset=sums(), processing_class=tok
    )
    ids = [f"q{i}" for i in range(N_PROMPTS)]
    trainer.allocator.predictor.set_true_p(ids, TRUE_P)
    trainer.train()
    rank = trainer.accelerator.process_index
    dump = {
        "world": trainer.accelerator.num_processes,
        "records": records,
        "raw": raw,
        "gen_rows": gen_rows,
        "loss_rows": loss_rows,
        "reward_calls": [[[pid, r] for pid, _, r in call] for call in reward.calls],
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    if trainer.accelerator.is_main_process:
        dump["history"] = [
            [step, ids_, succ.tolist(), trials.tolist()]
            for step, ids_, succ, trials in trainer.allocator.history.iter_steps()
        ]
    (out / f"rank{rank}.json").write_text(json.dumps(dump))


def test_two_processes_share_one_plan_and_groups_span_them(tmp_path) -> None:
    """Two CPU processes (gloo): one plan for the global batch, groups spanning processes, exact dapo normaliser."""
    import json

    from trl.trainer.utils import nanstd

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    subprocess.run([*cmd, str(tmp_path)], check=True, timeout=300, env=env, capture_output=True)
    d0, d1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert d0["world"] == d1["world"] == 2
    n_local = PROMPTS_PER_MP_BATCH * MP_WIDTH // 2
    steps = list(zip(d0["records"], d1["records"], d0["reward_calls"], d1["reward_calls"], d0["history"]))
    assert len(steps) == MP_STEPS
    spanning = 0
    for k, (r0, r1, c0, c1, (_, hist_ids, succ, trials)) in enumerate(steps):
        counts = np.array(r0["counts"])
        assert r1["counts"] == r0["counts"] and counts.sum() == MP_BUDGET  # both processes follow the main plan
        real = np.array(r0["local_real"] + r1["local_real"])
        np.testing.assert_array_equal(real.reshape(-1, MP_WIDTH).sum(1), counts)
        spanning += bool(real[n_local - 1] and real[n_local])  # one group's real rows on both processes
        for d, r, calls in ((d0, r0, c0), (d1, r1, c1)):
            n_real = sum(r["local_real"])
            assert d["gen_rows"][k] == max(1, n_real) and len(calls) == n_real  # generated/scored real rows only
            kept, local_real = np.array(r["kept_rows"]), np.array(r["local_real"])
            assert len(kept) % 2 == 0 and len(kept) >= n_real  # equal micro-batches; extra rows are inert
            inert = ~local_real[kept]
            assert all(t == 0 for t, i in zip(r["row_tokens"], inert) if i)
            assert all(a == 0 for a, i in zip(r["advantages"], inert) if i)
            assert all(a == 0 for a, x in zip(d["raw"][k]["advantages"], local_real) if not x)
        # dapo's normaliser is the global count of real tokens on both processes
        assert r0["num_items"] == r1["num_items"] == sum(r0["row_tokens"]) + sum(r1["row_tokens"])
        # advantages of real rows are group statistics over the gathered real rewards, across the process boundary
        expected = []
        for rewards in r0["rewards"]:
            x = torch.tensor(rewards)
            expected += ((x - x.mean()) / (nanstd(x) + 1e-4)).tolist() if len(rewards) > 1 else [0.0] * len(rewards)
        got = [a for r in (r0, r1) for a, x in zip(r["advantages"], np.array(r["local_real"])[r["kept_rows"]]) if x]
        np.testing.assert_allclose(got, expected, atol=1e-5)
        # the main process's allocator received exactly the real rewards of both processes
        calls = c0 + c1
        by_prompt: dict[str, list[float]] = {}
        for pid, rew in calls:
            by_prompt.setdefault(pid, []).append(rew)
        assert hist_ids == list(by_prompt)
        np.testing.assert_array_equal(trials, [len(v) for v in by_prompt.values()])
        np.testing.assert_array_equal(succ, [sum(x >= 0.5 for x in v) for v in by_prompt.values()])
    assert spanning == MP_STEPS
    for d in (d0, d1):
        assert all(math.isfinite(v) for _, v in d["loss_rows"]) and len(d["losses"]) == MP_STEPS
        assert all(math.isfinite(v) for v in d["losses"])


if __name__ == "__main__":
    _multiprocess_worker(Path(sys.argv[1]))
