"""Per-prompt predictors without features: Beta-Bernoulli (MoPPS-style), empirical, and the oracle."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vipalloc.predictors.base import BasePredictor, check_ids, check_observation

__all__ = ["BetaPredictor", "EmpiricalPredictor", "OraclePredictor"]


class _PerPrompt(BasePredictor):
    """Dict of per-prompt float state ``(a, b)`` with exact (array) serialisation."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._a = np.zeros(0)
        self._b = np.zeros(0)

    def _slots(self, ids: list[str], init_a: float, init_b: float) -> np.ndarray:
        new = [p for p in dict.fromkeys(ids) if p not in self._index]
        if new:
            start = len(self._index)
            for k, p in enumerate(new):
                self._index[p] = start + k
            self._a = np.concatenate([self._a, np.full(len(new), init_a)])
            self._b = np.concatenate([self._b, np.full(len(new), init_b)])
        return np.array([self._index[p] for p in ids], dtype=np.int64)

    def _lookup(self, ids: list[str], default_a: float, default_b: float) -> tuple[np.ndarray, np.ndarray]:
        a = np.full(len(ids), default_a)
        b = np.full(len(ids), default_b)
        for j, p in enumerate(ids):
            i = self._index.get(p)
            if i is not None:
                a[j], b[j] = self._a[i], self._b[i]
        return a, b

    def state_dict(self) -> dict[str, Any]:
        return {"ids": list(self._index), "a": self._a.copy(), "b": self._b.copy(), "params": self._params()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ids = [str(p) for p in state["ids"]]
        a = np.asarray(state["a"], np.float64)
        b = np.asarray(state["b"], np.float64)
        if a.shape != (len(ids),) or b.shape != (len(ids),):
            raise ValueError("predictor state arrays do not match its ids")
        if state.get("params") != self._params():
            raise ValueError(f"predictor state was saved with {state.get('params')}, this one has {self._params()}")
        self._index = {p: i for i, p in enumerate(ids)}
        self._a, self._b = a.copy(), b.copy()

    def _params(self) -> dict[str, float]:
        return {}


class BetaPredictor(_PerPrompt):
    """Per-prompt Beta-Bernoulli posterior with discount (MoPPS, arXiv 2507.04632).

    Update with ``s`` successes of ``n``: ``alpha <- lam*alpha + (1-lam)*alpha0 + s``,
    ``beta <- lam*beta + (1-lam)*beta0 + (n - s)``. ``lam = 1`` never forgets; smaller ``lam`` tracks a moving
    policy. Prediction: posterior mean and std. Unseen prompts get the prior ``Beta(alpha0, beta0)``.
    """

    name = "beta"

    def __init__(self, alpha0: float = 1.0, beta0: float = 1.0, discount: float = 1.0) -> None:
        super().__init__()
        if not (alpha0 > 0 and beta0 > 0):
            raise ValueError("alpha0 and beta0 must be > 0")
        if not (0.0 < discount <= 1.0):
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        self.alpha0, self.beta0, self.discount = float(alpha0), float(beta0), float(discount)

    def _params(self) -> dict[str, float]:
        return {"alpha0": self.alpha0, "beta0": self.beta0, "discount": self.discount}

    def observe(self, prompt_ids: Sequence[str], successes: np.ndarray, trials: np.ndarray, step: int) -> None:
        ids, s, t, _ = check_observation(prompt_ids, successes, trials, step)
        idx = self._slots(ids, self.alpha0, self.beta0)
        lam = self.discount
        self._a[idx] = lam * self._a[idx] + (1 - lam) * self.alpha0 + s
        self._b[idx] = lam * self._b[idx] + (1 - lam) * self.beta0 + (t - s)

    def predict(self, prompt_ids: Sequence[str], step: int) -> tuple[np.ndarray, np.ndarray]:
        ids = check_ids(prompt_ids)
        a, b = self._lookup(ids, self.alpha0, self.beta0)
        mean = a / (a + b)
        std = np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
        return mean, std


class EmpiricalPredictor(_PerPrompt):
    """Last observed success rate with pseudo-counts: ``(s + a0) / (n + a0 + b0)`` (unseen: ``a0/(a0+b0)``)."""

    name = "empirical"

    def __init__(self, a0: float = 0.5, b0: float = 0.5) -> None:
        super().__init__()
        if not (a0 > 0 and b0 > 0):
            raise ValueError("a0 and b0 must be > 0")
        self.a0, self.b0 = float(a0), float(b0)

    def _params(self) -> dict[str, float]:
        return {"a0": self.a0, "b0": self.b0}

    def observe(self, prompt_ids: Sequence[str], successes: np.ndarray, trials: np.ndarray, step: int) -> None:
        ids, s, t, _ = check_observation(prompt_ids, successes, trials, step)
        idx = self._slots(ids, 0.0, 0.0)
        self._a[idx] = s  # successes of the latest step
        self._b[idx] = t  # trials of the latest step

    def predict(self, prompt_ids: Sequence[str], step: int) -> tuple[np.ndarray, np.ndarray]:
        ids = check_ids(prompt_ids)
        s, t = self._lookup(ids, 0.0, 0.0)
        mean = (s + self.a0) / (t + self.a0 + self.b0)
        std = np.sqrt(mean * (1 - mean) / (t + self.a0 + self.b0 + 1))
        return mean, std


class OraclePredictor(BasePredictor):
    """Returns the true success probability (for benchmarks): set it with :meth:`set_true_p` or a callable
    ``true_p(prompt_ids, step) -> p``. Observations are ignored; ``p_std`` is 0."""

    name = "oracle"

    def __init__(self, true_p: Callable[[list[str], int], np.ndarray] | dict[str, float] | None = None) -> None:
        self._fn = true_p if callable(true_p) else None
        self._table: dict[str, float] = {}
        if isinstance(true_p, dict):
            self.set_true_p(list(true_p), np.array(list(true_p.values())))

    def set_true_p(self, prompt_ids: Sequence[str], p: Any) -> None:
        """Record the true success probabilities of ``prompt_ids`` (in [0, 1])."""
        ids = check_ids(prompt_ids)
        arr = np.asarray(p, dtype=np.float64)
        if arr.shape != (len(ids),) or not np.all(np.isfinite(arr)) or np.any((arr < 0) | (arr > 1)):
            raise ValueError(f"true p must be {len(ids)} finite values in [0, 1]")
        self._table.update(zip(ids, arr.tolist()))

    def observe(self, prompt_ids: Sequence[str], successes: np.ndarray, trials: np.ndarray, step: int) -> None:
        check_observation(prompt_ids, successes, trials, step)

    def predict(self, prompt_ids: Sequence[str], step: int) -> tuple[np.ndarray, np.ndarray]:
        ids = check_ids(prompt_ids)
        if self._fn is not None:
            p = np.asarray(self._fn(ids, step), dtype=np.float64)
        else:
            missing = [pid for pid in ids if pid not in self._table]
            if missing:
                raise ValueError(
                    f"oracle has no true p for {len(missing)} prompt(s) (e.g. {missing[:3]}); "
                    "call predictor.set_true_p(ids, p) first"
                )
            p = np.array([self._table[pid] for pid in ids])
        if p.shape != (len(ids),) or not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
            raise ValueError("oracle's true p must be finite values in [0, 1], one per prompt")
        return p, np.zeros(len(ids))

    def state_dict(self) -> dict[str, Any]:
        return {"ids": list(self._table), "p": np.array(list(self._table.values()), np.float64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._table = dict(zip([str(i) for i in state["ids"]], np.asarray(state["p"], np.float64).tolist()))
