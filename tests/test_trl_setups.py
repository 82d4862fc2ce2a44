"""VIPGRPOTrainer setups beyond the basic run: token positions on an absolute-position model, vLLM colocate mode
(through a stand-in for ``vllm.LLM``), duplicate prompts, and a named success reward."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from _trl_helpers import (  # noqa: E402
    N_PROMPTS,
    TRUE_P,
    DigitReward,
    ScriptedAllocator,
    StandInLLM,
    install_vllm_standin,
    sums,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
)
from datasets import Dataset  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from vipalloc.integrations.trl import VIPGRPOConfig, VIPGRPOTrainer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


def _args(out, **kw) -> VIPGRPOConfig:
    base = dict(
        output_dir=str(out),
        use_cpu=True,
        per_device_train_batch_size=6,
        gradient_accumulation_steps=2,
        num_generations=3,  # 12 rollouts over 4 prompts of width n_max 4
        n_max=4,
        n_min=2,
        max_completion_length=3,
        max_steps=2,
        learning_rate=0.0,
        beta=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return VIPGRPOConfig(**base)


def test_positions_are_those_of_the_log_prob_passes_when_padding_is_trimmed(tmp_path, monkeypatch) -> None:
    """GPT-2 (absolute positions), prompts of 5 to 8 tokens, the longest prompt of each batch dropped, so the left
    padding only it needed is trimmed before training. At learning rate 0 the policy is the reference and the old
    policy: KL and clipping are exactly 0 only if training sees the positions of those passes (trimming without
    the position shift gave KL ~6e-3)."""
    tok = tiny_tokenizer()
    model_dir = tmp_path / "gpt2"
    tiny_gpt2(len(tok)).save_pretrained(model_dir)

    def drop_longest(step: int, prompts: list[str]) -> list[int]:
        counts = [4] * len(prompts)
        counts[int(np.argmax([len(p) for p in prompts]))] = 0
        return counts

    shifted: list[bool] = []
    base_loss = GRPOTrainer.compute_loss

    def loss(self, model, inputs, *a, **kw):
        shifted.append(self._vip_shift is not None)
        return base_loss(self, model, inputs, *a, **kw)

    monkeypatch.setattr(GRPOTrainer, "compute_loss", loss)
    allocator = ScriptedAllocator(
        drop_longest, strategy="uniform", predictor="beta", n_min=2, n_max=4, embedder="hashing"
    )
    trainer = VIPGRPOTrainer(
        model=str(model_dir),
        reward_funcs=DigitReward(),
        args=_args(tmp_path / "run", beta=0.04, num_iterations=2, max_steps=4, loss_type="grpo"),
        train_dataset=sums(varied=True),
        processing_class=tok,
        allocator=allocator,
    )
    trainer.train()
    assert any(shifted)  # padding was trimmed: the training rows sit in other columns than in the passes
    logs = [h for h in trainer.state.log_history if "kl" in h]
    assert len(logs) == 4
    for h in logs:
        assert h["kl"] == pytest.approx(0.0, abs=1e-7)
        assert h["clip_ratio/region_mean"] == 0.0


def test_vllm_colocate_generates_one_completion_per_planned_row(tmp_path, monkeypatch) -> None:
    install_vllm_standin(monkeypatch)
    StandInLLM.instances.clear()
    tok = tiny_tokenizer()
    model_dir = tmp_path / "llama"
    tiny_llama(len(tok)).save_pretrained(model_dir)
    reward = DigitReward()
    trainer = VIPGRPOTrainer(
        model=str(model_dir),
        reward_funcs=reward,
        args=_args(tmp_path / "run", use_vllm=True, vllm_mode="colocate", strategy="vip", predictor="oracle"),
        train_dataset=sums(),
        processing_class=tok,
    )
    trainer.allocator.predictor.set_true_p([f"q{i}" for i in range(N_PROMPTS)], TRUE_P)
    records = []
    base = VIPGRPOTrainer._vip_observe

    def observe(self, layout, rewards):
        base(self, layout, rewards)
        records.append(self.vip_last)

    monkeypatch.setattr(VIPGRPOTrainer, "_vip_observe", observe)
    trainer.train()
    (llm,) = StandInLLM.instances
    assert [len(c) for c in llm.calls] == [12, 12]  # the engine got the budget's rows, one completion each
    assert llm.synced  # TRL pushed the policy's weights into the engine
    for prompts, rec, call in zip(llm.calls, records, reward.calls):
        assert rec.counts.sum() == 12 and (rec.counts == 0).any()  # a non-uniform plan that drops prompts
        assert [pid for pid, _, _ in call] == [p for p, c in zip(rec.prompt_ids, rec.counts) for _ in range(int(c))]
        texts = [tok.decode(ids) for ids in prompts]
        assert len(set(texts)) == int((rec.counts > 0).sum())
    for h in (h for h in trainer.state.log_history if "loss" in h):
        # vLLM's sampled-token log-probs agree with TRL's recomputation row by row: the IS ratio stays 1
        assert h["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-2)
        assert h["sampling/sampling_logp_difference/max"] < 1e-2


class Accuracy:
    __name__ = "accuracy"

    def __init__(self) -> None:
        self.calls: list[list[float]] = []

    def __call__(self, completions, answer, **kwargs):
        out = [float(c.strip() == a) for c, a in zip(completions, answer)]
        self.calls.append(out)
        return out


class DigitsOnly:
    """Format reward: 1 when the completion is all digits (a wrong number still passes)."""

    __name__ = "format"

    def __init__(self) -> None:
        self.calls: list[list[float]] = []

    def __call__(self, completions, **kwargs):
        out = [float(bool(c) and c.isdigit()) for c in completions]
        self.calls.append(out)
        return out


def test_duplicate_prompts_are_grouped_and_success_follows_the_named_reward(tmp_path, monkeypatch) -> None:
    """Two distinct prompt texts, six rows each, no id column: every generation batch samples a prompt more than
    once. The duplicates are planned as one prompt (one block of rows, one baseline), the budget shrinks to what
    the distinct prompts can take (with a warning), and 3 micro-batches leave one inert row. Success is the
    accuracy reward alone, so a right-format wrong answer is no success."""
    tok = tiny_tokenizer()
    data = Dataset.from_dict({"prompt": ["1+1=", "2+2="] * 6, "answer": ["2", "4"] * 6})
    acc, fmt = Accuracy(), DigitsOnly()
    records, trained = [], []
    base_observe, base_loss = VIPGRPOTrainer._vip_observe, GRPOTrainer.compute_loss

    def observe(self, layout, rewards):
        base_observe(self, layout, rewards)
        records.append(self.vip_last)

    def loss(self, model, inputs, *a, **kw):
        value = base_loss(self, model, inputs, *a, **kw)
        trained.append((inputs["completion_mask"].sum(1).tolist(), inputs["advantages"].tolist(), float(value)))
        return value

    monkeypatch.setattr(VIPGRPOTrainer, "_vip_observe", observe)
    monkeypatch.setattr(GRPOTrainer, "compute_loss", loss)
    args = _args(
        tmp_path / "run",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,  # budget 12 over 3 micro-batches
        max_completion_length=2,
        loss_type="dapo",
        success_reward="accuracy",
        strategy="uniform",
        predictor="beta",
        embedder="hashing",
        max_steps=3,
    )
    trainer = VIPGRPOTrainer(
        model=tiny_llama(len(tok)), reward_funcs=[acc, fmt], args=args, train_dataset=data, processing_class=tok
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("duplicate prompt(s) in one generation batch" in str(w.message) for w in caught)
    assert len(records) == 3
    format_only = 0
    for rec, a_call, f_call in zip(records, acc.calls, fmt.calls):
        assert len(set(rec.prompt_ids)) == len(rec.prompt_ids) <= 2  # planned once per distinct prompt
        per_block = rec.real_rows.reshape(-1, 4).sum(1)
        assert sorted(per_block[per_block > 0].tolist()) == sorted(rec.counts[rec.counts > 0].tolist())
        assert int(rec.counts.sum()) == 4 * len(rec.prompt_ids) == int(rec.real_rows.sum())  # capped budget
        # successes are the accuracy reward's, not the weighted sum (format-only completions would count there)
        got = np.concatenate(rec.successes)
        np.testing.assert_array_equal(np.sort(got), np.sort(np.asarray(a_call) >= 0.5))
        format_only += sum(f == 1.0 and a == 0.0 for a, f in zip(a_call, f_call))
    assert format_only > 0  # the distinction mattered: some completions had the format but not the answer
    # every micro-batch trained on ceil(real / 3) rows; the filler rows carry no token and no advantage
    for k, rec in enumerate(records):
        per = -(-int(rec.counts.sum()) // 3)
        chunk = trained[3 * k : 3 * k + 3]
        assert all(len(tokens) == per for tokens, _, _ in chunk)
        inert = [(t, a) for tokens, adv, _ in chunk for t, a in zip(tokens, adv) if t == 0]
        assert len(inert) >= 3 * per - int(rec.counts.sum()) and all(a == 0.0 for _, a in inert)
    assert all(math.isfinite(v) for _, _, v in trained)


def test_two_phase_pilot_then_commit_inside_one_generation_batch(tmp_path, monkeypatch) -> None:
    """vip_two_phase: each generation batch generates and scores the pilot (2 rollouts per prompt) with TRL's own
    methods, the allocator observes it and commits the rest of the budget, then TRL's method generates only the
    committed rows and computes the advantages over each prompt's whole group (pilot + commit)."""
    from trl.trainer.utils import nanstd

    tok = tiny_tokenizer()
    reward = DigitReward(log_extra=True)
    gen_rows, raw, records = [], [], []
    base_gen, base_score = GRPOTrainer._generate_single_turn, GRPOTrainer._generate_and_score_completions
    base_observe = VIPGRPOTrainer._vip_observe

    def gen(self, prompt_ids, *a, **kw):
        gen_rows.append(len(prompt_ids))
        return base_gen(self, prompt_ids, *a, **kw)

    def score(self, inputs):
        out = base_score(self, inputs)
        raw.append({k: v.clone() for k, v in out.items() if isinstance(v, torch.Tensor)})
        return out

    def observe(self, layout, rewards):
        base_observe(self, layout, rewards)
        records.append(self.vip_last)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", gen)
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", score)
    monkeypatch.setattr(VIPGRPOTrainer, "_vip_observe", observe)
    args = _args(
        tmp_path / "run",
        two_phase=True,
        strategy="vip_two_phase",
        pilot_n=2,
        predictor="beta",
        embedder="hashing",
        loss_type="grpo",
        learning_rate=1e-3,
        max_steps=3,
        log_completions=True,
    )
    trainer = VIPGRPOTrainer(
        model=tiny_llama(len(tok)), reward_funcs=reward, args=args, train_dataset=sums(), processing_class=tok
    )
    trainer.train()
    assert len(records) == 3
    history = {step: trials for step, _, _, trials in trainer.allocator.history.iter_steps()}
    for k, rec in enumerate(records):
        pilot, commit = reward.calls[2 * k], reward.calls[2 * k + 1]
        assert len(pilot) == 2 * 4  # every prompt's pilot
        assert gen_rows[2 * k : 2 * k + 2] == [8, 12 - 8]  # the pilot, then only the committed rows
        assert len(commit) == 12 - 8 and rec.counts.sum() == 12
        counts = {pid: 0 for pid in rec.prompt_ids}
        for pid, _, _ in pilot + commit:
            counts[pid] += 1
        assert [counts[p] for p in rec.prompt_ids] == rec.counts.tolist()
        assert int(np.sum(history[rec.step])) == 12  # the allocator observed pilot and commit rows
        # TRL's advantages are group statistics over each prompt's pilot and committed rewards together
        by_prompt: dict[str, list[float]] = {}
        for pid, _, r in pilot + commit:
            by_prompt.setdefault(pid, []).append(r)
        expected: dict[tuple[str, str], float] = {}
        for (pid, completion, r), (prompt, _) in zip(pilot + commit, reward.pairs[2 * k] + reward.pairs[2 * k + 1]):
            x = torch.tensor(by_prompt[pid])
            expected[(prompt, completion)] = float((r - x.mean()) / (nanstd(x) + 1e-4)) if len(x) > 1 else 0.0
        out, real = raw[k], torch.as_tensor(rec.real_rows)
        assert int(real.sum()) == 12
        for row in torch.nonzero(real).flatten().tolist():
            p = tok.decode(out["prompt_ids"][row][out["prompt_mask"][row].bool()])
            c = tok.decode(out["completion_ids"][row][out["completion_mask"][row].bool()], skip_special_tokens=True)
            assert out["advantages"][row].item() == pytest.approx(expected[(p, c)], abs=1e-5)
        # the completions table (with the log_extra column of both rounds) holds the 12 real rows
    df = pd.read_parquet(sorted((tmp_path / "run" / "completions").glob("*.parquet"))[-1])
    assert len(df) == 12 and df["digit_count"].notna().all()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
