"""Expected squared error of a step's gradient estimate against the batch's expected gradient, per prompt.

Variance alone (:mod:`vipalloc.variance`) cannot judge a plan that drops prompts: a dropped prompt adds no variance
because it adds no signal. This module prices both, under one model (derivation and Monte Carlo checks:
``docs/variance.md``, "The gradient error").

Model. A rollout's score vector is ``s_j = (r_j - P) Delta + eps_j`` with ``r_j ~ Bernoulli(P)`` given the
prompt's success probability ``P``, ``Delta`` the difference of the mean scores of successes and failures, and
``eps_j`` zero-mean noise independent of everything, with ``E|eps|^2 = 1`` (the unit of
:func:`vipalloc.variance.gradient_variance`). The prompt's true gradient is ``g = E[r s] = a(P) Delta`` with
``a(P) = P (1 - P)``. ``P`` itself is uncertain: a point mass (known ``p``) or ``Beta`` matched to the predictor's
mean and std, so a group's success count is Binomial or Beta-Binomial. The one free number is the
signal-to-noise ratio per rollout ``rho = |Delta|^2 / E|eps|^2`` (``signal_ratio``).

With ``k`` successes of ``n`` and ``S = k (n - k) / n``, the estimate is ``g_hat = (S / d) Delta + noise`` with
``d = n`` for Dr.GRPO (advantage ``r - mean``: the mean is shrunk by ``(n-1)/n``) and ``d = n - 1`` for RLOO
(unbiased). Its expected squared error, in units of ``E|eps|^2``::

    kept (n >= 2):  E[S] / d^2  +  rho * E[(S / d - a(P))^2]
    dropped (n = 0): rho * E[a(P)^2]                       (the signal it would have carried)

Every expectation is a polynomial in the raw moments ``m_r = E[P^r]`` (``r <= 4``) through the Binomial factorial
moments ``E[k^(r)] = n^(r) m_r``, so Bernoulli and Beta-Binomial groups share one closed form.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "DEFAULT_SIGNAL_RATIO",
    "ERROR_ESTIMATORS",
    "beta_moments",
    "check_signal_ratio",
    "gradient_error",
    "lost_signal",
    "scaled_error",
    "signal_terms",
]

ERROR_ESTIMATORS = ("drgrpo", "rloo")
# rho = |Delta|^2 / E|eps|^2. 1.0: a rollout's mean signal is as large as its noise; see docs/variance.md for why
# this default and how the real-LM measurement (docs/results.md) bears on it.
DEFAULT_SIGNAL_RATIO = 1.0
SIGNAL_RATIO_RANGE = (1e-4, 1e4)
_MIN_CONCENTRATION = 1e-3  # alpha + beta of the moment-matched Beta is kept above this (a near-Bernoulli P)


def check_signal_ratio(signal_ratio: object) -> float:
    """Validate ``signal_ratio`` (rho, dimensionless); returns it as a float or raises naming the range."""
    lo, hi = SIGNAL_RATIO_RANGE
    if isinstance(signal_ratio, bool) or not isinstance(signal_ratio, (int, float, np.integer, np.floating)):
        raise ValueError(f"signal_ratio must be a number in [{lo:g}, {hi:g}], got {signal_ratio!r}")
    v = float(signal_ratio)
    if not (np.isfinite(v) and lo <= v <= hi):
        raise ValueError(
            f"signal_ratio must be in [{lo:g}, {hi:g}] (signal-to-noise per rollout; default "
            f"{DEFAULT_SIGNAL_RATIO:g}), got {signal_ratio!r}"
        )
    return v


def beta_moments(p_mean: ArrayLike, p_std: ArrayLike | None = None) -> np.ndarray:
    """Raw moments ``E[P^r]``, ``r = 1..4``, of the success probability: float64 ``(M, 4)``.

    ``p_std`` None or 0: a point mass at ``p_mean`` (``p^r``). Otherwise the Beta with that mean and std; a std at
    or above the largest a Beta can have (``sqrt(m (1 - m))``) is capped just below it, and a mean of exactly 0 or 1
    stays a point mass whatever the std (a prompt known to be hopeless or solved carries no signal).
    """
    m = np.asarray(p_mean, np.float64).reshape(-1)
    if not np.all(np.isfinite(m)) or np.any((m < 0) | (m > 1)):
        raise ValueError("p_mean must hold finite probabilities in [0, 1]")
    point = np.stack([m, m**2, m**3, m**4], axis=1)
    if p_std is None:
        return point
    s = np.broadcast_to(np.asarray(p_std, np.float64), m.shape)
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("p_std must hold finite numbers >= 0")
    var = s**2
    a_max = m * (1.0 - m)
    beta = (var > 0) & (a_max > 0)
    if not beta.any():
        return point
    # concentration nu = alpha + beta from the mean and variance, kept above a floor (var close to m (1 - m))
    nu = np.maximum(a_max[beta] / np.minimum(var[beta], a_max[beta]) - 1.0, _MIN_CONCENTRATION)
    al = m[beta] * nu
    out = point.copy()
    mom = np.ones_like(al)
    for r in range(4):  # E[P^(r+1)] = prod_{j<=r} (alpha + j) / (nu + j)
        mom = mom * (al + r) / (nu + r)
        out[beta, r] = mom
    return out


def _terms(mom: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``E[S]``, ``E[S^2]``, ``E[S a(P)]`` and ``q = E[a(P)^2]`` for moments ``(M, 4)`` (broadcast as ``(M, 1)``)
    and counts ``n`` (broadcastable to ``(M, K)``)."""
    m1, m2, m3, m4 = (mom[:, r : r + 1] for r in range(4))
    nf = n.astype(np.float64)
    f2, f3, f4 = nf * (nf - 1), nf * (nf - 1) * (nf - 2), nf * (nf - 1) * (nf - 2) * (nf - 3)
    k1 = nf * m1
    k2 = f2 * m2 + k1
    k3 = f3 * m3 + 3 * f2 * m2 + k1
    k4 = f4 * m4 + 6 * f3 * m3 + 7 * f2 * m2 + k1  # Stirling numbers of the second kind: 1, 7, 6, 1
    with np.errstate(invalid="ignore", divide="ignore"):
        e_s = np.where(nf > 0, k1 - k2 / np.where(nf > 0, nf, 1.0), 0.0)
        e_s2 = np.where(nf > 0, k2 - 2 * k3 / np.where(nf > 0, nf, 1.0) + k4 / np.where(nf > 0, nf, 1.0) ** 2, 0.0)
    q = m2 - 2 * m3 + m4
    e_sa = (nf - 1) * q
    return e_s, e_s2, e_sa, q


def gradient_error(
    p_mean: ArrayLike,
    n: ArrayLike,
    estimator: str = "drgrpo",
    *,
    signal_ratio: float = DEFAULT_SIGNAL_RATIO,
    p_std: ArrayLike | None = None,
) -> np.ndarray:
    """Expected squared error of each prompt's gradient estimate against its true gradient (module docstring).

    Parameters
    ----------
    p_mean:
        Predicted success probabilities, shape ``(M,)``, in ``[0, 1]``.
    n:
        Rollout counts: shape ``(M,)`` (one per prompt) or ``(M, K)`` / ``(1, K)`` (a table over counts); 0 means
        dropped, which costs the lost signal. RLOO needs ``n != 1``.
    estimator:
        ``"drgrpo"`` or ``"rloo"``.
    signal_ratio:
        ``rho = |Delta|^2 / E|eps|^2``, signal-to-noise per rollout (dimensionless).
    p_std:
        Optional predictive std of ``p`` ``(M,)``: groups are then Beta-Binomial (expectation over ``P``).

    Returns
    -------
    numpy.ndarray
        float64, the broadcast shape of ``n`` against ``(M, 1)`` (``(M,)`` for 1-D ``n``), in units of the score
        noise ``E|eps|^2`` (the unit of :func:`vipalloc.variance.gradient_variance`).
    """
    if estimator == "rloo" and np.any(np.asarray(n) == 1):
        raise ValueError("RLOO needs n >= 2 rollouts per generated prompt (n = 1 has no leave-one-out baseline)")
    n_term, d_term = signal_terms(p_mean, n, estimator, signal_ratio=signal_ratio, p_std=p_std)
    q = lost_signal(p_mean, signal_ratio=signal_ratio, p_std=p_std)
    # E|g_hat - g|^2 = D - 2N + rho E[a^2]; a dropped prompt (N = D = 0) costs its signal, and so does Dr.GRPO's
    # n = 1, whose advantage is identically 0. Cancellation can leave -1e-17 where the error is exactly 0.
    return np.maximum(d_term - 2.0 * n_term + (q if n_term.ndim == 1 else q[:, None]), 0.0)


def lost_signal(
    p_mean: ArrayLike, *, signal_ratio: float = DEFAULT_SIGNAL_RATIO, p_std: ArrayLike | None = None
) -> np.ndarray:
    """``rho * E[a(P)^2]`` per prompt ``(M,)``: the squared norm of the signal a prompt carries, which a plan that
    drops it gives up (units of ``E|eps|^2``)."""
    rho = check_signal_ratio(signal_ratio)
    mom = beta_moments(p_mean, p_std)
    return rho * (mom[:, 1] - 2 * mom[:, 2] + mom[:, 3])


def signal_terms(
    p_mean: ArrayLike,
    n: ArrayLike,
    estimator: str = "drgrpo",
    *,
    signal_ratio: float = DEFAULT_SIGNAL_RATIO,
    p_std: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt ``N(n) = E[g . g_hat] = rho E[S a(P)] / d`` and ``D(n) = E|g_hat|^2 = (E[S] + rho E[S^2]) / d^2``
    (0 for ``n < 2``: a dropped prompt, or Dr.GRPO's identically-zero advantage at ``n = 1``).

    ``n`` and the output shapes as in :func:`gradient_error`; units of the score noise ``E|eps|^2``. With prompts'
    signals orthogonal, a plan's ``G . E[G_hat]`` and ``E|G_hat|^2`` are the sums of these terms, and
    ``gradient_error = D - 2 N + rho E[a(P)^2]``.
    """
    if estimator not in ERROR_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r} for the gradient error; choose 'drgrpo' or 'rloo'")
    rho = check_signal_ratio(signal_ratio)
    mom = beta_moments(p_mean, p_std)
    n_arr = np.asarray(n)
    flat = n_arr.ndim == 1
    n2 = n_arr.reshape(-1, 1) if flat else n_arr
    nf = n2.astype(np.float64)
    if not np.all(np.isfinite(nf)) or np.any(nf != np.round(nf)) or np.any(nf < 0):
        raise ValueError("n must hold whole, non-negative numbers of rollouts")
    e_s, e_s2, e_sa, _ = _terms(mom, n2)
    d = nf if estimator == "drgrpo" else nf - 1.0
    safe = np.where(nf >= 2, d, 1.0)
    n_term = np.where(nf >= 2, rho * e_sa / safe, 0.0)
    d_term = np.where(nf >= 2, (e_s + rho * e_s2) / safe**2, 0.0)
    n_term, d_term = np.broadcast_arrays(n_term, d_term)
    if flat:
        return n_term.reshape(-1).copy(), d_term.reshape(-1).copy()
    return n_term.copy(), d_term.copy()


def scaled_error(
    p_mean: ArrayLike,
    counts: ArrayLike,
    estimator: str = "drgrpo",
    *,
    signal_ratio: float = DEFAULT_SIGNAL_RATIO,
    p_std: ArrayLike | None = None,
) -> float:
    """A plan's gradient error at the best step size: ``min_c E|c G_hat - G|^2 = |G|^2 - N^2 / D`` (units of the
    score noise), prompts' signals orthogonal. This is what ``vip_error`` minimises and ``Plan.error_ratio``
    reports; ``|G|^2`` alone when nothing informative is kept."""
    n_term, d_term = signal_terms(p_mean, np.asarray(counts), estimator, signal_ratio=signal_ratio, p_std=p_std)
    total = float(np.sum(lost_signal(p_mean, signal_ratio=signal_ratio, p_std=p_std)))
    d_sum = float(d_term.sum())
    return max(total - (float(n_term.sum()) ** 2 / d_sum if d_sum > 0 else 0.0), 0.0)
