"""Named allocation strategies behind one interface: ``allocate(p_hat, budget, n_min, n_max) -> counts``.

Every strategy returns int64 counts of shape ``(M,)`` that sum to ``budget`` exactly and respect
``n_min <= n <= n_max``; only ``vip`` and ``vip_authors`` may also return 0 = dropped, and then every kept prompt
gets at least ``max(n_min, min_keep)`` (where no such plan exists the minimum is relaxed to ``n_min`` and the
strategy's ``last_min_keep_relaxed`` is set, which the ``Allocator`` copies to ``Plan.min_keep_relaxed``). Feasible
budgets are ``[M * n_min, M * n_max]``.

Prompts with equal predictions are treated alike by every strategy (predictions beyond the clip ``[1e-6, 1-1e-6]``
count as equal: 0 and 1e-9 are the same "never solved"): their counts differ by at most one, except where dropping
and the budget force some of them to 0 and the others to at least the minimum (then as few as possible are dropped).
Exact strategies stay exact: with a discretely convex cost per prompt, spreading a group of equal prompts evenly
never costs more (Jensen), so the even split is among the optima.

Strategies that need more than ``p_hat`` (``dynamo``: reward-history variances; ``hora``: the predictor's std) set
``uses_context = True`` and accept ``allocate(..., context=AllocationContext(...))``, which ``Allocator.plan`` fills;
the others are called with the four arguments only.

| name | rule | source |
|---|---|---|
| ``uniform`` | ``budget // M`` each, remainder +1 to the first prompts | GRPO (arXiv 2402.03300) / RLOO / Dr.GRPO |
| ``vip`` | exact min of variance + ``gamma log(p) n``, authors' two-stage drop, kept n >= 4 | VIP, arXiv 2602.01601 |
| ``vip_pure`` | exact min of the estimator's variance only, no bonus, no drop | VIP's variance objective |
| ``inverse_acc`` | min ``sum n log p`` (linear: hardest prompts to n_max) | VIP ablation |
| ``inverse_var`` | min ``sum n log(p(1-p))`` (lowest-variance prompts to n_max) | VIP ablation |
| ``knapsack`` | max ``sum (1-p^n-(1-p)^n) p (1-p)^2``, exact; leftovers to p = 0 | Knapsack-RL, arXiv 2509.25849 |
| ``gvm`` | ``n ~ 1/sqrt(p + a/p^(b-1))``, a=1e-3, b=2, clipped, exact-sum rounding | GVM-RAFT, arXiv 2505.02391 |
| ``vip_authors`` | the authors' procedure: exact continuous optimum, floor, ``n < 4 -> 0``, legacy greedy | VIP code |
| ``dynamo`` | ``n ~ sigma_i``, mean ``k(G-k)/(G(G-1))`` of the prompt's past groups, water-filled | arXiv 2602.19208 |
| ``hora`` | max ``sum P(>= 1 success in n_i)`` under each prompt's Beta posterior, exact (concave) | arXiv 2605.07114 |

``vip`` and ``vip_pure`` return the uniform plan when the predictions carry no information (``std(p_hat) < 1e-6``,
as on the first step), like the authors' code. Ties are broken toward earlier prompts; the ``Allocator`` shuffles
prompts with a seeded per-step permutation, so no prompt is favoured systematically. Details and a worked example:
``docs/strategies.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vipalloc.allocation import (
    N_MAX_LIMIT,
    _check_bonus,
    _check_budget,
    _check_p,
    domain,
    minimize_separable,
    solve,
)
from vipalloc.authors import authors_allocate, equal_classes

__all__ = [
    "HARDNESS_BONUS",
    "STRATEGY_NAMES",
    "TWO_PHASE_STRATEGIES",
    "AllocationContext",
    "Strategy",
    "balance_ties",
    "get_strategy",
    "tie_classes",
    "uniform_counts",
]

P_CLIP = 1e-6  # as the authors clip p inside log(p)
HARDNESS_BONUS = {"rloo": 7e-4, "drgrpo": 4e-4}  # the authors' final gamma per estimator
NO_INFO_STD = 1e-6  # std(p_hat) below this = every prompt looks the same (the authors' first-step rule)


class Strategy(Protocol):
    """An allocation rule: predicted success probabilities ``(M,)`` -> int64 rollout counts ``(M,)``."""

    name: str

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray: ...


@dataclass(frozen=True)
class AllocationContext:
    """Per-prompt information beyond ``p_hat``, aligned with it (every array has shape ``(M,)``; None = unknown).

    ``p_std``: the predictor's std of ``p`` (>= 0). ``successes`` / ``trials``: the prompt's successful and total
    rollouts in the history window before this step (int64). ``group_sigma``: the mean over the prompt's past groups
    of ``k (G - k) / (G (G - 1))`` (``k`` successes of ``G >= 2`` rollouts), NaN where it has no such group.
    """

    p_std: np.ndarray | None = None
    successes: np.ndarray | None = None
    trials: np.ndarray | None = None
    group_sigma: np.ndarray | None = None

    def take(self, idx: np.ndarray) -> AllocationContext:
        """The context of the prompts ``idx`` (e.g. a permutation), in that order."""
        pick = lambda v: None if v is None else np.asarray(v)[idx]  # noqa: E731
        return AllocationContext(pick(self.p_std), pick(self.successes), pick(self.trials), pick(self.group_sigma))

    @classmethod
    def from_history(
        cls,
        prompt_ids: list[str],
        p_std: np.ndarray | None,
        history_ids: list[str],
        rows: dict[str, np.ndarray],
    ) -> AllocationContext:
        """Build it from a history's raw rows (``RolloutHistory.rows``: ``prompt_index`` into ``history_ids``,
        ``successes``, ``trials``, ``step``; the rows of one (step, prompt) are one group, as a two-phase step writes
        its pilot and its commit in two rows). Prompts absent from the history get 0 trials, NaN sigma."""
        pos = {pid: i for i, pid in enumerate(history_ids)}
        h = len(history_ids)
        pid = np.asarray(rows["prompt_index"], np.int64)
        s = np.asarray(rows["successes"], np.float64)
        t = np.asarray(rows["trials"], np.float64)
        if "step" in rows and pid.size:  # a two-phase step writes a group in two rows (pilot, commit): merge them
            keys, inv = np.unique(np.stack([np.asarray(rows["step"], np.int64), pid], 1), axis=0, return_inverse=True)
            inv = inv.reshape(-1)
            pid = keys[:, 1]
            s, t = np.bincount(inv, weights=s).astype(np.float64), np.bincount(inv, weights=t).astype(np.float64)
        succ = np.bincount(pid, weights=s, minlength=h)
        trials = np.bincount(pid, weights=t, minlength=h)
        grp = t >= 2
        var = np.where(grp, s * (t - s) / np.where(grp, t * (t - 1), 1.0), 0.0)
        n_grp = np.bincount(pid, weights=grp.astype(np.float64), minlength=h)
        sig_sum = np.bincount(pid, weights=var, minlength=h)
        with np.errstate(invalid="ignore", divide="ignore"):
            sigma = np.where(n_grp > 0, sig_sum / np.maximum(n_grp, 1), np.nan)
        at = np.array([pos.get(p, -1) for p in prompt_ids], np.int64)
        seen = at >= 0
        out_s, out_t = np.zeros(len(at), np.int64), np.zeros(len(at), np.int64)
        out_sig = np.full(len(at), np.nan)
        out_s[seen], out_t[seen], out_sig[seen] = succ[at[seen]], trials[at[seen]], sigma[at[seen]]
        return cls(None if p_std is None else np.asarray(p_std, np.float64), out_s, out_t, out_sig)


def tie_classes(p: np.ndarray) -> np.ndarray:
    """Class label per prompt (int64 ``(M,)``): equal after the clip to ``[1e-6, 1-1e-6]`` = same class."""
    return equal_classes(np.clip(p, P_CLIP, 1 - P_CLIP))


def balance_ties(counts: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Spread each class's total evenly over its members (within one; earlier members get the extra units).

    Keeps the sum and the bounds; for a discretely convex per-prompt cost it never raises the objective."""
    out = np.asarray(counts, np.int64).copy()
    classes = np.asarray(classes, np.int64)
    k = np.bincount(classes)
    if k.max() <= 1:
        return out
    order = np.argsort(classes, kind="stable")  # members of each class adjacent, in index order
    total = np.bincount(classes, weights=out).astype(np.int64)
    starts = np.r_[0, np.cumsum(k)[:-1]]
    rank = np.arange(len(out)) - starts[classes[order]]  # position of each member within its class
    c = classes[order]
    out[order] = total[c] // k[c] + (rank < total[c] % k[c])
    return out


def _check(p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> tuple[np.ndarray, int]:
    """Validate a strategy call; returns ``(p, budget)``. Raises ``ValueError`` naming the problem and the fix."""
    p = _check_p(p_hat)
    budget = _check_budget(budget)
    for name, v in (("n_min", n_min), ("n_max", n_max)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if n_min < 2 or n_min > n_max:
        raise ValueError(f"need 2 <= n_min <= n_max (a group needs 2 rollouts for a baseline), got {n_min}, {n_max}")
    if n_max > N_MAX_LIMIT:
        raise ValueError(f"n_max ({n_max}) is above the supported {N_MAX_LIMIT} rollouts per prompt; lower it")
    m = len(p)
    if not (m * n_min <= budget <= m * n_max):
        raise ValueError(
            f"budget {budget} is infeasible for {m} prompts with n in [{n_min}, {n_max}]: "
            f"feasible budgets lie in [{m * n_min}, {m * n_max}]; change the budget or the bounds"
        )
    return p, budget


def check_vip_options(hardness_bonus: float | None, min_keep: int, allow_drop: bool | None = None) -> float | None:
    """Validate the options the VIP-family strategies share; returns the checked ``hardness_bonus`` (None = the
    authors' gamma for the estimator). ``allow_drop=None``: the strategy has no such option."""
    bonus = None if hardness_bonus is None else _check_bonus(hardness_bonus)
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, np.integer)) or min_keep < 2:
        raise ValueError(f"min_keep must be an integer >= 2, got {min_keep!r}")
    if allow_drop is not None and not isinstance(allow_drop, (bool, np.bool_)):
        raise ValueError(f"allow_drop must be True or False, got {allow_drop!r}")
    return bonus


def uniform_counts(m: int, budget: int) -> np.ndarray:
    """``budget // m`` each; the remainder goes +1 to the first prompts. int64 ``(m,)``."""
    counts = np.full(m, budget // m, dtype=np.int64)
    counts[: budget % m] += 1
    return counts


def _no_information(p: np.ndarray) -> bool:
    return float(np.std(p)) < NO_INFO_STD


@dataclass
class Uniform:
    """The same number of rollouts for every prompt: the group size of GRPO (Shao et al., arXiv 2402.03300),
    RLOO and Dr.GRPO. Rule: ``budget // M`` each, the remainder +1 to the first ``budget % M`` prompts."""

    name: str = "uniform"

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        return uniform_counts(len(p), budget)


@dataclass
class VIP:
    """VIP (Variance-Informed Predictive allocation, arXiv 2602.01601) with the authors' final settings.

    Rule: minimise ``sum_i Var(p_i, n_i) + gamma * log(clip(p_i, 1e-6, 1-1e-6)) * n_i`` (``Var`` of the chosen
    estimator; ``gamma`` = 7e-4 for RLOO, 4e-4 for Dr.GRPO, their hardness bonus) exactly in integers, with
    ``sum n = budget``. With ``allow_drop`` (default) prompts may be dropped and kept ones get at least
    ``max(n_min, min_keep)`` (``min_keep`` = 4). Uniform when all predictions are equal (``std < 1e-6``). ``p`` is
    clipped to ``[1e-6, 1-1e-6]`` before anything (as the authors do), so ``a = p (1 - p) > 0``.

    Where no plan keeps every kept prompt at ``>= max(n_min, min_keep)`` (``ceil(budget / n_max) >
    budget // max(n_min, min_keep)``, e.g. ``allocate([.1, .5, .9], 6, 2, 4)``), the minimum is relaxed: one exact
    solve on ``[n_min, n_max]`` without drops, and ``last_min_keep_relaxed`` is set (``Plan.min_keep_relaxed``).

    Dropping follows the authors' two-stage structure (their SLSQP solution, then "any n < 4 -> 0" and the budget
    handed back), each stage solved exactly: (1) the optimum with every prompt kept on ``[2, n_max]``; (2) prompts
    whose stage-1 count is below ``max(n_min, min_keep)`` are dropped (a group of equal prompts as one: dropped when
    its mean stage-1 count is below; fewer if the rest could not absorb the budget) and the budget is re-solved
    exactly over the kept prompts on ``[max(n_min, min_keep), n_max]``. The
    one-shot program with 0 in every prompt's domain (``solve(..., allow_drop=True)``) is degenerate here: a dropped
    prompt costs 0 while a kept one costs its positive variance, so it drops the informative mid-p prompts (on a
    Beta(0.6, 0.6) batch it drops 75% of them, every prompt with p >= 0.2; docs/strategies.md).
    """

    estimator: str = "drgrpo"
    hardness_bonus: float | None = None
    allow_drop: bool = True
    min_keep: int = 4
    name: str = "vip"
    last_min_keep_relaxed: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.hardness_bonus = check_vip_options(self.hardness_bonus, self.min_keep, self.allow_drop)

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        self.last_min_keep_relaxed = False
        m = len(p)
        if _no_information(p):
            return uniform_counts(m, budget)
        bonus = HARDNESS_BONUS[self.estimator] if self.hardness_bonus is None else float(self.hardness_bonus)
        pc = np.clip(p, P_CLIP, 1 - P_CLIP)
        cls = equal_classes(pc)

        def exact(idx: np.ndarray, lo: int, hi: int) -> np.ndarray:
            out = solve(pc[idx], budget, n_min=lo, n_max=hi, estimator=self.estimator, hardness_bonus=bonus)
            return balance_ties(out, cls[idx])

        every = np.arange(m)
        if not self.allow_drop:
            return exact(every, n_min, n_max)
        lo = min(max(n_min, int(self.min_keep)), n_max)
        # Keep j prompts; j must let the kept prompts absorb the budget within [lo, n_max]:
        # ceil(budget / n_max) <= j <= budget // lo.
        j_min, j_max = -(-budget // n_max), min(m, budget // lo)
        if j_min > j_max:  # no kept set fits [lo, n_max] (lo close to n_max): keep everyone on [n_min, n_max]
            self.last_min_keep_relaxed = True
            return exact(every, n_min, n_max)
        stage1 = exact(every, 2, n_max)
        # A group of equal prompts is kept or dropped as one, by its mean stage-1 count (a singleton: its count).
        k = np.bincount(cls)
        mean1 = np.bincount(cls, weights=stage1) / k
        keep_mask = (mean1 >= lo)[cls]
        j = int(keep_mask.sum())
        if not (j_min <= j <= j_max):  # the budget forces more or fewer: the most-served groups first
            order = np.lexsort((every, cls, -mean1[cls]))  # members of a group adjacent; earlier groups on ties
            keep_mask = np.zeros(m, bool)
            keep_mask[order[: min(max(j, j_min), j_max)]] = True
        keep = np.flatnonzero(keep_mask)
        counts = np.zeros(m, np.int64)
        counts[keep] = exact(keep, lo, n_max)
        return counts


@dataclass
class VIPPure:
    """VIP's variance objective alone (arXiv 2602.01601, Sec. 3): the exact integer minimiser of
    ``sum_i Var(p_i, n_i)`` for the chosen estimator, no hardness bonus, no dropping; uniform when all predictions
    are equal (``std < 1e-6``). ``p`` is clipped to ``[1e-6, 1-1e-6]`` first, so predictions of 0 or 1 keep a
    (tiny) variance that decreases with ``n`` instead of a flat zero whose split would be arbitrary."""

    estimator: str = "drgrpo"
    name: str = "vip_pure"

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        if _no_information(p):
            return uniform_counts(len(p), budget)
        pc = np.clip(p, P_CLIP, 1 - P_CLIP)
        return balance_ties(solve(pc, budget, n_min=n_min, n_max=n_max, estimator=self.estimator), tie_classes(pc))


def _linear_allocate(score: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
    """Exact minimiser of the linear ``sum_i score_i n_i``: everyone gets ``n_min``, then groups of equal score in
    increasing score order are filled to ``n_max``; the group where the budget runs out shares the rest evenly
    (earlier prompts first), so equal prompts are treated alike (any split among equal scores is optimal)."""
    m = len(score)
    counts = np.full(m, n_min, dtype=np.int64)
    left = budget - m * n_min
    uniq, inv = np.unique(score, return_inverse=True)
    inv = inv.ravel()
    for g in range(len(uniq)):
        if left <= 0:
            break
        members = np.flatnonzero(inv == g)
        take = min(left, len(members) * (n_max - n_min))
        counts[members] += uniform_counts(len(members), take)
        left -= take
    return counts


@dataclass
class InverseAcc:
    """The VIP authors' "inverse_acc" ablation (arXiv 2602.01601): minimise ``sum_i n_i log(clip(p_i))``, a linear
    program whose exact integer solution sends the hardest prompts to ``n_max``, the rest to ``n_min``, and one
    prompt in between."""

    name: str = "inverse_acc"

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        return _linear_allocate(np.log(np.clip(p, P_CLIP, 1 - P_CLIP)), budget, n_min, n_max)


@dataclass
class InverseVar:
    """The VIP authors' "inverse_var" ablation (arXiv 2602.01601): minimise ``sum_i n_i log(p_i (1 - p_i))``
    (p clipped to [1e-6, 1-1e-6]), deliberately the opposite of VIP: the lowest-variance prompts (p near 0 or 1)
    get ``n_max``, the rest ``n_min``, one prompt in between."""

    name: str = "inverse_var"

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        pc = np.clip(p, P_CLIP, 1 - P_CLIP)
        return _linear_allocate(np.log(pc * (1 - pc)), budget, n_min, n_max)


def knapsack_value(p: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Knapsack-RL's value of ``n`` rollouts on a prompt: ``(1 - p^n - (1-p)^n) * p * (1-p)^2`` (broadcasts)."""
    return (1.0 - p**n - (1.0 - p) ** n) * p * (1.0 - p) ** 2


@dataclass
class Knapsack:
    """Knapsack-RL (Li et al., arXiv 2509.25849): maximise ``sum_i (1 - p^n - (1-p)^n) * p (1-p)^2`` (the chance of
    a non-zero gradient times the information gain) subject to ``sum n = budget`` and the bounds, EXACTLY (the
    shared solver of :mod:`vipalloc.allocation`; the paper uses a dynamic program).

    Prompts whose value is 0 at every count (p in {0, 1}) get ``n_min`` while any valuable prompt can still take a
    rollout (every valuable prompt's value strictly grows with n). Rollouts left once the valuable prompts are
    at ``n_max`` go, as in the paper's fallback, to the p = 0 prompts (spread evenly, earlier prompts first), then
    to the p = 1 prompts. This choice is among the exact optima, so it does not change the objective. Predictions
    below 1e-6 (above 1 - 1e-6) count as 0 (1), so "never solved" prompts are one group whatever their exact p.
    """

    name: str = "knapsack"

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        p = np.where(p < P_CLIP, 0.0, np.where(p > 1 - P_CLIP, 1.0, p))
        vals = domain(n_min, n_max)
        value = knapsack_value(p[:, None], vals[None, :].astype(np.float64))
        counts = balance_ties(vals[minimize_separable(-value, vals, budget)], equal_classes(p))
        # Zero-value prompts: any split of their rollouts is optimal, so place them by the paper's fallback rule.
        zero = np.flatnonzero(~np.any(value != 0.0, axis=1))
        if zero.size:
            pool = int(counts[zero].sum()) - zero.size * n_min
            counts[zero] = n_min
            for group in (zero[p[zero] < 0.5], zero[p[zero] >= 0.5]):  # unsolved first, then solved
                if pool == 0 or group.size == 0:
                    continue
                take = min(pool, group.size * (n_max - n_min))
                counts[group] += uniform_counts(group.size, take)
                pool -= take
        return counts


@dataclass
class GVM:
    """GVM-RAFT (Yao et al., arXiv 2505.02391): ``n_i`` proportional to ``G_i / sqrt(p_i + a / p_i^(b-1))`` with
    a = 1e-3, b = 2 and equal gradient norms ``G_i`` (we do not observe them), p clipped to >= 1e-6.

    The proportional targets are clipped to ``[n_min, n_max]`` by water-filling (the scale is chosen so the clipped
    targets sum to the budget exactly), then rounded with largest remainders (earlier prompts first on ties).
    GVM gives p = 0 prompts no samples; here they get ``n_min``, since this interface does not drop.
    """

    a: float = 1e-3
    b: float = 2.0
    name: str = "gvm"

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        pc = np.clip(p, P_CLIP, 1.0)
        weight = 1.0 / np.sqrt(pc + self.a / pc ** (self.b - 1.0))
        return proportional_counts(weight, budget, n_min, n_max)


def proportional_counts(weight: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
    """Integer counts in ``[n_min, n_max]`` summing to ``budget``, proportional to ``weight > 0`` where the bounds
    allow (water-filling), rounded by largest remainder. ``weight``: float ``(M,)``; returns int64 ``(M,)``."""
    m = len(weight)
    if budget == m * n_min or n_min == n_max:
        return np.full(m, n_min, np.int64) if budget == m * n_min else np.full(m, n_max, np.int64)
    # sum_i clip(s * w_i, n_min, n_max) is continuous and nondecreasing in s: bisect to the exact budget.
    lo, hi = 0.0, n_max / float(weight.min())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if np.clip(mid * weight, n_min, n_max).sum() < budget:
            lo = mid
        else:
            hi = mid
    target = np.clip(hi * weight, n_min, n_max)
    counts = np.floor(target).astype(np.int64)
    left = budget - int(counts.sum())
    frac = target - counts
    # largest remainders first (stable: earlier prompts win ties); only prompts below n_max can take a unit
    order = np.argsort(-frac, kind="stable")
    order = order[counts[order] < n_max]
    counts[order[:left]] += 1
    if left < 0:  # floating round-off pushed the floors over budget: take back from the smallest remainders
        order = np.argsort(frac, kind="stable")
        order = order[counts[order] > n_min]
        counts[order[:-left]] -= 1
    return counts


@dataclass
class VIPAuthors:
    """The VIP authors' complete allocation procedure (arXiv 2602.01601; their final code, ``allocate_rollout``),
    with the continuous stage solved exactly instead of by SLSQP (:mod:`vipalloc.authors`).

    Rule: ``p`` clipped to ``[1e-6, 1-1e-6]``; the continuous minimum of their objective (``a/(n-1) + gamma log(p)
    n`` for RLOO with gamma 7e-4, ``a (n-1)/n^2 + gamma log(p) n`` for Dr.GRPO with 4e-4) on their bounds
    ``[lower, n_max]`` = ``[1, n_max]``; floor; ``n < max(n_min, min_keep)`` -> 0; greedy fill on their legacy
    surrogate ``sum a (n+3)/(n+4)^2``; counts left below the minimum zeroed, their units to the largest counts.
    Uniform when ``std(p) < 1e-6``. Unlike ``vip``, the freed rollouts follow the surrogate, which has no hardness
    bonus: mid-p prompts get more, never-solved prompts fewer (``docs/strategies.md``, "where the budget goes").
    ``last_min_keep_relaxed`` as for ``vip``.
    """

    estimator: str = "drgrpo"
    hardness_bonus: float | None = None
    lower: float = 1.0
    min_keep: int = 4
    name: str = "vip_authors"
    last_min_keep_relaxed: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.hardness_bonus = check_vip_options(self.hardness_bonus, self.min_keep)
        if isinstance(self.lower, bool) or not isinstance(self.lower, (int, float)) or not 1.0 <= self.lower:
            raise ValueError(f"lower (the continuous problem's lower bound) must be a number >= 1, got {self.lower!r}")

    def allocate(self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> np.ndarray:
        p, budget = _check(p_hat, budget, n_min, n_max)
        if self.lower > n_max:
            raise ValueError(f"lower ({self.lower}) must be <= n_max ({n_max}); the authors use lower=1")
        res = authors_allocate(
            p,
            budget,
            n_min,
            n_max,
            estimator=self.estimator,
            gamma=HARDNESS_BONUS[self.estimator] if self.hardness_bonus is None else float(self.hardness_bonus),
            lower=float(self.lower),
            min_keep=int(self.min_keep),
        )
        self.last_min_keep_relaxed = res.min_keep_relaxed
        return res.counts


_FACTORIES: dict[str, Callable[..., Strategy]] = {
    "uniform": lambda estimator, **kw: Uniform(**kw),
    "vip": lambda estimator, **kw: VIP(estimator=estimator, **kw),
    "vip_pure": lambda estimator, **kw: VIPPure(estimator=estimator, **kw),
    "inverse_acc": lambda estimator, **kw: InverseAcc(**kw),
    "inverse_var": lambda estimator, **kw: InverseVar(**kw),
    "knapsack": lambda estimator, **kw: Knapsack(**kw),
    "gvm": lambda estimator, **kw: GVM(**kw),
    "vip_authors": lambda estimator, **kw: VIPAuthors(estimator=estimator, **kw),
    # Peers that need more than p_hat (AllocationContext) live in vipalloc.strategies_peers, which imports this
    # module: import lazily.
    "dynamo": lambda estimator, **kw: _peers("DynaMO")(**kw),
    "hora": lambda estimator, **kw: _peers("HORA")(**kw),
    # Two-phase strategies (pilot, then commit) live in vipalloc.two_phase, which imports this module: import lazily.
    "vip_two_phase": lambda estimator, **kw: _two_phase("VIPTwoPhase")(estimator=estimator, **kw),
    "pilot_commit": lambda estimator, **kw: _two_phase("PilotCommit")(**kw),
}
STRATEGY_NAMES = tuple(_FACTORIES)
TWO_PHASE_STRATEGIES = ("vip_two_phase", "pilot_commit")  # planned with plan_pilot / plan_commit


def _peers(cls: str) -> Callable[..., Strategy]:
    from vipalloc import strategies_peers

    return getattr(strategies_peers, cls)  # type: ignore[no-any-return]


def _two_phase(cls: str) -> Callable[..., Strategy]:
    from vipalloc import two_phase

    return getattr(two_phase, cls)  # type: ignore[no-any-return]


def get_strategy(name: str, *, estimator: str = "drgrpo", **kwargs: object) -> Strategy:
    """Build a strategy by name (one of ``STRATEGY_NAMES``); ``kwargs`` go to its constructor.

    ``estimator`` (``"drgrpo"`` or ``"rloo"``) selects the variance model of ``vip`` / ``vip_pure``. When training
    with GRPO, allocate with ``"drgrpo"``: the std-normalised GRPO variance is no allocation target.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGY_NAMES)}")
    if estimator not in HARDNESS_BONUS:
        hint = " (for GRPO training allocate with 'drgrpo')" if estimator == "grpo" else ""
        raise ValueError(f"unknown allocation estimator {estimator!r}; choose 'drgrpo' or 'rloo'{hint}")
    try:
        return _FACTORIES[name](estimator, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad options for strategy {name!r}: {exc}") from None
