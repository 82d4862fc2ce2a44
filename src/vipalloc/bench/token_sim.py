"""One simulator run with response lengths, under a rollout or a token budget (``vipalloc bench tokens``).

:func:`token_run` trains the simulator's policy (:mod:`vipalloc.bench.simulator`) with one row's allocation while
every rollout also costs tokens (:mod:`vipalloc.bench.sim_lengths`). Per step:

* **rollout budget** rows plan ``batch x n_mean`` rollouts (``Allocator.plan(budget=...)``);
* **token budget** rows plan ``token_budget = Allocator.uniform_tokens(ids, n_mean)``: the tokens the uniform plan
  of ``n_mean`` rollouts per prompt is predicted to spend on this batch by the row's own length model (the
  plug-ins' default token mode, "spend what uniform would have spent"), with no cap on rollouts. The first step
  has no length to predict from and is planned by rollouts (``batch x n_mean``), as a user must;
* lengths come back with the rewards (a rollout cut at the cap scores 0) and go to ``observe(lengths=...)``.

**Equal tokens.** The run that sets a seed's token total (``token_total=None``, the uniform row) trains ``steps``
steps; every other row of the seed trains until its cumulative *generated* tokens reach that total (at most
``max_steps``). A row thus overshoots by less than one step's tokens; the league
(:mod:`vipalloc.bench.token_league`) cuts every curve at the seed's total by linear interpolation, so all rows of a
seed are compared on the same token axis and end at exactly the same cumulative tokens.

Common random numbers: the same world, prompt order, reward uniforms (``[seed, 1]``), gradient noise
(``[seed, 2]``) and length noise (``[seed, 4]``) per step and prompt slot for every row of a seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vipalloc.bench.sim_lengths import SimLengthModel, prompt_length_factors, sample_lengths
from vipalloc.bench.sim_runs import LENGTHS, SimWorld, mean_telemetry
from vipalloc.bench.simulator import SimConfig
from vipalloc.budget import BudgetSpec

__all__ = ["BUDGET_KINDS", "TokenRow", "TokenRun", "token_run"]

BUDGET_KINDS = ("rollouts", "tokens")


@dataclass(frozen=True)
class TokenRow:
    """One row of the equal-token league: a strategy with a predictor under a ``rollouts`` or ``tokens`` budget."""

    label: str
    strategy: str
    predictor: str
    budget: str = "rollouts"

    def __post_init__(self) -> None:
        if self.budget not in BUDGET_KINDS:
            raise ValueError(f"budget must be one of {', '.join(BUDGET_KINDS)}, got {self.budget!r}")


_ARRAYS = (
    "steps",
    "cum_rollouts",
    "cum_tokens",
    "success",
    "tokens",
    "rollouts",
    "token_budget",
    "frac_cut",
    "zero_var_frac",
    "kept_frac",
    "gap",
    "alloc_seconds",
)


@dataclass
class TokenRun:
    """One (row, seed) run. Curves (``steps``, ``cum_rollouts``, ``cum_tokens``, ``success``: exact mean true p
    over the pool) have ``T + 1`` entries (index 0 = before training); per-step arrays ``T``: generated ``tokens``
    and ``rollouts``, the plan's ``token_budget`` (NaN when planned by rollouts), the share of rollouts cut at the
    cap, of zero-variance groups, of planned prompts kept, the plan's certified optimality ``gap`` (NaN for rules
    without one) and the allocator's seconds (plan + observe)."""

    label: str
    seed: int
    sigma: float
    steps: np.ndarray
    cum_rollouts: np.ndarray
    cum_tokens: np.ndarray
    success: np.ndarray
    tokens: np.ndarray
    rollouts: np.ndarray
    token_budget: np.ndarray
    frac_cut: np.ndarray
    zero_var_frac: np.ndarray
    kept_frac: np.ndarray
    gap: np.ndarray
    alloc_seconds: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "seed": self.seed, "sigma": self.sigma}
        for k in _ARRAYS:
            out[k] = [None if not np.isfinite(v) else float(v) for v in np.asarray(getattr(self, k), float)]
        out["extra"] = self.extra
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenRun:
        arrs = {k: np.array([np.nan if v is None else v for v in d[k]], np.float64) for k in _ARRAYS}
        return cls(
            label=str(d["label"]), seed=int(d["seed"]), sigma=float(d["sigma"]), extra=d.get("extra", {}), **arrs
        )


def token_run(
    row: TokenRow,
    cfg: SimConfig,
    lengths: SimLengthModel,
    seed: int,
    *,
    steps: int = 100,
    batch: int = 64,
    n_mean: int = 8,
    n_min: int = 2,
    n_max: int = 32,
    embedder: str = "hashing",
    token_total: float | None = None,
    max_steps: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TokenRun:
    """Train with ``row``'s allocation: ``steps`` steps when ``token_total`` is None, else until the cumulative
    generated tokens reach ``token_total`` (at most ``max_steps``, default ``3 x steps``)."""
    if token_total is not None and not (np.isfinite(token_total) and token_total > 0):
        raise ValueError(f"token_total must be a positive number of tokens, got {token_total!r}")
    world = SimWorld.build(
        cfg, seed, steps=steps, draw=batch, n_mean=n_mean, n_min=n_min, n_max=n_max, embedder=embedder
    )
    sim, rng_r, rng_g = world.sim, world.rng_r, world.rng_g
    factors = prompt_length_factors(sim, lengths)
    rng_l = world.rng_for(seed, LENGTHS)  # length noise
    alloc = world.allocator(row.strategy, row.predictor)
    budget = batch * n_mean
    # "tokens" rows: what uniform's n_mean rollouts a prompt are predicted to spend, no rollout cap
    spec = BudgetSpec(rollouts=budget, tokens="uniform" if row.budget == "tokens" else None)
    limit = steps if token_total is None else int(max_steps if max_steps is not None else 3 * steps)
    t = 0
    cum_r = 0
    cum_tok = 0.0
    curve: dict[str, list[float]] = {"steps": [0], "cum_rollouts": [0], "cum_tokens": [0.0]}
    curve["success"] = [sim.mean_success()]
    per: dict[str, list[float]] = {k: [] for k in _ARRAYS[4:]}
    telemetry: list[dict[str, float]] = []
    while t < limit and (token_total is None or cum_tok < token_total):
        idx, ids, texts, p_true = world.draw(batch, alloc, row.predictor)
        t0 = time.perf_counter()
        # the engine's budget policy: a token row's first step (no length observed yet) is planned by rollouts
        step_budget = spec.resolve(alloc, ids, t, texts)
        plan = alloc.plan(ids, prompts=texts, step=t, **step_budget.kwargs())
        tb = step_budget.tokens
        a_s = time.perf_counter() - t0
        raw = sim.rollouts(idx, plan.counts, rng_r, width=n_max)
        smp = sample_lengths(sim, idx, raw, rng_l, lengths, factors, n_max)
        t0 = time.perf_counter()
        alloc.observe(ids, smp.rewards, step=t, lengths=smp.lengths)
        a_s += time.perf_counter() - t0
        telemetry.append(
            {
                **plan.metrics(),
                **alloc.outcome_metrics(smp.rewards, plan, lengths=smp.lengths, max_length=lengths.max_length),
            }
        )
        sim.update(sim.gradient(idx, smp.rewards, rng_g, p=p_true, batch_size=batch))
        generated = [r for r in smp.rewards if len(r)]
        cum_r += int(plan.counts.sum())
        cum_tok += smp.tokens
        t += 1
        curve["steps"].append(t)
        curve["cum_rollouts"].append(cum_r)
        curve["cum_tokens"].append(cum_tok)
        curve["success"].append(sim.mean_success())
        per["tokens"].append(smp.tokens)
        per["rollouts"].append(float(plan.counts.sum()))
        per["token_budget"].append(float("nan") if tb is None else float(tb))
        per["frac_cut"].append(smp.frac_cut)
        per["zero_var_frac"].append(
            float(np.mean([g.min() == g.max() for g in generated])) if generated else float("nan")
        )
        per["kept_frac"].append(float(np.mean(plan.counts > 0)))
        per["gap"].append(float(plan.optimality_gap) if tb is not None else float("nan"))
        per["alloc_seconds"].append(a_s)
        if on_step is not None:
            on_step(t)
    arrays = {k: np.asarray(v, np.float64) for k, v in {**curve, **per}.items()}
    return TokenRun(
        label=row.label,
        seed=seed,
        sigma=cfg.sigma,
        extra={"telemetry": mean_telemetry(telemetry), "budget": row.budget, "strategy": row.strategy},
        **arrays,
    )
