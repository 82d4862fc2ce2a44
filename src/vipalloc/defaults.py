"""The defaults every surface shares (the :class:`~vipalloc.allocator.Allocator`, the CLI, the plug-ins, the CPU
trainer): change a default here and every surface follows. Imports nothing of the package."""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_ESTIMATOR", "DEFAULT_PREDICTOR", "DEFAULT_STRATEGY"]

#: the allocation strategy an :class:`~vipalloc.allocator.Allocator` uses unless told otherwise
DEFAULT_STRATEGY: Final = "vip"
#: the success-probability predictor (:mod:`vipalloc.predictors`)
DEFAULT_PREDICTOR = "gp"
#: the policy-gradient estimator whose variance is minimised
DEFAULT_ESTIMATOR = "drgrpo"
