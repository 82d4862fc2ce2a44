"""The two-phase maths: a Beta posterior per prompt from the predictor's prior and the pilot, its exact expected
variance, and the exact commit of a rollout budget over the extra rollouts (see
:mod:`vipalloc.strategies.two_phase` for the procedure and the strategies that use it).

Maths only: imports :mod:`vipalloc.allocation`, :mod:`vipalloc.variance` and :mod:`vipalloc.strategies.base`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from vipalloc.allocation import _check_bonus, _reachable, minimize_separable
from vipalloc.strategies.base import HARDNESS_BONUS, P_CLIP
from vipalloc.variance import gradient_variance

__all__ = [
    "PRIOR_MEAN_CLIP",
    "PRIOR_NU_MAX",
    "PRIOR_NU_MIN",
    "beta_mean_std",
    "beta_posterior",
    "beta_prior",
    "commit_cost_table",
    "commit_domain",
    "expected_pq",
    "expected_variance",
    "group_violations",
    "solve_commit",
]

PRIOR_NU_MAX = 32.0  # cap on a + b: a predictor never counts as more than 32 pilot rollouts
PRIOR_NU_MIN = 2.0  # floor on a + b: an unseen prompt's prior is worth 2 rollouts (Beta(1, 1) at mean 0.5)
PRIOR_MEAN_CLIP = 1e-3  # the prior mean is clipped to [1e-3, 1 - 1e-3] so both pseudo-counts stay > 0


# --------------------------------------------------------------------------------------------- Beta maths
def beta_prior(
    p_mean: ArrayLike,
    p_std: ArrayLike,
    *,
    nu_max: float = PRIOR_NU_MAX,
    nu_min: float = PRIOR_NU_MIN,
) -> tuple[np.ndarray, np.ndarray]:
    """Beta pseudo-counts ``(a, b)`` matching a prediction's mean and std, float64 ``(M,)`` each.

    ``p_mean`` in ``[0, 1]`` (clipped to ``[1e-3, 1 - 1e-3]``), ``p_std >= 0``. Moment matching gives
    ``a + b = mu (1 - mu) / sigma^2 - 1``; it is clipped to ``[nu_min, nu_max]`` (``sigma = 0`` gives ``nu_max``;
    ``sigma^2 >= mu (1 - mu)``, where no Beta fits, gives ``nu_min``). Returns ``(mu * nu, (1 - mu) * nu)``.
    """
    mu = np.asarray(p_mean, np.float64)
    sd = np.asarray(p_std, np.float64)
    if mu.shape != sd.shape or mu.ndim != 1:
        raise ValueError(f"p_mean {mu.shape} and p_std {sd.shape} must be 1-D arrays of the same length")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sd))):
        raise ValueError("p_mean and p_std must be finite")
    if np.any((mu < 0) | (mu > 1)) or np.any(sd < 0):
        raise ValueError("need p_mean in [0, 1] and p_std >= 0")
    if not (0.0 < nu_min <= nu_max and np.isfinite(nu_max)):
        raise ValueError(f"need 0 < nu_min <= nu_max < inf, got nu_min={nu_min}, nu_max={nu_max}")
    mu = np.clip(mu, PRIOR_MEAN_CLIP, 1.0 - PRIOR_MEAN_CLIP)
    var = sd * sd
    with np.errstate(divide="ignore"):
        nu = np.where(var > 0, mu * (1.0 - mu) / np.where(var > 0, var, 1.0) - 1.0, np.inf)
    nu = np.clip(nu, nu_min, nu_max)
    return mu * nu, (1.0 - mu) * nu


def beta_posterior(
    a: ArrayLike, b: ArrayLike, successes: ArrayLike, trials: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """``Beta(a + k, b + t - k)`` after ``k = successes`` of ``t = trials`` Bernoulli rollouts (arrays ``(M,)``)."""
    a_arr = np.asarray(a, np.float64)
    b_arr = np.asarray(b, np.float64)
    k = np.asarray(successes, np.int64)
    t = np.asarray(trials, np.int64)
    if not (a_arr.shape == b_arr.shape == k.shape == t.shape):
        raise ValueError(f"a, b, successes and trials must share a shape, got {a_arr.shape}, {k.shape}, {t.shape}")
    if np.any(a_arr <= 0) or np.any(b_arr <= 0):
        raise ValueError("Beta pseudo-counts a and b must be > 0")
    if np.any(t < 0) or np.any(k < 0) or np.any(k > t):
        raise ValueError("need 0 <= successes <= trials for every prompt")
    return a_arr + k, b_arr + (t - k)


def beta_mean_std(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of ``Beta(a, b)`` (float64 arrays)."""
    a_arr = np.asarray(a, np.float64)
    b_arr = np.asarray(b, np.float64)
    nu = a_arr + b_arr
    return a_arr / nu, np.sqrt(a_arr * b_arr / (nu * nu * (nu + 1.0)))


def expected_pq(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """``E[p (1 - p)]`` for ``p ~ Beta(a, b)``: ``a b / ((a + b)(a + b + 1))`` (exact)."""
    a_arr = np.asarray(a, np.float64)
    b_arr = np.asarray(b, np.float64)
    nu = a_arr + b_arr
    return a_arr * b_arr / (nu * (nu + 1.0))


def _h(n: np.ndarray, estimator: str) -> np.ndarray:
    """``Var(p, n) / (p (1 - p))``, the count factor of the estimator's variance; 0 at n = 0 and (both) n = 1.

    RLOO has no leave-one-out baseline at n = 1 (its formula is undefined there); such a group carries no usable
    gradient, so it counts as 0 like Dr.GRPO's n = 1. It arises only when failed pilot generations leave 1 rollout.
    """
    n = np.asarray(n, np.int64)
    if estimator == "rloo":
        safe = np.where(n == 1, 0, n)
        return gradient_variance(0.5, safe, "rloo") / 0.25
    return gradient_variance(0.5, n, estimator) / 0.25


def expected_variance(a: ArrayLike, b: ArrayLike, n: ArrayLike, estimator: str = "drgrpo") -> np.ndarray:
    """``E_{p ~ Beta(a, b)}[Var(p, n)]`` for ``drgrpo`` or ``rloo``, exact: ``E[p(1-p)] * h(n)``; broadcasts.

    ``n`` are whole rollout counts (0 = not generated, contributes 0). Units as
    :func:`vipalloc.variance.gradient_variance`.
    """
    if estimator not in HARDNESS_BONUS:
        raise ValueError(f"estimator must be 'drgrpo' or 'rloo', got {estimator!r}")
    return expected_pq(a, b) * _h(np.asarray(n), estimator)


# --------------------------------------------------------------------------------------------- exact commit
def commit_domain(pilot_n: int, n_min: int, n_max: int, *, allow_drop: bool = True, min_keep: int = 4) -> np.ndarray:
    """Allowed extra rollouts per prompt, sorted int64: ``{0} U [lo, n_max - pilot_n]`` with
    ``lo = max(n_min, min_keep, pilot_n) - pilot_n`` (with ``allow_drop``), or ``[max(n_min, pilot_n) - pilot_n,
    n_max - pilot_n]`` without (every final group then has ``>= n_min`` rollouts).

    With ``pilot_n = 1`` there is no ``{0}``: a group of one rollout has no baseline and trains nothing, so leaving a
    prompt at its pilot would cost 0 in the objective while wasting the rollout (the degenerate free drop of
    one-shot VIP, ``docs/strategies.md``); every piloted prompt then gets ``[max(n_min, min_keep) - 1, n_max - 1]``.
    """
    hi = n_max - pilot_n
    if hi < 0:
        raise ValueError(f"pilot_n ({pilot_n}) exceeds n_max ({n_max}); lower pilot_n or raise n_max")
    if not allow_drop:
        return np.arange(max(n_min, pilot_n) - pilot_n, hi + 1, dtype=np.int64)
    if pilot_n < 2:
        return np.arange(min(max(n_min, min_keep) - pilot_n, hi), hi + 1, dtype=np.int64)
    lo = max(n_min, min_keep, pilot_n) - pilot_n
    if lo <= 1:
        return np.arange(0, hi + 1, dtype=np.int64)
    if lo > hi:
        return np.zeros(1, np.int64)
    return np.concatenate([[0], np.arange(lo, hi + 1)]).astype(np.int64)


def _reachable_sum(budget: int, m: int, vals: np.ndarray) -> bool:
    """Can ``m`` items with counts in ``vals`` (``{0} U [lo, hi]`` or a contiguous range) sum to ``budget``?"""
    if len(vals) == 1:
        return budget == m * int(vals[0])
    if vals[0] == 0 and vals[1] > 1:
        return _reachable(budget, m, int(vals[1]), int(vals[-1]), True)
    return m * int(vals[0]) <= budget <= m * int(vals[-1])


def commit_cost_table(
    a: np.ndarray,
    b: np.ndarray,
    trials: np.ndarray,
    extras: np.ndarray,
    estimator: str = "drgrpo",
    hardness_bonus: float = 0.0,
) -> np.ndarray:
    """Per-(prompt, extra) commit objective ``E[Var(p, t_i + e_k)] + gamma log(clip(pbar_i)) (t_i + e_k)``.

    ``a, b`` posterior pseudo-counts ``(M,)``, ``trials`` the pilot rollouts that came back ``(M,)``, ``extras``
    ``(K,)``. Returns float64 ``(M, K)``.
    """
    n_tot = trials[:, None] + extras[None, :]
    cost = expected_pq(a, b)[:, None] * _h(n_tot, estimator)
    if hardness_bonus:
        pbar = np.clip(a / (a + b), P_CLIP, 1.0 - P_CLIP)
        cost = cost + hardness_bonus * np.log(pbar)[:, None] * n_tot.astype(np.float64)
    return cost


def solve_commit(
    a: ArrayLike,
    b: ArrayLike,
    trials: ArrayLike,
    budget: int,
    *,
    pilot_n: int,
    n_min: int,
    n_max: int,
    estimator: str = "drgrpo",
    hardness_bonus: float = 0.0,
    allow_drop: bool = True,
    min_keep: int = 4,
) -> tuple[np.ndarray, bool]:
    """Exact integer commit: extra rollouts ``(M,)`` int64 summing to ``budget``, and whether the minimum was relaxed.

    ``a, b``: posterior pseudo-counts ``(M,)``; ``trials``: pilot rollouts per prompt ``(M,)``. The domain is
    :func:`commit_domain`. With ``allow_drop`` a budget in a hole of ``{0} U [lo, hi]`` sums (e.g. 1 extra rollout
    with ``lo = 2``) is met by relaxing the domain to ``[0, hi]`` (second value ``True``); without drops, or when
    even ``[0, hi]`` cannot absorb it, ``ValueError``. Solved by :func:`vipalloc.allocation.minimize_separable`
    (exact for any per-item cost table).
    """
    a_arr = np.asarray(a, np.float64)
    b_arr = np.asarray(b, np.float64)
    t = np.asarray(trials, np.int64)
    m = len(a_arr)
    if m == 0 or a_arr.shape != (m,) or b_arr.shape != (m,) or t.shape != (m,):
        raise ValueError("a, b and trials must be non-empty 1-D arrays of the same length")
    if estimator not in HARDNESS_BONUS:
        raise ValueError(f"estimator must be 'drgrpo' or 'rloo', got {estimator!r}")
    bonus = _check_bonus(hardness_bonus)
    budget = int(budget)
    vals = commit_domain(pilot_n, n_min, n_max, allow_drop=allow_drop, min_keep=min_keep)
    relaxed = False
    if not _reachable_sum(budget, m, vals):
        full = np.arange(0, n_max - pilot_n + 1, dtype=np.int64)
        if not allow_drop or not _reachable_sum(budget, m, full):
            raise ValueError(
                f"the commit cannot place {budget} extra rollouts on {m} prompts with extra in "
                f"[{int(vals[0])}, {int(vals[-1])}]{' (or 0)' if allow_drop else ''}; choose a step budget in "
                f"[{m * pilot_n + m * int(vals[0]) if not allow_drop else m * pilot_n}, {m * n_max}]"
            )
        vals, relaxed = full, True
    if len(vals) == 1:
        return np.full(m, int(vals[0]), np.int64), relaxed
    table = commit_cost_table(a_arr, b_arr, t, vals, estimator, bonus)
    bad = group_violations(t, vals, n_min, n_max, allow_drop=allow_drop, min_keep=min_keep)
    if bad.any():  # failed pilot rollouts: their prompts' groups would end below the minimum (or above n_max)
        table = table + np.where(bad, 1e6 * (1.0 + float(np.abs(table).max())), 0.0)
    idx = minimize_separable(table, vals, budget)
    relaxed = relaxed or bool(bad[np.arange(m), idx].any())
    return vals[idx], relaxed


def group_violations(
    trials: np.ndarray, vals: np.ndarray, n_min: int, n_max: int, *, allow_drop: bool, min_keep: int
) -> np.ndarray:
    """Bool ``(M, K)``: extra ``vals[k]`` would leave prompt ``i``'s final group of ``trials_i + vals[k]`` outside
    what a kept prompt may have (``>= max(n_min, min_keep)`` with drops, ``>= n_min`` without, ``<= n_max``). Extra 0
    with drops is the stay-at-pilot option and always allowed. Where every pilot came back the commit domain already
    ensures this; a failed pilot rollout (``trials_i < pilot_n``) is what it catches."""
    n_tot = np.asarray(trials, np.int64)[:, None] + vals[None, :]
    lo = max(n_min, min_keep) if allow_drop else n_min
    bad = (n_tot < lo) | (n_tot > n_max)
    if allow_drop:
        bad &= vals[None, :] > 0
    # a prompt with no allowed value keeps its domain (it cannot be helped; the commit reports the relaxation)
    bad[bad.all(axis=1)] = False
    return bad
