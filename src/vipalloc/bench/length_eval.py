"""Next-step error of response-length predictions, for ``vipalloc bench predictors``.

A trace step may carry the history's token columns (``tokens``: float ``(4, M)``: summed tokens of the successful
and of the failed rollouts, and how many rollouts of each kind had a length, as ``RolloutHistory.rows`` gives
them). The score of a prediction ``c_i`` (expected tokens per rollout of prompt ``i`` at step ``t``, from steps
``< t`` only) is ``|log c_i - log L_i|`` with ``L_i`` the prompt's realised mean tokens per rollout at step ``t``
(both floored at 1 token): the mean absolute error of log length, in nats (0.1 ~ 10% off). The target is noisy (a
group of a few rollouts), so even the true expected length scores above 0 (the simulator's oracle row).

Baselines (need no model): the **global mean** (tokens per rollout over every earlier rollout), and the **prompt's
last mean** (its mean tokens per rollout at the last step it appeared; a never-seen prompt gets the global mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["LengthErrors", "group_lengths", "length_baselines", "realised_mean", "step_lengths"]

SUBSETS = ("all", "seen", "never seen")


def group_lengths(tok_sum: float, count: int) -> np.ndarray:
    """``count`` whole-number lengths summing to ``round(tok_sum)`` (as even as possible), float64 ``(count,)``.

    The length model reads only sums and counts per outcome, so a group rebuilt from its sums teaches an
    allocator exactly what the original rollouts did."""
    if count <= 0:
        return np.zeros(0)
    total = int(round(tok_sum))
    q, r = divmod(total, count)
    return np.r_[np.full(r, q + 1.0), np.full(count - r, float(q))]


def step_lengths(successes: np.ndarray, trials: np.ndarray, tokens: np.ndarray | None) -> list[np.ndarray | None]:
    """Per-rollout lengths for ``observe`` aligned with rewards built as ``[1] * s + [0] * (n - s)``; None for a
    prompt whose rollouts do not all have a length (or when the step has no token columns)."""
    if tokens is None:
        return [None] * len(trials)
    out: list[np.ndarray | None] = []
    for j, (s, n) in enumerate(zip(successes, trials)):
        ls, lf = int(tokens[2, j]), int(tokens[3, j])
        if ls != int(s) or lf != int(n) - int(s):
            out.append(None)
            continue
        out.append(np.r_[group_lengths(tokens[0, j], ls), group_lengths(tokens[1, j], lf)])
    return out


def realised_mean(tokens: np.ndarray) -> np.ndarray:
    """Realised mean tokens per rollout of each prompt of a step (NaN without lengths), float64 ``(M,)``."""
    n = tokens[2] + tokens[3]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (tokens[0] + tokens[1]) / n, np.nan)


def _log_err(pred: np.ndarray, real: np.ndarray) -> np.ndarray:
    return np.abs(np.log(np.maximum(pred, 1.0)) - np.log(np.maximum(real, 1.0)))


class LengthErrors:
    """Accumulates ``|log c - log L|`` per subset (all / seen / never seen) over scored steps."""

    def __init__(self) -> None:
        self.errs: dict[str, list[np.ndarray]] = {k: [] for k in SUBSETS}

    def add(self, pred: np.ndarray, real: np.ndarray, seen: np.ndarray) -> None:
        """``pred``, ``real`` float ``(M,)`` (NaN real = no length: left out), ``seen`` bool ``(M,)``."""
        ok = np.isfinite(real) & np.isfinite(pred)
        e = _log_err(np.asarray(pred, np.float64), np.asarray(real, np.float64))
        for key, mask in (("all", ok), ("seen", ok & seen), ("never seen", ok & ~seen)):
            self.errs[key].append(e[mask])

    def result(self) -> dict[str, dict[str, float]]:
        """``{subset: {"mae_log": mean error (NaN if none), "count": prompts scored}}``."""
        out = {}
        for key, parts in self.errs.items():
            e = np.concatenate(parts) if parts else np.zeros(0)
            out[key] = {"mae_log": float(e.mean()) if e.size else float("nan"), "count": int(e.size)}
        return out


def length_baselines(steps: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Next-step log-length errors of the model-free baselines on a trace's steps (and of the true expected
    length, ``"expected_length"`` in simulator steps). Step 0 and steps without token columns are not scored."""
    glob = LengthErrors()
    last = LengthErrors()
    oracle = LengthErrors()
    tok_sum = 0.0
    tok_n = 0.0
    last_mean: dict[str, float] = {}
    seen: set[str] = set()
    has_oracle = False
    for k, st in enumerate(steps):
        tokens = st.get("tokens")
        if tokens is None:
            seen.update(st["ids"])
            continue
        tokens = np.asarray(tokens, np.float64)
        real = realised_mean(tokens)
        ids = st["ids"]
        mask = np.array([i in seen for i in ids])
        if k > 0 and tok_n > 0:
            g = tok_sum / tok_n
            glob.add(np.full(len(ids), g), real, mask)
            last.add(np.array([last_mean.get(i, g) for i in ids]), real, mask)
            if st.get("expected_length") is not None:
                has_oracle = True
                oracle.add(np.asarray(st["expected_length"], np.float64), real, mask)
        tok_sum += float(tokens[0].sum() + tokens[1].sum())
        tok_n += float(tokens[2].sum() + tokens[3].sum())
        for i, v in zip(ids, real):
            if np.isfinite(v):
                last_mean[i] = float(v)
        seen.update(ids)
    out = {"global mean": glob.result(), "prompt's last mean": last.result()}
    if has_oracle:
        out["true expected length (oracle)"] = oracle.result()
    return out
