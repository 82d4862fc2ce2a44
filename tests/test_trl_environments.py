"""VIPGRPOTrainer with tasks the environment chooses, mirroring TRL 1.16's own GRPO environment tests.

* ``environment_factory`` without ``train_dataset`` (TRL's ``test_train_with_environment_factory`` /
  ``test_train_with_environment_owned_data``): the environment returns the task from ``reset()``; the plug-in resets
  the step's environments before the plan, keys each group by its observation, and TRL's own reset of the same
  instances then returns the planned task (each environment reset once per batch).
* A dataset without a ``prompt`` column (TRL's ``test_train_with_multiple_environments``: rows hold only an
  ``environment`` name, ``reset()`` supplies the prompt): rows are keyed by row and observation, never a KeyError.
* Refusals: a ``reset()`` that gives the copies of one group different tasks; a dataset without ``prompt`` and no
  environment (before TRL starts).

The policy is the scripted tool-calling Llama of ``tests/_trl_tools_worker.py`` (real Qwen-format tool calls that
TRL parses and executes).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("trl")
pytest.importorskip("jmespath")  # TRL 1.16 parses tool calls with it on transformers < 5.13

import _trl_tools_worker as w  # noqa: E402
import torch  # noqa: E402
from _trl_helpers import ScriptedAllocator  # noqa: E402
from datasets import Dataset  # noqa: E402

from vipalloc import Allocator  # noqa: E402
from vipalloc.integrations.trl import VIPGRPOConfig, VIPGRPOTrainer  # noqa: E402
from vipalloc.integrations.trl.environments import check_group_tasks, group_keys  # noqa: E402

TASKS = w.sum_prompts()  # the questions the environment owns (ids q0..q11, operands of 1-3 digits)
GROUP = 4  # n_max: rows per group


class TaskEnv:
    """Owns the tasks: instance ``s`` (TRL's pool order, so the ``s``-th row of a batch) serves task
    ``(s // GROUP + 4 t) % 12`` at its ``t``-th reset, so the copies of one group share a task. ``add`` is a tool."""

    created = itertools.count()
    resets: list[tuple[int, dict[str, Any]]] = []  # (slot, kwargs) of every reset

    def __init__(self) -> None:
        self.slot = next(TaskEnv.created)
        self.t = 0
        self.task: int | None = None
        self.last: int | None = None

    def reset(self, **kwargs: Any) -> str:
        TaskEnv.resets.append((self.slot, kwargs))
        self.task = (self.slot // GROUP + 4 * self.t) % len(TASKS)
        self.t += 1
        self.last = None
        return TASKS[self.task]["prompt"][0]["content"]

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first addend
            b: the second addend
        """
        self.last = w.add(a, b)
        return self.last


def env_correct(completions: list, environments: list, **kwargs: Any) -> list[float]:
    """1 when the final turn states the sum of the environment's task; records (task, reward) per scored row."""
    out = []
    for comp, env in zip(completions, environments):
        said = re.findall(r"The answer is (-?\d+)", comp[-1].get("content") or "")
        out.append(float(bool(said) and said[-1] == TASKS[env.task]["answer"]))
        env_correct.calls.append((env.task, out[-1]))
    return out


env_correct.calls = []  # type: ignore[attr-defined]


def _config(tmp_path, **kw: Any) -> VIPGRPOConfig:
    base = dict(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_generations=2,
        n_max=GROUP,
        n_min=2,
        max_completion_length=400,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    return VIPGRPOConfig(**{**base, **kw})


def _trainer(tmp_path, allocator: Allocator, env: Any = TaskEnv, **kw: Any) -> tuple[VIPGRPOTrainer, Any]:
    tok = w.chat_tokenizer()
    model = w.tiny_chat_llama(len(tok))
    policy = w.ScriptedPolicy(tok)
    policy.bind(model, TASKS)
    trainer = VIPGRPOTrainer(
        model=model,
        reward_funcs=env_correct,
        args=_config(tmp_path),
        processing_class=tok,
        allocator=allocator,
        environment_factory=env,
        **kw,
    )
    return trainer, policy


def test_environment_owned_tasks_are_planned_per_group(tmp_path) -> None:
    TaskEnv.created = itertools.count()
    TaskEnv.resets.clear()
    env_correct.calls.clear()
    script = {0: [4, 2, 0, 2], 1: [2, 2, 2, 2]}  # 4 groups of 4 rows, budget 8: uneven plan and a drop first
    allocator = ScriptedAllocator(
        lambda step, _texts: script[step],
        strategy="uniform",
        predictor="beta",
        n_min=2,
        n_max=GROUP,
        embedder="hashing",
    )
    trainer, policy = _trainer(tmp_path, allocator)
    plans: list[tuple[list[str], list[int]]] = []
    observe = allocator.observe

    def spy(ids, rewards, step, lengths=None):
        plans.append((list(ids), [len(r) for r in rewards]))
        return observe(ids, rewards, step, lengths=lengths)

    allocator.observe = spy  # type: ignore[method-assign]
    trainer.train()

    assert len(plans) == 2
    # each environment was reset exactly once per batch (16 rows), by the plug-in, with TRL's placeholder row
    assert len(TaskEnv.resets) == 2 * 16
    assert Counter(slot for slot, _ in TaskEnv.resets) == {s: 2 for s in range(16)}
    assert all(set(kw) == {"prompt"} for _, kw in TaskEnv.resets)
    # the allocator planned the 4 groups as 4 tasks (observation keys, one per group) and saw its texts
    last = trainer.vip_last
    assert (
        last is not None
        and len(last.prompt_ids) == 4
        and all(re.fullmatch(r"e[0-9a-f]{16}\.0", p) for p in last.prompt_ids)
    )
    # every kept task got exactly its planned episodes, scored on its own environment's task
    scored = [env_correct.calls[: sum(script[0])], env_correct.calls[sum(script[0]) :]]
    assert len(env_correct.calls) == 16
    for step, calls in enumerate(scored):
        tasks = [(g + 4 * step) % 12 for g in range(4)]  # the task of group g at this step
        assert Counter(task for task, _ in calls) == {t: c for t, c in zip(tasks, script[step]) if c}
        assert sorted(plans[step][1]) == sorted(c for c in script[step] if c)
    # the episodes were real: the policy called the tool on the planned tasks (k % 3 != 2 call it)
    assert w.TOOL_CALLS and sum(1 for _, kind in policy.turns if kind == "answer") == 16
    # the tool methods were bound to the pooled instances that were reset (TRL's own environments)
    assert [e.slot for e in trainer.environments] == list(range(16))
    assert "reset" not in vars(trainer.environments[0])  # the cached reset was removed after the step


def test_environment_owned_tasks_with_the_real_allocator(tmp_path) -> None:
    """Same setup with the default ``vip`` strategy and GP predictor: two steps train, each group is a task."""
    TaskEnv.created = itertools.count()
    env_correct.calls.clear()
    allocator = Allocator(strategy="vip", predictor="gp", n_min=2, n_max=GROUP, embedder="hashing")
    trainer, _ = _trainer(tmp_path, allocator)
    trainer.train()
    last = trainer.vip_last
    assert last is not None and int(last.counts.sum()) == 8
    assert len(env_correct.calls) == 2 * 8  # the budget, spent on planned episodes only
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert len(allocator.history) > 0


class RandomTaskEnv(TaskEnv):
    """Draws a task per reset call: the copies of a group get different tasks."""

    def reset(self, **kwargs: Any) -> str:
        self.task = (7 * self.slot + 3 * self.t) % len(TASKS)
        self.t += 1
        return TASKS[self.task]["prompt"][0]["content"]


def test_environment_with_different_tasks_per_group_is_refused(tmp_path) -> None:
    TaskEnv.created = itertools.count()
    allocator = Allocator(strategy="uniform", predictor="beta", n_min=2, n_max=GROUP, embedder="hashing")
    trainer, _ = _trainer(tmp_path, allocator, env=RandomTaskEnv)
    with pytest.raises(ValueError, match="different observations for the 4 copies of one row"):
        trainer.train()


def test_group_keys_and_check() -> None:
    assert group_keys(["a", "a", "b", "b", "a", "a"], 2) == ["a.0", "a.0", "b.0", "b.0", "a.1", "a.1"]
    check_group_tasks(["a", "a", "b", "b"], 2)
    with pytest.raises(ValueError, match="rows 2-3"):
        check_group_tasks(["a", "a", "b", "c"], 2)


# ---------------------------------------------------------------------- a dataset without a prompt column
class CounterEnv:
    """TRL's test environments: reset supplies the prompt (a sum here), one tool per environment."""

    resets: list[dict[str, Any]] = []

    def reset(self, **kwargs: Any) -> str:
        CounterEnv.resets.append(kwargs)
        self.task = 0
        return TASKS[0]["prompt"][0]["content"]

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first addend
            b: the second addend
        """
        return w.add(a, b)


class EchoEnv(CounterEnv):
    def reset(self, **kwargs: Any) -> str:
        CounterEnv.resets.append(kwargs)
        self.task = 1
        return TASKS[1]["prompt"][0]["content"]


def test_dataset_without_prompt_column_routes_to_environments(tmp_path) -> None:
    CounterEnv.resets.clear()
    env_correct.calls.clear()
    data = Dataset.from_dict({"environment": ["counter", "echo"] * 8})  # TRL's routing dataset: no prompt column
    tok = w.chat_tokenizer()
    model = w.tiny_chat_llama(len(tok))
    policy = w.ScriptedPolicy(tok)
    policy.bind(model, TASKS)
    allocator = Allocator(strategy="uniform", predictor="beta", n_min=2, n_max=GROUP, embedder="hashing")
    trainer = VIPGRPOTrainer(
        model=model,
        reward_funcs=env_correct,
        args=_config(tmp_path, per_device_train_batch_size=2, shuffle_dataset=False),
        train_dataset=data,
        processing_class=tok,
        allocator=allocator,
        environment_factory={"counter": CounterEnv, "echo": EchoEnv},
    )
    trainer.train()
    last = trainer.vip_last
    assert last is not None and len(last.prompt_ids) == 2  # the two rows of a batch: two tasks
    assert all(re.fullmatch(r"e[0-9a-f]{16}", p) for p in last.prompt_ids)
    assert int(last.counts.sum()) == 4
    # `environment` is a control field: not forwarded to reset (as TRL); each environment reset once per row
    assert CounterEnv.resets and all("environment" not in kw for kw in CounterEnv.resets)
    assert len(CounterEnv.resets) == 2 * 2 * GROUP
    assert {t for t, _ in env_correct.calls} == {0, 1}
    # both steps planned the same two rows: the allocator recorded the two ids at each of the two steps
    rows = allocator.history.rows()
    assert allocator.history.prompt_ids == sorted(last.prompt_ids, key=allocator.history.prompt_ids.index)
    assert sorted(Counter(rows["prompt_index"].tolist()).values()) == [2, 2]


def test_dataset_without_prompt_and_without_environment_is_refused(tmp_path) -> None:
    tok = w.chat_tokenizer()
    with pytest.raises(ValueError, match="no 'prompt' column"):
        VIPGRPOTrainer(
            model=w.tiny_chat_llama(len(tok)),
            reward_funcs=env_correct,
            args=_config(tmp_path),
            train_dataset=Dataset.from_dict({"question": ["1+1="] * 4}),
            processing_class=tok,
        )


def test_environment_owned_tasks_on_two_processes(tmp_path) -> None:
    """Two processes (torchrun, gloo): each resets its own pooled environments, the groups' observation keys are
    gathered in process order, the plan (6 real rows on one process, 2 on the other, then 4 / 4) is applied to
    every process's groups, and each task gets its planned episodes on the process that holds it."""
    import _trl_env_worker as ew

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", ew.__file__]
    proc = subprocess.run([*cmd, str(tmp_path)], timeout=600, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    d0, d1 = (json.loads((Path(tmp_path) / f"env.rank{r}.json").read_text()) for r in (0, 1))
    assert d0["world"] == d1["world"] == 2 and d0["loss"] is not None
    assert d0["ids"] == d1["ids"] and len(set(d0["ids"])) == 4  # the four groups: four tasks, same on both
    assert d0["counts"] == d1["counts"] == ew.SCRIPT[1]
    for d in (d0, d1):  # each process reset its 8 rows' environments once per step
        assert Counter(d["resets"]) == {s: 2 for s in range(8)}
    # step 0: tasks 0..3 get 4, 2, 0, 2 episodes; step 1: tasks 4..7 get 2, 2, 4, 0 (groups 0, 1 on rank 0)
    assert Counter(d0["scored"]) == {0: 4, 1: 2, 4: 2, 5: 2}
    assert Counter(d1["scored"]) == {3: 2, 6: 4}


# ---------------------------------------------------------------------- TRL's own counter-environment setup
class CounterEnvironment:
    """TRL's ``test_train_with_environment_factory`` environment: ``reset`` returns nothing (the task is the empty
    placeholder prompt), ``increment`` is the tool."""

    def reset(self, **kwargs: Any) -> None:
        self._counter = 0

    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self._counter += step
        return self._counter


def test_trl_counter_environment_setup(tmp_path) -> None:
    """TRL's setup with ``VIPGRPOTrainer``: no dataset, 3 generations, the policy emits a valid tool call, an
    unknown tool, and no call; the plan's 3 rows are the ones generated and TRL's own checks hold (call frequency
    2/3, failure frequency 1/2, the environments' counters 1, 0, 0, the parameters trained)."""
    tok = w.chat_tokenizer()
    model = w.tiny_chat_llama(len(tok))
    first = [
        '<tool_call>\n{"name": "increment", "arguments": {"step": 1}}\n</tool_call><|im_end|>',
        '<tool_call>\n{"name": "decrement", "arguments": {"step": 2}}\n</tool_call><|im_end|>',
        "I won't increment<|im_end|>",
    ]
    calls: list[int] = []

    def generate(input_ids, attention_mask=None, **kw):
        calls.append(int(input_ids.shape[0]))
        texts = first if input_ids.shape[0] == 3 else ["Done!<|im_end|>"] * int(input_ids.shape[0])
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(x) for x in ids)
        comp = [x + [tok.pad_token_id] * (width - len(x)) for x in ids]
        return torch.cat([input_ids, torch.tensor(comp, device=input_ids.device)], dim=1)

    model.generate = generate  # type: ignore[method-assign]

    def reward_len(completions: list, **kwargs: Any) -> list[float]:
        return [float(len(c[-1]["content"] or "")) for c in completions]

    three = dict(per_device_train_batch_size=3, gradient_accumulation_steps=1, num_generations=3, n_max=None)
    args = _config(tmp_path, embedder="hashing", **three)  # n_max: VIP's default, 2 x num_generations
    trainer = VIPGRPOTrainer(
        model=model,
        reward_funcs=reward_len,
        args=args,
        processing_class=tok,
        environment_factory=CounterEnvironment,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.allocator.n_max == 6 and calls[0] == 3  # 6 sampled rows, the planned 3 generated
    last = trainer.state.log_history[-1]
    assert last["train_loss"] is not None
    logs = [h for h in trainer.state.log_history if "tools/call_frequency" in h]
    assert logs[-1]["tools/call_frequency"] == pytest.approx(2 / 3)
    assert logs[-1]["tools/failure_frequency"] == pytest.approx(1 / 2)
    assert [trainer.environments[i]._counter for i in range(3)] == [1, 0, 0]
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
