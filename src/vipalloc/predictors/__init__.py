"""Success-probability predictors: ``gp`` (default), ``beta``, ``empirical``, ``ridge``, ``oracle``.

All follow :class:`~vipalloc.predictors.base.Predictor`: ``observe(prompt_ids, successes, trials, step)``,
``predict(prompt_ids, step) -> (p_mean, p_std)``, ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

from typing import Any

from vipalloc.predictors.base import Predictor
from vipalloc.predictors.gp import GPPredictor
from vipalloc.predictors.ridge import RidgePredictor
from vipalloc.predictors.simple import BetaPredictor, EmpiricalPredictor, OraclePredictor

__all__ = [
    "PREDICTOR_NAMES",
    "BetaPredictor",
    "EmpiricalPredictor",
    "GPPredictor",
    "OraclePredictor",
    "Predictor",
    "RidgePredictor",
    "make_predictor",
]

_CLASSES: dict[str, type] = {
    "gp": GPPredictor,
    "beta": BetaPredictor,
    "empirical": EmpiricalPredictor,
    "ridge": RidgePredictor,
    "oracle": OraclePredictor,
}
PREDICTOR_NAMES = tuple(_CLASSES)


def make_predictor(name: str, **kwargs: Any) -> Predictor:
    """Build a predictor by name; ``kwargs`` go to its constructor (e.g. ``preset="paper"`` for ``gp``)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown predictor {name!r}; choose one of: {', '.join(PREDICTOR_NAMES)}")
    try:
        return _CLASSES[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad options for predictor {name!r}: {exc}") from None
