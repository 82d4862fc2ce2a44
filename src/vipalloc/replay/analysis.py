"""What a logged run spent, how well predictors would have forecast it, and model-based counterfactual plans.

Input: the trainer's groups of :class:`~vipalloc.replay.table.GroupTable` (``G`` groups: ``trials`` rollouts of
which ``successes`` succeeded, ``tokens`` generated tokens summed over the group, the range of the training signal).

* **Waste** (measured), two measures: *zero variance* on the chosen success reward (a group whose rollouts all
  succeeded, *solved*, or all failed, *hopeless*), and *zero advantage as trained* (every rollout's logged
  advantage 0, or every rollout's logged total score equal: every group-relative estimator then gives the group
  zero advantage, so its rollouts and tokens bought no gradient). The run may train on more than the success
  reward (a format bonus), so the two differ; the second is what "no gradient" means. Overall and per step.
* **Predictors** (measured forecast quality): each predictor is trained on steps ``< t`` and scored on step ``t``'s
  outcomes (Brier, :func:`vipalloc.predictors.metrics.calibration_metrics`), from the second step on.
* **Counterfactuals** (model-based estimates, not training outcomes): one :class:`~vipalloc.Allocator` per
  strategy is replayed through the log step by step. At step ``t`` it plans the step's real prompts at the step's
  real total rollouts, then ingests the real outcomes (the allocator plans per prompt: a prompt drawn twice in a
  step is one prompt with both groups' rollouts). The policy, and so the outcomes, are the logged run's: the
  plans say what the allocator would have *asked for* at each point of that run, and the variance ratio is the
  engine's gradient-variance model evaluated at the predicted ``p``.
* **Same tokens** (when the log has lengths): the step is planned again with ``Allocator.plan(token_budget=T)``,
  ``T = sum_i n_logged,i c_i`` the logged allocation's predicted tokens, ``c_i = plan.expected_lengths`` (the
  allocator's length model, fed the log's lengths of earlier steps through ``ingest_history``), no cap on rollouts.

Everything reaches the engine through ``Allocator.plan`` / ``Allocator.ingest_history`` (the log's groups are not
plans this allocator made, so ``observe`` cannot take them) and ``Allocator.expected_variance``. The log's lengths
reach the length model as the history's token columns: per group, the successful and the failed rollouts' summed
tokens when the log tells them apart (per-rollout logs, history rows with rewards and lengths, version-2 history
rows), else the group's tokens split in proportion to its successes and failures.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from vipalloc import Allocator
from vipalloc.history import RolloutHistory
from vipalloc.predictors.metrics import calibration_metrics
from vipalloc.replay.table import GroupTable

__all__ = [
    "CounterfactualConfig",
    "StepData",
    "replay_engine",
    "split_steps",
    "waste",
    "waste_per_step",
    "zero_advantage_groups",
]

_CAL_BINS = 10
ADV_ZERO = 1e-6  # |advantage| at most this: zero
ADV_EQUAL_ZERO = 1e-2  # equal advantages this small: zero up to float32 rounding of the group mean / (std + 1e-4)
SCORE_EQUAL = 1e-6  # relative spread of a group's total scores counted as "all equal"


def zero_advantage_groups(arrays: dict[str, np.ndarray], signal: str | None) -> np.ndarray | None:
    """Groups that had zero advantage as trained, bool ``(G,)``; ``None`` when the log does not say for every group.

    ``signal == "advantage"`` (TRL's logged advantage): every rollout's ``|advantage| <= 1e-6``, or all equal and
    below 0.01 (TRL divides an all-equal group's float32 rounding residue by ``std + 1e-4``). ``"score"`` (the logged
    total score or rewards): the group's scores are all equal (relative spread ``<= 1e-6``), so every group-relative
    estimator gives it zero advantage.
    """
    if signal is None or not len(arrays["trials"]) or np.any(arrays["signal_n"] < arrays["trials"]):
        return None
    lo, hi = arrays["signal_lo"], arrays["signal_hi"]
    size = np.maximum(np.abs(lo), np.abs(hi))
    if signal == "advantage":
        return (size <= ADV_ZERO) | ((hi == lo) & (size <= ADV_EQUAL_ZERO))
    return (hi - lo) <= SCORE_EQUAL * np.maximum(1.0, size)


def _share(part: float, whole: float) -> float | None:
    return float(part / whole) if whole > 0 else None


def waste(
    trials: np.ndarray, successes: np.ndarray, tokens: np.ndarray, zero_adv: np.ndarray | None = None
) -> dict[str, Any]:
    """Rollouts and tokens in zero-variance (and zero-advantage) groups for groups ``(G,)``; shares are ``None``
    when undefined.

    ``tokens`` (float64, NaN = unknown): token fields are ``None`` unless every group has a token count.
    ``zero_adv`` (bool ``(G,)``, from :func:`zero_advantage_groups`): the ``zero_advantage_*`` fields, ``None``
    without it.
    """
    t = np.asarray(trials, np.int64)
    s = np.asarray(successes, np.int64)
    tok = np.asarray(tokens, np.float64)
    solved = (s == t) & (t > 0)
    hopeless = s == 0
    zero = solved | hopeless
    g = len(t)
    rollouts = int(t.sum())
    out: dict[str, Any] = {
        "rollouts": rollouts,
        "prompt_steps": g,
        "successes": int(s.sum()),
        "accuracy": _share(float(s.sum()), rollouts),
        "zero_variance_rollouts": int(t[zero].sum()),
        "all_correct_rollouts": int(t[solved].sum()),
        "all_wrong_rollouts": int(t[hopeless].sum()),
        "zero_variance_share": _share(float(t[zero].sum()), rollouts),
        "zero_variance_groups": int(zero.sum()),
        "solved_share": _share(float(solved.sum()), g),  # share of (prompt, step) groups all-correct
        "hopeless_share": _share(float(hopeless.sum()), g),  # share of (prompt, step) groups all-wrong
        "singleton_groups": int((t == 1).sum()),  # one rollout: zero advantage whatever its reward
    }
    known = bool(g) and bool(np.all(np.isfinite(tok)))
    total = float(tok.sum()) if known else None
    out.update(
        {
            "tokens": total,
            "zero_variance_tokens": float(tok[zero].sum()) if known else None,
            "all_correct_tokens": float(tok[solved].sum()) if known else None,
            "all_wrong_tokens": float(tok[hopeless].sum()) if known else None,
            "zero_variance_tokens_share": _share(float(tok[zero].sum()), total) if known and total else None,
        }
    )
    za = None if zero_adv is None else np.asarray(zero_adv, bool)
    out.update(
        {
            "zero_advantage_rollouts": None if za is None else int(t[za].sum()),
            "zero_advantage_groups": None if za is None else int(za.sum()),
            "zero_advantage_share": None if za is None else _share(float(t[za].sum()), rollouts),
            "zero_advantage_tokens": float(tok[za].sum()) if za is not None and known else None,
            "zero_advantage_tokens_share": (
                _share(float(tok[za].sum()), total) if za is not None and known and total else None
            ),
        }
    )
    return out


def split_steps(arrays: dict[str, np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """``(step, group indices)`` per step, steps increasing (``arrays`` sorted by step, as ``GroupTable`` gives)."""
    steps = arrays["step"]
    if not len(steps):
        return []
    bounds = np.flatnonzero(np.diff(steps)) + 1
    return [(int(steps[c[0]]), c) for c in np.split(np.arange(len(steps)), bounds)]


def waste_per_step(arrays: dict[str, np.ndarray], zero_adv: np.ndarray | None = None) -> list[dict[str, Any]]:
    """:func:`waste` for each step, with its ``step`` (``zero_adv``: bool ``(G,)`` or ``None``)."""
    return [
        {
            "step": step,
            **waste(
                arrays["trials"][idx],
                arrays["successes"][idx],
                arrays["tokens"][idx],
                None if zero_adv is None else zero_adv[idx],
            ),
        }
        for step, idx in split_steps(arrays)
    ]


def prompts_over_run(arrays: dict[str, np.ndarray], n_prompts: int) -> dict[str, int]:
    """Prompts never solved / always solved in every rollout they got over the whole log."""
    pid = arrays["prompt_index"]
    t = np.bincount(pid, weights=arrays["trials"], minlength=n_prompts)
    s = np.bincount(pid, weights=arrays["successes"], minlength=n_prompts)
    seen = t > 0
    return {
        "prompts": int(seen.sum()),
        "never_solved": int((seen & (s == 0)).sum()),
        "always_solved": int((seen & (s == t)).sum()),
    }


@dataclass
class StepData:
    """One step of the log as the allocators see it; arrays ``(M,)`` aligned with ``ids``."""

    step: int
    ids: list[str]  # allocator prompt ids
    texts: list[str]
    trials: np.ndarray  # int64: rollouts the log generated per prompt
    successes: np.ndarray  # int64
    tokens: np.ndarray  # float64: generated tokens per group (NaN unknown)
    tokens_success: np.ndarray | None = None  # float64: the successful rollouts' part of tokens (NaN unknown split)

    @property
    def mean_tokens(self) -> np.ndarray:
        """Realised tokens per rollout of each prompt this step, float64 ``(M,)``."""
        return self.tokens / np.maximum(self.trials, 1)

    @property
    def zero(self) -> np.ndarray:
        """Groups whose outcomes were all-equal (bool ``(M,)``)."""
        return (self.successes == 0) | (self.successes == self.trials)


def allocator_ids(table: GroupTable) -> list[str]:
    """Short, stable allocator ids: the log's id when it has one, else ``t:`` + a hash of the prompt text."""
    out = []
    for key, text in zip(table.prompt_ids, table.texts):
        if key == text and len(key) > 40:  # keyed by its text: keep plans files and state readable
            out.append("t:" + hashlib.sha1(key.encode()).hexdigest()[:16])
        else:
            out.append(key)
    return out


def iter_step_data(table: GroupTable, arrays: dict[str, np.ndarray]) -> list[StepData]:
    """The log cut into :class:`StepData`, steps increasing, one entry per distinct prompt of the step (groups of
    one prompt in one step are summed: the allocator plans per prompt)."""
    ids = allocator_ids(table)
    out = []
    for step, idx in split_steps(arrays):
        uniq, inv = np.unique(arrays["prompt_index"][idx], return_inverse=True)
        order = np.argsort(np.unique(inv, return_index=True)[1], kind="stable")  # first appearance in the step
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        pos = rank[inv]
        m = len(uniq)

        def total(col: str, dtype: type, pos: np.ndarray = pos, idx: np.ndarray = idx, m: int = m) -> np.ndarray:
            return np.bincount(pos, weights=arrays[col][idx], minlength=m).astype(dtype)

        pid = uniq[order]
        out.append(
            StepData(
                step=step,
                ids=[ids[i] for i in pid],
                texts=[table.texts[i] or table.prompt_ids[i] for i in pid],
                trials=total("trials", np.int64),
                successes=total("successes", np.int64),
                tokens=total("tokens", np.float64),
                tokens_success=total("tokens_success", np.float64) if "tokens_success" in arrays else None,
            )
        )
    return out


@dataclass
class CounterfactualConfig:
    """What to replay: strategies (one allocator each), the predictor they use, the predictors scored."""

    strategies: list[str] = field(default_factory=lambda: ["vip", "vip_authors", "inverse_acc"])
    predictor: str = "gp"
    predictors: list[str] = field(default_factory=lambda: ["gp", "beta", "empirical"])
    estimator: str = "drgrpo"
    n_min: int | None = None  # None: min(4, the log's smallest mean group size), at least 2
    n_max: int | None = None  # None: max(32, 2 x the log's largest group)
    embedder: str = "auto"
    seed: int = 0


def default_bounds(steps: Sequence[StepData], cfg: CounterfactualConfig) -> tuple[int, int]:
    """``(n_min, n_max)``: a log with groups of 2 must stay feasible, and no logged group may exceed ``n_max``."""
    n_min = cfg.n_min
    if n_min is None:
        smallest = min((int(s.trials.sum()) // len(s.ids) for s in steps), default=4)
        n_min = max(2, min(4, smallest))
    n_max = cfg.n_max if cfg.n_max is not None else max(32, 2 * max((int(s.trials.max()) for s in steps), default=16))
    return n_min, n_max


def _even(total: float, count: int, out: np.ndarray) -> None:
    """Fill ``out`` (float64 ``(count,)``) with ``count`` whole-number lengths summing to ``round(total)``, as even
    as possible: the length model reads only each outcome's summed tokens and count, so this loses nothing it
    uses."""
    if count <= 0:
        return
    q, r = divmod(max(int(round(total)), 0), count)
    out[:] = float(q)
    out[:r] += 1.0


def step_lengths(sd: StepData) -> list[np.ndarray | None]:
    """Per-rollout lengths aligned with rewards ``[1] * s + [0] * (t - s)`` (None for a group without tokens):
    the successes' summed tokens when known, else the group's tokens split in proportion to its outcomes."""
    out: list[np.ndarray | None] = []
    for j, (s, t, tok) in enumerate(zip(sd.successes, sd.trials, sd.tokens)):
        if not math.isfinite(tok) or t <= 0:
            out.append(None)
            continue
        ts = np.nan if sd.tokens_success is None else float(sd.tokens_success[j])
        if not math.isfinite(ts):
            ts = float(tok) * int(s) / int(t)
        ts = min(max(ts, 0.0), float(tok))
        lens = np.empty(int(t))
        _even(ts, int(s), lens[: int(s)])
        _even(float(tok) - ts, int(t - s), lens[int(s) :])
        out.append(lens)
    return out


def _ingest(alloc: Allocator, sd: StepData) -> None:
    """Feed the step's real outcomes (and lengths, when the log has them) to ``alloc`` as a one-step history (0/1
    rewards: success already decided)."""
    h = RolloutHistory(success_threshold=0.5)
    rewards = [np.arange(t) < s for s, t in zip(sd.successes, sd.trials)]  # the s successes first, as lengths
    lens = step_lengths(sd)
    h.extend(sd.step, sd.ids, rewards, prompts=sd.texts, lengths=lens if any(x is not None for x in lens) else None)
    alloc.ingest_history(h)


@dataclass
class _Totals:
    """Running sums of one strategy's counterfactual over the steps it planned."""

    exp_var: float = 0.0
    uni_var: float = 0.0
    logged_var: float = 0.0
    rollouts: int = 0
    rollouts_moved: int = 0
    tokens_moved: float = 0.0
    tokens_hindsight: float = 0.0
    dropped: int = 0
    steps: int = 0
    skipped: list[str] = field(default_factory=list)
    tok_rollouts: int = 0
    tok_exp_var: float = 0.0
    tok_pred_tokens: float = 0.0
    tok_target_tokens: float = 0.0
    tok_hindsight: float = 0.0
    tok_moved: float = 0.0
    tok_gap_max: float = 0.0
    tok_refused: str | None = None
    per_step: list[dict[str, Any]] = field(default_factory=list)


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def replay_engine(
    steps: Sequence[StepData],
    cfg: CounterfactualConfig,
    *,
    tokens_known: bool,
    plans_dir: Path | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Replay the log into the allocators: ``(predictors, strategies, info)``.

    ``predictors``: name -> next-step scores and calibration bins; ``strategies``: name -> counterfactual summary
    with a ``per_step`` list; ``info``: the bounds and methods used. ``plans_dir``: where to write one
    ``<strategy>.jsonl`` of per-(step, prompt) counts. ``on_step(done, total)`` reports progress.
    """
    n_min, n_max = default_bounds(steps, cfg)
    info: dict[str, Any] = {
        "n_min": n_min,
        "n_max": n_max,
        "estimator": cfg.estimator,
        "predictor": cfg.predictor,
        "token_budget_method": (
            "Allocator.plan(token_budget=T), T = the logged allocation's predicted tokens sum_i n_logged,i c_i, "
            "c_i = the allocator's expected tokens per rollout (its length model, fed the log's lengths of earlier "
            "steps through ingest_history); no cap on rollouts; steps before any length was logged are not planned"
        ),
    }
    kw = {"estimator": cfg.estimator, "n_min": n_min, "n_max": n_max, "seed": cfg.seed, "embedder": cfg.embedder}
    strat_allocs = {s: Allocator(strategy=s, predictor=cfg.predictor, **kw) for s in cfg.strategies}
    # A predictor that the strategies already use is scored from their plans' p_mean (same predictor, same data):
    # no second GP fit. The others get a cheap uniform allocator that only predicts.
    shared = cfg.predictor if cfg.strategies and cfg.predictor in cfg.predictors else None
    pred_allocs = {p: Allocator(strategy="uniform", predictor=p, **kw) for p in cfg.predictors if p != shared}
    scored: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]] = {p: [] for p in cfg.predictors}
    totals = {s: _Totals() for s in cfg.strategies}
    seen: set[str] = set()
    files: dict[str, TextIO] = {}
    if plans_dir is not None:
        plans_dir.mkdir(parents=True, exist_ok=True)
        files = {s: (plans_dir / f"{s}.jsonl").open("w", encoding="utf-8") for s in cfg.strategies}
    try:
        for k, sd in enumerate(steps):
            m = len(sd.ids)
            budget = int(sd.trials.sum())
            is_seen = np.array([pid in seen for pid in sd.ids])
            if k > 0:  # the first step has no history: a prediction there is the prior, a plan near-uniform
                for name, alloc in pred_allocs.items():
                    plan = alloc.plan(sd.ids, prompts=sd.texts, budget=m * n_min, step=sd.step)
                    scored[name].append((plan.p_mean, sd.successes, sd.trials, is_seen))
                for name, alloc in strat_allocs.items():
                    p_mean = _counterfactual_step(alloc, sd, budget, tokens_known, totals[name], files.get(name))
                    if shared is not None and name == cfg.strategies[0]:
                        if p_mean is None:  # this step's budget is infeasible for it: predict at n_min each
                            p_mean = alloc.plan(sd.ids, prompts=sd.texts, budget=m * n_min, step=sd.step).p_mean
                        scored[shared].append((p_mean, sd.successes, sd.trials, is_seen))
            for alloc in (*strat_allocs.values(), *pred_allocs.values()):
                _ingest(alloc, sd)
            seen.update(sd.ids)
            if on_step is not None:
                on_step(k + 1, len(steps))
    finally:
        for f in files.values():
            f.close()
    predictors = {name: _score(parts) for name, parts in scored.items()}
    strategies = {name: _summary(t, tokens_known) for name, t in totals.items()}
    return predictors, strategies, info


def _counterfactual_step(
    alloc: Allocator,
    sd: StepData,
    budget: int,
    tokens_known: bool,
    tot: _Totals,
    sink: TextIO | None,
) -> np.ndarray | None:
    """Plan one step for one strategy at the logged budget (and at the logged tokens); add to ``tot``.

    Returns the plan's ``p_mean`` (``None`` when the strategy cannot plan this step; the reason is kept)."""
    try:
        plan = alloc.plan(sd.ids, prompts=sd.texts, budget=budget, step=sd.step)
    except ValueError as exc:
        tot.skipped.append(f"step {sd.step}: {exc}")
        return None
    counts = plan.counts
    logged = sd.trials
    zero = sd.zero
    real_len = sd.mean_tokens
    logged_var = alloc.expected_variance(plan.p_mean, logged)
    # the length model's expected tokens per rollout (None until the history holds a length)
    l_hat = plan.expected_lengths if tokens_known else None
    moved = int((logged[zero] - counts[zero]).sum())
    tok_moved = float(((logged - counts) * real_len)[zero].sum()) if l_hat is not None else 0.0
    tot.exp_var += plan.expected_variance
    tot.uni_var += plan.uniform_variance
    tot.logged_var += logged_var
    tot.rollouts += int(counts.sum())
    tot.rollouts_moved += moved
    tot.tokens_moved += tok_moved
    tot.dropped += int((counts == 0).sum())
    tot.steps += 1
    row: dict[str, Any] = {
        "step": sd.step,
        "prompts": len(sd.ids),
        "budget": budget,
        "variance_ratio": plan.variance_ratio,
        "variance_ratio_vs_logged": _ratio(plan.expected_variance, logged_var),
        "rollouts_moved_from_zero_variance": moved,
        "dropped": int((counts == 0).sum()),
    }
    tok_counts = None
    if l_hat is not None:
        hind = float((counts * real_len).sum())
        tot.tokens_hindsight += hind
        target = float((logged * l_hat).sum())  # predicted cost of the logged allocation
        row["tokens_moved_from_zero_variance"] = tok_moved
        tok_plan = None
        if tot.tok_refused is None and target > 0:
            try:
                tok_plan = alloc.plan(sd.ids, prompts=sd.texts, token_budget=target, step=sd.step)
            except ValueError as exc:  # e.g. vip_authors: no token mode (the reason is reported once)
                tot.tok_refused = str(exc)
        tok_counts = None if tok_plan is None else np.asarray(tok_plan.counts, np.int64)
        if tok_plan is not None and tok_counts is not None:
            gap = float(tok_plan.optimality_gap)
            if math.isfinite(gap):
                tot.tok_gap_max = max(tot.tok_gap_max, gap)
            tv = alloc.expected_variance(plan.p_mean, tok_counts)
            tot.tok_rollouts += int(tok_counts.sum())
            tot.tok_exp_var += tv
            tot.tok_pred_tokens += float((tok_counts * l_hat).sum())
            tot.tok_target_tokens += target
            tot.tok_hindsight += float((tok_counts * real_len).sum())
            tm = float(((logged - tok_counts) * real_len)[zero].sum())
            tot.tok_moved += tm
            row.update(
                {
                    "same_tokens_rollouts": int(tok_counts.sum()),
                    "same_tokens_variance_ratio": _ratio(tv, plan.uniform_variance),
                    "same_tokens_tokens_moved_from_zero_variance": tm,
                    "same_tokens_optimality_gap": gap if math.isfinite(gap) else None,
                }
            )
    tot.per_step.append(row)
    if sink is not None:
        for i, pid in enumerate(sd.ids):
            rec = {
                "step": sd.step,
                "prompt_id": pid,
                "n_logged": int(logged[i]),
                "successes_logged": int(sd.successes[i]),
                "n_same_rollouts": int(counts[i]),
                "n_same_tokens": None if tok_counts is None else int(tok_counts[i]),
                "p_mean": round(float(plan.p_mean[i]), 6),
            }
            sink.write(json.dumps(rec) + "\n")
    return plan.p_mean


def _summary(t: _Totals, tokens_known: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "steps_planned": t.steps,
        "steps_skipped": len(t.skipped),
        "skip_reasons": t.skipped[:3],
        "rollouts": t.rollouts,
        "variance_ratio": _ratio(t.exp_var, t.uni_var),
        "variance_ratio_vs_logged": _ratio(t.exp_var, t.logged_var),
        "rollouts_moved_from_zero_variance": t.rollouts_moved,
        "tokens_moved_from_zero_variance": t.tokens_moved if tokens_known else None,
        "tokens_at_realised_lengths": t.tokens_hindsight if tokens_known else None,
        "dropped_prompt_steps": t.dropped,
        "same_token_budget": None,
    }
    if tokens_known and t.tok_target_tokens > 0:
        out["same_token_budget"] = {
            "rollouts": t.tok_rollouts,
            "variance_ratio": _ratio(t.tok_exp_var, t.uni_var),
            "predicted_tokens": t.tok_pred_tokens,
            "target_tokens": t.tok_target_tokens,
            "tokens_at_realised_lengths": t.tok_hindsight,
            "tokens_moved_from_zero_variance": t.tok_moved,
            "max_optimality_gap": t.tok_gap_max,
        }
    elif tokens_known and t.tok_refused is not None:
        out["same_token_budget_refused"] = t.tok_refused
    out["per_step"] = t.per_step
    return out


def _score(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Next-step scores over every scored group, split by prompts seen before / new, and calibration bins."""
    if not parts:
        return {"brier": None, "count": 0, "note": "needs at least two steps"}
    p = np.concatenate([x[0] for x in parts])
    s = np.concatenate([x[1] for x in parts])
    n = np.concatenate([x[2] for x in parts])
    seen = np.concatenate([x[3] for x in parts])

    def metrics(mask: np.ndarray) -> dict[str, Any]:
        r = calibration_metrics(p[mask], s[mask], n[mask])
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}

    allm = metrics(np.ones(len(p), bool))
    out: dict[str, Any] = {
        "brier": allm["brier"],
        "log_loss": allm["log_loss"],
        "mae_rate": allm["mae_rate"],
        "spearman_rate": allm["spearman_rate"],
        "count": allm["count"],
        "brier_seen": metrics(seen)["brier"],
        "count_seen": int(seen.sum()),
        "brier_new": metrics(~seen)["brier"],
        "count_new": int((~seen).sum()),
    }
    edges = np.linspace(0.0, 1.0, _CAL_BINS + 1)
    b = np.clip(np.digitize(p, edges[1:-1]), 0, _CAL_BINS - 1)
    bins = []
    for i in range(_CAL_BINS):
        sel = b == i
        if sel.any():  # rollout-weighted: a bin's observed rate is its successes over its rollouts
            bins.append(
                {
                    "lo": float(edges[i]),
                    "hi": float(edges[i + 1]),
                    "groups": int(sel.sum()),
                    "rollouts": int(n[sel].sum()),
                    "p_mean": float(np.average(p[sel], weights=n[sel])),
                    "observed": float(s[sel].sum() / n[sel].sum()),
                }
            )
    out["calibration"] = bins
    return out
