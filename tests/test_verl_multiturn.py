"""Multi-turn tool rollouts through verl's own agent-loop code (CPU, local Ray, stub LLM server).

verl's real ``AgentLoopWorkerTQ`` (v1) / ``AgentLoopWorker`` (legacy) and ``ToolAgentLoop`` run in-process with a
scripted server (turn 1: a hermes tool call to a calculator function tool loaded by verl from a file; turn 2: the
answer it read from the tool's output), a stand-in reward worker, and our VIP trainer subclasses driving verl's real
``fit``. Checked: per-prompt ``__rollout_n__`` becomes that many whole multi-turn sessions, the tool is really
called, group sizes are checked against the plan, a failed session is recorded as a short group, and each
episode's generated tokens (tool output excluded) reach the hook and ``Allocator.observe(lengths=...)``.
"""

from __future__ import annotations

import types
from collections import Counter
from typing import Any

import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
from _verl_multiturn_helpers import (  # noqa: E402
    InProcessAgentLoop,
    ScriptedServer,
    StubRewardWorker,
    char_tokenizer,
    question,
    write_model_dir,
    write_tool_file,
)
from test_verl import P_TABLE, compose, group_sizes  # noqa: E402
from test_verl_loops import (  # noqa: E402
    TQ_OVERRIDES,
    PromptDataset,
    StubActorGroupV1,
    fit_overrides,
)

from vipalloc.integrations import verl as plug  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tq_cluster():
    ray = pytest.importorskip("ray")
    tq = pytest.importorskip("transfer_queue")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    tq.init(compose(TQ_OVERRIDES).transfer_queue)
    try:
        yield tq
    finally:
        tq.close()
        ray.shutdown()


def multi_turn_overrides(tmp: Any) -> list[str]:
    model = write_model_dir(str(tmp / "model"))
    tools = write_tool_file(str(tmp / "calc_tools.py"))
    return [
        f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.multi_turn.enable=true",
        f"actor_rollout_ref.rollout.multi_turn.function_tool_path={tools}",
        "actor_rollout_ref.rollout.multi_turn.format=hermes",
        "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=3",
        "actor_rollout_ref.rollout.agent.default_agent_loop=tool_agent",
        "actor_rollout_ref.rollout.prompt_length=256",
        "actor_rollout_ref.rollout.response_length=256",
    ]


def calculator_calls() -> list[str]:
    from verl.tools.function_tool import FUNCTION_TOOL_REGISTRY

    return FUNCTION_TOOL_REGISTRY["calculator"].fn.__globals__["CALLS"]


def expected_tokens(tok: Any, i: int, answer: int) -> int:
    """Tokens the scripted policy generates in one episode of prompt ``i`` (tool call + answer, each + eos)."""
    import json

    call = (
        "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": question(i)[1]}}) + "</tool_call>"
    )
    return len(call) + 1 + len(f"The answer is {answer}.") + 1


def test_v1_multi_turn_tool_sessions_follow_the_plan(tq_cluster, tmp_path, monkeypatch, caplog) -> None:
    """verl's real v1 ``fit`` (sync mode, failed groups kept and padded: verl's default) for 2 steps of 8 prompts."""
    from torchdata.stateful_dataloader import StatefulDataLoader
    from verl.trainer.ppo.v1 import PPOTrainerSync
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ
    from verl.utils.dataset.rl_dataset import collate_fn
    from verl.utils.tracking import Tracking

    tq = tq_cluster
    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr(Tracking, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Tracking, "log", lambda self, data, step, **k: logged.append((step, dict(data))))
    extra = ["trainer.total_training_steps=2", "trainer.save_freq=-1", "actor_rollout_ref.actor.ppo_mini_batch_size=2"]
    config = compose([*fit_overrides(str(tmp_path / "ckpt")), *TQ_OVERRIDES, *multi_turn_overrides(tmp_path), *extra])
    tok = char_tokenizer()
    server = ScriptedServer(tok, P_TABLE, seed=3, fail_first={3: 1})  # one session of prompt 3 fails in step 1
    agent = InProcessAgentLoop(AgentLoopWorkerTQ, config, server, StubRewardWorker(tok))
    calculator_calls().clear()
    try:
        t = plug.vip_v1_trainer_class(PPOTrainerSync)(config)
        t.replay_buffer.poll_interval = 0.02
        t.actor_rollout_wg = StubActorGroupV1(dp=2, tq=tq)
        t.tokenizer = tok
        t.reward_loop_manager = types.SimpleNamespace(reward_loop_worker_handles=[])  # rewards stream with rollouts
        t.checkpoint_manager = types.SimpleNamespace(update_weights=lambda step: None, sleep_replicas=lambda: None)
        t.resource_pool_manager = types.SimpleNamespace(get_n_gpus=lambda: 2)
        t.train_dataloader = StatefulDataLoader(PromptDataset(8), batch_size=8, collate_fn=collate_fn)
        t.train_dataloader_it = None
        t._init_dump_executor()
        t.steps_per_epoch, t.total_training_steps, t.global_steps = 1, 2, 0
        with caplog.at_level("WARNING", logger="vipalloc.integrations.verl"):
            t.fit(agent)
    finally:
        agent.close()

    hook = t._vip_hook
    assert len(agent.submissions) == 2
    for step, sub in zip((1, 2), agent.submissions):
        plan = hook._plans[step] if step in hook._plans else None
        planned = {uid: n for uid, _, n in sub}
        assert sum(planned.values()) == 32 and all(n == 0 or n >= 2 for n in planned.values())
        if plan is not None:  # __rollout_n__ carries the plan, prompt by prompt
            assert [n for _, _, n in sub] == plan.counts.tolist()
    assert {n for _, _, n in agent.submissions[0]} == {4}  # nothing known yet: uniform
    assert {n for _, _, n in agent.submissions[1]} != {4}  # re-allocated from the multi-turn outcomes
    episodes = sum(n for sub in agent.submissions for _, _, n in sub)
    # every planned session ran verl's ToolAgentLoop: a first turn each; all but the failed one called the tool
    assert server.turns["first"] == episodes == 64 and server.failed == 1
    assert server.turns["tool"] == episodes - 1 == len(calculator_calls())
    planned_calls = Counter(question(idx)[1] for sub in agent.submissions for _, idx, n in sub for _ in range(n))
    assert Counter(calculator_calls()) == planned_calls - Counter({question(3)[1]: 1})  # the tool saw each episode
    assert sorted(server.seen_tool_answers) == sorted(str(eval(e)) for e in calculator_calls())  # noqa: S307
    # trained groups: the planned sizes, the failed session's group one short (verl pads it; padding is not observed)
    for sub, upd in zip(agent.submissions, t.actor_rollout_wg.batches):
        sizes = group_sizes(upd["uid"])
        for uid, idx, n in sub:
            if n:
                assert sizes[uid] >= n - (1 if (sub is agent.submissions[0] and idx == 3) else 0)
    agg = hook.allocator.history.aggregates()
    assert int(agg.trials.sum()) == episodes - 1  # the failed session is not an outcome; its group is recorded short
    assert "fewer rollouts than planned" in caplog.text
    # generated tokens per episode: the policy's two turns, tool output and chat scaffolding excluded
    assert len(hook.episode_tokens) == sum(n > 0 for sub in agent.submissions for _, _, n in sub)  # dropped: none
    for (_step, pid), toks in hook.episode_tokens.items():
        i = int(pid)
        assert all(t_ in {expected_tokens(tok, i, question(i)[2]), expected_tokens(tok, i, question(i)[2] + 1)}
                   for t_ in toks.tolist())  # fmt: skip
    assert len(hook.episode_tokens[(1, "3")]) == 3  # the failed session has no episode
    # ... and the same lengths reached Allocator.observe (the history's token columns): 63 episodes, their tokens
    rows = hook.allocator.history.rows()
    assert int(rows["token_rollouts_success"].sum() + rows["token_rollouts_fail"].sum()) == episodes - 1
    recorded = float(rows["tokens_success"].sum() + rows["tokens_fail"].sum())
    assert recorded == sum(int(v.sum()) for v in hook.episode_tokens.values())
    vip_logs = [d for _, d in logged if "vip/budget" in d]
    assert len(vip_logs) == 2 and vip_logs[0]["vip/rollouts_generated"] == 31 and vip_logs[1]["vip/budget"] == 32
