"""The oracle predictor: returns the true success probability (for benchmarks and ablations)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from vipalloc.predictors.base import BasePredictor, check_ids, check_observation, check_step

__all__ = ["OraclePredictor", "TrueP"]

TrueP = Callable[[list[str], int], Any]
"""``true_p(prompt_ids, step) -> p``: float array ``(M,)`` in ``[0, 1]``."""


def _check_p(p: Any, m: int, what: str) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.shape != (m,) or not np.all(np.isfinite(arr)) or np.any((arr < 0) | (arr > 1)):
        raise ValueError(f"{what} must be {m} finite probabilities in [0, 1] (shape ({m},)), got shape {arr.shape}")
    return arr


class OraclePredictor(BasePredictor):
    """Predicts the true ``p`` you provide, with ``p_std = 0``; observations are validated and ignored.

    Give the truth either as a table (``set_true_p(ids, p)``, or a ``{id: p}`` mapping to the constructor) or as a
    callable ``true_p(prompt_ids, step) -> p`` (e.g. a simulator whose ``p`` moves as the policy learns). Predicting
    a prompt the table does not know raises ``ValueError``. ``state_dict`` holds the table only: a callable cannot
    be saved, so pass it again to the constructor before ``load_state_dict``.
    """

    name = "oracle"

    def __init__(self, true_p: TrueP | Mapping[str, float] | None = None) -> None:
        self._fn: TrueP | None = None
        self._table: dict[str, float] = {}
        if isinstance(true_p, Mapping):
            self.set_true_p(list(true_p), list(true_p.values()))
        elif callable(true_p):
            self._fn = true_p
        elif true_p is not None:
            raise ValueError("true_p must be None, a {prompt_id: p} mapping or a callable (prompt_ids, step) -> p")

    def set_true_p(self, prompt_ids: Sequence[str], p: Any) -> None:
        """Record (or overwrite) the true success probabilities of ``prompt_ids``."""
        ids = check_ids(prompt_ids)
        arr = _check_p(p, len(ids), "true p")
        self._table.update(zip(ids, arr.tolist()))

    def observe(self, prompt_ids: Sequence[str], successes: np.ndarray, trials: np.ndarray, step: int) -> None:
        """Validated like every predictor's input, then ignored (the oracle already knows ``p``)."""
        check_observation(prompt_ids, successes, trials, step)

    def predict(self, prompt_ids: Sequence[str], step: int) -> tuple[np.ndarray, np.ndarray]:
        """The true ``p`` (from the callable if one was given, else the table) and zeros."""
        ids = check_ids(prompt_ids)
        step = check_step(step)
        if self._fn is not None:
            p = _check_p(self._fn(ids, step), len(ids), "the oracle callable's output")
        else:
            missing = [pid for pid in ids if pid not in self._table]
            if missing:
                raise ValueError(
                    f"oracle has no true p for {len(missing)} prompt(s) (e.g. {missing[:3]}); "
                    "call predictor.set_true_p(ids, p) first"
                )
            p = np.array([self._table[pid] for pid in ids], dtype=np.float64)
        return p, np.zeros(len(ids))

    def state_dict(self) -> dict[str, Any]:
        return {"ids": list(self._table), "p": np.array(list(self._table.values()), np.float64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ids = [str(i) for i in state["ids"]]
        p = _check_p(state["p"], len(ids), "oracle state p")
        self._table = dict(zip(ids, p.tolist()))
