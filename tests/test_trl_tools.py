"""VIPGRPOTrainer with TRL's multi-turn tool rollouts (``tools=[...]``, ``environment_factory``) and ``args=None``.

A scripted policy emits real Qwen-format tool calls that TRL 1.16 parses and executes in ``_tool_call_loop`` (see
``tests/_trl_tools_worker.py``). Checked: each prompt gets exactly its planned number of whole episodes, scored once
at the end; the calculator was really called; tool-output tokens reach training with ``tool_mask`` 0 (out of the
loss and of the token normaliser); the per-episode generated-token counts exclude tool output; one and two processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")
pytest.importorskip("jmespath")  # TRL 1.16 parses tool calls with it on transformers < 5.13

import _trl_tools_worker as w  # noqa: E402
from _trl_helpers import DigitReward, sums, tiny_llama, tiny_tokenizer  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from vipalloc.defaults import DEFAULT_PREDICTOR, DEFAULT_STRATEGY  # noqa: E402
from vipalloc.integrations.trl import VIPGRPOConfig, VIPGRPOTrainer  # noqa: E402

# 6 prompts x n_max 4 = 24 sampled rows, budget 12 = 6 rows x 2 micro-batches (one process); uneven plans, drops
SCRIPT = {0: [4, 2, 0, 3, 0, 3], 1: [2, 2, 2, 2, 4, 0]}


def _completion_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("env", [False, True], ids=["tools", "environment_factory"])
def test_planned_episodes_with_real_tool_calls(tmp_path, env) -> None:
    w.TOOL_CALLS.clear()
    w.correct.calls.clear()
    trainer, policy, trained = w.build(tmp_path, SCRIPT, env=env, rows=6, n_prompts=6, steps=2)
    tok = trainer.processing_class
    base, loss = w.record_loss(trained, tok)
    plans = []
    observe = trainer.allocator.observe

    def spy(ids, rewards, step, lengths=None):
        plans.append((list(ids), [len(r) for r in rewards], step, [list(map(int, x)) for x in lengths]))
        return observe(ids, rewards, step, lengths=lengths)

    trainer.allocator.observe = spy  # type: ignore[method-assign]
    GRPOTrainer.compute_loss = loss
    try:
        trainer.train()
    finally:
        GRPOTrainer.compute_loss = base

    # every prompt got exactly its planned number of episodes, each scored once at the end (one reward call a step)
    assert len(plans) == 2
    calls_per_step = [w.correct.calls[:12], w.correct.calls[12:]]
    assert len(w.correct.calls) == 24
    for (ids, sizes, _, _), script, scored in zip(plans, (SCRIPT[0], SCRIPT[1]), calls_per_step):
        planned = dict(zip(ids, sizes))  # what the allocator was told came back, per prompt
        assert sorted(sizes) == sorted(c for c in script if c)
        assert Counter(c[0] for c in scored) == Counter(planned)
        for pid, _, tool_turns, env_id in scored:  # whole episodes: the tool turns of the script are in the completion
            k = int(pid[1:])
            assert tool_turns == (0 if k % 3 == 2 else 2 if k % 3 == 1 else 1)
            assert env_id == (pid if env else None)  # reward functions see each scored row's own environment
    # the calculator ran once per scripted call, on the policy's arguments
    n_calls = sum(1 for _, kind in policy.turns if kind == "call")
    assert n_calls > 0 and len(w.TOOL_CALLS) == n_calls
    answers = sum(1 for _, kind in policy.turns if kind == "answer")
    assert answers == 24  # one final answer per episode, no turn for unused rows
    # training: equal rows per micro-batch, tool output present with tool_mask 0, absent from the model tokens
    assert all(t["has_tool_mask"] and t["rows"] == 6 for t in trained)
    rows = [r for t in trained for r in t["real"]]
    assert len(rows) == 24
    with_tool = [r for r in rows if r[1]]
    assert with_tool and all("<tool_response>" in r[1] and "<tool_response>" not in r[0] for r in with_tool)
    assert all("<tool_call>" not in r[1] for r in rows)  # the policy's own tool calls are trained on
    # the token normaliser (dapo) counts model tokens only: the micro-batches of a step share the global count
    for step in range(2):
        chunk = trained[2 * step : 2 * step + 2]
        model_tokens = sum(r[2] for t in chunk for r in t["real"])
        assert all(t["items"] == model_tokens for t in chunk)
    # per-episode generated tokens (tool output excluded) of the last step, aligned with the rewards
    last = trainer.vip_last
    assert [len(x) for x in last.lengths] == [len(r) for r in last.rewards]
    # ... and the allocator's length model received exactly those counts (the prompts it observed)
    observed_ids, _, _, observed_lengths = plans[-1]
    by_id = dict(zip(last.prompt_ids, last.lengths))
    assert observed_lengths == [by_id[pid].tolist() for pid in observed_ids]
    assert int(sum(x.sum() for x in last.lengths)) == sum(r[2] for t in trained[2:] for r in t["real"])
    direct = _completion_tokens(tok, "The answer is 00<|im_end|>")
    for pid, x in zip(last.prompt_ids, last.lengths):
        if int(pid[1:]) % 3 == 2:  # direct answers: one turn of "The answer is N<|im_end|>"
            assert set(x.tolist()) <= {direct - 1, direct, direct + 1, direct + 2}
        elif x.size:
            assert x.min() > direct  # the tool calls' own tokens count, the tool outputs do not
    freq = [h["tools/call_frequency"] for h in trainer.state.log_history if "tools/call_frequency" in h]
    assert freq and all(0 < f <= 2 for f in freq)


def test_two_processes_uneven_rows(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    worker = Path(w.__file__)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    proc = subprocess.run([*cmd, str(tmp_path)], timeout=600, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    d0, d1 = (json.loads((tmp_path / f"tools.rank{r}.json").read_text()) for r in (0, 1))
    assert d0["world"] == d1["world"] == 2
    # real rows per process: 6 / 2 at step 0, 2 / 6 at step 1; each process scores exactly its own episodes
    assert len(d0["reward_calls"]) == 6 + 2 and len(d1["reward_calls"]) == 2 + 6
    first = Counter(c[0] for c in d0["reward_calls"][:6] + d1["reward_calls"][:2])
    assert sorted(first.values()) == sorted(c for c in w.MP_SCRIPT[0] if c)
    second = Counter(c[0] for c in d0["reward_calls"][6:] + d1["reward_calls"][2:])
    assert sorted(second.values()) == sorted(c for c in w.MP_SCRIPT[1] if c)
    assert dict(zip(d0["ids"], d0["counts"])) == dict(second) | {p: 0 for p in d0["ids"] if p not in second}
    calls = sum(1 for d in (d0, d1) for _, kind in d["turns"] if kind == "call")
    assert calls > 0 and d0["tool_calls"] + d1["tool_calls"] == calls
    for d in (d0, d1):  # every process trains 2 rows per micro-batch, tool output masked
        assert [t["rows"] for t in d["trained"]] == [2] * 4 and all(t["has_tool_mask"] for t in d["trained"])
        for t in d["trained"]:
            for model_text, tool_text, _ in t["real"]:
                assert "<tool_response>" not in model_text
                assert not tool_text or "<tool_response>" in tool_text
    for step in range(2):  # the loss normaliser is the global count of model tokens (both processes)
        tokens = sum(r[2] for d in (d0, d1) for t in d["trained"][2 * step : 2 * step + 2] for r in t["real"])
        assert all(t["items"] == tokens for d in (d0, d1) for t in d["trained"][2 * step : 2 * step + 2])
    assert sum(sum(x) for x in d0["lengths"]) == sum(
        r[2] for d in (d0, d1) for t in d["trained"][2:] for r in t["real"]
    )
    assert d0["lengths"] == d1["lengths"]  # every process holds the gathered per-episode counts


def test_args_none_builds_the_default_config(tmp_path, monkeypatch) -> None:
    import transformers.training_args as ta
    from trl import GRPOConfig

    monkeypatch.chdir(tmp_path)  # TRL's default output_dir is relative: "<model name>-GRPO"
    # TRL's default config asks for bf16, which TrainingArguments refuses on a machine without a bf16 GPU (plain
    # GRPOTrainer(args=None) fails the same way here); pretend one is present so the default can be built on the CPU.
    monkeypatch.setattr(ta, "is_torch_bf16_gpu_available", lambda: True)
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    model.config._name_or_path = "org/tiny-llama"
    trainer = VIPGRPOTrainer(model=model, reward_funcs=DigitReward(), train_dataset=sums(), processing_class=tok)
    args = trainer.args
    assert isinstance(args, VIPGRPOConfig)
    assert Path(args.output_dir).name == "tiny-llama-GRPO"
    assert args.num_generations == 8 and args.n_max == 16 and trainer.num_generations == 16
    assert (args.strategy, args.predictor) == (DEFAULT_STRATEGY, DEFAULT_PREDICTOR)
    trl_default = GRPOConfig("tiny-llama-GRPO")  # what GRPOTrainer(args=None) builds: every TRL field agrees
    for f in dataclasses.fields(GRPOConfig):
        mine, theirs = getattr(args, f.name), getattr(trl_default, f.name)
        assert mine == theirs or (mine != mine and theirs != theirs), f.name  # (NaN == NaN)
    assert trainer.allocator.n_max == 16 and np.isclose(trainer.allocator.n_min, 2)
    model_dir = tmp_path / "saved-policy"
    model.save_pretrained(model_dir)
    by_path = VIPGRPOTrainer(
        model=str(model_dir), reward_funcs=DigitReward(), train_dataset=sums(), processing_class=tok
    )
    assert Path(by_path.args.output_dir).name == "saved-policy-GRPO"


def test_refused_tool_setups(tmp_path) -> None:
    tok = w.chat_tokenizer()
    model = w.tiny_chat_llama(len(tok))
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=2, report_to=[])
    two_phase = VIPGRPOConfig(**base, two_phase=True, strategy="vip_two_phase")
    with pytest.raises(NotImplementedError, match="two_phase=True with tools"):
        VIPGRPOTrainer(
            model=model, reward_funcs=w.correct, args=two_phase, train_dataset=w.sum_prompts(), tools=[w.add]
        )
    # environment-owned tasks (no train_dataset) are supported (tests/test_trl_environments.py); TRL's own rule
    # that max_steps then sets the training length still applies
    with pytest.raises(ValueError, match="max_steps"):
        VIPGRPOTrainer(
            model=model,
            reward_funcs=w.correct,
            args=VIPGRPOConfig(**base),
            processing_class=tok,
            environment_factory=w.CalculatorEnv,
        )
    with pytest.raises(NotImplementedError, match="rollout_func"):
        VIPGRPOTrainer(
            model=model,
            reward_funcs=w.correct,
            args=VIPGRPOConfig(**base),
            train_dataset=w.sum_prompts(),
            rollout_func=lambda prompts, trainer: {},
        )
