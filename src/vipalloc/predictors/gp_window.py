"""The ``vipalloc`` preset of :class:`~vipalloc.predictors.gp.GPPredictor`: a windowed exact GP over (prompt,
step) rows with binomial observation noise (Laplace or Gaussian), time decay, a policy-wide trend, per-prompt
history older than the window pooled into one observation, and optional marginal-likelihood refits (the maths is
in the module docstring of :mod:`vipalloc.predictors.gp`). Latents are logits; steps are training steps; rows are
int64 ``(prompt row, step, successes, trials)``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import linalg
from scipy.special import expit

from vipalloc.predictors.base import FeatureStore, clean_prob, clean_std
from vipalloc.predictors.gp_kernel import (
    FLOAT_KEYS,
    GPNumericsWarning,
    binomial_targets,
    chol,
    fit_marginal_likelihood,
    log,
    sqdist,
)

__all__ = ["WindowGP"]

_KEY = np.int64(1) << 32  # (prompt row, step) -> one int64 key
_COLD_NEWTON_ITERS = 20  # cap for a Laplace fit that starts mostly cold (stops at |delta f| < 1e-3)


class WindowGP:
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
        return np.exp(-0.5 * sqdist(a, b) / float(p["length_scale"]) ** 2)

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
            "d2": sqdist(xu, xu)[np.ix_(inv, inv)],
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
        f = binomial_targets(rows[:, 2], rows[:, 3], 0.0)[
            0
        ]  # start: smoothed logits (the Gaussian pseudo-observations)
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
                y, v_lik = binomial_targets(rows[:, 2], rows[:, 3], 0.0)
            k[np.diag_indices_from(k)] = diag + v_lik + floor
            c = chol(k, "vipalloc GP")
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
            y, v = binomial_targets(rows[:, 2], rows[:, 3], 0.0)
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
    # -------------------------------------------------------------- hyper-parameters
    def fit_hyperparameters(self, max_points: int, maxiter: int = 50) -> dict[str, float]:
        """Maximise the log marginal likelihood on the most recent ``max_points`` window rows (see GPPredictor)."""
        names = [k for k in FLOAT_KEYS if not (k in ("signal_var", "prompt_var", "global_var") and self.p[k] == 0)]
        if self.p["signal_var"] == 0:
            names.remove("length_scale")
        if self.p["global_var"] == 0:
            names.remove("global_time_scale")
        if self.p["signal_var"] == 0 and self.p["prompt_var"] == 0:
            names.remove("time_scale")
        current = {k: float(self.p[k]) for k in FLOAT_KEYS}
        fit = self._fit()
        if fit is None or fit["fallback"] or not names:
            return current
        # the most recent rows of the window, with their pseudo-observations at the current fit (for the Laplace
        # likelihood: linearised at the posterior mode, i.e. type-II ML of the linearised model)
        pick = np.argsort(fit["rows"][:, 1], kind="stable")[-max_points:]
        if len(pick) < 8:
            return current
        rows, y, v = fit["rows"][pick], fit["y"][pick], fit["v"][pick]
        found = fit_marginal_likelihood(current, names, self._kernel_parts(rows), y, v, self.p["prior_mean"], maxiter)
        if found is not None:
            values, f0, f1 = found
            self.p.update(values)
            log.info("GP hyper-parameters refitted on %d rows: nll %.3f -> %.3f", len(rows), f0, f1)
        self._cache = None
        self.steps_since_fit = 0
        return {k: float(self.p[k]) for k in FLOAT_KEYS}

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
