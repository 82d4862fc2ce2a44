"""Expected per-prompt policy-gradient variance as a function of success probability ``p`` and rollouts ``n``.

Model (the VIP paper's): a prompt's gradient estimate is ``g = (1/n) sum_j A_j s_j`` where ``r_j ~ Bernoulli(p)``
are the rollout rewards, ``A_j`` the estimator's advantage and ``s_j`` the score vectors, modelled as zero-mean,
unit-variance and independent of the rewards and of each other. Then ``E|g|^2 = E[sum_j A_j^2] / n^2`` per unit
score dimension; that is what :func:`gradient_variance` returns. Derivations: ``docs/variance.md``.

| estimator | advantage ``A_j`` | ``E[sum_j A_j^2] / n^2`` |
|---|---|---|
| ``drgrpo`` | ``r_j - mean(r)`` | ``p(1-p)(n-1)/n^2`` |
| ``rloo`` | ``r_j - mean(r_{-j})`` | ``p(1-p)/(n-1)`` |
| ``grpo`` | ``(r_j - mean(r)) / (std(r) + eps)`` (ddof=1) | binomial sum; eps=0: ``(n-1)/n^2 (1-p^n-(1-p)^n)`` |

Conventions: ``n = 0`` means the prompt is not generated and contributes 0; ``n = 1`` gives 0 for ``drgrpo`` and
``grpo`` (the advantage is identically zero) and is undefined for ``rloo`` (no leave-one-out baseline).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import gammaln

__all__ = ["ESTIMATORS", "GRPO_EPS", "gradient_variance"]

ESTIMATORS = ("drgrpo", "rloo", "grpo")
GRPO_EPS = 1e-6  # verl's default epsilon in compute_grpo_outcome_advantage


def _validate(p: ArrayLike, n: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p_arr = np.asarray(p, dtype=np.float64)
    n_raw = np.asarray(n)
    if not np.all(np.isfinite(p_arr)):
        raise ValueError("p contains NaN or inf; success probabilities must be finite numbers in [0, 1]")
    if np.any((p_arr < 0.0) | (p_arr > 1.0)):
        raise ValueError(f"p must be in [0, 1], got values in [{p_arr.min():g}, {p_arr.max():g}]")
    n_arr = n_raw.astype(np.float64)
    if not np.all(np.isfinite(n_arr)) or np.any(n_arr != np.round(n_arr)):
        raise ValueError("n must hold whole numbers of rollouts")
    if np.any(n_arr < 0):
        raise ValueError("n must be >= 0 (0 = prompt not generated)")
    try:
        np.broadcast_shapes(p_arr.shape, n_arr.shape)
    except ValueError:
        raise ValueError(f"p (shape {p_arr.shape}) and n (shape {n_arr.shape}) do not broadcast together") from None
    return p_arr, n_arr.astype(np.int64)


def gradient_variance(
    p: ArrayLike, n: ArrayLike, estimator: str = "drgrpo", *, grpo_eps: float = GRPO_EPS
) -> np.ndarray:
    """Expected per-prompt gradient variance ``E[sum_j A_j^2] / n^2``.

    Parameters
    ----------
    p:
        Success probabilities in ``[0, 1]``, any shape broadcastable with ``n``.
    n:
        Rollout counts (whole numbers >= 0).
    estimator:
        ``"drgrpo"``, ``"rloo"`` or ``"grpo"``.
    grpo_eps:
        The epsilon added to the (ddof=1) group std by GRPO's advantage normalisation (``>= 0``).

    Returns
    -------
    numpy.ndarray
        float64 array of the broadcast shape; 0 where ``n == 0``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    p_arr, n_arr = _validate(p, n)
    if estimator == "rloo" and np.any(n_arr == 1):
        raise ValueError("RLOO needs n >= 2 rollouts per generated prompt (n = 1 has no leave-one-out baseline)")
    if estimator != "grpo":
        return _closed_form(p_arr, n_arr, estimator)
    if grpo_eps < 0 or not np.isfinite(grpo_eps):
        raise ValueError(f"grpo_eps must be a finite number >= 0, got {grpo_eps}")
    p_b, n_b = np.broadcast_arrays(p_arr, n_arr)
    return _grpo_variance(p_b, n_b, float(grpo_eps))


def _closed_form(p: np.ndarray, n: np.ndarray, estimator: str) -> np.ndarray:
    """Dr.GRPO / RLOO closed forms on validated, broadcast inputs (n = 1 already rejected for RLOO).

    Written with ``np.divide(..., where=)`` rather than boolean indexing: the solver calls this on (M, K) tables.
    """
    a = p * (1.0 - p)
    nf = n.astype(np.float64)
    out = np.zeros(np.broadcast_shapes(p.shape, n.shape), dtype=np.float64)
    if estimator == "drgrpo":  # a (n-1)/n^2, and 0 at n = 0 (not generated); n = 1 gives 0 by the formula
        np.divide(a * (nf - 1.0), nf * nf, out=out, where=nf >= 1)
    else:  # rloo: a/(n-1), and 0 at n = 0
        np.divide(a, nf - 1.0, out=out, where=nf >= 2)
    return out


def _grpo_variance(p: np.ndarray, n: np.ndarray, eps: float) -> np.ndarray:
    """Exact E[sum_j A_j^2]/n^2 for GRPO's std-normalised advantage, by summing over k ~ Binomial(n, p).

    With k successes: S = sum_j (r_j - mean)^2 = k(n-k)/n and std = sqrt(S/(n-1)), so
    sum_j A_j^2 = S / (std + eps)^2, which is 0 for constant groups (k in {0, n}) and (n-1) when eps = 0.
    """
    out = np.zeros(p.shape, dtype=np.float64)
    flat_p = p.ravel()
    flat_n = n.ravel()
    res = out.ravel()
    for n_val in np.unique(flat_n):
        if n_val < 2:
            continue  # n in {0, 1}: no variance (not generated, or advantage identically 0)
        sel = flat_n == n_val
        pv = flat_p[sel][:, None]
        k = np.arange(1, n_val)[None, :]  # only non-constant groups contribute
        s = k * (n_val - k) / n_val
        std = np.sqrt(s / (n_val - 1))
        sum_a2 = s / (std + eps) ** 2
        with np.errstate(divide="ignore"):
            log_pmf = (
                gammaln(n_val + 1)
                - gammaln(k + 1)
                - gammaln(n_val - k + 1)
                + k * np.log(pv)
                + (n_val - k) * np.log1p(-pv)
            )
        pmf = np.where((pv > 0) & (pv < 1), np.exp(log_pmf), 0.0)
        res[sel] = (pmf * sum_a2).sum(axis=1) / float(n_val) ** 2
    return out
