"""Gaussian-process success predictors over prompt embeddings (two presets of :class:`GPPredictor`).

``preset="paper"``: the VIP authors' final code (``src/vip/success_rate_prediction/gaussian_process.py``, class
``GPR`` with ``reuse_mean=True``), reproduced exactly:

* kernel ``k(x, x') = exp(-0.5 (|x - x'| / 0.4)^2)`` on Euclidean distances of unit-norm all-MiniLM-L6-v2 embeddings;
* at each step, targets ``y_T = logit(clip(rate_T, 1e-6, 1 - 1e-6))`` of the step's observed prompts ``T``;
* ``alpha = (K_TT + 1e-4 I)^-1 (y_T - mu_T)``, then ``mu <- mu + K_{:,T} alpha`` for every prompt and
  ``mu_T <- y_T`` (observed prompts pinned to their observed logit); ``mu`` starts at the prior ``-5``;
* ``p = sigmoid(mu)``.

The authors hold ``mu`` for all N training prompts (a precomputed N x N distance matrix). We hold it for every
registered prompt, and a prompt registered later gets exactly what the authors' all-N vector would hold: a
never-observed prompt's mean is ``prior + sum_t k(x, T_t) alpha_t``, so we keep ``A_j = sum_t alpha_{t,j}`` (the
summed coefficients of prompt ``j`` as a training point, an O(N) sufficient statistic) and set
``mu(x) = prior + sum_j k(x, x_j) A_j`` at registration. ``p_std`` maps the authors' posterior variance of the
latest update (``v = 1 - k_T (K_TT + 1e-4 I)^-1 k_T``, logit space, covariance reset every step) through the delta
method: ``p_std = p (1 - p) sqrt(v)``.

``preset="vipalloc"`` goes beyond the authors (details and the measured gains in ``docs/predictors.md``):

* latent logit ``f(x, t) = m + h(t) + g(x, t)`` with kernel
  ``k = s_g exp(-|dt| / tau_g) + (s_p exp(-|x - x'|^2 / (2 l^2)) + s_id [same prompt]) exp(-|dt| / tau_p)``:
  a policy-wide trend ``h`` (everyone improves), a semantic component shared by similar prompts, and a persistent
  prompt-specific component; ``dt`` is the step gap, so stale observations count less;
* one row per observed (prompt, step), binomial observation noise: ``y = logit(q)``, ``q = (s + 1/2) / (n + 1)``,
  noise variance ``1 / ((n + 1) q (1 - q)) + noise_floor`` (2 rollouts weigh less than 32);
* exact GP on the most recent ``max_points`` rows (the window; ``window_steps`` can shorten it); older rows of a
  predicted prompt still count: they are pooled into one summary observation (precision-weighted, noise inflated by
  the kernel's drift over the gap) and conditioned on exactly, per prompt, on top of the window posterior;
* constant mean ``m`` by generalised least squares (or a fixed ``prior_mean``);
* never-seen prompts get the posterior mean and variance at their embedding, and the probability is calibrated:
  ``p = E[sigmoid(f)] ~ sigmoid(mu / sqrt(1 + pi v / 8))``; ``p_std = p (1 - p) sqrt(v)`` (delta method);
* optional marginal-likelihood fitting of ``l, s_p, s_id, tau_p, s_g, tau_g`` (L-BFGS-B with analytic gradients,
  log-space bounds, warm-started, kept only if the likelihood improves), every ``fit_every`` new steps;
* robust numerics: Cholesky with escalating jitter; if that fails, a logged fallback to per-prompt smoothed rates.
  Predictions are always finite and in ``[0, 1]``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import linalg, optimize
from scipy.special import expit, logit

from vipalloc.predictors.base import (
    FeatureStore,
    check_features,
    check_ids,
    check_observation,
    check_step,
    clean_prob,
    clean_std,
)

__all__ = ["DEFAULT_PRESET", "GPPredictor", "PRESETS", "GPNumericsWarning"]

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"length_scale": 0.4, "noise": 1e-4, "prior_mean": -5.0},
    "vipalloc": {
        "length_scale": 0.7,  # embedding RBF length-scale (unit-norm embeddings: distances in [0, 2])
        "signal_var": 1.0,  # s_p: variance of the semantic (similar prompts) component, logit^2
        "prompt_var": 1.0,  # s_id: variance of the prompt-specific component
        "time_scale": 200.0,  # tau_p: steps over which a prompt's own difficulty decorrelates
        "global_var": 1.0,  # s_g: variance of the policy-wide trend h(t); 0 disables it
        "global_time_scale": 30.0,  # tau_g: steps over which the trend decorrelates
        "noise_floor": 0.01,  # added to every binomial noise variance (model error), logit^2
        "prior_mean": None,  # None: constant mean by GLS; a float fixes it (logit)
        "max_points": 1024,  # rows in the exact GP (most recent (prompt, step) rows); cost ~ max_points^2 x M
        "window_steps": 0,  # >0: only rows from the last `window_steps` observed steps enter the window
        "own_history": True,  # condition each predicted prompt on its own rows older than the window
        "calibrate": False,  # True: p = E[sigmoid(f)] (probit approximation) instead of sigmoid(E[f])
        "likelihood": "laplace",  # binomial likelihood (Laplace, Newton) or "gaussian" smoothed-logit targets
        "newton_iters": 1,  # Newton steps per Laplace fit when warm-started from the previous mode
        "fit_every": 0,  # >0: refit hyper-parameters by marginal likelihood every k new steps
        "fit_points": 512,  # rows used by a hyper-parameter fit (most recent)
        "max_history": 200_000,  # rows kept in memory/state (oldest steps dropped beyond this)
    },
}
DEFAULT_PRESET = "vipalloc"
_CLIP = 1e-6  # the authors' clip before logit
_KEY = np.int64(1) << 32  # (prompt row, step) -> one int64 key
_COLD_NEWTON_ITERS = 20  # cap for a Laplace fit that starts mostly cold (stops at |delta f| < 1e-3)
_JITTERS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)  # relative to the mean diagonal
_FLOAT_KEYS = ("length_scale", "signal_var", "prompt_var", "time_scale", "global_var", "global_time_scale")
_HYPER_BOUNDS = {  # log-space bounds for marginal-likelihood fitting
    "length_scale": (0.05, 5.0),
    "signal_var": (1e-4, 50.0),
    "prompt_var": (1e-4, 50.0),
    "time_scale": (1.0, 1e5),
    "global_var": (1e-4, 50.0),
    "global_time_scale": (1.0, 1e5),
}


class GPNumericsWarning(RuntimeWarning):
    """The GP kernel could not be factorised even with jitter; a simpler per-prompt estimate was used."""


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(len(a), len(b))``, clipped at 0 against round-off."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _chol(k: np.ndarray, what: str) -> np.ndarray | None:
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


# ---------------------------------------------------------------------------------------------------- paper preset
class _PaperGP:
    """The authors' recursive GP (see the module docstring). Arrays are indexed by registered-prompt row."""

    def __init__(self, params: dict[str, Any], feats: FeatureStore) -> None:
        self.p = params
        self.feats = feats
        self.mu = np.zeros(0)  # carried posterior mean (logit) per registered prompt
        self.acc = np.zeros(0)  # summed alpha of each prompt as a training point
        self.last = np.zeros(0, np.int64)  # latest step each prompt was observed (-1: never)
        # the open update (the latest step): state before it, and its merged data, so that several observe calls
        # for one step are fitted together as the authors fit once per step
        self.open_step = -1
        self.base_mu = np.zeros(0)
        self.base_acc = np.zeros(0)
        self.open_idx = np.zeros(0, np.int64)
        self.open_s = np.zeros(0, np.int64)
        self.open_t = np.zeros(0, np.int64)
        self._chol_open: np.ndarray | None = None

    def kernel(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * _sqdist(a, b) / float(self.p["length_scale"]) ** 2)

    def _prior_at(self, x_new: np.ndarray, acc: np.ndarray) -> np.ndarray:
        """``prior + sum_j k(x, x_j) acc_j`` over trained prompts: the all-N mean of never-observed prompts."""
        mu = np.full(len(x_new), float(self.p["prior_mean"]))
        trained = np.flatnonzero(acc != 0.0)
        if trained.size:
            mu += self.kernel(x_new, self.feats.x[trained]) @ acc[trained]
        return mu

    def register(self, rows: np.ndarray) -> None:
        x_new = self.feats.x[rows]
        self.mu = np.concatenate([self.mu, self._prior_at(x_new, self.acc)])
        self.base_mu = np.concatenate([self.base_mu, self._prior_at(x_new, self.base_acc)])
        zeros = np.zeros(len(rows))
        self.acc = np.concatenate([self.acc, zeros])
        self.base_acc = np.concatenate([self.base_acc, zeros])
        self.last = np.concatenate([self.last, np.full(len(rows), -1, np.int64)])

    def observe(self, idx: np.ndarray, s: np.ndarray, t: np.ndarray, step: int) -> None:
        keep = self.last[idx] <= step  # a prompt already observed at a newer step keeps its newer data
        idx, s, t = idx[keep], s[keep], t[keep]
        if step == self.open_step:  # same step as the open update: refit it on the merged data
            merged: dict[int, list[int]] = {}
            for i, si, ti in zip(
                np.concatenate([self.open_idx, idx]).tolist(),
                np.concatenate([self.open_s, s]).tolist(),
                np.concatenate([self.open_t, t]).tolist(),
            ):
                cur = merged.setdefault(i, [0, 0])
                cur[0] += si
                cur[1] += ti
            idx = np.array(list(merged), dtype=np.int64)
            s = np.array([v[0] for v in merged.values()], dtype=np.int64)
            t = np.array([v[1] for v in merged.values()], dtype=np.int64)
            mu, acc = self.base_mu.copy(), self.base_acc.copy()
        elif idx.size:
            mu, acc = self.mu.copy(), self.acc.copy()
        else:
            return
        self._update(mu, acc, idx, s, t)
        if step != self.open_step:
            self.base_mu, self.base_acc = self.mu, self.acc
            self.open_step = step
        self.mu, self.acc = mu, acc
        self.open_idx, self.open_s, self.open_t = idx, s, t
        self.last[idx] = np.maximum(self.last[idx], step)
        self._chol_open = None

    def _update(self, mu: np.ndarray, acc: np.ndarray, idx: np.ndarray, s: np.ndarray, t: np.ndarray) -> None:
        """One authors' step, in place on ``mu`` and ``acc``."""
        y = logit(np.clip(s / t, _CLIP, 1.0 - _CLIP))
        xt = self.feats.x[idx]
        c = _chol(self.kernel(xt, xt) + float(self.p["noise"]) * np.eye(len(idx)), "paper GP")
        if c is None:  # impossible for a PSD kernel plus 1e-4 I; pin the observed prompts all the same
            warnings.warn("paper GP: kernel not factorisable; pinning observed prompts only", GPNumericsWarning, 2)
            mu[idx] = y
            return
        alpha = linalg.cho_solve((c, True), y - mu[idx], check_finite=False)
        mu += self.kernel(self.feats.x, xt) @ alpha
        mu[idx] = y
        acc[idx] += alpha

    def predict(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu = self.mu[q]
        var = np.ones(len(q))
        if self.open_idx.size:
            if self._chol_open is None:
                xt = self.feats.x[self.open_idx]
                self._chol_open = _chol(self.kernel(xt, xt) + float(self.p["noise"]) * np.eye(len(xt)), "paper GP")
            if self._chol_open is not None:
                k_qt = self.kernel(self.feats.x[q], self.feats.x[self.open_idx])
                v = linalg.solve_triangular(self._chol_open, k_qt.T, lower=True, check_finite=False)
                var = np.clip(1.0 - (v * v).sum(0), 0.0, 1.0)
        p = expit(mu)
        return clean_prob(p), clean_std(p * (1.0 - p) * np.sqrt(var))

    def state_dict(self) -> dict[str, Any]:
        return {
            "mu": self.mu.copy(),
            "acc": self.acc.copy(),
            "last": self.last.copy(),
            "open_step": self.open_step,
            "base_mu": self.base_mu.copy(),
            "base_acc": self.base_acc.copy(),
            "open_idx": self.open_idx.copy(),
            "open_s": self.open_s.copy(),
            "open_t": self.open_t.copy(),
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        n = self.feats.n
        arrs = {k: np.asarray(st[k], np.float64) for k in ("mu", "acc", "base_mu", "base_acc")}
        last = np.asarray(st["last"], np.int64)
        opens = {k: np.asarray(st[k], np.int64).reshape(-1) for k in ("open_idx", "open_s", "open_t")}
        if any(a.shape != (n,) for a in arrs.values()) or last.shape != (n,):
            raise ValueError("paper GP state arrays do not match the registered prompts")
        m = len(opens["open_idx"])
        if any(len(a) != m for a in opens.values()) or (
            m and not 0 <= opens["open_idx"].min() <= opens["open_idx"].max() < n
        ):
            raise ValueError("paper GP state: the open step's data do not match the registered prompts")
        self.mu, self.acc, self.base_mu, self.base_acc = (arrs[k].copy() for k in ("mu", "acc", "base_mu", "base_acc"))
        self.last = last.copy()
        self.open_step = int(st["open_step"])
        self.open_idx, self.open_s, self.open_t = (opens[k].copy() for k in ("open_idx", "open_s", "open_t"))
        self._chol_open = None


# ------------------------------------------------------------------------------------------------- vipalloc preset
def _targets(s: np.ndarray, t: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Binomial pseudo-observations in logit space: ``y = logit((s + 1/2)/(n + 1))`` and their noise variance."""
    s = s.astype(np.float64)
    t = t.astype(np.float64)
    q = (s + 0.5) / (t + 1.0)
    return logit(q), 1.0 / ((t + 1.0) * q * (1.0 - q)) + floor


class _WindowGP:
    """Windowed exact GP with binomial noise, time decay, trend and per-prompt history (module docstring)."""

    def __init__(self, params: dict[str, Any], feats: FeatureStore) -> None:
        self.p = params
        self.feats = feats
        self._buf = np.zeros((0, 4), np.int64)  # rows: prompt row, step, successes, trials (insertion order)
        self.n_rows = 0
        self.last_step = -1
        self.steps_since_fit = 0
        self._cache: dict[str, Any] | None = None
        # Laplace mode of the latest fit per (prompt, step) key: the next fit's warm start (part of the state so a
        # reloaded predictor iterates exactly as the original)
        self._mode_keys = np.zeros(0, np.int64)
        self._mode_f = np.zeros(0)

    # -------------------------------------------------------------- data
    @property
    def rows(self) -> np.ndarray:
        return self._buf[: self.n_rows]

    def observe(self, idx: np.ndarray, s: np.ndarray, t: np.ndarray, step: int) -> None:
        # one row per (prompt, step): a prompt already recorded at this step gets the new counts added
        fresh = np.ones(len(idx), dtype=bool)
        same = np.flatnonzero(self.rows[:, 1] == step)
        if same.size:
            order = np.argsort(self.rows[same, 0])
            known = self.rows[same[order], 0]
            pos = np.minimum(np.searchsorted(known, idx), len(known) - 1)
            hit = known[pos] == idx  # ids are unique within a call, so each existing row is hit at most once
            rows_hit = same[order[pos[hit]]]
            self._buf[rows_hit, 2] += s[hit]
            self._buf[rows_hit, 3] += t[hit]
            fresh = ~hit
        if fresh.any():
            add = np.column_stack([idx[fresh], np.full(int(fresh.sum()), step), s[fresh], t[fresh]]).astype(np.int64)
            need = self.n_rows + len(add)
            if need > len(self._buf):
                grown = np.zeros((max(need, 2 * len(self._buf), 64), 4), np.int64)
                grown[: self.n_rows] = self.rows
                self._buf = grown
            self._buf[self.n_rows : need] = add
            self.n_rows = need
        cap = int(self.p["max_history"])
        if self.n_rows > cap:  # drop the oldest steps, with slack so this is not paid on every call
            keep = np.sort(np.argsort(self.rows[:, 1], kind="stable")[-int(0.9 * cap) :])
            self._set_rows(self.rows[keep])
        if step > self.last_step:
            self.steps_since_fit += 1 if self.last_step >= 0 else 0
            self.last_step = step
        self._cache = None

    def _set_rows(self, rows: np.ndarray) -> None:
        self._buf = np.array(rows, dtype=np.int64).reshape(-1, 4)
        self.n_rows = len(self._buf)

    def _window_mask(self) -> np.ndarray:
        """Rows in the exact GP: the most recent ``max_points`` (by step, then insertion), within ``window_steps``."""
        rows = self.rows
        mask = np.zeros(len(rows), dtype=bool)
        order = np.argsort(rows[:, 1], kind="stable")
        ws = int(self.p["window_steps"])
        if ws > 0:
            order = order[rows[order, 1] > self.last_step - ws]
        mask[order[-int(self.p["max_points"]) :]] = True
        return mask

    # -------------------------------------------------------------- kernel pieces
    def _time(self, dt: np.ndarray, p: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        p = self.p if p is None else p
        adt = np.abs(dt)
        return np.exp(-adt / float(p["time_scale"])), np.exp(-adt / float(p["global_time_scale"]))

    def _rbf(self, a: np.ndarray, b: np.ndarray, p: dict[str, Any] | None = None) -> np.ndarray:
        p = self.p if p is None else p
        return np.exp(-0.5 * _sqdist(a, b) / float(p["length_scale"]) ** 2)

    def _prior_var(self, p: dict[str, Any] | None = None) -> float:
        p = self.p if p is None else p
        return float(p["signal_var"]) + float(p["prompt_var"]) + float(p["global_var"])

    def _train_kernel(self, rows: np.ndarray) -> np.ndarray:
        """Noise-free kernel over ``rows``: built on the distinct prompts and steps, then gathered (cheap)."""
        p = self.p
        uniq, inv = np.unique(rows[:, 0], return_inverse=True)
        su, sinv = np.unique(rows[:, 1], return_inverse=True)
        xu = self.feats.x[uniq]
        base_u = float(p["signal_var"]) * self._rbf(xu, xu) + float(p["prompt_var"]) * np.eye(len(uniq))
        ep_s, eg_s = self._time(su[:, None].astype(np.float64) - su[None, :])
        # row-then-column `take` is several times faster than np.ix_ fancy indexing at these sizes
        k = base_u[inv].take(inv, axis=1)
        k *= ep_s[sinv].take(sinv, axis=1)
        if float(p["global_var"]) > 0:
            k += float(p["global_var"]) * eg_s[sinv].take(sinv, axis=1)
        return k

    def _kernel_parts(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Parameter-free pieces of the kernel over ``rows`` (squared distances, same-prompt mask, step gaps)."""
        uniq, inv = np.unique(rows[:, 0], return_inverse=True)
        xu = self.feats.x[uniq]
        steps = rows[:, 1].astype(np.float64)
        return {
            "d2": _sqdist(xu, xu)[np.ix_(inv, inv)],
            "same": (inv[:, None] == inv[None, :]).astype(np.float64),
            "dt": np.abs(steps[:, None] - steps[None, :]),
        }

    # -------------------------------------------------------------- fit and predict
    def _fit(self) -> dict[str, Any] | None:
        """Factorise the window GP (cached until the next observe); ``None`` before any observation."""
        if self._cache is not None:
            return self._cache
        if self.n_rows == 0:
            return None
        win = self._window_mask()
        rows = self.rows[win]
        s, n = rows[:, 2].astype(np.float64), rows[:, 3].astype(np.float64)
        floor = float(self.p["noise_floor"])
        k = self._train_kernel(rows)
        diag = np.diag(k).copy()
        keys = rows[:, 0] * _KEY + rows[:, 1]
        f = _targets(rows[:, 2], rows[:, 3], 0.0)[0]  # start: smoothed logits (the Gaussian pseudo-observations)
        iters = 1
        if self.p["likelihood"] == "laplace":
            warm = 0
            if len(self._mode_keys):  # warm start from the previous fit's mode
                pos = np.minimum(np.searchsorted(self._mode_keys, keys), len(self._mode_keys) - 1)
                hit = self._mode_keys[pos] == keys
                f[hit] = self._mode_f[pos[hit]]
                warm = int(hit.sum())
            # warm-started, one Newton step per observed step tracks the mode (measured: same accuracy as
            # iterating to convergence); a mostly cold fit (first fit, replayed history) iterates to convergence
            iters = int(self.p["newton_iters"]) if 2 * warm >= len(rows) else _COLD_NEWTON_ITERS
        c = None
        for it in range(iters):
            if self.p["likelihood"] == "laplace":
                # binomial likelihood linearised at f (one Newton step of the Laplace approximation = GP
                # regression on pseudo-observations y = f + grad / W with noise 1 / W, W = n sigma (1 - sigma))
                sig = expit(f)
                w = np.maximum(n * sig * (1.0 - sig), 1e-9)
                v_lik = 1.0 / w
                y = f + (s - n * sig) / w
            else:
                y, v_lik = _targets(rows[:, 2], rows[:, 3], 0.0)
            k[np.diag_indices_from(k)] = diag + v_lik + floor
            c = _chol(k, "vipalloc GP")
            if c is None:
                break
            m = self._mean(c, y)
            alpha = linalg.cho_solve((c, True), y - m, check_finite=False)
            f_new = np.clip(y - v_lik * alpha, -20.0, 20.0)  # posterior mode of each row's latent logit
            done = float(np.max(np.abs(f_new - f))) < 1e-3
            f = f_new
            if done or it == iters - 1:
                break
        if c is None:
            warnings.warn(
                "vipalloc GP: kernel not factorisable even with jitter; predicting per-prompt smoothed rates",
                GPNumericsWarning,
                stacklevel=3,
            )
            log.warning("vipalloc GP fell back to per-prompt smoothed rates (%d window rows)", len(rows))
            self._cache = {"fallback": True, "win": win}
            return self._cache
        if self.p["likelihood"] == "laplace":
            order = np.argsort(keys)
            self._mode_keys, self._mode_f = keys[order], f[order]
        uniq, inv = np.unique(rows[:, 0], return_inverse=True)
        self._cache = {
            "fallback": False,
            "win": win,
            "rows": rows,
            "uniq": uniq,
            "inv": inv,
            "steps": rows[:, 1].astype(np.float64),
            "L": c,
            "alpha": alpha,
            "m": m,
            "y": y,
            "v": v_lik + floor,
        }
        return self._cache

    def _mean(self, c: np.ndarray, y: np.ndarray) -> float:
        """Constant prior mean: fixed, or the generalised-least-squares estimate ``1'K^-1 y / 1'K^-1 1``."""
        if self.p["prior_mean"] is not None:
            return float(self.p["prior_mean"])
        ones = np.ones(len(y))
        kin1 = linalg.cho_solve((c, True), ones, check_finite=False)
        den = float(ones @ kin1)
        if not (np.isfinite(den) and den > 1e-12):
            return float(np.mean(y))
        m = float(y @ kin1) / den
        return m if np.isfinite(m) else float(np.mean(y))

    def predict(self, q: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        uq, back = np.unique(q, return_inverse=True)
        fit = self._fit()
        if fit is None:  # nothing observed: the prior, identical for every prompt
            m = 0.0 if self.p["prior_mean"] is None else float(self.p["prior_mean"])
            mu, var = np.full(len(uq), m), np.full(len(uq), self._prior_var())
        elif fit["fallback"]:
            p_fb, s_fb = self._fallback(uq, fit["win"])
            return p_fb[back], s_fb[back]
        else:
            mu, var = self._posterior(uq, float(step), fit)
        var = np.clip(np.nan_to_num(var, nan=self._prior_var()), 1e-12, self._prior_var())
        mu = np.nan_to_num(mu, nan=0.0, posinf=30.0, neginf=-30.0)
        scaled = mu / np.sqrt(1.0 + math.pi * var / 8.0) if self.p["calibrate"] else mu
        p = expit(scaled)
        return clean_prob(p)[back], clean_std(p * (1.0 - p) * np.sqrt(var))[back]

    def _posterior(self, uq: np.ndarray, t: float, fit: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Latent posterior mean and variance at ``(x_q, t)`` for unique prompt rows ``uq``."""
        p = self.p
        s_p, s_id, s_g = float(p["signal_var"]), float(p["prompt_var"]), float(p["global_var"])
        ep_w, eg_w = self._time(t - fit["steps"])
        uniq, inv = fit["uniq"], fit["inv"]
        arch = self._archive(uq, fit["win"]) if p["own_history"] else None
        mu = np.empty(len(uq))
        var = np.empty(len(uq))
        chunk = 1024  # bounds memory at ~3 x chunk x max_points floats
        for lo in range(0, len(uq), chunk):
            qs = uq[lo : lo + chunk]
            r_qu = self._rbf(self.feats.x[qs], self.feats.x[uniq])
            same_qu = (qs[:, None] == uniq[None, :]).astype(np.float64)
            base = s_p * r_qu + s_id * same_qu  # (chunk, U): prompt-dependent part of the kernel
            b_qw = base[:, inv]  # (chunk, W)
            k_qw = b_qw * ep_w[None, :] + s_g * eg_w[None, :]
            mu_c = fit["m"] + k_qw @ fit["alpha"]
            va = linalg.solve_triangular(fit["L"], k_qw.T, lower=True, check_finite=False)
            var_c = self._prior_var() - (va * va).sum(0)
            sel = np.flatnonzero(arch["has"][lo : lo + chunk]) if arch is not None else np.zeros(0, np.int64)
            if arch is not None and sel.size:
                # the prompt's own rows older than the window, as one observation at their latest step t_b,
                # conditioned on exactly (jointly with the window) for this prompt's prediction
                tb = arch["t"][lo + sel]
                ep_b, eg_b = self._time(tb[:, None] - fit["steps"][None, :])
                k_bw = b_qw[sel] * ep_b + s_g * eg_b
                vb_sol = linalg.solve_triangular(fit["L"], k_bw.T, lower=True, check_finite=False)
                mu_b = fit["m"] + k_bw @ fit["alpha"]
                var_b = np.maximum(self._prior_var() - (vb_sol * vb_sol).sum(0), 1e-9)
                yb, vb = self._archive_observation(arch, lo + sel, mu_b, var_b)
                ep_ab, eg_ab = self._time(t - tb)
                cov_ab = (s_p + s_id) * ep_ab + s_g * eg_ab - (va[:, sel] * vb_sol).sum(0)
                gain = cov_ab / (var_b + vb)
                mu_c[sel] += gain * (yb - mu_b)
                var_c[sel] -= gain * cov_ab
            mu[lo : lo + chunk] = mu_c
            var[lo : lo + chunk] = var_c
        return mu, var

    def _archive(self, uq: np.ndarray, win: np.ndarray) -> dict[str, np.ndarray] | None:
        """Rows outside the window that belong to predicted prompts: their position in ``uq``, and per prompt
        ``has`` (any such row) and ``t`` (the latest such step, where the pooled observation is placed)."""
        old = self.rows[~win]
        if not len(old):
            return None
        pos = np.minimum(np.searchsorted(uq, old[:, 0]), len(uq) - 1)
        hit = uq[pos] == old[:, 0]
        if not hit.any():
            return None
        old, pos = old[hit], pos[hit]
        tb = np.full(len(uq), -1.0)
        np.maximum.at(tb, pos, old[:, 1].astype(np.float64))
        return {"has": tb >= 0, "t": np.maximum(tb, 0.0), "pos": pos, "rows": old}

    def _archive_observation(
        self, arch: dict[str, np.ndarray], sel: np.ndarray, mu_b: np.ndarray, var_b: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pool the archived rows of prompts ``sel`` (positions in ``uq``) into one pseudo-observation ``(y, v)``
        of the latent logit at ``t_b``, given the window posterior ``N(mu_b, var_b)`` there.

        An old row says less about ``f(t_b)`` by the kernel's drift since, ``d = Var[f(t_b) - f(t_k)]``. Gaussian
        likelihood: its noise is inflated by ``d`` and rows are precision-weighted. Laplace: its counts are
        discounted by ``1 / (1 + n sigma(1-sigma) d)`` (the same precision loss), pooled, and the pooled binomial
        is linearised at the mode of ``N(mu_b, var_b) x Binomial`` (vectorised scalar Newton).
        """
        p = self.p
        rank = np.full(int(sel.max()) + 1, -1, np.int64)
        rank[sel] = np.arange(len(sel))
        in_sel = arch["pos"] <= sel.max()
        r_pos = np.where(in_sel, rank[np.minimum(arch["pos"], sel.max())], -1)
        keep = r_pos >= 0
        r_pos, rows = r_pos[keep], arch["rows"][keep]
        gap = arch["t"][sel][r_pos] - rows[:, 1]
        ep, eg = self._time(gap)
        drift = 2.0 * ((float(p["signal_var"]) + float(p["prompt_var"])) * (1 - ep) + float(p["global_var"]) * (1 - eg))
        floor = float(p["noise_floor"])
        m = len(sel)
        if p["likelihood"] == "gaussian":
            y, v = _targets(rows[:, 2], rows[:, 3], 0.0)
            w = 1.0 / (v + drift)
            wsum = np.bincount(r_pos, weights=w, minlength=m)
            return np.bincount(r_pos, weights=w * y, minlength=m) / wsum, 1.0 / wsum + floor
        sig_b = expit(mu_b)[r_pos]
        disc = 1.0 / (1.0 + rows[:, 3] * sig_b * (1.0 - sig_b) * drift)
        ssum = np.bincount(r_pos, weights=disc * rows[:, 2], minlength=m)
        nsum = np.bincount(r_pos, weights=disc * rows[:, 3], minlength=m)
        f = mu_b.copy()
        for _ in range(8):  # maximise -(f - mu_b)^2 / (2 var_b) + S log sigma(f) + (N - S) log(1 - sigma(f))
            sig = expit(f)
            grad = -(f - mu_b) / var_b + ssum - nsum * sig
            f = np.clip(f + grad / (1.0 / var_b + nsum * sig * (1.0 - sig)), -20.0, 20.0)
        sig = expit(f)
        w = np.maximum(nsum * sig * (1.0 - sig), 1e-9)
        return f + (ssum - nsum * sig) / w, 1.0 / w + floor

    def _fallback(self, uq: np.ndarray, win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows
        n = self.feats.n
        s = np.bincount(rows[:, 0], weights=rows[:, 2], minlength=n)[uq]
        t = np.bincount(rows[:, 0], weights=rows[:, 3], minlength=n)[uq]
        pooled = (rows[win, 2].sum() + 0.5) / (rows[win, 3].sum() + 1.0)
        p = np.where(t > 0, (s + 0.5) / (t + 1.0), pooled)
        return clean_prob(p), clean_std(np.sqrt(p * (1 - p) / (t + 2.0)))

    # -------------------------------------------------------------- hyper-parameters
    def fit_hyperparameters(self, max_points: int, maxiter: int = 50) -> dict[str, float]:
        """Maximise the log marginal likelihood on the most recent ``max_points`` window rows (see GPPredictor)."""
        names = [k for k in _FLOAT_KEYS if not (k in ("signal_var", "prompt_var", "global_var") and self.p[k] == 0)]
        if self.p["signal_var"] == 0:
            names.remove("length_scale")
        if self.p["global_var"] == 0:
            names.remove("global_time_scale")
        if self.p["signal_var"] == 0 and self.p["prompt_var"] == 0:
            names.remove("time_scale")
        current = {k: float(self.p[k]) for k in _FLOAT_KEYS}
        fit = self._fit()
        if fit is None or fit["fallback"] or not names:
            return current
        # the most recent rows of the window, with their pseudo-observations at the current fit (for the Laplace
        # likelihood: linearised at the posterior mode, i.e. type-II ML of the linearised model)
        pick = np.argsort(fit["rows"][:, 1], kind="stable")[-max_points:]
        if len(pick) < 8:
            return current
        rows, y, v = fit["rows"][pick], fit["y"][pick], fit["v"][pick]
        parts = self._kernel_parts(rows)
        fixed_mean = self.p["prior_mean"]

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
        bounds = [(np.log(_HYPER_BOUNDS[k][0]), np.log(_HYPER_BOUNDS[k][1])) for k in names]
        x0 = np.clip(x0, [b[0] for b in bounds], [b[1] for b in bounds])
        f0 = nll(x0)[0]
        try:
            res = optimize.minimize(
                nll, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": int(maxiter)}
            )
            ok = bool(np.all(np.isfinite(res.x))) and float(res.fun) < f0 - 1e-9
        except (ValueError, FloatingPointError, linalg.LinAlgError) as exc:  # never let a fit break training
            log.warning("GP hyper-parameter fit failed (%s); keeping the previous values", exc)
            ok = False
        if ok:
            for k, val in zip(names, res.x):
                self.p[k] = float(np.exp(val))
            log.info("GP hyper-parameters refitted on %d rows: nll %.3f -> %.3f", len(rows), f0, float(res.fun))
        self._cache = None
        self.steps_since_fit = 0
        return {k: float(self.p[k]) for k in _FLOAT_KEYS}

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows.copy(),
            "last_step": self.last_step,
            "steps_since_fit": self.steps_since_fit,
            "mode_keys": self._mode_keys.copy(),
            "mode_f": self._mode_f.copy(),
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        rows = np.asarray(st["rows"], np.int64).reshape(-1, 4)
        if len(rows) and (
            rows[:, 0].min() < 0
            or rows[:, 0].max() >= self.feats.n
            or rows[:, 1].min() < 0
            or np.any(rows[:, 3] < 1)
            or np.any((rows[:, 2] < 0) | (rows[:, 2] > rows[:, 3]))
        ):
            raise ValueError("vipalloc GP state: observation rows are invalid or refer to unknown prompts")
        self._set_rows(rows)
        self.last_step = int(st["last_step"])
        self.steps_since_fit = int(st["steps_since_fit"])
        keys = np.asarray(st["mode_keys"], np.int64).reshape(-1)
        mode = np.asarray(st["mode_f"], np.float64).reshape(-1)
        if keys.shape != mode.shape or not np.all(np.isfinite(mode)) or np.any(np.diff(keys) < 0):
            raise ValueError("vipalloc GP state: the stored Laplace mode is malformed")
        self._mode_keys, self._mode_f = keys.copy(), mode.copy()
        self._cache = None


# --------------------------------------------------------------------------------------------------------- facade
def _check_params(preset: str, params: dict[str, Any]) -> None:
    for key, val in params.items():
        if key in ("max_points", "fit_every", "fit_points", "max_history", "window_steps"):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {val!r}")
            if key in ("max_points", "max_history", "fit_points") and val < 1:
                raise ValueError(f"{key} must be >= 1, got {val!r}")
        elif key == "likelihood":
            if val not in ("laplace", "gaussian"):
                raise ValueError(f"likelihood must be 'laplace' or 'gaussian', got {val!r}")
        elif key == "newton_iters":
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"newton_iters must be an integer >= 1, got {val!r}")
        elif key in ("own_history", "calibrate"):
            if not isinstance(val, bool):
                raise ValueError(f"{key} must be True or False, got {val!r}")
        elif key == "prior_mean":
            if val is None and preset == "vipalloc":
                continue
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not np.isfinite(val):
                raise ValueError(f"prior_mean must be a finite number (logit){' or None' * (preset == 'vipalloc')}")
        elif key in ("signal_var", "prompt_var", "global_var", "noise_floor"):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not (np.isfinite(val) and val >= 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {val!r}")
        elif isinstance(val, bool) or not isinstance(val, (int, float)) or not (np.isfinite(val) and val > 0):
            raise ValueError(f"{key} must be a finite number > 0, got {val!r}")
    if preset == "vipalloc":
        if params["signal_var"] + params["prompt_var"] + params["global_var"] <= 0:
            raise ValueError("at least one of signal_var, prompt_var, global_var must be > 0")
        if params["max_history"] < params["max_points"]:
            raise ValueError("max_history must be >= max_points (the window is drawn from the kept history)")


class GPPredictor:
    """Gaussian-process success predictor over prompt embeddings (see the module docstring for both presets).

    Parameters
    ----------
    preset:
        ``"paper"`` (the authors' code, exactly) or ``"vipalloc"`` (ours, the default).
    **overrides:
        Any key of ``PRESETS[preset]`` (e.g. ``GPPredictor("vipalloc", max_points=1024, fit_every=10)``).

    Features (``set_features``) must be registered for every prompt before it is observed or predicted; with the
    :class:`~vipalloc.allocator.Allocator` this happens automatically from the prompt texts.
    """

    name = "gp"
    needs_features = True

    def __init__(self, preset: str = DEFAULT_PRESET, **overrides: Any) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown GP preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        params = dict(PRESETS[preset])
        unknown = sorted(set(overrides) - set(params))
        if unknown:
            raise ValueError(f"unknown options for GP preset {preset!r}: {unknown}; valid: {sorted(params)}")
        params.update(overrides)
        _check_params(preset, params)
        self.preset = preset
        self.params = params
        self._feats = FeatureStore()
        self._engine: _PaperGP | _WindowGP = (
            _PaperGP(params, self._feats) if preset == "paper" else _WindowGP(params, self._feats)
        )

    def set_features(self, prompt_ids: Sequence[str], features: np.ndarray) -> None:
        """Register prompt embeddings ``(N, d)`` (unit-norm rows expected: the length-scales assume it).

        Known prompts must come with the same features (checked to 1e-6); new ones are appended.
        """
        ids, x = check_features(prompt_ids, features)
        new_ids, new_x = self._feats.new_rows(ids, x)
        if not new_ids:
            return
        rows = self._feats.add(new_ids, new_x)
        if isinstance(self._engine, _PaperGP):
            self._engine.register(rows)
        # (the window GP's cached factorisation depends only on observed prompts: new features leave it valid)

    def observe(self, prompt_ids: Sequence[str], successes: np.ndarray, trials: np.ndarray, step: int) -> None:
        """Record one step's per-prompt outcomes (duplicate ids aggregated; several calls for one step merged).

        ``paper``: consecutive calls for the same step are refitted together (the authors fit once per step);
        a call for another step is a new update; prompts already observed at a newer step are skipped.
        ``vipalloc``: one row per (prompt, step), counts added across calls; order does not matter.
        """
        ids, s, t, step = check_observation(prompt_ids, successes, trials, step)
        idx = self._feats.lookup(ids, "gp")
        if not len(idx):
            return
        self._engine.observe(idx, s, t, step)
        eng = self._engine
        if isinstance(eng, _WindowGP) and self.params["fit_every"] and eng.steps_since_fit >= self.params["fit_every"]:
            eng.fit_hyperparameters(int(self.params["fit_points"]))

    def predict(self, prompt_ids: Sequence[str], step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(p_mean, p_std)`` float64 ``(M,)`` for the prompts at training ``step`` (the step being planned)."""
        ids = check_ids(prompt_ids)
        step = check_step(step)
        idx = self._feats.lookup(ids, "gp")
        if not len(idx):
            return np.zeros(0), np.zeros(0)
        if isinstance(self._engine, _PaperGP):
            return self._engine.predict(idx)
        return self._engine.predict(idx, step)

    def fit_hyperparameters(self, max_points: int | None = None, maxiter: int = 50) -> dict[str, float]:
        """Refit ``length_scale, signal_var, prompt_var, time_scale, global_var, global_time_scale`` (components
        set to 0 stay off) by maximising the log marginal likelihood of the most recent ``max_points`` window rows
        (default ``fit_points``); the constant mean is profiled out (GLS). Bounded in log space, warm-started at the
        current values, and kept only if the likelihood improves. Returns the (possibly unchanged) values.
        """
        if not isinstance(self._engine, _WindowGP):
            raise ValueError("hyper-parameter fitting applies to preset='vipalloc' only (the paper fixes them)")
        n = int(self.params["fit_points"] if max_points is None else max_points)
        if n < 8:
            raise ValueError(f"max_points must be >= 8 for a hyper-parameter fit, got {n}")
        return self._engine.fit_hyperparameters(n, maxiter)

    def state_dict(self) -> dict[str, Any]:
        """Preset, parameters (fitted values included), features and observations: enough to predict identically."""
        return {
            "preset": self.preset,
            "params": dict(self.params),
            "features": self._feats.state_dict(),
            "engine": self._engine.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the preset must match; fitted hyper-parameters are restored too)."""
        if state.get("preset") != self.preset:
            raise ValueError(
                f"GP state has preset {state.get('preset')!r}, this predictor {self.preset!r}; "
                f"construct GPPredictor(preset={state.get('preset')!r})"
            )
        params = dict(state["params"])
        if set(params) != set(PRESETS[self.preset]):
            raise ValueError(f"GP state parameters {sorted(params)} do not match preset {self.preset!r}")
        _check_params(self.preset, params)
        feats = FeatureStore()
        feats.load_state_dict(state["features"])
        engine: _PaperGP | _WindowGP = _PaperGP(params, feats) if self.preset == "paper" else _WindowGP(params, feats)
        engine.load_state_dict(state["engine"])
        self.params, self._feats, self._engine = params, feats, engine
