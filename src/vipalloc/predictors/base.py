"""The predictor protocol and shared input validation.

A predictor estimates each prompt's success probability ``p`` (the chance one rollout is correct) from past
rollout outcomes. ``observe`` receives per-prompt counts of one training step; ``predict`` returns
``(p_mean, p_std)`` for any prompts, seen or not, always finite and in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["BasePredictor", "Predictor", "check_features", "check_ids", "check_observation"]


@runtime_checkable
class Predictor(Protocol):
    """What the :class:`~vipalloc.allocator.Allocator` needs from a success-probability predictor."""

    name: str
    needs_features: bool

    def set_features(self, prompt_ids: Sequence[str], features: np.ndarray) -> None: ...

    def observe(self, prompt_ids: Sequence[str], successes: np.ndarray, trials: np.ndarray, step: int) -> None: ...

    def predict(self, prompt_ids: Sequence[str], step: int) -> tuple[np.ndarray, np.ndarray]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_ids(prompt_ids: Sequence[Any]) -> list[str]:
    """Prompt ids as strings; a single string is rejected (it would be read as characters)."""
    if isinstance(prompt_ids, (str, bytes)):
        raise ValueError("prompt_ids must be a sequence of ids, not a single string")
    return [str(p) for p in prompt_ids]


def check_observation(
    prompt_ids: Sequence[Any], successes: Any, trials: Any, step: Any
) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """Validate one step's observations; duplicate ids within the call are merged (counts added)."""
    ids = check_ids(prompt_ids)
    s = np.asarray(successes)
    t = np.asarray(trials)
    if s.shape != (len(ids),) or t.shape != (len(ids),):
        raise ValueError(f"successes and trials must have shape ({len(ids)},), got {s.shape} and {t.shape}")
    for name, arr in (("successes", s), ("trials", t)):
        if arr.size and (not np.all(np.isfinite(arr.astype(np.float64))) or np.any(np.mod(arr, 1) != 0)):
            raise ValueError(f"{name} must be whole numbers (counts of rollouts)")
    s = s.astype(np.int64)
    t = t.astype(np.int64)
    if np.any(t < 1):
        raise ValueError("trials must be >= 1 for every observed prompt (omit prompts with no rollouts)")
    if np.any(s < 0) or np.any(s > t):
        raise ValueError("need 0 <= successes <= trials for every prompt")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if len(set(ids)) != len(ids):
        uniq = list(dict.fromkeys(ids))
        pos = np.array([uniq.index(p) for p in ids])
        s = np.bincount(pos, weights=s, minlength=len(uniq)).astype(np.int64)
        t = np.bincount(pos, weights=t, minlength=len(uniq)).astype(np.int64)
        ids = uniq
    return ids, s, t, int(step)


def check_features(prompt_ids: Sequence[Any], features: Any) -> tuple[list[str], np.ndarray]:
    """Validate a feature matrix aligned with ``prompt_ids``: float64 ``(N, d)``, finite."""
    ids = check_ids(prompt_ids)
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(ids):
        raise ValueError(f"features must have shape ({len(ids)}, d), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or inf")
    return ids, x


class BasePredictor:
    """Shared no-op feature handling for predictors that ignore prompt features."""

    name = "base"
    needs_features = False

    def set_features(self, prompt_ids: Sequence[str], features: np.ndarray) -> None:
        """Ignored: this predictor does not use prompt features."""
        check_features(prompt_ids, features)
