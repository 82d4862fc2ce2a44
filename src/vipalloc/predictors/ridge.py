"""Ridge-regression success predictor (the VIP authors' predictor ablation), numpy closed form."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import linalg

from vipalloc.predictors.base import (
    FeatureStore,
    check_features,
    check_ids,
    check_observation,
    check_params,
    check_step,
    clean_prob,
    clean_std,
)

__all__ = ["RidgePredictor"]


class RidgePredictor:
    """Ridge regression of the latest step's per-prompt success rates on standardised embeddings.

    As in the authors' ``ridge_allocation_ray_trainer.py`` (sklearn ``StandardScaler`` + ``Ridge(alpha=1.0)``):
    features standardised with the training batch's mean and population std (constant features get scale 1),
    intercept = mean training rate, ``w = argmin |y - Z w|^2 + alpha |w|^2`` in closed form (dual form when the batch
    has fewer prompts than feature dimensions), predictions clipped to ``[0, 1]``.

    Training data = the prompts of the latest observed step (several calls for one step are merged, counts of a
    repeated prompt added; a call for an older step is ignored). ``p_std`` is the root-mean-square training
    residual, the same for every prompt. Before any observation it predicts ``0.5 +- 0.5``.
    """

    name = "ridge"
    needs_features = True

    def __init__(self, alpha: float = 1.0) -> None:
        if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha (ridge penalty) must be a finite number > 0, got {alpha!r}")
        self.alpha = float(alpha)
        self._feats = FeatureStore()
        self._step = -1
        self._data: dict[int, tuple[int, int]] = {}  # prompt row -> (successes, trials) of the latest step
        self._fit: dict[str, Any] | None = None

    def set_features(self, prompt_ids: Sequence[str], features: np.ndarray) -> None:
        """Register float ``(N, d)`` prompt embeddings (fixed once set)."""
        ids, x = check_features(prompt_ids, features)
        new_ids, new_x = self._feats.new_rows(ids, x)
        self._feats.add(new_ids, new_x)

    def observe(self, prompt_ids: Sequence[str], successes: np.ndarray, trials: np.ndarray, step: int) -> None:
        """Refit on the latest step's prompts (see the class docstring for merge rules)."""
        ids, s, t, step = check_observation(prompt_ids, successes, trials, step)
        idx = self._feats.lookup(ids, "ridge")
        if step < self._step or not len(ids):
            return
        if step > self._step:
            self._step, self._data = step, {}
        for i, si, ti in zip(idx.tolist(), s.tolist(), t.tolist()):
            s0, t0 = self._data.get(i, (0, 0))
            self._data[i] = (s0 + si, t0 + ti)
        self._fit = None

    def _fitted(self) -> dict[str, Any] | None:
        if self._fit is None and self._data:
            rows = np.fromiter(self._data, dtype=np.int64, count=len(self._data))
            st = np.array(list(self._data.values()), dtype=np.float64)
            y = st[:, 0] / st[:, 1]
            x = self._feats.x[rows]
            mu = x.mean(0)
            sd = x.std(0)
            sd[sd < 1e-12] = 1.0  # as StandardScaler: a constant feature is centred, not scaled
            z = (x - mu) / sd
            intercept = float(y.mean())
            yc = y - intercept
            n, d = z.shape
            if n < d:  # w = Z^T (Z Z^T + a I)^-1 y: an n x n system instead of d x d
                coef = z.T @ linalg.solve(z @ z.T + self.alpha * np.eye(n), yc, assume_a="pos")
            else:
                coef = linalg.solve(z.T @ z + self.alpha * np.eye(d), z.T @ yc, assume_a="pos")
            resid = float(np.sqrt(np.mean((z @ coef + intercept - y) ** 2)))
            self._fit = {"mu": mu, "sd": sd, "coef": coef, "intercept": intercept, "resid": resid}
        return self._fit

    def predict(self, prompt_ids: Sequence[str], step: int) -> tuple[np.ndarray, np.ndarray]:
        """Clipped ridge prediction per prompt and the training RMSE as ``p_std``; ``step`` is unused."""
        ids = check_ids(prompt_ids)
        check_step(step)
        idx = self._feats.lookup(ids, "ridge")
        fit = self._fitted()
        if fit is None:
            return np.full(len(ids), 0.5), np.full(len(ids), 0.5)
        z = (self._feats.x[idx] - fit["mu"]) / fit["sd"]
        p = clean_prob(z @ fit["coef"] + fit["intercept"])
        return p, clean_std(np.full(len(ids), fit["resid"]))

    def state_dict(self) -> dict[str, Any]:
        st = np.array(list(self._data.values()), dtype=np.int64).reshape(-1, 2)
        return {
            "params": {"alpha": self.alpha},
            "features": self._feats.state_dict(),
            "step": self._step,
            "rows": np.fromiter(self._data, dtype=np.int64, count=len(self._data)),
            "counts": st,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_params(state, {"alpha": self.alpha}, "ridge")
        feats = FeatureStore()
        feats.load_state_dict(state["features"])
        rows = np.asarray(state["rows"], np.int64).reshape(-1)
        counts = np.asarray(state["counts"], np.int64).reshape(-1, 2)
        if len(rows) != len(counts) or (len(rows) and (rows.min() < 0 or rows.max() >= feats.n)):
            raise ValueError("ridge state: training rows do not match the registered features")
        self._feats = feats
        self._step = int(state["step"])
        self._data = {int(r): (int(c[0]), int(c[1])) for r, c in zip(rows, counts)}
        self._fit = None
