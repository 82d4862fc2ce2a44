"""VIPGRPOTrainer setups beyond the basic run: token positions on an absolute-position model, vLLM colocate mode
(through a stand-in for ``vllm.LLM``), duplicate prompts, and a named success reward."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
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
        args=_args(
            tmp_path / "run", use_vllm=True, vllm_mode="colocate", allocation_strategy="vip", predictor="oracle"
        ),
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
        allocation_strategy="uniform",
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
