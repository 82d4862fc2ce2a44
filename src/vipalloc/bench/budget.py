"""``vipalloc bench budget``: where each strategy spends the rollout budget per predicted-p bin.

Mean rollouts a prompt gets per predicted-``p`` bin, prompts dropped, and the share of rollouts on hopeless
(``p < 0.05``) prompts, for ``uniform``, ``vip``, ``vip_authors``, ``vip_pure``, ``knapsack`` (or any strategies
named) on two inputs:

* a skewed synthetic batch (:func:`skewed_batch`): 256 prompts, budget 2,048, ``n in [4, 32]``; 20% never solved
  (``p = 0``), 10% always solved (``p = 1``), the rest spread over ``(0, 1)`` (logit-normal, mean logit -1, sd 3,
  a predictor's spread with long tails), averaged over ``seeds`` draws;
* optionally a trace of the real CPU trainer (``vipalloc.bench.predictors.trainer_trace``, saved as JSONL): each
  step's predictions come from replaying the trace's outcomes through an ``Allocator(strategy="uniform",
  predictor=...)``, and every strategy plans that step's batch from those predictions (same budget as the trace).

Every plan is made through :class:`vipalloc.allocator.Allocator` (the ``oracle`` predictor hands it the ``p`` to
plan for). Strategies that read the reward history (``dynamo``) see none here, so they plan as for unseen prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vipalloc.allocator import Allocator

__all__ = [
    "BINS",
    "DEFAULT_STRATEGIES",
    "BudgetTable",
    "batch_table",
    "format_table",
    "skewed_batch",
    "run_budget",
    "trace_table",
]

DEFAULT_STRATEGIES = ("uniform", "vip", "vip_authors", "vip_pure", "knapsack")
# (label, low, high): p in [low, high); the end bins catch predictions beyond the clip (never / always solved)
BINS: tuple[tuple[str, float, float], ...] = (
    ("p~0", -1.0, 1e-6),
    ("(0,.05)", 1e-6, 0.05),
    ("[.05,.2)", 0.05, 0.2),
    ("[.2,.8)", 0.2, 0.8),
    ("[.8,.95)", 0.8, 0.95),
    ("[.95,1)", 0.95, 1 - 1e-6),
    ("p~1", 1 - 1e-6, 2.0),
)


def skewed_batch(seed: int, m: int = 256) -> np.ndarray:
    """The skewed synthetic batch (module docstring): float64 ``(m,)``, the never-solved prompts first, then the
    solved ones."""
    rng = np.random.default_rng(seed)
    n0, n1 = m // 5, m // 10
    return np.r_[np.zeros(n0), np.ones(n1), 1 / (1 + np.exp(-rng.normal(-1.0, 3.0, m - n0 - n1)))]


@dataclass
class _Acc:
    """Running sums for one strategy: rollouts and prompts per bin, drops, plans."""

    rollouts: np.ndarray = field(default_factory=lambda: np.zeros(len(BINS)))
    prompts: np.ndarray = field(default_factory=lambda: np.zeros(len(BINS)))
    dropped: float = 0.0
    hopeless: float = 0.0
    total: float = 0.0
    plans: int = 0
    relaxed: int = 0

    def add(self, p: np.ndarray, counts: np.ndarray, relaxed: bool) -> None:
        for b, (_, lo, hi) in enumerate(BINS):
            sel = (p >= lo) & (p < hi)
            self.rollouts[b] += counts[sel].sum()
            self.prompts[b] += sel.sum()
        self.dropped += float((counts == 0).sum())
        self.hopeless += float(counts[p < 0.05].sum())
        self.total += float(counts.sum())
        self.plans += 1
        self.relaxed += int(relaxed)


@dataclass
class BudgetTable:
    """One table: per strategy, the mean rollouts per bin (NaN where the bin is empty), dropped prompts per plan,
    the share of rollouts on ``p < 0.05`` prompts; plus the prompts per bin per plan."""

    title: str
    estimator: str
    rows: dict[str, dict[str, Any]]
    prompts_per_bin: list[float]
    plans: int


def _finish(title: str, estimator: str, accs: dict[str, _Acc]) -> BudgetTable:
    rows = {}
    first = next(iter(accs.values()))
    for name, acc in accs.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(acc.prompts > 0, acc.rollouts / np.maximum(acc.prompts, 1), np.nan)
        rows[name] = {
            "mean_n": [float(x) for x in mean],
            "dropped": acc.dropped / max(acc.plans, 1),
            "share_hopeless": acc.hopeless / max(acc.total, 1.0),
            "min_keep_relaxed": acc.relaxed,
        }
    per_bin = [float(x) / max(first.plans, 1) for x in first.prompts]
    return BudgetTable(title, estimator, rows, per_bin, first.plans)


def _planner(strategy: str, estimator: str, n_min: int, n_max: int) -> Allocator:
    return Allocator(strategy=strategy, predictor="oracle", estimator=estimator, n_min=n_min, n_max=n_max)


def _plan(alloc: Allocator, ids: list[str], p: np.ndarray, budget: int, step: int) -> tuple[np.ndarray, bool]:
    alloc.predictor.set_true_p(ids, p)  # type: ignore[attr-defined]
    plan = alloc.plan(ids, budget=budget, step=step)
    return plan.counts, plan.min_keep_relaxed


def batch_table(
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    *,
    estimator: str = "rloo",
    seeds: int = 10,
    m: int = 256,
    budget: int = 2048,
    n_min: int = 4,
    n_max: int = 32,
) -> BudgetTable:
    """Where the budget goes on ``seeds`` draws of :func:`skewed_batch`."""
    accs = {s: _Acc() for s in strategies}
    ids = [f"q{i}" for i in range(m)]
    for s in strategies:
        alloc = _planner(s, estimator, n_min, n_max)
        for seed in range(seeds):
            p = skewed_batch(seed, m)
            counts, relaxed = _plan(alloc, ids, p, budget, seed)
            accs[s].add(p, counts, relaxed)
    title = f"skewed batch: {m} prompts, budget {budget}, n in [{n_min}, {n_max}], {seeds} draws"
    return _finish(title, estimator, accs)


def trace_table(
    trace_path: str | Path,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    *,
    estimator: str = "rloo",
    predictor: str = "gp",
    embedder: str = "hashing",
    n_min: int = 4,
    n_max: int = 32,
    skip_first: int = 1,
) -> BudgetTable:
    """Where the budget goes on a saved trainer trace: predictions by replaying its outcomes (``predictor``), each
    step's budget = the rollouts the trace generated that step; the first ``skip_first`` steps (no history) skipped.
    """
    from vipalloc.bench.predictors import Trace

    trace = Trace.load(trace_path)
    # the CPU trainer's default embedder (hashing) unless told otherwise
    replay = Allocator(
        strategy="uniform", predictor=predictor, estimator=estimator, n_min=2, n_max=4096, embedder=embedder
    )
    planners = {s: _planner(s, estimator, n_min, n_max) for s in strategies}
    accs = {s: _Acc() for s in strategies}
    for st in trace.steps:
        ids, step, trials = st["ids"], st["step"], st["trials"]
        budget = int(trials.sum())
        plan = replay.plan(ids, prompts=st["texts"], budget=budget, step=step)
        p = np.asarray(plan.p_mean, np.float64)
        if step >= skip_first and len(ids) * n_min <= budget <= len(ids) * n_max:
            for s in strategies:
                counts, relaxed = _plan(planners[s], ids, p, budget, step)
                accs[s].add(p, counts, relaxed)
        # the trace's own (uniform) rollouts feed the predictor, as in training
        rewards = [np.r_[np.ones(k), np.zeros(t - k)] for k, t in zip(st["successes"], trials)]
        replay.observe(ids, rewards, step=step)
    title = f"CPU-trainer trace ({trace.name}), predictions by {predictor}"
    return _finish(title, estimator, accs)


def format_table(table: BudgetTable) -> list[str]:
    """Markdown lines: one row per strategy, one column per p bin, then dropped and the hopeless share."""
    head = "| strategy | " + " | ".join(label for label, _, _ in BINS) + " | dropped | on p<0.05 |"
    lines = [
        f"**{table.title}** (estimator {table.estimator}; mean rollouts a prompt gets, per predicted-p bin)",
        "",
        head,
        "|" + "---|" * (len(BINS) + 3),
        "| prompts a plan | " + " | ".join(f"{x:.1f}" for x in table.prompts_per_bin) + " | | |",
    ]
    for name, row in table.rows.items():
        cells = ["-" if np.isnan(x) else f"{x:.1f}" for x in row["mean_n"]]
        flag = f" (min_keep relaxed in {row['min_keep_relaxed']})" if row["min_keep_relaxed"] else ""
        tail = f" | {row['dropped']:.1f} | {100 * row['share_hopeless']:.0f}% |"
        lines.append(f"| `{name}`{flag} | " + " | ".join(cells) + tail)
    return lines


def run_budget(
    out: str | Path,
    *,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    estimators: Sequence[str] = ("rloo", "drgrpo"),
    seeds: int = 10,
    trace: str | Path | None = None,
    predictor: str = "gp",
    command: str = "vipalloc bench budget",
) -> tuple[list[BudgetTable], str]:
    """Build every table, write ``out/budget.md`` and return ``(tables, markdown)``."""
    tables = [batch_table(strategies, estimator=e, seeds=seeds) for e in estimators]
    if trace is not None:
        tables += [trace_table(trace, strategies, estimator=e, predictor=predictor) for e in estimators]
    lines = ["# Where the budget goes", "", f"Command: `{command}`", ""]
    for t in tables:
        lines += format_table(t) + [""]
    text = "\n".join(lines)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget.md").write_text(text + "\n")
    return tables, text
