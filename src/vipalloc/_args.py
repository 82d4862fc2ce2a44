"""Argument checks at the :class:`~vipalloc.allocator.Allocator` boundary: ids, integers, lengths (budgets:
:mod:`vipalloc.budget`). Each raises ``ValueError`` naming the problem and the fix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["as_ids", "check_int", "check_lengths_arg"]


def as_ids(prompt_ids: Sequence[Any], what: str = "prompt_ids") -> list[str]:
    if isinstance(prompt_ids, (str, bytes)):
        raise ValueError(f"{what} must be a sequence of ids, not a single string")
    ids = [str(p) for p in prompt_ids]
    if not ids:
        raise ValueError(f"empty batch: {what} has no prompts; pass at least one prompt")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dups = sorted({p for p in ids if p in seen or seen.add(p)})  # type: ignore[func-returns-value]
        raise ValueError(
            f"duplicate prompt ids in one batch: {dups[:5]}; give each prompt one entry and let the plan's "
            "count decide how many rollouts it gets"
        )
    return ids


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_lengths_arg(value: Any, m: int) -> np.ndarray:
    """Caller-given expected tokens per rollout: float64 ``(M,)``, finite, > 0."""
    try:
        arr = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"expected_lengths must be numbers (tokens per rollout), got {value!r}") from None
    if arr.shape != (m,) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"expected_lengths must hold {m} finite token counts > 0, one per prompt")
    return arr
