"""VIP in TRL's AsyncGRPOTrainer: ``VIPRolloutLoop`` (TRL's own ``_AsyncRolloutLoop`` with three methods overridden)
driven by TRL's real generate and score loops against a stand-in vLLM server whose replies arrive with uneven
delays, so groups come back out of order and late while the policy version advances.

Checked: each chunk's plan spends exactly its budget and is made with the posterior of the outcomes already back;
every scored group has exactly its planned number of real conversations (skip rows never reach the server or the
training queue); outcomes are observed at their chunk's step whatever the arrival order, with the policy version at
dispatch and arrival; the trainer refuses what it cannot honour before anything starts.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import queue
import random
import re
import threading
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("trl")
pytest.importorskip("aiohttp")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from _trl_tools_worker import chat_tokenizer  # noqa: E402
from accelerate.state import PartialState  # noqa: E402
from datasets import Dataset  # noqa: E402

from vipalloc import Allocator  # noqa: E402
from vipalloc.integrations.trl.async_trainer import SKIP_KEY, VIPRolloutLoop  # noqa: E402

N_PROMPTS = 16


def _dataset() -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"task {k}"}] for k in range(N_PROMPTS)],
            "prompt_id": [f"p{k}" for k in range(N_PROMPTS)],
            "level": [k % 4 for k in range(N_PROMPTS)],
        }
    )


def solved(completions, level, **kwargs) -> list[float]:
    """Level 0: always right, 1: never, 2 and 3: right when the stand-in said "yes"."""
    out = []
    for comp, lv in zip(completions, level):
        text = comp[-1].get("content") or ""
        out.append(1.0 if lv == 0 else 0.0 if lv == 1 else float("yes" in text))
    return out


class StandInServerLoop(VIPRolloutLoop):
    """Answers ``/v1/completions`` itself: a short reply after a delay that depends on the prompt and on chance."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rng = random.Random(0)
        self.requests: list[str] = []

    async def _generate_one_turn(self, prompt_ids):
        text = self.tokenizer.decode(prompt_ids)
        assert SKIP_KEY not in text
        self.requests.append(text)
        k = int(text.rsplit("task ", 1)[1].split("<")[0])
        await asyncio.sleep((0.03 if k % 3 == 0 else 0.002) + self.rng.random() * 0.01)  # uneven, out of order
        reply = "yes" if self.rng.random() < 0.5 else "no"
        ids = self.tokenizer(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
        return ids, [-0.5] * len(ids)


def _loop(**extra) -> StandInServerLoop:
    PartialState()  # the loop logs through accelerate (TRL's child process calls it first too)
    tok = chat_tokenizer()
    version = SimpleNamespace(value=0)
    dataset = extra.pop("dataset", None)
    loop = StandInServerLoop(
        vip_allocator=Allocator(strategy="vip", predictor="beta", n_min=2, n_max=8, embedder="hashing", seed=0),
        vip_mean_n=4,
        vip_chunk_prompts=4,
        model_name="stand-in",
        dataset=_dataset() if dataset is None else dataset,
        reward_funcs=[solved],
        processing_class=tok,
        eos_token_ids=[tok.eos_token_id],
        rollout_buffer=queue.Queue(),
        model_version_value=version,
        heartbeat_value=SimpleNamespace(value=0.0),
        failed_event=threading.Event(),
        exception_info_queue=queue.Queue(),
        metrics_queue=queue.Queue(),
        num_generations=8,
        max_inflight_tasks=12,
        max_tokens=8,
        **extra,
    )
    loop.version = version
    return loop


async def _drive(loop: StandInServerLoop, groups: int) -> None:
    stop = asyncio.Event()

    async def steps():  # the trainer: a new policy version every 20 ms
        while not stop.is_set():
            await asyncio.sleep(0.02)
            loop.version.value += 1

    async def until_done():
        while len(loop.vip_log) < groups:
            await asyncio.sleep(0.005)
        stop.set()

    await asyncio.wait_for(
        asyncio.gather(loop._generate_loop(stop), loop._score_loop(stop), steps(), until_done()), timeout=60
    )


def test_chunks_are_planned_observed_out_of_order_and_sized(tmp_path) -> None:
    loop = _loop(vip_state_path=str(tmp_path / "vip_allocator.json"))
    try:
        asyncio.run(_drive(loop, groups=24))
    finally:
        loop._tool_pool.shutdown(wait=False, cancel_futures=True)
    log = loop.vip_log
    alloc = loop.allocator
    # every scored group holds exactly its planned conversations; the training queue got one sample per conversation
    samples = []
    while not loop.rollout_buffer.empty():
        samples.append(loop.rollout_buffer.get_nowait())
    per_group = Counter(s.group_id for s in samples)
    assert sorted(per_group.values()) == sorted(r.planned for r in log)
    assert all(r.rewards.size == r.planned and r.successes.size == r.planned for r in log)
    assert all(r.tokens.min() >= 2 for r in log)  # "no"/"yes" + end-of-turn: generated tokens per episode
    # skip rows never reached the server: requests = real conversations started (a few still in flight at stop)
    assert sum(r.planned for r in log) <= len(loop.requests)
    # plans: budget per chunk, sizes within bounds, drops allowed; later chunks use outcomes already back
    steps = sorted({r.step for r in log})
    assert len(steps) >= 3
    history_steps = {step for step, *_ in alloc.history.iter_steps()}
    assert set(steps) <= history_steps  # observed at the chunk's own step
    orders = [r.step for r in log]
    assert any(a > b for a, b in zip(orders, orders[1:]))  # a later chunk's group arrived before an earlier one's
    assert any(r.version_observed > r.version_dispatched for r in log)  # late: the policy moved on meanwhile
    # the latest posterior: prompts of level 0 (always solved) and 1 (never) get fewer rollouts once seen
    by_level: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for r in log:
        k = int(r.prompt_id[1:])
        if r.step >= 4:  # the dataset (16 prompts, 4 per chunk) has been seen once
            by_level[min(k % 4, 2)].append(r.planned)
    certain = by_level[0] + by_level[1]  # pooled: a prompt seen all-right or all-wrong (zero-variance groups)
    assert by_level[2] and (not certain or np.mean(by_level[2]) > np.mean(certain))
    # the allocator was saved after each fully observed chunk; it plans exactly as the live one
    saved = Allocator.load(str(tmp_path / "vip_allocator.json"))
    assert {s for s, *_ in saved.history.iter_steps()} <= history_steps and list(saved.history.iter_steps())
    metrics = []
    while not loop._metrics_queue.empty():
        metrics.append(loop._metrics_queue.get_nowait())
    assert any("vip/observe_staleness" in m for m in metrics)


def test_each_chunk_spends_its_budget() -> None:
    loop = _loop()
    try:
        it = loop._repeat_iterator()
        rows = [next(it) for _ in range(8 * 12)]
    finally:
        loop._tool_pool.shutdown(wait=False, cancel_futures=True)
    for record in loop._vip_groups.values():
        assert 2 <= record[2] <= 8
    plans = [c.plan for c in loop.vip_chunks.values()]
    assert plans and all(int(p.counts.sum()) == 4 * 4 for p in plans)  # mean_n x chunk prompts
    real = Counter(gid for gid, row in rows if not row["prompt"][-1].get(SKIP_KEY))
    width = Counter(gid for gid, _ in rows)
    assert set(width.values()) == {8}  # TRL closes a group after num_generations = n_max rows
    assert all(real[g] == loop._vip_groups[g][2] for g in real)
    pickle.dumps(loop.allocator)  # AsyncRolloutWorker pickles it into its spawned child


def test_async_trainer_refusals(tmp_path) -> None:
    from trl.experimental.async_grpo import AsyncGRPOConfig

    from vipalloc.integrations.trl import VIPAsyncGRPOTrainer

    args = AsyncGRPOConfig(output_dir=str(tmp_path), max_steps=2, num_generations=4, use_cpu=True, bf16=False)
    with pytest.raises(NotImplementedError, match="VIP is the rollout worker"):
        VIPAsyncGRPOTrainer("m", solved, args, _dataset(), rollout_worker=object())
    with pytest.raises(NotImplementedError, match="needs a train_dataset"):
        VIPAsyncGRPOTrainer("m", solved, args, None)
    with pytest.raises(NotImplementedError, match="pilot-then-commit"):
        two = Allocator(strategy="vip_two_phase", predictor="beta", n_min=2, n_max=8, embedder="hashing")
        VIPAsyncGRPOTrainer("m", solved, args, _dataset(), allocator=two)
    with pytest.raises(ValueError, match="raise n_max of the allocator to at least 4"):
        VIPAsyncGRPOTrainer("m", solved, args, _dataset(), allocator=Allocator(n_min=2, n_max=3, embedder="hashing"))
    epochs = AsyncGRPOConfig(output_dir=str(tmp_path), num_generations=4, use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="max_steps"):
        VIPAsyncGRPOTrainer("m", solved, epochs, _dataset())


def test_resume_position_skips_positions_without_a_group(tmp_path) -> None:
    """TRL resumes at ``start + first untrained group``; with VIP, positions the plans dropped never train, so the
    resume position is the first one that is neither trained nor listed as skipped by the loop."""
    from vipalloc.integrations.trl.async_trainer import resume_position

    path = tmp_path / "skipped.txt"
    path.write_text("1\n4\n")
    assert resume_position({0, 2, 3}, str(path)) == 5
    assert resume_position({0, 2}, str(path)) == 3
    assert resume_position({0, 2, 3}, None) == 1  # without the list: TRL's own count, stopping at the drop
    assert resume_position(set(), str(tmp_path / "missing.txt")) == 0


def test_rows_without_a_prompt_column_are_planned_and_skipped_by_marker() -> None:
    """A dataset whose environment supplies the prompt (no ``prompt`` column): rows keyed by the whole row, skip rows
    carry TRL's empty placeholder prompt with the marker; no KeyError."""
    from vipalloc.integrations.trl.async_trainer import is_skip

    data = Dataset.from_dict({"environment": ["counter", "echo", "count", "shout"], "level": [0, 1, 2, 3]})
    loop = _loop(dataset=data)
    try:
        rows = [next(it) for it in [loop._repeat_iterator()] for _ in range(4 * 8)]
    finally:
        loop._tool_pool.shutdown(wait=False, cancel_futures=True)
    plan = loop.vip_chunks[0].plan
    assert int(plan.counts.sum()) == 16 and all(re.fullmatch(r"h[0-9a-f]{16}", p) for p in plan.prompt_ids)
    real = [row for _, row in rows if "prompt" not in row]
    skips = [row for _, row in rows if "prompt" in row]
    assert len(real) == 16 and all(is_skip(row["prompt"]) for row in skips)
    assert all(row["prompt"][-1]["content"] == "" for row in skips)
