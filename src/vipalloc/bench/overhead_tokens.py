"""The token-budget speed check of ``vipalloc bench overhead``: ``plan()`` time at M prompts under a token budget
over the same plan under a rollout budget, measured in the same run on the same allocator state.

Set-up: a ``vip`` allocator with the ``gp`` predictor ingests a history (the overhead bench passes its synthetic
one, :func:`vipalloc.bench.overhead.run_token_speed`), plans one batch of ``m`` new prompts by rollouts and observes it
*with lengths* (lognormal, longer for failures and for low-success prompts, as in
:mod:`vipalloc.bench.sim_lengths`), so the length model has data. At the next step it plans once to warm the GP
fit's cache, then alternates ``repeats`` times ``plan(budget=8 m)`` and
``plan(token_budget=Allocator.uniform_tokens(ids, 8))``; the figure is the ratio of the medians (wall time of the
whole ``plan()`` call, and of its solve stage), with the token plan's certified optimality gap.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

__all__ = ["token_speed", "token_speed_lines"]


def token_speed(
    hist: Any,
    texts: list[str],
    repeats: int = 5,
    n_mean: int = 8,
    embedder: str = "hashing",
    seed: int = 0,
) -> dict[str, Any]:
    """Median ``plan()`` seconds under a rollout and under a token budget (same state) for a batch of
    ``len(texts)`` new prompts after the :class:`~vipalloc.history.RolloutHistory` ``hist``; see the module
    docstring."""
    from vipalloc import Allocator

    m = len(texts)
    if m < 2 or repeats < 1:
        raise ValueError("need m >= 2 and repeats >= 1")
    rng = np.random.default_rng(seed)
    history_rows = len(hist)
    s0 = int(hist.last_step or 0) + 1
    alloc = Allocator(strategy="vip", predictor="gp", n_min=2, n_max=32, embedder=embedder, seed=seed)
    alloc.ingest_history(hist)
    ids = [f"t{m}-{j}" for j in range(m)]
    budget = n_mean * m
    plan0 = alloc.plan(ids, prompts=texts, budget=budget, step=s0)
    base = 256.0 * np.exp(0.3 * rng.standard_normal(m)) * (1.0 + 3.0 * (1.0 - plan0.p_mean))
    rewards, lengths = [], []
    for j, c in enumerate(plan0.counts):
        r = (rng.random(int(c)) < plan0.p_mean[j]).astype(float)
        ln = np.rint(base[j] * np.where(r > 0, 1.0, 1.5) * np.exp(0.3 * rng.standard_normal(int(c))))
        rewards.append(r)
        lengths.append(np.clip(ln, 1.0, 2048.0))
    alloc.observe(ids, rewards, step=s0, lengths=lengths)
    step = s0 + 1
    tokens = alloc.uniform_tokens(ids, n_mean, step=step, prompts=texts)
    assert tokens is not None  # lengths were observed just above
    alloc.plan(ids, prompts=texts, budget=budget, step=step)  # warm: the GP fit of this step is cached now
    t_roll, t_tok, s_roll, s_tok = [], [], [], []
    plan_t = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        pr = alloc.plan(ids, prompts=texts, budget=budget, step=step)
        t1 = time.perf_counter()
        plan_t = alloc.plan(ids, prompts=texts, token_budget=tokens, step=step)
        t2 = time.perf_counter()
        t_roll.append(t1 - t0)
        t_tok.append(t2 - t1)
        s_roll.append(pr.timings["solve"])
        s_tok.append(plan_t.timings["solve"])
    assert plan_t is not None
    med = {k: float(np.median(v)) for k, v in (("roll", t_roll), ("tok", t_tok), ("s_roll", s_roll), ("s_tok", s_tok))}
    return {
        "m": m,
        "history_rows": history_rows,
        "repeats": repeats,
        "plan_rollouts_s": med["roll"],
        "plan_tokens_s": med["tok"],
        "ratio": med["tok"] / med["roll"] if med["roll"] > 0 else float("nan"),
        "solve_rollouts_s": med["s_roll"],
        "solve_tokens_s": med["s_tok"],
        "solve_ratio": med["s_tok"] / med["s_roll"] if med["s_roll"] > 0 else float("nan"),
        "optimality_gap": float(plan_t.optimality_gap),
        "token_budget": float(tokens),
        "tokens_planned": float(plan_t.expected_tokens or 0.0),
        "rollouts_planned": int(plan_t.counts.sum()),
        "all_plan_rollouts_s": t_roll,
        "all_plan_tokens_s": t_tok,
    }


def token_speed_lines(r: dict[str, Any]) -> list[str]:
    """The report's section for one :func:`token_speed` result."""
    verdict = "meets" if r["ratio"] <= 2.0 else "misses"
    return [
        f"## Token budget vs rollout budget at M = {r['m']:,}",
        "",
        f"Same allocator state (vip + gp after a {r['history_rows']:,}-row history and one observed batch with "
        f"lengths), median of {r['repeats']} alternating repeats, the GP fit cached for both:",
        "",
        "| | rollout budget | token budget | ratio |",
        "|---|---|---|---|",
        f"| `plan()` (s) | {r['plan_rollouts_s']:.3f} | {r['plan_tokens_s']:.3f} | **{r['ratio']:.2f}x** |",
        f"| solve stage (s) | {r['solve_rollouts_s']:.3f} | {r['solve_tokens_s']:.3f} | {r['solve_ratio']:.2f}x |",
        "",
        f"The token plan {verdict} the 2x target; its certified optimality gap is {r['optimality_gap']:.2e} "
        f"(relative), at {r['tokens_planned']:,.0f} of {r['token_budget']:,.0f} budgeted tokens, "
        f"{r['rollouts_planned']:,} rollouts.",
        "",
    ]
