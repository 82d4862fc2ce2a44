"""Two generation rounds per step for the CPU trainer's two-phase strategies (``vip_two_phase``, ``pilot_commit``).

Per step::

    pilot  = allocator.plan_pilot(ids, prompts, budget = M * n_mean, step, pilot_n)   # round 1
    allocator.observe(ids, pilot_rewards, step, pilot_lengths)
    commit = allocator.plan_commit(step)                                               # round 2: extra rollouts
    allocator.observe(ids, commit_rewards, step, commit_lengths)
    update on each trained prompt's whole group (pilot + commit rollouts), commit.train_mask

Both rounds count in the step's budget (``pilot.counts.sum() + commit.counts.sum() == M * n_mean``), so the
cumulative-rollout axis is the same as every other strategy's. ``pilot_commit`` plans on a candidate pool of
``pool_factor`` x ``prompts_per_step`` prompts (the trainer samples them) and trains on its committed prompts only.
The engine is reached through the :class:`~vipalloc.Allocator` only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from vipalloc import Allocator
from vipalloc.allocator import Plan
from vipalloc.training.tasks import Problem

__all__ = ["TwoPhaseRound", "two_phase_round"]

Rollouts = Callable[[list[Problem], np.ndarray], tuple[list[int], list[list[int]], list[float]]]


@dataclass
class TwoPhaseRound:
    """One two-phase step's plans and rollouts.

    ``owners[r]`` indexes the step's problems (pilot rollouts first, then the commit's); ``per_prompt[i]`` holds
    prompt ``i``'s whole group of rewards. ``train_*`` are the rollouts of the prompts in ``commit.train_mask``,
    with ``train_owners`` indexing ``train_probs``. Seconds: allocator (plan + observe, both phases) and
    generation per round.
    """

    pilot: Plan
    commit: Plan
    owners: list[int]
    comps: list[list[int]]
    rewards: list[float]
    per_prompt: list[list[float]]
    train_probs: list[Problem]
    train_owners: list[int]
    train_comps: list[list[int]]
    train_rewards: list[float]
    alloc_seconds: float
    gen_seconds: tuple[float, float]


def _groups(owners: Sequence[int], rewards: Sequence[float], m: int) -> list[list[float]]:
    """``rewards`` (or any per-rollout value) grouped by owner: ``m`` lists in rollout order."""
    out: list[list[float]] = [[] for _ in range(m)]
    for o, r in zip(owners, rewards):
        out[o].append(r)
    return out


def two_phase_round(
    alloc: Allocator,
    problems: list[Problem],
    rollouts: Rollouts,
    *,
    budget: int,
    step: int,
    pilot_n: int,
    token_budget: float | None = None,
    expected_lengths: Sequence[float] | None = None,
) -> TwoPhaseRound:
    """Run the pilot round, the commit round and the bookkeeping of one step; ``rollouts(problems, counts)``
    generates ``counts[i]`` completions of ``problems[i]`` and returns ``(owners, completions, rewards)``.
    ``token_budget`` (tokens, the whole step's): the pilot's generated tokens come off it and the commit spends
    what is left (the engine's ``plan_pilot(token_budget=)``), ``budget`` staying a cap on rollouts."""
    ids = [p.prompt_id for p in problems]
    texts = [p.prompt for p in problems]
    m = len(problems)
    ta = time.perf_counter()
    if token_budget is None:  # the rollout-budget call exactly as before
        pilot = alloc.plan_pilot(ids, prompts=texts, budget=budget, step=step, pilot_n=pilot_n)
    else:
        pilot = alloc.plan_pilot(
            ids,
            prompts=texts,
            budget=budget,
            step=step,
            pilot_n=pilot_n,
            token_budget=token_budget,
            expected_lengths=expected_lengths,
        )
    t_alloc = time.perf_counter() - ta
    tg = time.perf_counter()
    o1, c1, r1 = rollouts(problems, pilot.counts)
    g1 = time.perf_counter() - tg
    ta = time.perf_counter()
    # lengths: each rollout's generated tokens (the length model learns from both rounds)
    alloc.observe(ids, _groups(o1, r1, m), step=step, lengths=_groups(o1, [len(c) for c in c1], m))
    commit = alloc.plan_commit(step=step)
    t_alloc += time.perf_counter() - ta
    tg = time.perf_counter()
    o2, c2, r2 = rollouts(problems, commit.counts)
    g2 = time.perf_counter() - tg
    ta = time.perf_counter()
    alloc.observe(ids, _groups(o2, r2, m), step=step, lengths=_groups(o2, [len(c) for c in c2], m))
    t_alloc += time.perf_counter() - ta
    owners, comps, rewards = o1 + o2, c1 + c2, r1 + r2
    train = np.flatnonzero(commit.train_mask)
    slot = {int(i): j for j, i in enumerate(train)}
    keep = [k for k, o in enumerate(owners) if o in slot]
    return TwoPhaseRound(
        pilot=pilot,
        commit=commit,
        owners=owners,
        comps=comps,
        rewards=rewards,
        per_prompt=_groups(owners, rewards, m),
        train_probs=[problems[int(i)] for i in train],
        train_owners=[slot[owners[k]] for k in keep],
        train_comps=[comps[k] for k in keep],
        train_rewards=[rewards[k] for k in keep],
        alloc_seconds=t_alloc,
        gen_seconds=(g1, g2),
    )
