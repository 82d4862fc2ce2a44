"""What every strategy shares: the :class:`Strategy` protocol and its flags, the per-prompt context, the checks
of a strategy call, and the tie rules.

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

Maths only: imports :mod:`vipalloc.allocation` and numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol, TypeAlias

import numpy as np

from vipalloc.allocation import N_MAX_LIMIT, _check_bonus, _check_budget, _check_p
from vipalloc.allocation_tokens import solve_tokens

__all__ = [
    "HARDNESS_BONUS",
    "NO_INFO_STD",
    "P_CLIP",
    "AllocationContext",
    "Ctx",
    "Strategy",
    "StrategyBase",
    "TokenCounts",
    "balance_ties",
    "check_budget_range",
    "check_call",
    "check_token_budget",
    "check_tokens",
    "check_vip_options",
    "equal_classes",
    "no_information",
    "table_tokens",
    "tie_classes",
    "uniform_counts",
]

P_CLIP = 1e-6  # as the authors clip p inside log(p)
HARDNESS_BONUS = {"rloo": 7e-4, "drgrpo": 4e-4}  # the authors' final gamma per estimator
NO_INFO_STD = 1e-6  # std(p_hat) below this = every prompt looks the same (the authors' first-step rule)


class Strategy(Protocol):
    """An allocation rule: predicted success probabilities ``(M,)`` -> int64 rollout counts ``(M,)``.

    The flags are declared, so the ``Allocator`` reads them instead of probing:

    * ``uses_context``: the rule reads ``context`` (:class:`AllocationContext`: the predictor's std, the reward
      history); the ``Allocator`` builds it only for these strategies. The others ignore the argument.
    * ``two_phase``: planned by ``Allocator.plan_pilot`` / ``plan_commit``
      (:class:`vipalloc.strategies.two_phase.TwoPhaseStrategy`); ``allocate`` raises.
    * ``last_min_keep_relaxed``: set by the last ``allocate`` when the kept prompts' minimum had to be relaxed.
    * ``token_refusal``: None when :meth:`allocate_tokens` plans under a token budget; else the one-line reason
      it cannot.
    """

    name: str
    uses_context: ClassVar[bool]
    two_phase: ClassVar[bool]
    token_refusal: ClassVar[str | None]
    last_min_keep_relaxed: bool

    def allocate(
        self,
        p_hat: np.ndarray,
        budget: int,
        n_min: int,
        n_max: int,
        *,
        context: AllocationContext | None = None,
    ) -> np.ndarray: ...

    def allocate_tokens(
        self,
        p_hat: np.ndarray,
        token_budget: float,
        lengths: np.ndarray,
        n_min: int,
        n_max: int,
        *,
        max_rollouts: int | None = None,
        context: AllocationContext | None = None,
    ) -> TokenCounts:
        """Counts under ``sum_i n_i lengths_i <= token_budget`` (and ``sum_i n_i <= max_rollouts``); ``lengths``:
        expected tokens per rollout, float ``(M,)`` > 0."""
        ...


class TokenCounts(NamedTuple):
    """A plan under a token budget: int64 counts ``(M,)`` and the certified relative optimality gap of the
    program that chose them (0.0 when exact; NaN for rules that optimise nothing, e.g. ``uniform``)."""

    counts: np.ndarray
    gap: float


Ctx: TypeAlias = "AllocationContext | None"  # the context argument of the token planners, spelt once


class StrategyBase:
    """The flags' defaults (a single-phase rule of ``p_hat`` alone that never relaxes a minimum and has no token
    mode); strategies inherit it and override what differs."""

    name: str
    uses_context: ClassVar[bool] = False
    two_phase: ClassVar[bool] = False
    token_refusal: ClassVar[str | None] = "it has no token-budget mode"
    last_min_keep_relaxed: bool = False

    def allocate_tokens(
        self,
        p_hat: np.ndarray,
        token_budget: float,
        lengths: np.ndarray,
        n_min: int,
        n_max: int,
        *,
        max_rollouts: int | None = None,
        context: AllocationContext | None = None,
    ) -> TokenCounts:
        """Counts under ``sum_i n_i lengths_i <= token_budget`` (and ``sum_i n_i <= max_rollouts``): the call is
        checked (:func:`check_tokens`), then the strategy's :meth:`_allocate_tokens` plans; a strategy with a
        ``token_refusal`` refuses with it."""
        if self.token_refusal is not None:
            raise ValueError(f"strategy {self.name!r} cannot plan under a token budget: {self.token_refusal}")
        p, c, t, cap = check_tokens(p_hat, token_budget, lengths, n_min, n_max, max_rollouts)
        return self._allocate_tokens(p, c, t, cap, n_min, n_max, context)

    def _allocate_tokens(
        self, p: np.ndarray, c: np.ndarray, t: float, cap: int | None, n_min: int, n_max: int, context: Ctx
    ) -> TokenCounts:
        """The token plan of checked inputs: ``p`` (M,) predictions, ``c`` (M,) expected tokens per rollout,
        ``t`` the token budget, ``cap`` the rollout cap (None: none)."""
        raise NotImplementedError(f"strategy {self.name!r} declares a token mode but does not implement it")


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


def equal_classes(key: np.ndarray) -> np.ndarray:
    """Class label per prompt (int64 ``(M,)``): prompts with equal ``key`` (a value, or a row of a 2-D ``key``)
    share a label; labels are numbered by first occurrence."""
    key = np.asarray(key)
    _, first, inv = np.unique(key, return_index=True, return_inverse=True, axis=0 if key.ndim > 1 else None)
    order = np.argsort(first, kind="stable")  # relabel classes in order of their first member
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inv.ravel()].astype(np.int64)


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


def check_call(p_hat: np.ndarray, budget: int, n_min: int, n_max: int) -> tuple[np.ndarray, int]:
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
    check_budget_range(budget, len(p), n_min, n_max)
    return p, budget


def check_budget_range(budget: int, m: int, n_min: int, n_max: int, *, cap: bool = False) -> None:
    """Refuse a rollout budget no plan of ``m`` prompts with ``n_min <= n <= n_max`` can meet: ``budget`` is the
    step's total rollouts, or with ``cap=True`` the rollout cap next to a token budget (then only its lower end,
    ``m * n_min``, binds). Raises ``ValueError`` naming the feasible range and the fix. The one place this message
    is written (the ``Allocator``'s budget policy, the strategies and the two-phase pilot call it)."""
    if not cap and budget > m * n_max:
        raise ValueError(
            f"budget {budget} is infeasible for {m} prompts with n_max={n_max}: at most {m * n_max}; raise n_max or "
            "lower the budget"
        )
    if budget < m * n_min:
        raise ValueError(
            f"budget {budget} is infeasible for {m} prompts with n in [{n_min}, {n_max}]: feasible budgets lie in "
            f"[{m * n_min}, {m * n_max}]; change the budget or the bounds"
        )


def check_token_budget(value: object) -> float:
    """A token budget: a finite number of tokens > 0 (a float is fine, e.g. a predicted total). Raises
    ``ValueError`` naming the value and what is expected. The one check of a token budget's value (the
    ``Allocator``'s budget policy and :func:`check_tokens` call it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"token_budget must be a number of tokens, got {value!r}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"token_budget must be a finite number of tokens > 0, got {value!r}")
    return float(value)


def check_tokens(
    p_hat: np.ndarray, token_budget: float, lengths: np.ndarray, n_min: int, n_max: int, max_rollouts: int | None
) -> tuple[np.ndarray, np.ndarray, float, int | None]:
    """Validate a token-budget call; returns ``(p, lengths, token_budget, max_rollouts)``. Raises ``ValueError``
    naming the problem and the fix (the smallest feasible token budget when it is too small)."""
    p = _check_p(p_hat)
    m = len(p)
    check_call(p, m * n_min, n_min, n_max)  # the bounds themselves
    c = np.asarray(lengths, np.float64)
    if c.shape != (m,) or not np.all(np.isfinite(c)) or np.any(c <= 0):
        raise ValueError(f"expected lengths must be finite token counts > 0, one per prompt ({m}), got {c.shape}")
    t = check_token_budget(token_budget)
    need = float(n_min * c.sum())
    if t < need * (1 - 1e-12):
        raise ValueError(
            f"token budget {t:,.0f} is infeasible for {m} prompts with n_min={n_min}: every prompt at n_min needs "
            f"{need:,.0f} tokens at the predicted lengths; raise the token budget or lower n_min"
        )
    if max_rollouts is not None:
        r = max_rollouts
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < m * n_min:
            raise ValueError(
                f"the rollout cap next to a token budget must be an integer >= M * n_min = {m * n_min}, got {r!r}"
            )
        max_rollouts = int(r)
    return p, c, t, max_rollouts


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


def no_information(p: np.ndarray) -> bool:
    """True when every prediction looks the same (``std(p) < 1e-6``, the authors' first-step rule)."""
    return float(np.std(p)) < NO_INFO_STD


def table_tokens(
    cost: np.ndarray,
    vals: np.ndarray,
    lengths: np.ndarray,
    token_budget: float,
    max_rollouts: int | None,
    classes: np.ndarray | None = None,
) -> TokenCounts:
    """The token-budget program on a cost table (:func:`vipalloc.allocation_tokens.solve_tokens`); ``classes``
    (equal predictions AND equal lengths) are spread evenly afterwards when the domain ``vals`` is contiguous,
    which keeps the tokens and the caps (members share a length); it is kept only where it costs no more."""
    sol = solve_tokens(cost, vals, lengths, token_budget, max_rollouts=max_rollouts)
    counts = vals[sol.idx].astype(np.int64)
    if classes is not None and np.all(np.diff(vals) == 1):
        even = balance_ties(counts, classes)
        rows = np.arange(len(counts))
        # keep the even split only where it costs no more (the Dr.GRPO variance is not convex below n = 4)
        if cost[rows, even - vals[0]].sum() <= cost[rows, sol.idx].sum() + 1e-15:
            counts = even
    return TokenCounts(counts, sol.gap)
