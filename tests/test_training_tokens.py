"""The CPU trainer in tokens (issue 20): lengths reach the allocator, token-budget plans, the length-growing task,
the demo report's lead, and the refusals at config validation."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _training_helpers import tiny
from pydantic import ValidationError

from vipalloc.training.config import TrainConfig, label_options
from vipalloc.training.tasks import (
    Problem,
    completion_tokens_bound,
    corrupt_target,
    final_answer,
    make_problems,
    partial_sums,
    reward,
    target,
)
from vipalloc.training.trainer import Trainer


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One warm-up cache for the module's tiny runs (the same config key: trained once)."""
    return tmp_path_factory.mktemp("warm")


def _spy(tr: Trainer) -> tuple[list[dict[str, Any]], list[list[list[int]]]]:
    """Record every observe call's arguments and every generated batch's completions."""
    calls: list[dict[str, Any]] = []
    batches: list[list[list[int]]] = []
    observe, rollouts = tr.alloc.observe, tr._rollouts

    def spy_observe(ids, rewards, step, lengths=None):  # type: ignore[no-untyped-def]
        calls.append({"ids": list(ids), "rewards": [list(r) for r in rewards], "lengths": lengths, "step": step})
        return observe(ids, rewards, step, lengths=lengths)

    def spy_rollouts(problems, counts):  # type: ignore[no-untyped-def]
        owners, comps, rewards = rollouts(problems, counts)
        batches.append([[o, len(c)] for o, c in zip(owners, comps)])
        return owners, comps, rewards

    tr.alloc.observe = spy_observe  # type: ignore[method-assign]
    tr._rollouts = spy_rollouts  # type: ignore[method-assign]
    return calls, batches


def test_lengths_reach_observe_and_equal_the_sampled_completion_lengths(tmp_path: Path, warm: Path) -> None:
    cfg = tiny(tmp_path / "run", warm, steps=3, strategy="vip")
    tr = Trainer(cfg)
    calls, batches = _spy(tr)
    tr.run()
    assert len(calls) == 3 and len(batches) == 3
    total = 0
    for call, batch, rec in zip(calls, batches, [m for m in tr.metrics if m["step"] >= 0]):
        lengths = call["lengths"]
        assert lengths is not None and len(lengths) == len(call["ids"])
        expect: list[list[int]] = [[] for _ in call["ids"]]
        for owner, n_tok in batch:
            expect[owner].append(n_tok)
        assert [list(x) for x in lengths] == expect  # the sampled lengths, in rollout order, grouped by prompt
        assert [len(x) for x in lengths] == [len(r) for r in call["rewards"]]
        flat = [n for g in expect for n in g]
        assert all(1 <= n <= cfg.max_new_tokens for n in flat)
        total += sum(flat)
        assert rec["tokens_used"] == sum(flat) == rec["vip/tokens_generated"]
        assert rec["cum_tokens"] == total
        assert 0.0 <= rec["vip/frac_truncated"] <= 1.0
        assert rec["cum_seconds"] > 0
    assert tr.metrics[0]["cum_tokens"] == 0


def test_two_phase_rounds_observe_lengths(tmp_path: Path, warm: Path) -> None:
    cfg = tiny(tmp_path / "run", warm, steps=1, strategy="vip_two_phase", n_mean=4)
    tr = Trainer(cfg)
    calls, batches = _spy(tr)
    tr.run()
    assert len(calls) == 2  # the pilot round, then the commit round
    for call, batch in zip(calls, batches):
        got = sorted(n for g in call["lengths"] for n in g)
        assert got == sorted(n for _, n in batch)
    assert tr.metrics[-1]["cum_tokens"] == sum(n for b in batches for _, n in b)


@pytest.mark.parametrize("cap", [1.0, None])
def test_token_mode_uniform_plans_within_uniforms_tokens_after_step_0(
    tmp_path: Path, warm: Path, cap: float | None
) -> None:
    cfg = tiny(tmp_path / "run", warm, steps=4, strategy="vip", token_budget="uniform", token_rollout_cap=cap)
    tr = Trainer(cfg)
    tr.run()
    steps = [m for m in tr.metrics if m["step"] >= 0]
    assert "vip/token_budget" not in steps[0]  # no length observed yet: planned by rollouts
    assert steps[0]["rollouts_used"] == cfg.budget
    for rec in steps[1:]:
        assert rec["vip/tokens_planned"] <= rec["vip/token_budget"] * (1 + 1e-9)
        if cap is not None:
            assert rec["rollouts_used"] <= cfg.budget  # the rollout budget stays a cap
        assert rec["vip/token_budget"] > 0


def test_token_mode_fixed_budget_holds_from_step_0(tmp_path: Path, warm: Path) -> None:
    cap = 150.0  # 8 prompts x n_min 2 x 6 tokens = 96 at least: the engine refuses a budget below that
    cfg = tiny(tmp_path / "run", warm, steps=3, strategy="vip", token_budget=cap)
    assert cfg.label == "vip-tokens150"
    tr = Trainer(cfg)
    tr.run()
    steps = [m for m in tr.metrics if m["step"] >= 0]
    for rec in steps:
        assert rec["vip/token_budget"] == cap
        assert rec["vip/tokens_planned"] <= cap * (1 + 1e-9)
    # step 0 predicts max_new_tokens a rollout, so what it generates cannot exceed the cap either
    assert steps[0]["tokens_used"] <= cap


@pytest.mark.parametrize("strategy", ["vip_two_phase", "pilot_commit"])
def test_two_phase_token_mode_spends_the_pilot_then_the_rest(tmp_path: Path, warm: Path, strategy: str) -> None:
    cfg = tiny(tmp_path / "run", warm, steps=3, strategy=strategy, token_budget="uniform")
    tr = Trainer(cfg)
    tr.run()
    steps = [m for m in tr.metrics if m["step"] >= 0]
    assert "vip/token_budget" not in steps[0]  # step 0: no lengths yet, planned by rollouts
    for rec, plan in zip(steps[1:], tr.plans[1:]):
        budget = rec["vip/token_budget"]
        assert budget > 0 and rec["rollouts_used"] <= cfg.budget
        commit = np.asarray(plan["counts"]) - np.asarray(plan["pilot"])  # the plan's counts: pilot + commit
        assert rec["pilot_tokens"] > 0 and commit.min() >= 0
        assert rec["tokens_used"] >= rec["pilot_tokens"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"strategy": "dapo", "token_budget": "uniform"}, "DAPO"),
        ({"strategy": "vip_authors", "token_budget": "uniform"}, "refuses"),
        ({"strategy": "vip", "token_budget": "half"}, "token_budget"),
        ({"strategy": "vip", "token_budget": -3.0}, "number of tokens > 0"),
        ({"task": "chain_sum_steps", "levels": [[4, 1]], "max_new_tokens": 6}, "max_new_tokens"),
    ],
)
def test_refusals_fire_at_config_validation(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        TrainConfig.model_validate(options)


def test_labels_round_trip() -> None:
    assert label_options("vip") == {"strategy": "vip"}
    assert label_options("vip-tokens") == {"strategy": "vip", "token_budget": "uniform"}
    assert label_options("knapsack-tokens2500") == {"strategy": "knapsack", "token_budget": 2500.0}
    assert label_options("vip-tokens-nocap") == {
        "strategy": "vip",
        "token_budget": "uniform",
        "token_rollout_cap": None,
    }
    assert label_options("vip-tokens-cap1.5")["token_rollout_cap"] == 1.5
    with pytest.raises(ValueError, match="token mode"):
        label_options("vip-nocap")
    for label in ("vip", "vip-tokens", "uniform-tokens10000", "vip-tokens-nocap", "knapsack-tokens-cap2"):
        assert TrainConfig.model_validate(label_options(label)).label == label
    with pytest.raises(ValueError, match="unknown strategy"):
        label_options("vipp-tokens")


def test_steps_task_targets_grow_with_the_chain_and_reward_the_final_answer() -> None:
    p = Problem("x", "42-25-73=", "-56", 0)
    assert partial_sums(p.prompt) == [17, -56]
    assert target(p, "chain_sum") == "-56" and target(p, "chain_sum_steps") == "17 -56"
    assert reward("17 -56", "-56", "chain_sum_steps") == 1.0
    assert reward("99 -56", "-56", "chain_sum_steps") == 1.0  # exact match on the final answer only
    assert reward("17 -5", "-56", "chain_sum_steps") == 0.0
    assert reward("", "-56", "chain_sum_steps") == 0.0
    assert reward("17 -56", "-56", "chain_sum") == 0.0  # the default task is unchanged
    assert final_answer(" 3 8 ", "chain_sum_steps") == "8"
    rng = random.Random(0)
    lengths: dict[int, list[int]] = {}
    for q in make_problems(60, seed=3, levels=((2, 1), (3, 1), (4, 1))):
        text = target(q, "chain_sum_steps")
        assert text.split(" ")[-1] == q.answer and reward(text, q.answer, "chain_sum_steps") == 1.0
        assert len(text) + 1 <= completion_tokens_bound(q.level + 2, 1, "chain_sum_steps")
        bad = corrupt_target(q, "chain_sum_steps", rng)
        assert reward(bad, q.answer, "chain_sum_steps") == 0.0 and len(bad.split(" ")) == q.level + 1
        lengths.setdefault(q.level, []).append(len(text))
    means = [np.mean(lengths[lv]) for lv in sorted(lengths)]
    assert means[0] < means[1] < means[2]  # longer chains, longer targets


def test_steps_task_trains_and_longer_chains_generate_more_tokens(tmp_path: Path, warm: Path) -> None:
    cfg = tiny(
        tmp_path / "run",
        warm,
        steps=2,
        task="chain_sum_steps",
        levels=[[2, 1], [4, 1]],
        max_new_tokens=12,
        warmup={"steps": 150, "batch_size": 32, "threads": 1},
        strategy="uniform",
    )
    tr = Trainer(cfg)
    seen: list[tuple[int, int, float]] = []  # (level, tokens, reward)
    rollouts = tr._rollouts

    def spy(problems, counts):  # type: ignore[no-untyped-def]
        owners, comps, rewards = rollouts(problems, counts)
        for o, c, r in zip(owners, comps, rewards):
            seen.append((problems[o].level, len(c), r))
            # the reward is exact match on the completion's final answer
            assert r == float(final_answer(tr.tok.decode(c), "chain_sum_steps") == problems[o].answer)
        return owners, comps, rewards

    tr._rollouts = spy  # type: ignore[method-assign]
    tr.run()
    short = np.mean([n for lv, n, _ in seen if lv == 0])
    long = np.mean([n for lv, n, _ in seen if lv == 1])
    assert long > short + 2  # 4-term chains write three partial sums, 2-term chains one


@pytest.mark.parametrize("token_budget", ["uniform", 400.0])
def test_token_mode_predicts_once_a_step(tmp_path: Path, warm: Path, token_budget: Any) -> None:
    """The budget policy prices the step from the same forecast the plan uses: one prediction a step."""
    cfg = tiny(tmp_path / "run", warm, steps=3, strategy="vip", token_budget=token_budget)
    tr = Trainer(cfg)
    pred = tr.alloc.predictor
    inner = pred.predict
    calls: list[int] = []

    def counted(ids: Any, step: int) -> Any:
        calls.append(step)
        return inner(ids, step)

    pred.predict = counted
    tr.run()
    assert calls == [0, 1, 2]
    assert [m.get("vip/token_budget") is not None for m in tr.metrics[1:]][1:] == [True, True]
