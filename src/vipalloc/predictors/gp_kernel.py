"""Kernel numerics of the GP predictors (:mod:`vipalloc.predictors.gp`): distances, a Cholesky factor with
escalating jitter, binomial pseudo-observations in logit space, and type-II maximum-likelihood fitting of the
``vipalloc`` preset's kernel hyper-parameters (L-BFGS-B on the log marginal likelihood, analytic gradients).

The ``vipalloc`` kernel over rows ``(x, t)`` (embedding, step) is
``k = s_g exp(-|dt| / tau_g) + (s_p exp(-|x - x'|^2 / (2 l^2)) + s_id [same prompt]) exp(-|dt| / tau_p)``
(logit^2 units; ``dt`` in steps; unit-norm embeddings, so ``|x - x'|`` is in ``[0, 2]``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import linalg, optimize
from scipy.special import logit

__all__ = [
    "FLOAT_KEYS",
    "HYPER_BOUNDS",
    "GPNumericsWarning",
    "binomial_targets",
    "chol",
    "fit_marginal_likelihood",
    "sqdist",
]

# one logger for the whole GP predictor, whichever module of it logs
log = logging.getLogger("vipalloc.predictors.gp")

_JITTERS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)  # relative to the mean diagonal
# the kernel's continuous hyper-parameters, in the order they are fitted
FLOAT_KEYS = ("length_scale", "signal_var", "prompt_var", "time_scale", "global_var", "global_time_scale")
HYPER_BOUNDS = {  # log-space bounds for marginal-likelihood fitting
    "length_scale": (0.05, 5.0),
    "signal_var": (1e-4, 50.0),
    "prompt_var": (1e-4, 50.0),
    "time_scale": (1.0, 1e5),
    "global_var": (1e-4, 50.0),
    "global_time_scale": (1.0, 1e5),
}


class GPNumericsWarning(RuntimeWarning):
    """The GP kernel could not be factorised even with jitter; a simpler per-prompt estimate was used."""


def sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(len(a), len(b))``, clipped at 0 against round-off."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def chol(k: np.ndarray, what: str) -> np.ndarray | None:
    """Lower Cholesky factor of ``k`` with escalating jitter; ``None`` if it stays numerically indefinite."""
    n = len(k)
    if n == 0:
        return np.zeros((0, 0))
    scale = float(np.mean(np.diag(k)))
    if not (np.isfinite(scale) and scale > 0 and np.all(np.isfinite(k))):
        return None
    for jitter in _JITTERS:
        try:
            kj = k if jitter == 0.0 else k + (jitter * scale) * np.eye(n)
            c = linalg.cholesky(kj, lower=True, check_finite=False)
        except (linalg.LinAlgError, ValueError):
            continue
        if np.all(np.isfinite(c)) and np.all(np.diag(c) > 0):
            if jitter >= 1e-6:
                log.warning("%s: ill-conditioned kernel (%d x %d), added jitter %.0e x %.3g", what, n, n, jitter, scale)
            return c
    return None


def binomial_targets(s: np.ndarray, t: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Binomial pseudo-observations in logit space: ``y = logit((s + 1/2)/(n + 1))`` and their noise variance."""
    s = s.astype(np.float64)
    t = t.astype(np.float64)
    q = (s + 0.5) / (t + 1.0)
    return logit(q), 1.0 / ((t + 1.0) * q * (1.0 - q)) + floor


def fit_marginal_likelihood(
    current: dict[str, float],
    names: Sequence[str],
    parts: dict[str, np.ndarray],
    y: np.ndarray,
    v: np.ndarray,
    fixed_mean: float | None,
    maxiter: int = 50,
) -> tuple[dict[str, float], float, float] | None:
    """Minimise the negative log marginal likelihood of ``y ~ N(m 1, K + diag(v))`` over the hyper-parameters
    ``names`` (log space, bounded by :data:`HYPER_BOUNDS`, warm-started at ``current``; the others stay fixed).

    ``parts``: the parameter-free kernel pieces over the ``R`` rows, ``d2`` (squared embedding distances), ``same``
    (1.0 where both rows are the same prompt) and ``dt`` (absolute step gaps), each float ``(R, R)``; ``y``: the
    rows' pseudo-observations (logit), ``v`` their noise variances, float ``(R,)``. The constant mean ``m`` is
    ``fixed_mean`` or profiled out by generalised least squares (its gradient term vanishes: envelope theorem).
    Returns ``(fitted values of names, nll before, nll after)`` when the fit improved the likelihood, else
    ``None`` (a failed fit never raises: training must not break on it).
    """

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        q = dict(current)
        q.update({k: float(np.exp(val)) for k, val in zip(names, theta)})
        r = np.exp(-0.5 * parts["d2"] / q["length_scale"] ** 2)
        ep = np.exp(-parts["dt"] / q["time_scale"])
        eg = np.exp(-parts["dt"] / q["global_time_scale"])
        kp = q["signal_var"] * r * ep
        kid = q["prompt_var"] * parts["same"] * ep
        kg = q["global_var"] * eg
        k = kp + kid + kg + np.diag(v)
        try:
            c = linalg.cholesky(k, lower=True, check_finite=False)
        except (linalg.LinAlgError, ValueError):
            return 1e12, np.zeros(len(theta))
        kinv = linalg.cho_solve((c, True), np.eye(len(y)), check_finite=False)
        if fixed_mean is None:
            den = kinv.sum()
            m = float(kinv.sum(0) @ y / den) if den > 1e-12 else float(y.mean())
        else:
            m = float(fixed_mean)
        a = kinv @ (y - m)
        val = 0.5 * float((y - m) @ a) + float(np.log(np.diag(c)).sum())
        w = kinv - np.outer(a, a)  # d nll / d theta_j = 0.5 tr(W dK_j); GLS mean: envelope theorem
        derivs = {
            "length_scale": kp * parts["d2"] / q["length_scale"] ** 2,
            "signal_var": kp,
            "prompt_var": kid,
            "time_scale": (kp + kid) * parts["dt"] / q["time_scale"],
            "global_var": kg,
            "global_time_scale": kg * parts["dt"] / q["global_time_scale"],
        }
        grad = np.array([0.5 * float((w * derivs[k]).sum()) for k in names])
        if not (np.isfinite(val) and np.all(np.isfinite(grad))):
            return 1e12, np.zeros(len(theta))
        return val, grad

    x0 = np.array([np.log(current[k]) for k in names])
    bounds = [(np.log(HYPER_BOUNDS[k][0]), np.log(HYPER_BOUNDS[k][1])) for k in names]
    x0 = np.clip(x0, [b[0] for b in bounds], [b[1] for b in bounds])
    f0 = nll(x0)[0]
    res: Any = None
    try:
        res = optimize.minimize(nll, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": int(maxiter)})
        ok = bool(np.all(np.isfinite(res.x))) and float(res.fun) < f0 - 1e-9
    except (ValueError, FloatingPointError, linalg.LinAlgError) as exc:  # never let a fit break training
        log.warning("GP hyper-parameter fit failed (%s); keeping the previous values", exc)
        ok = False
    if not ok:
        return None
    return {k: float(np.exp(val)) for k, val in zip(names, res.x)}, float(f0), float(res.fun)
