"""The predictor protocol and the input validation every predictor shares.

A predictor estimates each prompt's success probability ``p`` (the chance that one rollout is correct) from past
rollout outcomes. ``observe`` receives per-prompt counts of one training step; ``predict`` returns
``(p_mean, p_std)`` for any prompts, always float64, finite and in ``[0, 1]``.

Validation rules (shared, so every predictor rejects the same inputs with the same messages):

* prompt ids: a sequence (a single ``str`` is rejected: it would be read as characters); ids are converted with
  ``str()``.
* counts: ``successes`` and ``trials`` are 1-D, one per id, whole numbers (integer dtype or integer-valued floats;
  booleans are rejected), ``trials >= 1``, ``0 <= successes <= trials``.
* duplicate ids inside one ``observe`` call are **aggregated**: their successes and trials are added, as if the
  rollouts had been reported together (order of first appearance is kept).
* ``step`` is an integer ``>= 0``.
* features: a finite float ``(N, d)`` matrix, ``d >= 1``, one row per id; an id repeated inside one call must carry
  identical rows.

Every check runs before any state changes, so a call that raises leaves the predictor exactly as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "BasePredictor",
    "FeatureStore",
    "Predictor",
    "PromptTable",
    "check_features",
    "check_ids",
    "check_observation",
    "check_params",
    "check_step",
    "clean_prob",
    "clean_std",
]


@runtime_checkable
class Predictor(Protocol):
    """What the :class:`~vipalloc.allocator.Allocator` needs from a success-probability predictor."""

    name: str
    needs_features: bool

    def set_features(self, prompt_ids: Sequence[str], features: np.ndarray) -> None:
        """Register float ``(N, d)`` prompt features (no-op for predictors that ignore features)."""
        ...

    def observe(self, prompt_ids: Sequence[str], successes: np.ndarray, trials: np.ndarray, step: int) -> None:
        """Record one step's per-prompt outcomes: ``successes[i]`` of ``trials[i]`` rollouts succeeded."""
        ...

    def predict(self, prompt_ids: Sequence[str], step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(p_mean, p_std)``, float64 ``(M,)``, finite, in ``[0, 1]``, for the prompts at training ``step``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to predict exactly as now (encodable by :func:`vipalloc._io.encode`)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; predictions afterwards are bit-identical."""
        ...


def check_ids(prompt_ids: Sequence[Any]) -> list[str]:
    """Prompt ids as a list of ``str``. Rejects a bare string/bytes and non-sequences."""
    if isinstance(prompt_ids, (str, bytes)):
        raise ValueError("prompt_ids must be a sequence of ids, not a single string; wrap it: [prompt_id]")
    try:
        return [str(p) for p in prompt_ids]
    except TypeError:
        raise ValueError(
            f"prompt_ids must be a sequence of ids, got {type(prompt_ids).__name__}; pass a list of str"
        ) from None


def check_step(step: Any) -> int:
    """A training step: an integer ``>= 0`` (numpy integers accepted, bools and floats rejected)."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return int(step)


def _counts(name: str, values: Any, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one count per prompt id), got {arr.shape}")
    if arr.dtype.kind == "b":
        raise ValueError(f"{name} must be integer counts, got booleans; convert with .astype(int)")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric integer counts, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contain NaN or inf; pass whole-number counts of rollouts")
        if np.any(arr != np.round(arr)) or np.any(np.abs(arr) > 2**53):
            raise ValueError(f"{name} must be whole numbers (counts of rollouts), got fractional values")
    return arr.astype(np.int64)


def check_observation(
    prompt_ids: Sequence[Any], successes: Any, trials: Any, step: Any
) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """Validate one step's observations and aggregate duplicate ids (counts added).

    Returns ``(ids, successes, trials, step)`` with unique ids and int64 ``(M,)`` counts.
    """
    ids = check_ids(prompt_ids)
    s = _counts("successes", successes, len(ids))
    t = _counts("trials", trials, len(ids))
    if np.any(t < 1):
        raise ValueError("trials must be >= 1 for every observed prompt (omit prompts that got no rollouts)")
    if np.any(s < 0) or np.any(s > t):
        bad = int(np.flatnonzero((s < 0) | (s > t))[0])
        raise ValueError(
            f"need 0 <= successes <= trials for every prompt; prompt {ids[bad]!r} has {s[bad]} of {t[bad]}"
        )
    step = check_step(step)
    if len(set(ids)) != len(ids):
        first: dict[str, int] = {}
        pos = np.array([first.setdefault(p, len(first)) for p in ids], dtype=np.int64)
        s = np.bincount(pos, weights=s, minlength=len(first)).astype(np.int64)
        t = np.bincount(pos, weights=t, minlength=len(first)).astype(np.int64)
        ids = list(first)
    return ids, s, t, step


def check_features(prompt_ids: Sequence[Any], features: Any) -> tuple[list[str], np.ndarray]:
    """Validate features aligned with ``prompt_ids``; returns unique ids and float64 ``(N, d)`` rows.

    An id repeated inside the call must come with identical rows (it is kept once).
    """
    ids = check_ids(prompt_ids)
    arr = np.asarray(features)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"features must be a numeric (N, d) array, got dtype {arr.dtype}")
    x = arr.astype(np.float64)
    if x.ndim != 2 or x.shape[0] != len(ids) or x.shape[1] < 1:
        raise ValueError(f"features must have shape ({len(ids)}, d) with d >= 1 (one row per id), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or inf; embed the prompts again or drop those rows")
    if len(set(ids)) != len(ids):
        first: dict[str, int] = {}
        for j, p in enumerate(ids):
            i = first.setdefault(p, j)
            if i != j and not np.array_equal(x[i], x[j]):
                raise ValueError(f"prompt {p!r} appears twice in one set_features call with different rows")
        keep = list(first.values())
        ids, x = list(first), x[keep]
    return ids, x


def clean_prob(p: Any) -> np.ndarray:
    """float64 copy with any non-finite value (never expected) replaced by 0.5, clipped to ``[0, 1]``."""
    return np.clip(np.nan_to_num(np.asarray(p, np.float64), nan=0.5, posinf=1.0, neginf=0.0), 0.0, 1.0)


def clean_std(s: Any) -> np.ndarray:
    """float64 std of a ``[0, 1]`` quantity: non-finite -> 0.5 (maximal), clipped to ``[0, 0.5]``."""
    return np.clip(np.nan_to_num(np.asarray(s, np.float64), nan=0.5, posinf=0.5, neginf=0.0), 0.0, 0.5)


class FeatureStore:
    """Registered prompt features: id -> row of a growing float64 ``(N, d)`` matrix (amortised appends).

    Re-registering a known id with the same row is a no-op; a different row is an error (model state refers to
    the old features). State is saved as float32 when that is lossless (embeddings usually are float32), else
    float64, so a round trip is bit-exact either way.
    """

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self._buf = np.zeros((0, 0))
        self.n = 0

    @property
    def dim(self) -> int:
        return self._buf.shape[1]

    @property
    def x(self) -> np.ndarray:
        """The ``(N, d)`` view of the registered features (do not modify)."""
        return self._buf[: self.n]

    def new_rows(self, ids: list[str], x: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Check ``(ids, x)`` against what is registered; return the not-yet-registered part (nothing stored)."""
        if self.n and x.shape[1] != self.dim:
            raise ValueError(
                f"feature dimension {x.shape[1]} differs from the registered {self.dim}; "
                "use the same embedder for every prompt"
            )
        known = np.array([p in self.index for p in ids], dtype=bool)
        if known.any():
            kidx = np.array([self.index[p] for p, k in zip(ids, known) if k], dtype=np.int64)
            old = self.x[kidx]
            diff = np.any(np.abs(old - x[known]) > 1e-6 * np.maximum(1.0, np.abs(old)), axis=1)
            if diff.any():
                bad = [p for p, k in zip(ids, known) if k][int(np.flatnonzero(diff)[0])]
                raise ValueError(
                    f"prompt {bad!r} was registered with different features; a prompt's features are fixed once "
                    "set (give a changed prompt a new id)"
                )
        new_ids = [p for p, k in zip(ids, known) if not k]
        return new_ids, x[~known]

    def add(self, ids: list[str], x: np.ndarray) -> np.ndarray:
        """Append new (unregistered, unique) ids; returns their row indices."""
        if not ids:
            return np.zeros(0, np.int64)
        if self.n == 0 and self._buf.shape[1] != x.shape[1]:
            self._buf = np.zeros((max(16, len(ids)), x.shape[1]))
        need = self.n + len(ids)
        if need > len(self._buf):
            grown = np.zeros((max(need, 2 * len(self._buf)), self.dim))
            grown[: self.n] = self.x
            self._buf = grown
        self._buf[self.n : need] = x
        start = self.n
        for k, p in enumerate(ids):
            self.index[p] = start + k
        self.n = need
        return np.arange(start, need, dtype=np.int64)

    def lookup(self, ids: list[str], who: str) -> np.ndarray:
        """Row indices of ``ids``; unknown ids raise a ``ValueError`` telling the caller to register them."""
        try:
            return np.array([self.index[p] for p in ids], dtype=np.int64)
        except KeyError:
            missing = [p for p in ids if p not in self.index]
            raise ValueError(
                f"the {who} predictor has no features for {len(missing)} prompt(s) (e.g. {missing[:3]}); "
                "call set_features(ids, embeddings) first (the Allocator does this when given prompts=)"
            ) from None

    def state_dict(self) -> dict[str, Any]:
        x = self.x
        x32 = x.astype(np.float32)
        lossless = bool(np.array_equal(x32.astype(np.float64), x))
        return {"ids": list(self.index), "x": x32 if lossless else x.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ids = [str(p) for p in state["ids"]]
        x = np.asarray(state["x"], dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != len(ids) or len(set(ids)) != len(ids):
            raise ValueError("predictor state: features do not match their (unique) ids")
        self.index = {p: i for i, p in enumerate(ids)}
        self._buf = x.copy()
        self.n = len(ids)


class BasePredictor:
    """Shared no-op feature handling for predictors that ignore prompt features."""

    name = "base"
    needs_features = False

    def set_features(self, prompt_ids: Sequence[str], features: np.ndarray) -> None:
        """Validated, then ignored: this predictor does not use prompt features."""
        check_features(prompt_ids, features)


class PromptTable:
    """Per-prompt float columns keyed by prompt id (for the feature-free predictors), exact to serialise.

    ``columns`` names the float64 state columns; ``last_step`` (int64, -1 = never) is always kept so that several
    ``observe`` calls for one step can be merged.
    """

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        self.index: dict[str, int] = {}
        self.data = {c: np.zeros(0) for c in self.columns}
        self.last_step = np.zeros(0, np.int64)

    def slots(self, ids: list[str], init: dict[str, float]) -> np.ndarray:
        """Row indices of ``ids`` (unique), creating rows with ``init`` values for new ids."""
        new = [p for p in ids if p not in self.index]
        if new:
            start = len(self.index)
            for k, p in enumerate(new):
                self.index[p] = start + k
            for c in self.columns:
                self.data[c] = np.concatenate([self.data[c], np.full(len(new), float(init[c]))])
            self.last_step = np.concatenate([self.last_step, np.full(len(new), -1, np.int64)])
        return np.array([self.index[p] for p in ids], dtype=np.int64)

    def gather(self, ids: list[str], default: dict[str, float]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Columns for ``ids`` (unknown ids get ``default``) and a mask of the known ones."""
        pos = np.array([self.index.get(p, -1) for p in ids], dtype=np.int64)
        known = pos >= 0
        out = {}
        for c in self.columns:
            col = np.full(len(ids), float(default[c]))
            col[known] = self.data[c][pos[known]]
            out[c] = col
        return out, known

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"ids": list(self.index), "last_step": self.last_step.copy()}
        state.update({f"col_{c}": self.data[c].copy() for c in self.columns})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ids = [str(p) for p in state["ids"]]
        n = len(ids)
        cols = {c: np.asarray(state[f"col_{c}"], np.float64).copy() for c in self.columns}
        last = np.asarray(state["last_step"], np.int64).copy()
        if len(set(ids)) != n or last.shape != (n,) or any(v.shape != (n,) for v in cols.values()):
            raise ValueError("predictor state arrays do not match its ids")
        self.index = {p: i for i, p in enumerate(ids)}
        self.data = cols
        self.last_step = last


def check_params(state: dict[str, Any], expected: dict[str, Any], who: str) -> None:
    """Refuse a state saved with different constructor parameters (it would not predict the same)."""
    got = state.get("params")
    if got != expected:
        raise ValueError(
            f"{who} state was saved with parameters {got}, this predictor has {expected}; "
            f"construct it with the same parameters before load_state_dict"
        )
