"""Last observed success rate with pseudo-counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vipalloc.predictors.base import (
    BasePredictor,
    PromptTable,
    check_ids,
    check_observation,
    check_params,
    check_step,
    clean_std,
)

__all__ = ["EmpiricalPredictor"]


class EmpiricalPredictor(BasePredictor):
    """``p = (s + a0) / (n + a0 + b0)`` from the prompt's most recent observed step (unseen: ``a0 / (a0 + b0)``).

    What Knapsack-RL and most "last epoch's accuracy" heuristics use. Only the latest step counts: an observation
    for a newer step replaces the prompt's counts, several calls for the same step are added together, and a call
    for an older step than the prompt's latest is ignored for that prompt. ``p_std`` is the std of the
    ``Beta(s + a0, n - s + b0)`` posterior of that step, ``sqrt(p (1 - p) / (n + a0 + b0 + 1))``.
    """

    name = "empirical"

    def __init__(self, a0: float = 0.5, b0: float = 0.5) -> None:
        for key, val in (("a0", a0), ("b0", b0)):
            if not (isinstance(val, (int, float)) and np.isfinite(val) and val > 0):
                raise ValueError(f"{key} must be a finite number > 0 (a pseudo-count), got {val!r}")
        self.a0, self.b0 = float(a0), float(b0)
        self._table = PromptTable(("s", "n"))

    def _params(self) -> dict[str, float]:
        return {"a0": self.a0, "b0": self.b0}

    def observe(self, prompt_ids: Sequence[str], successes: np.ndarray, trials: np.ndarray, step: int) -> None:
        """Replace (newer step) or add to (same step) each prompt's latest counts."""
        ids, s, t, step = check_observation(prompt_ids, successes, trials, step)
        tab = self._table
        idx = tab.slots(ids, {"s": 0.0, "n": 0.0})
        last = tab.last_step[idx]
        newer, same = last < step, last == step
        tab.data["s"][idx] = np.where(newer, s, np.where(same, tab.data["s"][idx] + s, tab.data["s"][idx]))
        tab.data["n"][idx] = np.where(newer, t, np.where(same, tab.data["n"][idx] + t, tab.data["n"][idx]))
        tab.last_step[idx] = np.maximum(last, step)

    def predict(self, prompt_ids: Sequence[str], step: int) -> tuple[np.ndarray, np.ndarray]:
        """Smoothed latest rate and its Beta-posterior std; ``step`` is unused."""
        ids = check_ids(prompt_ids)
        check_step(step)
        cols, _ = self._table.gather(ids, {"s": 0.0, "n": 0.0})
        tot = cols["n"] + self.a0 + self.b0
        mean = (cols["s"] + self.a0) / tot
        return np.clip(mean, 0.0, 1.0), clean_std(np.sqrt(mean * (1.0 - mean) / (tot + 1.0)))

    def state_dict(self) -> dict[str, Any]:
        return {"params": self._params(), **self._table.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_params(state, self._params(), "empirical")
        self._table.load_state_dict(state)
