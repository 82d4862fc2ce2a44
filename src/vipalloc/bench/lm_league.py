"""Parts (b) and (c) of ``vipalloc bench lm``: a short GRPO league on SmolLM2 (LoRA) at equal rollouts per step,
and the next-step Brier of the ``gp``, ``beta`` and ``empirical`` predictors along its runs.

One run = one (strategy, seed): fresh LoRA adapters (seeded), a fixed set of training prompts visited in batches
(every prompt comes back every ``train_prompts / batch`` steps, so predictors have history), ``Allocator.plan`` for
the counts (two-phase strategies: ``plan_pilot`` / ``observe`` / ``plan_commit``), one batched ``generate`` per
round, the Dr.GRPO loss ``-(1/M) sum_i (1/n_i) sum_j A_ij log pi(y_ij | x_i)``, Adam. Held-out mean@k on the same
prompts with the same sampling seeds for every strategy of a seed. Each finished run is one JSON file: the league
resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vipalloc import Allocator
from vipalloc.bench.lm_model import LMProblem, answer_reward, chain_sum_problems
from vipalloc.bench.lm_pool import LMPolicy

__all__ = ["LeagueConfig", "RunResult", "load_runs", "run_league", "run_one"]

BRIER_PREDICTORS = ("gp", "beta", "empirical")


@dataclass(frozen=True)
class LeagueConfig:
    steps: int
    batch: int  # prompts per step
    mean_n: int  # rollouts per prompt on average (the budget is batch * mean_n)
    n_min: int
    n_max: int
    train_prompts: int
    eval_prompts: int
    eval_k: int
    eval_every: int
    max_new_tokens: int
    temperature: float
    lr: float
    levels: tuple[tuple[int, int], ...]
    predictor: str = "gp"


@dataclass
class RunResult:
    strategy: str
    seed: int
    steps: list[int] = field(default_factory=list)
    rollouts: list[int] = field(default_factory=list)  # cumulative rollouts after each step
    tokens: list[int] = field(default_factory=list)  # cumulative generated completion tokens
    train_success: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_mean_at_k: list[float] = field(default_factory=list)
    counts: list[list[int]] = field(default_factory=list)
    brier: dict[str, list[float]] = field(default_factory=dict)  # predictor -> per-step Brier (seen prompts only)
    brier_n: list[int] = field(default_factory=list)  # rollouts of seen prompts per step
    seconds: float = 0.0


def _problems(cfg: LeagueConfig, seed: int) -> tuple[list[LMProblem], list[LMProblem]]:
    train = chain_sum_problems(cfg.train_prompts, 100 + seed, levels=cfg.levels, tag=f"tr{seed}-")
    held = chain_sum_problems(cfg.eval_prompts, 500 + seed, levels=cfg.levels, tag=f"ev{seed}-")
    return train, held


def _eval(policy: LMPolicy, held: Sequence[LMProblem], cfg: LeagueConfig, seed: int, step: int) -> float:
    import torch

    torch.manual_seed(10_000 * seed + step)  # the same sampling seeds for every strategy of this seed
    rows = [p for p in held for _ in range(cfg.eval_k)]
    _, texts = policy.sample_rows([p.question for p in rows], cfg.max_new_tokens, cfg.temperature)
    return float(np.mean([answer_reward(t, p.answer) for t, p in zip(texts, rows)]))


def _generate(
    policy: LMPolicy, probs: Sequence[LMProblem], counts: Sequence[int], cfg: LeagueConfig
) -> tuple[list[list[list[int]]], list[np.ndarray], int]:
    rows = [i for i, c in enumerate(counts) for _ in range(int(c))]
    comps, texts = policy.sample_rows([probs[i].question for i in rows], cfg.max_new_tokens, cfg.temperature)
    out_c: list[list[list[int]]] = [[] for _ in probs]
    out_r: list[list[float]] = [[] for _ in probs]
    for i, c, t in zip(rows, comps, texts):
        out_c[i].append(c)
        out_r[i].append(answer_reward(t, probs[i].answer))
    return out_c, [np.array(r) for r in out_r], sum(len(c) for c in comps)


def _update(policy: LMPolicy, opt: Any, probs: Sequence[LMProblem], comps: Any, rewards: Any, micro: int = 16) -> None:
    """One Dr.GRPO step: ``-(1/M) sum_i (1/n_i) sum_j A_ij log pi(y_ij)`` (micro-batched backward)."""
    rows: list[tuple[list[int], list[int], float]] = []
    m = len(probs)
    for prob, cs, r in zip(probs, comps, rewards):
        if r.size < 2 or r.min() == r.max():
            continue
        adv = (r - r.mean()) / (r.size * m)
        prompt = policy.prompt_ids(prob.question)
        rows.extend((prompt, c, float(a)) for c, a in zip(cs, adv))
    if not rows:
        return
    policy.model.train()
    opt.zero_grad()
    for k in range(0, len(rows), micro):
        part = rows[k : k + micro]
        lp = policy.seq_logprobs([p for p, _, _ in part], [c for _, c, _ in part])
        import torch

        w = torch.tensor([a for _, _, a in part], device=lp.device)
        (-(w * lp).sum()).backward()
    opt.step()


def run_one(
    strategy: str, seed: int, cfg: LeagueConfig, device: str = "cpu", progress: Callable[[str], None] = print
) -> RunResult:
    import torch

    t0 = time.perf_counter()
    policy = LMPolicy(seed, device)
    opt = torch.optim.Adam(policy.params, lr=cfg.lr)
    train, held = _problems(cfg, seed)
    alloc = Allocator(strategy=strategy, predictor=cfg.predictor, n_min=cfg.n_min, n_max=cfg.n_max, seed=seed)
    shadows = {
        name: Allocator(strategy="uniform", predictor=name, n_min=cfg.n_min, n_max=cfg.n_max, seed=seed)
        for name in BRIER_PREDICTORS
    }
    two_phase = strategy in ("vip_two_phase", "pilot_commit")
    res = RunResult(strategy, seed, brier={k: [] for k in BRIER_PREDICTORS})
    seen: set[str] = set()
    total_r = total_t = 0
    res.eval_steps.append(0)
    res.eval_mean_at_k.append(_eval(policy, held, cfg, seed, 0))
    for step in range(cfg.steps):
        start = (step * cfg.batch) % len(train)
        probs = [train[(start + i) % len(train)] for i in range(cfg.batch)]
        ids, texts = [p.prompt_id for p in probs], [p.question for p in probs]
        budget = cfg.batch * cfg.mean_n
        # the shadows plan n_max each (they only predict), so that any group the run generates can be observed
        preds = {k: a.plan(ids, texts, cfg.batch * cfg.n_max, step=step).p_mean for k, a in shadows.items()}
        torch.manual_seed(1_000_000 * seed + 1000 * step + 7)
        if two_phase:
            pilot = alloc.plan_pilot(ids, texts, budget, step=step, pilot_n=2)
            comps, rewards, toks = _generate(policy, probs, pilot.counts, cfg)
            kept = [i for i, c in enumerate(pilot.counts) if c > 0]
            alloc.observe([ids[i] for i in kept], [rewards[i] for i in kept], step)
            commit = alloc.plan_commit(step=step)
            c2, r2, t2 = _generate(policy, probs, commit.counts, cfg)
            extra = [i for i, c in enumerate(commit.counts) if c > 0]
            alloc.observe([ids[i] for i in extra], [r2[i] for i in extra], step)
            comps = [a + b for a, b in zip(comps, c2)]
            rewards = [np.concatenate([a, b]) for a, b in zip(rewards, r2)]
            counts = commit.group_sizes
            toks += t2
        else:
            plan = alloc.plan(ids, texts, budget, step=step)
            comps, rewards, toks = _generate(policy, probs, plan.counts, cfg)
            kept = [i for i, c in enumerate(plan.counts) if c > 0]
            alloc.observe([ids[i] for i in kept], [rewards[i] for i in kept], step)
            counts = plan.counts
        # next-step Brier on prompts seen before (rollout-weighted, binary outcomes), from the shadow predictors
        mask = [pid in seen for pid in ids]
        outcomes = [(i, r) for i, r in enumerate(rewards) if mask[i] and r.size]
        res.brier_n.append(int(sum(r.size for _, r in outcomes)))
        for name, pm in preds.items():
            sq = [float(((pm[i] - r) ** 2).sum()) for i, r in outcomes]
            res.brier[name].append(sum(sq) / res.brier_n[-1] if res.brier_n[-1] else float("nan"))
        for a in shadows.values():  # the shadows see the same rollouts (one group per prompt)
            a.observe([ids[i] for i, r in enumerate(rewards) if r.size], [r for r in rewards if r.size], step)
        seen.update(ids)
        _update(policy, opt, probs, comps, rewards)
        total_r += int(sum(r.size for r in rewards))
        total_t += toks
        res.steps.append(step + 1)
        res.rollouts.append(total_r)
        res.tokens.append(total_t)
        res.counts.append([int(c) for c in counts])
        res.train_success.append(float(np.mean(np.concatenate(rewards))))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            res.eval_steps.append(step + 1)
            res.eval_mean_at_k.append(_eval(policy, held, cfg, seed, step + 1))
        progress(
            f"league: {strategy} seed {seed} step {step + 1}/{cfg.steps}: counts {res.counts[-1]} "
            f"success {res.train_success[-1]:.2f}"
            + (f" held-out mean@{cfg.eval_k} {res.eval_mean_at_k[-1]:.3f}" if res.eval_steps[-1] == step + 1 else "")
        )
    res.seconds = time.perf_counter() - t0
    return res


def run_league(
    out: Path,
    strategies: Sequence[str],
    seeds: Sequence[int],
    cfg: LeagueConfig,
    device: str = "cpu",
    progress: Callable[[str], None] = print,
) -> list[RunResult]:
    """Every (seed, strategy) not yet on disk under ``out`` (seed-major, so pairs complete first); all results."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in seeds:
        for strat in strategies:
            path = out / f"{strat}-seed{seed}.json"
            if path.is_file():
                data = json.loads(path.read_text())
                results.append(RunResult(**data))
                continue
            res = run_one(strat, seed, cfg, device, progress)
            path.write_text(json.dumps(asdict(res)))
            results.append(res)
    return results


def load_runs(folder: Path, strategies: Sequence[str]) -> list[RunResult]:
    """Every finished run of ``strategies`` in ``folder``, by seed then strategy."""
    found = []
    for strat in strategies:
        for path in folder.glob(f"{strat}-seed*.json"):
            seed = path.stem.rsplit("-seed", 1)[1]
            if seed.isdigit():
                found.append((int(seed), strategies.index(strat), RunResult(**json.loads(path.read_text()))))
    return [r for _, _, r in sorted(found, key=lambda t: (t[0], t[1]))]
