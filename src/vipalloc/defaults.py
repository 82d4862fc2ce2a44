"""The defaults every surface shares (the :class:`~vipalloc.allocator.Allocator`, the CLI, the plug-ins, the CPU
trainer): change a default here and every surface follows (through :mod:`vipalloc.settings`, the one schema of the
shared settings). Imports nothing of the package."""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEFAULT_EMBEDDER",
    "DEFAULT_ESTIMATOR",
    "DEFAULT_N_MAX",
    "DEFAULT_N_MIN",
    "DEFAULT_PILOT_N",
    "DEFAULT_PREDICTOR",
    "DEFAULT_SEED",
    "DEFAULT_STRATEGY",
    "DEFAULT_SUCCESS_THRESHOLD",
]

#: the allocation strategy an :class:`~vipalloc.allocator.Allocator` uses unless told otherwise
DEFAULT_STRATEGY: Final = "vip_error"
#: the success-probability predictor (:mod:`vipalloc.predictors`)
DEFAULT_PREDICTOR = "gp"
#: the policy-gradient estimator whose variance is minimised
DEFAULT_ESTIMATOR = "drgrpo"
#: prompt features of the feature-based predictors (:mod:`vipalloc.embeddings`)
DEFAULT_EMBEDDER = "auto"
#: fewest rollouts of a kept prompt: the smallest group with a non-zero advantage; every budget of >= 2 rollouts a
#: prompt stays feasible
DEFAULT_N_MIN = 2
#: most rollouts of one prompt
DEFAULT_N_MAX = 32
#: seed of the allocator's tie-breaking
DEFAULT_SEED = 0
#: a rollout succeeds when its reward is >= this
DEFAULT_SUCCESS_THRESHOLD = 0.5
#: pilot rollouts per prompt of a two-phase step
DEFAULT_PILOT_N = 2
