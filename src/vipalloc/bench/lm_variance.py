"""Part (a) of ``vipalloc bench lm``: the measured variance of the batch gradient under each allocation, resampled
from a fixed-policy pool of real SmolLM2 rollouts, against the variance model's ratio.

For a plan with counts ``n_i`` a resample draws ``n_i`` of prompt ``i``'s pool rollouts with replacement (so the
pool's success rate is exactly the ``p`` of the draw; every strategy draws from the same stream, common random
numbers, so differences between strategies are measured pairwise) and forms the batch gradient ``G = sum_i g_i`` with
``g_i = (1/n_i) sum_j A_ij s_ij`` (``A``: the Dr.GRPO or RLOO advantage, ``s``: sketched score vectors) -- the
estimator :mod:`vipalloc.variance` models. Over ``R`` resamples we measure ``tr Cov(G)`` and the mean cosine between
``G`` and the whole-pool gradient (every pool rollout, same estimator). Intervals: percentile bootstrap over the
resamples. Plans come from ``Allocator`` only: single-phase strategies plan once (the plan does not depend on the
draw); ``vip_two_phase`` plans its pilot, observes the drawn pilot rewards and commits, per resample.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vipalloc import Allocator
from vipalloc.bench.lm_pool import Pool
from vipalloc.history import RolloutHistory

__all__ = ["VarianceRow", "group_gradient", "measure_variance", "reference_gradient"]

SINGLE = ("uniform", "vip", "vip_pure", "knapsack")
TWO_PHASE = ("vip_two_phase",)


def group_gradient(rewards: np.ndarray, scores: np.ndarray, estimator: str) -> np.ndarray:
    """``(1/n) sum_j A_j s_j`` of one group (``rewards`` (n,), ``scores`` (n, d)); zeros for n < 2."""
    n = rewards.size
    if n < 2:
        return np.zeros(scores.shape[1], np.float64)
    if estimator == "drgrpo":
        adv = rewards - rewards.mean()
    elif estimator == "rloo":
        adv = rewards - (rewards.sum() - rewards) / (n - 1)
    else:
        raise ValueError(f"estimator must be drgrpo or rloo, got {estimator!r}")
    return (adv @ scores.astype(np.float64)) / n


def reference_gradient(pool: Pool) -> np.ndarray:
    """The batch's expected gradient as the pool estimates it without bias: every pool rollout, RLOO advantages
    (``sum_i (1/N) sum_j (r_ij - mean of the others) s_ij``, whose mean is ``sum_i E[r s]`` with no ``(N-1)/N``
    shrinkage), float64 ``(d,)``. The target of the measured squared error, for both estimators."""
    out = np.zeros(pool.sketches.shape[2], np.float64)
    for i in range(len(pool.prompt_ids)):
        out += group_gradient(pool.rewards[i], pool.sketches[i], "rloo")
    return out


@dataclass
class VarianceRow:
    strategy: str
    predictor: str
    estimator: str
    trace: float  # measured tr Cov(G)
    trace_ci: tuple[float, float]
    ratio: float  # measured trace / uniform's measured trace
    ratio_ci: tuple[float, float]
    modelled: float  # mean Plan.variance_ratio (the allocator's own model at its predictions)
    modelled_pool_p: float  # the model's ratio at the pool's rates (sum f(p, n) / sum f(p, uniform))
    cosine: float  # mean cos(G, whole-pool gradient)
    cosine_ci: tuple[float, float]
    dropped: float  # mean prompts with no rollouts
    counts: list[float] = field(default_factory=list)  # mean group size per prompt
    mean_n: int = 0  # the budget, rollouts a prompt on average
    error_ratio: float = float("nan")  # measured E|G - g|^2 over uniform's (g: reference_gradient)
    error_ratio_ci: tuple[float, float] = (float("nan"), float("nan"))
    best_error_ratio: float = float("nan")  # measured error at the best step size over uniform's
    best_error_ratio_ci: tuple[float, float] = (float("nan"), float("nan"))
    modelled_error: float = float("nan")  # mean Plan.error_ratio (variance plus lost signal, best step size)


def _allocator(strategy: str, predictor: str, estimator: str, pool: Pool, n_min: int, n_max: int) -> Allocator:
    kwargs: dict[str, Any] = {}
    if predictor == "oracle":
        kwargs["predictor_kwargs"] = {"true_p": dict(zip(pool.prompt_ids, pool.p.tolist()))}
    alloc = Allocator(
        strategy=strategy, predictor=predictor, estimator=estimator, n_min=n_min, n_max=n_max, seed=0, **kwargs
    )
    if predictor != "oracle":  # the predictors learn from each prompt's prior rollouts (an earlier visit)
        hist = RolloutHistory()
        for pid, q, r in zip(pool.prompt_ids, pool.questions, pool.prior_rewards):
            hist.append(0, pid, r, prompt=q)
        alloc.ingest_history(hist)
    return alloc


def _trace(g: np.ndarray) -> float:
    return float(g.var(axis=0, ddof=1).sum())


def _sq_err(g: np.ndarray, ref: np.ndarray) -> float:
    return float(((g - ref) ** 2).sum(axis=1).mean())


def _best_err(g: np.ndarray, ref: np.ndarray) -> float:
    """``min_c E|c G - g|^2 / |g|^2 = 1 - E<G, g>^2 / (|g|^2 E|G|^2)`` (the error at the best step size)."""
    num = float((g @ ref).mean()) ** 2
    den = float((ref @ ref) * (g * g).sum(axis=1).mean())
    return 1.0 - num / den if den > 0 else 1.0


def _ci(x: np.ndarray) -> tuple[float, float]:
    return float(np.quantile(x, 0.025)), float(np.quantile(x, 0.975))


def measure_variance(
    pool: Pool,
    *,
    mean_n: int,
    n_min: int,
    n_max: int,
    resamples: int,
    boots: int,
    seed: int,
    predictors: Sequence[str] = ("oracle", "gp"),
    estimators: Sequence[str] = ("drgrpo", "rloo"),
    strategies: Sequence[str] = SINGLE + TWO_PHASE,
    progress: Callable[[str], None] = print,
) -> list[VarianceRow]:
    """Measured vs modelled variance and gradient error for every (estimator, predictor, strategy), uniform first,
    at ``mean_n`` rollouts a prompt. Any registered strategy name works; two-phase ones (``Strategy.two_phase``)
    re-plan their commit from each resample's drawn pilot."""
    m, pool_n = pool.rewards.shape
    budget = m * mean_n
    p = pool.p
    rows: list[VarianceRow] = []
    ref_g = reference_gradient(pool)
    for ei, est in enumerate(estimators):
        full = sum(group_gradient(pool.rewards[i], pool.sketches[i], est) for i in range(m))
        full_norm = float(np.linalg.norm(full)) or 1.0
        for pi, pred in enumerate(predictors):
            base: dict[str, Any] = {}
            order = ["uniform"] + [s for s in strategies if s != "uniform"]
            for strat in order:
                # common random numbers: resample r of prompt i takes the first n_i entries of the same row of draws
                # for every strategy, so an allocation equal to uniform's measures exactly 1 and the others are
                # compared pairwise (two-phase: the pilot takes the first entries, the commit the next ones)
                draws = np.random.default_rng([seed, ei, pi]).integers(0, pool_n, (resamples, m, n_max))
                alloc0 = _allocator(strat, pred, est, pool, n_min, n_max)
                two_phase = alloc0.strategy.two_phase
                g = np.zeros((resamples, pool.sketches.shape[2]))
                sizes = np.zeros((resamples, m))
                modelled = np.zeros(resamples)
                modelled_err = np.zeros(resamples)
                plan = None if two_phase else alloc0.plan(pool.prompt_ids, pool.questions, budget, step=1)
                for r in range(resamples):
                    if plan is not None:
                        counts = plan.counts
                        idx = [draws[r, i, : int(c)] for i, c in enumerate(counts)]
                        modelled[r] = plan.variance_ratio
                        modelled_err[r] = plan.error_ratio
                    else:
                        alloc = copy.deepcopy(alloc0)
                        pilot = alloc.plan_pilot(pool.prompt_ids, pool.questions, budget, step=1, pilot_n=2)
                        idx = [draws[r, i, : int(c)] for i, c in enumerate(pilot.counts)]
                        kept = [i for i, c in enumerate(pilot.counts) if c > 0]
                        alloc.observe(
                            [pool.prompt_ids[i] for i in kept], [pool.rewards[i, idx[i]] for i in kept], step=1
                        )
                        commit = alloc.plan_commit(step=1)
                        idx = [draws[r, i, : int(pilot.counts[i]) + int(c)] for i, c in enumerate(commit.counts)]
                        counts = commit.group_sizes
                        modelled[r] = commit.variance_ratio
                        modelled_err[r] = commit.error_ratio
                    sizes[r] = counts
                    g[r] = sum(
                        group_gradient(pool.rewards[i, ix], pool.sketches[i, ix], est) for i, ix in enumerate(idx)
                    )
                if strat == "uniform":
                    base = {"g": g, "counts": sizes[0].astype(np.int64)}
                ref = Allocator(strategy="uniform", predictor="empirical", estimator=est, n_min=n_min, n_max=n_max)
                model_pool = np.mean(
                    [ref.expected_variance(p, s.astype(np.int64)) for s in sizes[: min(resamples, 64)]]
                ) / max(ref.expected_variance(p, base["counts"]), 1e-300)
                cos = (g @ full) / (np.linalg.norm(g, axis=1).clip(1e-300) * full_norm)
                brng = np.random.default_rng([seed, 99, ei, pi])
                ug = base["g"]
                own = [brng.integers(0, resamples, resamples) for _ in range(boots)]
                other = own  # paired bootstrap: resample r of this strategy shares its draws with uniform's
                tr_boot = np.array([_trace(g[ix]) for ix in own])
                ratio_boot = tr_boot / np.array([_trace(ug[ix]) for ix in other])
                err_boot = np.array([_sq_err(g[a], ref_g) / _sq_err(ug[b], ref_g) for a, b in zip(own, other)])
                best_boot = np.array(
                    [_best_err(g[a], ref_g) / max(_best_err(ug[b], ref_g), 1e-300) for a, b in zip(own, other)]
                )
                cos_boot = np.array([float(cos[ix].mean()) for ix in own])
                tr = _trace(g)
                rows.append(
                    VarianceRow(
                        strategy=strat,
                        predictor=pred,
                        estimator=est,
                        trace=tr,
                        trace_ci=_ci(tr_boot),
                        ratio=tr / _trace(ug),
                        ratio_ci=_ci(ratio_boot),
                        modelled=float(modelled.mean()),
                        modelled_pool_p=float(model_pool),
                        cosine=float(cos.mean()),
                        cosine_ci=_ci(cos_boot),
                        dropped=float((sizes == 0).sum(axis=1).mean()),
                        counts=sizes.mean(axis=0).round(2).tolist(),
                        mean_n=mean_n,
                        error_ratio=_sq_err(g, ref_g) / _sq_err(ug, ref_g),
                        error_ratio_ci=_ci(err_boot),
                        best_error_ratio=_best_err(g, ref_g) / max(_best_err(ug, ref_g), 1e-300),
                        best_error_ratio_ci=_ci(best_boot),
                        modelled_error=float(modelled_err.mean()),
                    )
                )
                progress(
                    f"variance: {mean_n}/prompt {est} {pred} {strat}: error ratio {rows[-1].error_ratio:.3f} "
                    f"(best step {rows[-1].best_error_ratio:.3f}, modelled {rows[-1].modelled_error:.3f}) "
                    f"variance ratio {rows[-1].ratio:.3f} (modelled {rows[-1].modelled:.3f}) cos {rows[-1].cosine:.3f}"
                )
    return rows
