"""Gaussian-process success predictors over prompt embeddings.

Two presets of :class:`GPPredictor`:

``preset="paper"`` reproduces the VIP authors' final code (``src/vip/success_rate_prediction/gaussian_process.py``):
RBF kernel ``exp(-0.5 (d/0.4)^2)`` on Euclidean distances between unit-norm embeddings; targets
``y = logit(clip(rate, 1e-6, 1-1e-6))`` of each observed prompt's rate at that step; noise ``1e-4``; prior mean -5 in
logit space; after each step ``alpha = (K_TT + 1e-4 I)^-1 (y - mu_T)``, ``mu <- mu + K_{:,T} alpha`` for every known
prompt, then ``mu_T <- y`` (observed prompts pinned); ``p = sigmoid(mu)``. The authors keep ``mu`` over all N
training prompts (precomputed distances). We keep it over every prompt whose features were registered, and a prompt
registered later gets exactly the value the authors' all-N vector would hold: a never-observed prompt's mean is
``prior + sum_t k(x, T_t) alpha_t``, so each step's ``(T_t, alpha_t)`` is stored. ``p_std`` comes from the last
step's posterior variance ``1 - k_T K^-1 k_T`` mapped by the delta method ``p(1-p) sigma``.

``preset="vipalloc"`` goes beyond the authors: a windowed exact GP regression over the most recent ``max_points``
(prompt, step) observations with binomial observation noise (``y = logit((s+1/2)/(n+1))``, variance
``1/((n+1) q (1-q))``), a product kernel RBF(embedding) x exp(-|step gap| / time_scale) so stale observations
count less and never-seen prompts borrow from similar prompts, a constant prior mean (the precision-weighted mean
of the window), optional marginal-likelihood fitting of the length-scale, signal variance and time-scale, and a
calibrated probability ``E[sigmoid(f)] ~ sigmoid(mu / sqrt(1 + pi s^2 / 8))``.

Numerics: Cholesky with escalating jitter (1e-8 .. 1e-2 x trace scale); if that still fails the predictor falls
back to per-prompt smoothed rates and logs a warning; predictions are always finite and in [0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import linalg, optimize
from scipy.special import expit, logit

from vipalloc.predictors.base import check_features, check_ids, check_observation

__all__ = ["GPPredictor"]

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"length_scale": 0.4, "noise": 1e-4, "prior_mean": -5.0},
    "vipalloc": {
        "length_scale": 0.8,
        "signal_var": 4.0,
        "time_scale": 20.0,
        "max_points": 2048,
        "fit_every": 0,
    },
}
_CLIP = 1e-6


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances, (len(a), len(b)), clipped at 0 against round-off."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _chol(k: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Cholesky factor with escalating jitter; None if the matrix stays numerically indefinite."""
    scale = float(np.mean(np.diag(k))) if k.size else 1.0
    for jitter in (0.0, 1e-8, 1e-6, 1e-4, 1e-2):
        try:
            c = linalg.cholesky(k + jitter * scale * np.eye(len(k)), lower=True, check_finite=False)
            if np.all(np.isfinite(c)):
                if jitter > 1e-6:
                    log.warning("GP kernel ill-conditioned: used jitter %.0e x %.3g", jitter, scale)
                return c, jitter * scale
        except linalg.LinAlgError:
            continue
    return None


class GPPredictor:
    """Gaussian-process success predictor (see module docstring for both presets)."""

    name = "gp"
    needs_features = True

    def __init__(self, preset: str = "vipalloc", **overrides: Any) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown GP preset {preset!r}; choose one of {', '.join(PRESETS)}")
        params = dict(PRESETS[preset])
        unknown = set(overrides) - set(params)
        if unknown:
            raise ValueError(f"unknown options for GP preset {preset!r}: {sorted(unknown)}; valid: {sorted(params)}")
        params.update(overrides)
        for key, val in params.items():
            if key in ("fit_every", "max_points"):
                if int(val) != val or val < 0:
                    raise ValueError(f"{key} must be a non-negative integer")
            elif key != "prior_mean" and not (np.isfinite(val) and val > 0):
                raise ValueError(f"{key} must be a positive number, got {val}")
        self.preset = preset
        self.params = params
        self._index: dict[str, int] = {}
        self._x = np.zeros((0, 0))
        # paper preset: carried posterior mean over registered prompts and the per-step updates
        self._mu = np.zeros(0)
        self._row_idx = np.zeros(0, np.int64)
        self._row_alpha = np.zeros(0)
        self._last_t = np.zeros(0, np.int64)
        # vipalloc preset: observation rows (prompt index, step, successes, trials)
        self._obs = np.zeros((0, 4), np.int64)
        self._cache: dict[str, Any] | None = None
        self._n_fits = 0

    # ------------------------------------------------------------------ features
    def set_features(self, prompt_ids: Sequence[str], features: np.ndarray) -> None:
        """Register prompt embeddings ``(N, d)`` (unit-norm rows expected). Re-registering a known prompt with
        different features is an error (the model's state refers to the old ones)."""
        ids, x = check_features(prompt_ids, features)
        if self._x.size and x.shape[1] != self._x.shape[1]:
            raise ValueError(f"feature dimension {x.shape[1]} differs from the registered {self._x.shape[1]}")
        new_ids, new_rows = [], []
        for pid, row in zip(ids, x):
            i = self._index.get(pid)
            if i is None:
                if pid not in new_ids:
                    new_ids.append(pid)
                    new_rows.append(row)
            elif not np.allclose(self._x[i], row, atol=1e-6):
                raise ValueError(f"prompt {pid!r} was registered with different features")
        if not new_ids:
            return
        xn = np.asarray(new_rows)
        start = len(self._index)
        for k, pid in enumerate(new_ids):
            self._index[pid] = start + k
        self._x = xn if not self._x.size else np.vstack([self._x, xn])
        if self.preset == "paper":
            mu_new = np.full(len(new_ids), float(self.params["prior_mean"]))
            if self._row_idx.size:  # what the authors' all-N mean vector holds for never-observed prompts
                mu_new += self._kernel(xn, self._x[self._row_idx]) @ self._row_alpha
            self._mu = np.concatenate([self._mu, mu_new])
        self._cache = None

    def _ids_to_index(self, ids: list[str]) -> np.ndarray:
        missing = [p for p in ids if p not in self._index]
        if missing:
            raise ValueError(
                f"GP predictor has no features for {len(missing)} prompt(s) (e.g. {missing[:3]}); "
                "call set_features(ids, embeddings) first (the Allocator does this when given prompts=)"
            )
        return np.array([self._index[p] for p in ids], dtype=np.int64)

    def _kernel(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ell = float(self.params["length_scale"])
        return np.exp(-0.5 * _sqdist(a, b) / ell**2)

    # ------------------------------------------------------------------ observe
    def observe(self, prompt_ids: Sequence[str], successes: np.ndarray, trials: np.ndarray, step: int) -> None:
        ids, s, t, step = check_observation(prompt_ids, successes, trials, step)
        idx = self._ids_to_index(ids)
        if self.preset == "paper":
            self._observe_paper(idx, s, t)
        else:
            rows = np.column_stack([idx, np.full(len(idx), step), s, t]).astype(np.int64)
            self._obs = np.vstack([self._obs, rows])
            cap = 8 * int(self.params["max_points"])  # keep the state bounded; the fit uses max_points
            if len(self._obs) > cap:
                self._obs = self._obs[-cap:]
            self._n_fits += 1
            fe = int(self.params["fit_every"])
            if fe and self._n_fits % fe == 0:
                self.fit_hyperparameters()
        self._cache = None

    def _observe_paper(self, idx: np.ndarray, s: np.ndarray, t: np.ndarray) -> None:
        y = logit(np.clip(s / t, _CLIP, 1 - _CLIP))
        xt = self._x[idx]
        k_tt = self._kernel(xt, xt) + float(self.params["noise"]) * np.eye(len(idx))
        fac = _chol(k_tt)
        if fac is None:  # cannot happen with noise 1e-4 and a PSD kernel; never crash all the same
            log.warning("paper GP: kernel not factorisable; pinning observed prompts only")
            self._mu[idx] = y
            return
        alpha = linalg.cho_solve((fac[0], True), y - self._mu[idx], check_finite=False)
        self._mu += self._kernel(self._x, xt) @ alpha
        self._mu[idx] = y
        self._row_idx = np.concatenate([self._row_idx, idx])
        self._row_alpha = np.concatenate([self._row_alpha, alpha])
        self._last_t = idx.copy()

    # ------------------------------------------------------------------ predict
    def predict(self, prompt_ids: Sequence[str], step: int) -> tuple[np.ndarray, np.ndarray]:
        ids = check_ids(prompt_ids)
        idx = self._ids_to_index(ids)
        if self.preset == "paper":
            mu = self._mu[idx]
            if self._last_t.size:
                xt = self._x[self._last_t]
                k_tt = self._kernel(xt, xt) + float(self.params["noise"]) * np.eye(len(xt))
                fac = _chol(k_tt)
                k_xt = self._kernel(self._x[idx], xt)
                if fac is not None:
                    v = linalg.solve_triangular(fac[0], k_xt.T, lower=True, check_finite=False)
                    var = np.clip(1.0 - (v * v).sum(0), 0.0, 1.0)
                else:
                    var = np.ones(len(idx))
            else:
                var = np.ones(len(idx))
            p = expit(mu)
            return _finite(p), _finite(p * (1 - p) * np.sqrt(var), hi=0.5)
        return self._predict_window(idx, int(step))

    def _window(self) -> np.ndarray:
        return self._obs[-int(self.params["max_points"]) :] if len(self._obs) else self._obs

    def _targets(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, t = rows[:, 2].astype(np.float64), rows[:, 3].astype(np.float64)
        q = (s + 0.5) / (t + 1.0)
        return logit(q), 1.0 / ((t + 1.0) * q * (1.0 - q))

    def _full_kernel(self, xa: np.ndarray, sa: np.ndarray, xb: np.ndarray, sb: np.ndarray, params: dict) -> np.ndarray:
        k = params["signal_var"] * np.exp(-0.5 * _sqdist(xa, xb) / params["length_scale"] ** 2)
        return k * np.exp(-np.abs(sa[:, None] - sb[None, :]) / params["time_scale"])

    def _fit_cache(self) -> dict[str, Any] | None:
        if self._cache is not None:
            return self._cache
        rows = self._window()
        if not len(rows):
            return None
        y, noise = self._targets(rows)
        prec = 1.0 / noise
        mean = float((prec * y).sum() / prec.sum())
        xr = self._x[rows[:, 0]]
        sr = rows[:, 1].astype(np.float64)
        k = self._full_kernel(xr, sr, xr, sr, self.params) + np.diag(noise)
        fac = _chol(k)
        if fac is None:
            log.warning("GP kernel not factorisable even with jitter; falling back to per-prompt smoothed rates")
            self._cache = {"fallback": True, "rows": rows, "mean": mean}
            return self._cache
        alpha = linalg.cho_solve((fac[0], True), y - mean, check_finite=False)
        self._cache = {"fallback": False, "rows": rows, "xr": xr, "sr": sr, "L": fac[0], "alpha": alpha, "mean": mean}
        return self._cache

    def _predict_window(self, idx: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        cache = self._fit_cache()
        if cache is None:  # nothing observed yet: the prior, the same for every prompt
            p = np.full(len(idx), 0.5)
            return p, np.full(len(idx), 0.5 * 0.5 * np.sqrt(self.params["signal_var"]))
        if cache["fallback"]:
            rows = cache["rows"]
            s = np.bincount(rows[:, 0], weights=rows[:, 2], minlength=len(self._index))[idx]
            t = np.bincount(rows[:, 0], weights=rows[:, 3], minlength=len(self._index))[idx]
            p = (s + 0.5) / (t + 1.0)
            return _finite(p), _finite(np.sqrt(p * (1 - p) / (t + 2.0)), hi=0.5)
        xs = self._x[idx]
        ss = np.full(len(idx), float(step))
        k_star = self._full_kernel(xs, ss, cache["xr"], cache["sr"], self.params)
        mu = cache["mean"] + k_star @ cache["alpha"]
        v = linalg.solve_triangular(cache["L"], k_star.T, lower=True, check_finite=False)
        var = np.clip(self.params["signal_var"] - (v * v).sum(0), 1e-12, None)
        p = expit(mu / np.sqrt(1.0 + np.pi * var / 8.0))
        return _finite(p), _finite(p * (1 - p) * np.sqrt(var), hi=0.5)

    # ------------------------------------------------------------------ hyper-parameters
    def fit_hyperparameters(self, max_points: int = 512) -> dict[str, float]:
        """Maximise the log marginal likelihood over length-scale, signal variance and time-scale (vipalloc
        preset), on the most recent ``max_points`` rows, within bounds; keeps the old values if it fails."""
        if self.preset != "vipalloc":
            raise ValueError("hyper-parameter fitting applies to preset='vipalloc' only (the paper fixes them)")
        rows = self._obs[-max_points:]
        if len(rows) < 8:
            return {k: self.params[k] for k in ("length_scale", "signal_var", "time_scale")}
        y, noise = self._targets(rows)
        xr = self._x[rows[:, 0]]
        sr = rows[:, 1].astype(np.float64)
        d2 = _sqdist(xr, xr)
        dt = np.abs(sr[:, None] - sr[None, :])

        def nll(theta: np.ndarray) -> float:
            ell, sv, tau, m = np.exp(theta[0]), np.exp(theta[1]), np.exp(theta[2]), theta[3]
            k = sv * np.exp(-0.5 * d2 / ell**2 - dt / tau) + np.diag(noise)
            try:
                c = linalg.cho_factor(k, lower=True, check_finite=False)
            except linalg.LinAlgError:
                return 1e10
            r = y - m
            a = linalg.cho_solve(c, r, check_finite=False)
            return float(0.5 * r @ a + np.log(np.diag(c[0])).sum())

        p = self.params
        x0 = np.array([np.log(p["length_scale"]), np.log(p["signal_var"]), np.log(p["time_scale"]), float(y.mean())])
        bounds = [(np.log(0.05), np.log(5.0)), (np.log(0.05), np.log(50.0)), (np.log(1.0), np.log(1e4)), (-15, 15)]
        res = optimize.minimize(nll, x0, method="L-BFGS-B", bounds=bounds, options={"maxiter": 60})
        if np.all(np.isfinite(res.x)) and res.fun < nll(x0):
            p["length_scale"], p["signal_var"], p["time_scale"] = (float(np.exp(v)) for v in res.x[:3])
        self._cache = None
        return {k: p[k] for k in ("length_scale", "signal_var", "time_scale")}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "params": dict(self.params),
            "ids": list(self._index),
            "x": self._x.copy(),
            "mu": self._mu.copy(),
            "row_idx": self._row_idx.copy(),
            "row_alpha": self._row_alpha.copy(),
            "last_t": self._last_t.copy(),
            "obs": self._obs.copy(),
            "n_fits": self._n_fits,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["preset"] != self.preset:
            raise ValueError(f"GP state has preset {state['preset']!r}, this predictor {self.preset!r}")
        ids = [str(p) for p in state["ids"]]
        x = np.asarray(state["x"], np.float64)
        if len(ids) and x.shape[0] != len(ids):
            raise ValueError("GP state: features do not match ids")
        self.params = dict(state["params"])
        self._index = {p: i for i, p in enumerate(ids)}
        self._x = x.copy()
        self._mu = np.asarray(state["mu"], np.float64).copy()
        self._row_idx = np.asarray(state["row_idx"], np.int64).copy()
        self._row_alpha = np.asarray(state["row_alpha"], np.float64).copy()
        self._last_t = np.asarray(state["last_t"], np.int64).copy()
        self._obs = np.asarray(state["obs"], np.int64).reshape(-1, 4).copy()
        self._n_fits = int(state["n_fits"])
        self._cache = None


def _finite(a: np.ndarray, hi: float = 1.0) -> np.ndarray:
    """Replace any non-finite value (never expected) by a neutral one and clip to ``[0, hi]``."""
    return np.clip(np.nan_to_num(np.asarray(a, np.float64), nan=0.5 * hi, posinf=hi, neginf=0.0), 0.0, hi)
