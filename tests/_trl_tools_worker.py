"""Multi-turn tool rollouts through VIPGRPOTrainer: a chat tokenizer, a calculator tool, a scripted policy.

Imported by ``tests/test_trl_tools.py``; also the torchrun worker of its two-process test:
``torchrun --standalone --nproc_per_node 2 tests/_trl_tools_worker.py OUT_DIR`` (every process dumps what it saw to
``OUT_DIR/tools.rank<r>.json``).

The policy is a 2-layer Llama whose ``generate`` is replaced by a script (the training forward is the real model):
its turns are real Qwen-format tool calls (``<tool_call>{"name": "add", ...}</tool_call>``) that TRL parses with
its own ``parse_response`` and executes in ``_tool_call_loop``. Prompt ``k`` of the dataset asks ``a+b=``; the
script answers directly (no tool) when ``k % 3 == 2``, calls ``add`` twice when ``k % 3 == 1`` and once otherwise,
then answers with the tool's last result (or, on every third episode, that result plus one, so rewards vary).
"""

from __future__ import annotations

import json
import os
import re
import string
import sys
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl.chat_template_utils import qwen2_5_chat_template  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _trl_helpers import ScriptedAllocator  # noqa: E402

from vipalloc.integrations.trl import VIPGRPOConfig, VIPGRPOTrainer  # noqa: E402

torch.set_num_threads(1)
_TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
TOOL_CALLS: list[tuple[int, int]] = []  # arguments of every call of the calculator tool, in call order


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first addend
        b: the second addend
    """
    TOOL_CALLS.append((int(a), int(b)))
    return int(a) + int(b)


class CalculatorEnv:
    """An ``environment_factory`` environment: the calculator as a method; remembers its episode's last result."""

    def reset(self, **row: Any) -> None:
        self.prompt_id = row["prompt_id"]
        self.last: int | None = None
        return None

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first addend
            b: the second addend
        """
        self.last = add(a, b)
        return self.last


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer with Qwen2.5's chat template and tool-call tokens (TRL knows its response format)."""
    vocab = {"<pad>": 0, "<unk>": 1, "<|im_start|>": 2, "<|im_end|>": 3}
    for tok in _TOOL_TOKENS + sorted(set(string.printable)):
        vocab.setdefault(tok, len(vocab))
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), "isolated")
    model.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>")
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _TOOL_TOKENS])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = qwen2_5_chat_template
    return tok


def tiny_chat_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,  # the tool schema makes prompts long
        pad_token_id=0,
        eos_token_id=3,
    )
    return LlamaForCausalLM(cfg)


def sum_prompts(n: int = 12) -> Dataset:
    """Conversational ``a+b=`` prompts with ids ``q0..``; operands of 1 to 3 digits (prompt lengths differ)."""
    a = [(7 * k + 3) % 10 ** (1 + k % 3) for k in range(n)]
    b = [(5 * k + 1) % 10 for k in range(n)]
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"{x}+{y}="}] for x, y in zip(a, b)],
            "answer": [str(x + y) for x, y in zip(a, b)],
            "prompt_id": [f"q{k}" for k in range(n)],
        }
    )


class ScriptedPolicy:
    """Replaces ``model.generate``: each row's next turn follows the script above (see the module docstring).

    ``turns`` records ``(prompt_id, kind)`` of every generated turn, kind in ``call`` / ``answer``.
    """

    def __init__(self, tok: PreTrainedTokenizerFast) -> None:
        self.tok = tok
        self.turns: list[tuple[str, str]] = []
        self.episodes = 0

    def _turn(self, text: str) -> tuple[str, str]:
        query = re.findall(r"user\n(\d+)\+(\d+)=", text)[-1]
        a, b = int(query[0]), int(query[1])
        k = int(re.findall(r"q(\d+)", self.id_of[(a, b)])[0])
        results = re.findall(r"<tool_response>\n(-?\d+)\n</tool_response>", text)
        calls = 0 if k % 3 == 2 else 2 if k % 3 == 1 else 1
        if len(results) < calls:
            x, y = (a, b) if not results else (int(results[-1]), 0)
            call = json.dumps({"name": "add", "arguments": {"a": x, "b": y}})
            return "call", f"<tool_call>\n{call}\n</tool_call>"
        self.episodes += 1
        value = int(results[-1]) if results else a + b
        return "answer", f"The answer is {value + (1 if self.episodes % 3 == 0 else 0)}"

    def bind(self, model: LlamaForCausalLM, dataset: Dataset) -> None:
        self.id_of = {}
        for row in dataset:
            a, b = re.findall(r"(\d+)\+(\d+)=", row["prompt"][0]["content"])[0]
            self.id_of[(int(a), int(b))] = row["prompt_id"]

        def generate(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
            outs = []
            for row, mask in zip(
                input_ids, attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            ):
                text = self.tok.decode(row[mask.bool()])
                kind, reply = self._turn(text)
                self.turns.append((self.id_of_text(text), kind))
                outs.append(self.tok(reply + "<|im_end|>", add_special_tokens=False)["input_ids"])
            width = max(len(o) for o in outs)
            comp = torch.tensor([o + [self.tok.pad_token_id] * (width - len(o)) for o in outs])
            return torch.cat([input_ids, comp.to(input_ids.device)], dim=1)

        model.generate = generate  # type: ignore[method-assign]

    def id_of_text(self, text: str) -> str:
        a, b = re.findall(r"user\n(\d+)\+(\d+)=", text)[-1]
        return self.id_of[(int(a), int(b))]


def correct(prompts, completions, answer, prompt_id, environments=None, **kwargs) -> list[float]:
    """1 when the final assistant turn states the right sum; records (id, reward, tool turns, env id) per call."""
    out = []
    for i, (comp, ans) in enumerate(zip(completions, answer)):
        said = re.findall(r"The answer is (-?\d+)", comp[-1].get("content") or "")
        out.append(float(bool(said) and said[-1] == ans))
        env_id = environments[i].prompt_id if environments is not None else None
        correct.calls.append((prompt_id[i], out[-1], sum(m["role"] == "tool" for m in comp), env_id))
    return out


correct.calls = []  # type: ignore[attr-defined]


def build(
    out: Path, script: dict[int, list[int]], *, env: bool, rows: int, n_prompts: int, steps: int, loss: str = "dapo"
) -> tuple[VIPGRPOTrainer, ScriptedPolicy, list[dict]]:
    """A VIPGRPOTrainer with the calculator (``tools=[add]``, or ``environment_factory=CalculatorEnv`` with
    ``env``), the scripted policy and a scripted plan; returns it, the policy and the list ``compute_loss`` fills."""
    tok = chat_tokenizer()
    model = tiny_chat_llama(len(tok))
    data = sum_prompts()
    policy = ScriptedPolicy(tok)
    policy.bind(model, data)
    args = VIPGRPOConfig(
        output_dir=str(out / "run"),
        use_cpu=True,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=2,
        num_generations=2,
        n_max=4,
        n_min=2,
        max_completion_length=400,
        max_steps=steps,
        learning_rate=1e-3,
        loss_type=loss,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    assert args.prompts_per_generation == n_prompts
    allocator = ScriptedAllocator(
        lambda step, _texts: script[step % len(script)],
        strategy="uniform",
        predictor="beta",
        n_min=2,
        n_max=4,
        embedder="hashing",
    )
    tool_kw: dict[str, Any] = {"environment_factory": CalculatorEnv} if env else {"tools": [add]}
    trainer = VIPGRPOTrainer(
        model=model,
        reward_funcs=correct,
        args=args,
        train_dataset=data,
        processing_class=tok,
        allocator=allocator,
        **tool_kw,
    )
    trained: list[dict] = []
    return trainer, policy, trained


def record_loss(trained: list[dict], tok: PreTrainedTokenizerFast) -> Any:
    """A ``GRPOTrainer.compute_loss`` wrapper recording, per training micro-batch, each row's model and tool text."""
    base = GRPOTrainer.compute_loss

    def loss(self, model, inputs, *a, **kw):
        value = base(self, model, inputs, *a, **kw)
        cm, tm = inputs["completion_mask"], inputs.get("tool_mask")
        rows = []
        for ids, c, t in zip(inputs["completion_ids"], cm, tm if tm is not None else cm):
            if int(c.sum()):
                model_tokens = ids[(c * t).bool()]
                tool_tokens = ids[(c * (1 - t)).bool()]
                rows.append([tok.decode(model_tokens), tok.decode(tool_tokens), int(model_tokens.numel())])
        trained.append(
            {
                "rows": int(cm.size(0)),
                "has_tool_mask": tm is not None,
                "real": rows,
                "items": float(inputs["num_items_in_batch"]),  # the loss normaliser (dapo: global loss tokens)
                "loss": float(value.detach()),
            }
        )
        return value

    return base, loss


# two processes: 4 prompts x n_max 4 = 16 sampled rows (8 per process); budget 8 = 2 processes x 2 rows x 2 steps
MP_SCRIPT = {0: [4, 2, 2, 0], 1: [2, 0, 4, 2]}  # real rows per process: 6 / 2, then 2 / 6


def run_two_process(out: Path) -> None:
    rank = int(os.environ["RANK"])
    trainer, policy, trained = build(out, MP_SCRIPT, env=False, rows=2, n_prompts=4, steps=2)
    base, loss = record_loss(trained, trainer.processing_class)
    GRPOTrainer.compute_loss = loss
    try:
        trainer.train()
    finally:
        GRPOTrainer.compute_loss = base
    last = trainer.vip_last
    assert last is not None
    dump = {
        "world": trainer.accelerator.num_processes,
        "trained": trained,
        "reward_calls": correct.calls,
        "tool_calls": len(TOOL_CALLS),
        "turns": policy.turns,
        "counts": last.counts.tolist(),
        "ids": last.prompt_ids,
        "lengths": [x.tolist() for x in last.lengths],
        "call_frequency": [h.get("tools/call_frequency") for h in trainer.state.log_history if "loss" in h],
    }
    (out / f"tools.rank{rank}.json").write_text(json.dumps(dump))


def per_prompt(calls: list) -> Counter:
    return Counter(c[0] for c in calls)


if __name__ == "__main__":
    run_two_process(Path(sys.argv[1]))
