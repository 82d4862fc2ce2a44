"""Two-phase allocation: pilot rollouts inside the step, a Beta posterior per prompt, an exact commit of the rest.

Per step and batch of ``M`` prompts with a total budget of ``B`` rollouts:

1. **Pilot.** Every prompt gets ``pilot_n`` rollouts (``pilot_n * M <= B``); ``vip_two_phase`` by default skips the
   prompts plain ``vip`` would drop on the prior (0 rollouts in both phases).
2. **Posterior.** The predictor's prediction ``(mu_i, sigma_i)``, made *before* the pilot, becomes a Beta prior
   by moment matching (:func:`beta_prior`); the pilot's ``k_i`` successes of ``t_i`` rollouts update it to
   ``Beta(a_i + k_i, b_i + t_i - k_i)`` (:func:`beta_posterior`).
3. **Commit.** The remaining ``R = B - sum_i pilot_i`` rollouts are split exactly (:func:`solve_commit`), as
   *extra* rollouts ``e_i``, minimising the expected variance of each prompt's final group of ``n_i = t_i + e_i``
   rollouts under its posterior::

       minimise   sum_i  E_{p ~ Beta_i}[ Var(p, t_i + e_i) ]  +  gamma * log(clip(pbar_i)) * (t_i + e_i)
       subject to sum_i e_i == R,   e_i in {0} U [max(n_min, min_keep, pilot_n) - pilot_n, n_max - pilot_n]

   ``Var`` is :func:`vipalloc.variance.gradient_variance` (Dr.GRPO or RLOO), ``gamma`` the hardness bonus of
   ``vip``, ``pbar_i`` the posterior mean. ``e_i = 0`` is the commit's drop option: the pilot rollouts are already
   spent and still train, so it costs ``E[Var(p, t_i)]``, not 0, and the one-shot exact program is well posed
   (unlike plain VIP's drop, which costs 0 and needs the authors' two-stage rule).

Both estimators' variances factor as ``p (1 - p) h(n)``, so the expectation under ``Beta(a, b)`` is exact in closed
form: ``E[p (1 - p)] = a b / ((a + b)(a + b + 1))`` (:func:`expected_variance`).

The prior mapping (documented in ``docs/two_phase.md``): ``mu`` clipped to ``[1e-3, 1 - 1e-3]``; pseudo-count
``nu = a + b = mu (1 - mu) / sigma^2 - 1`` (the Beta with that mean and variance), clipped to
``[nu_min, nu_max]`` = ``[2, 32]`` by default. The cap bounds how much a confident predictor (``sigma -> 0``,
e.g. the oracle) outweighs the pilot: 32 pseudo-rollouts against ``pilot_n`` real ones. The floor applies to
unseen prompts, whose predictive std can exceed what any Beta with that mean allows (``sigma^2 >= mu (1 - mu)``):
they count as 2 pseudo-rollouts (``Beta(1, 1)`` at ``mu = 0.5``), so two pilot successes do not make ``p = 1``.

This module is maths only: it imports :mod:`vipalloc.allocation`, :mod:`vipalloc.variance` and
:mod:`vipalloc.strategies.base` / ``vip``. The stateful API (``Allocator.plan_pilot`` / ``plan_commit``) is in
:mod:`vipalloc.allocator`; :class:`PilotState` is the outstanding-pilot record it keeps and saves.
``pilot_n = 1`` has no stay-at-pilot option (a group of one trains nothing; :func:`commit_domain`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np

from vipalloc.allocation_tokens import solve_tokens
from vipalloc.strategies.base import (
    HARDNESS_BONUS,
    AllocationContext,
    StrategyBase,
    check_budget_range,
    check_vip_options,
    uniform_counts,
)
from vipalloc.strategies.commit import (
    PRIOR_MEAN_CLIP,
    PRIOR_NU_MAX,
    PRIOR_NU_MIN,
    beta_mean_std,
    beta_posterior,
    beta_prior,
    commit_cost_table,
    commit_domain,
    expected_variance,
    solve_commit,
)
from vipalloc.strategies.vip import VIP

__all__ = [
    "PRIOR_MEAN_CLIP",
    "PRIOR_NU_MAX",
    "PRIOR_NU_MIN",
    "Commit",
    "PilotState",
    "TwoPhaseStrategy",
    "VIPTwoPhase",
    "beta_mean_std",
    "beta_posterior",
    "beta_prior",
    "commit_domain",
    "expected_variance",
    "fill_uniform",
    "solve_commit",
    "uniform_commit",
    "uniform_extra",
]


# --------------------------------------------------------------------------------------------- state
@dataclass
class PilotState:
    """An outstanding two-phase step (``Allocator`` state): the pilot planned at ``plan_pilot``, its outcomes so far,
    and the commit once planned. Arrays are aligned with ``ids``."""

    ids: list[str]
    counts: np.ndarray  # int64 (M,), pilot rollouts planned
    prior_mean: np.ndarray  # float64 (M,), the predictor's p before the pilot
    prior_std: np.ndarray  # float64 (M,)
    budget: int | None  # the whole step's rollout budget (pilot + commit); None: token mode without a rollout cap
    pilot_n: int
    successes: np.ndarray  # int64 (M,), pilot successes observed so far
    trials: np.ndarray  # int64 (M,), pilot rollouts observed so far
    extra: np.ndarray | None = None  # int64 (M,), the commit once planned
    # Token mode (plan_pilot(..., token_budget=T)): T, the expected tokens per rollout c (float64 (M,)) the pilot
    # was planned with, and the pilot's tokens spent so far per prompt (reported lengths, else c_i per rollout).
    token_budget: float | None = None
    lengths: np.ndarray | None = None
    tokens: np.ndarray | None = None
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {pid: i for i, pid in enumerate(self.ids)}

    def to_state(self) -> dict[str, Any]:
        return {
            "ids": list(self.ids),
            "counts": self.counts,
            "prior_mean": self.prior_mean,
            "prior_std": self.prior_std,
            "budget": self.budget,
            "pilot_n": self.pilot_n,
            "successes": self.successes,
            "trials": self.trials,
            "extra": self.extra,
            "token_budget": self.token_budget,
            "lengths": self.lengths,
            "tokens": self.tokens,
        }

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> PilotState:
        return cls(
            ids=[str(p) for p in st["ids"]],
            counts=np.asarray(st["counts"], np.int64),
            prior_mean=np.asarray(st["prior_mean"], np.float64),
            prior_std=np.asarray(st["prior_std"], np.float64),
            budget=None if st["budget"] is None else int(st["budget"]),
            pilot_n=int(st["pilot_n"]),
            successes=np.asarray(st["successes"], np.int64).copy(),
            trials=np.asarray(st["trials"], np.int64).copy(),
            extra=None if st["extra"] is None else np.asarray(st["extra"], np.int64),
            # absent in files written before token budgets
            token_budget=None if st.get("token_budget") is None else float(st["token_budget"]),
            lengths=None if st.get("lengths") is None else np.asarray(st["lengths"], np.float64),
            tokens=None if st.get("tokens") is None else np.asarray(st["tokens"], np.float64).copy(),
        )


# --------------------------------------------------------------------------------------------- strategies
class Commit(NamedTuple):
    """A commit decision: ``extra`` int64 ``(M,)``, the posterior ``Beta(post_a, post_b)`` per prompt the decision
    used (float64 ``(M,)`` each), and whether the kept prompts' minimum was relaxed to meet the budget exactly."""

    extra: np.ndarray
    post_a: np.ndarray
    post_b: np.ndarray
    min_keep_relaxed: bool
    gap: float = 0.0  # token mode: certified relative optimality gap of the commit (0.0 exact; NaN: a rule)


class TwoPhaseStrategy(Protocol):
    """A strategy that plans a pilot, then commits the rest of the budget given the pilot's outcomes."""

    name: str
    uses_context: ClassVar[bool]
    two_phase: ClassVar[bool]
    trains_pilot_only: ClassVar[bool]  # False: only prompts with extra rollouts enter the update
    last_min_keep_relaxed: bool

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray: ...

    def check_pilot(self, m: int, budget: int, n_min: int, n_max: int, pilot_n: int) -> None: ...

    def pilot(self, p_mean: np.ndarray, budget: int, n_min: int, n_max: int, pilot_n: int) -> np.ndarray: ...

    def commit(
        self,
        prior_mean: np.ndarray,
        prior_std: np.ndarray,
        planned: np.ndarray,
        successes: np.ndarray,
        trials: np.ndarray,
        budget: int,
        n_min: int,
        n_max: int,
        pilot_n: int,
    ) -> Commit: ...

    def pilot_tokens(
        self,
        p_mean: np.ndarray,
        token_budget: float,
        lengths: np.ndarray,
        n_min: int,
        n_max: int,
        pilot_n: int,
        max_rollouts: int | None,
    ) -> np.ndarray: ...

    def commit_tokens(
        self,
        prior_mean: np.ndarray,
        prior_std: np.ndarray,
        planned: np.ndarray,
        successes: np.ndarray,
        trials: np.ndarray,
        token_budget: float,
        lengths: np.ndarray,
        n_min: int,
        n_max: int,
        pilot_n: int,
        max_rollouts: int | None,
    ) -> Commit: ...


def check_pilot_tokens(
    m: int, token_budget: float, lengths: np.ndarray, n_max: int, pilot_n: int, max_rollouts: int | None
) -> None:
    """Validate a token-mode pilot request (every prompt piloted): ``ValueError`` names the fix."""
    if isinstance(pilot_n, bool) or not isinstance(pilot_n, (int, np.integer)) or pilot_n < 1:
        raise ValueError(f"pilot_n must be an integer >= 1 (rollouts per prompt in the pilot), got {pilot_n!r}")
    if pilot_n > n_max:
        raise ValueError(f"pilot_n ({pilot_n}) exceeds n_max ({n_max}); lower pilot_n or raise n_max")
    need = float(pilot_n * np.sum(lengths))
    if need > token_budget * (1 + 1e-12):
        raise ValueError(
            f"the pilot ({pilot_n} rollouts x {m} prompts) is predicted to spend {need:,.0f} tokens, over the step's "
            f"token budget {token_budget:,.0f}; the pilot is part of the budget: lower pilot_n, use fewer prompts, or "
            "raise the token budget"
        )
    if max_rollouts is not None and pilot_n * m > max_rollouts:
        raise ValueError(f"pilot_n * M = {pilot_n * m} pilot rollouts exceed the rollout cap {max_rollouts}")


def fill_uniform_tokens(
    extra: np.ndarray, group: np.ndarray, cap: np.ndarray, c: np.ndarray, tokens: float, rollouts: float
) -> tuple[float, float]:
    """Add rollouts to ``extra[group]`` one round at a time (+1 to each member, in order, whose next rollout fits
    the tokens and rollouts left and its cap); returns the tokens and rollouts left."""
    live = [int(i) for i in group]
    while live and rollouts >= 1:
        nxt = []
        for i in live:
            if extra[i] < cap[i] and c[i] <= tokens * (1 + 1e-12) + 1e-9 and rollouts >= 1:
                extra[i] += 1
                tokens -= float(c[i])
                rollouts -= 1
                nxt.append(i)
        live = nxt
    return tokens, rollouts


def check_pilot(m: int, budget: int, n_min: int, n_max: int, pilot_n: int) -> None:
    """Validate a pilot request for ``m`` prompts and a whole-step ``budget``; ``ValueError`` names the fix."""
    if isinstance(pilot_n, bool) or not isinstance(pilot_n, (int, np.integer)) or pilot_n < 1:
        raise ValueError(f"pilot_n must be an integer >= 1 (rollouts per prompt in the pilot), got {pilot_n!r}")
    if pilot_n > n_max:
        raise ValueError(f"pilot_n ({pilot_n}) exceeds n_max ({n_max}); lower pilot_n or raise n_max")
    if pilot_n * m > budget:
        raise ValueError(
            f"pilot_n * M = {pilot_n} x {m} = {pilot_n * m} pilot rollouts exceed the step budget {budget}; the "
            f"pilot is part of the budget: lower pilot_n to <= {budget // m}, use fewer prompts, or raise the budget"
        )
    check_budget_range(budget, m, 0, n_max)  # a two-phase step may drop prompts: only n_max bounds it


def not_single_phase(name: str) -> ValueError:
    return ValueError(
        f"strategy {name!r} is two-phase: plan with Allocator.plan_pilot(ids, prompts, budget=B, step=t), observe "
        "the pilot rewards, then Allocator.plan_commit(step=t) and observe again; Allocator.plan() cannot run it"
    )


@dataclass
class VIPTwoPhase(StrategyBase):
    """Two-phase VIP (VIP, arXiv 2602.01601, with in-step pilot evidence as in Pilot-Commit, arXiv 2605.26606):
    ``pilot_n`` rollouts on every prompt, then the rest of the budget committed exactly under each prompt's Beta
    posterior (prior from the predictor, evidence from the pilot). See the module docstring.

    Options as ``vip``: ``hardness_bonus`` (default: the authors' gamma for the estimator), ``allow_drop``
    (``e_i = 0`` allowed; kept prompts then get ``>= max(n_min, min_keep)`` rollouts in all), ``min_keep``;
    and the prior mapping's ``prior_nu_max`` / ``prior_nu_min`` (:func:`beta_prior`).

    ``skip`` decides who is piloted: ``"vip"`` (default) skips the prompts that plain ``vip`` would drop on the
    prior at the step's budget (they get 0 rollouts in both phases, exactly as under ``vip``), ``"none"`` pilots
    every prompt. At tight budgets a pilot on every prompt costs what ``vip`` saves by dropping
    (``docs/two_phase.md``).
    """

    estimator: str = "drgrpo"
    hardness_bonus: float | None = None
    allow_drop: bool = True
    min_keep: int = 4
    prior_nu_max: float = PRIOR_NU_MAX
    prior_nu_min: float = PRIOR_NU_MIN
    skip: str = "vip"
    name: str = "vip_two_phase"
    two_phase: ClassVar[bool] = True
    token_refusal: ClassVar[str | None] = None  # token mode: Allocator.plan_pilot(..., token_budget=T)
    trains_pilot_only: ClassVar[bool] = True  # a prompt with 0 extra still trains on its pilot group

    def __post_init__(self) -> None:
        self.hardness_bonus = check_vip_options(self.hardness_bonus, self.min_keep, self.allow_drop)
        if not (0.0 < float(self.prior_nu_min) <= float(self.prior_nu_max) < np.inf):
            raise ValueError(
                f"need 0 < prior_nu_min <= prior_nu_max < inf, got {self.prior_nu_min}, {self.prior_nu_max}"
            )
        if self.skip not in ("vip", "none"):
            raise ValueError(f"skip must be 'vip' (skip what vip drops on the prior) or 'none', got {self.skip!r}")

    def allocate(
        self, p_hat: np.ndarray, budget: int, n_min: int, n_max: int, *, context: AllocationContext | None = None
    ) -> np.ndarray:
        raise not_single_phase(self.name)

    def posterior(
        self, prior_mean: np.ndarray, prior_std: np.ndarray, successes: np.ndarray, trials: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each prompt's ``Beta(a, b)`` after its pilot (float64 ``(M,)`` each): the predictor's prior mapped by
        :func:`beta_prior` with this strategy's ``prior_nu_min`` / ``prior_nu_max``, updated by the pilot's counts."""
        a0, b0 = beta_prior(prior_mean, prior_std, nu_max=self.prior_nu_max, nu_min=self.prior_nu_min)
        return beta_posterior(a0, b0, successes, trials)

    def check_pilot(self, m: int, budget: int, n_min: int, n_max: int, pilot_n: int) -> None:
        """Refuse a pilot request this strategy cannot serve (``ValueError`` naming the fix); needs no prediction,
        so the ``Allocator`` calls it before it touches any state."""
        check_pilot(m, budget, n_min, n_max, pilot_n)
        if not self.allow_drop and budget < m * max(n_min, pilot_n):
            raise ValueError(
                f"without drops every prompt needs >= n_min = {n_min} rollouts in all: budget {budget} < "
                f"{m * max(n_min, pilot_n)}; raise the budget or allow drops"
            )

    def pilot(self, p_mean: np.ndarray, budget: int, n_min: int, n_max: int, pilot_n: int) -> np.ndarray:
        """``pilot_n`` rollouts for each piloted prompt, 0 for skipped ones (int64 ``(M,)``).

        With ``skip="vip"`` the piloted prompts are those ``vip`` keeps on the prior (``p_mean``, ``(M,)``) at the
        whole step's ``budget``; they can absorb the rest of the budget within ``n_max`` because ``vip``'s kept
        prompts absorb all of it.
        """
        m = len(p_mean)
        self.check_pilot(m, budget, n_min, n_max, pilot_n)
        counts = np.full(m, pilot_n, np.int64)
        # (below M * n_min vip has no plan to copy: pilot everyone)
        if self.skip == "vip" and self.allow_drop and budget >= m * n_min:
            plain = VIP(estimator=self.estimator, hardness_bonus=self.hardness_bonus, min_keep=self.min_keep)
            counts[plain.allocate(np.asarray(p_mean, np.float64), budget, n_min, n_max) == 0] = 0
        return counts

    def commit(
        self,
        prior_mean: np.ndarray,
        prior_std: np.ndarray,
        planned: np.ndarray,
        successes: np.ndarray,
        trials: np.ndarray,
        budget: int,
        n_min: int,
        n_max: int,
        pilot_n: int,
    ) -> Commit:
        """Exact commit of ``budget`` extra rollouts over the piloted prompts (``planned > 0``) under their
        posteriors (:func:`solve_commit`); skipped prompts get 0."""
        a, b = self.posterior(prior_mean, prior_std, successes, trials)
        bonus = HARDNESS_BONUS[self.estimator] if self.hardness_bonus is None else float(self.hardness_bonus)
        live = np.flatnonzero(np.asarray(planned) > 0)
        extra = np.zeros(len(a), np.int64)
        if live.size == 0:
            if budget:
                raise ValueError(f"no prompt was piloted, so the commit cannot place {budget} rollouts")
            return Commit(extra, a, b, False)
        extra[live], relaxed = solve_commit(
            a[live],
            b[live],
            np.asarray(trials, np.int64)[live],
            budget,
            pilot_n=pilot_n,
            n_min=n_min,
            n_max=n_max,
            estimator=self.estimator,
            hardness_bonus=bonus,
            allow_drop=self.allow_drop,
            min_keep=self.min_keep,
        )
        return Commit(extra, a, b, relaxed)

    def pilot_tokens(
        self,
        p_mean: np.ndarray,
        token_budget: float,
        lengths: np.ndarray,
        n_min: int,
        n_max: int,
        pilot_n: int,
        max_rollouts: int | None,
    ) -> np.ndarray:
        """Token mode: ``pilot_n`` rollouts for each piloted prompt (int64 ``(M,)``); with ``skip="vip"`` the
        prompts plain ``vip`` drops on the prior under the same token budget are skipped. ``lengths``: expected
        tokens per rollout ``(M,)``; the pilot's predicted tokens must fit the budget."""
        m = len(p_mean)
        c = np.asarray(lengths, np.float64)
        check_pilot_tokens(m, token_budget, c, n_max, pilot_n, max_rollouts)
        if not self.allow_drop and token_budget < max(n_min, pilot_n) * float(c.sum()) * (1 - 1e-12):
            raise ValueError(
                f"without drops every prompt needs >= {max(n_min, pilot_n)} rollouts in all: "
                f"{max(n_min, pilot_n) * float(c.sum()):,.0f} predicted tokens > the token budget "
                f"{token_budget:,.0f}; raise the token budget or allow drops"
            )
        counts = np.full(m, pilot_n, np.int64)
        if self.skip == "vip" and self.allow_drop and token_budget >= n_min * float(c.sum()):
            plain = VIP(estimator=self.estimator, hardness_bonus=self.hardness_bonus, min_keep=self.min_keep)
            res = plain.allocate_tokens(np.asarray(p_mean, np.float64), token_budget, c, n_min, n_max,
                                        max_rollouts=max_rollouts)  # fmt: skip
            counts[res.counts == 0] = 0
        return counts

    def commit_tokens(
        self,
        prior_mean: np.ndarray,
        prior_std: np.ndarray,
        planned: np.ndarray,
        successes: np.ndarray,
        trials: np.ndarray,
        token_budget: float,
        lengths: np.ndarray,
        n_min: int,
        n_max: int,
        pilot_n: int,
        max_rollouts: int | None,
    ) -> Commit:
        """Token mode: the same posterior objective over the piloted prompts, under ``sum_i e_i c_i <=
        token_budget`` (the tokens left after the pilot) and ``sum e <= max_rollouts``, by
        :func:`vipalloc.allocation_tokens.solve_tokens` (exact or with a certified gap, in ``Commit.gap``)."""
        a, b = self.posterior(prior_mean, prior_std, successes, trials)
        bonus = HARDNESS_BONUS[self.estimator] if self.hardness_bonus is None else float(self.hardness_bonus)
        live = np.flatnonzero(np.asarray(planned) > 0)
        extra = np.zeros(len(a), np.int64)
        if live.size == 0:
            return Commit(extra, a, b, False)
        t = np.asarray(trials, np.int64)[live]
        vals = np.arange(0, n_max + 1, dtype=np.int64)  # every extra; the kept minimum is a per-prompt mask
        cost = commit_cost_table(a[live], b[live], t, vals, self.estimator, bonus)
        lo = max(n_min, self.min_keep) if self.allow_drop else n_min
        n_tot = t[:, None] + vals[None, :]
        bad = (n_tot > n_max) | ((vals[None, :] > 0) & (n_tot < lo))
        if not self.allow_drop:
            bad |= n_tot < n_min
        cost = np.where(bad, np.inf, cost)
        cost[np.all(bad, axis=1), 0] = 0.0  # a prompt with nothing allowed stays at its pilot
        c = np.asarray(lengths, np.float64)[live]
        sol = solve_tokens(cost, vals, c, max(float(token_budget), 0.0), max_rollouts=max_rollouts)
        extra[live] = vals[sol.idx]
        return Commit(extra, a, b, False, sol.gap)


def fill_uniform(extra: np.ndarray, group: np.ndarray, cap: np.ndarray, amount: int) -> int:
    """Add up to ``amount`` rollouts to ``extra[group]`` as evenly as the caps allow (water-filling, earlier
    prompts first on remainders); returns how many were placed."""
    placed = 0
    live = group.copy()
    while amount - placed > 0 and live.size:
        room = cap[live] - extra[live]
        live = live[room > 0]
        if live.size == 0:
            break
        room = cap[live] - extra[live]
        share = uniform_counts(live.size, min(amount - placed, int(room.sum())))
        add = np.minimum(share, room)
        extra[live] += add
        placed += int(add.sum())
    return placed


def uniform_extra(m: int, budget: int, trials: np.ndarray, n_max: int) -> np.ndarray:
    """The uniform commit of ``budget`` extra rollouts over ``m`` prompts within ``n_max`` (for variance ratios)."""
    extra = np.zeros(m, np.int64)
    fill_uniform(extra, np.arange(m), np.maximum(n_max - np.asarray(trials, np.int64), 0), int(budget))
    return extra


def uniform_commit(
    trials: np.ndarray,
    n_max: int,
    rollouts: int | None,
    order: np.ndarray,
    tokens: float | None = None,
    lengths: np.ndarray | None = None,
) -> np.ndarray:
    """The uniform commit (int64 ``(M,)`` extra rollouts, for variance ratios): ``rollouts`` spread within
    ``n_max``, or with ``tokens`` (and ``lengths``, tokens per rollout) one round at a time over ``order`` while the
    tokens (and the rollout cap, when given) allow."""
    m = len(trials)
    if tokens is None:
        assert rollouts is not None
        return uniform_extra(m, rollouts, trials, n_max)
    assert lengths is not None
    extra = np.zeros(m, np.int64)
    cap = np.maximum(n_max - np.asarray(trials, np.int64), 0)
    fill_uniform_tokens(extra, order, cap, lengths, tokens, float("inf") if rollouts is None else float(rollouts))
    return extra
