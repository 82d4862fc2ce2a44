"""The ``paper`` preset of :class:`~vipalloc.predictors.gp.GPPredictor`: the VIP authors' recursive GP, exactly
(``src/vip/success_rate_prediction/gaussian_process.py``, class ``GPR`` with ``reuse_mean=True``; the maths is in
the module docstring of :mod:`vipalloc.predictors.gp`). Means are logits; arrays are indexed by registered-prompt
row of the shared :class:`~vipalloc.predictors.base.FeatureStore`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy import linalg
from scipy.special import expit, logit

from vipalloc.predictors.base import FeatureStore, clean_prob, clean_std
from vipalloc.predictors.gp_kernel import GPNumericsWarning, chol, sqdist

__all__ = ["PaperGP"]

_CLIP = 1e-6  # the authors' clip before logit


class PaperGP:
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
        return np.exp(-0.5 * sqdist(a, b) / float(self.p["length_scale"]) ** 2)

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
        c = chol(self.kernel(xt, xt) + float(self.p["noise"]) * np.eye(len(idx)), "paper GP")
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
                self._chol_open = chol(self.kernel(xt, xt) + float(self.p["noise"]) * np.eye(len(xt)), "paper GP")
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
