"""Success-probability predictors: ``gp`` (default), ``beta``, ``empirical``, ``ridge``, ``oracle``.

All follow :class:`~vipalloc.predictors.base.Predictor`: ``set_features(ids, X)``,
``observe(prompt_ids, successes, trials, step)``, ``predict(prompt_ids, step) -> (p_mean, p_std)``,
``state_dict()`` / ``load_state_dict()``. See ``docs/predictors.md``.
"""

from __future__ import annotations

from typing import Any

from vipalloc.predictors.base import Predictor
from vipalloc.predictors.beta import BetaPredictor
from vipalloc.predictors.empirical import EmpiricalPredictor
from vipalloc.predictors.gp import GPPredictor
from vipalloc.predictors.oracle import OraclePredictor
from vipalloc.predictors.ridge import RidgePredictor

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
PREDICTOR_NAMES: tuple[str, ...] = ("gp", "beta", "empirical", "ridge", "oracle")


def make_predictor(name: str, **kwargs: Any) -> Predictor:
    """Build a predictor by name; ``kwargs`` go to its constructor (e.g. ``preset="paper"`` for ``gp``).

    Raises ``ValueError`` for an unknown name (listing the valid ones) or unknown/invalid options.
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown predictor {name!r}; choose one of: {', '.join(PREDICTOR_NAMES)}")
    try:
        return _CLASSES[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad options for predictor {name!r}: {exc}") from None
