"""Real VIPGRPOTrainer steps on a tiny offline model: counts follow the plan, padded rows are inert."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from vipalloc.integrations.trl import VIPGRPOConfig, VIPGRPOTrainer  # noqa: E402

CHARS = "0123456789+-=*? "


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


def exact_match(completions, answer, **kwargs):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


class Recording(VIPGRPOTrainer):
    """Keeps what each generation step produced so the test can inspect it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.records = []
        self.generated_rows = []

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        real = self._vip_real
        self.generated_rows.append(sum(real) if real is not None else len(prompt_ids))
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.records.append(
            {
                "out": {k: v for k, v in out.items() if isinstance(v, torch.Tensor)},
                "real": list(self._vip_real_used),
                "last": dict(self.vip_last),
            }
        )
        return out


def test_vip_grpo_trainer_steps(tmp_path) -> None:
    tok = tiny_tokenizer()
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40), rng.integers(0, 5, 40)
    ds = Dataset.from_dict(
        {
            "prompt": [f"{x}+{y}=" for x, y in zip(a, b)],
            "answer": [str(x + y) for x, y in zip(a, b)],
            "prompt_id": [f"q{i}" for i in range(40)],
        }
    )
    args = VIPGRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=16,  # 4 prompts x group width 4 per generation batch
        num_generations=4,
        max_completion_length=3,
        max_steps=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        loss_type="dapo",
        beta=0.0,
        mean_generations=3,  # budget 12 real completions over 4 prompts
        n_min=2,
        allocation_strategy="vip_pure",
        predictor="oracle",
        seed=0,
    )
    trainer = Recording(
        model=tiny_model(len(tok)), reward_funcs=exact_match, args=args, train_dataset=ds, processing_class=tok
    )
    trainer.allocator.predictor = _SkewedOracle()
    trainer.train()
    assert len(trainer.records) == 4
    for rec, gen_rows in zip(trainer.records, trainer.generated_rows):
        counts = rec["last"]["counts"]
        assert int(counts.sum()) == 12 == gen_rows  # only the planned completions were generated
        real = torch.tensor(rec["real"])
        per_group = real.view(-1, 4).sum(1).numpy()
        np.testing.assert_array_equal(per_group, counts)  # real rows per prompt == plan
        out = rec["out"]
        assert torch.all(out["advantages"][~real] == 0)
        assert torch.all(out["completion_mask"][~real] == 0)
        assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
        assert [len(s) for s in rec["last"]["success"]] == counts.tolist()
    # the allocator received exactly the real (binarised) rewards
    hist = trainer.allocator.history
    assert len(hist) == sum(int((r["last"]["counts"] > 0).sum()) for r in trainer.records)
    total = sum(int(s.sum()) for r in trainer.records for s in r["last"]["success"])
    assert int(hist.aggregates().successes.sum()) == total
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(v) for v in losses)
    logged = [h for h in trainer.state.log_history if "vip/mean_n" in h]
    assert logged and all(0 < h["vip/mean_n"] <= 4 for h in logged)
    assert any(h["vip/expected_var_ratio_vs_uniform"] < 1.0 for h in logged)


class _SkewedOracle:
    """Oracle-like predictor: prompts differ so the plan is not uniform (p from the prompt id)."""

    name = "oracle"
    needs_features = False

    def set_features(self, ids, x):
        pass

    def observe(self, ids, s, t, step):
        pass

    def predict(self, ids, step):
        p = np.array([0.05 + 0.9 * ((int(i[1:]) * 7) % 10) / 10 for i in ids])
        return p, np.zeros(len(ids))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_rejects_unsupported_settings(tmp_path) -> None:
    tok = tiny_tokenizer()
    ds = Dataset.from_dict({"prompt": ["1+1="] * 8, "answer": ["2"] * 8})
    args = VIPGRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=8,
        num_generations=4,
        max_steps=1,
        report_to=[],
        loss_type="grpo",
        beta=0.0,
    )
    with pytest.raises(ValueError, match="loss_type 'grpo'"):
        VIPGRPOTrainer(
            model=tiny_model(len(tok)), reward_funcs=exact_match, args=args, train_dataset=ds, processing_class=tok
        )
