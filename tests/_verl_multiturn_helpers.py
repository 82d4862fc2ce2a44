"""Stand-ins for a multi-turn verl run on the CPU: a character-level tokenizer with a chat template (saved as a model
folder verl's ``HFModelConfig`` loads), a deterministic calculator function tool, a scripted stand-in for the LLM
server whose answers depend on what the tool returned, and a stand-in for verl's streaming reward workers.

verl's own ``AgentLoopWorkerTQ`` / ``AgentLoopWorker`` and ``ToolAgentLoop`` run in-process on a background event
loop (:class:`InProcessAgentLoop`), so every tool call, mask and TransferQueue write is verl's code.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import Counter
from typing import Any

import numpy as np

CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-*/=.,:;!?'\"()[]{}<>_#\n"
# A template whose renders are append-only (verl's Continuous Token builder diffs renders of message prefixes).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<a>{{ m['content'] }}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<tool_call>{{ c['function']['name'] }}</tool_call>"
    "{% endfor %}{% endif %}</a>\n"
    "{% elif m['role'] == 'tool' %}<t>{{ m['content'] }}</t>\n"
    "{% else %}<u>{{ m['content'] }}</u>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
)
TOOL_SOURCE = '''
from verl.tools.function_tool import function_tool

CALLS = []


@function_tool
def calculator(expression: str) -> str:
    """Evaluate an integer arithmetic expression.

    Args:
        expression: digits and + - * ( ) only.
    """
    if not set(expression) <= set("0123456789+-*() "):
        raise ValueError("only integer arithmetic")
    CALLS.append(expression)
    return str(eval(expression))  # noqa: S307 - digits and operators only, checked above
'''


def char_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def write_model_dir(path: str) -> str:
    """A model folder verl's ``HFModelConfig`` loads (tiny Llama config, the character tokenizer)."""
    from transformers import LlamaConfig

    sizes = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
    )
    cfg = LlamaConfig(vocab_size=len(CHARS) + 4, pad_token_id=0, eos_token_id=1, bos_token_id=2, **sizes)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def write_tool_file(path: str) -> str:
    with open(path, "w") as f:
        f.write(TOOL_SOURCE)
    return path


def question(i: int) -> tuple[str, str, int]:
    """Prompt ``i``: its text, the expression the policy hands the tool, and the right answer."""
    expr = f"{i}*7+3"
    return f"Compute {i} * 7 + 3.", expr, i * 7 + 3


class ScriptedServer:
    """Stands in for verl's LLM server client (``generate`` returns a ``TokenOutput``).

    Turn 1: a hermes tool call to ``calculator``. Turn 2: reads the tool's answer out of the prompt tokens it was
    given and states it, correct with probability ``p(i)`` (else off by one); without a tool answer in the context it
    can only guess wrong. ``fail_first`` = {prompt index: k}: the first ``k`` first-turn requests of that prompt raise
    (a session that fails, as an unreachable server would make it).
    """

    def __init__(self, tokenizer: Any, p_table: list[float], seed: int = 0, fail_first: dict[int, int] | None = None):
        self.tok, self.p_table = tokenizer, p_table
        self.rng = np.random.default_rng(seed)
        self.fail_first = dict(fail_first or {})
        self.turns: Counter[str] = Counter()
        self.seen_tool_answers: list[str] = []
        self.failed = 0
        self.lock = threading.Lock()

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **kwargs: Any) -> Any:  # fmt: skip
        from verl.workers.rollout.replica import TokenOutput

        await asyncio.sleep(float(self.rng.random()) * 0.003)  # sessions finish out of order
        text = self.tok.decode(prompt_ids)
        i = int(re.search(r"Compute (\d+) \*", text).group(1))  # type: ignore[union-attr]
        _, expr, answer = question(i)
        tool = re.findall(r"<t>(-?\d+)</t>", text)
        with self.lock:
            self.turns["tool" if tool else "first"] += 1
            if not tool and self.fail_first.get(i, 0) > 0:
                self.fail_first[i] -= 1
                self.failed += 1
                raise RuntimeError(f"stub server: request for prompt {i} failed")
            if tool:
                self.seen_tool_answers.append(tool[-1])
                p = self.p_table[i % len(self.p_table)]
                said = int(tool[-1]) if self.rng.random() < p else int(tool[-1]) + 1
                reply = f"The answer is {said}."
            else:
                reply = (
                    "<tool_call>"
                    + json.dumps({"name": "calculator", "arguments": {"expression": expr}})
                    + "</tool_call>"
                )
        ids = self.tok.encode(reply, add_special_tokens=False) + [self.tok.eos_token_id]
        return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids), stop_reason="completed",
                           extra_fields={"min_global_steps": 0, "max_global_steps": 0})  # fmt: skip


class StubRewardWorker:
    """Stands in for a verl reward-loop worker handle: ``compute_score.remote(data)`` scores the last number the
    policy stated against the ground truth (``reward_model.ground_truth``): 1.0 when equal."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.compute_score = self  # handle.compute_score.remote(...)

    def remote(self, data: Any) -> Any:
        async def score() -> dict[str, Any]:
            resp = self.tok.decode(data.batch["responses"][-1].tolist())
            truth = str(data.non_tensor_batch["reward_model"][-1]["ground_truth"])
            said = re.findall(r"answer is (-?\d+)", resp)
            acc = float(bool(said) and said[-1] == truth)
            return {"reward_score": acc, "reward_extra_info": {"acc": acc}}

        return score()


class InProcessAgentLoop:
    """Runs a verl agent-loop worker (``AgentLoopWorkerTQ`` for the v1 loop, ``AgentLoopWorker`` for the legacy
    loop) in this process, on one background event loop, with the scripted server and reward stand-ins."""

    def __init__(self, worker_cls: Any, config: Any, server: ScriptedServer, reward: StubRewardWorker) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        cls = getattr(worker_cls, "__ray_actor_class__", worker_cls)

        async def build() -> Any:
            return cls(config, llm_client=server, reward_loop_worker_handles=[reward])

        self.worker = self.run(build())
        self.submissions: list[list[tuple[str, int, int]]] = []  # v1: (uid, index, __rollout_n__) per prompt

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def generate_sequences(self, batch: Any) -> Any:
        """v1: ``AgentLoopManagerTQ.generate_sequences`` (fire-and-forget), waited for here so a step is complete;
        legacy: ``AgentLoopManager.generate_sequences`` returning the padded ``DataProto``."""
        from verl import DataProto

        if isinstance(batch, DataProto):
            return self.run(self.worker.generate_sequences(batch))
        self.submissions.append([(str(batch["uid"][i]), int(batch["index"][i]), int(batch["__rollout_n__"][i]))
                                 for i in range(len(batch))])  # fmt: skip

        async def submit_and_wait() -> None:
            await self.worker.generate_sequences(batch)
            while self.worker.background_tasks:
                await asyncio.gather(*list(self.worker.background_tasks), return_exceptions=True)

        self.run(submit_and_wait())
        return None

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
