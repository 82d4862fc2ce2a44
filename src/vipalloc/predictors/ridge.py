"""Ridge-regression success predictor (the VIP authors' predictor ablation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vipalloc.predictors.base import check_features, check_ids, check_observation

__all__ = ["RidgePredictor"]


class RidgePredictor:
    """Ridge regression of the last step's per-prompt success rate on standardised embeddings.

    As in the authors' ``ridge_allocation_ray_trainer.py``: alpha = 1.0, features standardised, fitted on the
    previous step's ``(prompt, rate)`` pairs, predictions clipped to ``[0, 1]``. Closed form (dual when the batch is
    smaller than the feature dimension). ``p_std`` is the residual std of the fit (same for every prompt).
    Before any observation it predicts 0.5.
    """

    name = "ridge"
    needs_features = True

    def __init__(self, alpha: float = 1.0) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self._index: dict[str, int] = {}
        self._x = np.zeros((0, 0))
        self._coef = np.zeros(0)
        self._mu = np.zeros(0)
        self._sd = np.zeros(0)
        self._intercept = 0.5
        self._resid = 0.5
        self._fitted = False

    def set_features(self, prompt_ids: Sequence[str], features: np.ndarray) -> None:
        ids, x = check_features(prompt_ids, features)
        if self._x.size and x.shape[1] != self._x.shape[1]:
            raise ValueError(f"feature dimension {x.shape[1]} differs from the registered {self._x.shape[1]}")
        new = [(p, r) for p, r in zip(ids, x) if p not in self._index]
        seen: set[str] = set()
        rows = []
        for p, r in new:
            if p not in seen:
                seen.add(p)
                self._index[p] = len(self._index)
                rows.append(r)
        if rows:
            xn = np.asarray(rows)
            self._x = xn if not self._x.size else np.vstack([self._x, xn])

    def _rows(self, ids: list[str]) -> np.ndarray:
        missing = [p for p in ids if p not in self._index]
        if missing:
            raise ValueError(f"ridge predictor has no features for {missing[:3]}; call set_features first")
        return self._x[[self._index[p] for p in ids]]

    def observe(self, prompt_ids: Sequence[str], successes: np.ndarray, trials: np.ndarray, step: int) -> None:
        ids, s, t, _ = check_observation(prompt_ids, successes, trials, step)
        x = self._rows(ids)
        y = s / t
        mu = x.mean(0)
        sd = x.std(0)
        sd[sd < 1e-12] = 1.0  # constant features carry no information; avoid 0/0
        z = (x - mu) / sd
        yc = y - y.mean()
        n, d = z.shape
        if n < d:  # dual form: w = Z^T (Z Z^T + a I)^-1 y
            coef = z.T @ np.linalg.solve(z @ z.T + self.alpha * np.eye(n), yc)
        else:
            coef = np.linalg.solve(z.T @ z + self.alpha * np.eye(d), z.T @ yc)
        self._coef, self._mu, self._sd, self._intercept = coef, mu, sd, float(y.mean())
        self._resid = float(np.sqrt(np.mean((z @ coef + self._intercept - y) ** 2)))
        self._fitted = True

    def predict(self, prompt_ids: Sequence[str], step: int) -> tuple[np.ndarray, np.ndarray]:
        ids = check_ids(prompt_ids)
        x = self._rows(ids)
        if not self._fitted:
            return np.full(len(ids), 0.5), np.full(len(ids), 0.5)
        p = np.clip(((x - self._mu) / self._sd) @ self._coef + self._intercept, 0.0, 1.0)
        return np.nan_to_num(p, nan=0.5), np.full(len(ids), min(self._resid, 0.5))

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "ids": list(self._index),
            "x": self._x.copy(),
            "coef": self._coef.copy(),
            "mu": self._mu.copy(),
            "sd": self._sd.copy(),
            "intercept": self._intercept,
            "resid": self._resid,
            "fitted": self._fitted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = float(state["alpha"])
        self._index = {str(p): i for i, p in enumerate(state["ids"])}
        self._x = np.asarray(state["x"], np.float64).copy()
        self._coef = np.asarray(state["coef"], np.float64).copy()
        self._mu = np.asarray(state["mu"], np.float64).copy()
        self._sd = np.asarray(state["sd"], np.float64).copy()
        self._intercept = float(state["intercept"])
        self._resid = float(state["resid"])
        self._fitted = bool(state["fitted"])
