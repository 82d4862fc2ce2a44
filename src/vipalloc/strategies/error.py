"""``vip_error``: the exact plan for the step's gradient error, the signal a plan gives up counted beside its noise.

Objective (derivation: ``docs/variance.md``, "The gradient error"): the squared error of the step's gradient
estimate ``G_hat = sum_i g_hat_i`` against the batch's expected gradient ``G = sum_i g_i``, at the step size that
makes it smallest (the trainer's learning rate absorbs any scale)::

    min_c E|c G_hat - G|^2  =  |G|^2 - N^2 / D,    N = G . E[G_hat] = sum_i N_i(n_i),   D = E|G_hat|^2 = sum_i D_i(n_i)

with prompts' signals orthogonal. Per prompt (units of the score noise, :mod:`vipalloc.gradient_error`):
``N_i(n) = rho E[S a(P)] / d`` and ``D_i(n) = (E[S] + rho E[S^2]) / d^2`` (``d = n`` Dr.GRPO, ``n - 1`` RLOO),
both 0 for a dropped prompt. A prompt that cannot produce a gradient (``p`` exactly 0 or 1) has ``N = D = 0``
whatever its count, so rollouts are never parked on it while an informative prompt can use them; a prompt whose
prediction is uncertain (``p_std`` from the predictor, groups Beta-Binomial) keeps the signal it may carry.

Maximising ``N^2 / D`` is a fractional program: ``N^2 / D = max_lam (2 lam N - lam^2 D)``, and for a fixed
``lam`` the plan is the exact minimiser of the separable ``sum_i lam D_i(n_i) - 2 N_i(n_i)``
(:func:`vipalloc.allocation.minimize_separable`, or the token program). The plan is the best over a log grid of
``lam`` around uniform's ``N / D``, refined by Dinkelbach's iteration ``lam <- N / D`` (each step never lowers
``N^2 / D``); tests check it against brute force.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from vipalloc.allocation import domain, minimize_separable
from vipalloc.gradient_error import DEFAULT_SIGNAL_RATIO, check_signal_ratio, signal_terms
from vipalloc.strategies.base import (
    P_CLIP,
    AllocationContext,
    Ctx,
    StrategyBase,
    TokenCounts,
    check_call,
    equal_classes,
    no_information,
    table_tokens,
    uniform_counts,
)
from vipalloc.strategies.uniform import uniform_token_counts

__all__ = ["VIPError", "best_plan", "signal_to_noise"]

_GRID = np.geomspace(1 / 16, 16, 17)  # multiples of uniform's lam tried before refining
_MAX_REFINE = 50


def signal_to_noise(n_terms: np.ndarray, d_terms: np.ndarray) -> float:
    """``N^2 / D`` of a plan from its per-prompt terms (0 when nothing is kept)."""
    d = float(np.sum(d_terms))
    return float(np.sum(n_terms)) ** 2 / d if d > 0 else 0.0


@dataclass
class VIPError(StrategyBase):
    """VIP's exact program (arXiv 2602.01601) on the gradient error at the best step size (module docstring): maximise
    ``(sum_i N_i)^2 / sum_i D_i`` over counts in ``{0} U [n_min, n_max]`` (``allow_drop``, default) or
    ``[n_min, n_max]``, ``sum n = budget``; uniform when the predictions carry no information (``std < 1e-6``).

    ``signal_ratio`` (``rho``, default 1.0): signal-to-noise of one rollout, ``|Delta|^2 / E|eps|^2``; smaller
    values concentrate rollouts on fewer prompts, larger ones spread them (docs/strategies.md sweeps it).
    ``use_std`` (default True): take the expectation over the predictor's std of ``p`` (Beta-Binomial groups) when
    the ``Allocator`` passes it.
    """

    estimator: str = "drgrpo"
    signal_ratio: float = DEFAULT_SIGNAL_RATIO
    allow_drop: bool = True
    use_std: bool = True
    name: str = "vip_error"
    uses_context: ClassVar[bool] = True
    token_refusal: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        self.signal_ratio = check_signal_ratio(self.signal_ratio)
        for opt in ("allow_drop", "use_std"):
            if not isinstance(getattr(self, opt), (bool, np.bool_)):
                raise ValueError(f"{opt} must be True or False, got {getattr(self, opt)!r}")
        if self.estimator not in ("drgrpo", "rloo"):
            raise ValueError(f"unknown estimator {self.estimator!r}; choose 'drgrpo' or 'rloo'")

    def _tables(self, p: np.ndarray, vals: np.ndarray, context: Ctx) -> tuple[np.ndarray, np.ndarray]:
        """``N`` and ``D`` over ``vals`` ``(M, K)``. Predictions within 1e-6 of 0 or 1 count as exactly 0 or 1
        (the library's tie rule): their signal is nil, and a 1e-24 term must not steer the plan."""
        std = context.p_std if (self.use_std and context is not None) else None
        p = np.where(p < P_CLIP, 0.0, np.where(p > 1 - P_CLIP, 1.0, p))
        return signal_terms(p, vals[None, :], self.estimator, signal_ratio=self.signal_ratio, p_std=std)

    def _classes(self, p: np.ndarray, context: Ctx, *extra: np.ndarray) -> np.ndarray:
        keys = [np.clip(p, P_CLIP, 1 - P_CLIP)]  # the library's tie rule: 0 and 1e-9 are the same "never solved"
        if self.use_std and context is not None and context.p_std is not None:
            keys.append(np.asarray(context.p_std, np.float64))
        return equal_classes(np.stack([*keys, *extra], axis=1))

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        p, budget = check_call(p_hat, budget, n_min, n_max)
        if no_information(p):
            return uniform_counts(len(p), budget)
        vals = domain(n_min, n_max, self.allow_drop)
        n_tab, d_tab = self._tables(p, vals, context)
        rows = np.arange(len(p))
        start = uniform_counts(len(p), budget)

        def solve(lam: float) -> np.ndarray:
            return minimize_separable(lam * d_tab - 2.0 * n_tab, vals, budget)

        idx = best_plan(solve, n_tab, d_tab, rows, np.searchsorted(vals, start))
        counts = vals[idx]
        return _even_within_classes(counts, self._classes(p, context), vals, n_tab, d_tab)

    def _allocate_tokens(
        self, p: np.ndarray, c: np.ndarray, t: float, cap: int | None, n_min: int, n_max: int, context: Ctx
    ) -> TokenCounts:
        """The same objective under ``sum_i n_i c_i <= token_budget`` (``c``: expected tokens per rollout) and the
        optional rollout cap: every ``lam`` is solved by the token program (exact or with a certified gap, the
        largest gap of the plans compared is returned). Uniform under the same tokens without information."""
        if no_information(p):
            return TokenCounts(uniform_token_counts(c, t, n_max, cap), float("nan"))
        vals = domain(n_min, n_max, self.allow_drop)
        n_tab, d_tab = self._tables(p, vals, context)
        rows = np.arange(len(p))
        classes = self._classes(p, context, c)
        gaps: list[float] = []

        def solve(lam: float) -> np.ndarray:
            sol = table_tokens(lam * d_tab - 2.0 * n_tab, vals, c, t, cap, classes)
            gaps.append(sol.gap)
            return np.searchsorted(vals, sol.counts)

        start = uniform_token_counts(c, t, n_max, cap)
        idx = best_plan(solve, n_tab, d_tab, rows, np.searchsorted(vals, np.clip(start, n_min, n_max)))
        return TokenCounts(vals[idx], float(max(gaps)) if gaps else 0.0)


def _even_within_classes(
    counts: np.ndarray, classes: np.ndarray, vals: np.ndarray, n_tab: np.ndarray, d_tab: np.ndarray
) -> np.ndarray:
    """Equal prompts alike: each class's rollouts go evenly (within one) to ``j`` of its members, the others
    dropped, with ``j`` the best for ``N^2 / D`` (the largest on ties, so prompts that carry nothing are spread
    as widely as the counts allow). The class's total, the allowed counts ``vals`` and the objective (never lower)
    are kept. ``n_tab`` / ``d_tab``: the per-prompt terms over ``vals``, ``(M, K)``; returns int64 ``(M,)``."""
    out = np.asarray(counts, np.int64).copy()
    pos = {int(v): k for k, v in enumerate(vals)}
    n_min, n_max = int(vals[vals > 0].min()), int(vals.max())
    rows = np.arange(len(out))
    col = np.searchsorted(vals, out)
    n_sum, d_sum = float(n_tab[rows, col].sum()), float(d_tab[rows, col].sum())
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        total = int(out[members].sum())
        if members.size < 2 or total == 0:
            continue
        base_n = n_sum - float(n_tab[members, col[members]].sum())
        base_d = d_sum - float(d_tab[members, col[members]].sum())
        cur = n_sum**2 / d_sum if d_sum > 0 else 0.0
        best: tuple[float, np.ndarray] | None = None
        for j in range(min(members.size, total // n_min), -(-total // n_max) - 1, -1):
            if j == 0 or (0 not in pos and j < members.size):
                continue
            split = np.zeros(members.size, np.int64)
            split[:j] = total // j + (np.arange(j) < total % j)
            k = np.array([pos[int(v)] for v in split])
            nn = base_n + float(n_tab[members, k].sum())
            dd = base_d + float(d_tab[members, k].sum())
            val = nn**2 / dd if dd > 0 else 0.0
            if val >= cur * (1 - 1e-12) and (best is None or val > best[0] * (1 + 1e-12)):
                best = (val, split)
        if best is not None:
            out[members] = best[1]
            col[members] = np.searchsorted(vals, best[1])
            n_sum, d_sum = float(n_tab[rows, col].sum()), float(d_tab[rows, col].sum())
    return out


def best_plan(
    solve: Callable[[float], np.ndarray], n_tab: np.ndarray, d_tab: np.ndarray, rows: np.ndarray, start: np.ndarray
) -> np.ndarray:
    """Column per prompt maximising ``N^2 / D``: exact parametric solves over a grid of ``lam`` around the
    starting plan's ``N / D``, then Dinkelbach steps from the best (``lam <- N / D`` never lowers ``N^2 / D``)."""

    def score(idx: np.ndarray) -> tuple[float, float]:
        n_sum, d_sum = float(n_tab[rows, idx].sum()), float(d_tab[rows, idx].sum())
        return (n_sum**2 / d_sum if d_sum > 0 else 0.0), (n_sum / d_sum if d_sum > 0 else 0.0)

    best, (best_val, lam0) = start, score(start)
    if lam0 <= 0:  # the start carries no signal (every prompt at p in {0, 1}): any plan is as good
        return start
    for lam in lam0 * _GRID:
        idx = solve(float(lam))
        val, _ = score(idx)
        if val > best_val * (1 + 1e-12):
            best, best_val = idx, val
    lam = score(best)[1]
    for _ in range(_MAX_REFINE):
        idx = solve(lam)
        val, new_lam = score(idx)
        if val <= best_val * (1 + 1e-12):
            break
        best, best_val, lam = idx, val, new_lam
    return best
